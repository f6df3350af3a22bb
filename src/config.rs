//! Configuration: a TOML file per daemon, overridden by the environment variables the
//! Node.js original used, then validated as a whole.
//!
//! Every error names where the bad value came from (the file and its key, or the environment
//! variable) so that an operator can fix it without reading code; the daemons exit with
//! [`EX_CONFIG`] on any of them and systemd does not restart them in a loop.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rdkafka::ClientConfig;
use serde::{Deserialize, Deserializer};

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

    fn default_metrics_port(self) -> u16 {
        // The Node.js original's ports, payment on 9104 as its README lists it.
        match self {
            Service::Order => 9100,
            Service::Payment => 9104,
            Service::Inventory => 9102,
            Service::Notification => 9103,
        }
    }

    /// The default configuration file when the daemon is installed.
    pub fn default_config_path(self) -> PathBuf {
        PathBuf::from(format!("/etc/kop/{}.toml", self.short_name()))
    }

    /// Topic wiring of a stage: which environment variables name its input, retry, DLQ and
    /// output topics, and its consumer group.
    fn stage_wiring(self) -> Option<StageWiring> {
        Some(match self {
            Service::Order => return None,
            Service::Payment => StageWiring {
                input_var: "ORDER_TOPIC",
                input_default: "orders.created",
                retry_var: "ORDER_RETRY_TOPIC",
                dlq_var: "ORDER_DLQ_TOPIC",
                output: Some(("PAYMENT_COMPLETED_TOPIC", "payments.completed")),
                group_var: "PAYMENT_GROUP_ID",
            },
            Service::Inventory => StageWiring {
                input_var: "PAYMENT_COMPLETED_TOPIC",
                input_default: "payments.completed",
                retry_var: "PAYMENT_RETRY_TOPIC",
                dlq_var: "PAYMENT_DLQ_TOPIC",
                output: Some(("INVENTORY_RESERVED_TOPIC", "inventory.reserved")),
                group_var: "INVENTORY_GROUP_ID",
            },
            Service::Notification => StageWiring {
                input_var: "INVENTORY_RESERVED_TOPIC",
                input_default: "inventory.reserved",
                retry_var: "INVENTORY_RETRY_TOPIC",
                dlq_var: "INVENTORY_DLQ_TOPIC",
                output: None,
                group_var: "NOTIFICATION_GROUP_ID",
            },
        })
    }
}

