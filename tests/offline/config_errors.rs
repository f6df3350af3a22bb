//! Bad configurations stop the daemons at once with sysexits' EX_CONFIG (78) and a message
//! naming where the bad value came from (the file and its key, or the environment
//! variable); `--check-config` accepts every shipped file. No Kafka needed: a daemon that
//! got past its configuration would try to connect and be killed by the timeout below.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::*;

const EX_CONFIG: i32 = 78;

/// What a finished run of a binary left behind.
struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs `kop-<service>` with the given arguments and only the given environment; kills it
/// (and fails) if it has not exited within 20 s.
fn run(service: &str, args: &[&str], env: &[(&str, &str)]) -> Outcome {
    let mut child = Command::new(binary(&format!("kop-{service}")))
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let stdout = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let stderr = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "kop-{service} {args:?} still running after 20 s (the configuration was accepted?); stderr:\n{}",
                stderr.join().unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Outcome {
        code: status.code(),
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    }
}

/// A temporary directory removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let path = std::env::temp_dir().join(unique("kop-config-errors"));
        std::fs::create_dir_all(&path).expect("temp dir");
        TempDir(path)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).expect("write config");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

/// Runs `service` with `--config <file with text>` and checks exit 78 and that stderr
/// contains the file's path and every one of `needles`. Returns stderr.
fn expect_config_error(
    service: &str,
    text: &str,
    env: &[(&str, &str)],
    needles: &[&str],
) -> String {
    let dir = TempDir::new();
    let path = dir.write(&format!("{service}-bad.toml"), text);
    let outcome = run(service, &["--config", path_str(&path)], env);
    assert_eq!(
        outcome.code,
        Some(EX_CONFIG),
        "kop-{service} with {text:?}: exit status; stderr:\n{}",
        outcome.stderr
    );
    assert!(
        outcome.stderr.contains(path_str(&path)),
        "kop-{service} with {text:?}: stderr names the file {}:\n{}",
        path.display(),
        outcome.stderr
    );
    for needle in needles {
        assert!(
            outcome.stderr.contains(needle),
            "kop-{service} with {text:?}: stderr names {needle:?}:\n{}",
            outcome.stderr
        );
    }
    outcome.stderr
}

const STAGES: [&str; 3] = ["payment", "inventory", "notification"];

#[test]
fn unknown_key_names_file_and_key() {
    for service in STAGES {
        expect_config_error(
            service,
            "[retry]\nmax_atempts = 3\n",
            &[],
            &["retry.max_atempts"],
        );
    }
    // kop-order has no [retry] section at all.
    expect_config_error("order", "[retry]\nmax_attempts = 3\n", &[], &["retry"]);
    expect_config_error(
        "order",
        "[http]\nlisten_port = 4000\n",
        &[],
        &["http.listen_port"],
    );
}

#[test]
fn wrong_type_names_file_and_key() {
    for service in STAGES {
        expect_config_error(
            service,
            "[retry]\nmax_attempts = \"three\"\n",
            &[],
            &["retry.max_attempts", "three"],
        );
    }
    expect_config_error(
        "order",
        "[http]\nmax_body_bytes = \"big\"\n",
        &[],
        &["http.max_body_bytes"],
    );
}

#[test]
fn bad_duration_names_file_key_and_value() {
    for service in STAGES {
        expect_config_error(
            service,
            "[stage]\ncommit_interval = \"soon\"\n",
            &[],
            &["stage.commit_interval", "soon"],
        );
    }
    expect_config_error(
        "payment",
        "[retry]\ndelays = [\"1s\", \"later\"]\n",
        &[],
        &["retry.delays", "later"],
    );
    expect_config_error(
        "order",
        "[http]\nproduce_timeout = \"whenever\"\n",
        &[],
        &["http.produce_timeout", "whenever"],
    );
}

#[test]
fn unknown_librdkafka_property_names_file_and_property() {
    for service in ["order", "payment", "inventory", "notification"] {
        expect_config_error(
            service,
            "[kafka]\n\"no.such.property\" = \"1\"\n",
            &[],
            &["no.such.property"],
        );
    }
}

