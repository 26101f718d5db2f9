//! A deterministic discrete-event simulator of membership: N real [`Membership`] cores in
//! one thread, a virtual clock, and a network with delay, jitter, loss, partitions and
//! one-way blocks. The same seed replays the same run, packet for packet.
//!
//! The simulator never reads the clock during a run and never sleeps: time is a count of
//! virtual nanoseconds since a base [`Instant`] taken once in [`Sim::new`]. One event queue
//! orders packet deliveries and node wake-ups by (time, sequence number).
//!
//! What a node believes of the others is kept from its member events in a table with one
//! row per viewer, plus per-subject tallies of how many live viewers believe it alive, down
//! or left. The convergence predicates are then O(N) and a single view is O(1); asking a
//! core for `members()` (O(N) clones) is left to [`Sim::exact_view`].

use std::cmp::Ordering as CmpOrdering;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use trellis_core::membership::{MemberEvent, MemberState, Membership, PolicyItems, Stats, Timing};
use trellis_core::policy::store::{self, Key, PolicyStore};
use trellis_core::policy::Kind;
use trellis_proto::{NodeIdentity, NodeMeta, PolicyEntry};

/// Everyone joins one seed this far apart, so the seed is not hit by N announces at once.
const JOIN_STAGGER: Duration = Duration::from_millis(1);
/// How long a core that asks to be woken again at once is made to wait (see
/// [`RunStats::stalled_wakes`]).
pub const STALL_BACKOFF: Duration = Duration::from_millis(1);
/// The port every simulated node "listens" on; addresses are never used for real I/O.
const PORT: u16 = 7946;

/// The shape of one simulated run.
#[derive(Clone, Debug)]
pub struct SimConfig {
    pub nodes: usize,
    pub timing: Timing,
    pub seed: u64,
    /// Probability that any one packet is lost.
    pub loss: f64,
    /// One-way delay, plus a uniform jitter in [0, jitter).
    pub delay: Duration,
    pub jitter: Duration,
    /// How often [`Sim::run_until`] checks its predicate, in virtual time. It also sets the
    /// resolution of the times it reports.
    pub check_every: Duration,
    /// Give every node a policy store fed by gossip (policy propagation runs).
    pub policy: bool,
}

impl SimConfig {
    /// A lossless LAN-like network: 0.5 ms one way plus up to 0.5 ms of jitter.
    pub fn new(nodes: usize, timing: Timing, seed: u64) -> SimConfig {
        SimConfig {
            nodes,
            timing,
            seed,
            loss: 0.0,
            delay: Duration::from_micros(500),
            jitter: Duration::from_micros(500),
            check_every: Duration::from_millis(10),
            policy: false,
        }
    }
}

/// A live node declared down: who said so, of whom, when (virtual time since the start).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FalseDown {
    pub at: Duration,
    pub viewer: usize,
    pub subject: usize,
    pub generation: u64,
}

/// A member event as one node saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed {
    pub at: Duration,
    pub viewer: usize,
    pub event: MemberEvent,
}

/// What happened to packets (and rejoins) since the last [`Sim::reset_counters`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RunStats {
    pub sent: u64,
    pub bytes_sent: u64,
    pub delivered: u64,
    /// Dropped by the random loss.
    pub lost: u64,
    /// Dropped by a partition or a one-way block.
    pub cut: u64,
    /// Arrived at a crashed node.
    pub to_dead: u64,
    /// Addressed to no simulated node.
    pub unroutable: u64,
    /// Refused by the receiving core (malformed, identity mismatch, not gossip).
    pub refused: u64,
    /// Times a node learnt it had been declared down and rejoined under a new generation.
    pub rejoins: u64,
    /// Times a core, right after running its timers, asked to be woken at once again (a
    /// real event loop would spin); the simulator wakes it [`STALL_BACKOFF`] later instead.
    pub stalled_wakes: u64,
}

enum Event {
    Deliver {
        from: usize,
        to: usize,
        data: Vec<u8>,
    },
    /// Run a node's due timers. `life` tells wake-ups of a crashed life from current ones.
    Wake {
        node: usize,
        life: u32,
    },
}

struct Scheduled {
    at: u64,
    seq: u64,
    event: Event,
}

