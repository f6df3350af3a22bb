#!/usr/bin/env bash
# kop benchmarks: one run, one broker, release binaries. See bench/README.md.
#
#   warm-up: the whole pipeline at 500 orders/s for 10 s before anything is measured
#   (a) raw produce → consume throughput of the broker (bench/raw.rs, librdkafka), run 3
#       times: the best is the ceiling
#   (e) one stage draining a backlog: 300,000 orders preloaded, kop-payment alone
#       (exactly-once): records/s, CPU µs per record, and the ratio to (a)
#   (b) end-to-end pipeline orders/s at max rate: with kop-load --max-rate, and with a
#       burst of orders all due at once (64 in flight)
#   (c) end-to-end latency at fixed rates (1,000 and 5,000 orders/s by default), read by a
#       read_committed consumer
#       (b) and (c) run for each processing guarantee twice, in alternating order
#       (exactly-once, at-least-once, at-least-once, exactly-once)
#   (s) the seed's handler delays (500, 1,000, 800 ms) at 1,000 orders/s, and the same with
#       [stage] max_in_flight = 10,000 at 10,000 orders/s, both guarantees
#   (d) per daemon: CPU µs per order of every run, RSS idle and under load, start → READY
#
# and prints a markdown table with every figure beside its target (also written to
# $BENCH_OUT/results.md). Exits non-zero if anything fails: a build, the broker, a daemon
# exiting, an order that did not arrive, an answer other than 202 (503 is allowed in the
# 10,000/s runs, and counted), a duplicate in exactly-once mode.
#
# Environment (all optional):
#   KAFKA_BROKERS        use this broker instead of starting one (cargo xtask kafka, temp dir)
#   BENCH_OUT            directory for logs and JSON reports (default: a new /tmp/kop-bench.*)
#   BENCH_NO_BUILD=1     use the binaries in $CARGO_TARGET_DIR (or target)/release as they are
#   BENCH_WARMUP_RATE    orders/s of the warm-up (default 500)
#   BENCH_WARMUP_DURATION  duration of the warm-up (default 10s)
#   BENCH_RAW_RUNS       runs of the raw benchmark; the best is the ceiling (default 3)
#   BENCH_RAW_RECORDS    records of each raw run (default 300000)
#   BENCH_RAW_SIZE       value size in bytes of the raw benchmark (default 100)
#   BENCH_RAW_TXN_RECORDS  records of the transactional raw run (default 100000)
#   BENCH_DRAIN_ORDERS   orders preloaded for kop-payment to drain (default 300000)
#   BENCH_MODES          processing guarantees (default "exactly-once at-least-once")
#   BENCH_ROUNDS         runs of (b) and (c) per guarantee, in alternating order (default 2)
#   BENCH_MAX_DURATION   duration of each max-rate run (default 30s)
#   BENCH_MAX_CONCURRENCY  clients of the max-rate and burst runs (default 64)
#   BENCH_BURST_SECONDS  size of the burst: this many seconds at the rate the highest fixed
#                        rate achieved (default 30)
#   BENCH_FIXED_DURATION duration of each fixed-rate run (default 20s)
#   BENCH_QUIET_PCT      before each run of the pipeline, wait until the machine is less busy
#                        than this over 2 s (default 15) ...
#   BENCH_QUIET_MAX_S    ... but at most this many seconds (default 60)
#   BENCH_RATES          the fixed rates (default "1000 5000")
#   BENCH_SEED_DELAYS    SIMULATE_DELAY_MS of kop-payment, kop-inventory, kop-notification in
#                        the seed rows (default "500 1000 800", the Node.js seed's sleeps)
#   BENCH_SEED_RATE      orders/s offered with the seed's delays (default 1000)
#   BENCH_SEED_DURATION  duration of that run (default 30s)
#   BENCH_SEED_CONCURRENCY  its clients (default 256)
#   BENCH_HIGH_MAX_IN_FLIGHT  [stage] max_in_flight of the second seed row (default 10000)
#   BENCH_HIGH_RATE      orders/s offered in that row (default 10000)
#   BENCH_HIGH_DURATION  its duration (default 20s)
#   BENCH_HIGH_CONCURRENCY  its clients (default 1024)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

WARMUP_RATE=${BENCH_WARMUP_RATE:-500}
WARMUP_DURATION=${BENCH_WARMUP_DURATION:-10s}
RAW_RUNS=${BENCH_RAW_RUNS:-3}
RAW_RECORDS=${BENCH_RAW_RECORDS:-300000}
RAW_SIZE=${BENCH_RAW_SIZE:-100}
RAW_TXN_RECORDS=${BENCH_RAW_TXN_RECORDS:-100000}
DRAIN_ORDERS=${BENCH_DRAIN_ORDERS:-300000}
read -r -a MODES <<<"${BENCH_MODES:-exactly-once at-least-once}"
ROUNDS=${BENCH_ROUNDS:-2}
MAX_DURATION=${BENCH_MAX_DURATION:-30s}
MAX_CONCURRENCY=${BENCH_MAX_CONCURRENCY:-64}
BURST_SECONDS=${BENCH_BURST_SECONDS:-30}
FIXED_DURATION=${BENCH_FIXED_DURATION:-20s}
read -r -a RATES <<<"${BENCH_RATES:-1000 5000}"
read -r -a SEED_DELAYS <<<"${BENCH_SEED_DELAYS:-500 1000 800}"
SEED_RATE=${BENCH_SEED_RATE:-1000}
SEED_DURATION=${BENCH_SEED_DURATION:-30s}
SEED_CONCURRENCY=${BENCH_SEED_CONCURRENCY:-256}
HIGH_MAX_IN_FLIGHT=${BENCH_HIGH_MAX_IN_FLIGHT:-10000}
HIGH_RATE=${BENCH_HIGH_RATE:-10000}
HIGH_DURATION=${BENCH_HIGH_DURATION:-20s}
HIGH_CONCURRENCY=${BENCH_HIGH_CONCURRENCY:-1024}
SERVICES=(order payment inventory notification)
STAGES=(payment inventory notification)

say() { printf 'bench: %s\n' "$*" >&2; }
die() {
	say "FAILED: $*"
	exit 1
}

for mode in "${MODES[@]}"; do
	case $mode in
	exactly-once | at-least-once) ;;
	*) die "BENCH_MODES: unknown processing guarantee '$mode'" ;;
	esac
done
for knob in RAW_RUNS ROUNDS DRAIN_ORDERS HIGH_MAX_IN_FLIGHT; do
	[[ ${!knob} =~ ^[1-9][0-9]*$ ]] || die "BENCH_$knob must be a positive integer, not '${!knob}'"
