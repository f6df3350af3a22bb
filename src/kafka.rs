//! Kafka clients built from the configuration, topic creation, and record headers.
//!
//! The `[kafka]` table goes to librdkafka untouched; kop only adds what its guarantees
//! depend on (idempotence, transactions, isolation level, manual commits), and those win
//! over the table because the delivery semantics the README promises rest on them.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{BaseProducer, DeliveryResult, Producer, ProducerContext};
use rdkafka::statistics::Statistics;

use crate::config::Common;

pub const H_ATTEMPT: &str = "x-attempt";
pub const H_ERROR: &str = "x-error";
pub const H_ORIGIN_TOPIC: &str = "x-origin-topic";
pub const H_ORIGIN_PARTITION: &str = "x-origin-partition";
pub const H_ORIGIN_OFFSET: &str = "x-origin-offset";
pub const H_RETRY_AT: &str = "x-retry-at";
pub const H_SERVICE: &str = "x-service";
pub const H_TRACEPARENT: &str = "traceparent";
/// On a dead letter that could not be written whole: what was cut, and why.
pub const H_TRUNCATED: &str = "x-truncated";
/// On a dead letter whose value was cut: the size of the original value in bytes.
pub const H_ORIGINAL_SIZE: &str = "x-original-size";

/// Headers kop itself writes when it routes a failure; they are replaced, never copied.
pub const ROUTING_HEADERS: [&str; 7] = [
    H_ATTEMPT,
    H_ERROR,
    H_ORIGIN_TOPIC,
    H_ORIGIN_PARTITION,
    H_ORIGIN_OFFSET,
    H_RETRY_AT,
    H_SERVICE,
];

/// The passthrough properties plus a client id naming the service.
pub fn base_config(common: &Common) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set(
        "client.id",
        format!("{}-{}", common.service_name, common.instance_id),
    );
    for (key, value) in &common.kafka {
        config.set(key, value);
    }
    config
}

/// The idempotent producer of the order edge: no duplicates from internal retries, records
/// acknowledged by all in-sync replicas.
///
/// The HTTP answer is bounded by a timer on the delivery, never by `message.timeout.ms`:
/// a record that times out makes librdkafka bump the idempotent producer's epoch, and a
/// request still in flight is then sent again under the new epoch, where the broker cannot
/// tell it is a repeat. So records keep librdkafka's own five minutes to get through a
/// failover, and a request not acknowledged in time is answered 503 while its record
/// carries on: the order may still be stored, and the client retries with the same orderId.
pub fn order_producer_config(common: &Common, max_pending: u32) -> ClientConfig {
    let mut config = base_config(common);
    config
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("queue.buffering.max.messages", max_pending.to_string())
        // Reachability for the readiness check: one report a second.
        .set(
            "statistics.interval.ms",
            STATS_INTERVAL.as_millis().to_string(),
        );
    // A broker back from a restart is found within a second or two, rather than after
    // librdkafka's 10 s reconnect backoff; and a client that has lost every broker for
    // 10 s starts over from bootstrap.servers instead of after 5 minutes.
    for (key, value) in [
        ("linger.ms", LINGER_MS),
        ("reconnect.backoff.max.ms", "1000"),
        ("metadata.recovery.rebootstrap.trigger.ms", "10000"),
    ] {
        if config.get(key).is_none() {
            config.set(key, value);
        }
    }
    config
}

/// How often the order producer reports its connections.
pub const STATS_INTERVAL: Duration = Duration::from_secs(1);

/// When a client last had a broker connection up, as its statistics reports show it.
pub struct BrokerWatch {
    up_at_ms: AtomicU64,
    /// librdkafka's last account of a failed connection.
    last_error: Mutex<Option<String>>,
}

impl Default for BrokerWatch {
    /// A client starts out as reachable: the start-up already proved a broker answers.
    fn default() -> Self {
        BrokerWatch {
            up_at_ms: AtomicU64::new(crate::event::now_ms()),
            last_error: Mutex::new(None),
        }
    }
}

