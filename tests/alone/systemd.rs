//! The systemd units (systemd/) under a real systemd: runs scripts/systemd-test.sh, which
//! boots a Debian bookworm container with systemd-nspawn, installs the release binaries,
//! the units and the configuration in it as a package would, and checks start/stop of
//! kop.target, READY=1, orders end to end, the journal fields, reload, restart after
//! SIGKILL, the watchdog, no restart after a configuration error (exit 78), a configuration
//! handed over with LoadCredential=, the units' hardening, and two instances of
//! kop-payment from its template sharing the partitions, each order still handled once.
//! Needs root and the test broker; it fails (never skips) without them.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support;

/// A cold run debootstraps the container tree and builds the release binaries from
/// scratch; a warm one takes a minute or two.
const TIMEOUT: Duration = Duration::from_secs(40 * 60);

#[test]
fn units_work_under_a_real_systemd() {
    let _turn = crate::take_turn_blocking();
    let brokers = support::brokers();
    let script = support::repo().join("scripts/systemd-test.sh");
    let log = std::env::temp_dir().join(format!("kop-systemd-test-{}.log", support::unique("run")));
    let output = std::fs::File::create(&log).expect("log file");
    let mut child = Command::new(&script)
        .env("KOP_TEST_BROKERS", &brokers)
        .stdin(Stdio::null())
        .stdout(output.try_clone().expect("log file"))
        .stderr(output)
        // A group of its own: on timeout, the script and its container get SIGTERM together.
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));

    let started = Instant::now();
    let mut timed_out = false;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if !timed_out && started.elapsed() > TIMEOUT {
            // SIGTERM lets the script power the container off and delete its copy.
            timed_out = true;
            signal_group(child.id(), "TERM");
        }
        if timed_out && started.elapsed() > TIMEOUT + Duration::from_secs(90) {
            signal_group(child.id(), "KILL");
            break child.wait().expect("wait");
        }
        std::thread::sleep(Duration::from_millis(500));
    };

    let mut text = String::new();
    std::fs::File::open(&log)
        .and_then(|mut f| f.read_to_string(&mut text))
        .expect("read the script's output");
    let _ = std::fs::remove_file(&log);
    // Shown by the test harness when the test fails (or with --nocapture).
    println!("{text}");
    assert!(
        !timed_out && status.success(),
        "scripts/systemd-test.sh {} after {:?} ({status}); its output is above",
        if timed_out { "timed out" } else { "failed" },
        started.elapsed(),
    );
}

fn signal_group(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{signal}"), "--", &format!("-{pid}")])
        .status();
}
