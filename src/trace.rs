//! W3C trace context (`traceparent`) carried in a Kafka header from the API to the last
//! stage, so that one order's log lines can be found across all four daemons.

/// A new trace: version 00, random trace and span ids, sampled.
pub fn new_traceparent() -> String {
    format!("00-{:032x}-{:016x}-01", nonzero_u128(), nonzero_u64())
}

/// The same trace with a new span id for the next hop; `None` when the header is not a
/// valid traceparent (then a new trace starts).
pub fn next_hop(traceparent: &str) -> Option<String> {
    use std::fmt::Write as _;
    let trace_id = trace_id(traceparent)?;
    // Made for every record a stage forwards: written into its final size at once.
    let mut next = String::with_capacity(TRACEPARENT_LEN);
    write!(next, "00-{trace_id}-{:016x}-01", nonzero_u64()).expect("a String takes any text");
    Some(next)
}

/// "00-" + 32 + "-" + 16 + "-01".
const TRACEPARENT_LEN: usize = 55;

/// The trace id of a valid traceparent.
pub fn trace_id(traceparent: &str) -> Option<&str> {
    let mut parts = traceparent.split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let valid = parts.next().is_none()
        && hex(version, 2)
        && version != "ff"
        && hex(trace, 32)
        && trace.bytes().any(|b| b != b'0')
        && hex(span, 16)
        && span.bytes().any(|b| b != b'0')
        && hex(flags, 2);
    valid.then_some(trace)
}

fn nonzero_u64() -> u64 {
    rand::random::<u64>().max(1)
}

fn nonzero_u128() -> u128 {
    rand::random::<u128>().max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trace_keeps_its_id_across_hops() {
        let first = new_traceparent();
        let id = trace_id(&first).unwrap().to_string();
        let second = next_hop(&first).unwrap();
        assert_eq!(trace_id(&second), Some(id.as_str()));
        assert_ne!(first, second);
        assert_eq!(second.len(), TRACEPARENT_LEN);
        assert_eq!(
            trace_id("00-00000000000000000000000000000000-0000000000000001-01"),
            None
        );
        assert_eq!(trace_id("garbage"), None);
    }
}
