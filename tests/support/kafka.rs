//! The broker under test and Kafka I/O outside of kop: records produced, topics read back
//! (`read_committed`), and what a record holds.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};

use super::unique;

/// The broker under test. A test that needs Kafka fails without it; it never skips.
pub fn brokers() -> String {
    std::env::var("KOP_TEST_BROKERS").unwrap_or_else(|_| {
        panic!("KOP_TEST_BROKERS is not set: run the tests with ./scripts/test.sh, which starts a Kafka broker")
    })
}

pub fn kafka_config() -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", brokers());
    config
}

/// Produces one record with the given headers, outside of kop.
pub async fn produce_raw(
    topic: &str,
    key: Option<&str>,
    payload: Option<&[u8]>,
    headers: &[(&str, &[u8])],
) {
    let producer: FutureProducer = kafka_config().create().expect("producer");
    let mut owned = OwnedHeaders::new();
    for (k, v) in headers {
        owned = owned.insert(Header {
            key: k,
            value: Some(*v),
        });
    }
    let mut record = FutureRecord::<str, [u8]>::to(topic).headers(owned);
    if let Some(key) = key {
        record = record.key(key);
    }
    if let Some(payload) = payload {
        record = record.payload(payload);
    }
    producer
        .send(record, Duration::from_secs(10))
        .await
        .expect("produce");
}

/// Reads a topic from the beginning (read_committed) until `expected` records have arrived,
/// then keeps reading for `settle` to catch any extra ones (duplicates); fails after `timeout`.
pub fn consume(
    topic: &str,
    expected: usize,
    timeout: Duration,
    settle: Duration,
) -> Vec<OwnedMessage> {
    consume_with(kafka_config(), topic, expected, timeout, settle)
}

/// [`consume`] from another broker.
pub fn consume_with(
    config: ClientConfig,
    topic: &str,
    expected: usize,
    timeout: Duration,
    settle: Duration,
) -> Vec<OwnedMessage> {
    consume_until(
        config,
        topic,
        |records| records.len() >= expected,
        timeout,
        settle,
    )
}

/// Reads a topic from the beginning (read_committed) until `done` says the records read so
/// far are enough, then for `settle` more; gives up after `timeout`.
pub fn consume_until(
    mut config: ClientConfig,
    topic: &str,
    done: impl Fn(&[OwnedMessage]) -> bool,
    timeout: Duration,
    settle: Duration,
) -> Vec<OwnedMessage> {
    config
        .set("group.id", unique("reader"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed");
    let consumer: BaseConsumer = config.create().expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut out = Vec::new();
    let deadline = Instant::now() + timeout;
    let mut settle_until: Option<Instant> = None;
    let mut checked = 0;
    let mut last_check = Instant::now() - Duration::from_secs(1);
    loop {
        let now = Instant::now();
        if settle_until.is_some_and(|t| now >= t) {
            break;
        }
        if settle_until.is_none() && now >= deadline {
            break;
        }
        if let Some(Ok(message)) = consumer.poll(Duration::from_millis(100)) {
            out.push(message.detach());
        }
        // Judged at most every 250 ms: `done` may look at every record read so far.
        if settle_until.is_none()
            && out.len() != checked
            && last_check.elapsed() >= Duration::from_millis(250)
            || settle_until.is_none() && out.is_empty() && checked == 0
        {
            checked = out.len();
            last_check = Instant::now();
            if done(&out) {
                settle_until = Some(Instant::now() + settle);
            }
        }
    }
    out
}

/// Reads `topic` until every one of `ids` is there (at most `timeout`), and `settle` more
/// for copies; how often each order appears.
pub async fn count_until_all_seen(
    config: ClientConfig,
    topic: &str,
    ids: Vec<String>,
    timeout: Duration,
    settle: Duration,
) -> HashMap<String, usize> {
    let topic = topic.to_string();
    let records = tokio::task::spawn_blocking(move || {
        consume_until(
            config,
            &topic,
            |records| {
                let seen = count_by_order(records);
                ids.iter().all(|id| seen.contains_key(id))
            },
            timeout,
            settle,
        )
    })
    .await
    .expect("reader");
    count_by_order(&records)
}

pub fn header(message: &OwnedMessage, name: &str) -> Option<String> {
    message.headers().and_then(|h| {
        h.iter()
            .filter(|h| h.key == name)
            .last()
            .and_then(|h| h.value.map(|v| String::from_utf8_lossy(v).into_owned()))
    })
}

pub fn key(message: &OwnedMessage) -> String {
    String::from_utf8_lossy(message.key().unwrap_or_default()).into_owned()
}

pub fn json(message: &OwnedMessage) -> serde_json::Value {
    serde_json::from_slice(message.payload().unwrap_or_default()).expect("JSON payload")
}

/// Counts of each order id among the records of a topic.
pub fn count_by_order(messages: &[OwnedMessage]) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for m in messages {
        // Records that are not events (poison a test put there) count under "".
        let id = serde_json::from_slice::<serde_json::Value>(m.payload().unwrap_or_default())
            .ok()
            .and_then(|v| v["orderId"].as_str().map(str::to_string))
            .unwrap_or_default();
        *counts.entry(id).or_insert(0) += 1;
    }
    counts
}
