//! The global logger (journald, text or JSON on stderr) and its level, which SIGHUP changes.

use tracing::warn;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry, reload};

use crate::config::{LogConfig, LogFormat};

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
