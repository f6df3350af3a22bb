//! Raw produce → consume throughput of the broker with librdkafka (the `rdkafka` crate): the
//! ceiling the kop pipeline is compared with (see bench/README.md; bench/run.sh runs it).
//!
//! ```sh
//! cargo bench --bench raw -- --brokers 127.0.0.1:9092 --records 500000 --size 100 --json
//! ```
//!
//! It creates a fresh topic (3 partitions by default) with the admin client, assigns a
//! `read_committed` consumer to all its partitions from the beginning, and then produces
//! `--records` records of `--size` bytes (key = a unique id, like an order id) with a
//! producer configured like kop's (idempotent, `acks=all`) but with `linger.ms=5`, which
//! fills bigger batches than kop's 1 ms: the ceiling is the broker's best. Producer and
//! consumer run at the same time, in two threads of this process. It reports
//!
//! - produce rate: records / (first send → last acknowledgement),
//! - consume rate: records / (first record read → last record read),
//! - combined rate: records / (first send → last record read), the produce→consume rate.
//!
//! With `--transactional` the producer commits a transaction every `--txn-records` (500)
//! records, as an exactly-once kop stage does per batch; the `read_committed` consumer then
//! sees each batch only once it is committed.
//!
//! Two helpers of bench/run.sh's drain row use the same producer and consumer:
//!
//! - `--preload` only produces: `--records` `OrderCreated` events (key and `orderId`
//!   `<--key-prefix><n>`, a `traceparent` header, as kop-order writes them) to a new topic,
//!   and reports the produce rate;
//! - `--count` only consumes: it reads an existing topic (waiting for it to exist) from the
//!   beginning with `read_committed` until `--records` distinct keys ending in `-<n>` arrived,
//!   and reports when the first and the last arrived (epoch ms) and the duplicates.
//!
//! Timing lives here and in bench/run.sh, never in the tests.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use clap::Parser;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use serde_json::json;

#[derive(Parser, Debug)]
#[command(about = "Raw produce → consume throughput of a Kafka broker (librdkafka)")]
struct Args {
    /// Kafka bootstrap servers.
    #[arg(long, env = "KAFKA_BROKERS", default_value = "localhost:9092")]
    brokers: String,
    /// Topic to create and use; it must not exist yet (default: bench.raw.<random>).
    #[arg(long)]
    topic: Option<String>,
    /// Records to produce and consume.
    #[arg(long, default_value_t = 500_000)]
    records: u64,
    /// Value size in bytes (an OrderCreated event is about 100).
    #[arg(long, default_value_t = 100)]
    size: usize,
    /// Partitions of the topic.
    #[arg(long, default_value_t = 3)]
    partitions: i32,
    /// librdkafka linger.ms of the producer (kop's producers use 1, for latency; 5 makes
    /// bigger batches, for the ceiling).
    #[arg(long, default_value_t = 5)]
    linger_ms: u32,
    /// Produce in transactions of --txn-records records (like an exactly-once kop stage
    /// under backlog, whose transactions close at `stage.commit_max_records`): the ceiling
    /// of that mode.
    #[arg(long)]
    transactional: bool,
    /// Records per transaction with --transactional.
    #[arg(long, default_value_t = 500)]
    txn_records: u64,
    /// Only produce `OrderCreated` events to a new topic (a backlog for a kop stage).
    #[arg(long, conflicts_with_all = ["count", "transactional"])]
    preload: bool,
    /// Key and orderId prefix of --preload (the record number follows).
    #[arg(long, default_value = "preload-")]
    key_prefix: String,
    /// Only consume: read the existing --topic from the beginning until --records distinct
    /// records arrived.
    #[arg(long, conflicts_with = "transactional")]
    count: bool,
    /// Give up when the consumer has not seen a new record for this many seconds.
    #[arg(long, default_value_t = 30)]
    idle_timeout: u64,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// Nanoseconds since the start of the run; 0 means "not yet".
struct Clock {
    base: Instant,
    /// Wall-clock time of `base`, in milliseconds since the Unix epoch.
    base_epoch_ms: f64,
}

impl Clock {
    fn new() -> Self {
        let epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64() * 1000.0)
            .unwrap_or(0.0);
        Clock {
            base: Instant::now(),
            base_epoch_ms: epoch,
        }
    }

    fn now(&self) -> u64 {
        // Never 0, so 0 can stand for "not yet".
        (self.base.elapsed().as_nanos() as u64).max(1)
    }

