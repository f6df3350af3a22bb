//! The service-manager protocol as systemd sees it: the daemons talk to a NOTIFY_SOCKET of
//! the test's own, so READY=1, STATUS=, WATCHDOG=1 and STOPPING=1 can be watched.

use std::os::unix::net::UnixDatagram as StdUnixDatagram;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::support::*;
use tokio::net::UnixDatagram;

/// WATCHDOG_USEC given to the daemons: 400 ms, so they ping every 100 ms.
const WATCHDOG_USEC: &str = "400000";

/// A notification socket bound at a temporary path (removed when dropped), and the
/// datagrams received so far.
struct NotifySocket {
    path: PathBuf,
    socket: UnixDatagram,
    received: Vec<(Instant, String)>,
}

impl NotifySocket {
    fn bind() -> Self {
        // sun_path holds at most 107 bytes: keep it short.
        let path = PathBuf::from(format!("/tmp/{}.sock", unique("kop-notify")));
        let _ = std::fs::remove_file(&path);
        let std_socket = StdUnixDatagram::bind(&path).expect("bind NOTIFY_SOCKET");
        std_socket.set_nonblocking(true).expect("nonblocking");
        let socket = UnixDatagram::from_std(std_socket).expect("tokio socket");
        NotifySocket {
            path,
            socket,
            received: Vec::new(),
        }
    }

    /// Receives the next datagram, or `None` after `timeout`.
    async fn next(&mut self, timeout: Duration) -> Option<String> {
        let mut buffer = vec![0u8; 64 * 1024];
        match tokio::time::timeout(timeout, self.socket.recv(&mut buffer)).await {
            Ok(Ok(n)) => {
                let text = String::from_utf8_lossy(&buffer[..n]).into_owned();
                self.received.push((Instant::now(), text.clone()));
                Some(text)
            }
            Ok(Err(e)) => panic!("recv on NOTIFY_SOCKET: {e}"),
            Err(_) => None,
        }
    }

