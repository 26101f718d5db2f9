//! The membership shell: one task owns the SWIM core (`trellis_core::membership`), moves
//! its datagrams over the transport, wakes it at its deadlines, drives policy sync, and
//! publishes the alive members. Everyone else reaches it through a [`Members`] handle.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};
use trellis_core::membership::{AliveMembers, MemberEvent, MemberView, Membership, PacketError, Stats};
use trellis_core::policy::sync;
use trellis_proto::{envelope, limits, MessageKind, NodeIdentity, PolicyEntry, PolicySync};

use crate::policy::Policy;
use crate::transport::{Inbound, PeerRefusal, Transport};

/// Questions and orders for the membership task.
pub enum Command {
    Members(oneshot::Sender<Vec<MemberView>>),
    Stats(oneshot::Sender<Stats>),
    Join(Vec<SocketAddr>),
    Leave(oneshot::Sender<()>),
    /// Spread a local policy write.
    Publish(PolicyEntry),
    /// Per member: when we last received gossip from it (for `trellis check`).
    Peers(oneshot::Sender<Vec<(MemberView, Option<Duration>)>>),
    /// New labels (SIGHUP): gossiped under a new generation of our identity.
    SetLabels(std::collections::BTreeMap<String, String>, oneshot::Sender<Result<u64, String>>),
}

/// A handle on the membership task, and this node's identity: what a subsystem needs to
/// know who is in the cluster and to spread what it wrote.
#[derive(Clone)]
pub struct Members {
    pub identity: NodeIdentity,
    pub cluster_id: String,
    commands: mpsc::Sender<Command>,
    /// Alive members, republished by the membership task when they change.
    pub alive: watch::Receiver<Arc<AliveMembers>>,
    /// Members not declared down nor gone (alive or suspect): requests in flight to them go on.
    pub standing: watch::Receiver<Arc<HashSet<String>>>,
}

impl Members {
    pub async fn list(&self) -> Vec<MemberView> {
        self.ask(Command::Members).await.unwrap_or_default()
    }

    pub async fn stats(&self) -> Stats {
        self.ask(Command::Stats).await.unwrap_or_default()
    }

    /// Per member: when we last received gossip from it (for `trellis check`).
    pub async fn peers(&self) -> Vec<(MemberView, Option<Duration>)> {
        self.ask(Command::Peers).await.unwrap_or_default()
    }

    /// Leaves the cluster gracefully (the task announces it and waits for it to spread).
    pub async fn leave(&self) {
        let _ = self.ask(Command::Leave).await;
    }

    pub async fn join(&self, seeds: Vec<SocketAddr>) {
        let _ = self.commands.send(Command::Join(seeds)).await;
    }

    /// Spreads a local policy write to every member.
    pub async fn publish(&self, entry: PolicyEntry) {
        let _ = self.commands.send(Command::Publish(entry)).await;
    }

    /// New labels, gossiped under a new generation of this node's identity.
    pub async fn set_labels(&self, labels: std::collections::BTreeMap<String, String>) -> Result<u64, String> {
        let (tx, rx) = oneshot::channel();
        let _ = self.commands.send(Command::SetLabels(labels, tx)).await;
        rx.await.unwrap_or_else(|_| Err("the membership task has stopped".into()))
    }

    /// The SPIFFE identity of a member, derived from its certified name.
    pub fn spiffe_of(&self, name: &str) -> String {
        format!("spiffe://{}/node/{}", self.cluster_id, name)
    }

    async fn ask<T>(&self, cmd: impl FnOnce(oneshot::Sender<T>) -> Command) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        self.commands.send(cmd(tx)).await.ok()?;
        rx.await.ok()
    }
}

/// What the membership task moves: peer messages in from the transport, rate-limit
/// messages on to their task, policy sync every `sync_every`.
pub struct Links {
    pub transport: Arc<Transport>,
    pub policy: Arc<Policy>,
    pub sync_every: Duration,
    pub inbound: mpsc::Receiver<Inbound>,
    pub limits: mpsc::Sender<Inbound>,
    /// Mesh-wide metrics digests go to the stats task.
    pub stats: mpsc::Sender<Inbound>,
}

