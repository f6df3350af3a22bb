//! Committing what was released — a transaction, or the acknowledged offsets — and what
//! follows a failure: an abort, a new producer, a rewind to the committed offsets.

use std::time::Instant;

use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use tracing::{debug, error, info, warn};

use super::partitions::PartitionLog;
use super::txn::{self, CallDone};
use super::{Handling, OffsetsCall, Stage};

impl Stage {
    pub(super) fn commit(&mut self) {
        if self.txn.is_transactional() {
            self.commit_transaction();
        } else {
            self.commit_offsets();
        }
    }

    pub(super) fn commit_transaction(&mut self) {
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
        if !self.txn.should_commit() || self.commit_spaced_out() {
            return;
        }
        let Some(metadata) = self.consumer.group_metadata() else {
            return;
        };
        if let Err(e) = self.txn.start_commit(&self.names, metadata) {
            self.txn.doom(format!("cannot list the offsets: {e}"));
        }
        self.commit_not_before = Some(Instant::now() + self.config.commit_interval);
    }

    /// The last commit started less than `commit_interval` ago.
    pub(super) fn commit_spaced_out(&self) -> bool {
        self.commit_not_before.is_some_and(|at| Instant::now() < at)
    }

    /// When the loop must wake for a commit that waits only for `commit_interval`.
    pub(super) fn commit_due(&self) -> Option<Instant> {
        let at = self.commit_not_before?;
        let ready = if self.txn.is_transactional() {
            !self.txn.is_busy() && self.txn.should_commit()
        } else {
            self.offsets_call.is_none() && self.logs.values().any(PartitionLog::has_acked_prefix)
        };
        (ready && Instant::now() < at).then_some(at)
    }

    pub(super) fn commit_offsets(&mut self) {
        if self.offsets_call.is_some() || self.commit_spaced_out() {
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
        self.commit_not_before = Some(Instant::now() + self.config.commit_interval);
        self.offsets_call = Some(Box::pin(async move {
            match tokio::time::timeout(txn::CALL_TIMEOUT * 2, call).await {
                Ok(Ok(result)) => result.map_err(|e| e.to_string()),
                Ok(Err(_)) => Err("the commit call panicked".into()),
                Err(_) => Err("the commit call did not return".into()),
            }
        }));
    }

    pub(super) fn on_offsets_committed(&mut self, result: Result<(), String>) {
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

    pub(super) fn on_call_done(&mut self, done: CallDone) {
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
    pub(super) fn repair(&mut self, why: &str) {
        error!(reason = why, "replacing the producer");
        self.rebuild(why);
    }

    pub(super) fn rebuild(&mut self, why: &str) {
        self.progress.failed(why);
        self.counters.aborts.inc();
        self.start_new_producer();
    }

    /// Builds a producer with the same transactional id, then reads the committed offsets
    /// (the rewind's starting points once the old producer is fenced).
    pub(super) fn start_new_producer(&mut self) {
        let consumer = self.consumer.clone();
        self.txn
            .start_rebuild(move || consumer.committed(txn::CALL_TIMEOUT));
    }

    /// Forgets everything not committed and reads it again: from the offsets the broker
    /// reported (`committed`, after a new producer) or else from those this loop committed.
    pub(super) fn rewind(&mut self, committed: Option<&TopicPartitionList>) {
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
}

pub(super) async fn offsets_done(call: &mut Option<OffsetsCall>) -> Result<(), String> {
    match call {
        Some(call) => call.await,
        None => std::future::pending().await,
    }
}
