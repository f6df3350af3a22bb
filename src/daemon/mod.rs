//! What makes a program a well-behaved daemon: command line, logging, service-manager
//! notifications, the watchdog, signals and a shutdown every task listens to.
//!
//! The `main` of each binary is one call into this module.

mod kinds;
mod logging;
mod process;
mod runner;

pub use kinds::{order_main, stage_main};
pub use logging::{LogReload, init_logging};