/// Starts the membership task over `core`; `publish` holds entries to spread at once.
pub fn spawn(core: Membership, cluster_id: String, links: Links, publish: Vec<PolicyEntry>) -> Members {
    let Links { transport, policy, sync_every, inbound, limits, stats } = links;
    let (commands, cmd_rx) = mpsc::channel(256 + publish.len());
    for entry in publish {
        let _ = commands.try_send(Command::Publish(entry));
    }
    let identity = core.identity().clone();
    let (alive_tx, alive) = watch::channel(Arc::new(trellis_core::membership::alive_members(&core.members())));
    let (standing_tx, standing) = watch::channel(Arc::new(trellis_core::membership::standing_members(&core.members())));
    let shell = Shell {
        core,
        transport,
        policy,
        sync_every,
        limits,
        stats,
        alive: alive_tx,
        standing: standing_tx,
        alive_checked: Instant::now(),
        last_heard: Default::default(),
    };
    tokio::spawn(shell.run(inbound, cmd_rx));
    Members { identity, cluster_id, commands, alive, standing }
}

/// The agent task: the only owner of the membership core; it also drives policy sync.
struct Shell {
    core: Membership,
    transport: Arc<Transport>,
    policy: Arc<Policy>,
    sync_every: Duration,
    /// Rate-limit messages go to the limiter's own task.
    limits: mpsc::Sender<Inbound>,
    stats: mpsc::Sender<Inbound>,
    alive: watch::Sender<Arc<AliveMembers>>,
    standing: watch::Sender<Arc<HashSet<String>>>,
    /// When the alive set was last compared: suspicion ends no event, so it is also
    /// looked at every [`ALIVE_EVERY`].
    alive_checked: Instant,
    /// When each peer address last sent us gossip we accepted.
    last_heard: std::collections::HashMap<SocketAddr, Instant>,
}

/// How stale the data plane's view of alive members may get between member events.
const ALIVE_EVERY: Duration = Duration::from_millis(100);

