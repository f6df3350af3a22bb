//! The generic stage: consume → handle → produce, exactly once by default.
//!
//! One loop owns the consumer and the producer, and never blocks: librdkafka's blocking
//! calls run on blocking threads and come back as events, next to consumed records,
//! finished handlers, delivery reports and timers. So the loop keeps turning, and its
//! health reports what it achieves, whatever the broker does.
//!
//! * A record is handled as soon as it arrives ([`keys`]: records of one key in order,
//!   different keys at once, at most `max_in_flight` being handled), and its outcome — next
//!   event, retry record or dead letter ([`route`]) — is released in its partition's offset
//!   order ([`partitions`]).
//! * Exactly-once: released outcomes and their offsets commit in one Kafka transaction
//!   ([`txn`]). A transaction closes as soon as the previous commit is done and
//!   `commit_interval` has passed since it started; outcomes that finish meanwhile form the
//!   next one (group commit, up to `commit_max_records`). An aborted transaction rewinds
//!   the partitions to their last committed offsets, which the loop knows.
//! * At-least-once: outcomes are sent at once, and a partition's offset is committed up to
//!   its highest contiguous acknowledged record, at most once per `commit_interval`.
//! * A failure belongs to its record: a handler error, an undecodable payload, a record
//!   the broker refuses to take become retry records or dead letters, and the partition
//!   moves on. Only the connection or the transaction fail a batch; a fenced, fatal or
//!   hung producer is replaced in place.
//! * Retry records wait for their due time with their partition paused ([`held`]).
//! * The stage is ready while it makes progress ([`health`]).

mod commit;
mod context;
mod counters;
mod health;
mod held;
mod input;
mod keys;
mod output;
mod partitions;
mod record;
mod route;
mod seen;
mod txn;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use futures_util::stream::{FuturesUnordered, StreamExt};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::config::{Guarantee, SimulateConfig, StageConfig};
use crate::event::now_ms;
use crate::kafka;
use crate::lifecycle::{Health, Shutdown, Watchdog, status};
use crate::metrics::Metrics;
use crate::retry::{HandlerError, RoutingState};

use commit::offsets_done;
use context::{Dedup, Delivery, StageContext};
use counters::Counters;
use health::{Progress, Verdict};
use held::Held;
use keys::{KeyHash, KeyQueues};
use partitions::{Names, PartitionLog, Pid};
use route::Router;
use seen::Seen;
use txn::{State, Txn};

pub use record::{Handled, Handler, Inbound, decode};

/// The most bytes of consumed records held at once (beside `max_in_flight` records).
const MAX_PENDING_BYTES: usize = 64 << 20;
/// How long a stop may take to finish and commit the work in progress; inside the units'
/// `TimeoutStopSec`.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(20);
/// Refusals of one record's outcome that are told apart: exactly-once sends the record once
/// more alone, then as a dead letter whole, cut to 1 KiB, and without its value.
const MAX_REFUSALS: u8 = 4;

#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error("Kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("a blocking Kafka call panicked")]
    Join,
    #[error("{0}")]
    Dedup(String),
}

/// A record on its way through a handler.
struct Work {
    record: Inbound,
    routing: Result<RoutingState, HandlerError>,
    pid: Pid,
    /// The generation of its partition log when it was read; stale after a rewind.
    generation: u64,
    key: KeyHash,
    /// Its outcome goes alone into a transaction (see [`Outcome::solo`]).
    solo: bool,
}

type Handling = FuturesUnordered<Pin<Box<dyn Future<Output = Work> + Send + Sync>>>;
type OffsetsCall = Pin<Box<dyn Future<Output = Result<(), String>> + Send + Sync>>;

