//! The daemons and tools under test as child processes: where their binaries and shipped
//! configuration are, a running daemon (started, waited for, signalled, stopped), its log.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::http::http_get;
use super::{repo, unique};

pub fn binary(name: &str) -> PathBuf {
    // Cargo builds every binary of the package before integration tests run.
    let dir = PathBuf::from(env!("CARGO_BIN_EXE_kop-order"));
    dir.parent().expect("bin dir").join(name)
}

/// A running daemon; killed when dropped.
pub struct Daemon {
    pub name: String,
    pub child: Child,
    pub metrics_port: u16,
    pub log: PathBuf,
    pub env: Vec<(String, String)>,
    /// The configuration file it was started with; a restart uses it again.
    pub config: PathBuf,
}

/// The configuration file shipped for a daemon (etc/kop/<service>.toml).
pub fn shipped_config(service: &str) -> PathBuf {
    repo().join(format!("etc/kop/{service}.toml"))
}

impl Daemon {
    pub fn spawn(service: &str, env: &[(String, String)], log_dir: &Path) -> Daemon {
        Daemon::spawn_with_config(service, env, log_dir, &shipped_config(service))
    }

    pub fn spawn_with_config(
        service: &str,
        env: &[(String, String)],
        log_dir: &Path,
        config: &Path,
    ) -> Daemon {
        Daemon::launch(service, env, log_dir, config, |_| {})
    }

    /// Starts `kop-<service> --config <config>` with `env`, its output in a log file under
    /// `log_dir`; `customize` may change the command last (e.g. set NOTIFY_SOCKET, which is
    /// otherwise removed).
    pub fn launch(
        service: &str,
        env: &[(String, String)],
        log_dir: &Path,
        config: &Path,
        customize: impl FnOnce(&mut Command),
    ) -> Daemon {
        let metrics_port = env
            .iter()
            .find(|(k, _)| k == "METRICS_PORT")
            .map(|(_, v)| v.parse().expect("port"))
            .expect("METRICS_PORT in env");
        let log = log_dir.join(format!("{service}-{}.log", unique("run")));
        let file = std::fs::File::create(&log).expect("log file");
        let mut command = Command::new(binary(&format!("kop-{service}")));
        command
            .arg("--config")
            .arg(config)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("LOG_LEVEL", "info,librdkafka=warn")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log"))
            .stderr(file);
        customize(&mut command);
        let child = command.spawn().expect("spawn daemon");
        Daemon {
            name: service.to_string(),
            child,
            metrics_port,
            log,
            env: env.to_vec(),
            config: config.to_path_buf(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.pid().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{signal} {}", self.pid());
    }

    /// Waits for the exit and returns the status code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status.code();
            }
            if Instant::now() > deadline {
                panic!(
                    "{} did not exit within {timeout:?}; log:\n{}",
                    self.name,
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn wait_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok((200, _)) = http_get(self.metrics_port, "/readyz").await {
                return;
            }
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!(
                    "{} exited with {status} before ready; log:\n{}",
                    self.name,
                    self.log_text()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "{} not ready within {timeout:?}; log:\n{}",
                    self.name,
                    self.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn metrics(&self) -> String {
        http_get(self.metrics_port, "/metrics")
            .await
            .expect("metrics")
            .1
    }
}

impl Drop for Daemon {
    /// Stops the daemon the way systemd would, so it leaves its consumer group at once and
    /// the next member does not wait for the session to time out; kills it if it hangs.
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = Command::new("kill")
                .args(["-TERM", &self.pid().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(15);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The last `lines` lines of a file (a daemon's log), or a note that it cannot be read.
pub fn tail(path: &Path, lines: usize) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}