impl Shell {
    async fn run(mut self, mut inbound: mpsc::Receiver<Inbound>, mut commands: mpsc::Receiver<Command>) {
        let mut sync_tick = tokio::time::interval(self.sync_every);
        sync_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let wake = self.core.poll_timeout().unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
            tokio::select! {
                msg = inbound.recv() => {
                    let Some(msg) = msg else { break };
                    self.on_inbound(msg);
                }
                cmd = commands.recv() => {
                    let Some(cmd) = cmd else { break };
                    self.on_command(cmd);
                }
                _ = tokio::time::sleep_until(wake.into()) => self.core.handle_timeout(Instant::now()),
                _ = sync_tick.tick() => self.sync_with_random_peer(),
            }
            let changed = self.flush();
            self.publish_alive(changed);
            // The fsync must not hold the runtime thread the data plane runs on.
            if self.policy.store.lock().expect("policy lock").is_dirty() {
                let policy = self.policy.clone();
                let _ = tokio::task::spawn_blocking(move || policy.persist()).await;
            }
        }
    }

    fn on_inbound(&mut self, msg: Inbound) {
        let kind = match envelope::decode(&msg.data, limits::MAX_STREAM_MESSAGE) {
            Ok((kind, _)) => kind,
            // A kind a newer peer speaks and this version does not: counted and skipped, so a
            // rolling upgrade keeps its links.
            Err(e @ trellis_proto::DecodeError::UnknownKind(_)) => {
                return self.transport.stats.peer_refuse(PeerRefusal::of(&e));
            }
            Err(e) => return self.transport.refuse(&msg.conn, PeerRefusal::of(&e), &e.to_string()),
        };
        match kind {
            MessageKind::Gossip => self.on_gossip(msg),
            MessageKind::PolicySync => self.on_policy_sync(msg),
            MessageKind::Forward => {
                self.transport.refuse(&msg.conn, PeerRefusal::Malformed, "forward header outside a stream")
            }
            MessageKind::RateLimit => self.on_rate_limit(msg),
            // A full queue drops the digest (the next interval's follows) or the question
            // (the asker answers with what came, naming who did not answer).
            MessageKind::Stats | MessageKind::StatsQuery => {
                let _ = self.stats.try_send(msg);
            }
        }
    }

    fn on_gossip(&mut self, msg: Inbound) {
        match self.core.handle_datagram(Instant::now(), Some(&msg.peer_name), &msg.data) {
            Ok(()) => {
                self.last_heard.insert(msg.from, Instant::now());
            }
            Err(PacketError::Malformed(why)) => self.transport.refuse(&msg.conn, PeerRefusal::Malformed, &why),
            Err(e @ (PacketError::IdentityMismatch { .. } | PacketError::AddressTaken { .. })) => {
                self.transport.refuse(&msg.conn, PeerRefusal::Identity, &e.to_string())
            }
            Err(PacketError::Refused(why)) => tracing::debug!(peer = %msg.peer_name, %why, "gossip refused"),
        }
    }

    fn on_rate_limit(&mut self, msg: Inbound) {
        // A full queue drops the message: reports repeat every tick.
        let _ = self.limits.try_send(msg);
    }

    fn on_policy_sync(&mut self, msg: Inbound) {
        let body = &msg.data[envelope::HEADER_LEN..];
        let sync_msg = match PolicySync::decode(body) {
            Ok(m) => m,
            Err(e) => return self.transport.refuse(&msg.conn, PeerRefusal::of(&e), &e.to_string()),
        };
        if let PolicySync::Entries { entries, .. } = &sync_msg {
            let (new, refused) = self.policy.merge_entries(entries.clone());
            if new > 0 || refused > 0 {
                tracing::debug!(peer = %msg.peer_name, new, refused, "policy entries merged");
            }
        }
        let replies = {
            let mut store = self.policy.store.lock().expect("policy lock");
            if matches!(sync_msg, PolicySync::Root { root, .. } if root == store.root()) {
                store.confirm_peer(&msg.peer_name);
            }
            sync::answer(&store, &sync_msg)
        };
        for reply in replies {
            self.send_policy(msg.from, &reply);
        }
    }

    fn send_policy(&self, to: SocketAddr, m: &PolicySync) {
        let mut out = Vec::new();
        envelope::encode(MessageKind::PolicySync, &m.encode(), &mut out);
        self.transport.send(to, Bytes::from(out));
    }

    fn sync_with(&self, peer: SocketAddr) {
        let open = sync::open(&self.policy.store.lock().expect("policy lock"));
        self.send_policy(peer, &open);
    }

    fn sync_with_random_peer(&self) {
        let me = &self.core.identity().name;
        let live: Vec<String> = self
            .core
            .members()
            .into_iter()
            .filter(|m| m.state == trellis_core::membership::MemberState::Alive && &m.id.name != me)
            .map(|m| m.id.name)
            .collect();
        self.policy.collect(&live);
        let peers = self.core.alive_peers();
        if !peers.is_empty() {
            self.sync_with(peers[rand::random_range(0..peers.len())]);
        }
    }

    fn on_command(&mut self, cmd: Command) {
        let core = &mut self.core;
        match cmd {
            Command::Members(tx) => {
                let _ = tx.send(core.members());
            }
            Command::Stats(tx) => {
                let _ = tx.send(core.stats());
            }
            Command::Join(addrs) => core.join(Instant::now(), &addrs),
            Command::Leave(tx) => {
                core.leave(Instant::now());
                let _ = tx.send(());
            }
            Command::Peers(tx) => {
                let now = Instant::now();
                let heard = |m: &MemberView| self.last_heard.get(&m.id.addr).map(|t| now.duration_since(*t));
                let _ = tx.send(core.members().into_iter().skip(1).map(|m| (m.clone(), heard(&m))).collect());
            }
            Command::SetLabels(labels, tx) => {
                let mut id = core.identity().clone();
                id.meta.labels = labels;
                let now_ms = crate::policy::now_ms();
                // A higher generation is how peers tell the newer identity from the older.
                id.generation = now_ms.max(id.generation + 1);
                let generation = id.generation;
                let _ = tx.send(core.change_identity(Instant::now(), id).map(|()| generation));
            }
            Command::Publish(entry) => {
                // Small changes ride on gossip; large ones are pushed to every live member.
                if !core.broadcast(Instant::now(), &entry.encode_item()) {
                    let push = PolicySync::Entries { entries: vec![entry], want: vec![] };
                    for peer in core.alive_peers() {
                        self.send_policy(peer, &push);
                    }
                }
            }
        }
    }

    /// Publishes the alive members when an event may have changed them, or when the last
    /// look is older than [`ALIVE_EVERY`]; readers are woken only on a real change.
    fn publish_alive(&mut self, event: bool) {
        if !event && self.alive_checked.elapsed() < ALIVE_EVERY {
            return;
        }
        self.alive_checked = Instant::now();
        let members = self.core.members();
        let (alive, standing) =
            (trellis_core::membership::alive_members(&members), trellis_core::membership::standing_members(&members));
        let (raised, cleared) =
            trellis_core::membership::suspicions((&self.alive.borrow(), &self.standing.borrow()), (&alive, &standing));
        for peer in raised {
            tracing::info!(%peer, "member suspected: no new requests to it until cleared; those under way go on");
        }
        for peer in cleared {
            tracing::info!(%peer, "member cleared of suspicion");
        }
        republish(&self.alive, alive);
        republish(&self.standing, standing);
    }

    /// Sends what the core queued and handles its events; true when there were events.
    fn flush(&mut self) -> bool {
        while let Some(t) = self.core.poll_transmit() {
            self.transport.send(t.to, Bytes::from(t.data));
        }
        let mut any = false;
        while let Some(ev) = self.core.poll_event() {
            any = true;
            if matches!(ev, MemberEvent::Isolated) && self.everyone_left() {
                tracing::info!("every other member left the cluster; retrying seeds");
            } else {
                log_event(&ev);
            }
            // A member that appears or comes back gets our policy at once.
            match ev {
                MemberEvent::Up(id) | MemberEvent::Renamed { new: id, .. } => self.sync_with(id.addr),
                _ => {}
            }
        }
        any
    }
}

