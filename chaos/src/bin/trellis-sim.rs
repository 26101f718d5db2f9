//! `trellis-sim bench`: membership figures from the deterministic simulator, next to the
//! published anchors. Reproduce with
//! `cargo run --release -p trellis-chaos --bin trellis-sim -- bench`.

use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use trellis_chaos::sim::{Sim, SimConfig};
use trellis_node::membership::{MemberState, Profile};

#[derive(Parser)]
#[command(about = "Trellis membership simulator")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Join, detection, bandwidth and false positives at several cluster sizes.
    Bench {
        #[arg(long, value_delimiter = ',', default_value = "10,100,1000")]
        sizes: Vec<usize>,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long, value_enum, default_value = "lan")]
        profile: Profile,
        /// Simulated seconds at 5% loss for the false-positive count.
        #[arg(long, default_value_t = 600)]
        loss_secs: u64,
    },
}

struct Row {
    n: usize,
    converge: Option<Duration>,
    join: Option<Duration>,
    detect: Option<Duration>,
    bytes: f64,
    false_pos: usize,
    wall: Duration,
}

fn measure(n: usize, seed: u64, profile: Profile, loss_secs: u64) -> Row {
    let wall = Instant::now();
    let newcomer = n;
    let mut sim = Sim::new(SimConfig::new(n + 1, profile.timing(), seed));
    sim.crash(newcomer); // dormant until it joins below
    sim.join_all(0);
    let converge = sim.run_until(Duration::from_secs(120), Sim::all_converged_alive);
    sim.run_for(Duration::from_secs(10));
    sim.reset_counters();
    sim.run_for(Duration::from_secs(30));
    let bytes = sim.bytes_per_node_per_sec();

    sim.restart(newcomer, 0);
    let join = sim.run_until(Duration::from_secs(60), |s| s.fraction_knowing(newcomer, MemberState::Alive) >= 0.9999);
    sim.run_for(Duration::from_secs(5));
    let victim = n / 2;
    sim.crash(victim);
    let detect = sim.run_until(Duration::from_secs(120), |s| s.fraction_knowing(victim, MemberState::Down) >= 0.9999);

    sim.reset_counters();
    sim.set_loss(0.05);
    sim.run_for(Duration::from_secs(loss_secs));
    Row { n, converge, join, detect, bytes, false_pos: sim.false_downs(), wall: wall.elapsed() }
}

fn secs(d: Option<Duration>) -> String {
    d.map(|d| format!("{:.2} s", d.as_secs_f64())).unwrap_or_else(|| "never".into())
}

fn ratio(d: Option<Duration>, anchor: f64) -> String {
    d.map(|d| format!("{:.2}x", d.as_secs_f64() / anchor)).unwrap_or_else(|| "-".into())
}

fn main() {
    let Cmd::Bench { sizes, seed, profile, loss_secs } = Cli::parse().cmd;
    println!("trellis-sim bench: profile {profile:?}, seed {seed}, lossless 0.5-1 ms links unless noted");
    println!("| N | all-see-all after staggered joins | join known by 99.99% | vs Serf 2.2 s | crash down at 99.99% | vs memberlist 8 s | gossip B/s/node | vs scalecube 600 B/s | false downs, {loss_secs} s at 5% loss | wall time |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for n in sizes {
        let r = measure(n, seed, profile, loss_secs);
        println!(
            "| {} | {} | {} | {} | {} | {} | {:.0} | {:.2}x | {} | {:.1} s |",
            r.n,
            secs(r.converge),
            secs(r.join),
            ratio(r.join, 2.2),
            secs(r.detect),
            ratio(r.detect, 8.0),
            r.bytes,
            r.bytes / 600.0,
            r.false_pos,
            r.wall.as_secs_f64()
        );
    }
}
