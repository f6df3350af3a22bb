//! The generic stage: consume → handle → produce, exactly once by default.
//!
//! One loop owns the consumer and the producer, and never blocks: librdkafka's blocking
//! calls run on blocking threads and come back as events, next to consumed records,
//! finished handlers, delivery reports and timers. So the loop keeps turning, and its
//! health reports what it achieves, whatever the broker does.
//!
//! * A record is handled as soon as it arrives ([`keys`]: records of one key in order,
//!   different keys at once, at most `max_in_flight` held), and its outcome — next event,
//!   retry record or dead letter ([`route`]) — is released in its partition's offset order
//!   ([`partitions`]).
//! * Exactly-once: released outcomes and their offsets commit in one Kafka transaction
//!   ([`txn`]). A transaction closes as soon as the previous commit is done; outcomes
//!   that finish meanwhile form the next one (group commit). An aborted transaction rewinds
//!   the partitions to their last committed offsets, which the loop knows.
//! * At-least-once: outcomes are sent at once, and a partition's offset is committed up to
//!   its highest contiguous acknowledged record.
//! * A failure belongs to its record: a handler error, an undecodable payload, a record
//!   the broker refuses to take become retry records or dead letters, and the partition
//!   moves on. Only the connection or the transaction fail a batch; a fenced, fatal or
//!   hung producer is replaced in place.
//! * Retry records wait for their due time with their partition paused ([`held`]).
//! * The stage is ready while it makes progress ([`health`]).

mod context;
mod health;
mod held;
mod keys;
mod partitions;
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
use prometheus::IntCounter;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer as _};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use crate::config::{Guarantee, SimulateConfig, StageConfig};
use crate::event::now_ms;
use crate::kafka;
use crate::lifecycle::{Health, Shutdown, Watchdog, status};
use crate::metrics::Metrics;
use crate::retry::{self, HandlerError, RoutingState};

use context::{Dedup, Delivery, StageContext, Tag};
use health::{Progress, Verdict};
use held::Held;
use keys::{KeyHash, KeyQueues};
use partitions::{Names, PartitionLog, Pid};
use route::{OutRecord, Outcome, Router, Target};
use seen::Seen;
use txn::{CallDone, State, Txn};

/// The most bytes of consumed records held at once (beside `max_in_flight` records).
const MAX_PENDING_BYTES: usize = 64 << 20;
/// How long a stop may take to finish and commit the work in progress; inside the units'
/// `TimeoutStopSec`.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(20);
/// Refusals of one record's outcome that are told apart: exactly-once sends the record once
/// more alone, then as a dead letter whole, cut to 1 KiB, and without its value.
const MAX_REFUSALS: u8 = 4;

/// A consumed record, detached from the consumer.
#[derive(Debug, Clone)]
pub struct Inbound {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Option<OwnedHeaders>,
}

impl Inbound {
    fn from_message(message: &BorrowedMessage<'_>) -> Self {
        Inbound {
            topic: message.topic().to_string(),
            partition: message.partition(),
            offset: message.offset(),
            key: message.key().map(<[u8]>::to_vec),
            payload: message.payload().map(<[u8]>::to_vec),
            headers: message.headers().map(|h| h.detach()),
        }
    }

    fn size(&self) -> usize {
        self.key.as_ref().map_or(0, Vec::len) + self.payload.as_ref().map_or(0, Vec::len)
    }
}

/// What a handler made of a record.
#[derive(Debug, Clone, PartialEq)]
pub struct Handled {
    pub order_id: String,
    /// When the order was accepted by the API (epoch ms), for the end-to-end latency.
    pub accepted_at_ms: u64,
    /// The value of the downstream event; `None` for the last stage.
    pub output: Option<Vec<u8>>,
}

/// The business rule of a stage. Everything else (batching, retries, transactions) is the
/// stage's; a handler only turns one record into its outcome.
pub trait Handler: Send + Sync + 'static {
    /// The `stage` label of `handler_errors_total`.
    fn stage(&self) -> &'static str;
    fn handle(&self, record: &Inbound) -> Result<Handled, HandlerError>;
}

