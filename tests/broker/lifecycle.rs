//! Stopping and killing stages while orders keep coming: nothing accepted is lost, and in
//! the exactly-once mode nothing is reserved twice.
//!
//! Each test runs a load of its own (16 concurrent clients posting orders until told to
//! stop), stops or kills a stage once it has made progress, lets the load pile up a backlog
//! while the stage is down, restarts it, waits until the new instance has worked through
//! some of it, and only then stops the load. The outcome is judged on the
//! `inventory.reserved` topic, read `read_committed` as a downstream consumer would.

use std::collections::{HashMap, HashSet};
use std::os::unix::process::ExitStatusExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::OwnedMessage;

use crate::support::*;

/// Concurrent clients of the load.
const CLIENTS: usize = 16;
/// Pause of each client between two orders, to keep the load moderate on a small machine.
const PAUSE: Duration = Duration::from_millis(25);
/// The load never posts more than this many orders, whatever happens.
const MAX_ORDERS: usize = 20_000;
/// Progress a stage must show before it is stopped, and again after its restart.
const PROGRESS: f64 = 200.0;
/// Orders accepted while a stage is down, before it is restarted.
const BACKLOG: usize = 200;

// ---- the load ------------------------------------------------------------------------

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// What became of one posted order.
enum Outcome {
    Accepted,
    /// An HTTP answer other than 202.
    Refused(u16, String),
    /// No answer (connection error or timeout); `late` when kop-order was already told to stop.
    NoAnswer {
        error: String,
        late: bool,
    },
}

struct Load {
    stop: Arc<AtomicBool>,
    /// Set just before kop-order gets SIGTERM: from then on, requests may go unanswered.
    order_stopping: Arc<AtomicBool>,
    accepted: Arc<AtomicUsize>,
    /// Orders handed out so far (the next order number).
    next: Arc<AtomicUsize>,
    /// Clients still posting.
    active: Arc<AtomicUsize>,
    clients: tokio::task::JoinSet<Vec<(String, Outcome)>>,
}

#[derive(Default)]
struct LoadReport {
    posted: usize,
    accepted: Vec<String>,
    refused: Vec<(String, u16, String)>,
    no_answer_early: Vec<(String, String)>,
    no_answer_late: Vec<(String, String)>,
}

async fn try_post(
    client: &HttpClient,
    port: u16,
    id: &str,
    amount: f64,
) -> Result<(u16, String), String> {
    let request = order_request(port, id, amount)?;
    let exchange = async {
        let response = client
            .request(request)
            .await
            .map_err(|e| format!("{e:?}"))?;
        read_answer(response).await
    };
    tokio::time::timeout(Duration::from_secs(30), exchange)
        .await
        .unwrap_or_else(|_| Err("no answer within 30 s".into()))
}

