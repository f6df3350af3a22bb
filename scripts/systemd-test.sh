#!/usr/bin/env bash
# The systemd units of systemd/ under a REAL systemd: a Debian bookworm container booted
# with systemd-nspawn, the release binaries, units and configuration installed in it the
# way a package would, the daemons talking to the test broker on the host's loopback.
# The container's tree is debootstrapped once and cached (KOP_NSPAWN_CACHE); each run
# boots an overlay on it (or a copy), thrown away at the end, so every run starts clean.
#
# What it checks:
#   - systemd-analyze verify prints nothing; systemd-analyze security rates each unit
#     at most 2.0 (MAX_EXPOSURE);
#   - kop.target, enabled, starts the four daemons at boot; "systemctl stop kop.target"
#     stops them all, each exiting 0 by itself after its drain (not killed by the signal);
#     "systemctl start kop.target" returns once all four are active (Type=notify: they
#     sent READY=1); each answers /readyz on its metrics port;
#   - orders posted to the API on the host reach the last topic, each exactly once;
#     "journalctl -u kop-payment ORDER_ID=<id>" finds an order once the level is raised
#     to debug at run time (systemctl reload);
#   - "systemctl reload" (SIGHUP) re-reads the configuration;
#   - kop-payment killed with SIGKILL is restarted by systemd (NRestarts grows), and the
#     orders posted while it was down and after it came back all arrive;
#   - a stalled processing loop ([simulate] stall = true in inventory.toml) is killed by
#     the watchdog and restarted; with the file restored, the pipeline flows again;
#   - a configuration error: the daemon exits 78 and is not restarted;
#   - kop-payment@1 and kop-payment@2 (the template, kop-payment masked) share the
#     partitions of orders.created: each holds some, together all, each under its own
#     transactional id (<host>-<instance>) and metrics port; orders posted then reach the
#     last topic exactly once; kop.target stops (drained) and starts them with the others.
#
# Needs root, debootstrap, systemd-nspawn (Debian package systemd-container), nsenter,
# kcat, curl, cargo, and a Kafka broker in KOP_TEST_BROKERS reachable on the host's network
# (the container shares it: 127.0.0.1 is the host's loopback). It fails, never skips,
# when any of that is missing. Run "scripts/systemd-test.sh --help" for the options.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

SERVICES=(order payment inventory notification)
UNITS=(kop-order kop-payment kop-inventory kop-notification)
# systemd-analyze security: the highest overall exposure a unit may have.
MAX_EXPOSURE=2.0
# Packages of the container beyond debootstrap's minbase. procps: /bin/kill (ExecReload).
TREE_PACKAGES=systemd,systemd-sysv,dbus,procps,curl,ca-certificates,libssl3,zlib1g
# Changing what goes into the tree changes this, and the cached tree is rebuilt.
TREE_ID="debian bookworm minbase +$TREE_PACKAGES, tree v1"
CACHE=${KOP_NSPAWN_CACHE:-$HOME/.cache/kop/nspawn-bookworm}
WORK_BASE=${KOP_NSPAWN_WORKDIR:-/var/tmp}

