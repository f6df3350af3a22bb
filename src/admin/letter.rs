//! A dead letter as kopctl shows it; bytes that are not text are kept as hex.

use rdkafka::message::{Headers, Message, OwnedMessage};

use crate::kafka::{H_ERROR, H_ORIGIN_TOPIC};

/// Record bytes as given: text when they are UTF-8, hex otherwise, so nothing is lost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bytes {
    Text(String),
    Binary(Vec<u8>),
}

impl Bytes {
    pub(super) fn new(bytes: &[u8]) -> Self {
        match std::str::from_utf8(bytes) {
            Ok(text) => Bytes::Text(text.to_string()),
            Err(_) => Bytes::Binary(bytes.to_vec()),
        }
    }

    pub fn as_text(&self) -> Option<&str> {
        match self {
            Bytes::Text(text) => Some(text),
            Bytes::Binary(_) => None,
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// For a terminal: text as it is unless control characters would garble the line.
impl std::fmt::Display for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Bytes::Text(text) if !text.chars().any(|c| c.is_control() && c != '\t') => {
                f.write_str(text)
            }
            Bytes::Text(text) => write!(f, "(hex) {}", hex(text.as_bytes())),
            Bytes::Binary(bytes) => write!(f, "(hex) {}", hex(bytes)),
        }
    }
}

/// JSON strings carry any UTF-8 exactly; other bytes become `{"hex": "…"}`.
impl serde::Serialize for Bytes {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        match self {
            Bytes::Text(text) => s.serialize_str(text),
            Bytes::Binary(bytes) => {
                let mut map = s.serialize_map(Some(1))?;
                map.serialize_entry("hex", &hex(bytes))?;
                map.end()
            }
        }
    }
}

/// A dead letter as `kopctl dlq list` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeadLetter {
    pub partition: i32,
    pub offset: i64,
    /// Milliseconds since the Unix epoch, as the broker or producer stamped it.
    pub timestamp: Option<i64>,
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
    pub headers: Vec<(String, Option<Bytes>)>,
}

impl DeadLetter {
    pub(super) fn from_message(message: &OwnedMessage) -> Self {
        DeadLetter {
            partition: message.partition(),
            offset: message.offset(),
            timestamp: message.timestamp().to_millis(),
            key: message.key().map(Bytes::new),
            value: message.payload().map(Bytes::new),
            headers: message
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| (h.key.to_string(), h.value.map(Bytes::new)))
                        .collect()
                })
                .unwrap_or_default(),
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.as_ref())
            .and_then(Bytes::as_text)
    }

    /// Whether kop wrote this record to a DLQ: it carries the headers every dead letter gets.
    pub fn is_dead_letter(&self) -> bool {
        self.headers
            .iter()
            .any(|(k, _)| k == H_ERROR || k == H_ORIGIN_TOPIC)
    }
}
