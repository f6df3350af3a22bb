//! The generic stage: consume → handle → produce, in batches, exactly once by default.
//!
//! One loop owns the consumer. It gathers a batch of records (up to `commit_max_records`
//! or `commit_interval` after the first one), hands each record to a worker for its key so
//! that records of one key are handled in order and different keys concurrently (at most
//! `max_in_flight` at once), then waits for the batch's outcomes — next event, retry record
//! or dead letter — to be acknowledged, and commits the consumed offsets:
//!
//! * exactly-once: outputs and offsets commit in one Kafka transaction
//!   (`send_offsets_to_transaction` + `commit_transaction`); consumers downstream read
//!   `read_committed`, so an aborted batch is invisible to them;
//! * at-least-once: the offsets are committed after the outputs were acknowledged.
//!
//! Whatever goes wrong in a batch (a failed send, a rebalance, an abortable transaction
//! error), the batch is abandoned and the consumer rewinds to the committed offsets; a fatal
//! error (this instance was fenced by a newer one) ends the process with a failure so that
//! systemd restarts it. Nothing is committed before its outcome is durable.
//!
//! Records of the retry topic are not handled before the time in their `x-retry-at` header:
//! the loop pauses that partition until then, and the main topic keeps flowing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tracing::{debug, error, info, warn};

use crate::config::{Guarantee, SimulateConfig, StageConfig};
use crate::daemon::{Shutdown, Watchdog};
use crate::event::now_ms;
use crate::kafka::{self, H_TRACEPARENT};
use crate::metrics::{Health, Metrics};
use crate::retry::{self, Destination, HandlerError, OriginCoordinates};

/// Timeout of every blocking transaction and commit call; well inside the units'
/// `WatchdogSec`, so a broker that hangs ends in an abort or a restart, not a watchdog kill.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

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
    #[error("this instance was fenced or hit a fatal transaction error: {0}")]
    Fatal(KafkaError),
    #[error("cannot rewind to the committed offsets: {0}")]
    Rewind(KafkaError),
    #[error("a blocking Kafka call panicked")]
    Join,
    #[error("a transaction call did not return within its timeout")]
    Hung,
}

/// The consumer's context: turns librdkafka statistics into lag gauges, and abandons the
/// open batch before partitions are taken away so that no other instance ever sees both
/// our uncommitted outputs and the same input.
struct StageContext {
    producer: FutureProducer,
    transactional: bool,
    transaction_open: AtomicBool,
    /// Bumped whenever the batch in progress must be abandoned.
    epoch: AtomicU64,
    metrics: Arc<Metrics>,
}

impl StageContext {
    fn abandon_batch(&self, why: &str) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        if self.transactional && self.transaction_open.swap(false, Ordering::AcqRel) {
            match self.producer.abort_transaction(CALL_TIMEOUT) {
                Ok(()) => {
                    self.metrics
                        .transactions
                        .with_label_values(&["abort"])
                        .inc();
                    info!(
                        reason = why,
                        "transaction aborted before the partitions move"
                    );
                }
                Err(e) => warn!(reason = why, error = %e, "abort before rebalance failed"),
            }
        }
    }
}

impl ClientContext for StageContext {
    fn stats(&self, statistics: Statistics) {
        for (topic, stats) in &statistics.topics {
            for (partition, p) in &stats.partitions {
                if let Some(lag) = partition_lag(*partition, p) {
                    self.metrics
                        .consumer_lag
                        .with_label_values(&[topic.as_str(), &partition.to_string()])
                        .set(lag);
                }
            }
        }
    }
}

/// Records between this consumer's position and the end of what it may read (the last
/// stable offset, as it reads `read_committed`). librdkafka's own `consumer_lag` counts from
/// the committed offset, which the consumer does not learn when offsets are committed
/// through the producer's transaction; the position is known in both modes, and in both it
/// is at most one batch ahead of the committed offset.
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
        if let Rebalance::Revoke(partitions) = rebalance {
            let why = if consumer.assignment_lost() {
                "assignment lost"
            } else {
                "partitions revoked"
            };
            self.abandon_batch(why);
            for p in partitions.elements() {
                let _ = self
                    .metrics
                    .consumer_lag
                    .remove_label_values(&[p.topic(), &p.partition().to_string()]);
            }
        }
    }
}

type TopicPartition = (String, i32);

/// Records with the same key are handled in order; records without a key keep their
/// partition's order.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum OrderingKey {
    Key(Vec<u8>),
    Partition(String, i32),
}

