//! Retry partitions paused until their head record is due.
//!
//! A retry record is not handled before the time in its `x-retry-at` header: its partition
//! is paused at that record and resumed (from that record) once it is due, while the main
//! topic keeps flowing. The header is untrusted, so the wait is capped at the longest delay
//! the retry policy can give: a forged far-future time cannot hold a partition for longer.

use std::collections::HashMap;
use std::time::Duration;

use super::partitions::Pid;

#[derive(Default)]
pub struct Held {
    /// Partition → (offset of the record not yet due, when it is due in epoch ms).
    partitions: HashMap<Pid, (i64, u64)>,
    /// Partition → the record that was due when the partition was resumed: read again, it
    /// is handled, whatever its header says (the cap counts from when it was first held).
    resumed: HashMap<Pid, i64>,
}

/// When a record asking for `retry_at` may be handled, given that no honest record waits
/// longer than `longest` from now.
pub fn due_time(retry_at: u64, now_ms: u64, longest: Duration) -> u64 {
    let cap = now_ms.saturating_add(u64::try_from(longest.as_millis()).unwrap_or(u64::MAX));
    retry_at.min(cap)
}

impl Held {
    pub fn hold(&mut self, pid: Pid, offset: i64, due_ms: u64) {
        self.partitions.insert(pid, (offset, due_ms));
    }

    /// True when the record at `offset` was fetched after its partition was held at an
    /// earlier or the same offset: it is read again after the resume.
    pub fn holds(&self, pid: Pid, offset: i64) -> bool {
        self.partitions
            .get(&pid)
            .is_some_and(|(held_at, _)| offset >= *held_at)
    }

    pub fn next_due(&self) -> Option<u64> {
        self.partitions.values().map(|(_, due)| *due).min()
    }

    /// Takes out the partitions whose record is due, with the offset to read again from.
    pub fn take_due(&mut self, now_ms: u64) -> Vec<(Pid, i64)> {
        let due: Vec<(Pid, i64)> = self
            .partitions
            .iter()
            .filter(|(_, (_, at))| *at <= now_ms)
            .map(|(pid, (offset, _))| (*pid, *offset))
            .collect();
        for (pid, offset) in &due {
            self.partitions.remove(pid);
            self.resumed.insert(*pid, *offset);
        }
        due
    }

    /// True (once) for the record that was due when its partition was resumed.
    pub fn was_due(&mut self, pid: Pid, offset: i64) -> bool {
        match self.resumed.get(&pid) {
            Some(due) if *due == offset => {
                self.resumed.remove(&pid);
                true
            }
            _ => false,
        }
    }

    /// Takes out one partition (it is revoked): its records are judged anew.
    pub fn release(&mut self, pid: Pid) -> bool {
        self.resumed.remove(&pid);
        self.partitions.remove(&pid).is_some()
    }

    /// Takes out every partition (they are rewound): their records are judged anew.
    pub fn release_all(&mut self) -> Vec<Pid> {
        self.resumed.clear();
        self.partitions.drain().map(|(pid, _)| pid).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_far_future_retry_time_is_capped() {
        let longest = Duration::from_secs(15);
        assert_eq!(due_time(u64::MAX, 1_000, longest), 16_000);
        assert_eq!(due_time(5_000, 1_000, longest), 5_000);
        assert_eq!(due_time(0, 1_000, longest), 0);
    }

    #[test]
    fn partitions_come_out_when_due() {
        let mut held = Held::default();
        held.hold(Pid(1), 40, 2_000);
        held.hold(Pid(2), 7, 1_000);
        assert!(held.holds(Pid(1), 40));
        assert!(held.holds(Pid(1), 41));
        assert!(!held.holds(Pid(1), 39));
        assert!(!held.holds(Pid(3), 0));
        assert_eq!(held.next_due(), Some(1_000));
        assert_eq!(held.take_due(1_500), vec![(Pid(2), 7)]);
        assert_eq!(held.next_due(), Some(2_000));
        assert!(!held.was_due(Pid(2), 6));
        assert!(
            held.was_due(Pid(2), 7),
            "read again after the resume: handled"
        );
        assert!(!held.was_due(Pid(2), 7), "only once");
        assert_eq!(held.release_all(), vec![Pid(1)]);
        assert_eq!(held.next_due(), None);
    }
}
