//! A broker (or cluster) a test runs for itself with kop-harness (what `cargo xtask kafka`
//! runs), to stop, kill or configure it as the shared one cannot be.

use std::path::PathBuf;
use std::time::Duration;

pub use kop_harness::StartOptions;

/// The harness on the broker (or cluster) of a state directory.
pub fn harness(state: &std::path::Path) -> kop_harness::Kafka {
    kop_harness::Kafka::new(state)
        .expect("the broker harness (scripts/kafka/pom.xml)")
        // A loaded 2-core machine: three JVMs starting at once take a while.
        .with_start_timeout(Duration::from_secs(150))
}

/// A broker (or cluster) owned by one test, in a state directory of its own. Dropped, it
/// is deleted; after a failure it is only stopped, and its logs are kept.
pub struct OwnBroker {
    pub state: PathBuf,
    pub address: String,
    kafka: kop_harness::Kafka,
}

impl OwnBroker {
    pub fn start(state: PathBuf, port: u16) -> OwnBroker {
        OwnBroker::start_with(
            state,
            StartOptions {
                port: Some(port),
                ..StartOptions::default()
            },
        )
    }

    /// `cargo xtask kafka start` with these options (`nodes`, `sasl_ssl`, ...).
    pub fn start_with(state: PathBuf, options: StartOptions) -> OwnBroker {
        let kafka = harness(&state);
        let address = kafka
            .start(&options)
            .unwrap_or_else(|e| panic!("starting the broker ({options:?}) failed: {e}"));
        assert!(!address.is_empty(), "the harness returned no address");
        OwnBroker {
            state,
            address,
            kafka,
        }
    }

    pub fn stop(&self) {
        self.kafka.stop().expect("stop the broker");
    }

    /// Crashes node `node` of a cluster: SIGKILL.
    pub fn kill_node(&self, node: u32) {
        self.kafka.stop_node(node, false).expect("stop-node");
    }

    /// Starts node `node` of a cluster again with its data; returns the bootstrap list
    /// once it serves clients.
    pub fn start_node(&self, node: u32) -> String {
        self.kafka.start_node(node).expect("start-node")
    }

    /// Starts it again on the same port, with its data.
    pub fn restart(&self) {
        let port: u16 = self
            .address
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("port");
        let again = OwnBroker::start(self.state.clone(), port);
        assert_eq!(again.address, self.address);
        std::mem::forget(again);
    }
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        let failed = std::thread::panicking();
        let _ = if failed {
            self.kafka.stop()
        } else {
            self.kafka.reset()
        };
        if failed {
            eprintln!(
                "broker stopped; its logs are kept in {}",
                self.state.display()
            );
        }
    }
}
