//! The settings every daemon has, and the checks of values that more than one section uses.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::ClientConfig;

use super::env::Sources;
use super::file::File;
use super::{Common, ConfigError, Service};

pub(super) const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

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

/// A count that must be positive.
pub(super) fn positive(
    sources: &Sources,
    key: &str,
    value: impl TryInto<u64>,
) -> Result<(), ConfigError> {
    if value.try_into().ok() == Some(0) {
        return Err(sources.invalid(key, "must be positive"));
    }
    Ok(())
}

/// A duration that must be at least `min`.
pub(super) fn at_least(
    sources: &Sources,
    key: &str,
    value: Duration,
    min: Duration,
) -> Result<(), ConfigError> {
    if value < min {
        let min = humantime::format_duration(min);
        return Err(sources.invalid(key, format!("must be at least {min}")));
    }
    Ok(())
}

/// librdkafka properties kop sets itself, because its guarantees or its health checks rest
/// on them: a `[kafka]` value would be overridden, so it is refused.
pub(super) fn owned_kafka_keys(
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

/// The settings every daemon has, from the file with the environment written over it.
pub(super) fn common(
    service: Service,
    file: &mut File,
    sources: &Sources,
) -> Result<Common, ConfigError> {
    let mut kafka: BTreeMap<String, String> = std::mem::take(&mut file.kafka)
        .into_iter()
        .map(|(k, v)| (k, v.into_string()))
        .collect();
    if let Some((key, why)) = owned_kafka_keys(service).find(|(key, _)| kafka.contains_key(*key)) {
        return Err(sources.invalid(
            &format!("kafka.\"{key}\""),
            format!("kop sets this property itself ({why}); remove it"),
        ));
    }
    kafka
        .entry("bootstrap.servers".into())
        .or_insert_with(|| "localhost:9092".into());

    let simulate = std::mem::take(&mut file.simulate);
    if !(0.0..=1.0).contains(&simulate.failure_rate) {
        return Err(sources.invalid(
            "simulate.failure_rate",
            format!("{} is not between 0 and 1", simulate.failure_rate),
        ));
    }
    let topics = std::mem::take(&mut file.topics);
    for (key, value) in [
        ("topics.partitions", topics.partitions),
        ("topics.replication_factor", topics.replication_factor),
    ] {
        if value < 1 {
            return Err(sources.invalid(key, "must be at least 1"));
        }
    }
    let log = std::mem::take(&mut file.log);
    check_log_filter(&log.level)
        .map_err(|reason| sources.invalid("log.level", format!("`{}`: {reason}", log.level)))?;

    let common = Common {
        service_name: file
            .service
            .name
            .take()
            .unwrap_or_else(|| service.default_service_name()),
        instance_id: instance_id(file.service.instance_id.take(), sources, host_name)?,
        log,
        metrics_listen: file
            .metrics
            .listen
            .unwrap_or_else(|| service.default_metrics_listen()),
        kafka,
        topics,
        simulate,
        origin: sources.file.clone(),
    };
    validate_kafka_properties(&common, sources)?;
    Ok(common)
}

/// Where the default instance id comes from: the kernel's host name, the same as
/// `hostname` prints and systemd's `%l`/`%H` start from.
pub(super) const HOST_NAME_FILE: &str = "/proc/sys/kernel/hostname";

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
pub(super) fn instance_id(
    set: Option<String>,
    sources: &Sources,
    host_name: fn() -> Result<String, String>,
) -> Result<String, ConfigError> {
    const KEY: &str = "service.instance_id";
    let (id, what) = match set {
        Some(id) => (id, ""),
        None => match host_name() {
            Ok(name) => (name, " (the host name, the default)"),
            Err(why) => {
                return Err(sources.invalid(
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
        Err(sources.invalid(
            KEY,
            format!(
                "`{id}`{what} is not a legal instance id (1..249 of [a-zA-Z0-9._-]: it is \
                 part of the transactional id and the client id){hint}"
            ),
        ))
    }
}

/// Lets librdkafka itself judge the passthrough properties, so that a typo fails at start
/// with the property's name instead of being ignored.
fn validate_kafka_properties(common: &Common, sources: &Sources) -> Result<(), ConfigError> {
    let mut client = ClientConfig::new();
    for (key, value) in &common.kafka {
        client.set(key, value);
    }
    client
        .create_native_config()
        .map(drop)
        .map_err(|e| match e {
            rdkafka::error::KafkaError::ClientConfig(_, description, key, _) => {
                sources.invalid(&format!("kafka.\"{key}\""), description)
            }
            other => sources.invalid("kafka", other.to_string()),
        })
}

pub(super) fn topic_name(sources: &Sources, key: &str, name: &str) -> Result<(), ConfigError> {
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
        Err(sources.invalid(
            key,
            format!("`{name}` is not a legal Kafka topic name (1..249 of [a-zA-Z0-9._-])"),
        ))
    }
}
