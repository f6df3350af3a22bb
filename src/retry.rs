//! Retry policy: where a failed record goes next, and what kop's routing headers say.
//!
//! Routing headers arrive from the network and are untrusted: anything malformed is a
//! permanent error for that record (it goes to the DLQ with the reason), never a crash.

use rdkafka::message::{Headers, OwnedHeaders};

use crate::config::RetryConfig;
use crate::kafka::{
    self, H_ATTEMPT, H_ERROR, H_ORIGIN_OFFSET, H_ORIGIN_PARTITION, H_ORIGIN_TOPIC, H_RETRY_AT,
    H_SERVICE, ROUTING_HEADERS,
};

/// How bad a failure is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Trying again cannot help: undecodable payload, schema violation, bad headers.
    Permanent,
    /// May work later: a downstream timeout, a simulated failure.
    Transient,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct HandlerError {
    pub class: ErrorClass,
    pub message: String,
}

impl HandlerError {
    pub fn permanent(message: impl Into<String>) -> Self {
        HandlerError {
            class: ErrorClass::Permanent,
            message: message.into(),
        }
    }

    pub fn transient(message: impl Into<String>) -> Self {
        HandlerError {
            class: ErrorClass::Transient,
            message: message.into(),
        }
    }
}

/// Where a record came from the first time it was consumed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginCoordinates {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// What kop's headers on a consumed record say.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RoutingState {
    /// Attempts already made (0 for a fresh record).
    pub attempts: u32,
    /// Not to be processed before this time (epoch ms).
    pub retry_at: Option<u64>,
    pub origin: Option<OriginCoordinates>,
}

/// Reads the routing headers. An absent header is fine; a present but malformed one is an
/// error naming it.
pub fn read_routing<H: Headers>(headers: Option<&H>) -> Result<RoutingState, HandlerError> {
    let Some(headers) = headers else {
        return Ok(RoutingState::default());
    };
    fn parsed<T: std::str::FromStr, H: Headers>(
        headers: &H,
        name: &str,
    ) -> Result<Option<T>, HandlerError> {
        match kafka::header_str(headers, name) {
            None => Ok(None),
            Some(Err(e)) => Err(HandlerError::permanent(format!("malformed {e}"))),
            Some(Ok(text)) => text.trim().parse().map(Some).map_err(|_| {
                HandlerError::permanent(format!(
                    "malformed header {name}: `{}`",
                    text.escape_debug()
                ))
            }),
        }
    }
    let attempts = parsed::<u32, H>(headers, H_ATTEMPT)?.unwrap_or(0);
    let retry_at = parsed::<u64, H>(headers, H_RETRY_AT)?;
    let origin_topic: Option<String> = parsed(headers, H_ORIGIN_TOPIC)?;
    let origin_partition: Option<i32> = parsed(headers, H_ORIGIN_PARTITION)?;
    let origin_offset: Option<i64> = parsed(headers, H_ORIGIN_OFFSET)?;
    let origin = match (origin_topic, origin_partition, origin_offset) {
        (Some(topic), Some(partition), Some(offset)) => Some(OriginCoordinates {
            topic,
            partition,
            offset,
        }),
        _ => None,
    };
    Ok(RoutingState {
        attempts,
        retry_at,
        origin,
    })
}

/// Where a failed record goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    Retry { due_ms: u64 },
    DeadLetter,
}

/// Decides the next hop of a record whose attempt number `attempt` (1-based, this one
/// included) just failed.
pub fn next_hop(policy: &RetryConfig, class: ErrorClass, attempt: u32, now_ms: u64) -> Destination {
    if class == ErrorClass::Permanent || attempt >= policy.max_attempts {
        Destination::DeadLetter
    } else {
        let delay = policy.delay_after(attempt).as_millis() as u64;
        Destination::Retry {
            due_ms: now_ms.saturating_add(delay),
        }
    }
}

