//! Operator tasks behind `kopctl`: reading dead-letter topics and replaying them.
//!
//! A replay remembers how far it got in a consumer group of its own
//! (`kopctl-replay.<dlq topic>`), so running it twice does not publish the same dead letter
//! twice; `from_beginning` scans the whole topic again. Both read the topic in bounded
//! batches, so a DLQ of any size fits in a small, fixed amount of memory.

use std::collections::HashMap;
use std::time::Duration;

use tokio::task::block_in_place;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::kafka::{self, H_ERROR, H_ORIGIN_TOPIC, ROUTING_HEADERS};

const TIMEOUT: Duration = Duration::from_secs(10);
/// How long a metadata request may wait for a broker: an unreachable broker is reported
/// within seconds rather than after librdkafka's own retries.
const METADATA_TIMEOUT: Duration = Duration::from_secs(5);
/// Records read, and held, at a time.
const BATCH: usize = 1000;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("Kafka ({brokers}): {source}")]
    Kafka { brokers: String, source: KafkaError },
    #[error("no broker of {brokers} answered within {}s: {source}", METADATA_TIMEOUT.as_secs())]
    Unreachable { brokers: String, source: KafkaError },
    #[error("topic {topic} does not exist on {brokers}")]
    NoTopic { topic: String, brokers: String },
    #[error("{0}: the end of the topic was not reached within a minute")]
    Timeout(String),
    /// `record` is "<dlq> partition <p> offset <o>".
    #[error(
        "sending {record} to {target} failed: {source}; delivered records are committed, \
         a rerun continues from this one"
    )]
    Send {
        record: String,
        target: String,
        // Boxed: it would make every AdminError twice as large.
        source: Box<KafkaError>,
    },
}

fn brokers_of(client: &ClientConfig) -> String {
    client
        .get("bootstrap.servers")
        .unwrap_or("localhost:9092")
        .to_string()
}

/// Binds Kafka errors to the brokers they came from, so every message names them.
trait Context<T> {
    fn on(self, brokers: &str) -> Result<T, AdminError>;
}

impl<T> Context<T> for Result<T, KafkaError> {
    fn on(self, brokers: &str) -> Result<T, AdminError> {
        self.map_err(|source| AdminError::Kafka {
            brokers: brokers.to_string(),
            source,
        })
    }
}

/// Record bytes as given: text when they are UTF-8, hex otherwise, so nothing is lost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bytes {
    Text(String),
    Binary(Vec<u8>),
}

impl Bytes {
    fn new(bytes: &[u8]) -> Self {
        match std::str::from_utf8(bytes) {
            Ok(text) => Bytes::Text(text.to_string()),
            Err(_) => Bytes::Binary(bytes.to_vec()),
        }
    }

    pub fn as_text(&self) -> Option<&str> {
        match self {
            Bytes::Text(text) => Some(text),
            Bytes::Binary(_) => None,
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// For a terminal: text as it is unless control characters would garble the line.
impl std::fmt::Display for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Bytes::Text(text) if !text.chars().any(|c| c.is_control() && c != '\t') => {
                f.write_str(text)
            }
            Bytes::Text(text) => write!(f, "(hex) {}", hex(text.as_bytes())),
            Bytes::Binary(bytes) => write!(f, "(hex) {}", hex(bytes)),
        }
    }
}

/// JSON strings carry any UTF-8 exactly; other bytes become `{"hex": "…"}`.
impl serde::Serialize for Bytes {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        match self {
            Bytes::Text(text) => s.serialize_str(text),
            Bytes::Binary(bytes) => {
                let mut map = s.serialize_map(Some(1))?;
                map.serialize_entry("hex", &hex(bytes))?;
                map.end()
            }
        }
    }
}

/// A dead letter as `kopctl dlq list` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeadLetter {
    pub partition: i32,
    pub offset: i64,
    /// Milliseconds since the Unix epoch, as the broker or producer stamped it.
    pub timestamp: Option<i64>,
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
    pub headers: Vec<(String, Option<Bytes>)>,
}

