//! Stopping, inspecting and deleting the broker(s) of a state directory.

use std::fs;
use std::path::PathBuf;

use crate::layout::{self, Mode, Node};
use crate::ports::Ports;
use crate::process::{self, broker_pid, kill_now, terminate};
use crate::{Kafka, Result, at, fail, say};

/// What `status` found.
#[derive(Clone, Debug)]
pub struct Status {
    pub state: PathBuf,
    /// More than one node.
    pub cluster: bool,
    /// The client address (list) of the last successful start.
    pub bootstrap: Option<String>,
    pub nodes: Vec<NodeStatus>,
}

#[derive(Clone, Debug)]
pub struct NodeStatus {
    pub id: u32,
    /// Set if it runs.
    pub pid: Option<u32>,
    /// The client address, when known (a cluster keeps its ports).
    pub address: Option<String>,
}

impl Status {
    /// True if the broker (every node) runs.
    pub fn running(&self) -> bool {
        self.nodes.iter().all(|n| n.pid.is_some())
    }
}

impl Kafka {
    fn nodes(&self, mode: &Mode) -> Vec<Node> {
        (1..=mode.nodes)
            .map(|id| Node::new(&self.state, mode, id))
            .collect()
    }

    /// Stops the broker(s): SIGTERM, SIGKILL if still alive after 30 s. All nodes at once:
    /// a cluster stopped one by one would lose its quorum half-way and leave the last
    /// nodes waiting for it.
    pub fn stop(&self) -> Result<()> {
        let mode = Mode::read(&self.state)?;
        let what = if mode.cluster() {
            format!("{}-node cluster", mode.nodes)
        } else {
            "broker".into()
        };
        let nodes = self.nodes(&mode);
        let mut pids = Vec::new();
        for node in &nodes {
            match broker_pid(node) {
                Some(pid) => pids.push(pid),
                None => node.remove_pid_file(),
            }
        }
        if pids.is_empty() {
            say(format!(
                "no broker running (state in {})",
                self.state.display()
            ));
            return Ok(());
        }
        say(format!(
            "stopping {what} (pid {}) ...",
            process::join(&pids)
        ));
        terminate(&pids)?;
        for node in &nodes {
            node.remove_pid_file();
        }
        say(format!("{what} stopped"));
        Ok(())
    }

    /// Cluster only: crashes node `id` (SIGKILL, no clean shutdown), or with `graceful`
    /// stops it with SIGTERM. The other nodes keep running.
    pub fn stop_node(&self, id: u32, graceful: bool) -> Result<()> {
        let mode = self.cluster_mode("stop-node", id)?;
        let node = Node::new(&self.state, &mode, id);
        let Some(pid) = broker_pid(&node) else {
            say(format!("node {id} is not running"));
            node.remove_pid_file();
            return Ok(());
        };
        if graceful {
            say(format!("stopping node {id} (pid {pid}) ..."));
            terminate(&[pid])?;
        } else {
            say(format!("killing node {id} (pid {pid}, SIGKILL)"));
            kill_now(&[pid])?;
        }
        node.remove_pid_file();
        say(format!("node {id} stopped"));
        Ok(())
    }

    /// Whether the broker(s) run, and where.
    pub fn status(&self) -> Result<Status> {
        let mode = Mode::read(&self.state)?;
        let mut nodes = Vec::new();
        for node in self.nodes(&mode) {
            let address = if mode.cluster() {
                Ports::load(&node.ports_file)?.map(|p| format!("127.0.0.1:{}", p.client()))
            } else {
                None
            };
            nodes.push(NodeStatus {
                id: node.id,
                pid: broker_pid(&node),
                address,
            });
        }
        Ok(Status {
            state: self.state.clone(),
            cluster: mode.cluster(),
            bootstrap: layout::read_line(&self.state.join(layout::BOOTSTRAP)),
            nodes,
        })
    }

    /// Stops the broker(s) and deletes the state directory (all topics and data).
    pub fn reset(&self) -> Result<()> {
        self.stop()?;
        if !self.state.exists() {
            return Ok(());
        }
        // Guard against a mistyped KOP_KAFKA_STATE: only delete what we created.
        let marker = self.state.join(layout::MARKER);
        let empty = fs::read_dir(&self.state)
            .map_err(at(&self.state))?
            .next()
            .is_none();
        if !marker.is_file() && !empty {
            return fail(format!(
                "{} was not created by cargo xtask kafka (no {}); not deleting it",
                self.state.display(),
                layout::MARKER
            ));
        }
        fs::remove_dir_all(&self.state).map_err(at(&self.state))?;
        say(format!("deleted {}", self.state.display()));
        Ok(())
    }
}
