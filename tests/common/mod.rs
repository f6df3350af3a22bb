//! Test harness: a real Kafka broker (from `KOP_TEST_BROKERS`, started by scripts/test.sh),
//! the real daemon binaries, fresh topic and group names per test.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};

/// The broker under test. A test that needs Kafka fails without it; it never skips.
pub fn brokers() -> String {
    std::env::var("KOP_TEST_BROKERS").unwrap_or_else(|_| {
        panic!("KOP_TEST_BROKERS is not set: run the tests with ./scripts/test.sh, which starts a Kafka broker")
    })
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name no other test (or earlier run) uses.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}-{:06x}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        rand::random::<u32>() & 0xffffff
    )
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn binary(name: &str) -> PathBuf {
    // Cargo builds every binary of the package before integration tests run.
    let dir = PathBuf::from(env!("CARGO_BIN_EXE_kop-order"));
    dir.parent().expect("bin dir").join(name)
}

/// A running daemon; killed when dropped.
pub struct Daemon {
    pub name: String,
    pub child: Child,
    pub metrics_port: u16,
    pub log: PathBuf,
    pub env: Vec<(String, String)>,
    /// The configuration file it was started with; a restart uses it again.
    pub config: PathBuf,
}

/// The configuration file shipped for a daemon (etc/kop/<service>.toml).
pub fn shipped_config(service: &str) -> PathBuf {
    repo().join(format!("etc/kop/{service}.toml"))
}

impl Daemon {
    pub fn spawn(service: &str, env: &[(String, String)], log_dir: &Path) -> Daemon {
        Daemon::spawn_with_config(service, env, log_dir, &shipped_config(service))
    }

    pub fn spawn_with_config(
        service: &str,
        env: &[(String, String)],
        log_dir: &Path,
        config: &Path,
    ) -> Daemon {
        Daemon::launch(service, env, log_dir, config, |_| {})
    }

