//! kop-load against a running pipeline: the open-loop schedule, the status breakdown and
//! the end-to-end measurement.

use std::process::Command;

use crate::support::*;

fn kop_load(args: &[&str]) -> (i32, String, String) {
    let output = Command::new(binary("kop-load"))
        .args(args)
        .output()
        .expect("run kop-load");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn open_loop_and_max_rate_with_end_to_end_latency() {
    let mut pipeline = Pipeline::new();
    pipeline.start_all(&[]).await;
    let url = format!("http://127.0.0.1:{}/order", pipeline.order_port);
    let brokers = brokers();

    let (code, out, err) = tokio::task::block_in_place(|| {
        kop_load(&[
            "--rps",
            "50",
            "--duration",
            "3s",
            "--concurrency",
            "4",
            "--url",
            &url,
            "--e2e",
            "--e2e-topic",
            &pipeline.reserved,
            "--brokers",
            &brokers,
            "--json",
        ])
    });
    assert_eq!(code, 0, "{err}");
    let report: serde_json::Value = serde_json::from_str(&out).expect("JSON summary");
    assert_eq!(report["mode"], "open-loop");
    assert_eq!(
        report["sent"], 150,
        "50/s for 3 s, every request on schedule"
    );
    assert_eq!(report["status"]["202"], 150, "{out}");
    let latency = &report["latency_ms"];
    assert_eq!(latency["count"], 150);
    for q in ["p50", "p90", "p99", "p999", "max"] {
        assert!(latency[q].as_f64().is_some_and(|v| v > 0.0), "{q} in {out}");
    }
    assert!(latency["p50"].as_f64() <= latency["max"].as_f64());
    let e2e = &report["e2e"];
    assert_eq!(e2e["accepted"], 150);
    assert_eq!(
        e2e["arrived"], 150,
        "every accepted order reached the last topic: {out}"
    );
    assert_eq!(e2e["duplicates"], 0);
    assert!(e2e["latency_ms"]["p99"].as_f64().is_some_and(|v| v > 0.0));

    // Max-rate mode, human output, the seed's plain-seconds duration.
    let (code, out, err) = tokio::task::block_in_place(|| {
        kop_load(&[
            "--max-rate",
            "--duration",
            "2",
            "--concurrency",
            "8",
            "--url",
            &url,
        ])
    });
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("max-rate against"), "{out}");
    assert!(out.contains("status    202: "), "{out}");
    assert!(!out.contains("error"), "{out}");
    assert!(out.contains("p99.9"), "{out}");
    assert!(
        !out.contains("fell behind"),
        "closed loop never falls behind: {out}"
    );

    // One client cannot keep 2,000 requests a second: it says so, and that the latency
    // includes its own wait. Every order is still accepted, so the run succeeds.
    let (code, out, err) = tokio::task::block_in_place(|| {
        kop_load(&[
            "--rps",
            "2000",
            "--duration",
            "1",
            "--concurrency",
            "1",
            "--url",
            &url,
        ])
    });
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("client    fell behind: "), "{out}");
    assert!(out.contains("raise --concurrency"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_run_whose_requests_fail_exits_non_zero() {
    let mut pipeline = Pipeline::new();
    pipeline.start("order", &[]).await;
    // Nobody listens: no request gets an answer.
    let nowhere = format!("http://127.0.0.1:{}/order", free_port());
    // The wrong path: every answer is a 404.
    let wrong = format!("http://127.0.0.1:{}/orders", pipeline.order_port);
    for (url, expected) in [(&nowhere, "error"), (&wrong, "404")] {
        let (code, out, err) = tokio::task::block_in_place(|| {
            kop_load(&["--rps", "20", "--duration", "1", "--url", url, "--json"])
        });
        assert_eq!(code, 1, "{url}: {out}\n{err}");
        assert!(err.contains("requests failed"), "{err}");
        assert!(err.contains("no order was accepted"), "{err}");
        let report: serde_json::Value = serde_json::from_str(&out).expect("JSON summary");
        assert_eq!(report["status"][expected], 20, "{out}");
        // Failures are counted by status, not mixed into the latency.
        assert_eq!(report["latency_ms"]["count"], 0, "{out}");
        let answered = if expected == "error" { 0 } else { 20 };
        assert_eq!(report["answered"], answered, "{out}");
    }
}
