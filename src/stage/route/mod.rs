//! What becomes of one record: its downstream event, a retry record or a dead letter.
//!
//! Every record the broker accepted into a consumed topic ends in one of the three, whatever
//! its size, bytes or headers. A dead letter that is too large to be written whole is
//! written bounded (value, key or headers cut, and headers saying what was cut and why); and
//! when the broker refuses a record's outcome outright, the record is dead-lettered with
//! ever tighter bounds, so the partition always moves on.

mod bound;
mod headers;
mod outcome;

use std::time::Instant;

use rdkafka::message::OwnedHeaders;
use tracing::{debug, warn};

use super::record::{Handled, Handler, Inbound};
use crate::config::{RetryConfig, StageConfig};
use crate::retry::{self, Destination, HandlerError, OriginCoordinates, RoutingState};
use headers::{next_hop_headers, order_id, trace_id};

pub use outcome::{OutRecord, Outcome, Target};

/// The stage's topics and policies, as far as one record's fate needs them.
pub struct Router {
    changelog: String,
    output: Option<String>,
    retry_topic: String,
    dlq_topic: String,
    retry: RetryConfig,
    service: String,
    /// The largest record the producer accepts (librdkafka's `message.max.bytes`).
    max_record_bytes: usize,
}

impl Router {
    pub fn new(config: &StageConfig) -> Self {
        let max_record_bytes = config
            .common
            .kafka
            .get("message.max.bytes")
            .and_then(|v| v.parse().ok())
            .unwrap_or(1_000_000);
        Router {
            changelog: config.dedup.changelog.clone(),
            output: config.output.clone(),
            retry_topic: config.retry_topic.clone(),
            dlq_topic: config.dlq_topic.clone(),
            retry: config.retry.clone(),
            service: config.common.service_name.clone(),
            max_record_bytes,
        }
    }

    pub fn topic(&self, target: Target) -> &str {
        match target {
            Target::Output => self.output.as_deref().unwrap_or(&self.dlq_topic),
            Target::Retry => &self.retry_topic,
            Target::DeadLetter => &self.dlq_topic,
            Target::Changelog => &self.changelog,
        }
    }

    /// Handles a record: the routing headers were read already (`routing`), a simulated
    /// failure may be asked for, and the handler decides the rest. Returns the outcome and,
    /// when the record was handled, when its order was accepted (for the end-to-end latency).
    pub fn handle(
        &self,
        handler: &dyn Handler,
        source: Inbound,
        routing: Result<RoutingState, HandlerError>,
        simulated_failure: bool,
        now_ms: u64,
        duration: &prometheus::Histogram,
    ) -> (Outcome, Option<u64>) {
        let started = Instant::now();
        let result = match &routing {
            Err(e) => Err(e.clone()),
            Ok(_) if simulated_failure => Err(HandlerError::transient("simulated failure")),
            Ok(_) => handler.handle(&source),
        };
        duration.observe(started.elapsed().as_secs_f64());
        match result {
            Ok(handled) => {
                // One line per record: at debug, or a busy stage outruns journald's rate
                // limit; counters tell the rest.
                debug!(
                    order_id = %handled.order_id,
                    topic = %source.topic,
                    partition = source.partition,
                    offset = source.offset,
                    attempt = attempt_of(&routing),
                    trace_id = trace_id(&source),
                    "{} done", handler.stage()
                );
                let accepted = handled.accepted_at_ms;
                (self.done(source, handled), Some(accepted))
            }
            Err(error) => (
                self.failed(source, routing.as_ref().ok(), &error, now_ms),
                None,
            ),
        }
    }

    fn done(&self, source: Inbound, handled: Handled) -> Outcome {
        let record = match (&self.output, handled.output) {
            (Some(_), Some(value)) => Some(OutRecord {
                target: Target::Output,
                headers: next_hop_headers(source.headers.as_ref()),
                key: source.key.clone(),
                value: Some(value),
            }),
            _ => None,
        };
        Outcome {
            record,
            source: Some(source),
            truncated: false,
            solo: false,
        }
    }