    /// Starts `kop-<service> --config <config>` with `env`, its output in a log file under
    /// `log_dir`; `customize` may change the command last (e.g. set NOTIFY_SOCKET, which is
    /// otherwise removed).
    pub fn launch(
        service: &str,
        env: &[(String, String)],
        log_dir: &Path,
        config: &Path,
        customize: impl FnOnce(&mut Command),
    ) -> Daemon {
        let metrics_port = env
            .iter()
            .find(|(k, _)| k == "METRICS_PORT")
            .map(|(_, v)| v.parse().expect("port"))
            .expect("METRICS_PORT in env");
        let log = log_dir.join(format!("{service}-{}.log", unique("run")));
        let file = std::fs::File::create(&log).expect("log file");
        let mut command = Command::new(binary(&format!("kop-{service}")));
        command
            .arg("--config")
            .arg(config)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("LOG_LEVEL", "info,librdkafka=warn")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log"))
            .stderr(file);
        customize(&mut command);
        let child = command.spawn().expect("spawn daemon");
        Daemon {
            name: service.to_string(),
            child,
            metrics_port,
            log,
            env: env.to_vec(),
            config: config.to_path_buf(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.pid().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{signal} {}", self.pid());
    }

    /// Waits for the exit and returns the status code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status.code();
            }
            if Instant::now() > deadline {
                panic!(
                    "{} did not exit within {timeout:?}; log:\n{}",
                    self.name,
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn wait_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok((200, _)) = http_get(self.metrics_port, "/readyz").await {
                return;
            }
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!(
                    "{} exited with {status} before ready; log:\n{}",
                    self.name,
                    self.log_text()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "{} not ready within {timeout:?}; log:\n{}",
                    self.name,
                    self.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn metrics(&self) -> String {
        http_get(self.metrics_port, "/metrics")
            .await
            .expect("metrics")
            .1
    }
}

impl Drop for Daemon {
    /// Stops the daemon the way systemd would, so it leaves its consumer group at once and
    /// the next member does not wait for the session to time out; kills it if it hangs.
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = Command::new("kill")
                .args(["-TERM", &self.pid().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(15);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// The status and the body (as text) of an HTTP answer.
pub async fn read_answer(
    response: hyper::Response<hyper::body::Incoming>,
) -> Result<(u16, String), String> {
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

pub async fn http_get(port: u16, path: &str) -> Result<(u16, String), String> {
    let uri = format!("http://127.0.0.1:{port}{path}");
    let response = client()
        .get(uri.parse().map_err(|e| format!("{e}"))?)
        .await
        .map_err(|e| e.to_string())?;
    read_answer(response).await
}

/// Sends a request and returns status, headers and body.
pub async fn http_request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> (u16, HashMap<String, String>, String) {
    let mut request = hyper::Request::builder()
        .method(method)
        .uri(format!("http://127.0.0.1:{port}{path}"));
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let response = client()
        .request(request.body(Full::new(Bytes::from(body))).expect("request"))
        .await
        .expect("response");
    let status = response.status().as_u16();
    let headers = response
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

pub async fn post_order(port: u16, order_id: &str, amount: f64) -> (u16, String) {
    let body = serde_json::json!({ "orderId": order_id, "amount": amount }).to_string();
    let (status, _, body) = http_request(
        port,
        "POST",
        "/order",
        &[("content-type", "application/json")],
        body.into_bytes(),
    )
    .await;
    (status, body)
}

/// `POST /order` with a minimal valid order.
pub fn order_request(
    port: u16,
    order_id: &str,
    amount: f64,
) -> Result<hyper::Request<Full<Bytes>>, String> {
    let body = serde_json::json!({ "orderId": order_id, "amount": amount }).to_string();
    hyper::Request::builder()
        .method("POST")
        .uri(format!("http://127.0.0.1:{port}/order"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())
}

/// Like [`post_order`], but a request that gets no HTTP answer (refused, reset) is an error
/// instead of a panic: for load that goes on while the daemon behind the port is restarted.
pub async fn try_post_order(
    port: u16,
    order_id: &str,
    amount: f64,
) -> Result<(u16, String), String> {
    let response = client()
        .request(order_request(port, order_id, amount)?)
        .await
        .map_err(|e| e.to_string())?;
    read_answer(response).await
}

/// The last `lines` lines of a file (a daemon's log), or a note that it cannot be read.
pub fn tail(path: &Path, lines: usize) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// Topic names and ports of one isolated pipeline.
pub struct Pipeline {
    pub prefix: String,
    pub orders: String,
    pub payments: String,
    pub reserved: String,
    pub order_port: u16,
    pub daemons: HashMap<String, Daemon>,
    pub log_dir: PathBuf,
    pub extra_env: Vec<(String, String)>,
}

pub const SERVICES: [&str; 4] = ["order", "payment", "inventory", "notification"];

impl Pipeline {
    pub fn new() -> Pipeline {
        let prefix = unique("t");
        let log_dir = std::env::temp_dir().join(format!("kop-test-logs/{prefix}"));
        std::fs::create_dir_all(&log_dir).expect("log dir");
        Pipeline {
            orders: format!("{prefix}.orders.created"),
            payments: format!("{prefix}.payments.completed"),
            reserved: format!("{prefix}.inventory.reserved"),
            order_port: free_port(),
            prefix,
            daemons: HashMap::new(),
            log_dir,
            extra_env: Vec::new(),
        }
    }

    /// Environment every daemon of this pipeline gets, plus `extra` for one of them.
    pub fn env_for(&self, service: &str, extra: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = vec![
            ("KAFKA_BROKERS".into(), brokers()),
            ("ORDER_TOPIC".into(), self.orders.clone()),
            ("PAYMENT_COMPLETED_TOPIC".into(), self.payments.clone()),
            ("INVENTORY_RESERVED_TOPIC".into(), self.reserved.clone()),
            (
                "PAYMENT_GROUP_ID".into(),
                format!("{}.payment", self.prefix),
            ),
            (
                "INVENTORY_GROUP_ID".into(),
                format!("{}.inventory", self.prefix),
            ),
            (
                "NOTIFICATION_GROUP_ID".into(),
                format!("{}.notification", self.prefix),
            ),
            ("SERVICE_NAME".into(), format!("{}-{service}", self.prefix)),
            ("METRICS_PORT".into(), free_port().to_string()),
            ("PORT".into(), self.order_port.to_string()),
            ("RETRY_DELAYS_MS".into(), "200,400".into()),
        ];
        for (k, v) in self
            .extra_env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .chain(extra.iter().copied())
        {
            env.retain(|(key, _)| key != k);
            env.push((k.to_string(), v.to_string()));
        }
        env
    }

    /// Starts one daemon (replacing an earlier one of the same name) and waits until ready.
    pub async fn start(&mut self, service: &str, extra: &[(&str, &str)]) {
        let env = self.env_for(service, extra);
        let mut daemon = Daemon::spawn(service, &env, &self.log_dir);
        daemon.wait_ready(Duration::from_secs(90)).await;
        self.daemons.insert(service.to_string(), daemon);
    }

    /// Starts one daemon with a configuration file of its own (written from `toml`).
    pub async fn start_with_config(&mut self, service: &str, extra: &[(&str, &str)], toml: &str) {
        let env = self.env_for(service, extra);
        let path = self.log_dir.join(format!("{service}.toml"));
        std::fs::write(&path, toml).expect("config file");
        let mut daemon = Daemon::spawn_with_config(service, &env, &self.log_dir, &path);
        daemon.wait_ready(Duration::from_secs(90)).await;
        self.daemons.insert(service.to_string(), daemon);
    }

    /// Restarts a daemon with the environment and configuration file it had.
    pub async fn restart(&mut self, service: &str) {
        let old = self.daemons.remove(service).expect("daemon");
        let (env, config) = (old.env.clone(), old.config.clone());
        drop(old);
        let mut daemon = Daemon::spawn_with_config(service, &env, &self.log_dir, &config);
        daemon.wait_ready(Duration::from_secs(90)).await;
        self.daemons.insert(service.to_string(), daemon);
    }

    pub async fn start_all(&mut self, extra: &[(&str, &str)]) {
        for service in SERVICES {
            self.start(service, extra).await;
        }
    }

    pub fn daemon(&mut self, service: &str) -> &mut Daemon {
        self.daemons.get_mut(service).expect("daemon running")
    }

    pub fn dlq(topic: &str) -> String {
        format!("{topic}.dlq")
    }

    pub fn retry(topic: &str) -> String {
        format!("{topic}.retry")
    }
}

pub fn kafka_config() -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", brokers());
    config
}

/// Produces one record with the given headers, outside of kop.
pub async fn produce_raw(
    topic: &str,
    key: Option<&str>,
    payload: Option<&[u8]>,
    headers: &[(&str, &[u8])],
) {
    let producer: FutureProducer = kafka_config().create().expect("producer");
    let mut owned = OwnedHeaders::new();
    for (k, v) in headers {
        owned = owned.insert(Header {
            key: k,
            value: Some(*v),
        });
    }
    let mut record = FutureRecord::<str, [u8]>::to(topic).headers(owned);
    if let Some(key) = key {
        record = record.key(key);
    }
    if let Some(payload) = payload {
        record = record.payload(payload);
    }
    producer
        .send(record, Duration::from_secs(10))
        .await
        .expect("produce");
}

/// Reads a topic from the beginning (read_committed) until `expected` records have arrived,
/// then keeps reading for `settle` to catch any extra ones (duplicates); fails after `timeout`.
pub fn consume(
    topic: &str,
    expected: usize,
    timeout: Duration,
    settle: Duration,
) -> Vec<OwnedMessage> {
    consume_with(kafka_config(), topic, expected, timeout, settle)
}

/// [`consume`] from another broker.
pub fn consume_with(
    config: ClientConfig,
    topic: &str,
    expected: usize,
    timeout: Duration,
    settle: Duration,
) -> Vec<OwnedMessage> {
    consume_until(
        config,
        topic,
        |records| records.len() >= expected,
        timeout,
        settle,
    )
}

/// Reads a topic from the beginning (read_committed) until `done` says the records read so
/// far are enough, then for `settle` more; gives up after `timeout`.
pub fn consume_until(
    mut config: ClientConfig,
    topic: &str,
    done: impl Fn(&[OwnedMessage]) -> bool,
    timeout: Duration,
    settle: Duration,
) -> Vec<OwnedMessage> {
    config
        .set("group.id", unique("reader"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed");
    let consumer: BaseConsumer = config.create().expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut out = Vec::new();
    let deadline = Instant::now() + timeout;
    let mut settle_until: Option<Instant> = None;
    let mut checked = 0;
    let mut last_check = Instant::now() - Duration::from_secs(1);
    loop {
        let now = Instant::now();
        if settle_until.is_some_and(|t| now >= t) {
            break;
        }
        if settle_until.is_none() && now >= deadline {
            break;
        }
        if let Some(Ok(message)) = consumer.poll(Duration::from_millis(100)) {
            out.push(message.detach());
        }
        // Judged at most every 250 ms: `done` may look at every record read so far.
        if settle_until.is_none()
            && out.len() != checked
            && last_check.elapsed() >= Duration::from_millis(250)
            || settle_until.is_none() && out.is_empty() && checked == 0
        {
            checked = out.len();
            last_check = Instant::now();
            if done(&out) {
                settle_until = Some(Instant::now() + settle);
            }
        }
    }
    out
}

/// Reads `topic` until every one of `ids` is there (at most `timeout`), and a few seconds
/// more for copies; how often each order appears.
pub async fn count_until_all_seen(
    config: ClientConfig,
    topic: &str,
    ids: Vec<String>,
    timeout: Duration,
) -> HashMap<String, usize> {
    let topic = topic.to_string();
    let records = tokio::task::spawn_blocking(move || {
        consume_until(
            config,
            &topic,
            |records| {
                let seen = count_by_order(records);
                ids.iter().all(|id| seen.contains_key(id))
            },
            timeout,
            Duration::from_secs(3),
        )
    })
    .await
    .expect("reader");
    count_by_order(&records)
}

pub fn header(message: &OwnedMessage, name: &str) -> Option<String> {
    message.headers().and_then(|h| {
        h.iter()
            .filter(|h| h.key == name)
            .last()
            .and_then(|h| h.value.map(|v| String::from_utf8_lossy(v).into_owned()))
    })
}

pub fn key(message: &OwnedMessage) -> String {
    String::from_utf8_lossy(message.key().unwrap_or_default()).into_owned()
}

pub fn json(message: &OwnedMessage) -> serde_json::Value {
    serde_json::from_slice(message.payload().unwrap_or_default()).expect("JSON payload")
}

/// Value of a counter or gauge in Prometheus text, summed over the series whose labels
/// contain every `label="value"` given.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}

/// Posts `count` orders with ids `<prefix>-<n>`, `concurrency` at a time; returns the ids
/// that were accepted (202).
pub async fn post_many(port: u16, prefix: &str, count: usize, concurrency: usize) -> Vec<String> {
    let semaphore = std::sync::Arc::new(tokio::sync::Semaphore::new(concurrency));
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..count {
        let permit = semaphore.clone().acquire_owned().await.expect("semaphore");
        let id = format!("{prefix}-{n}");
        tasks.spawn(async move {
            let (status, body) = post_order(port, &id, 10.0 + n as f64).await;
            drop(permit);
            (id, status, body)
        });
    }
    let mut accepted = Vec::new();
    while let Some(result) = tasks.join_next().await {
        let (id, status, body) = result.expect("task");
        if status == 202 {
            accepted.push(id);
        } else {
            eprintln!("order {id}: {status} {body}");
        }
    }
    accepted
}

/// Counts of each order id among the records of a topic.
pub fn count_by_order(messages: &[OwnedMessage]) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for m in messages {
        // Records that are not events (poison a test put there) count under "".
        let id = serde_json::from_slice::<serde_json::Value>(m.payload().unwrap_or_default())
            .ok()
            .and_then(|v| v["orderId"].as_str().map(str::to_string))
            .unwrap_or_default();
        *counts.entry(id).or_insert(0) += 1;
    }
    counts
}

/// Runs scripts/kafka.sh on the broker (or cluster) of a state directory.
pub fn kafka_sh(state: &Path, args: &[&str]) -> std::process::Output {
    Command::new(repo().join("scripts/kafka.sh"))
        .args(args)
        .env("KOP_KAFKA_STATE", state)
        // A loaded 2-core machine: three JVMs starting at once take a while.
        .env("KOP_KAFKA_START_TIMEOUT", "150")
        .output()
        .expect("run scripts/kafka.sh")
}

/// The last line kafka.sh printed: the bootstrap address (list) after start.
pub fn last_line(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// A broker (or cluster) owned by one test, in a state directory of its own. Dropped, it
/// is deleted; after a failure it is only stopped, and its logs are kept.
pub struct OwnBroker {
    pub state: PathBuf,
    pub address: String,
}

impl OwnBroker {
    pub fn start(state: PathBuf, port: u16) -> OwnBroker {
        OwnBroker::start_with(state, &["--port", &port.to_string()])
    }

    /// `scripts/kafka.sh start` with these options (`--nodes 3`, `--sasl-ssl DIR`, ...).
    pub fn start_with(state: PathBuf, options: &[&str]) -> OwnBroker {
        let output = kafka_sh(&state, &[&["start"], options].concat());
        assert!(
            output.status.success(),
            "scripts/kafka.sh start {} failed:\n{}",
            options.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
        let address = last_line(&output);
        assert!(!address.is_empty(), "kafka.sh printed no address");
        OwnBroker { state, address }
    }

    /// Runs a kafka.sh command on this broker; it must succeed.
    pub fn command(&self, args: &[&str]) -> std::process::Output {
        let output = kafka_sh(&self.state, args);
        assert!(
            output.status.success(),
            "scripts/kafka.sh {}:\n{}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
        output
    }

    pub fn stop(&self) {
        self.command(&["stop"]);
    }

    /// Starts it again on the same port, with its data.
    pub fn restart(&self) {
        let port: u16 = self
            .address
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("port");
        let again = OwnBroker::start(self.state.clone(), port);
        assert_eq!(again.address, self.address);
        std::mem::forget(again);
    }
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        let failed = std::thread::panicking();
        let _ = kafka_sh(&self.state, &[if failed { "stop" } else { "reset" }]);
        if failed {
            eprintln!(
                "broker stopped; its logs are kept in {}",
                self.state.display()
            );
        }
    }
}