// BinaryHeap is a max-heap: the earliest (time, seq) must compare greatest.
impl Ord for Scheduled {
    fn cmp(&self, other: &Self) -> CmpOrdering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}

impl Eq for Scheduled {}

/// One viewer's belief about one subject: a state of one of its generations (0: none).
#[derive(Clone, Copy, Debug)]
struct Belief {
    generation: u64,
    state: MemberState,
}

const UNKNOWN: Belief = Belief { generation: 0, state: MemberState::Alive };

/// How many live viewers (other than the subject) believe the subject's current life is in
/// each state.
#[derive(Clone, Copy, Debug, Default)]
struct Tally {
    alive: u32,
    down: u32,
    left: u32,
}

impl Tally {
    fn slot(&mut self, state: MemberState) -> Option<&mut u32> {
        match state {
            MemberState::Alive => Some(&mut self.alive),
            MemberState::Down => Some(&mut self.down),
            MemberState::Left => Some(&mut self.left),
            MemberState::Suspect => None,
        }
    }

    fn get(&self, state: MemberState) -> u32 {
        match state {
            MemberState::Alive => self.alive,
            MemberState::Down => self.down,
            MemberState::Left => self.left,
            MemberState::Suspect => 0,
        }
    }
}

struct SimNode {
    /// None while crashed.
    core: Option<Membership>,
    /// The generation the node goes by now (it follows the core's own rejoins).
    generation: u64,
    /// The generation of this life: a Down of it (or a later one) while live is false.
    boot_generation: u64,
    /// Bumped on crash and restart; wake-ups of an earlier life are stale.
    life: u32,
    /// The earliest wake-up queued for this life.
    wake_at: Option<u64>,
    /// What this node believes of every other, indexed by subject.
    beliefs: Vec<Belief>,
    policy: Option<Arc<Mutex<PolicyStore>>>,
}

/// When each node first held each policy object (virtual nanoseconds).
type Seen = Arc<Mutex<HashMap<(usize, String), u64>>>;

/// A gossip handler that merges into a plain store and notes when objects arrive.
fn policy_handler(i: usize, store: Arc<Mutex<PolicyStore>>, clock: Arc<AtomicU64>, seen: Seen) -> PolicyItems {
    Arc::new(move |body: &[u8], local: bool| {
        if local {
            return Ok(true);
        }
        let entry = PolicyEntry::decode_item(body).map_err(|e| e.to_string())?;
        let name = entry.name.clone();
        let (k, r) = store::from_wire(entry).map_err(|e| e.to_string())?;
        let now = clock.load(Ordering::Relaxed);
        let fresh = store.lock().unwrap().merge(1_000_000 + now / 1_000_000, k, r).map_err(|e| e.to_string())?;
        seen.lock().unwrap().entry((i, name)).or_insert(now);
        Ok(fresh == store::Merged::New)
    })
}

/// Node `i`'s address: 10.x.y.z:7946 with x.y.z = i in base 256.
pub fn addr_of(i: usize) -> SocketAddr {
    assert!(i < 1 << 24, "at most 2^24 simulated nodes");
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, (i >> 16) as u8, (i >> 8) as u8, i as u8)), PORT)
}

fn index_of(addr: SocketAddr) -> Option<usize> {
    match addr {
        SocketAddr::V4(a) if a.port() == PORT && a.ip().octets()[0] == 10 => {
            let [_, x, y, z] = a.ip().octets();
            Some((x as usize) << 16 | (y as usize) << 8 | z as usize)
        }
        _ => None,
    }
}

