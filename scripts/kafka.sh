#!/usr/bin/env bash
# Fetch, start and stop a real single-node Apache Kafka broker for development
# and tests. KRaft mode: one JVM is both broker and controller, no ZooKeeper.
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

usage() {
	cat <<EOF
Usage: scripts/kafka.sh <command> [options]

Runs a single-node Apache Kafka $KAFKA_VERSION broker (KRaft mode, no ZooKeeper)
on 127.0.0.1 for development and tests. Needs Java 17+ and Maven.

Commands:
  fetch     Collect the broker jars with Maven into the cache, unless already there.
  start [--port N] [--controller-port N]
            Start the broker in the background (fetching first if needed) and
            wait until it serves clients. Progress goes to stderr; the last line
            on stdout is the bootstrap address, e.g. 127.0.0.1:9092, so
              brokers=\$(scripts/kafka.sh start --port 0)
            works. If the broker of this state directory already runs, its
            address is printed and nothing else happens.
              --port N             client port; 0 picks a free one
                                   (default: \$KAFKA_PORT, else $DEFAULT_PORT)
              --controller-port N  KRaft controller port (default: a free one)
  stop      Stop the broker: SIGTERM, SIGKILL if still alive after ${STOP_TIMEOUT}s.
  status    Print whether the broker runs and its address. Exit status 0 if
            it runs, 3 if not.
  reset     Stop the broker and delete the state directory (all topics and data).
  help      This text (also -h, --help).

Environment:
  KAFKA_PORT               client port when --port is not given (default $DEFAULT_PORT)
  KOP_KAFKA_STATE          state directory (default <repo>/.kafka)
  KOP_KAFKA_CACHE          jar cache (default ~/.cache/kop/kafka-$KAFKA_VERSION)
  KOP_KAFKA_JAVA_OPTS      extra JVM options, appended to the defaults
  KOP_KAFKA_START_TIMEOUT  seconds "start" waits for the broker (default 90)

State directory contents:
  broker.log (broker output; broker.log.1 is the previous run), bootstrap
  (address), kafka.pid, server.properties (rewritten on every start),
  cluster-id, data/ (topic data and KRaft metadata).
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
	CONFIG=$STATE_DIR/server.properties
	DATA_DIR=$STATE_DIR/data
	PID_FILE=$STATE_DIR/kafka.pid
	LOG_FILE=$STATE_DIR/broker.log
	BOOTSTRAP_FILE=$STATE_DIR/bootstrap
	CLUSTER_ID_FILE=$STATE_DIR/cluster-id
	# Lets "reset" check that it only ever deletes a directory made by us.
	STATE_MARKER=$STATE_DIR/.kop-kafka-state
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

# Prints the pid of the broker of this state directory if it is running.
broker_pid() {
	local pid cmdline
	[[ -f $PID_FILE ]] || return 1
	pid=$(<"$PID_FILE")
	[[ $pid =~ ^[0-9]+$ ]] && is_alive "$pid" || return 1
	# After a crash or reboot the pid may belong to some unrelated process now;
	# only trust it if it is a Kafka JVM running this state dir's config.
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

# Prints a port nobody listens on. Chosen from 20000-32767: below Linux's
# ephemeral range (32768+), where outgoing connections get their local ports,
# so a busy client cannot grab it between our check and the broker's bind.
# The small remaining race is handled by retrying in cmd_start.
pick_free_port() {
	local port _
	for _ in {1..100}; do
		port=$((20000 + RANDOM % 12768))
		if [[ $port != "${1:-}" ]] && ! port_open "$port"; then
			echo "$port"
			return 0
		fi
	done
	die "found no free port on 127.0.0.1"
}

# True once the broker answers a metadata request and lists itself, which it
# only does after registering with the (co-located) controller and being
# unfenced, i.e. when topics can be created and used. An open port alone is
# not enough: the listener accepts connections a little earlier.
broker_serves_clients() {
	local port=$1
	port_open "$port" || return 1
	if command -v kcat >/dev/null; then
		kcat -b "127.0.0.1:$port" -L -m 5 2>/dev/null | grep -q 'broker 1 at'
	else
		# Slower (a JVM per attempt) but needs nothing beyond the jars.
		timeout 30 java -Dlog4j2.configurationFile="$LOG4J_CONFIG" -Dlog4j2.level=ERROR \
			-cp "$LIB_DIR/*" org.apache.kafka.tools.BrokerApiVersionsCommand \
			--bootstrap-server "127.0.0.1:$port" 2>/dev/null | grep -q "(id: 1 "
	fi
}

# Sends SIGTERM (a clean, controlled shutdown), then SIGKILL after STOP_TIMEOUT.
terminate() {
	local pid=$1 i
	kill -TERM "$pid" 2>/dev/null || return 0
	for ((i = 0; i < STOP_TIMEOUT * 5; i++)); do
		is_alive "$pid" || return 0
		sleep 0.2
	done
	log "broker (pid $pid) still running after ${STOP_TIMEOUT}s; sending SIGKILL"
	kill -KILL "$pid" 2>/dev/null || return 0
	for ((i = 0; i < 50; i++)); do
		is_alive "$pid" || return 0
		sleep 0.2
	done
	die "could not kill broker (pid $pid)"
}

print_log_tail() {
	[[ -f $LOG_FILE ]] || return 0
	log "last lines of $LOG_FILE:"
	tail -n "${1:-40}" "$LOG_FILE" >&2
}

# ---------------------------------------------------------------------------
# start

write_config() {
	local port=$1 controller_port=$2
	cat >"$CONFIG" <<EOF
# Written by scripts/kafka.sh on every start (the ports may change); edits are lost.

# One JVM is the whole cluster: broker and KRaft controller, node 1.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$controller_port
controller.listener.names=CONTROLLER
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$controller_port
advertised.listeners=PLAINTEXT://127.0.0.1:$port
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT

log.dirs=$DATA_DIR
num.partitions=3
# The project creates its topics explicitly and must keep working where
# brokers refuse to auto-create them, so tests run with auto-creation off.
auto.create.topics.enable=false

# Internal topics: a single node can only hold one replica. Fewer partitions
# than the default 50 make the first consumer group / transaction faster.
offsets.topic.replication.factor=1
offsets.topic.num.partitions=10
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=10
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1

# Tests start consumer groups all the time; don't wait 3 s for more members.
group.initial.rebalance.delay.ms=0

# Light on a small (2-core) machine.
num.network.threads=2
num.io.threads=4
num.recovery.threads.per.data.dir=1
log.cleaner.dedupe.buffer.size=33554432
EOF
}

# First start only: pick a cluster id (kept, so later re-formats after a
# manual "rm -rf data" reuse it) and format the storage for KRaft.
format_storage_once() {
	[[ -f $DATA_DIR/meta.properties ]] && return 0
	if [[ ! -s $CLUSTER_ID_FILE ]]; then
		kafka_java kafka.tools.StorageTool random-uuid 2>>"$LOG_FILE" | tail -n 1 >"$CLUSTER_ID_FILE.tmp"
		mv "$CLUSTER_ID_FILE.tmp" "$CLUSTER_ID_FILE"
	fi
	local cluster_id
	cluster_id=$(<"$CLUSTER_ID_FILE")
	log "formatting storage in $DATA_DIR (cluster id $cluster_id)"
	kafka_java kafka.tools.StorageTool format -t "$cluster_id" -c "$CONFIG" >>"$LOG_FILE" 2>&1 ||
		{
			print_log_tail 20
			die "formatting the storage failed"
		}
}

# Starts the JVM in the background and sets BROKER_PID.
launch_broker() {
	local java_opts extra_opts
	java_opts=(
		-Xms256m -Xmx768m -XX:+UseG1GC -XX:MaxGCPauseMillis=20
		-XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true
		-Dlog4j2.configurationFile="$LOG4J_CONFIG"
		-Dkafka.logs.dir="$STATE_DIR"
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

# Returns 0 when the broker serves clients, 1 if it died, 2 on timeout.
wait_until_serving() {
	local pid=$1 port=$2 deadline=$((SECONDS + START_TIMEOUT))
	while ((SECONDS < deadline)); do
		is_alive "$pid" || return 1
		broker_serves_clients "$port" && return 0
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

cmd_start() {
	local want_port want_controller_port=0 explicit_port=
	want_port=$(parse_port KAFKA_PORT "${KAFKA_PORT:-$DEFAULT_PORT}")
	while (($#)); do
		case $1 in
		--port)
			[[ $# -ge 2 ]] || die "--port needs a value"
			want_port=$(parse_port --port "$2") explicit_port=1
			shift 2
			;;
		--port=*)
			want_port=$(parse_port --port "${1#*=}") explicit_port=1
			shift
			;;
		--controller-port)
			[[ $# -ge 2 ]] || die "--controller-port needs a value"
			want_controller_port=$(parse_port --controller-port "$2")
			shift 2
			;;
		--controller-port=*)
			want_controller_port=$(parse_port --controller-port "${1#*=}")
			shift
			;;
		*) die "start: unknown option '$1' (see --help)" ;;
		esac
	done

	mkdir -p "$STATE_DIR"
	touch "$STATE_MARKER"

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
	rm -f "$BOOTSTRAP_FILE"
	# Keep the previous run's log for a look after a restart.
	[[ -f $LOG_FILE ]] && mv -f "$LOG_FILE" "$LOG_FILE.1"

	# A port we picked ourselves can, rarely, be taken by someone else before
	# the broker binds it; then simply try again with new ports.
	local attempt port controller_port result
	for attempt in 1 2 3; do
		port=$want_port controller_port=$want_controller_port
		((port != 0)) || port=$(pick_free_port)
		((controller_port != 0)) || controller_port=$(pick_free_port "$port")
		((port != controller_port)) || die "client and controller port are both $port"
		# Fail clearly instead of via a bind error deep in the broker log.
		! port_open "$port" || die "port $port is already in use (another broker? try --port 0)"
		! port_open "$controller_port" || die "controller port $controller_port is already in use"

		write_config "$port" "$controller_port"
		format_storage_once
		log "starting Kafka $KAFKA_VERSION on 127.0.0.1:$port (controller port $controller_port), state in $STATE_DIR"
		launch_broker

		result=0
		wait_until_serving "$BROKER_PID" "$port" || result=$?
		case $result in
		0)
			echo "127.0.0.1:$port" >"$BOOTSTRAP_FILE"
			log "broker running (pid $BROKER_PID), log in $LOG_FILE"
			echo "127.0.0.1:$port"
			return 0
			;;
		1)
			rm -f "$PID_FILE"
			if grep -q 'Address already in use' "$LOG_FILE" && ((attempt < 3)) &&
				{ ((want_port == 0)) || ((want_controller_port == 0)); }; then
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

# ---------------------------------------------------------------------------
# stop, status, reset

cmd_stop() {
	local pid
	if ! pid=$(broker_pid); then
		log "no broker running (state in $STATE_DIR)"
		rm -f "$PID_FILE"
		return 0
	fi
	log "stopping broker (pid $pid) ..."
	terminate "$pid"
	rm -f "$PID_FILE"
	log "broker stopped"
}

cmd_status() {
	local pid
	if pid=$(broker_pid); then
		echo "running (pid $pid) at $(cat "$BOOTSTRAP_FILE" 2>/dev/null || echo '?'), state in $STATE_DIR"
		return 0
	fi
	echo "not running (state in $STATE_DIR)"
	return 3
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
	esac
	resolve_state_dir
	case $command in
	fetch) cmd_fetch ;;
	start) cmd_start "$@" ;;
	stop) cmd_stop ;;
	status) cmd_status ;;
	reset) cmd_reset ;;
	help | -h | --help) usage ;;
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
