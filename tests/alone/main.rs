//! The real-broker tests that need the machine to themselves: a broker or a three-node
//! cluster of their own under load (chaos, cluster, secure, start_script) or a container
//! under systemd (systemd). Two of them at once would starve each other on a small machine,
//! so they take turns: each holds [`take_turn`] for its whole run. Cargo runs this binary
//! after or before the others, never beside them. Built only with the feature
//! `broker-tests`, like tests/broker; without a broker every test here fails, none skips.

use tokio::sync::{Mutex, MutexGuard};

#[path = "../support/mod.rs"]
mod support;

mod chaos;
mod cluster;
mod secure;
mod start_script;
mod systemd;

static TURN: Mutex<()> = Mutex::const_new(());

/// Waits until no other test of this binary runs; the turn lasts as long as the guard.
/// (A tokio mutex: a failed test does not poison the next one's turn.)
async fn take_turn() -> MutexGuard<'static, ()> {
    TURN.lock().await
}

/// [`take_turn`] for a test that is not async.
fn take_turn_blocking() -> MutexGuard<'static, ()> {
    TURN.blocking_lock()
}