    /// A time of [`Clock::now`] as milliseconds since the Unix epoch (for other processes).
    fn epoch_ms(&self, ns: u64) -> f64 {
        self.base_epoch_ms + ns as f64 / 1e6
    }
}

/// Counts acknowledgements and failures; remembers when the last acknowledgement came.
struct Deliveries {
    clock: Arc<Clock>,
    acked: AtomicU64,
    failed: AtomicU64,
    last_ack_ns: AtomicU64,
    first_error: std::sync::Mutex<Option<String>>,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => {
                self.acked.fetch_add(1, Ordering::Relaxed);
                self.last_ack_ns.store(self.clock.now(), Ordering::Relaxed);
            }
            Err((e, _)) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                let mut first = self.first_error.lock().unwrap_or_else(|e| e.into_inner());
                first.get_or_insert_with(|| e.to_string());
            }
        }
    }
}

struct Consumed {
    distinct: u64,
    duplicates: u64,
    foreign: u64,
    first_ns: u64,
    last_ns: u64,
    error: Option<String>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(report) => {
            if args.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).unwrap_or_default()
                );
            } else {
                print_human(&report);
            }
            if report["ok"].as_bool() == Some(true) {
                ExitCode::SUCCESS
            } else {
                eprintln!(
                    "raw: FAILED: {}",
                    report["problem"].as_str().unwrap_or_default()
                );
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("raw: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<serde_json::Value, String> {
    if args.records == 0 || args.size == 0 || args.partitions < 1 || args.txn_records == 0 {
        return Err("--records, --size, --partitions and --txn-records must be at least 1".into());
    }
    let run_id = format!("{:08x}", rand::random::<u32>());
    let topic = args
        .topic
        .clone()
        .unwrap_or_else(|| format!("bench.raw.{run_id}"));
    if args.count {
        return count(args, &topic);
    }
    create_topic(&args.brokers, &topic, args.partitions)?;
    if args.preload {
        return preload(args, &topic, &run_id);
    }

    let clock = Arc::new(Clock::new());

    // The consumer first: assigned to every partition from the beginning, connected, and
    // polling before the first record is sent.
    let (ready_tx, ready_rx) = mpsc::channel();
    let consumer_thread = {
        let (brokers, topic, clock) = (args.brokers.clone(), topic.clone(), clock.clone());
        let (records, partitions, idle) = (
            args.records,
            args.partitions,
            Duration::from_secs(args.idle_timeout),
        );
        thread::Builder::new()
            .name("consumer".into())
            .spawn(move || {
                consume(
                    &brokers, &topic, partitions, records, idle, &clock, ready_tx,
                )
            })
            .map_err(|e| e.to_string())?
    };
    ready_rx
        .recv()
        .map_err(|_| "the consumer thread ended early".to_string())??;

    let context = Deliveries {
        clock: clock.clone(),
        acked: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        last_ack_ns: AtomicU64::new(0),
        first_error: std::sync::Mutex::new(None),
    };
    let mut config = producer_config(args, &run_id);
    if args.transactional {
        config
            .set("transactional.id", format!("kop-bench-raw-{run_id}"))
            .set("transaction.timeout.ms", "60000");
    }
    let producer: BaseProducer<Deliveries> = config
        .create_with_context(context)
        .map_err(|e| format!("producer: {e}"))?;
    producer
        .client()
        .fetch_metadata(Some(&topic), Duration::from_secs(10))
        .map_err(|e| format!("producer metadata: {e}"))?;
    let txn_timeout = Duration::from_secs(60);
    if args.transactional {
        producer
            .init_transactions(txn_timeout)
            .map_err(|e| format!("init_transactions: {e}"))?;
    }
    let mut transactions = 0u64;

    let payload = payload(args.size);
    let mut key = String::with_capacity(64);
    let prefix = format!("raw-{run_id}-");
    let mut queue_full_waits = 0u64;
    let first_send_ns = clock.now();
    for i in 0..args.records {
        if args.transactional && i % args.txn_records == 0 {
            if i > 0 {
                drain(&producer)?;
                producer
                    .commit_transaction(txn_timeout)
                    .map_err(|e| format!("commit_transaction: {e}"))?;
                transactions += 1;
            }
            producer
                .begin_transaction()
                .map_err(|e| format!("begin_transaction: {e}"))?;
        }
        key.clear();
        key.push_str(&prefix);
        key.push_str(&i.to_string());
        let record = BaseRecord::to(&topic)
            .key(key.as_str())
            .payload(&payload[..]);
        send_when_room(&producer, record, &mut queue_full_waits)?;
        if i % 1024 == 0 {
            producer.poll(Duration::ZERO);
        }
    }
    let last_send_ns = clock.now();
    drain(&producer)?;
    if args.transactional {
        producer
            .commit_transaction(txn_timeout)
            .map_err(|e| format!("commit_transaction: {e}"))?;
        transactions += 1;
    }
    producer
        .flush(Duration::from_secs(120))
        .map_err(|e| format!("flush: {e}"))?;
    // Acknowledged is not yet visible to read_committed readers: the commit is the end.
    let produced_ns = clock.now();
    let context = producer.context();
    let acked = context.acked.load(Ordering::Relaxed);
    let failed = context.failed.load(Ordering::Relaxed);
    let last_ack_ns = if args.transactional {
        produced_ns
    } else {
        context.last_ack_ns.load(Ordering::Relaxed)
    };
    let produce_error = context
        .first_error
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();

    let consumed = consumer_thread
        .join()
        .map_err(|_| "the consumer thread panicked".to_string())?;

    let secs = |from: u64, to: u64| to.saturating_sub(from) as f64 / 1e9;
    let rate = |n: u64, s: f64| if s > 0.0 { n as f64 / s } else { 0.0 };
    let bytes_per_record = (args.size + prefix.len() + 6) as f64;
    let produce_s = secs(first_send_ns, last_ack_ns);
    let consume_s = secs(consumed.first_ns, consumed.last_ns);
    let combined_s = secs(first_send_ns, consumed.last_ns);

    let problem = if failed > 0 {
        Some(format!(
            "{failed} records not acknowledged: {}",
            produce_error.unwrap_or_default()
        ))
    } else if let Some(e) = consumed.error.clone() {
        Some(e)
    } else if consumed.distinct < args.records {
        Some(format!(
            "only {} of {} records consumed",
            consumed.distinct, args.records
        ))
    } else {
        None
    };
    Ok(json!({
        "ok": problem.is_none(),
        "problem": problem,
        "brokers": args.brokers,
        "topic": topic,
        "partitions": args.partitions,
        "records": args.records,
        "value_bytes": args.size,
        "producer": {
            "acks": "all",
            "enable.idempotence": true,
            "linger.ms": args.linger_ms,
            "transactional": args.transactional,
            "records_per_transaction": args.transactional.then_some(args.txn_records),
            "transactions": transactions,
            "queue_full_waits": queue_full_waits,
        },
        "consumer": { "isolation.level": "read_committed" },
        "produce": {
            "acked": acked,
            "failed": failed,
            "send_s": secs(first_send_ns, last_send_ns),
            "seconds": produce_s,
            "rate": rate(acked, produce_s),
            "mb_per_s": rate(acked, produce_s) * bytes_per_record / 1e6,
        },
        "consume": {
            "records": consumed.distinct,
            "duplicates": consumed.duplicates,
            "foreign": consumed.foreign,
            "seconds": consume_s,
            "rate": rate(consumed.distinct, consume_s),
        },
        "combined": {
            "seconds": combined_s,
            "rate": rate(consumed.distinct, combined_s),
        },
    }))
}

/// The producer of every mode: like kop's (src/kafka.rs), idempotent, `acks=all`, with
/// librdkafka's default batch size, but `linger.ms` 5 (kop's is 1) for the broker's best.
fn producer_config(args: &Args, run_id: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &args.brokers)
        .set("client.id", format!("kop-bench-raw-{run_id}"))
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", args.linger_ms.to_string())
        .set("message.timeout.ms", "30000");
    config
}

