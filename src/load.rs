//! The load generator behind `kop-load`.
//!
//! Open loop: request n is due at `start + n / rps`, whether or not earlier ones were
//! answered, and its latency counts from that due time. A slow server therefore shows up
//! as latency instead of silently lowering the rate (no coordinated omission). With
//! `rps = 0` it runs closed loop instead: `concurrency` clients, each sending as soon as
//! its previous answer arrived — the maximum rate the server sustains.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use serde::Serialize;
use tokio::sync::Semaphore;

use crate::event::now_ms;

#[derive(Debug, Clone)]
pub struct LoadConfig {
    pub url: String,
    /// Requests per second; 0 means as fast as `concurrency` clients go.
    pub rps: f64,
    pub duration: Duration,
    pub concurrency: usize,
    /// Measure end-to-end latency by reading this topic (with these brokers).
    pub e2e: Option<E2eConfig>,
    /// Print a progress line every second.
    pub progress: bool,
}

#[derive(Debug, Clone)]
pub struct E2eConfig {
    pub brokers: String,
    pub topic: String,
    /// How long to wait after the last request for the last orders to arrive.
    pub drain: Duration,
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub count: u64,
}

impl Percentiles {
    fn of(h: &Histogram<u64>) -> Self {
        let ms = |us: u64| us as f64 / 1000.0;
        Percentiles {
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
            count: h.len(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct EndToEnd {
    pub topic: String,
    pub accepted: u64,
    /// Accepted orders of this run seen in the topic.
    pub arrived: u64,
    /// Seen more than once (only possible downstream of an at-least-once stage).
    pub duplicates: u64,
    /// Accepted by the API → read from the topic.
    pub latency_ms: Percentiles,
    /// Arrivals per second between the first and the last.
    pub throughput: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub url: String,
    pub mode: &'static str,
    pub target_rps: f64,
    pub concurrency: usize,
    pub sent: u64,
    pub elapsed_s: f64,
    /// Answers per second.
    pub achieved_rps: f64,
    /// Answers by HTTP status; "error" for requests that got no answer.
    pub status: BTreeMap<String, u64>,
    /// Requests that got an HTTP answer, whatever its status.
    pub answered: u64,
    /// Latency of the accepted requests (202), from each one's due time; refusals and
    /// requests without an answer are counted by status, not mixed in here.
    pub latency_ms: Percentiles,
    /// Requests that started more than `LATE` after their due time because every client
    /// was busy: the latency above includes that wait, which is the client's, not the
    /// server's. Open loop only.
    pub started_late: u64,
    pub max_start_lag_ms: f64,
    pub e2e: Option<EndToEnd>,
}

/// A request that starts this long after its due time fell behind the schedule.
const LATE: Duration = Duration::from_millis(10);

impl Report {
    /// What went wrong, if anything: requests without an answer or with a status other
    /// than 202 and 503 (a refusal under load is an answer), and accepted orders that did
    /// not arrive.
    pub fn failures(&self) -> Vec<String> {
        let mut failures = Vec::new();
        let odd: Vec<String> = self
            .status
            .iter()
            .filter(|(status, _)| !matches!(status.as_str(), "202" | "503"))
            .map(|(status, n)| format!("{n} × {status}"))
            .collect();
        if !odd.is_empty() {
            failures.push(format!("requests failed: {}", odd.join(", ")));
        }
        if self.sent > 0 && !self.status.contains_key("202") {
            failures.push("no order was accepted".into());
        }
        if let Some(e2e) = &self.e2e
            && e2e.arrived < e2e.accepted
        {
            failures.push(format!(
                "{} of {} accepted orders did not reach {}",
                e2e.accepted - e2e.arrived,
                e2e.accepted,
                e2e.topic
            ));
        }
        failures
    }
}

struct Tally {
    latency: Histogram<u64>,
    status: BTreeMap<String, u64>,
    answered: u64,
    accepted: Vec<(String, u64)>,
}

fn histogram() -> Histogram<u64> {
    // 1 µs to 10 min at 3 significant digits.
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

async fn send_one(
    client: &HttpClient,
    url: &hyper::Uri,
    order_id: &str,
    amount: f64,
) -> Result<u16, String> {
    let body = serde_json::json!({ "orderId": order_id, "amount": amount }).to_string();
    let request = hyper::Request::post(url.clone())
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let response = client.request(request).await.map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    // Read the body so the connection goes back to the pool.
    let _ = response.into_body().collect().await;
    Ok(status)
}

/// Runs the load and returns the summary.
pub async fn run(config: LoadConfig) -> Result<Report, String> {
    let url: hyper::Uri = config
        .url
        .parse()
        .map_err(|e| format!("--url {}: {e}", config.url))?;
    let run_id = format!("load-{:08x}", rand::random::<u32>());
    let e2e = match &config.e2e {
        Some(e2e) => Some(E2eReader::start(e2e, &run_id)?),
        None => None,
    };

    let client: HttpClient = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(config.concurrency.max(1))
        .build_http();
    let tally = Arc::new(Mutex::new(Tally {
        latency: histogram(),
        status: BTreeMap::new(),
        answered: 0,
        accepted: Vec::new(),
    }));
    let mut started_late = 0u64;
    let mut max_start_lag = Duration::ZERO;
    let slots = Arc::new(Semaphore::new(config.concurrency.max(1)));
    let started = Instant::now();
    let deadline = started + config.duration;
    let mut tasks = tokio::task::JoinSet::new();
    let progress = config
        .progress
        .then(|| tokio::spawn(print_progress(tally.clone(), started)));

    let mut n: u64 = 0;
    loop {
        let due = if config.rps > 0.0 {
            started + Duration::from_secs_f64(n as f64 / config.rps)
        } else {
            Instant::now()
        };
        if due >= deadline {
            break;
        }
        // Only a schedule sleeps: sleep_until(now) would still wait for the timer's next
        // millisecond tick and cap --max-rate at about one request per millisecond.
        if config.rps > 0.0 {
            tokio::time::sleep_until(due.into()).await;
        }
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        if config.rps <= 0.0 && Instant::now() >= deadline {
            break;
        }
        if config.rps > 0.0 {
            let lag = due.elapsed();
            if lag > LATE {
                started_late += 1;
                max_start_lag = max_start_lag.max(lag);
            }
        }
        let (client, url, tally) = (client.clone(), url.clone(), tally.clone());
        let order_id = format!("{run_id}-{n}");
        tasks.spawn(async move {
            let result = send_one(&client, &url, &order_id, 1.0 + (n % 1000) as f64).await;
            let latency = due.elapsed();
            drop(slot);
            let mut tally = tally.lock().unwrap_or_else(|e| e.into_inner());
            let key = match result {
                Ok(status) => {
                    tally.answered += 1;
                    status.to_string()
                }
                Err(_) => "error".to_string(),
            };
            if key == "202" {
                let _ = tally.latency.record((latency.as_micros() as u64).max(1));
                tally.accepted.push((order_id, now_ms()));
            }
            *tally.status.entry(key).or_default() += 1;
        });
        n += 1;
        // Reap finished tasks as we go, so memory does not grow with the run.
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    let elapsed = started.elapsed();
    if let Some(progress) = progress {
        progress.abort();
        let _ = progress.await;
        eprintln!();
    }

    let tally = Arc::try_unwrap(tally)
        .map_err(|_| "requests still running".to_string())?
        .into_inner()
        .unwrap_or_else(|e| e.into_inner());
    let answered = tally.answered;
    let e2e = match (e2e, &config.e2e) {
        (Some(reader), Some(e2e_config)) => Some(reader.finish(&tally.accepted, e2e_config).await),
        _ => None,
    };
    Ok(Report {
        url: config.url,
        mode: if config.rps > 0.0 {
            "open-loop"
        } else {
            "max-rate"
        },
        target_rps: config.rps,
        concurrency: config.concurrency,
        sent: n,
        elapsed_s: elapsed.as_secs_f64(),
        achieved_rps: answered as f64 / elapsed.as_secs_f64().max(f64::EPSILON),
        status: tally.status,
        answered,
        latency_ms: Percentiles::of(&tally.latency),
        started_late,
        max_start_lag_ms: max_start_lag.as_secs_f64() * 1000.0,
        e2e,
    })
}

async fn print_progress(tally: Arc<Mutex<Tally>>, started: Instant) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut last = 0u64;
    loop {
        tick.tick().await;
        let (answered, p99, refused, unanswered) = {
            let t = tally.lock().unwrap_or_else(|e| e.into_inner());
            let count = |f: &dyn Fn(&str) -> bool| -> u64 {
                t.status.iter().filter(|(k, _)| f(k)).map(|(_, v)| v).sum()
            };
            (
                t.answered,
                t.latency.value_at_quantile(0.99) as f64 / 1000.0,
                count(&|k| k != "202" && k != "error"),
                count(&|k| k == "error"),
            )
        };
        // The same words as the summary: "answered" is every HTTP answer.
        eprint!(
            "\r{:>6.0}s  {:>8} answered  {:>7}/s  p99(202) {:>8.1} ms  not 202 {:>6}  no answer {:>6}   ",
            started.elapsed().as_secs_f64(),
            answered,
            answered - last,
            p99,
            refused,
            unanswered
        );
        last = answered;
    }
}

/// Per order: times seen, latency of the first arrival (ms), when it first arrived (epoch ms).
type Arrivals = BTreeMap<String, (u64, u64, u64)>;

/// Reads the last topic from its end while the load runs.
struct E2eReader {
    seen: Arc<Mutex<Arrivals>>,
    task: tokio::task::JoinHandle<()>,
}

impl E2eReader {
    fn start(config: &E2eConfig, run_id: &str) -> Result<Self, String> {
        let mut client = ClientConfig::new();
        client
            .set("bootstrap.servers", &config.brokers)
            .set("group.id", format!("kop-load-{run_id}"))
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed")
            .set("fetch.wait.max.ms", "10");
        let consumer: StreamConsumer = client.create().map_err(|e| format!("e2e consumer: {e}"))?;
        let metadata = consumer
            .fetch_metadata(Some(&config.topic), Duration::from_secs(10))
            .map_err(|e| format!("e2e: cannot read {}: {e}", config.topic))?;
        let mut assignment = TopicPartitionList::new();
        for topic in metadata.topics() {
            if topic.error().is_some() || topic.partitions().is_empty() {
                return Err(format!("e2e: topic {} does not exist", config.topic));
            }
            for p in topic.partitions() {
                assignment
                    .add_partition_offset(&config.topic, p.id(), Offset::End)
                    .map_err(|e| e.to_string())?;
            }
        }
        consumer.assign(&assignment).map_err(|e| e.to_string())?;
        let seen: Arc<Mutex<Arrivals>> = Arc::default();
        let prefix = format!("{run_id}-");
        let sink = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok(message) = consumer.recv().await {
                let arrived = now_ms();
                let Some(key) = message.key().and_then(|k| std::str::from_utf8(k).ok()) else {
                    continue;
                };
                if !key.starts_with(&prefix) {
                    continue;
                }
                let accepted_at = message
                    .payload()
                    .and_then(|p| serde_json::from_slice::<serde_json::Value>(p).ok())
                    .and_then(|v| v["acceptedAt"].as_u64())
                    .unwrap_or(arrived);
                let mut seen = sink.lock().unwrap_or_else(|e| e.into_inner());
                let entry = seen.entry(key.to_string()).or_insert((
                    0,
                    arrived.saturating_sub(accepted_at),
                    arrived,
                ));
                entry.0 += 1;
            }
        });
        Ok(E2eReader { seen, task })
    }

    async fn finish(self, accepted: &[(String, u64)], config: &E2eConfig) -> EndToEnd {
        let deadline = Instant::now() + config.drain;
        let arrivals = |seen: &Arrivals| {
            accepted
                .iter()
                .filter(|(id, _)| seen.contains_key(id))
                .count()
        };
        loop {
            let done = arrivals(&self.seen.lock().unwrap_or_else(|e| e.into_inner()));
            if done >= accepted.len() || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.task.abort();
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let mut latency = histogram();
        let mut duplicates = 0;
        for (count, ms, _) in seen.values() {
            let _ = latency.record((ms * 1000).max(1));
            duplicates += count.saturating_sub(1);
        }
        let first = seen.values().map(|(_, _, at)| *at).min().unwrap_or(0);
        let last = seen.values().map(|(_, _, at)| *at).max().unwrap_or(0);
        let span_s = last.saturating_sub(first) as f64 / 1000.0;
        EndToEnd {
            topic: config.topic.clone(),
            accepted: accepted.len() as u64,
            arrived: arrivals(&seen) as u64,
            duplicates,
            latency_ms: Percentiles::of(&latency),
            throughput: if span_s > 0.0 {
                seen.len() as f64 / span_s
            } else {
                0.0
            },
        }
    }
}

/// The human summary.
pub fn render(report: &Report) -> String {
    let p = |l: &Percentiles| {
        format!(
            "p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1} ms",
            l.p50, l.p90, l.p99, l.p999, l.max
        )
    };
    let mut out = format!(
        "{} against {} ({} clients{})\n",
        report.mode,
        report.url,
        report.concurrency,
        if report.target_rps > 0.0 {
            format!(", target {}/s", report.target_rps)
        } else {
            String::new()
        }
    );
    out += &format!(
        "requests  {} sent in {:.1} s, {} answered ({:.1}/s)\n",
        report.sent, report.elapsed_s, report.answered, report.achieved_rps
    );
    let statuses: Vec<String> = report
        .status
        .iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect();
    out += &format!("status    {}\n", statuses.join("  "));
    out += &format!("latency   {} (202 only)\n", p(&report.latency_ms));
    if report.started_late > 0 {
        out += &format!(
            "client    fell behind: {} of {} requests started more than {} ms late (up to \
             {:.0} ms), every client busy; the latency includes that wait: raise --concurrency\n",
            report.started_late,
            report.sent,
            LATE.as_millis(),
            report.max_start_lag_ms
        );
    }
    if let Some(e2e) = &report.e2e {
        out += &format!(
            "e2e       {}/{} orders reached {} ({} duplicates), {:.1}/s\n",
            e2e.arrived, e2e.accepted, e2e.topic, e2e.duplicates, e2e.throughput
        );
        out += &format!("e2e lat.  {}\n", p(&e2e.latency_ms));
    }
    for failure in report.failures() {
        out += &format!("FAILED    {failure}\n");
    }
    out
}
