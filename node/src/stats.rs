//! The shell of the mesh-wide metrics (`trellis_core::stats`): this node's requests go into
//! a recorder; every interval (aligned to the wall clock, so every node's intervals line up)
//! it is closed into a digest and each service's rows are sent to that service's owners
//! (`trellis_core::stats::owners`), which keep them under the name the sender's certificate
//! proves. Any node answers for the whole mesh by asking the owners (one round trip) and
//! merging their answers.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use trellis_core::membership::MemberState;
use trellis_core::stats::{owners, By, MeshStats, Point, Recorder, Row};
use trellis_proto::envelope::{self, MessageKind};
use trellis_proto::stats::{StatsAsk, StatsCall, StatsDigest, StatsHeld};

use crate::membership::Members;
use crate::transport::{Inbound, Transport};

/// The longest window a query may ask for; digests older than this are dropped.
pub const MAX_WINDOW: Duration = Duration::from_secs(15 * 60);
/// How long a query waits for the owners' answers; it answers with what came, naming
/// the owners that did not.
pub const ASK_TIMEOUT: Duration = Duration::from_secs(2);

/// A mesh-wide answer: the owners' figures, and who was asked but did not answer.
pub struct Answer<T> {
    pub figures: T,
    pub asked: usize,
    pub missing: Vec<String>,
}

/// Answers on their way to a query, by query id.
type Waiting = HashMap<u64, mpsc::UnboundedSender<(String, Vec<StatsHeld>)>>;

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
    /// Queries asked of this node by peers, and answered.
    pub asks_in: AtomicU64,
    waiting: Mutex<Waiting>,
    next_ask: AtomicU64,
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
            asks_in: AtomicU64::new(0),
            waiting: Mutex::default(),
            next_ask: AtomicU64::new(1),
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

    /// The mesh's figures for `service` (every service when None) over `window` (at most
    /// [`MAX_WINDOW`]), grouped `by`: asked of the service's owners, or of every live member.
    pub async fn query(
        &self,
        net: (&Members, &Arc<Transport>),
        service: Option<&str>,
        by: By,
        window: Duration,
    ) -> Answer<Vec<Row>> {
        let window = window.min(MAX_WINDOW);
        let a = self.ask(net, service, by, window, false).await;
        Answer { figures: trellis_core::stats::rows(&a.figures, window), asked: a.asked, missing: a.missing }
    }

    /// Per service, a point per interval over `window` (at most [`MAX_WINDOW`]).
    pub async fn series(
        &self,
        net: (&Members, &Arc<Transport>),
        window: Duration,
    ) -> Answer<std::collections::BTreeMap<String, Vec<Point>>> {
        let a = self.ask(net, None, By::Service, window.min(MAX_WINDOW), true).await;
        Answer { figures: trellis_core::stats::points(&a.figures), asked: a.asked, missing: a.missing }
    }

    /// Asks the nodes that keep the figures, waits up to [`ASK_TIMEOUT`] for them, and keeps
    /// one answer per service ([`trellis_core::stats::pick`]).
    async fn ask(
        &self,
        (members, transport): (&Members, &Arc<Transport>),
        service: Option<&str>,
        by: By,
        window: Duration,
        series: bool,
    ) -> Answer<Vec<StatsHeld>> {
        let me = members.identity.name.clone();
        let (alive, names) = alive(members).await;
        let targets: Vec<&str> = match service {
            Some(s) => owners::owners(s, &names),
            None => names.iter().map(String::as_str).collect(),
        };
        let id = self.next_ask.fetch_add(1, Relaxed);
        let (tx, mut rx) = mpsc::unbounded_channel();
        self.waiting.lock().expect("waiting lock").insert(id, tx);
        let ask = StatsAsk {
            id,
            service: service.map(str::to_string),
            by: by.name().into(),
            window_ms: window.as_millis() as u64,
            series,
        };
        let mut buf = Vec::new();
        envelope::encode(MessageKind::StatsQuery, &StatsCall::Ask(ask).encode(), &mut buf);
        let buf = Bytes::from(buf);
        let mut held = Vec::new();
        let mut pending: Vec<&str> = Vec::new();
        for t in &targets {
            if *t == me {
                held.extend(self.held(service, by, window, series));
            } else if let Some((_, addr)) = alive.iter().find(|(n, _)| n == t) {
                transport.send(*addr, buf.clone());
                pending.push(t);
            }
        }
        let deadline = tokio::time::Instant::now() + ASK_TIMEOUT;
        while !pending.is_empty() {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some((from, h))) if pending.contains(&from.as_str()) => {
                    pending.retain(|p| *p != from);
                    held.extend(h);
                }
                Ok(Some(_)) => {}
                _ => break,
            }
        }
        self.waiting.lock().expect("waiting lock").remove(&id);
        Answer {
            figures: trellis_core::stats::pick(held),
            asked: targets.len(),
            missing: pending.into_iter().map(str::to_string).collect(),
        }
    }

    /// What this node keeps for a query.
    fn held(&self, service: Option<&str>, by: By, window: Duration, series: bool) -> Vec<StatsHeld> {
        let now = crate::policy::now_ms();
        self.mesh.lock().expect("mesh stats lock").held(service, by, window.min(MAX_WINDOW), now, series)
    }

    /// Closes the interval that ends now.
    fn close(&self) -> StatsDigest {
        let len = self.interval.as_millis() as u64;
        let start_ms = trellis_core::stats::closing_interval(crate::policy::now_ms(), len);
        let mut r = self.recorder.lock().expect("stats lock");
        for (service, open) in self.tcp.lock().expect("tcp lock").iter() {
            r.tcp_open(service, *open);
        }
        r.close(start_ms, len as u32)
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

/// Runs until the agent stops: every interval, closes a digest and sends each part to the
/// owners of its services; keeps the parts peers send this node; answers peers' queries.
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
                let digest = stats.close();
                let (alive, names) = alive(&members).await;
                stats.mesh.lock().expect("mesh stats lock").retain_nodes(|n| names.iter().any(|a| a == n));
                for (owner, part) in owners::split(&digest, &names) {
                    if owner == me {
                        stats.mesh.lock().expect("mesh stats lock").add(&me, part);
                    } else if let Some((_, addr)) = alive.iter().find(|(n, _)| *n == owner) {
                        let mut buf = Vec::new();
                        envelope::encode(MessageKind::Stats, &part.encode(), &mut buf);
                        transport.send(*addr, Bytes::from(buf));
                    }
                }
            }
            msg = inbound.recv() => {
                let Some(msg) = msg else { break };
                on_message(&stats, &transport, msg);
            }
        }
    }
}

