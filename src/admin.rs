//! Operator tasks behind `kopctl`: reading dead-letter topics and replaying them.
//!
//! A replay remembers how far it got in a consumer group of its own
//! (`kopctl-replay.<dlq topic>`), so running it twice does not publish the same dead letter
//! twice; `from_beginning` scans the whole topic again.

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::kafka::{self, H_ORIGIN_TOPIC, ROUTING_HEADERS};

const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("Kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("{0}: the end of the topic was not reached within a minute")]
    Timeout(String),
}

/// A dead letter as `kopctl dlq list` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeadLetter {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub value: Option<String>,
    pub headers: Vec<(String, Option<String>)>,
}

impl DeadLetter {
    fn from_message(message: &OwnedMessage) -> Self {
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        DeadLetter {
            partition: message.partition(),
            offset: message.offset(),
            key: message.key().map(text),
            value: message.payload().map(text),
            headers: message
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| (h.key.to_string(), h.value.map(text)))
                        .collect()
                })
                .unwrap_or_default(),
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.as_deref())
    }
}

/// Reads a topic from the given start offsets up to the high watermarks seen at the start.
fn read_to_end(
    consumer: &BaseConsumer,
    topic: &str,
    start: &TopicPartitionList,
) -> Result<Vec<OwnedMessage>, AdminError> {
    let mut ends = std::collections::HashMap::new();
    let mut assignment = TopicPartitionList::new();
    for element in start.elements_for_topic(topic) {
        let (low, high) = consumer.fetch_watermarks(topic, element.partition(), TIMEOUT)?;
        let from = match element.offset() {
            Offset::Offset(o) => o.max(low),
            _ => low,
        };
        if from < high {
            ends.insert(element.partition(), high);
            assignment.add_partition_offset(topic, element.partition(), Offset::Offset(from))?;
        }
    }
    let mut out = Vec::new();
    if ends.is_empty() {
        return Ok(out);
    }
    consumer.assign(&assignment)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !ends.is_empty() {
        if std::time::Instant::now() > deadline {
            return Err(AdminError::Timeout(topic.to_string()));
        }
        match consumer.poll(Duration::from_millis(500)) {
            Some(Ok(message)) => {
                let partition = message.partition();
                let offset = message.offset();
                if ends.get(&partition).is_some_and(|end| offset < *end) {
                    out.push(message.detach());
                }
                if ends.get(&partition).is_some_and(|end| offset + 1 >= *end) {
                    ends.remove(&partition);
                }
            }
            // The high watermark may sit past a transaction marker that is never
            // delivered: the end of the partition is what librdkafka reports as such.
            Some(Err(KafkaError::PartitionEOF(partition))) => {
                ends.remove(&partition);
            }
            Some(Err(e)) => return Err(e.into()),
            None => {}
        }
    }
    consumer.unassign()?;
    Ok(out)
}

fn partitions(
    consumer: &BaseConsumer,
    topic: &str,
    offset: Offset,
) -> Result<TopicPartitionList, KafkaError> {
    let metadata = consumer.fetch_metadata(Some(topic), TIMEOUT)?;
    let mut list = TopicPartitionList::new();
    for t in metadata.topics().iter().filter(|t| t.name() == topic) {
        if let Some(e) = t.error() {
            return Err(KafkaError::MetadataFetch(e.into()));
        }
        for p in t.partitions() {
            list.add_partition_offset(topic, p.id(), offset)?;
        }
    }
    Ok(list)
}

/// Every record of a dead-letter topic.
pub fn list(client: &ClientConfig, dlq_topic: &str) -> Result<Vec<DeadLetter>, AdminError> {
    let mut config = client.clone();
    config
        .set("group.id", "kopctl-list")
        .set("enable.partition.eof", "true")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed");
    let consumer: BaseConsumer = config.create()?;
    let start = partitions(&consumer, dlq_topic, Offset::Beginning)?;
    Ok(read_to_end(&consumer, dlq_topic, &start)?
        .iter()
        .map(DeadLetter::from_message)
        .collect())
}