impl BrokerWatch {
    /// Takes in one statistics report.
    pub fn saw(&self, statistics: &Statistics) {
        // Bootstrap and coordinator entries are logical (node id -1); a real broker is up
        // when its connection is.
        if statistics
            .brokers
            .values()
            .any(|b| b.nodeid >= 0 && b.state == "UP")
        {
            self.up_at_ms
                .store(crate::event::now_ms(), Ordering::Release);
        }
    }

    /// Takes in one error report of the client. "All brokers are down" is only the
    /// consequence; the failed connection before it says why.
    pub fn failed(&self, error: &KafkaError, reason: &str) {
        if matches!(error, KafkaError::Global(RDKafkaErrorCode::AllBrokersDown)) {
            return;
        }
        if let Ok(mut last) = self.last_error.lock() {
            *last = Some(format!("{error}: {reason}"));
        }
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|last| last.clone())
    }

    /// How long no statistics report has shown a broker connection that is up.
    pub fn unreachable_for(&self, now_ms: u64) -> Duration {
        let up_at = self.up_at_ms.load(Ordering::Acquire);
        Duration::from_millis(now_ms.saturating_sub(up_at))
    }
}

/// A stage's producer. With a transactional id it writes exactly once; without, it is the
/// idempotent producer of the at-least-once mode.
pub fn stage_producer_config(common: &Common, transactional_id: Option<&str>) -> ClientConfig {
    let mut config = base_config(common);
    config.set("enable.idempotence", "true").set("acks", "all");
    if let Some(id) = transactional_id {
        // message.timeout.ms must stay below transaction.timeout.ms.
        config
            .set("transactional.id", id)
            .set("transaction.timeout.ms", "60000")
            .set("message.timeout.ms", "30000");
        // The first record of a transaction is refused with CONCURRENT_TRANSACTIONS until
        // the markers of the previous commit are written; librdkafka retries after
        // retry.backoff.ms, and its default 100 ms made every batch wait that long.
        // librdkafka backs off exponentially from here (retry.backoff.max.ms), so a broker
        // that keeps refusing is not hammered.
        config
            .get("retry.backoff.ms")
            .is_none()
            .then(|| config.set("retry.backoff.ms", "10"));
    }
    config
        .get("linger.ms")
        .is_none()
        .then(|| config.set("linger.ms", LINGER_MS));
    config
}

/// How long a producer waits to fill a batch: every hop waits for its records'
/// acknowledgements, and an exactly-once hop waits for them before it can commit. At
/// 1,000 orders/s, 1 ms instead of 5 halved the end-to-end median in both modes and cut
/// the exactly-once p99 to a third, for more CPU per order (bench/README.md). Under
/// backlog batches fill while the previous request is in flight, whatever the linger.
const LINGER_MS: &str = "1";

