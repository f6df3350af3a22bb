//! `cargo xtask kafka`: the command line of kop-harness. Progress goes to stderr; the last
//! line on stdout is the bootstrap address, so `brokers=$(cargo xtask kafka start --port 0)`
//! works. Exit status 1 on errors, 2 on usage errors, 3 from `status` when not running.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;
use kop_harness::{Error, Kafka, StartOptions};

pub const LONG_ABOUT: &str = "\
Runs Apache Kafka (KRaft mode, no ZooKeeper) on 127.0.0.1 for development and tests: a \
single node by default, or a cluster of several nodes on this machine. Needs Java 17+ and \
Maven (once, to fetch the jars named by scripts/kafka/pom.xml).";

pub const AFTER_HELP: &str = "\
Environment:
  KAFKA_PORT               client port when --port is not given (default 9092)
  KOP_KAFKA_STATE          state directory (default <repo>/.kafka)
  KOP_KAFKA_CACHE          jar cache (default ~/.cache/kop/kafka-<version>)
  KOP_KAFKA_JAVA_OPTS      extra JVM options, appended to the defaults (e.g. -Xmx1g)
  KOP_KAFKA_START_TIMEOUT  seconds \"start\" waits for the broker(s) (default 90)

State directory contents:
  broker.log (broker output; broker.log.1 is the previous run), bootstrap (the client
  address or list), bootstrap-plaintext (the PLAINTEXT listener(s); the same as bootstrap
  unless --sasl-ssl), kafka.pid, server.properties (rewritten on every start), cluster-id,
  mode (--nodes, --sasl-ssl), data/ (topic data and KRaft metadata). A cluster keeps the
  per-node files (broker.log, kafka.pid, server.properties, ports, data/) in node1/,
  node2/, ...

Exit status: 0 on success, 1 on errors, 2 on usage errors; status: 0 if the broker (every
node) runs, 3 if not.";

const START_ABOUT: &str = "\
Start the broker(s) in the background (fetching first if needed) and wait until they serve \
clients. Progress goes to stderr; the last line on stdout is the bootstrap address, e.g. \
127.0.0.1:9092 (a comma-separated list for a cluster), so
  brokers=$(cargo xtask kafka start --port 0)
works. If the broker(s) of this state directory already run, the address is printed and \
nothing else happens; nodes of a cluster that are down (see stop-node) are started.

--nodes and --sasl-ssl are remembered by the state directory; a later start needs neither, \
and changing them needs \"reset\".";

const SASL_SSL_HELP: &str = "\
Clients must use SASL_SSL with SCRAM-SHA-512: the client port is a SASL_SSL listener (TLS \
with DIR's certificate, SCRAM logins). DIR holds
  broker-key.pem   the broker's private key, PEM, unencrypted PKCS#8 (\"BEGIN PRIVATE KEY\")
  broker-cert.pem  its certificate (first), then any intermediates, PEM; its SAN must name \
127.0.0.1
  users            one \"name:password\" a line; each becomes a SCRAM-SHA-512 user when the \
storage is formatted (first start; later edits need \"reset\")
Controller and inter-broker traffic stay PLAINTEXT on loopback (an extra listener, see \
--internal-port and <state>/bootstrap-plaintext).";

const NODES_HELP: &str = "\
A cluster of N nodes (up to 9; 3 is the tested size; 1, the default, is the single \
broker), node.id 1..N, each broker and controller, all of them voters, each with its own \
JVM (-Xmx384m), directory and ports. Topics get replication factor min(N,3) by default and \
min.insync.replicas one less (at least 1), the offsets and transaction state topics too. \
The ports are chosen at the first start and kept until \"reset\".";

