//! kopctl against a real broker: topics ensure, dlq list, dlq replay.

use std::process::Command;
use std::time::Duration;

use crate::support::*;

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

/// kopctl with no KAFKA_BROKERS in its environment.
fn kopctl_alone(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let output = Command::new(binary("kopctl"))
        .args(args)
        .env_remove("KAFKA_BROKERS")
        .envs(env.iter().copied())
        .output()
        .expect("run kopctl");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn topics_ensure_takes_the_brokers_from_the_files_and_reports_each_topic_once() {
    let prefix = unique("ctlfile");
    let dir = std::env::temp_dir().join(unique("kopctl-conf"));
    std::fs::create_dir_all(&dir).unwrap();
    for service in ["payment", "inventory", "notification"] {
        let text = std::fs::read_to_string(shipped_config(service)).unwrap();
        let text = text.replace(
            "\"bootstrap.servers\" = \"localhost:9092\"",
            &format!("\"bootstrap.servers\" = \"{}\"", brokers()),
        );
        assert!(
            text.contains(&brokers()),
            "{service}.toml names its brokers"
        );
        std::fs::write(dir.join(format!("{service}.toml")), text).unwrap();
    }
    let env = [
        ("ORDER_TOPIC", format!("{prefix}.o")),
        ("PAYMENT_COMPLETED_TOPIC", format!("{prefix}.p")),
        ("INVENTORY_RESERVED_TOPIC", format!("{prefix}.i")),
        ("PAYMENT_GROUP_ID", format!("{prefix}.pay")),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (code, out, err) = kopctl_alone(
        &["topics", "ensure", "--config-dir", dir.to_str().unwrap()],
        &env,
    );
    assert_eq!(code, 0, "{err}");
    for suffix in ["o", "p", "i", "p.dlq"] {
        let topic = format!("{prefix}.{suffix}\t");
        assert_eq!(out.matches(&topic).count(), 1, "{topic} once:\n{out}");
    }
    assert!(out.contains(&format!("{prefix}.p\tcreated")), "{out}");
    std::fs::remove_dir_all(&dir).ok();
}

async fn create_topic(name: &str, partitions: i32, config: &[(&str, &str)]) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> =
        kafka_config().create().expect("admin client");
    let mut topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
    for (k, v) in config {
        topic = topic.set(k, v);
    }
    let results = admin
        .create_topics(&[topic], &AdminOptions::new())
        .await
        .expect("create topic");
    for result in results {
        result.expect("topic created");
    }
}

/// Produces `count` small dead letters (key `k<i>`) aimed at `origin`.
async fn produce_dead_letters(topic: &str, origin: &str, count: usize, big: Option<usize>) {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer = kafka_config()
        .set("linger.ms", "20")
        .create()
        .expect("producer");
    let large = vec![b'x'; 5000];
    for chunk in (0..count).collect::<Vec<_>>().chunks(10_000) {
        let mut pending = Vec::new();
        for &i in chunk {
            let key = format!("k{i}");
            let value = if big == Some(i) {
                large.clone()
            } else {
                format!("{{\"orderId\":\"k{i}\"}}").into_bytes()
            };
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: "x-error",
                    value: Some("simulated failure"),
                })
                .insert(Header {
                    key: "x-origin-topic",
                    value: Some(origin),
                });
            let record = FutureRecord::to(topic)
                .key(&key)
                .payload(&value)
                .headers(headers);
            pending.push(
                producer
                    .send_result(record)
                    .map_err(|(e, _)| e)
                    .expect("queued"),
            );
        }
        for result in futures_util::future::join_all(pending).await {
            result.expect("delivery").expect("produce");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replay_that_fails_halfway_resumes_without_republishing() {
    let dlq = unique("halfway.dlq");
    let target = unique("halfway.target");
    create_topic(&dlq, 1, &[]).await;
    create_topic(&target, 1, &[]).await;
    // Record 5 is larger than this run's producer accepts: the send fails there.
    produce_dead_letters(&dlq, &target, 10, Some(5)).await;
    let (code, out, err) = kopctl(
        &["-X", "message.max.bytes=2000", "dlq", "replay", &dlq],
        &[],
    );
    assert_ne!(code, 0, "{out}");
    assert!(err.contains("offset 5") && err.contains(&target), "{err}");
    let (code, out, err) = kopctl(&["dlq", "replay", &dlq], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("replayed 5 records"), "{out}");
    let records = consume(&target, 10, Duration::from_secs(20), Duration::from_secs(2));
    let counts = count_keys(&records);
    assert_eq!(records.len(), 10, "{counts:?}");
    assert!(counts.values().all(|&n| n == 1), "{counts:?}");
}

fn count_keys(
    records: &[rdkafka::message::OwnedMessage],
) -> std::collections::HashMap<String, usize> {
    let mut counts = std::collections::HashMap::new();
    for record in records {
        *counts.entry(key(record)).or_default() += 1;
    }
    counts
}

/// Runs kopctl to its end and reports its exit code, stdout, stderr and peak resident
/// memory (VmHWM, KiB) as sampled while it ran.
fn kopctl_measured(args: &[&str]) -> (i32, String, String, u64) {
    let out_path = std::env::temp_dir().join(unique("kopctl-out"));
    let err_path = std::env::temp_dir().join(unique("kopctl-err"));
    let mut child = Command::new(binary("kopctl"))
        .args(args)
        .env("KAFKA_BROKERS", brokers())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .expect("run kopctl");
    let status_file = format!("/proc/{}/status", child.id());
    let mut peak = 0;
    let status = loop {
        if let Ok(text) = std::fs::read_to_string(&status_file) {
            let hwm = text
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok());
            peak = peak.max(hwm.unwrap_or(0));
        }
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let read = |p: &std::path::Path| {
        let text = String::from_utf8_lossy(&std::fs::read(p).unwrap()).into_owned();
        std::fs::remove_file(p).ok();
        text
    };
    (
        status.code().unwrap_or(-1),
        read(&out_path),
        read(&err_path),
        peak,
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_large_dlq_is_listed_and_replayed_in_bounded_memory() {
    const COUNT: usize = 100_000;
    /// Peak resident memory allowed to kopctl, KiB.
    const BOUND: u64 = 64 * 1024;
    let dlq = unique("large.dlq");
    let target = unique("large.target");
    create_topic(&dlq, 3, &[]).await;
    create_topic(&target, 3, &[]).await;
    produce_dead_letters(&dlq, &target, COUNT, None).await;

    let (code, out, err, peak) = kopctl_measured(&["dlq", "list", &dlq]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains(&format!("{COUNT} dead letters")), "{err}");
    assert_eq!(out.matches("x-error: simulated failure").count(), COUNT);
    eprintln!("dlq list: peak RSS {peak} KiB");
    assert!(peak > 0 && peak < BOUND, "dlq list peak RSS {peak} KiB");

    let (code, out, err, peak) = kopctl_measured(&["dlq", "replay", &dlq]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&format!("replayed {COUNT} records")), "{out}");
    eprintln!("dlq replay: peak RSS {peak} KiB");
    assert!(peak > 0 && peak < BOUND, "dlq replay peak RSS {peak} KiB");

    let records = consume(
        &target,
        COUNT,
        Duration::from_secs(60),
        Duration::from_secs(2),
    );
    let counts = count_keys(&records);
    assert_eq!(counts.len(), COUNT);
    assert!(
        counts.values().all(|&n| n == 1),
        "each record replayed once"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn errors_name_the_topic_and_the_broker() {
    let missing = unique("missing");
    let (code, _, err) = kopctl(&["dlq", "list", &missing], &[]);
    assert_ne!(code, 0);
    assert!(
        err.contains(&format!("topic {missing} does not exist on {}", brokers())),
        "{err}"
    );

    let started = std::time::Instant::now();
    let (code, _, err) = kopctl(&["-b", "127.0.0.1:1", "dlq", "list", "x"], &[]);
    assert_ne!(code, 0);
    assert!(err.contains("127.0.0.1:1"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );

    let dlq = unique("tomissing.dlq");
    create_topic(&dlq, 1, &[]).await;
    produce_dead_letters(&dlq, &dlq, 1, None).await;
    let started = std::time::Instant::now();
    let (code, _, err) = kopctl(&["dlq", "replay", &dlq, "--to", &missing, "--dry-run"], &[]);
    assert_ne!(code, 0);
    assert!(
        err.contains(&format!("topic {missing} does not exist")),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn list_tells_other_records_apart_and_keeps_every_byte() {
    let dlq = unique("bytes.dlq");
    create_topic(&dlq, 1, &[]).await;
    let binary = [0u8, 0x9f, 0x92, 0x96, 0xff];
    produce_raw(
        &dlq,
        Some("b1"),
        Some(&binary),
        &[("x-error", b"bad"), ("x-blob", &[0xc3, 0x28])],
    )
    .await;
    produce_raw(&dlq, Some("plain"), Some(b"not a dead letter"), &[]).await;

    let (code, out, err) = kopctl(&["dlq", "list", &dlq], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("value: (hex) 009f9296ff"), "{out}");
    assert!(out.contains("x-blob: (hex) c328"), "{out}");
    assert!(out.contains(" time 20"), "a timestamp:\n{out}");
    assert!(err.contains("1 dead letters; 1 records lack"), "{err}");

    let (code, out, _) = kopctl(&["dlq", "list", &dlq, "--json"], &[]);
    assert_eq!(code, 0);
    let first: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(first["value"]["hex"], "009f9296ff");
    assert_eq!(first["key"], "b1");
    assert!(first["timestamp"].as_i64().is_some_and(|t| t > 0));

    let plain = unique("plain");
    create_topic(&plain, 1, &[]).await;
    produce_raw(&plain, Some("p"), Some(b"{}"), &[]).await;
    let (code, _, err) = kopctl(&["dlq", "list", &plain], &[]);
    assert_eq!(code, 0);
    assert!(err.contains("not a dead-letter topic"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_filtered_replay_says_what_it_passes_over_and_a_dry_run_lists_targets() {
    let dlq = unique("filter.dlq");
    let target = unique("filter.target");
    create_topic(&dlq, 1, &[]).await;
    create_topic(&target, 1, &[]).await;
    produce_dead_letters(&dlq, &target, 3, None).await;
    let (code, out, err) = kopctl(&["dlq", "replay", &dlq, "--key", "k1", "--dry-run"], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!("partition 0 offset 1 key k1 -> {target}")),
        "{out}"
    );
    assert!(!out.contains("key k0"), "{out}");
    assert!(out.contains("would replay 1 records"), "{out}");
    let (code, out, err) = kopctl(&["dlq", "replay", &dlq, "--key", "k1"], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("2 records passed over, their offsets committed"),
        "{out}"
    );
    let (code, out, _) = kopctl(&["dlq", "replay", "--help"], &[]);
    assert_eq!(code, 0);
    assert!(out.contains("for good"), "{out}");
}
