//! Every query of the Grafana dashboard (docker/grafana/dashboards/kop.json) against a real
//! Prometheus scraping a real pipeline under load: each must succeed and return series, so
//! no panel of the dashboard is empty. The same Prometheus loads the alert rules
//! (docker/prometheus/alerts.yml): each must evaluate without error on real data, and the
//! failure injection must raise the dead-letter and error-ratio alerts.
//!
//! Needs a Kafka broker (KOP_TEST_BROKERS) and `prometheus` (Debian package `prometheus`);
//! without either the test fails, it never skips.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::support::*;
use serde_json::Value;

/// What Grafana would put in for its built-in variables, for a scrape interval of 1 s.
const RATE_INTERVAL: &str = "30s";
const INTERVAL: &str = "5s";
const RANGE: &str = "5m";

/// A Prometheus server of its own, on a free port, killed and removed when dropped.
struct Prometheus {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Prometheus {
    fn start(metrics_ports: &[u16]) -> Prometheus {
        let dir = std::env::temp_dir().join(format!("kop-test-prometheus/{}", unique("p")));
        std::fs::create_dir_all(dir.join("data")).expect("prometheus dir");
        let targets: Vec<String> = metrics_ports
            .iter()
            .map(|p| format!("\"127.0.0.1:{p}\""))
            .collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - \"{}\"\n\
             scrape_configs:\n  - job_name: kop\n    static_configs:\n      - targets: [{}]\n",
            repo().join("docker/prometheus/alerts.yml").display(),
            targets.join(", ")
        );
        std::fs::write(dir.join("prometheus.yml"), config).expect("prometheus.yml");
        let port = free_port();
        let log = std::fs::File::create(dir.join("prometheus.log")).expect("log");
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run `prometheus`: {e}; install the Debian package `prometheus`")
            });
        Prometheus { child, port, dir }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((200, _)) = http_get(self.port, "/-/ready").await {
                return;
            }
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!("prometheus exited with {status}:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "prometheus not ready:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn api(&self, path: &str) -> Value {
        let (status, body) = http_get(self.port, path)
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        let value: Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("GET {path}: {status} {body}: {e}"));
        assert_eq!(value["status"], "success", "GET {path}: {status} {body}");
        value
    }

    /// An instant query; returns `data.result`.
    async fn query(&self, expr: &str) -> Vec<Value> {
        let value = self
            .api(&format!("/api/v1/query?query={}", encode(expr)))
            .await;
        value["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_else(|| panic!("{expr}: no result in {value}"))
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Percent-encoding for a query parameter.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The dashboard's queries as (panel title, expression), variables replaced as Grafana would.
fn dashboard_queries() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo().join("docker/grafana/dashboards/kop.json"))
        .expect("docker/grafana/dashboards/kop.json");
    let dashboard: Value = serde_json::from_str(&text).expect("dashboard JSON");
    // Template variables at "All".
    let mut variables: Vec<(String, String)> = Vec::new();
    for variable in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let name = variable["name"]
            .as_str()
            .expect("variable name")
            .to_string();
        let all = variable["allValue"].as_str().unwrap_or(".*").to_string();
        variables.push((name, all));
    }
    let substitute = |expr: &str| {
        let mut expr = expr
            .replace("$__rate_interval", RATE_INTERVAL)
            .replace("${__rate_interval}", RATE_INTERVAL)
            .replace("$__interval", INTERVAL)
            .replace("${__interval}", INTERVAL)
            .replace("$__range", RANGE)
            .replace("${__range}", RANGE);
        for (name, value) in &variables {
            expr = expr
                .replace(&format!("${{{name}}}"), value)
                .replace(&format!("[[{name}]]"), value)
                .replace(&format!("${name}"), value);
        }
        assert!(!expr.contains('$'), "a variable is left in {expr}");
        expr
    };
    let mut panels: Vec<&Value> = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        if panel["type"] == "row" {
            panels.extend(panel["panels"].as_array().into_iter().flatten());
        } else {
            panels.push(panel);
        }
    }
    let mut queries = Vec::new();
    for panel in panels {
        let title = panel["title"].as_str().unwrap_or_default();
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("expr");
            let label = format!("{title} [{}]", target["refId"].as_str().unwrap_or("?"));
            let expr = substitute(expr);
            // A fallback for "no data" must not hide a query that finds nothing.
            if let Some(main) = expr.strip_suffix(" or vector(0)") {
                queries.push((format!("{label} without its fallback"), main.to_string()));
            }
            queries.push((label, expr));
        }
    }
    queries
}

/// Why a query does not show what a panel needs under load, if it does not.
fn problem(expr: &str, result: &[Value]) -> Option<String> {
    if result.is_empty() {
        return Some("no series".into());
    }
    // Rates, increases and latencies of a pipeline under load are not all zero.
    let moving = ["rate(", "increase(", "histogram_quantile("]
        .iter()
        .any(|f| expr.contains(f));
    let positive = result.iter().any(|series| {
        series["value"][1]
            .as_str()
            .and_then(|v| v.parse::<f64>().ok())
            .is_some_and(|v| v > 0.0)
    });
    (moving && !positive).then(|| format!("only zeros: {result:?}"))
}