struct StageWiring {
    input_var: &'static str,
    input_default: &'static str,
    retry_var: &'static str,
    dlq_var: &'static str,
    output: Option<(&'static str, &'static str)>,
    group_var: &'static str,
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

/// Where a value came from: a variable if it was set, else the file (or the defaults),
/// with the key to name for each.
fn source_of(env: &dyn Env, var: &'static str, origin: &Origin, key: &str) -> (Origin, String) {
    if env.get(var).is_some() {
        (Origin::Env(var), var.to_string())
    } else {
        (origin.clone(), key.to_string())
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

#[derive(Debug, Clone, PartialEq)]
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

impl LogFormat {
    fn parse(text: &str) -> Option<Self> {
        match text.trim() {
            "auto" => Some(LogFormat::Auto),
            "journald" => Some(LogFormat::Journald),
            "text" => Some(LogFormat::Text),
            "json" => Some(LogFormat::Json),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct TopicsConfig {
    /// Create missing topics at start.
    pub create: bool,
    pub partitions: i32,
    pub replication_factor: i32,
}

/// Failure injection for demos and tests.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SimulateConfig {
    /// Probability (0..=1) that handling a record fails with a transient error.
    pub failure_rate: f64,
    /// Time a handler waits, standing in for a slow downstream call.
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

impl Guarantee {
    fn parse(text: &str) -> Option<Self> {
        match text.trim() {
            "exactly-once" => Some(Guarantee::ExactlyOnce),
            "at-least-once" => Some(Guarantee::AtLeastOnce),
            _ => None,
        }
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
    /// Read but no longer used: a transaction commits as soon as the previous commit is
    /// done and its records are acknowledged.
    pub commit_interval: Duration,
    /// Records being handled at once.
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

#[derive(Debug, Clone, PartialEq)]
pub struct RetryConfig {
    /// Counts every attempt, the first included.
    pub max_attempts: u32,
    /// Delay before attempt n+1 is `delays[n-1]`; the last one repeats.
    pub delays: Vec<Duration>,
}

// ---- the file format -------------------------------------------------------------------

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ServiceSection {
    name: Option<String>,
    instance_id: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct LogSection {
    level: Option<String>,
    format: Option<LogFormat>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct MetricsSection {
    listen: Option<SocketAddr>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct TopicsSection {
    create: Option<bool>,
    partitions: Option<i32>,
    replication_factor: Option<i32>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct SimulateSection {
    failure_rate: Option<f64>,
    #[serde(default, deserialize_with = "duration_opt")]
    delay: Option<Duration>,
    stall: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct HttpSection {
    listen: Option<SocketAddr>,
    topic: Option<String>,
    max_body_bytes: Option<usize>,
    #[serde(default, deserialize_with = "duration_opt")]
    produce_timeout: Option<Duration>,
    max_pending: Option<u32>,
    #[serde(default, deserialize_with = "duration_opt")]
    stall_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "duration_opt")]
    header_read_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "duration_opt")]
    body_read_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "duration_opt")]
    idle_timeout: Option<Duration>,
    max_connections: Option<usize>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DedupSection {
    enabled: Option<bool>,
    max_keys: Option<usize>,
    #[serde(default, deserialize_with = "duration_opt")]
    window: Option<Duration>,
    changelog: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct StageSection {
    input: Option<String>,
    retry_topic: Option<String>,
    dlq_topic: Option<String>,
    output: Option<String>,
    group_id: Option<String>,
    processing_guarantee: Option<Guarantee>,
    commit_max_records: Option<usize>,
    #[serde(default, deserialize_with = "duration_opt")]
    commit_interval: Option<Duration>,
    max_in_flight: Option<usize>,
    #[serde(default, deserialize_with = "duration_opt")]
    stall_timeout: Option<Duration>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RetrySection {
    max_attempts: Option<u32>,
    #[serde(default, deserialize_with = "durations_opt")]
    delays: Option<Vec<Duration>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct OrderFile {
    #[serde(default)]
    service: ServiceSection,
    #[serde(default)]
    log: LogSection,
    #[serde(default)]
    metrics: MetricsSection,
    #[serde(default)]
    kafka: BTreeMap<String, KafkaValue>,
    #[serde(default)]
    topics: TopicsSection,
    #[serde(default)]
    simulate: SimulateSection,
    #[serde(default)]
    http: HttpSection,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct StageFile {
    #[serde(default)]
    service: ServiceSection,
    #[serde(default)]
    log: LogSection,
    #[serde(default)]
    metrics: MetricsSection,
    #[serde(default)]
    kafka: BTreeMap<String, KafkaValue>,
    #[serde(default)]
    topics: TopicsSection,
    #[serde(default)]
    simulate: SimulateSection,
    #[serde(default)]
    stage: StageSection,
    #[serde(default)]
    retry: RetrySection,
    #[serde(default)]
    dedup: DedupSection,
}

/// librdkafka takes every property as a string; TOML lets operators write numbers and
/// booleans naturally.
#[derive(Deserialize)]
#[serde(untagged)]
enum KafkaValue {
    String(String),
    Integer(i64),
    Float(f64),
    Bool(bool),
}

impl KafkaValue {
    fn into_string(self) -> String {
        match self {
            KafkaValue::String(s) => s,
            KafkaValue::Integer(i) => i.to_string(),
            KafkaValue::Float(f) => f.to_string(),
            KafkaValue::Bool(b) => b.to_string(),
        }
    }
}

fn duration_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let text = String::deserialize(d)?;
    parse_duration(&text)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

fn durations_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<Duration>>, D::Error> {
    let texts = Vec::<String>::deserialize(d)?;
    texts
        .iter()
        .map(|t| parse_duration(t))
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
        .map_err(serde::de::Error::custom)
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text)
        .map_err(|e| format!("`{text}` is not a duration ({e}); write e.g. \"500ms\" or \"5s\""))
}

// ---- loading ---------------------------------------------------------------------------

/// Reads the environment; a function so tests can pass a map instead of the process
/// environment.
pub trait Env {
    fn get(&self, name: &str) -> Option<String>;
}

/// The real process environment. Empty values count as unset, as they did in the original.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn get(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.trim().is_empty())
    }
}

impl Env for BTreeMap<&str, &str> {
    fn get(&self, name: &str) -> Option<String> {
        BTreeMap::get(self, name).map(|v| v.to_string())
    }
}

/// Which file to read: the one given, else the installed default if present, else none.
pub fn resolve_path(service: Service, given: Option<&Path>) -> Option<PathBuf> {
    match given {
        Some(path) => Some(path.to_path_buf()),
        None => {
            let installed = service.default_config_path();
            installed.exists().then_some(installed)
        }
    }
}

fn read_file<T: for<'de> Deserialize<'de> + Default>(
    path: Option<&Path>,
) -> Result<(T, Origin), ConfigError> {
    let Some(path) = path else {
        return Ok((T::default(), Origin::Defaults));
    };
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let deserializer = toml::de::Deserializer::parse(&text).map_err(|e| ConfigError::Syntax {
        path: path.to_path_buf(),
        message: e.to_string().trim_end().to_string(),
    })?;
    let parsed = serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let key = e.path().to_string();
        let mut inner = e.into_inner();
        inner.set_input(None);
        ConfigError::Invalid {
            origin: Origin::File(path.to_path_buf()),
            key,
            reason: inner.message().to_string(),
        }
    })?;
    Ok((parsed, Origin::File(path.to_path_buf())))
}

fn env_parse<T: std::str::FromStr>(
    env: &dyn Env,
    var: &'static str,
) -> Result<Option<T>, ConfigError>
where
    T::Err: std::fmt::Display,
{
    match env.get(var) {
        None => Ok(None),
        Some(raw) => raw
            .trim()
            .parse()
            .map(Some)
            .map_err(|e: T::Err| ConfigError::Invalid {
                origin: Origin::Env(var),
                key: var.to_string(),
                reason: format!("`{raw}`: {e}"),
            }),
    }
}

const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

/// A log filter as tracing reads it (`info`, `warn,kop=debug`, ...), where every level is a
/// level. tracing takes a bare word for a target, so `warning` would be a valid filter that
/// shows nothing at all, errors included: refused here, with the level meant.
pub fn check_log_filter(filter: &str) -> Result<(), String> {
    tracing_subscriber::EnvFilter::try_new(filter).map_err(|e| e.to_string())?;
    for directive in filter.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        // `target[span{field=value}]=level`: the level follows the last `=` after any `]`.
        let tail = directive.rsplit(']').next().unwrap_or(directive);
        let level = tail.rsplit('=').next().unwrap_or(tail).trim();
        let known = LEVELS.iter().any(|l| l.eq_ignore_ascii_case(level))
            || matches!(level, "0" | "1" | "2" | "3" | "4" | "5");
        if !known {
            let meant = match level.to_ascii_lowercase().as_str() {
                "warning" => "; did you mean `warn`?",
                "verbose" | "all" => "; did you mean `debug` or `trace`?",
                "fatal" | "critical" | "err" => "; did you mean `error`?",
                "none" | "quiet" | "silent" => "; did you mean `off`?",
                _ => "",
            };
            return Err(format!(
                "`{level}` is not a level (trace, debug, info, warn, error, off){meant}"
            ));
        }
    }
    Ok(())
}

fn invalid(origin: &Origin, key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        origin: origin.clone(),
        key: key.to_string(),
        reason: reason.into(),
    }
}

/// librdkafka properties kop sets itself, because its guarantees or its health checks rest
/// on them: a `[kafka]` value would be overridden, so it is refused.
fn owned_kafka_keys(
    service: Service,
) -> impl Iterator<Item = &'static (&'static str, &'static str)> {
    const EVERY_DAEMON: &[(&str, &str)] = &[
        ("enable.idempotence", "every producer is idempotent"),
        (
            "acks",
            "every record is acknowledged by all in-sync replicas",
        ),
        (
            "statistics.interval.ms",
            "the health checks read the statistics",
        ),
    ];
    const STAGES: &[(&str, &str)] = &[
        (
            "transactional.id",
            "it is kop-<service.name>-<service.instance_id>",
        ),
        (
            "transaction.timeout.ms",
            "exactly-once sets it with message.timeout.ms",
        ),
        (
            "message.timeout.ms",
            "exactly-once keeps it below the transaction timeout",
        ),
        ("isolation.level", "a stage reads committed records only"),
        (
            "enable.auto.commit",
            "offsets are committed once outcomes are durable",
        ),
        (
            "enable.auto.offset.store",
            "offsets are committed once outcomes are durable",
        ),
        ("group.id", "it is stage.group_id"),
    ];
    let stage_keys = if service == Service::Order {
        &[][..]
    } else {
        STAGES
    };
    EVERY_DAEMON.iter().chain(stage_keys)
}

#[allow(clippy::too_many_arguments)]
fn common(
    service: Service,
    origin: Origin,
    svc: ServiceSection,
    log: LogSection,
    metrics: MetricsSection,
    kafka: BTreeMap<String, KafkaValue>,
    topics: TopicsSection,
    simulate: SimulateSection,
    env: &dyn Env,
) -> Result<Common, ConfigError> {
    let mut kafka: BTreeMap<String, String> = kafka
        .into_iter()
        .map(|(k, v)| (k, v.into_string()))
        .collect();
    if let Some((key, why)) = owned_kafka_keys(service).find(|(key, _)| kafka.contains_key(*key)) {
        return Err(invalid(
            &origin,
            &format!("kafka.\"{key}\""),
            format!("kop sets this property itself ({why}); remove it"),
        ));
    }
    kafka
        .entry("bootstrap.servers".into())
        .or_insert_with(|| "localhost:9092".into());
    let brokers_from_env = env.get("KAFKA_BROKERS");
    if let Some(brokers) = &brokers_from_env {
        kafka.insert("bootstrap.servers".into(), brokers.clone());
    }

    let mut metrics_listen = metrics
        .listen
        .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], service.default_metrics_port())));
    if let Some(port) = env_parse::<u16>(env, "METRICS_PORT")? {
        metrics_listen.set_port(port);
    }