#[test]
fn toml_syntax_error_names_the_file() {
    for service in ["order", "payment"] {
        let stderr = expect_config_error(service, "[stage\ninput = \"x\"\n", &[], &[]);
        assert!(
            stderr.contains("line 1"),
            "the position of the error: {stderr}"
        );
    }
}

#[test]
fn bad_environment_value_names_the_variable() {
    for (service, var, value) in [
        ("payment", "MAX_PROCESSING_ATTEMPTS", "abc"),
        ("inventory", "MAX_PROCESSING_ATTEMPTS", "abc"),
        ("payment", "PROCESSING_GUARANTEE", "maybe-once"),
        ("payment", "RETRY_DELAYS_MS", "100,soon"),
        ("order", "PORT", "eighty"),
        ("notification", "METRICS_PORT", "99999"),
        // Values that parse but break a rule checked later: still the variable's fault.
        ("payment", "MAX_PROCESSING_ATTEMPTS", "0"),
        ("order", "ORDER_TOPIC", "bad topic!"),
        ("payment", "ORDER_TOPIC", "bad topic!"),
        ("inventory", "INVENTORY_RESERVED_TOPIC", "no/slashes"),
        ("notification", "INVENTORY_DLQ_TOPIC", "x y"),
        ("payment", "KOP_INSTANCE_ID", "node 1"),
        ("order", "KOP_INSTANCE_ID", "node/1"),
        ("payment", "SIMULATE_FAILURE_RATE", "1.5"),
        ("inventory", "LOG_FORMAT", "xml"),
        ("payment", "MAX_PROCESSING_ATTEMPTS", "99999999999"),
        // A default made of a variable's value is that variable's.
        ("payment", "ORDER_TOPIC", "t".repeat(245).as_str()),
    ] {
        let config = repo().join(format!("etc/kop/{service}.toml"));
        let outcome = run(service, &["--config", path_str(&config)], &[(var, value)]);
        assert_eq!(
            outcome.code,
            Some(EX_CONFIG),
            "kop-{service} with {var}={value}: {}",
            outcome.stderr
        );
        assert!(
            outcome
                .stderr
                .contains(&format!("environment variable {var}")),
            "kop-{service} with {var}={value}: stderr names the variable:\n{}",
            outcome.stderr
        );
        assert!(
            outcome.stderr.contains(value),
            "stderr shows the value {value}:\n{}",
            outcome.stderr
        );
        // The file is fine; it is not the one blamed.
        assert!(
            !outcome.stderr.contains(path_str(&config)),
            "{}",
            outcome.stderr
        );
        assert_eq!(
            outcome.stderr.matches(var).count(),
            1,
            "the variable is named once:\n{}",
            outcome.stderr
        );
    }
}

/// The instance id is part of the transactional id and the client id: Kafka's characters
/// only, whether it comes from the file or (above) the environment.
#[test]
fn an_illegal_instance_id_names_file_and_key() {
    for service in ["order", "payment", "inventory", "notification"] {
        expect_config_error(
            service,
            "[service]\ninstance_id = \"node 1\"\n",
            &[],
            &["service.instance_id", "`node 1`", "not a legal instance id"],
        );
    }
    // Set, it overrides the file's; legal, it is accepted.
    let dir = TempDir::new();
    let path = dir.write("payment.toml", "[service]\ninstance_id = \"node 1\"\n");
    let outcome = run(
        "payment",
        &["--check-config", "--config", path_str(&path)],
        &[("KOP_INSTANCE_ID", "node-1.example_2")],
    );
    assert_eq!(outcome.code, Some(0), "{}", outcome.stderr);
}