    /// A failed record goes to the retry topic, or to the DLQ when it is out of attempts
    /// or cannot get better.
    fn failed(
        &self,
        source: Inbound,
        routing: Option<&RoutingState>,
        error: &HandlerError,
        now_ms: u64,
    ) -> Outcome {
        let attempt = routing.map_or(1, |r| r.attempts.saturating_add(1));
        let (target, retry_at) = match retry::next_hop(&self.retry, error.class, attempt, now_ms) {
            Destination::Retry { due_ms } => (Target::Retry, Some(due_ms)),
            Destination::DeadLetter => (Target::DeadLetter, None),
        };
        log_failure(&source, attempt, &error.message, self.topic(target), 0);
        self.routed(
            source,
            routing,
            target,
            attempt,
            &error.message,
            retry_at,
            0,
        )
    }

    /// The broker refused this record's outcome for good (`reason`), for the `level`th time:
    /// it becomes a dead letter, cut further at each level.
    pub fn refused(&self, source: Inbound, reason: &str, level: u8) -> Outcome {
        let routing = retry::read_routing(source.headers.as_ref()).ok();
        let attempt = routing.as_ref().map_or(1, |r| r.attempts.saturating_add(1));
        log_failure(&source, attempt, reason, &self.dlq_topic, level);
        let message = format!("the broker refused the outcome: {reason}");
        self.routed(
            source,
            routing.as_ref(),
            Target::DeadLetter,
            attempt,
            &message,
            None,
            level,
        )
    }

    /// The retry or dead-letter copy of `source`, with kop's routing headers; a dead letter
    /// is cut to fit, more at each `level` (0: only when it cannot fit).
    #[allow(clippy::too_many_arguments)]
    fn routed(
        &self,
        source: Inbound,
        routing: Option<&RoutingState>,
        target: Target,
        attempt: u32,
        error: &str,
        retry_at: Option<u64>,
        level: u8,
    ) -> Outcome {
        let origin = routing
            .and_then(|r| r.origin.clone())
            .filter(|_| source.topic == self.retry_topic)
            .unwrap_or_else(|| OriginCoordinates {
                topic: source.topic.clone(),
                partition: source.partition,
                offset: source.offset,
            });
        let headers_of = |original: Option<&OwnedHeaders>, error: &str| {
            retry::failure_headers(original, attempt, error, &origin, retry_at, &self.service)
        };
        let full = OutRecord {
            target,
            key: source.key.clone(),
            value: source.payload.clone(),
            headers: headers_of(source.headers.as_ref(), error),
        };
        if level == 0 && bound::fits(&full, self.max_record_bytes) {
            return Outcome {
                record: Some(full),
                source: Some(source),
                truncated: false,
                solo: false,
            };
        }
        // A retry record that cannot fit could never be handled either: it is dead.
        let record = bound::dead_letter(&source, error, level, self.max_record_bytes, headers_of);
        Outcome {
            record: Some(record),
            source: Some(source),
            truncated: true,
            solo: false,
        }
    }
}

/// One line per failed record, with the fields `journalctl ORDER_ID=…` finds it by;
/// `refusals` counts how often the broker refused the record's outcome (0: the handler
/// failed it).
fn log_failure(source: &Inbound, attempt: u32, error: &str, to: &str, refusals: u8) {
    warn!(
        order_id = %order_id(source),
        topic = %source.topic,
        partition = source.partition,
        offset = source.offset,
        attempt,
        trace_id = trace_id(source),
        error,
        to,
        refusals,
        "record failed"
    );
}

