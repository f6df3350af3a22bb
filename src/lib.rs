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