/// Which dead letters to replay, and where.
#[derive(Debug, Clone, Default)]
pub struct ReplayOptions {
    /// Target topic; by default each record's `x-origin-topic`.
    pub to: Option<String>,
    /// Only records whose `x-error` contains this.
    pub error_contains: Option<String>,
    /// Only records with this key.
    pub key: Option<String>,
    /// Scan the whole topic instead of continuing where the last replay stopped.
    pub from_beginning: bool,
    /// Report what would be replayed without publishing or remembering anything.
    pub dry_run: bool,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReplayReport {
    pub replayed: usize,
    pub filtered_out: usize,
    /// Records without a target (no `--to` and no `x-origin-topic`).
    pub without_target: usize,
}

/// Publishes dead letters again with key, value and headers kept and the routing headers
/// dropped, so the attempts start again from one.
pub async fn replay(
    client: &ClientConfig,
    dlq_topic: &str,
    options: &ReplayOptions,
) -> Result<ReplayReport, AdminError> {
    let mut config = client.clone();
    config
        .set("group.id", format!("kopctl-replay.{dlq_topic}"))
        .set("enable.partition.eof", "true")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed");
    let consumer: BaseConsumer = config.create()?;
    let topic = dlq_topic.to_string();
    let from_beginning = options.from_beginning;
    let (consumer, records, ends) =
        tokio::task::spawn_blocking(move || -> Result<_, AdminError> {
            let all = partitions(&consumer, &topic, Offset::Beginning)?;
            let start = if from_beginning {
                all
            } else {
                consumer.committed_offsets(all, TIMEOUT)?
            };
            let records = read_to_end(&consumer, &topic, &start)?;
            let mut ends = TopicPartitionList::new();
            for record in &records {
                ends.add_partition_offset(
                    &topic,
                    record.partition(),
                    Offset::Offset(record.offset() + 1),
                )?;
            }
            Ok((consumer, records, ends))
        })
        .await
        .map_err(|_| KafkaError::Canceled)??;

    let mut producer_config = client.clone();
    producer_config
        .set("enable.idempotence", "true")
        .set("acks", "all");
    let producer: FutureProducer = producer_config.create()?;
    let mut report = ReplayReport::default();
    let mut chosen = Vec::new();
    for record in &records {
        let letter = DeadLetter::from_message(record);
        let matches = options.error_contains.as_deref().is_none_or(|needle| {
            letter
                .header(kafka::H_ERROR)
                .is_some_and(|e| e.contains(needle))
        }) && options
            .key
            .as_deref()
            .is_none_or(|k| letter.key.as_deref() == Some(k));
        if !matches {
            report.filtered_out += 1;
            continue;
        }
        match options
            .to
            .clone()
            .or(letter.header(H_ORIGIN_TOPIC).map(str::to_string))
        {
            Some(target) => chosen.push((record, target)),
            None => report.without_target += 1,
        }
    }
    report.replayed = chosen.len();
    if !options.dry_run {
        let mut deliveries = Vec::new();
        for (record, target) in &chosen {
            let headers: OwnedHeaders =
                kafka::copy_headers_except(record.headers(), &ROUTING_HEADERS);
            let mut out = FutureRecord::<[u8], [u8]>::to(target).headers(headers);
            if let Some(key) = record.key() {
                out = out.key(key);
            }
            if let Some(payload) = record.payload() {
                out = out.payload(payload);
            }
            deliveries.push(producer.send(out, TIMEOUT));
        }
        // Polled together, so the sends are batched rather than one round trip each.
        for result in futures_util::future::join_all(deliveries).await {
            result.map_err(|(e, _)| e)?;
        }
    }
    if !options.dry_run && ends.count() > 0 {
        tokio::task::spawn_blocking(move || consumer.commit(&ends, CommitMode::Sync))
            .await
            .map_err(|_| KafkaError::Canceled)??;
    }
    Ok(report)
}
