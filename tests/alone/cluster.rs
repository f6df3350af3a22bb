//! A three-broker KRaft cluster on this machine (cargo xtask kafka start --nodes 3): every
//! topic of the pipeline has three replicas and min.insync.replicas 2. Under a steady stream
//! of orders one broker is killed (SIGKILL, a crash) and later brought back; not one
//! accepted order is lost, the API writes each order it was sent at most once, and the
//! stages carry every record the API wrote exactly once.
//!
//! The broker killed is the coordinator of the payment stage's consumer group, which takes
//! that stage's transactional offset commits, and it leads a partition of the order topic:
//! the worst broker to lose for both the API and the stages.
//!
//! The test stands in for systemd's `Restart=on-failure`: a daemon that exits with a
//! failure is started again and counted (the README's contract: a stage that cannot go on
//! exits non-zero and systemd restarts it). A daemon that stays up but stops being ready,
//! or stops making progress, fails the test.
//!
//! The test runs a cluster of its own.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};

use crate::support::*;

const NODES: u32 = 3;
/// At least this many orders are posted ...
const MIN_ORDERS: usize = 5_000;
/// ... at this rate, at most this many at once, and the load goes on until the killed
/// broker is back.
const RATE_PER_SECOND: u64 = 125;
const CONCURRENCY: usize = 32;
/// Safety net: the load never goes beyond this.
const MAX_ORDERS: usize = 20_000;
/// The broker is killed this long after the load started, and started again this long
/// after the kill (more than the 9 s after which the controller fences a silent broker).
const KILL_AFTER: Duration = Duration::from_secs(8);
const DOWN_FOR: Duration = Duration::from_secs(10);
/// The load stops this long after the broker is back.
const LOAD_AFTER_BACK: Duration = Duration::from_secs(5);

/// The order API creates its topic with three replicas.
const ORDER_CONFIG: &str = "[topics]\nreplication_factor = 3\n";
/// The stages too; and a dead stage leaves its group after 6 s rather than librdkafka's
/// default 45 s (as in chaos.rs), so that a restarted one takes over quickly.
const STAGE_CONFIG: &str = "[topics]\nreplication_factor = 3\n\n[kafka]\n\
                            \"session.timeout.ms\" = 6000\n\"heartbeat.interval.ms\" = 1000\n";

/// The cluster of this test; deleted with its data when dropped (only stopped, with its
/// logs kept in node*/broker.log, after a failure).
struct Cluster {
    broker: OwnBroker,
}

impl Cluster {
    fn start() -> Cluster {
        let broker = OwnBroker::start_with(
            std::env::temp_dir().join(unique("kop-cluster")),
            StartOptions {
                nodes: Some(NODES),
                port: Some(0),
                ..StartOptions::default()
            },
        );
        assert_eq!(
            broker.address.split(',').count(),
            NODES as usize,
            "bootstrap list {}",
            broker.address
        );
        Cluster { broker }
    }

    fn address(&self) -> &str {
        &self.broker.address
    }

    /// Crashes one broker: SIGKILL.
    fn kill_node(&self, node: i32) {
        self.broker.kill_node(node as u32);
    }

    /// Starts it again with its data; returns once it serves clients.
    fn start_node(&self, node: i32) {
        assert_eq!(self.broker.start_node(node as u32), self.address());
    }

    fn config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", self.address());
        config
    }
}

/// Restarts the daemons that exited, as systemd's `Restart=on-failure` would (exit status
/// 78, a configuration error, is not restarted there either: it fails the test).
fn supervise(pipeline: &mut Pipeline, restarts: &mut Vec<String>) {
    for service in SERVICES {
        let daemon = pipeline.daemon(service);
        let Some(status) = daemon.child.try_wait().expect("try_wait") else {
            continue;
        };
        assert!(
            !matches!(status.code(), Some(0) | Some(78)),
            "{service} exited with {status}:\n{}",
            daemon.log_text()
        );
        let env = daemon.env.clone();
        let log = daemon.log.clone();
        let config = pipeline.log_dir.join(format!("{service}.toml"));
        eprintln!(
            "{service} exited with {status} (log {}); restarting it",
            log.display()
        );
        restarts.push(format!("{service} ({status})"));
        let fresh = Daemon::spawn_with_config(service, &env, &pipeline.log_dir, &config);
        pipeline.daemons.insert(service.to_string(), fresh);
    }
}

