//! The shell of the mesh-wide metrics (`trellis_core::stats`): this node's requests go into
//! a recorder; every interval (aligned to the wall clock, so every node's intervals line up)
//! it is closed into a digest, kept, and sent to every live peer; peers' digests are kept
//! under the name their certificate proves. Any node then answers for the whole mesh.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use trellis_core::membership::MemberState;
use trellis_core::stats::{By, MeshStats, Recorder, Row};
use trellis_proto::envelope::{self, MessageKind};
use trellis_proto::stats::StatsDigest;

use crate::membership::Members;
use crate::transport::{Inbound, Transport};

/// The longest window a query may ask for; digests older than this are dropped.
pub const MAX_WINDOW: Duration = Duration::from_secs(15 * 60);

pub struct Stats {
    recorder: Mutex<Recorder>,
    mesh: Mutex<MeshStats>,
    /// How often digests are closed and sent.
    pub interval: Duration,
    /// Open TCP connections from this node's listeners, by service.
    tcp: Mutex<HashMap<String, u64>>,
    /// Peers' digests kept, and refused as malformed (`/metrics`).
    pub digests_in: AtomicU64,
    pub digests_refused: AtomicU64,
}

impl Stats {
    pub fn new(interval: Duration) -> Arc<Stats> {
        Arc::new(Stats {
            recorder: Mutex::default(),
            mesh: Mutex::new(MeshStats::new(MAX_WINDOW)),
            interval,
            tcp: Mutex::default(),
            digests_in: AtomicU64::new(0),
            digests_refused: AtomicU64::new(0),
        })
    }

    /// One request from this node's callers: to `service` by `route` (empty: none),
    /// answered by an instance on `dest` (empty: the proxy answered itself).
    pub fn request(&self, service: &str, route: &str, dest: &str, error: bool, took: Duration) {
        self.recorder.lock().expect("stats lock").request(service, route, dest, error, took);
    }

    /// Counts a TCP connection to `service` open until the guard drops.
    pub fn tcp_open(self: &Arc<Self>, service: &str) -> TcpOpen {
        *self.tcp.lock().expect("tcp lock").entry(service.to_string()).or_default() += 1;
        TcpOpen { stats: self.clone(), service: service.to_string() }
    }

    /// The mesh's figures over `window` (at most [`MAX_WINDOW`]).
    pub fn query(&self, service: Option<&str>, by: By, window: Duration) -> Vec<Row> {
        let window = window.min(MAX_WINDOW);
        self.mesh.lock().expect("mesh stats lock").query(service, by, window, crate::policy::now_ms())
    }

    /// Per service, a point per interval over `window` (at most [`MAX_WINDOW`]).
    pub fn series(&self, window: Duration) -> std::collections::BTreeMap<String, Vec<trellis_core::stats::Point>> {
        let window = window.min(MAX_WINDOW);
        self.mesh.lock().expect("mesh stats lock").series(window, crate::policy::now_ms())
    }

    /// Closes the interval that ends now, keeps it as `me`'s, and returns it to send.
    fn close(&self, me: &str) -> StatsDigest {
        let len = self.interval.as_millis() as u64;
        let start_ms = trellis_core::stats::closing_interval(crate::policy::now_ms(), len);
        let digest = {
            let mut r = self.recorder.lock().expect("stats lock");
            for (service, open) in self.tcp.lock().expect("tcp lock").iter() {
                r.tcp_open(service, *open);
            }
            r.close(start_ms, len as u32)
        };
        self.mesh.lock().expect("mesh stats lock").add(me, digest.clone());
        digest
    }
}

/// A TCP connection counted in [`Stats`] while it is open.
pub struct TcpOpen {
    stats: Arc<Stats>,
    service: String,
}

impl Drop for TcpOpen {
    fn drop(&mut self) {
        let mut tcp = self.stats.tcp.lock().expect("tcp lock");
        if let Some(n) = tcp.get_mut(&self.service) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                tcp.remove(&self.service);
            }
        }
    }
}

/// Runs until the agent stops: closes and sends a digest every interval, keeps peers'.
pub async fn run(stats: Arc<Stats>, members: Members, transport: Arc<Transport>, mut inbound: mpsc::Receiver<Inbound>) {
    let me = members.identity.name.clone();
    let len = stats.interval.as_millis() as u64;
    // The first tick waits for the next interval boundary of the wall clock.
    let wait = len - crate::policy::now_ms() % len;
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + Duration::from_millis(wait), stats.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let digest = stats.close(&me);
                let list = members.list().await;
                let alive: Vec<(String, SocketAddr)> = list
                    .iter()
                    .filter(|m| m.state == MemberState::Alive && m.id.name != me)
                    .map(|m| (m.id.name.clone(), m.id.addr))
                    .collect();
                stats.mesh.lock().expect("mesh stats lock").retain_nodes(|n| n == me || alive.iter().any(|(a, _)| a == n));
                let mut buf = Vec::new();
                envelope::encode(MessageKind::Stats, &digest.encode(), &mut buf);
                let buf = Bytes::from(buf);
                for (_, addr) in alive {
                    transport.send(addr, buf.clone());
                }
            }
            msg = inbound.recv() => {
                let Some(msg) = msg else { break };
                match StatsDigest::decode(&msg.data[envelope::HEADER_LEN..]) {
                    Ok(d) => {
                        stats.digests_in.fetch_add(1, Relaxed);
                        stats.mesh.lock().expect("mesh stats lock").add(&msg.peer_name, d);
                    }
                    Err(e) => {
                        stats.digests_refused.fetch_add(1, Relaxed);
                        transport.close_malformed(&msg.conn, &e.to_string());
                    }
                }
            }
        }
    }
}
