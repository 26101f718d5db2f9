//! Cluster-wide rate limiting: the decisions are `trellis_core::ratelimit` (design and
//! bounds in its module doc); this shell moves their reports and leases over the
//! transport and follows the policy's limits.

pub mod shell;

pub use shell::RateLimits;
