//! The state directory: which files live where, and the small records kept in it (the
//! mode, the ports of a cluster's nodes). A single broker keeps its files directly in the
//! state directory; node i of a cluster lives in node<i>/.

use std::fs;
use std::path::{Path, PathBuf};

use crate::{MAX_NODES, Result, at, fail};

pub(crate) const BOOTSTRAP: &str = "bootstrap";
pub(crate) const BOOTSTRAP_PLAINTEXT: &str = "bootstrap-plaintext";
pub(crate) const CLUSTER_ID: &str = "cluster-id";
const MODE: &str = "mode";
/// Lets `reset` check that it only ever deletes a directory made by us.
pub(crate) const MARKER: &str = ".kop-kafka-state";

/// The shape of what a state directory holds. No mode file: a single plaintext broker,
/// as state directories made before these options were.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Mode {
    pub nodes: u32,
    /// Absolute; `None`: plaintext only.
    pub sasl_ssl: Option<PathBuf>,
}

impl Mode {
    pub fn read(state: &Path) -> Result<Mode> {
        let mut mode = Mode {
            nodes: 1,
            sasl_ssl: None,
        };
        let file = state.join(MODE);
        let Ok(text) = fs::read_to_string(&file) else {
            return Ok(mode);
        };
        for line in text.lines() {
            match line.split_once('=') {
                Some(("nodes", value)) => {
                    mode.nodes = match value.parse() {
                        Ok(n) if (1..=MAX_NODES).contains(&n) => n,
                        _ => return fail(format!("{}: bad 'nodes={value}'", file.display())),
                    }
                }
                Some(("sasl_ssl", value)) if !value.is_empty() => {
                    mode.sasl_ssl = Some(PathBuf::from(value));
                }
                _ => {}
            }
        }
        Ok(mode)
    }

    pub fn write(&self, state: &Path) -> Result<()> {
        let mut text = format!("nodes={}\n", self.nodes);
        if let Some(dir) = &self.sasl_ssl {
            text += &format!("sasl_ssl={}\n", dir.display());
        }
        let file = state.join(MODE);
        fs::write(&file, text).map_err(at(&file))
    }

    pub fn cluster(&self) -> bool {
        self.nodes > 1
    }

    /// "a 3-node cluster" or "a single broker", for messages.
    pub fn describe(&self) -> String {
        if self.cluster() {
            format!("a {}-node cluster", self.nodes)
        } else {
            "a single broker".into()
        }
    }
}

/// The files of one node.
#[derive(Clone, Debug)]
pub(crate) struct Node {
    pub id: u32,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub data: PathBuf,
    pub pid_file: PathBuf,
    pub log: PathBuf,
    pub ports_file: PathBuf,
    pub keystore: PathBuf,
    pub users_sha: PathBuf,
}

impl Node {
    pub fn new(state: &Path, mode: &Mode, id: u32) -> Node {
        let dir = if mode.cluster() {
            state.join(format!("node{id}"))
        } else {
            state.to_path_buf()
        };
        Node {
            id,
            config: dir.join("server.properties"),
            data: dir.join("data"),
            pid_file: dir.join("kafka.pid"),
            log: dir.join("broker.log"),
            ports_file: dir.join("ports"),
            keystore: dir.join("keystore.pem"),
            users_sha: dir.join("users.sha256"),
            dir,
        }
    }

    pub fn formatted(&self) -> bool {
        self.data.join("meta.properties").is_file()
    }

    /// Keeps the previous run's log for a look after a restart.
    pub fn rotate_log(&self) -> Result<()> {
        fs::create_dir_all(&self.dir).map_err(at(&self.dir))?;
        if self.log.is_file() {
            let old = self.dir.join("broker.log.1");
            fs::rename(&self.log, &old).map_err(at(&old))?;
        }
        Ok(())
    }

    /// The last lines of the broker log, for an error message.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        let tail = all[all.len().saturating_sub(lines)..].join("\n");
        format!("last lines of {}:\n{tail}", self.log.display())
    }

    pub fn remove_pid_file(&self) {
        let _ = fs::remove_file(&self.pid_file);
    }
}

/// True once some node's storage has been formatted: from then on the mode is fixed.
pub(crate) fn formatted(state: &Path) -> bool {
    if state.join("data/meta.properties").is_file() {
        return true;
    }
    (1..=MAX_NODES).any(|i| {
        state
            .join(format!("node{i}/data/meta.properties"))
            .is_file()
    })
}

/// Writes a one-line file (the bootstrap addresses, the cluster id).
pub(crate) fn write_line(file: &Path, line: &str) -> Result<()> {
    fs::write(file, format!("{line}\n")).map_err(at(file))
}

pub(crate) fn read_line(file: &Path) -> Option<String> {
    let text = fs::read_to_string(file).ok()?;
    let line = text.lines().next()?.trim().to_string();
    (!line.is_empty()).then_some(line)
}
