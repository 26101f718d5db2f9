//! The agent's async shell: it moves bytes between the transport and the membership core,
//! wakes the core at its deadlines, and answers the API's questions. No decisions here.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};
use trellis_proto::{NodeIdentity, NodeMeta};

use crate::config::AgentConfig;
use crate::mesh::forward::{ForwardStats, Forwarder};
use crate::pki::TlsMaterial;
use crate::policy::Policy;
use crate::ratelimit::{self, RateLimits};
use crate::transport::{Inbound, PeerRefusal, Transport};
use trellis_core::membership::{
    alive_members, AliveMembers, MemberEvent, MemberView, Membership, PacketError, PolicyItems, Stats,
};
use trellis_core::policy::sync;
use trellis_proto::{envelope, limits, Kind, PolicyEntry, PolicySync};

/// Agent version, gossiped so operators can see mixed-version clusters.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

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

/// What the API needs to reach a running agent.
#[derive(Clone)]
pub struct AgentHandle {
    pub identity: NodeIdentity,
    pub cluster_id: String,
    pub spiffe_id: String,
    pub commands: mpsc::Sender<Command>,
    pub transport: Arc<Transport>,
    pub policy: Arc<Policy>,
    pub forward: Arc<ForwardStats>,
    pub ratelimits: Arc<RateLimits>,
    /// Connection caps of the proxy and API listeners, with their counters.
    pub clients: Arc<crate::listen::ClientGates>,
    pub started: Instant,
    /// Flips to true when the agent should stop (after a leave).
    pub shutdown: watch::Sender<bool>,
    /// Alive members, republished by the agent task when they change.
    pub alive: watch::Receiver<Arc<AliveMembers>>,
    /// Enrollment, renewal and revocation state (`crate::enroll`).
    pub lifecycle: Arc<crate::enroll::Lifecycle>,
}

impl AgentHandle {
    pub async fn members(&self) -> Vec<MemberView> {
        let (tx, rx) = oneshot::channel();
        let _ = self.commands.send(Command::Members(tx)).await;
        rx.await.unwrap_or_default()
    }

    pub async fn stats(&self) -> Stats {
        let (tx, rx) = oneshot::channel();
        let _ = self.commands.send(Command::Stats(tx)).await;
        rx.await.unwrap_or_default()
    }

    /// Leaves gracefully, then asks the process to stop.
    pub async fn leave(&self) {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::Leave(tx)).await.is_ok() {
            let _ = rx.await;
        }
        let _ = self.shutdown.send(true);
    }

    /// The SPIFFE identity of a member, derived from its certified name.
    pub fn spiffe_of(&self, name: &str) -> String {
        format!("spiffe://{}/node/{}", self.cluster_id, name)
    }
}

