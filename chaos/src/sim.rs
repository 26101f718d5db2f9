//! A deterministic discrete-event simulator of membership: N real [`Membership`] cores in
//! one thread, a virtual clock, and a network with delay, jitter, loss, partitions and
//! one-way blocks. The same seed replays the same run, packet for packet.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use trellis_node::membership::{MemberEvent, MemberState, Membership, Timing};
use trellis_proto::{NodeIdentity, NodeMeta};

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
}

impl SimConfig {
    pub fn new(nodes: usize, timing: Timing, seed: u64) -> SimConfig {
        SimConfig {
            nodes,
            timing,
            seed,
            loss: 0.0,
            delay: Duration::from_micros(500),
            jitter: Duration::from_micros(500),
        }
    }
}

enum Event {
    Deliver { from: usize, to: usize, data: Vec<u8> },
    Wake { node: usize },
}

struct SimNode {
    core: Option<Membership>,
    id: NodeIdentity,
    /// The wake-up currently queued, to avoid flooding the queue with duplicates.
    wake: Option<u64>,
    /// What this node believes of others, kept from its events: index -> (generation, state).
    view: HashMap<usize, (u64, MemberState)>,
}

/// The simulator. Time is virtual nanoseconds since the start.
pub struct Sim {
    cfg: SimConfig,
    base: Instant,
    now: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<(u64, u64, usize)>>,
    payloads: HashMap<usize, Event>,
    next_payload: usize,
    nodes: Vec<SimNode>,
    by_addr: HashMap<SocketAddr, usize>,
    rng: SmallRng,
    groups: Option<Vec<usize>>,
    blocked: HashSet<(usize, usize)>,
    bytes_sent: u64,
    counted_since: u64,
    false_downs: usize,
}

fn addr_of(i: usize) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, (i >> 16) as u8, (i >> 8) as u8, i as u8)), 7946)
}