struct Job {
    record: Inbound,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

/// Everything the workers share.
struct Shared {
    config: StageConfig,
    handler: Arc<dyn Handler>,
    producer: FutureProducer,
    metrics: Arc<Metrics>,
    simulate: Arc<RwLock<SimulateConfig>>,
}

/// One batch in the making.
struct Batch {
    started: Option<tokio::time::Instant>,
    records: usize,
    /// Offset to commit per partition (the next one to read).
    next_offsets: HashMap<TopicPartition, i64>,
    workers: HashMap<OrderingKey, mpsc::UnboundedSender<Job>>,
    results: JoinSet<Result<(), KafkaError>>,
    epoch: u64,
}

impl Batch {
    fn new(epoch: u64) -> Self {
        Batch {
            started: None,
            records: 0,
            next_offsets: HashMap::new(),
            workers: HashMap::new(),
            results: JoinSet::new(),
            epoch,
        }
    }
}

/// The retry partitions paused until their head record is due: partition → (offset, due ms).
type Held = HashMap<TopicPartition, (i64, u64)>;

pub struct Stage {
    shared: Arc<Shared>,
    consumer: StreamConsumer<StageContext>,
    in_flight: Arc<Semaphore>,
    held: Held,
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
        for outcome in ["commit", "abort"] {
            metrics.transactions.with_label_values(&[outcome]);
        }
        metrics.retries.with_label_values(&[&config.retry_topic]);
        metrics.dead_letters.with_label_values(&[&config.dlq_topic]);
        for topic in [&config.input, &config.retry_topic] {
            metrics.consumed.with_label_values(&[topic]);
        }
        for topic in config
            .output
            .iter()
            .chain([&config.retry_topic, &config.dlq_topic])
        {
            metrics.produced.with_label_values(&[topic]);
        }
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
        let producer: FutureProducer = kafka::stage_producer_config(
            common,
            transactional.then_some(transactional_id.as_str()),
        )
        .create()?;
        if transactional {
            let p = producer.clone();
            blocking(move || p.init_transactions(CALL_TIMEOUT))
                .await?
                .map_err(|e| match classify_fatal(e) {
                    Ok(e) => StageError::Kafka(e),
                    Err(fatal) => fatal,
                })?;
            info!(transactional_id, "transactions initialised");
        }

        let context = StageContext {
            producer: producer.clone(),
            transactional,
            transaction_open: AtomicBool::new(false),
            epoch: AtomicU64::new(0),
            metrics: metrics.clone(),
        };
        let consumer: StreamConsumer<StageContext> =
            kafka::stage_consumer_config(common, &config.group_id).create_with_context(context)?;
        consumer.subscribe(&[&config.input, &config.retry_topic])?;

        let probe = producer.clone();
        let names: Vec<String> = topics.iter().map(|t| t.to_string()).collect();
        blocking(move || {
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            kafka::require_topics(probe.client(), &names)
        })
        .await??;

        let in_flight = Arc::new(Semaphore::new(config.max_in_flight));
        Ok(Stage {
            shared: Arc::new(Shared {
                config,
                handler,
                producer,
                metrics,
                simulate,
            }),
            consumer,
            in_flight,
            held: Held::new(),
        })
    }

    fn epoch(&self) -> u64 {
        self.consumer.context().epoch.load(Ordering::Acquire)
    }

    /// Runs until shutdown; the batch in progress is finished and committed first.
    pub async fn run(
        mut self,
        mut shutdown: Shutdown,
        health: Arc<Health>,
    ) -> Result<(), StageError> {
        let config = self.shared.config.clone();
        let mut watchdog = Watchdog::from_env();
        let mut tick = tokio::time::interval(watchdog.tick());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stopping = false;
        while !stopping {
            if self.stalled() {
                warn!("simulate.stall is set: the processing loop stops here");
                shutdown.wait().await;
                break;
            }
            let mut batch = Batch::new(self.epoch());
            loop {
                let deadline = batch.started.map(|t| t + config.commit_interval);
                let next_due = self.held.values().map(|(_, due)| *due).min();
                tokio::select! {
                    biased;
                    _ = shutdown.wait() => { stopping = true; break; }
                    _ = sleep_until_opt(deadline), if deadline.is_some() => break,
                    _ = tick.tick() => watchdog.ping(),
                    _ = sleep_until_ms(next_due), if next_due.is_some() => self.resume_due(),
                    received = self.consumer.recv() => {
                        if self.epoch() != batch.epoch {
                            break;
                        }
                        match received {
                            Ok(message) => {
                                let record = Inbound::from_message(&message);
                                drop(message);
                                self.accept(&mut batch, record).await;
                                if batch.records >= config.commit_max_records {
                                    break;
                                }
                            }
                            Err(e) => warn!(error = %e, "consumer error"),
                        }
                    }
                }
            }
            watchdog.ping();
            // Outcomes may take a while (a slow broker, a long simulated delay): the loop is
            // waiting, not stuck, so it keeps telling the watchdog.
            let finish = self.finish(batch);
            tokio::pin!(finish);
            loop {
                tokio::select! {
                    result = &mut finish => { result?; break; }
                    _ = tick.tick() => watchdog.ping(),
                }
            }
            health.set_ready(true);
        }
        info!("draining done; leaving the group");
        self.consumer.unsubscribe();
        let producer = self.shared.producer.clone();
        blocking(move || producer.flush(CALL_TIMEOUT)).await?.ok();
        Ok(())
    }

