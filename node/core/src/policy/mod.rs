//! Cluster policy as data: typed objects ([`model`]) in last-writer-wins registers keyed by
//! a hybrid logical clock ([`hlc`]), merged by [`store`], reconciled between nodes by the
//! anti-entropy exchange in [`sync`]. No IO here: the agent's `policy` shell keeps the log
//! on disk and moves the messages.

pub mod hlc;
pub mod model;
pub mod rollout;
pub mod store;
pub mod sync;
#[cfg(test)]
mod tests;

pub use model::{FieldError, Kind};
pub use store::{Key, PolicyStore, Register, StoreError, Version, WriterAuth};
