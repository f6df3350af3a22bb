//! Hostile input: the order API fuzzed from openapi.yaml with schemathesis, and random,
//! oversized and header-mangled records fed into every consumed topic.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::*;

/// schemathesis, installed by scripts/test.sh into a virtualenv of its own.
fn schemathesis() -> PathBuf {
    let path = std::env::var_os("KOP_SCHEMATHESIS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default())
                .join(".cache/kop/schemathesis-venv/bin/schemathesis")
        });
    assert!(
        path.exists(),
        "schemathesis not found at {}: run the tests with ./scripts/test.sh, which installs it",
        path.display()
    );
    path
}

#[tokio::test(flavor = "multi_thread")]
async fn the_api_holds_its_contract_under_fuzzing() {
    let tool = schemathesis();
    let mut pipeline = Pipeline::new();
    pipeline.start("order", &[]).await;
    let url = format!("http://127.0.0.1:{}", pipeline.order_port);
    let output = tokio::task::block_in_place(|| {
        Command::new(&tool)
            .current_dir(&pipeline.log_dir)
            .args([
                "run",
                repo().join("openapi.yaml").to_str().unwrap(),
                "--url",
                &url,
            ])
            .args(["--checks", "all", "--max-time", "45", "--workers", "2"])
            // A fixed seed: a failure is found again by the next run.
            .args(["--seed", "20261201"])
            .env("NO_COLOR", "1")
            .output()
            .expect("run schemathesis")
    });
    let report = format!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "schemathesis found failures:\n{report}"
    );
    assert!(
        report.contains("generated"),
        "schemathesis ran no cases:\n{report}"
    );
    // The fuzzer's valid orders went to Kafka; the daemon is still healthy.
    let daemon = pipeline.daemon("order");
    assert!(daemon.child.try_wait().unwrap().is_none(), "kop-order died");
    let metrics = daemon.metrics().await;
    assert_eq!(
        metric(&metrics, "http_requests_total", &[("status", "500")]),
        0.0
    );
    assert!(
        metric(&metrics, "http_requests_total", &[("status", "202")]) > 0.0,
        "{report}"
    );
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

/// A value (or null) and headers.
type Garbage = (Option<Vec<u8>>, Vec<(String, Vec<u8>)>);

/// A record no stage can use: random bytes (sometimes empty, sometimes ~900 KB, sometimes
/// null) with random headers, some of them kop's own routing headers, malformed.
fn garbage(n: usize) -> Garbage {
    let size = match n % 10 {
        0 => 900 * 1024,
        1 => 0,
        _ => (rand::random::<u32>() % 4096) as usize + 1,
    };
    let mut payload: Vec<u8> = (0..size).map(|_| rand::random::<u8>()).collect();
    if let Some(first) = payload.first_mut() {
        // Never a valid JSON start by chance.
        *first = b'\x01';
    }
    let payload = (n % 17 != 3).then_some(payload);
    let mut headers = Vec::new();
    for i in 0..(n % 5) {
        let name = match i {
            0 => "x-attempt".to_string(),
            1 => "x-retry-at".to_string(),
            2 => "traceparent".to_string(),
            _ => format!("h{}", rand::random::<u16>()),
        };
        // A leading `~` keeps a routing header malformed: random bytes alone are sometimes
        // a valid number ("5"), which would make the record's attempt count legitimately 6.
        let value: Vec<u8> = std::iter::once(b'~')
            .chain((0..(rand::random::<u8>() % 40)).map(|_| rand::random::<u8>()))
            .collect();
        headers.push((name, value));
    }
    (payload, headers)
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_in_every_consumed_topic_ends_in_a_dlq_and_memory_stays_bounded() {
    let mut pipeline = Pipeline::new();
    pipeline.start_all(&[]).await;
    let inputs = [
        pipeline.orders.clone(),
        pipeline.payments.clone(),
        pipeline.reserved.clone(),
    ];
    const PER_TOPIC: usize = 60;

    let producer: rdkafka::producer::FutureProducer = {
        let mut config = kafka_config();
        config.set("message.max.bytes", "1048576");
        config.create().expect("producer")
    };
    for input in &inputs {
        for topic in [input.clone(), Pipeline::retry(input)] {
            for n in 0..PER_TOPIC {
                let (payload, headers) = garbage(n);
                let mut owned = rdkafka::message::OwnedHeaders::new();
                for (k, v) in &headers {
                    owned = owned.insert(rdkafka::message::Header {
                        key: k,
                        value: Some(v),
                    });
                }
                let key = format!("garbage-{n}");
                let mut record = rdkafka::producer::FutureRecord::<str, [u8]>::to(&topic)
                    .key(&key)
                    .headers(owned);
                if let Some(payload) = &payload {
                    record = record.payload(payload);
                }
                producer
                    .send(record, Duration::from_secs(10))
                    .await
                    .unwrap_or_else(|(e, _)| panic!("produce garbage to {topic}: {e}"));
            }
        }
    }

    // Each stage dead-letters all of its garbage: the main topic's and the retry topic's.
    for input in &inputs {
        let letters = consume(
            &Pipeline::dlq(input),
            2 * PER_TOPIC,
            Duration::from_secs(120),
            Duration::from_secs(1),
        );
        assert_eq!(
            letters.len(),
            2 * PER_TOPIC,
            "{input}: every garbage record dead-lettered once"
        );
        for letter in &letters {
            assert!(header(letter, "x-error").is_some());
            assert_eq!(
                header(letter, "x-attempt").as_deref(),
                Some("1"),
                "permanent: straight to the DLQ"
            );
        }
    }

    // The pipeline still flows.
    let accepted = post_many(pipeline.order_port, "after-garbage", 50, 8).await;
    assert_eq!(accepted.len(), 50);
    let reserved = consume(
        &pipeline.reserved,
        2 * PER_TOPIC + 50,
        Duration::from_secs(60),
        Duration::from_millis(500),
    );
    let counts = count_by_order(&reserved);
    for id in &accepted {
        assert_eq!(counts.get(id), Some(&1), "{id}");
    }

    // Memory stays bounded: a dozen 900 KB records went through each stage besides the
    // rest; librdkafka's fetch queue is capped (queued.max.messages.kbytes) and a stage
    // holds one batch at a time.
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for service in SERVICES {
        let pid = pipeline.daemon(service).pid();
        let rss_mib = rss_kib(pid) / 1024;
        eprintln!("{service}: RSS {rss_mib} MiB after the garbage");
        assert!(rss_mib < 400, "{service} uses {rss_mib} MiB");
    }
}
