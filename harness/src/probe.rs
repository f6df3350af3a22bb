//! Whether a broker serves clients yet: one Metadata request with librdkafka, the client
//! kop itself uses, so that no client tool (nor a JVM per attempt) is needed.
//!
//! A broker is listed in a Metadata response only after it registered with the controller
//! and was unfenced, i.e. when topics can be created and used. An open port alone is not
//! enough: the listener accepts connections a little earlier.

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};

/// True once the broker on 127.0.0.1:`port` (a PLAINTEXT listener) lists node `id` among
/// the live brokers.
pub(crate) fn lists_node(port: u16, id: u32) -> bool {
    let Ok(client) = ClientConfig::new()
        .set("bootstrap.servers", format!("127.0.0.1:{port}"))
        .set("client.id", "kop-harness")
        // Refused connections are expected while the broker starts: the caller polls.
        .set("log_level", "0")
        .create::<BaseConsumer>()
    else {
        return false;
    };
    let Ok(id) = i32::try_from(id) else {
        return false;
    };
    client
        .fetch_metadata(None, Duration::from_secs(5))
        .is_ok_and(|metadata| metadata.brokers().iter().any(|b| b.id() == id))
}