usage() {
	cat <<'EOF'
Usage: KOP_TEST_BROKERS=host:port scripts/systemd-test.sh

Boots a Debian bookworm container under systemd-nspawn (sharing the host's network),
installs the kop release binaries, the units of systemd/ and etc/kop/*.toml in it, and
tests the units under its systemd against the broker. Run as root. Exit status 0 when
every check passed.

Environment:
  KOP_TEST_BROKERS    the Kafka broker (required), reachable from the host, e.g.
                      127.0.0.1:9092
  KOP_NSPAWN_CACHE    where the debootstrapped tree is cached
                      (default ~/.cache/kop/nspawn-bookworm); delete it to rebuild
  KOP_NSPAWN_WORKDIR  where each run's copy of the tree goes (default /var/tmp)
  KOP_DEBIAN_MIRROR   Debian mirror for debootstrap (default: the host's apt source
                      for bookworm, else http://deb.debian.org/debian)
  CARGO               cargo to build with (default: cargo on PATH)
EOF
}

log() { printf 'systemd-test.sh [%3ds]: %s\n' "$SECONDS" "$*" >&2; }
die() {
	printf 'systemd-test.sh [%3ds]: FAILED: %s\n' "$SECONDS" "$*" >&2
	exit 1
}

# ---------------------------------------------------------------------------
# clean-up: whatever happens, the container is powered off and the run's copy deleted

RUN_DIR=        # this run's directory: the container's root and its console log
NSPAWN_PID=     # systemd-nspawn, in the background
LEADER=         # the container's PID 1 (systemd), as the host sees it
BUILD_TMP=      # a tree being debootstrapped

# Runs a command inside the container: all of its namespaces, a clean environment.
in_container() {
	nsenter -t "$LEADER" -a env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
		LANG=C.UTF-8 TERM=dumb SYSTEMD_PAGER= SYSTEMD_COLORS=0 "$@"
}

container_running() {
	[[ -n $NSPAWN_PID ]] && kill -0 "$NSPAWN_PID" 2>/dev/null
}

dump_diagnostics() {
	if container_running && [[ -n $LEADER ]]; then
		log "--- systemctl status kop.target kop-*.service (in the container)"
		in_container systemctl status --no-pager -n 0 kop.target "${UNITS[@]}" 'kop-payment@*' >&2 || true
		log "--- journal of the kop units (last 150 lines)"
		in_container journalctl --no-pager -n 150 -u 'kop*' >&2 || true
	fi
	if [[ -n $RUN_DIR && -f $RUN_DIR/console.log ]]; then
		log "--- container console (last 40 lines)"
		tail -n 40 "$RUN_DIR/console.log" >&2 || true
	fi
}

stop_container() {
	container_running || return 0
	# systemd-nspawn turns SIGTERM into an orderly poweroff of the container.
	log "powering the container off"
	kill -TERM "$NSPAWN_PID" 2>/dev/null || true
	local i
	for ((i = 0; i < 60; i++)); do
		container_running || break
		sleep 0.5
	done
	if container_running; then
		log "the container did not power off within 30 s; killing it"
		# Killing PID 1 of the container's PID namespace kills everything in it. The
		# leader is still nspawn's child, so the PID is still the container's.
		if [[ -n $LEADER ]] && [[ $(ps -o ppid= -p "$LEADER" 2>/dev/null | tr -d ' ') == "$NSPAWN_PID" ]]; then
			kill -KILL "$LEADER" 2>/dev/null || true
		fi
		kill -KILL "$NSPAWN_PID" 2>/dev/null || true
	fi
	wait "$NSPAWN_PID" 2>/dev/null || true
}

on_exit() {
	local rc=$?
	trap - EXIT INT TERM
	((rc == 0)) || dump_diagnostics
	stop_container
	if [[ -n $RUN_DIR && -d $RUN_DIR ]]; then
		if mountpoint -q "$RUN_DIR/root"; then
			umount "$RUN_DIR/root" || umount -l "$RUN_DIR/root" || true
		fi
		# --one-file-system: never through a root still mounted over the cached tree.
		rm -rf --one-file-system "$RUN_DIR"
	fi
	if [[ -n $BUILD_TMP ]]; then
		# An interrupted debootstrap can leave /proc or /sys mounted in the tree.
		awk -v dir="$BUILD_TMP/" 'index($5, dir) == 1 { print $5 }' /proc/self/mountinfo |
			sort -r | xargs -r -n 1 umount -l || true
		rm -rf --one-file-system "$BUILD_TMP"
	fi
	if ((rc == 0)); then
		log "all systemd checks passed"
	else
		log "failed (exit status $rc)"
	fi
	exit "$rc"
}

# ---------------------------------------------------------------------------
# prerequisites

check_prerequisites() {
	((EUID == 0)) || die "must run as root (debootstrap and systemd-nspawn need it); e.g. sudo -E $0"
	[[ -n ${KOP_TEST_BROKERS:-} ]] || die "KOP_TEST_BROKERS is not set: give the Kafka broker, e.g. KOP_TEST_BROKERS=127.0.0.1:9092"
	local cmd missing=()
	for cmd in debootstrap systemd-nspawn nsenter kcat curl ss flock timeout; do
		command -v "$cmd" >/dev/null || missing+=("$cmd")
	done
	command -v "${CARGO:-cargo}" >/dev/null || missing+=(cargo)
	((${#missing[@]} == 0)) || die "missing commands: ${missing[*]} (Debian packages: debootstrap systemd-container util-linux kcat curl iproute2)"
	timeout 30 kcat -b "$KOP_TEST_BROKERS" -L -m 10 >/dev/null 2>&1 ||
		die "no Kafka broker answers at KOP_TEST_BROKERS=$KOP_TEST_BROKERS"
}

# ---------------------------------------------------------------------------
# the container's tree: debootstrapped once, cached

# The Debian mirror the host's apt uses for bookworm (or "stable").
host_mirror() {
	if [[ -n ${KOP_DEBIAN_MIRROR:-} ]]; then
		echo "$KOP_DEBIAN_MIRROR"
		return
	fi
	local f uri
	for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
		[[ -f $f ]] || continue
		# deb [options] URI SUITE COMPONENTS...
		uri=$(awk '$1 == "deb" {
			i = 2
			if ($i ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
			if ($(i + 1) == "bookworm" || $(i + 1) == "stable") { print $i; exit }
		}' "$f")
		[[ -z $uri ]] || {
			echo "$uri"
			return
		}
	done
	for f in /etc/apt/sources.list.d/*.sources; do
		[[ -f $f ]] || continue
		# deb822: paragraphs of "Key: value" lines.
		uri=$(awk 'BEGIN { RS = ""; FS = "\n" } {
			types = ""; uris = ""; suites = ""; enabled = "yes"
			for (i = 1; i <= NF; i++) {
				line = $i
				if (line ~ /^#/) continue
				key = tolower(line); sub(/:.*/, "", key)
				value = line; sub(/^[^:]*:[ \t]*/, "", value)
				if (key == "types") types = " " value " "
				else if (key == "uris") uris = value
				else if (key == "suites") suites = " " value " "
				else if (key == "enabled") enabled = value
			}
			if (enabled != "no" && types ~ / deb / && (suites ~ / bookworm / || suites ~ / stable /)) {
				split(uris, u, /[ \t]+/); print u[1]; exit
			}
		}' "$f")
		[[ -z $uri ]] || {
			echo "$uri"
			return
		}
	done
	echo http://deb.debian.org/debian
}

tree_is_complete() {
	[[ -f $CACHE/.kop-tree && $(<"$CACHE/.kop-tree") == "$TREE_ID" ]]
}