/// `--preload`: `--records` `OrderCreated` events to the new topic, as fast as they go.
fn preload(args: &Args, topic: &str, run_id: &str) -> Result<serde_json::Value, String> {
    let clock = Arc::new(Clock::new());
    let context = Deliveries {
        clock: clock.clone(),
        acked: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        last_ack_ns: AtomicU64::new(0),
        first_error: std::sync::Mutex::new(None),
    };
    let producer: BaseProducer<Deliveries> = producer_config(args, run_id)
        .create_with_context(context)
        .map_err(|e| format!("producer: {e}"))?;
    producer
        .client()
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .map_err(|e| format!("producer metadata: {e}"))?;
    let trace_id: u64 = rand::random();
    let mut queue_full_waits = 0u64;
    let first_send_ns = clock.now();
    for i in 0..args.records {
        let key = format!("{}{i}", args.key_prefix);
        // As kop-order writes it (src/event.rs): the order, flat, and when it was accepted.
        let value = json!({
            "orderId": key,
            "amount": 1.0 + (i % 1000) as f64,
            "acceptedAt": now_ms(),
        })
        .to_string();
        let traceparent = format!("00-{trace_id:016x}{i:016x}-{:016x}-01", i + 1);
        let headers = OwnedHeaders::new().insert(Header {
            key: "traceparent",
            value: Some(traceparent.as_str()),
        });
        let record = BaseRecord::to(topic)
            .key(key.as_str())
            .payload(value.as_str())
            .headers(headers);
        send_when_room(&producer, record, &mut queue_full_waits)?;
        if i % 1024 == 0 {
            producer.poll(Duration::ZERO);
        }
    }
    drain(&producer)?;
    let context = producer.context();
    let acked = context.acked.load(Ordering::Relaxed);
    let failed = context.failed.load(Ordering::Relaxed);
    let last_ack_ns = context.last_ack_ns.load(Ordering::Relaxed);
    let produce_error = context
        .first_error
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let seconds = last_ack_ns.saturating_sub(first_send_ns) as f64 / 1e9;
    let problem = (failed > 0).then(|| {
        format!(
            "{failed} records not acknowledged: {}",
            produce_error.unwrap_or_default()
        )
    });
    Ok(json!({
        "ok": problem.is_none(),
        "problem": problem,
        "mode": "preload",
        "brokers": args.brokers,
        "topic": topic,
        "partitions": args.partitions,
        "records": args.records,
        "key_prefix": args.key_prefix,
        "producer": {
            "acks": "all",
            "enable.idempotence": true,
            "linger.ms": args.linger_ms,
            "queue_full_waits": queue_full_waits,
        },
        "produce": {
            "acked": acked,
            "failed": failed,
            "seconds": seconds,
            "rate": if seconds > 0.0 { acked as f64 / seconds } else { 0.0 },
        },
    }))
}