impl Shell {
    /// Whether every other member left gracefully (a cluster shutting down), so being alone
    /// is expected rather than a partition.
    fn everyone_left(&self) -> bool {
        use trellis_core::membership::MemberState;
        let others: Vec<MemberState> = self.core.members().iter().skip(1).map(|m| m.state).collect();
        !others.is_empty() && others.iter().all(|s| *s == MemberState::Left)
    }
}

fn log_event(ev: &MemberEvent) {
    match ev {
        MemberEvent::Up(id) => tracing::info!(peer = %id.name, addr = %id.addr, "member up"),
        MemberEvent::Down(id) => tracing::warn!(peer = %id.name, addr = %id.addr, "member down"),
        MemberEvent::Left(id) => tracing::info!(peer = %id.name, addr = %id.addr, "member left"),
        MemberEvent::Renamed { old, new } => {
            tracing::info!(peer = %new.name, old_generation = old.generation, new_generation = new.generation, "member restarted")
        }
        MemberEvent::Joined => tracing::info!("joined the cluster"),
        MemberEvent::Isolated => tracing::warn!("no live members left; retrying seeds"),
        MemberEvent::Rejoined(id) => tracing::warn!(generation = id.generation, "we were declared down; rejoined"),
    }
}

/// Sends `now` on `tx` when it differs: readers are woken only on a real change.
fn republish<T: PartialEq>(tx: &watch::Sender<Arc<T>>, now: T) {
    tx.send_if_modified(|cur| {
        let changed = **cur != now;
        if changed {
            *cur = Arc::new(now);
        }
        changed
    });
}