# Builds the tree into a temporary directory beside the cache and moves it into place
# at the end, so an interrupted build leaves nothing that looks finished. Runs hold a
# shared lock on the cache while they use it (their root is an overlay on it); a build
# takes it exclusively, so it neither races another build nor pulls the tree from under
# a running container.
ensure_tree() {
	local parent
	parent=$(dirname "$CACHE")
	mkdir -p "$parent"
	exec 9>"$CACHE.lock"
	flock -s -w 1800 9 || die "$CACHE has been locked for 30 minutes (another run building it?)"
	if tree_is_complete; then
		log "using the cached container tree $CACHE"
		return
	fi
	flock -x -w 1800 9 || die "$CACHE is in use by other runs; cannot rebuild it"
	if tree_is_complete; then # built by another run meanwhile
		flock -s 9
		log "using the cached container tree $CACHE"
		return
	fi
	# Leftovers of interrupted builds (we hold the lock: nobody else is building).
	rm -rf --one-file-system "$parent/.$(basename "$CACHE").tmp."*
	BUILD_TMP=$(mktemp -d "$parent/.$(basename "$CACHE").tmp.XXXXXX")
	local mirror tree=$BUILD_TMP/tree
	mirror=$(host_mirror)
	log "building the container tree (debootstrap bookworm from $mirror; a few minutes, once)"
	if ! timeout 1800 debootstrap --variant=minbase --include="$TREE_PACKAGES" \
		bookworm "$tree" "$mirror" >"$BUILD_TMP/debootstrap.log" 2>&1; then
		tail -n 30 "$BUILD_TMP/debootstrap.log" >&2
		[[ ! -f $tree/debootstrap/debootstrap.log ]] || tail -n 30 "$tree/debootstrap/debootstrap.log" >&2
		die "debootstrap failed (mirror $mirror; set KOP_DEBIAN_MIRROR to use another)"
	fi
	# The container is named after the machine (kop-test-*), not after the build host.
	rm -f "$tree/etc/hostname"
	# Nothing the test needs; they would only slow the boot down and fill the log.
	systemctl --root="$tree" --quiet mask apt-daily.timer apt-daily-upgrade.timer \
		dpkg-db-backup.timer e2scrub_all.timer console-getty.service
	rm -rf "$tree"/var/cache/apt/archives/*.deb "$tree"/var/lib/apt/lists/*
	echo "$TREE_ID" >"$tree/.kop-tree"
	rm -rf --one-file-system "$CACHE"
	mv "$tree" "$CACHE"
	rm -rf "$BUILD_TMP"
	BUILD_TMP=
	flock -s 9
	log "container tree cached in $CACHE"
}

# ---------------------------------------------------------------------------
# installing kop into the container's tree

port_in_use() {
	[[ -n $(ss -Htln "sport = :$1") ]]
}

# A port nothing listens on and no other daemon of this run got.
free_port() {
	local port taken=" $* "
	while :; do
		port=$((20000 + RANDOM % 12000))
		[[ $taken == *" $port "* ]] && continue
		port_in_use "$port" || break
	done
	echo "$port"
}

# Writes etc/kop/<service>.toml with the run's broker, topic prefix and ports.
#   rewrite_config SOURCE DEST PREFIX METRICS_PORT HTTP_PORT [STALL]
rewrite_config() {
	local source=$1 dest=$2 prefix=$3 metrics_port=$4 http_port=$5 stall=${6:-}
	awk -v brokers="$KOP_TEST_BROKERS" -v prefix="$prefix" -v mport="$metrics_port" \
		-v hport="$http_port" -v stall="$stall" '
		function value(line) { match(line, /"[^"]*"/); return substr(line, RSTART + 1, RLENGTH - 2) }
		function put(key, v) { print key " = \"" v "\""; done[section "." key] = 1 }
		/^[ \t]*\[/ { section = $0; gsub(/[][ \t]/, "", section) }
		section == "kafka" && /^"bootstrap\.servers"[ \t]*=/ {
			print "\"bootstrap.servers\" = \"" brokers "\""; done["kafka.bootstrap.servers"] = 1; next
		}
		section == "service" && /^name[ \t]*=/ { put("name", prefix "-" value($0)); next }
		section == "metrics" && /^listen[ \t]*=/ { put("listen", "0.0.0.0:" mport); next }
		section == "http" && /^listen[ \t]*=/ { put("listen", "0.0.0.0:" hport); next }
		section == "http" && /^topic[ \t]*=/ { put("topic", prefix "." value($0)); next }
		section == "stage" && /^(input|output|group_id)[ \t]*=/ {
			key = $0; sub(/[ \t]*=.*/, "", key); put(key, prefix "." value($0)); next
		}
		section == "simulate" && stall != "" && /^stall[ \t]*=/ {
			print "stall = " stall; done["simulate.stall"] = 1; next
		}
		{ print }
		END {
			n = split("kafka.bootstrap.servers service.name metrics.listen", want, " ")
			if (hport != "") { want[++n] = "http.listen"; want[++n] = "http.topic" }
			else { want[++n] = "stage.input"; want[++n] = "stage.group_id" }
			if (stall != "") want[++n] = "simulate.stall"
			for (i = 1; i <= n; i++) if (!(want[i] in done)) { print "no " want[i] " in the file" > "/dev/stderr"; exit 3 }
		}' "$source" >"$dest" || die "cannot rewrite $source"
}