/// `--count`: reads the existing topic from the beginning until `--records` distinct
/// records arrived.
fn count(args: &Args, topic: &str) -> Result<serde_json::Value, String> {
    let partitions = wait_for_topic(&args.brokers, topic, Duration::from_secs(60))?;
    let clock = Clock::new();
    let (ready_tx, ready_rx) = mpsc::channel();
    let consumed = consume(
        &args.brokers,
        topic,
        partitions,
        args.records,
        Duration::from_secs(args.idle_timeout),
        &clock,
        ready_tx,
    );
    drop(ready_rx);
    let problem = consumed.error.clone().or_else(|| {
        (consumed.distinct < args.records).then(|| {
            format!(
                "only {} of {} records consumed",
                consumed.distinct, args.records
            )
        })
    });
    let seconds = consumed.last_ns.saturating_sub(consumed.first_ns) as f64 / 1e9;
    Ok(json!({
        "ok": problem.is_none(),
        "problem": problem,
        "mode": "count",
        "brokers": args.brokers,
        "topic": topic,
        "partitions": partitions,
        "records": args.records,
        "consumer": { "isolation.level": "read_committed" },
        "consume": {
            "records": consumed.distinct,
            "duplicates": consumed.duplicates,
            "foreign": consumed.foreign,
            "seconds": seconds,
            "rate": if seconds > 0.0 { consumed.distinct as f64 / seconds } else { 0.0 },
            "first_epoch_ms": clock.epoch_ms(consumed.first_ns),
            "last_epoch_ms": clock.epoch_ms(consumed.last_ns),
        },
    }))
}

