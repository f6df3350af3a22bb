//! What makes a program a well-behaved daemon: command line, logging, service-manager
//! notifications, the watchdog, signals and a shutdown every task listens to.
//!
//! The `main` of each binary is one call into this module.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use clap::Parser;
use futures_util::StreamExt;
use sd_notify::NotifyState;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use tracing::{error, info, warn};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry, reload};

use crate::config::{
    self, Common, ConfigError, LogConfig, LogFormat, OrderConfig, ProcessEnv, Service,
    SimulateConfig, StageConfig,
};
use crate::lifecycle::{Health, Shutdown, ShutdownTrigger, notify, shutdown_channel, status};
use crate::metrics::Metrics;
use crate::stage::{Handler, Stage};

/// Exit status for a failure at run time (Kafka fatal error, port in use); systemd restarts.
const EX_FAILURE: u8 = 1;

#[derive(Parser)]
struct Args {
    /// Configuration file (TOML). Default: /etc/kop/<service>.toml when it exists, else the
    /// built-in defaults. Environment variables override the file.
    #[arg(long, short, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Load and validate the configuration, print the result, and exit (0 valid, 78 not).
    #[arg(long)]
    check_config: bool,
}

/// Changes the log filter at run time (SIGHUP).
#[derive(Clone)]
pub struct LogReload(reload::Handle<EnvFilter, Registry>);

impl LogReload {
    pub fn set_level(&self, level: &str) {
        match EnvFilter::try_new(level) {
            Ok(filter) => {
                if let Err(e) = self.0.reload(filter) {
                    warn!(error = %e, "cannot change the log level");
                }
            }
            Err(e) => warn!(level, error = %e, "invalid log level"),
        }
    }
}

/// True when stderr is the journal (systemd sets `JOURNAL_STREAM` to its device:inode).
fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Some(expected) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(stderr) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    expected.to_string_lossy() == format!("{}:{}", stderr.dev(), stderr.ino())
}

/// Installs the global logger. Journald fields are the upper-cased field names
/// (`ORDER_ID`, `TOPIC`, …) so `journalctl -u kop-payment ORDER_ID=o1` finds an order.
pub fn init_logging(config: &LogConfig, identifier: &str) -> Result<LogReload, String> {
    let filter = EnvFilter::try_new(&config.level).map_err(|e| e.to_string())?;
    let (filter, handle) = reload::Layer::new(filter);
    type Output = Box<
        dyn Layer<tracing_subscriber::layer::Layered<reload::Layer<EnvFilter, Registry>, Registry>>
            + Send
            + Sync,
    >;
    let journald = || -> Result<Output, String> {
        let layer = tracing_journald::layer()
            .map_err(|e| format!("cannot reach journald: {e}"))?
            .with_field_prefix(None)
            .with_syslog_identifier(identifier.to_string());
        Ok(Box::new(layer))
    };
    // Colours only for a person at a terminal, not in files or the journal.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let text = || -> Output {
        Box::new(
            tracing_subscriber::fmt::layer()
                .with_ansi(ansi)
                .with_writer(std::io::stderr),
        )
    };
    let output: Output = match config.format {
        LogFormat::Journald => journald()?,
        LogFormat::Auto if stderr_is_journal() => journald().unwrap_or_else(|_| text()),
        LogFormat::Auto | LogFormat::Text => text(),
        LogFormat::Json => Box::new(
            tracing_subscriber::fmt::layer()
                .json()
                .with_writer(std::io::stderr),
        ),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(output)
        .try_init()
        .map_err(|e| e.to_string())?;
    Ok(LogReload(handle))
}

/// SIGTERM and SIGINT trigger the shutdown; SIGHUP calls `reload`.
fn spawn_signals(
    trigger: ShutdownTrigger,
    reload: impl Fn() + Send + 'static,
) -> std::io::Result<()> {
    let mut signals = signal_hook_tokio::Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    tokio::spawn(async move {
        while let Some(signal) = signals.next().await {
            if signal == SIGHUP {
                let now = sd_notify::NotifyState::monotonic_usec_now().ok();
                let mut states = vec![NotifyState::Reloading];
                states.extend(now);
                notify(&states);
                reload();
                notify(&[NotifyState::Ready]);
            } else {
                info!(signal, "stopping: finishing the work in progress");
                notify(&[
                    NotifyState::Stopping,
                    NotifyState::Status("stopping: draining"),
                ]);
                trigger.trigger();
            }
        }
    });
    Ok(())
}

