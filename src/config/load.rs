//! Loading a daemon's whole configuration: the order API's and a stage's.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use super::common::{at_least, common, invalid, positive, topic_name};
use super::env::{Env, env_parse};
use super::file::{OrderFile, StageFile, read_file};
use super::{
    ConfigError, DedupConfig, Guarantee, OrderConfig, Origin, RetryConfig, Service, StageConfig,
    source_of,
};

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
        positive(&origin, "http.max_body_bytes", config.max_body_bytes)?;
        at_least(
            &origin,
            "http.produce_timeout",
            config.produce_timeout,
            Duration::from_millis(100),
        )?;
        positive(&origin, "http.max_pending", config.max_pending)?;
        at_least(
            &origin,
            "http.stall_timeout",
            config.stall_timeout,
            Duration::from_secs(1),
        )?;
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
        positive(
            &origin,
            "stage.commit_max_records",
            config.commit_max_records,
        )?;
        at_least(
            &origin,
            "stage.commit_interval",
            config.commit_interval,
            Duration::from_millis(1),
        )?;
        positive(&origin, "stage.max_in_flight", config.max_in_flight)?;
        at_least(
            &origin,
            "stage.stall_timeout",
            config.stall_timeout,
            Duration::from_secs(1),
        )?;
        positive(&origin, "dedup.max_keys", config.dedup.max_keys)?;
        at_least(
            &origin,
            "dedup.window",
            config.dedup.window,
            Duration::from_secs(1),
        )?;
        topic_name(&origin, "dedup.changelog", &config.dedup.changelog)?;
        Ok(config)
    }
}
