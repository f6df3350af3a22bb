//! The librdkafka callbacks of a stage, kept short: they only record what happened for the
//! processing loop to act on, and never block (they run inside the consumer's poll, on the
//! loop's own task).

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::producer::{DeliveryResult, ProducerContext};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientConfig, ClientContext};
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use super::partitions::Pid;
use super::route::Target;
use super::seen::{Seen, read_changelog};
use crate::kafka::BrokerWatch;
use crate::metrics::Metrics;

pub struct StageContext {
    /// Bumped at every revocation; the loop compares it with the one it last saw.
    epoch: AtomicU64,
    revoked: Mutex<Vec<(String, i32)>>,
    /// Records behind in the main input topic (the sum over its partitions), for the
    /// health check; retry partitions are left out, as they wait on purpose.
    input_lag: AtomicI64,
    brokers: BrokerWatch,
    input: String,
    metrics: Arc<Metrics>,
    /// The handled keys, restored on assignment, when the stage keeps them.
    dedup: Option<Dedup>,
}

/// What restoring the handled keys takes.
pub struct Dedup {
    pub seen: Arc<Mutex<Seen>>,
    /// A consumer of the changelog (no group; `read_committed`).
    pub reader: ClientConfig,
    pub changelog: String,
    /// Why the last restore failed, if it did: the loop cannot go on without the keys.
    pub failed: Mutex<Option<String>>,
}

impl StageContext {
    pub fn new(input: &str, metrics: Arc<Metrics>, dedup: Option<Dedup>) -> Self {
        StageContext {
            dedup,
            epoch: AtomicU64::new(0),
            revoked: Mutex::new(Vec::new()),
            input_lag: AtomicI64::new(0),
            brokers: BrokerWatch::default(),
            input: input.to_string(),
            metrics,
        }
    }

    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// The partitions revoked since the last call.
    pub fn take_revoked(&self) -> Vec<(String, i32)> {
        self.revoked
            .lock()
            .map(|mut r| std::mem::take(&mut *r))
            .unwrap_or_default()
    }

    /// Why the handled keys could not be restored, if they could not.
    pub fn restore_failed(&self) -> Option<String> {
        let dedup = self.dedup.as_ref()?;
        dedup.failed.lock().ok().and_then(|f| f.clone())
    }

    /// Reads the handled keys of the assigned partitions back from the changelog, before
    /// any of their records is handled. It blocks the poll for as long as it takes: the
    /// window (`dedup.max_keys` per partition) bounds it.
    fn restore(&self, partitions: &rdkafka::TopicPartitionList) {
        let Some(dedup) = &self.dedup else { return };
        let mut numbers: Vec<i32> = partitions
            .elements()
            .iter()
            .map(|p| p.partition())
            .collect();
        numbers.sort_unstable();
        numbers.dedup();
        let started = std::time::Instant::now();
        match read_changelog(
            &dedup.reader,
            &dedup.changelog,
            &numbers,
            std::time::Duration::from_secs(30),
        ) {
            Ok(restored) => {
                let now = crate::event::now_ms();
                let mut keys = 0;
                if let Ok(mut seen) = dedup.seen.lock() {
                    for (partition, entries) in restored {
                        keys += entries.len();
                        seen.restore(partition, entries, now);
                    }
                }
                info!(
                    changelog = %dedup.changelog,
                    partitions = ?numbers,
                    keys,
                    took_ms = started.elapsed().as_millis() as u64,
                    "handled keys restored"
                );
            }
            Err(e) => {
                error!(changelog = %dedup.changelog, partitions = ?numbers, error = %e, "cannot restore the handled keys");
                if let Ok(mut failed) = dedup.failed.lock() {
                    *failed = Some(format!(
                        "cannot restore the handled keys of partitions {numbers:?} from {}: {e}",
                        dedup.changelog
                    ));
                }
            }
        }
    }

    pub fn input_lag(&self) -> i64 {
        self.input_lag.load(Ordering::Acquire)
    }

    /// How long no statistics report has shown a broker connection that is up.
    pub fn brokers_unreachable_for(&self, now_ms: u64) -> std::time::Duration {
        self.brokers.unreachable_for(now_ms)
    }
}

