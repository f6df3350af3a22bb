//! The tests against a real Kafka broker (`KOP_TEST_BROKERS`; scripts/test.sh starts one):
//! the daemons end to end, each test on topics and groups of its own, so they run side by
//! side. Built only with the feature `broker-tests` (scripts/test.sh sets it); without a
//! broker every test here fails, none skips.

#[path = "../support/mod.rs"]
mod support;

mod dashboard;
mod dedup;
mod hostile;
mod http_api;
mod http_limits;
mod kopctl;
mod lifecycle;
mod load;
mod notify;
mod outage;
mod oversize;
mod pipeline;
mod poison;
mod reload;
mod retry;