/// The headers of a record sent to a retry or DLQ topic: the original headers, minus
/// earlier routing headers, plus the new ones.
pub fn failure_headers<H: Headers>(
    original: Option<&H>,
    attempt: u32,
    error: &str,
    origin: &OriginCoordinates,
    retry_at: Option<u64>,
    service: &str,
) -> OwnedHeaders {
    let mut headers = kafka::copy_headers_except(original, &ROUTING_HEADERS);
    headers = kafka::with_header(headers, H_ATTEMPT, &attempt.to_string());
    headers = kafka::with_header(headers, H_ERROR, error);
    headers = kafka::with_header(headers, H_ORIGIN_TOPIC, &origin.topic);
    headers = kafka::with_header(headers, H_ORIGIN_PARTITION, &origin.partition.to_string());
    headers = kafka::with_header(headers, H_ORIGIN_OFFSET, &origin.offset.to_string());
    if let Some(due) = retry_at {
        headers = kafka::with_header(headers, H_RETRY_AT, &due.to_string());
    }
    kafka::with_header(headers, H_SERVICE, service)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::Header;
    use std::time::Duration;

    fn policy() -> RetryConfig {
        RetryConfig {
            max_attempts: 3,
            delays: vec![Duration::from_secs(1), Duration::from_secs(5)],
        }
    }

    #[test]
    fn transient_failures_are_retried_until_the_last_attempt() {
        let p = policy();
        assert_eq!(
            next_hop(&p, ErrorClass::Transient, 1, 100),
            Destination::Retry { due_ms: 1100 }
        );
        assert_eq!(
            next_hop(&p, ErrorClass::Transient, 2, 100),
            Destination::Retry { due_ms: 5100 }
        );
        assert_eq!(
            next_hop(&p, ErrorClass::Transient, 3, 100),
            Destination::DeadLetter
        );
        assert_eq!(
            next_hop(&p, ErrorClass::Permanent, 1, 100),
            Destination::DeadLetter
        );
    }

    fn headers(pairs: &[(&str, &[u8])]) -> OwnedHeaders {
        pairs.iter().fold(OwnedHeaders::new(), |h, (k, v)| {
            h.insert(Header {
                key: k,
                value: Some(*v),
            })
        })
    }

    #[test]
    fn routing_headers_are_read_and_malformed_ones_are_permanent_errors() {
        let h = headers(&[
            ("x-attempt", b"2"),
            ("x-retry-at", b"1234"),
            ("x-origin-topic", b"t"),
            ("x-origin-partition", b"1"),
            ("x-origin-offset", b"9"),
        ]);
        let state = read_routing(Some(&h)).unwrap();
        assert_eq!(state.attempts, 2);
        assert_eq!(state.retry_at, Some(1234));
        assert_eq!(state.origin.unwrap().offset, 9);
        for bad in [&b"two"[..], b"-1", b"\xff", b""] {
            let err = read_routing(Some(&headers(&[("x-attempt", bad)]))).unwrap_err();
            assert_eq!(err.class, ErrorClass::Permanent);
            assert!(err.message.contains("x-attempt"), "{}", err.message);
        }
        assert_eq!(
            read_routing::<OwnedHeaders>(None).unwrap(),
            RoutingState::default()
        );
    }

    #[test]
    fn failure_headers_replace_old_routing_and_keep_the_rest() {
        let original = headers(&[
            ("traceparent", b"tp"),
            ("x-attempt", b"1"),
            ("x-error", b"old"),
        ]);
        let origin = OriginCoordinates {
            topic: "orders".into(),
            partition: 2,
            offset: 7,
        };
        let out = failure_headers(Some(&original), 2, "boom", &origin, Some(99), "payment");
        let get = |name| kafka::header_str(&out, name).unwrap().unwrap().to_string();
        assert_eq!(get("traceparent"), "tp");
        assert_eq!(get("x-attempt"), "2");
        assert_eq!(get("x-error"), "boom");
        assert_eq!(get("x-retry-at"), "99");
        assert_eq!(get("x-origin-offset"), "7");
        assert_eq!(out.iter().filter(|h| h.key == "x-attempt").count(), 1);
    }
}
