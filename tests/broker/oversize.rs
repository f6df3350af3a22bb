//! A record of any size fails alone: when its dead letter cannot be written whole — too
//! large for kop's producer, or refused by the broker — a bounded copy is written, headers
//! saying what was cut and why, and the valid order behind it on the same partition goes
//! through. Both guarantees.

use std::time::Duration;

use crate::support::*;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{FutureProducer, FutureRecord};

/// Every record here has this key, so poison and valid order share a partition.
const KEY: &str = "same-partition";

/// Produces a record larger than librdkafka's default limit (the broker takes ~1 MiB).
async fn produce_large(topic: &str, value: &[u8]) {
    let producer: FutureProducer = kafka_config()
        .set("message.max.bytes", "2000000")
        .create()
        .expect("producer");
    producer
        .send(
            FutureRecord::to(topic).key(KEY).payload(value),
            Duration::from_secs(10),
        )
        .await
        .expect("the broker takes the large record");
}

async fn create_topic(name: &str, config: &[(&str, &str)]) {
    let admin: AdminClient<DefaultClientContext> = kafka_config().create().expect("admin");
    let mut topic = NewTopic::new(name, 3, TopicReplication::Fixed(1));
    for (k, v) in config {
        topic = topic.set(k, v);
    }
    let result = admin
        .create_topics(&[topic], &AdminOptions::new())
        .await
        .expect("create topics");
    result[0].as_ref().expect("topic created");
}

fn valid_order() -> Vec<u8> {
    serde_json::json!({"orderId": KEY, "amount": 5, "acceptedAt": 1})
        .to_string()
        .into_bytes()
}

/// Starts kop-payment alone, sends the poison then a valid order with the same key, and
/// returns the dead letter and the payment metrics.
async fn poison_then_valid(
    guarantee: &str,
    poison: Vec<u8>,
    dlq_config: &[(&str, &str)],
) -> (rdkafka::message::OwnedMessage, String) {
    let mut pipeline = Pipeline::new();
    let dlq = Pipeline::dlq(&pipeline.orders);
    if !dlq_config.is_empty() {
        create_topic(&dlq, dlq_config).await;
    }
    pipeline
        .start("payment", &[("PROCESSING_GUARANTEE", guarantee)])
        .await;
    produce_large(&pipeline.orders, &poison).await;
    produce_raw(&pipeline.orders, Some(KEY), Some(&valid_order()), &[]).await;

    let paid = consume(
        &pipeline.payments,
        1,
        Duration::from_secs(60),
        Duration::from_secs(1),
    );
    assert!(
        !paid.is_empty(),
        "the valid order behind the poison was not paid"
    );
    if guarantee == "exactly-once" {
        assert_eq!(paid.len(), 1, "paid once");
    }
    let dead = consume(&dlq, 1, Duration::from_secs(30), Duration::from_secs(1));
    assert_eq!(dead.len(), 1, "one dead letter");
    let metrics = pipeline.daemon("payment").metrics().await;
    (dead.into_iter().next().expect("a dead letter"), metrics)
}

/// About 1 MB that is not JSON: its dead letter with kop's headers is larger than the
/// producer's message.max.bytes (1,000,000).
fn megabyte_poison() -> Vec<u8> {
    vec![b'#'; 1_040_000]
}

async fn too_large_for_the_producer(guarantee: &str) {
    let (dead, metrics) = poison_then_valid(guarantee, megabyte_poison(), &[]).await;
    assert_eq!(header(&dead, "x-original-size").as_deref(), Some("1040000"));
    let why = header(&dead, "x-truncated").expect("x-truncated");
    assert!(why.contains("message.max.bytes"), "{why}");
    let value = rdkafka::Message::payload(&dead).expect("a value").len();
    assert!(value > 900_000 && value < 1_000_000, "cut to {value}");
    assert!(
        header(&dead, "x-error")
            .expect("x-error")
            .contains("undecodable"),
        "x-error names the handler's reason"
    );
    assert_eq!(metric(&metrics, "kop_dlq_truncated_total", &[]), 1.0);
    // Cut before it was sent: nothing had to be aborted.
    assert_eq!(
        metric(&metrics, "kop_transactions_total", &[("outcome", "abort")]),
        0.0
    );
}

/// The DLQ topic takes at most 4 KiB per record: the broker itself refuses the dead letter
/// of a 10 KB poison record, after kop's producer took it.
async fn refused_by_the_broker(guarantee: &str) {
    let poison = vec![b'#'; 10_000];
    let (dead, metrics) =
        poison_then_valid(guarantee, poison, &[("max.message.bytes", "4096")]).await;
    assert_eq!(header(&dead, "x-original-size").as_deref(), Some("10000"));
    let why = header(&dead, "x-truncated").expect("x-truncated");
    assert!(why.contains("value cut to"), "{why}");
    assert!(
        header(&dead, "x-error")
            .expect("x-error")
            .contains("refused"),
        "x-error says the broker refused the record"
    );
    let value = rdkafka::Message::payload(&dead).map_or(0, <[u8]>::len);
    assert!(value <= 1024, "cut to {value}");
    assert!(metric(&metrics, "kop_dlq_truncated_total", &[]) >= 1.0);
    if guarantee == "exactly-once" {
        // The refusal came at delivery, inside a transaction: that transaction was aborted
        // and the record read again, to be written smaller.
        assert!(
            metric(&metrics, "kop_transactions_total", &[("outcome", "abort")]) >= 1.0,
            "the broker did not refuse anything: the test proves nothing"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_record_too_large_to_dead_letter_whole_is_cut_exactly_once() {
    too_large_for_the_producer("exactly-once").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_record_too_large_to_dead_letter_whole_is_cut_at_least_once() {
    too_large_for_the_producer("at-least-once").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_letter_the_broker_refuses_is_written_smaller_exactly_once() {
    refused_by_the_broker("exactly-once").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_letter_the_broker_refuses_is_written_smaller_at_least_once() {
    refused_by_the_broker("at-least-once").await;
}