    let mut simulate = SimulateConfig {
        failure_rate: simulate.failure_rate.unwrap_or(0.0),
        delay: simulate.delay.unwrap_or(Duration::ZERO),
        stall: simulate.stall.unwrap_or(false),
    };
    let (rate_origin, rate_key) = source_of(
        env,
        "SIMULATE_FAILURE_RATE",
        &origin,
        "simulate.failure_rate",
    );
    if let Some(rate) = env_parse::<f64>(env, "SIMULATE_FAILURE_RATE")? {
        simulate.failure_rate = rate;
    }
    if let Some(ms) = env_parse::<u64>(env, "SIMULATE_DELAY_MS")? {
        simulate.delay = Duration::from_millis(ms);
    }
    if !(0.0..=1.0).contains(&simulate.failure_rate) {
        return Err(invalid(
            &rate_origin,
            &rate_key,
            format!("{} is not between 0 and 1", simulate.failure_rate),
        ));
    }

    let topics = TopicsConfig {
        create: topics.create.unwrap_or(true),
        partitions: topics.partitions.unwrap_or(3),
        replication_factor: topics.replication_factor.unwrap_or(1),
    };
    if topics.partitions < 1 {
        return Err(invalid(&origin, "topics.partitions", "must be at least 1"));
    }
    if topics.replication_factor < 1 {
        return Err(invalid(
            &origin,
            "topics.replication_factor",
            "must be at least 1",
        ));
    }