#[derive(Subcommand)]
pub enum Command {
    /// Collect the broker jars with Maven into the cache, unless already there.
    Fetch,
    /// Start the broker(s) and wait until they serve clients; print the bootstrap address.
    #[command(long_about = START_ABOUT)]
    Start {
        /// Client port; 0 picks a free one (default: $KAFKA_PORT, else 9092). In a cluster
        /// node i gets N+i-1 (0: free ones).
        #[arg(long, value_name = "N")]
        port: Option<u16>,
        /// KRaft controller port (default: a free one; in a cluster node i gets N+i-1).
        #[arg(long, value_name = "N", default_value_t = 0, hide_default_value = true)]
        controller_port: u16,
        /// A cluster of N nodes (1-9).
        #[arg(long, value_name = "N", long_help = NODES_HELP)]
        nodes: Option<u32>,
        /// Clients must use SASL_SSL with SCRAM-SHA-512 (DIR: key, certificate, users).
        #[arg(long, value_name = "DIR", long_help = SASL_SSL_HELP)]
        sasl_ssl: Option<PathBuf>,
        /// With --sasl-ssl: the PLAINTEXT inter-broker port (default: a free one).
        #[arg(long, value_name = "N", default_value_t = 0, hide_default_value = true)]
        internal_port: u16,
    },
    /// Stop the broker(s): SIGTERM, SIGKILL if still alive after 30s.
    Stop,
    /// Cluster only: crash node N (SIGKILL, no clean shutdown); the others keep running.
    StopNode {
        #[arg(value_name = "N")]
        node: u32,
        /// SIGTERM (a clean shutdown) instead of SIGKILL.
        #[arg(long)]
        graceful: bool,
    },
    /// Cluster only: start node N again, with its data and ports; print the bootstrap list.
    StartNode {
        #[arg(value_name = "N")]
        node: u32,
    },
    /// Print whether the broker(s) run and the address; exit status 0 if it (every node)
    /// runs, 3 if not.
    Status,
    /// Stop the broker(s) and delete the state directory (all topics and data).
    Reset,
}

pub fn run(command: Command) -> ExitCode {
    match execute(command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kafka: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn execute(command: Command) -> kop_harness::Result<ExitCode> {
    let kafka = Kafka::from_env()?;
    match command {
        Command::Fetch => kafka.fetch(false)?,
        Command::Start {
            port,
            controller_port,
            nodes,
            sasl_ssl,
            internal_port,
        } => {
            if sasl_ssl.as_ref().is_some_and(|d| d.as_os_str().is_empty()) {
                return Err(Error::Failed("--sasl-ssl needs a directory".into()));
            }
            let options = StartOptions {
                port,
                controller_port,
                internal_port,
                nodes,
                sasl_ssl,
            };
            println!("{}", kafka.start(&options)?);
        }
        Command::Stop => kafka.stop()?,
        Command::StopNode { node, graceful } => kafka.stop_node(node, graceful)?,
        Command::StartNode { node } => println!("{}", kafka.start_node(node)?),
        Command::Status => return Ok(print_status(&kafka.status()?)),
        Command::Reset => kafka.reset()?,
    }
    Ok(ExitCode::SUCCESS)
}

fn print_status(status: &kop_harness::Status) -> ExitCode {
    let state = status.state.display();
    let address = status.bootstrap.as_deref().unwrap_or("?");
    if !status.cluster {
        return match status.nodes.first().and_then(|n| n.pid) {
            Some(pid) => {
                println!("running (pid {pid}) at {address}, state in {state}");
                ExitCode::SUCCESS
            }
            None => {
                println!("not running (state in {state})");
                ExitCode::from(3)
            }
        };
    }
    let up = status.nodes.iter().filter(|n| n.pid.is_some()).count();
    println!(
        "{up} of {} nodes running at {address}, state in {state}",
        status.nodes.len()
    );
    for node in &status.nodes {
        match (node.pid, &node.address) {
            (Some(pid), Some(at)) => println!("  node {}: running (pid {pid}) at {at}", node.id),
            (Some(pid), None) => println!("  node {}: running (pid {pid})", node.id),
            (None, _) => println!("  node {}: not running", node.id),
        }
    }
    if status.running() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    }
}
