//! Fetches, starts and stops a real Apache Kafka broker for development and tests: by
//! default a single node (one JVM is both broker and controller), optionally a cluster of
//! several such nodes on this machine and/or with an authenticated, encrypted SASL_SSL
//! listener. KRaft mode, no ZooKeeper.
//!
//! There is no tarball download: scripts/kafka/pom.xml names the Kafka jars and Maven
//! collects them (with all runtime dependencies) into a cache directory, so the only
//! prerequisites are Java 17+ and Maven.
//!
//! `cargo xtask kafka` is the command line of this crate; the integration tests use it
//! directly for the brokers they stop, kill or configure themselves.

mod cluster;
mod config;
mod control;
mod fetch;
mod layout;
mod ports;
mod probe;
mod process;

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use control::{NodeStatus, Status};

/// The client port when none is asked for (and `KAFKA_PORT` is not set).
pub const DEFAULT_PORT: u16 = 9092;
/// The largest cluster: node ports are derived from one base, and a small machine runs out
/// of memory long before.
pub const MAX_NODES: u32 = 9;
/// How long `start` waits for the broker(s) unless told otherwise.
pub const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(90);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("cannot run {command}: {source}")]
    Run { command: String, source: io::Error },
    #[error("{0}")]
    Failed(String),
}

pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn fail<T>(message: impl Into<String>) -> Result<T> {
    Err(Error::Failed(message.into()))
}

/// Wraps an I/O error with the file it concerns, so that the message names it.
pub(crate) fn at(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Progress goes to stderr: a caller's stdout is kept for the bootstrap address.
pub(crate) fn say(message: impl std::fmt::Display) {
    eprintln!("kafka: {message}");
}

/// What `start` is asked for. Everything left at its default is taken from the state
/// directory (a cluster, --sasl-ssl) or picked (free ports).
#[derive(Clone, Debug, Default)]
pub struct StartOptions {
    /// The client port, explicitly asked for; 0 picks a free one. `None`: the broker's
    /// default port, and no warning if a running broker listens elsewhere. In a cluster
    /// node i gets port+i-1.
    pub port: Option<u16>,
    /// The KRaft controller port (0: a free one; in a cluster node i gets port+i-1).
    pub controller_port: u16,
    /// With `sasl_ssl`: the PLAINTEXT inter-broker port (0: a free one).
    pub internal_port: u16,
    /// A cluster of this many nodes (1: the single broker); `None`: what the state
    /// directory holds, else 1.
    pub nodes: Option<u32>,
    /// Clients must use SASL_SSL with SCRAM-SHA-512; the directory holds broker-key.pem,
    /// broker-cert.pem and users (see `cargo xtask kafka start --help`).
    pub sasl_ssl: Option<PathBuf>,
}

/// The broker(s) of one state directory.
#[derive(Clone, Debug)]
pub struct Kafka {
    /// Absolute, so that it can be matched against a broker's command line and does not
    /// depend on the caller's working directory.
    state: PathBuf,
    cache: PathBuf,
    /// scripts/kafka: the pom and the logging configuration.
    files: PathBuf,
    version: String,
    java_opts: Vec<String>,
    start_timeout: Duration,
    /// `KAFKA_PORT` as given; checked only by a start that needs it.
    default_port: Option<String>,
}

impl Kafka {
    /// The broker(s) whose state lives in `state`, with the default cache, no extra JVM
    /// options and the default timeout.
    pub fn new(state: impl AsRef<Path>) -> Result<Kafka> {
        let files = repo_root().join("scripts/kafka");
        let version = fetch::kafka_version(&files.join("pom.xml"))?;
        let home = std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_default();
        let state = std::path::absolute(state.as_ref()).map_err(at(state.as_ref()))?;
        Ok(Kafka {
            state,
            cache: home.join(format!(".cache/kop/kafka-{version}")),
            files,
            version,
            java_opts: Vec::new(),
            start_timeout: DEFAULT_START_TIMEOUT,
            default_port: None,
        })
    }

    /// As configured by the environment: `KOP_KAFKA_STATE` (default `<repo>/.kafka`),
    /// `KOP_KAFKA_CACHE`, `KOP_KAFKA_JAVA_OPTS`, `KOP_KAFKA_START_TIMEOUT` and `KAFKA_PORT`.
    pub fn from_env() -> Result<Kafka> {
        let state = std::env::var_os("KOP_KAFKA_STATE")
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| repo_root().join(".kafka"));
        let mut kafka = Kafka::new(state)?;
        if let Some(cache) = std::env::var_os("KOP_KAFKA_CACHE").filter(|s| !s.is_empty()) {
            kafka.cache =
                std::path::absolute(PathBuf::from(&cache)).map_err(at(Path::new(&cache)))?;
        }
        if let Ok(opts) = std::env::var("KOP_KAFKA_JAVA_OPTS") {
            kafka.java_opts = opts.split_whitespace().map(String::from).collect();
        }
        if let Ok(seconds) = std::env::var("KOP_KAFKA_START_TIMEOUT") {
            let seconds: u64 = seconds.trim().parse().or_else(|_| {
                fail(format!(
                    "KOP_KAFKA_START_TIMEOUT needs a number of seconds, got '{seconds}'"
                ))
            })?;
            kafka.start_timeout = Duration::from_secs(seconds);
        }
        kafka.default_port = std::env::var("KAFKA_PORT").ok();
        Ok(kafka)
    }

    /// How long `start` and `start_node` wait for the broker(s) to serve clients.
    pub fn with_start_timeout(mut self, timeout: Duration) -> Kafka {
        self.start_timeout = timeout;
        self
    }

    /// Extra JVM options, after the defaults (so e.g. -Xmx1g wins).
    pub fn with_java_opts(mut self, opts: Vec<String>) -> Kafka {
        self.java_opts = opts;
        self
    }

    pub fn state_dir(&self) -> &Path {
        &self.state
    }

    pub fn cache_dir(&self) -> &Path {
        &self.cache
    }

    /// The Kafka version of scripts/kafka/pom.xml, the one place it is written down.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The client port when none is asked for: `KAFKA_PORT`, else DEFAULT_PORT.
    pub(crate) fn default_port(&self) -> Result<u16> {
        self.default_port
            .as_deref()
            .map_or(Ok(DEFAULT_PORT), |port| parse_port("KAFKA_PORT", port))
    }
}

/// A port number as the command line and `KAFKA_PORT` give it.
pub fn parse_port(what: &str, text: &str) -> Result<u16> {
    text.trim().parse().or_else(|_| {
        fail(format!(
            "{what} needs a port number (0-65535), got '{text}'"
        ))
    })
}

/// The repository whose scripts/kafka (and default state directory) are meant: the one
/// `cargo run` or `cargo test` runs from (cargo sets CARGO_MANIFEST_DIR for the process
/// too: xtask/ or the root), else the one this crate was built in. Not the build's alone:
/// checkouts sharing a CARGO_TARGET_DIR share the compiled harness, and its baked-in
/// path would name whichever checkout built it first.
pub fn repo_root() -> PathBuf {
    let built_in = Path::new(env!("CARGO_MANIFEST_DIR"));
    let running_in = std::env::var_os("CARGO_MANIFEST_DIR").map(PathBuf::from);
    running_in
        .iter()
        .flat_map(|dir| dir.ancestors())
        .chain(built_in.parent())
        .find(|dir| dir.join("scripts/kafka/pom.xml").is_file())
        .unwrap_or(built_in)
        .to_path_buf()
}
