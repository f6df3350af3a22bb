//! kop, the Kafka Order Platform: an event-driven order pipeline on Apache Kafka.
//!
//! `POST /order` (kop-order) → `orders.created` → kop-payment → `payments.completed` →
//! kop-inventory → `inventory.reserved` → kop-notification. Each stage is a [`stage::Stage`]
//! running a small [`stage::Handler`] from [`handlers`]; the binaries in `src/bin` only call
//! into [`daemon`].
#![forbid(unsafe_code)]

pub mod admin;
pub mod config;
pub mod daemon;
pub mod event;
pub mod handlers;
pub mod kafka;
pub mod lifecycle;
pub mod load;
pub mod metrics;
pub mod order;
pub mod retry;
pub mod serve;
pub mod stage;
pub mod trace;

/// jemalloc instead of glibc's malloc, for Rust and (through the crate's override of
/// `malloc`) for librdkafka alike. A stage allocates and frees a few small blocks per
/// record on its loop thread while librdkafka's threads free what it produced: with glibc
/// that was about 30 % of a draining kop-payment's profile (arena locks, consolidation),
/// and jemalloc cut its CPU per record by a third (bench/README.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