/// A stage's consumer: offsets are committed by kop only once the outcome of a record is
/// durable, and aborted transactions are never read.
pub fn stage_consumer_config(common: &Common, group_id: &str) -> ClientConfig {
    let mut config = base_config(common);
    config
        .set("group.id", group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("isolation.level", "read_committed")
        .set("statistics.interval.ms", "5000");
    // A read_committed fetch waits for the transaction to commit; the default 500 ms wait
    // would add up at every hop.
    config
        .get("fetch.wait.max.ms")
        .is_none()
        .then(|| config.set("fetch.wait.max.ms", "50"));
    config
        .get("auto.offset.reset")
        .is_none()
        .then(|| config.set("auto.offset.reset", "earliest"));
    // A crashed member's partitions move to the others (or to its restart) after the
    // session timeout: 10 s rather than librdkafka's 45 s, unless `[kafka]` says otherwise.
    if config.get("session.timeout.ms").is_none() {
        config.set("session.timeout.ms", "10000");
        if config.get("heartbeat.interval.ms").is_none() {
            config.set("heartbeat.interval.ms", "2000");
        }
    }
    config
}

/// Asks the cluster for metadata, giving up within seconds. When that fails, librdkafka's
/// own account of the first failure is logged: a refused login or a failed TLS handshake
/// tells an operator far more than the request's "broker transport failure".
pub fn probe(common: &Common) -> Result<(), KafkaError> {
    let producer: BaseProducer<ProbeContext> =
        base_config(common).create_with_context(ProbeContext::default())?;
    let result = producer
        .client()
        .fetch_metadata(None, Duration::from_secs(5))
        .map(drop);
    if result.is_err() {
        // Errors reach the context only through its event queue.
        producer.poll(Duration::from_millis(300));
        if let Some(reason) = producer.context().cause() {
            tracing::error!(%reason, "Kafka refused or dropped the connection");
        }
    }
    result
}

/// Collects what librdkafka reports while the probe runs: its warnings and errors.
#[derive(Default)]
struct ProbeContext {
    reports: Mutex<Vec<String>>,
}

impl ProbeContext {
    fn report(&self, text: String) {
        let mut reports = self.reports.lock().unwrap();
        if reports.len() < 16 {
            reports.push(text);
        }
    }

    /// The first report naming a cause. "All brokers are down" is only the consequence: a
    /// TLS connection dropped by the broker is a log line, never an error event, while the
    /// consequence is.
    fn cause(&self) -> Option<String> {
        let reports = self.reports.lock().unwrap();
        reports
            .iter()
            .find(|r| !r.contains("AllBrokersDown"))
            .or(reports.first())
            .cloned()
    }
}

impl ClientContext for ProbeContext {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        if (level as i32) <= (RDKafkaLogLevel::Warning as i32) {
            self.report(format!("{facility}: {message}"));
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.report(format!("{error}: {reason}"));
    }
}

impl ProducerContext for ProbeContext {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &DeliveryResult<'_>, _: ()) {}
}

/// Creates the topics that are missing; existing ones are left as they are.
pub async fn ensure_topics(
    common: &Common,
    names: &[&str],
    timeout: Duration,
) -> Result<Vec<String>, KafkaError> {
    // Without a broker the admin request would only give up after its own long timeout;
    // asking for metadata first says within seconds that nobody answers.
    tokio::task::block_in_place(|| probe(common))?;
    let admin: AdminClient<DefaultClientContext> = base_config(common).create()?;
    let topics: Vec<NewTopic<'_>> = names
        .iter()
        .map(|name| {
            NewTopic::new(
                name,
                common.topics.partitions,
                TopicReplication::Fixed(common.topics.replication_factor),
            )
        })
        .collect();
    let options = AdminOptions::new()
        .operation_timeout(Some(timeout))
        .request_timeout(Some(timeout));
    let results = admin.create_topics(&topics, &options).await?;
    let mut created = Vec::new();
    for result in results {
        match result {
            Ok(name) => created.push(name),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => {
                return Err(KafkaError::AdminOp(code)).inspect_err(|_| {
                    tracing::error!(topic = %name, error = %code, "cannot create topic");
                });
            }
        }
    }
    Ok(created)
}

/// How many partitions a topic has. A topic just created takes a moment to appear in the
/// metadata, so it is asked for up to 10 s. Blocking calls, run off the async workers.
pub async fn topic_partitions(common: &Common, topic: &str) -> Result<usize, KafkaError> {
    let client: BaseProducer = base_config(common).create()?;
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let found = client
                .client()
                .fetch_metadata(Some(&topic), Duration::from_secs(10))
                .map(|metadata| {
                    metadata
                        .topics()
                        .first()
                        .filter(|t| t.error().is_none())
                        .map_or(0, |t| t.partitions().len())
                });
            match found {
                Ok(n) if n > 0 => return Ok(n),
                Ok(_) | Err(KafkaError::MetadataFetch(_))
                    if std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(200));
                }
                Ok(_) => {
                    return Err(KafkaError::MetadataFetch(
                        RDKafkaErrorCode::UnknownTopicOrPartition,
                    ));
                }
                Err(e) => return Err(e),
            }
        }
    })
    .await
    .map_err(|_| KafkaError::Canceled)?
}