/// Waits (restarting what exits) until every daemon is ready; fails with what the stages
/// did if one is not within `timeout`.
async fn wait_all_ready(pipeline: &mut Pipeline, restarts: &mut Vec<String>, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        supervise(pipeline, restarts);
        let mut not_ready = Vec::new();
        for service in SERVICES {
            let port = pipeline.daemon(service).metrics_port;
            if !matches!(http_get(port, "/readyz").await, Ok((200, _))) {
                not_ready.push(service);
            }
        }
        if not_ready.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            let report = stage_report(pipeline).await;
            panic!("not ready {timeout:?} after the failover: {not_ready:?}\n{report}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// What the stages did, for a failure message.
async fn stage_report(pipeline: &mut Pipeline) -> String {
    let mut report = String::new();
    for service in ["payment", "inventory", "notification"] {
        let daemon = pipeline.daemon(service);
        let metrics = http_get(daemon.metrics_port, "/metrics")
            .await
            .map(|(_, text)| text)
            .unwrap_or_default();
        let transactions: Vec<&str> = metrics
            .lines()
            .filter(|l| l.starts_with("kop_transactions_total"))
            .collect();
        let log = daemon.log_text();
        let tail: Vec<&str> = log.lines().rev().take(15).collect();
        report.push_str(&format!(
            "--- {service} ({}): {transactions:?}\n{}\n",
            daemon.log.display(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        ));
    }
    report
}

/// One POST /order: its status and when its answer came.
struct Answer {
    id: String,
    status: u16,
    done: Instant,
}

/// Posts orders `<prefix>-<n>` at `RATE_PER_SECOND`, at most `CONCURRENCY` at once, until
/// `stop` is set and at least `MIN_ORDERS` were sent.
async fn post_paced(port: u16, prefix: &str, stop: Arc<AtomicBool>) -> Vec<Answer> {
    let semaphore = Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
    let mut tasks = tokio::task::JoinSet::new();
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / RATE_PER_SECOND));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for n in 0..MAX_ORDERS {
        if n >= MIN_ORDERS && stop.load(Ordering::Relaxed) {
            break;
        }
        tick.tick().await;
        let permit = semaphore.clone().acquire_owned().await.expect("semaphore");
        let id = format!("{prefix}-{n}");
        tasks.spawn(async move {
            let (status, _) = post_order(port, &id, 10.0 + n as f64).await;
            drop(permit);
            Answer {
                id,
                status,
                done: Instant::now(),
            }
        });
    }
    let mut answers = Vec::new();
    while let Some(answer) = tasks.join_next().await {
        answers.push(answer.expect("request task"));
    }
    answers
}

/// Leader and replica count of each partition of the topics whose name starts with `prefix`.
fn partitions(config: &ClientConfig, prefix: &str) -> Vec<(String, i32, i32, usize)> {
    let consumer: BaseConsumer = config.create().expect("metadata client");
    let metadata = consumer
        .fetch_metadata(None, Duration::from_secs(10))
        .expect("metadata");
    let mut out = Vec::new();
    for topic in metadata.topics() {
        if !topic.name().starts_with(prefix) {
            continue;
        }
        for partition in topic.partitions() {
            out.push((
                topic.name().to_string(),
                partition.id(),
                partition.leader(),
                partition.replicas().len(),
            ));
        }
    }
    out
}

/// Java's `String.hashCode`, which Kafka uses to place a consumer group on a partition of
/// `__consumer_offsets` (whose leader is the group's coordinator).
fn java_hash(text: &str) -> i32 {
    text.encode_utf16()
        .fold(0i32, |h, c| h.wrapping_mul(31).wrapping_add(c as i32))
}

/// Kafka's `Utils.abs`.
fn java_abs(n: i32) -> i32 {
    if n == i32::MIN { 0 } else { n.abs() }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broker_crash_in_a_three_node_cluster_loses_no_order() {
    let _turn = crate::take_turn().await;
    // The suite's broker must exist too: this suite never runs without one.
    let _ = brokers();
    let started = Instant::now();
    let cluster = Arc::new(Cluster::start());
    eprintln!(
        "{NODES}-node cluster at {} after {:.1}s",
        cluster.address(),
        started.elapsed().as_secs_f64()
    );

    let mut pipeline = Pipeline::new();
    pipeline
        .extra_env
        .push(("KAFKA_BROKERS".into(), cluster.address().to_string()));
    pipeline.start_with_config("order", &[], ORDER_CONFIG).await;
    for stage in ["payment", "inventory", "notification"] {
        pipeline.start_with_config(stage, &[], STAGE_CONFIG).await;
    }

    // Every topic of the pipeline is replicated three times.
    let config = cluster.config();
    let prefix = pipeline.prefix.clone();
    let layout = tokio::task::spawn_blocking(move || partitions(&config, &prefix))
        .await
        .expect("metadata");
    assert!(
        layout.len() >= 3 * 9,
        "expected the 9 topics of the pipeline with 3 partitions each: {layout:?}"
    );
    for (topic, partition, _, replicas) in &layout {
        assert_eq!(*replicas, 3, "{topic}[{partition}] has {replicas} replicas");
    }

    // The victim: the coordinator of the payment stage's group.
    let group = format!("{}.payment", pipeline.prefix);
    let config = cluster.config();
    let offsets = tokio::task::spawn_blocking(move || partitions(&config, "__consumer_offsets"))
        .await
        .expect("metadata");
    assert!(!offsets.is_empty(), "no __consumer_offsets partitions");
    let coordinator_partition = java_abs(java_hash(&group)) % offsets.len() as i32;
    let victim = offsets
        .iter()
        .find(|(_, partition, ..)| *partition == coordinator_partition)
        .map(|(_, _, leader, _)| *leader)
        .expect("group coordinator");
    assert!((1..=NODES as i32).contains(&victim), "leader {victim}");
    let led: Vec<i32> = layout
        .iter()
        .filter(|(topic, _, leader, _)| *topic == pipeline.orders && *leader == victim)
        .map(|(_, partition, ..)| *partition)
        .collect();
    eprintln!(
        "pipeline ready after {:.1}s; will kill node {victim}: coordinator of group {group}, \
         leader of {} partitions {led:?}",
        started.elapsed().as_secs_f64(),
        pipeline.orders
    );

    // Load; the crash under it; the broker back; the load goes on a little longer.
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(post_paced(pipeline.order_port, "cluster", stop.clone()));
    let load_started = Instant::now();
    let mut restarts = Vec::new();
    let mut killed_at = None;
    let mut revive = None;
    let mut back_at = None;
    while !load.is_finished() {
        tokio::time::sleep(Duration::from_millis(250)).await;
        supervise(&mut pipeline, &mut restarts);
        assert!(
            load_started.elapsed() < Duration::from_secs(300),
            "the load did not end"
        );
        if killed_at.is_none() && load_started.elapsed() >= KILL_AFTER {
            let crash = cluster.clone();
            tokio::task::spawn_blocking(move || crash.kill_node(victim))
                .await
                .expect("stop-node");
            killed_at = Some(Instant::now());
        }
        if revive.is_none()
            && let Some(killed) = killed_at
            && killed.elapsed() >= DOWN_FOR
        {
            let again = cluster.clone();
            revive = Some((
                Instant::now(),
                tokio::task::spawn_blocking(move || again.start_node(victim)),
            ));
        }
        if back_at.is_none()
            && let Some((_, handle)) = &mut revive
            && handle.is_finished()
        {
            handle.await.expect("start-node");
            back_at = Some(Instant::now());
        }
        if back_at.is_some_and(|back| back.elapsed() >= LOAD_AFTER_BACK) {
            stop.store(true, Ordering::Relaxed);
        }
    }
    let answers = load.await.expect("load");
    let killed_at = killed_at.expect("the load ended before the kill");
    let (restart_at, _) = revive.expect("the load ended before the restart");
    let back_at = back_at.expect("the load ended before the broker was back");
    eprintln!(
        "node {victim} down for {:.1}s; start-node took {:.1}s",
        (back_at - killed_at).as_secs_f64(),
        (back_at - restart_at).as_secs_f64()
    );

    // What the API answered around the crash.
    let mut by_status: HashMap<u16, usize> = HashMap::new();
    for answer in &answers {
        *by_status.entry(answer.status).or_default() += 1;
    }
    let failures: Vec<&Answer> = answers.iter().filter(|a| a.status != 202).collect();
    let after_kill = |a: &&Answer| a.done.saturating_duration_since(killed_at).as_secs_f64();
    let last_failure = failures.iter().map(after_kill).fold(0.0, f64::max);
    let first_failure = failures
        .iter()
        .map(after_kill)
        .fold(f64::INFINITY, f64::min);
    let unavailable = by_status.get(&503).copied().unwrap_or(0);
    eprintln!(
        "{} orders posted: {by_status:?}; {unavailable} answered 503 during the failover{}",
        answers.len(),
        if failures.is_empty() {
            String::new()
        } else {
            format!(
                ", from {first_failure:.1}s to {last_failure:.1}s after the kill \
                 (only 202 from then on)"
            )
        }
    );
    assert!(
        answers.len() >= MIN_ORDERS,
        "only {} orders posted",
        answers.len()
    );
    let odd: Vec<_> = by_status
        .keys()
        .filter(|status| !matches!(**status, 202 | 503))
        .collect();
    assert!(
        odd.is_empty(),
        "answers other than 202 and 503: {by_status:?}"
    );
    let accepted: Vec<&str> = answers
        .iter()
        .filter(|a| a.status == 202)
        .map(|a| a.id.as_str())
        .collect();
    assert!(
        accepted.len() > answers.len() / 2,
        "too few accepted: {by_status:?}"
    );

    // The daemons rode it out: running (restarted if they exited) and ready.
    wait_all_ready(&mut pipeline, &mut restarts, Duration::from_secs(30)).await;

    // Every accepted order reserved exactly once, read from the cluster (read_committed).
    let config = cluster.config();
    let reserved = pipeline.reserved.clone();
    let expected = accepted.len();
    let read_from = Instant::now();
    let reader = tokio::task::spawn_blocking(move || {
        consume_with(
            config,
            &reserved,
            expected,
            Duration::from_secs(90),
            Duration::from_secs(3),
        )
    });
    while !reader.is_finished() {
        tokio::time::sleep(Duration::from_millis(250)).await;
        supervise(&mut pipeline, &mut restarts);
    }
    let records = reader.await.expect("reader");
    let counts = count_by_order(&records);

    // What the order API wrote: the stages must carry each of these records exactly once.
    // The API itself writes each record once: its idempotent producer keeps a record through
    // the failover instead of timing it out (which would bump the producer's epoch, under
    // which a retried request can no longer be recognised as a repeat).
    let config = cluster.config();
    let written_ids: Vec<String> = counts.keys().cloned().collect();
    let edge = count_until_all_seen(
        config,
        &pipeline.orders,
        written_ids,
        Duration::from_secs(90),
        Duration::from_secs(3),
    )
    .await;

    let lost: Vec<_> = accepted
        .iter()
        .filter(|id| !counts.contains_key(**id))
        .collect();
    // Reserved a number of times other than written: the stages lost or repeated it.
    let mismatched: Vec<_> = counts
        .iter()
        .filter(|(id, n)| edge.get(*id) != Some(*n))
        .map(|(id, n)| (id, *n, edge.get(id).copied().unwrap_or(0)))
        .collect();
    let written_twice = edge.values().filter(|n| **n > 1).count();
    let posted: HashMap<&str, u16> = answers.iter().map(|a| (a.id.as_str(), a.status)).collect();
    let unknown: Vec<_> = counts
        .keys()
        .filter(|id| !posted.contains_key(id.as_str()))
        .collect();
    // A 503 means "not acknowledged in time", not "not written": such an order may still
    // have gone through (a client retries it with the same orderId).
    let refused_but_written = counts
        .keys()
        .filter(|id| posted.get(id.as_str()) == Some(&503))
        .count();
    eprintln!(
        "{} accepted, {} lost, {} reserved other than written ({} written twice by the API's \
         producer); {refused_but_written} of the 503s written anyway; daemon restarts: \
         {restarts:?}; reserved read in {:.1}s; test took {:.1}s",
        accepted.len(),
        lost.len(),
        mismatched.len(),
        written_twice,
        read_from.elapsed().as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    if !lost.is_empty() {
        let report = stage_report(&mut pipeline).await;
        panic!(
            "lost {} accepted orders, e.g. {:?}\n{report}",
            lost.len(),
            &lost[..lost.len().min(5)]
        );
    }
    assert_eq!(
        written_twice, 0,
        "orders the API wrote more than once (each was posted once)"
    );
    assert!(
        mismatched.is_empty(),
        "(order, times reserved, times written by the API): {:?}",
        &mismatched[..mismatched.len().min(5)]
    );
    assert!(unknown.is_empty(), "orders nobody posted: {unknown:?}");
    assert_eq!(
        records.len(),
        edge.values().sum::<usize>(),
        "every record the API wrote reserved once"
    );
}
