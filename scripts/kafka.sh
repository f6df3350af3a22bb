#!/usr/bin/env bash
# Fetch, start and stop a real Apache Kafka broker for development and tests:
# by default a single node (one JVM is both broker and controller), optionally
# a cluster of several such nodes on this machine (--nodes 3) and/or with an
# authenticated, encrypted SASL_SSL listener (--sasl-ssl DIR). KRaft mode, no
# ZooKeeper.
#
# There is no tarball download: scripts/kafka/pom.xml names the Kafka jars and
# Maven collects them (with all runtime dependencies) into a cache directory,
# so the only prerequisites are Java 17+ and Maven.
#
# Run "scripts/kafka.sh --help" for usage.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
POM=$SCRIPT_DIR/kafka/pom.xml
LOG4J_CONFIG=$SCRIPT_DIR/kafka/log4j2.properties

# The pom is the single place where the Kafka version is written down.
KAFKA_VERSION=$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$POM")
[[ -n $KAFKA_VERSION ]] || { echo "kafka.sh: no <kafka.version> in $POM" >&2; exit 1; }

CACHE_DIR=${KOP_KAFKA_CACHE:-$HOME/.cache/kop/kafka-$KAFKA_VERSION}
LIB_DIR=$CACHE_DIR/libs
# Written only after Maven succeeded, so an interrupted fetch is redone. It
# holds the pom's checksum, so editing the pom (e.g. a new version while
# KOP_KAFKA_CACHE is pinned) also triggers a new fetch.
FETCH_MARKER=$CACHE_DIR/fetch-complete

START_TIMEOUT=${KOP_KAFKA_START_TIMEOUT:-90}
STOP_TIMEOUT=30
DEFAULT_PORT=9092
MAX_NODES=9
SCRAM_MECHANISM=SCRAM-SHA-512

