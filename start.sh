#!/usr/bin/env bash
# Runs the whole platform on this machine with one command:
#   - a local single-node Kafka (cargo xtask kafka, jars fetched with Maven), unless
#     KAFKA_BROKERS names a broker to use;
#   - the four daemons, built in release mode, configured from etc/kop/ (environment
#     variables override, as in production);
# prints the URLs, and on Ctrl-C stops everything it started (a broker it did not start
# is left alone). A second run reuses the broker's data in .kafka/.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$ROOT"
RUN_DIR=${KOP_RUN_DIR:-$ROOT/.run}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
mkdir -p "$RUN_DIR"

say() { printf 'start.sh: %s\n' "$*" >&2; }

command -v cargo >/dev/null || { say "cargo not found: install Rust first (https://rustup.rs)"; exit 1; }

STARTED_BROKER=0
PIDS=()

# shellcheck disable=SC2317,SC2329 # called by the EXIT trap
stop_all() {
	trap - EXIT INT TERM
	say "stopping"
	local pid
	for pid in "${PIDS[@]}"; do
		kill -TERM "$pid" 2>/dev/null || true
	done
	for pid in "${PIDS[@]}"; do
		wait "$pid" 2>/dev/null || true
	done
	if ((STARTED_BROKER)); then
		cargo xtask kafka stop || true
	fi
	say "stopped"
}
trap stop_all EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

say "building the daemons (release)"
cargo build --release --bins

if [[ -z ${KAFKA_BROKERS:-} ]]; then
	say "starting a local Kafka broker (cargo xtask kafka; first run fetches it with Maven)"
	KAFKA_BROKERS=$(cargo xtask kafka start | tail -n 1)
	STARTED_BROKER=1
else
	say "using the Kafka broker at $KAFKA_BROKERS"
fi
export KAFKA_BROKERS

for service in order payment inventory notification; do
	log="$RUN_DIR/kop-$service.log"
	# One METRICS_PORT for four processes would collide: each keeps its own default here.
	env -u METRICS_PORT "$TARGET_DIR/release/kop-$service" --config "$ROOT/etc/kop/$service.toml" >"$log" 2>&1 &
	PIDS+=($!)
done

# Each daemon is ready when its /readyz says so (it waits for Kafka and its topics).
declare -A METRICS_PORT=([order]=9100 [payment]=9104 [inventory]=9102 [notification]=9103)
index=0
for service in order payment inventory notification; do
	port=${METRICS_PORT[$service]}
	pid=${PIDS[$index]}
	index=$((index + 1))
	for _ in $(seq 1 600); do
		if curl -sf "http://127.0.0.1:$port/readyz" >/dev/null 2>&1; then
			break
		fi
		# Our own daemon must be alive: an answer on the port could come from another one.
		if ! kill -0 "$pid" 2>/dev/null; then
			say "kop-$service exited; see $RUN_DIR/kop-$service.log"
			exit 1
		fi
		sleep 0.1
	done
	curl -sf "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 ||
		{ say "kop-$service not ready after 60 s; see $RUN_DIR/kop-$service.log"; exit 1; }
done

DAEMON_PIDS=("${PIDS[@]}")

# Prometheus with the repository's alert rules, when it is installed (Debian: prometheus).
PROMETHEUS_LINE="not started: no prometheus binary (Debian package prometheus; or docker compose / nix run .#platform)"
if command -v prometheus >/dev/null; then
	mkdir -p "$RUN_DIR/prometheus"
	cp "$ROOT/docker/prometheus/alerts.yml" "$RUN_DIR/alerts.yml"
	cat >"$RUN_DIR/prometheus.yml" <<PROM
# Written by start.sh: the compose stack's scrape configuration, for this machine.
global:
  scrape_interval: 5s
  evaluation_interval: 5s
rule_files: [alerts.yml]
scrape_configs:
  - job_name: prometheus
    static_configs: [{targets: ["127.0.0.1:9090"]}]
  - job_name: kop
    static_configs:
      - targets: ["127.0.0.1:9100", "127.0.0.1:9104", "127.0.0.1:9102", "127.0.0.1:9103"]
PROM
	prometheus --config.file="$RUN_DIR/prometheus.yml" --storage.tsdb.path="$RUN_DIR/prometheus" \
		--web.listen-address=127.0.0.1:9090 >"$RUN_DIR/prometheus.log" 2>&1 &
	PIDS+=($!)
	PROMETHEUS_LINE="http://localhost:9090 (alerts under /alerts; log $RUN_DIR/prometheus.log)"
fi

cat <<EOF

kop is running (Ctrl-C stops everything started here)
  Kafka            $KAFKA_BROKERS
  Order API        POST http://localhost:${PORT:-4000}/order
  Metrics          order :9100  payment :9104  inventory :9102  notification :9103  (/metrics /healthz /readyz)
  Logs             $RUN_DIR/kop-*.log

  curl -X POST http://localhost:${PORT:-4000}/order -H 'Content-Type: application/json' -d '{"orderId":"o1","amount":42}'

  Prometheus       $PROMETHEUS_LINE
  Grafana          not started: not packaged for Debian; docker compose or nix run .#platform run it
  Kafka exporter   not started: not packaged for Debian; kop's own kafka_consumer_lag covers the lag
EOF

# Stay in the foreground until a daemon stops or Ctrl-C.
wait -n "${DAEMON_PIDS[@]}" || true
say "a daemon exited; see $RUN_DIR/"
exit 1