impl DeadLetter {
    fn from_message(message: &OwnedMessage) -> Self {
        DeadLetter {
            partition: message.partition(),
            offset: message.offset(),
            timestamp: message.timestamp().to_millis(),
            key: message.key().map(Bytes::new),
            value: message.payload().map(Bytes::new),
            headers: message
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| (h.key.to_string(), h.value.map(Bytes::new)))
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
            .and_then(|(_, v)| v.as_ref())
            .and_then(Bytes::as_text)
    }

    /// Whether kop wrote this record to a DLQ: it carries the headers every dead letter gets.
    pub fn is_dead_letter(&self) -> bool {
        self.headers
            .iter()
            .any(|(k, _)| k == H_ERROR || k == H_ORIGIN_TOPIC)
    }
}

/// Reads a topic from given start offsets up to the high watermarks seen at the start,
/// one bounded batch at a time.
struct Reader<'a> {
    consumer: &'a BaseConsumer,
    topic: String,
    /// Partitions not read to their end yet, with that end.
    ends: HashMap<i32, i64>,
    deadline: std::time::Instant,
}

impl<'a> Reader<'a> {
    fn new(
        consumer: &'a BaseConsumer,
        topic: &str,
        start: &TopicPartitionList,
        brokers: &str,
    ) -> Result<Self, AdminError> {
        let mut ends = HashMap::new();
        let mut assignment = TopicPartitionList::new();
        for element in start.elements_for_topic(topic) {
            let (low, high) = consumer
                .fetch_watermarks(topic, element.partition(), TIMEOUT)
                .on(brokers)?;
            let from = match element.offset() {
                Offset::Offset(o) => o.max(low),
                _ => low,
            };
            if from < high {
                ends.insert(element.partition(), high);
                assignment
                    .add_partition_offset(topic, element.partition(), Offset::Offset(from))
                    .on(brokers)?;
            }
        }
        if !ends.is_empty() {
            consumer.assign(&assignment).on(brokers)?;
        }
        Ok(Reader {
            consumer,
            topic: topic.to_string(),
            ends,
            deadline: std::time::Instant::now() + Duration::from_secs(60),
        })
    }

    /// Up to [`BATCH`] records; empty at the end.
    fn next_batch(&mut self, brokers: &str) -> Result<Vec<OwnedMessage>, AdminError> {
        let mut out = Vec::new();
        while !self.ends.is_empty() && out.len() < BATCH {
            if std::time::Instant::now() > self.deadline {
                return Err(AdminError::Timeout(self.topic.clone()));
            }
            match self.consumer.poll(Duration::from_millis(500)) {
                Some(Ok(message)) => {
                    // Progress, not the whole topic, must happen within the minute.
                    self.deadline = std::time::Instant::now() + Duration::from_secs(60);
                    let partition = message.partition();
                    let offset = message.offset();
                    let end = self.ends.get(&partition).copied();
                    if end.is_some_and(|end| offset < end) {
                        out.push(message.detach());
                    }
                    if end.is_some_and(|end| offset + 1 >= end) {
                        self.ends.remove(&partition);
                    }
                }
                // The high watermark may sit past a transaction marker that is never
                // delivered: the end of the partition is what librdkafka reports as such.
                Some(Err(KafkaError::PartitionEOF(partition))) => {
                    self.ends.remove(&partition);
                }
                Some(Err(e)) => return Err(e).on(brokers),
                None => {}
            }
        }
        Ok(out)
    }
}