impl ClientContext for StageContext {
    fn stats(&self, statistics: Statistics) {
        self.brokers.saw(&statistics);
        let mut input_lag = 0;
        for (topic, stats) in &statistics.topics {
            for (partition, p) in &stats.partitions {
                if let Some(lag) = partition_lag(*partition, p) {
                    self.metrics
                        .consumer_lag
                        .with_label_values(&[topic.as_str(), &partition.to_string()])
                        .set(lag);
                    if *topic == self.input {
                        input_lag += lag;
                    }
                }
            }
        }
        self.input_lag.store(input_lag, Ordering::Release);
    }
}

/// Records between this consumer's position and the end of what it may read (the last
/// stable offset, as it reads `read_committed`). librdkafka's own `consumer_lag` counts from
/// the committed offset, which the consumer does not learn when offsets are committed
/// through the producer's transaction; the position is known in both modes.
fn partition_lag(partition: i32, p: &rdkafka::statistics::Partition) -> Option<i64> {
    // Partition -1 is librdkafka's internal queue; negative offsets mean "not known yet".
    let end = if p.ls_offset >= 0 {
        p.ls_offset
    } else {
        p.hi_offset
    };
    (partition >= 0 && p.desired && end >= 0 && p.app_offset >= 0)
        .then(|| (end - p.app_offset).max(0))
}

impl ConsumerContext for StageContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(partitions) => {
                info!(
                    partitions = partitions.count(),
                    lost = consumer.assignment_lost(),
                    "partitions revoked"
                );
                if let Some(dedup) = &self.dedup
                    && let Ok(mut seen) = dedup.seen.lock()
                {
                    for p in partitions.elements() {
                        seen.forget(p.partition());
                    }
                }
                if let Ok(mut revoked) = self.revoked.lock() {
                    for p in partitions.elements() {
                        revoked.push((p.topic().to_string(), p.partition()));
                        let _ = self
                            .metrics
                            .consumer_lag
                            .remove_label_values(&[p.topic(), &p.partition().to_string()]);
                    }
                }
                // The open transaction holds outputs of these partitions: the loop aborts
                // it when it sees the new epoch. Until then, the broker refuses its offsets
                // (the group generation moved on), and the new owner's read of the committed
                // offsets waits for it to end: nothing is seen twice either way.
                self.epoch.fetch_add(1, Ordering::AcqRel);
            }
            Rebalance::Assign(partitions) => {
                info!(partitions = partitions.count(), "partitions assigned");
                self.restore(partitions);
            }
            Rebalance::Error(e) => warn!(error = %e, "rebalance failed"),
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        // librdkafka keeps an application's pause on a partition across its revocation and
        // re-assignment; a retry partition held before the rebalance would stay paused for
        // good. Whatever was held is judged anew from the committed offset.
        if let Rebalance::Assign(partitions) = rebalance
            && partitions.count() > 0
            && let Err(e) = consumer.resume(partitions)
        {
            warn!(error = %e, "cannot resume the assigned partitions");
        }
    }
}

/// Identifies a produced record in its delivery report.
pub struct Tag {
    pub pid: Pid,
    pub offset: i64,
    pub target: Target,
    /// Which transaction (or, at least once, which producer) sent it; reports of an
    /// earlier one are stale.
    pub batch: u64,
}

pub struct Delivery {
    pub tag: Box<Tag>,
    pub result: Result<(), KafkaError>,
}

/// Hands delivery reports to the loop.
pub struct DeliveryContext {
    reports: mpsc::UnboundedSender<Delivery>,
}

impl DeliveryContext {
    pub fn new(reports: mpsc::UnboundedSender<Delivery>) -> Self {
        DeliveryContext { reports }
    }
}

impl ClientContext for DeliveryContext {}

impl ProducerContext for DeliveryContext {
    type DeliveryOpaque = Box<Tag>;

    fn delivery(&self, result: &DeliveryResult<'_>, tag: Box<Tag>) {
        let result = match result {
            Ok(_) => Ok(()),
            Err((e, _)) => Err(e.clone()),
        };
        let _ = self.reports.send(Delivery { tag, result });
    }
}
