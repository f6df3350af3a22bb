//! Taking records in: from the consumer into their partition's log, through the handler
//! (one key at a time), and back out of it when a rebalance takes their partition.

use rdkafka::consumer::Consumer;
use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::{Offset, TopicPartitionList};
use tracing::{debug, warn};

use super::held;
use super::keys::KeyHash;
use super::partitions::{PartitionLog, Pid};
use super::route::Outcome;
use super::txn::State;
use super::{Inbound, Stage, Work};
use crate::event::now_ms;
use crate::retry;

impl Stage {
    pub(super) fn on_received(&mut self, received: Result<Inbound, KafkaError>) {
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

    pub(super) fn pause(&self, pid: Pid) {
        let (topic, partition) = self.names.name(pid);
        let mut list = TopicPartitionList::new();
        list.add_partition(topic, partition);
        if let Err(e) = self.consumer.pause(&list) {
            warn!(topic, partition, error = %e, "cannot pause the retry partition");
        }
    }

    /// Resumes the held partitions whose head record is due, reading again from it.
    pub(super) fn resume_due(&mut self) {
        for (pid, offset) in self.held.take_due(now_ms()) {
            self.seek_and_resume(&[(pid, offset)], true);
        }
    }

    /// Seeks partitions (asynchronously: librdkafka drops what it fetched before) and
    /// resumes them when they were paused.
    pub(super) fn seek_and_resume(&self, targets: &[(Pid, i64)], resume: bool) {
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

    /// Handles a record whose key is free, and then the records of that key that waited
    /// behind it; with a simulated delay they finish later, as events of the loop.
    pub(super) fn start(&mut self, mut work: Work) {
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

    pub(super) fn on_handled(&mut self, work: Work) {
        self.metrics.inflight.set(self.handling.len() as i64);
        let key = work.key;
        self.complete(work);
        if let Some(next) = self.keys.done(key) {
            self.start(next);
        }
    }

    pub(super) fn complete(&mut self, work: Work) {
        let Some(log) = self.logs.get_mut(&work.pid) else {
            return; // its partition was revoked
        };
        if log.generation() != work.generation {
            return; // its partition was rewound: it is read again
        }
        // One clock read for the record: the handler takes microseconds.
        let now = now_ms();
        if work.routing.is_ok()
            && let Some(key) = work.record.key.as_deref()
            && self.is_repeat(work.pid, key, now)
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
            now,
            &self.metrics.handler_duration,
        );
        match accepted_at {
            Some(at) => self
                .metrics
                .end_to_end
                .observe(now.saturating_sub(at) as f64 / 1000.0),
            None => self.counters.handler_errors.inc(),
        }
        outcome.solo = work.solo;
        log.finish(offset, outcome);
    }

    /// Whether the key was handled already, within the dedup window.
    pub(super) fn is_repeat(&self, pid: Pid, key: &[u8], now_ms: u64) -> bool {
        let Some(seen) = &self.seen else {
            return false;
        };
        let partition = self.names.name(pid).1;
        seen.lock()
            .map(|seen| seen.contains(partition, key, now_ms))
            .unwrap_or(false)
    }

    pub(super) fn repeated(&self, pid: Pid, offset: i64, key: &[u8]) {
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

    /// Acts on a rebalance seen by the consumer context.
    pub(super) fn follow_rebalance(&mut self) {
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
}
