//! Handing outcomes to the producer in each partition's offset order, and what the broker
//! says of them.

use std::time::{Duration, Instant};

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{BaseRecord, Producer as _};
use tracing::warn;

use super::context::{Delivery, Tag};
use super::partitions::Pid;
use super::route::{OutRecord, Outcome, Target};
use super::{MAX_REFUSALS, Stage, seen};
use crate::event::now_ms;

impl Stage {
    /// Hands ready outcomes to the producer in offset order, into the open transaction.
    pub(super) fn release(&mut self) {
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
        if transactional && self.txn.records() > 0 && !self.commit_spaced_out() {
            // The open transaction is due to commit: it closes and waits only for the
            // acknowledgements of what it holds. Adding more would keep a record unacked at
            // nearly every moment under a steady load, and the commit waited for a gap
            // between them (20-100 ms at 1,000 records/s). What finishes now goes into the
            // next transaction.
            return;
        }
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
    pub(super) fn hand_over(&mut self, pid: Pid, offset: i64, mut outcome: Outcome) -> bool {
        let mut refusals = 0;
        let now = now_ms();
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
                && self.is_repeat(pid, key, now)
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
                        return self.remember(pid, offset, key, now);
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
    pub(super) fn remember(&mut self, pid: Pid, offset: i64, key: Vec<u8>, now: u64) -> bool {
        let Some(seen) = &self.seen else {
            return true;
        };
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
                self.txn.include_extra();
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
    pub(super) fn put_back(&mut self, pid: Pid, offset: i64, outcome: Outcome) {
        if let Some(log) = self.logs.get_mut(&pid) {
            log.unsend(offset, outcome);
        }
    }

    /// Records that an outcome left: into the transaction, or kept until acknowledged.
    /// `sent`: whether a record was sent (and its acknowledgement is awaited).
    pub(super) fn released(&mut self, pid: Pid, offset: i64, kept: Option<Outcome>, sent: bool) {
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
    pub(super) fn send(
        &self,
        pid: Pid,
        offset: i64,
        record: OutRecord,
    ) -> Result<OutRecord, (KafkaError, OutRecord)> {
        self.send_to(pid, offset, record, None)
    }

    /// Like `send`, to a given partition of the target topic.
    #[allow(clippy::result_large_err)]
    pub(super) fn send_to(
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

    pub(super) fn on_delivery(&mut self, report: Delivery) {
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
}

/// Produce errors that belong to the record (too large, malformed), which no retry mends.
pub(super) fn refused_for_good(error: &KafkaError) -> bool {
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