/// Milliseconds since the Unix epoch (the unit of `acceptedAt`).
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Waits until the topic exists and each of its partitions has a leader; returns how many
/// partitions it has.
fn wait_for_topic(brokers: &str, topic: &str, wait: Duration) -> Result<i32, String> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .map_err(|e| format!("metadata client: {e}"))?;
    let deadline = Instant::now() + wait;
    loop {
        let metadata = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .map_err(|e| format!("metadata of {topic}: {e}"))?;
        let led: Vec<bool> = metadata
            .topics()
            .iter()
            .filter(|t| t.name() == topic && t.error().is_none())
            .flat_map(|t| t.partitions())
            .map(|p| p.leader() >= 0 && p.error().is_none())
            .collect();
        if !led.is_empty() && led.iter().all(|l| *l) {
            return Ok(led.len() as i32);
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "{topic} does not exist, or has partitions without a leader, after {} s",
                wait.as_secs()
            ));
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until every record sent is acknowledged and its delivery report served.
///
/// `Producer::flush` (which `commit_transaction` also calls) is not used for this: in rdkafka
/// 0.39 it polls a `BaseProducer` in steps of 100 ms, and `BaseProducer::poll` does not
/// return before its timeout, so every flush with records in flight takes at least 100 ms,
/// which would be measured here as the cost of a transaction commit.
fn drain(producer: &BaseProducer<Deliveries>) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while producer.in_flight_count() > 0 {
        if Instant::now() >= deadline {
            return Err(format!(
                "{} records not acknowledged after 120 s",
                producer.in_flight_count()
            ));
        }
        producer.poll(Duration::from_millis(1));
    }
    Ok(())
}

/// A value of `size` bytes that looks like an OrderCreated event (JSON), padded.
fn payload(size: usize) -> Vec<u8> {
    let mut value =
        br#"{"orderId":"raw-00000000-0000000","amount":123.0,"acceptedAt":1700000000000,"pad":""}"#
            .to_vec();
    if value.len() < size {
        let pad_at = value.len() - 2;
        value.splice(
            pad_at..pad_at,
            std::iter::repeat_n(b'x', size - value.len()),
        );
    }
    value.truncate(size);
    value
}

fn create_topic(brokers: &str, topic: &str, partitions: i32) -> Result<(), String> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .map_err(|e| format!("admin client: {e}"))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let options = AdminOptions::new()
        .operation_timeout(Some(Duration::from_secs(30)))
        .request_timeout(Some(Duration::from_secs(30)));
    let new_topic = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    let results = runtime
        .block_on(admin.create_topics([&new_topic], &options))
        .map_err(|e| format!("create topic {topic}: {e}"))?;
    for result in results {
        if let Err((name, code)) = result {
            return Err(format!(
                "create topic {name}: {code} (--topic must name a new topic)"
            ));
        }
    }
    // Wait until every partition has a leader, so the clock does not include that.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let metadata = admin
            .inner()
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .map_err(|e| format!("metadata of {topic}: {e}"))?;
        let led = metadata
            .topics()
            .iter()
            .filter(|t| t.name() == topic && t.error().is_none())
            .flat_map(|t| t.partitions())
            .filter(|p| p.leader() >= 0 && p.error().is_none())
            .count();
        if led == partitions as usize {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!("{topic}: partitions without a leader after 30 s"));
        }
        thread::sleep(Duration::from_millis(50));
    }
}

fn consume(
    brokers: &str,
    topic: &str,
    partitions: i32,
    records: u64,
    idle: Duration,
    clock: &Clock,
    ready: mpsc::Sender<Result<(), String>>,
) -> Consumed {
    let mut out = Consumed {
        distinct: 0,
        duplicates: 0,
        foreign: 0,
        first_ns: 0,
        last_ns: 0,
        error: None,
    };
    let setup = || -> Result<BaseConsumer, String> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", format!("kop-bench-raw-{topic}"))
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed")
            // Like kop's stage consumers (src/kafka.rs).
            .set("fetch.wait.max.ms", "50")
            .create()
            .map_err(|e| format!("consumer: {e}"))?;
        consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .map_err(|e| format!("consumer metadata: {e}"))?;
        let mut assignment = TopicPartitionList::new();
        for p in 0..partitions {
            assignment
                .add_partition_offset(topic, p, Offset::Beginning)
                .map_err(|e| e.to_string())?;
        }
        consumer.assign(&assignment).map_err(|e| e.to_string())?;
        // Starts the fetchers (nothing to read yet).
        if let Some(Err(e)) = consumer.poll(Duration::from_millis(100)) {
            return Err(format!("consumer: {e}"));
        }
        Ok(consumer)
    };
    let consumer = match setup() {
        Ok(consumer) => {
            let _ = ready.send(Ok(()));
            consumer
        }
        Err(e) => {
            let _ = ready.send(Err(e.clone()));
            out.error = Some(e);
            return out;
        }
    };
    let mut seen = vec![false; records as usize];
    let mut next_offsets = vec![0i64; partitions as usize];
    let mut last_progress = Instant::now();
    while out.distinct < records {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(message)) => {
                let now = clock.now();
                let index = message
                    .key()
                    .and_then(|k| std::str::from_utf8(k).ok())
                    .and_then(|k| k.rsplit('-').next())
                    .and_then(|i| i.parse::<usize>().ok())
                    .filter(|i| *i < seen.len());
                if let Some(next) = next_offsets.get_mut(message.partition() as usize) {
                    *next = (*next).max(message.offset() + 1);
                }
                match index {
                    Some(i) if seen[i] => out.duplicates += 1,
                    Some(i) => {
                        seen[i] = true;
                        out.distinct += 1;
                        if out.first_ns == 0 {
                            out.first_ns = now;
                        }
                        out.last_ns = now;
                        last_progress = Instant::now();
                    }
                    None => out.foreign += 1,
                }
            }
            Some(Err(e)) => {
                out.error = Some(format!("consume: {e}"));
                return out;
            }
            None => {
                if last_progress.elapsed() > idle {
                    out.error = Some(format!(
                        "no new record for {} s ({} of {records} consumed)",
                        idle.as_secs(),
                        out.distinct
                    ));
                    return out;
                }
            }
        }
    }
    // Not timed: commit the group's offsets, as a real consumer would (on a fresh broker
    // this also creates __consumer_offsets before the pipeline's daemons start).
    let mut offsets = TopicPartitionList::new();
    for (p, next) in next_offsets.iter().enumerate() {
        let _ = offsets.add_partition_offset(topic, p as i32, Offset::Offset(*next));
    }
    if let Err(e) = consumer.commit(&offsets, CommitMode::Sync) {
        eprintln!("raw: committing the consumer offsets failed (not counted): {e}");
    }
    out
}