    fn stalled(&self) -> bool {
        self.shared
            .simulate
            .read()
            .map(|s| s.stall)
            .unwrap_or(false)
    }

    /// Takes one consumed record into the batch, or holds its partition if it is not due.
    async fn accept(&mut self, batch: &mut Batch, record: Inbound) {
        let tp = (record.topic.clone(), record.partition);
        if let Some((held_offset, _)) = self.held.get(&tp)
            && record.offset >= *held_offset
        {
            // Fetched before the pause took effect; it is read again after the resume.
            return;
        }
        self.shared
            .metrics
            .consumed
            .with_label_values(&[&record.topic])
            .inc();
        if record.topic == self.shared.config.retry_topic
            && let Ok(state) = retry::read_routing(record.headers.as_ref())
            && let Some(due) = state.retry_at
            && due > now_ms()
        {
            debug!(topic = %record.topic, partition = record.partition, offset = record.offset, due, "retry not due yet; pausing its partition");
            let mut list = TopicPartitionList::new();
            list.add_partition(&record.topic, record.partition);
            if let Err(e) = self.consumer.pause(&list) {
                warn!(error = %e, "cannot pause the retry partition");
            }
            batch.next_offsets.insert(tp.clone(), record.offset);
            self.held.insert(tp, (record.offset, due));
            return;
        }

        if batch.started.is_none() {
            batch.started = Some(tokio::time::Instant::now());
        }
        if batch.records == 0 && self.shared.config.guarantee == Guarantee::ExactlyOnce {
            let context = self.consumer.context();
            if let Err(e) = self.shared.producer.begin_transaction() {
                error!(error = %e, "cannot begin a transaction; the batch will be rewound");
                context.epoch.fetch_add(1, Ordering::AcqRel);
                return;
            }
            context.transaction_open.store(true, Ordering::Release);
        }
        batch.records += 1;
        batch.next_offsets.insert(tp, record.offset + 1);

        let permit = match self.in_flight.clone().acquire_owned().await {
            Ok(permit) => permit,
            Err(_) => return, // the semaphore is never closed
        };
        let key = match &record.key {
            Some(key) => OrderingKey::Key(key.clone()),
            None => OrderingKey::Partition(record.topic.clone(), record.partition),
        };
        let job = Job {
            record,
            _permit: permit,
        };
        let job = match batch.workers.get(&key) {
            Some(sender) => match sender.send(job) {
                Ok(()) => return,
                Err(mpsc::error::SendError(job)) => job,
            },
            None => job,
        };
        let (sender, receiver) = mpsc::unbounded_channel();
        let _ = sender.send(job);
        batch.workers.insert(key, sender);
        batch.results.spawn(work(receiver, self.shared.clone()));
    }

    /// Resumes the held partitions whose head record is due, reading again from it.
    fn resume_due(&mut self) {
        let now = now_ms();
        let due: Vec<_> = self
            .held
            .iter()
            .filter(|(_, (_, at))| *at <= now)
            .map(|(tp, (offset, _))| (tp.clone(), *offset))
            .collect();
        for ((topic, partition), offset) in due {
            self.held.remove(&(topic.clone(), partition));
            if let Err(e) = self.consumer.seek(
                &topic,
                partition,
                Offset::Offset(offset),
                Duration::from_secs(5),
            ) {
                warn!(topic, partition, error = %e, "cannot seek a held partition; rewinding");
                self.consumer.context().epoch.fetch_add(1, Ordering::AcqRel);
            }
            let mut list = TopicPartitionList::new();
            list.add_partition(&topic, partition);
            if let Err(e) = self.consumer.resume(&list) {
                warn!(topic, partition, error = %e, "cannot resume a held partition");
            }
        }
    }

