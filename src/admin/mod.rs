//! Operator tasks behind `kopctl`: reading dead-letter topics and replaying them.
//!
//! A replay remembers how far it got in a consumer group of its own
//! (`kopctl-replay.<dlq topic>`), so running it twice does not publish the same dead letter
//! twice; `from_beginning` scans the whole topic again. Both read the topic in bounded
//! batches, so a DLQ of any size fits in a small, fixed amount of memory.

mod error;
mod letter;
mod read;
mod replay;

pub use error::AdminError;
pub use letter::{Bytes, DeadLetter};
pub use read::list;
pub use replay::{Plan, ReplayOptions, ReplayReport, replay};