    /// Receives datagrams until one has the line `wanted` (e.g. `READY=1`); returns it.
    /// Fails after `timeout`, or if the daemon exits first.
    async fn wait_for(&mut self, daemon: &mut Daemon, wanted: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(message) = self.next(Duration::from_millis(200)).await
                && has_line(&message, wanted)
            {
                return message;
            }
            if let Some(status) = daemon.child.try_wait().expect("try_wait") {
                // Whatever it sent before exiting is still in the socket.
                while let Some(message) = self.next(Duration::from_millis(50)).await {
                    if has_line(&message, wanted) {
                        return message;
                    }
                }
                panic!(
                    "{} exited ({status}) before sending {wanted}; got {:?}; log:\n{}",
                    daemon.name,
                    self.lines(),
                    daemon.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} sent no {wanted} within {timeout:?}; got {:?}; log:\n{}",
                daemon.name,
                self.lines(),
                daemon.log_text()
            );
        }
    }

    /// Receives datagrams until one has a `STATUS=` line containing `needle`; returns that
    /// status. Fails after `timeout`, or if the daemon exits first.
    async fn wait_for_status(
        &mut self,
        daemon: &mut Daemon,
        needle: &str,
        timeout: Duration,
    ) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(message) = self.next(Duration::from_millis(200)).await
                && let Some(status) = status_of(&message).filter(|s| s.contains(needle))
            {
                return status.to_string();
            }
            assert!(
                daemon.child.try_wait().expect("try_wait").is_none(),
                "{} exited before a STATUS with {needle:?}; got {:?}; log:\n{}",
                daemon.name,
                self.lines(),
                daemon.log_text()
            );
            assert!(
                Instant::now() < deadline,
                "{} sent no STATUS with {needle:?} within {timeout:?}; got {:?}",
                daemon.name,
                self.lines()
            );
        }
    }

    /// Collects every datagram arriving within `period`.
    async fn collect(&mut self, period: Duration) -> Vec<String> {
        let until = Instant::now() + period;
        let mut out = Vec::new();
        while let Some(left) = until.checked_duration_since(Instant::now()) {
            match self.next(left).await {
                Some(message) => out.push(message),
                None => break,
            }
        }
        out
    }

    /// Every line received so far, in order.
    fn lines(&self) -> Vec<String> {
        self.received
            .iter()
            .flat_map(|(_, m)| m.lines().map(str::to_string))
            .collect()
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// SIGTERM: STOPPING=1, then exit status 0.
async fn stops_cleanly(socket: &mut NotifySocket, daemon: &mut Daemon) {
    daemon.signal("TERM");
    socket
        .wait_for(daemon, "STOPPING=1", Duration::from_secs(30))
        .await;
    assert_eq!(
        daemon.wait_exit(Duration::from_secs(30)),
        Some(0),
        "{}",
        daemon.log_text()
    );
}

fn has_line(message: &str, line: &str) -> bool {
    message.lines().any(|l| l == line)
}

fn status_of(message: &str) -> Option<&str> {
    message.lines().find_map(|l| l.strip_prefix("STATUS="))
}

/// Like the harness's `Daemon::spawn`, but with the service-manager variables set:
/// NOTIFY_SOCKET and WATCHDOG_USEC (the harness removes them). WATCHDOG_PID is removed
/// unless given: sd-notify's `watchdog_enabled()` accepts an unset WATCHDOG_PID, and a set
/// one only when it is the daemon's own pid.
fn spawn_notified(
    service: &str,
    env: &[(String, String)],
    log_dir: &Path,
    socket: &Path,
    watchdog_pid: Option<&str>,
) -> Daemon {
    spawn_notified_with(
        service,
        env,
        log_dir,
        &shipped_config(service),
        socket,
        watchdog_pid,
    )
}

fn spawn_notified_with(
    service: &str,
    env: &[(String, String)],
    log_dir: &Path,
    config: &Path,
    socket: &Path,
    watchdog_pid: Option<&str>,
) -> Daemon {
    Daemon::launch(service, env, log_dir, config, |command| {
        command
            .env("NOTIFY_SOCKET", socket)
            .env("WATCHDOG_USEC", WATCHDOG_USEC);
        if let Some(pid) = watchdog_pid {
            command.env("WATCHDOG_PID", pid);
        }
    })
}

/// READY=1 (and /readyz 200 from then on) with a STATUS naming `topic`, WATCHDOG=1 every
/// so often while running, STOPPING=1 and exit 0 on SIGTERM.
async fn full_protocol(service: &str, topic_in_status: impl Fn(&Pipeline) -> String) {
    let pipeline = Pipeline::new();
    let mut socket = NotifySocket::bind();
    let env = pipeline.env_for(service, &[]);
    let mut daemon = spawn_notified(service, &env, &pipeline.log_dir, &socket.path, None);

    let ready = socket
        .wait_for(&mut daemon, "READY=1", Duration::from_secs(90))
        .await;
    // Readiness is set before READY=1 is sent: the probe agrees at once.
    let (code, body) = http_get(daemon.metrics_port, "/readyz")
        .await
        .expect("/readyz");
    assert_eq!(code, 200, "{service}: /readyz after READY=1: {body}");
    // Nothing said READY=1 before, and something said why the daemon was not ready yet.
    let before: Vec<String> = socket.lines();
    assert_eq!(
        before.iter().filter(|l| *l == "READY=1").count(),
        1,
        "{service}: one READY=1 so far: {before:?}"
    );
    let status = status_of(&ready)
        .unwrap_or_else(|| panic!("{service}: READY=1 comes with a STATUS: {ready:?}"));
    let topic = topic_in_status(&pipeline);
    assert!(
        status.contains(&topic),
        "{service}: STATUS {status:?} names {topic}"
    );
    assert!(
        before
            .iter()
            .any(|l| l.starts_with("STATUS=connecting to Kafka")),
        "{service}: a STATUS while connecting: {before:?}"
    );

    // The watchdog: WATCHDOG_USEC is 400 ms, so pings come every ~100 ms. Only their
    // number within a generous window is checked, not their spacing.
    let window = socket.collect(Duration::from_secs(3)).await;
    let pings: Vec<Instant> = socket
        .received
        .iter()
        .filter(|(_, m)| has_line(m, "WATCHDOG=1"))
        .map(|(t, _)| *t)
        .collect();
    assert!(
        pings.len() >= 3,
        "{service}: several WATCHDOG=1 within 3 s of READY=1, got {}: {window:?}; log:\n{}",
        pings.len(),
        daemon.log_text()
    );
    let widest = pings
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default();
    eprintln!(
        "{service}: {} WATCHDOG=1 in 3 s, widest gap {widest:?}",
        pings.len()
    );
    assert!(
        daemon.child.try_wait().expect("try_wait").is_none(),
        "{service} still runs"
    );

    daemon.signal("TERM");
    let stopping = socket
        .wait_for(&mut daemon, "STOPPING=1", Duration::from_secs(30))
        .await;
    assert!(
        status_of(&stopping).is_some_and(|s| s.contains("stopping")),
        "{service}: STOPPING=1 comes with a STATUS: {stopping:?}"
    );
    let code = daemon.wait_exit(Duration::from_secs(30));
    assert_eq!(
        code,
        Some(0),
        "{service}: exit status after SIGTERM; log:\n{}",
        daemon.log_text()
    );
    // Whatever came after STOPPING=1: no READY=1 again.
    let after = socket.collect(Duration::from_millis(300)).await;
    assert!(
        !after.iter().any(|m| has_line(m, "READY=1")),
        "{service}: no READY=1 after STOPPING=1: {after:?}"
    );
    let log = daemon.log_text();
    assert!(log.contains("stopped"), "{service} logged its stop:\n{log}");
    let said: Vec<String> = socket
        .lines()
        .into_iter()
        .filter(|l| l != "WATCHDOG=1")
        .collect();
    eprintln!("{service}: notifications other than WATCHDOG=1: {said:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn payment_speaks_sd_notify() {
    full_protocol("payment", |p| p.orders.clone()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn order_speaks_sd_notify() {
    full_protocol("order", |p| p.orders.clone()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn notification_speaks_sd_notify() {
    full_protocol("notification", |p| p.reserved.clone()).await;
}

/// WATCHDOG_PID naming another process means the watchdog is not this daemon's: READY=1
/// comes, WATCHDOG=1 never does.
#[tokio::test(flavor = "multi_thread")]
async fn watchdog_pid_of_another_process_disables_the_pings() {
    let pipeline = Pipeline::new();
    for service in ["payment", "order"] {
        let mut socket = NotifySocket::bind();
        let env = pipeline.env_for(service, &[]);
        // PID 1 is never the daemon.
        let mut daemon = spawn_notified(service, &env, &pipeline.log_dir, &socket.path, Some("1"));
        socket
            .wait_for(&mut daemon, "READY=1", Duration::from_secs(90))
            .await;
        let window = socket.collect(Duration::from_millis(1500)).await;
        assert!(
            !window.iter().any(|m| has_line(m, "WATCHDOG=1")),
            "{service}: no WATCHDOG=1 with WATCHDOG_PID=1: {window:?}"
        );
        stops_cleanly(&mut socket, &mut daemon).await;
    }
}

/// `[simulate] stall = true` stops the processing loop while the process stays up: the
/// watchdog pings stop, so systemd would restart the daemon. SIGTERM still stops it cleanly.
#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_stage_stops_pinging_the_watchdog() {
    let pipeline = Pipeline::new();
    let mut socket = NotifySocket::bind();
    let config = pipeline.log_dir.join("payment-stalled.toml");
    std::fs::write(&config, "[simulate]\nstall = true\n").expect("write config");
    let env = pipeline.env_for("payment", &[]);
    let mut daemon = spawn_notified_with(
        "payment",
        &env,
        &pipeline.log_dir,
        &config,
        &socket.path,
        None,
    );
    socket
        .wait_for(&mut daemon, "READY=1", Duration::from_secs(90))
        .await;
    let window = socket.collect(Duration::from_millis(1500)).await;
    assert!(
        !window.iter().any(|m| has_line(m, "WATCHDOG=1")),
        "a stalled loop sends no WATCHDOG=1: {window:?}"
    );
    assert!(
        daemon.log_text().contains("simulate.stall"),
        "{}",
        daemon.log_text()
    );
    stops_cleanly(&mut socket, &mut daemon).await;
}

/// With the broker unreachable a daemon waits it out: it says why in STATUS, is not ready
/// (no READY=1, /readyz 503), and still stops cleanly on SIGTERM.
#[tokio::test(flavor = "multi_thread")]
async fn waiting_for_kafka_is_not_ready_and_stops_cleanly() {
    let pipeline = Pipeline::new();
    // A port nobody listens on.
    let nowhere = format!("127.0.0.1:{}", free_port());
    for service in ["payment", "order"] {
        let mut socket = NotifySocket::bind();
        let env = pipeline.env_for(service, &[("KAFKA_BROKERS", nowhere.as_str())]);
        let mut daemon = spawn_notified(service, &env, &pipeline.log_dir, &socket.path, None);
        let first = socket
            .wait_for_status(&mut daemon, "Kafka", Duration::from_secs(30))
            .await;
        assert!(
            first.contains(&nowhere),
            "{service}: STATUS names the brokers: {first:?}"
        );
        // The metrics server answers, and says not ready, for a while.
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            match http_get(daemon.metrics_port, "/readyz").await {
                Ok((code, _)) => assert_eq!(code, 503, "{service}: /readyz without Kafka"),
                Err(e) => assert!(
                    daemon.child.try_wait().expect("try_wait").is_none(),
                    "{service} exited without Kafka ({e}); log:\n{}",
                    daemon.log_text()
                ),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let (code, _) = http_get(daemon.metrics_port, "/healthz")
            .await
            .expect("/healthz");
        assert_eq!(code, 200, "{service}: alive while waiting for Kafka");
        daemon.signal("TERM");
        socket
            .wait_for(&mut daemon, "STOPPING=1", Duration::from_secs(30))
            .await;
        assert_eq!(
            daemon.wait_exit(Duration::from_secs(30)),
            Some(0),
            "{service}: exit status; log:\n{}",
            daemon.log_text()
        );
        let lines = socket.lines();
        assert!(
            !lines.iter().any(|l| l == "READY=1" || l == "WATCHDOG=1"),
            "{service}: never ready, no watchdog pings: {lines:?}"
        );
        eprintln!("{service} without Kafka: {lines:?}");
    }
}

/// kop-order that cannot deliver says why in STATUS and /readyz, and after
/// `http.stall_timeout` of it exits non-zero, for systemd to start it afresh.
#[tokio::test(flavor = "multi_thread")]
async fn an_order_api_that_cannot_deliver_says_why_and_gives_up() {
    let _ = brokers();
    let broker = OwnBroker::start(
        std::env::temp_dir().join(unique("kop-give-up-broker")),
        free_port(),
    );
    let mut pipeline = Pipeline::new();
    pipeline
        .extra_env
        .push(("KAFKA_BROKERS".into(), broker.address.clone()));
    let stall_timeout = Duration::from_secs(5);
    let config = pipeline.log_dir.join("order-give-up.toml");
    std::fs::write(&config, "[http]\nstall_timeout = \"5s\"\n").expect("write config");
    let mut socket = NotifySocket::bind();
    let env = pipeline.env_for("order", &[]);
    let mut daemon = spawn_notified_with(
        "order",
        &env,
        &pipeline.log_dir,
        &config,
        &socket.path,
        None,
    );
    socket
        .wait_for(&mut daemon, "READY=1", Duration::from_secs(90))
        .await;
    assert_eq!(
        http_get(daemon.metrics_port, "/readyz").await.unwrap().0,
        200
    );

    tokio::task::block_in_place(|| broker.stop());
    let down_at = Instant::now();
    let why = socket
        .wait_for_status(&mut daemon, "cannot deliver", Duration::from_secs(15))
        .await;
    assert!(why.contains("no connection to any Kafka broker"), "{why}");
    assert_eq!(
        http_get(daemon.metrics_port, "/readyz").await.unwrap().0,
        503,
        "not ready while it cannot deliver"
    );
    let metrics = daemon.metrics().await;
    assert_eq!(metric(&metrics, "kop_order_cannot_deliver", &[]), 1.0);

    // The socket is read meanwhile: a full one would block the daemon's notifications.
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = daemon.child.try_wait().expect("try_wait") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "kop-order did not give up; log:\n{}",
            daemon.log_text()
        );
        socket.next(Duration::from_millis(100)).await;
    };
    while socket.next(Duration::from_millis(50)).await.is_some() {}
    let gave_up_after = down_at.elapsed();
    assert_eq!(status.code(), Some(1), "exit status after giving up");
    assert!(
        gave_up_after >= stall_timeout,
        "gave up {gave_up_after:?} after the broker went, before stall_timeout"
    );
    let lines = socket.lines();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("STATUS=giving up") && l.contains("no connection")),
        "{lines:?}"
    );
    assert!(
        daemon.log_text().contains("giving up"),
        "{}",
        daemon.log_text()
    );
    eprintln!("gave up {gave_up_after:.1?} after the broker went; {why}");
}
