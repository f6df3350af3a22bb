//! SIGHUP re-reads the configuration: the log level and `[simulate]` change at run time,
//! and a broken file is refused while the daemon goes on with the one it has.

use std::time::Duration;

use crate::support::*;

#[tokio::test(flavor = "multi_thread")]
async fn sighup_applies_simulate_and_keeps_going_on_a_bad_file() {
    let mut pipeline = Pipeline::new();
    pipeline.start("order", &[]).await;
    pipeline.start("inventory", &[]).await;
    // Every payment fails, and one attempt is all there is: orders are dead-lettered.
    let failing = "[simulate]\nfailure_rate = 1.0\n[retry]\nmax_attempts = 1\n";
    pipeline.start_with_config("payment", &[], failing).await;
    let config_path = pipeline.log_dir.join("payment.toml");

    let first = post_many(pipeline.order_port, "before-hup", 5, 5).await;
    let dead = consume(
        &Pipeline::dlq(&pipeline.orders),
        5,
        Duration::from_secs(30),
        Duration::ZERO,
    );
    assert_eq!(dead.len(), 5, "failure_rate 1.0 dead-letters everything");

    // A broken file: refused, and the daemon keeps its configuration and keeps running.
    std::fs::write(&config_path, "[simulate]\nfailure_rate = \"lots\"\n").unwrap();
    pipeline.daemon("payment").signal("HUP");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let daemon = pipeline.daemon("payment");
    assert!(
        daemon.child.try_wait().unwrap().is_none(),
        "a bad file on SIGHUP must not stop the daemon"
    );
    assert!(
        daemon.log_text().contains("configuration not reloaded"),
        "{}",
        daemon.log_text()
    );

    // The gateway recovers: failure_rate 0 takes effect without a restart.
    std::fs::write(
        &config_path,
        "[simulate]\nfailure_rate = 0.0\n[retry]\nmax_attempts = 1\n",
    )
    .unwrap();
    pipeline.daemon("payment").signal("HUP");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !pipeline
        .daemon("payment")
        .log_text()
        .contains("configuration reloaded")
    {
        assert!(std::time::Instant::now() < deadline, "no reload logged");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pid_before = pipeline.daemon("payment").pid();
    let second = post_many(pipeline.order_port, "after-hup", 20, 5).await;
    let reserved = consume(
        &pipeline.reserved,
        20,
        Duration::from_secs(30),
        Duration::from_millis(500),
    );
    let counts = count_by_order(&reserved);
    for id in &second {
        assert_eq!(
            counts.get(id),
            Some(&1),
            "{id} went through after the reload"
        );
    }
    for id in &first {
        assert!(
            !counts.contains_key(id),
            "{id} was dead-lettered, not reserved"
        );
    }
    assert_eq!(
        pipeline.daemon("payment").pid(),
        pid_before,
        "reloaded in place, not restarted"
    );

    // Settings a reload cannot apply are named, not silently dropped.
    std::fs::write(
        &config_path,
        "[simulate]\nfailure_rate = 0.0\n[retry]\nmax_attempts = 5\n[stage]\nmax_in_flight = 7\n",
    )
    .unwrap();
    pipeline.daemon("payment").signal("HUP");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let line = loop {
        let log = pipeline.daemon("payment").log_text();
        if let Some(line) = log.lines().find(|l| l.contains("were not applied")) {
            break line.to_string();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no warning about settings not applied:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(line.contains("stage, retry"), "{line}");
    let log = pipeline.daemon("payment").log_text();
    assert!(
        !log.contains("SimulateConfig"),
        "settings are logged as fields, not Rust's debug format:\n{log}"
    );
    assert!(log.contains("simulate.failure_rate=0"), "{log}");
}