    /// Waits for the batch's outcomes and commits it, or abandons it and rewinds.
    async fn finish(&mut self, mut batch: Batch) -> Result<(), StageError> {
        batch.workers.clear();
        let mut failed = None;
        while let Some(result) = batch.results.join_next().await {
            match result {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failed = Some(e.to_string()),
                Err(e) => failed = Some(format!("worker panicked: {e}")),
            }
        }
        if self.epoch() != batch.epoch && failed.is_none() {
            failed = Some("the batch was abandoned (rebalance or rewind)".into());
        }
        if batch.records == 0 && failed.is_none() {
            return Ok(());
        }
        let offsets = offsets_list(&batch.next_offsets)?;
        let context = self.consumer.context();
        match (self.shared.config.guarantee, failed) {
            (Guarantee::ExactlyOnce, None) => {
                let metadata = self
                    .consumer
                    .group_metadata()
                    .ok_or(KafkaError::ConsumerCommit(RDKafkaErrorCode::State))?;
                let producer = self.shared.producer.clone();
                let call = blocking(move || {
                    producer.send_offsets_to_transaction(&offsets, &metadata, CALL_TIMEOUT)?;
                    retry_retriable(|| producer.commit_transaction(CALL_TIMEOUT))
                });
                // librdkafka may ignore the timeout (confluentinc/librdkafka#5456, #5511).
                let outcome = match tokio::time::timeout(CALL_TIMEOUT * 5, call).await {
                    Ok(result) => result?,
                    Err(_) => {
                        error!(
                            "a transaction call did not return; giving up so that a restart recovers"
                        );
                        return Err(StageError::Hung);
                    }
                };
                match outcome {
                    Ok(()) => {
                        context.transaction_open.store(false, Ordering::Release);
                        self.shared
                            .metrics
                            .transactions
                            .with_label_values(&["commit"])
                            .inc();
                        debug!(records = batch.records, "transaction committed");
                        Ok(())
                    }
                    Err(e) => {
                        let e = classify_fatal(e)?;
                        warn!(error = %e, "commit failed; aborting the batch");
                        self.abort_and_rewind().await
                    }
                }
            }
            (Guarantee::ExactlyOnce, Some(reason)) => {
                warn!(reason, "abandoning the batch");
                self.abort_and_rewind().await
            }
            (Guarantee::AtLeastOnce, None) => {
                let consumer_commit = tokio::task::block_in_place(|| {
                    self.consumer.commit(&offsets, CommitMode::Sync)
                });
                match consumer_commit {
                    Ok(()) => {
                        self.shared
                            .metrics
                            .transactions
                            .with_label_values(&["commit"])
                            .inc();
                        Ok(())
                    }
                    Err(e) => {
                        warn!(error = %e, "offset commit failed; rewinding");
                        self.shared
                            .metrics
                            .transactions
                            .with_label_values(&["abort"])
                            .inc();
                        self.rewind()
                    }
                }
            }
            (Guarantee::AtLeastOnce, Some(reason)) => {
                warn!(
                    reason,
                    "abandoning the batch; its records will be handled again"
                );
                self.shared
                    .metrics
                    .transactions
                    .with_label_values(&["abort"])
                    .inc();
                self.rewind()
            }
        }
    }

    async fn abort_and_rewind(&mut self) -> Result<(), StageError> {
        let context = self.consumer.context();
        if context.transaction_open.swap(false, Ordering::AcqRel) {
            let producer = self.shared.producer.clone();
            // With the transaction in an unknown state nothing can go on safely; a restart
            // recovers it (init_transactions fences and aborts whatever is left).
            blocking(move || producer.abort_transaction(CALL_TIMEOUT))
                .await?
                .map_err(StageError::Fatal)?;
            self.shared
                .metrics
                .transactions
                .with_label_values(&["abort"])
                .inc();
        }
        self.rewind()
    }

