//! Clients that hold on: slow heads, slow bodies, idle connections by the thousand and a
//! flood over the connection cap. Each is cut off by its own limit while a normal client
//! is still answered, and the daemon's memory and file descriptors stay bounded.

use std::time::{Duration, Instant};

use crate::support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const LIMITS: &str = "[http]\nheader_read_timeout = \"2s\"\nbody_read_timeout = \"2s\"\n\
                      idle_timeout = \"3s\"\n";

async fn connect(port: u16) -> TcpStream {
    TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to the API")
}

/// Reads until the server closes the connection; what it sent, and when it closed.
async fn until_closed(stream: &mut TcpStream, timeout: Duration) -> (String, Instant) {
    let mut received = Vec::new();
    let read = tokio::time::timeout(timeout, async {
        let mut buffer = [0u8; 4096];
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received.extend_from_slice(&buffer[..n]),
            }
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "the server kept the connection open for {timeout:?}"
    );
    (
        String::from_utf8_lossy(&received).into_owned(),
        Instant::now(),
    )
}

/// Open, and nothing to read yet: the server has neither answered nor closed it.
fn still_open(stream: &TcpStream) -> bool {
    let mut buffer = [0u8; 1];
    matches!(stream.try_read(&mut buffer), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| dir.count())
        .unwrap_or(0)
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

const ORDER: &str = r#"{"orderId":"slow-1","amount":1}"#;

fn head(content_length: usize) -> String {
    format!(
        "POST /order HTTP/1.1\r\nhost: kop\r\ncontent-type: application/json\r\n\
         content-length: {content_length}\r\n\r\n"
    )
}

/// One order on a new connection; the answer as text.
async fn post_fresh(port: u16, order_id: &str) -> String {
    let mut stream = connect(port).await;
    let body = format!(r#"{{"orderId":"{order_id}","amount":1}}"#);
    stream
        .write_all(format!("{}{body}", head(body.len())).as_bytes())
        .await
        .unwrap();
    let mut buffer = [0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buffer))
        .await
        .expect("an answer within 10 s")
        .unwrap_or(0);
    String::from_utf8_lossy(&buffer[..n]).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_and_idle_clients_are_cut_off_by_their_own_limits() {
    let mut pipeline = Pipeline::new();
    pipeline.start_with_config("order", &[], LIMITS).await;
    let port = pipeline.order_port;

    let opened = Instant::now();
    let mut idle = connect(port).await;
    let mut slow_head = connect(port).await;
    slow_head
        .write_all(b"POST /order HTTP/1.1\r\nhost: kop\r\n")
        .await
        .unwrap();
    let mut slow_body = connect(port).await;
    slow_body
        .write_all(format!("{}{}", head(ORDER.len()), &ORDER[..10]).as_bytes())
        .await
        .unwrap();
    // A keep-alive client: two requests on one connection, then silence.
    let mut kept = connect(port).await;
    for n in 0..2 {
        let body = format!(r#"{{"orderId":"{}-{n}","amount":1}}"#, unique("kept"));
        kept.write_all(format!("{}{body}", head(body.len())).as_bytes())
            .await
            .unwrap();
        let mut buffer = [0u8; 4096];
        let n = kept.read(&mut buffer).await.unwrap();
        let answer = String::from_utf8_lossy(&buffer[..n]);
        assert!(answer.starts_with("HTTP/1.1 202"), "{answer}");
    }
    let kept_idle_from = Instant::now();

    // A normal client is answered while all of them hold their connections.
    assert_eq!(post_order(port, &unique("normal"), 1.0).await.0, 202);
    for (name, stream) in [
        ("idle", &idle),
        ("slow head", &slow_head),
        ("slow body", &slow_body),
        ("kept alive", &kept),
    ] {
        assert!(
            still_open(stream),
            "{name}: closed before the normal client was answered"
        );
    }

    let wait = Duration::from_secs(15);
    let (answer, body_cut) = until_closed(&mut slow_body, wait).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "slow body: {answer}");
    assert!(answer.contains("did not arrive within 2s"), "{answer}");
    let (answer, head_cut) = until_closed(&mut slow_head, wait).await;
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "slow head: {answer}"
    );
    let (answer, idle_cut) = until_closed(&mut idle, wait).await;
    assert_eq!(answer, "", "idle connection: closed without a word");
    let (answer, kept_cut) = until_closed(&mut kept, wait).await;
    assert_eq!(answer, "", "kept-alive connection: closed without a word");

    let after = |at: Instant, from: Instant| at.duration_since(from).as_secs_f64();
    eprintln!(
        "cut off after: slow body {:.1}s, slow head {:.1}s, idle {:.1}s, kept-alive idle {:.1}s",
        after(body_cut, opened),
        after(head_cut, opened),
        after(idle_cut, opened),
        after(kept_cut, kept_idle_from)
    );
    // Each waited for its own limit: the header limit (2 s) did not close the idle ones,
    // which have idle_timeout (3 s).
    assert!(after(body_cut, opened) >= 2.0);
    assert!(after(head_cut, opened) >= 2.0);
    assert!(after(idle_cut, opened) >= 3.0);
    assert!(after(kept_cut, kept_idle_from) >= 3.0);
    let metrics = pipeline.daemon("order").metrics().await;
    assert!(metric(&metrics, "kop_http_connections_cut_off_total", &[]) >= 3.0);
    assert!(metric(&metrics, "http_requests_total", &[("status", "408")]) >= 1.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn thousands_of_idle_connections_and_a_flood_over_the_cap_stay_bounded() {
    // Phase 1: 3,000 idle connections, within the cap.
    let mut pipeline = Pipeline::new();
    let config = "[http]\nmax_connections = 4000\nidle_timeout = \"5m\"\n";
    pipeline.start_with_config("order", &[], config).await;
    let port = pipeline.order_port;
    let pid = pipeline.daemon("order").pid();
    assert_eq!(post_order(port, &unique("warm"), 1.0).await.0, 202);
    let (fds_before, rss_before) = (open_fds(pid), rss_kib(pid));
    let mut idle = Vec::new();
    for _ in 0..3_000 {
        idle.push(connect(port).await);
    }
    let answer = post_fresh(port, &unique("among-idle")).await;
    assert!(answer.starts_with("HTTP/1.1 202"), "{answer}");
    let (fds_idle, rss_idle) = (open_fds(pid), rss_kib(pid));
    let open = metric(
        &pipeline.daemon("order").metrics().await,
        "kop_http_connections_open",
        &[],
    );
    eprintln!(
        "3,000 idle connections: {} → {fds_idle} descriptors, RSS {rss_before} → {rss_idle} KiB \
         ({:.1} KiB each); {open} open",
        fds_before,
        (rss_idle.saturating_sub(rss_before)) as f64 / 3_000.0
    );
    assert!(
        idle.iter().all(still_open),
        "idle connections within the cap stay open"
    );
    assert!(fds_idle <= fds_before + 3_000 + 16);
    assert!(
        rss_idle.saturating_sub(rss_before) < 64 * 1024,
        "3,000 idle connections cost more than 64 MiB"
    );
    drop(idle);
    pipeline.daemons.clear();

    // Phase 2: a flood of 2,000 connections over a cap of 100.
    let mut pipeline = Pipeline::new();
    let config = "[http]\nmax_connections = 100\nidle_timeout = \"5m\"\n";
    pipeline.start_with_config("order", &[], config).await;
    let port = pipeline.order_port;
    let pid = pipeline.daemon("order").pid();
    assert_eq!(post_order(port, &unique("warm"), 1.0).await.0, 202);
    let (fds_before, rss_before) = (open_fds(pid), rss_kib(pid));
    let mut flood = Vec::new();
    let mut fds_peak = 0;
    for n in 0..2_000 {
        flood.push(connect(port).await);
        if n % 100 == 99 {
            fds_peak = fds_peak.max(open_fds(pid));
        }
    }
    // The daemon accepts the flood at its own pace; on a busy machine it may still be
    // working through the backlog, where a new connection waits behind the flood. The
    // client comes after it: every flood connection was taken in, kept, cut off or refused.
    let taken_in = Instant::now();
    loop {
        let metrics = pipeline.daemon("order").metrics().await;
        let seen = metric(&metrics, "kop_http_connections_open", &[])
            + metric(&metrics, "kop_http_connections_cut_off_total", &[])
            + metric(&metrics, "kop_http_connections_refused_total", &[]);
        if seen >= 2_000.0 {
            break;
        }
        assert!(
            taken_in.elapsed() < Duration::from_secs(60),
            "the daemon took in {seen} of the 2,000 connections in 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A normal client, on a connection of its own, still gets in: idle ones make room.
    let answer = post_fresh(port, &unique("in-flood")).await;
    assert!(answer.starts_with("HTTP/1.1 202"), "{answer}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    fds_peak = fds_peak.max(open_fds(pid));
    let rss_flood = rss_kib(pid);
    let still = flood.iter().filter(|s| still_open(s)).count();
    let metrics = pipeline.daemon("order").metrics().await;
    let refused = metric(&metrics, "kop_http_connections_refused_total", &[]);
    let cut = metric(&metrics, "kop_http_connections_cut_off_total", &[]);
    let open = metric(&metrics, "kop_http_connections_open", &[]);
    eprintln!(
        "2,000 connections over a cap of 100: {still} still open, {cut} closed to make room, \
         {refused} refused; {open} open; descriptors {fds_before} → peak {fds_peak}; \
         RSS {rss_before} → {rss_flood} KiB"
    );
    assert!(open <= 100.0, "{open} connections open over a cap of 100");
    assert!(still <= 100, "{still} connections of the flood still open");
    // The cap, at most 16 in passing (asked to make room, not closed yet) and 64 waiting
    // for them.
    assert!(
        fds_peak <= fds_before + 100 + 16 + 64 + 8,
        "descriptors {fds_before} → {fds_peak}"
    );
    assert!(rss_flood.saturating_sub(rss_before) < 64 * 1024);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_with_requests_in_flight_ends_within_the_units_stop_timeout() {
    let unit = std::fs::read_to_string(repo().join("systemd/kop-order.service")).unwrap();
    let stop_timeout = unit
        .lines()
        .find_map(|l| l.strip_prefix("TimeoutStopSec="))
        .and_then(|v| humantime::parse_duration(v.trim()).ok())
        .expect("TimeoutStopSec in systemd/kop-order.service");
    let mut pipeline = Pipeline::new();
    // The shipped limits: a slow body is waited for 10 s.
    pipeline.start("order", &[]).await;
    let port = pipeline.order_port;

    let mut slow = Vec::new();
    for _ in 0..20 {
        let mut stream = connect(port).await;
        stream
            .write_all(format!("{}{}", head(ORDER.len()), &ORDER[..5]).as_bytes())
            .await
            .unwrap();
        slow.push(stream);
    }
    let mut idle = Vec::new();
    for _ in 0..500 {
        idle.push(connect(port).await);
    }
    let load = tokio::spawn(async move {
        let mut answered = 0;
        for n in 0..400 {
            match try_post_order(port, &format!("term-{n}"), 1.0).await {
                Ok((202, _)) => answered += 1,
                _ => break,
            }
        }
        answered
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let daemon = pipeline.daemon("order");
    assert!(
        slow.iter().all(still_open),
        "slow clients in flight at SIGTERM"
    );
    daemon.signal("TERM");
    let asked = Instant::now();
    let code = daemon.wait_exit(stop_timeout);
    let took = asked.elapsed();
    assert_eq!(
        code,
        Some(0),
        "kop-order did not stop within TimeoutStopSec ({stop_timeout:?}); log:\n{}",
        daemon.log_text()
    );
    let answered = load.await.unwrap();
    for stream in &mut slow {
        let (answer, _) = until_closed(stream, Duration::from_secs(1)).await;
        assert!(
            answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
            "{answer}"
        );
    }
    eprintln!(
        "stopped {took:.1?} after SIGTERM (TimeoutStopSec {stop_timeout:?}) with 20 slow \
         bodies, 500 idle connections and a load in flight ({answered} answered 202)"
    );
    pipeline.daemons.clear();
}
