//! kop-order: the REST API. `POST /order` publishes to orders.created.
use std::process::ExitCode;

fn main() -> ExitCode {
    kop::daemon::order_main()
}
