//! Cluster-wide rate limiting, decided locally. See `DESIGN` below.
pub mod bucket;
pub mod limiter;
pub mod owner;
pub mod shell;
pub mod side;
pub mod sim;
#[cfg(test)]
mod tests;

pub use limiter::{LimitSpec, Limiter, Per, Timing};

pub use shell::RateLimits;
