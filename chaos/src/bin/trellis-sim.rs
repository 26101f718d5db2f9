//! `trellis-sim bench`: membership figures from the deterministic simulator, next to the
//! published anchors. Reproduce with
//! `cargo run --release -p trellis-chaos --bin trellis-sim -- bench`.

use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use trellis_chaos::sim::{Sim, SimConfig};
use trellis_core::membership::{MemberState, Profile, Timing};

#[derive(Parser)]
#[command(about = "Trellis membership simulator")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Join, crash detection, bandwidth and false positives at several cluster sizes.
    Bench {
        #[arg(long, value_delimiter = ',', default_value = "10,100,1000")]
        sizes: Vec<usize>,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[command(flatten)]
        timing: TimingArgs,
        /// Simulated seconds at `--loss` for the false-positive count.
        #[arg(long, default_value_t = 600)]
        loss_secs: u64,
        #[arg(long, default_value_t = 0.05)]
        loss: f64,
        /// Joins and crashes measured per cluster size (the table shows median and worst).
        #[arg(long, default_value_t = 5)]
        trials: usize,
    },
    /// False downs over many seeds: one line per seed that had any.
    Sweep {
        #[arg(long, default_value_t = 50)]
        nodes: usize,
        #[arg(long, default_value_t = 0.10)]
        loss: f64,
        /// Seeds 1..=SEEDS.
        #[arg(long, default_value_t = 40)]
        seeds: u64,
        #[arg(long, default_value_t = 600)]
        secs: u64,
        #[command(flatten)]
        timing: TimingArgs,
    },
    /// Cluster-wide rate limiting: accuracy, reaction, bandwidth and decision cost.
    BenchRatelimit {
        #[arg(long, default_value_t = 5)]
        seeds: u64,
    },
    /// Mesh-wide stats at scale: bytes per node per interval, and a `stat` answer's time.
    BenchStats {
        #[arg(long, default_value_t = 1000)]
        nodes: usize,
        #[arg(long, default_value_t = 100)]
        services: usize,
        /// Services each node calls.
        #[arg(long, default_value_t = 5)]
        calls: usize,
        #[arg(long, default_value_t = 6)]
        intervals: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Policy propagation by gossip at 1% loss.
    BenchPolicy {
        #[arg(long, value_delimiter = ',', default_value = "100,1000")]
        sizes: Vec<usize>,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long, default_value_t = 100)]
        writes: usize,
    },
}

/// A timing profile, with any knob overridden to try a change without a rebuild.
#[derive(Args)]
struct TimingArgs {
    #[arg(long, value_enum, default_value = "lan")]
    profile: Profile,
    #[arg(long, value_name = "MS")]
    probe_period_ms: Option<u64>,
    #[arg(long, value_name = "MS")]
    probe_rtt_ms: Option<u64>,
    #[arg(long, value_name = "MS")]
    suspect_to_down_ms: Option<u64>,
}

impl TimingArgs {
    fn timing(&self) -> Timing {
        let mut t = self.profile.timing();
        let ms = Duration::from_millis;
        t.probe_period = self.probe_period_ms.map_or(t.probe_period, ms);
        t.probe_rtt = self.probe_rtt_ms.map_or(t.probe_rtt, ms);
        t.suspect_to_down_after = self.suspect_to_down_ms.map_or(t.suspect_to_down_after, ms);
        if let Err(e) = t.validate() {
            eprintln!("{e}");
            std::process::exit(2);
        }
        t
    }

    fn describe(&self) -> String {
        let t = self.timing();
        let changed =
            self.probe_period_ms.is_some() || self.probe_rtt_ms.is_some() || self.suspect_to_down_ms.is_some();
        format!(
            "profile {:?}{} (probe {:?}, rtt {:?}, suspicion {:?}, gossip {:?} x{})",
            self.profile,
            if changed { " with overrides" } else { "" },
            t.probe_period,
            t.probe_rtt,
            t.suspect_to_down_after,
            t.gossip_interval,
            t.gossip_fanout
        )
    }
}

