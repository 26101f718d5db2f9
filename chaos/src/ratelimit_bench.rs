//! `trellis-sim bench-ratelimit`: cluster-wide rate limiting figures, each next to a
//! baseline run in the same process. Reproduce with
//! `cargo run --release -p trellis-chaos --bin trellis-sim -- bench-ratelimit`.

use std::time::{Duration, Instant};

use trellis_core::ratelimit::bucket::TokenBucket;
use trellis_core::ratelimit::sim::{Flow, Sim, SimConfig};
use trellis_core::ratelimit::{ExchangeTiming, LimitSpec, Limiter, Per};
use trellis_node::ratelimit::RateLimits;

const LIMIT: f64 = 1000.0;

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

/// How load is spread over the nodes.
#[derive(Clone, Copy)]
enum Spread {
    Uniform,
    OneNode,
    /// Node i gets a share proportional to 1/(i+1).
    Zipf,
}

fn flows(n: usize, total: f64, spread: Spread) -> Vec<Flow> {
    let weights: Vec<f64> = match spread {
        Spread::Uniform => vec![1.0; n],
        Spread::OneNode => (0..n).map(|i| if i == 0 { 1.0 } else { 0.0 }).collect(),
        Spread::Zipf => (0..n).map(|i| 1.0 / (i + 1) as f64).collect(),
    };
    let sum: f64 = weights.iter().sum();
    weights
        .iter()
        .enumerate()
        .filter(|(_, w)| **w > 0.0)
        .map(|(node, w)| Flow { node, value: String::new(), rate: total * w / sum })
        .collect()
}

