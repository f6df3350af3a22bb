//! Health is progress: a stage that has input waiting but has not committed for
//! `stall_timeout` is not ready, says why in its STATUS line, and stops feeding the
//! watchdog so that systemd restarts it. A stage with nothing to do is healthy however long
//! it idles — unless it cannot reach any broker for that long: then it cannot know whether
//! input waits (an assignment lost in an outage takes its records out of sight).

use std::time::{Duration, Instant};

/// How often librdkafka reports its connections (`statistics.interval.ms` of the stage's
/// consumer): a broker is known to be unreachable one report late.
const STATS_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Progressing,
    Stalled(String),
}

pub struct Progress {
    stall_timeout: Duration,
    /// The last commit, or the last moment nothing was waiting.
    last_progress: Instant,
    consecutive_failures: u32,
    last_error: Option<String>,
}

impl Progress {
    pub fn new(stall_timeout: Duration, now: Instant) -> Self {
        Progress {
            stall_timeout,
            last_progress: now,
            consecutive_failures: 0,
            last_error: None,
        }
    }

    pub fn committed(&mut self, now: Instant) {
        self.last_progress = now;
        self.consecutive_failures = 0;
        self.last_error = None;
    }

    /// A batch was aborted or a repair failed.
    pub fn failed(&mut self, why: &str) {
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        self.last_error = Some(why.to_string());
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures
    }

    /// Judges the stage: `waiting` says whether records are waiting to be committed
    /// (consumed and not committed, or not yet consumed from the input topic).
    pub fn verdict(&mut self, waiting: bool, unreachable: Duration, now: Instant) -> Verdict {
        if unreachable >= self.stall_timeout + STATS_INTERVAL {
            return Verdict::Stalled(format!(
                "no connection to any Kafka broker for {}s",
                unreachable.as_secs()
            ));
        }
        if !waiting {
            self.last_progress = now;
            return Verdict::Progressing;
        }
        let quiet = now.saturating_duration_since(self.last_progress);
        if quiet < self.stall_timeout {
            return Verdict::Progressing;
        }
        let mut why = format!(
            "stalled: input waiting and nothing committed for {}s",
            quiet.as_secs()
        );
        if self.consecutive_failures > 0 {
            why.push_str(&format!(
                "; {} failed batches in a row",
                self.consecutive_failures
            ));
        }
        if let Some(e) = &self.last_error {
            why.push_str(&format!("; last error: {e}"));
        }
        Verdict::Stalled(why)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_is_healthy_and_waiting_without_commits_is_not() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let up = Duration::ZERO;
        let mut p = Progress::new(s(30), t0);
        assert_eq!(p.verdict(false, up, t0 + s(100)), Verdict::Progressing);
        assert_eq!(p.verdict(true, up, t0 + s(110)), Verdict::Progressing);
        p.failed("commit failed: broker down");
        p.failed("commit failed: broker down");
        let Verdict::Stalled(why) = p.verdict(true, up, t0 + s(131)) else {
            panic!("should be stalled");
        };
        assert!(why.contains("31s"), "{why}");
        assert!(why.contains("2 failed batches"), "{why}");
        assert!(why.contains("broker down"), "{why}");
        p.committed(t0 + s(132));
        assert_eq!(p.consecutive_failures(), 0);
        assert_eq!(p.verdict(true, up, t0 + s(140)), Verdict::Progressing);
    }

    #[test]
    fn no_broker_for_the_stall_timeout_is_a_stall_even_idle() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut p = Progress::new(s(30), t0);
        // One statistics report late is not yet unreachable.
        assert_eq!(p.verdict(false, s(34), t0), Verdict::Progressing);
        let Verdict::Stalled(why) = p.verdict(false, s(35), t0) else {
            panic!("should be stalled");
        };
        assert!(
            why.contains("no connection to any Kafka broker for 35s"),
            "{why}"
        );
    }
}
