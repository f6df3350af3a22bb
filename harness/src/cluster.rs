//! Starting the broker(s): the mode a state directory is fixed to, the ports, and waiting
//! until every node serves clients.

use std::collections::HashSet;
use std::fs;
use std::path::PathBuf;
use std::process::Child;
use std::time::{Duration, Instant};

use crate::config::{SaslSsl, write_server_properties};
use crate::layout::{self, Mode, Node};
use crate::ports::{
    Ports, Wanted, bootstrap_list, check_ports, fill_free_ports, pick_cluster_ports,
};
use crate::process::{self, broker_pid, kill_now, lost_a_port, port_open};
use crate::{Kafka, MAX_NODES, Result, StartOptions, at, fail, probe, say};

/// A node just launched and not yet known to serve clients.
struct Launched {
    node: Node,
    ports: Ports,
    child: Child,
}

enum Waited {
    Died(u32),
    TimedOut,
}

impl Kafka {
    /// Starts the broker(s) in the background (fetching the jars first if needed) and
    /// waits until they serve clients; returns the bootstrap address (a comma-separated
    /// list for a cluster). If the broker(s) of this state directory already run, that is
    /// all; nodes of a cluster that are down are started.
    pub fn start(&self, options: &StartOptions) -> Result<String> {
        if let Some(nodes) = options.nodes
            && !(1..=MAX_NODES).contains(&nodes)
        {
            return fail(format!(
                "--nodes needs a number from 1 to {MAX_NODES}, got '{nodes}'"
            ));
        }
        let sasl_ssl = match &options.sasl_ssl {
            Some(dir) if !dir.is_dir() => {
                return fail(format!("--sasl-ssl: {} is not a directory", dir.display()));
            }
            Some(dir) => Some(fs::canonicalize(dir).map_err(at(dir))?),
            None => None,
        };
        fs::create_dir_all(&self.state).map_err(at(&self.state))?;
        let marker = self.state.join(layout::MARKER);
        fs::write(&marker, "").map_err(at(&marker))?;
        let mode = self.apply_mode(options.nodes, sasl_ssl)?;
        let wanted = Wanted {
            port: match options.port {
                Some(port) => port,
                None => self.default_port()?,
            },
            explicit: options.port.is_some(),
            controller: options.controller_port,
            internal: options.internal_port,
        };
        if mode.cluster() {
            self.start_nodes(&mode, wanted, (1..=mode.nodes).collect())
        } else {
            self.start_single(&mode, wanted)
        }
    }

    /// Cluster only: starts node `id` again, with its data and ports, and waits until it
    /// serves clients; returns the bootstrap list.
    pub fn start_node(&self, id: u32) -> Result<String> {
        let mode = self.cluster_mode("start-node", id)?;
        let node = Node::new(&self.state, &mode, id);
        if !node.ports_file.is_file() {
            return fail(format!("node {id} was never started; use 'start'"));
        }
        let wanted = Wanted {
            port: 0,
            explicit: false,
            controller: 0,
            internal: 0,
        };
        self.start_nodes(&mode, wanted, vec![id])
    }

    /// The mode of a cluster, for a command on its node `id`.
    pub(crate) fn cluster_mode(&self, command: &str, id: u32) -> Result<Mode> {
        let mode = Mode::read(&self.state)?;
        if !mode.cluster() {
            return fail(format!(
                "{command} needs a cluster (start --nodes N); {} holds a single broker",
                self.state.display()
            ));
        }
        if !(1..=mode.nodes).contains(&id) {
            return fail(format!(
                "no node '{id}': the cluster in {} has nodes 1..{}",
                self.state.display(),
                mode.nodes
            ));
        }
        Ok(mode)
    }

