#!/usr/bin/env bash
# kop benchmarks: one run, one broker, release binaries. See bench/README.md.
#
#   (a) raw produce → consume throughput of the broker (bench/raw.rs, librdkafka)
#   (b) end-to-end pipeline orders/s at max rate, exactly-once and at-least-once: with
#       kop-load --max-rate, and with a burst of orders all due at once (64 in flight)
#   (c) end-to-end latency at fixed rates (1,000 and 5,000 orders/s by default)
#   (d) RSS of each daemon idle and under load, start → READY time
#
# and prints a markdown table with every figure (also written to $BENCH_OUT/results.md).
# Exits non-zero if anything fails: a build, the broker, a daemon, an order that did not
# arrive, an answer other than 202, a duplicate in exactly-once mode.
#
# Environment (all optional):
#   KAFKA_BROKERS        use this broker instead of starting one (scripts/kafka.sh, temp dir)
#   BENCH_OUT            directory for logs and JSON reports (default: a new /tmp/kop-bench.*)
#   BENCH_RAW_RECORDS    records of the raw benchmark (default 300000)
#   BENCH_RAW_SIZE       value size in bytes of the raw benchmark (default 100)
#   BENCH_RAW_TXN_RECORDS  records of the transactional raw run (default 100000)
#   BENCH_MAX_DURATION   duration of each max-rate run (default 30s)
#   BENCH_MAX_CONCURRENCY  clients of the max-rate and burst runs (default 64)
#   BENCH_BURST_SECONDS  size of the burst: this many seconds at the rate the highest fixed
#                        rate achieved (default 30)
#   BENCH_FIXED_DURATION duration of each fixed-rate run (default 20s)
#   BENCH_RATES          the fixed rates (default "1000 5000")
#   BENCH_MODES          processing guarantees (default "exactly-once at-least-once")
#   BENCH_NO_BUILD=1     use the binaries in target/release as they are
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

RAW_RECORDS=${BENCH_RAW_RECORDS:-300000}
RAW_SIZE=${BENCH_RAW_SIZE:-100}
RAW_TXN_RECORDS=${BENCH_RAW_TXN_RECORDS:-100000}
MAX_DURATION=${BENCH_MAX_DURATION:-30s}
MAX_CONCURRENCY=${BENCH_MAX_CONCURRENCY:-64}
BURST_SECONDS=${BENCH_BURST_SECONDS:-30}
FIXED_DURATION=${BENCH_FIXED_DURATION:-20s}
read -r -a RATES <<<"${BENCH_RATES:-1000 5000}"
read -r -a MODES <<<"${BENCH_MODES:-exactly-once at-least-once}"
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
for tool in cargo jq curl awk; do
	command -v "$tool" >/dev/null || die "$tool not found"
done