/// Published figures we hold ourselves against.
mod anchor {
    /// Serf's convergence model: a change known by 99.99% of 1000 nodes in 2.2 s.
    pub const SERF_CONVERGE_S: f64 = 2.2;
    /// memberlist: a failed node is declared dead in 8 to 12 s.
    pub const MEMBERLIST_DETECT_S: (f64, f64) = (8.0, 12.0);
    /// scalecube-cluster: 0.6 to 1.1 KB/s of gossip per node.
    pub const SCALECUBE_BYTES: (f64, f64) = (600.0, 1100.0);
}

/// What Trellis membership aims for.
mod target {
    pub const DETECT_S: f64 = 8.0;
    pub const CONVERGE_S: f64 = 3.0;
    pub const BYTES_UP_TO_200: f64 = 1000.0;
}

struct Row {
    n: usize,
    /// After the last of N staggered joins: 99.99% of pairs, then every pair, see each other alive.
    all_see_all: Option<(Duration, Duration)>,
    /// One time per trial; None where the trial never got there.
    joins: Vec<Option<Duration>>,
    detects: Vec<Option<Duration>>,
    bytes: f64,
    false_downs: usize,
    suspicions: u64,
    wall: Duration,
}

const SHARE: f64 = 0.9999;
fn measure(n: usize, seed: u64, timing: &Timing, (loss, loss_secs): (f64, u64), trials: usize) -> Row {
    let wall = Instant::now();
    let mut sim = Sim::new(SimConfig::new(n, timing.clone(), seed));
    sim.join_all(0);
    let most_see_most = sim.run_until(Duration::from_secs(300), |s| s.alive_pair_fraction() >= SHARE);
    let all_see_all = sim.run_until(Duration::from_secs(300), Sim::all_converged_alive);
    let all_see_all = most_see_most.zip(all_see_all).map(|(a, b)| (a, a + b));

    // Steady state: nothing changes, so this is the cost of probing and periodic gossip.
    // Let the join wave's piggybacked updates drain before measuring steady state.
    sim.run_for(Duration::from_secs(60));
    sim.reset_counters();
    sim.run_for(Duration::from_secs(30));
    let bytes = sim.bytes_per_node_per_sec();

    let mut joins = Vec::new();
    for _ in 0..trials {
        let newcomer = sim.add_node();
        joins.push(
            sim.run_until(Duration::from_secs(120), |s| s.fraction_knowing(newcomer, MemberState::Alive) >= SHARE),
        );
        sim.run_for(Duration::from_secs(10));
    }

    // Each crash hits a cluster that has converged again after the previous one.
    let mut detects = Vec::new();
    for k in 0..trials {
        let victim = 1 + k * (n - 1) / trials;
        sim.crash(victim);
        detects
            .push(sim.run_until(Duration::from_secs(300), |s| s.fraction_knowing(victim, MemberState::Down) >= SHARE));
        sim.restart(victim);
        sim.run_until(Duration::from_secs(120), Sim::all_converged_alive);
        sim.run_for(Duration::from_secs(10));
    }

    sim.reset_counters();
    let before = sim.total_stats().suspicions_raised;
    sim.set_loss(loss);
    sim.run_for(Duration::from_secs(loss_secs));
    Row {
        n,
        all_see_all,
        joins,
        detects,
        bytes,
        false_downs: sim.false_downs(),
        suspicions: sim.total_stats().suspicions_raised - before,
        wall: wall.elapsed(),
    }
}

/// Median and worst of the trials, in seconds; a trial that never finished is infinite.
fn median_max(times: &[Option<Duration>]) -> (f64, f64) {
    let mut s: Vec<f64> = times.iter().map(|d| d.map_or(f64::INFINITY, |d| d.as_secs_f64())).collect();
    s.sort_by(f64::total_cmp);
    (s[s.len() / 2], s[s.len() - 1])
}

fn spread(times: &[Option<Duration>]) -> String {
    let (med, max) = median_max(times);
    format!("{med:.2} s ({max:.2} s)")
}

