//! Trellis's decisions, with no sockets, tasks or clock of their own: membership (SWIM
//! through foca), the policy CRDT and its sync, cluster-wide rate limiting, the data
//! plane's routing and balancing, enrollment and health verdicts. Each takes its input
//! and the time as arguments and returns what to do; the agent (`trellis-node`) is the
//! async shell that moves bytes and wakes these at their deadlines. As `quinn-proto` is
//! to `quinn`, this crate has no tokio, quinn, hyper or axum in its dependencies.
#![forbid(unsafe_code)]

pub mod enroll;
pub mod health;
pub mod membership;
pub mod mesh;
pub mod policy;
pub mod ratelimit;
pub mod rollout;
pub mod stats;
