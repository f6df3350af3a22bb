//! Kafka going away: the daemons wait instead of crashing, the API answers 503 with
//! Retry-After while the broker is down, and everything recovers when it comes back.
//! This test runs a broker of its own (scripts/kafka.sh), since it stops it.

mod common;

use std::time::{Duration, Instant};

use common::*;

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
    assert_eq!(
        counts.get("during"),
        None,
        "a refused order must not appear"
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