    let log = LogConfig {
        level: env
            .get("LOG_LEVEL")
            .or(log.level)
            .unwrap_or_else(|| "info".into()),
        format: match env.get("LOG_FORMAT") {
            None => log.format.unwrap_or(LogFormat::Auto),
            Some(text) => LogFormat::parse(&text).ok_or_else(|| ConfigError::Invalid {
                origin: Origin::Env("LOG_FORMAT"),
                key: "LOG_FORMAT".into(),
                reason: format!("`{text}`: expected auto, journald, text or json"),
            })?,
        },
    };
    // Blame the level on where it came from.
    let (level_origin, level_key) = match env.get("LOG_LEVEL") {
        Some(_) => (Origin::Env("LOG_LEVEL"), "LOG_LEVEL"),
        None => (origin.clone(), "log.level"),
    };
    check_log_filter(&log.level).map_err(|reason| {
        invalid(
            &level_origin,
            level_key,
            format!("`{}`: {reason}", log.level),
        )
    })?;

    let common = Common {
        service_name: env
            .get("SERVICE_NAME")
            .or(svc.name)
            .unwrap_or_else(|| service.default_service_name()),
        instance_id: instance_id(env, &origin, svc.instance_id, host_name)?,
        log,
        metrics_listen,
        kafka,
        topics,
        simulate,
        origin,
    };
    validate_kafka_properties(&common, brokers_from_env.is_some())?;
    Ok(common)
}

/// Where the default instance id comes from: the kernel's host name, the same as
/// `hostname` prints and systemd's `%l`/`%H` start from.
const HOST_NAME_FILE: &str = "/proc/sys/kernel/hostname";

/// The host name, or why there is none. The kernel says `(none)` when it was never set.
pub fn host_name() -> Result<String, String> {
    let text = std::fs::read_to_string(HOST_NAME_FILE)
        .map_err(|e| format!("cannot read {HOST_NAME_FILE}: {e}"))?;
    let name = text.trim();
    if name.is_empty() || name == "(none)" {
        return Err(format!("{HOST_NAME_FILE} holds no host name"));
    }
    Ok(name.to_string())
}

/// The instance id: `KOP_INSTANCE_ID`, else `[service] instance_id`, else the host name,
/// so that the same file on several hosts gives each its own transactional id (two
/// producers sharing one fence each other in turn). It becomes part of the transactional
/// id and the client id: Kafka's legal characters for those, as for topic names.
fn instance_id(
    env: &dyn Env,
    origin: &Origin,
    from_file: Option<String>,
    host_name: fn() -> Result<String, String>,
) -> Result<String, ConfigError> {
    const KEY: &str = "service.instance_id";
    let (id, origin, key, what) = match (env.get("KOP_INSTANCE_ID"), from_file) {
        (Some(id), _) => (id, Origin::Env("KOP_INSTANCE_ID"), "KOP_INSTANCE_ID", ""),
        (None, Some(id)) => (id, origin.clone(), KEY, ""),
        (None, None) => match host_name() {
            Ok(name) => (name, origin.clone(), KEY, " (the host name, the default)"),
            Err(why) => {
                return Err(invalid(
                    origin,
                    KEY,
                    format!(
                        "not set, and the host name it defaults to is unknown ({why}); \
                         set it, or KOP_INSTANCE_ID"
                    ),
                ));
            }
        },
    };
    let legal = !id.is_empty()
        && id.len() <= 249
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if legal {
        Ok(id)
    } else {
        let hint = if what.is_empty() {
            ""
        } else {
            "; set service.instance_id or KOP_INSTANCE_ID"
        };
        Err(invalid(
            &origin,
            key,
            format!(
                "`{id}`{what} is not a legal instance id (1..249 of [a-zA-Z0-9._-]: it is \
                 part of the transactional id and the client id){hint}"
            ),
        ))
    }
}

