//! ./start.sh, the one-command platform: it starts a broker and the four daemons (and
//! Prometheus when installed), an order goes through, Ctrl-C stops everything it started,
//! and a second run works on the same broker data.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::*;

struct Platform {
    child: Child,
    output: std::sync::mpsc::Receiver<String>,
}

impl Platform {
    /// Runs start.sh in a process group of its own (so SIGINT reaches only it, as Ctrl-C
    /// would) and waits for its "kop is running" banner.
    fn start(env: &[(&str, String)]) -> Platform {
        let mut child = Command::new("setsid")
            .arg(repo().join("start.sh"))
            .current_dir(repo())
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env_remove("KAFKA_BROKERS")
            .env_remove("METRICS_PORT")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run start.sh");
        let (tx, output) = std::sync::mpsc::channel();
        for stream in [
            Box::new(child.stdout.take().expect("stdout")) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().expect("stderr")),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let _ = tx.send(line);
                }
            });
        }
        let mut platform = Platform { child, output };
        platform.wait_for("kop is running", Duration::from_secs(600));
        platform
    }

    fn wait_for(&mut self, text: &str, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self
                .output
                .recv_timeout(left.min(Duration::from_millis(500)))
            {
                Ok(line) => {
                    let found = line.contains(text);
                    seen.push(line);
                    if found {
                        return seen;
                    }
                }
                Err(_) if Instant::now() >= deadline => {
                    panic!("start.sh never said {text:?}:\n{}", seen.join("\n"))
                }
                Err(_) => {}
            }
        }
    }

    /// Ctrl-C: SIGINT to start.sh's process group.
    fn interrupt(mut self) {
        let pgid = self.child.id();
        let status = Command::new("kill")
            // "--": procps-ng 4.0's kill reads "-INT -123" as signalling pid -1 (everything).
            .args(["-INT", "--", &format!("-{pgid}")])
            .status()
            .expect("kill");
        assert!(status.success());
        self.wait_for("start.sh: stopped", Duration::from_secs(60));
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.child.try_wait().expect("wait").is_none() {
            assert!(Instant::now() < deadline, "start.sh did not exit");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Platform {
    /// A failed test must not leave the platform running: Ctrl-C it, then kill what is left.
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let group = format!("-{}", self.child.id());
            let _ = Command::new("kill").args(["-INT", "--", &group]).status();
            let deadline = Instant::now() + Duration::from_secs(60);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
            let _ = self.child.wait();
        }
    }
}

/// Processes whose standard output goes to a file under `dir`: what start.sh started
/// there (the daemons and Prometheus log into its run directory).
fn processes_logging_into(dir: &std::path::Path) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/fd/1"))
                .is_ok_and(|target| target.starts_with(dir))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn start_sh_runs_the_platform_and_ctrl_c_stops_it() {
    let _turn = crate::take_turn().await;
    let _ = brokers();
    let state = std::env::temp_dir().join(unique("kop-start-broker"));
    let run_dir = std::env::temp_dir().join(unique("kop-start-run"));
    let api_port = free_port();
    let env = [
        ("KOP_KAFKA_STATE", state.display().to_string()),
        ("KAFKA_PORT", free_port().to_string()),
        ("KOP_RUN_DIR", run_dir.display().to_string()),
        ("PORT", api_port.to_string()),
    ];
    for run in ["first", "second"] {
        let platform = tokio::task::block_in_place(|| Platform::start(&env));
        let (status, body) = post_order(api_port, &format!("start-{run}"), 42.0).await;
        assert_eq!(status, 202, "{run} run: {body}");
        if Command::new("prometheus").arg("--version").output().is_ok() {
            let deadline = Instant::now() + Duration::from_secs(60);
            while http_get(9090, "/-/ready").await.map(|(code, _)| code) != Ok(200) {
                assert!(
                    Instant::now() < deadline,
                    "Prometheus started by start.sh never ready"
                );
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
        let started = processes_logging_into(&run_dir);
        assert!(
            started.len() >= 4,
            "the four daemons log into the run dir: {started:?}"
        );
        tokio::task::block_in_place(|| platform.interrupt());
        let left = processes_logging_into(&run_dir);
        assert!(
            left.is_empty(),
            "{run} run: processes outlived Ctrl-C: {left:?}"
        );
        let status = harness(&state).status().expect("broker status");
        assert!(
            !status.running(),
            "the broker start.sh started is stopped: {status:?}"
        );
    }
    let _ = harness(&state).reset();
    let _ = std::fs::remove_dir_all(&run_dir);
}