/// The partitions of a topic at `offset`; names the topic when it does not exist and the
/// brokers when none answers.
fn partitions(
    consumer: &BaseConsumer,
    topic: &str,
    offset: Offset,
    brokers: &str,
) -> Result<TopicPartitionList, AdminError> {
    let metadata = consumer
        .fetch_metadata(Some(topic), METADATA_TIMEOUT)
        .map_err(|source| AdminError::Unreachable {
            brokers: brokers.to_string(),
            source,
        })?;
    let mut list = TopicPartitionList::new();
    for t in metadata.topics().iter().filter(|t| t.name() == topic) {
        match t.error().map(RDKafkaErrorCode::from) {
            None => {}
            Some(RDKafkaErrorCode::UnknownTopicOrPartition) => {
                return Err(AdminError::NoTopic {
                    topic: topic.to_string(),
                    brokers: brokers.to_string(),
                });
            }
            Some(code) => return Err(KafkaError::MetadataFetch(code)).on(brokers),
        }
        for p in t.partitions() {
            list.add_partition_offset(topic, p.id(), offset)
                .on(brokers)?;
        }
    }
    if list.count() == 0 {
        return Err(AdminError::NoTopic {
            topic: topic.to_string(),
            brokers: brokers.to_string(),
        });
    }
    Ok(list)
}

fn reading_consumer(client: &ClientConfig, group: &str) -> Result<BaseConsumer, AdminError> {
    let mut config = client.clone();
    config
        .set("group.id", group)
        .set("enable.partition.eof", "true")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        // librdkafka prefetches up to 64 MiB per partition by default; a batch is all
        // that is needed at a time.
        .set("queued.max.messages.kbytes", "4096")
        .set("queued.min.messages", BATCH.to_string());
    config.create().on(&brokers_of(client))
}

/// Hands every record of a topic to `each`, in batches; returns how many there were.
pub fn list(
    client: &ClientConfig,
    topic: &str,
    mut each: impl FnMut(DeadLetter),
) -> Result<usize, AdminError> {
    let brokers = brokers_of(client);
    let consumer = reading_consumer(client, "kopctl-list")?;
    let start = partitions(&consumer, topic, Offset::Beginning, &brokers)?;
    let mut reader = Reader::new(&consumer, topic, &start, &brokers)?;
    let mut count = 0;
    loop {
        let batch = reader.next_batch(&brokers)?;
        if batch.is_empty() {
            return Ok(count);
        }
        count += batch.len();
        batch
            .iter()
            .map(DeadLetter::from_message)
            .for_each(&mut each);
    }
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
    /// Left out by a filter; their offsets are committed, so later replays skip them too.
    pub filtered_out: usize,
    /// Records without a target (no `--to` and no `x-origin-topic`).
    pub without_target: usize,
}

/// Where a record goes (or would go, in a dry run).
#[derive(Debug)]
pub struct Plan<'a> {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<&'a Bytes>,
    pub target: &'a str,
}

