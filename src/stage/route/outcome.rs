//! What handling a record came to: the record to write and the topic it goes to.

use rdkafka::message::OwnedHeaders;

use super::headers::headers_size;
use crate::stage::record::Inbound;

/// Which of the stage's topics a record goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Output,
    Retry,
    DeadLetter,
    /// The changelog of the handled keys (`seen.rs`).
    Changelog,
}

#[derive(Debug)]
pub struct OutRecord {
    pub target: Target,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: OwnedHeaders,
}

impl OutRecord {
    pub fn size(&self) -> usize {
        self.key.as_ref().map_or(0, Vec::len)
            + self.value.as_ref().map_or(0, Vec::len)
            + headers_size(&self.headers)
    }
}

/// What handling a record came to.
#[derive(Debug)]
pub struct Outcome {
    /// The record to produce; `None` when there is nothing to write (the last stage).
    pub record: Option<OutRecord>,
    /// The consumed record, kept while its outcome may have to be written again (a
    /// refused record becomes a dead letter of it).
    pub source: Option<Inbound>,
    /// The dead letter was cut to fit.
    pub truncated: bool,
    /// Written in a transaction of its own: the broker refused this record's outcome once,
    /// perhaps for the batch it was in, so the next refusal is surely its own.
    pub solo: bool,
}

impl Outcome {
    /// Nothing to write: the last stage's outcome, or a repeat's.
    pub fn nothing() -> Self {
        Outcome {
            record: None,
            source: None,
            truncated: false,
            solo: false,
        }
    }

    #[cfg(test)]
    pub fn target(&self) -> Option<Target> {
        self.record.as_ref().map(|r| r.target)
    }
}
