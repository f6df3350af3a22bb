//! kop-payment: consumes orders.created, charges the order, produces payments.completed.
use std::process::ExitCode;
use std::sync::Arc;

fn main() -> ExitCode {
    kop::daemon::stage_main(
        kop::config::Service::Payment,
        Arc::new(kop::handlers::Payment),
    )
}