/// Admitted over 10 s at twice the limit. `per_instance` is the baseline of Consul- and
/// Kuma-style limits: every node alone, enforcing the limit divided by the node count.
fn accuracy(n: usize, spread: Spread, seed: u64, per_instance: bool) -> f64 {
    let rate = if per_instance { LIMIT / n as f64 } else { LIMIT };
    let mut sim = Sim::new(SimConfig { seed, connected: !per_instance, ..SimConfig::new(n, rate) });
    sim.set_flows(flows(n, 2.0 * LIMIT, spread));
    sim.run_for(secs(10.0));
    sim.admitted_rate(&[], None, secs(0.0), secs(10.0)) / LIMIT
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn accuracy_table(seeds: u64) {
    println!("Accuracy: admitted / limit over 10 s, twice the limit offered, median of {seeds} seeds");
    println!("{:>4}  {:<9} {:>9} {:>30}", "N", "spread", "trellis", "limit/N per node (baseline)");
    for n in [3, 10, 50] {
        for (name, spread) in [("uniform", Spread::Uniform), ("one node", Spread::OneNode), ("zipf", Spread::Zipf)] {
            let ours = median((1..=seeds).map(|s| accuracy(n, spread, s, false)).collect());
            let base = median((1..=seeds).map(|s| accuracy(n, spread, s, true)).collect());
            println!("{n:>4}  {name:<9} {ours:>9.3} {base:>30.3}");
        }
    }
}

/// Time from a step until a 100 ms window admits 90% of `target` at `nodes`.
fn settle(sim: &Sim, nodes: &[usize], from: f64, target: f64) -> Option<f64> {
    (0..300)
        .map(|i| from + i as f64 * 0.01)
        .find(|t| sim.admitted_rate(nodes, None, secs(*t), secs(t + 0.1)) >= 0.9 * target)
        .map(|t| t - from)
}

fn reaction() {
    println!("\nReaction (N=10): idle, then five times the limit at t=2 s");
    for (name, on) in [("uniform", None), ("one node", Some(0))] {
        let mut sim = Sim::new(SimConfig::new(10, LIMIT));
        sim.run_for(secs(2.0));
        sim.set_load(5.0 * LIMIT, on);
        sim.run_for(secs(5.0));
        let worst = sim.max_window(secs(1.0), secs(2.0), secs(7.0)) / LIMIT;
        let t = settle(&sim, &[], 2.0, LIMIT).map_or("never".into(), |t| format!("{:.0} ms", t * 1000.0));
        println!("  {name:<9} 90% of the limit after {t}; busiest 1 s window {worst:.3} x limit");
    }
    let mut sim = Sim::new(SimConfig::new(10, LIMIT));
    sim.set_load(2.0 * LIMIT, Some(0));
    sim.run_for(secs(3.0));
    sim.set_load(2.0 * LIMIT, Some(9));
    sim.run_for(secs(2.0));
    let t = settle(&sim, &[9], 3.0, LIMIT).map_or("never".into(), |t| format!("{:.0} ms", t * 1000.0));
    println!("  load moved from node 0 to node 9: node 9 at 90% of the limit after {t}");
}

fn bandwidth() {
    println!("\nBytes each node sends for limiting (one limit, twice the limit offered, 10 s)");
    for n in [3, 10, 50] {
        for (name, spread) in [("uniform", Spread::Uniform), ("one node", Spread::OneNode)] {
            let mut sim = Sim::new(SimConfig::new(n, LIMIT));
            sim.set_flows(flows(n, 2.0 * LIMIT, spread));
            sim.run_for(secs(10.0));
            println!("  N={n:<3} {name:<9} {:>7.0} B/s per node", sim.bytes_per_node_second());
        }
    }
}

/// Per-call latencies of `f` in ns, and calls per second.
fn time_calls(n: usize, mut f: impl FnMut()) -> (Vec<u64>, f64) {
    let mut lat = Vec::with_capacity(n);
    let start = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        f();
        lat.push(t.elapsed().as_nanos() as u64);
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    lat.sort_unstable();
    (lat, rate)
}

fn pct(v: &[u64], p: f64) -> u64 {
    v[((v.len() - 1) as f64 * p) as usize]
}

fn decision_cost() {
    const N: usize = 2_000_000;
    println!("\nDecision cost on the request path, one thread, {N} decisions each");
    let spec = |per: Per| LimitSpec {
        name: "web".into(),
        service: "web".into(),
        route: None,
        rate: 1e12,
        burst: 1e12,
        per,
        max_delay: None,
    };
    let (timer, _) = time_calls(N, || {});
    let t0 = Instant::now();
    let mut bucket = TokenBucket::new(t0, 1e12, 1e12, 1e12);
    let (bare, bare_rate) = time_calls(N, || {
        std::hint::black_box(bucket.take(Instant::now()));
    });
    let mut limiter = Limiter::new("n0", ExchangeTiming::default());
    limiter.set_limits(vec![spec(Per::All)]);
    let keys = limiter.keys_for("web", None, |_| None, "caller");
    let (core, core_rate) = time_calls(N, || {
        let _ = std::hint::black_box(limiter.decide(Instant::now(), &keys));
    });
    let shell = RateLimits::new("n0", ExchangeTiming::default());
    shell.set_limits_for_bench(vec![spec(Per::Header("x-user".into()))]);
    let users: Vec<String> = (0..1000).map(|i| format!("user-{i}")).collect();
    let mut i = 0;
    let (full, full_rate) = time_calls(N, || {
        i = (i + 1) % users.len();
        let u = users[i].as_str();
        let _ = std::hint::black_box(shell.check("web", None, |_| Some(u), "caller"));
    });
    println!("  {:<52} {:>6} {:>6} {:>14}", "", "p50 ns", "p99 ns", "decisions/s");
    for (name, lat, rate) in [
        ("empty timed call (timer overhead)", &timer, 0.0),
        ("bare token bucket (baseline)", &bare, bare_rate),
        ("limiter core, one global limit", &core, core_rate),
        ("request path: lock + keys + decide, 1000 header keys", &full, full_rate),
    ] {
        println!("  {name:<52} {:>6} {:>6} {:>14.0}", pct(lat, 0.5), pct(lat, 0.99), rate);
    }
    println!("  request path / bare bucket: {:.1}x the cost per decision", bare_rate / full_rate);
}

pub fn run(seeds: u64) {
    accuracy_table(seeds);
    reaction();
    bandwidth();
    decision_cost();
}