/// Creates a stage's changelog of handled keys if it is missing: compacted (the latest
/// entry of a key is what counts) and deleted past the dedup window, with as many
/// partitions as the input topic, whose partitions it restores one for one. An existing
/// one with another partition count is refused: it would restore the wrong keys. Says
/// whether it was created.
pub async fn ensure_changelog(
    common: &Common,
    name: &str,
    partitions: usize,
    window: Duration,
) -> Result<bool, String> {
    let failed = |e: KafkaError| format!("changelog {name}: {e}");
    let created = if common.topics.create {
        create_changelog(common, name, partitions, window)
            .await
            .map_err(failed)?
    } else {
        false
    };
    let found = topic_partitions(common, name).await.map_err(failed)?;
    if found != partitions {
        return Err(format!(
            "changelog {name} has {found} partitions and the input {partitions}: they must be \
             equal (each input partition's keys are restored from its own changelog partition)"
        ));
    }
    Ok(created)
}

async fn create_changelog(
    common: &Common,
    name: &str,
    partitions: usize,
    window: Duration,
) -> Result<bool, KafkaError> {
    let admin: AdminClient<DefaultClientContext> = base_config(common).create()?;
    let retention = window.as_millis().to_string();
    let topic = NewTopic::new(
        name,
        i32::try_from(partitions).unwrap_or(i32::MAX),
        TopicReplication::Fixed(common.topics.replication_factor),
    )
    .set("cleanup.policy", "compact,delete")
    .set("retention.ms", &retention);
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let mut created = false;
    for result in admin.create_topics(&[topic], &options).await? {
        match result {
            Ok(_) => created = true,
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((_, code)) => return Err(KafkaError::AdminOp(code)),
        }
    }
    Ok(created)
}

/// A header's value as text: `None` when absent, `Err` when present but not UTF-8 (or null).
pub fn header_str<'a, H: Headers>(headers: &'a H, name: &str) -> Option<Result<&'a str, String>> {
    // The last occurrence wins, as in Kafka's own `Headers.lastHeader`.
    let header = headers.iter().filter(|h| h.key == name).last()?;
    Some(match header.value {
        None => Err(format!("header {name} has no value")),
        Some(bytes) => {
            std::str::from_utf8(bytes).map_err(|_| format!("header {name} is not UTF-8"))
        }
    })
}

/// Copies headers, leaving out the given names.
pub fn copy_headers_except<H: Headers>(headers: Option<&H>, skip: &[&str]) -> OwnedHeaders {
    let mut out = OwnedHeaders::new();
    if let Some(headers) = headers {
        for h in headers.iter().filter(|h| !skip.contains(&h.key)) {
            out = out.insert(Header {
                key: h.key,
                value: h.value,
            });
        }
    }
    out
}

/// Appends a text header.
pub fn with_header(headers: OwnedHeaders, key: &str, value: &str) -> OwnedHeaders {
    headers.insert(Header {
        key,
        value: Some(value),
    })
}

/// Asks the broker for metadata until the topics show up (a topic just created takes a
/// moment to appear everywhere): proof that Kafka answers and that the daemon can work.
/// Blocking; call it off the async workers.
pub fn require_topics<C: rdkafka::ClientContext>(
    client: &rdkafka::client::Client<C>,
    names: &[&str],
) -> Result<(), KafkaError> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let metadata = client.fetch_metadata(None, Duration::from_secs(10))?;
        let missing = names.iter().find(|name| {
            !metadata
                .topics()
                .iter()
                .any(|t| t.name() == **name && t.error().is_none() && !t.partitions().is_empty())
        });
        match missing {
            None => return Ok(()),
            Some(name) if std::time::Instant::now() >= deadline => {
                tracing::error!(topic = name, "topic does not exist");
                return Err(KafkaError::MetadataFetch(
                    RDKafkaErrorCode::UnknownTopicOrPartition,
                ));
            }
            Some(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}