impl Sim {
    pub fn new(cfg: SimConfig) -> Sim {
        let nodes = (0..cfg.nodes)
            .map(|i| {
                let id = NodeIdentity {
                    addr: addr_of(i),
                    generation: 1,
                    name: format!("n{i}"),
                    meta: NodeMeta { api_addr: None, version: "sim".into(), labels: Default::default() },
                };
                let core = Membership::new(id.clone(), &cfg.timing, cfg.nodes as u32, cfg.seed ^ (i as u64 + 1));
                SimNode { core: Some(core), id, wake: None, view: HashMap::new() }
            })
            .collect();
        let by_addr = (0..cfg.nodes).map(|i| (addr_of(i), i)).collect();
        Sim {
            rng: SmallRng::seed_from_u64(cfg.seed),
            cfg,
            base: Instant::now(),
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            payloads: HashMap::new(),
            next_payload: 0,
            nodes,
            by_addr,
            groups: None,
            blocked: HashSet::new(),
            bytes_sent: 0,
            counted_since: 0,
            false_downs: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn now(&self) -> Duration {
        Duration::from_nanos(self.now)
    }

    fn instant(&self) -> Instant {
        self.base + Duration::from_nanos(self.now)
    }

    fn push(&mut self, at: u64, ev: Event) {
        let key = self.next_payload;
        self.next_payload += 1;
        self.payloads.insert(key, ev);
        self.seq += 1;
        self.queue.push(Reverse((at, self.seq, key)));
    }

    /// Every node joins through `seed`, staggered by 2 ms so the seed is not hit at once.
    pub fn join_all(&mut self, seed: usize) {
        for i in 0..self.nodes.len() {
            if i != seed {
                self.run_for(Duration::from_millis(2));
                self.join(i, seed);
            }
        }
    }

    pub fn join(&mut self, i: usize, seed: usize) {
        let now = self.instant();
        let seed_addr = addr_of(seed);
        if let Some(core) = self.nodes[i].core.as_mut() {
            core.join(now, &[seed_addr]);
        }
        self.after_io(i);
    }

    /// Moves a node's output into the network and (re)arms its wake-up.
    fn after_io(&mut self, i: usize) {
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
        // A node declared down renews its identity (higher generation) and rejoins.
        self.nodes[i].id.generation = core.identity().generation;
        for e in events {
            self.observe(i, e);
        }
        for t in sends {
            self.bytes_sent += t.data.len() as u64;
            let Some(&to) = self.by_addr.get(&t.to) else { continue };
            if !self.passes(i, to) {
                continue;
            }
            let jitter =
                if self.cfg.jitter.is_zero() { 0 } else { self.rng.random_range(0..self.cfg.jitter.as_nanos() as u64) };
            let at = self.now + self.cfg.delay.as_nanos() as u64 + jitter;
            self.push(at, Event::Deliver { from: i, to, data: t.data });
        }
        if let Some(t) = next {
            let t = t.max(self.now);
            if self.nodes[i].wake.is_none_or(|w| t < w) {
                self.nodes[i].wake = Some(t);
                self.push(t, Event::Wake { node: i });
            }
        }
    }

    fn passes(&mut self, from: usize, to: usize) -> bool {
        if self.blocked.contains(&(from, to)) {
            return false;
        }
        if let Some(g) = &self.groups {
            if g[from] != g[to] {
                return false;
            }
        }
        !(self.cfg.loss > 0.0 && self.rng.random_bool(self.cfg.loss))
    }

    fn observe(&mut self, viewer: usize, e: MemberEvent) {
        let mut set = |id: &NodeIdentity, st: MemberState| {
            if let Some(&s) = self.by_addr.get(&id.addr) {
                let entry = self.nodes[viewer].view.entry(s).or_insert((0, st));
                if id.generation >= entry.0 {
                    *entry = (id.generation, st);
                }
            }
        };
        match &e {
            MemberEvent::Up(id) => set(id, MemberState::Alive),
            MemberEvent::Down(id) => set(id, MemberState::Down),
            MemberEvent::Left(id) => set(id, MemberState::Left),
            MemberEvent::Renamed { new, .. } => set(new, MemberState::Alive),
            _ => {}
        }
        if let MemberEvent::Down(id) = &e {
            if let Some(&s) = self.by_addr.get(&id.addr) {
                if self.nodes[s].core.is_some() && self.nodes[s].id.generation == id.generation {
                    self.false_downs += 1;
                }
            }
        }
    }

    /// Processes events until `until` (virtual nanoseconds).
    fn step_to(&mut self, until: u64) {
        while let Some(Reverse((at, _, key))) = self.queue.peek().copied() {
            if at > until {
                break;
            }
            self.queue.pop();
            self.now = at;
            let ev = self.payloads.remove(&key).expect("queued payload");
            match ev {
                Event::Deliver { from, to, data } => {
                    let now = self.instant();
                    let name = self.nodes[from].id.name.clone();
                    if let Some(core) = self.nodes[to].core.as_mut() {
                        let _ = core.handle_datagram(now, Some(&name), &data);
                        self.after_io(to);
                    }
                }
                Event::Wake { node } => {
                    if self.nodes[node].wake != Some(at) {
                        continue;
                    }
                    self.nodes[node].wake = None;
                    let now = self.instant();
                    if let Some(core) = self.nodes[node].core.as_mut() {
                        core.handle_timeout(now);
                        self.after_io(node);
                    }
                }
            }
        }
        self.now = until;
    }

    pub fn run_for(&mut self, d: Duration) {
        let until = self.now + d.as_nanos() as u64;
        self.step_to(until);
    }

    /// Runs until `pred` holds (checked every 50 ms of virtual time); returns the elapsed
    /// virtual time, or None after `max`.
    pub fn run_until(&mut self, max: Duration, mut pred: impl FnMut(&Sim) -> bool) -> Option<Duration> {
        let start = self.now;
        let step = Duration::from_millis(50);
        loop {
            if pred(self) {
                return Some(Duration::from_nanos(self.now - start));
            }
            if self.now - start >= max.as_nanos() as u64 {
                return None;
            }
            self.run_for(step);
        }
    }

    /// Stops a node dead: no more packets in or out, no timers.
    pub fn crash(&mut self, i: usize) {
        self.nodes[i].core = None;
        self.nodes[i].wake = None;
    }

    /// Starts a crashed node again under a higher generation, joining through `seed`.
    pub fn restart(&mut self, i: usize, seed: usize) {
        let n = &mut self.nodes[i];
        n.id.generation += 1;
        n.view.clear();
        n.core = Some(Membership::new(
            n.id.clone(),
            &self.cfg.timing,
            self.cfg.nodes as u32,
            self.cfg.seed ^ n.id.generation,
        ));
        self.join(i, seed);
    }

    pub fn partition(&mut self, groups: &[Vec<usize>]) {
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

    pub fn heal(&mut self) {
        self.groups = None;
        self.blocked.clear();
    }

    pub fn set_loss(&mut self, p: f64) {
        self.cfg.loss = p;
    }

    pub fn is_live(&self, i: usize) -> bool {
        self.nodes[i].core.is_some()
    }

    /// What `viewer` believes of `subject`'s current life (None: never heard of it).
    pub fn view(&self, viewer: usize, subject: usize) -> Option<MemberState> {
        let (generation, st) = *self.nodes[viewer].view.get(&subject)?;
        (generation == self.nodes[subject].id.generation).then_some(st)
    }

    /// Share of live nodes (other than `subject`) that see `subject` in `state`.
    pub fn fraction_knowing(&self, subject: usize, state: MemberState) -> f64 {
        let viewers: Vec<usize> = (0..self.nodes.len()).filter(|&v| v != subject && self.is_live(v)).collect();
        let knowing = viewers.iter().filter(|&&v| self.view(v, subject) == Some(state)).count();
        knowing as f64 / viewers.len().max(1) as f64
    }

    /// Every live node sees every other live node alive.
    pub fn all_converged_alive(&self) -> bool {
        let live: Vec<usize> = (0..self.nodes.len()).filter(|&i| self.is_live(i)).collect();
        live.iter().all(|&v| live.iter().all(|&s| s == v || self.view(v, s) == Some(MemberState::Alive)))
    }

    /// Times a live node was declared down by someone, over the whole run.
    pub fn false_downs(&self) -> usize {
        self.false_downs
    }

    /// Gossip bytes (envelope included) sent per live node per virtual second since the
    /// last [`Sim::reset_counters`].
    pub fn bytes_per_node_per_sec(&self) -> f64 {
        let live = (0..self.nodes.len()).filter(|&i| self.is_live(i)).count().max(1);
        let secs = (self.now - self.counted_since) as f64 / 1e9;
        self.bytes_sent as f64 / live as f64 / secs.max(1e-9)
    }

    pub fn reset_counters(&mut self) {
        self.bytes_sent = 0;
        self.counted_since = self.now;
        self.false_downs = 0;
    }

    /// A node's core, for assertions on its own view.
    pub fn core(&self, i: usize) -> Option<&Membership> {
        self.nodes[i].core.as_ref()
    }
}
