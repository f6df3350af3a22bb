//! What a stage reads and what its handler makes of it.

use rdkafka::message::{BorrowedMessage, Message, OwnedHeaders};

use crate::retry::HandlerError;

/// A consumed record, detached from the consumer.
#[derive(Debug, Clone)]
pub struct Inbound {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Option<OwnedHeaders>,
}

impl Inbound {
    pub(super) fn from_message(message: &BorrowedMessage<'_>) -> Self {
        Inbound {
            topic: message.topic().to_string(),
            partition: message.partition(),
            offset: message.offset(),
            key: message.key().map(<[u8]>::to_vec),
            payload: message.payload().map(<[u8]>::to_vec),
            headers: message.headers().map(|h| h.detach()),
        }
    }

    pub(super) fn size(&self) -> usize {
        self.key.as_ref().map_or(0, Vec::len) + self.payload.as_ref().map_or(0, Vec::len)
    }
}

/// What a handler made of a record.
#[derive(Debug, Clone, PartialEq)]
pub struct Handled {
    pub order_id: String,
    /// When the order was accepted by the API (epoch ms), for the end-to-end latency.
    pub accepted_at_ms: u64,
    /// The value of the downstream event; `None` for the last stage.
    pub output: Option<Vec<u8>>,
}

/// The business rule of a stage. Everything else (batching, retries, transactions) is the
/// stage's; a handler only turns one record into its outcome.
pub trait Handler: Send + Sync + 'static {
    /// The `stage` label of `handler_errors_total`.
    fn stage(&self) -> &'static str;
    fn handle(&self, record: &Inbound) -> Result<Handled, HandlerError>;
}

/// Decodes a JSON payload; anything that does not decode is a permanent error.
pub fn decode<T: serde::de::DeserializeOwned>(record: &Inbound) -> Result<T, HandlerError> {
    let payload = record
        .payload
        .as_deref()
        .ok_or_else(|| HandlerError::permanent("record has no value"))?;
    serde_json::from_slice(payload)
        .map_err(|e| HandlerError::permanent(format!("undecodable payload: {e}")))
}
