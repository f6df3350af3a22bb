//! The errors of kopctl's Kafka work, each naming the brokers it came from.

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::error::KafkaError;

/// How long a metadata request may wait for a broker: an unreachable broker is reported
/// within seconds rather than after librdkafka's own retries.
pub(super) const METADATA_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("Kafka ({brokers}): {source}")]
    Kafka { brokers: String, source: KafkaError },
    #[error("no broker of {brokers} answered within {}s: {source}", METADATA_TIMEOUT.as_secs())]
    Unreachable { brokers: String, source: KafkaError },
    #[error("topic {topic} does not exist on {brokers}")]
    NoTopic { topic: String, brokers: String },
    #[error("{0}: the end of the topic was not reached within a minute")]
    Timeout(String),
    /// `record` is "<dlq> partition <p> offset <o>".
    #[error(
        "sending {record} to {target} failed: {source}; delivered records are committed, \
         a rerun continues from this one"
    )]
    Send {
        record: String,
        target: String,
        // Boxed: it would make every AdminError twice as large.
        source: Box<KafkaError>,
    },
}

pub(super) fn brokers_of(client: &ClientConfig) -> String {
    client
        .get("bootstrap.servers")
        .unwrap_or("localhost:9092")
        .to_string()
}

/// Binds Kafka errors to the brokers they came from, so every message names them.
pub(super) trait Context<T> {
    fn on(self, brokers: &str) -> Result<T, AdminError>;
}

impl<T> Context<T> for Result<T, KafkaError> {
    fn on(self, brokers: &str) -> Result<T, AdminError> {
        self.map_err(|source| AdminError::Kafka {
            brokers: brokers.to_string(),
            source,
        })
    }
}
