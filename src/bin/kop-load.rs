//! kop-load: drives the order API at a constant arrival rate (or as fast as it goes) and
//! reports latency percentiles, status codes and, with --e2e, end-to-end latency.
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use kop::load::{self, E2eConfig, LoadConfig};

#[derive(Parser)]
#[command(
    version,
    about = "Load generator for the kop order API",
    after_help = "Exit status: 0 when every request was answered 202 or 503 and some were \
                  accepted (and, with --e2e, every accepted order arrived); 1 otherwise; \
                  2 for bad flags."
)]
struct Args {
    /// Requests per second (open loop: each request is due at its time, answered or not).
    #[arg(long, default_value_t = 10.0)]
    rps: f64,
    /// How long to run: seconds ("120") or a duration ("2m", "90s").
    #[arg(long, default_value = "60", value_parser = parse_duration)]
    duration: Duration,
    /// Requests in flight at once at most.
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    #[arg(long, default_value = "http://localhost:4000/order")]
    url: String,
    /// Ignore --rps: each client sends as soon as its previous answer came (maximum rate).
    #[arg(long)]
    max_rate: bool,
    /// Also read the last topic and report end-to-end latency (accepted → arrived there).
    #[arg(long)]
    e2e: bool,
    /// The topic --e2e reads.
    #[arg(
        long,
        env = "INVENTORY_RESERVED_TOPIC",
        default_value = "inventory.reserved"
    )]
    e2e_topic: String,
    /// Kafka for --e2e.
    #[arg(long, env = "KAFKA_BROKERS", default_value = "localhost:9092")]
    brokers: String,
    /// How long --e2e waits for the last orders after the load stopped.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    drain: Duration,
    /// Print the summary as JSON (and no progress line).
    #[arg(long)]
    json: bool,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    match text.parse::<f64>() {
        Ok(seconds) if seconds.is_finite() && seconds >= 0.0 => {
            Ok(Duration::from_secs_f64(seconds))
        }
        Ok(_) => Err(format!("`{text}` is not a positive duration")),
        Err(_) => humantime::parse_duration(text).map_err(|e| format!("`{text}`: {e}")),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.concurrency == 0 {
        eprintln!("kop-load: --concurrency must be at least 1");
        return ExitCode::from(2);
    }
    let valid_rate = args.rps.is_finite() && args.rps > 0.0;
    if !(args.max_rate || valid_rate) {
        eprintln!("kop-load: --rps must be a positive number (or use --max-rate)");
        return ExitCode::from(2);
    }
    let config = LoadConfig {
        url: args.url,
        rps: if args.max_rate { 0.0 } else { args.rps },
        duration: args.duration,
        concurrency: args.concurrency,
        e2e: args.e2e.then_some(E2eConfig {
            brokers: args.brokers,
            topic: args.e2e_topic,
            drain: args.drain,
        }),
        progress: !args.json,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("kop-load: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(load::run(config)) {
        Ok(report) => {
            if args.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).unwrap_or_default()
                );
            } else {
                print!("{}", load::render(&report));
            }
            let failures = report.failures();
            if failures.is_empty() {
                ExitCode::SUCCESS
            } else {
                for failure in failures {
                    eprintln!("kop-load: {failure}");
                }
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("kop-load: {e}");
            ExitCode::FAILURE
        }
    }
}
