//! A broker (or cluster) a test runs for itself with scripts/kafka.sh, to stop, kill or
//! configure it as the shared one cannot be.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::repo;

/// Runs scripts/kafka.sh on the broker (or cluster) of a state directory.
pub fn kafka_sh(state: &Path, args: &[&str]) -> std::process::Output {
    Command::new(repo().join("scripts/kafka.sh"))
        .args(args)
        .env("KOP_KAFKA_STATE", state)
        // A loaded 2-core machine: three JVMs starting at once take a while.
        .env("KOP_KAFKA_START_TIMEOUT", "150")
        .output()
        .expect("run scripts/kafka.sh")
}

/// The last line kafka.sh printed: the bootstrap address (list) after start.
pub fn last_line(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// A broker (or cluster) owned by one test, in a state directory of its own. Dropped, it
/// is deleted; after a failure it is only stopped, and its logs are kept.
pub struct OwnBroker {
    pub state: PathBuf,
    pub address: String,
}

impl OwnBroker {
    pub fn start(state: PathBuf, port: u16) -> OwnBroker {
        OwnBroker::start_with(state, &["--port", &port.to_string()])
    }

    /// `scripts/kafka.sh start` with these options (`--nodes 3`, `--sasl-ssl DIR`, ...).
    pub fn start_with(state: PathBuf, options: &[&str]) -> OwnBroker {
        let output = kafka_sh(&state, &[&["start"], options].concat());
        assert!(
            output.status.success(),
            "scripts/kafka.sh start {} failed:\n{}",
            options.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
        let address = last_line(&output);
        assert!(!address.is_empty(), "kafka.sh printed no address");
        OwnBroker { state, address }
    }

    /// Runs a kafka.sh command on this broker; it must succeed.
    pub fn command(&self, args: &[&str]) -> std::process::Output {
        let output = kafka_sh(&self.state, args);
        assert!(
            output.status.success(),
            "scripts/kafka.sh {}:\n{}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
        output
    }

    pub fn stop(&self) {
        self.command(&["stop"]);
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
        let _ = kafka_sh(&self.state, &[if failed { "stop" } else { "reset" }]);
        if failed {
            eprintln!(
                "broker stopped; its logs are kept in {}",
                self.state.display()
            );
        }
    }
}
