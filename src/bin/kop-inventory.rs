//! kop-inventory: consumes payments.completed, reserves the items, produces inventory.reserved.
use std::process::ExitCode;
use std::sync::Arc;

fn main() -> ExitCode {
    kop::daemon::stage_main(
        kop::config::Service::Inventory,
        Arc::new(kop::handlers::Inventory),
    )
}
