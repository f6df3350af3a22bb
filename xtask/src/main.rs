//! The project's development commands, run as `cargo xtask ...` from anywhere in the
//! repository (see .cargo/config.toml). Written in Rust rather than shell so that the
//! broker harness is one typed library the tests use directly.

mod kafka;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Development commands of kop",
    version
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run Apache Kafka (KRaft) on 127.0.0.1 for development and tests.
    #[command(
        long_about = kafka::LONG_ABOUT,
        after_help = kafka::AFTER_HELP,
        arg_required_else_help = true
    )]
    Kafka {
        #[command(subcommand)]
        command: kafka::Command,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Kafka { command } => kafka::run(command),
    }
}