/// Decodes a JSON payload; anything that does not decode is a permanent error.
pub fn decode<T: serde::de::DeserializeOwned>(record: &Inbound) -> Result<T, HandlerError> {
    let payload = record
        .payload
        .as_deref()
        .ok_or_else(|| HandlerError::permanent("record has no value"))?;
    serde_json::from_slice(payload)
        .map_err(|e| HandlerError::permanent(format!("undecodable payload: {e}")))
}

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

/// The series a stage updates per record, looked up once.
struct Counters {
    consumed_input: IntCounter,
    consumed_retry: IntCounter,
    produced: [IntCounter; 4],
    retries: IntCounter,
    dead_letters: IntCounter,
    commits: IntCounter,
    aborts: IntCounter,
    handler_errors: IntCounter,
}

impl Counters {
    fn new(metrics: &Metrics, config: &StageConfig, stage: &str) -> Self {
        let produced = |topic: &str| metrics.produced.with_label_values(&[topic]);
        Counters {
            consumed_input: metrics.consumed.with_label_values(&[&config.input]),
            consumed_retry: metrics.consumed.with_label_values(&[&config.retry_topic]),
            produced: [
                produced(config.output.as_deref().unwrap_or(&config.dlq_topic)),
                produced(&config.retry_topic),
                produced(&config.dlq_topic),
                if config.dedup.enabled {
                    produced(&config.dedup.changelog)
                } else {
                    // Never counted: no series for a changelog that does not exist.
                    IntCounter::new("unused", "unused").expect("a valid name")
                },
            ],
            retries: metrics.retries.with_label_values(&[&config.retry_topic]),
            dead_letters: metrics.dead_letters.with_label_values(&[&config.dlq_topic]),
            commits: metrics.transactions.with_label_values(&["commit"]),
            aborts: metrics.transactions.with_label_values(&["abort"]),
            handler_errors: metrics.handler_errors.with_label_values(&[stage]),
        }
    }

