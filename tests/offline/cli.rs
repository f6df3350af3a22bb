//! The command lines of kopctl and kop-load where no broker is reached: usage errors, a bad
//! librdkafka property, a missing configuration directory. What they do against a broker
//! is in tests/broker (kopctl, load).

use std::process::Command;

use crate::support::*;

/// Runs one of the package's binaries; KAFKA_BROKERS names a port nobody listens on, so
/// nothing here can depend on a broker.
fn run(name: &str, args: &[&str]) -> (i32, String, String) {
    let output = Command::new(binary(name))
        .args(args)
        .env("KAFKA_BROKERS", format!("127.0.0.1:{}", free_port()))
        .output()
        .unwrap_or_else(|e| panic!("run {name}: {e}"));
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn kop_load_refuses_bad_flags() {
    let (code, _, err) = run("kop-load", &["--rps", "0"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--rps"));
    let (code, _, err) = run("kop-load", &["--duration", "soon"]);
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = run("kop-load", &["--concurrency", "0"]);
    assert_eq!(code, 2, "{err}");
}

#[test]
fn kopctl_reports_bad_arguments_and_kafka_properties() {
    let (code, _, err) = run("kopctl", &["dlq", "replay"]);
    assert_eq!(code, 2, "clap usage error: {err}");
    let (code, _, err) = run("kopctl", &["-X", "no.such.property=1", "dlq", "list", "x"]);
    assert_ne!(code, 0);
    assert!(err.contains("no.such.property"), "{err}");
}

#[test]
fn kopctl_topics_ensure_refuses_a_missing_config_dir() {
    let (code, _, err) = run(
        "kopctl",
        &["topics", "ensure", "--config-dir", "/nonexistent/kop"],
    );
    assert_eq!(code, 78, "{err}");
    assert!(err.contains("/nonexistent/kop"), "{err}");
}
