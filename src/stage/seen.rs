//! The keys a stage has handled (kop-payment: the orderIds it has paid), so that a repeat
//! — a client's retry after a 503, a copy from a failure upstream — is acknowledged and
//! not handled again.
//!
//! As a stream processor keeps a state store: per input partition, in memory, backed by a
//! compacted changelog topic with as many partitions as the input. A key enters the store
//! when its output is released into the open transaction, and its changelog record goes
//! into the same transaction, so the state and the outputs commit or abort together. On
//! assignment a partition's keys are read back from the changelog (`read_committed`); on
//! revocation they are dropped. Keys released but not yet committed are *pending*: a
//! rewind forgets them, as it forgets the outputs they stand for.
//!
//! A partition of the store is its partition number: a record's retry copy has the same
//! key, so the same partition number in the retry topic (which has as many partitions),
//! and the range assignor gives both to the same member.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

use super::partitions::Pid;

/// A key and when it was handled (epoch milliseconds).
pub type Entry = (Box<[u8]>, u64);

/// What the store keeps of a key: 128 bits of two independently keyed SipHashes, whatever
/// the key's length. Two keys of one partition's window share a fingerprint (and the later
/// is taken for a repeat) with a chance of about n²/2¹²⁹: for 100,000 keys, 10⁻²⁹.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Fingerprint(u64, u64);

/// Makes fingerprints; its keys are drawn anew in each process (the changelog holds the
/// keys themselves, fingerprinted again on restore).
struct Fingerprinter(RandomState, RandomState);

impl Fingerprinter {
    fn of(&self, key: &[u8]) -> Fingerprint {
        Fingerprint(self.0.hash_one(key), self.1.hash_one(key))
    }
}

/// A fingerprint is a hash already: the map combines its halves instead of hashing them
/// again.
#[derive(Default)]
struct Halves(u64);

impl Hasher for Halves {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Not reached by a fingerprint (it writes two u64); correct for anything else.
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
    }

    fn write_u64(&mut self, half: u64) {
        self.0 = self.0.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ half;
    }
}

/// The keys of one partition: when each was handled, oldest first for eviction.
#[derive(Default)]
struct Keys {
    at: HashMap<Fingerprint, u64, BuildHasherDefault<Halves>>,
    order: VecDeque<(u64, Fingerprint)>,
}

impl Keys {
    fn insert(&mut self, key: Fingerprint, at_ms: u64, max_keys: usize) {
        if self.at.insert(key, at_ms).is_none() {
            self.order.push_back((at_ms, key));
        }
        while self.at.len() > max_keys {
            self.evict_oldest();
        }
    }

    fn evict_oldest(&mut self) {
        if let Some((at, key)) = self.order.pop_front() {
            // A key seen again later has a newer entry further back: only this one goes.
            if self.at.get(&key) == Some(&at) {
                self.at.remove(&key);
            }
        }
    }

    fn expire(&mut self, oldest_ms: u64) {
        while self.order.front().is_some_and(|(at, _)| *at < oldest_ms) {
            self.evict_oldest();
        }
    }
}

pub struct Seen {
    max_keys: usize,
    window: Duration,
    fingerprints: Fingerprinter,
    partitions: HashMap<i32, Keys>,
    /// Released, not yet committed: (its input partition, offset, store partition, key).
    pending: Vec<(Pid, i64, i32, Fingerprint)>,
}

impl Seen {
    pub fn new(max_keys: usize, window: Duration) -> Self {
        Seen {
            max_keys,
            window,
            fingerprints: Fingerprinter(RandomState::new(), RandomState::new()),
            partitions: HashMap::new(),
            pending: Vec::new(),
        }
    }

    fn oldest_ms(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(u64::try_from(self.window.as_millis()).unwrap_or(u64::MAX))
    }

    /// Whether the key was handled within the window.
    pub fn contains(&self, partition: i32, key: &[u8], now_ms: u64) -> bool {
        self.partitions
            .get(&partition)
            .and_then(|keys| keys.at.get(&self.fingerprints.of(key)))
            .is_some_and(|at| *at >= self.oldest_ms(now_ms))
    }

    /// A key whose output was released for the record at `offset` of `pid`.
    pub fn insert_pending(
        &mut self,
        pid: Pid,
        offset: i64,
        partition: i32,
        key: &[u8],
        now_ms: u64,
    ) {
        let oldest = self.oldest_ms(now_ms);
        let fingerprint = self.fingerprints.of(key);
        let keys = self.partitions.entry(partition).or_default();
        keys.expire(oldest);
        keys.insert(fingerprint, now_ms, self.max_keys);
        self.pending.push((pid, offset, partition, fingerprint));
    }

    /// The records of `pid` before `next` are committed: their keys are durable.
    pub fn durable(&mut self, pid: Pid, next: i64) {
        self.pending
            .retain(|(p, offset, ..)| *p != pid || *offset >= next);
    }

    /// `pid` is read again from its last commit: its pending keys are forgotten.
    pub fn rewound(&mut self, pid: Pid) {
        let partitions = &mut self.partitions;
        self.pending.retain(|(p, _, partition, key)| {
            if *p != pid {
                return true;
            }
            if let Some(keys) = partitions.get_mut(partition) {
                keys.at.remove(key);
            }
            false
        });
    }

