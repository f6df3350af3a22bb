//! Health of the order API is delivery: kop-order is ready while it can hand orders to
//! Kafka. It is not when no broker connection is up, when orders wait in the producer and
//! none has been acknowledged for `http.produce_timeout`, or when Kafka refuses them; past
//! `http.stall_timeout` of that, the daemon gives up and exits non-zero, for systemd to
//! start it afresh. Every sign clears by itself once the broker is back, with or without
//! traffic: readiness never waits for a request that a load balancer would not send.

use std::time::{Duration, Instant};

use crate::kafka::STATS_INTERVAL;

/// Reachability is known one statistics report late; three reports without a broker up
/// is not a hiccup.
const UNREACHABLE_AFTER: Duration = Duration::from_secs(3 * STATS_INTERVAL.as_secs());

/// What the producer looks like at one moment.
#[derive(Debug, Default, Clone)]
pub struct Observation {
    /// How long no broker connection has been up, and the client's last error.
    pub unreachable: Duration,
    pub connection_error: Option<String>,
    /// Records in the producer, not yet acknowledged or refused.
    pub waiting: u64,
    /// Records acknowledged since the start.
    pub acks: u64,
    /// Records refused (or timed out) since the start, and why the last one was.
    pub failures: u64,
    pub last_failure: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Delivering,
    /// Cannot deliver, for this reason.
    Blocked(String),
    /// Could not deliver for `stall_timeout`: the process should end.
    GiveUp(String),
}

pub struct DeliveryHealth {
    produce_timeout: Duration,
    stall_timeout: Duration,
    acks: u64,
    failures: u64,
    /// Records have waited since then, and none was acknowledged.
    waiting_since: Option<Instant>,
    /// Records have been refused since then, and none was acknowledged.
    failing_since: Option<Instant>,
    last_failure_at: Option<Instant>,
    blocked_since: Option<Instant>,
}

impl DeliveryHealth {
    pub fn new(produce_timeout: Duration, stall_timeout: Duration) -> Self {
        DeliveryHealth {
            produce_timeout,
            stall_timeout,
            acks: 0,
            failures: 0,
            waiting_since: None,
            failing_since: None,
            last_failure_at: None,
            blocked_since: None,
        }
    }

    /// Judges one observation; called about once a second.
    pub fn observe(&mut self, seen: &Observation, now: Instant) -> Verdict {
        let acked = seen.acks != self.acks;
        let failed = seen.failures != self.failures;
        self.acks = seen.acks;
        self.failures = seen.failures;
        if acked || seen.waiting == 0 {
            self.waiting_since = None;
        } else if self.waiting_since.is_none() {
            self.waiting_since = Some(now);
        }
        if acked {
            self.failing_since = None;
        } else if failed {
            self.failing_since.get_or_insert(now);
        }
        if failed {
            self.last_failure_at = Some(now);
        }
        let Some(why) = self.why_blocked(seen, now) else {
            self.blocked_since = None;
            return Verdict::Delivering;
        };
        let since = *self.blocked_since.get_or_insert(now);
        let blocked_for = now.saturating_duration_since(since);
        if blocked_for >= self.stall_timeout {
            Verdict::GiveUp(format!(
                "could not deliver orders for {}s: {why}",
                blocked_for.as_secs()
            ))
        } else {
            Verdict::Blocked(why)
        }
    }

