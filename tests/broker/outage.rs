//! Kafka going away: the daemons wait instead of crashing, the API answers 503 with
//! Retry-After while the broker is down, and everything recovers when it comes back.
//! These tests run a broker of their own (kop-harness), since they stop it.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::support::*;

#[tokio::test(flavor = "multi_thread")]
async fn a_broker_outage_is_waited_out() {
    // The shared broker must exist too: this suite never runs without one.
    let _ = brokers();
    let broker = OwnBroker::start(
        std::env::temp_dir().join(unique("kop-outage-broker")),
        free_port(),
    );

    let mut pipeline = Pipeline::new();
    pipeline
        .extra_env
        .push(("KAFKA_BROKERS".into(), broker.address.clone()));
    pipeline.start_all(&[]).await;
    let config = "[http]\nproduce_timeout = \"2s\"\n";
    pipeline.daemons.remove("order");
    pipeline.start_with_config("order", &[], config).await;
    let port = pipeline.order_port;
    assert_eq!(post_order(port, "before", 1.0).await.0, 202);

    broker.stop();
    let (status, headers, body) = http_request(
        port,
        "POST",
        "/order",
        &[("content-type", "application/json")],
        br#"{"orderId":"during","amount":1}"#.to_vec(),
    )
    .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(headers.get("retry-after").map(String::as_str), Some("1"));
    // The daemons are still there, alive.
    for service in SERVICES {
        let daemon = pipeline.daemon(service);
        assert!(
            daemon.child.try_wait().unwrap().is_none(),
            "{service} exited during the outage"
        );
        assert_eq!(
            http_get(daemon.metrics_port, "/healthz").await.unwrap().0,
            200
        );
    }

    // Back on the same port: orders flow again, and the one accepted before went through.
    broker.restart();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, _) = post_order(port, "after", 1.0).await;
        if status == 202 {
            break;
        }
        assert!(Instant::now() < deadline, "the API did not recover");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let mut config = rdkafka::ClientConfig::new();
    config.set("bootstrap.servers", &broker.address);
    let reserved = consume_with(
        config,
        &pipeline.reserved,
        2,
        Duration::from_secs(90),
        Duration::from_secs(1),
    );
    let counts = count_by_order(&reserved);
    assert_eq!(counts.get("before"), Some(&1), "{counts:?}");
    assert_eq!(counts.get("after"), Some(&1), "{counts:?}");
    // A 503 says "not acknowledged in time", not "not stored": the record kept trying, and
    // the client would retry it with the same orderId.
    assert!(
        counts.get("during").copied().unwrap_or(0) <= 1,
        "{counts:?}"
    );
}

/// Restarts of the broker under load.
const RESTARTS: usize = 3;
/// Each outage lasts at least this long (more than the 3 s after which kop-order knows no
/// broker is reachable).
const OUTAGE: Duration = Duration::from_secs(6);
/// After the broker serves clients again, kop-order must accept orders within this.
const RECOVERY: Duration = Duration::from_secs(15);

#[derive(Clone)]
struct Answer {
    id: String,
    status: u16,
    done: Instant,
}

