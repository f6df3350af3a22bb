//! The series a stage updates per record, looked up once.

use prometheus::IntCounter;

use super::route::Target;
use crate::config::StageConfig;
use crate::metrics::Metrics;

pub(super) struct Counters {
    pub(super) consumed_input: IntCounter,
    pub(super) consumed_retry: IntCounter,
    pub(super) produced: [IntCounter; 4],
    pub(super) retries: IntCounter,
    pub(super) dead_letters: IntCounter,
    pub(super) commits: IntCounter,
    pub(super) aborts: IntCounter,
    pub(super) handler_errors: IntCounter,
}

impl Counters {
    pub(super) fn new(metrics: &Metrics, config: &StageConfig, stage: &str) -> Self {
        let produced = |topic: &str| metrics.produced.with_label_values(&[topic]);
        Counters {
            consumed_input: metrics.consumed.with_label_values(&[&config.input]),
            consumed_retry: metrics.consumed.with_label_values(&[&config.retry_topic]),
            produced: [
                produced(config.output.as_deref().unwrap_or(&config.dlq_topic)),
                produced(&config.retry_topic),
                produced(&config.dlq_topic),
                if config.dedup.enabled {
                    produced(&config.dedup.changelog)
                } else {
                    // Never counted: no series for a changelog that does not exist.
                    IntCounter::new("unused", "unused").expect("a valid name")
                },
            ],
            retries: metrics.retries.with_label_values(&[&config.retry_topic]),
            dead_letters: metrics.dead_letters.with_label_values(&[&config.dlq_topic]),
            commits: metrics.transactions.with_label_values(&["commit"]),
            aborts: metrics.transactions.with_label_values(&["abort"]),
            handler_errors: metrics.handler_errors.with_label_values(&[stage]),
        }
    }

    pub(super) fn produced(&self, target: Target) -> &IntCounter {
        &self.produced[target as usize]
    }
}
