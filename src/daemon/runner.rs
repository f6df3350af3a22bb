//! The life of a daemon of any [`Kind`], from its configuration to its exit status.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use tracing::error;

use super::logging::init_logging;
use super::process::{
    EX_FAILURE, connect_with_backoff, load, runtime, spawn_signals, start_metrics,
    stop_serving_metrics,
};
use crate::config::{Common, ConfigError, Service};
use crate::lifecycle::{Health, Shutdown, ShutdownTrigger, shutdown_channel};
use crate::metrics::Metrics;

/// What one kind of daemon adds to the life every daemon shares (logging, signals,
/// metrics, waiting for Kafka, readiness, the stop): how it loads and reloads its
/// configuration, how it connects, and what it runs once connected.
pub(super) trait Kind: Send + Sync + 'static {
    type Config: Clone + Send + Sync + 'static;
    type Connected;
    type Error: std::fmt::Display;

    fn service(&self) -> Service;
    /// The `stage` label of its metrics.
    fn label(&self) -> &str;
    fn load(&self, path: Option<&Path>) -> Result<Self::Config, ConfigError>;
    fn common(config: &Self::Config) -> &Common;
    /// Takes in the configuration loaded at start, before anything runs.
    fn configured(&self, _config: &Self::Config) {}
    /// Applies what a reload changes beside the log level, and says what it cannot.
    fn reloaded(&self, running: &Self::Config, fresh: &Self::Config);
    fn connect(
        &self,
        config: &Self::Config,
        metrics: &Arc<Metrics>,
    ) -> impl Future<Output = Result<Self::Connected, Self::Error>>;
    /// Runs until shutdown (or failure); readiness is the kind's to set.
    fn run(
        &self,
        connected: Self::Connected,
        config: &Self::Config,
        life: Life,
    ) -> impl Future<Output = ExitCode>;
}

/// What a running daemon is given: its readiness, the shutdown, and a way to ask for it.
pub(super) struct Life {
    pub(super) health: Arc<Health>,
    pub(super) shutdown: Shutdown,
    pub(super) trigger: ShutdownTrigger,
}

/// `main` of a daemon of any kind: parses the command line, loads the configuration (or
/// exits 0 after `--check-config`, 78 on an error) and runs it.
pub(super) fn daemon_main<K: Kind>(kind: K) -> ExitCode {
    let (config, path) = match load(kind.service(), |p| kind.load(p)) {
        Ok(loaded) => loaded,
        Err(code) => return code,
    };
    let runtime = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::from(EX_FAILURE);
        }
    };
    let code = runtime.block_on(run(Arc::new(kind), config, path));
    runtime.shutdown_timeout(Duration::from_secs(5));
    code
}

async fn run<K: Kind>(kind: Arc<K>, config: K::Config, path: Option<PathBuf>) -> ExitCode {
    kind.configured(&config);
    let common = K::common(&config);
    let identifier = format!("kop-{}", kind.service().short_name());
    let Ok(log) = init_logging(&common.log, &identifier).inspect_err(|e| eprintln!("{e}")) else {
        return ExitCode::from(EX_FAILURE);
    };
    let (trigger, mut shutdown) = shutdown_channel();
    let reload = {
        let (kind, running) = (kind.clone(), config.clone());
        move || match kind.load(path.as_deref()) {
            Ok(fresh) => {
                log.set_level(&K::common(&fresh).log.level);
                kind.reloaded(&running, &fresh);
            }
            Err(e) => error!(error = %e, "configuration not reloaded; keeping the current one"),
        }
    };
    if let Err(e) = spawn_signals(trigger.clone(), reload) {
        error!(error = %e, "cannot install signal handlers");
        return ExitCode::from(EX_FAILURE);
    }
    let Some((metrics, health, server)) = start_metrics(
        &common.service_name,
        kind.label(),
        common.metrics_listen,
        &shutdown,
    )
    .await
    else {
        return ExitCode::from(EX_FAILURE);
    };
    let brokers = common
        .kafka
        .get("bootstrap.servers")
        .cloned()
        .unwrap_or_default();
    let connected = connect_with_backoff(&identifier, &brokers, &mut shutdown, || {
        kind.connect(&config, &metrics)
    })
    .await;
    let code = match connected {
        None => ExitCode::SUCCESS,
        Some(connected) => {
            let life = Life {
                health: health.clone(),
                shutdown,
                trigger,
            };
            kind.run(connected, &config, life).await
        }
    };
    stop_serving_metrics(&health, server, code).await
}
