//! Loading a daemon's whole configuration: the order API's and a stage's.

use std::path::Path;
use std::time::Duration;

use super::common::{at_least, common, positive, topic_name};
use super::env::{Env, Sources, layer};
use super::file::{File, deserialize, foreign_section, read_table};
use super::{ConfigError, DedupConfig, OrderConfig, Origin, Service, StageConfig};

/// The file with the environment written over it, and where each value came from.
fn read(
    service: Service,
    path: Option<&Path>,
    env: &dyn Env,
) -> Result<(File, Sources), ConfigError> {
    let (mut table, origin) = read_table(path)?;
    if let Some(section) = foreign_section(service, &table) {
        return Err(ConfigError::Invalid {
            origin,
            key: section.to_string(),
            reason: format!("kop-{} has no [{section}] section", service.short_name()),
        });
    }
    // The file must hold together on its own, whatever the environment overrides here.
    if let Err((key, reason)) = deserialize(table.clone()) {
        return Err(ConfigError::Invalid {
            origin,
            key,
            reason,
        });
    }
    let sources = layer(service, &mut table, origin, env)?;
    let file = deserialize(table).map_err(|(key, reason)| sources.invalid(&key, reason))?;
    Ok((file, sources))
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
        let (mut file, sources) = read(Service::Order, path, env)?;
        let common = common(Service::Order, &mut file, &sources)?;
        let http = file.http;
        topic_name(&sources, "http.topic", &http.topic)?;
        positive(&sources, "http.max_body_bytes", http.max_body_bytes)?;
        positive(&sources, "http.max_pending", http.max_pending)?;
        for (key, value, min) in [
            (
                "http.produce_timeout",
                http.produce_timeout,
                Duration::from_millis(100),
            ),
            (
                "http.stall_timeout",
                http.stall_timeout,
                Duration::from_secs(1),
            ),
        ] {
            at_least(&sources, key, value, min)?;
        }
        Ok(OrderConfig {
            common,
            listen: http.listen,
            topic: http.topic,
            max_body_bytes: http.max_body_bytes,
            produce_timeout: http.produce_timeout,
            max_pending: http.max_pending,
            stall_timeout: http.stall_timeout,
            header_read_timeout: http.header_read_timeout,
            body_read_timeout: http.body_read_timeout,
            idle_timeout: http.idle_timeout,
            max_connections: http.max_connections,
        })
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
        let (input_default, output_default) =
            service.stage_topics().ok_or_else(|| ConfigError::Invalid {
                origin: Origin::Defaults,
                key: "service".into(),
                reason: "kop-order is not a stage".into(),
            })?;
        let (mut file, sources) = read(service, path, env)?;
        let common = common(service, &mut file, &sources)?;
        let stage = file.stage;

        // Each topic with the key to blame for it: a default follows the value it is made of.
        let input = stage.input.unwrap_or_else(|| input_default.into());
        let follow = |given: Option<String>, key, suffix| match given {
            Some(name) => (name, key),
            None => (format!("{input}{suffix}"), "stage.input"),
        };
        let (retry_topic, retry_key) = follow(stage.retry_topic, "stage.retry_topic", ".retry");
        let (dlq_topic, dlq_key) = follow(stage.dlq_topic, "stage.dlq_topic", ".dlq");
        let output = match output_default {
            None if stage.output.is_some() => {
                return Err(sources.invalid(
                    "stage.output",
                    format!(
                        "kop-{} is the last stage and produces nothing",
                        service.short_name()
                    ),
                ));
            }
            None => None,
            Some(default) => Some(stage.output.unwrap_or_else(|| default.into())),
        };
        for (key, name) in [
            ("stage.input", Some(&input)),
            (retry_key, Some(&retry_topic)),
            (dlq_key, Some(&dlq_topic)),
            ("stage.output", output.as_ref()),
        ] {
            if let Some(name) = name {
                topic_name(&sources, key, name)?;
            }
        }
        let distinct: std::collections::BTreeSet<_> = [&input, &retry_topic, &dlq_topic]
            .into_iter()
            .chain(output.as_ref())
            .collect();
        if distinct.len() != 3 + usize::from(output.is_some()) {
            return Err(sources.invalid(
                "stage",
                "input, retry, DLQ and output topics must all differ",
            ));
        }

        let (group_id, group_key) = match stage.group_id {
            Some(group) => (group, "stage.group_id"),
            None => (common.service_name.clone(), "service.name"),
        };
        let (changelog, changelog_key) = match file.dedup.changelog.take() {
            Some(changelog) => (changelog, "dedup.changelog"),
            None => (format!("{group_id}.dedup-changelog"), group_key),
        };
        topic_name(&sources, changelog_key, &changelog)?;

        let retry = file.retry;
        if retry.max_attempts < 1 {
            return Err(sources.invalid(
                "retry.max_attempts",
                format!("`{}`: must be at least 1", retry.max_attempts),
            ));
        }
        if retry.delays.is_empty() {
            return Err(sources.invalid("retry.delays", "needs at least one delay"));
        }
        let dedup = file.dedup;
        for (key, count) in [
            ("stage.commit_max_records", stage.commit_max_records),
            ("stage.max_in_flight", stage.max_in_flight),
            ("dedup.max_keys", dedup.max_keys),
        ] {
            positive(&sources, key, count)?;
        }
        for (key, value, min) in [
            (
                "stage.stall_timeout",
                stage.stall_timeout,
                Duration::from_secs(1),
            ),
            ("dedup.window", dedup.window, Duration::from_secs(1)),
        ] {
            at_least(&sources, key, value, min)?;
        }
        Ok(StageConfig {
            common,
            input,
            retry_topic,
            dlq_topic,
            output,
            group_id,
            guarantee: stage.processing_guarantee,
            commit_max_records: stage.commit_max_records,
            commit_interval: stage.commit_interval,
            max_in_flight: stage.max_in_flight,
            stall_timeout: stage.stall_timeout,
            retry,
            dedup: DedupConfig {
                // kop-payment pays each order once; the stages after it see each payment
                // once when it runs exactly once.
                enabled: dedup.enabled.unwrap_or(service == Service::Payment),
                max_keys: dedup.max_keys,
                window: dedup.window,
                changelog,
            },
        })
    }
}
