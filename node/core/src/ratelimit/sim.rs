//! A deterministic simulator of many limiters exchanging messages in virtual time: Poisson
//! load per node, message latency and loss, crashes, partitions and membership changes, all
//! from one seed. Tests and `trellis-sim bench-ratelimit` both run it.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use trellis_proto::ratelimit::{LimitKey, RateLimitMsg};

use super::limiter::{ExchangeTiming, LimitSpec, Limiter, Outgoing, Per};
use crate::membership::MemberState;

/// Width of one recorded bin.
pub const BIN: Duration = Duration::from_millis(10);
const STEP: Duration = Duration::from_millis(1);

#[derive(Clone, Debug)]
pub struct SimConfig {
    pub nodes: usize,
    pub rate: f64,
    pub burst: f64,
    pub per: Per,
    /// One-way message latency, plus up to `jitter` more.
    pub latency: Duration,
    pub jitter: Duration,
    pub seed: u64,
    pub timing: ExchangeTiming,
    /// False: every node starts alone, a cluster of one (for per-instance baselines).
    pub connected: bool,
}

impl SimConfig {
    pub fn new(nodes: usize, rate: f64) -> SimConfig {
        SimConfig {
            nodes,
            rate,
            burst: LimitSpec::default_burst(rate),
            per: Per::All,
            latency: Duration::from_millis(1),
            jitter: Duration::from_millis(1),
            seed: 1,
            timing: ExchangeTiming::default(),
            connected: true,
        }
    }
}

/// Requests arriving at one node for one key value, at a Poisson rate.
#[derive(Clone, Debug)]
pub struct Flow {
    pub node: usize,
    pub value: String,
    pub rate: f64,
}

struct Msg {
    from: usize,
    to: usize,
    msg: RateLimitMsg,
}

pub struct Sim {
    cfg: SimConfig,
    t0: Instant,
    now: Duration,
    names: Vec<String>,
    nodes: Vec<Option<Limiter>>,
    flows: Vec<Flow>,
    queue: BinaryHeap<Reverse<(Duration, u64)>>,
    inflight: HashMap<u64, Msg>,
    seq: u64,
    cut: HashSet<(usize, usize)>,
    rng: SmallRng,
    next_tick: Vec<Duration>,
    /// Admitted and offered per node per value per bin.
    admitted: HashMap<(usize, String), Vec<u32>>,
    offered: HashMap<(usize, String), Vec<u32>>,
    bytes: Vec<u64>,
}

pub const LIMIT: &str = "limit";

const SETTLED: Duration = Duration::from_secs(3600);

impl Sim {
    /// Every node up, every node seeing every other alive.
    pub fn new(cfg: SimConfig) -> Sim {
        // Virtual time starts an hour ahead, so the initial view can be dated before it.
        let t0 = Instant::now() + SETTLED;
        let names: Vec<String> = (0..cfg.nodes).map(|i| format!("n{i:03}")).collect();
        let mut rng = SmallRng::seed_from_u64(cfg.seed);
        let spec = LimitSpec {
            name: LIMIT.into(),
            service: "svc".into(),
            route: None,
            rate: cfg.rate,
            burst: cfg.burst,
            per: cfg.per.clone(),
            max_delay: None,
        };
        let nodes = names
            .iter()
            .map(|n| {
                let mut l = Limiter::new(n, cfg.timing.clone());
                l.set_limits(vec![spec.clone()]);
                Some(l)
            })
            .collect();
        let tick_ms = cfg.timing.tick.as_millis().max(1) as u64;
        let next_tick = (0..cfg.nodes).map(|_| Duration::from_millis(rng.random_range(0..tick_ms))).collect();
        let mut sim = Sim {
            bytes: vec![0; cfg.nodes],
            cfg,
            t0,
            now: Duration::ZERO,
            names,
            nodes,
            flows: Vec::new(),
            queue: BinaryHeap::new(),
            inflight: HashMap::new(),
            seq: 0,
            cut: HashSet::new(),
            rng,
            next_tick,
            admitted: HashMap::new(),
            offered: HashMap::new(),
        };
        let everyone: Vec<usize> = if sim.cfg.connected { (0..sim.cfg.nodes).collect() } else { Vec::new() };
        // The cluster has been up a while: every member came into view long ago.
        for i in 0..sim.cfg.nodes {
            sim.view_at(t0 - SETTLED, i, &everyone, &[]);
        }
        sim
    }

