//! The stage's producer and, in exactly-once mode, the Kafka transaction in progress.
//!
//! librdkafka's transaction calls block, and some may not return within their own timeout
//! (confluentinc/librdkafka#5456, #5511). Each runs on a blocking thread and the loop
//! awaits it next to everything else, bounded by a timer: the loop keeps turning whatever
//! the broker does. What cannot be repaired in place — a fenced producer, a fatal error, an
//! abort that fails, a call that hangs — is repaired by building a new producer with the
//! same transactional id, whose `init_transactions` fences the old one and ends whatever
//! transaction it left.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::error::KafkaError;
use rdkafka::producer::{Producer as _, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc;

use super::context::{Delivery, DeliveryContext};
use super::partitions::Pid;

pub type Producer = ThreadedProducer<DeliveryContext>;

/// Timeout of each blocking librdkafka call.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a call may take before it is given up as hung: a commit is two calls, the
/// second tried twice.
const HUNG_AFTER: Duration = Duration::from_secs(35);

/// What a finished blocking call came to.
pub enum CallDone {
    Committed {
        offsets: Vec<(Pid, i64)>,
    },
    /// The commit failed; the transaction must be aborted (or, `fatal`, the producer
    /// rebuilt).
    CommitFailed {
        error: KafkaError,
        fatal: bool,
    },
    Aborted,
    AbortFailed(KafkaError),
    /// A new producer, and the offsets committed for the assignment once it had fenced
    /// the old one (the old one's last transaction may or may not have committed).
    Rebuilt(Box<Producer>, TopicPartitionList),
    RebuildFailed(KafkaError),
    /// The call did not return in time; its thread is left to finish on its own.
    Hung(&'static str),
}

pub enum State {
    /// No transaction open (always, at least once).
    Idle,
    Open {
        records: usize,
        /// Records sent and not yet acknowledged. The commit waits for them: librdkafka's
        /// commit would flush them itself, but rdkafka's producer serves delivery reports
        /// in 100 ms polls, which every commit would then wait out.
        unacked: usize,
        offsets: HashMap<Pid, i64>,
        /// A record of this transaction failed: it can only be aborted.
        doomed: Option<String>,
    },
    /// A call is running: committing, aborting or building a producer.
    Busy,
    /// No usable producer; a new one is built at `retry_at`.
    Broken { retry_at: Instant },
}

type Call = Pin<Box<dyn Future<Output = CallDone> + Send + Sync>>;

pub struct Txn {
    producer: Arc<Producer>,
    /// Bumped with every transaction and every new producer; delivery reports carry it, so
    /// a late report of an aborted transaction is not taken for one of the next.
    batch: u64,
    config: ClientConfig,
    reports: mpsc::UnboundedSender<Delivery>,
    transactional: bool,
    state: State,
    call: Option<Call>,
    /// Consecutive failed attempts to build a producer, for the back-off.
    rebuild_failures: u32,
}

/// Creates a producer and, when transactional, initialises its transactions (blocking).
fn build(
    config: &ClientConfig,
    reports: mpsc::UnboundedSender<Delivery>,
    transactional: bool,
) -> Result<Producer, KafkaError> {
    let producer: Producer = config.create_with_context(DeliveryContext::new(reports))?;
    if transactional {
        producer.init_transactions(CALL_TIMEOUT)?;
    }
    Ok(producer)
}

impl Txn {
    /// Builds the first producer; blocking, call it off the async workers.
    pub fn connect(
        config: ClientConfig,
        reports: mpsc::UnboundedSender<Delivery>,
        transactional: bool,
    ) -> Result<Self, KafkaError> {
        let producer = build(&config, reports.clone(), transactional)?;
        Ok(Txn {
            producer: Arc::new(producer),
            batch: 0,
            config,
            reports,
            transactional,
            state: State::Idle,
            call: None,
            rebuild_failures: 0,
        })
    }

    pub fn producer(&self) -> &Producer {
        &self.producer
    }

    pub fn batch(&self) -> u64 {
        self.batch
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    pub fn is_transactional(&self) -> bool {
        self.transactional
    }

    /// True when outcomes may be handed to the producer now.
    pub fn accepts_records(&self) -> bool {
        match &self.state {
            State::Idle => true,
            State::Open { doomed, .. } => doomed.is_none(),
            State::Busy | State::Broken { .. } => false,
        }
    }

    /// Opens a transaction if none is open (exactly-once); local, it does not block.
    pub fn begin(&mut self) -> Result<(), KafkaError> {
        if self.transactional && matches!(self.state, State::Idle) {
            self.producer.begin_transaction()?;
            self.batch += 1;
            self.state = State::Open {
                records: 0,
                unacked: 0,
                offsets: HashMap::new(),
                doomed: None,
            };
        }
        Ok(())
    }

    /// Counts a record into the open transaction: its offset is committed with it, once
    /// what it `sent` is acknowledged.
    pub fn include(&mut self, pid: Pid, next_offset: i64, sent: bool) {
        if let State::Open {
            records,
            unacked,
            offsets,
            ..
        } = &mut self.state
        {
            *records += 1;
            *unacked += usize::from(sent);
            offsets.insert(pid, next_offset);
        }
    }

    /// One more record sent for a consumed record already counted in (its handled key, to
    /// the changelog): awaited before the commit, but not a record of the batch.
    pub fn include_extra(&mut self) {
        if let State::Open { unacked, .. } = &mut self.state {
            *unacked += 1;
        }
    }

    /// Consumed records in the open transaction (0 when none is open).
    pub fn records(&self) -> usize {
        match &self.state {
            State::Open { records, .. } => *records,
            _ => 0,
        }
    }

    /// A record of the open transaction was acknowledged.
    pub fn delivered(&mut self) {
        if let State::Open { unacked, .. } = &mut self.state {
            *unacked = unacked.saturating_sub(1);
        }
    }

    /// Marks the open transaction as failed: it is aborted, never committed.
    pub fn doom(&mut self, why: String) {
        if let State::Open { doomed, .. } = &mut self.state
            && doomed.is_none()
        {
            *doomed = Some(why);
        }
    }

    /// Starts committing the open transaction with its offsets.
    pub fn start_commit(
        &mut self,
        names: &super::partitions::Names,
        metadata: ConsumerGroupMetadata,
    ) -> Result<(), KafkaError> {
        let State::Open { offsets, .. } = &self.state else {
            return Ok(());
        };
        let offsets: Vec<(Pid, i64)> = offsets.iter().map(|(p, o)| (*p, *o)).collect();
        let mut list = TopicPartitionList::new();
        for (pid, offset) in &offsets {
            let (topic, partition) = names.name(*pid);
            list.add_partition_offset(topic, partition, Offset::Offset(*offset))?;
        }
        let producer = self.producer.clone();
        self.start("commit", move || {
            let result = producer
                .send_offsets_to_transaction(&list, &metadata, CALL_TIMEOUT)
                .and_then(|()| retry_retriable(|| producer.commit_transaction(CALL_TIMEOUT)));
            match result {
                Ok(()) => CallDone::Committed { offsets },
                Err(error) => CallDone::CommitFailed {
                    fatal: is_fatal(&error),
                    error,
                },
            }
        });
        Ok(())
    }

    /// Starts aborting the open transaction (if any; otherwise the state is simply idle).
    pub fn start_abort(&mut self) {
        if !self.transactional || matches!(self.state, State::Idle) {
            self.state = State::Idle;
            return;
        }
        let producer = self.producer.clone();
        self.start("abort", move || {
            match retry_retriable(|| producer.abort_transaction(CALL_TIMEOUT)) {
                Ok(()) => CallDone::Aborted,
                Err(e) => CallDone::AbortFailed(e),
            }
        });
    }

    /// Starts building a new producer in place of the current one; `read_committed` then
    /// reads the consumer's committed offsets.
    pub fn start_rebuild(
        &mut self,
        read_committed: impl FnOnce() -> Result<TopicPartitionList, KafkaError> + Send + 'static,
    ) {
        let config = self.config.clone();
        let reports = self.reports.clone();
        let transactional = self.transactional;
        self.start("rebuild", move || {
            match build(&config, reports, transactional).and_then(|p| Ok((p, read_committed()?))) {
                Ok((producer, committed)) => CallDone::Rebuilt(Box::new(producer), committed),
                Err(e) => CallDone::RebuildFailed(e),
            }
        });
    }

    fn start(&mut self, what: &'static str, call: impl FnOnce() -> CallDone + Send + 'static) {
        self.state = State::Busy;
        let task = tokio::task::spawn_blocking(call);
        self.call = Some(Box::pin(async move {
            match tokio::time::timeout(HUNG_AFTER, task).await {
                Ok(Ok(done)) => done,
                Ok(Err(_)) | Err(_) => CallDone::Hung(what),
            }
        }));
    }

    /// Resolves when the running call finishes; never, when none runs.
    pub async fn call_done(&mut self) -> CallDone {
        match &mut self.call {
            Some(call) => {
                let done = call.await;
                self.call = None;
                done
            }
            None => std::future::pending().await,
        }
    }

    pub fn is_busy(&self) -> bool {
        self.call.is_some()
    }

    /// The call finished well: no transaction is open.
    pub fn idle(&mut self) {
        self.state = State::Idle;
    }

    /// Takes a new producer into use; the old one is dropped off the async workers (its
    /// drop waits for its queue).
    pub fn replace(&mut self, producer: Producer) {
        let old = std::mem::replace(&mut self.producer, Arc::new(producer));
        tokio::task::spawn_blocking(move || drop(old));
        self.batch += 1;
        self.rebuild_failures = 0;
        self.state = State::Idle;
    }

    /// Building a producer failed; try again after a back-off (0.5 s doubling to 10 s).
    pub fn broken(&mut self) {
        self.rebuild_failures = self.rebuild_failures.saturating_add(1);
        let delay = Duration::from_millis(500)
            .saturating_mul(1 << self.rebuild_failures.min(5))
            .min(Duration::from_secs(10));
        self.state = State::Broken {
            retry_at: Instant::now() + delay,
        };
    }

    /// Whether the open transaction can commit now: the loop asks only when no call runs,
    /// so the previous commit is done; outcomes that finished during it are in this one,
    /// which thus grows with the load (group commit). It must hold something, and every
    /// record it sent must be acknowledged.
    pub fn should_commit(&self) -> bool {
        matches!(
            &self.state,
            State::Open {
                unacked: 0,
                offsets,
                doomed: None,
                ..
            } if !offsets.is_empty()
        )
    }

    /// Records of the open transaction sent and not yet acknowledged: the broker may or may
    /// not have written them.
    pub fn in_doubt(&self) -> usize {
        match &self.state {
            State::Open { unacked, .. } => *unacked,
            _ => 0,
        }
    }

    /// The failure that dooms the open transaction, if any.
    pub fn doomed(&self) -> Option<&str> {
        match &self.state {
            State::Open {
                doomed: Some(why), ..
            } => Some(why),
            _ => None,
        }
    }

    /// Flushes what the producer still holds (at shutdown).
    pub async fn flush(&self) {
        let producer = self.producer.clone();
        let _ = tokio::task::spawn_blocking(move || producer.flush(CALL_TIMEOUT)).await;
    }
}

/// A fenced producer or a fatal error: this producer can do nothing more.
pub fn is_fatal(error: &KafkaError) -> bool {
    match error {
        KafkaError::Transaction(e) => e.is_fatal(),
        _ => false,
    }
}

/// A transaction call that fails with a retriable error (a coordinator loading, a timeout
/// of the request) is made once more before the error is returned.
fn retry_retriable(call: impl Fn() -> Result<(), KafkaError>) -> Result<(), KafkaError> {
    let mut tries = 0;
    loop {
        match call() {
            Err(KafkaError::Transaction(e)) if e.is_retriable() && tries < 1 => tries += 1,
            other => return other,
        }
    }
}
