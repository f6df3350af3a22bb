//! The test harness the three test crates share: a real Kafka broker (from `KOP_TEST_BROKERS`,
//! started by scripts/test.sh), the real daemon binaries, fresh topic and group names per
//! test. One file per concern; everything is re-exported here, so a test says
//! `use crate::support::*;`.
// Each test crate uses a part of it (and of the re-exports).
#![allow(dead_code, unused_imports)]

pub mod broker;
pub mod http;
pub mod kafka;
pub mod pipeline;
pub mod process;
pub mod prometheus;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

pub use broker::*;
pub use http::*;
pub use kafka::*;
pub use pipeline::*;
pub use process::*;
pub use prometheus::*;

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

/// The checkout under test: the directory cargo names when it runs the tests, else the one
/// the tests were built in (a target directory shared by two checkouts may hold a build of
/// the other one).
pub fn repo() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}
