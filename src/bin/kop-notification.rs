//! kop-notification: consumes inventory.reserved and notifies the customer.
use std::process::ExitCode;
use std::sync::Arc;

fn main() -> ExitCode {
    kop::daemon::stage_main(
        kop::config::Service::Notification,
        Arc::new(kop::handlers::Notification),
    )
}