    /// Fixes the mode from the options and what the state directory already holds, and
    /// records it: once formatted, a different one needs `reset`.
    fn apply_mode(&self, nodes: Option<u32>, sasl_ssl: Option<PathBuf>) -> Result<Mode> {
        let mut mode = Mode::read(&self.state)?;
        let state = self.state.display();
        if layout::formatted(&self.state) {
            if let Some(nodes) = nodes
                && nodes != mode.nodes
            {
                return fail(format!(
                    "{state} holds {}; 'reset' it to start {nodes} node(s)",
                    mode.describe()
                ));
            }
            if sasl_ssl.is_some() && sasl_ssl != mode.sasl_ssl {
                let formatted = match &mode.sasl_ssl {
                    Some(dir) => format!("with --sasl-ssl {}", dir.display()),
                    None => "without --sasl-ssl".into(),
                };
                return fail(format!(
                    "{state} was formatted {formatted}; 'reset' it first"
                ));
            }
        } else {
            mode.nodes = nodes.unwrap_or(mode.nodes);
            mode.sasl_ssl = sasl_ssl.or(mode.sasl_ssl);
        }
        mode.write(&self.state)?;
        Ok(mode)
    }

    fn load_sasl_ssl(&self, mode: &Mode) -> Result<Option<SaslSsl>> {
        mode.sasl_ssl.as_deref().map(SaslSsl::load).transpose()
    }

    /// The single broker: its ports are picked anew on every start.
    fn start_single(&self, mode: &Mode, wanted: Wanted) -> Result<String> {
        let node = Node::new(&self.state, mode, 1);
        let bootstrap = self.state.join(layout::BOOTSTRAP);
        let plaintext = self.state.join(layout::BOOTSTRAP_PLAINTEXT);
        if let Some(pid) = broker_pid(&node) {
            let address = layout::read_line(&bootstrap).unwrap_or_default();
            say(format!(
                "broker already running (pid {pid}) at {address}, state in {}",
                self.state.display()
            ));
            if wanted.explicit
                && wanted.port != 0
                && address != format!("127.0.0.1:{}", wanted.port)
            {
                say(format!(
                    "warning: it does not listen on the requested port {}; run 'stop' first \
                     to change ports",
                    wanted.port
                ));
            }
            return Ok(address);
        }

        self.fetch(true)?;
        let sasl = self.load_sasl_ssl(mode)?;
        if let Some(sasl) = &sasl {
            sasl.warn_if_users_changed(&node)?;
            sasl.write_keystore(&node)?;
        }
        let _ = fs::remove_file(&bootstrap);
        let _ = fs::remove_file(&plaintext);
        node.rotate_log()?;

        // A port we picked ourselves can, rarely, be taken by someone else before the
        // broker binds it; then simply try again with new ports.
        for attempt in 1..=3 {
            let mut ports = match sasl {
                Some(_) => Ports {
                    plain: wanted.internal,
                    controller: wanted.controller,
                    secure: Some(wanted.port),
                },
                None => Ports {
                    plain: wanted.port,
                    controller: wanted.controller,
                    secure: None,
                },
            };
            let picked = fill_free_ports(&mut ports, &[])?;
            check_ports(&ports)?;
            write_server_properties(&node, mode, &[ports])?;
            self.format_once(&[&node], sasl.as_ref())?;
            say(format!(
                "starting Kafka {} on 127.0.0.1:{}{} (controller port {}), state in {}",
                self.version,
                ports.client(),
                describe_internal(&ports),
                ports.controller,
                self.state.display()
            ));
            let child = self.launch(&node, mode)?;
            let pid = child.id();
            let mut launched = vec![Launched {
                node: node.clone(),
                ports,
                child,
            }];
            match self.wait_until_serving(&mut launched) {
                Ok(()) => {
                    let address = format!("127.0.0.1:{}", ports.client());
                    layout::write_line(&plaintext, &format!("127.0.0.1:{}", ports.plain))?;
                    layout::write_line(&bootstrap, &address)?;
                    say(format!(
                        "broker running (pid {pid}), log in {}",
                        node.log.display()
                    ));
                    return Ok(address);
                }
                Err(Waited::Died(_)) => {
                    node.remove_pid_file();
                    if lost_a_port(&node) && attempt < 3 && picked {
                        say("a port was taken meanwhile; retrying with other ports");
                        continue;
                    }
                    return fail(format!(
                        "the broker exited during startup; {}",
                        node.log_tail(40)
                    ));
                }
                Err(Waited::TimedOut) => {
                    say(format!(
                        "the broker did not serve clients within {}s; stopping it",
                        self.start_timeout.as_secs()
                    ));
                    process::terminate(&[pid])?;
                    node.remove_pid_file();
                    return fail(format!("broker start timed out; {}", node.log_tail(40)));
                }
            }
        }
        fail("could not start the broker")
    }

