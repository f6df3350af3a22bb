//! The least a consume → produce hop costs with librdkafka: a relay with kop-payment's
//! clients and nothing else, the floor that bench/run.sh's drain row is compared with.
//!
//! ```sh
//! cargo bench --bench relay -- --brokers 127.0.0.1:9092 --input preloaded --records 300000
//! ```
//!
//! It reads `--records` records of an existing topic (`raw --preload` fills one) and writes
//! each one unchanged (key, value, headers) to a new topic, exactly once: in transactions of
//! `--txn-records` records with their offsets, as a draining kop stage commits. The clients
//! are the ones kop-payment makes, from the shipped `etc/kop/payment.toml` and the same
//! environment variables, so that the difference to kop-payment's drain is kop's own work
//! (decoding, the handler, routing headers, the handled-key store, the partition logs).
//!
//! One thread, and each commit waits for its answer before more is read: the rate is below
//! kop's, which keeps reading while it commits. What it measures is the CPU the process
//! spends per record, from the first record read to the last commit (`/proc/self/stat`,
//! 10 ms ticks), with the process start and the group join left out.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};

use kop::config::{Service, StageConfig};

#[derive(Parser, Debug)]
#[command(about = "CPU per record of a bare exactly-once consume → produce relay")]
struct Args {
    /// Kafka bootstrap servers.
    #[arg(long, env = "KAFKA_BROKERS", default_value = "localhost:9092")]
    brokers: String,
    /// The topic to read (it must hold at least --records records).
    #[arg(long)]
    input: String,
    /// The topic to write (default: <input>.relay).
    #[arg(long)]
    output: Option<String>,
    /// Records to relay.
    #[arg(long, default_value_t = 300_000)]
    records: u64,
    /// Records per transaction (kop's `stage.commit_max_records`).
    #[arg(long, default_value_t = 5_000)]
    txn_records: u64,
    /// The stage configuration whose clients are used.
    #[arg(long, default_value = "etc/kop/payment.toml")]
    config: std::path::PathBuf,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match relay(&args) {
        Ok(report) => {
            if args.json {
                println!("{report}");
            } else {
                println!(
                    "relayed {} records in {:.2} s: {:.0} records/s, {:.2} µs of CPU per record",
                    report["records"],
                    report["seconds"].as_f64().unwrap_or_default(),
                    report["records_per_s"].as_f64().unwrap_or_default(),
                    report["cpu_us_per_record"].as_f64().unwrap_or_default(),
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("relay: {e}");
            ExitCode::FAILURE
        }
    }
}

fn relay(args: &Args) -> Result<serde_json::Value, String> {
    if args.records == 0 || args.txn_records == 0 {
        return Err("--records and --txn-records must be at least 1".into());
    }
    let output = args
        .output
        .clone()
        .unwrap_or_else(|| format!("{}.relay", args.input));
    let run_id = format!("{:08x}", rand::random::<u32>());
    let group = format!("kop-bench-relay-{run_id}");
    let env = BTreeMap::from([
        ("KAFKA_BROKERS", args.brokers.as_str()),
        ("ORDER_TOPIC", args.input.as_str()),
        ("PAYMENT_COMPLETED_TOPIC", output.as_str()),
        ("PAYMENT_GROUP_ID", group.as_str()),
        ("KOP_INSTANCE_ID", run_id.as_str()),
    ]);
    let config =
        StageConfig::load(Service::Payment, Some(&args.config), &env).map_err(|e| e.to_string())?;
    let common = &config.common;

    // kop's topic creation blocks in place, which needs the multi-threaded runtime.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime
        .block_on(kop::kafka::ensure_topics(
            common,
            &[output.as_str()],
            Duration::from_secs(30),
        ))
        .map_err(|e| format!("create {output}: {e}"))?;

    let transactional_id = format!("kop-bench-relay-{run_id}");
    let producer: ThreadedProducer<DefaultProducerContext> =
        kop::kafka::stage_producer_config(common, Some(&transactional_id))
            .create()
            .map_err(|e| format!("producer: {e}"))?;
    let timeout = Duration::from_secs(30);
    producer
        .init_transactions(timeout)
        .map_err(|e| format!("init_transactions: {e}"))?;
    let consumer: BaseConsumer = kop::kafka::stage_consumer_config(common, &config.group_id)
        .create()
        .map_err(|e| format!("consumer: {e}"))?;
    consumer
        .subscribe(&[&args.input])
        .map_err(|e| format!("subscribe: {e}"))?;

    let mut relayed = 0u64;
    let mut in_txn = 0u64;
    let mut started: Option<(Instant, u64)> = None;
    let mut idle_since = Instant::now();
    while relayed < args.records {
        let message = match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(message)) => message,
            Some(Err(e)) => return Err(format!("consume: {e}")),
            None => {
                if idle_since.elapsed() > Duration::from_secs(30) {
                    return Err(format!(
                        "no record for 30 s after {relayed} of {}: does {} hold that many?",
                        args.records, args.input
                    ));
                }
                continue;
            }
        };
        idle_since = Instant::now();
        if started.is_none() {
            started = Some((Instant::now(), cpu_ticks()?));
        }
        if in_txn == 0 {
            producer
                .begin_transaction()
                .map_err(|e| format!("begin_transaction: {e}"))?;
        }
        let mut record = BaseRecord::<[u8], [u8]>::to(&output);
        if let Some(key) = message.key() {
            record = record.key(key);
        }
        if let Some(value) = message.payload() {
            record = record.payload(value);
        }
        if let Some(headers) = message.headers() {
            record = record.headers(headers.detach());
        }
        let mut record = record;
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((e, back)) if e.rdkafka_error_code() == Some(QUEUE_FULL) => {
                    record = back;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((e, _)) => return Err(format!("produce: {e}")),
            }
        }
        relayed += 1;
        in_txn += 1;
        if in_txn == args.txn_records || relayed == args.records {
            let positions = consumer.position().map_err(|e| format!("position: {e}"))?;
            let metadata = consumer
                .group_metadata()
                .ok_or("the consumer has no group metadata")?;
            producer
                .send_offsets_to_transaction(&positions, &metadata, timeout)
                .and_then(|()| producer.commit_transaction(timeout))
                .map_err(|e| format!("commit: {e}"))?;
            in_txn = 0;
        }
    }
    let (start, ticks_before) = started.ok_or("nothing was read")?;
    let seconds = start.elapsed().as_secs_f64();
    let cpu_seconds = (cpu_ticks()? - ticks_before) as f64 / TICKS_PER_SECOND;
    Ok(serde_json::json!({
        "records": relayed,
        "txn_records": args.txn_records,
        "seconds": seconds,
        "records_per_s": relayed as f64 / seconds,
        "cpu_us_per_record": cpu_seconds * 1e6 / relayed as f64,
    }))
}

const QUEUE_FULL: rdkafka::types::RDKafkaErrorCode = rdkafka::types::RDKafkaErrorCode::QueueFull;

/// `sysconf(_SC_CLK_TCK)`, 100 on Linux.
const TICKS_PER_SECOND: f64 = 100.0;

/// User + system CPU of this process so far, in clock ticks (`/proc/self/stat` 14 and 15).
fn cpu_ticks() -> Result<u64, String> {
    let stat = std::fs::read_to_string("/proc/self/stat").map_err(|e| e.to_string())?;
    // The fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> Result<u64, String> {
        fields
            .get(n - 3)
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| format!("/proc/self/stat has no field {n}"))
    };
    Ok(field(14)? + field(15)?)
}