OUT=${BENCH_OUT:-$(mktemp -d /tmp/kop-bench.XXXXXX)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
RUN_ID=$(date +%H%M%S)-$RANDOM
T_START=$SECONDS

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
		KOP_KAFKA_STATE=$OUT/kafka "$ROOT/scripts/kafka.sh" reset >>"$OUT/kafka.sh.log" 2>&1 ||
			say "could not stop the broker; see $OUT/kafka.sh.log"
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

# User + system CPU time of a process, in clock ticks.
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

# Sets CHILD_CPU_MS: CPU time (ms, user + system) of this shell's waited-for children.
# Call it directly, not in $(...): `times` must run in this shell, not in a fork.
children_cpu_ms() {
	times >"$OUT/.times"
	# The second line: "1m2.345s 0m6.789s".
	CHILD_CPU_MS=$(awk 'NR == 2 { split($0, t, /[ ms]+/); printf "%d", 1000 * (t[1] * 60 + t[2] + t[3] * 60 + t[4]) }' "$OUT/.times")
}

# Formats a JSON number from a report: f FILE JQ-PATH DECIMALS
f() { printf "%.${3}f" "$(jq -r "$2 // 0" "$1")"; }

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
	say "building release binaries (cargo build --release --bins; cargo bench --bench raw --no-run)"
	cargo build --release --bins >&2
	RAW_BIN=$(cargo bench --bench raw --no-run --message-format=json |
		jq -r 'select(.reason == "compiler-artifact" and .target.name == "raw" and .executable != null) | .executable' |
		tail -n 1)
else
	# The newest build of the benchmark.
	RAW_BIN=$(find "$ROOT/target/release/deps" -maxdepth 1 -type f -name 'raw-*' -perm -u+x -printf '%T@ %p\n' |
		sort -n | tail -n 1 | cut -d ' ' -f 2-)
fi
[[ -x $RAW_BIN ]] || die "no raw benchmark executable (cargo bench --bench raw --no-run)"
for svc in "${SERVICES[@]}" load; do
	[[ -x $ROOT/target/release/kop-$svc ]] || die "target/release/kop-$svc missing"
done
BUILD_S=$((SECONDS - T_BUILD))

# ---------------------------------------------------------------------------
# the broker

UPTIME_BEFORE=$(uptime)
T_BENCH=$SECONDS
if [[ -z ${KAFKA_BROKERS:-} ]]; then
	say "starting a Kafka broker (scripts/kafka.sh, state in $OUT/kafka)"
	STARTED_BROKER=1
	KAFKA_BROKERS=$(KOP_KAFKA_STATE=$OUT/kafka "$ROOT/scripts/kafka.sh" start --port 0 2>>"$OUT/kafka.sh.log" | tail -n 1) ||
		die "the broker did not start; see $OUT/kafka.sh.log"
	# For its CPU time; left out if the state directory's layout is not the one expected.
	BROKER_PID=$(cat "$OUT/kafka/kafka.pid" 2>/dev/null || true)
	[[ $BROKER_PID =~ ^[0-9]+$ ]] || BROKER_PID=
	BROKER_DESC="Kafka $(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' scripts/kafka/pom.xml), single node (KRaft), same machine, started by this script"
else
	BROKER_DESC="the broker at $KAFKA_BROKERS (KAFKA_BROKERS)"
fi
say "broker at $KAFKA_BROKERS"

# ---------------------------------------------------------------------------
# (a) raw produce → consume

say "(a) raw produce → consume: $RAW_RECORDS records of $RAW_SIZE bytes"
run_child "$OUT/raw.json" "$OUT/raw.log" \
	"$RAW_BIN" --bench --brokers "$KAFKA_BROKERS" --topic "bench.$RUN_ID.raw" \
	--records "$RAW_RECORDS" --size "$RAW_SIZE" --json ||
	{
		cat "$OUT/raw.log" >&2
		die "raw benchmark"
	}
RAW_RATE=$(jq -r '.combined.rate' "$OUT/raw.json")
say "    combined $(f "$OUT/raw.json" .combined.rate 0) records/s"
say "(a') the same with transactions of 500 records: $RAW_TXN_RECORDS records"
run_child "$OUT/raw-txn.json" "$OUT/raw-txn.log" \
	"$RAW_BIN" --bench --brokers "$KAFKA_BROKERS" --topic "bench.$RUN_ID.raw-txn" --transactional \
	--records "$RAW_TXN_RECORDS" --size "$RAW_SIZE" --json ||
	{
		cat "$OUT/raw-txn.log" >&2
		die "raw benchmark (transactional)"
	}
say "    combined $(f "$OUT/raw-txn.json" .combined.rate 0) records/s"
RAW_S=$((SECONDS - T_BENCH))

# ---------------------------------------------------------------------------
# the pipeline, per processing guarantee

# Starts the four daemons with fresh topics, groups and service names; records the time from
# process start to /readyz 200 and the idle RSS.
start_pipeline() {
	local mode=$1 tag=$2 svc port t0 i
	local prefix="bench.$RUN_ID.$tag"
	API_PORT=$(pick_port)
	E2E_TOPIC=$prefix.inventory.reserved
	declare -gA MPORT=()
	for svc in "${SERVICES[@]}"; do
		MPORT[$svc]=$(pick_port)
	done
	for svc in "${SERVICES[@]}"; do
		t0=$(now_ms)
		env -u SIMULATE_FAILURE_RATE -u SIMULATE_DELAY_MS -u MAX_PROCESSING_ATTEMPTS \
			-u RETRY_DELAYS_MS -u KOP_INSTANCE_ID -u LOG_FORMAT -u NOTIFY_SOCKET -u WATCHDOG_USEC \
			-u ORDER_RETRY_TOPIC -u ORDER_DLQ_TOPIC -u PAYMENT_RETRY_TOPIC -u PAYMENT_DLQ_TOPIC \
			-u INVENTORY_RETRY_TOPIC -u INVENTORY_DLQ_TOPIC \
			KAFKA_BROKERS="$KAFKA_BROKERS" \
			PROCESSING_GUARANTEE="$mode" \
			LOG_LEVEL=warn \
			ORDER_TOPIC="$prefix.orders.created" \
			PAYMENT_COMPLETED_TOPIC="$prefix.payments.completed" \
			INVENTORY_RESERVED_TOPIC="$E2E_TOPIC" \
			SERVICE_NAME="bench-$RUN_ID-$tag-$svc" \
			PAYMENT_GROUP_ID="bench-$RUN_ID-$tag-payment" \
			INVENTORY_GROUP_ID="bench-$RUN_ID-$tag-inventory" \
			NOTIFICATION_GROUP_ID="bench-$RUN_ID-$tag-notification" \
			PORT="$API_PORT" \
			METRICS_PORT="${MPORT[$svc]}" \
			"$ROOT/target/release/kop-$svc" --config "$ROOT/etc/kop/$svc.toml" \
			>"$OUT/$tag-kop-$svc.log" 2>&1 &
		PID[$svc]=$!
		# Probe every 10 ms until ready (60 s at most).
		for ((i = 0; ; i++)); do
			ready_once "${MPORT[$svc]}" && break
			kill -0 "${PID[$svc]}" 2>/dev/null || {
				tail -n 20 "$OUT/$tag-kop-$svc.log" >&2
				die "kop-$svc ($mode) exited during start"
			}
			(($(now_ms) - t0 < 60000)) || die "kop-$svc ($mode) not ready after 60 s"
			sleep 0.01
		done
		READY_MS[$tag.$svc]=$(($(now_ms) - t0))
		say "    kop-$svc ready after ${READY_MS[$tag.$svc]} ms"
	done
	sleep 2
	for svc in "${SERVICES[@]}"; do
		RSS_IDLE[$tag.$svc]=$(rss_kb "${PID[$svc]}")
	done
}

check_alive() {
	local svc
	for svc in "${SERVICES[@]}"; do
		kill -0 "${PID[$svc]}" 2>/dev/null || die "kop-$svc exited; see $OUT/*-kop-$svc.log"
	done
}

# Records the peak RSS of each daemon while load runs (every 250 ms) into $OUT/rss-<tag>.
start_sampler() {
	local tag=$1
	(
		while :; do
			for svc in "${SERVICES[@]}"; do
				echo "$svc $(rss_kb "${PID[$svc]}")"
			done
			sleep 0.25
		done
	) >>"$OUT/rss-$tag" &
	SAMPLER_PID=$!
}

# "sum count" of a stage's kop_end_to_end_latency_seconds (acceptance → handled there).
stage_latency() {
	{ curl -sf --max-time 5 "http://127.0.0.1:$1/metrics" || true; } |
		awk '$1 ~ /^kop_end_to_end_latency_seconds_sum/ { s = $NF }
			$1 ~ /^kop_end_to_end_latency_seconds_count/ { c = $NF }
			END { print s + 0, c + 0 }'
}

# Runs kop-load; checks that every accepted order arrived, all answers were 202 and, in
# exactly-once mode, that nothing arrived twice.
load() {
	local name=$1 mode=$2 svc
	shift 2
	declare -A before=()
	for svc in "${STAGES[@]}"; do
		before[$svc]=$(stage_latency "${MPORT[$svc]}")
	done
	children_cpu_ms
	local cpu_before=$CHILD_CPU_MS
	run_child "$OUT/$name.json" "$OUT/$name.log" \
		"$ROOT/target/release/kop-load" --url "http://127.0.0.1:$API_PORT/order" --e2e \
		--e2e-topic "$E2E_TOPIC" --brokers "$KAFKA_BROKERS" --json "$@" ||
		{
			cat "$OUT/$name.log" >&2
			die "kop-load $*"
		}
	children_cpu_ms
	LOAD_CPU_MS=$((CHILD_CPU_MS - cpu_before))
	# Mean time from acceptance to handling by each stage, during this run only.
	local s0 c0 s1 c1
	for svc in "${STAGES[@]}"; do
		read -r s0 c0 <<<"${before[$svc]}"
		read -r s1 c1 < <(stage_latency "${MPORT[$svc]}")
		HOP_MS[$name.$svc]=$(awk -v s="$s1" -v t="$s0" -v c="$c1" -v d="$c0" \
			'BEGIN { if (c > d) printf "%.0f", 1000 * (s - t) / (c - d); else print "n/a" }')
	done
	local accepted arrived dups other
	accepted=$(jq -r '.e2e.accepted' "$OUT/$name.json")
	arrived=$(jq -r '.e2e.arrived' "$OUT/$name.json")
	dups=$(jq -r '.e2e.duplicates' "$OUT/$name.json")
	other=$(jq -r '[.status | to_entries[] | select(.key != "202") | .value] | add // 0' "$OUT/$name.json")
	say "    $name: $(f "$OUT/$name.json" .achieved_rps 0) answered/s, e2e $(f "$OUT/$name.json" .e2e.throughput 0)/s, $arrived/$accepted arrived, $dups duplicates, e2e p99 $(f "$OUT/$name.json" .e2e.latency_ms.p99 1) ms"
	((accepted > 0)) || die "$name: no order accepted"
	((arrived == accepted)) || die "$name: only $arrived of $accepted accepted orders arrived in $E2E_TOPIC"
	((other == 0)) || die "$name: $other answers other than 202: $(jq -c .status "$OUT/$name.json")"
	if [[ $mode == exactly-once ]] && ((dups > 0)); then
		die "$name: $dups duplicates in exactly-once mode"
	fi
	check_alive
}

declare -A READY_MS=() RSS_IDLE=() RSS_LOAD=() CPU_PCT=() MODE_S=() HOP_MS=()
BROKER_CPU=()
MACHINE_BUSY=()
for mode in "${MODES[@]}"; do
	tag=$(tag_of "$mode")
	T_MODE=$SECONDS
	say "$mode: starting the daemons (fresh topics bench.$RUN_ID.$tag.*)"
	start_pipeline "$mode" "$tag"
	start_sampler "$tag"

	# Warm-up, not reported: consumer groups settle, connections and caches are made.
	say "    warm-up: 200 orders/s for 3 s"
	load "$tag-warmup" "$mode" --rps 200 --duration 3s --concurrency 16

	# (c) latency at fixed rates, on an idle pipeline.
	for rate in "${RATES[@]}"; do
		say "(c) $mode: $rate orders/s for $FIXED_DURATION"
		load "$tag-rps$rate" "$mode" --rps "$rate" --duration "$FIXED_DURATION" --concurrency 256
	done

	# (b) max rate, as kop-load --max-rate measures it.
	say "(b) $mode: max rate, $MAX_CONCURRENCY clients, $MAX_DURATION"
	load "$tag-max" "$mode" --max-rate --concurrency "$MAX_CONCURRENCY" --duration "$MAX_DURATION" --drain 120s

	# (b') a burst: N orders all due at t=0, so the open-loop sender never waits and
	# $MAX_CONCURRENCY requests are always in flight — a max rate without --max-rate's
	# timer (see bench/README.md). N: $BURST_SECONDS s at what the highest fixed rate
	# achieved. CPU of every process (and of the whole machine) during it.
	burst=$(jq -r --argjson s "$BURST_SECONDS" '[.achieved_rps * $s, 10000] | max | floor' "$OUT/$tag-rps${RATES[-1]}.json")
	say "(b') $mode: burst of $burst orders, $MAX_CONCURRENCY in flight"
	declare -A cpu0=()
	for svc in "${SERVICES[@]}"; do
		cpu0[$svc]=$(cpu_ticks "${PID[$svc]}")
	done
	[[ -n $BROKER_PID ]] && cpu0[broker]=$(cpu_ticks "$BROKER_PID")
	read -r busy0 total0 < <(machine_ticks)
	t0=$(now_ms)
	load "$tag-burst" "$mode" --rps 1000000 --duration "$(awk -v n="$burst" 'BEGIN { printf "%.6f", n / 1e6 }')" \
		--concurrency "$MAX_CONCURRENCY" --drain 120s
	wall=$(($(now_ms) - t0))
	CPU_PCT[$tag.load]=$((LOAD_CPU_MS * 100 / wall))
	read -r busy1 total1 < <(machine_ticks)
	for svc in "${SERVICES[@]}"; do
		CPU_PCT[$tag.$svc]=$(((($(cpu_ticks "${PID[$svc]}") - cpu0[$svc]) * 100000 / HZ) / wall))
	done
	if [[ -n $BROKER_PID ]]; then
		BROKER_CPU+=("$mode $(((($(cpu_ticks "$BROKER_PID") - cpu0[broker]) * 100000 / HZ) / wall)) %")
	fi
	MACHINE_BUSY+=("$mode $(((busy1 - busy0) * 100 / (total1 - total0))) %")

	stop_sampler
	for svc in "${SERVICES[@]}"; do
		RSS_LOAD[$tag.$svc]=$(awk -v s="$svc" '$1 == s && $2 > m { m = $2 } END { print m + 0 }' "$OUT/rss-$tag")
	done
	say "$mode: stopping the daemons"
	stop_daemons
	MODE_S[$tag]=$((SECONDS - T_MODE))
done
BENCH_S=$((SECONDS - T_BENCH))
UPTIME_AFTER=$(uptime)

# ---------------------------------------------------------------------------
# the table

# Joins its arguments with ", ".
join() {
	local IFS=, all
	all="$*"
	echo "${all//,/, }"
}
run_name() {
	case $1 in
	rps*) echo "${1#rps}/s" ;;
	max) echo max-rate ;;
	*) echo "$1" ;;
	esac
}
mib() { awk -v kb="$1" 'BEGIN { printf "%.1f", kb / 1024 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.1f %%", 100 * a / b; else print "n/a" }'; }

