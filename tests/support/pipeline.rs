//! One isolated pipeline: topic and group names of its own, its daemons and their
//! environment.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use super::kafka::brokers;
use super::process::Daemon;
use super::{free_port, unique};

/// Topic names and ports of one isolated pipeline.
pub struct Pipeline {
    pub prefix: String,
    pub orders: String,
    pub payments: String,
    pub reserved: String,
    pub order_port: u16,
    pub daemons: HashMap<String, Daemon>,
    pub log_dir: PathBuf,
    pub extra_env: Vec<(String, String)>,
}

pub const SERVICES: [&str; 4] = ["order", "payment", "inventory", "notification"];

impl Pipeline {
    pub fn new() -> Pipeline {
        let prefix = unique("t");
        let log_dir = std::env::temp_dir().join(format!("kop-test-logs/{prefix}"));
        std::fs::create_dir_all(&log_dir).expect("log dir");
        Pipeline {
            orders: format!("{prefix}.orders.created"),
            payments: format!("{prefix}.payments.completed"),
            reserved: format!("{prefix}.inventory.reserved"),
            order_port: free_port(),
            prefix,
            daemons: HashMap::new(),
            log_dir,
            extra_env: Vec::new(),
        }
    }

    /// Environment every daemon of this pipeline gets, plus `extra` for one of them.
    pub fn env_for(&self, service: &str, extra: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = vec![
            ("KAFKA_BROKERS".into(), brokers()),
            ("ORDER_TOPIC".into(), self.orders.clone()),
            ("PAYMENT_COMPLETED_TOPIC".into(), self.payments.clone()),
            ("INVENTORY_RESERVED_TOPIC".into(), self.reserved.clone()),
            (
                "PAYMENT_GROUP_ID".into(),
                format!("{}.payment", self.prefix),
            ),
            (
                "INVENTORY_GROUP_ID".into(),
                format!("{}.inventory", self.prefix),
            ),
            (
                "NOTIFICATION_GROUP_ID".into(),
                format!("{}.notification", self.prefix),
            ),
            ("SERVICE_NAME".into(), format!("{}-{service}", self.prefix)),
            ("METRICS_PORT".into(), free_port().to_string()),
            ("PORT".into(), self.order_port.to_string()),
            ("RETRY_DELAYS_MS".into(), "200,400".into()),
        ];
        for (k, v) in self
            .extra_env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .chain(extra.iter().copied())
        {
            env.retain(|(key, _)| key != k);
            env.push((k.to_string(), v.to_string()));
        }
        env
    }

    /// Starts one daemon (replacing an earlier one of the same name) and waits until ready.
    pub async fn start(&mut self, service: &str, extra: &[(&str, &str)]) {
        let env = self.env_for(service, extra);
        let mut daemon = Daemon::spawn(service, &env, &self.log_dir);
        daemon.wait_ready(Duration::from_secs(90)).await;
        self.daemons.insert(service.to_string(), daemon);
    }

    /// Starts one daemon with a configuration file of its own (written from `toml`).
    pub async fn start_with_config(&mut self, service: &str, extra: &[(&str, &str)], toml: &str) {
        let env = self.env_for(service, extra);
        let path = self.log_dir.join(format!("{service}.toml"));
        std::fs::write(&path, toml).expect("config file");
        let mut daemon = Daemon::spawn_with_config(service, &env, &self.log_dir, &path);
        daemon.wait_ready(Duration::from_secs(90)).await;
        self.daemons.insert(service.to_string(), daemon);
    }

    /// Restarts a daemon with the environment and configuration file it had.
    pub async fn restart(&mut self, service: &str) {
        let old = self.daemons.remove(service).expect("daemon");
        let (env, config) = (old.env.clone(), old.config.clone());
        drop(old);
        let mut daemon = Daemon::spawn_with_config(service, &env, &self.log_dir, &config);
        daemon.wait_ready(Duration::from_secs(90)).await;
        self.daemons.insert(service.to_string(), daemon);
    }

    pub async fn start_all(&mut self, extra: &[(&str, &str)]) {
        for service in SERVICES {
            self.start(service, extra).await;
        }
    }

    pub fn daemon(&mut self, service: &str) -> &mut Daemon {
        self.daemons.get_mut(service).expect("daemon running")
    }

    pub fn dlq(topic: &str) -> String {
        format!("{topic}.dlq")
    }

    pub fn retry(topic: &str) -> String {
        format!("{topic}.retry")
    }
}