/// A seed for one core's random choices, distinct per node and per life.
fn core_seed(run: u64, node: usize, generation: u64) -> u64 {
    // splitmix64 finaliser: nearby inputs give unrelated seeds.
    let mut z = run ^ (node as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ generation.rotate_left(32);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The simulator.
pub struct Sim {
    cfg: SimConfig,
    base: Instant,
    /// Virtual nanoseconds since `base`.
    now: u64,
    seq: u64,
    queue: BinaryHeap<Scheduled>,
    nodes: Vec<SimNode>,
    /// Node names, apart from `nodes` so a delivery can borrow the sender's name and the
    /// receiver's core at once.
    names: Vec<String>,
    tallies: Vec<Tally>,
    live: usize,
    /// The node everyone joins through (and restarted nodes rejoin through).
    seed_node: usize,
    rng: SmallRng,
    /// Partition group of each node, if partitioned.
    groups: Option<Vec<usize>>,
    blocked: HashSet<(usize, usize)>,
    run: RunStats,
    counted_since: u64,
    false_downs: Vec<FalseDown>,
    /// The watched node and the member events about it.
    watched: Option<(usize, Vec<Observed>)>,
    clock: Arc<AtomicU64>,
    seen: Seen,
}

impl Sim {
    /// N nodes that know nobody yet; node i is `n{i}` at [`addr_of`]`(i)`, generation 1.
    pub fn new(cfg: SimConfig) -> Sim {
        let mut sim = Sim {
            rng: SmallRng::seed_from_u64(cfg.seed),
            base: Instant::now(),
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            nodes: Vec::with_capacity(cfg.nodes),
            names: Vec::with_capacity(cfg.nodes),
            tallies: Vec::with_capacity(cfg.nodes),
            live: 0,
            seed_node: 0,
            groups: None,
            blocked: HashSet::new(),
            run: RunStats::default(),
            counted_since: 0,
            false_downs: Vec::new(),
            watched: None,
            clock: Arc::new(AtomicU64::new(0)),
            seen: Seen::default(),
            cfg,
        };
        for _ in 0..sim.cfg.nodes {
            sim.spawn();
        }
        sim
    }

    /// Adds a node that knows nobody; returns its index.
    fn spawn(&mut self) -> usize {
        let i = self.nodes.len();
        let policy = self.cfg.policy.then(|| Arc::new(Mutex::new(PolicyStore::new(&format!("n{i}")))));
        self.nodes.push(SimNode {
            core: None,
            generation: 1,
            boot_generation: 1,
            life: 0,
            wake_at: None,
            beliefs: vec![UNKNOWN; i + 1],
            policy,
        });
        for n in &mut self.nodes[..i] {
            n.beliefs.push(UNKNOWN);
        }
        self.names.push(format!("n{i}"));
        self.tallies.push(Tally::default());
        if let Some(g) = self.groups.as_mut() {
            g.push(usize::MAX);
        }
        self.boot(i, 1);
        i
    }

    /// Gives node `i` a fresh core under `generation`.
    fn boot(&mut self, i: usize, generation: u64) {
        let id = NodeIdentity {
            addr: addr_of(i),
            generation,
            name: self.names[i].clone(),
            meta: NodeMeta { api_addr: None, version: "sim".into(), labels: Default::default() },
        };
        let n = &mut self.nodes[i];
        let handler = n.policy.clone().map(|p| policy_handler(i, p, self.clock.clone(), self.seen.clone()));
        let seed = core_seed(self.cfg.seed, i, generation);
        n.core = Some(Membership::with_policy(id, &self.cfg.timing, self.cfg.nodes as u32, seed, handler));
        n.generation = generation;
        n.boot_generation = generation;
        n.life += 1;
        n.wake_at = None;
        n.beliefs.fill(UNKNOWN);
        self.live += 1;
        // Every belief about i names an older generation now.
        self.tallies[i] = Tally::default();
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Virtual time since the start.
    pub fn now(&self) -> Duration {
        Duration::from_nanos(self.now)
    }

    fn instant(&self) -> Instant {
        self.base + Duration::from_nanos(self.now)
    }

    fn push(&mut self, at: u64, event: Event) {
        self.seq += 1;
        self.queue.push(Scheduled { at, seq: self.seq, event });
    }

    /// Every other node joins through `seed_node`, one every [`JOIN_STAGGER`]. The seed
    /// itself joins nobody: the first announce makes it a member. Restarts rejoin here too.
    pub fn join_all(&mut self, seed_node: usize) {
        self.seed_node = seed_node;
        for i in 0..self.nodes.len() {
            if i != seed_node && self.is_live(i) {
                self.run_for(JOIN_STAGGER);
                self.join(i, seed_node);
            }
        }
    }

    /// Node `i` announces itself to `seed` (and keeps retrying until it is a member).
    pub fn join(&mut self, i: usize, seed: usize) {
        let now = self.instant();
        if let Some(core) = self.nodes[i].core.as_mut() {
            core.join(now, &[addr_of(seed)]);
        }
        self.after_io(i, false);
    }

    /// A new node joins a running cluster through the join seed; returns its index.
    pub fn add_node(&mut self) -> usize {
        let i = self.spawn();
        let seed = self.live_seed(i);
        self.join(i, seed);
        i
    }

    /// The join seed, or the first live node if the seed is `i` itself or crashed.
    fn live_seed(&self, i: usize) -> usize {
        if self.seed_node != i && self.is_live(self.seed_node) {
            return self.seed_node;
        }
        (0..self.nodes.len()).find(|&s| s != i && self.is_live(s)).unwrap_or(self.seed_node)
    }

    /// Moves a core's packets into the network, its events into the beliefs, and (re)arms
    /// its wake-up. `woke`: the core has just run its timers.
    fn after_io(&mut self, i: usize, woke: bool) {
        let Some(core) = self.nodes[i].core.as_mut() else { return };
        let mut sends = Vec::new();
        while let Some(t) = core.poll_transmit() {
            sends.push(t);
        }
        let mut events = Vec::new();
        while let Some(e) = core.poll_event() {
            events.push(e);
        }
        let next = core.poll_timeout().map(|t| t.saturating_duration_since(self.base).as_nanos() as u64);
        // Declared down, the core renews its identity (higher generation) and rejoins.
        let generation = core.identity().generation;
        if generation != self.nodes[i].generation {
            self.nodes[i].generation = generation;
            self.recount_subject(i);
        }
        for e in events {
            self.observe(i, e);
        }
        for t in sends {
            self.send(i, t.to, t.data);
        }
        if let Some(mut at) = next {
            if woke && at <= self.now {
                // The core just ran its timers and wants to run them again at once: a real
                // event loop would spin. Count it, and come back a millisecond later.
                self.run.stalled_wakes += 1;
                at = self.now + STALL_BACKOFF.as_nanos() as u64;
            }
            let at = at.max(self.now);
            let n = &mut self.nodes[i];
            if n.wake_at.is_none_or(|w| at < w) {
                n.wake_at = Some(at);
                let life = n.life;
                self.push(at, Event::Wake { node: i, life });
            }
        }
    }

    fn send(&mut self, from: usize, to: SocketAddr, data: Vec<u8>) {
        self.run.sent += 1;
        self.run.bytes_sent += data.len() as u64;
        let Some(to) = index_of(to).filter(|&t| t < self.nodes.len()) else {
            self.run.unroutable += 1;
            return;
        };
        if self.blocked.contains(&(from, to)) || self.groups.as_ref().is_some_and(|g| g[from] != g[to]) {
            self.run.cut += 1;
            return;
        }
        if self.cfg.loss > 0.0 && self.rng.random_bool(self.cfg.loss) {
            self.run.lost += 1;
            return;
        }
        let jitter = match self.cfg.jitter.as_nanos() as u64 {
            0 => 0,
            j => self.rng.random_range(0..j),
        };
        let at = self.now + self.cfg.delay.as_nanos() as u64 + jitter;
        self.push(at, Event::Deliver { from, to, data });
    }

    /// The state `viewer` holds of `subject`'s current life, if it counts in the tallies.
    fn counted(&self, viewer: usize, subject: usize) -> Option<MemberState> {
        if viewer == subject || self.nodes[viewer].core.is_none() {
            return None;
        }
        let b = self.nodes[viewer].beliefs[subject];
        (b.generation == self.nodes[subject].generation).then_some(b.state)
    }

    fn believe(&mut self, viewer: usize, subject: usize, belief: Belief) {
        let before = self.counted(viewer, subject);
        self.nodes[viewer].beliefs[subject] = belief;
        let after = self.counted(viewer, subject);
        if before != after {
            let t = &mut self.tallies[subject];
            if let Some(c) = before.and_then(|s| t.slot(s)) {
                *c -= 1;
            }
            if let Some(c) = after.and_then(|s| t.slot(s)) {
                *c += 1;
            }
        }
    }

    fn recount_subject(&mut self, s: usize) {
        let mut t = Tally::default();
        for v in 0..self.nodes.len() {
            if let Some(c) = self.counted(v, s).and_then(|st| t.slot(st)) {
                *c += 1;
            }
        }
        self.tallies[s] = t;
    }

    fn observe(&mut self, viewer: usize, e: MemberEvent) {
        let now = self.now();
        if let Some((w, log)) = self.watched.as_mut() {
            let about = match &e {
                MemberEvent::Up(id) | MemberEvent::Down(id) | MemberEvent::Left(id) => index_of(id.addr) == Some(*w),
                MemberEvent::Renamed { new, .. } => index_of(new.addr) == Some(*w),
                _ => viewer == *w,
            };
            if about {
                log.push(Observed { at: now, viewer, event: e.clone() });
            }
        }
        let is_down = matches!(e, MemberEvent::Down(_));
        let (id, state) = match e {
            MemberEvent::Up(id) => (id, MemberState::Alive),
            MemberEvent::Down(id) => (id, MemberState::Down),
            MemberEvent::Left(id) => (id, MemberState::Left),
            // Same activity as the life it replaces; an Up or Down follows if that changed.
            MemberEvent::Renamed { old, new } => {
                let Some(s) = index_of(old.addr).filter(|&s| s < self.nodes.len()) else { return };
                let b = self.nodes[viewer].beliefs[s];
                let state = if b.generation == old.generation { b.state } else { MemberState::Alive };
                (new, state)
            }
            MemberEvent::Rejoined(_) => {
                self.run.rejoins += 1;
                return;
            }
            MemberEvent::Joined | MemberEvent::Isolated => return,
        };
        let Some(s) = index_of(id.addr).filter(|&s| s < self.nodes.len() && s != viewer) else { return };
        if id.generation < self.nodes[viewer].beliefs[s].generation {
            return;
        }
        if is_down && self.is_live(s) && id.generation >= self.nodes[s].boot_generation {
            let at = self.now();
            self.false_downs.push(FalseDown { at, viewer, subject: s, generation: id.generation });
        }
        self.believe(viewer, s, Belief { generation: id.generation, state });
    }

    /// Processes every event up to `until` (virtual nanoseconds), then sets the clock there.
    fn step_to(&mut self, until: u64) {
        while self.queue.peek().is_some_and(|e| e.at <= until) {
            let Scheduled { at, event, .. } = self.queue.pop().expect("peeked");
            self.now = at;
            self.clock.store(at, Ordering::Relaxed);
            let now = self.instant();
            match event {
                Event::Deliver { from, to, data } => {
                    let Some(core) = self.nodes[to].core.as_mut() else {
                        self.run.to_dead += 1;
                        continue;
                    };
                    self.run.delivered += 1;
                    // Like the QUIC transport: the sender's certificate name comes along.
                    if core.handle_datagram(now, Some(&self.names[from]), &data).is_err() {
                        self.run.refused += 1;
                    }
                    self.after_io(to, false);
                }
                Event::Wake { node, life } => {
                    let n = &mut self.nodes[node];
                    if n.life != life || n.wake_at != Some(at) {
                        continue;
                    }
                    n.wake_at = None;
                    if let Some(core) = n.core.as_mut() {
                        core.handle_timeout(now);
                        self.after_io(node, true);
                    }
                }
            }
        }
        self.now = until;
        self.clock.store(until, Ordering::Relaxed);
    }

    pub fn run_for(&mut self, d: Duration) {
        let until = self.now + d.as_nanos() as u64;
        self.step_to(until);
    }

    /// Runs until `pred` holds, checked every [`SimConfig::check_every`] of virtual time;
    /// returns the virtual time that took, or None once `max` has passed without it.
    pub fn run_until(&mut self, max: Duration, mut pred: impl FnMut(&Sim) -> bool) -> Option<Duration> {
        let start = self.now;
        let end = start + max.as_nanos() as u64;
        let step = self.cfg.check_every.as_nanos().max(1) as u64;
        loop {
            if pred(self) {
                return Some(Duration::from_nanos(self.now - start));
            }
            if self.now >= end {
                return None;
            }
            self.step_to((self.now + step).min(end));
        }
    }

    /// Stops a node dead: packets to it are dropped, its queued timers never fire. Packets
    /// it already sent are still on the wire and arrive.
    pub fn crash(&mut self, i: usize) {
        if self.nodes[i].core.is_none() {
            return;
        }
        // Its beliefs stop counting.
        for s in 0..self.nodes.len() {
            if let Some(c) = self.counted(i, s).and_then(|st| self.tallies[s].slot(st)) {
                *c -= 1;
            }
        }
        let n = &mut self.nodes[i];
        n.core = None;
        n.life += 1;
        n.wake_at = None;
        self.live -= 1;
    }

    /// Starts a crashed (or running: it is crashed first) node again as a fresh core with
    /// the same address and a higher generation, joining through the join seed.
    pub fn restart(&mut self, i: usize) {
        let seed = self.live_seed(i);
        self.restart_via(i, seed);
    }

    /// Like [`Sim::restart`], joining through `seed`.
    pub fn restart_via(&mut self, i: usize, seed: usize) {
        self.crash(i);
        let generation = self.nodes[i].generation + 1;
        self.boot(i, generation);
        self.join(i, seed);
    }

    /// Splits the network: packets between nodes of different groups are dropped. Nodes
    /// named in no group form one more group together.
    pub fn partition(&mut self, groups: Vec<Vec<usize>>) {
        let mut g = vec![usize::MAX; self.nodes.len()];
        for (k, members) in groups.iter().enumerate() {
            for &i in members {
                g[i] = k;
            }
        }
        self.groups = Some(g);
    }

    /// Drops everything `from` sends to `to` (but not the other way).
    pub fn block_one_way(&mut self, from: usize, to: usize) {
        self.blocked.insert((from, to));
    }

    /// Ends every partition and one-way block.
    pub fn heal(&mut self) {
        self.groups = None;
        self.blocked.clear();
    }

    pub fn set_loss(&mut self, p: f64) {
        assert!((0.0..=1.0).contains(&p), "loss is a probability");
        self.cfg.loss = p;
    }

    pub fn is_live(&self, i: usize) -> bool {
        self.nodes[i].core.is_some()
    }

    /// How many nodes are running.
    pub fn live_count(&self) -> usize {
        self.live
    }

    /// What `viewer` believes of `subject`'s current life, as its member events told it
    /// (None: it never heard of this life). foca reports suspicion by no event, so a suspect
    /// shows as Alive here; [`Sim::exact_view`] tells them apart. A node sees itself Alive.
    pub fn view(&self, viewer: usize, subject: usize) -> Option<MemberState> {
        if viewer == subject {
            return self.is_live(viewer).then_some(MemberState::Alive);
        }
        let b = self.nodes[viewer].beliefs[subject];
        (b.generation == self.nodes[subject].generation).then_some(b.state)
    }

    /// What `viewer`'s core lists for `subject`'s current life, Suspect included. O(members).
    pub fn exact_view(&self, viewer: usize, subject: usize) -> Option<MemberState> {
        let (addr, generation) = (addr_of(subject), self.nodes[subject].generation);
        let core = self.nodes[viewer].core.as_ref()?;
        core.members().into_iter().find(|m| m.id.addr == addr && m.id.generation == generation).map(|m| m.state)
    }

    /// Share of live nodes other than `subject` that see `subject`'s current life in
    /// `state`. O(1), except for Suspect, which asks every core (O(N^2)).
    pub fn fraction_knowing(&self, subject: usize, state: MemberState) -> f64 {
        let viewers = self.live - usize::from(self.is_live(subject));
        if viewers == 0 {
            return 0.0;
        }
        let knowing = match state {
            MemberState::Suspect => (0..self.nodes.len())
                .filter(|&v| v != subject && self.is_live(v) && self.exact_view(v, subject) == Some(state))
                .count(),
            _ => self.tallies[subject].get(state) as usize,
        };
        knowing as f64 / viewers as f64
    }

    /// Every live node sees every other live node alive. O(N).
    pub fn all_converged_alive(&self) -> bool {
        let others = self.live.saturating_sub(1) as u32;
        (0..self.nodes.len()).all(|s| !self.is_live(s) || self.tallies[s].alive == others)
    }

    /// Share of ordered (viewer, subject) pairs of distinct live nodes where the viewer sees
    /// the subject alive. O(N).
    pub fn alive_pair_fraction(&self) -> f64 {
        let pairs = self.live * self.live.saturating_sub(1);
        let alive: usize =
            (0..self.nodes.len()).filter(|&s| self.is_live(s)).map(|s| self.tallies[s].alive as usize).sum();
        if pairs == 0 {
            1.0
        } else {
            alive as f64 / pairs as f64
        }
    }

    /// How many times, since the last [`Sim::reset_counters`], a node declared a live node
    /// down (transient declarations included: each Down event counts once).
    pub fn false_downs(&self) -> usize {
        self.false_downs.len()
    }

    /// Each false down counted by [`Sim::false_downs`], in order.
    pub fn false_down_log(&self) -> &[FalseDown] {
        &self.false_downs
    }

    /// Gossip bytes (envelope included, lost packets included) sent per live node per
    /// virtual second since the last [`Sim::reset_counters`].
    pub fn bytes_per_node_per_sec(&self) -> f64 {
        let secs = (self.now - self.counted_since) as f64 / 1e9;
        self.run.bytes_sent as f64 / self.live.max(1) as f64 / secs.max(1e-9)
    }

    /// Packet and rejoin counts since the last [`Sim::reset_counters`].
    pub fn run_stats(&self) -> RunStats {
        self.run
    }

    /// The live cores' own counters, summed (crashed lives' counters are gone).
    pub fn total_stats(&self) -> Stats {
        let mut t = Stats::default();
        for s in self.nodes.iter().filter_map(|n| n.core.as_ref()).map(Membership::stats) {
            t.msgs_out += s.msgs_out;
            t.bytes_out += s.bytes_out;
            t.msgs_in += s.msgs_in;
            t.bytes_in += s.bytes_in;
            t.probes_sent += s.probes_sent;
            t.probes_failed += s.probes_failed;
            t.suspicions_raised += s.suspicions_raised;
            t.suspicions_refuted += s.suspicions_refuted;
            t.malformed_in += s.malformed_in;
            t.identity_mismatches += s.identity_mismatches;
            t.leaves_refused += s.leaves_refused;
            t.downs_downgraded += s.downs_downgraded;
        }
        t
    }

    /// Starts the byte, packet and false-down counts afresh.
    pub fn reset_counters(&mut self) {
        self.run = RunStats::default();
        self.counted_since = self.now;
        self.false_downs.clear();
    }

    /// Starts recording every member event about node `i` (and `i`'s own joins, isolations
    /// and rejoins), replacing any earlier watch.
    pub fn watch(&mut self, i: usize) {
        self.watched = Some((i, Vec::new()));
    }

    /// The events recorded since [`Sim::watch`].
    pub fn watched_events(&self) -> &[Observed] {
        self.watched.as_ref().map_or(&[], |(_, log)| log)
    }

    /// A node's core, for assertions on its own view.
    pub fn core(&self, i: usize) -> Option<&Membership> {
        self.nodes[i].core.as_ref()
    }

    /// Writes a small policy object on node `i` and spreads it on gossip, as the agent does.
    pub fn write_policy(&mut self, i: usize, name: &str) {
        let store = self.nodes[i].policy.clone().expect("SimConfig::policy is off");
        let key = Key { kind: Kind::Subsets, name: name.into() };
        let body = format!(r#"{{"service": "web", "labels": {{"version": "{name}"}}}}"#);
        let entry = {
            let mut s = store.lock().unwrap();
            let reg =
                s.prepare(1_000_000 + self.now / 1_000_000, &key, Some(body.as_bytes()), None).expect("valid object");
            s.commit(key.clone(), reg.clone());
            store::to_wire(&key, &reg)
        };
        self.seen.lock().unwrap().insert((i, name.into()), self.now);
        let now = self.instant();
        if let Some(core) = self.nodes[i].core.as_mut() {
            core.broadcast(now, &entry.encode_item());
        }
        self.after_io(i, false);
    }

    /// Virtual time from the write until each live node held `name` (None: not yet).
    pub fn policy_delays(&self, writer: usize, name: &str) -> Vec<Option<Duration>> {
        let seen = self.seen.lock().unwrap();
        let t0 = seen[&(writer, name.to_string())];
        (0..self.nodes.len())
            .filter(|&i| self.is_live(i))
            .map(|i| seen.get(&(i, name.to_string())).map(|t| Duration::from_nanos(t - t0)))
            .collect()
    }
}