async fn post_until(port: u16, stop: Arc<AtomicBool>) -> usize {
    let mut accepted = 0;
    let mut round = 0;
    while !stop.load(Ordering::Relaxed) {
        accepted += post_many(port, &unique(&format!("dash{round}")), 20, 4)
            .await
            .len();
        round += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    accepted
}

/// The load generator; aborted when dropped, so a failing test stops posting before its
/// pipeline goes away.
struct Load {
    stop: Arc<AtomicBool>,
    task: Option<tokio::task::JoinHandle<usize>>,
}

impl Load {
    fn start(port: u16) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(post_until(port, stop.clone()));
        Load {
            stop,
            task: Some(task),
        }
    }

    /// Stops after the round in progress; returns the number of orders accepted.
    async fn finish(mut self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        self.task.take().expect("running").await.expect("load task")
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

fn alerts_of<'a>(alerts: &'a Value, name: &str, service: &str) -> Vec<&'a Value> {
    alerts["data"]["alerts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|a| a["labels"]["alertname"] == name && a["labels"]["service"] == service)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_dashboard_query_returns_data_from_a_running_pipeline() {
    let started = Instant::now();
    let mut pipeline = Pipeline::new();
    // Two attempts and a failing payment stage: retries, dead letters and errors happen.
    pipeline
        .extra_env
        .push(("MAX_PROCESSING_ATTEMPTS".into(), "2".into()));
    pipeline.start("order", &[]).await;
    pipeline
        .start("payment", &[("SIMULATE_FAILURE_RATE", "0.3")])
        .await;
    // Both guarantees run: payment and notification exactly-once, inventory at-least-once.
    pipeline
        .start("inventory", &[("PROCESSING_GUARANTEE", "at-least-once")])
        .await;
    pipeline.start("notification", &[]).await;
    let payment_service = format!("{}-payment", pipeline.prefix);

    let ports: Vec<u16> = SERVICES
        .iter()
        .map(|s| pipeline.daemons[*s].metrics_port)
        .collect();
    let mut prometheus = Prometheus::start(&ports);
    prometheus.wait_ready().await;

    let load = Load::start(pipeline.order_port);
    // Long enough for the rate windows to fill and librdkafka to report lag a few times.
    tokio::time::sleep(Duration::from_secs(20)).await;

    let queries = dashboard_queries();
    assert!(queries.len() >= 15, "{} queries", queries.len());
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut failing: Vec<String>;
    loop {
        failing = Vec::new();
        for (label, expr) in &queries {
            let result = prometheus.query(expr).await;
            if let Some(why) = problem(expr, &result) {
                failing.push(format!("{label}: {why}\n    {expr}"));
            }
        }
        if failing.is_empty() || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    assert!(
        failing.is_empty(),
        "dashboard queries without data:\n{}",
        failing.join("\n")
    );
    // Every stage shows its lag, whatever its guarantee (an exactly-once stage commits its
    // offsets through the producer, which librdkafka's consumer statistics do not see).
    let lagging: Vec<String> = prometheus
        .query("sum by (service) (kafka_consumer_lag)")
        .await
        .iter()
        .filter_map(|s| s["metric"]["service"].as_str().map(str::to_string))
        .collect();
    for stage in ["payment", "inventory", "notification"] {
        let service = format!("{}-{stage}", pipeline.prefix);
        assert!(
            lagging.contains(&service),
            "no kafka_consumer_lag from {service}: {lagging:?}"
        );
    }

    // The alert rules evaluate on real data without error (no label clash, no bad match)...
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let rules = prometheus.api("/api/v1/rules").await;
        let mut states = Vec::new();
        for group in rules["data"]["groups"].as_array().into_iter().flatten() {
            for rule in group["rules"].as_array().into_iter().flatten() {
                states.push((
                    rule["name"].as_str().unwrap_or_default().to_string(),
                    rule["health"].as_str().unwrap_or_default().to_string(),
                    rule["lastError"].as_str().unwrap_or_default().to_string(),
                ));
            }
        }
        assert!(states.len() >= 5, "alert rules loaded: {rules}");
        let bad: Vec<_> = states.iter().filter(|(_, h, _)| h != "ok").collect();
        if bad.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "alert rules not healthy: {bad:?}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // ...and the failure injection raises the ones it should, for the payment stage.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let alerts = prometheus.api("/api/v1/alerts").await;
        let dead_letters = alerts_of(&alerts, "KopDeadLettersGrowing", &payment_service);
        let errors = alerts_of(&alerts, "KopHandlerErrorRatioHigh", &payment_service);
        if !dead_letters.is_empty() && !errors.is_empty() {
            assert!(
                dead_letters.iter().all(|a| a["state"] == "firing"),
                "{dead_letters:?}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "expected KopDeadLettersGrowing and KopHandlerErrorRatioHigh for {payment_service}: {alerts}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    let accepted = load.finish().await;
    assert!(accepted > 0, "orders accepted");
    eprintln!(
        "{} queries checked, {accepted} orders posted, {:.1} s",
        queries.len(),
        started.elapsed().as_secs_f64()
    );
    drop(prometheus);
}
