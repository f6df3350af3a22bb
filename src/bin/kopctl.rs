//! kopctl: the operator's tool — create the topics, inspect and replay dead letters.
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kop::admin::{self, ReplayOptions};
use kop::config::{self, Guarantee, ProcessEnv, Service, StageConfig};

#[derive(Parser)]
#[command(version, about = "Operate a kop pipeline: topics and dead letters")]
struct Cli {
    /// Bootstrap servers; default KAFKA_BROKERS, else (topics ensure) the configuration
    /// files' bootstrap.servers, else localhost:9092.
    // No clap default: a default here would hide the files' value from `topics ensure`.
    #[arg(long, short, env = "KAFKA_BROKERS")]
    brokers: Option<String>,
    /// Extra librdkafka property, e.g. -X security.protocol=SASL_SSL (repeatable).
    #[arg(short = 'X', value_name = "KEY=VALUE", value_parser = parse_property)]
    property: Vec<(String, String)>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Topic administration.
    Topics {
        #[command(subcommand)]
        command: TopicsCommand,
    },
    /// Dead-letter topics.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
}

#[derive(Subcommand)]
enum TopicsCommand {
    /// Create every topic of the pipeline (main, .retry, .dlq) that does not exist yet, with
    /// the names, partitions and replication the daemons' configuration gives.
    Ensure {
        /// Folder of the daemons' TOML files (it must exist); default /etc/kop when present,
        /// else built-in defaults. Environment variables apply as they do for the daemons.
        #[arg(long, value_name = "DIR")]
        config_dir: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum DlqCommand {
    /// Print the records of a DLQ topic with their timestamp and headers. Bytes that are
    /// not UTF-8 are shown as hex ("(hex) …" in text, {"hex": "…"} in JSON).
    List {
        topic: String,
        /// One JSON object per line instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Publish DLQ records again (key, value and headers kept, attempts reset) and print how
    /// many. Continues where the previous replay of the same topic stopped; a failed send
    /// stops it, and a rerun continues from the record that failed.
    ///
    /// Filters pass over the records they leave out for good: their offsets are committed
    /// like those replayed. Add --from-beginning to revisit them.
    Replay {
        topic: String,
        /// Target topic; default: each record's x-origin-topic.
        #[arg(long)]
        to: Option<String>,
        /// Only records whose x-error contains this text.
        #[arg(long)]
        error_contains: Option<String>,
        /// Only records with this key (order id).
        #[arg(long)]
        key: Option<String>,
        /// Scan the whole DLQ, including records replayed before.
        #[arg(long)]
        from_beginning: bool,
        /// List each record that would be replayed (partition, offset, key, target topic);
        /// publish and commit nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

fn parse_property(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .ok_or_else(|| format!("`{text}` is not KEY=VALUE"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut client = rdkafka::ClientConfig::new();
    client
        .set(
            "bootstrap.servers",
            cli.brokers.as_deref().unwrap_or("localhost:9092"),
        )
        .set("client.id", "kopctl");
    for (key, value) in &cli.property {
        client.set(key, value);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("kopctl: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli, client)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Config(e)) => {
            eprintln!("kopctl: configuration error: {e}");
            ExitCode::from(config::EX_CONFIG as u8)
        }
        Err(Failure::Kafka(e)) => {
            eprintln!("kopctl: Kafka: {e}");
            ExitCode::FAILURE
        }
        Err(Failure::Admin(e)) => {
            eprintln!("kopctl: {e}");
            ExitCode::FAILURE
        }
        Err(Failure::ConfigDir(dir)) => {
            eprintln!(
                "kopctl: configuration error: --config-dir {}: no such directory",
                dir.display()
            );
            ExitCode::from(config::EX_CONFIG as u8)
        }
        Err(Failure::Changelog(e)) => {
            eprintln!("kopctl: {e}");
            ExitCode::FAILURE
        }
    }
}

enum Failure {
    Config(config::ConfigError),
    Kafka(rdkafka::error::KafkaError),
    Admin(admin::AdminError),
    ConfigDir(PathBuf),
    Changelog(String),
}

impl From<admin::AdminError> for Failure {
    fn from(e: admin::AdminError) -> Self {
        Failure::Admin(e)
    }
}

impl From<rdkafka::error::KafkaError> for Failure {
    fn from(e: rdkafka::error::KafkaError) -> Self {
        Failure::Kafka(e)
    }
}

async fn run(cli: Cli, client: rdkafka::ClientConfig) -> Result<(), Failure> {
    match cli.command {
        Command::Topics {
            command: TopicsCommand::Ensure { config_dir },
        } => {
            if let Some(dir) = config_dir.as_ref().filter(|d| !d.is_dir()) {
                return Err(Failure::ConfigDir(dir.clone()));
            }
            let dir = config_dir.or_else(|| Some(PathBuf::from("/etc/kop")).filter(|d| d.is_dir()));
            // A stage's output is the next stage's input: each topic is reported once.
            let mut reported = std::collections::HashSet::new();
            for service in [Service::Payment, Service::Inventory, Service::Notification] {
                let path = dir
                    .as_ref()
                    .map(|d| d.join(format!("{}.toml", service.short_name())))
                    .filter(|p| p.exists());
                let mut stage = StageConfig::load(service, path.as_deref(), &ProcessEnv)
                    .map_err(Failure::Config)?;
                if let Some(brokers) = &cli.brokers {
                    stage
                        .common
                        .kafka
                        .insert("bootstrap.servers".into(), brokers.clone());
                }
                for (key, value) in &cli.property {
                    stage.common.kafka.insert(key.clone(), value.clone());
                }
                let mut topics = vec![
                    stage.input.as_str(),
                    stage.retry_topic.as_str(),
                    stage.dlq_topic.as_str(),
                ];
                topics.extend(stage.output.as_deref());
                let created = kop::kafka::ensure_topics(
                    &stage.common,
                    &topics,
                    std::time::Duration::from_secs(30),
                )
                .await?;
                for topic in topics {
                    if !reported.insert(topic.to_string()) {
                        continue;
                    }
                    let state = if created.iter().any(|c| c == topic) {
                        "created"
                    } else {
                        "exists"
                    };
                    println!("{topic}\t{state}");
                }
                // Exactly-once keeps the handled keys in a compacted changelog.
                if stage.dedup.enabled && stage.guarantee == Guarantee::ExactlyOnce {
                    stage.common.topics.create = true;
                    let partitions =
                        kop::kafka::topic_partitions(&stage.common, &stage.input).await?;
                    let created = kop::kafka::ensure_changelog(
                        &stage.common,
                        &stage.dedup.changelog,
                        partitions,
                        stage.dedup.window,
                    )
                    .await
                    .map_err(Failure::Changelog)?;
                    let state = if created { "created" } else { "exists" };
                    println!("{}\t{state}", stage.dedup.changelog);
                }
            }
            Ok(())
        }
        Command::Dlq {
            command: DlqCommand::List { topic, json },
        } => {
            let mut dead_letters = 0;
            let count = tokio::task::block_in_place(|| {
                admin::list(&client, &topic, |letter| {
                    if letter.is_dead_letter() {
                        dead_letters += 1;
                    }
                    print_letter(&letter, json);
                })
            })?;
            if count > dead_letters {
                eprintln!(
                    "{topic}: {dead_letters} dead letters; {} records lack the {} and {} \
                     headers kop gives dead letters: {}",
                    count - dead_letters,
                    kop::kafka::H_ERROR,
                    kop::kafka::H_ORIGIN_TOPIC,
                    if dead_letters == 0 {
                        "this is not a dead-letter topic"
                    } else {
                        "not dead letters"
                    }
                );
            } else {
                eprintln!("{dead_letters} dead letters");
            }
            Ok(())
        }
        Command::Dlq {
            command:
                DlqCommand::Replay {
                    topic,
                    to,
                    error_contains,
                    key,
                    from_beginning,
                    dry_run,
                },
        } => {
            let options = ReplayOptions {
                to,
                error_contains,
                key,
                from_beginning,
                dry_run,
            };
            let report = admin::replay(&client, &topic, &options, |plan| {
                if dry_run {
                    let key = plan.key.map_or("-".to_string(), ToString::to_string);
                    println!(
                        "partition {} offset {} key {key} -> {}",
                        plan.partition, plan.offset, plan.target
                    );
                }
            })
            .await?;
            let verb = if dry_run { "would replay" } else { "replayed" };
            let passed = if dry_run {
                "would be passed over"
            } else {
                "passed over, their offsets committed"
            };
            println!(
                "{verb} {} records from {topic} ({} records {passed}; {} without a target topic)",
                report.replayed, report.filtered_out, report.without_target
            );
            Ok(())
        }
    }
}

fn print_letter(letter: &admin::DeadLetter, json: bool) {
    if json {
        println!("{}", serde_json::to_string(letter).unwrap_or_default());
        return;
    }
    let time = letter
        .timestamp
        .and_then(|ms| u64::try_from(ms).ok())
        .map(|ms| {
            let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
            humantime::format_rfc3339_millis(at).to_string()
        })
        .unwrap_or_else(|| "-".into());
    let key = letter
        .key
        .as_ref()
        .map_or("-".to_string(), ToString::to_string);
    println!(
        "partition {} offset {} time {time} key {key}",
        letter.partition, letter.offset
    );
    for (name, value) in &letter.headers {
        match value {
            Some(value) => println!("  {name}: {value}"),
            None => println!("  {name}: (null)"),
        }
    }
    match &letter.value {
        Some(value) => println!("  value: {value}"),
        None => println!("  value: (null)"),
    }
}
