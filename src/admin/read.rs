//! Reading a topic to its end in bounded batches, and `kopctl dlq list` on top of it.

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use super::error::{AdminError, Context, METADATA_TIMEOUT, brokers_of};
use super::letter::DeadLetter;

pub(super) const TIMEOUT: Duration = Duration::from_secs(10);
/// Records read, and held, at a time.
const BATCH: usize = 1000;

/// Reads a topic from given start offsets up to the high watermarks seen at the start,
/// one bounded batch at a time.
pub(super) struct Reader<'a> {
    consumer: &'a BaseConsumer,
    topic: String,
    /// Partitions not read to their end yet, with that end.
    ends: HashMap<i32, i64>,
    deadline: std::time::Instant,
}

impl<'a> Reader<'a> {
    pub(super) fn new(
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
    pub(super) fn next_batch(&mut self, brokers: &str) -> Result<Vec<OwnedMessage>, AdminError> {
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
pub(super) fn partitions(
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

pub(super) fn reading_consumer(
    client: &ClientConfig,
    group: &str,
) -> Result<BaseConsumer, AdminError> {
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