/// Publishes dead letters again with key, value and headers kept and the routing headers
/// dropped, so the attempts start again from one. Batch by batch, it commits the offsets
/// of what was delivered (and of what the filters passed over) before reading on; a failed
/// send stops it after committing each partition up to the record before the failure.
pub async fn replay(
    client: &ClientConfig,
    dlq_topic: &str,
    options: &ReplayOptions,
    mut on_plan: impl FnMut(Plan<'_>),
) -> Result<ReplayReport, AdminError> {
    let brokers = brokers_of(client);
    let consumer = reading_consumer(client, &format!("kopctl-replay.{dlq_topic}"))?;
    let all = block_in_place(|| partitions(&consumer, dlq_topic, Offset::Beginning, &brokers))?;
    // Targets are checked before anything is sent, dry run or not: a missing one would
    // otherwise only show as a send that waits for the topic until it times out.
    let mut known_targets = std::collections::HashSet::new();
    let mut check_target = |target: &str| -> Result<(), AdminError> {
        if !known_targets.contains(target) {
            block_in_place(|| partitions(&consumer, target, Offset::End, &brokers))?;
            known_targets.insert(target.to_string());
        }
        Ok(())
    };
    if let Some(to) = &options.to {
        check_target(to)?;
    }
    let start = if options.from_beginning {
        all
    } else {
        block_in_place(|| consumer.committed_offsets(all, TIMEOUT)).on(&brokers)?
    };
    let mut reader = block_in_place(|| Reader::new(&consumer, dlq_topic, &start, &brokers))?;

    let mut producer_config = client.clone();
    producer_config
        .set("enable.idempotence", "true")
        .set("acks", "all");
    let producer: FutureProducer = producer_config.create().on(&brokers)?;
    let mut report = ReplayReport::default();
    loop {
        let batch = block_in_place(|| reader.next_batch(&brokers))?;
        if batch.is_empty() {
            return Ok(report);
        }
        // Per record of the batch, in order: where it goes, or None when it is passed over.
        let mut targets: Vec<Option<String>> = Vec::with_capacity(batch.len());
        for record in &batch {
            let letter = DeadLetter::from_message(record);
            let matches =
                options.error_contains.as_deref().is_none_or(|needle| {
                    letter.header(H_ERROR).is_some_and(|e| e.contains(needle))
                }) && options
                    .key
                    .as_deref()
                    .is_none_or(|k| letter.key.as_ref().and_then(Bytes::as_text) == Some(k));
            let target = if !matches {
                report.filtered_out += 1;
                None
            } else {
                match options.to.as_deref().or(letter.header(H_ORIGIN_TOPIC)) {
                    Some(target) => {
                        check_target(target)?;
                        on_plan(Plan {
                            partition: letter.partition,
                            offset: letter.offset,
                            key: letter.key.as_ref(),
                            target,
                        });
                        Some(target.to_string())
                    }
                    None => {
                        report.without_target += 1;
                        None
                    }
                }
            };
            targets.push(target);
        }
        if options.dry_run {
            report.replayed += targets.iter().flatten().count();
            continue;
        }
        let mut deliveries = Vec::new();
        let mut failure = None;
        for (index, (record, target)) in batch.iter().zip(&targets).enumerate() {
            let Some(target) = target else { continue };
            let headers: OwnedHeaders =
                kafka::copy_headers_except(record.headers(), &ROUTING_HEADERS);
            let mut out = FutureRecord::<[u8], [u8]>::to(target).headers(headers);
            if let Some(key) = record.key() {
                out = out.key(key);
            }
            if let Some(payload) = record.payload() {
                out = out.payload(payload);
            }
            match producer.send_result(out) {
                Ok(delivery) => deliveries.push((index, delivery)),
                // Refused before it left: nothing after it is sent, so a rerun starts here.
                Err((e, _)) => {
                    failure = Some((index, e));
                    break;
                }
            }
        }
        // Polled together, so the sends are batched rather than one round trip each.
        let (indexes, futures): (Vec<_>, Vec<_>) = deliveries.into_iter().unzip();
        let mut delivered = vec![false; batch.len()];
        for (index, result) in indexes
            .into_iter()
            .zip(futures_util::future::join_all(futures).await)
        {
            let error = match result {
                Ok(Ok(_)) => {
                    delivered[index] = true;
                    report.replayed += 1;
                    continue;
                }
                Ok(Err((e, _))) => e,
                Err(_) => KafkaError::Canceled,
            };
            if failure.as_ref().is_none_or(|(first, _)| index < *first) {
                failure = Some((index, error));
            }
        }
        // Commit each partition up to its first record that should have gone out and did
        // not; what the filters passed over counts as done.
        let mut next: HashMap<i32, i64> = HashMap::new();
        let mut stopped = std::collections::HashSet::new();
        for (index, record) in batch.iter().enumerate() {
            let partition = record.partition();
            if stopped.contains(&partition) {
                continue;
            }
            if targets[index].is_some() && !delivered[index] {
                stopped.insert(partition);
            } else {
                next.insert(partition, record.offset() + 1);
            }
        }
        let mut offsets = TopicPartitionList::new();
        for (partition, offset) in next {
            offsets
                .add_partition_offset(dlq_topic, partition, Offset::Offset(offset))
                .on(&brokers)?;
        }
        if offsets.count() > 0 {
            block_in_place(|| consumer.commit(&offsets, CommitMode::Sync)).on(&brokers)?;
        }
        if let Some((index, source)) = failure {
            let record = &batch[index];
            return Err(AdminError::Send {
                record: format!(
                    "{dlq_topic} partition {} offset {}",
                    record.partition(),
                    record.offset()
                ),
                target: targets[index].clone().unwrap_or_default(),
                source: Box::new(source),
            });
        }
    }
}