    /// Starts the nodes `ids` of the cluster (those not running already) and waits until
    /// all of them serve clients; returns the bootstrap list.
    fn start_nodes(&self, mode: &Mode, wanted: Wanted, ids: Vec<u32>) -> Result<String> {
        let nodes: Vec<Node> = (1..=mode.nodes)
            .map(|id| Node::new(&self.state, mode, id))
            .collect();
        let node = |id: u32| &nodes[id as usize - 1];
        let (running, missing): (Vec<u32>, Vec<u32>) =
            ids.iter().partition(|&&id| broker_pid(node(id)).is_some());

        // Ports are chosen once and kept: every node's configuration names all
        // controllers, and clients know the bootstrap list.
        let loaded = nodes
            .iter()
            .map(|n| Ports::load(&n.ports_file))
            .collect::<Result<Vec<_>>>()?;
        let persisted = loaded.iter().all(Option::is_some);
        let mut ports: Vec<Ports>;
        if persisted {
            ports = loaded.into_iter().flatten().collect();
            if wanted.explicit && wanted.port != 0 && wanted.port != ports[0].client() {
                say(format!(
                    "warning: the cluster keeps the ports of its first start (node 1 at {}); \
                     'reset' to change them",
                    ports[0].client()
                ));
            }
        } else {
            if let Some(n) = nodes.iter().find(|n| broker_pid(n).is_some()) {
                return fail(format!(
                    "node {} runs, but {} is missing; 'stop' the cluster first",
                    n.id,
                    n.ports_file.display()
                ));
            }
            ports = pick_cluster_ports(mode, wanted)?;
        }

        if missing.is_empty() {
            let which = if ids.len() as u32 == mode.nodes {
                format!("all {} nodes", mode.nodes)
            } else {
                format!("node {}", process::join(&ids))
            };
            say(format!(
                "{which} already running, state in {}",
                self.state.display()
            ));
            return Ok(bootstrap_list(&ports, false));
        }
        if !running.is_empty() {
            say(format!(
                "node(s) {} not running; starting them",
                process::join(&missing)
            ));
        }

        self.fetch(true)?;
        let sasl = self.load_sasl_ssl(mode)?;
        for &id in &missing {
            node(id).rotate_log()?;
        }

        for attempt in 1..=3 {
            for &id in &missing {
                check_ports(&ports[id as usize - 1])?;
            }
            let starting: Vec<&Node> = missing.iter().map(|&id| node(id)).collect();
            for n in &starting {
                if let Some(sasl) = &sasl {
                    sasl.warn_if_users_changed(n)?;
                    sasl.write_keystore(n)?;
                }
                write_server_properties(n, mode, &ports)?;
            }
            self.format_once(&starting, sasl.as_ref())?;

            let mut launched = Vec::new();
            for n in &starting {
                let own = ports[n.id as usize - 1];
                say(format!(
                    "starting node {} of {}: Kafka {} on 127.0.0.1:{}{} (controller port {}), \
                     state in {}",
                    n.id,
                    mode.nodes,
                    self.version,
                    own.client(),
                    describe_internal(&own),
                    own.controller,
                    n.dir.display()
                ));
                let child = self.launch(n, mode)?;
                launched.push(Launched {
                    node: (*n).clone(),
                    ports: own,
                    child,
                });
            }

            match self.wait_until_serving(&mut launched) {
                Ok(()) => {
                    for (n, p) in nodes.iter().zip(&ports) {
                        p.save(&n.ports_file)?;
                    }
                    let plaintext = self.state.join(layout::BOOTSTRAP_PLAINTEXT);
                    layout::write_line(&plaintext, &bootstrap_list(&ports, true))?;
                    let list = bootstrap_list(&ports, false);
                    layout::write_line(&self.state.join(layout::BOOTSTRAP), &list)?;
                    for l in &launched {
                        say(format!(
                            "node {} running (pid {}), log in {}",
                            l.node.id,
                            l.child.id(),
                            l.node.log.display()
                        ));
                    }
                    return Ok(list);
                }
                Err(Waited::Died(dead)) => {
                    let dead = node(dead);
                    dead.remove_pid_file();
                    let retry = lost_a_port(dead)
                        && attempt < 3
                        && !persisted
                        && (wanted.port == 0 || wanted.controller == 0 || wanted.internal == 0);
                    let tail = dead.log_tail(40);
                    stop_launched(&launched)?;
                    if retry {
                        say("a port was taken meanwhile; retrying with other ports");
                        ports = pick_cluster_ports(mode, wanted)?;
                        continue;
                    }
                    return fail(format!("node {} exited during startup; {tail}", dead.id));
                }
                Err(Waited::TimedOut) => {
                    let tails: Vec<String> = starting.iter().map(|n| n.log_tail(15)).collect();
                    say(format!(
                        "the cluster did not serve clients within {}s; stopping the node(s) \
                         just started",
                        self.start_timeout.as_secs()
                    ));
                    stop_launched(&launched)?;
                    return fail(format!("cluster start timed out; {}", tails.join("\n")));
                }
            }
        }
        fail("could not start the cluster")
    }

