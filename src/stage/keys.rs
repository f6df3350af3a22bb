//! Records of one key are handled one after the other; records of different keys at once.
//!
//! Keys are hashed: two keys that collide are merely serialised, which costs a little
//! concurrency and never correctness. A record without a key keeps its partition's order.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};

use super::partitions::Pid;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyHash(u64);

impl KeyHash {
    pub fn of(key: Option<&[u8]>, pid: Pid) -> Self {
        let mut hasher = DefaultHasher::new();
        match key {
            Some(key) => {
                0u8.hash(&mut hasher);
                key.hash(&mut hasher);
            }
            None => {
                1u8.hash(&mut hasher);
                pid.hash(&mut hasher);
            }
        }
        KeyHash(hasher.finish())
    }
}

/// The keys being handled, each with the records waiting behind the one in progress.
pub struct KeyQueues<T> {
    busy: HashMap<KeyHash, VecDeque<T>>,
}

impl<T> Default for KeyQueues<T> {
    fn default() -> Self {
        KeyQueues {
            busy: HashMap::new(),
        }
    }
}

impl<T> KeyQueues<T> {
    /// Returns the item when its key is free (the key is now busy with it), or queues it.
    pub fn admit(&mut self, key: KeyHash, item: T) -> Option<T> {
        match self.busy.get_mut(&key) {
            Some(waiting) => {
                waiting.push_back(item);
                None
            }
            None => {
                self.busy.insert(key, VecDeque::new());
                Some(item)
            }
        }
    }

    /// The item of `key` to start now that the previous one is done; the key is free when
    /// there is none.
    pub fn done(&mut self, key: KeyHash) -> Option<T> {
        let waiting = self.busy.get_mut(&key)?;
        let next = waiting.pop_front();
        if next.is_none() {
            self.busy.remove(&key);
        }
        next
    }

    pub fn clear(&mut self) {
        self.busy.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_key_waits_other_keys_go() {
        let a = KeyHash::of(Some(b"a"), Pid(0));
        let b = KeyHash::of(Some(b"b"), Pid(0));
        let mut queues = KeyQueues::default();
        assert_eq!(queues.admit(a, 1), Some(1));
        assert_eq!(queues.admit(a, 2), None);
        assert_eq!(queues.admit(b, 3), Some(3));
        assert_eq!(queues.admit(a, 4), None);
        assert_eq!(queues.done(a), Some(2));
        assert_eq!(queues.done(a), Some(4));
        assert_eq!(queues.done(a), None);
        assert_eq!(queues.admit(a, 5), Some(5), "the key is free again");
        assert_eq!(queues.done(b), None);
    }

    #[test]
    fn keyless_records_are_ordered_by_partition() {
        assert_eq!(KeyHash::of(None, Pid(1)), KeyHash::of(None, Pid(1)));
        assert_ne!(KeyHash::of(None, Pid(1)), KeyHash::of(None, Pid(2)));
        assert_ne!(KeyHash::of(None, Pid(1)), KeyHash::of(Some(b""), Pid(1)));
    }
}
