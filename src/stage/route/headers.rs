//! The headers and log fields of a routed record: the next hop's headers (routing dropped,
//! trace carried on), its order and trace id, and header sizes as librdkafka counts them.

use rdkafka::message::{Headers, OwnedHeaders};

use crate::kafka::{self, H_TRACEPARENT};
use crate::stage::record::Inbound;

/// Serialized size of headers, as librdkafka counts them (near enough: varint lengths).
pub(super) fn headers_size(headers: &OwnedHeaders) -> usize {
    headers
        .iter()
        .map(|h| h.key.len() + h.value.map_or(0, <[u8]>::len) + 10)
        .sum()
}

pub(super) fn cut_text(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// The order id of a record, for logs: the Kafka key is the order id.
pub fn order_id(record: &Inbound) -> String {
    record
        .key
        .as_deref()
        .map(|k| cut_text(&String::from_utf8_lossy(k), 128))
        .unwrap_or_default()
}

pub(super) fn trace_id(record: &Inbound) -> &str {
    record
        .headers
        .as_ref()
        .and_then(|h| kafka::header_str(h, H_TRACEPARENT))
        .and_then(Result::ok)
        .and_then(crate::trace::trace_id)
        .unwrap_or("")
}

/// The headers of the downstream event: the consumed ones without kop's routing headers,
/// with the trace carried on to a new span.
pub fn next_hop_headers(headers: Option<&OwnedHeaders>) -> OwnedHeaders {
    const SKIPPED: [&str; kafka::ROUTING_HEADERS.len() + 1] = {
        let mut names = [H_TRACEPARENT; kafka::ROUTING_HEADERS.len() + 1];
        let mut i = 0;
        while i < kafka::ROUTING_HEADERS.len() {
            names[i] = kafka::ROUTING_HEADERS[i];
            i += 1;
        }
        names
    };
    let copied = kafka::copy_headers_except(headers, &SKIPPED);
    let parent = headers
        .and_then(|h| kafka::header_str(h, H_TRACEPARENT))
        .and_then(Result::ok);
    let traceparent = parent
        .and_then(crate::trace::next_hop)
        .unwrap_or_else(crate::trace::new_traceparent);
    kafka::with_header(copied, H_TRACEPARENT, &traceparent)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn downstream_headers_carry_the_trace_and_drop_routing() {
        let original = kafka::with_header(
            kafka::with_header(OwnedHeaders::new(), "x-attempt", "2"),
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        );
        let out = next_hop_headers(Some(&original));
        assert!(kafka::header_str(&out, "x-attempt").is_none());
        let tp = kafka::header_str(&out, "traceparent").unwrap().unwrap();
        assert_eq!(
            crate::trace::trace_id(tp),
            Some("0af7651916cd43dd8448eb211c80319c")
        );
        assert_ne!(
            tp,
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        );
    }
}
