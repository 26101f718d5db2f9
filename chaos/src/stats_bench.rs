//! `trellis-sim bench-stats`: mesh-wide `stat` at scale with the real core
//! (`trellis_core::stats`). N nodes each call a few services; every interval each node
//! closes a digest with a real recorder and sends each service's rows to that service's
//! owners, whose stores keep them. Then one node asks for one service (its two owners) and
//! for every service (every member). Bytes are the encoded messages (payload plus the 3-byte
//! envelope; QUIC's own framing not counted). Time is the network modelled (a one-way delay
//! drawn per message) plus the compute measured on this machine (each owner's answer and
//! the asker's merge), owners answering in parallel. The answer is checked against the
//! requests generated.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use trellis_core::stats::{owners, pick, rows, By, MeshStats, Recorder};
use trellis_proto::stats::{StatsAsk, StatsCall};

/// The shape of one run.
pub struct Shape {
    pub nodes: usize,
    pub services: usize,
    /// Services each node calls.
    pub calls: usize,
    /// Nodes with instances of each service.
    pub instances: usize,
    pub interval: Duration,
    /// Intervals recorded; the query's window covers them all.
    pub intervals: usize,
    /// Requests per node per called service per interval.
    pub requests: u64,
    /// One-way network delay, drawn uniformly from this range per message.
    pub one_way: (Duration, Duration),
    pub seed: u64,
}

const ENVELOPE: usize = trellis_proto::envelope::HEADER_LEN;

pub fn run(s: &Shape) {
    let mut rng = SmallRng::seed_from_u64(s.seed);
    let names: Vec<String> = (0..s.nodes).map(|i| format!("node-{i}")).collect();
    let services: Vec<String> = (0..s.services).map(|i| format!("svc-{i}")).collect();
    let placed: Vec<Vec<usize>> =
        (0..s.services).map(|_| (0..s.instances).map(|_| rng.random_range(0..s.nodes)).collect()).collect();
    let calls: Vec<Vec<usize>> =
        (0..s.nodes).map(|_| (0..s.calls).map(|_| rng.random_range(0..s.services)).collect()).collect();
    let keep = s.interval * (s.intervals as u32 + 1);
    let mut stores: Vec<MeshStats> = (0..s.nodes).map(|_| MeshStats::new(keep)).collect();
    let index: BTreeMap<&str, usize> = names.iter().enumerate().map(|(i, n)| (n.as_str(), i)).collect();
    let (mut sent, mut received) = (vec![0usize; s.nodes], vec![0usize; s.nodes]);
    let (mut digest_bytes, mut truth) = (0usize, BTreeMap::<usize, u64>::new());
    let len_ms = s.interval.as_millis() as u64;
    let base = 1_796_000_000_000 / len_ms * len_ms;
    for k in 0..s.intervals {
        let start_ms = base + k as u64 * len_ms;
        for (node, called) in calls.iter().enumerate() {
            let mut r = Recorder::default();
            for &svc in called {
                for q in 0..s.requests {
                    let dest = &names[placed[svc][q as usize % s.instances]];
                    let took = Duration::from_micros(200 + rng.random_range(0..5_000));
                    r.request(&services[svc], "", dest, q % 50 == 0, took);
                    *truth.entry(svc).or_default() += 1;
                }
            }
            let d = r.close(start_ms, len_ms as u32);
            digest_bytes += d.encode().len() + ENVELOPE;
            for (owner, part) in owners::split(&d, &names) {
                let o = index[owner.as_str()];
                if o != node {
                    let n = part.encode().len() + ENVELOPE;
                    sent[node] += n;
                    received[o] += n;
                }
                stores[o].add(&names[node], part);
            }
        }
    }
    let now = base + s.intervals as u64 * len_ms + 1;
    let per_interval = |v: &[usize]| v.iter().map(|&b| b as f64 / s.intervals as f64).collect::<Vec<f64>>();
    let (out, inn) = (per_interval(&sent), per_interval(&received));
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let max = |v: &[f64]| v.iter().cloned().fold(0.0, f64::max);
    let digest = digest_bytes as f64 / (s.nodes * s.intervals) as f64;
    println!(
        "N = {} nodes, {} services on {} nodes each, each node calling {} of them ({} requests each per interval), {} intervals of {:?}",
        s.nodes, s.services, s.instances, s.calls, s.requests, s.intervals, s.interval
    );
    println!("a node's digest per interval: {digest:.0} B");
    println!(
        "sent to owners per node per interval: mean {:.0} B, max {:.0} B; received by an owner: mean {:.0} B, max {:.0} B",
        mean(&out),
        max(&out),
        mean(&inn),
        max(&inn)
    );
    println!(
        "(the digest sent to every peer instead, the design this replaced: {:.0} B per node per interval, {:.0}x)",
        digest * (s.nodes - 1) as f64,
        digest * (s.nodes - 1) as f64 / mean(&out).max(1.0)
    );
    let window = s.interval * s.intervals as u32;
    let busiest = *truth.iter().max_by_key(|(_, n)| **n).expect("some traffic").0;
    let one = ask(s, &mut rng, &stores, &names, &index, Some(&services[busiest]), window, now);
    let got = one.rows.first().map_or(0, |r| r.requests);
    println!(
        "stat {} (asked its {} owners): {:.2} ms, {} B asked + answered; {} requests, generated {} ({})",
        services[busiest],
        one.asked,
        one.took.as_secs_f64() * 1e3,
        one.bytes,
        got,
        truth[&busiest],
        if got == truth[&busiest] { "equal" } else { "DIFFERENT" }
    );
    let all = ask(s, &mut rng, &stores, &names, &index, None, window, now);
    let total: u64 = all.rows.iter().map(|r| r.requests).sum();
    let generated: u64 = truth.values().sum();
    println!(
        "stat, every service (asked all {} members): {:.2} ms, {} B asked + answered; {} services, {} requests, generated {} ({})",
        all.asked,
        all.took.as_secs_f64() * 1e3,
        all.bytes,
        all.rows.len(),
        total,
        generated,
        if total == generated { "equal" } else { "DIFFERENT" }
    );
}