pub struct Stage {
    /// The keys handled, when the stage keeps them (`[dedup]`).
    seen: Option<Arc<Mutex<Seen>>>,
    config: StageConfig,
    handler: Arc<dyn Handler>,
    metrics: Arc<Metrics>,
    counters: Counters,
    simulate: Arc<RwLock<SimulateConfig>>,
    router: Router,
    consumer: Arc<StreamConsumer<StageContext>>,
    txn: Txn,
    deliveries: mpsc::UnboundedReceiver<Delivery>,
    /// The at-least-once offset commit running, if any.
    offsets_call: Option<OffsetsCall>,
    names: Names,
    logs: HashMap<Pid, PartitionLog>,
    held: Held,
    keys: KeyQueues<Work>,
    handling: Handling,
    /// Records whose outcome the broker refused: how often, and why. They are dead-lettered,
    /// cut further each time, when they are read again.
    refused: HashMap<(Pid, i64), (u8, String)>,
    /// The consumer context's epoch as last seen.
    epoch: u64,
    generation: u64,
    progress: Progress,
    stalled: bool,
    /// The producer's queue was full: release again from then on.
    release_after: Option<Instant>,
    /// The next commit starts no earlier (`commit_interval` after the last one started).
    commit_not_before: Option<Instant>,
}

impl Stage {
    /// Connects to Kafka, creates the topics, prepares transactions and subscribes. Returns
    /// once the broker has answered, so the caller can report readiness.
    pub async fn connect(
        config: StageConfig,
        handler: Arc<dyn Handler>,
        metrics: Arc<Metrics>,
        simulate: Arc<RwLock<SimulateConfig>>,
    ) -> Result<Self, StageError> {
        let common = &config.common;
        // Every series a stage can produce exists from the start, at 0, so that rate() and
        // increase() (and the alerts built on them) see the first retry, dead letter or abort.
        let counters = Counters::new(&metrics, &config, handler.stage());
        let mut topics = vec![
            config.input.as_str(),
            config.retry_topic.as_str(),
            config.dlq_topic.as_str(),
        ];
        if let Some(output) = &config.output {
            topics.push(output);
        }
        if common.topics.create {
            let created = kafka::ensure_topics(common, &topics, Duration::from_secs(30)).await?;
            if !created.is_empty() {
                info!(topics = ?created, "created topics");
            }
        }

        let transactional = config.guarantee == Guarantee::ExactlyOnce;
        let transactional_id = format!("kop-{}-{}", common.service_name, common.instance_id);
        let producer_config = kafka::stage_producer_config(
            common,
            transactional.then_some(transactional_id.as_str()),
        );
        let (reports, deliveries) = mpsc::unbounded_channel();
        let txn = tokio::task::spawn_blocking(move || {
            Txn::connect(producer_config, reports, transactional)
        })
        .await
        .map_err(|_| StageError::Join)??;
        if transactional {
            info!(transactional_id, "transactions initialised");
        }

        // Exactly-once keeps the handled keys in a changelog; at-least-once in memory only.
        let seen = config.dedup.enabled.then(|| {
            Arc::new(Mutex::new(Seen::new(
                config.dedup.max_keys,
                config.dedup.window,
            )))
        });
        let dedup = match &seen {
            Some(seen) if transactional => {
                let partitions = kafka::topic_partitions(common, &config.input).await?;
                let retry_partitions = kafka::topic_partitions(common, &config.retry_topic).await?;
                if retry_partitions != partitions {
                    warn!(
                        input = %config.input,
                        partitions,
                        retry = %config.retry_topic,
                        retry_partitions,
                        "the retry topic's partitions differ from the input's: a retry copy may \
                         not be recognised as a repeat of an order paid meanwhile"
                    );
                }
                let created = kafka::ensure_changelog(
                    common,
                    &config.dedup.changelog,
                    partitions,
                    config.dedup.window,
                )
                .await
                .map_err(StageError::Dedup)?;
                if created {
                    info!(topic = %config.dedup.changelog, partitions, "created the changelog of handled keys");
                }
                let mut reader = kafka::base_config(common);
                // Assigned, never subscribed and never committing: the group id only
                // satisfies librdkafka's position lookup.
                reader
                    .set("group.id", format!("{}.restore", config.dedup.changelog))
                    .set("isolation.level", "read_committed")
                    .set("enable.auto.commit", "false")
                    .set("enable.partition.eof", "false");
                Some(Dedup {
                    seen: seen.clone(),
                    reader,
                    changelog: config.dedup.changelog.clone(),
                    failed: Mutex::new(None),
                })
            }
            _ => None,
        };
        let context = StageContext::new(&config.input, metrics.clone(), dedup);
        let mut consumer_config = kafka::stage_consumer_config(common, &config.group_id);
        if config.dedup.enabled {
            // A record and its retry copy share a partition number; the range assignor gives
            // that partition of both topics to the same member, with its handled keys.
            consumer_config.set("partition.assignment.strategy", "range");
        }
        let consumer: StreamConsumer<StageContext> =
            consumer_config.create_with_context(context)?;
        consumer.subscribe(&[&config.input, &config.retry_topic])?;
        let consumer = Arc::new(consumer);

        let probe = consumer.clone();
        let names: Vec<String> = topics.iter().map(|t| t.to_string()).collect();
        tokio::task::spawn_blocking(move || {
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            kafka::require_topics(probe.client(), &names)
        })
        .await
        .map_err(|_| StageError::Join)??;

        Ok(Stage {
            seen,
            router: Router::new(&config),
            progress: Progress::new(config.stall_timeout, Instant::now()),
            config,
            handler,
            metrics,
            counters,
            simulate,
            consumer,
            txn,
            deliveries,
            offsets_call: None,
            names: Names::default(),
            logs: HashMap::new(),
            held: Held::default(),
            keys: KeyQueues::default(),
            handling: Handling::new(),
            refused: HashMap::new(),
            epoch: 0,
            generation: 0,
            stalled: false,
            release_after: None,
            commit_not_before: None,
        })
    }

