//! The operations files under `docker/` checked against the code: the compose stack, the
//! Prometheus configuration and alert rules, the Grafana provisioning and dashboard; and
//! the template units of `systemd/` against the plain units they run several of.
//!
//! The tools these checks run — `docker-compose`, `promtool` (Debian package `prometheus`)
//! and `python3` with PyYAML (`python3-yaml`, a dependency of `docker-compose`) — must be
//! installed: a missing tool fails the test, it never skips. No Docker engine is needed.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kop::config::{Env, OrderConfig, Service, StageConfig};
use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

const COMPOSE_FILE: &str = "docker/docker-compose.yml";

// ---- tools -------------------------------------------------------------------------------

/// Runs a tool in the repository root; a tool that is not installed fails the test.
fn run(program: &str, args: &[&str], package: &str) -> Output {
    Command::new(program)
        .args(args)
        .current_dir(repo())
        // The compose file reads these (failure injection); the checks want the defaults.
        .env_remove("PAYMENT_FAILURE_RATE")
        .env_remove("PAYMENT_DELAY_MS")
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run `{program}`: {e}; install the Debian package `{package}` \
                 (scripts/test.sh installs it)"
            )
        })
}

/// Runs a tool and requires exit status 0; returns its standard output.
fn run_ok(program: &str, args: &[&str], package: &str) -> String {
    let out = run(program, args, package);
    assert!(
        out.status.success(),
        "`{program} {}` failed ({}):\n{}\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The Python that has PyYAML: Debian's (docker-compose runs on it), else the one on PATH.
fn python() -> &'static str {
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

/// Parses YAML text into JSON with Python's PyYAML (safe_load: merge keys are resolved).
fn yaml_to_json(yaml: &str) -> Value {
    let dir = std::env::temp_dir().join(format!(
        "kop-ops-files-{}-{:x}",
        std::process::id(),
        rand::random::<u64>()
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let input = dir.join("in.yml");
    std::fs::write(&input, yaml).expect("write yaml");
    let script = "import json, sys, yaml\n\
                  json.dump(yaml.safe_load(open(sys.argv[1])), sys.stdout)\n";
    let out = run(
        python(),
        &["-c", script, input.to_str().expect("utf-8 path")],
        "python3-yaml",
    );
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "python3 could not parse YAML (is python3-yaml installed?):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON from python3")
}

fn yaml_file(path: &str) -> Value {
    let text = std::fs::read_to_string(repo().join(path))
        .unwrap_or_else(|e| panic!("cannot read {path}: {e}"));
    yaml_to_json(&text)
}

/// The compose file as docker-compose itself resolves it (merge keys, variables, defaults).
fn compose() -> Value {
    let text = run_ok(
        "docker-compose",
        &["-f", COMPOSE_FILE, "config"],
        "docker-compose",
    );
    yaml_to_json(&text)
}

// ---- compose helpers ---------------------------------------------------------------------

fn services(compose: &Value) -> &serde_json::Map<String, Value> {
    compose["services"].as_object().expect("services")
}

fn scalar(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// A service's environment, from the map or the list form.
fn environment(service: &Value) -> BTreeMap<String, String> {
    match &service["environment"] {
        Value::Object(map) => map.iter().map(|(k, v)| (k.clone(), scalar(v))).collect(),
        Value::Array(list) => list
            .iter()
            .map(|item| {
                let item = scalar(item);
                let (k, v) = item.split_once('=').unwrap_or((&item, ""));
                (k.to_string(), v.to_string())
            })
            .collect(),
        _ => BTreeMap::new(),
    }
}

/// Published ports as (host port, container port), from the short or the long syntax.
fn ports(service: &Value) -> Vec<(u16, u16)> {
    let port = |v: &Value| -> u16 {
        scalar(v)
            .parse()
            .unwrap_or_else(|_| panic!("port {v} is not a number"))
    };
    service["ports"]
        .as_array()
        .map(|list| {
            list.iter()
                .map(|p| match p {
                    Value::Object(_) => (port(&p["published"]), port(&p["target"])),
                    _ => {
                        let text = scalar(p);
                        let text = text.split('/').next().unwrap_or_default();
                        let parts: Vec<&str> = text.split(':').collect();
                        let n = parts.len();
                        assert!(n >= 2, "port `{text}` is not published on the host");
                        (
                            parts[n - 2].parse().expect("host port"),
                            parts[n - 1].parse().expect("container port"),
                        )
                    }
                })
                .collect()
        })
        .unwrap_or_default()
}

fn strings(value: &Value) -> Vec<String> {
    match value {
        Value::Array(list) => list.iter().map(scalar).collect(),
        Value::Null => Vec::new(),
        other => vec![scalar(other)],
    }
}

/// Volumes as (source, target), from the short or the long syntax.
fn volumes(service: &Value) -> Vec<(String, String)> {
    service["volumes"]
        .as_array()
        .map(|list| {
            list.iter()
                .map(|v| match v {
                    Value::Object(_) => (scalar(&v["source"]), scalar(&v["target"])),
                    _ => {
                        let text = scalar(v);
                        let parts: Vec<&str> = text.split(':').collect();
                        (
                            parts[0].to_string(),
                            parts.get(1).unwrap_or(&"").to_string(),
                        )
                    }
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The container path where a directory of the repository is mounted.
fn mount_target(service: &Value, repo_dir: &str) -> Option<String> {
    let wanted = repo().join(repo_dir);
    volumes(service)
        .into_iter()
        .find(|(source, _)| {
            let source = if Path::new(source).is_absolute() {
                PathBuf::from(source)
            } else {
                repo().join("docker").join(source)
            };
            source.canonicalize().ok() == wanted.canonicalize().ok()
        })
        .map(|(_, target)| target)
}

/// Whether a service waits for `dependency` to be healthy.
fn waits_healthy(service: &Value, dependency: &str) -> bool {
    service["depends_on"][dependency]["condition"].as_str() == Some("service_healthy")
}

fn find_by_image<'a>(compose: &'a Value, prefix: &str) -> (&'a String, &'a Value) {
    let found: Vec<_> = services(compose)
        .iter()
        .filter(|(_, s)| s["image"].as_str().is_some_and(|i| i.starts_with(prefix)))
        .collect();
    assert_eq!(found.len(), 1, "one service with image {prefix}*");
    found[0]
}

// ---- the daemons' configuration ------------------------------------------------------------

/// An environment that remembers which variables the configuration loader asked for.
struct Recorder {
    vars: BTreeMap<String, String>,
    asked: RefCell<BTreeSet<String>>,
}

impl Env for Recorder {
    fn get(&self, name: &str) -> Option<String> {
        self.asked.borrow_mut().insert(name.to_string());
        // Empty values count as unset, as for the real process environment.
        self.vars
            .get(name)
            .filter(|v| !v.trim().is_empty())
            .cloned()
    }
}

/// What a daemon ends up with, from the real loader.
struct Effective {
    metrics_port: u16,
    api_port: Option<u16>,
    brokers: String,
}

fn service_of(binary: &str) -> Option<Service> {
    Some(match binary {
        "kop-order" => Service::Order,
        "kop-payment" => Service::Payment,
        "kop-inventory" => Service::Inventory,
        "kop-notification" => Service::Notification,
        _ => return None,
    })
}

/// Loads a daemon's configuration the way the container does: the file the image installs in
/// /etc/kop (copied from etc/kop) when `file` is set, overridden by `env`.
fn load(service: Service, file: bool, env: &dyn Env) -> Effective {
    let path = repo().join(format!("etc/kop/{}.toml", service.short_name()));
    let path = file.then_some(path.as_path());
    let what = format!("kop-{} configuration", service.short_name());
    match service {
        Service::Order => {
            let c = OrderConfig::load(path, env).unwrap_or_else(|e| panic!("{what}: {e}"));
            Effective {
                metrics_port: c.common.metrics_listen.port(),
                api_port: Some(c.listen.port()),
                brokers: c.common.kafka["bootstrap.servers"].clone(),
            }
        }
        stage => {
            let c = StageConfig::load(stage, path, env).unwrap_or_else(|e| panic!("{what}: {e}"));
            Effective {
                metrics_port: c.common.metrics_listen.port(),
                api_port: None,
                brokers: c.common.kafka["bootstrap.servers"].clone(),
            }
        }
    }
}

/// The kop services of the compose file: (compose name, daemon, its effective configuration).
struct KopService {
    name: String,
    service: Service,
    effective: Effective,
}

fn kop_services(compose: &Value) -> Vec<KopService> {
    let mut found = Vec::new();
    for (name, s) in services(compose) {
        let command = strings(&s["command"]);
        let Some(service) = command.first().and_then(|c| service_of(c)) else {
            continue;
        };
        assert_eq!(
            command.len(),
            1,
            "{name}: the daemon takes its configuration from the environment, not arguments"
        );
        let vars = environment(s);
        let recorder = Recorder {
            vars: vars.clone(),
            asked: RefCell::new(BTreeSet::new()),
        };
        let effective = load(service, true, &recorder);
        let asked = recorder.asked.into_inner();
        let unread: Vec<_> = vars.keys().filter(|k| !asked.contains(*k)).collect();
        assert!(
            unread.is_empty(),
            "{name} (kop-{}) sets variables the daemon never reads: {unread:?}; it reads {asked:?}",
            service.short_name()
        );
        found.push(KopService {
            name: name.clone(),
            service,
            effective,
        });
    }
    found
}

// ---- (a) the compose file is valid ---------------------------------------------------------

#[test]
fn compose_file_is_valid() {
    run_ok(
        "docker-compose",
        &["-f", COMPOSE_FILE, "config", "-q"],
        "docker-compose",
    );
}

// ---- (b) the compose file matches the daemons ----------------------------------------------

#[test]
fn compose_services_match_the_daemons() {
    let compose = compose();
    let kop = kop_services(&compose);
    let mut daemons: Vec<_> = kop.iter().map(|k| k.service.short_name()).collect();
    daemons.sort();
    assert_eq!(
        daemons,
        ["inventory", "notification", "order", "payment"],
        "each daemon runs once"
    );
    let dockerfile = std::fs::read_to_string(repo().join("docker/Dockerfile")).expect("Dockerfile");
    assert!(
        dockerfile
            .lines()
            .any(|l| l.starts_with("COPY") && l.contains("etc/kop") && l.contains("/etc/kop")),
        "the image installs etc/kop as /etc/kop, the daemons' default configuration"
    );

    for k in &kop {
        let s = &services(&compose)[&k.name];
        let name = &k.name;
        // One image for all four, built from the repository with docker/Dockerfile.
        assert_eq!(
            Path::new(&scalar(&s["build"]["context"]))
                .canonicalize()
                .ok(),
            repo().canonicalize().ok(),
            "{name}: build context is the repository root"
        );
        assert_eq!(scalar(&s["build"]["dockerfile"]), "docker/Dockerfile");

        // The default ports, as the original published them.
        let default = load(k.service, false, &BTreeMap::<&str, &str>::new());
        assert_eq!(
            k.effective.metrics_port, default.metrics_port,
            "{name}: metrics on the daemon's default port"
        );
        let published = ports(s);
        let mut wanted = vec![k.effective.metrics_port];
        wanted.extend(k.effective.api_port);
        for port in &wanted {
            assert!(
                published.contains(&(*port, *port)),
                "{name}: publishes {port}:{port}, has {published:?}"
            );
        }
        assert_eq!(
            published.len(),
            wanted.len(),
            "{name}: publishes only {wanted:?}"
        );

        // The healthcheck asks /readyz on the metrics port.
        let check = strings(&s["healthcheck"]["test"]).join(" ");
        let port = k.effective.metrics_port;
        assert!(
            check.contains(&format!("localhost:{port}/readyz"))
                || check.contains(&format!("127.0.0.1:{port}/readyz")),
            "{name}: healthcheck `{check}` asks /readyz on port {port}"
        );

        // The broker is the compose service `kafka`, on the listener it advertises inside.
        let (host, broker_port) = k
            .effective
            .brokers
            .split_once(':')
            .unwrap_or_else(|| panic!("{name}: KAFKA_BROKERS `{}`", k.effective.brokers));
        let kafka = services(&compose)
            .get(host)
            .unwrap_or_else(|| panic!("{name}: broker host `{host}` is not a compose service"));
        let advertised = environment(kafka)
            .get("KAFKA_ADVERTISED_LISTENERS")
            .cloned()
            .unwrap_or_default();
        assert!(
            advertised
                .split(',')
                .any(|l| l.ends_with(&format!("://{host}:{broker_port}"))),
            "{name}: {host} advertises {host}:{broker_port} ({advertised})"
        );
        assert!(
            waits_healthy(s, host),
            "{name}: starts once {host} is healthy"
        );
    }
}

/// Files under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// The image builds from exactly what the Dockerfile copies and its ignore file lets in:
/// the manifest, the sources, a build script and any file the sources include.
#[test]
fn the_image_gets_every_file_the_build_reads() {
    let dockerfile = std::fs::read_to_string(repo().join("docker/Dockerfile")).expect("Dockerfile");
    let mut sources: Vec<String> = Vec::new();
    for line in dockerfile.lines() {
        let Some(rest) = line.trim().strip_prefix("COPY ") else {
            continue;
        };
        if rest.contains("--from") {
            continue; // from the build stage, not the context
        }
        let parts: Vec<&str> = rest
            .split_whitespace()
            .filter(|p| !p.starts_with("--"))
            .collect();
        let (_, from) = parts.split_last().expect("COPY source and destination");
        sources.extend(from.iter().map(|s| s.trim_end_matches('/').to_string()));
    }
    let covered = |path: &str| {
        sources
            .iter()
            .any(|s| path == s || path.starts_with(&format!("{s}/")))
    };

    let mut needed = vec![
        "Cargo.toml".to_string(),
        "Cargo.lock".into(),
        "src/lib.rs".into(),
    ];
    if repo().join("build.rs").exists() {
        needed.push("build.rs".into());
    }
    // cargo loads every member of the workspace, built or not.
    let manifest: toml::Table = std::fs::read_to_string(repo().join("Cargo.toml"))
        .expect("Cargo.toml")
        .parse()
        .expect("Cargo.toml is TOML");
    let members = manifest
        .get("workspace")
        .and_then(|w| w.get("members"))
        .and_then(|m| m.as_array())
        .cloned()
        .unwrap_or_default();
    for member in members.iter().filter_map(|m| m.as_str()) {
        if member != "." {
            needed.push(format!("{member}/Cargo.toml"));
        }
    }
    for file in files_under(&repo().join("src")) {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        for pattern in ["include_str!(\"", "include_bytes!(\""] {
            for piece in text.split(pattern).skip(1) {
                let literal = piece.split('"').next().unwrap_or_default();
                let mut path = PathBuf::new();
                for part in file.parent().expect("dir").join(literal).components() {
                    match part {
                        std::path::Component::ParentDir => {
                            path.pop();
                        }
                        std::path::Component::CurDir => {}
                        other => path.push(other),
                    }
                }
                let relative = path
                    .strip_prefix(repo())
                    .unwrap_or_else(|_| panic!("{} includes {literal}", file.display()));
                needed.push(relative.to_string_lossy().into_owned());
            }
        }
    }
    for path in &needed {
        assert!(
            covered(path),
            "docker/Dockerfile does not copy {path} (copies {sources:?})"
        );
    }

    let ignore = std::fs::read_to_string(repo().join("docker/Dockerfile.dockerignore"))
        .expect("docker/Dockerfile.dockerignore");
    let allowed: Vec<&str> = ignore
        .lines()
        .filter_map(|l| l.trim().strip_prefix('!'))
        .map(|l| l.trim_end_matches('/'))
        .collect();
    for source in &sources {
        assert!(
            allowed
                .iter()
                .any(|a| source == a || source.starts_with(&format!("{a}/"))),
            "docker/Dockerfile.dockerignore keeps {source} out of the build context"
        );
    }
}

#[test]
fn kafka_runs_in_kraft_mode_with_single_node_settings() {
    let compose = compose();
    let (name, kafka) = find_by_image(&compose, "apache/kafka:");
    let env = environment(kafka);
    let get = |k: &str| env.get(k).map(String::as_str).unwrap_or("");
    assert_eq!(scalar(&kafka["image"]), "apache/kafka:4.1.1");
    assert_eq!(get("KAFKA_PROCESS_ROLES"), "broker,controller");
    assert!(get("KAFKA_CONTROLLER_QUORUM_VOTERS").contains(&format!("@{name}:")));
    assert!(!env.keys().any(|k| k.contains("ZOOKEEPER")), "no ZooKeeper");
    for (key, value) in [
        ("KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR", "1"),
        ("KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR", "1"),
        ("KAFKA_TRANSACTION_STATE_LOG_MIN_ISR", "1"),
        ("KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS", "0"),
        ("KAFKA_AUTO_CREATE_TOPICS_ENABLE", "false"),
    ] {
        assert_eq!(get(key), value, "{key}");
    }
    let check = strings(&kafka["healthcheck"]["test"]).join(" ");
    assert!(check.contains("/opt/kafka/bin/"), "healthcheck `{check}`");
    // Every listener port published to the host is advertised as localhost.
    for (host, container) in ports(kafka) {
        assert!(
            get("KAFKA_ADVERTISED_LISTENERS").contains(&format!("localhost:{host}"))
                && get("KAFKA_LISTENERS").contains(&format!(":{container}")),
            "published {host}:{container} is a listener advertised for the host"
        );
    }
}

// ---- Prometheus and the exporter -------------------------------------------------------------

#[test]
fn prometheus_scrapes_every_daemon_and_the_exporter() {
    let compose = compose();
    let kop = kop_services(&compose);
    let (exporter, exporter_service) = find_by_image(&compose, "danielqsj/kafka-exporter");
    assert!(
        ports(exporter_service).contains(&(9308, 9308)),
        "exporter on 9308"
    );
    assert!(
        waits_healthy(exporter_service, "kafka"),
        "exporter waits for Kafka"
    );
    assert!(
        exporter_service["restart"].is_string(),
        "exporter has a restart policy"
    );
    let (_, prometheus) = find_by_image(&compose, "prom/prometheus");
    assert!(ports(prometheus).contains(&(9090, 9090)));
    assert_eq!(
        mount_target(prometheus, "docker/prometheus").as_deref(),
        Some("/etc/prometheus"),
        "docker/prometheus mounted as /etc/prometheus"
    );
    assert!(
        strings(&prometheus["command"])
            .contains(&"--config.file=/etc/prometheus/prometheus.yml".to_string())
    );

    let config = yaml_file("docker/prometheus/prometheus.yml");
    let mut targets = BTreeSet::new();
    for job in config["scrape_configs"].as_array().expect("scrape_configs") {
        for group in job["static_configs"].as_array().expect("static_configs") {
            for target in strings(&group["targets"]) {
                assert!(targets.insert(target.clone()), "{target} scraped twice");
            }
        }
    }
    let mut expected: BTreeSet<String> = kop
        .iter()
        .map(|k| format!("{}:{}", k.name, k.effective.metrics_port))
        .collect();
    expected.insert(format!("{exporter}:9308"));
    expected.insert("localhost:9090".into());
    assert_eq!(targets, expected);
    assert_eq!(strings(&config["rule_files"]), ["alerts.yml"]);
}

// ---- (c) promtool --------------------------------------------------------------------------

#[test]
fn promtool_accepts_the_configuration() {
    run_ok(
        "promtool",
        &["check", "config", "docker/prometheus/prometheus.yml"],
        "prometheus",
    );
}

#[test]
fn promtool_accepts_the_alert_rules() {
    run_ok(
        "promtool",
        &["check", "rules", "docker/prometheus/alerts.yml"],
        "prometheus",
    );
}

#[test]
fn alert_rule_unit_tests_pass() {
    run_ok(
        "promtool",
        &["test", "rules", "docker/prometheus/alerts_test.yml"],
        "prometheus",
    );
}

/// Every alert is tested both ways: a case where it fires and one where it must not.
#[test]
fn every_alert_has_firing_and_quiet_tests() {
    let rules = yaml_file("docker/prometheus/alerts.yml");
    let tests = yaml_file("docker/prometheus/alerts_test.yml");
    let mut fires = BTreeSet::new();
    let mut quiet = BTreeSet::new();
    for test in tests["tests"].as_array().expect("tests") {
        for case in test["alert_rule_test"].as_array().expect("alert_rule_test") {
            let name = scalar(&case["alertname"]);
            if case["exp_alerts"].as_array().is_some_and(|a| !a.is_empty()) {
                fires.insert(name);
            } else {
                quiet.insert(name);
            }
        }
    }
    let mut alerts = BTreeSet::new();
    for group in rules["groups"].as_array().expect("groups") {
        for rule in group["rules"].as_array().expect("rules") {
            let name = scalar(&rule["alert"]);
            assert!(!name.is_empty(), "only alerting rules: {rule}");
            assert!(rule["labels"]["severity"].is_string(), "{name}: severity");
            assert!(
                rule["annotations"]["summary"].is_string(),
                "{name}: summary"
            );
            assert!(
                rule["annotations"]["description"].is_string(),
                "{name}: description"
            );
            assert!(fires.contains(&name), "{name}: no test where it fires");
            assert!(
                quiet.contains(&name),
                "{name}: no test where it stays quiet"
            );
            alerts.insert(name);
        }
    }
    assert!(alerts.len() >= 5, "{alerts:?}");
}

// ---- metric names ----------------------------------------------------------------------------

/// Metric names a PromQL expression selects (not functions, keywords, labels or durations).
fn metric_names(expr: &str) -> BTreeSet<String> {
    const KEYWORDS: [&str; 11] = [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "and",
        "or",
        "unless",
        "offset",
        "bool",
    ];
    const AGGREGATIONS: [&str; 14] = [
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio",
    ];
    let chars: Vec<char> = expr.chars().collect();
    let word_char = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let skip_past = |mut i: usize, end: char| {
        while i < chars.len() && chars[i] != end {
            i += 1;
        }
        i + 1
    };
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            i += 1;
            while i < chars.len() && chars[i] != c {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
        } else if c == '{' {
            i = skip_past(i, '}');
        } else if c == '[' {
            i = skip_past(i, ']');
        } else if c == '#' {
            i = skip_past(i, '\n');
        } else if c.is_ascii_digit() || c == '.' || c == '$' {
            // Numbers, durations (10m), exponents (1e3), Grafana variables.
            i += 1;
            while i < chars.len() && (word_char(chars[i]) || chars[i] == '.') {
                i += 1;
            }
        } else if word_char(c) {
            let start = i;
            while i < chars.len() && word_char(chars[i]) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut j = i;
            while j < chars.len() && chars[j].is_whitespace() {
                j += 1;
            }
            let next = chars.get(j).copied();
            if KEYWORDS.contains(&word.as_str()) {
                if next == Some('(') && !matches!(word.as_str(), "and" | "or" | "unless") {
                    i = skip_past(j, ')'); // a label list
                }
            } else if next == Some('(')
                || AGGREGATIONS.contains(&word.as_str())
                || matches!(word.to_ascii_lowercase().as_str(), "inf" | "nan")
            {
                // A function or an aggregation, or a number.
            } else {
                names.insert(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

#[test]
fn metric_names_are_found_in_expressions() {
    let names = metric_names(
        "histogram_quantile(0.99, sum by (service, le) (rate(a_bucket{service=~\"$service\"}[$__rate_interval])))\n\
         and on (service) (sum by (service) (rate(b_total[5m])) > 0)\n\
         or sum without (x) (c unless d offset 10m) / count(e) > bool 1e3 or vector(0)",
    );
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        ["a_bucket", "b_total", "c", "d", "e"]
    );
}

/// Every series name kop exports, from a real registry of the daemons.
fn kop_metric_names() -> BTreeSet<String> {
    let m = kop::metrics::Metrics::new("ops-files-test", "test").expect("metrics");
    // Vectors show up once they have a child.
    for vec in [
        &m.consumed,
        &m.produced,
        &m.handler_errors,
        &m.retries,
        &m.dead_letters,
        &m.transactions,
        &m.http_requests,
    ] {
        vec.with_label_values(&["x"]).inc();
    }
    m.consumer_lag.with_label_values(&["x", "0"]).set(1);
    m.http_duration
        .with_label_values(&["GET", "/x"])
        .observe(0.1);
    let mut names = BTreeSet::new();
    for line in m.render().lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut parts = rest.split_whitespace();
        let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
            continue;
        };
        match kind {
            "histogram" => {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
            "summary" => {
                for suffix in ["", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
            _ => {
                names.insert(name.to_string());
            }
        }
    }
    assert!(
        names.contains("process_resident_memory_bytes"),
        "process metrics: {names:?}"
    );
    names
}

#[test]
fn alerts_use_only_metrics_kop_exports() {
    let known = kop_metric_names();
    let rules = yaml_file("docker/prometheus/alerts.yml");
    for group in rules["groups"].as_array().expect("groups") {
        for rule in group["rules"].as_array().expect("rules") {
            let expr = scalar(&rule["expr"]);
            let names = metric_names(&expr);
            assert!(!names.is_empty(), "{expr}");
            for name in names {
                // `up` is Prometheus' own, for every target.
                assert!(
                    name == "up" || known.contains(&name),
                    "alert {}: `{name}` is not a metric kop exports ({known:?})",
                    rule["alert"]
                );
            }
        }
    }
}

// ---- (d) Grafana -----------------------------------------------------------------------------

fn dashboard() -> Value {
    let text = std::fs::read_to_string(repo().join("docker/grafana/dashboards/kop.json"))
        .expect("docker/grafana/dashboards/kop.json");
    serde_json::from_str(&text).expect("the dashboard is JSON")
}

/// Every panel that queries (rows only group panels; collapsed rows hold theirs).
fn query_panels(dashboard: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        if panel["type"] == "row" {
            out.extend(panel["panels"].as_array().into_iter().flatten());
        } else {
            out.push(panel);
        }
    }
    out
}

#[test]
fn dashboard_queries_kop_through_the_provisioned_datasource() {
    let dashboard = dashboard();
    assert_eq!(dashboard["uid"], "kop");
    assert!(dashboard["title"].as_str().is_some_and(|t| !t.is_empty()));
    let known = kop_metric_names();
    let panels = query_panels(&dashboard);
    assert!(panels.len() >= 10, "{} panels", panels.len());
    let mut ids = BTreeSet::new();
    let mut titles = BTreeSet::new();
    for panel in &panels {
        let title = scalar(&panel["title"]);
        assert!(
            ids.insert(panel["id"].as_u64().expect("panel id")),
            "{title}: id"
        );
        assert!(titles.insert(title.clone()), "two panels named {title}");
        assert_eq!(panel["datasource"]["uid"], "prometheus", "{title}");
        assert_eq!(panel["datasource"]["type"], "prometheus", "{title}");
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no query");
        let mut refs = BTreeSet::new();
        for target in targets {
            let expr = scalar(&target["expr"]);
            assert!(!expr.trim().is_empty(), "{title}: empty query");
            assert!(refs.insert(scalar(&target["refId"])), "{title}: refId");
            if !target["datasource"].is_null() {
                assert_eq!(target["datasource"]["uid"], "prometheus", "{title}");
            }
            // Ranges follow Grafana's interval, never a fixed duration.
            for range in expr.split('[').skip(1) {
                let range = range.split(']').next().unwrap_or_default();
                assert!(
                    matches!(range, "$__rate_interval" | "$__range" | "$__interval"),
                    "{title}: `[{range}]` in {expr}; use [$__rate_interval]"
                );
            }
            for name in metric_names(&expr) {
                assert!(
                    known.contains(&name),
                    "{title}: `{name}` is not a metric kop exports"
                );
            }
        }
    }
    for variable in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if variable["type"] == "query" {
            assert_eq!(variable["datasource"]["uid"], "prometheus");
        }
    }
}

#[test]
fn grafana_is_provisioned_with_the_datasource_and_the_dashboard() {
    let compose = compose();
    let (_, grafana) = find_by_image(&compose, "grafana/grafana");
    assert!(ports(grafana).contains(&(3000, 3000)));
    let env = environment(grafana);
    assert_eq!(
        env.get("GF_SECURITY_ADMIN_USER").map(String::as_str),
        Some("admin")
    );
    assert_eq!(
        env.get("GF_SECURITY_ADMIN_PASSWORD").map(String::as_str),
        Some("admin")
    );
    assert_eq!(
        mount_target(grafana, "docker/grafana/provisioning").as_deref(),
        Some("/etc/grafana/provisioning")
    );
    let dashboards_dir =
        mount_target(grafana, "docker/grafana/dashboards").expect("dashboards mounted");

    let datasources = yaml_file("docker/grafana/provisioning/datasources/prometheus.yml");
    let datasource = &datasources["datasources"][0];
    assert_eq!(datasource["uid"], "prometheus");
    assert_eq!(datasource["type"], "prometheus");
    // The URL names the compose service and the port Prometheus listens on.
    let (prometheus_name, prometheus) = find_by_image(&compose, "prom/prometheus");
    let port = ports(prometheus)[0].1;
    assert_eq!(
        scalar(&datasource["url"]),
        format!("http://{prometheus_name}:{port}")
    );

    let providers = yaml_file("docker/grafana/provisioning/dashboards/kop.yml");
    let provider = &providers["providers"][0];
    assert_eq!(provider["type"], "file");
    assert_eq!(scalar(&provider["options"]["path"]), dashboards_dir);
    if let Some(home) = env.get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH") {
        assert_eq!(home, &format!("{dashboards_dir}/kop.json"));
    }
}

// ---- (e) the template units of systemd/ ----------------------------------------------------

/// A unit file's settings by section, in order, comments and blank lines aside.
fn unit_sections(path: &Path) -> BTreeMap<String, Vec<String>> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut sections: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut section = String::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if line.starts_with('[') {
            section = line.to_string();
            sections.entry(section.clone()).or_default();
        } else {
            sections
                .entry(section.clone())
                .or_default()
                .push(line.to_string());
        }
    }
    sections
}

/// kop-<stage>@.service runs instances of kop-<stage>.service: the same unit, sandbox and
/// all, but for the instance in its description, its instance id and its own environment
/// file (the metrics port). kop-order has no template: several APIs on one host would each
/// need a port of their own and something in front to spread the requests; more hosts do it.
#[test]
fn template_units_are_their_plain_units_plus_the_instance() {
    let systemd = repo().join("systemd");
    assert!(
        !systemd.join("kop-order@.service").exists(),
        "kop-order has no template (see this test's comment)"
    );
    for stage in ["payment", "inventory", "notification"] {
        let plain = unit_sections(&systemd.join(format!("kop-{stage}.service")));
        let mut template = unit_sections(&systemd.join(format!("kop-{stage}@.service")));
        let name = format!("kop-{stage}@.service");

        let unit = template.get_mut("[Unit]").expect("[Unit]");
        let description = unit
            .iter_mut()
            .find(|l| l.starts_with("Description="))
            .unwrap_or_else(|| panic!("{name}: no Description="));
        assert!(
            description.contains(&format!("kop {stage} stage, instance %i (")),
            "{name}: {description}"
        );
        *description = description.replacen(", instance %i", "", 1);

        let service = template.get_mut("[Service]").expect("[Service]");
        let instance = [
            "Environment=KOP_INSTANCE_ID=%H-%i".to_string(),
            format!("EnvironmentFile=/etc/kop/{stage}@%i.env"),
        ];
        for line in &instance {
            assert!(service.contains(line), "{name}: no {line}");
        }
        service.retain(|l| !instance.contains(l));

        assert_eq!(
            template, plain,
            "{name} differs from kop-{stage}.service beyond the instance"
        );
    }
}