#[test]
fn missing_config_file_names_the_path() {
    let dir = TempDir::new();
    for service in ["order", "payment", "inventory", "notification"] {
        let path = dir.0.join(format!("{service}-does-not-exist.toml"));
        let outcome = run(service, &["--config", path_str(&path)], &[]);
        assert_eq!(
            outcome.code,
            Some(EX_CONFIG),
            "kop-{service}: {}",
            outcome.stderr
        );
        assert!(
            outcome.stderr.contains(path_str(&path)),
            "kop-{service}: stderr names {}:\n{}",
            path.display(),
            outcome.stderr
        );
        // `--check-config` with a missing file is a configuration error too.
        let outcome = run(
            service,
            &["--check-config", "--config", path_str(&path)],
            &[],
        );
        assert_eq!(
            outcome.code,
            Some(EX_CONFIG),
            "kop-{service} --check-config: {}",
            outcome.stderr
        );
        assert!(
            outcome.stderr.contains(path_str(&path)),
            "{}",
            outcome.stderr
        );
    }
}

#[test]
fn check_config_accepts_every_shipped_file() {
    for service in ["order", "payment", "inventory", "notification"] {
        let path = repo().join(format!("etc/kop/{service}.toml"));
        let outcome = run(
            service,
            &["--check-config", "--config", path_str(&path)],
            &[],
        );
        assert_eq!(
            outcome.code,
            Some(0),
            "kop-{service} --check-config {}: stdout {} stderr {}",
            path.display(),
            outcome.stdout,
            outcome.stderr
        );
        assert!(
            outcome.stdout.contains(path_str(&path)) && outcome.stdout.contains("valid"),
            "kop-{service} --check-config says which file is valid: {}",
            outcome.stdout
        );
    }
}

#[test]
fn check_config_rejects_a_bad_file() {
    let dir = TempDir::new();
    for (service, text, key) in [
        ("order", "[http]\nmax_pending = 0\n", "http.max_pending"),
        ("payment", "[retry]\nmax_atempts = 3\n", "retry.max_atempts"),
        (
            "inventory",
            "[stage]\ncommit_interval = \"soon\"\n",
            "stage.commit_interval",
        ),
        (
            "notification",
            "[kafka]\n\"no.such.property\" = \"1\"\n",
            "no.such.property",
        ),
    ] {
        let path = dir.write(&format!("{service}.toml"), text);
        let outcome = run(
            service,
            &["--check-config", "--config", path_str(&path)],
            &[],
        );
        assert_eq!(
            outcome.code,
            Some(EX_CONFIG),
            "kop-{service} --check-config with {text:?}: {}",
            outcome.stderr
        );
        assert!(
            outcome.stderr.contains(path_str(&path)) && outcome.stderr.contains(key),
            "kop-{service} --check-config: stderr names the file and {key}:\n{}",
            outcome.stderr
        );
        assert!(
            !outcome.stdout.contains("valid"),
            "nothing claims it valid: {}",
            outcome.stdout
        );
    }
    // A bad environment value fails the check too, even with a good file.
    let shipped = repo().join("etc/kop/payment.toml");
    let outcome = run(
        "payment",
        &["--check-config", "--config", path_str(&shipped)],
        &[("MAX_PROCESSING_ATTEMPTS", "abc")],
    );
    assert_eq!(outcome.code, Some(EX_CONFIG), "{}", outcome.stderr);
    assert!(
        outcome.stderr.contains("MAX_PROCESSING_ATTEMPTS"),
        "{}",
        outcome.stderr
    );
}

/// `[kafka]` properties kop sets itself are refused, naming the key, rather than silently
/// overridden; the order API's record timeout is the user's to set.
#[test]
fn kafka_properties_kop_owns_are_refused() {
    for (service, key) in [
        ("payment", "enable.idempotence"),
        ("inventory", "isolation.level"),
        ("notification", "group.id"),
        ("payment", "message.timeout.ms"),
        ("order", "acks"),
    ] {
        expect_config_error(
            service,
            &format!("[kafka]\n\"{key}\" = \"1\"\n"),
            &[],
            &[&format!("kafka.\"{key}\""), "kop sets this property itself"],
        );
    }
    let dir = TempDir::new();
    let path = dir.write(
        "order.toml",
        "[kafka]\n\"message.timeout.ms\" = \"60000\"\n",
    );
    let outcome = run(
        "order",
        &["--config", path_str(&path), "--check-config"],
        &[],
    );
    assert_eq!(outcome.code, Some(0), "{}", outcome.stderr);
}