fn attempt_of(routing: &Result<RoutingState, HandlerError>) -> u32 {
    routing
        .as_ref()
        .map(|r| r.attempts.saturating_add(1))
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::bound::{FRAMING_BYTES, SMALL_BYTES};
    use super::*;
    use crate::config::{Service, StageConfig};
    use crate::kafka::{self, H_ORIGINAL_SIZE, H_TRUNCATED};

    fn router(max: &str) -> Router {
        let env: std::collections::BTreeMap<&str, &str> = Default::default();
        let mut config = StageConfig::load(Service::Payment, None, &env).unwrap();
        config
            .common
            .kafka
            .insert("message.max.bytes".into(), max.into());
        Router::new(&config)
    }

    fn record(value_len: usize) -> Inbound {
        Inbound {
            topic: "orders.created".into(),
            partition: 1,
            offset: 7,
            key: Some(b"o1".to_vec()),
            payload: Some(vec![b'x'; value_len]),
            headers: Some(kafka::with_header(OwnedHeaders::new(), "h", "v")),
        }
    }

    fn header(record: &OutRecord, name: &str) -> Option<String> {
        kafka::header_str(&record.headers, name).map(|v| v.unwrap().to_string())
    }

    #[test]
    fn a_dead_letter_that_fits_is_whole() {
        let router = router("1000000");
        let error = HandlerError::permanent("undecodable");
        let out = router.failed(record(1000), None, &error, 0);
        let r = out.record.unwrap();
        assert_eq!(r.target, Target::DeadLetter);
        assert_eq!(r.value.as_ref().map(Vec::len), Some(1000));
        assert_eq!(header(&r, "h").as_deref(), Some("v"));
        assert_eq!(header(&r, H_TRUNCATED), None);
        assert!(!out.truncated);
    }

    #[test]
    fn a_dead_letter_too_large_for_the_producer_is_cut_to_fit() {
        let router = router("100000");
        let error = HandlerError::permanent("undecodable");
        let out = router.failed(record(150_000), None, &error, 0);
        assert!(out.truncated);
        let r = out.record.unwrap();
        assert!(r.size() <= 100_000 - FRAMING_BYTES, "{}", r.size());
        assert!(r.value.as_ref().unwrap().len() > 90_000);
        assert_eq!(header(&r, H_ORIGINAL_SIZE).as_deref(), Some("150000"));
        let why = header(&r, H_TRUNCATED).unwrap();
        assert!(why.contains("of 150000 bytes"), "{why}");
        assert!(why.contains("message.max.bytes"), "{why}");
        assert_eq!(header(&r, "x-error").as_deref(), Some("undecodable"));
        assert_eq!(header(&r, "x-origin-offset").as_deref(), Some("7"));
    }

    #[test]
    fn a_retry_record_too_large_to_fit_is_dead() {
        let router = router("100000");
        let error = HandlerError::transient("gateway timeout");
        let out = router.failed(record(150_000), None, &error, 0);
        assert_eq!(out.target(), Some(Target::DeadLetter));
    }

    #[test]
    fn each_refusal_cuts_further() {
        let router = router("1000000");
        let one = router.refused(record(5000), "MessageSizeTooLarge", 1);
        let one = one.record.unwrap();
        assert_eq!(one.value.as_ref().map(Vec::len), Some(5000));
        assert!(header(&one, H_TRUNCATED).is_some());
        let two = router
            .refused(record(5000), "MessageSizeTooLarge", 2)
            .record
            .unwrap();
        assert_eq!(two.value.as_ref().map(Vec::len), Some(SMALL_BYTES));
        assert_eq!(header(&two, "h"), None, "original headers dropped");
        let three = router
            .refused(record(5000), "MessageSizeTooLarge", 3)
            .record
            .unwrap();
        assert_eq!(three.value, None);
        assert_eq!(header(&three, H_ORIGINAL_SIZE).as_deref(), Some("5000"));
        assert!(
            header(&three, "x-error")
                .unwrap()
                .contains("MessageSizeTooLarge")
        );
    }

    #[test]
    fn huge_keys_and_headers_are_cut_too() {
        let router = router("100000");
        let mut big = record(10);
        big.key = Some(vec![b'k'; 80_000]);
        big.headers = Some(kafka::with_header(
            OwnedHeaders::new(),
            "big",
            &"h".repeat(80_000),
        ));
        let out = router.failed(big, None, &HandlerError::permanent("bad"), 0);
        let r = out.record.unwrap();
        assert!(r.size() <= 100_000 - FRAMING_BYTES, "{}", r.size());
        assert_eq!(r.key.as_ref().map(Vec::len), Some(SMALL_BYTES));
        assert_eq!(header(&r, "big"), None);
    }
}
