//! The life of a daemon as its tasks see it: a shutdown every task listens to, readiness
//! for `/readyz`, and what the service manager is told (`READY=1`, `STATUS=`, the
//! watchdog). It imports nothing of kop, so any module can use it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sd_notify::NotifyState;
use tokio::sync::watch;
use tracing::warn;

/// A shutdown signal shared by every task: each holds a `Shutdown` and returns once it fires.
#[derive(Clone)]
pub struct Shutdown(watch::Receiver<bool>);

/// Fires the shutdown: a signal handler holds one, and so may a task that finds the daemon
/// cannot go on.
#[derive(Clone)]
pub struct ShutdownTrigger(Arc<watch::Sender<bool>>);

pub fn shutdown_channel() -> (ShutdownTrigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (ShutdownTrigger(Arc::new(tx)), Shutdown(rx))
}

impl ShutdownTrigger {
    pub fn trigger(&self) {
        self.0.send_replace(true);
    }
}

impl Shutdown {
    /// Resolves once shutdown has been triggered (at once if it already was).
    pub async fn wait(&mut self) {
        // An error means every trigger is gone, which only happens at exit: treat as fired.
        let _ = self.0.wait_for(|fired| *fired).await;
    }

    pub fn is_triggered(&self) -> bool {
        *self.0.borrow()
    }
}

/// Readiness of the daemon, shown by `/readyz`.
#[derive(Default)]
pub struct Health {
    ready: AtomicBool,
}

impl Health {
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }
}

/// Sends `WATCHDOG=1` while the loop that owns it keeps calling [`Watchdog::ping`].
pub struct Watchdog {
    interval: Option<Duration>,
    last: Instant,
}

impl Watchdog {
    /// Enabled when the service manager set `WATCHDOG_USEC` for this process.
    pub fn from_env() -> Self {
        Watchdog {
            interval: sd_notify::watchdog_enabled().map(|timeout| timeout / 4),
            last: Instant::now(),
        }
    }

    /// How often the owner should call [`Watchdog::ping`] at the least.
    pub fn tick(&self) -> Duration {
        self.interval
            .unwrap_or(Duration::from_secs(1))
            .max(Duration::from_millis(10))
    }

    pub fn ping(&mut self) {
        // Half the interval: a tick that fires a little early still pings.
        if let Some(interval) = self.interval
            && self.last.elapsed() >= interval / 2
        {
            self.last = Instant::now();
            notify(&[NotifyState::Watchdog]);
        }
    }
}

/// Tells the service manager; without `NOTIFY_SOCKET` this does nothing.
pub fn notify(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        warn!(error = %e, "sd_notify failed");
    }
}

pub fn status(line: &str) {
    notify(&[NotifyState::Status(line)]);
}