    /// Seeks every assigned partition back to its committed offset, so the abandoned
    /// records are read again. Held partitions are resumed: their records are judged anew.
    fn rewind(&mut self) -> Result<(), StageError> {
        let context = self.consumer.context();
        context.epoch.fetch_add(1, Ordering::AcqRel);
        let held: Vec<_> = self.held.drain().map(|(tp, _)| tp).collect();
        tokio::task::block_in_place(|| {
            let assignment = self.consumer.assignment()?;
            if assignment.count() == 0 {
                return Ok(());
            }
            let mut tries = 0;
            let committed = loop {
                match self
                    .consumer
                    .committed_offsets(assignment.clone(), CALL_TIMEOUT)
                {
                    Ok(committed) => break committed,
                    // The group coordinator may be moving to another broker.
                    Err(e) if tries < 5 => {
                        tries += 1;
                        warn!(error = %e, "cannot read the committed offsets yet; retrying");
                        std::thread::sleep(Duration::from_secs(1));
                    }
                    Err(e) => return Err(e),
                }
            };
            let mut seek = TopicPartitionList::new();
            for element in committed.elements() {
                let offset = match element.offset() {
                    Offset::Offset(o) => Offset::Offset(o),
                    _ => Offset::Beginning,
                };
                seek.add_partition_offset(element.topic(), element.partition(), offset)?;
            }
            self.consumer.seek_partitions(seek, CALL_TIMEOUT)?;
            let mut resume = TopicPartitionList::new();
            for (topic, partition) in &held {
                resume.add_partition(topic, *partition);
            }
            if resume.count() > 0 {
                self.consumer.resume(&resume)?;
            }
            Ok(())
        })
        .map_err(StageError::Rewind)
    }
}

fn offsets_list(next: &HashMap<TopicPartition, i64>) -> Result<TopicPartitionList, KafkaError> {
    let mut list = TopicPartitionList::new();
    for ((topic, partition), offset) in next {
        list.add_partition_offset(topic, *partition, Offset::Offset(*offset))?;
    }
    Ok(list)
}

/// A fatal transaction error (fenced, or a broken producer) ends the process; others are
/// returned for an abort and a rewind.
fn classify_fatal(e: KafkaError) -> Result<KafkaError, StageError> {
    match &e {
        KafkaError::Transaction(inner) if inner.is_fatal() => Err(StageError::Fatal(e)),
        _ => Ok(e),
    }
}

fn retry_retriable(call: impl Fn() -> Result<(), KafkaError>) -> Result<(), KafkaError> {
    let mut tries = 0;
    loop {
        match call() {
            Err(KafkaError::Transaction(e)) if e.is_retriable() && tries < 3 => tries += 1,
            other => return other,
        }
    }
}

/// Runs a blocking librdkafka call off the async workers.
async fn blocking<T: Send + 'static>(
    call: impl FnOnce() -> T + Send + 'static,
) -> Result<T, StageError> {
    tokio::task::spawn_blocking(call)
        .await
        .map_err(|_| StageError::Join)
}

async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

async fn sleep_until_ms(due_ms: Option<u64>) {
    match due_ms {
        Some(due) => tokio::time::sleep(Duration::from_millis(due.saturating_sub(now_ms()))).await,
        None => std::future::pending().await,
    }
}

/// Handles the records of one key, in order.
async fn work(
    mut jobs: mpsc::UnboundedReceiver<Job>,
    shared: Arc<Shared>,
) -> Result<(), KafkaError> {
    while let Some(job) = jobs.recv().await {
        shared.metrics.inflight.inc();
        let outcome = process(&job.record, &shared).await;
        shared.metrics.inflight.dec();
        outcome?;
    }
    Ok(())
}