/// Lets librdkafka itself judge the passthrough properties, so that a typo fails at start
/// with the property's name instead of being ignored.
fn validate_kafka_properties(common: &Common, brokers_from_env: bool) -> Result<(), ConfigError> {
    let mut client = ClientConfig::new();
    for (key, value) in &common.kafka {
        client.set(key, value);
    }
    client
        .create_native_config()
        .map(drop)
        .map_err(|e| match e {
            rdkafka::error::KafkaError::ClientConfig(_, description, key, _) => {
                let origin = if key == "bootstrap.servers" && brokers_from_env {
                    Origin::Env("KAFKA_BROKERS")
                } else {
                    common.origin.clone()
                };
                invalid(&origin, &format!("kafka.\"{key}\""), description)
            }
            other => invalid(&common.origin, "kafka", other.to_string()),
        })
}

fn topic_name(origin: &Origin, key: &str, name: &str) -> Result<(), ConfigError> {
    // Kafka's own rule for topic names.
    let legal = !name.is_empty()
        && name.len() <= 249
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if legal {
        Ok(())
    } else {
        Err(invalid(
            origin,
            key,
            format!("`{name}` is not a legal Kafka topic name (1..249 of [a-zA-Z0-9._-])"),
        ))
    }
}

impl OrderConfig {
    /// The sections of `fresh` (a reloaded file) that differ from this running
    /// configuration and apply only at a restart (all but the log level).
    pub fn needs_restart(&self, fresh: &OrderConfig) -> Vec<&'static str> {
        let mut sections = self.common.restart_differences(&fresh.common, false);
        let mut http = fresh.clone();
        http.common = self.common.clone();
        if http != *self {
            sections.push("http");
        }
        sections
    }

    pub fn load(path: Option<&Path>, env: &dyn Env) -> Result<Self, ConfigError> {
        let (file, origin): (OrderFile, Origin) = read_file(path)?;
        let http = file.http;
        let common = common(
            Service::Order,
            origin.clone(),
            file.service,
            file.log,
            file.metrics,
            file.kafka,
            file.topics,
            file.simulate,
            env,
        )?;
        let mut listen = http
            .listen
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 4000)));
        if let Some(port) = env_parse::<u16>(env, "PORT")? {
            listen.set_port(port);
        }
        let topic = env
            .get("ORDER_TOPIC")
            .or(http.topic)
            .unwrap_or_else(|| "orders.created".into());
        let (topic_origin, topic_key) = source_of(env, "ORDER_TOPIC", &origin, "http.topic");
        topic_name(&topic_origin, &topic_key, &topic)?;
        let config = OrderConfig {
            common,
            listen,
            topic,
            max_body_bytes: http.max_body_bytes.unwrap_or(64 * 1024),
            produce_timeout: http.produce_timeout.unwrap_or(Duration::from_secs(5)),
            max_pending: http.max_pending.unwrap_or(100_000),
            stall_timeout: http.stall_timeout.unwrap_or(Duration::from_secs(60)),
            header_read_timeout: http.header_read_timeout.unwrap_or(Duration::from_secs(10)),
            body_read_timeout: http.body_read_timeout.unwrap_or(Duration::from_secs(10)),
            idle_timeout: http.idle_timeout.unwrap_or(Duration::from_secs(60)),
            max_connections: http.max_connections.unwrap_or(4096),
        };
        if config.max_body_bytes == 0 {
            return Err(invalid(&origin, "http.max_body_bytes", "must be positive"));
        }
        if config.produce_timeout < Duration::from_millis(100) {
            return Err(invalid(
                &origin,
                "http.produce_timeout",
                "must be at least 100ms",
            ));
        }
        if config.max_pending == 0 {
            return Err(invalid(&origin, "http.max_pending", "must be positive"));
        }
        if config.stall_timeout < Duration::from_secs(1) {
            return Err(invalid(
                &origin,
                "http.stall_timeout",
                "must be at least 1s",
            ));
        }
        Ok(config)
    }
}