    /// The STATUS line of a stage that works.
    pub fn running_line(&self) -> String {
        match &self.config.output {
            Some(output) => format!(
                "{} → {output} ({})",
                self.config.input, self.config.guarantee
            ),
            None => format!(
                "{} → notifications ({})",
                self.config.input, self.config.guarantee
            ),
        }
    }

    /// Runs until shutdown; the work in progress is finished and committed first.
    pub async fn run(
        mut self,
        mut shutdown: Shutdown,
        health: Arc<Health>,
    ) -> Result<(), StageError> {
        let mut watchdog = Watchdog::from_env();
        let mut tick = tokio::time::interval(watchdog.tick().min(Duration::from_millis(500)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut drain_until: Option<Instant> = None;
        loop {
            if self.stall_asked() {
                warn!("simulate.stall is set: the processing loop stops here");
                shutdown.wait().await;
                break;
            }
            self.follow_rebalance();
            let take = drain_until.is_none() && self.has_room();
            // A held retry's due time is wall-clock (it travels in x-retry-at).
            let next_due = self
                .held
                .next_due()
                .map(|due| Instant::now() + Duration::from_millis(due.saturating_sub(now_ms())));
            let commit_at = self.commit_due();
            tokio::select! {
                biased;
                _ = shutdown.wait(), if drain_until.is_none() => {
                    info!("finishing the work in progress");
                    drain_until = Some(Instant::now() + DRAIN_TIMEOUT);
                }
                _ = tick.tick() => self.on_tick(&mut watchdog, &health),
                done = self.txn.call_done(), if self.txn.is_busy() => self.on_call_done(done),
                Some(report) = self.deliveries.recv() => self.on_delivery(report),
                result = offsets_done(&mut self.offsets_call), if self.offsets_call.is_some() => {
                    self.offsets_call = None;
                    self.on_offsets_committed(result);
                }
                Some(work) = self.handling.next(), if !self.handling.is_empty() => {
                    self.on_handled(work);
                }
                _ = sleep_until(next_due), if next_due.is_some() => self.resume_due(),
                _ = sleep_until(commit_at), if commit_at.is_some() => {}
                received = self.consumer.recv(), if take => {
                    self.on_received(received.map(|m| Inbound::from_message(&m)));
                    self.drain_input();
                }
            }
            // A rebalance may have run inside the consumer's poll above.
            self.follow_rebalance();
            if let Some(why) = self.consumer.context().restore_failed() {
                // Without the handled keys a repeat could be paid twice: better not at all,
                // until systemd has started the stage again.
                error!(reason = %why, "stopping");
                self.close().await;
                return Err(StageError::Dedup(why));
            }
            self.release();
            self.commit();
            if let Some(deadline) = drain_until {
                if self.is_drained() {
                    break;
                }
                if Instant::now() >= deadline {
                    warn!(
                        pending = self.pending_records(),
                        "the work in progress did not finish in time; it is read again after the restart"
                    );
                    break;
                }
            }
        }
        self.close().await;
        Ok(())
    }

    fn stall_asked(&self) -> bool {
        self.simulate.read().map(|s| s.stall).unwrap_or(false)
    }

    fn pending_records(&self) -> usize {
        self.logs.values().map(PartitionLog::len).sum()
    }

    /// Room to read more: fewer than `max_in_flight` records being handled, and the records
    /// read and not committed within what two full transactions add to that (the one
    /// committing and the one filling), so that a transaction can grow to
    /// `commit_max_records` under backlog; and within the byte bound.
    fn has_room(&self) -> bool {
        let (mut handling, mut pending, mut bytes) = (0, 0, 0);
        for log in self.logs.values() {
            handling += log.handling();
            pending += log.len();
            bytes += log.bytes();
        }
        handling < self.config.max_in_flight
            && pending < self.config.max_in_flight + 2 * self.config.commit_max_records
            && bytes < MAX_PENDING_BYTES
    }

    fn is_drained(&self) -> bool {
        self.pending_records() == 0
            && !self.txn.is_busy()
            && matches!(self.txn.state(), State::Idle)
            && self.offsets_call.is_none()
    }

    /// Takes what the consumer has ready without waiting, so that one transaction holds it.
    fn drain_input(&mut self) {
        while self.has_room() {
            let Some(received) = self.consumer.recv().now_or_never() else {
                break;
            };
            let received = received.map(|m| Inbound::from_message(&m));
            self.on_received(received);
        }
    }

    fn on_tick(&mut self, watchdog: &mut Watchdog, health: &Health) {
        if let Some(seen) = &self.seen
            && let Ok(seen) = seen.lock()
        {
            self.metrics.dedup_keys.set(seen.len() as i64);
        }
        if let State::Broken { retry_at } = self.txn.state()
            && Instant::now() >= *retry_at
        {
            self.start_new_producer();
        }
        let context = self.consumer.context();
        let waiting = self.pending_records() > 0 || context.input_lag() > 0;
        let unreachable = context.brokers_unreachable_for(now_ms());
        match self.progress.verdict(waiting, unreachable, Instant::now()) {
            Verdict::Progressing => {
                watchdog.ping();
                if self.stalled {
                    self.stalled = false;
                    info!("progressing again");
                    status(&self.running_line());
                }
                health.set_ready(true);
            }
            Verdict::Stalled(why) => {
                // No watchdog ping: systemd restarts a stage that cannot make progress.
                if !self.stalled {
                    self.stalled = true;
                    error!(reason = %why, "the stage is not making progress");
                }
                status(&why);
                health.set_ready(false);
            }
        }
        self.metrics.stalled.set(i64::from(self.stalled));
        self.metrics
            .batch_failures
            .set(i64::from(self.progress.consecutive_failures()));
    }

    async fn close(mut self) {
        if let Some(call) = self.offsets_call.take() {
            let result = call.await;
            self.on_offsets_committed(result);
        }
        if self.txn.is_busy() {
            let done = tokio::time::timeout(DRAIN_TIMEOUT, self.txn.call_done()).await;
            if let Ok(done) = done {
                self.on_call_done(done);
            }
        }
        if matches!(self.txn.state(), State::Open { .. }) && !self.txn.is_busy() {
            self.txn.start_abort();
            let _ = tokio::time::timeout(Duration::from_secs(5), self.txn.call_done()).await;
        }
        info!("draining done; leaving the group");
        self.leave_group().await;
        self.txn.flush().await;
    }

    /// Leaves the group while this loop still polls, so that the rebalances it causes (and
    /// one still waiting to be served) are served here rather than by the consumer's close
    /// on drop. There, librdkafka's answer to the rebalance-protocol query that rdkafka
    /// makes can hang forever: a stage stopped right after its first assignment, which it
    /// had not polled yet (`simulate.stall`), never exited.
    async fn leave_group(&mut self) {
        self.consumer.unsubscribe();
        let deadline = Instant::now() + Duration::from_secs(5);
        let assigned = |c: &StreamConsumer<StageContext>| {
            c.assignment().map(|a| a.count() > 0).unwrap_or(false)
        };
        // A poll that times out with nothing assigned: every rebalance event was served.
        loop {
            let quiet = tokio::time::timeout(Duration::from_millis(200), self.consumer.recv())
                .await
                .is_err();
            if (quiet && !assigned(&self.consumer)) || Instant::now() >= deadline {
                break;
            }
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}