fn print_human(r: &serde_json::Value) {
    let rate = |v: &serde_json::Value| v.as_f64().unwrap_or(0.0);
    match r["mode"].as_str() {
        Some("preload") => {
            println!(
                "preload: {} OrderCreated events to {} at {:.0} records/s ({:.2} s)",
                r["produce"]["acked"],
                r["topic"].as_str().unwrap_or_default(),
                rate(&r["produce"]["rate"]),
                rate(&r["produce"]["seconds"])
            );
            return;
        }
        Some("count") => {
            println!(
                "count: {} distinct records ({} duplicates) in {}, first → last {:.2} s",
                r["consume"]["records"],
                r["consume"]["duplicates"],
                r["topic"].as_str().unwrap_or_default(),
                rate(&r["consume"]["seconds"])
            );
            return;
        }
        _ => {}
    }
    println!(
        "raw produce → consume: {} records of {} bytes, topic {} ({} partitions) on {}",
        r["records"],
        r["value_bytes"],
        r["topic"].as_str().unwrap_or_default(),
        r["partitions"],
        r["brokers"].as_str().unwrap_or_default()
    );
    let transactions = if r["producer"]["transactional"] == true {
        format!(
            ", {} transactions of {}",
            r["producer"]["transactions"], r["producer"]["records_per_transaction"]
        )
    } else {
        String::new()
    };
    println!(
        "  produce   {:>10.0} records/s  ({:.1} MB/s, {:.2} s, acks=all, idempotent, linger.ms {}{transactions})",
        rate(&r["produce"]["rate"]),
        rate(&r["produce"]["mb_per_s"]),
        rate(&r["produce"]["seconds"]),
        r["producer"]["linger.ms"]
    );
    println!(
        "  consume   {:>10.0} records/s  ({:.2} s, read_committed)",
        rate(&r["consume"]["rate"]),
        rate(&r["consume"]["seconds"])
    );
    println!(
        "  combined  {:>10.0} records/s  ({:.2} s from first send to last record read)",
        rate(&r["combined"]["rate"]),
        rate(&r["combined"]["seconds"])
    );
}

/// Hands a record to the producer; while its local queue is full, serves delivery reports
/// until there is room (each wait counted in `waits`).
fn send_when_room<K, P>(
    producer: &BaseProducer<Deliveries>,
    mut record: BaseRecord<'_, K, P>,
    waits: &mut u64,
) -> Result<(), String>
where
    K: rdkafka::message::ToBytes + ?Sized,
    P: rdkafka::message::ToBytes + ?Sized,
{
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                *waits += 1;
                record = back;
                producer.poll(Duration::from_millis(1));
            }
            Err((e, _)) => return Err(format!("send: {e}")),
        }
    }
}
