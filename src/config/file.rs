//! The file format: each section as the TOML file may write it, every key optional.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use super::{ConfigError, Guarantee, LogFormat, Origin, Service};

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct ServiceSection {
    pub(super) name: Option<String>,
    pub(super) instance_id: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct LogSection {
    pub(super) level: Option<String>,
    pub(super) format: Option<LogFormat>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct MetricsSection {
    pub(super) listen: Option<SocketAddr>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct TopicsSection {
    pub(super) create: Option<bool>,
    pub(super) partitions: Option<i32>,
    pub(super) replication_factor: Option<i32>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct SimulateSection {
    pub(super) failure_rate: Option<f64>,
    #[serde(default, deserialize_with = "duration_opt")]
    pub(super) delay: Option<Duration>,
    pub(super) stall: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct HttpSection {
    pub(super) listen: Option<SocketAddr>,
    pub(super) topic: Option<String>,
    pub(super) max_body_bytes: Option<usize>,
    #[serde(default, deserialize_with = "duration_opt")]
    pub(super) produce_timeout: Option<Duration>,
    pub(super) max_pending: Option<u32>,
    #[serde(default, deserialize_with = "duration_opt")]
    pub(super) stall_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "duration_opt")]
    pub(super) header_read_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "duration_opt")]
    pub(super) body_read_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "duration_opt")]
    pub(super) idle_timeout: Option<Duration>,
    pub(super) max_connections: Option<usize>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct DedupSection {
    pub(super) enabled: Option<bool>,
    pub(super) max_keys: Option<usize>,
    #[serde(default, deserialize_with = "duration_opt")]
    pub(super) window: Option<Duration>,
    pub(super) changelog: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct StageSection {
    pub(super) input: Option<String>,
    pub(super) retry_topic: Option<String>,
    pub(super) dlq_topic: Option<String>,
    pub(super) output: Option<String>,
    pub(super) group_id: Option<String>,
    pub(super) processing_guarantee: Option<Guarantee>,
    pub(super) commit_max_records: Option<usize>,
    #[serde(default, deserialize_with = "duration_opt")]
    pub(super) commit_interval: Option<Duration>,
    pub(super) max_in_flight: Option<usize>,
    #[serde(default, deserialize_with = "duration_opt")]
    pub(super) stall_timeout: Option<Duration>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RetrySection {
    pub(super) max_attempts: Option<u32>,
    #[serde(default, deserialize_with = "durations_opt")]
    pub(super) delays: Option<Vec<Duration>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct OrderFile {
    #[serde(default)]
    pub(super) service: ServiceSection,
    #[serde(default)]
    pub(super) log: LogSection,
    #[serde(default)]
    pub(super) metrics: MetricsSection,
    #[serde(default)]
    pub(super) kafka: BTreeMap<String, KafkaValue>,
    #[serde(default)]
    pub(super) topics: TopicsSection,
    #[serde(default)]
    pub(super) simulate: SimulateSection,
    #[serde(default)]
    pub(super) http: HttpSection,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct StageFile {
    #[serde(default)]
    pub(super) service: ServiceSection,
    #[serde(default)]
    pub(super) log: LogSection,
    #[serde(default)]
    pub(super) metrics: MetricsSection,
    #[serde(default)]
    pub(super) kafka: BTreeMap<String, KafkaValue>,
    #[serde(default)]
    pub(super) topics: TopicsSection,
    #[serde(default)]
    pub(super) simulate: SimulateSection,
    #[serde(default)]
    pub(super) stage: StageSection,
    #[serde(default)]
    pub(super) retry: RetrySection,
    #[serde(default)]
    pub(super) dedup: DedupSection,
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

pub(super) fn duration_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let text = String::deserialize(d)?;
    parse_duration(&text)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

pub(super) fn durations_opt<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Vec<Duration>>, D::Error> {
    let texts = Vec::<String>::deserialize(d)?;
    texts
        .iter()
        .map(|t| parse_duration(t))
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
        .map_err(serde::de::Error::custom)
}

pub(super) fn parse_duration(text: &str) -> Result<Duration, String> {
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

pub(super) fn read_file<T: for<'de> Deserialize<'de> + Default>(
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
