//! Faults the chaos harness injects into an agent's own transport (hidden flags; off in
//! every normal start).

use std::net::SocketAddr;

/// Test-only fault injection: drop a share of outgoing messages, or everything to and from
/// some peers (a partition). Off unless the agent is started with the hidden flags
/// `--fault-drop-rate` or `--fault-injection` meant for the chaos harness, which exist only
/// in a build with the `fault-injection` feature (the workspace's test build).
#[derive(Debug, Default, Clone)]
pub struct Faults {
    pub drop_rate: f64,
    pub blocked: std::collections::HashSet<SocketAddr>,
    /// Dropped only on the way out: these peers still reach us, we do not reach them
    /// (an asymmetric partition).
    pub blocked_out: std::collections::HashSet<SocketAddr>,
    /// Added to every outgoing peer message (this kernel has no `tc netem`).
    pub delay: std::time::Duration,
    /// A deliberately broken agent for the chaos history checker: policy writes are answered
    /// 200 with a version but never stored.
    pub drop_writes: bool,
}