async fn process(record: &Inbound, shared: &Shared) -> Result<(), KafkaError> {
    let config = &shared.config;
    let metrics = &shared.metrics;
    let started = Instant::now();
    let routing = retry::read_routing(record.headers.as_ref());
    let attempt = routing
        .as_ref()
        .map(|r| r.attempts.saturating_add(1))
        .unwrap_or(1);
    let outcome = match &routing {
        Err(e) => Err(e.clone()),
        Ok(_) => {
            let (delay, failure_rate) = shared
                .simulate
                .read()
                .map(|s| (s.delay, s.failure_rate))
                .unwrap_or_default();
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            if failure_rate > 0.0 && rand::random_bool(failure_rate) {
                Err(HandlerError::transient("simulated failure"))
            } else {
                shared.handler.handle(record)
            }
        }
    };
    metrics
        .handler_duration
        .observe(started.elapsed().as_secs_f64());
    let trace = record
        .headers
        .as_ref()
        .and_then(|h| kafka::header_str(h, H_TRACEPARENT))
        .and_then(Result::ok)
        .and_then(crate::trace::trace_id)
        .unwrap_or("")
        .to_string();

    match outcome {
        Ok(handled) => {
            let latency = now_ms().saturating_sub(handled.accepted_at_ms);
            metrics.end_to_end.observe(latency as f64 / 1000.0);
            if let (Some(topic), Some(value)) = (&config.output, &handled.output) {
                let headers = next_hop_headers(record.headers.as_ref());
                send(shared, topic, record.key.as_deref(), Some(value), headers).await?;
            }
            info!(
                order_id = %handled.order_id,
                topic = %record.topic,
                partition = record.partition,
                offset = record.offset,
                attempt,
                trace_id = %trace,
                "{} done", shared.handler.stage()
            );
            Ok(())
        }
        Err(error) => {
            metrics
                .handler_errors
                .with_label_values(&[shared.handler.stage()])
                .inc();
            let origin = routing
                .as_ref()
                .ok()
                .and_then(|r| r.origin.clone())
                .filter(|_| record.topic == config.retry_topic)
                .unwrap_or_else(|| OriginCoordinates {
                    topic: record.topic.clone(),
                    partition: record.partition,
                    offset: record.offset,
                });
            let now = now_ms();
            let (topic, retry_at) = match retry::next_hop(&config.retry, error.class, attempt, now)
            {
                Destination::Retry { due_ms } => (&config.retry_topic, Some(due_ms)),
                Destination::DeadLetter => (&config.dlq_topic, None),
            };
            let headers = retry::failure_headers(
                record.headers.as_ref(),
                attempt,
                &error.message,
                &origin,
                retry_at,
                &config.common.service_name,
            );
            send(
                shared,
                topic,
                record.key.as_deref(),
                record.payload.as_deref(),
                headers,
            )
            .await?;
            let counter = if retry_at.is_some() {
                &metrics.retries
            } else {
                &metrics.dead_letters
            };
            counter.with_label_values(&[topic]).inc();
            warn!(
                topic = %record.topic,
                partition = record.partition,
                offset = record.offset,
                attempt,
                trace_id = %trace,
                error = %error.message,
                to = %topic,
                "record failed"
            );
            Ok(())
        }
    }
}

/// The headers of the downstream event: the consumed ones without kop's routing headers,
/// with the trace carried on to a new span.
fn next_hop_headers(headers: Option<&OwnedHeaders>) -> OwnedHeaders {
    let mut skip = kafka::ROUTING_HEADERS.to_vec();
    skip.push(H_TRACEPARENT);
    let copied = kafka::copy_headers_except(headers, &skip);
    let parent = headers
        .and_then(|h| kafka::header_str(h, H_TRACEPARENT))
        .and_then(Result::ok);
    let traceparent = parent
        .and_then(crate::trace::next_hop)
        .unwrap_or_else(crate::trace::new_traceparent);
    kafka::with_header(copied, H_TRACEPARENT, &traceparent)
}

/// Sends one record and waits for the broker's acknowledgement. A full local queue is
/// waited out, not treated as an error.
async fn send(
    shared: &Shared,
    topic: &str,
    key: Option<&[u8]>,
    payload: Option<&[u8]>,
    headers: OwnedHeaders,
) -> Result<(), KafkaError> {
    // A null value stays null: a dead letter is the record as it came.
    let mut record = FutureRecord::<[u8], [u8]>::to(topic).headers(headers);
    if let Some(payload) = payload {
        record = record.payload(payload);
    }
    if let Some(key) = key {
        record = record.key(key);
    }
    let delivery = loop {
        match shared.producer.send_result(record) {
            Ok(delivery) => break delivery,
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                record = returned;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err((e, _)) => return Err(e),
        }
    };
    match delivery.await {
        Ok(Ok(_)) => {
            shared.metrics.produced.with_label_values(&[topic]).inc();
            Ok(())
        }
        Ok(Err((e, _))) => Err(e),
        Err(_) => Err(KafkaError::Canceled),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn downstream_headers_carry_the_trace_and_drop_routing() {
        let original = kafka::with_header(
            kafka::with_header(OwnedHeaders::new(), "x-attempt", "2"),
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        );
        let out = next_hop_headers(Some(&original));
        assert!(kafka::header_str(&out, "x-attempt").is_none());
        let tp = kafka::header_str(&out, "traceparent").unwrap().unwrap();
        assert_eq!(
            crate::trace::trace_id(tp),
            Some("0af7651916cd43dd8448eb211c80319c")
        );
        assert_ne!(
            tp,
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        );
    }
}