/// Parses the command line and loads the configuration, or exits: 0 after
/// `--check-config`, 78 on any configuration error, naming the file and key.
fn load<C>(
    service: Service,
    load: impl Fn(Option<&std::path::Path>) -> Result<C, ConfigError>,
) -> Result<(C, Option<PathBuf>), ExitCode> {
    let args = Args::parse();
    let path = config::resolve_path(service, args.config.as_deref());
    match load(path.as_deref()) {
        Ok(config) => {
            if args.check_config {
                let source = path
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "built-in defaults".into());
                println!("{source}: configuration is valid");
                return Err(ExitCode::SUCCESS);
            }
            Ok((config, path))
        }
        Err(e) => {
            eprintln!("kop-{}: configuration error: {e}", service.short_name());
            Err(ExitCode::from(config::EX_CONFIG as u8))
        }
    }
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

/// Keeps trying `connect` until it works or shutdown is asked, telling systemd and the log
/// why the daemon is not ready yet. An unreachable broker is a state to wait out, not a crash.
async fn connect_with_backoff<
    T,
    E: std::fmt::Display,
    F: std::future::Future<Output = Result<T, E>>,
>(
    what: &str,
    brokers: &str,
    shutdown: &mut Shutdown,
    mut connect: impl FnMut() -> F,
) -> Option<T> {
    let mut delay = Duration::from_millis(500);
    loop {
        status(&format!("connecting to Kafka at {brokers}"));
        tokio::select! {
            _ = shutdown.wait() => return None,
            result = connect() => match result {
                Ok(value) => return Some(value),
                Err(e) => {
                    error!(brokers, error = %e, "{what}: Kafka is not available; retrying in {delay:?}");
                    status(&format!("waiting for Kafka at {brokers}: {e}"));
                }
            }
        }
        tokio::select! {
            _ = shutdown.wait() => return None,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(30));
    }
}

/// A reload applies the log level (and a stage's `[simulate]`); what else changed waits
/// for a restart, and the operator is told so.
fn not_applied(sections: &[&str]) {
    if !sections.is_empty() {
        warn!(
            sections = %sections.join(", "),
            "changed settings that apply only at a restart were not applied; restart to apply them"
        );
    }
}

/// What one kind of daemon adds to the life every daemon shares (logging, signals,
/// metrics, waiting for Kafka, readiness, the stop): how it loads and reloads its
/// configuration, how it connects, and what it runs once connected.
trait Kind: Send + Sync + 'static {
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
struct Life {
    health: Arc<Health>,
    shutdown: Shutdown,
    trigger: ShutdownTrigger,
}

/// `main` of a daemon of any kind: parses the command line, loads the configuration (or
/// exits 0 after `--check-config`, 78 on an error) and runs it.
fn daemon_main<K: Kind>(kind: K) -> ExitCode {
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

/// kop-payment, kop-inventory and kop-notification: a [`Stage`] around a handler.
struct StageKind {
    service: Service,
    handler: Arc<dyn Handler>,
    /// `[simulate]`, which SIGHUP changes while the stage runs.
    simulate: Arc<RwLock<SimulateConfig>>,
}

impl Kind for StageKind {
    type Config = StageConfig;
    type Connected = Stage;
    type Error = crate::stage::StageError;

    fn service(&self) -> Service {
        self.service
    }

    fn label(&self) -> &str {
        self.handler.stage()
    }

    fn load(&self, path: Option<&Path>) -> Result<StageConfig, ConfigError> {
        StageConfig::load(self.service, path, &ProcessEnv)
    }

    fn common(config: &StageConfig) -> &Common {
        &config.common
    }

    fn configured(&self, config: &StageConfig) {
        if let Ok(mut current) = self.simulate.write() {
            *current = config.common.simulate.clone();
        }
    }

    fn reloaded(&self, running: &StageConfig, fresh: &StageConfig) {
        if let Ok(mut current) = self.simulate.write() {
            *current = fresh.common.simulate.clone();
        }
        let s = &fresh.common.simulate;
        info!(
            level = %fresh.common.log.level,
            simulate.failure_rate = s.failure_rate,
            simulate.delay = %humantime::format_duration(s.delay),
            simulate.stall = s.stall,
            "configuration reloaded"
        );
        not_applied(&running.needs_restart(fresh));
    }

    async fn connect(
        &self,
        config: &StageConfig,
        metrics: &Arc<Metrics>,
    ) -> Result<Stage, crate::stage::StageError> {
        Stage::connect(
            config.clone(),
            self.handler.clone(),
            metrics.clone(),
            self.simulate.clone(),
        )
        .await
    }

    async fn run(&self, stage: Stage, config: &StageConfig, life: Life) -> ExitCode {
        life.health.set_ready(true);
        notify(&[
            NotifyState::Ready,
            NotifyState::Status(&stage.running_line()),
        ]);
        info!(input = %config.input, retry = %config.retry_topic, dlq = %config.dlq_topic, output = ?config.output, group = %config.group_id, "ready");
        match stage.run(life.shutdown, life.health).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                error!(error = %e, "stage failed");
                ExitCode::from(EX_FAILURE)
            }
        }
    }
}

