//! What the two sides of the data plane share: the agent's inputs, the counters, and the
//! policy view rebuilt when policy changes. The outbound side (`forward`) and the inbound
//! side (`inbound`) each hold it, so neither needs the other's type.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use trellis_core::mesh::catalog;

use crate::membership::Members;
use crate::policy::Policy;
use crate::ratelimit::RateLimits;
use crate::transport::Transport;

/// What the data plane takes from the rest of the agent.
pub struct Inputs {
    pub members: Members,
    pub policy: Arc<Policy>,
    pub transport: Arc<Transport>,
    pub ratelimits: Arc<RateLimits>,
    /// This node's SPIFFE id: the caller of what its proxies send.
    pub spiffe_id: String,
    /// The access log, when on.
    pub access_log: Option<Arc<crate::access_log::AccessLog>>,
    /// The span exporter, when traces are on.
    pub spans: Option<Arc<crate::spans::Spans>>,
    /// Mesh-wide metrics: this node's requests are recorded here.
    pub stats: Arc<crate::stats::Stats>,
    /// This host's virtual service addresses, as their manager last published them.
    pub vips: tokio::sync::watch::Receiver<Arc<trellis_core::mesh::vip::Published>>,
}

#[derive(Debug, Default)]
pub struct ForwardStats {
    pub outbound: AtomicU64,
    pub inbound: AtomicU64,
    pub denied: AtomicU64,
    pub failed: AtomicU64,
    pub no_instance: AtomicU64,
    pub retries: AtomicU64,
    pub ejections: AtomicU64,
    /// Requests refused at once because the service's circuit was open.
    pub circuit_open: AtomicU64,
    /// Bytes written to and read from instances by this node's callers (HTTP and TCP,
    /// headers included), counted as they move.
    pub bytes_to_instances: Arc<AtomicU64>,
    pub bytes_from_instances: Arc<AtomicU64>,
    /// HTTP requests sent on a pooled connection rather than a new one.
    pub pool_reused: AtomicU64,
    /// Requests that ran out of their (route or service) timeout.
    pub timeouts: AtomicU64,
    /// Retries not taken because the retry budget was spent.
    pub budget_exhausted: AtomicU64,
    /// Proxied requests per service: status classes and latency.
    pub traffic: Mutex<trellis_core::mesh::traffic::Traffic>,
    /// Mirrored copies of requests, by outcome.
    pub mirror: super::tee::MirrorStats,
}

/// The data plane's shared state.
pub struct MeshView {
    pub node: Inputs,
    pub stats: Arc<ForwardStats>,
    snap: Mutex<Arc<catalog::Snapshot>>,
}

impl MeshView {
    pub fn new(node: Inputs, stats: Arc<ForwardStats>) -> Arc<MeshView> {
        Arc::new(MeshView { node, stats, snap: Mutex::default() })
    }

    /// The policy view for this request: rebuilt only when the store's published index
    /// moved, so a request never waits on the store lock (held across a log fsync).
    pub fn snapshot(&self) -> Arc<catalog::Snapshot> {
        let index = *self.node.policy.index.borrow();
        let mut cur = self.snap.lock().expect("snapshot lock");
        if cur.index != index || cur.index == 0 {
            let store = self.node.policy.store.lock().expect("policy lock");
            // Keyed by the published index, which may trail the store's own by an fsync.
            *cur = Arc::new(catalog::Snapshot { index, ..catalog::Snapshot::build(&store) });
        }
        cur.clone()
    }
}