struct Asked {
    asked: usize,
    took: Duration,
    bytes: usize,
    rows: Vec<trellis_core::stats::Row>,
}

/// One query from node 0: each asked node's answer computed for real, the network drawn.
#[allow(clippy::too_many_arguments)]
fn ask(
    s: &Shape,
    rng: &mut SmallRng,
    stores: &[MeshStats],
    names: &[String],
    index: &BTreeMap<&str, usize>,
    service: Option<&str>,
    window: Duration,
    now: u64,
) -> Asked {
    let targets: Vec<&str> = match service {
        Some(svc) => owners::owners(svc, names),
        None => names.iter().map(String::as_str).collect(),
    };
    let request = StatsAsk {
        id: 1,
        service: service.map(str::to_string),
        by: "service".into(),
        window_ms: window.as_millis() as u64,
        series: false,
    };
    let ask_bytes = StatsCall::Ask(request).encode().len() + ENVELOPE;
    let (mut slowest, mut bytes, mut held) = (Duration::ZERO, 0, Vec::new());
    let mut draw = || {
        let (lo, hi) = (s.one_way.0.as_micros() as u64, s.one_way.1.as_micros() as u64);
        Duration::from_micros(rng.random_range(lo..=hi.max(lo)))
    };
    for t in &targets {
        let t0 = Instant::now();
        let h = stores[index[t]].held(service, By::Service, window, now, false);
        let compute = t0.elapsed();
        let local = *t == names[0];
        let answer = StatsCall::Answer { id: 1, held: h.clone() }.encode().len() + ENVELOPE;
        if !local {
            bytes += ask_bytes + answer;
        }
        let net = if local { Duration::ZERO } else { draw() + draw() };
        slowest = slowest.max(net + compute);
        held.extend(h);
    }
    let t0 = Instant::now();
    let rows = rows(&pick(held), window);
    Asked { asked: targets.len(), took: slowest + t0.elapsed(), bytes, rows }
}
