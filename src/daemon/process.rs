//! The plumbing every daemon process shares: command line and configuration, runtime,
//! signals, waiting for Kafka, and the metrics server's start and stop.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use futures_util::StreamExt;
use sd_notify::NotifyState;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use tracing::{error, info};

use crate::config::{self, ConfigError, Service};
use crate::lifecycle::{Health, Shutdown, ShutdownTrigger, notify, status};
use crate::metrics::Metrics;

/// Exit status for a failure at run time (Kafka fatal error, port in use); systemd restarts.
pub(super) const EX_FAILURE: u8 = 1;

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

/// SIGTERM and SIGINT trigger the shutdown; SIGHUP calls `reload`.
pub(super) fn spawn_signals(
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
pub(super) fn load<C>(
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

pub(super) fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

/// Keeps trying `connect` until it works or shutdown is asked, telling systemd and the log
/// why the daemon is not ready yet. An unreachable broker is a state to wait out, not a crash.
pub(super) async fn connect_with_backoff<
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

pub(super) async fn start_metrics(
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
pub(super) async fn stop_serving_metrics(
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
