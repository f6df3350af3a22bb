//! The environment, written over the file in one place, and [`Sources`]: which key each
//! variable set, so that any check after the merge blames the variable or the file.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use super::file::HttpSection;
use super::{ConfigError, Origin, Service};

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

/// How a variable's text becomes the TOML value of its key.
#[derive(Clone, Copy)]
enum Kind {
    Text,
    /// A word such as `at-least-once`; surrounding blanks are ignored.
    Word,
    Integer,
    Float,
    /// Milliseconds, for a duration key.
    Millis,
    /// Comma-separated milliseconds, for a list of durations.
    MillisList,
    /// The port of a listen address: the file's, else this default.
    Port(SocketAddr),
}

use Kind::*;

/// The variables a daemon reads (the README's table), and the `section.key` each one sets.
fn variables(service: Service) -> Vec<(&'static str, &'static str, Kind)> {
    let mut vars = vec![
        ("KAFKA_BROKERS", "kafka.bootstrap.servers", Text),
        ("SERVICE_NAME", "service.name", Text),
        ("KOP_INSTANCE_ID", "service.instance_id", Text),
        ("LOG_LEVEL", "log.level", Text),
        ("LOG_FORMAT", "log.format", Word),
        (
            "METRICS_PORT",
            "metrics.listen",
            Port(service.default_metrics_listen()),
        ),
        ("SIMULATE_FAILURE_RATE", "simulate.failure_rate", Float),
        ("SIMULATE_DELAY_MS", "simulate.delay", Millis),
    ];
    let own: &[(&str, &str, Kind)] = match service {
        Service::Order => &[
            ("PORT", "http.listen", Port(HttpSection::default().listen)),
            ("ORDER_TOPIC", "http.topic", Text),
        ],
        Service::Payment => &[
            ("ORDER_TOPIC", "stage.input", Text),
            ("ORDER_RETRY_TOPIC", "stage.retry_topic", Text),
            ("ORDER_DLQ_TOPIC", "stage.dlq_topic", Text),
            ("PAYMENT_COMPLETED_TOPIC", "stage.output", Text),
            ("PAYMENT_GROUP_ID", "stage.group_id", Text),
        ],
        Service::Inventory => &[
            ("PAYMENT_COMPLETED_TOPIC", "stage.input", Text),
            ("PAYMENT_RETRY_TOPIC", "stage.retry_topic", Text),
            ("PAYMENT_DLQ_TOPIC", "stage.dlq_topic", Text),
            ("INVENTORY_RESERVED_TOPIC", "stage.output", Text),
            ("INVENTORY_GROUP_ID", "stage.group_id", Text),
        ],
        Service::Notification => &[
            ("INVENTORY_RESERVED_TOPIC", "stage.input", Text),
            ("INVENTORY_RETRY_TOPIC", "stage.retry_topic", Text),
            ("INVENTORY_DLQ_TOPIC", "stage.dlq_topic", Text),
            ("NOTIFICATION_GROUP_ID", "stage.group_id", Text),
        ],
    };
    vars.extend_from_slice(own);
    if service != Service::Order {
        vars.extend([
            ("MAX_PROCESSING_ATTEMPTS", "retry.max_attempts", Integer),
            ("RETRY_DELAYS_MS", "retry.delays", MillisList),
            ("PROCESSING_GUARANTEE", "stage.processing_guarantee", Word),
        ]);
    }
    vars
}

/// Where each value came from: the variable that set its key, else the file (or the
/// defaults, without a file).
pub(super) struct Sources {
    pub(super) file: Origin,
    /// `section.key` → the variable that set it.
    pub(super) vars: BTreeMap<&'static str, &'static str>,
}

impl Sources {
    /// The variable that set `key`, if one did. A `[kafka]` key may be written quoted.
    pub(super) fn var(&self, key: &str) -> Option<&'static str> {
        self.vars.get(key.replace('"', "").as_str()).copied()
    }

    /// The error for a bad value at `key`, blaming the variable that set it or the file.
    pub(super) fn invalid(&self, key: &str, reason: impl Into<String>) -> ConfigError {
        let (origin, key) = match self.var(key) {
            Some(var) => (Origin::Env(var), var.to_string()),
            None => (self.file.clone(), key.to_string()),
        };
        ConfigError::Invalid {
            origin,
            key,
            reason: reason.into(),
        }
    }
}

/// Writes the variables that are set over the file's `table`.
pub(super) fn layer(
    service: Service,
    table: &mut toml::Table,
    file: Origin,
    env: &dyn Env,
) -> Result<Sources, ConfigError> {
    let mut sources = Sources {
        file,
        vars: BTreeMap::new(),
    };
    for (var, key, kind) in variables(service) {
        let Some(text) = env.get(var) else { continue };
        let (section, name) = key.split_once('.').expect("section.key");
        let Some(section) = table
            .entry(section)
            .or_insert_with(|| toml::Table::new().into())
            .as_table_mut()
        else {
            // Not a table in the file: refused before the environment is read.
            continue;
        };
        let bad = |e: &dyn std::fmt::Display| ConfigError::Invalid {
            origin: Origin::Env(var),
            key: var.to_string(),
            reason: format!("`{text}`: {e}"),
        };
        let value: toml::Value = match kind {
            Text => text.clone().into(),
            Word => text.trim().into(),
            Integer => text.trim().parse::<i64>().map_err(|e| bad(&e))?.into(),
            Float => text.trim().parse::<f64>().map_err(|e| bad(&e))?.into(),
            Millis => format!("{}ms", text.trim().parse::<u64>().map_err(|e| bad(&e))?).into(),
            MillisList => {
                let list = text
                    .split(',')
                    .map(|ms| ms.trim().parse::<u64>().map(|ms| format!("{ms}ms")))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| bad(&format!("not a comma list of milliseconds: {e}")))?;
                list.into()
            }
            Port(default) => {
                let port = text.trim().parse::<u16>().map_err(|e| bad(&e))?;
                let mut address = match section.get(name).map(toml::Value::as_str) {
                    None => default,
                    Some(given) => match given.map(str::parse::<SocketAddr>) {
                        Some(Ok(address)) => address,
                        // Not an address in the file: refused before, as above.
                        _ => continue,
                    },
                };
                address.set_port(port);
                address.to_string().into()
            }
        };
        section.insert(name.to_string(), value);
        sources.vars.insert(key, var);
    }
    // A retry or DLQ name follows the input topic unless it is given at the same level: an
    // input renamed by the environment takes the file's names along.
    let stage = table.get_mut("stage").and_then(toml::Value::as_table_mut);
    if let Some(stage) = stage.filter(|_| sources.vars.contains_key("stage.input")) {
        for name in ["retry_topic", "dlq_topic"] {
            if !sources.vars.contains_key(format!("stage.{name}").as_str()) {
                stage.remove(name);
            }
        }
    }
    Ok(sources)
}