/// Our figure over an anchor range, as "a-b x" (a single anchor gives one number).
fn ratio(ours: Option<f64>, (lo, hi): (f64, f64)) -> String {
    match ours {
        None => "-".into(),
        Some(x) if lo == hi => format!("{:.2}x", x / lo),
        Some(x) => format!("{:.2}-{:.2}x", x / hi, x / lo),
    }
}

fn bench(sizes: Vec<usize>, seed: u64, timing: &TimingArgs, (loss, loss_secs): (f64, u64), trials: usize) {
    let t = timing.timing();
    println!("trellis-sim bench: {}, seed {seed}", timing.describe());
    println!("links 0.5-1 ms one way, lossless except the last column; 'at 99.99%' = of the other live nodes");
    println!("join and crash: median (worst) of {trials} trials; ratios on the median");
    println!();
    println!(
        "| N | N staggered joins: 99.99% / all pairs see each other | one join known at 99.99% | vs Serf | crash Down at 99.99% | vs memberlist | gossip B/s per node | vs scalecube | false downs, {loss_secs} s at {:.0}% loss (suspicions) | wall |",
        loss * 100.0
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    println!(
        "| anchor | | {:.1} s (Serf, N=1000) | 1x | {:.0}-{:.0} s (memberlist) | 1x | {:.0}-{:.0} (scalecube) | 1x | 0 | |",
        anchor::SERF_CONVERGE_S,
        anchor::MEMBERLIST_DETECT_S.0,
        anchor::MEMBERLIST_DETECT_S.1,
        anchor::SCALECUBE_BYTES.0,
        anchor::SCALECUBE_BYTES.1
    );
    let mut rows = Vec::new();
    for n in sizes {
        let r = measure(n, seed, &t, (loss, loss_secs), trials);
        let (join, _) = median_max(&r.joins);
        let (detect, _) = median_max(&r.detects);
        println!(
            "| {} | {} | {} | {} | {} | {} | {:.0} | {} | {} ({}) | {:.1} s |",
            r.n,
            r.all_see_all.map_or("never".into(), |(most, all)| format!(
                "{:.2} s / {:.2} s",
                most.as_secs_f64(),
                all.as_secs_f64()
            )),
            spread(&r.joins),
            ratio(join.is_finite().then_some(join), (anchor::SERF_CONVERGE_S, anchor::SERF_CONVERGE_S)),
            spread(&r.detects),
            ratio(detect.is_finite().then_some(detect), anchor::MEMBERLIST_DETECT_S),
            r.bytes,
            ratio(Some(r.bytes), anchor::SCALECUBE_BYTES),
            r.false_downs,
            r.suspicions,
            r.wall.as_secs_f64()
        );
        rows.push(r);
    }
    println!();
    println!("targets, on the worst of {trials} trials: detection < {} s, join known everywhere < {} s, <= {} B/s per node up to N = 200, no false downs", target::DETECT_S, target::CONVERGE_S, target::BYTES_UP_TO_200);
    for r in &rows {
        let mut missed = Vec::new();
        let (_, detect) = median_max(&r.detects);
        let (_, join) = median_max(&r.joins);
        if detect >= target::DETECT_S {
            missed.push(format!("detection {detect:.2} s >= {} s", target::DETECT_S));
        }
        if join >= target::CONVERGE_S {
            missed.push(format!("join convergence {join:.2} s >= {} s", target::CONVERGE_S));
        }
        if r.n <= 200 && r.bytes > target::BYTES_UP_TO_200 {
            missed.push(format!("{:.0} B/s per node > {} B/s", r.bytes, target::BYTES_UP_TO_200));
        }
        if r.false_downs > 0 {
            missed.push(format!("{} false downs", r.false_downs));
        }
        let verdict = if missed.is_empty() { "all targets met".to_string() } else { missed.join("; ") };
        println!("N = {}: {verdict}", r.n);
    }
}

fn sweep(n: usize, loss: f64, seeds: u64, secs: u64, timing: &TimingArgs) {
    println!(
        "trellis-sim sweep: {n} nodes, {}, {secs} s at {:.0}% loss, seeds 1..={seeds}",
        timing.describe(),
        loss * 100.0
    );
    let t = timing.timing();
    let mut bad = 0;
    let (mut suspicions, mut refuted) = (0, 0);
    for seed in 1..=seeds {
        let mut sim = Sim::new(SimConfig::new(n, t.clone(), seed));
        sim.join_all(0);
        if sim.run_until(Duration::from_secs(300), Sim::all_converged_alive).is_none() {
            println!("seed {seed}: never converged");
            continue;
        }
        sim.reset_counters();
        let before = sim.total_stats();
        sim.set_loss(loss);
        sim.run_for(Duration::from_secs(secs));
        let after = sim.total_stats();
        suspicions += after.suspicions_raised - before.suspicions_raised;
        refuted += after.suspicions_refuted - before.suspicions_refuted;
        if let (Some(first), Some(last)) = (sim.false_down_log().first(), sim.false_down_log().last()) {
            bad += 1;
            println!(
                "seed {seed}: {} false downs, first n{} declared n{}#{} down at {:.1} s, last at {:.1} s",
                sim.false_downs(),
                first.viewer,
                first.subject,
                first.generation,
                first.at.as_secs_f64(),
                last.at.as_secs_f64()
            );
        }
    }
    println!("{bad} of {seeds} seeds had false downs; {suspicions} suspicions raised, {refuted} refuted");
}

fn bench_policy(sizes: Vec<usize>, seed: u64, writes: usize) {
    println!("trellis-sim bench-policy: LAN profile, seed {seed}, 1% loss, {writes} writes on random nodes, gossip only (no anti-entropy)");
    println!("| N | PUT -> on all, p50 | p99 | max | writes that missed a node | wall time |");
    println!("|---|---|---|---|---|---|");
    for n in sizes {
        let wall = Instant::now();
        let mut sim = Sim::new(SimConfig { policy: true, ..SimConfig::new(n, Profile::Lan.timing(), seed) });
        sim.join_all(0);
        sim.run_until(Duration::from_secs(120), Sim::all_converged_alive);
        sim.set_loss(0.01);
        let mut all = Vec::new();
        let mut missed = 0;
        for k in 0..writes {
            let writer = (k * 7919 + 13) % n;
            let name = format!("w{k}");
            sim.write_policy(writer, &name);
            sim.run_for(Duration::from_secs(5));
            let d = sim.policy_delays(writer, &name);
            if d.iter().any(Option::is_none) {
                missed += 1;
            }
            all.push(d.into_iter().flatten().max().unwrap_or_default().as_secs_f64() * 1000.0);
        }
        all.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let p = |q: f64| all[((all.len() - 1) as f64 * q).round() as usize];
        println!(
            "| {n} | {:.0} ms | {:.0} ms | {:.0} ms | {missed} | {:.1} s |",
            p(0.5),
            p(0.99),
            all.last().unwrap(),
            wall.elapsed().as_secs_f64()
        );
    }
}

fn main() {
    match Cli::parse().cmd {
        Cmd::Bench { sizes, seed, timing, loss_secs, loss, trials } => {
            bench(sizes, seed, &timing, (loss, loss_secs), trials.max(1))
        }
        Cmd::Sweep { nodes, loss, seeds, secs, timing } => sweep(nodes, loss, seeds, secs, &timing),
        Cmd::BenchPolicy { sizes, seed, writes } => bench_policy(sizes, seed, writes),
        Cmd::BenchRatelimit { seeds } => trellis_chaos::ratelimit_bench::run(seeds),
        Cmd::BenchStats { nodes, services, calls, intervals, seed } => {
            trellis_chaos::stats_bench::run(&trellis_chaos::stats_bench::Shape {
                nodes,
                services,
                calls,
                instances: 3,
                // The LAN and WAN profiles' stats interval.
                interval: Duration::from_secs(10),
                intervals,
                requests: 200,
                one_way: (Duration::from_micros(200), Duration::from_micros(2000)),
                seed,
            })
        }
    }
}
