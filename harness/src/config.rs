//! What a node is started with: its server.properties, the key store and SCRAM users of
//! --sasl-ssl, the cluster id and the KRaft storage format.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};

use crate::fetch::sha256;
use crate::layout::{self, Mode, Node};
use crate::ports::Ports;
use crate::{Error, Kafka, Result, at, fail, say};

const SCRAM_MECHANISM: &str = "SCRAM-SHA-512";

/// Writes the server.properties of `node`; `ports` are those of every node (each names all
/// controllers). Rewritten on every start, since the ports of a single broker may change.
pub(crate) fn write_server_properties(node: &Node, mode: &Mode, ports: &[Ports]) -> Result<()> {
    let own = ports[node.id as usize - 1];
    let voters = ports
        .iter()
        .enumerate()
        .map(|(i, p)| format!("{}@127.0.0.1:{}", i + 1, p.controller))
        .collect::<Vec<_>>()
        .join(",");
    // As many replicas as there are nodes, up to 3, and writes that survive the loss of
    // one of them.
    let rf = mode.nodes.min(3);
    let min_isr = if rf > 1 { rf - 1 } else { 1 };
    let mut text = String::from(
        "# Written by cargo xtask kafka on every start (the ports may change); edits are lost.\n\n",
    );
    if mode.cluster() {
        text += &format!(
            "# Node {} of {}; each node is broker and KRaft controller, all are voters.\n",
            node.id, mode.nodes
        );
    } else {
        text += "# One JVM is the whole cluster: broker and KRaft controller, node 1.\n";
    }
    text += &format!(
        "process.roles=broker,controller\nnode.id={}\ncontroller.quorum.voters={voters}\n\
         controller.listener.names=CONTROLLER\n",
        node.id
    );
    let (plain, controller) = (own.plain, own.controller);
    match (&mode.sasl_ssl, own.secure) {
        (Some(dir), Some(secure)) => {
            text += &format!(
                "
# Clients: SASL_SSL with {SCRAM_MECHANISM} (users created when the storage was
# formatted). Controller and inter-broker traffic: PLAINTEXT on loopback.
listeners=INTERNAL://127.0.0.1:{plain},EXTERNAL://127.0.0.1:{secure},CONTROLLER://127.0.0.1:{controller}
advertised.listeners=INTERNAL://127.0.0.1:{plain},EXTERNAL://127.0.0.1:{secure}
listener.security.protocol.map=INTERNAL:PLAINTEXT,EXTERNAL:SASL_SSL,CONTROLLER:PLAINTEXT
inter.broker.listener.name=INTERNAL
sasl.enabled.mechanisms={SCRAM_MECHANISM}
listener.name.external.sasl.enabled.mechanisms={SCRAM_MECHANISM}
listener.name.external.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
# Key and certificate chain in one PEM file (made from {}).
ssl.keystore.type=PEM
ssl.keystore.location={}
ssl.client.auth=none
",
                dir.display(),
                node.keystore.display()
            );
        }
        _ => {
            text += &format!(
                "listeners=PLAINTEXT://127.0.0.1:{plain},CONTROLLER://127.0.0.1:{controller}
advertised.listeners=PLAINTEXT://127.0.0.1:{plain}
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
"
            );
        }
    }
    text += &format!(
        "
log.dirs={}
num.partitions=3
# The project creates its topics explicitly and must keep working where
# brokers refuse to auto-create them, so tests run with auto-creation off.
auto.create.topics.enable=false
default.replication.factor={rf}
min.insync.replicas={min_isr}

# Internal topics: as many replicas as the nodes allow (up to 3). Fewer
# partitions than the default 50 make the first consumer group / transaction
# faster.
offsets.topic.replication.factor={rf}
offsets.topic.num.partitions=10
transaction.state.log.replication.factor={rf}
transaction.state.log.min.isr={min_isr}
transaction.state.log.num.partitions=10
share.coordinator.state.topic.replication.factor={rf}
share.coordinator.state.topic.min.isr={min_isr}

# Tests start consumer groups all the time; don't wait 3 s for more members.
group.initial.rebalance.delay.ms=0

# Light on a small (2-core) machine.
num.network.threads=2
num.io.threads=4
num.recovery.threads.per.data.dir=1
log.cleaner.dedupe.buffer.size=33554432
",
        node.data.display()
    );
    fs::create_dir_all(&node.dir).map_err(at(&node.dir))?;
    fs::write(&node.config, text).map_err(at(&node.config))
}

/// The directory of --sasl-ssl, checked, with its users as StorageTool `--add-scram`
/// arguments.
pub(crate) struct SaslSsl {
    pub dir: PathBuf,
    pub scram_args: Vec<String>,
}