impl StageConfig {
    /// The sections of `fresh` (a reloaded file) that differ from this running
    /// configuration and apply only at a restart.
    pub fn needs_restart(&self, fresh: &StageConfig) -> Vec<&'static str> {
        let mut sections = self.common.restart_differences(&fresh.common, true);
        let mut stage = fresh.clone();
        stage.common = self.common.clone();
        stage.retry = self.retry.clone();
        stage.dedup = self.dedup.clone();
        if stage != *self {
            sections.push("stage");
        }
        if self.retry != fresh.retry {
            sections.push("retry");
        }
        if self.dedup != fresh.dedup {
            sections.push("dedup");
        }
        sections
    }

    pub fn load(service: Service, path: Option<&Path>, env: &dyn Env) -> Result<Self, ConfigError> {
        let wiring = service
            .stage_wiring()
            .ok_or_else(|| invalid(&Origin::Defaults, "service", "kop-order is not a stage"))?;
        let (file, origin): (StageFile, Origin) = read_file(path)?;
        let stage = file.stage;
        let retry = file.retry;
        let common = common(
            service,
            origin.clone(),
            file.service,
            file.log,
            file.metrics,
            file.kafka,
            file.topics,
            file.simulate,
            env,
        )?;

        let input_from_env = env.get(wiring.input_var);
        let input = input_from_env
            .clone()
            .or(stage.input)
            .unwrap_or_else(|| wiring.input_default.into());
        // A retry or DLQ name follows the input topic, as in the original, unless it is given
        // at the same level: an input renamed by the environment takes the file's names along.
        let (file_retry, file_dlq) = match input_from_env {
            Some(_) => (None, None),
            None => (stage.retry_topic, stage.dlq_topic),
        };
        let retry_topic = env
            .get(wiring.retry_var)
            .or(file_retry)
            .unwrap_or_else(|| format!("{input}.retry"));
        let dlq_topic = env
            .get(wiring.dlq_var)
            .or(file_dlq)
            .unwrap_or_else(|| format!("{input}.dlq"));
        let output = match wiring.output {
            None => {
                if stage.output.is_some() {
                    return Err(invalid(
                        &origin,
                        "stage.output",
                        format!(
                            "kop-{} is the last stage and produces nothing",
                            service.short_name()
                        ),
                    ));
                }
                None
            }
            Some((var, default)) => Some(
                env.get(var)
                    .or(stage.output)
                    .unwrap_or_else(|| default.into()),
            ),
        };
        for (var, key, name) in [
            (Some(wiring.input_var), "stage.input", Some(&input)),
            (
                Some(wiring.retry_var),
                "stage.retry_topic",
                Some(&retry_topic),
            ),
            (Some(wiring.dlq_var), "stage.dlq_topic", Some(&dlq_topic)),
            (
                wiring.output.map(|(var, _)| var),
                "stage.output",
                output.as_ref(),
            ),
        ] {
            if let Some(name) = name {
                let (origin, key) = match var {
                    Some(var) => source_of(env, var, &origin, key),
                    None => (origin.clone(), key.to_string()),
                };
                topic_name(&origin, &key, name)?;
            }
        }
        let distinct: std::collections::BTreeSet<_> = [&input, &retry_topic, &dlq_topic]
            .into_iter()
            .chain(output.as_ref())
            .collect();
        if distinct.len() != 3 + usize::from(output.is_some()) {
            return Err(invalid(
                &origin,
                "stage",
                "input, retry, DLQ and output topics must all differ",
            ));
        }

        let group_id = env
            .get(wiring.group_var)
            .or(stage.group_id)
            .unwrap_or_else(|| common.service_name.clone());

        let mut retry = RetryConfig {
            max_attempts: retry.max_attempts.unwrap_or(3),
            delays: retry
                .delays
                .unwrap_or_else(|| [1000, 5000, 15000].map(Duration::from_millis).to_vec()),
        };
        if let Some(n) = env_parse::<u32>(env, "MAX_PROCESSING_ATTEMPTS")? {
            retry.max_attempts = n;
        }
        if let Some(list) = env.get("RETRY_DELAYS_MS") {
            retry.delays = list
                .split(',')
                .map(|ms| ms.trim().parse::<u64>().map(Duration::from_millis))
                .collect::<Result<_, _>>()
                .map_err(|e| ConfigError::Invalid {
                    origin: Origin::Env("RETRY_DELAYS_MS"),
                    key: "RETRY_DELAYS_MS".into(),
                    reason: format!("`{list}` is not a comma list of milliseconds: {e}"),
                })?;
        }
        if retry.max_attempts < 1 {
            let (origin, key) = source_of(
                env,
                "MAX_PROCESSING_ATTEMPTS",
                &origin,
                "retry.max_attempts",
            );
            return Err(invalid(
                &origin,
                &key,
                format!("`{}`: must be at least 1", retry.max_attempts),
            ));
        }
        if retry.delays.is_empty() {
            return Err(invalid(&origin, "retry.delays", "needs at least one delay"));
        }

        let changelog = file
            .dedup
            .changelog
            .clone()
            .unwrap_or_else(|| format!("{group_id}.dedup-changelog"));
        let config = StageConfig {
            common,
            input,
            retry_topic,
            dlq_topic,
            output,
            group_id,
            guarantee: match env.get("PROCESSING_GUARANTEE") {
                None => stage.processing_guarantee.unwrap_or(Guarantee::ExactlyOnce),
                Some(text) => Guarantee::parse(&text).ok_or_else(|| ConfigError::Invalid {
                    origin: Origin::Env("PROCESSING_GUARANTEE"),
                    key: "PROCESSING_GUARANTEE".into(),
                    reason: format!("`{text}`: expected exactly-once or at-least-once"),
                })?,
            },
            commit_max_records: stage.commit_max_records.unwrap_or(500),
            commit_interval: stage.commit_interval.unwrap_or(Duration::from_millis(50)),
            max_in_flight: stage.max_in_flight.unwrap_or(1000),
            stall_timeout: stage.stall_timeout.unwrap_or(Duration::from_secs(60)),
            retry,
            dedup: DedupConfig {
                // kop-payment pays each order once; the stages after it see each payment
                // once when it runs exactly once.
                enabled: file
                    .dedup
                    .enabled
                    .unwrap_or(matches!(service, Service::Payment)),
                max_keys: file.dedup.max_keys.unwrap_or(100_000),
                window: file.dedup.window.unwrap_or(Duration::from_secs(24 * 3600)),
                changelog,
            },
        };
        if config.commit_max_records == 0 {
            return Err(invalid(
                &origin,
                "stage.commit_max_records",
                "must be positive",
            ));
        }
        if config.commit_interval.is_zero() {
            return Err(invalid(
                &origin,
                "stage.commit_interval",
                "must be positive",
            ));
        }
        if config.max_in_flight == 0 {
            return Err(invalid(&origin, "stage.max_in_flight", "must be positive"));
        }
        if config.stall_timeout < Duration::from_secs(1) {
            return Err(invalid(
                &origin,
                "stage.stall_timeout",
                "must be at least 1s",
            ));
        }
        if config.dedup.max_keys == 0 {
            return Err(invalid(&origin, "dedup.max_keys", "must be positive"));
        }
        if config.dedup.window < Duration::from_secs(1) {
            return Err(invalid(&origin, "dedup.window", "must be at least 1s"));
        }
        topic_name(&origin, "dedup.changelog", &config.dedup.changelog)?;
        Ok(config)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&'static str, &'static str)]) -> BTreeMap<&'static str, &'static str> {
        pairs.iter().copied().collect()
    }

    fn write(text: &str) -> (tempdir::Dir, PathBuf) {
        let dir = tempdir::Dir::new();
        let path = dir.0.join("kop.toml");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Self {
                let path = std::env::temp_dir().join(format!(
                    "kop-config-test-{}-{}",
                    std::process::id(),
                    rand::random::<u64>()
                ));
                std::fs::create_dir_all(&path).unwrap();
                Dir(path)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn defaults_without_a_file_match_the_original() {
        let c = StageConfig::load(Service::Payment, None, &env(&[])).unwrap();
        assert_eq!(c.input, "orders.created");
        assert_eq!(c.retry_topic, "orders.created.retry");
        assert_eq!(c.dlq_topic, "orders.created.dlq");
        assert_eq!(c.output.as_deref(), Some("payments.completed"));
        assert_eq!(c.common.metrics_listen.port(), 9104);
        assert_eq!(c.common.kafka["bootstrap.servers"], "localhost:9092");
        assert_eq!(c.retry.max_attempts, 3);
        assert_eq!(c.guarantee, Guarantee::ExactlyOnce);
        let o = OrderConfig::load(None, &env(&[])).unwrap();
        assert_eq!(o.listen.port(), 4000);
        assert_eq!(o.common.metrics_listen.port(), 9100);
        assert_eq!(Ok(c.common.instance_id), host_name());
        let n = StageConfig::load(Service::Notification, None, &env(&[])).unwrap();
        assert_eq!(n.output, None);
        assert_eq!(n.common.metrics_listen.port(), 9103);
    }

    #[test]
    fn environment_overrides_with_the_original_names() {
        let e = env(&[
            ("KAFKA_BROKERS", "k1:9092,k2:9092"),
            ("PAYMENT_COMPLETED_TOPIC", "pay"),
            ("INVENTORY_RESERVED_TOPIC", "inv"),
            ("PAYMENT_GROUP_ID", "g"),
            ("MAX_PROCESSING_ATTEMPTS", "5"),
            ("RETRY_DELAYS_MS", "10, 20"),
            ("METRICS_PORT", "19102"),
            ("SERVICE_NAME", "inv-a"),
        ]);
        let c = StageConfig::load(Service::Inventory, None, &e).unwrap();
        assert_eq!(c.input, "pay");
        assert_eq!(c.retry_topic, "pay.retry");
        assert_eq!(c.output.as_deref(), Some("inv"));
        assert_eq!(c.group_id, "inv-a");
        assert_eq!(c.common.kafka["bootstrap.servers"], "k1:9092,k2:9092");
        assert_eq!(c.retry.max_attempts, 5);
        assert_eq!(c.retry.delay_after(1), Duration::from_millis(10));
        assert_eq!(c.retry.delay_after(7), Duration::from_millis(20));
        assert_eq!(c.common.metrics_listen.port(), 19102);
        let (_dir, path) = write("[stage]\ninput = \"a\"\nretry_topic = \"a.r\"\n");
        let c = StageConfig::load(Service::Inventory, Some(&path), &env(&[])).unwrap();
        assert_eq!(c.retry_topic, "a.r");
        assert_eq!(c.dlq_topic, "a.dlq");
        let e = env(&[("PAYMENT_COMPLETED_TOPIC", "b")]);
        let c = StageConfig::load(Service::Inventory, Some(&path), &e).unwrap();
        assert_eq!(
            c.retry_topic, "b.retry",
            "the retry topic follows an input renamed by env"
        );
    }

    #[test]
    fn shipped_files_hold_the_defaults() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("etc/kop");
        let e = env(&[]);
        assert_eq!(
            OrderConfig::load(Some(&root.join("order.toml")), &e)
                .unwrap()
                .listen,
            OrderConfig::load(None, &e).unwrap().listen
        );
        for service in [Service::Payment, Service::Inventory, Service::Notification] {
            let path = root.join(format!("{}.toml", service.short_name()));
            let mut from_file = StageConfig::load(service, Some(&path), &e).unwrap();
            let defaults = StageConfig::load(service, None, &e).unwrap();
            from_file.common.origin = Origin::Defaults;
            assert_eq!(from_file, defaults, "{}", path.display());
        }
        let mut from_file = OrderConfig::load(Some(&root.join("order.toml")), &e).unwrap();
        from_file.common.origin = Origin::Defaults;
        assert_eq!(from_file, OrderConfig::load(None, &e).unwrap());
    }

    fn error_of(text: &str, e: &[(&'static str, &'static str)]) -> String {
        let (_dir, path) = write(text);
        StageConfig::load(Service::Payment, Some(&path), &env(e))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn a_log_level_must_be_a_level() {
        for good in [
            "info",
            "WARN",
            "info,kop=debug",
            "kop::stage=trace,warn",
            "off",
            "3",
        ] {
            assert_eq!(check_log_filter(good), Ok(()), "{good}");
        }
        let msg = error_of("", &[("LOG_LEVEL", "warning")]);
        assert!(msg.contains("LOG_LEVEL"), "{msg}");
        assert!(!msg.contains("kop.toml"), "blames the file: {msg}");
        assert!(msg.contains("did you mean `warn`"), "{msg}");
        let msg = error_of("[log]\nlevel = \"verbose\"\n", &[]);
        assert!(
            msg.contains("kop.toml") && msg.contains("log.level"),
            "{msg}"
        );
        assert!(msg.contains("`verbose` is not a level"), "{msg}");
    }

    #[test]
    fn the_instance_id_defaults_to_the_host_name() {
        fn host() -> Result<String, String> {
            Ok("node-7.example".into())
        }
        fn no_host() -> Result<String, String> {
            Err("/proc/sys/kernel/hostname holds no host name".into())
        }
        let file = Origin::File("kop.toml".into());
        let id = |e: &[(&'static str, &'static str)], from_file: Option<&str>| {
            instance_id(&env(e), &file, from_file.map(String::from), host)
        };
        assert_eq!(id(&[], None).unwrap(), "node-7.example");
        assert_eq!(id(&[], Some("a")).unwrap(), "a");
        assert_eq!(id(&[("KOP_INSTANCE_ID", "b")], Some("a")).unwrap(), "b");

        let msg = id(&[("KOP_INSTANCE_ID", "two words")], Some("a"))
            .unwrap_err()
            .to_string();
        assert!(
            msg.starts_with("environment variable KOP_INSTANCE_ID: `two words`"),
            "{msg}"
        );
        let msg = id(&[], Some("a/b")).unwrap_err().to_string();
        assert!(
            msg.starts_with("kop.toml: key `service.instance_id`: `a/b` is not"),
            "{msg}"
        );
        let msg = instance_id(&env(&[]), &file, None, || Ok("höst".into()))
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("`höst` (the host name, the default)")
                && msg.contains("set service.instance_id or KOP_INSTANCE_ID"),
            "{msg}"
        );
        let msg = instance_id(&env(&[]), &file, None, no_host)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("service.instance_id") && msg.contains("holds no host name"),
            "{msg}"
        );
        // Without a host name, a set id is all it takes.
        assert_eq!(
            instance_id(&env(&[]), &file, Some("a".into()), no_host).unwrap(),
            "a"
        );
    }

    #[test]
    fn errors_name_the_file_and_the_key() {
        let msg = error_of("[retry]\nmax_atempts = 3\n", &[]);
        assert!(
            msg.contains("kop.toml") && msg.contains("max_atempts"),
            "{msg}"
        );
        let msg = error_of("[retry]\nmax_attempts = \"three\"\n", &[]);
        assert!(msg.contains("retry.max_attempts"), "{msg}");
        let msg = error_of("[stage]\ncommit_interval = \"soon\"\n", &[]);
        assert!(
            msg.contains("stage.commit_interval") && msg.contains("soon"),
            "{msg}"
        );
        let msg = error_of("[kafka]\n\"no.such.property\" = 1\n", &[]);
        assert!(msg.contains("no.such.property"), "{msg}");
        let msg = error_of("[simulate]\nfailure_rate = 1.5\n", &[]);
        assert!(msg.contains("simulate.failure_rate"), "{msg}");
        let msg = error_of("", &[("MAX_PROCESSING_ATTEMPTS", "x")]);
        assert!(msg.contains("MAX_PROCESSING_ATTEMPTS"), "{msg}");
        let msg = error_of("[stage\n", &[]);
        assert!(msg.contains("kop.toml"), "{msg}");
    }
}
