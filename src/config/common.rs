//! The settings every daemon has, merged from the file, the environment and the defaults,
//! and the checks of values that more than one section uses.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use rdkafka::ClientConfig;

use super::env::{Env, env_parse};
use super::file::{
    KafkaValue, LogSection, MetricsSection, ServiceSection, SimulateSection, TopicsSection,
};
use super::{
    Common, ConfigError, LogConfig, LogFormat, Origin, Service, SimulateConfig, TopicsConfig,
    source_of,
};

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

pub(super) fn invalid(origin: &Origin, key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        origin: origin.clone(),
        key: key.to_string(),
        reason: reason.into(),
    }
}

/// A count that must be positive.
pub(super) fn positive(
    origin: &Origin,
    key: &str,
    value: impl TryInto<u64>,
) -> Result<(), ConfigError> {
    if value.try_into().ok() == Some(0) {
        return Err(invalid(origin, key, "must be positive"));
    }
    Ok(())
}

/// A duration that must be at least `min`.
pub(super) fn at_least(
    origin: &Origin,
    key: &str,
    value: Duration,
    min: Duration,
) -> Result<(), ConfigError> {
    if value < min {
        let min = humantime::format_duration(min);
        return Err(invalid(origin, key, format!("must be at least {min}")));
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

#[allow(clippy::too_many_arguments)]
pub(super) fn common(
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
pub(super) fn validate_kafka_properties(
    common: &Common,
    brokers_from_env: bool,
) -> Result<(), ConfigError> {
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

pub(super) fn topic_name(origin: &Origin, key: &str, name: &str) -> Result<(), ConfigError> {
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
