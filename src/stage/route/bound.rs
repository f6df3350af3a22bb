//! A dead letter cut to fit the producer's record size limit, tighter at each refusal.

use rdkafka::message::OwnedHeaders;

use super::headers::{cut_text, headers_size};
use super::outcome::{OutRecord, Target};
use crate::kafka::{self, H_ORIGINAL_SIZE, H_TRUNCATED};
use crate::stage::record::Inbound;

/// Room left for librdkafka's own framing of a record (its size check counts it).
pub(super) const FRAMING_BYTES: usize = 512;
/// A key or header set larger than this is cut or dropped when a dead letter must shrink.
pub(super) const SMALL_BYTES: usize = 1024;

/// Whether the producer takes `record` whole (librdkafka's `message.max.bytes`).
pub(super) fn fits(record: &OutRecord, max_record_bytes: usize) -> bool {
    record.size() <= max_record_bytes.saturating_sub(FRAMING_BYTES)
}

/// The dead letter of `source`, cut more at each `level` (0: only because it did not fit).
/// `failure_headers` gives kop's routing headers, over the original ones when given, for
/// an error text.
pub(super) fn dead_letter(
    source: &Inbound,
    error: &str,
    level: u8,
    max_record_bytes: usize,
    failure_headers: impl Fn(Option<&OwnedHeaders>, &str) -> OwnedHeaders,
) -> OutRecord {
    let limit = max_record_bytes.saturating_sub(FRAMING_BYTES);
    let mut cuts = Vec::new();
    let error_text = cut_text(error, SMALL_BYTES);
    let original_headers = source.headers.as_ref().map_or(0, headers_size);
    let keep_headers = level <= 1 && original_headers <= SMALL_BYTES.max(limit / 4);
    if !keep_headers && original_headers > 0 {
        cuts.push(format!(
            "original headers ({original_headers} bytes) dropped"
        ));
    }
    let mut key = source.key.clone();
    if let Some(k) = &mut key
        && (level >= 2 || k.len() > limit / 4)
        && k.len() > SMALL_BYTES
    {
        cuts.push(format!("key cut to {SMALL_BYTES} of {} bytes", k.len()));
        k.truncate(SMALL_BYTES);
    }
    let value_len = source.payload.as_ref().map_or(0, Vec::len);
    let mut headers = failure_headers(
        source.headers.as_ref().filter(|_| keep_headers),
        &error_text,
    );
    let room = limit
        .saturating_sub(key.as_ref().map_or(0, Vec::len))
        .saturating_sub(headers_size(&headers))
        .saturating_sub(SMALL_BYTES); // the two headers added below
    let budget = match level {
        0 | 1 => room,
        2 => room.min(SMALL_BYTES),
        _ => 0,
    };
    let value = source.payload.as_ref().and_then(|v| {
        if v.len() <= budget {
            Some(v.clone())
        } else {
            cuts.push(format!("value cut to {budget} of {} bytes", v.len()));
            (budget > 0).then(|| v[..budget].to_vec())
        }
    });
    let why = if level == 0 {
        format!(
            "larger than the producer's message.max.bytes ({})",
            max_record_bytes
        )
    } else {
        error_text.clone()
    };
    headers = kafka::with_header(headers, H_TRUNCATED, &format!("{}: {why}", cuts.join("; ")));
    headers = kafka::with_header(headers, H_ORIGINAL_SIZE, &value_len.to_string());
    OutRecord {
        target: Target::DeadLetter,
        key,
        value,
        headers,
    }
}
