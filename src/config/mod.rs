//! Configuration: a TOML file per daemon, overridden by the environment variables the
//! Node.js original used, then validated as a whole.
//!
//! Every error names where the bad value came from (the file and its key, or the environment
//! variable) so that an operator can fix it without reading code; the daemons exit with
//! [`EX_CONFIG`] on any of them and systemd does not restart them in a loop.
//!
//! The file is read into a TOML table, the environment written over it (`env`, which
//! remembers the keys each variable set), and the result deserialized once into the
//! sections of `file`, each with its defaults; `common` and `load` then fill in what
//! depends on the service or on other values, and check the whole, blaming every bad
//! value on its source. This module holds the resolved types the daemons use; the
//! sections that need nothing resolved (`[log]`, `[topics]`, `[simulate]`, `[retry]`)
//! are these types themselves.

mod common;
mod env;
mod file;
mod load;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

pub use common::{check_log_filter, host_name};
pub use env::{Env, ProcessEnv};
pub use file::resolve_path;

/// sysexits(3) `EX_CONFIG`: the configuration is wrong, restarting will not help.
pub const EX_CONFIG: i32 = 78;

/// The four daemons. Each one has its own defaults and its own environment variable names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Service {
    Order,
    Payment,
    Inventory,
    Notification,
}

impl Service {
    /// Short name, used for file names (`etc/kop/<short>.toml`) and the binary (`kop-<short>`).
    pub fn short_name(self) -> &'static str {
        match self {
            Service::Order => "order",
            Service::Payment => "payment",
            Service::Inventory => "inventory",
            Service::Notification => "notification",
        }
    }

    fn default_service_name(self) -> String {
        format!("{}-service", self.short_name())
    }

    fn default_metrics_listen(self) -> SocketAddr {
        // The Node.js original's ports, payment on 9104 as its README lists it.
        let port = match self {
            Service::Order => 9100,
            Service::Payment => 9104,
            Service::Inventory => 9102,
            Service::Notification => 9103,
        };
        SocketAddr::from(([0, 0, 0, 0], port))
    }

    /// The default configuration file when the daemon is installed.
    pub fn default_config_path(self) -> PathBuf {
        PathBuf::from(format!("/etc/kop/{}.toml", self.short_name()))
    }

    /// A stage's default input topic and, unless it is the last stage, output topic.
    fn stage_topics(self) -> Option<(&'static str, Option<&'static str>)> {
        match self {
            Service::Order => None,
            Service::Payment => Some(("orders.created", Some("payments.completed"))),
            Service::Inventory => Some(("payments.completed", Some("inventory.reserved"))),
            Service::Notification => Some(("inventory.reserved", None)),
        }
    }
}

/// Where a bad value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    File(PathBuf),
    Env(&'static str),
    Defaults,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::File(path) => write!(f, "{}", path.display()),
            Origin::Env(var) => write!(f, "environment variable {var}"),
            Origin::Defaults => f.write_str("built-in defaults"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("{}", describe_invalid(origin, key, reason))]
    Invalid {
        origin: Origin,
        key: String,
        reason: String,
    },
}

/// A variable is its own key: it is named once.
fn describe_invalid(origin: &Origin, key: &str, reason: &str) -> String {
    match origin {
        Origin::Env(var) if *var == key => format!("{origin}: {reason}"),
        _ => format!("{origin}: key `{key}`: {reason}"),
    }
}

/// Settings every daemon has.
#[derive(Debug, Clone, PartialEq)]
pub struct Common {
    /// `service` label on metrics and in logs (`SERVICE_NAME`).
    pub service_name: String,
    /// Distinguishes instances of one service; part of the transactional id and the
    /// client id. Defaults to the host name (see [`instance_id`]).
    pub instance_id: String,
    pub log: LogConfig,
    /// Listen address of `/metrics`, `/healthz`, `/readyz` (`METRICS_PORT` sets the port).
    pub metrics_listen: SocketAddr,
    /// librdkafka properties, passed through as they are (`KAFKA_BROKERS` sets
    /// `bootstrap.servers`).
    pub kafka: BTreeMap<String, String>,
    pub topics: TopicsConfig,
    pub simulate: SimulateConfig,
    /// Where the configuration came from, for messages.
    pub origin: Origin,
}