{
	echo "## kop benchmark, $(date -u '+%Y-%m-%d %H:%M UTC')"
	echo
	echo "Machine: $(nproc) cores ($(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)), $(free -h | awk '/^Mem:/ { print $2 }') RAM, Linux $(uname -r)."
	echo "Broker: $BROKER_DESC."
	echo "Load before: \`${UPTIME_BEFORE#*load average: }\`; after: \`${UPTIME_AFTER#*load average: }\` (1, 5, 15 min)."
	echo "Machine CPU busy during the burst runs (all processes, ours and everybody's, 100 % = all $(nproc) cores): $(join "${MACHINE_BUSY[@]}")."
	echo
	echo "### (a) raw broker throughput (bench/raw.rs)"
	echo
	echo "Records of $(f "$OUT/raw.json" .value_bytes 0) bytes (key: a unique id) to a new topic of 3 partitions; producer acks=all, idempotent, linger.ms 5; a read_committed consumer reading at the same time. The transactional row commits every 500 records, as an exactly-once stage does per batch (its ceiling for one hop)."
	echo
	echo "| producer | records | produce | consume | combined produce → consume |"
	echo "|---|---:|---:|---:|---:|"
	echo "| idempotent | $(f "$OUT/raw.json" .records 0) | $(f "$OUT/raw.json" .produce.rate 0) rec/s | $(f "$OUT/raw.json" .consume.rate 0) rec/s | **$(f "$OUT/raw.json" .combined.rate 0) rec/s** (a) |"
	echo "| transactional, 500 records per transaction | $(f "$OUT/raw-txn.json" .records 0) | $(f "$OUT/raw-txn.json" .produce.rate 0) rec/s | $(f "$OUT/raw-txn.json" .consume.rate 0) rec/s | $(f "$OUT/raw-txn.json" .combined.rate 0) rec/s |"
	echo
	echo "### (b) pipeline at max rate, $MAX_CONCURRENCY requests in flight"
	echo
	echo "max-rate: \`kop-load --max-rate --concurrency $MAX_CONCURRENCY --duration $MAX_DURATION --e2e\`. burst: \`kop-load --rps 1000000 --duration N/10⁶ --concurrency $MAX_CONCURRENCY --e2e\`, N orders all due at once (N = $BURST_SECONDS s at the rate of the ${RATES[-1]}/s run). End to end orders/s: arrivals in the last topic per second, first to last arrival. (b)/(a): end to end orders/s over the raw combined rate (a)."
	echo
	echo "| mode | run | orders | API answered/s | **end to end orders/s** | (b)/(a) | API p50 / p99 ms | e2e p50 / p99 / p99.9 ms | arrived |"
	echo "|---|---|---:|---:|---:|---:|---:|---:|---:|"
	for mode in "${MODES[@]}"; do
		tag=$(tag_of "$mode")
		for run in max burst; do
			r=$OUT/$tag-$run.json
			if [[ $run == max ]]; then
				api="$(f "$r" .latency_ms.p50 1) / $(f "$r" .latency_ms.p99 1)"
			else
				api="– (counted from t=0)"
			fi
			echo "| $mode | ${run/max/max-rate} | $(jq -r .sent "$r") | $(f "$r" .achieved_rps 0) | **$(f "$r" .e2e.throughput 0)** | $(ratio "$(jq -r .e2e.throughput "$r")" "$RAW_RATE") | $api | $(f "$r" .e2e.latency_ms.p50 0) / $(f "$r" .e2e.latency_ms.p99 0) / $(f "$r" .e2e.latency_ms.p999 0) | $(jq -r .e2e.arrived "$r") / $(jq -r .e2e.accepted "$r") |"
		done
	done
	echo
	echo "### (c) latency at fixed rates (kop-load --rps R --concurrency 256 --e2e, $FIXED_DURATION, open loop)"
	echo
	echo "| mode | target/s | achieved/s | e2e orders/s | API p50 / p99 / p99.9 ms | **e2e p50 / p99 / p99.9 ms** | e2e max ms |"
	echo "|---|---:|---:|---:|---:|---:|---:|"
	for mode in "${MODES[@]}"; do
		tag=$(tag_of "$mode")
		for rate in "${RATES[@]}"; do
			r=$OUT/$tag-rps$rate.json
			echo "| $mode | $rate | $(f "$r" .achieved_rps 0) | $(f "$r" .e2e.throughput 0) | $(f "$r" .latency_ms.p50 1) / $(f "$r" .latency_ms.p99 1) / $(f "$r" .latency_ms.p999 1) | **$(f "$r" .e2e.latency_ms.p50 0) / $(f "$r" .e2e.latency_ms.p99 0) / $(f "$r" .e2e.latency_ms.p999 0)** | $(f "$r" .e2e.latency_ms.max 0) |"
		done
	done
	echo
	echo "### Where the time goes: mean ms from acceptance by the API to handling by each stage"
	echo
	echo "From each stage's \`kop_end_to_end_latency_seconds\` (sum / count over the run). A stage handles a record as soon as it is read; the next stage sees the output only once the batch is committed (exactly-once) or acknowledged (at-least-once)."
	echo
	echo "| mode | run | → kop-payment | → kop-inventory | → kop-notification | e2e p50 (kop-load) |"
	echo "|---|---|---:|---:|---:|---:|"
	for mode in "${MODES[@]}"; do
		tag=$(tag_of "$mode")
		for run in "${RATES[@]/#/rps}" max burst; do
			echo "| $mode | $(run_name "$run") | ${HOP_MS[$tag-$run.payment]} | ${HOP_MS[$tag-$run.inventory]} | ${HOP_MS[$tag-$run.notification]} | $(f "$OUT/$tag-$run.json" .e2e.latency_ms.p50 0) |"
		done
	done
	echo
	echo "### (d) daemons: start → READY, memory, CPU"
	echo
	echo "Start → READY: process start to the first \`/readyz\` 200 (probed every 10 ms), daemons started one after the other, fresh topics (created at start). RSS: VmRSS after 2 s idle, and the peak while load ran (sampled every 250 ms). CPU: user + system time during the burst run / its wall time (100 % = one core)."
	echo
	echo "| daemon | mode | start → READY ms | RSS idle MiB | RSS peak under load MiB | CPU in the burst |"
	echo "|---|---|---:|---:|---:|---:|"
	for svc in "${SERVICES[@]}"; do
		for mode in "${MODES[@]}"; do
			tag=$(tag_of "$mode")
			echo "| kop-$svc | $mode | ${READY_MS[$tag.$svc]} | $(mib "${RSS_IDLE[$tag.$svc]}") | $(mib "${RSS_LOAD[$tag.$svc]}") | ${CPU_PCT[$tag.$svc]} % |"
		done
	done
	for mode in "${MODES[@]}"; do
		echo "| kop-load | $mode | | | | ${CPU_PCT[$(tag_of "$mode").load]} % |"
	done
	if ((${#BROKER_CPU[@]})); then
		echo
		echo "Broker (JVM) CPU during the burst runs: $(join "${BROKER_CPU[@]}")."
	fi
	echo
	echo "### Comparison point: the Node.js seed (not measured)"
	echo
	echo "The Node.js original handled one order at a time in each service, with sleeps of 500, 1000 and 800 ms in its three consuming services: by design about 1 order/s end to end (the slowest stage) and at least 2.3 s per order. This is the seed's documented design, not a measurement."
	echo
	echo -n "Timings: builds $BUILD_S s; broker start and raw $RAW_S s"
	for mode in "${MODES[@]}"; do
		echo -n "; $mode ${MODE_S[$(tag_of "$mode")]} s"
	done
	echo "; bench total $BENCH_S s, with builds $((SECONDS - T_START)) s."
} >"$OUT/results.md"

cat "$OUT/results.md"
