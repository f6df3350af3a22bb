//! The stage's view of each consumed partition: which records it holds, in offset order,
//! how far each one got, and the offset the partition falls back to after an abort.
//!
//! A record goes Handling → Ready (its outcome is known) → Sent (its outcome was handed to
//! the producer) → Acked (the broker has it). Outcomes are released in offset order, so a
//! record never overtakes an earlier one of its partition; and an offset is committed only
//! once every record before it reached the point its guarantee asks for (inside the
//! committing transaction, or acknowledged).

use std::collections::{HashMap, VecDeque};

use super::route::Outcome;

/// A consumed partition, interned: records carry this instead of a topic string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Pid(pub u32);

/// Topic-partition names ↔ [`Pid`]s. Entries are never removed, so a `Pid` stays valid
/// across rebalances (a partition that comes back gets its old id).
#[derive(Default)]
pub struct Names {
    ids: HashMap<String, Vec<Option<Pid>>>,
    names: Vec<(String, i32)>,
}

impl Names {
    pub fn id(&mut self, topic: &str, partition: i32) -> Pid {
        let index = usize::try_from(partition).unwrap_or(0);
        if let Some(Some(pid)) = self.ids.get(topic).and_then(|v| v.get(index)) {
            return *pid;
        }
        let pid = Pid(self.names.len() as u32);
        self.names.push((topic.to_string(), partition));
        let slots = self.ids.entry(topic.to_string()).or_default();
        if slots.len() <= index {
            slots.resize(index + 1, None);
        }
        slots[index] = Some(pid);
        pid
    }

    pub fn get(&self, topic: &str, partition: i32) -> Option<Pid> {
        let index = usize::try_from(partition).ok()?;
        self.ids.get(topic)?.get(index).copied().flatten()
    }

    pub fn name(&self, pid: Pid) -> (&str, i32) {
        let (topic, partition) = &self.names[pid.0 as usize];
        (topic, *partition)
    }
}

#[derive(Debug)]
pub enum Slot {
    Handling,
    Ready(Outcome),
    /// Handed to the producer; `acked` once the broker confirmed it (or nothing was sent).
    /// At-least-once keeps the outcome until then, to send it again if it must.
    Sent {
        acked: bool,
        kept: Option<Outcome>,
    },
}

/// One partition's records between its committed offset and what has been read.
pub struct PartitionLog {
    /// Where reading starts again after an abort: the next offset not yet committed.
    base: i64,
    /// Changes whenever the log is rewound, so work started before is recognised as stale.
    generation: u64,
    slots: VecDeque<(i64, Slot)>,
    /// Index of the first slot not yet sent.
    unsent: usize,
    /// Slots still being handled (or waiting for their key).
    handling: usize,
    /// Bytes of the records held (key + value), for the memory bound.
    bytes: usize,
    sizes: VecDeque<usize>,
}