    fn produced(&self, target: Target) -> &IntCounter {
        &self.produced[target as usize]
    }
}

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
            let next_due = self.held.next_due();
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
                _ = sleep_until_ms(next_due), if next_due.is_some() => self.resume_due(),
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

    fn has_room(&self) -> bool {
        self.pending_records() < self.config.max_in_flight
            && self.logs.values().map(PartitionLog::bytes).sum::<usize>() < MAX_PENDING_BYTES
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

    // ---- input ---------------------------------------------------------------------

    fn on_received(&mut self, received: Result<Inbound, KafkaError>) {
        // A rebalance runs inside the consumer's poll: what is read after it belongs to the
        // new assignment.
        self.follow_rebalance();
        let record = match received {
            Ok(record) => record,
            Err(e) => {
                warn!(error = %e, "consumer error");
                return;
            }
        };
        let pid = self.names.id(&record.topic, record.partition);
        if self.held.holds(pid, record.offset) {
            // Fetched before the pause took effect; read again after the resume.
            return;
        }
        let generation = self.generation;
        let log = self
            .logs
            .entry(pid)
            .or_insert_with(|| PartitionLog::new(record.offset, generation));
        if record.offset < log.next_expected() {
            return;
        }
        let is_retry = record.topic == self.config.retry_topic;
        if is_retry {
            self.counters.consumed_retry.inc();
        } else {
            self.counters.consumed_input.inc();
        }
        let routing = retry::read_routing(record.headers.as_ref());
        if is_retry
            && !self.held.was_due(pid, record.offset)
            && let Ok(state) = &routing
            && let Some(retry_at) = state.retry_at
        {
            let now = now_ms();
            let due = held::due_time(retry_at, now, self.config.retry.longest_delay());
            if due > now {
                debug!(topic = %record.topic, partition = record.partition, offset = record.offset, due, "retry not due yet; pausing its partition");
                self.pause(pid);
                self.held.hold(pid, record.offset, due);
                return;
            }
        }
        let log_generation = log.generation();
        let offset = record.offset;
        log.push(offset, record.size());
        // The broker refused this record's outcome before. Exactly-once handles it once more
        // in a transaction of its own (a refused batch takes innocent records along), then
        // dead-letters it, cut further at each refusal; at-least-once, which cannot send a
        // record alone, dead-letters it at once.
        let transactional = self.txn.is_transactional();
        let refused = self.refused.get(&(pid, offset));
        if let Some((refusals, reason)) = refused
            && (!transactional || *refusals >= 2)
        {
            let level = if transactional {
                refusals - 1
            } else {
                *refusals
            };
            let mut outcome = self.router.refused(record, reason, level);
            outcome.solo = transactional;
            log.finish(offset, outcome);
            return;
        }
        let work = Work {
            key: KeyHash::of(record.key.as_deref(), pid),
            solo: refused.is_some(),
            record,
            routing,
            pid,
            generation: log_generation,
        };
        if let Some(work) = self.keys.admit(work.key, work) {
            self.start(work);
        }
    }

    fn pause(&self, pid: Pid) {
        let (topic, partition) = self.names.name(pid);
        let mut list = TopicPartitionList::new();
        list.add_partition(topic, partition);
        if let Err(e) = self.consumer.pause(&list) {
            warn!(topic, partition, error = %e, "cannot pause the retry partition");
        }
    }

    /// Resumes the held partitions whose head record is due, reading again from it.
    fn resume_due(&mut self) {
        for (pid, offset) in self.held.take_due(now_ms()) {
            self.seek_and_resume(&[(pid, offset)], true);
        }
    }

    /// Seeks partitions (asynchronously: librdkafka drops what it fetched before) and
    /// resumes them when they were paused.
    fn seek_and_resume(&self, targets: &[(Pid, i64)], resume: bool) {
        if targets.is_empty() {
            return;
        }
        let mut seek = TopicPartitionList::new();
        for (pid, offset) in targets {
            let (topic, partition) = self.names.name(*pid);
            if let Err(e) = seek.add_partition_offset(topic, partition, Offset::Offset(*offset)) {
                warn!(topic, partition, error = %e, "bad seek position");
            }
        }
        match self.consumer.seek_partitions(seek.clone(), Duration::ZERO) {
            Ok(result) => {
                for element in result.elements() {
                    // An asynchronous seek reports "in progress" for each partition.
                    if let Err(e) = element.error()
                        && e.rdkafka_error_code() != Some(RDKafkaErrorCode::InProgress)
                    {
                        warn!(topic = element.topic(), partition = element.partition(), error = %e, "cannot seek");
                    }
                }
            }
            Err(e) => warn!(error = %e, "cannot seek"),
        }
        if resume && let Err(e) = self.consumer.resume(&seek) {
            warn!(error = %e, "cannot resume");
        }
    }

    // ---- handling ------------------------------------------------------------------

    /// Handles a record whose key is free, and then the records of that key that waited
    /// behind it; with a simulated delay they finish later, as events of the loop.
    fn start(&mut self, mut work: Work) {
        loop {
            let delay = self.simulate.read().map(|s| s.delay).unwrap_or_default();
            if !delay.is_zero() {
                self.handling.push(Box::pin(async move {
                    tokio::time::sleep(delay).await;
                    work
                }));
                self.metrics.inflight.set(self.handling.len() as i64);
                return;
            }
            let key = work.key;
            self.complete(work);
            match self.keys.done(key) {
                Some(next) => work = next,
                None => return,
            }
        }
    }

    fn on_handled(&mut self, work: Work) {
        self.metrics.inflight.set(self.handling.len() as i64);
        let key = work.key;
        self.complete(work);
        if let Some(next) = self.keys.done(key) {
            self.start(next);
        }
    }

    fn complete(&mut self, work: Work) {
        let Some(log) = self.logs.get_mut(&work.pid) else {
            return; // its partition was revoked
        };
        if log.generation() != work.generation {
            return; // its partition was rewound: it is read again
        }
        if work.routing.is_ok()
            && let Some(key) = work.record.key.as_deref()
            && self.is_repeat(work.pid, key)
        {
            self.repeated(work.pid, work.record.offset, key);
            if let Some(log) = self.logs.get_mut(&work.pid) {
                log.finish(work.record.offset, Outcome::nothing());
            }
            return;
        }
        let Some(log) = self.logs.get_mut(&work.pid) else {
            return;
        };
        let failure_rate = self.simulate.read().map(|s| s.failure_rate).unwrap_or(0.0);
        let simulated_failure = failure_rate > 0.0 && rand::random_bool(failure_rate.min(1.0));
        let offset = work.record.offset;
        let (mut outcome, accepted_at) = self.router.handle(
            self.handler.as_ref(),
            work.record,
            work.routing,
            simulated_failure,
            now_ms(),
            &self.metrics.handler_duration,
        );
        match accepted_at {
            Some(at) => self
                .metrics
                .end_to_end
                .observe(now_ms().saturating_sub(at) as f64 / 1000.0),
            None => self.counters.handler_errors.inc(),
        }
        outcome.solo = work.solo;
        log.finish(offset, outcome);
    }

    /// Whether the key was handled already, within the dedup window.
    fn is_repeat(&self, pid: Pid, key: &[u8]) -> bool {
        let Some(seen) = &self.seen else {
            return false;
        };
        let partition = self.names.name(pid).1;
        seen.lock()
            .map(|seen| seen.contains(partition, key, now_ms()))
            .unwrap_or(false)
    }

    fn repeated(&self, pid: Pid, offset: i64, key: &[u8]) {
        self.metrics.repeats.inc();
        let (topic, partition) = self.names.name(pid);
        debug!(
            topic,
            partition,
            offset,
            order_id = %String::from_utf8_lossy(key),
            "a repeat of a handled key: acknowledged, not handled again"
        );
    }

    // ---- output --------------------------------------------------------------------

    /// Hands ready outcomes to the producer in offset order, into the open transaction.
    fn release(&mut self) {
        if !self.txn.accepts_records() {
            return;
        }
        if let Some(after) = self.release_after {
            if Instant::now() < after {
                return;
            }
            self.release_after = None;
        }
        let transactional = self.txn.is_transactional();
        let pids: Vec<Pid> = self.logs.keys().copied().collect();
        for pid in pids {
            loop {
                if transactional && self.txn.records() >= self.config.commit_max_records {
                    return; // the rest goes into the next transaction
                }
                let Some(log) = self.logs.get_mut(&pid) else {
                    break;
                };
                let Some((offset, outcome)) = log.next_release() else {
                    break;
                };
                let solo = transactional && outcome.solo;
                if solo && self.txn.records() > 0 {
                    // It goes alone: the open transaction commits first.
                    self.put_back(pid, offset, outcome);
                    return;
                }
                if let Err(e) = self.txn.begin() {
                    self.put_back(pid, offset, outcome);
                    self.repair(&format!("cannot begin a transaction: {e}"));
                    return;
                }
                if !self.hand_over(pid, offset, outcome) || solo {
                    return;
                }
            }
        }
    }

    /// Sends one outcome. False when releasing must stop for now.
    fn hand_over(&mut self, pid: Pid, offset: i64, mut outcome: Outcome) -> bool {
        let mut refusals = 0;
        loop {
            let Some(record) = outcome.record.take() else {
                // Nothing to write (the last stage): done as soon as its offset commits.
                self.released(pid, offset, None, false);
                return true;
            };
            let target = record.target;
            // The authority on repeats: two copies may have been handled at once (an order
            // and its retry copy), but only one output is released.
            let dedup_key = match (&self.seen, target, &record.key) {
                (Some(_), Target::Output, Some(key)) => Some(key.clone()),
                _ => None,
            };
            if let Some(key) = &dedup_key
                && self.is_repeat(pid, key)
            {
                self.repeated(pid, offset, key);
                self.released(pid, offset, None, false);
                return true;
            }
            let kept_headers = (!self.txn.is_transactional()).then(|| record.headers.clone());
            match self.send(pid, offset, record) {
                Ok(record) => {
                    match target {
                        Target::Retry => self.counters.retries.inc(),
                        Target::DeadLetter => self.counters.dead_letters.inc(),
                        Target::Output | Target::Changelog => {}
                    }
                    if outcome.truncated {
                        self.metrics.dlq_truncated.inc();
                    }
                    // At-least-once keeps what it sent until the broker has it.
                    let kept = kept_headers.map(|headers| {
                        outcome.record = Some(OutRecord { headers, ..record });
                        outcome
                    });
                    self.released(pid, offset, kept, true);
                    if let Some(key) = dedup_key {
                        return self.remember(pid, offset, key);
                    }
                    return true;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), record)) => {
                    outcome.record = Some(record);
                    self.put_back(pid, offset, outcome);
                    self.release_after = Some(Instant::now() + Duration::from_millis(5));
                    return false;
                }
                Err((e, record)) if refused_for_good(&e) && refusals < MAX_REFUSALS => {
                    // The record cannot be written as it is: it becomes a smaller dead letter.
                    refusals += 1;
                    let Some(source) = outcome.source.take() else {
                        outcome.record = Some(record);
                        self.put_back(pid, offset, outcome);
                        return false;
                    };
                    outcome = self.router.refused(source, &e.to_string(), refusals);
                }
                Err((e, record)) => {
                    outcome.record = Some(record);
                    self.put_back(pid, offset, outcome);
                    warn!(error = %e, "cannot hand a record to the producer");
                    self.release_after = Some(Instant::now() + Duration::from_secs(1));
                    self.txn.doom(format!("cannot produce: {e}"));
                    self.progress.failed(&format!("cannot produce: {e}"));
                    return false;
                }
            }
        }
    }

    /// Keeps the key of a released output: pending until its record commits, and written
    /// to the changelog in the same transaction (exactly-once).
    fn remember(&mut self, pid: Pid, offset: i64, key: Vec<u8>) -> bool {
        let Some(seen) = &self.seen else {
            return true;
        };
        let now = now_ms();
        let partition = self.names.name(pid).1;
        if let Ok(mut seen) = seen.lock() {
            seen.insert_pending(pid, offset, partition, &key, now);
        }
        if !self.txn.is_transactional() {
            return true;
        }
        let record = OutRecord {
            target: Target::Changelog,
            key: Some(key),
            value: Some(seen::encode_at(now).into_bytes()),
            headers: OwnedHeaders::new(),
        };
        // Into the changelog partition that restores this input partition.
        match self.send_to(pid, offset, record, Some(partition)) {
            Ok(_) => {
                self.txn.include(pid, offset + 1, true);
                true
            }
            Err((e, _)) => {
                // The output went without its key: the transaction must not commit.
                warn!(error = %e, "cannot write a handled key to the changelog");
                self.txn.doom(format!("cannot write to the changelog: {e}"));
                false
            }
        }
    }

    /// An outcome that could not leave waits in its place for the next release.
    fn put_back(&mut self, pid: Pid, offset: i64, outcome: Outcome) {
        if let Some(log) = self.logs.get_mut(&pid) {
            log.unsend(offset, outcome);
        }
    }

    /// Records that an outcome left: into the transaction, or kept until acknowledged.
    /// `sent`: whether a record was sent (and its acknowledgement is awaited).
    fn released(&mut self, pid: Pid, offset: i64, kept: Option<Outcome>, sent: bool) {
        self.txn.include(pid, offset + 1, sent);
        if let Some(log) = self.logs.get_mut(&pid) {
            match kept {
                Some(outcome) if !self.txn.is_transactional() => log.keep(offset, outcome),
                // Nothing was sent: nothing to wait for.
                None if !self.txn.is_transactional() => log.ack(offset),
                _ => {}
            }
        }
    }

    /// Hands a record to librdkafka; it is returned (without its headers on success,
    /// which librdkafka took) so that the caller can keep or retry it.
    // The record comes back whole on an error, as rdkafka's own `send` does.
    #[allow(clippy::result_large_err)]
    fn send(
        &self,
        pid: Pid,
        offset: i64,
        record: OutRecord,
    ) -> Result<OutRecord, (KafkaError, OutRecord)> {
        self.send_to(pid, offset, record, None)
    }

    /// Like `send`, to a given partition of the target topic.
    #[allow(clippy::result_large_err)]
    fn send_to(
        &self,
        pid: Pid,
        offset: i64,
        record: OutRecord,
        partition: Option<i32>,
    ) -> Result<OutRecord, (KafkaError, OutRecord)> {
        let OutRecord {
            target,
            key,
            value,
            headers,
        } = record;
        let tag = Box::new(Tag {
            pid,
            offset,
            target,
            batch: self.txn.batch(),
        });
        let mut base =
            BaseRecord::<[u8], [u8], Box<Tag>>::with_opaque_to(self.router.topic(target), tag)
                .headers(headers);
        if let Some(value) = &value {
            base = base.payload(value.as_slice());
        }
        if let Some(key) = &key {
            base = base.key(key.as_slice());
        }
        if let Some(partition) = partition {
            base = base.partition(partition);
        }
        match self.txn.producer().send(base) {
            Ok(()) => Ok(OutRecord {
                target,
                key,
                value,
                headers: OwnedHeaders::new(),
            }),
            Err((e, base)) => {
                let headers = base.headers.unwrap_or_default();
                Err((
                    e,
                    OutRecord {
                        target,
                        key,
                        value,
                        headers,
                    },
                ))
            }
        }
    }

    fn on_delivery(&mut self, report: Delivery) {
        let tag = report.tag;
        // A report of an aborted transaction, or of a replaced producer: it is read again.
        let current = tag.batch == self.txn.batch();
        let error = match report.result {
            Ok(()) if current => {
                self.counters.produced(tag.target).inc();
                self.txn.delivered();
                if let Some(log) = self.logs.get_mut(&tag.pid) {
                    log.ack(tag.offset);
                }
                return;
            }
            Ok(()) => return,
            Err(e) => e,
        };
        let (topic, partition) = self.names.name(tag.pid);
        let permanent = refused_for_good(&error);
        warn!(
            topic,
            partition,
            offset = tag.offset,
            error = %error,
            permanent,
            "the broker did not take a record's outcome"
        );
        let refusals = if permanent {
            let entry = self
                .refused
                .entry((tag.pid, tag.offset))
                .or_insert((0, String::new()));
            entry.0 = entry.0.saturating_add(1).min(MAX_REFUSALS);
            entry.1 = error.to_string();
            entry.0
        } else {
            0
        };
        if !current {
            return;
        }
        if self.txn.is_transactional() {
            // The transaction cannot commit now; it is aborted and its records read again,
            // the refused one turned into a dead letter.
            self.txn
                .doom(format!("a record was not delivered: {error}"));
            return;
        }
        let Some(log) = self.logs.get_mut(&tag.pid) else {
            return;
        };
        if let Some(mut kept) = log.take_kept(tag.offset) {
            if permanent && let Some(source) = kept.source.take() {
                kept = self.router.refused(source, &error.to_string(), refusals);
            }
            log.unsend(tag.offset, kept);
        }
        if self.txn.producer().client().fatal_error().is_some() {
            self.repair("the producer hit a fatal error");
        }
    }

    // ---- commits -------------------------------------------------------------------

    fn commit(&mut self) {
        if self.txn.is_transactional() {
            self.commit_transaction();
        } else {
            self.commit_offsets();
        }
    }

    fn commit_transaction(&mut self) {
        if self.txn.is_busy() {
            return;
        }
        if let Some(why) = self.txn.doomed() {
            let why = why.to_string();
            let in_doubt = self.txn.in_doubt();
            if in_doubt > 0 {
                // librdkafka's abort purges the records it still holds and gives their
                // sequence numbers to the next records. One that the broker wrote without
                // answering (a leader that failed mid-request) would then make the broker
                // take those next records for repeats of it and drop them with the aborted
                // transaction. A new producer fences this one and starts a new epoch.
                warn!(reason = %why, in_doubt, "ending the transaction with a new producer: records in doubt");
                self.rebuild(&why);
                return;
            }
            warn!(reason = %why, "aborting the transaction");
            self.progress.failed(&why);
            self.txn.start_abort();
            return;
        }
        if !self.txn.should_commit() {
            return;
        }
        let Some(metadata) = self.consumer.group_metadata() else {
            return;
        };
        if let Err(e) = self.txn.start_commit(&self.names, metadata) {
            self.txn.doom(format!("cannot list the offsets: {e}"));
        }
    }

    fn commit_offsets(&mut self) {
        if self.offsets_call.is_some() {
            return;
        }
        let mut list = TopicPartitionList::new();
        for (pid, log) in &mut self.logs {
            if let Some(next) = log.acked_end() {
                let (topic, partition) = self.names.name(*pid);
                if list
                    .add_partition_offset(topic, partition, Offset::Offset(next))
                    .is_ok()
                {
                    // Acknowledged records are durable: they leave the log now, and a
                    // failed commit is covered by the next one.
                    log.committed(next);
                    if let Some(seen) = &self.seen
                        && let Ok(mut seen) = seen.lock()
                    {
                        seen.durable(*pid, next);
                    }
                    let pid = *pid;
                    self.refused.retain(|(p, o), _| *p != pid || *o >= next);
                }
            }
        }
        if list.count() == 0 {
            return;
        }
        // A synchronous commit on a blocking thread: its result comes back as an event.
        let consumer = self.consumer.clone();
        let call = tokio::task::spawn_blocking(move || consumer.commit(&list, CommitMode::Sync));
        self.offsets_call = Some(Box::pin(async move {
            match tokio::time::timeout(txn::CALL_TIMEOUT * 2, call).await {
                Ok(Ok(result)) => result.map_err(|e| e.to_string()),
                Ok(Err(_)) => Err("the commit call panicked".into()),
                Err(_) => Err("the commit call did not return".into()),
            }
        }));
    }

    fn on_offsets_committed(&mut self, result: Result<(), String>) {
        match result {
            Ok(()) => {
                self.counters.commits.inc();
                self.progress.committed(Instant::now());
            }
            Err(e) => {
                // The next commit covers these offsets too.
                warn!(error = %e, "offset commit failed");
                self.counters.aborts.inc();
                self.progress.failed(&format!("offset commit failed: {e}"));
            }
        }
    }

    fn on_call_done(&mut self, done: CallDone) {
        match done {
            CallDone::Committed { offsets } => {
                for (pid, next) in offsets {
                    if let Some(log) = self.logs.get_mut(&pid) {
                        log.committed(next);
                    }
                    if let Some(seen) = &self.seen
                        && let Ok(mut seen) = seen.lock()
                    {
                        seen.durable(pid, next);
                    }
                    self.refused.retain(|(p, o), _| *p != pid || *o >= next);
                }
                self.txn.idle();
                self.counters.commits.inc();
                self.progress.committed(Instant::now());
                debug!("transaction committed");
            }
            CallDone::CommitFailed {
                error,
                fatal: false,
            } => {
                warn!(error = %error, "commit failed; aborting the transaction");
                self.progress.failed(&format!("commit failed: {error}"));
                self.txn.start_abort();
            }
            CallDone::CommitFailed { error, fatal: true } => {
                self.repair(&format!("commit failed for good: {error}"));
            }
            CallDone::Aborted => {
                self.counters.aborts.inc();
                self.txn.idle();
                self.rewind(None);
            }
            CallDone::AbortFailed(error) => {
                self.repair(&format!("abort failed: {error}"));
            }
            CallDone::Hung(what) => {
                self.repair(&format!("the {what} call did not return"));
            }
            CallDone::Rebuilt(producer, committed) => {
                self.txn.replace(*producer);
                self.metrics.producer_rebuilds.inc();
                info!("a new producer took over");
                self.rewind(Some(&committed));
            }
            CallDone::RebuildFailed(error) => {
                warn!(error = %error, "cannot build a new producer yet");
                self.progress
                    .failed(&format!("cannot build a producer: {error}"));
                self.txn.broken();
            }
        }
        self.metrics
            .batch_failures
            .set(i64::from(self.progress.consecutive_failures()));
    }

    /// Replaces the producer: its transaction is in an unknown state, so the new one reads
    /// the committed offsets once it has fenced the old.
    fn repair(&mut self, why: &str) {
        error!(reason = why, "replacing the producer");
        self.rebuild(why);
    }

    fn rebuild(&mut self, why: &str) {
        self.progress.failed(why);
        self.counters.aborts.inc();
        let consumer = self.consumer.clone();
        self.txn
            .start_rebuild(move || consumer.committed(txn::CALL_TIMEOUT));
    }

    /// Forgets everything not committed and reads it again: from the offsets the broker
    /// reported (`committed`, after a new producer) or else from those this loop committed.
    fn rewind(&mut self, committed: Option<&TopicPartitionList>) {
        self.generation += 1;
        let generation = self.generation;
        let mut targets = Vec::with_capacity(self.logs.len());
        for (pid, log) in &mut self.logs {
            let (topic, partition) = self.names.name(*pid);
            let base = committed
                .and_then(|list| list.find_partition(topic, partition))
                .and_then(|e| match e.offset() {
                    Offset::Offset(o) => Some(o),
                    _ => None,
                })
                .unwrap_or_else(|| log.base());
            log.rewind_to(base, generation);
            if let Some(seen) = &self.seen
                && let Ok(mut seen) = seen.lock()
            {
                seen.rewound(*pid);
            }
            targets.push((*pid, base));
        }
        self.keys.clear();
        self.handling = Handling::new();
        self.metrics.inflight.set(0);
        self.held.release_all();
        // Held partitions are paused; every partition is resumed after the seek.
        self.seek_and_resume(&targets, true);
        debug!(
            partitions = targets.len(),
            "rewound to the committed offsets"
        );
    }

    /// Acts on a rebalance seen by the consumer context.
    fn follow_rebalance(&mut self) {
        let epoch = self.consumer.context().epoch();
        if epoch == self.epoch {
            return;
        }
        self.epoch = epoch;
        for (topic, partition) in self.consumer.context().take_revoked() {
            if let Some(pid) = self.names.get(&topic, partition) {
                self.logs.remove(&pid);
                self.held.release(pid);
                self.refused.retain(|(p, _), _| *p != pid);
            }
        }
        // The open transaction holds outputs of the revoked partitions: abort it (the
        // partitions kept are rewound). A commit under way ends either way by itself.
        if self.txn.is_transactional() && matches!(self.txn.state(), State::Open { .. }) {
            self.txn.doom("partitions revoked".into());
        }
    }

    // ---- health --------------------------------------------------------------------

    fn on_tick(&mut self, watchdog: &mut Watchdog, health: &Health) {
        if let Some(seen) = &self.seen
            && let Ok(seen) = seen.lock()
        {
            self.metrics.dedup_keys.set(seen.len() as i64);
        }
        if let State::Broken { retry_at } = self.txn.state()
            && Instant::now() >= *retry_at
        {
            let consumer = self.consumer.clone();
            self.txn
                .start_rebuild(move || consumer.committed(txn::CALL_TIMEOUT));
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
        self.consumer.unsubscribe();
        self.txn.flush().await;
    }
}

/// Produce errors that belong to the record (too large, malformed), which no retry mends.
fn refused_for_good(error: &KafkaError) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        error.rdkafka_error_code(),
        Some(
            C::MessageSizeTooLarge
                | C::InvalidMessageSize
                | C::InvalidMessage
                | C::InvalidRecord
                | C::MessageBatchTooLarge
                | C::InvalidTimestamp
        )
    )
}

async fn offsets_done(call: &mut Option<OffsetsCall>) -> Result<(), String> {
    match call {
        Some(call) => call.await,
        None => std::future::pending().await,
    }
}

async fn sleep_until_ms(due_ms: Option<u64>) {
    match due_ms {
        Some(due) => tokio::time::sleep(Duration::from_millis(due.saturating_sub(now_ms()))).await,
        None => std::future::pending().await,
    }
}