    pub fn now(&self) -> Duration {
        self.now
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// What node `i`'s membership says: `alive` seen, `down` declared down.
    pub fn set_view(&mut self, i: usize, alive: &[usize], down: &[usize]) {
        self.view_at(self.t0 + self.now, i, alive, down);
    }

    fn view_at(&mut self, now: Instant, i: usize, alive: &[usize], down: &[usize]) {
        let names = &self.names;
        let list: Vec<(&str, MemberState)> = alive
            .iter()
            .map(|j| (names[*j].as_str(), MemberState::Alive))
            .chain(down.iter().map(|j| (names[*j].as_str(), MemberState::Down)))
            .collect();
        if let Some(l) = self.nodes[i].as_mut() {
            l.set_members(now, list);
        }
    }

    /// Replaces the offered load.
    pub fn set_flows(&mut self, flows: Vec<Flow>) {
        self.flows = flows;
    }

    /// The same total load spread evenly (`None`) or all on one node.
    pub fn set_load(&mut self, total: f64, on: Option<usize>) {
        let flows = match on {
            Some(node) => vec![Flow { node, value: String::new(), rate: total }],
            None => (0..self.len())
                .map(|node| Flow { node, value: String::new(), rate: total / self.len() as f64 })
                .collect(),
        };
        self.set_flows(flows);
    }

    /// Node `i` stops: no ticks, no decisions, messages to it are lost.
    pub fn crash(&mut self, i: usize) {
        self.nodes[i] = None;
    }

    /// Messages between the groups are dropped, both ways.
    pub fn partition(&mut self, groups: &[&[usize]]) {
        for (gi, a) in groups.iter().enumerate() {
            for (gj, b) in groups.iter().enumerate() {
                if gi != gj {
                    self.cut.extend(a.iter().flat_map(|x| b.iter().map(move |y| (*x, *y))));
                }
            }
        }
    }

    pub fn heal(&mut self) {
        self.cut.clear();
    }

    pub fn run_for(&mut self, d: Duration) {
        let end = self.now + d;
        while self.now < end {
            self.step();
            self.now += STEP;
        }
    }

    fn step(&mut self) {
        let now = self.t0 + self.now;
        while let Some(Reverse((at, id))) = self.queue.peek().copied() {
            if at > self.now {
                break;
            }
            self.queue.pop();
            let m = self.inflight.remove(&id).expect("queued");
            let from = self.names[m.from].clone();
            if let Some(l) = self.nodes[m.to].as_mut() {
                let out = l.handle(now, &from, m.msg);
                self.send(m.to, out);
            }
        }
        for i in 0..self.len() {
            if self.now >= self.next_tick[i] {
                self.next_tick[i] += self.cfg.timing.tick;
                if let Some(l) = self.nodes[i].as_mut() {
                    let out = l.tick(now);
                    self.send(i, out);
                }
            }
        }
        let bin = (self.now.as_millis() / BIN.as_millis()) as usize;
        for f in 0..self.flows.len() {
            let Flow { node, ref value, rate } = self.flows[f];
            let value = value.clone();
            let arrivals = poisson(&mut self.rng, rate * STEP.as_secs_f64());
            let Some(l) = self.nodes[node].as_mut() else { continue };
            let mut ok = 0;
            for _ in 0..arrivals {
                let keys = l.keys_for("svc", None, |_| Some(value.as_str()), &value);
                ok += u32::from(l.decide(now, &keys).is_ok());
            }
            bump(&mut self.offered, (node, value.clone()), bin, arrivals);
            bump(&mut self.admitted, (node, value), bin, ok);
        }
    }

    fn send(&mut self, from: usize, out: Vec<Outgoing>) {
        for o in out {
            self.bytes[from] += o.msg.encode().len() as u64 + 3;
            let Some(to) = self.names.iter().position(|n| *n == o.to) else { continue };
            if self.cut.contains(&(from, to)) {
                continue;
            }
            let jitter = self.cfg.jitter.as_micros() as u64;
            let extra = if jitter > 0 { self.rng.random_range(0..jitter) } else { 0 };
            let at = self.now + self.cfg.latency + Duration::from_micros(extra);
            // Round up to the next step so a message is never handled in the step it was sent.
            let at = Duration::from_millis(at.as_millis() as u64 + 1);
            self.seq += 1;
            self.queue.push(Reverse((at, self.seq)));
            self.inflight.insert(self.seq, Msg { from, to, msg: o.msg });
        }
    }

    /// Admitted requests per second at `nodes` (all when empty) for `value` (all when
    /// None) over [from, to).
    pub fn admitted_rate(&self, nodes: &[usize], value: Option<&str>, from: Duration, to: Duration) -> f64 {
        rate(&self.admitted, nodes, value, from, to)
    }

    pub fn offered_rate(&self, nodes: &[usize], value: Option<&str>, from: Duration, to: Duration) -> f64 {
        rate(&self.offered, nodes, value, from, to)
    }

    /// The most admitted in any window of `width` starting in [from, to - width], sliding by
    /// one bin, as requests per second.
    pub fn max_window(&self, width: Duration, from: Duration, to: Duration) -> f64 {
        let (b0, b1, w) = (bin(from), bin(to), bin(width));
        let mut totals = vec![0u64; b1.max(b0)];
        for bins in self.admitted.values() {
            for (b, n) in bins.iter().enumerate().take(b1) {
                totals[b] += u64::from(*n);
            }
        }
        (b0..=b1.saturating_sub(w))
            .map(|s| totals[s..s + w].iter().sum::<u64>())
            .max()
            .map_or(0.0, |m| m as f64 / width.as_secs_f64())
    }

    /// Rate-limit bytes each node sent per second, averaged over the run.
    pub fn bytes_per_node_second(&self) -> f64 {
        self.bytes.iter().sum::<u64>() as f64 / self.len() as f64 / self.now.as_secs_f64().max(1e-9)
    }

    pub fn limiter(&self, i: usize) -> Option<&Limiter> {
        self.nodes[i].as_ref()
    }

    pub fn key() -> LimitKey {
        LimitKey { limit: LIMIT.into(), value: 0 }
    }
}

fn bin(d: Duration) -> usize {
    (d.as_millis() / BIN.as_millis()) as usize
}

fn bump(m: &mut HashMap<(usize, String), Vec<u32>>, k: (usize, String), bin: usize, n: u32) {
    let v = m.entry(k).or_default();
    if v.len() <= bin {
        v.resize(bin + 1, 0);
    }
    v[bin] += n;
}

fn rate(
    m: &HashMap<(usize, String), Vec<u32>>,
    nodes: &[usize],
    value: Option<&str>,
    from: Duration,
    to: Duration,
) -> f64 {
    let (b0, b1) = (bin(from), bin(to));
    let total: u64 = m
        .iter()
        .filter(|((n, v), _)| (nodes.is_empty() || nodes.contains(n)) && value.is_none_or(|x| x == v))
        .map(|(_, bins)| bins.iter().skip(b0).take(b1 - b0).map(|n| u64::from(*n)).sum::<u64>())
        .sum();
    total as f64 / (to - from).as_secs_f64()
}

/// Knuth's method: fine for the small means of one millisecond.
fn poisson(rng: &mut SmallRng, mean: f64) -> u32 {
    if mean <= 0.0 {
        return 0;
    }
    if mean > 30.0 {
        // Normal approximation keeps large means cheap.
        let u1: f64 = rng.random::<f64>().max(1e-12);
        let u2: f64 = rng.random();
        let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
        return (mean + z * mean.sqrt()).round().max(0.0) as u32;
    }
    let limit = (-mean).exp();
    let mut p = 1.0;
    let mut k = 0;
    loop {
        p *= rng.random::<f64>();
        if p < limit {
            return k;
        }
        k += 1;
    }
}
