//! kopctl against a real broker: topics ensure, dlq list, dlq replay.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

fn kopctl(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let output = Command::new(binary("kopctl"))
        .args(args)
        .env("KAFKA_BROKERS", brokers())
        .envs(env.iter().copied())
        .output()
        .expect("run kopctl");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn topics_ensure_creates_every_topic_once() {
    let prefix = unique("ctl");
    let env = [
        ("ORDER_TOPIC", format!("{prefix}.o")),
        ("PAYMENT_COMPLETED_TOPIC", format!("{prefix}.p")),
        ("INVENTORY_RESERVED_TOPIC", format!("{prefix}.i")),
        ("PAYMENT_GROUP_ID", format!("{prefix}.pay")),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let dir = repo().join("etc/kop");
    let (code, out, err) = kopctl(
        &["topics", "ensure", "--config-dir", dir.to_str().unwrap()],
        &env,
    );
    assert_eq!(code, 0, "{err}");
    for suffix in [
        "o",
        "o.retry",
        "o.dlq",
        "p",
        "p.retry",
        "p.dlq",
        "i",
        "i.retry",
        "i.dlq",
        "pay.dedup-changelog",
    ] {
        let topic = format!("{prefix}.{suffix}");
        assert!(
            out.contains(&format!("{topic}\tcreated")),
            "{topic} created:\n{out}"
        );
    }
    // kop-payment's changelog of paid orderIds: compacted, old entries deleted.
    let changelog = format!("{prefix}.pay.dedup-changelog");
    let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> =
        kafka_config().create().expect("admin client");
    let described = admin
        .describe_configs(
            &[rdkafka::admin::ResourceSpecifier::Topic(&changelog)],
            &rdkafka::admin::AdminOptions::new(),
        )
        .await
        .expect("describe configs");
    let resource = described[0]
        .as_ref()
        .expect("the changelog's configuration");
    let value = |name: &str| {
        resource
            .get(name)
            .and_then(|entry| entry.value.clone())
            .unwrap_or_default()
    };
    assert_eq!(value("cleanup.policy"), "compact,delete");
    assert_eq!(value("retention.ms"), (24 * 3600 * 1000).to_string());
    // A second run finds them all.
    let (code, out, _) = kopctl(
        &["topics", "ensure", "--config-dir", dir.to_str().unwrap()],
        &env,
    );
    assert_eq!(code, 0);
    assert!(!out.contains("created"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn dead_letters_are_listed_and_replayed_to_completion() {
    let mut pipeline = Pipeline::new();
    pipeline.start("order", &[]).await;
    pipeline.start("inventory", &[]).await;
    pipeline.start("notification", &[]).await;
    // Every payment fails and one attempt is all there is: every order is dead-lettered.
    pipeline
        .start(
            "payment",
            &[
                ("SIMULATE_FAILURE_RATE", "1"),
                ("MAX_PROCESSING_ATTEMPTS", "1"),
            ],
        )
        .await;
    let accepted = post_many(pipeline.order_port, "dead", 10, 4).await;
    assert_eq!(accepted.len(), 10);
    let dlq = Pipeline::dlq(&pipeline.orders);
    assert_eq!(
        consume(
            &dlq,
            10,
            Duration::from_secs(30),
            Duration::from_millis(500)
        )
        .len(),
        10
    );

    let (code, out, err) = kopctl(&["dlq", "list", &dlq], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("10 dead letters"), "{err}");
    for id in &accepted {
        assert!(out.contains(&format!("key {id}")), "{id} listed:\n{out}");
    }
    assert!(out.contains("x-error: simulated failure"), "{out}");
    assert!(
        out.contains(&format!("x-origin-topic: {}", pipeline.orders)),
        "{out}"
    );
    let (code, out, _) = kopctl(&["dlq", "list", &dlq, "--json"], &[]);
    assert_eq!(code, 0);
    assert_eq!(out.lines().count(), 10);
    let first: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert!(first["headers"].as_array().is_some_and(|h| !h.is_empty()));

    // The gateway is back: payment without failures.
    pipeline.daemons.remove("payment");
    pipeline.start("payment", &[]).await;

    // A filter that matches nothing replays nothing; a dry run publishes nothing.
    let (code, out, err) = kopctl(
        &["dlq", "replay", &dlq, "--key", "no-such-order", "--dry-run"],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("would replay 0 records"), "{out}");
    let (code, out, err) = kopctl(&["dlq", "replay", &dlq, "--key", "dead-3"], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("replayed 1 records"), "{out}");
    let (code, out, err) = kopctl(&["dlq", "replay", &dlq, "--from-beginning"], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("replayed 10 records"), "{out}");
    // What was replayed is not replayed again.
    let (code, out, _) = kopctl(&["dlq", "replay", &dlq], &[]);
    assert_eq!(code, 0);
    assert!(out.contains("replayed 0 records"), "{out}");

    // Every order completes once: dead-3 was replayed twice on purpose, and kop-payment
    // recognises the second copy as a repeat of an order it paid.
    let reserved = consume(
        &pipeline.reserved,
        10,
        Duration::from_secs(60),
        Duration::from_secs(2),
    );
    let counts = count_by_order(&reserved);
    for id in &accepted {
        assert_eq!(counts.get(id), Some(&1), "{id}");
    }
    let metrics = pipeline.daemon("payment").metrics().await;
    assert_eq!(metric(&metrics, "kop_repeats_total", &[]), 1.0);
    // Replayed records start their attempts afresh: no routing headers travel on.
    let orders = consume(
        &pipeline.orders,
        21,
        Duration::from_secs(20),
        Duration::from_millis(500),
    );
    assert_eq!(orders.len(), 21);
    for m in &orders {
        assert_eq!(header(m, "x-attempt"), None);
        assert!(header(m, "traceparent").is_some(), "headers are kept");
    }
}

#[test]
fn kafka_errors_and_bad_arguments_are_reported() {
    let output = Command::new(binary("kopctl"))
        .args(["dlq", "replay"])
        .output()
        .expect("run kopctl");
    assert_eq!(output.status.code(), Some(2), "clap usage error");
    let (code, _, err) = kopctl(&["-X", "no.such.property=1", "dlq", "list", "x"], &[]);
    assert_ne!(code, 0);
    assert!(err.contains("no.such.property"), "{err}");
}
