//! The file format: one type per section, each with its defaults. A key left `None` has a
//! default that depends on the service or on another value; `common` and `load` fill it in.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use super::{
    ConfigError, Guarantee, LogConfig, Origin, RetryConfig, Service, SimulateConfig, TopicsConfig,
};

/// A daemon's whole file, after the environment was written over it. A daemon refuses the
/// sections of the others (see [`foreign_section`]) before this is read.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct File {
    pub(super) service: ServiceSection,
    pub(super) log: LogConfig,
    pub(super) metrics: MetricsSection,
    pub(super) kafka: BTreeMap<String, KafkaValue>,
    pub(super) topics: TopicsConfig,
    pub(super) simulate: SimulateConfig,
    pub(super) http: HttpSection,
    pub(super) stage: StageSection,
    pub(super) retry: RetryConfig,
    pub(super) dedup: DedupSection,
}

/// `[service]`. The name defaults to `<service>-service`, the instance id to the host name.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct ServiceSection {
    pub(super) name: Option<String>,
    pub(super) instance_id: Option<String>,
}

/// `[metrics]`. Each daemon has its own default port.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct MetricsSection {
    pub(super) listen: Option<SocketAddr>,
}

/// `[http]`, kop-order's only.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct HttpSection {
    pub(super) listen: SocketAddr,
    pub(super) topic: String,
    pub(super) max_body_bytes: usize,
    #[serde(deserialize_with = "duration")]
    pub(super) produce_timeout: Duration,
    pub(super) max_pending: u32,
    #[serde(deserialize_with = "duration")]
    pub(super) stall_timeout: Duration,
    #[serde(deserialize_with = "duration")]
    pub(super) header_read_timeout: Duration,
    #[serde(deserialize_with = "duration")]
    pub(super) body_read_timeout: Duration,
    #[serde(deserialize_with = "duration")]
    pub(super) idle_timeout: Duration,
    pub(super) max_connections: usize,
}

impl Default for HttpSection {
    fn default() -> Self {
        HttpSection {
            listen: SocketAddr::from(([0, 0, 0, 0], 4000)),
            topic: "orders.created".into(),
            max_body_bytes: 64 * 1024,
            produce_timeout: Duration::from_secs(5),
            max_pending: 100_000,
            stall_timeout: Duration::from_secs(60),
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 4096,
        }
    }
}

/// `[stage]`. The topics default to the stage's own, the retry and DLQ topics to the input
/// topic's name with `.retry` and `.dlq`, the group to the service name.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct StageSection {
    pub(super) input: Option<String>,
    pub(super) retry_topic: Option<String>,
    pub(super) dlq_topic: Option<String>,
    pub(super) output: Option<String>,
    pub(super) group_id: Option<String>,
    pub(super) processing_guarantee: Guarantee,
    pub(super) commit_max_records: usize,
    #[serde(deserialize_with = "duration")]
    pub(super) commit_interval: Duration,
    pub(super) max_in_flight: usize,
    #[serde(deserialize_with = "duration")]
    pub(super) stall_timeout: Duration,
}

impl Default for StageSection {
    fn default() -> Self {
        StageSection {
            input: None,
            retry_topic: None,
            dlq_topic: None,
            output: None,
            group_id: None,
            processing_guarantee: Guarantee::ExactlyOnce,
            commit_max_records: 5000,
            commit_interval: Duration::from_millis(20),
            max_in_flight: 1000,
            stall_timeout: Duration::from_secs(60),
        }
    }
}

/// `[dedup]`. On in kop-payment only; the changelog defaults to
/// `<group_id>.dedup-changelog`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct DedupSection {
    pub(super) enabled: Option<bool>,
    pub(super) max_keys: usize,
    #[serde(deserialize_with = "duration")]
    pub(super) window: Duration,
    pub(super) changelog: Option<String>,
}

impl Default for DedupSection {
    fn default() -> Self {
        DedupSection {
            enabled: None,
            max_keys: 100_000,
            window: Duration::from_secs(24 * 3600),
            changelog: None,
        }
    }
}

/// librdkafka takes every property as a string; TOML lets operators write numbers and
/// booleans naturally.
#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum KafkaValue {
    String(String),
    Integer(i64),
    Float(f64),
    Bool(bool),
}

impl KafkaValue {
    pub(super) fn into_string(self) -> String {
        match self {
            KafkaValue::String(s) => s,
            KafkaValue::Integer(i) => i.to_string(),
            KafkaValue::Float(f) => f.to_string(),
            KafkaValue::Bool(b) => b.to_string(),
        }
    }
}

pub(super) fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    parse_duration(&String::deserialize(d)?).map_err(serde::de::Error::custom)
}

pub(super) fn durations<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
    Vec::<String>::deserialize(d)?
        .iter()
        .map(|t| parse_duration(t))
        .collect::<Result<Vec<_>, _>>()
        .map_err(serde::de::Error::custom)
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text)
        .map_err(|e| format!("`{text}` is not a duration ({e}); write e.g. \"500ms\" or \"5s\""))
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

/// The file as a TOML table (empty without a file), and the origin of its values.
pub(super) fn read_table(path: Option<&Path>) -> Result<(toml::Table, Origin), ConfigError> {
    let Some(path) = path else {
        return Ok((toml::Table::new(), Origin::Defaults));
    };
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let table = text
        .parse()
        .map_err(|e: toml::de::Error| ConfigError::Syntax {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
    Ok((table, Origin::File(path.to_path_buf())))
}

/// A section of the file that belongs to another daemon.
pub(super) fn foreign_section(service: Service, table: &toml::Table) -> Option<&str> {
    let foreign: &[&str] = match service {
        Service::Order => &["stage", "retry", "dedup"],
        _ => &["http"],
    };
    table
        .keys()
        .map(String::as_str)
        .find(|key| foreign.contains(key))
}

/// The sections, with the key to blame if a value does not fit.
pub(super) fn deserialize(table: toml::Table) -> Result<File, (String, String)> {
    serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
        let key = e.path().to_string();
        (key, e.into_inner().message().to_string())
    })
}