    /// The keys read back from a changelog partition.
    pub fn restore(&mut self, partition: i32, entries: Vec<Entry>, now_ms: u64) {
        let oldest = self.oldest_ms(now_ms);
        let mut keys = Keys::default();
        for (key, at) in entries {
            if at >= oldest {
                keys.insert(self.fingerprints.of(&key), at, self.max_keys);
            }
        }
        self.partitions.insert(partition, keys);
    }

    /// The partition is no longer this stage's.
    pub fn forget(&mut self, partition: i32) {
        self.partitions.remove(&partition);
        self.pending.retain(|(_, _, p, _)| *p != partition);
    }

    pub fn len(&self) -> usize {
        self.partitions.values().map(|k| k.at.len()).sum()
    }
}

/// The changelog record's value: when the key was handled, in epoch milliseconds.
pub fn encode_at(at_ms: u64) -> String {
    at_ms.to_string()
}

/// Reads changelog partitions from their start to their end (committed records only), with
/// one client for all of them. Blocking; a tombstone or an unreadable value forgets the key.
pub fn read_changelog(
    config: &ClientConfig,
    topic: &str,
    partitions: &[i32],
    timeout: Duration,
) -> Result<HashMap<i32, Vec<Entry>>, KafkaError> {
    let consumer: BaseConsumer = config.create()?;
    let mut ends = HashMap::new();
    let mut list = TopicPartitionList::new();
    let mut latest: HashMap<i32, HashMap<Box<[u8]>, u64>> = HashMap::new();
    for &partition in partitions {
        latest.insert(partition, HashMap::new());
        let (low, high) = consumer.fetch_watermarks(topic, partition, timeout)?;
        if high > low {
            ends.insert(partition, high);
            list.add_partition_offset(topic, partition, Offset::Beginning)?;
        }
    }
    if !ends.is_empty() {
        consumer.assign(&list)?;
    }
    let deadline = std::time::Instant::now() + timeout;
    while !ends.is_empty() {
        // The end may be a transaction marker, which is never delivered: the position
        // says when everything before it was read.
        for element in consumer.position()?.elements_for_topic(topic) {
            if let Offset::Offset(position) = element.offset()
                && ends
                    .get(&element.partition())
                    .is_some_and(|end| position >= *end)
            {
                ends.remove(&element.partition());
            }
        }
        if ends.is_empty() {
            break;
        }
        if std::time::Instant::now() >= deadline {
            return Err(KafkaError::MessageConsumption(
                rdkafka::error::RDKafkaErrorCode::OperationTimedOut,
            ));
        }
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(message)) => {
                let Some(key) = message.key() else { continue };
                let Some(keys) = latest.get_mut(&message.partition()) else {
                    continue;
                };
                let at = message
                    .payload()
                    .and_then(|v| std::str::from_utf8(v).ok())
                    .and_then(|v| v.parse::<u64>().ok());
                match at {
                    Some(at) => keys.insert(key.into(), at),
                    None => keys.remove(key),
                };
            }
            // A broker that moves or restarts is retried until the deadline.
            Some(Err(e)) => tracing::debug!(error = %e, "reading the changelog"),
            None => {}
        }
    }
    Ok(latest
        .into_iter()
        .map(|(partition, keys)| {
            let mut entries: Vec<Entry> = keys.into_iter().collect();
            entries.sort_by_key(|(_, at)| *at);
            (partition, entries)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: u64 = 3_600_000;

    #[test]
    fn pending_keys_are_forgotten_by_a_rewind_and_kept_once_durable() {
        let mut seen = Seen::new(100, Duration::from_secs(24 * 3600));
        let (a, b) = (Pid(0), Pid(1));
        let now = 100 * HOUR;
        seen.insert_pending(a, 10, 0, b"o1", now);
        seen.insert_pending(b, 20, 1, b"o2", now);
        assert!(seen.contains(0, b"o1", now));
        assert!(!seen.contains(1, b"o1", now), "per partition");
        seen.durable(a, 11);
        seen.rewound(a);
        seen.rewound(b);
        assert!(seen.contains(0, b"o1", now), "committed before the rewind");
        assert!(!seen.contains(1, b"o2", now), "forgotten with its output");
    }

    #[test]
    fn the_window_bounds_age_and_count() {
        let mut seen = Seen::new(3, Duration::from_secs(3600));
        let pid = Pid(0);
        let now = 100 * HOUR;
        for (i, key) in [b"k1", b"k2", b"k3", b"k4"].iter().enumerate() {
            seen.insert_pending(pid, i as i64, 0, *key, now + i as u64);
        }
        assert_eq!(seen.len(), 3);
        assert!(!seen.contains(0, b"k1", now + 10), "the oldest went first");
        assert!(seen.contains(0, b"k4", now + 10));
        assert!(!seen.contains(0, b"k4", now + HOUR + 10), "too old");
        seen.restore(
            2,
            vec![
                (b"old".as_slice().into(), now - 2 * HOUR),
                (b"new".as_slice().into(), now),
            ],
            now,
        );
        assert!(seen.contains(2, b"new", now));
        assert!(!seen.contains(2, b"old", now));
        seen.forget(2);
        assert!(!seen.contains(2, b"new", now));
    }
}