impl SaslSsl {
    pub fn load(dir: &Path) -> Result<SaslSsl> {
        let bad = |message: String| fail(format!("--sasl-ssl: {message}"));
        if !dir.is_dir() {
            return bad(format!("{} is not a directory", dir.display()));
        }
        let read = |name: &str| {
            let file = dir.join(name);
            fs::read_to_string(&file).map_err(|e| {
                Error::Failed(format!("--sasl-ssl: {}: {e} (see --help)", file.display()))
            })
        };
        let (key, cert, users) = (
            read("broker-key.pem")?,
            read("broker-cert.pem")?,
            read("users")?,
        );
        if !key.contains("-----BEGIN PRIVATE KEY-----") {
            return bad(format!(
                "{}/broker-key.pem must be an unencrypted PKCS#8 key ('BEGIN PRIVATE KEY'; \
                 convert with: openssl pkcs8 -topk8 -nocrypt -in KEY -out broker-key.pem)",
                dir.display()
            ));
        }
        if !cert.contains("-----BEGIN CERTIFICATE-----") {
            return bad(format!(
                "{}/broker-cert.pem holds no PEM certificate",
                dir.display()
            ));
        }
        let mut scram_args = Vec::new();
        for line in users.lines() {
            if line.trim().is_empty() || line.starts_with('#') {
                continue;
            }
            let (name, password) = match line.split_once(':') {
                Some((n, p)) if !n.is_empty() && !p.is_empty() => (n, p),
                _ => {
                    return bad(format!(
                        "{}/users: expected 'name:password', got '{line}'",
                        dir.display()
                    ));
                }
            };
            // The --add-scram syntax has no escapes for these.
            let forbidden = |c: char| c.is_whitespace() || "],\"=\\".contains(c);
            if name.contains(forbidden) || password.contains(forbidden) {
                return bad(format!(
                    "{}/users: user '{name}': names and passwords must not contain , ] \" = \\ \
                     or blanks",
                    dir.display()
                ));
            }
            scram_args.push("--add-scram".into());
            scram_args.push(format!(
                "{SCRAM_MECHANISM}=[name={name},password={password}]"
            ));
        }
        if scram_args.is_empty() {
            return bad(format!("{}/users names no user", dir.display()));
        }
        Ok(SaslSsl {
            dir: dir.to_path_buf(),
            scram_args,
        })
    }

    /// The broker reads key and certificate chain from one PEM file, private to it.
    pub fn write_keystore(&self, node: &Node) -> Result<()> {
        let mut pem = Vec::new();
        for name in ["broker-key.pem", "broker-cert.pem"] {
            let file = self.dir.join(name);
            pem.extend(fs::read(&file).map_err(at(&file))?);
        }
        fs::create_dir_all(&node.dir).map_err(at(&node.dir))?;
        let tmp = node.keystore.with_extension("pem.tmp");
        let _ = fs::remove_file(&tmp);
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut f| f.write_all(&pem))
            .map_err(at(&tmp))?;
        fs::rename(&tmp, &node.keystore).map_err(at(&node.keystore))
    }

    /// SCRAM users are created only when the storage is formatted; say so when the file
    /// changed since.
    pub fn warn_if_users_changed(&self, node: &Node) -> Result<()> {
        let Some(formatted_with) = layout::read_line(&node.users_sha) else {
            return Ok(());
        };
        if sha256(&self.dir.join("users"))? != formatted_with {
            say(format!(
                "warning: {}/users changed since the storage was formatted; SCRAM users are \
                 only created then ('reset' to recreate them)",
                self.dir.display()
            ));
        }
        Ok(())
    }
}

impl Kafka {
    /// First start only: picks a cluster id, kept (so later re-formats after a manual
    /// `rm -rf data` reuse it) and shared by all nodes of a cluster.
    pub(crate) fn ensure_cluster_id(&self, log: &Path) -> Result<String> {
        let file = self.state.join(layout::CLUSTER_ID);
        if let Some(id) = layout::read_line(&file) {
            return Ok(id);
        }
        let output = self
            .java_tool("kafka.tools.StorageTool")
            .arg("random-uuid")
            .stderr(append(log)?)
            .output()
            .map_err(|source| Error::Run {
                command: "java kafka.tools.StorageTool random-uuid".into(),
                source,
            })?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        let id = stdout.lines().last().unwrap_or_default().trim().to_string();
        if !output.status.success() || id.is_empty() {
            return fail(format!(
                "StorageTool random-uuid failed ({}; see {})",
                output.status,
                log.display()
            ));
        }
        layout::write_line(&file, &id)?;
        Ok(id)
    }

    /// Starts formatting the storage of `node` for KRaft (with the SCRAM users of
    /// --sasl-ssl), unless done before; a JVM per node, so a cluster's run side by side.
    pub(crate) fn format_storage(
        &self,
        node: &Node,
        cluster_id: &str,
        sasl: Option<&SaslSsl>,
    ) -> Result<Option<Child>> {
        if node.formatted() {
            return Ok(None);
        }
        say(format!(
            "formatting storage in {} (cluster id {cluster_id})",
            node.data.display()
        ));
        let child = self
            .java_tool("kafka.tools.StorageTool")
            .arg("format")
            .arg("-t")
            .arg(cluster_id)
            .arg("-c")
            .arg(&node.config)
            .args(sasl.map(|s| s.scram_args.as_slice()).unwrap_or_default())
            .stdout(append(&node.log)?)
            .stderr(append(&node.log)?)
            .spawn()
            .map_err(|source| Error::Run {
                command: "java kafka.tools.StorageTool format".into(),
                source,
            })?;
        Ok(Some(child))
    }

    /// Waits for a format started by `format_storage`.
    pub(crate) fn finish_format(
        &self,
        node: &Node,
        child: Child,
        sasl: Option<&SaslSsl>,
    ) -> Result<()> {
        let output = child.wait_with_output().map_err(at(&node.log))?;
        if !output.status.success() {
            return fail(format!(
                "formatting the storage in {} failed ({}); {}",
                node.data.display(),
                output.status,
                node.log_tail(20)
            ));
        }
        if let Some(sasl) = sasl {
            layout::write_line(&node.users_sha, &sha256(&sasl.dir.join("users"))?)?;
        }
        Ok(())
    }
}

/// A file opened for appending, for a child's output.
pub(crate) fn append(file: &Path) -> Result<Stdio> {
    if let Some(dir) = file.parent() {
        fs::create_dir_all(dir).map_err(at(dir))?;
    }
    fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(file)
        .map(Stdio::from)
        .map_err(at(file))
}