/// Posts orders at about 100 a second until `stop`, never more than 16 at once.
async fn steady_load(port: u16, stop: Arc<AtomicBool>) -> Vec<Answer> {
    let semaphore = Arc::new(tokio::sync::Semaphore::new(16));
    let mut tasks = tokio::task::JoinSet::new();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let permit = semaphore.clone().acquire_owned().await.expect("semaphore");
        let id = format!("heal-{n}");
        n += 1;
        tasks.spawn(async move {
            let status = match try_post_order(port, &id, 1.0).await {
                Ok((status, _)) => status,
                Err(_) => 0,
            };
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

async fn readyz(port: u16) -> u16 {
    http_get(port, "/readyz")
        .await
        .map(|(code, _)| code)
        .unwrap_or(0)
}

/// Waits until `condition` holds, checking every 100 ms; `None` after `timeout`.
async fn within<F, Fut>(timeout: Duration, mut condition: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < timeout {
        if condition().await {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// The broker restarted several times under a steady load: each time kop-order says it
/// cannot deliver (/readyz 503, requests refused with 503), and within seconds of the
/// broker serving again it accepts orders, the same process throughout. No order is
/// stored twice by the API.
#[tokio::test(flavor = "multi_thread")]
async fn the_api_heals_after_each_of_several_broker_restarts_under_load() {
    let _ = brokers();
    let broker = Arc::new(OwnBroker::start(
        std::env::temp_dir().join(unique("kop-heal-broker")),
        free_port(),
    ));
    let mut pipeline = Pipeline::new();
    pipeline
        .extra_env
        .push(("KAFKA_BROKERS".into(), broker.address.clone()));
    // Never give up within the test: recovery must come without a restart.
    let config = "[http]\nproduce_timeout = \"2s\"\nstall_timeout = \"10m\"\n";
    pipeline.start_with_config("order", &[], config).await;
    let port = pipeline.order_port;
    let daemon = pipeline.daemon("order");
    let (pid, metrics_port, log) = (daemon.pid(), daemon.metrics_port, daemon.log.clone());

    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(steady_load(port, stop.clone()));
    let mut recoveries = Vec::new();
    let mut last_back_at = Instant::now();
    for round in 1..=RESTARTS {
        // Orders flow before the broker goes.
        let flowing = within(Duration::from_secs(30), || async {
            post_order(port, &unique("probe"), 1.0).await.0 == 202
        })
        .await;
        assert!(
            flowing.is_some(),
            "round {round}: no order accepted before the stop"
        );

        let stopping = broker.clone();
        tokio::task::spawn_blocking(move || stopping.stop())
            .await
            .expect("stop");
        let down_at = Instant::now();
        let noticed = within(Duration::from_secs(15), || async {
            readyz(metrics_port).await == 503
        })
        .await
        .unwrap_or_else(|| panic!("round {round}: /readyz still 200 with the broker down"));
        let (status, headers, body) = http_request(
            port,
            "POST",
            "/order",
            &[("content-type", "application/json")],
            format!(r#"{{"orderId":"{}","amount":1}}"#, unique("down")).into_bytes(),
        )
        .await;
        assert_eq!(status, 503, "round {round}: {body}");
        assert_eq!(headers.get("retry-after").map(String::as_str), Some("1"));
        if let Some(left) = OUTAGE.checked_sub(down_at.elapsed()) {
            tokio::time::sleep(left).await;
        }

        let restarting = broker.clone();
        tokio::task::spawn_blocking(move || restarting.restart())
            .await
            .expect("restart");
        let back_at = Instant::now();
        last_back_at = back_at;
        let recovered = within(RECOVERY, || async {
            readyz(metrics_port).await == 200
                && post_order(port, &unique("back"), 1.0).await.0 == 202
        })
        .await
        .unwrap_or_else(|| {
            panic!(
                "round {round}: no order accepted within {RECOVERY:?} of the broker's return;\n{}",
                tail(&log, 30)
            )
        });
        eprintln!(
            "round {round}: not ready {:.1}s after the stop, accepting again {:.1}s after \
             the broker was back",
            noticed.as_secs_f64(),
            recovered.as_secs_f64()
        );
        recoveries.push(recovered);
        let daemon = pipeline.daemon("order");
        assert!(
            daemon.child.try_wait().unwrap().is_none(),
            "kop-order exited"
        );
        assert_eq!(daemon.pid(), pid, "the same process throughout");
    }
    // Let the load run on a little after the last recovery.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let answers = load.await.expect("load");
    let mut by_status: HashMap<u16, usize> = HashMap::new();
    for answer in &answers {
        *by_status.entry(answer.status).or_default() += 1;
    }
    let accepted: Vec<&Answer> = answers.iter().filter(|a| a.status == 202).collect();
    eprintln!(
        "{} orders posted under load: {by_status:?}; recoveries {recoveries:?}",
        answers.len()
    );
    assert!(
        by_status.keys().all(|s| matches!(s, 202 | 503)),
        "answers other than 202 and 503: {by_status:?}"
    );
    assert!(by_status.contains_key(&503), "no 503 in {RESTARTS} outages");
    assert!(
        accepted.iter().any(|a| a.done > last_back_at),
        "the load's own orders were not accepted after the last recovery"
    );

    // What the API stored: each accepted order once, each refused one at most once.
    let mut config = rdkafka::ClientConfig::new();
    config.set("bootstrap.servers", &broker.address);
    let ids: Vec<String> = accepted.iter().map(|a| a.id.clone()).collect();
    let counts = count_until_all_seen(
        config,
        &pipeline.orders,
        ids,
        Duration::from_secs(60),
        Duration::from_secs(3),
    )
    .await;
    let missing: Vec<_> = accepted
        .iter()
        .filter(|a| !counts.contains_key(&a.id))
        .map(|a| a.id.as_str())
        .collect();
    assert!(missing.is_empty(), "accepted but not stored: {missing:?}");
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "stored twice by the API: {twice:?}");
    let late = answers
        .iter()
        .filter(|a| a.status == 503 && counts.contains_key(&a.id))
        .count();
    eprintln!(
        "{} accepted, all stored once; {late} of the 503s stored afterwards",
        accepted.len()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stage_waits_for_an_unreachable_broker_and_says_why() {
    let _ = brokers();
    let mut pipeline = Pipeline::new();
    let closed = format!("127.0.0.1:{}", free_port());
    let env = pipeline.env_for("payment", &[("KAFKA_BROKERS", &closed)]);
    let mut daemon = Daemon::spawn("payment", &env, &pipeline.log_dir);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !daemon.log_text().contains("Kafka is not available") {
        assert!(
            Instant::now() < deadline,
            "no clear error in the log:\n{}",
            daemon.log_text()
        );
        assert!(
            daemon.child.try_wait().unwrap().is_none(),
            "exited:\n{}",
            daemon.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        daemon.log_text().contains(&closed),
        "the log names the broker"
    );
    assert_eq!(
        http_get(daemon.metrics_port, "/healthz").await.unwrap().0,
        200
    );
    assert_eq!(
        http_get(daemon.metrics_port, "/readyz").await.unwrap().0,
        503
    );
    daemon.signal("TERM");
    assert_eq!(daemon.wait_exit(Duration::from_secs(20)), Some(0));
    pipeline.daemons.clear();
}

/// A producer that delivers nothing while the broker answers other clients is replaced,
/// without a restart. `[simulate] stall` makes kop-order's first producer hold its records.
#[tokio::test(flavor = "multi_thread")]
async fn a_producer_that_delivers_nothing_is_replaced() {
    let mut pipeline = Pipeline::new();
    let config = "[simulate]\nstall = true\n[http]\nproduce_timeout = \"1s\"\n";
    pipeline.start_with_config("order", &[], config).await;
    let port = pipeline.order_port;
    let (pid, metrics_port) = {
        let daemon = pipeline.daemon("order");
        (daemon.pid(), daemon.metrics_port)
    };
    let (status, body) = post_order(port, "held", 1.0).await;
    assert_eq!(status, 503, "the stalled producer cannot deliver: {body}");
    assert!(body.contains("may still be stored"), "{body}");
    within(Duration::from_secs(15), || async {
        readyz(metrics_port).await == 503
    })
    .await
    .expect("not ready while the producer holds its records");

    let replaced = within(Duration::from_secs(60), || async {
        post_order(port, &unique("after"), 1.0).await.0 == 202
    })
    .await;
    let daemon = pipeline.daemon("order");
    assert!(
        replaced.is_some(),
        "no order accepted after a minute:\n{}",
        daemon.log_text()
    );
    assert!(
        daemon.log_text().contains("replaced it"),
        "{}",
        daemon.log_text()
    );
    assert_eq!(daemon.pid(), pid, "the same process");
    let metrics = daemon.metrics().await;
    assert_eq!(metric(&metrics, "kop_producer_rebuilds_total", &[]), 1.0);
    assert_eq!(readyz(metrics_port).await, 200);
}