    /// Formats the storage of the nodes not formatted yet (first start), side by side:
    /// a JVM each.
    fn format_once(&self, nodes: &[&Node], sasl: Option<&SaslSsl>) -> Result<()> {
        if nodes.iter().all(|n| n.formatted()) {
            return Ok(());
        }
        let cluster_id = self.ensure_cluster_id(&nodes[0].log)?;
        let mut formatting = Vec::new();
        for n in nodes {
            if let Some(child) = self.format_storage(n, &cluster_id, sasl)? {
                formatting.push((*n, child));
            }
        }
        let mut first_error = None;
        for (n, child) in formatting {
            if let Err(e) = self.finish_format(n, child, sasl) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Waits until every launched node serves clients, or one died, or the start timeout.
    fn wait_until_serving(&self, launched: &mut [Launched]) -> std::result::Result<(), Waited> {
        let deadline = Instant::now() + self.start_timeout;
        let mut served = HashSet::new();
        while Instant::now() < deadline {
            let mut waiting = false;
            for l in launched.iter_mut() {
                if served.contains(&l.node.id) {
                    continue;
                }
                if !matches!(l.child.try_wait(), Ok(None)) {
                    return Err(Waited::Died(l.node.id));
                }
                // The PLAINTEXT listener lists the node once it is unfenced; with
                // --sasl-ssl the SASL_SSL one must be open too.
                if probe::lists_node(l.ports.plain, l.node.id)
                    && l.ports.secure.is_none_or(port_open)
                {
                    served.insert(l.node.id);
                } else {
                    waiting = true;
                }
            }
            if !waiting {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        Err(Waited::TimedOut)
    }
}

/// ", SASL_SSL; inter-broker PLAINTEXT port N" with --sasl-ssl, for the start message.
fn describe_internal(ports: &Ports) -> String {
    match ports.secure {
        Some(_) => format!(" (SASL_SSL; inter-broker PLAINTEXT port {})", ports.plain),
        None => String::new(),
    }
}

/// Kills the nodes of a failed start (their data stays).
fn stop_launched(launched: &[Launched]) -> Result<()> {
    let pids: Vec<u32> = launched.iter().map(|l| l.child.id()).collect();
    kill_now(&pids)?;
    for l in launched {
        l.node.remove_pid_file();
    }
    Ok(())
}