    fn why_blocked(&self, seen: &Observation, now: Instant) -> Option<String> {
        if seen.unreachable >= UNREACHABLE_AFTER {
            let mut why = format!(
                "no connection to any Kafka broker for {}s",
                seen.unreachable.as_secs()
            );
            if let Some(error) = &seen.connection_error {
                why.push_str(&format!(" (last error: {error})"));
            }
            return Some(why);
        }
        if let Some(since) = self.waiting_since {
            let waited = now.saturating_duration_since(since);
            if waited >= self.produce_timeout {
                let orders = if seen.waiting == 1 { "order" } else { "orders" };
                return Some(format!(
                    "{} {orders} waiting for Kafka, none acknowledged for {}s",
                    seen.waiting,
                    waited.as_secs()
                ));
            }
        }
        // Refusals count while recent: without requests, nothing else would clear them.
        let recent = |at: Instant| now.saturating_duration_since(at) < self.produce_timeout;
        if self.failing_since.is_some() && self.last_failure_at.is_some_and(recent) {
            return Some(format!(
                "Kafka refuses orders: {}",
                seen.last_failure.as_deref().unwrap_or("no reason given")
            ));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    fn health() -> DeliveryHealth {
        DeliveryHealth::new(S(5), S(30))
    }

    #[test]
    fn idle_and_acknowledged_is_delivering() {
        let t0 = Instant::now();
        let mut h = health();
        let mut seen = Observation::default();
        assert_eq!(h.observe(&seen, t0), Verdict::Delivering);
        // Records waiting a moment and then acknowledged: fine at any rate.
        for second in 1..100 {
            seen.waiting = 50;
            seen.acks += 1000;
            assert_eq!(h.observe(&seen, t0 + S(second)), Verdict::Delivering);
        }
    }

    #[test]
    fn records_that_wait_without_acknowledgement_block_then_give_up() {
        let t0 = Instant::now();
        let mut h = health();
        let seen = Observation {
            waiting: 7,
            ..Observation::default()
        };
        assert_eq!(h.observe(&seen, t0), Verdict::Delivering);
        assert_eq!(h.observe(&seen, t0 + S(4)), Verdict::Delivering);
        let Verdict::Blocked(why) = h.observe(&seen, t0 + S(5)) else {
            panic!("should be blocked");
        };
        assert!(why.contains("7 orders waiting"), "{why}");
        assert!(matches!(h.observe(&seen, t0 + S(34)), Verdict::Blocked(_)));
        let Verdict::GiveUp(why) = h.observe(&seen, t0 + S(35)) else {
            panic!("should give up");
        };
        assert!(why.contains("for 30s"), "{why}");
    }

    #[test]
    fn an_acknowledgement_clears_the_block() {
        let t0 = Instant::now();
        let mut h = health();
        let mut seen = Observation {
            waiting: 7,
            ..Observation::default()
        };
        h.observe(&seen, t0);
        assert!(matches!(h.observe(&seen, t0 + S(6)), Verdict::Blocked(_)));
        seen.acks = 1;
        assert_eq!(h.observe(&seen, t0 + S(7)), Verdict::Delivering);
        // Waiting again from t0 + 8 s on; the time blocked starts over.
        assert_eq!(h.observe(&seen, t0 + S(8)), Verdict::Delivering);
        assert!(matches!(h.observe(&seen, t0 + S(13)), Verdict::Blocked(_)));
        assert!(matches!(h.observe(&seen, t0 + S(42)), Verdict::Blocked(_)));
    }

    #[test]
    fn no_broker_blocks_even_idle_and_clears_when_one_is_back() {
        let t0 = Instant::now();
        let mut h = health();
        let mut seen = Observation {
            unreachable: S(2),
            ..Observation::default()
        };
        assert_eq!(h.observe(&seen, t0), Verdict::Delivering);
        seen.unreachable = S(3);
        seen.connection_error = Some("Connection refused".into());
        let Verdict::Blocked(why) = h.observe(&seen, t0 + S(1)) else {
            panic!("should be blocked");
        };
        assert!(why.contains("no connection to any Kafka broker"), "{why}");
        assert!(why.contains("(last error: Connection refused)"), "{why}");
        seen.unreachable = Duration::ZERO;
        assert_eq!(h.observe(&seen, t0 + S(2)), Verdict::Delivering);
    }

    #[test]
    fn refusals_block_while_recent_and_name_the_reason() {
        let t0 = Instant::now();
        let mut h = health();
        let mut seen = Observation::default();
        h.observe(&seen, t0);
        seen.failures = 3;
        seen.last_failure = Some("Broker: Topic authorization failed".into());
        let Verdict::Blocked(why) = h.observe(&seen, t0 + S(1)) else {
            panic!("should be blocked");
        };
        assert!(why.contains("Topic authorization failed"), "{why}");
        // No more requests: the block lapses rather than keeping traffic away for good.
        assert_eq!(h.observe(&seen, t0 + S(6)), Verdict::Delivering);
        // Refusals mixed with acknowledgements are single records, not a blocked edge.
        seen.failures = 4;
        seen.acks = 10;
        assert_eq!(h.observe(&seen, t0 + S(7)), Verdict::Delivering);
    }
}