# The port a TOML file listens on in [section] (default ports of etc/kop/*.toml).
listen_port() {
	awk -v want="$2" '/^[ \t]*\[/ { s = $0; gsub(/[][ \t]/, "", s) }
		s == want && /^listen[ \t]*=/ { match($0, /:[0-9]+"/); print substr($0, RSTART + 1, RLENGTH - 2); exit }' "$1"
}

declare -A METRICS_PORT
HTTP_PORT=
PREFIX=

install_kop() {
	local root=$1 s taken=()
	log "installing the binaries, units and configuration into the container"
	for s in "${SERVICES[@]}"; do
		install -m 0755 "${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release/kop-$s" "$root/usr/bin/kop-$s"
	done
	install -m 0755 "${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release/kopctl" "$root/usr/bin/kopctl"
	install -m 0644 "$REPO_ROOT"/systemd/*.service "$REPO_ROOT"/systemd/kop.target "$root/lib/systemd/system/"
	# What a package's postinst does: enable the target, which wants the four daemons.
	systemctl --root="$root" --quiet enable kop.target "${UNITS[@]/%/.service}"

	local missing
	missing=$(chroot "$root" ldd /usr/bin/kop-order /usr/bin/kop-payment /usr/bin/kop-inventory \
		/usr/bin/kop-notification /usr/bin/kopctl | grep 'not found' || true)
	[[ -z $missing ]] || die "libraries missing in the container (add their packages to TREE_PACKAGES): $missing"

	# Topics, consumer groups and service names (transactional ids) of this run only.
	PREFIX="systemd-$(date +%s)-$$"
	mkdir -p "$root/etc/kop"
	HTTP_PORT=$(listen_port "$REPO_ROOT/etc/kop/order.toml" http)
	if port_in_use "$HTTP_PORT"; then
		HTTP_PORT=$(free_port)
		log "port $(listen_port "$REPO_ROOT/etc/kop/order.toml" http) is in use on the host; the API listens on $HTTP_PORT"
	fi
	taken+=("$HTTP_PORT")
	for s in "${SERVICES[@]}"; do
		local port
		port=$(listen_port "$REPO_ROOT/etc/kop/$s.toml" metrics)
		if port_in_use "$port" || [[ " ${taken[*]} " == *" $port "* ]]; then
			port=$(free_port "${taken[@]}")
			log "metrics port of kop-$s in use on the host; using $port"
		fi
		taken+=("$port")
		METRICS_PORT[$s]=$port
		local hport=
		[[ $s != order ]] || hport=$HTTP_PORT
		rewrite_config "$REPO_ROOT/etc/kop/$s.toml" "$root/etc/kop/$s.toml" "$PREFIX" "$port" "$hport"
		chmod 0644 "$root/etc/kop/$s.toml"
		"$root/usr/bin/kop-$s" --config "$root/etc/kop/$s.toml" --check-config >/dev/null ||
			die "the rewritten $root/etc/kop/$s.toml is not valid"
	done
	log "broker $KOP_TEST_BROKERS, topics $PREFIX.*, API port $HTTP_PORT"
}

# ---------------------------------------------------------------------------
# the container

boot_container() {
	local root=$RUN_DIR/root machine
	machine="kop-test-$(printf '%04x%04x' $RANDOM $RANDOM)"
	# Each container gets a machine id of its own.
	tr -d '-' </proc/sys/kernel/random/uuid >"$root/etc/machine-id"
	local args=(-D "$root" -b --machine="$machine" --console=read-only)
	# Without systemd as PID 1 on the host there is no machined or bus to register with;
	# the container then stays in the cgroup this script runs in.
	[[ -d /run/systemd/system ]] || args+=(--register=no --keep-unit)
	log "booting the container $machine (systemd-nspawn ${args[*]})"
	systemd-nspawn "${args[@]}" </dev/null >"$RUN_DIR/console.log" 2>&1 &
	NSPAWN_PID=$!

	local deadline=$((SECONDS + 60)) pid
	while [[ -z $LEADER ]]; do
		container_running || die "systemd-nspawn exited at once; its output:
$(tail -n 30 "$RUN_DIR/console.log")"
		((SECONDS < deadline)) || die "the container's systemd did not start within 60 s"
		for pid in $(pgrep -P "$NSPAWN_PID" || true); do
			if [[ $(cat "/proc/$pid/comm" 2>/dev/null) == systemd ]]; then
				LEADER=$pid
			fi
		done
		[[ -n $LEADER ]] || sleep 0.2
	done

	local state=
	deadline=$((SECONDS + 180))
	while ((SECONDS < deadline)); do
		container_running || die "the container stopped while booting"
		state=$(in_container timeout 30 systemctl is-system-running --wait 2>/dev/null || true)
		[[ $state == running || $state == degraded ]] && break
		sleep 0.5
	done
	case $state in
	running) log "container up (systemd PID $LEADER on the host): system running" ;;
	degraded)
		log "container up, but degraded; failed units:"
		in_container systemctl --failed --no-pager >&2 || true
		;;
	*) die "the container did not finish booting within 180 s (state: ${state:-unknown})" ;;
	esac
}

prop() { # prop UNIT PROPERTY
	in_container systemctl show -P "$2" "$1"
}

# Waits until every unit given is in the state (e.g. active), for up to $1 seconds.
wait_state() {
	local timeout=$1 want=$2 deadline unit
	shift 2
	deadline=$((SECONDS + timeout))
	for unit in "$@"; do
		while [[ $(prop "$unit" ActiveState) != "$want" ]]; do
			((SECONDS < deadline)) || die "$unit is $(prop "$unit" ActiveState)/$(prop "$unit" SubState) (Result=$(prop "$unit" Result)), not $want, after ${timeout}s"
			sleep 0.3
		done
	done
}

assert_all() { # assert_all STATE [UNIT...]: each daemon (or each unit given) is in it right now
	local unit state want=$1
	shift
	(($# > 0)) || set -- "${UNITS[@]}"
	for unit in "$@"; do
		state=$(prop "$unit" ActiveState)
		[[ $state == "$want" ]] || die "$unit is $state/$(prop "$unit" SubState), not $want"
	done
}

# Each daemon drained: it exited by itself with status 0. systemd also counts a process
# killed by SIGTERM as Result=success, so the exit code is checked too (ExecMainCode 1 is
# CLD_EXITED; 2 would be killed by the signal).
assert_stopped_cleanly() { # [UNIT...], by default the four daemons
	(($# > 0)) || set -- "${UNITS[@]}"
	wait_state 60 inactive "$@"
	local unit result code status
	for unit in "$@"; do
		result=$(prop "$unit" Result)
		code=$(prop "$unit" ExecMainCode)
		status=$(prop "$unit" ExecMainStatus)
		[[ $result == success && $code == 1 && $status == 0 ]] ||
			die "$unit stopped with Result=$result ExecMainCode=$code ExecMainStatus=$status, not an exit 0 after draining"
	done
}

# ---------------------------------------------------------------------------
# orders

ACCEPTED=()

post_orders() { # post_orders BATCH COUNT
	local n id code
	for ((n = 1; n <= $2; n++)); do
		id="$PREFIX-$1-$n"
		code=$(curl -sS -o "$RUN_DIR/answer" -w '%{http_code}' --max-time 15 \
			-H 'Content-Type: application/json' -d "{\"orderId\":\"$id\",\"amount\":$((10 + n))}" \
			"http://127.0.0.1:$HTTP_PORT/order") || die "POST /order $id: curl failed"
		[[ $code == 202 ]] || die "POST /order $id: $code $(cat "$RUN_DIR/answer")"
		ACCEPTED+=("$id")
	done
}

# Waits until every accepted order is in the last topic (read_committed), then requires
# each exactly once.
expect_all_delivered() {
	local topic=$PREFIX.inventory.reserved deadline=$((SECONDS + 90)) keys missing id dups
	while :; do
		keys=$(timeout 60 kcat -b "$KOP_TEST_BROKERS" -C -t "$topic" -X isolation.level=read_committed \
			-e -o beginning -q -f '%k\n' 2>/dev/null || true)
		missing=()
		for id in "${ACCEPTED[@]}"; do
			grep -qxF "$id" <<<"$keys" || missing+=("$id")
		done
		((${#missing[@]} == 0)) && break
		((SECONDS < deadline)) || die "${#missing[@]} of ${#ACCEPTED[@]} accepted orders never reached $topic: ${missing[*]}"
		sleep 1
	done
	dups=$(grep -v '^$' <<<"$keys" | sort | uniq -d)
	[[ -z $dups ]] || die "orders delivered more than once to $topic: $dups"
	log "all ${#ACCEPTED[@]} accepted orders reached $topic, each exactly once"
}

# ---------------------------------------------------------------------------
# the checks

check_unit_files() {
	local out
	# A template is verified as its instance "i".
	out=$(in_container systemd-analyze verify /lib/systemd/system/kop-{order,payment,inventory,notification}.service \
		/lib/systemd/system/kop-{payment,inventory,notification}@.service /lib/systemd/system/kop.target 2>&1) ||
		die "systemd-analyze verify failed:
$out"
	[[ -z $out ]] || die "systemd-analyze verify printed:
$out"
	log "systemd-analyze verify: nothing to report"
	local unit score
	for unit in "${UNITS[@]}"; do
		out=$(in_container systemd-analyze security --offline=true "/lib/systemd/system/$unit.service" 2>&1) ||
			die "systemd-analyze security $unit failed:
$out"
		score=$(sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p' <<<"$out")
		[[ -n $score ]] || die "no exposure level for $unit in:
$out"
		log "systemd-analyze security $unit.service: exposure $score"
		awk -v s="$score" -v max="$MAX_EXPOSURE" 'BEGIN { exit !(s <= max) }' ||
			die "$unit: exposure $score is above $MAX_EXPOSURE:
$out"
	done
}

check_target() {
	wait_state 150 active "${UNITS[@]}"
	log "kop.target (enabled) started all four daemons at boot"
	in_container systemctl stop kop.target || die "systemctl stop kop.target failed"
	assert_stopped_cleanly
	log "systemctl stop kop.target: all four inactive, each exited 0 after draining"
	in_container timeout 150 systemctl start kop.target || die "systemctl start kop.target failed"
	# kop.target is ordered after the daemons: the start returns once each sent READY=1.
	assert_all active
	log "systemctl start kop.target: all four active (READY=1)"
	# The sandbox leaves the daemons their metrics, /proc/self and /proc/stat included.
	local s port code ports=()
	for s in "${SERVICES[@]}"; do
		ports+=("kop-$s :${METRICS_PORT[$s]}")
		port=${METRICS_PORT[$s]}
		code=$(curl -sS -o /dev/null -w '%{http_code}' --max-time 10 "http://127.0.0.1:$port/readyz") || code=none
		[[ $code == 200 ]] || die "kop-$s: GET :$port/readyz answered $code, not 200"
		curl -sS --max-time 10 "http://127.0.0.1:$port/metrics" >"$RUN_DIR/metrics" || die "kop-$s: GET :$port/metrics failed"
		if ! grep -Eq '^process_open_fds(\{[^}]*\})? [1-9]' "$RUN_DIR/metrics" ||
			! grep -Eq '^process_start_time_seconds(\{[^}]*\})? [1-9]' "$RUN_DIR/metrics"; then
			die "kop-$s: no process metrics (open fds, start time) on :$port/metrics:
$(grep '^process_' "$RUN_DIR/metrics")"
		fi
	done
	log "each daemon answers /readyz 200 and has its process metrics ($(
		IFS=,
		echo "${ports[*]}"
	))"
}

check_orders_and_journal() {
	# A handled record's line is at debug: follow orders as the README says, by raising
	# kop-payment's level at run time.
	local config=$RUN_DIR/root/etc/kop/payment.toml since
	sed -i 's/^level = "info"$/level = "info,kop=debug"/' "$config"
	grep -q '^level = "info,kop=debug"$' "$config" || die "no [log] level = \"info\" to raise in $config"
	since=$(in_container date +%s)
	in_container systemctl reload kop-payment || die "systemctl reload kop-payment failed"
	local ready=$((SECONDS + 10))
	until in_container journalctl --no-pager -o cat -u kop-payment --since "@$since" | grep -q 'configuration reloaded'; do
		((SECONDS < ready)) || die "kop-payment did not log 'configuration reloaded' after raising its level"
		sleep 0.3
	done
	post_orders first 10
	expect_all_delivered
	local id=$PREFIX-first-3 out deadline=$((SECONDS + 20))
	while :; do
		out=$(in_container journalctl --no-pager -o verbose -u kop-payment "ORDER_ID=$id" 2>&1 || true)
		grep -q "ORDER_ID=$id" <<<"$out" && break
		((SECONDS < deadline)) || die "journalctl -u kop-payment ORDER_ID=$id finds nothing:
$out"
		sleep 0.5
	done
	for field in TOPIC PARTITION OFFSET ATTEMPT TRACE_ID; do
		grep -q "^ *$field=" <<<"$out" || die "the journal entry of $id has no $field field:
$out"
	done
	log "journalctl -u kop-payment ORDER_ID=$id finds it (with TOPIC, PARTITION, OFFSET, ATTEMPT, TRACE_ID)"
}

check_reload() {
	local since pid
	since=$(in_container date +%s)
	pid=$(prop kop-payment MainPID)
	in_container systemctl reload kop-payment || die "systemctl reload kop-payment failed"
	[[ $(prop kop-payment MainPID) == "$pid" && $(prop kop-payment ActiveState) == active ]] ||
		die "kop-payment did not survive the reload"
	local deadline=$((SECONDS + 10))
	until in_container journalctl --no-pager -o cat -u kop-payment --since "@$since" | grep -q 'configuration reloaded'; do
		((SECONDS < deadline)) || die "kop-payment did not log 'configuration reloaded' after systemctl reload"
		sleep 0.3
	done
	log "systemctl reload kop-payment: configuration re-read, same process"
}

check_kill_restart() {
	local restarts pid deadline
	restarts=$(prop kop-payment NRestarts)
	pid=$(prop kop-payment MainPID)
	in_container systemctl kill -s SIGKILL kop-payment || die "systemctl kill -s SIGKILL kop-payment failed"
	# Accepted while kop-payment is down: they wait in Kafka.
	post_orders while-down 10
	deadline=$((SECONDS + 60))
	until (($(prop kop-payment NRestarts) > restarts)) && [[ $(prop kop-payment ActiveState) == active ]]; do
		((SECONDS < deadline)) || die "kop-payment was not restarted after SIGKILL within 60 s (NRestarts=$(prop kop-payment NRestarts), $(prop kop-payment ActiveState))"
		sleep 0.3
	done
	[[ $(prop kop-payment MainPID) != "$pid" ]] || die "kop-payment has the same PID after SIGKILL"
	log "SIGKILL: systemd restarted kop-payment (NRestarts $restarts → $(prop kop-payment NRestarts), PID $pid → $(prop kop-payment MainPID))"
	post_orders after-kill 10
	expect_all_delivered
}

check_watchdog() {
	local config=$RUN_DIR/root/etc/kop/inventory.toml backup=$RUN_DIR/inventory.toml.orig
	cp -p "$config" "$backup"
	rewrite_config "$REPO_ROOT/etc/kop/inventory.toml" "$config" "$PREFIX" "${METRICS_PORT[inventory]}" "" true
	grep -qx 'stall = true' "$config" || die "could not set stall = true in $config"
	local since restarts watchdog deadline
	since=$(in_container date +%s)
	in_container systemctl restart kop-inventory || die "systemctl restart kop-inventory failed"
	restarts=$(prop kop-inventory NRestarts)
	watchdog=$(prop kop-inventory WatchdogUSec)
	log "kop-inventory restarted with [simulate] stall = true; waiting for the watchdog ($watchdog)"
	deadline=$((SECONDS + 60))
	until (($(prop kop-inventory NRestarts) > restarts)); do
		((SECONDS < deadline)) || die "the watchdog did not restart the stalled kop-inventory within 60 s"
		sleep 0.5
	done
	local journal
	journal=$(in_container journalctl --no-pager -o cat -u kop-inventory --since "@$since")
	grep -q 'Watchdog timeout' <<<"$journal" || die "no watchdog timeout in the journal of kop-inventory:
$journal"
	grep -q "Failed with result 'watchdog'" <<<"$journal" || die "kop-inventory did not fail with result 'watchdog':
$journal"
	log "watchdog: '$(grep -m1 'Watchdog timeout' <<<"$journal")'; NRestarts $restarts → $(prop kop-inventory NRestarts)"

	cp -p "$backup" "$config"
	in_container systemctl restart kop-inventory || die "systemctl restart kop-inventory failed"
	wait_state 30 active kop-inventory
	post_orders after-watchdog 10
	expect_all_delivered
}

check_config_error() {
	local config=$RUN_DIR/root/etc/kop/notification.toml backup=$RUN_DIR/notification.toml.orig
	cp -p "$config" "$backup"
	printf '\n[bogus]\nkey = 1\n' >>"$config"
	local since
	since=$(in_container date +%s)
	! in_container systemctl restart kop-notification 2>/dev/null ||
		die "kop-notification started with an unknown section in its configuration"
	wait_state 10 failed kop-notification
	# Past RestartSec: had systemd scheduled a restart, it would show by now.
	sleep 3
	local status restarts
	status=$(prop kop-notification ExecMainStatus)
	restarts=$(prop kop-notification NRestarts)
	[[ $status == 78 && $restarts == 0 && $(prop kop-notification ActiveState) == failed ]] ||
		die "kop-notification with a bad configuration: exit status $status, NRestarts $restarts, $(prop kop-notification ActiveState); want 78, 0, failed"
	in_container journalctl --no-pager -o cat -u kop-notification --since "@$since" | grep -q 'configuration error' ||
		die "the journal of kop-notification does not say 'configuration error'"
	log "bad configuration: kop-notification exited 78, logged the error, and was not restarted"
	cp -p "$backup" "$config"
	in_container systemctl restart kop-notification || die "systemctl restart kop-notification failed"
	wait_state 30 active kop-notification
}

# The README's way to keep a password out of the world-readable /etc/kop: a root-only file
# handed over with LoadCredential=. The world-readable file is broken meanwhile, so the
# daemon starting proves it read the credential.
check_credential() {
	local root=$RUN_DIR/root
	local config=$root/etc/kop/notification.toml backup=$RUN_DIR/notification.toml.cred
	local dropin=$root/etc/systemd/system/kop-notification.service.d
	cp -p "$config" "$backup"
	install -d -m 0700 "$root/etc/kop/private"
	install -m 0600 "$config" "$root/etc/kop/private/notification.toml"
	printf '\n[bogus]\nkey = 1\n' >>"$config"
	mkdir -p "$dropin"
	cat >"$dropin/credential.conf" <<'EOF'
[Service]
LoadCredential=notification.toml:/etc/kop/private/notification.toml
ExecStart=
ExecStart=/usr/bin/kop-notification --config ${CREDENTIALS_DIRECTORY}/notification.toml
EOF
	in_container systemctl daemon-reload || die "systemctl daemon-reload failed"
	in_container systemctl restart kop-notification ||
		die "kop-notification did not start with its configuration passed by LoadCredential="
	wait_state 30 active kop-notification
	log "LoadCredential=: kop-notification runs on its configuration from a root-only file"
	rm -r "$dropin" "$root/etc/kop/private"
	cp -p "$backup" "$config"
	in_container systemctl daemon-reload || die "systemctl daemon-reload failed"
	in_container systemctl restart kop-notification || die "systemctl restart kop-notification failed"
	wait_state 30 active kop-notification
}

# The partitions a stage's unit holds since a time (@seconds): the count of its last
# "partitions assigned" line, 0 after a "partitions revoked" one, empty if neither.
held_partitions() { # held_partitions UNIT SINCE
	in_container journalctl --no-pager -u "$1" --since "@$2" -o export --output-fields=MESSAGE,PARTITIONS |
		awk 'BEGIN { RS = ""; FS = "\n"; held = "" }
		{
			message = ""; count = ""
			for (i = 1; i <= NF; i++) {
				if ($i ~ /^MESSAGE=/) message = substr($i, 9)
				else if ($i ~ /^PARTITIONS=/) count = substr($i, 12)
			}
			if (message == "partitions assigned") held = count
			else if (message == "partitions revoked") held = 0
		}
		END { print held }'
}

# Two instances of kop-payment from its template, in place of kop-payment.service, as the
# template's header says to run them. The group's range assignor gives each partition of
# orders.created and its retry topic (3 + 3) to one member; with two, each gets some.
check_instances() {
	local root=$RUN_DIR/root n port since host taken=("$HTTP_PORT" "${METRICS_PORT[@]}")
	local instances=(kop-payment@1 kop-payment@2) ports=()
	in_container systemctl stop kop-payment || die "systemctl stop kop-payment failed"
	in_container systemctl mask --quiet kop-payment || die "systemctl mask kop-payment failed"
	for n in 1 2; do
		port=$(free_port "${taken[@]}")
		taken+=("$port")
		ports+=("$port")
		echo "METRICS_PORT=$port" >"$root/etc/kop/payment@$n.env"
		chmod 0644 "$root/etc/kop/payment@$n.env"
	done
	since=$(in_container date +%s)
	in_container timeout 150 systemctl enable --quiet --now "${instances[@]}" ||
		die "systemctl enable --now ${instances[*]} failed"
	assert_all active "${instances[@]}"
	log "kop-payment masked; ${instances[*]} enabled and active (READY=1), metrics on :${ports[0]} and :${ports[1]}"

	local out score
	for n in 0 1; do
		out=$(in_container systemd-analyze security "${instances[n]}" 2>&1) ||
			die "systemd-analyze security ${instances[n]} failed:
$out"
		score=$(sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p' <<<"$out")
		awk -v s="$score" -v max="$MAX_EXPOSURE" 'BEGIN { exit !(s != "" && s <= max) }' ||
			die "${instances[n]}: exposure '$score' is not at most $MAX_EXPOSURE:
$out"
		port=${ports[n]}
		[[ $(curl -sS -o /dev/null -w '%{http_code}' --max-time 10 "http://127.0.0.1:$port/readyz") == 200 ]] ||
			die "${instances[n]}: GET :$port/readyz is not 200"
	done
	log "systemd-analyze security: ${instances[*]} at most $MAX_EXPOSURE; each answers /readyz on its own port"

	# Each its own producer: the transactional id kop-<service name>-<host>-<instance>.
	host=$(in_container cat /proc/sys/kernel/hostname)
	local id
	for n in 1 2; do
		id="kop-$PREFIX-payment-service-$host-$n"
		in_container journalctl --no-pager -u "kop-payment@$n" --since "@$since" -o export \
			--output-fields=TRANSACTIONAL_ID | grep -qxF "TRANSACTIONAL_ID=$id" ||
			die "kop-payment@$n did not initialise transactions as $id:
$(in_container journalctl --no-pager -o cat -u "kop-payment@$n" --since "@$since" | tail -n 20)"
	done
	log "transactional ids: kop-$PREFIX-payment-service-$host-1 and -2"

	# Once the group has settled, each holds some partitions and together all six.
	local deadline=$((SECONDS + 60)) one two
	while :; do
		one=$(held_partitions kop-payment@1 "$since")
		two=$(held_partitions kop-payment@2 "$since")
		((${one:-0} > 0 && ${two:-0} > 0 && one + two == 6)) && break
		((SECONDS < deadline)) || die "the partitions are not shared after 60 s: kop-payment@1 holds ${one:-none}, kop-payment@2 ${two:-none} (of 6: orders.created and its retry topic, 3 each)"
		sleep 1
	done
	log "partitions shared: kop-payment@1 holds $one, kop-payment@2 $two of 6"

	post_orders instances 30
	expect_all_delivered
	local topic=$PREFIX.orders.created consumed
	for n in 0 1; do
		consumed=$(curl -sS --max-time 10 "http://127.0.0.1:${ports[n]}/metrics" |
			awk -v t="topic=\"$topic\"" '$1 ~ /^kafka_messages_consumed_total\{/ && index($1, t) { print $2 }')
		awk -v c="${consumed:-0}" 'BEGIN { exit !(c > 0) }' ||
			die "${instances[n]} consumed nothing from $topic (kafka_messages_consumed_total: ${consumed:-absent})"
		log "${instances[n]} consumed $consumed records of $topic"
	done

	# kop.target wants the enabled instances: it stops them with the rest, drained, and
	# starts them again.
	local all=(kop-order kop-inventory kop-notification "${instances[@]}")
	in_container systemctl stop kop.target || die "systemctl stop kop.target failed"
	assert_stopped_cleanly "${all[@]}"
	in_container timeout 150 systemctl start kop.target || die "systemctl start kop.target failed"
	assert_all active "${all[@]}"
	[[ $(prop kop-payment ActiveState) == inactive ]] || die "the masked kop-payment is $(prop kop-payment ActiveState)"
	log "kop.target stopped the instances with the others (each exited 0 after draining) and started them again"
	post_orders instances-again 10
	expect_all_delivered

	# Back to kop-payment.service for what follows.
	in_container systemctl disable --quiet --now "${instances[@]}" || die "systemctl disable --now ${instances[*]} failed"
	in_container systemctl unmask --quiet kop-payment || die "systemctl unmask kop-payment failed"
	in_container timeout 150 systemctl start kop-payment || die "systemctl start kop-payment failed"
	assert_all active
}

main() {
	case ${1:-} in
	-h | --help)
		usage
		return 0
		;;
	"") ;;
	*)
		usage >&2
		return 2
		;;
	esac
	trap on_exit EXIT
	trap 'exit 130' INT
	trap 'exit 143' TERM

	check_prerequisites
	ensure_tree

	log "building the release binaries"
	(cd "$REPO_ROOT" && "${CARGO:-cargo}" build --release --bins) || die "cargo build --release --bins failed"

	mkdir -p "$WORK_BASE"
	RUN_DIR=$(mktemp -d "$WORK_BASE/kop-systemd-test.XXXXXX")
	# This run's root: an overlay on the cached tree (which stays untouched), else a copy.
	mkdir -p "$RUN_DIR"/{root,upper,work}
	if mount -t overlay overlay -o "lowerdir=$CACHE,upperdir=$RUN_DIR/upper,workdir=$RUN_DIR/work" \
		"$RUN_DIR/root" 2>"$RUN_DIR/mount.err"; then
		log "the container's root: $RUN_DIR/root, an overlay on the cached tree"
	else
		log "no overlay ($(<"$RUN_DIR/mount.err")); copying the tree to $RUN_DIR/root"
		rmdir "$RUN_DIR/root"
		cp -a --reflink=auto "$CACHE" "$RUN_DIR/root"
	fi
	install_kop "$RUN_DIR/root"

	boot_container
	check_unit_files
	check_target
	check_orders_and_journal
	check_reload
	check_kill_restart
	check_watchdog
	check_config_error
	check_credential
	check_instances

	in_container systemctl stop kop.target || die "systemctl stop kop.target failed"
	assert_stopped_cleanly
	log "systemctl stop kop.target: all four inactive, each exited 0 after draining"
}

main "$@"