/// The members that may own figures, or drive a rollout (this node and the live ones),
/// with their addresses, and their names alone.
pub async fn alive(members: &Members) -> (Vec<(String, SocketAddr)>, Vec<String>) {
    let me = &members.identity.name;
    let alive: Vec<(String, SocketAddr)> = members
        .list()
        .await
        .into_iter()
        .filter(|m| m.state == MemberState::Alive || &m.id.name == me)
        .map(|m| (m.id.name.clone(), m.id.addr))
        .collect();
    let names = alive.iter().map(|(n, _)| n.clone()).collect();
    (alive, names)
}

/// A peer's digest part, question or answer.
fn on_message(stats: &Stats, transport: &Arc<Transport>, msg: Inbound) {
    // The membership task routed it here by its kind, from an envelope it already checked.
    let Ok((kind, body)) = envelope::decode(&msg.data, usize::MAX) else { return };
    if kind == MessageKind::Stats {
        match StatsDigest::decode(body) {
            Ok(d) => {
                stats.digests_in.fetch_add(1, Relaxed);
                stats.mesh.lock().expect("mesh stats lock").add(&msg.peer_name, d);
            }
            Err(e) => {
                stats.digests_refused.fetch_add(1, Relaxed);
                transport.close_malformed(&msg.conn, &e.to_string());
            }
        }
        return;
    }
    match StatsCall::decode(body) {
        Ok(StatsCall::Ask(ask)) => {
            stats.asks_in.fetch_add(1, Relaxed);
            let by = By::parse(&ask.by).unwrap_or(By::Service);
            let window = Duration::from_millis(ask.window_ms);
            let held = stats.held(ask.service.as_deref(), by, window, ask.series);
            let mut buf = Vec::new();
            envelope::encode(MessageKind::StatsQuery, &StatsCall::Answer { id: ask.id, held }.encode(), &mut buf);
            transport.send(msg.from, Bytes::from(buf));
        }
        Ok(StatsCall::Answer { id, held }) => {
            if let Some(tx) = stats.waiting.lock().expect("waiting lock").get(&id) {
                let _ = tx.send((msg.peer_name, held));
            }
        }
        Err(e) => {
            stats.digests_refused.fetch_add(1, Relaxed);
            transport.close_malformed(&msg.conn, &e.to_string());
        }
    }
}