impl Common {
    /// The sections that differ, leaving out what a reload applies (the log level, and
    /// `[simulate]` where `simulate_reloads`).
    fn restart_differences(&self, fresh: &Common, simulate_reloads: bool) -> Vec<&'static str> {
        [
            (
                "service",
                self.service_name != fresh.service_name || self.instance_id != fresh.instance_id,
            ),
            ("log.format", self.log.format != fresh.log.format),
            ("metrics", self.metrics_listen != fresh.metrics_listen),
            ("kafka", self.kafka != fresh.kafka),
            ("topics", self.topics != fresh.topics),
            (
                "simulate",
                !simulate_reloads && self.simulate != fresh.simulate,
            ),
        ]
        .into_iter()
        .filter_map(|(section, differs)| differs.then_some(section))
        .collect()
    }
}

/// `[log]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A tracing filter directive such as `info` or `info,kop=debug`.
    pub level: String,
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// journald when stderr is connected to the journal, else text.
    Auto,
    Journald,
    Text,
    Json,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: LogFormat::Auto,
        }
    }
}

/// `[topics]`: the topics kop creates.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TopicsConfig {
    /// Create missing topics at start.
    pub create: bool,
    pub partitions: i32,
    pub replication_factor: i32,
}

impl Default for TopicsConfig {
    fn default() -> Self {
        TopicsConfig {
            create: true,
            partitions: 3,
            replication_factor: 1,
        }
    }
}

/// `[simulate]`: failure injection for demos and tests; by default none.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SimulateConfig {
    /// Probability (0..=1) that handling a record fails with a transient error.
    pub failure_rate: f64,
    /// Time a handler waits, standing in for a slow downstream call.
    #[serde(deserialize_with = "file::duration")]
    pub delay: Duration,
    /// Stops the processing loop while the process stays up, to prove the watchdog.
    pub stall: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct OrderConfig {
    pub common: Common,
    pub listen: SocketAddr,
    pub topic: String,
    pub max_body_bytes: usize,
    /// Longest time a request waits for the broker's acknowledgement before 503.
    pub produce_timeout: Duration,
    /// Records waiting in the producer; beyond it requests get 503 at once.
    pub max_pending: u32,
    /// How long kop-order may be unable to deliver before it exits non-zero.
    pub stall_timeout: Duration,
    /// A request's head must arrive within this of its first byte.
    pub header_read_timeout: Duration,
    /// A request's body must arrive within this of its head.
    pub body_read_timeout: Duration,
    /// A connection waiting for its next request is closed after this.
    pub idle_timeout: Duration,
    pub max_connections: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Guarantee {
    #[serde(rename = "exactly-once")]
    ExactlyOnce,
    #[serde(rename = "at-least-once")]
    AtLeastOnce,
}

impl std::fmt::Display for Guarantee {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Guarantee::ExactlyOnce => "exactly-once",
            Guarantee::AtLeastOnce => "at-least-once",
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct StageConfig {
    pub common: Common,
    pub input: String,
    pub retry_topic: String,
    pub dlq_topic: String,
    pub output: Option<String>,
    pub group_id: String,
    pub guarantee: Guarantee,
    /// A transaction holds at most this many records.
    pub commit_max_records: usize,
    /// The least time between the starts of two commits (transactions, or at-least-once
    /// offset commits).
    pub commit_interval: Duration,
    /// Records being handled at once (beside up to two transactions' worth waiting for
    /// their commit).
    pub max_in_flight: usize,
    /// With input waiting and nothing committed for this long, the stage is not ready and
    /// stops feeding the watchdog (systemd then restarts it).
    pub stall_timeout: Duration,
    pub retry: RetryConfig,
    pub dedup: DedupConfig,
}

/// The keys a stage has handled, kept so that a repeat of one is not handled again.
#[derive(Debug, Clone, PartialEq)]
pub struct DedupConfig {
    pub enabled: bool,
    /// Keys kept per input partition, at most; the oldest go first.
    pub max_keys: usize,
    /// Keys older than this are forgotten (and deleted from the changelog).
    pub window: Duration,
    /// The compacted topic the keys are written to, in the transaction of the outputs.
    pub changelog: String,
}

/// `[retry]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Counts every attempt, the first included.
    pub max_attempts: u32,
    /// Delay before attempt n+1 is `delays[n-1]`; the last one repeats.
    #[serde(deserialize_with = "file::durations")]
    pub delays: Vec<Duration>,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            max_attempts: 3,
            delays: [1000, 5000, 15000].map(Duration::from_millis).to_vec(),
        }
    }
}

impl RetryConfig {
    /// Delay before the next attempt, after `attempts_so_far` failed ones (≥ 1).
    /// The longest a record ever waits for its next attempt.
    pub fn longest_delay(&self) -> Duration {
        self.delays.iter().copied().max().unwrap_or_default()
    }

    pub fn delay_after(&self, attempts_so_far: u32) -> Duration {
        let index = (attempts_so_far.max(1) - 1) as usize;
        self.delays[index.min(self.delays.len() - 1)]
    }
}