impl PartitionLog {
    pub fn new(base: i64, generation: u64) -> Self {
        PartitionLog {
            base,
            generation,
            slots: VecDeque::new(),
            unsent: 0,
            handling: 0,
            bytes: 0,
            sizes: VecDeque::new(),
        }
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn base(&self) -> i64 {
        self.base
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Records taken in and not yet handled.
    pub fn handling(&self) -> usize {
        self.handling
    }

    /// The offset after the last record taken in (or the base when there is none).
    pub fn next_expected(&self) -> i64 {
        self.slots.back().map(|(o, _)| o + 1).unwrap_or(self.base)
    }

    /// Takes a record in; false when it is behind what was already taken (a fetch that
    /// raced a seek), which the caller drops.
    pub fn push(&mut self, offset: i64, size: usize) -> bool {
        if offset < self.next_expected() {
            return false;
        }
        self.slots.push_back((offset, Slot::Handling));
        self.handling += 1;
        self.sizes.push_back(size);
        self.bytes += size;
        true
    }

    /// The slot of an offset. Offsets rise by at least one per slot, so the slot is at most
    /// `offset - first` from the front, and exactly there unless the partition has gaps
    /// (transaction markers, compaction): one look in the common case, a binary search of
    /// the slots up to there otherwise. Looked up for every record, twice.
    fn index(&self, offset: i64) -> Option<usize> {
        let first = self.slots.front()?.0;
        let most = usize::try_from(offset.checked_sub(first)?).ok()?;
        let end = most.min(self.slots.len() - 1);
        if self.slots[end].0 == offset {
            return Some(end);
        }
        let (mut low, mut high) = (0, end);
        while low < high {
            let middle = low + (high - low) / 2;
            if self.slots[middle].0 < offset {
                low = middle + 1;
            } else {
                high = middle;
            }
        }
        (self.slots[low].0 == offset).then_some(low)
    }

    /// Records the outcome of a handled record.
    pub fn finish(&mut self, offset: i64, outcome: Outcome) -> bool {
        match self.index(offset) {
            Some(i) if matches!(self.slots[i].1, Slot::Handling) => {
                self.slots[i].1 = Slot::Ready(outcome);
                self.handling -= 1;
                true
            }
            _ => false,
        }
    }

    /// The next outcome to hand to the producer, if every record before it was handed over.
    pub fn next_release(&mut self) -> Option<(i64, Outcome)> {
        loop {
            let (offset, slot) = self.slots.get_mut(self.unsent)?;
            match slot {
                Slot::Handling => return None,
                // Sent before an earlier record had to go back in line.
                Slot::Sent { .. } => self.unsent += 1,
                Slot::Ready(_) => {
                    let offset = *offset;
                    let Slot::Ready(outcome) = std::mem::replace(
                        slot,
                        Slot::Sent {
                            acked: false,
                            kept: None,
                        },
                    ) else {
                        return None;
                    };
                    self.unsent += 1;
                    return Some((offset, outcome));
                }
            }
        }
    }

    /// Puts an outcome back (the producer refused it for now, or it must be sent again).
    pub fn unsend(&mut self, offset: i64, outcome: Outcome) {
        if let Some(i) = self.index(offset) {
            self.slots[i].1 = Slot::Ready(outcome);
            self.unsent = self.unsent.min(i);
        }
    }

    /// Keeps a sent outcome until the broker acknowledges it.
    pub fn keep(&mut self, offset: i64, outcome: Outcome) {
        if let Some(i) = self.index(offset)
            && let Slot::Sent { kept, .. } = &mut self.slots[i].1
        {
            *kept = Some(outcome);
        }
    }

    /// Takes back a kept outcome whose delivery failed.
    pub fn take_kept(&mut self, offset: i64) -> Option<Outcome> {
        let i = self.index(offset)?;
        match &mut self.slots[i].1 {
            Slot::Sent { acked: false, kept } => kept.take(),
            _ => None,
        }
    }

    pub fn ack(&mut self, offset: i64) {
        if let Some(i) = self.index(offset)
            && let Slot::Sent { acked, kept } = &mut self.slots[i].1
        {
            *acked = true;
            *kept = None;
        }
    }

    /// Whether the log starts with an acknowledged record, which a commit would cover.
    pub fn has_acked_prefix(&self) -> bool {
        self.unsent > 0
            && matches!(
                self.slots.front(),
                Some((_, Slot::Sent { acked: true, .. }))
            )
    }

    /// The offset after the acknowledged prefix (at-least-once).
    pub fn acked_end(&self) -> Option<i64> {
        let n = self
            .slots
            .iter()
            .take(self.unsent)
            .take_while(|(_, s)| matches!(s, Slot::Sent { acked: true, .. }))
            .count();
        (n > 0).then(|| self.slots[n - 1].0 + 1)
    }

    /// Forgets the records before `next` and makes it the new base: they are committed.
    pub fn committed(&mut self, next: i64) {
        while let Some((offset, _)) = self.slots.front() {
            if *offset >= next {
                break;
            }
            self.slots.pop_front();
            self.bytes -= self.sizes.pop_front().unwrap_or(0);
            self.unsent = self.unsent.saturating_sub(1);
        }
        self.base = self.base.max(next);
    }

    /// Forgets every record not committed; they are read again from `base`.
    pub fn rewind_to(&mut self, base: i64, generation: u64) {
        self.slots.clear();
        self.sizes.clear();
        self.bytes = 0;
        self.unsent = 0;
        self.handling = 0;
        self.generation = generation;
        self.base = base;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn done() -> Outcome {
        Outcome::nothing()
    }

    #[test]
    fn outcomes_leave_in_offset_order() {
        let mut log = PartitionLog::new(10, 1);
        for o in 10..13 {
            assert!(log.push(o, 1));
        }
        assert_eq!(log.handling(), 3);
        assert!(log.finish(11, done()));
        assert!(!log.finish(11, done()), "finished once");
        assert_eq!(log.handling(), 2);
        assert!(log.next_release().is_none(), "10 is still being handled");
        assert!(log.finish(10, done()));
        assert_eq!(log.next_release().map(|(o, _)| o), Some(10));
        assert_eq!(log.next_release().map(|(o, _)| o), Some(11));
        assert!(log.next_release().is_none());
        assert_eq!(log.acked_end(), None);
        log.ack(11);
        assert_eq!(log.acked_end(), None, "11 is acked but 10 is not");
        log.ack(10);
        assert_eq!(log.acked_end(), Some(12));
        log.committed(12);
        assert_eq!(log.len(), 1);
        assert_eq!(log.base(), 12);
    }

    #[test]
    fn offsets_with_gaps_are_found() {
        // Transaction markers and compaction leave gaps; the lookup must not assume none.
        let offsets = [3, 4, 6, 7, 8, 12, 13, 20];
        let mut log = PartitionLog::new(3, 1);
        for o in offsets {
            assert!(log.push(o, 1));
        }
        for o in [20, 6, 3, 13, 8, 4, 12, 7] {
            assert!(log.finish(o, done()), "offset {o} is held");
        }
        for o in [0, 2, 5, 9, 11, 14, 19, 21, 100] {
            assert!(!log.finish(o, done()), "offset {o} is not held");
        }
        let released: Vec<i64> =
            std::iter::from_fn(|| log.next_release().map(|(o, _)| o)).collect();
        assert_eq!(released, offsets);
        log.committed(7);
        assert!(!log.finish(6, done()));
        log.ack(7);
        log.ack(8);
        log.ack(13);
        assert_eq!(log.acked_end(), Some(9), "12 is not acked");
        log.ack(12);
        assert_eq!(log.acked_end(), Some(14));
    }

    #[test]
    fn a_record_behind_the_read_position_is_refused() {
        let mut log = PartitionLog::new(5, 1);
        assert!(!log.push(4, 1));
        assert!(log.push(7, 1), "gaps (transaction markers) are normal");
        assert!(!log.push(7, 1));
    }

    #[test]
    fn rewind_keeps_the_base_and_drops_the_rest() {
        let mut log = PartitionLog::new(0, 1);
        log.push(0, 3);
        log.push(1, 4);
        log.finish(0, done());
        log.next_release();
        assert_eq!(log.bytes(), 7);
        log.rewind_to(0, 2);
        assert_eq!(log.len(), 0);
        assert_eq!(log.handling(), 0);
        assert_eq!(log.bytes(), 0);
        assert_eq!(log.generation(), 2);
        assert!(log.push(0, 1));
    }

    #[test]
    fn a_refused_send_goes_back_in_line() {
        let mut log = PartitionLog::new(0, 1);
        log.push(0, 1);
        log.push(1, 1);
        log.finish(0, done());
        log.finish(1, done());
        log.next_release();
        log.next_release();
        log.ack(1);
        log.unsend(0, done());
        assert_eq!(log.acked_end(), None, "0 goes again");
        assert_eq!(log.next_release().map(|(o, _)| o), Some(0));
        assert!(log.next_release().is_none(), "1 was sent already");
        log.ack(0);
        assert_eq!(log.acked_end(), Some(2));
    }

    #[test]
    fn names_are_stable() {
        let mut names = Names::default();
        let a = names.id("t", 2);
        let b = names.id("u", 0);
        assert_ne!(a, b);
        assert_eq!(names.id("t", 2), a);
        assert_eq!(names.get("t", 2), Some(a));
        assert_eq!(names.get("t", 1), None);
        assert_eq!(names.name(b), ("u", 0));
    }
}