impl Load {
    /// Starts posting orders `<prefix>-<n>` to kop-order until [`Load::finish`].
    fn start(port: u16, prefix: &str) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let order_stopping = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let next = Arc::new(AtomicUsize::new(0));
        let active = Arc::new(AtomicUsize::new(CLIENTS));
        let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
        let mut clients = tokio::task::JoinSet::new();
        for _ in 0..CLIENTS {
            let (stop, order_stopping, accepted, next, client) = (
                stop.clone(),
                order_stopping.clone(),
                accepted.clone(),
                next.clone(),
                client.clone(),
            );
            let prefix = prefix.to_string();
            let active = active.clone();
            clients.spawn(async move {
                let mut outcomes = Vec::new();
                while !stop.load(Ordering::Acquire) {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= MAX_ORDERS {
                        break;
                    }
                    let id = format!("{prefix}-{n}");
                    let late = order_stopping.load(Ordering::Acquire);
                    let outcome = match try_post(&client, port, &id, 10.0 + (n % 1000) as f64).await
                    {
                        Ok((202, _)) => {
                            accepted.fetch_add(1, Ordering::AcqRel);
                            Outcome::Accepted
                        }
                        Ok((status, body)) => Outcome::Refused(status, body),
                        Err(error) => Outcome::NoAnswer {
                            error,
                            late: late || order_stopping.load(Ordering::Acquire),
                        },
                    };
                    let give_up = matches!(outcome, Outcome::NoAnswer { late: true, .. });
                    outcomes.push((id, outcome));
                    if give_up {
                        break;
                    }
                    tokio::time::sleep(PAUSE).await;
                }
                active.fetch_sub(1, Ordering::AcqRel);
                outcomes
            });
        }
        Load {
            stop,
            order_stopping,
            accepted,
            next,
            active,
            clients,
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Acquire)
    }

    /// True while every client is still posting.
    fn running(&self) -> bool {
        self.active.load(Ordering::Acquire) == CLIENTS
            && !self.stop.load(Ordering::Acquire)
            && self.next.load(Ordering::Acquire) < MAX_ORDERS
    }

    /// Waits until `more` orders were accepted after `since` (a value of [`Load::accepted`]).
    async fn wait_accepted(&self, since: usize, more: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.accepted() < since + more {
            assert!(
                Instant::now() < deadline,
                "only {} orders accepted within {timeout:?}, wanted {}",
                self.accepted(),
                since + more
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the clients and collects what became of every order.
    async fn finish(mut self) -> LoadReport {
        self.stop.store(true, Ordering::Release);
        let mut report = LoadReport::default();
        while let Some(outcomes) = self.clients.join_next().await {
            for (id, outcome) in outcomes.expect("load client") {
                report.posted += 1;
                match outcome {
                    Outcome::Accepted => report.accepted.push(id),
                    Outcome::Refused(status, body) => report.refused.push((id, status, body)),
                    Outcome::NoAnswer { error, late: false } => {
                        report.no_answer_early.push((id, error))
                    }
                    Outcome::NoAnswer { error, late: true } => {
                        report.no_answer_late.push((id, error))
                    }
                }
            }
        }
        eprintln!(
            "load: {} posted, {} accepted, {} refused, {} unanswered before kop-order was stopped, {} after",
            report.posted,
            report.accepted.len(),
            report.refused.len(),
            report.no_answer_early.len(),
            report.no_answer_late.len()
        );
        let mut kinds: HashMap<String, usize> = HashMap::new();
        for (_, error) in &report.no_answer_late {
            *kinds.entry(error.chars().take(80).collect()).or_default() += 1;
        }
        if !kinds.is_empty() {
            eprintln!("load: requests unanswered once kop-order was stopping: {kinds:?}");
        }
        report
    }
}

// ---- daemons with a configuration file of the test's own ----------------------------

/// A dead member leaves its group after 6 s rather than librdkafka's default 45 s, so a
/// restarted stage takes over its partitions quickly.
const FAST_SESSION: &str =
    "[kafka]\n\"session.timeout.ms\" = 6000\n\"heartbeat.interval.ms\" = 1000\n";

/// Records a stage produced to `topic`, from its metrics.
async fn produced(pipeline: &mut Pipeline, service: &str, topic: &str) -> f64 {
    let text = pipeline.daemon(service).metrics().await;
    metric(&text, "kafka_messages_produced_total", &[("topic", topic)])
}

/// Waits until `service` has produced at least `count` records to `topic` (counted since its
/// start), failing if it exits or takes longer than `timeout`. Returns the time it took.
async fn wait_produced(
    pipeline: &mut Pipeline,
    service: &str,
    topic: &str,
    count: f64,
    timeout: Duration,
) -> Duration {
    let started = Instant::now();
    loop {
        if produced(pipeline, service, topic).await >= count {
            return started.elapsed();
        }
        let daemon = pipeline.daemon(service);
        if let Some(status) = daemon.child.try_wait().expect("try_wait") {
            panic!(
                "{service} exited ({status}) while working; log:\n{}",
                daemon.log_text()
            );
        }
        assert!(
            started.elapsed() < timeout,
            "{service} produced fewer than {count} records to {topic} within {timeout:?}; log:\n{}",
            daemon.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Reads a topic from the beginning with the given isolation level until every id of
/// `wanted` has been seen, then for `settle` more (to catch duplicates); gives up after
/// `timeout` with what it has.
fn read_topic(
    topic: &str,
    isolation: &str,
    wanted: &HashSet<String>,
    timeout: Duration,
    settle: Duration,
) -> Vec<OwnedMessage> {
    let mut config = kafka_config();
    config
        .set("group.id", unique("reader"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("isolation.level", isolation);
    let consumer: BaseConsumer = config.create().expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut out = Vec::new();
    let mut missing = wanted.clone();
    let deadline = Instant::now() + timeout;
    let mut settle_until: Option<Instant> = None;
    loop {
        let now = Instant::now();
        if settle_until.is_some_and(|t| now >= t) || (settle_until.is_none() && now >= deadline) {
            break;
        }
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(message)) => {
                let message = message.detach();
                missing.remove(json(&message)["orderId"].as_str().unwrap_or_default());
                out.push(message);
            }
            Some(Err(e)) => eprintln!("reading {topic}: {e}"),
            None => {}
        }
        if missing.is_empty() && settle_until.is_none() {
            settle_until = Some(Instant::now() + settle);
        }
    }
    out
}

/// Checks the reservations against what the load was told: every accepted order reserved
/// (exactly once, or at least once), nothing reserved that was never posted, and nothing
/// reserved twice in the exactly-once mode even among the orders whose answer was lost.
/// Returns the number of duplicate reservations.
fn check_reservations(
    reserved: &[OwnedMessage],
    report: &LoadReport,
    prefix: &str,
    exactly_once: bool,
) -> usize {
    let counts = count_by_order(reserved);
    let posted: HashSet<&str> = report
        .accepted
        .iter()
        .map(String::as_str)
        .chain(report.refused.iter().map(|(id, _, _)| id.as_str()))
        .chain(report.no_answer_early.iter().map(|(id, _)| id.as_str()))
        .chain(report.no_answer_late.iter().map(|(id, _)| id.as_str()))
        .collect();
    for id in counts.keys() {
        assert!(
            id.starts_with(&format!("{prefix}-")) && posted.contains(id.as_str()),
            "reservation for an order nobody posted: {id:?}"
        );
    }
    // Orders without an answer (or refused) may have made it or not; at most once, though.
    let unanswered: Vec<&str> = report
        .no_answer_early
        .iter()
        .map(|(id, _)| id.as_str())
        .chain(report.no_answer_late.iter().map(|(id, _)| id.as_str()))
        .chain(report.refused.iter().map(|(id, _, _)| id.as_str()))
        .collect();
    let unanswered_reserved = unanswered
        .iter()
        .filter(|id| counts.contains_key(**id))
        .count();
    if !unanswered.is_empty() {
        eprintln!(
            "{unanswered_reserved} of {} orders without a 202 were reserved anyway",
            unanswered.len()
        );
    }
    let missing: Vec<&String> = report
        .accepted
        .iter()
        .filter(|id| !counts.contains_key(*id))
        .collect();
    let duplicates: HashMap<&String, usize> = counts
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(id, n)| (id, *n))
        .collect();
    let extra: usize = duplicates.values().map(|n| n - 1).sum();
    eprintln!(
        "reservations: {} records, {} orders, {} accepted orders missing, {} orders reserved more than once ({} extra records)",
        reserved.len(),
        counts.len(),
        missing.len(),
        duplicates.len(),
        extra
    );
    assert!(
        missing.is_empty(),
        "{} of {} accepted orders were never reserved (lost), e.g. {:?}",
        missing.len(),
        report.accepted.len(),
        missing.iter().take(10).collect::<Vec<_>>()
    );
    if exactly_once {
        assert!(
            duplicates.is_empty(),
            "{} orders reserved more than once in exactly-once mode, e.g. {:?}",
            duplicates.len(),
            duplicates.iter().take(10).collect::<Vec<_>>()
        );
        assert_eq!(reserved.len(), counts.len());
    } else if !duplicates.is_empty() {
        let mut sample: Vec<_> = duplicates.iter().collect();
        sample.sort();
        eprintln!(
            "at-least-once: {} duplicate reservations, e.g. {:?}",
            extra,
            sample.iter().take(10).collect::<Vec<_>>()
        );
    }
    // Every reservation carries its order id as the key.
    for m in reserved {
        assert_eq!(key(m), json(m)["orderId"].as_str().unwrap_or_default());
    }
    extra
}

fn assert_load_sane(report: &LoadReport) {
    assert!(
        report.no_answer_early.is_empty(),
        "kop-order left {} requests unanswered while it was supposed to run, e.g. {:?}",
        report.no_answer_early.len(),
        report.no_answer_early.iter().take(5).collect::<Vec<_>>()
    );
    for (id, status, body) in report.refused.iter().take(5) {
        eprintln!("refused {id}: {status} {body}");
    }
    assert!(
        report.refused.iter().all(|(_, status, _)| *status == 503),
        "only 503 (overload) may refuse a valid order: {:?}",
        report.refused.iter().take(5).collect::<Vec<_>>()
    );
}

/// SIGTERM to kop-order: it exits 0 after answering what was in flight. A load still
/// running is told first, so that it expects unanswered requests from then on.
fn stop_order(pipeline: &mut Pipeline, load: Option<&Load>) {
    if let Some(load) = load {
        load.order_stopping.store(true, Ordering::Release);
    }
    let order = pipeline.daemon("order");
    order.signal("TERM");
    let code = order.wait_exit(Duration::from_secs(40));
    assert_eq!(
        code,
        Some(0),
        "kop-order exit status after SIGTERM; log:\n{}",
        order.log_text()
    );
    assert!(
        order.log_text().contains("stopped"),
        "kop-order logged its stop:\n{}",
        order.log_text()
    );
}

/// SIGKILLs a stage and checks it was running until then.
fn kill_stage(pipeline: &mut Pipeline, service: &str) {
    let daemon = pipeline.daemon(service);
    assert!(
        daemon.child.try_wait().expect("try_wait").is_none(),
        "{service} was running"
    );
    daemon.child.kill().expect("SIGKILL");
    let status = daemon.child.wait().expect("wait");
    assert_eq!(
        status.signal(),
        Some(9),
        "{service} died of the SIGKILL: {status}"
    );
}

// ---- the tests ---------------------------------------------------------------------------

/// SIGTERM to kop-payment under load: it finishes its batch, leaves, exits 0; restarted,
/// it carries on where it stopped. Then SIGTERM to kop-order, still under load: exit 0,
/// and each order it answered 202 is reserved exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_under_load_loses_and_duplicates_nothing() {
    let test_started = Instant::now();
    let mut pipeline = Pipeline::new();
    pipeline.start_all(&[]).await;
    let prefix = "term";
    let load = Load::start(pipeline.order_port, prefix);
    let payments = pipeline.payments.clone();

    wait_produced(
        &mut pipeline,
        "payment",
        &payments,
        PROGRESS,
        Duration::from_secs(60),
    )
    .await;
    assert!(
        load.running(),
        "the load is still running when kop-payment is stopped"
    );
    let payment = pipeline.daemon("payment");
    payment.signal("TERM");
    let term_at = Instant::now();
    let code = payment.wait_exit(Duration::from_secs(30));
    eprintln!(
        "kop-payment exited {code:?} {:?} after SIGTERM",
        term_at.elapsed()
    );
    assert_eq!(
        code,
        Some(0),
        "kop-payment exit status after SIGTERM; log:\n{}",
        payment.log_text()
    );
    let log = payment.log_text();
    assert!(
        log.contains("draining done"),
        "kop-payment drained before exiting:\n{log}"
    );

    // A backlog builds up while kop-payment is down.
    let down_at = load.accepted();
    load.wait_accepted(down_at, BACKLOG, Duration::from_secs(60))
        .await;
    pipeline.restart("payment").await;
    let resumed = wait_produced(
        &mut pipeline,
        "payment",
        &payments,
        PROGRESS,
        Duration::from_secs(90),
    )
    .await;
    eprintln!("restarted kop-payment produced {PROGRESS} records {resumed:?} after it was ready");
    assert!(
        load.running(),
        "the load is still running after the restart"
    );

    // kop-order, stopped while the clients keep posting.
    let before_stop = load.accepted();
    load.wait_accepted(before_stop, 50, Duration::from_secs(60))
        .await;
    stop_order(&mut pipeline, Some(&load));
    let report = load.finish().await;
    assert_load_sane(&report);

    let wanted: HashSet<String> = report.accepted.iter().cloned().collect();
    let reserved = read_topic(
        &pipeline.reserved,
        "read_committed",
        &wanted,
        Duration::from_secs(60),
        Duration::from_secs(3),
    );
    check_reservations(&reserved, &report, prefix, true);

    for service in ["payment", "inventory", "notification"] {
        let daemon = pipeline.daemon(service);
        assert!(
            daemon.child.try_wait().expect("try_wait").is_none(),
            "{service} still runs"
        );
    }
    eprintln!("sigterm test took {:?}", test_started.elapsed());
}

/// SIGKILL of kop-payment and then of kop-inventory under load, exactly-once: the
/// restarted instance (same transactional id) fences the dead one and aborts its open
/// transaction; downstream sees each accepted order exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn sigkill_under_load_exactly_once() {
    let test_started = Instant::now();
    let mut pipeline = Pipeline::new();
    sigkill_scenario(&mut pipeline, "kill-eos", true).await;
    eprintln!(
        "sigkill exactly-once test took {:?}",
        test_started.elapsed()
    );
}

/// The same in at-least-once mode: nothing lost; duplicates are allowed and counted.
#[tokio::test(flavor = "multi_thread")]
async fn sigkill_under_load_at_least_once() {
    let test_started = Instant::now();
    let mut pipeline = Pipeline::new();
    pipeline
        .extra_env
        .push(("PROCESSING_GUARANTEE".into(), "at-least-once".into()));
    let duplicates = sigkill_scenario(&mut pipeline, "kill-alo", false).await;
    eprintln!(
        "sigkill at-least-once test took {:?}; {duplicates} duplicate reservations",
        test_started.elapsed()
    );
}

async fn sigkill_scenario(pipeline: &mut Pipeline, prefix: &str, exactly_once: bool) -> usize {
    pipeline.start("order", &[]).await;
    for service in ["payment", "inventory", "notification"] {
        pipeline.start_with_config(service, &[], FAST_SESSION).await;
    }
    let load = Load::start(pipeline.order_port, prefix);
    let payments = pipeline.payments.clone();
    let reserved_topic = pipeline.reserved.clone();

    for (service, output) in [("payment", &payments), ("inventory", &reserved_topic)] {
        wait_produced(pipeline, service, output, PROGRESS, Duration::from_secs(60)).await;
        assert!(
            load.running(),
            "the load is still running when {service} is killed"
        );
        kill_stage(pipeline, service);
        let down_at = load.accepted();
        load.wait_accepted(down_at, BACKLOG, Duration::from_secs(60))
            .await;
        pipeline.restart(service).await;
        let resumed =
            wait_produced(pipeline, service, output, PROGRESS, Duration::from_secs(90)).await;
        eprintln!("restarted {service} produced {PROGRESS} records {resumed:?} after it was ready");
        assert!(
            load.running(),
            "the load is still running after {service} was restarted"
        );
        if exactly_once {
            let log = pipeline.daemon(service).log_text();
            assert!(
                log.contains("transactions initialised"),
                "restarted {service}:\n{log}"
            );
        }
    }

    let report = load.finish().await;
    stop_order(pipeline, None);
    assert_load_sane(&report);

    let wanted: HashSet<String> = report.accepted.iter().cloned().collect();
    let reserved = read_topic(
        &reserved_topic,
        "read_committed",
        &wanted,
        Duration::from_secs(60),
        Duration::from_secs(3),
    );
    let duplicates = check_reservations(&reserved, &report, prefix, exactly_once);

    if exactly_once {
        // Did the kill catch a transaction open? Records of aborted transactions show up in
        // read_uncommitted only. Informative: the kill can also fall between two batches.
        let uncommitted = read_topic(
            &payments,
            "read_uncommitted",
            &wanted,
            Duration::from_secs(30),
            Duration::from_secs(2),
        );
        let committed = read_topic(
            &payments,
            "read_committed",
            &wanted,
            Duration::from_secs(30),
            Duration::from_secs(2),
        );
        eprintln!(
            "{}: {} records read_uncommitted, {} read_committed ({} from aborted transactions)",
            payments,
            uncommitted.len(),
            committed.len(),
            uncommitted.len().saturating_sub(committed.len())
        );
        let counts = count_by_order(&committed);
        assert!(
            counts.values().all(|n| *n == 1),
            "each order paid once in {payments} (read_committed)"
        );
    }
    for service in ["payment", "inventory", "notification"] {
        let daemon = pipeline.daemon(service);
        assert!(
            daemon.child.try_wait().expect("try_wait").is_none(),
            "{service} still runs"
        );
    }
    duplicates
}
