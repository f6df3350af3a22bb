//! `kopctl dlq replay`: dead letters published again, with how far it got committed.

use std::collections::HashMap;

use tokio::task::block_in_place;

use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use super::error::{AdminError, Context, brokers_of};
use super::letter::{Bytes, DeadLetter};
use super::read::{Reader, TIMEOUT, partitions, reading_consumer};
use crate::kafka::{self, H_ERROR, H_ORIGIN_TOPIC, ROUTING_HEADERS};

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