/// Starts the transport and the membership task.
pub fn start(cfg: &AgentConfig, tls: &TlsMaterial) -> anyhow::Result<AgentHandle> {
    if tls.name != cfg.name {
        anyhow::bail!(
            "name: the agent is named {:?} but its certificate ({}) is for {:?}; start with --name {} or issue a certificate for {:?}",
            cfg.name,
            cfg.tls_dir.join("node.pem").display(),
            tls.name,
            tls.name,
            cfg.name
        );
    }
    let (transport, inbound, streams) = Transport::bind(cfg.bind, tls, cfg.faults.clone(), cfg.limits.clone())?;
    let upstreams = bind_upstreams(&cfg.upstreams)?;
    let proxy = cfg.proxy.map(|a| bind_upstreams(&[("http proxy".to_string(), a)])).transpose()?;
    let generation = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(1);
    let identity = NodeIdentity {
        addr: cfg.advertise,
        generation,
        name: cfg.name.clone(),
        meta: NodeMeta { api_addr: Some(cfg.api), version: VERSION.into(), labels: cfg.labels.clone() },
    };
    identity.validate().map_err(|e| anyhow::anyhow!("labels: {e}"))?;
    let grace_ms = cfg.timing.tombstone_grace.as_millis() as u64;
    let auth: Arc<dyn trellis_core::policy::WriterAuth> = transport.identity.clone();
    let policy = Policy::open(&cfg.data_dir, &cfg.name, grace_ms, Some(auth))
        .map_err(|e| anyhow::anyhow!("data_dir: cannot open the policy log in {}: {e}", cfg.data_dir.display()))?;
    let mut registered = Vec::new();
    for (id, json) in &cfg.services {
        let key = trellis_core::policy::Key {
            kind: trellis_core::policy::Kind::Instances,
            name: format!("{id}@{}", cfg.name),
        };
        let bytes = serde_json::to_vec(json).expect("json");
        let entry = policy
            .write(key, Some(&bytes), None)
            .map_err(|e| anyhow::anyhow!("services.{id}: cannot register the instance from the config file: {e}"))?;
        registered.push(entry);
    }
    let items: PolicyItems = {
        let policy = policy.clone();
        Arc::new(move |body, local| policy.receive_item(body, local))
    };
    let mut core = Membership::with_policy(identity.clone(), &cfg.timing, cfg.expected_size, generation, Some(items));
    core.join(Instant::now(), &cfg.join);
    let (cmd_tx, cmd_rx) = mpsc::channel(256 + registered.len());
    for entry in registered {
        let _ = cmd_tx.try_send(Command::Publish(entry));
    }
    let (limit_tx, limit_rx) = mpsc::channel(1024);
    let ratelimits = RateLimits::new(&cfg.name, trellis_core::ratelimit::Timing::default());
    let (shutdown, _) = watch::channel(false);
    let (alive_tx, alive) = watch::channel(Arc::new(alive_members(&core.members())));
    let shell = Shell {
        core,
        transport: transport.clone(),
        policy: policy.clone(),
        sync_every: cfg.timing.sync_interval,
        limits: limit_tx,
        alive: alive_tx,
        alive_checked: Instant::now(),
        last_heard: Default::default(),
    };
    tokio::spawn(shell.run(inbound, cmd_rx));
    let handle = AgentHandle {
        identity,
        cluster_id: tls.cluster_id.clone(),
        spiffe_id: tls.identity.clone(),
        commands: cmd_tx,
        transport,
        policy,
        forward: Arc::default(),
        ratelimits: ratelimits.clone(),
        clients: crate::listen::ClientGates::new(&cfg.limits, cfg.upstreams.iter().map(|(s, _)| s.as_str())),
        started: Instant::now(),
        shutdown,
        alive,
        lifecycle: Arc::default(),
    };
    tokio::spawn(ratelimit::shell::run(
        ratelimits,
        handle.clone(),
        limit_rx,
        trellis_core::ratelimit::Timing::default(),
    ));
    tokio::spawn(crate::mesh::health::run(handle.clone()));
    let fwd = Forwarder::new(handle.clone(), handle.forward.clone());
    tokio::spawn(fwd.clone().serve_streams(streams));
    if let Some((_, listener)) = proxy.and_then(|mut v| v.pop()) {
        tracing::info!(listen = %listener.local_addr()?, "http proxy listener");
        tokio::spawn(crate::mesh::http::serve(fwd.clone(), listener, cfg.limits.clone(), handle.clients.proxy.clone()));
    }
    for (service, listener) in upstreams {
        tracing::info!(%service, listen = %listener.local_addr()?, "upstream listener");
        let gate = handle.clients.upstreams[&service].clone();
        tokio::spawn(fwd.clone().serve_upstream(service, listener, cfg.limits.clone(), gate));
    }
    Ok(handle)
}

/// Binds every upstream listener before anything starts, so a taken port fails the start
/// with the flag named.
fn bind_upstreams(list: &[(String, SocketAddr)]) -> anyhow::Result<Vec<(String, tokio::net::TcpListener)>> {
    list.iter()
        .map(|(service, addr)| {
            let l = std::net::TcpListener::bind(addr).map_err(|e| {
                anyhow::anyhow!("upstream: cannot listen on {addr} for {service}: {e}; pick another --upstream port")
            })?;
            l.set_nonblocking(true)?;
            Ok((service.clone(), tokio::net::TcpListener::from_std(l)?))
        })
        .collect()
}

/// The agent task: the only owner of the membership core; it also drives policy sync.
struct Shell {
    core: Membership,
    transport: Arc<Transport>,
    policy: Arc<Policy>,
    sync_every: Duration,
    /// Rate-limit messages go to the limiter's own task.
    limits: mpsc::Sender<Inbound>,
    alive: watch::Sender<Arc<AliveMembers>>,
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
                tokio::task::block_in_place(|| self.policy.persist());
            }
        }
    }

    fn on_inbound(&mut self, msg: Inbound) {
        let kind = match envelope::decode(&msg.data, limits::MAX_STREAM_MESSAGE) {
            Ok((kind, _)) => kind,
            Err(e) => return self.transport.refuse(&msg.conn, PeerRefusal::of(&e), &e.to_string()),
        };
        match kind {
            Kind::Gossip => self.on_gossip(msg),
            Kind::PolicySync => self.on_policy_sync(msg),
            Kind::Forward => {
                self.transport.refuse(&msg.conn, PeerRefusal::Malformed, "forward header outside a stream")
            }
            Kind::RateLimit => self.on_rate_limit(msg),
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
        envelope::encode(Kind::PolicySync, &m.encode(), &mut out);
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
                let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
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
        let now = alive_members(&self.core.members());
        self.alive.send_if_modified(|cur| {
            let changed = **cur != now;
            if changed {
                *cur = Arc::new(now);
            }
            changed
        });
    }

    /// Sends what the core queued and handles its events; true when there were events.
    fn flush(&mut self) -> bool {
        while let Some(t) = self.core.poll_transmit() {
            self.transport.send(t.to, Bytes::from(t.data));
        }
        let mut any = false;
        while let Some(ev) = self.core.poll_event() {
            any = true;
            log_event(&ev);
            // A member that appears or comes back gets our policy at once.
            match ev {
                MemberEvent::Up(id) | MemberEvent::Renamed { new: id, .. } => self.sync_with(id.addr),
                _ => {}
            }
        }
        any
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