usage() {
	cat <<EOF
Usage: scripts/kafka.sh <command> [options]

Runs Apache Kafka $KAFKA_VERSION (KRaft mode, no ZooKeeper) on 127.0.0.1 for
development and tests: a single node by default, or a cluster of several
nodes on this machine. Needs Java 17+ and Maven.

Commands:
  fetch     Collect the broker jars with Maven into the cache, unless already there.
  start [--port N] [--controller-port N] [--nodes N] [--sasl-ssl DIR] [--internal-port N]
            Start the broker(s) in the background (fetching first if needed)
            and wait until they serve clients. Progress goes to stderr; the
            last line on stdout is the bootstrap address, e.g. 127.0.0.1:9092
            (a comma-separated list for a cluster), so
              brokers=\$(scripts/kafka.sh start --port 0)
            works. If the broker(s) of this state directory already run, the
            address is printed and nothing else happens; nodes of a cluster
            that are down (see stop-node) are started.
              --port N             client port; 0 picks a free one
                                   (default: \$KAFKA_PORT, else $DEFAULT_PORT). In a
                                   cluster node i gets N+i-1 (0: free ones).
              --controller-port N  KRaft controller port (default: a free one;
                                   in a cluster node i gets N+i-1)
              --nodes N            a cluster of N nodes (up to $MAX_NODES; 3 is the tested
                                   size; 1, the default, is the single broker),
                                   node.id 1..N, each broker and controller,
                                   all of them voters, each with its own JVM
                                   (-Xmx384m), directory and ports. Topics get
                                   replication factor min(N,3) by default and
                                   min.insync.replicas one less (at least 1), the
                                   offsets and transaction state topics too.
                                   The ports are chosen at the first start and
                                   kept until "reset".
              --sasl-ssl DIR       clients must use SASL_SSL with SCRAM-SHA-512:
                                   the client port is a SASL_SSL listener (TLS with
                                   DIR's certificate, SCRAM logins). DIR holds
                                     broker-key.pem   the broker's private key, PEM,
                                                      unencrypted PKCS#8
                                                      ("BEGIN PRIVATE KEY")
                                     broker-cert.pem  its certificate (first), then
                                                      any intermediates, PEM; its
                                                      SAN must name 127.0.0.1
                                     users            one "name:password" a line;
                                                      each becomes a SCRAM-SHA-512
                                                      user when the storage is
                                                      formatted (first start; later
                                                      edits need "reset")
                                   Controller and inter-broker traffic stay
                                   PLAINTEXT on loopback (an extra listener, see
                                   --internal-port and <state>/bootstrap-plaintext).
              --internal-port N    with --sasl-ssl: the PLAINTEXT inter-broker port
                                   (default: a free one)
            --nodes and --sasl-ssl are remembered by the state directory; a
            later start needs neither, and changing them needs "reset".
  stop      Stop the broker(s): SIGTERM, SIGKILL if still alive after ${STOP_TIMEOUT}s.
  stop-node N [--graceful]
            Cluster only: crash node N (SIGKILL, no clean shutdown); with
            --graceful a SIGTERM instead. The other nodes keep running.
  start-node N
            Cluster only: start node N again, with its data and ports, and wait
            until it serves clients. Prints the bootstrap list last.
  status    Print whether the broker(s) run and the address. Exit status 0 if
            it (every node) runs, 3 if not.
  reset     Stop the broker(s) and delete the state directory (all topics and data).
  help      This text (also -h, --help).

Environment:
  KAFKA_PORT               client port when --port is not given (default $DEFAULT_PORT)
  KOP_KAFKA_STATE          state directory (default <repo>/.kafka)
  KOP_KAFKA_CACHE          jar cache (default ~/.cache/kop/kafka-$KAFKA_VERSION)
  KOP_KAFKA_JAVA_OPTS      extra JVM options, appended to the defaults (e.g. -Xmx1g)
  KOP_KAFKA_START_TIMEOUT  seconds "start" waits for the broker(s) (default 90)

State directory contents:
  broker.log (broker output; broker.log.1 is the previous run), bootstrap
  (the client address or list), bootstrap-plaintext (the PLAINTEXT listener(s);
  the same as bootstrap unless --sasl-ssl), kafka.pid, server.properties
  (rewritten on every start), cluster-id, mode (--nodes, --sasl-ssl), data/
  (topic data and KRaft metadata). A cluster keeps the per-node files
  (broker.log, kafka.pid, server.properties, ports, data/) in node1/, node2/, ...
EOF
}

log() { printf 'kafka.sh: %s\n' "$*" >&2; }
die() {
	log "error: $*"
	exit 1
}

# Absolute path of the state directory, so that it can be matched against the
# broker's command line and does not depend on the caller's working directory.
resolve_state_dir() {
	local dir=${KOP_KAFKA_STATE:-$REPO_ROOT/.kafka}
	[[ $dir == /* ]] || dir=$PWD/$dir
	STATE_DIR=$dir
	BOOTSTRAP_FILE=$STATE_DIR/bootstrap
	PLAINTEXT_BOOTSTRAP_FILE=$STATE_DIR/bootstrap-plaintext
	CLUSTER_ID_FILE=$STATE_DIR/cluster-id
	MODE_FILE=$STATE_DIR/mode
	# Lets "reset" check that it only ever deletes a directory made by us.
	STATE_MARKER=$STATE_DIR/.kop-kafka-state
	read_mode
	select_node 1
}

# The shape of what this state directory holds: NODES (1: a single broker)
# and SASL_SSL_DIR (empty: plaintext only). No mode file: a single plaintext
# broker, as state directories made before these options were.
read_mode() {
	NODES=1 SASL_SSL_DIR=
	[[ -f $MODE_FILE ]] || return 0
	local key value
	while IFS='=' read -r key value; do
		case $key in
		nodes) NODES=$value ;;
		sasl_ssl) SASL_SSL_DIR=$value ;;
		esac
	done <"$MODE_FILE"
	[[ $NODES =~ ^[1-9]$ ]] || die "$MODE_FILE: bad 'nodes=$NODES'"
}

# Sets the paths of one node. A single broker keeps the original layout (all
# files directly in the state directory); node i of a cluster lives in nodei/.
select_node() {
	NODE=$1
	if ((NODES > 1)); then
		NODE_DIR=$STATE_DIR/node$NODE
	else
		NODE_DIR=$STATE_DIR
	fi
	CONFIG=$NODE_DIR/server.properties
	DATA_DIR=$NODE_DIR/data
	PID_FILE=$NODE_DIR/kafka.pid
	LOG_FILE=$NODE_DIR/broker.log
	PORTS_FILE=$NODE_DIR/ports
	KEYSTORE=$NODE_DIR/keystore.pem
}

# True once some node's storage has been formatted (from then on the mode is fixed).
state_formatted() {
	[[ -f $STATE_DIR/data/meta.properties ]] && return 0
	compgen -G "$STATE_DIR/node*/data/meta.properties" >/dev/null
}

# ---------------------------------------------------------------------------
# fetch

require_java() {
	command -v java >/dev/null ||
		die "java not found. Kafka $KAFKA_VERSION needs Java 17 or newer (Debian: apt-get install default-jre-headless)."
	local version major
	version=$(java -version 2>&1 | sed -n 's/.*version "\([^"]*\)".*/\1/p' | head -n 1)
	major=${version%%.*}
	if [[ $major =~ ^[0-9]+$ ]] && ((major < 17)); then
		die "java $version found, but Kafka $KAFKA_VERSION needs Java 17 or newer."
	fi
}

require_maven() {
	command -v mvn >/dev/null ||
		die "mvn not found. Maven is needed once to download the Kafka jars (Debian: apt-get install maven)."
}

pom_checksum() { sha256sum "$POM" | cut -d ' ' -f 1; }

fetch_is_complete() {
	[[ -f $FETCH_MARKER && $(<"$FETCH_MARKER") == "$(pom_checksum)" ]]
}

# With --quiet (used by "start"), says nothing when there is nothing to do.
cmd_fetch() {
	require_java
	if fetch_is_complete; then
		[[ ${1:-} == --quiet ]] || log "Kafka $KAFKA_VERSION jars already in $LIB_DIR"
		return 0
	fi
	require_maven
	mkdir -p "$CACHE_DIR"
	# The lock keeps two concurrent fetches (say a dev broker and a test run
	# starting together) from deleting each other's half-downloaded jars.
	# The subshell closes fd 9 when it ends, so no broker inherits the lock.
	(
		flock 9
		if fetch_is_complete; then
			exit 0 # somebody else finished while we waited for the lock
		fi
		rm -rf "$LIB_DIR" "$FETCH_MARKER"
		log "fetching Kafka $KAFKA_VERSION jars with Maven into $LIB_DIR (only needed once) ..."
		# Maven's chatter goes to a file ("start" keeps stdout for the address)
		# and is shown only when something went wrong.
		mvn -B -f "$POM" dependency:copy-dependencies \
			-DincludeScope=runtime -DoutputDirectory="$LIB_DIR" >"$CACHE_DIR/maven.log" 2>&1 ||
			{
				grep -v '^\[INFO\] Download' "$CACHE_DIR/maven.log" | tail -n 30 >&2
				log "error: Maven could not collect the Kafka jars (full output in $CACHE_DIR/maven.log; is Maven Central reachable?)"
				exit 1
			}
		[[ -f $LIB_DIR/kafka_2.13-$KAFKA_VERSION.jar ]] ||
			{
				log "error: Maven finished, but $LIB_DIR/kafka_2.13-$KAFKA_VERSION.jar is missing"
				exit 1
			}
		pom_checksum >"$FETCH_MARKER"
		log "fetched $(find "$LIB_DIR" -name '*.jar' | wc -l) jars"
	) 9>"$CACHE_DIR/.lock"
}

# Runs a Java main class from the Kafka jars with our logging configuration.
kafka_java() {
	java -Dlog4j2.configurationFile="$LOG4J_CONFIG" -cp "$LIB_DIR/*" "$@"
}

# ---------------------------------------------------------------------------
# processes and ports

# True if the process exists and is not a zombie. A broker that died while
# "start" (its parent) is still waiting can linger as a zombie, which kill -0
# would still report as alive.
is_alive() {
	local pid=$1 stat
	kill -0 "$pid" 2>/dev/null || return 1
	if stat=$(cat "/proc/$pid/stat" 2>/dev/null); then
		stat=${stat##*) } # the command name in parentheses may contain spaces
		[[ ${stat%% *} != Z ]]
	fi
}

# Prints the pid of the broker of the selected node if it is running.
broker_pid() {
	local pid cmdline
	[[ -f $PID_FILE ]] || return 1
	pid=$(<"$PID_FILE")
	[[ $pid =~ ^[0-9]+$ ]] && is_alive "$pid" || return 1
	# After a crash or reboot the pid may belong to some unrelated process now;
	# only trust it if it is a Kafka JVM running this node's config.
	if [[ -r /proc/$pid/cmdline ]]; then
		cmdline=$(tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline") || return 1
		[[ $cmdline == *kafka.Kafka*"$CONFIG"* ]] || return 1
	fi
	echo "$pid"
}

# True if something accepts TCP connections on 127.0.0.1:$1.
port_open() {
	(exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# Prints a port nobody listens on and that is none of the arguments. Chosen
# from 20000-32767: below Linux's ephemeral range (32768+), where outgoing
# connections get their local ports, so a busy client cannot grab it between
# our check and the broker's bind. The small remaining race is handled by
# retrying in start.
pick_free_port() {
	local port _ taken=" $* "
	for _ in {1..100}; do
		port=$((20000 + RANDOM % 12768))
		if [[ $taken != *" $port "* ]] && ! port_open "$port"; then
			echo "$port"
			return 0
		fi
	done
	die "found no free port on 127.0.0.1"
}

# True once the broker of node $2 answers a metadata request on port $1 and is
# listed in it, which it only is after registering with the controller and
# being unfenced, i.e. when topics can be created and used. An open port alone
# is not enough: the listener accepts connections a little earlier.
broker_serves_clients() {
	local port=$1 id=${2:-1}
	port_open "$port" || return 1
	if command -v kcat >/dev/null; then
		kcat -b "127.0.0.1:$port" -L -m 5 2>/dev/null | grep -q "broker $id at "
	else
		# Slower (a JVM per attempt) but needs nothing beyond the jars.
		timeout 30 java -Dlog4j2.configurationFile="$LOG4J_CONFIG" -Dlog4j2.level=ERROR \
			-cp "$LIB_DIR/*" org.apache.kafka.tools.BrokerApiVersionsCommand \
			--bootstrap-server "127.0.0.1:$port" 2>/dev/null | grep -q "(id: $id "
	fi
}

# Stops the given pids together: SIGTERM (a clean, controlled shutdown), then
# SIGKILL to whatever still runs after STOP_TIMEOUT.
terminate() {
	local pid i alive
	for pid in "$@"; do
		kill -TERM "$pid" 2>/dev/null || true
	done
	for ((i = 0; i < STOP_TIMEOUT * 5; i++)); do
		alive=()
		for pid in "$@"; do
			is_alive "$pid" && alive+=("$pid")
		done
		((${#alive[@]})) || return 0
		sleep 0.2
	done
	log "broker (pid ${alive[*]}) still running after ${STOP_TIMEOUT}s; sending SIGKILL"
	kill_now "${alive[@]}"
}

# SIGKILL, and wait until the processes are gone.
kill_now() {
	local pid i alive
	for pid in "$@"; do
		kill -KILL "$pid" 2>/dev/null || true
	done
	for ((i = 0; i < 50; i++)); do
		alive=()
		for pid in "$@"; do
			is_alive "$pid" && alive+=("$pid")
		done
		((${#alive[@]})) || return 0
		sleep 0.2
	done
	die "could not kill broker (pid ${alive[*]})"
}

print_log_tail() {
	[[ -f $LOG_FILE ]] || return 0
	log "last lines of $LOG_FILE:"
	tail -n "${1:-40}" "$LOG_FILE" >&2
}

# ---------------------------------------------------------------------------
# configuration

# Ports of node i: PLAIN_PORTS (the PLAINTEXT listener: the client port, or the
# inter-broker one with --sasl-ssl), CONTROLLER_PORTS, SECURE_PORTS (SASL_SSL).
PLAIN_PORTS=() CONTROLLER_PORTS=() SECURE_PORTS=()

# The port clients use on node i.
client_port() {
	if [[ -n $SASL_SSL_DIR ]]; then
		echo "${SECURE_PORTS[$1]}"
	else
		echo "${PLAIN_PORTS[$1]}"
	fi
}

# Every port of every node, for picking new ones that differ from them.
all_ports() {
	echo "${PLAIN_PORTS[*]} ${CONTROLLER_PORTS[*]} ${SECURE_PORTS[*]}"
}

write_config() {
	local id=$1 i voters='' rf min_isr
	local plain=${PLAIN_PORTS[$1]} controller=${CONTROLLER_PORTS[$1]} secure=${SECURE_PORTS[$1]:-}
	for ((i = 1; i <= NODES; i++)); do
		voters+=${voters:+,}$i@127.0.0.1:${CONTROLLER_PORTS[$i]}
	done
	# As many replicas as there are nodes, up to 3, and writes that survive the
	# loss of one of them.
	rf=$((NODES < 3 ? NODES : 3))
	min_isr=$((rf > 1 ? rf - 1 : 1))
	{
		cat <<EOF
# Written by scripts/kafka.sh on every start (the ports may change); edits are lost.

EOF
		if ((NODES == 1)); then
			echo "# One JVM is the whole cluster: broker and KRaft controller, node 1."
		else
			echo "# Node $id of $NODES; each node is broker and KRaft controller, all are voters."
		fi
		cat <<EOF
process.roles=broker,controller
node.id=$id
controller.quorum.voters=$voters
controller.listener.names=CONTROLLER
EOF
		if [[ -z $SASL_SSL_DIR ]]; then
			cat <<EOF
listeners=PLAINTEXT://127.0.0.1:$plain,CONTROLLER://127.0.0.1:$controller
advertised.listeners=PLAINTEXT://127.0.0.1:$plain
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
EOF
		else
			cat <<EOF

# Clients: SASL_SSL with SCRAM-SHA-512 (users created when the storage was
# formatted). Controller and inter-broker traffic: PLAINTEXT on loopback.
listeners=INTERNAL://127.0.0.1:$plain,EXTERNAL://127.0.0.1:$secure,CONTROLLER://127.0.0.1:$controller
advertised.listeners=INTERNAL://127.0.0.1:$plain,EXTERNAL://127.0.0.1:$secure
listener.security.protocol.map=INTERNAL:PLAINTEXT,EXTERNAL:SASL_SSL,CONTROLLER:PLAINTEXT
inter.broker.listener.name=INTERNAL
sasl.enabled.mechanisms=$SCRAM_MECHANISM
listener.name.external.sasl.enabled.mechanisms=$SCRAM_MECHANISM
listener.name.external.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
# Key and certificate chain in one PEM file (made from $SASL_SSL_DIR).
ssl.keystore.type=PEM
ssl.keystore.location=$KEYSTORE
ssl.client.auth=none
EOF
		fi
		cat <<EOF

log.dirs=$DATA_DIR
num.partitions=3
# The project creates its topics explicitly and must keep working where
# brokers refuse to auto-create them, so tests run with auto-creation off.
auto.create.topics.enable=false
default.replication.factor=$rf
min.insync.replicas=$min_isr

# Internal topics: as many replicas as the nodes allow (up to 3). Fewer
# partitions than the default 50 make the first consumer group / transaction
# faster.
offsets.topic.replication.factor=$rf
offsets.topic.num.partitions=10
transaction.state.log.replication.factor=$rf
transaction.state.log.min.isr=$min_isr
transaction.state.log.num.partitions=10
share.coordinator.state.topic.replication.factor=$rf
share.coordinator.state.topic.min.isr=$min_isr

# Tests start consumer groups all the time; don't wait 3 s for more members.
group.initial.rebalance.delay.ms=0

# Light on a small (2-core) machine.
num.network.threads=2
num.io.threads=4
num.recovery.threads.per.data.dir=1
log.cleaner.dedupe.buffer.size=33554432
EOF
	} >"$CONFIG"
}

# --sasl-ssl: checks DIR and reads its users into SCRAM_ARGS (StorageTool
# --add-scram arguments).
SCRAM_ARGS=()
load_sasl_ssl_dir() {
	[[ -n $SASL_SSL_DIR ]] || return 0
	local dir=$SASL_SSL_DIR file
	[[ -d $dir ]] || die "--sasl-ssl: $dir is not a directory"
	for file in broker-key.pem broker-cert.pem users; do
		[[ -r $dir/$file ]] || die "--sasl-ssl: $dir/$file is missing (see --help)"
	done
	grep -q -- '-----BEGIN PRIVATE KEY-----' "$dir/broker-key.pem" ||
		die "--sasl-ssl: $dir/broker-key.pem must be an unencrypted PKCS#8 key ('BEGIN PRIVATE KEY'; convert with: openssl pkcs8 -topk8 -nocrypt -in KEY -out broker-key.pem)"
	grep -q -- '-----BEGIN CERTIFICATE-----' "$dir/broker-cert.pem" ||
		die "--sasl-ssl: $dir/broker-cert.pem holds no PEM certificate"
	SCRAM_ARGS=()
	local line name password n=0
	while IFS= read -r line || [[ -n $line ]]; do
		[[ -z ${line//[[:space:]]/} || $line == \#* ]] && continue
		name=${line%%:*} password=${line#*:}
		[[ $line == *:* && -n $name && -n $password ]] ||
			die "--sasl-ssl: $dir/users: expected 'name:password', got '$line'"
		# The --add-scram syntax has no escapes for these.
		[[ $name$password != *[],\"=[:space:]\\]* ]] ||
			die "--sasl-ssl: $dir/users: user '$name': names and passwords must not contain , ] \" = \\ or blanks"
		SCRAM_ARGS+=(--add-scram "$SCRAM_MECHANISM=[name=$name,password=$password]")
		n=$((n + 1))
	done <"$dir/users"
	((n > 0)) || die "--sasl-ssl: $dir/users names no user"
}

# The broker reads key and certificate chain from one PEM file, private to it.
write_keystore() {
	[[ -n $SASL_SSL_DIR ]] || return 0
	(
		umask 077
		cat "$SASL_SSL_DIR/broker-key.pem" "$SASL_SSL_DIR/broker-cert.pem" >"$KEYSTORE.tmp"
	)
	mv -f "$KEYSTORE.tmp" "$KEYSTORE"
}

# First start only: pick a cluster id (kept, so later re-formats after a
# manual "rm -rf data" reuse it; shared by all nodes of a cluster).
ensure_cluster_id() {
	[[ -s $CLUSTER_ID_FILE ]] && return 0
	kafka_java kafka.tools.StorageTool random-uuid 2>>"$LOG_FILE" | tail -n 1 >"$CLUSTER_ID_FILE.tmp"
	mv "$CLUSTER_ID_FILE.tmp" "$CLUSTER_ID_FILE"
}

# First start of the selected node only: format its storage for KRaft (with
# the SCRAM users of --sasl-ssl).
format_storage_once() {
	[[ -f $DATA_DIR/meta.properties ]] && return 0
	ensure_cluster_id
	local cluster_id
	cluster_id=$(<"$CLUSTER_ID_FILE")
	log "formatting storage in $DATA_DIR (cluster id $cluster_id)"
	kafka_java kafka.tools.StorageTool format -t "$cluster_id" -c "$CONFIG" "${SCRAM_ARGS[@]}" >>"$LOG_FILE" 2>&1 ||
		{
			print_log_tail 20
			die "formatting the storage failed"
		}
	if [[ -n $SASL_SSL_DIR ]]; then
		sha256sum <"$SASL_SSL_DIR/users" | cut -d ' ' -f 1 >"$NODE_DIR/users.sha256"
	fi
}

warn_if_users_changed() {
	[[ -n $SASL_SSL_DIR && -f $NODE_DIR/users.sha256 ]] || return 0
	if [[ $(sha256sum <"$SASL_SSL_DIR/users" | cut -d ' ' -f 1) != "$(<"$NODE_DIR/users.sha256")" ]]; then
		log "warning: $SASL_SSL_DIR/users changed since the storage was formatted; SCRAM users are only created then ('reset' to recreate them)"
	fi
}

# Keeps the previous run's log of the selected node for a look after a restart.
rotate_log() {
	mkdir -p "$NODE_DIR"
	[[ ! -f $LOG_FILE ]] || mv -f "$LOG_FILE" "$LOG_FILE.1"
}

# Starts the JVM of the selected node in the background and sets BROKER_PID.
launch_broker() {
	local java_opts extra_opts
	if ((NODES == 1)); then
		java_opts=(-Xms256m -Xmx768m)
	else
		# Several of them on one small machine.
		java_opts=(-Xms128m -Xmx384m)
	fi
	java_opts+=(
		-XX:+UseG1GC -XX:MaxGCPauseMillis=20
		-XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true
		-Dlog4j2.configurationFile="$LOG4J_CONFIG"
		-Dkafka.logs.dir="$NODE_DIR"
	)
	read -r -a extra_opts <<<"${KOP_KAFKA_JAVA_OPTS:-}"
	java_opts+=("${extra_opts[@]}")

	rm -f "$PID_FILE"

	# - setsid: own session, so a Ctrl-C in the terminal that ran "start" (or
	#   signals to the process group of a CI step) don't reach the broker; it
	#   lives until "stop".
	# - The inner shell writes its own pid and then execs java, so the pid file
	#   holds the JVM's pid no matter whether setsid forked.
	# - All three standard streams are redirected: a broker holding the
	#   caller's stdout open would make $(kafka.sh start) wait forever.
	# shellcheck disable=SC2016 # $$ and $1 are for the inner shell
	setsid bash -c 'echo $$ >"$1"; shift; exec "$@"' kafka-broker "$PID_FILE" \
		java "${java_opts[@]}" -cp "$LIB_DIR/*" kafka.Kafka "$CONFIG" \
		</dev/null >>"$LOG_FILE" 2>&1 &

	local i
	for ((i = 0; i < 50; i++)); do
		[[ -s $PID_FILE ]] && break
		sleep 0.1
	done
	[[ -s $PID_FILE ]] || die "the broker process did not start (see $LOG_FILE)"
	BROKER_PID=$(<"$PID_FILE")
}

# Waits until every node whose pid is in LAUNCHED (node -> pid) serves
# clients. Returns 0 when they all do, 1 if one died (DEAD_NODE), 2 on timeout.
declare -A LAUNCHED=()
wait_until_serving() {
	local deadline=$((SECONDS + START_TIMEOUT)) id waiting
	local -A served=()
	while ((SECONDS < deadline)); do
		waiting=0
		for id in "${!LAUNCHED[@]}"; do
			[[ -n ${served[$id]:-} ]] && continue
			if ! is_alive "${LAUNCHED[$id]}"; then
				DEAD_NODE=$id
				return 1
			fi
			# The PLAINTEXT listener lists the node once it is unfenced; with
			# --sasl-ssl the SASL_SSL one must be open too.
			if broker_serves_clients "${PLAIN_PORTS[$id]}" "$id" &&
				{ [[ -z $SASL_SSL_DIR ]] || port_open "${SECURE_PORTS[$id]}"; }; then
				served[$id]=1
			else
				waiting=1
			fi
		done
		((waiting)) || return 0
		sleep 0.5
	done
	return 2
}

parse_port() {
	if [[ ! $2 =~ ^[0-9]{1,5}$ ]] || ((10#$2 > 65535)); then
		die "$1 needs a port number (0-65535), got '$2'"
	fi
	echo $((10#$2))
}

parse_node() {
	if [[ ! $1 =~ ^[0-9]+$ ]] || ((10#$1 < 1 || 10#$1 > NODES)); then
		die "no node '$1': the cluster in $STATE_DIR has nodes 1..$NODES"
	fi
	echo $((10#$1))
}

require_cluster() {
	((NODES > 1)) || die "$1 needs a cluster (start --nodes N); $STATE_DIR holds a single broker"
}

# ---------------------------------------------------------------------------
# start

# Fixes NODES and SASL_SSL_DIR from the options ($1, $2; empty: not given)
# and what the state directory already holds, and records them.
apply_mode() {
	local want_nodes=$1 want_sasl=$2
	if state_formatted; then
		[[ -z $want_nodes || $want_nodes == "$NODES" ]] ||
			die "$STATE_DIR holds $( ((NODES > 1)) && echo "a $NODES-node cluster" || echo "a single broker"); 'reset' it to start $want_nodes node(s)"
		[[ -z $want_sasl || $want_sasl == "$SASL_SSL_DIR" ]] ||
			die "$STATE_DIR was formatted $([[ -n $SASL_SSL_DIR ]] && echo "with --sasl-ssl $SASL_SSL_DIR" || echo "without --sasl-ssl"); 'reset' it first"
	else
		NODES=${want_nodes:-$NODES}
		SASL_SSL_DIR=${want_sasl:-$SASL_SSL_DIR}
	fi
	{
		echo "nodes=$NODES"
		[[ -z $SASL_SSL_DIR ]] || echo "sasl_ssl=$SASL_SSL_DIR"
	} >"$MODE_FILE"
}

cmd_start() {
	local want_port want_controller_port=0 want_internal_port=0 explicit_port='' want_nodes='' want_sasl=''
	want_port=$(parse_port KAFKA_PORT "${KAFKA_PORT:-$DEFAULT_PORT}")
	while (($#)); do
		case $1 in
		--port | --controller-port | --internal-port | --nodes | --sasl-ssl)
			[[ $# -ge 2 ]] || die "$1 needs a value"
			set -- "$1=$2" "${@:3}"
			;;
		--port=*)
			want_port=$(parse_port --port "${1#*=}") explicit_port=1
			shift
			;;
		--controller-port=*)
			want_controller_port=$(parse_port --controller-port "${1#*=}")
			shift
			;;
		--internal-port=*)
			want_internal_port=$(parse_port --internal-port "${1#*=}")
			shift
			;;
		--nodes=*)
			want_nodes=${1#*=}
			if [[ ! $want_nodes =~ ^[1-9]$ ]] || ((want_nodes > MAX_NODES)); then
				die "--nodes needs a number from 1 to $MAX_NODES, got '$want_nodes'"
			fi
			shift
			;;
		--sasl-ssl=*)
			want_sasl=${1#*=}
			[[ -n $want_sasl ]] || die "--sasl-ssl needs a directory"
			[[ -d $want_sasl ]] || die "--sasl-ssl: $want_sasl is not a directory"
			want_sasl=$(cd "$want_sasl" && pwd)
			shift
			;;
		*) die "start: unknown option '$1' (see --help)" ;;
		esac
	done

	mkdir -p "$STATE_DIR"
	touch "$STATE_MARKER"
	apply_mode "$want_nodes" "$want_sasl"

	if ((NODES == 1)); then
		start_single "$want_port" "$want_controller_port" "$want_internal_port" "$explicit_port"
	else
		local all=() i
		for ((i = 1; i <= NODES; i++)); do all+=("$i"); done
		start_nodes "$want_port" "$want_controller_port" "$want_internal_port" "$explicit_port" "${all[@]}"
	fi
}

# The single broker: its ports are picked anew on every start.
start_single() {
	local want_port=$1 want_controller_port=$2 want_internal_port=$3 explicit_port=$4
	select_node 1

	local pid
	if pid=$(broker_pid); then
		local address
		address=$(<"$BOOTSTRAP_FILE")
		log "broker already running (pid $pid) at $address, state in $STATE_DIR"
		if [[ -n $explicit_port && $want_port != 0 && $address != "127.0.0.1:$want_port" ]]; then
			log "warning: it does not listen on the requested port $want_port; run 'stop' first to change ports"
		fi
		echo "$address"
		return 0
	fi

	cmd_fetch --quiet
	load_sasl_ssl_dir
	warn_if_users_changed
	write_keystore
	rm -f "$BOOTSTRAP_FILE" "$PLAINTEXT_BOOTSTRAP_FILE"
	rotate_log

	# A port we picked ourselves can, rarely, be taken by someone else before
	# the broker binds it; then simply try again with new ports.
	local attempt result picked port
	for attempt in 1 2 3; do
		PLAIN_PORTS=() CONTROLLER_PORTS=() SECURE_PORTS=()
		if [[ -n $SASL_SSL_DIR ]]; then
			SECURE_PORTS[1]=$want_port PLAIN_PORTS[1]=$want_internal_port
		else
			PLAIN_PORTS[1]=$want_port
		fi
		CONTROLLER_PORTS[1]=$want_controller_port
		picked=0
		((PLAIN_PORTS[1] != 0)) || PLAIN_PORTS[1]=$(pick_free_port "$(all_ports)") picked=1
		((CONTROLLER_PORTS[1] != 0)) || CONTROLLER_PORTS[1]=$(pick_free_port "$(all_ports)") picked=1
		if [[ -n $SASL_SSL_DIR ]] && ((SECURE_PORTS[1] == 0)); then
			SECURE_PORTS[1]=$(pick_free_port "$(all_ports)") picked=1
		fi
		check_ports 1
		port=$(client_port 1)

		write_config 1
		format_storage_once
		log "starting Kafka $KAFKA_VERSION on 127.0.0.1:$port$([[ -n $SASL_SSL_DIR ]] && echo " (SASL_SSL; inter-broker PLAINTEXT port ${PLAIN_PORTS[1]})") (controller port ${CONTROLLER_PORTS[1]}), state in $STATE_DIR"
		launch_broker
		LAUNCHED=([1]=$BROKER_PID)

		result=0
		wait_until_serving || result=$?
		case $result in
		0)
			echo "127.0.0.1:${PLAIN_PORTS[1]}" >"$PLAINTEXT_BOOTSTRAP_FILE"
			echo "127.0.0.1:$port" >"$BOOTSTRAP_FILE"
			log "broker running (pid $BROKER_PID), log in $LOG_FILE"
			echo "127.0.0.1:$port"
			return 0
			;;
		1)
			rm -f "$PID_FILE"
			if grep -q 'Address already in use' "$LOG_FILE" && ((attempt < 3 && picked)); then
				log "a port was taken meanwhile; retrying with other ports"
				continue
			fi
			print_log_tail
			die "the broker exited during startup"
			;;
		2)
			print_log_tail
			log "the broker did not serve clients within ${START_TIMEOUT}s; stopping it"
			terminate "$BROKER_PID"
			rm -f "$PID_FILE"
			die "broker start timed out"
			;;
		esac
	done
	die "could not start the broker"
}

# Fails clearly when a port of node $1 is taken, instead of via a bind error
# deep in the broker log.
check_ports() {
	local id=$1 port seen=" "
	for port in "${PLAIN_PORTS[$id]}" "${CONTROLLER_PORTS[$id]}" ${SECURE_PORTS[$id]:+"${SECURE_PORTS[$id]}"}; do
		[[ $seen != *" $port "* ]] || die "port $port is given twice"
		seen+="$port "
		! port_open "$port" || die "port $port is already in use (another broker? try --port 0)"
	done
}

load_ports() {
	local id=$1 key value
	while IFS='=' read -r key value; do
		case $key in
		plain) PLAIN_PORTS[id]=$value ;;
		controller) CONTROLLER_PORTS[id]=$value ;;
		secure) SECURE_PORTS[id]=$value ;;
		esac
	done <"$PORTS_FILE"
}

save_ports() {
	local id=$1
	{
		echo "plain=${PLAIN_PORTS[$id]}"
		echo "controller=${CONTROLLER_PORTS[$id]}"
		[[ -z ${SECURE_PORTS[$id]:-} ]] || echo "secure=${SECURE_PORTS[$id]}"
	} >"$PORTS_FILE"
}

# Comma-separated client (or, with "plaintext", PLAINTEXT) addresses of all nodes.
bootstrap_list() {
	local i list=
	for ((i = 1; i <= NODES; i++)); do
		if [[ ${1:-} == plaintext ]]; then
			list+=${list:+,}127.0.0.1:${PLAIN_PORTS[$i]}
		else
			list+=${list:+,}127.0.0.1:$(client_port "$i")
		fi
	done
	echo "$list"
}

# Picks the ports of every node: from the given bases (node i: base+i-1) or free ones.
pick_cluster_ports() {
	local want_port=$1 want_controller_port=$2 want_internal_port=$3 i
	PLAIN_PORTS=() CONTROLLER_PORTS=() SECURE_PORTS=()
	for ((i = 1; i <= NODES; i++)); do
		if [[ -n $SASL_SSL_DIR ]]; then
			SECURE_PORTS[i]=$((want_port ? want_port + i - 1 : 0))
			PLAIN_PORTS[i]=$((want_internal_port ? want_internal_port + i - 1 : 0))
		else
			PLAIN_PORTS[i]=$((want_port ? want_port + i - 1 : 0))
		fi
		CONTROLLER_PORTS[i]=$((want_controller_port ? want_controller_port + i - 1 : 0))
	done
	for ((i = 1; i <= NODES; i++)); do
		((PLAIN_PORTS[i] != 0)) || PLAIN_PORTS[i]=$(pick_free_port "$(all_ports)")
		((CONTROLLER_PORTS[i] != 0)) || CONTROLLER_PORTS[i]=$(pick_free_port "$(all_ports)")
		if [[ -n $SASL_SSL_DIR ]] && ((SECURE_PORTS[i] == 0)); then
			SECURE_PORTS[i]=$(pick_free_port "$(all_ports)")
		fi
	done
	for ((i = 1; i <= NODES; i++)); do
		((PLAIN_PORTS[i] <= 65535 && CONTROLLER_PORTS[i] <= 65535 && ${SECURE_PORTS[i]:-0} <= 65535)) ||
			die "port out of range for node $i (base ports too high)"
	done
}

# Starts the given nodes of the cluster (those not running already) and waits
# until all of them serve clients; prints the bootstrap list last.
start_nodes() {
	local want_port=$1 want_controller_port=$2 want_internal_port=$3 explicit_port=$4
	shift 4
	local id pid missing=() running=0
	for id in "$@"; do
		select_node "$id"
		if pid=$(broker_pid); then
			running=1
		else
			missing+=("$id")
		fi
	done

	# Ports are chosen once and kept: every node's configuration names all
	# controllers, and clients know the bootstrap list.
	local persisted=1 i
	for ((i = 1; i <= NODES; i++)); do
		select_node "$i"
		if [[ -f $PORTS_FILE ]]; then load_ports "$i"; else persisted=0; fi
	done
	if ((!persisted)); then
		for ((i = 1; i <= NODES; i++)); do
			select_node "$i"
			! pid=$(broker_pid) || die "node $i runs, but $PORTS_FILE is missing; 'stop' the cluster first"
		done
		pick_cluster_ports "$want_port" "$want_controller_port" "$want_internal_port"
	elif [[ -n $explicit_port && $want_port != 0 && $want_port != "$(client_port 1)" ]]; then
		log "warning: the cluster keeps the ports of its first start (node 1 at $(client_port 1)); 'reset' to change them"
	fi

	if ((${#missing[@]} == 0)); then
		log "$( (($# == NODES)) && echo "all $NODES nodes" || echo "node $*") already running, state in $STATE_DIR"
		bootstrap_list
		return 0
	fi
	((running == 0)) || log "node(s) ${missing[*]} not running; starting them"

	cmd_fetch --quiet
	load_sasl_ssl_dir
	for id in "${missing[@]}"; do
		select_node "$id"
		rotate_log
	done
	ensure_cluster_id

	local attempt result formatting=()
	for attempt in 1 2 3; do
		for id in "${missing[@]}"; do
			check_ports "$id"
		done
		# Formatting is a JVM per node: run them side by side.
		formatting=()
		for id in "${missing[@]}"; do
			select_node "$id"
			warn_if_users_changed
			write_keystore
			write_config "$id"
			format_storage_once &
			formatting+=($!)
		done
		for pid in "${formatting[@]}"; do
			wait "$pid" || die "formatting the storage failed"
		done

		LAUNCHED=()
		for id in "${missing[@]}"; do
			select_node "$id"
			log "starting node $id of $NODES: Kafka $KAFKA_VERSION on 127.0.0.1:$(client_port "$id")$([[ -n $SASL_SSL_DIR ]] && echo " (SASL_SSL; inter-broker PLAINTEXT port ${PLAIN_PORTS[$id]})") (controller port ${CONTROLLER_PORTS[$id]}), state in $NODE_DIR"
			launch_broker
			LAUNCHED[$id]=$BROKER_PID
		done

		result=0
		wait_until_serving || result=$?
		case $result in
		0)
			for ((i = 1; i <= NODES; i++)); do
				select_node "$i"
				save_ports "$i"
			done
			bootstrap_list plaintext >"$PLAINTEXT_BOOTSTRAP_FILE"
			bootstrap_list >"$BOOTSTRAP_FILE"
			for id in "${missing[@]}"; do
				select_node "$id"
				log "node $id running (pid ${LAUNCHED[$id]}), log in $LOG_FILE"
			done
			bootstrap_list
			return 0
			;;
		1)
			select_node "$DEAD_NODE"
			rm -f "$PID_FILE"
			local retry=0
			if grep -q 'Address already in use' "$LOG_FILE" && ((attempt < 3 && !persisted)) &&
				((want_port == 0 || want_controller_port == 0 || want_internal_port == 0)); then
				retry=1
			else
				print_log_tail
			fi
			stop_launched
			if ((retry)); then
				log "a port was taken meanwhile; retrying with other ports"
				pick_cluster_ports "$want_port" "$want_controller_port" "$want_internal_port"
				continue
			fi
			die "node $DEAD_NODE exited during startup"
			;;
		2)
			for id in "${missing[@]}"; do
				select_node "$id"
				print_log_tail 15
			done
			log "the cluster did not serve clients within ${START_TIMEOUT}s; stopping the node(s) just started"
			stop_launched
			die "cluster start timed out"
			;;
		esac
	done
	die "could not start the cluster"
}

# Kills the nodes of LAUNCHED (a failed start; their data stays).
stop_launched() {
	local id
	kill_now "${LAUNCHED[@]}"
	for id in "${!LAUNCHED[@]}"; do
		select_node "$id"
		rm -f "$PID_FILE"
	done
}

cmd_start_node() {
	require_cluster start-node
	local id
	id=$(parse_node "$1")
	select_node "$id"
	[[ -f $PORTS_FILE ]] || die "node $id was never started; use 'start'"
	start_nodes 0 0 0 "" "$id"
}

cmd_stop_node() {
	require_cluster stop-node
	local id pid graceful=
	id=$(parse_node "$1")
	case ${2:-} in
	"") ;;
	--graceful) graceful=1 ;;
	*) die "stop-node: unknown option '$2'" ;;
	esac
	select_node "$id"
	if ! pid=$(broker_pid); then
		log "node $id is not running"
		rm -f "$PID_FILE"
		return 0
	fi
	if [[ -n $graceful ]]; then
		log "stopping node $id (pid $pid) ..."
		terminate "$pid"
	else
		log "killing node $id (pid $pid, SIGKILL)"
		kill_now "$pid"
	fi
	rm -f "$PID_FILE"
	log "node $id stopped"
}

# ---------------------------------------------------------------------------
# stop, status, reset

cmd_stop() {
	local i pid pids=() what=broker
	((NODES == 1)) || what="$NODES-node cluster"
	for ((i = 1; i <= NODES; i++)); do
		select_node "$i"
		if pid=$(broker_pid); then
			pids+=("$pid")
		else
			rm -f "$PID_FILE"
		fi
	done
	if ((${#pids[@]} == 0)); then
		log "no broker running (state in $STATE_DIR)"
		return 0
	fi
	log "stopping $what (pid ${pids[*]}) ..."
	# All nodes at once: a cluster stopped one by one would lose its quorum
	# half-way and leave the last nodes waiting for it.
	terminate "${pids[@]}"
	for ((i = 1; i <= NODES; i++)); do
		select_node "$i"
		rm -f "$PID_FILE"
	done
	log "$what stopped"
}

cmd_status() {
	local pid i up=0
	if ((NODES == 1)); then
		if pid=$(broker_pid); then
			echo "running (pid $pid) at $(cat "$BOOTSTRAP_FILE" 2>/dev/null || echo '?'), state in $STATE_DIR"
			return 0
		fi
		echo "not running (state in $STATE_DIR)"
		return 3
	fi
	local lines=()
	for ((i = 1; i <= NODES; i++)); do
		select_node "$i"
		[[ -f $PORTS_FILE ]] && load_ports "$i"
		if pid=$(broker_pid); then
			up=$((up + 1))
			lines+=("  node $i: running (pid $pid) at 127.0.0.1:$(client_port "$i")")
		else
			lines+=("  node $i: not running")
		fi
	done
	echo "$up of $NODES nodes running at $(cat "$BOOTSTRAP_FILE" 2>/dev/null || echo '?'), state in $STATE_DIR"
	printf '%s\n' "${lines[@]}"
	((up == NODES)) || return 3
}

cmd_reset() {
	cmd_stop
	[[ -e $STATE_DIR ]] || return 0
	# Guard against a mistyped KOP_KAFKA_STATE: only delete what we created.
	if [[ ! -f $STATE_MARKER && -n $(ls -A "$STATE_DIR") ]]; then
		die "$STATE_DIR was not created by kafka.sh (no $(basename "$STATE_MARKER")); not deleting it"
	fi
	rm -rf "$STATE_DIR"
	log "deleted $STATE_DIR"
}

# ---------------------------------------------------------------------------

main() {
	local command=${1:-}
	(($#)) && shift
	case $command in
	fetch | stop | status | reset)
		(($# == 0)) || die "$command takes no arguments"
		;;
	start-node) (($# == 1)) || die "usage: start-node N" ;;
	stop-node) (($# == 1 || $# == 2)) || die "usage: stop-node N [--graceful]" ;;
	esac
	case $command in
	help | -h | --help)
		usage
		return 0
		;;
	esac
	resolve_state_dir
	case $command in
	fetch) cmd_fetch ;;
	start) cmd_start "$@" ;;
	start-node) cmd_start_node "$@" ;;
	stop-node) cmd_stop_node "$@" ;;
	stop) cmd_stop ;;
	status) cmd_status ;;
	reset) cmd_reset ;;
	"")
		usage >&2
		exit 2
		;;
	*)
		log "unknown command '$command'"
		usage >&2
		exit 2
		;;
	esac
}

main "$@"