/// kop-order: the order API.
struct OrderKind;

impl Kind for OrderKind {
    type Config = OrderConfig;
    type Connected = Arc<crate::order::OrderApi>;
    type Error = rdkafka::error::KafkaError;

    fn service(&self) -> Service {
        Service::Order
    }

    fn label(&self) -> &str {
        "order"
    }

    fn load(&self, path: Option<&Path>) -> Result<OrderConfig, ConfigError> {
        OrderConfig::load(path, &ProcessEnv)
    }

    fn common(config: &OrderConfig) -> &Common {
        &config.common
    }

    fn reloaded(&self, running: &OrderConfig, fresh: &OrderConfig) {
        info!(level = %fresh.common.log.level, "configuration reloaded");
        not_applied(&running.needs_restart(fresh));
    }

    async fn connect(
        &self,
        config: &OrderConfig,
        metrics: &Arc<Metrics>,
    ) -> Result<Arc<crate::order::OrderApi>, rdkafka::error::KafkaError> {
        crate::order::OrderApi::connect(config.clone(), metrics.clone()).await
    }

    async fn run(
        &self,
        api: Arc<crate::order::OrderApi>,
        config: &OrderConfig,
        life: Life,
    ) -> ExitCode {
        let listener = match crate::serve::bind(config.listen).await {
            Ok(listener) => listener,
            Err(e) => {
                error!(listen = %config.listen, error = %e, "cannot listen for the API");
                return ExitCode::from(EX_FAILURE);
            }
        };
        life.health.set_ready(true);
        let line = format!("POST http://{}/order → {}", config.listen, config.topic);
        notify(&[NotifyState::Ready, NotifyState::Status(&line)]);
        info!(listen = %config.listen, topic = %config.topic, "ready");
        let watch =
            tokio::spawn(
                api.clone()
                    .watch(life.health, life.shutdown.clone(), life.trigger, line),
            );
        api.serve(listener, life.shutdown).await;
        match watch.await {
            Ok(None) => ExitCode::SUCCESS,
            // Gave up (logged where it happened), or the health check itself failed.
            Ok(Some(_)) | Err(_) => ExitCode::from(EX_FAILURE),
        }
    }
}

/// `main` of a stage daemon.
pub fn stage_main(service: Service, handler: Arc<dyn Handler>) -> ExitCode {
    daemon_main(StageKind {
        service,
        handler,
        simulate: Arc::default(),
    })
}

/// `main` of kop-order.
pub fn order_main() -> ExitCode {
    daemon_main(OrderKind)
}

async fn start_metrics(
    service_name: &str,
    stage: &str,
    listen: std::net::SocketAddr,
    shutdown: &Shutdown,
) -> Option<(Arc<Metrics>, Arc<Health>, tokio::task::JoinHandle<()>)> {
    let metrics = Metrics::new(service_name, stage)
        .inspect_err(|e| error!(error = %e, "cannot register metrics"))
        .ok()?;
    let health = Arc::new(Health::default());
    let listener = crate::serve::bind(listen)
        .await
        .inspect_err(|e| error!(%listen, error = %e, "cannot listen for metrics"))
        .ok()?;
    info!(%listen, "metrics on /metrics, /healthz, /readyz");
    let server = tokio::spawn(crate::metrics::serve(
        listener,
        metrics.clone(),
        health.clone(),
        shutdown.clone(),
    ));
    Some((metrics, health, server))
}

/// After a clean stop the metrics server has seen the shutdown and ends by itself; after a
/// failure nobody asked it to stop, so it is stopped here and the process exits non-zero
/// (and systemd restarts it).
async fn stop_serving_metrics(
    health: &Health,
    server: tokio::task::JoinHandle<()>,
    code: ExitCode,
) -> ExitCode {
    health.set_ready(false);
    if code != ExitCode::SUCCESS {
        server.abort();
    }
    let _ = server.await;
    info!("stopped");
    code
}