done
((${#SEED_DELAYS[@]} == 3)) || die "BENCH_SEED_DELAYS: three delays in ms (payment inventory notification)"
declare -A SEED_DELAY=([payment]=${SEED_DELAYS[0]} [inventory]=${SEED_DELAYS[1]} [notification]=${SEED_DELAYS[2]})
for tool in cargo jq curl awk; do
	command -v "$tool" >/dev/null || die "$tool not found"
done

OUT=${BENCH_OUT:-$(mktemp -d /tmp/kop-bench.XXXXXX)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
RUN_ID=$(date +%H%M%S)-$RANDOM
T_START=$SECONDS
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release

STARTED_BROKER=0
BROKER_PID=
SAMPLER_PID=
CHILD_PID=
declare -A PID=()

# ---------------------------------------------------------------------------
# cleanup: everything this script started, and nothing else

stop_daemons() {
	local svc pid i
	for svc in "${!PID[@]}"; do
		kill -TERM "${PID[$svc]}" 2>/dev/null || true
	done
	for svc in "${!PID[@]}"; do
		pid=${PID[$svc]}
		for ((i = 0; i < 200; i++)); do
			kill -0 "$pid" 2>/dev/null || break
			sleep 0.1
		done
		if kill -0 "$pid" 2>/dev/null; then
			say "kop-$svc (pid $pid) still running 20 s after SIGTERM; SIGKILL"
			kill -KILL "$pid" 2>/dev/null || true
		fi
		wait "$pid" 2>/dev/null || true
		unset "PID[$svc]"
	done
}

stop_sampler() {
	if [[ -n $SAMPLER_PID ]]; then
		kill "$SAMPLER_PID" 2>/dev/null || true
		wait "$SAMPLER_PID" 2>/dev/null || true
		SAMPLER_PID=
	fi
}

# shellcheck disable=SC2317,SC2329 # called by the EXIT trap
cleanup() {
	local rc=$?
	trap - EXIT INT TERM
	if [[ -n $CHILD_PID ]]; then
		kill -TERM "$CHILD_PID" 2>/dev/null || true
		wait "$CHILD_PID" 2>/dev/null || true
	fi
	stop_sampler
	stop_daemons
	if ((STARTED_BROKER)); then
		KOP_KAFKA_STATE=$OUT/kafka cargo xtask kafka reset >>"$OUT/kafka.log" 2>&1 ||
			say "could not stop the broker; see $OUT/kafka.log"
	fi
	say "logs and JSON reports in $OUT"
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------------------
# helpers

# run_child OUT ERR COMMAND...: runs the command in the background, its stdout to OUT and
# stderr to ERR, and waits for it. Unlike a foreground command, `wait` returns at once when
# SIGINT/SIGTERM arrives, so the cleanup runs without delay (and, the redirections being
# the child's own, says so on the script's stderr).
run_child() {
	local out=$1 err=$2 rc=0
	shift 2
	"$@" >"$out" 2>"$err" &
	CHILD_PID=$!
	wait "$CHILD_PID" || rc=$?
	CHILD_PID=
	return "$rc"
}

# A port nobody listens on, below the ephemeral range, not handed out before.
declare -A USED_PORT=()
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
pick_port() {
	local port _
	for _ in {1..200}; do
		port=$((20000 + RANDOM % 12768))
		if [[ -z ${USED_PORT[$port]:-} ]] && ! port_open "$port"; then
			USED_PORT[$port]=1
			echo "$port"
			return 0
		fi
	done
	die "no free port found"
}

# True if GET /readyz on 127.0.0.1:$1 answers 200. Bash's /dev/tcp: no fork per probe.
ready_once() {
	local status=
	{ exec 3<>"/dev/tcp/127.0.0.1/$1"; } 2>/dev/null || return 1
	printf 'GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n' >&3 2>/dev/null || true
	IFS= read -r -t 2 status <&3 || true
	exec 3<&- 3>&-
	[[ $status == "HTTP/1."?" 200"* ]]
}

# Milliseconds since the epoch, from bash's $EPOCHREALTIME (no fork).
now_ms() {
	local t=${EPOCHREALTIME/[.,]/}
	echo $((t / 1000))
}

rss_kb() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }

# User + system CPU time of a process, in clock ticks (utime + stime of /proc/<pid>/stat).
cpu_ticks() {
	local stat fields
	stat=$(cat "/proc/$1/stat" 2>/dev/null) || {
		echo 0
		return
	}
	read -r -a fields <<<"${stat##*) }"
	echo $((fields[11] + fields[12]))
}

# Busy and total jiffies of the whole machine (all processes, ours and everybody's).
machine_ticks() { awk '/^cpu / { busy = $2 + $3 + $4 + $7 + $8 + $9; print busy, busy + $5 + $6 }' /proc/stat; }

# Waits (at most QUIET_MAX_S) until the whole machine was less than QUIET_PCT % busy over two
# seconds: the broker keeps working after a heavy phase (compacting the changelogs, deleting
# segments), and a run that starts meanwhile measures that work too. Sets QUIET_WAITED to
# "<seconds waited> s, <last busy> %".
QUIET_PCT=${BENCH_QUIET_PCT:-15}
QUIET_MAX_S=${BENCH_QUIET_MAX_S:-60}
wait_until_quiet() {
	local start=$SECONDS busy0 total0 busy1 total1 pct=100
	while :; do
		read -r busy0 total0 < <(machine_ticks)
		sleep 2
		read -r busy1 total1 < <(machine_ticks)
		pct=$(((busy1 - busy0) * 100 / (total1 - total0 > 0 ? total1 - total0 : 1)))
		((pct < QUIET_PCT || SECONDS - start >= QUIET_MAX_S)) && break
	done
	QUIET_WAITED="$((SECONDS - start)) s, $pct %"
}

# Sets CHILD_CPU_MS: CPU time (ms, user + system) of this shell's waited-for children.
# Call it directly, not in $(...): `times` must run in this shell, not in a fork.
children_cpu_ms() {
	times >"$OUT/.times"
	# The second line: "1m2.345s 0m6.789s".
	CHILD_CPU_MS=$(awk 'NR == 2 { split($0, t, /[ ms]+/); printf "%d", 1000 * (t[1] * 60 + t[2] + t[3] * 60 + t[4]) }' "$OUT/.times")
}

# Formats a JSON number from a report: f FILE JQ-PATH DECIMALS
f() { printf "%.${3}f" "$(jq -r "$2 // 0" "$1")"; }

# µs of CPU per order: us_per TICKS ORDERS
us_per() { awk -v t="$1" -v n="$2" -v hz="$HZ" 'BEGIN { if (n > 0) printf "%.1f", t * 1e6 / hz / n; else print "n/a" }'; }

HZ=$(getconf CLK_TCK)

# Short name of a processing guarantee, used in file, topic and group names.
tag_of() {
	case $1 in
	exactly-once) echo eos ;;
	at-least-once) echo alo ;;
	*) return 1 ;;
	esac
}

# ---------------------------------------------------------------------------
# build

T_BUILD=$SECONDS
if [[ ${BENCH_NO_BUILD:-0} != 1 ]]; then
	say "building release binaries (cargo build --release --bins; cargo bench --bench raw --bench relay --no-run)"
	cargo build --release --bins >&2
	BENCH_BINS=$(cargo bench --bench raw --bench relay --no-run --message-format=json |
		jq -r 'select(.reason == "compiler-artifact" and .executable != null) | "\(.target.name) \(.executable)"')
	RAW_BIN=$(awk '$1 == "raw" { print $2 }' <<<"$BENCH_BINS" | tail -n 1)
	RELAY_BIN=$(awk '$1 == "relay" { print $2 }' <<<"$BENCH_BINS" | tail -n 1)
else
	# The newest build of each benchmark.
	newest() {
		find "$BIN/deps" -maxdepth 1 -type f -name "$1-*" -perm -u+x -printf '%T@ %p\n' |
			sort -n | tail -n 1 | cut -d ' ' -f 2-
	}
	RAW_BIN=$(newest raw)
	RELAY_BIN=$(newest relay)
fi
[[ -x $RAW_BIN ]] || die "no raw benchmark executable (cargo bench --bench raw --no-run)"
[[ -x $RELAY_BIN ]] || die "no relay benchmark executable (cargo bench --bench relay --no-run)"
for svc in "${SERVICES[@]}" load; do
	[[ -x $BIN/kop-$svc ]] || die "$BIN/kop-$svc missing"
done
BUILD_S=$((SECONDS - T_BUILD))

# ---------------------------------------------------------------------------
# the broker

UPTIME_BEFORE=$(uptime)
T_BENCH=$SECONDS
if [[ -z ${KAFKA_BROKERS:-} ]]; then
	say "starting a Kafka broker (cargo xtask kafka, state in $OUT/kafka)"
	STARTED_BROKER=1
	KAFKA_BROKERS=$(KOP_KAFKA_STATE=$OUT/kafka cargo xtask kafka start --port 0 2>>"$OUT/kafka.log" | tail -n 1) ||
		die "the broker did not start; see $OUT/kafka.log"
	# For its CPU time; left out if the state directory's layout is not the one expected.
	BROKER_PID=$(cat "$OUT/kafka/kafka.pid" 2>/dev/null || true)
	[[ $BROKER_PID =~ ^[0-9]+$ ]] || BROKER_PID=
	BROKER_DESC="Kafka $(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' scripts/kafka/pom.xml), single node (KRaft), same machine, started by this script"
else
	BROKER_DESC="the broker at $KAFKA_BROKERS (KAFKA_BROKERS)"
fi
say "broker at $KAFKA_BROKERS"
BROKER_S=$((SECONDS - T_BENCH))

# ---------------------------------------------------------------------------
# the daemons

SHIPPED_MAX_IN_FLIGHT=$(sed -n 's/^max_in_flight = \([0-9]*\).*/\1/p' "$ROOT/etc/kop/payment.toml")
[[ -n $SHIPPED_MAX_IN_FLIGHT ]] || die "etc/kop/payment.toml has no max_in_flight"
SHIPPED_COMMIT_MAX=$(sed -n 's/^commit_max_records = \([0-9]*\).*/\1/p' "$ROOT/etc/kop/payment.toml")
[[ -n $SHIPPED_COMMIT_MAX ]] || die "etc/kop/payment.toml has no commit_max_records"
# The configuration of the 10,000-in-flight rows: the shipped files with another
# [stage] max_in_flight (it has no environment variable).
HIGH_CONFIG=$OUT/config-high
mkdir -p "$HIGH_CONFIG"
for svc in "${SERVICES[@]}"; do
	sed "s/^max_in_flight = .*/max_in_flight = $HIGH_MAX_IN_FLIGHT/" "$ROOT/etc/kop/$svc.toml" >"$HIGH_CONFIG/$svc.toml"
done
for svc in "${STAGES[@]}"; do
	grep -q "^max_in_flight = $HIGH_MAX_IN_FLIGHT\$" "$HIGH_CONFIG/$svc.toml" ||
		die "etc/kop/$svc.toml has no 'max_in_flight = ' line to change"
done

# start_daemon SVC MODE TAG CONFIG-DIR DELAY-MS: starts one daemon with the topics, groups
# and service names of TAG (fresh for every tag: bench.<run>.<tag>.*) and waits for its
# /readyz (60 s at most). Sets PID[SVC], MPORT[SVC] and READY_MS[TAG.SVC].
start_daemon() {
	local svc=$1 mode=$2 tag=$3 config=$4 delay=$5 t0 i
	local prefix="bench.$RUN_ID.$tag"
	MPORT[$svc]=$(pick_port)
	t0=$(now_ms)
	env -u SIMULATE_FAILURE_RATE -u SIMULATE_DELAY_MS -u MAX_PROCESSING_ATTEMPTS \
		-u RETRY_DELAYS_MS -u KOP_INSTANCE_ID -u LOG_FORMAT -u NOTIFY_SOCKET -u WATCHDOG_USEC \
		-u ORDER_RETRY_TOPIC -u ORDER_DLQ_TOPIC -u PAYMENT_RETRY_TOPIC -u PAYMENT_DLQ_TOPIC \
		-u INVENTORY_RETRY_TOPIC -u INVENTORY_DLQ_TOPIC \
		SIMULATE_DELAY_MS="$delay" \
		KAFKA_BROKERS="$KAFKA_BROKERS" \
		PROCESSING_GUARANTEE="$mode" \
		LOG_LEVEL=warn \
		ORDER_TOPIC="$prefix.orders.created" \
		PAYMENT_COMPLETED_TOPIC="$prefix.payments.completed" \
		INVENTORY_RESERVED_TOPIC="$prefix.inventory.reserved" \
		SERVICE_NAME="bench-$RUN_ID-$tag-$svc" \
		PAYMENT_GROUP_ID="bench-$RUN_ID-$tag-payment" \
		INVENTORY_GROUP_ID="bench-$RUN_ID-$tag-inventory" \
		NOTIFICATION_GROUP_ID="bench-$RUN_ID-$tag-notification" \
		PORT="$API_PORT" \
		METRICS_PORT="${MPORT[$svc]}" \
		"$BIN/kop-$svc" --config "$config/$svc.toml" \
		>"$OUT/$tag-kop-$svc.log" 2>&1 &
	PID[$svc]=$!
	# Probe every 10 ms until ready.
	for ((i = 0; ; i++)); do
		ready_once "${MPORT[$svc]}" && break
		kill -0 "${PID[$svc]}" 2>/dev/null || {
			tail -n 20 "$OUT/$tag-kop-$svc.log" >&2
			die "kop-$svc ($tag) exited during start"
		}
		(($(now_ms) - t0 < 60000)) || die "kop-$svc ($tag) not ready after 60 s"
		sleep 0.01
	done
	READY_MS[$tag.$svc]=$(($(now_ms) - t0))
	say "    kop-$svc ready after ${READY_MS[$tag.$svc]} ms"
}

# start_pipeline MODE TAG [CONFIG-DIR [delays]]: the four daemons, one after another;
# "delays" gives the stages the seed's SIMULATE_DELAY_MS. Records the idle RSS.
start_pipeline() {
	local mode=$1 tag=$2 config=${3:-$ROOT/etc/kop} delays=${4:-} svc delay
	API_PORT=$(pick_port)
	E2E_TOPIC=bench.$RUN_ID.$tag.inventory.reserved
	say "$tag: starting the daemons, $mode (fresh topics bench.$RUN_ID.$tag.*)"
	for svc in "${SERVICES[@]}"; do
		delay=0
		[[ -n $delays && -n ${SEED_DELAY[$svc]:-} ]] && delay=${SEED_DELAY[$svc]}
		start_daemon "$svc" "$mode" "$tag" "$config" "$delay"
	done
	sleep 2
	for svc in "${SERVICES[@]}"; do
		RSS_IDLE[$tag.$svc]=$(rss_kb "${PID[$svc]}")
	done
}

check_alive() {
	local svc
	for svc in "${!PID[@]}"; do
		kill -0 "${PID[$svc]}" 2>/dev/null || die "kop-$svc exited; see $OUT/*-kop-$svc.log"
	done
}

# Records the RSS of each daemon while load runs (every 250 ms) into $OUT/rss-<tag>.
start_sampler() {
	local tag=$1
	(
		while :; do
			for svc in "${!PID[@]}"; do
				echo "$svc $(rss_kb "${PID[$svc]}")"
			done
			sleep 0.25
		done
	) >>"$OUT/rss-$tag" &
	SAMPLER_PID=$!
}

# Stops the sampler and the daemons of TAG; keeps their peak RSS.
finish_pipeline() {
	local tag=$1 svc
	stop_sampler
	for svc in "${SERVICES[@]}"; do
		RSS_LOAD[$tag.$svc]=$(awk -v s="$svc" '$1 == s && $2 > m { m = $2 } END { print m + 0 }' "$OUT/rss-$tag")
	done
	say "$tag: stopping the daemons"
	stop_daemons
}

# "sum count" of a stage's kop_end_to_end_latency_seconds (acceptance → handled there).
stage_latency() {
	{ curl -sf --max-time 5 "http://127.0.0.1:$1/metrics" || true; } |
		awk '$1 ~ /^kop_end_to_end_latency_seconds_sum/ { s = $NF }
			$1 ~ /^kop_end_to_end_latency_seconds_count/ { c = $NF }
			END { print s + 0, c + 0 }'
}

# A counter of a daemon's /metrics for one topic: metric PORT NAME TOPIC
metric() {
	{ curl -sf --max-time 1 "http://127.0.0.1:$1/metrics" || true; } |
		awk -v m="$2" -v t="topic=\"$3\"" 'index($1, m "{") == 1 && index($1, t) { s += $NF } END { print s + 0 }'
}

# load NAME MODE KOP-LOAD-ARGS...: runs kop-load; checks that every accepted order arrived,
# all answers were 202 (or 503 with ALLOW_503=1) and, in exactly-once mode, that nothing
# arrived twice. Records per daemon the CPU µs per accepted order (CPU_US[NAME.<svc>],
# with load, broker and machine), the machine's busy share and the mean hop latencies.
ALLOW_503=0
load() {
	local name=$1 mode=$2 svc
	shift 2
	declare -A before=() cpu0=()
	for svc in "${STAGES[@]}"; do
		before[$svc]=$(stage_latency "${MPORT[$svc]}")
	done
	for svc in "${SERVICES[@]}"; do
		cpu0[$svc]=$(cpu_ticks "${PID[$svc]}")
	done
	[[ -n $BROKER_PID ]] && cpu0[broker]=$(cpu_ticks "$BROKER_PID")
	local busy0 total0 busy1 total1
	read -r busy0 total0 < <(machine_ticks)
	children_cpu_ms
	local cpu_before=$CHILD_CPU_MS
	run_child "$OUT/$name.json" "$OUT/$name.log" \
		"$BIN/kop-load" --url "http://127.0.0.1:$API_PORT/order" --e2e \
		--e2e-topic "$E2E_TOPIC" --brokers "$KAFKA_BROKERS" --json "$@" ||
		{
			cat "$OUT/$name.log" >&2
			die "kop-load $*"
		}
	children_cpu_ms
	local load_ms=$((CHILD_CPU_MS - cpu_before))
	read -r busy1 total1 < <(machine_ticks)
	local accepted arrived dups other
	accepted=$(jq -r '.e2e.accepted' "$OUT/$name.json")
	for svc in "${SERVICES[@]}"; do
		CPU_US[$name.$svc]=$(us_per $(($(cpu_ticks "${PID[$svc]}") - cpu0[$svc])) "$accepted")
	done
	CPU_US[$name.broker]=n/a
	[[ -n $BROKER_PID ]] && CPU_US[$name.broker]=$(us_per $(($(cpu_ticks "$BROKER_PID") - cpu0[broker])) "$accepted")
	CPU_US[$name.load]=$(awk -v ms="$load_ms" -v n="$accepted" 'BEGIN { if (n > 0) printf "%.1f", ms * 1000 / n; else print "n/a" }')
	CPU_US[$name.machine]=$(us_per $((busy1 - busy0)) "$accepted")
	BUSY_PCT[$name]=$(((busy1 - busy0) * 100 / (total1 - total0 > 0 ? total1 - total0 : 1)))
	# Mean time from acceptance to handling by each stage, during this run only.
	local s0 c0 s1 c1
	for svc in "${STAGES[@]}"; do
		read -r s0 c0 <<<"${before[$svc]}"
		read -r s1 c1 < <(stage_latency "${MPORT[$svc]}")
		HOP_MS[$name.$svc]=$(awk -v s="$s1" -v t="$s0" -v c="$c1" -v d="$c0" \
			'BEGIN { if (c > d) printf "%.0f", 1000 * (s - t) / (c - d); else print "n/a" }')
	done
	arrived=$(jq -r '.e2e.arrived' "$OUT/$name.json")
	dups=$(jq -r '.e2e.duplicates' "$OUT/$name.json")
	local allowed='"202"'
	((ALLOW_503)) && allowed='"202", "503"'
	other=$(jq -r "[.status | to_entries[] | select(.key | IN($allowed) | not) | .value] | add // 0" "$OUT/$name.json")
	say "    $name: $(f "$OUT/$name.json" .achieved_rps 0) answered/s, e2e $(f "$OUT/$name.json" .e2e.throughput 0)/s, $arrived/$accepted arrived, $dups duplicates, e2e p99 $(f "$OUT/$name.json" .e2e.latency_ms.p99 1) ms, machine ${BUSY_PCT[$name]} % busy"
	((accepted > 0)) || die "$name: no order accepted"
	((arrived == accepted)) || die "$name: only $arrived of $accepted accepted orders arrived in $E2E_TOPIC"
	((other == 0)) || die "$name: $other answers other than $allowed: $(jq -c .status "$OUT/$name.json")"
	if [[ $mode == exactly-once ]] && ((dups > 0)); then
		die "$name: $dups duplicates in exactly-once mode"
	fi
	check_alive
}

declare -A READY_MS=() RSS_IDLE=() RSS_LOAD=() CPU_US=() BUSY_PCT=() HOP_MS=() MPORT=() RUN_S=() QUIET=()

# ---------------------------------------------------------------------------
# The order of the measured runs: each guarantee ROUNDS times, alternating (ABBA).

RUNS=()
for ((round = 1; round <= ROUNDS; round++)); do
	if ((round % 2)); then
		for mode in "${MODES[@]}"; do RUNS+=("$mode $round"); done
	else
		for ((i = ${#MODES[@]} - 1; i >= 0; i--)); do RUNS+=("${MODES[i]} $round"); done
	fi
done

# ---------------------------------------------------------------------------
# warm-up: the broker's JIT, page cache, transaction and offsets topics, before any figure

T_PHASE=$SECONDS
read -r warm_mode _ <<<"${RUNS[0]}"
say "warm-up: the whole pipeline ($warm_mode), $WARMUP_RATE orders/s for $WARMUP_DURATION"
start_pipeline "$warm_mode" warm
start_sampler warm
load warmup "$warm_mode" --rps "$WARMUP_RATE" --duration "$WARMUP_DURATION" --concurrency 64 --drain 60s
finish_pipeline warm
RUN_S[warm-up]=$((SECONDS - T_PHASE))

# ---------------------------------------------------------------------------
# (a) raw produce → consume: the best of RAW_RUNS runs is the ceiling

T_PHASE=$SECONDS
for ((i = 1; i <= RAW_RUNS; i++)); do
	say "(a) raw produce → consume, run $i of $RAW_RUNS: $RAW_RECORDS records of $RAW_SIZE bytes"
	run_child "$OUT/raw-$i.json" "$OUT/raw-$i.log" \
		"$RAW_BIN" --bench --brokers "$KAFKA_BROKERS" --topic "bench.$RUN_ID.raw-$i" \
		--records "$RAW_RECORDS" --size "$RAW_SIZE" --json ||
		{
			cat "$OUT/raw-$i.log" >&2
			die "raw benchmark"
		}
	say "    combined $(f "$OUT/raw-$i.json" .combined.rate 0) records/s"
done
RAW_BEST=1
for ((i = 2; i <= RAW_RUNS; i++)); do
	if jq -e --slurpfile b "$OUT/raw-$RAW_BEST.json" '.combined.rate > $b[0].combined.rate' "$OUT/raw-$i.json" >/dev/null; then
		RAW_BEST=$i
	fi
done
RAW_RATE=$(jq -r '.combined.rate' "$OUT/raw-$RAW_BEST.json")
RAW_RATES=$(for ((i = 1; i <= RAW_RUNS; i++)); do f "$OUT/raw-$i.json" .combined.rate 0; echo; done)
RAW_SPREAD=$(awk 'NR == 1 || $1 < lo { lo = $1 } $1 > hi { hi = $1 } END { printf "%.0f", (hi > 0 ? 100 * (hi - lo) / hi : 0) }' <<<"$RAW_RATES")
say "    the ceiling: $(f "$OUT/raw-$RAW_BEST.json" .combined.rate 0) records/s (run $RAW_BEST); the runs differ by $RAW_SPREAD %"
say "(a') the same with transactions of $SHIPPED_COMMIT_MAX records: $RAW_TXN_RECORDS records"
run_child "$OUT/raw-txn.json" "$OUT/raw-txn.log" \
	"$RAW_BIN" --bench --brokers "$KAFKA_BROKERS" --topic "bench.$RUN_ID.raw-txn" --transactional \
	--txn-records "$SHIPPED_COMMIT_MAX" --records "$RAW_TXN_RECORDS" --size "$RAW_SIZE" --json ||
	{
		cat "$OUT/raw-txn.log" >&2
		die "raw benchmark (transactional)"
	}
say "    combined $(f "$OUT/raw-txn.json" .combined.rate 0) records/s"
RUN_S[raw]=$((SECONDS - T_PHASE))

# ---------------------------------------------------------------------------
# (e) one stage draining a backlog: DRAIN_ORDERS orders preloaded into a fresh
# orders.created (by bench/raw.rs --preload: about 20 times faster than through the API),
# then kop-payment alone, exactly-once, from its first consumed record until a
# read_committed reader (bench/raw.rs --count) has read every payment.

T_PHASE=$SECONDS
DRAIN_IN=bench.$RUN_ID.drain.orders.created
DRAIN_OUT=bench.$RUN_ID.drain.payments.completed
say "(e) preloading $DRAIN_ORDERS orders into $DRAIN_IN"
run_child "$OUT/drain-preload.json" "$OUT/drain-preload.log" \
	"$RAW_BIN" --bench --brokers "$KAFKA_BROKERS" --topic "$DRAIN_IN" --preload \
	--records "$DRAIN_ORDERS" --key-prefix "drain-$RUN_ID-" --json ||
	{
		cat "$OUT/drain-preload.log" >&2
		die "preloading the drain topic"
	}
say "    $(f "$OUT/drain-preload.json" .produce.rate 0) records/s"
say "(e) kop-payment alone (exactly-once) drains them"
API_PORT=$(pick_port)
T_DRAIN_START=$(now_ms)
start_daemon payment exactly-once drain "$ROOT/etc/kop" 0
# The reader waits for the output topic (kop-payment creates it at start).
"$RAW_BIN" --bench --brokers "$KAFKA_BROKERS" --topic "$DRAIN_OUT" --count \
	--records "$DRAIN_ORDERS" --json >"$OUT/drain-count.json" 2>"$OUT/drain-count.log" &
CHILD_PID=$!
# The first consumed record: kafka_messages_consumed_total, polled every 20 ms.
T_DRAIN_FIRST=
while :; do
	if (($(metric "${MPORT[payment]}" kafka_messages_consumed_total "$DRAIN_IN") > 0)); then
		T_DRAIN_FIRST=$(now_ms)
		DRAIN_CPU0=$(cpu_ticks "${PID[payment]}")
		[[ -n $BROKER_PID ]] && DRAIN_BROKER0=$(cpu_ticks "$BROKER_PID")
		break
	fi
	check_alive
	(($(now_ms) - T_DRAIN_START < 60000)) || die "kop-payment consumed nothing of $DRAIN_IN in 60 s"
	sleep 0.02
done
rc=0
wait "$CHILD_PID" || rc=$?
CHILD_PID=
DRAIN_CPU1=$(cpu_ticks "${PID[payment]}")
[[ -n $BROKER_PID ]] && DRAIN_BROKER1=$(cpu_ticks "$BROKER_PID")
check_alive
((rc == 0)) || {
	cat "$OUT/drain-count.log" >&2
	die "(e): not every payment arrived in $DRAIN_OUT"
}
DRAIN_DUPS=$(jq -r '.consume.duplicates' "$OUT/drain-count.json")
((DRAIN_DUPS == 0)) || die "(e): $DRAIN_DUPS duplicates in $DRAIN_OUT (exactly-once)"
T_DRAIN_LAST=$(jq -r '.consume.last_epoch_ms | floor' "$OUT/drain-count.json")
DRAIN_S=$(awk -v a="$T_DRAIN_FIRST" -v b="$T_DRAIN_LAST" 'BEGIN { printf "%.3f", (b - a) / 1000 }')
DRAIN_FROM_START_S=$(awk -v a="$T_DRAIN_START" -v b="$T_DRAIN_LAST" 'BEGIN { printf "%.3f", (b - a) / 1000 }')
DRAIN_RATE=$(awk -v n="$DRAIN_ORDERS" -v s="$DRAIN_S" 'BEGIN { printf "%.0f", (s > 0 ? n / s : 0) }')
DRAIN_CPU_US=$(us_per $((DRAIN_CPU1 - DRAIN_CPU0)) "$DRAIN_ORDERS")
DRAIN_BROKER_US=n/a
[[ -n $BROKER_PID ]] && DRAIN_BROKER_US=$(us_per $((DRAIN_BROKER1 - DRAIN_BROKER0)) "$DRAIN_ORDERS")
DRAIN_COMMITS=$({ curl -sf --max-time 5 "http://127.0.0.1:${MPORT[payment]}/metrics" || true; } |
	awk 'index($1, "kop_transactions_total{") == 1 && index($1, "outcome=\"commit\"") { s += $NF } END { print s + 0 }')
say "    $DRAIN_RATE records/s from the first consumed record ($DRAIN_S s; $DRAIN_FROM_START_S s from process start), $DRAIN_CPU_US µs CPU per record, $DRAIN_COMMITS transactions"
stop_daemons
# The floor of that CPU: the same records relayed unchanged, exactly once, by kop-payment's
# clients and nothing else.
say "(e) the floor: a bare exactly-once relay of the same records (bench/relay.rs)"
run_child "$OUT/drain-relay.json" "$OUT/drain-relay.log" \
	"$RELAY_BIN" --bench --brokers "$KAFKA_BROKERS" --input "$DRAIN_IN" --records "$DRAIN_ORDERS" \
	--txn-records "$SHIPPED_COMMIT_MAX" --config "$ROOT/etc/kop/payment.toml" --json ||
	{
		cat "$OUT/drain-relay.log" >&2
		die "the relay benchmark"
	}
RELAY_CPU_US=$(f "$OUT/drain-relay.json" .cpu_us_per_record 2)
say "    $(f "$OUT/drain-relay.json" .records_per_s 0) records/s, $RELAY_CPU_US µs CPU per record"
RUN_S[drain]=$((SECONDS - T_PHASE))

# ---------------------------------------------------------------------------
# (b), (c): the pipeline, per processing guarantee, in the order of RUNS

for run in "${RUNS[@]}"; do
	read -r mode round <<<"$run"
	tag=$(tag_of "$mode")$round
	T_PHASE=$SECONDS
	start_pipeline "$mode" "$tag"
	start_sampler "$tag"

	wait_until_quiet
	QUIET[$tag]=$QUIET_WAITED
	say "    the machine was quiet after $QUIET_WAITED busy"
	# Not reported: the fresh consumer groups settle, connections are made.
	say "    settling: 200 orders/s for 3 s"
	load "$tag-settle" "$mode" --rps 200 --duration 3s --concurrency 16

	# (c) latency at fixed rates, on an idle pipeline.
	for rate in "${RATES[@]}"; do
		say "(c) $tag: $rate orders/s for $FIXED_DURATION"
		load "$tag-rps$rate" "$mode" --rps "$rate" --duration "$FIXED_DURATION" --concurrency 256
	done

	# (b) max rate, as kop-load --max-rate measures it.
	say "(b) $tag: max rate, $MAX_CONCURRENCY clients, $MAX_DURATION"
	load "$tag-max" "$mode" --max-rate --concurrency "$MAX_CONCURRENCY" --duration "$MAX_DURATION" --drain 120s

	# (b') a burst: N orders all due at t=0, so the open-loop sender never waits and
	# $MAX_CONCURRENCY requests are always in flight — a max rate without --max-rate's
	# timer (see bench/README.md). N: $BURST_SECONDS s at what the highest fixed rate
	# achieved.
	burst=$(jq -r --argjson s "$BURST_SECONDS" '[.achieved_rps * $s, 10000] | max | floor' "$OUT/$tag-rps${RATES[-1]}.json")
	say "(b') $tag: burst of $burst orders, $MAX_CONCURRENCY in flight"
	load "$tag-burst" "$mode" --rps 1000000 --duration "$(awk -v n="$burst" 'BEGIN { printf "%.6f", n / 1e6 }')" \
		--concurrency "$MAX_CONCURRENCY" --drain 120s

	finish_pipeline "$tag"
	RUN_S[$tag]=$((SECONDS - T_PHASE))
done

# ---------------------------------------------------------------------------
# (s) the seed's handler delays: at SEED_RATE with the shipped max_in_flight, then at
# HIGH_RATE with max_in_flight = HIGH_MAX_IN_FLIGHT; the guarantees in turn, the second
# row in the reverse order of the first.

T_PHASE=$SECONDS
SEED_MODES=("${MODES[@]}")
for mode in "${SEED_MODES[@]}"; do
	tag=seed-$(tag_of "$mode")
	start_pipeline "$mode" "$tag" "$ROOT/etc/kop" delays
	start_sampler "$tag"
	say "(s) $tag: delays ${SEED_DELAYS[*]} ms, $SEED_RATE orders/s for $SEED_DURATION"
	load "$tag" "$mode" --rps "$SEED_RATE" --duration "$SEED_DURATION" --concurrency "$SEED_CONCURRENCY" --drain 120s
	finish_pipeline "$tag"
done
for ((i = ${#MODES[@]} - 1; i >= 0; i--)); do
	mode=${MODES[i]}
	tag=high-$(tag_of "$mode")
	start_pipeline "$mode" "$tag" "$HIGH_CONFIG" delays
	start_sampler "$tag"
	say "(s) $tag: delays ${SEED_DELAYS[*]} ms, max_in_flight $HIGH_MAX_IN_FLIGHT, $HIGH_RATE orders/s for $HIGH_DURATION"
	ALLOW_503=1
	load "$tag" "$mode" --rps "$HIGH_RATE" --duration "$HIGH_DURATION" --concurrency "$HIGH_CONCURRENCY" --drain 180s
	ALLOW_503=0
	finish_pipeline "$tag"
done
RUN_S[seed]=$((SECONDS - T_PHASE))
BENCH_S=$((SECONDS - T_BENCH))
UPTIME_AFTER=$(uptime)

# ---------------------------------------------------------------------------
# the table

run_name() {
	case $1 in
	rps*) echo "${1#rps}/s" ;;
	max) echo max-rate ;;
	*) echo "$1" ;;
	esac
}
mib() { awk -v kb="$1" 'BEGIN { printf "%.1f", kb / 1024 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.1f %%", 100 * a / b; else print "n/a" }'; }
# Thousands separators: 12345 → 12,345.
num() { printf "%.0f" "$1" | sed ':a; s/\B[0-9]\{3\}\>/,&/; ta'; }
# The values of a JQ path over the reports of a mode's rounds: rounds_of TAG-PREFIX SUFFIX JQ
rounds_of() {
	local r
	for ((r = 1; r <= ROUNDS; r++)); do
		jq -r "$3 // 0" "$OUT/$1$r-$2.json"
	done
}
# Whitespace-separated values as "a / b", rounded: joined VALUES...
joined() { awk '{ for (i = 1; i <= NF; i++) s = s (n++ ? " / " : "") sprintf("%.0f", $i) } END { print s }' <<<"$*"; }
# Their spread, (max − min) / max: spread_pct VALUES...
spread_pct() { awk '{ for (i = 1; i <= NF; i++) { n++; if (n == 1 || $i < lo) lo = $i; if ($i > hi) hi = $i } }
	END { if (n > 1 && hi > 0) printf "%.0f %%", 100 * (hi - lo) / hi; else print "–" }' <<<"$*"; }
# A row of the noise table: noise_row MODE MEASURE VALUES
noise_row() { echo "| $1 | $2 | $(joined "$3") | $(spread_pct "$3") |"; }
# How many of the values meet the target: met OP TARGET VALUES... (OP: ge or le)
met() {
	awk -v op="$1" -v t="$2" '{ for (i = 1; i <= NF; i++) { n++; if ($i !~ /^[0-9.]+$/) odd++; else if ((op == "ge" && $i >= t) || (op == "le" && $i <= t)) k++ } }
		END { if (n == 0 || odd) print "not measured"; else if (k == n) print "yes"; else if (k == 0) print "**no**"; else printf "%d of %d runs\n", k, n }' <<<"${*:3}"
}

NPROC=$(nproc)
HAVE_1000=0
for rate in "${RATES[@]}"; do [[ $rate == 1000 ]] && HAVE_1000=1; done
DRAIN_PCT=$(awk -v a="$DRAIN_RATE" -v b="$RAW_RATE" 'BEGIN { printf "%.1f", (b > 0 ? 100 * a / b : 0) }')

{
	echo "## kop benchmark, $(date -u '+%Y-%m-%d %H:%M UTC')"
	echo
	echo "Machine: $NPROC cores ($(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)), $(free -h | awk '/^Mem:/ { print $2 }') RAM, Linux $(uname -r)."
	echo "Broker: $BROKER_DESC."
	echo "Load before: \`${UPTIME_BEFORE#*load average: }\`; after: \`${UPTIME_AFTER#*load average: }\` (1, 5, 15 min)."
	echo "Order: warm-up ($WARMUP_RATE orders/s for $WARMUP_DURATION through the whole pipeline, $warm_mode, not reported), raw × $RAW_RUNS, drain, then $(for run in "${RUNS[@]}"; do read -r m r <<<"$run"; echo -n "$m #$r, "; done)seed delays."
	echo "Before each run of the pipeline the script waited until the machine was under $QUIET_PCT % busy over 2 s (at most $QUIET_MAX_S s; waited, last busy share): $(for run in "${RUNS[@]}"; do read -r m r <<<"$run"; echo -n "$m #$r ${QUIET[$(tag_of "$m")$r]:-?}; "; done)"
	echo
	echo "### Targets"
	echo
	echo "| what | target | measured | met |"
	echo "|---|---|---|---|"
	for mode in "${MODES[@]}"; do
		r=$OUT/seed-$(tag_of "$mode").json
		echo "| seed's handler delays (payment ${SEED_DELAYS[0]} ms, inventory ${SEED_DELAYS[1]} ms, notification ${SEED_DELAYS[2]} ms), offered $(num "$SEED_RATE") orders/s, max_in_flight $(num "$SHIPPED_MAX_IN_FLIGHT"), $mode | ≥ 950 orders/s end to end | $(f "$r" .e2e.throughput 0)/s | $(met ge 950 "$(jq -r .e2e.throughput "$r")") |"
	done
	for mode in "${MODES[@]}"; do
		t=high-$(tag_of "$mode")
		r=$OUT/$t.json
		echo "| the same with max_in_flight $(num "$HIGH_MAX_IN_FLIGHT"), offered $(num "$HIGH_RATE")/s, $mode | ≥ 9,000/s | $(f "$r" .e2e.throughput 0)/s (machine ${BUSY_PCT[$t]} % busy) | $(met ge 9000 "$(jq -r .e2e.throughput "$r")") |"
	done
	echo "| one stage draining a backlog: $(num "$DRAIN_ORDERS") orders, kop-payment alone, exactly-once | ≥ 40 % of the raw rate (a) | $(num "$DRAIN_RATE") records/s = $DRAIN_PCT % of $(num "$RAW_RATE") | $(met ge 40 "$DRAIN_PCT") |"
	echo "| CPU per record in that drain (kop-payment) | ≤ 3 µs | $DRAIN_CPU_US µs (a bare relay of the same records: $RELAY_CPU_US µs) | $(met le 3 "$DRAIN_CPU_US") |"
	if ((HAVE_1000)); then
		for mode in "${MODES[@]}"; do
			if [[ $mode == exactly-once ]]; then target=50; else target=10; fi
			p99s=$(rounds_of "$(tag_of "$mode")" rps1000 .e2e.latency_ms.p99)
			echo "| end to end at 1,000 orders/s, read_committed reader (kop-load --e2e), $mode, $ROUNDS runs | p99 ≤ $target ms | $(joined "$p99s") ms (spread $(spread_pct "$p99s")) | $(met le "$target" "$p99s") |"
		done
	fi
	echo
	echo "### (a) raw broker throughput (bench/raw.rs), the best of $RAW_RUNS runs"
	echo
	echo "Records of $(f "$OUT/raw-1.json" .value_bytes 0) bytes (key: a unique id) to a new topic of 3 partitions; producer acks=all, idempotent (as kop's producers), linger.ms 5 (kop's: 1 ms, for latency) and librdkafka's default batch size; a read_committed consumer (fetch.wait.max.ms 50, as the stages) reading at the same time. After the warm-up; the best combined rate is the ceiling (a); the runs differ by $RAW_SPREAD % (max − min over max). The transactional row commits every $SHIPPED_COMMIT_MAX records (\`stage.commit_max_records\`), as an exactly-once stage under backlog does."
	echo
	echo "| producer | run | records | produce | consume | combined produce → consume |"
	echo "|---|---|---:|---:|---:|---:|"
	for ((i = 1; i <= RAW_RUNS; i++)); do
		r=$OUT/raw-$i.json
		if ((i == RAW_BEST)); then best=" **(a)**"; else best=; fi
		echo "| idempotent | $i | $(f "$r" .records 0) | $(f "$r" .produce.rate 0) rec/s | $(f "$r" .consume.rate 0) rec/s | $(f "$r" .combined.rate 0) rec/s$best |"
	done
	echo "| transactional, $SHIPPED_COMMIT_MAX records per transaction | 1 | $(f "$OUT/raw-txn.json" .records 0) | $(f "$OUT/raw-txn.json" .produce.rate 0) rec/s | $(f "$OUT/raw-txn.json" .consume.rate 0) rec/s | $(f "$OUT/raw-txn.json" .combined.rate 0) rec/s |"
	echo
	echo "### (e) one stage draining a backlog"
	echo
	echo "$(num "$DRAIN_ORDERS") OrderCreated events preloaded into a fresh topic of 3 partitions (bench/raw.rs --preload, $(f "$OUT/drain-preload.json" .produce.rate 0) records/s); then kop-payment alone, exactly-once, shipped configuration (dedup on: each payment's key also goes to the changelog). Timed from its first consumed record (kafka_messages_consumed_total, polled every 20 ms) to the last payment read by a read_committed reader (bench/raw.rs --count). CPU: utime + stime of kop-payment (/proc/<pid>/stat) over the same span."
	echo
	echo "| records | s from first consumed | s from process start | **records/s** | of (a) | kop-payment CPU µs/record | broker CPU µs/record | transactions committed | payments per transaction | duplicates |"
	echo "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
	echo "| $DRAIN_ORDERS | $DRAIN_S | $DRAIN_FROM_START_S | **$DRAIN_RATE** | $DRAIN_PCT % | $DRAIN_CPU_US | $DRAIN_BROKER_US | $DRAIN_COMMITS | $(awk -v n="$DRAIN_ORDERS" -v c="$DRAIN_COMMITS" 'BEGIN { if (c > 0) printf "%.0f", n / c; else print "n/a" }') | $DRAIN_DUPS |"
	echo
	echo "The floor of that CPU (bench/relay.rs): the same $(num "$DRAIN_ORDERS") records read and written unchanged (key, value, headers) to a new topic, exactly once in transactions of $SHIPPED_COMMIT_MAX, by the consumer and producer kop-payment makes from etc/kop/payment.toml, and nothing else: one thread that waits for each commit. What kop-payment spends beyond it is its own work (decoding, the handler, the routing headers, the handled-key store and its changelog record, one more produced record per order)."
	echo
	echo "| records | records/s | CPU µs/record |"
	echo "|---:|---:|---:|"
	echo "| $(f "$OUT/drain-relay.json" .records 0) | $(f "$OUT/drain-relay.json" .records_per_s 0) | $RELAY_CPU_US |"
	echo
	echo "### (b) pipeline at max rate, $MAX_CONCURRENCY requests in flight"
	echo
	echo "max-rate: \`kop-load --max-rate --concurrency $MAX_CONCURRENCY --duration $MAX_DURATION --e2e\`. burst: \`kop-load --rps 1000000 --duration N/10⁶ --concurrency $MAX_CONCURRENCY --e2e\`, N orders all due at once (N = $BURST_SECONDS s at the rate of the ${RATES[-1]}/s run). End to end orders/s: arrivals at kop-load's read_committed reader of the last topic per second, first to last arrival. (b)/(a): end to end orders/s over the raw ceiling (a)."
	echo
	echo "| mode | # | run | orders | API answered/s | **end to end orders/s** | (b)/(a) | API p50 / p99 ms | e2e p50 / p99 / p99.9 ms | arrived |"
	echo "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"
	for run in "${RUNS[@]}"; do
		read -r mode round <<<"$run"
		tag=$(tag_of "$mode")$round
		for kind in max burst; do
			r=$OUT/$tag-$kind.json
			if [[ $kind == max ]]; then
				api="$(f "$r" .latency_ms.p50 1) / $(f "$r" .latency_ms.p99 1)"
			else
				api="– (counted from t=0)"
			fi
			echo "| $mode | $round | ${kind/max/max-rate} | $(jq -r .sent "$r") | $(f "$r" .achieved_rps 0) | **$(f "$r" .e2e.throughput 0)** | $(ratio "$(jq -r .e2e.throughput "$r")" "$RAW_RATE") | $api | $(f "$r" .e2e.latency_ms.p50 0) / $(f "$r" .e2e.latency_ms.p99 0) / $(f "$r" .e2e.latency_ms.p999 0) | $(jq -r .e2e.arrived "$r") / $(jq -r .e2e.accepted "$r") |"
		done
	done
	echo
	echo "### (c) latency at fixed rates (kop-load --rps R --concurrency 256 --e2e, $FIXED_DURATION, open loop)"
	echo
	echo "End to end: from acceptance by the API (acceptedAt) to arrival at kop-load's reader of the last topic, which reads with isolation.level=read_committed, as every downstream reader must."
	echo
	echo "| mode | # | target/s | achieved/s | e2e orders/s | API p50 / p99 / p99.9 ms | **e2e p50 / p99 / p99.9 ms** | e2e max ms |"
	echo "|---|---:|---:|---:|---:|---:|---:|---:|"
	for run in "${RUNS[@]}"; do
		read -r mode round <<<"$run"
		tag=$(tag_of "$mode")$round
		for rate in "${RATES[@]}"; do
			r=$OUT/$tag-rps$rate.json
			echo "| $mode | $round | $rate | $(f "$r" .achieved_rps 0) | $(f "$r" .e2e.throughput 0) | $(f "$r" .latency_ms.p50 1) / $(f "$r" .latency_ms.p99 1) / $(f "$r" .latency_ms.p999 1) | **$(f "$r" .e2e.latency_ms.p50 0) / $(f "$r" .e2e.latency_ms.p99 0) / $(f "$r" .e2e.latency_ms.p999 0)** | $(f "$r" .e2e.latency_ms.max 0) |"
		done
	done
	if ((ROUNDS > 1)); then
		echo
		echo "### Noise: a mode's runs side by side"
		echo
		echo "The same measurement in each run of a mode (in the order run), and how far apart they are: (max − min) / max. A difference between modes or versions smaller than this means nothing."
		echo
		echo "| mode | measure | runs | spread |"
		echo "|---|---|---:|---:|"
		for mode in "${MODES[@]}"; do
			t=$(tag_of "$mode")
			noise_row "$mode" "max-rate end to end orders/s" "$(rounds_of "$t" max .e2e.throughput)"
			noise_row "$mode" "burst end to end orders/s" "$(rounds_of "$t" burst .e2e.throughput)"
			for rate in "${RATES[@]}"; do
				noise_row "$mode" "$rate/s achieved" "$(rounds_of "$t" "rps$rate" .achieved_rps)"
				noise_row "$mode" "$rate/s e2e p50 ms" "$(rounds_of "$t" "rps$rate" .e2e.latency_ms.p50)"
				noise_row "$mode" "$rate/s e2e p99 ms" "$(rounds_of "$t" "rps$rate" .e2e.latency_ms.p99)"
			done
		done
	fi
	echo
	echo "### (s) the seed's handler delays"
	echo
	echo "SIMULATE_DELAY_MS: kop-payment ${SEED_DELAYS[0]}, kop-inventory ${SEED_DELAYS[1]}, kop-notification ${SEED_DELAYS[2]} ms — the Node.js seed's sleeps, which it served one order at a time (about 1 order/s). Open loop, \`kop-load --rps R --e2e\`. A stage holds at most max_in_flight records, so its ceiling is max_in_flight / delay: $(num "$SHIPPED_MAX_IN_FLIGHT") / ${SEED_DELAYS[1]} ms for kop-inventory with the shipped setting. The 10,000 rows use the shipped files with [stage] max_in_flight = $HIGH_MAX_IN_FLIGHT (in $HIGH_CONFIG); 503 answers are allowed there, and counted."
	echo
	echo "| mode | max_in_flight | offered/s | duration | API answered/s | 503 | **end to end orders/s** | e2e p50 / p99 / max ms | arrived | machine busy |"
	echo "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"
	for t in "${MODES[@]/#/seed-}" "${MODES[@]/#/high-}"; do
		mode=${t#*-}
		name=${t%%-*}-$(tag_of "$mode")
		r=$OUT/$name.json
		if [[ $t == seed-* ]]; then mif=$SHIPPED_MAX_IN_FLIGHT dur=$SEED_DURATION; else mif=$HIGH_MAX_IN_FLIGHT dur=$HIGH_DURATION; fi
		echo "| $mode | $mif | $(f "$r" .target_rps 0) | $dur | $(f "$r" .achieved_rps 0) | $(jq -r '.status["503"] // 0' "$r") | **$(f "$r" .e2e.throughput 0)** | $(f "$r" .e2e.latency_ms.p50 0) / $(f "$r" .e2e.latency_ms.p99 0) / $(f "$r" .e2e.latency_ms.max 0) | $(jq -r .e2e.arrived "$r") / $(jq -r .e2e.accepted "$r") | ${BUSY_PCT[$name]} % |"
	done
	echo
	echo "### CPU per order"
	echo
	echo "utime + stime of each process (/proc/<pid>/stat; kop-load: bash's \`times\`) over a run, divided by the orders accepted in it, in µs. machine: every process's CPU time (/proc/stat, ours and everybody's) over the orders; busy: its share of all $NPROC cores. Clock ticks are $((1000 / HZ)) ms, so a figure is exact to about $((1000 / HZ)) ms / orders."
	echo
	echo "| mode | # | run | orders | kop-order | kop-payment | kop-inventory | kop-notification | kop-load | broker | machine | busy |"
	echo "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
	cpu_row() {
		local name=$1
		echo "| $2 | $3 | $4 | $(jq -r .e2e.accepted "$OUT/$name.json") | ${CPU_US[$name.order]} | ${CPU_US[$name.payment]} | ${CPU_US[$name.inventory]} | ${CPU_US[$name.notification]} | ${CPU_US[$name.load]} | ${CPU_US[$name.broker]} | ${CPU_US[$name.machine]} | ${BUSY_PCT[$name]} % |"
	}
	for run in "${RUNS[@]}"; do
		read -r mode round <<<"$run"
		tag=$(tag_of "$mode")$round
		for kind in "${RATES[@]/#/rps}" max burst; do
			cpu_row "$tag-$kind" "$mode" "$round" "$(run_name "$kind")"
		done
	done
	for mode in "${MODES[@]}"; do
		cpu_row "seed-$(tag_of "$mode")" "$mode" "" "seed delays, $SEED_RATE/s"
	done
	for mode in "${MODES[@]}"; do
		cpu_row "high-$(tag_of "$mode")" "$mode" "" "seed delays, $HIGH_RATE/s"
	done
	echo
	echo "### Where the time goes: mean ms from acceptance by the API to handling by each stage"
	echo
	echo "From each stage's \`kop_end_to_end_latency_seconds\` (sum / count over the run). A stage handles a record as soon as it is read; the next stage sees the output only once the batch is committed (exactly-once) or acknowledged (at-least-once)."
	echo
	echo "| mode | # | run | → kop-payment | → kop-inventory | → kop-notification | e2e p50 (kop-load) |"
	echo "|---|---:|---|---:|---:|---:|---:|"
	for run in "${RUNS[@]}"; do
		read -r mode round <<<"$run"
		tag=$(tag_of "$mode")$round
		for kind in "${RATES[@]/#/rps}" max burst; do
			echo "| $mode | $round | $(run_name "$kind") | ${HOP_MS[$tag-$kind.payment]} | ${HOP_MS[$tag-$kind.inventory]} | ${HOP_MS[$tag-$kind.notification]} | $(f "$OUT/$tag-$kind.json" .e2e.latency_ms.p50 0) |"
		done
	done
	echo
	echo "### (d) daemons: start → READY, memory"
	echo
	echo "Start → READY: process start to the first \`/readyz\` 200 (probed every 10 ms), daemons started one after the other, fresh topics (created at start). RSS: VmRSS after 2 s idle, and the peak while load ran (sampled every 250 ms)."
	echo
	echo "| daemon | mode | # | start → READY ms | RSS idle MiB | RSS peak under load MiB |"
	echo "|---|---|---:|---:|---:|---:|"
	for svc in "${SERVICES[@]}"; do
		for run in "${RUNS[@]}"; do
			read -r mode round <<<"$run"
			tag=$(tag_of "$mode")$round
			echo "| kop-$svc | $mode | $round | ${READY_MS[$tag.$svc]} | $(mib "${RSS_IDLE[$tag.$svc]}") | $(mib "${RSS_LOAD[$tag.$svc]}") |"
		done
		for mode in "${MODES[@]}"; do
			t=high-$(tag_of "$mode")
			echo "| kop-$svc | $mode, max_in_flight $HIGH_MAX_IN_FLIGHT, $HIGH_RATE/s | | ${READY_MS[$t.$svc]} | $(mib "${RSS_IDLE[$t.$svc]}") | $(mib "${RSS_LOAD[$t.$svc]}") |"
		done
	done
	echo
	echo "### Comparison point: the Node.js seed (not measured)"
	echo
	echo "The Node.js original handled one order at a time in each service, with sleeps of 500, 1000 and 800 ms in its three consuming services: by design about 1 order/s end to end (the slowest stage) and at least 2.3 s per order. This is the seed's documented design, not a measurement; (s) runs kop with the same sleeps."
	echo
	echo -n "Timings: builds $BUILD_S s; broker start $BROKER_S s; warm-up ${RUN_S[warm-up]} s; raw ${RUN_S[raw]} s; drain ${RUN_S[drain]} s"
	for run in "${RUNS[@]}"; do
		read -r mode round <<<"$run"
		echo -n "; $mode #$round ${RUN_S[$(tag_of "$mode")$round]} s"
	done
	echo "; seed delays ${RUN_S[seed]} s; bench total $BENCH_S s, with builds $((SECONDS - T_START)) s."
} >"$OUT/results.md"

cat "$OUT/results.md"
