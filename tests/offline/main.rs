//! The tests that need no Kafka broker and no Java: the stage loop against librdkafka's
//! mock cluster, configuration errors, the command lines, and the checks of the operations
//! and Nix files. Plain `cargo test` runs them (with the unit tests); the checks of the
//! files run the tools scripts/test.sh installs (see each module).

#[path = "../support/mod.rs"]
mod support;

mod cli;
mod config_errors;
mod nix_files;
mod ops_files;
mod stage_faults;
