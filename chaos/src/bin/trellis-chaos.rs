//! `trellis-chaos`: run a local cluster of real agents by hand, or measure membership on one.
//!
//! `trellis-chaos up --nodes 5` starts a cluster and reads commands from stdin
//! (`kill N`, `stop N`, `restart N`, `pause N`, `resume N`, `members N`, `quit`); it runs
//! until `quit` or Ctrl-C (which reaches the agents too: they share the terminal's process group).
//! `trellis-chaos bench-members --nodes 20` prints join, detection, bandwidth and
//! false-positive figures for real agents on loopback.

use std::io::BufRead;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use trellis_chaos::cluster::{Cluster, ClusterSpec};

#[derive(Parser)]
#[command(about = "Trellis cluster harness")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start a cluster and drive faults from stdin.
    Up {
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        #[arg(long, default_value = "fast")]
        profile: String,
    },
    /// Measure membership on real agents.
    BenchMembers {
        #[arg(long, default_value_t = 20)]
        nodes: usize,
        #[arg(long, default_value = "lan")]
        profile: String,
        /// Seconds of steady state for the bandwidth figure.
        #[arg(long, default_value_t = 20)]
        steady_secs: u64,
        /// Seconds of 5% loss for the false-positive figure.
        #[arg(long, default_value_t = 60)]
        loss_secs: u64,
        /// Each agent in its own network namespace; the loss is nftables dropping 5% of the
        /// UDP every namespace receives (needs root, `ip`, `nft`).
        #[arg(long)]
        netns: bool,
    },
    /// The data plane against a direct connection and HAProxy: fixed-rate latency,
    /// throughput, CPU, RSS, bulk TCP (chaos/bench-mesh.sh runs it).
    BenchMesh {
        /// Seconds per fixed-rate and throughput run.
        #[arg(long, default_value_t = 10.0)]
        secs: f64,
        /// Fixed rates, requests per second.
        #[arg(long, value_delimiter = ',', default_value = "1000,5000")]
        rates: Vec<f64>,
        /// MiB per bulk transfer.
        #[arg(long, default_value_t = 512)]
        bulk_mib: u64,
        /// Client connections held open for the RSS figure.
        #[arg(long, default_value_t = 1000)]
        open_conns: usize,
        /// Interleaved turns per path at each fixed rate.
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// Only these paths (direct, local, remote, logged, traced1, traced100, haproxy);
        /// prints the agents' pids, to attach a profiler.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        /// The phases to run: rates, unthrottled, idle (held connections' RSS), bulk, wan
        /// (bulk over --rtt-ms; needs an agent built with the fault-injection feature, and
        /// starts every agent with --fault-injection, so run it on its own).
        #[arg(long, value_delimiter = ',', default_value = "rates,unthrottled,idle,bulk")]
        phases: Vec<trellis_chaos::mesh_bench::Phase>,
        /// The round trip the wan phase puts between the two agents, in milliseconds.
        #[arg(long, default_value_t = 50)]
        rtt_ms: u64,
    },
    /// The DNS interface against dnsmasq (dnsperf, one core each), and how fast a dead
    /// instance leaves the answers.
    BenchDns {
        /// Seconds per run.
        #[arg(long, default_value_t = 5)]
        secs: u64,
        /// Queries per second of the latency runs.
        #[arg(long, default_value_t = 5000)]
        rate: u64,
        /// Interleaved turns per server.
        #[arg(long, default_value_t = 3)]
        reps: usize,
    },
    /// How long a canary failing 5% of its requests at 2 requests/s serves after its first
    /// error, against Flagger's and Argo Rollouts' documented rollback times.
    BenchRollback {
        #[arg(long, default_value_t = 3)]
        trials: usize,
    },
    /// An agent's RSS and fds idle, under client connection floods and a peer stream flood.
    BenchFlood {
        /// TCP connections held open against the proxy and the API (capped by `ulimit -n`).
        #[arg(long, default_value_t = 5000)]
        connections: usize,
        /// Slowloris connections (one header byte a second).
        #[arg(long, default_value_t = 1000)]
        slow: usize,
        /// Seconds of the peer stream flood.
        #[arg(long, default_value_t = 10)]
        stream_secs: u64,
    },
    /// Run a scenario: real agents, traffic, a fault timeline, invariants; exits 1 on a broken one.
    Run {
        /// Scenario files (see chaos/scenarios/); `all` runs the whole library.
        #[arg(required = true)]
        scenarios: Vec<String>,
        /// Seed for the random faults; a new one (printed) when omitted.
        #[arg(long)]
        seed: Option<u64>,
        /// Where reports and timelines go.
        #[arg(long, default_value = "chaos-reports")]
        out: std::path::PathBuf,
        /// Each agent in its own network namespace, faults made by the kernel (nftables drops,
        /// links down, whole-namespace freezes); needs root, `ip` and `nft`.
        #[arg(long)]
        netns: bool,
    },
    /// Measure policy propagation and catch-up on real agents.
    BenchPolicy {
        #[arg(long, default_value_t = 5)]
        nodes: usize,
        #[arg(long, default_value = "lan")]
        profile: String,
        /// Writes whose propagation is timed.
        #[arg(long, default_value_t = 100)]
        writes: usize,
        /// Objects a late joiner must catch up on.
        #[arg(long, default_value_t = 10_000)]
        catch_up: usize,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Up { nodes, profile } => up(nodes, profile),
        Cmd::BenchMembers { nodes, profile, steady_secs, loss_secs, netns } => {
            bench(nodes, profile, steady_secs, loss_secs, netns)
        }
        Cmd::BenchPolicy { nodes, profile, writes, catch_up } => bench_policy(nodes, profile, writes, catch_up),
        Cmd::BenchMesh { secs, rates, bulk_mib, open_conns, reps, only, phases, rtt_ms } => {
            let reps = reps.max(1);
            trellis_chaos::mesh_bench::run(trellis_chaos::mesh_bench::Options {
                secs,
                rates,
                bulk_mib,
                open_conns,
                reps,
                only,
                phases,
                rtt_ms,
            })
        }
        Cmd::BenchDns { secs, rate, reps } => {
            trellis_chaos::dns_bench::run(trellis_chaos::dns_bench::Options { secs, rate, reps: reps.max(1) })
        }
        Cmd::BenchRollback { trials } => trellis_chaos::rollout_bench::run(trials.max(1)),
        Cmd::BenchFlood { connections, slow, stream_secs } => {
            trellis_chaos::flood_bench::run(connections, slow, stream_secs)
        }
        Cmd::Run { scenarios, seed, out, netns } => {
            let mode = if netns { trellis_chaos::runner::Mode::Netns } else { trellis_chaos::runner::Mode::Agent };
            run_scenarios(&scenarios, seed, &out, mode)
        }
    }
}

fn run_scenarios(
    names: &[String],
    seed: Option<u64>,
    out: &std::path::Path,
    mode: trellis_chaos::runner::Mode,
) -> anyhow::Result<()> {
    use trellis_chaos::runner::{library, run, Scenario};
    let paths: Vec<std::path::PathBuf> =
        if names == ["all"] { library() } else { names.iter().map(std::path::PathBuf::from).collect() };
    let seed = seed.unwrap_or_else(rand::random);
    println!("seed {seed} (replay with --seed {seed})");
    let mut failed = Vec::new();
    for p in paths {
        let scenario = Scenario::load(&p)?;
        let report = run(&scenario, seed, &out.join(&scenario.name), mode)?;
        if !report.passed() {
            failed.push(scenario.name);
        }
    }
    if !failed.is_empty() {
        anyhow::bail!("broken invariants in: {}", failed.join(", "));
    }
    Ok(())
}

fn up(nodes: usize, profile: String) -> anyhow::Result<()> {
    let bin = trellis_chaos::cluster::try_trellis_bin()?;
    let mut c = Cluster::start(ClusterSpec { nodes, profile, ..Default::default() })?;
    println!("binary: {}", bin.display());
    println!("dir:    {}", c.root().display());
    for (i, n) in c.nodes().iter().enumerate() {
        println!("{i}: {} peer {} api http://{} log {}", n.name, n.peer_addr, n.api_addr, n.log_path.display());
    }
    println!("commands: kill N | stop N | restart N | pause N | resume N | members N | quit  (Ctrl-C also ends it)");
    // stdin on its own thread, so the cluster keeps running after stdin closes (`< /dev/null`, `&`).
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    loop {
        let line = match rx.recv_timeout(Duration::from_millis(500)) {
            Ok(line) => line,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => continue,
            // stdin is done; keep the cluster until Ctrl-C.
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => loop {
                std::thread::sleep(Duration::from_secs(3600));
            },
        };
        if !command(&mut c, &line) {
            break;
        }
    }
    // Dropping the cluster kills the agents and removes the temp dir.
    Ok(())
}

/// Runs one stdin command against the cluster; false on `quit`.
fn command(c: &mut Cluster, line: &str) -> bool {
    let mut words = line.split_whitespace();
    let (cmd, arg) = (words.next().unwrap_or(""), words.next().and_then(|w| w.parse::<usize>().ok()));
    let i = match (cmd, arg) {
        ("", _) => return true,
        ("quit" | "exit", _) => return false,
        (_, Some(i)) if i < c.len() => i,
        (_, Some(i)) => {
            println!("no node {i} (0..{})", c.len());
            return true;
        }
        _ => {
            println!("? kill N | stop N | restart N | pause N | resume N | members N | quit");
            return true;
        }
    };
    let done = match cmd {
        "kill" => {
            c.kill(i);
            Ok(())
        }
        "stop" => {
            c.stop(i);
            Ok(())
        }
        "restart" => c.restart(i),
        "pause" => {
            c.pause(i);
            Ok(())
        }
        "resume" => {
            c.resume(i);
            Ok(())
        }
        "members" => {
            match c.node(i).api().members() {
                Ok(members) => {
                    for m in members {
                        let field = |k: &str| m[k].as_str().unwrap_or("?").to_string();
                        let inc = &m["incarnation"];
                        println!("{:<12} {:<8} {:<22} inc {inc}", field("name"), field("state"), field("peer_addr"));
                    }
                }
                Err(e) => println!("members {}: {e:#}", c.node(i).name),
            }
            return true;
        }
        _ => {
            println!("? kill N | stop N | restart N | pause N | resume N | members N | quit");
            return true;
        }
    };
    match done {
        Ok(()) => println!("ok: {cmd} {} (pid {:?})", c.node(i).name, c.node(i).pid()),
        Err(e) => println!("{cmd} {}: {e:#}", c.node(i).name),
    }
    true
}

/// Sum of one counter over the given nodes.
fn total(c: &Cluster, nodes: &[usize], name: &str) -> f64 {
    nodes.iter().filter_map(|&i| c.node(i).api().get_text("/metrics").ok()).filter_map(|m| metric(&m, name)).sum()
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (k, v) = l.rsplit_once(' ')?;
        (k == name).then(|| v.parse().ok())?
    })
}

fn bench(n: usize, profile: String, steady: u64, loss: u64, netns: bool) -> anyhow::Result<()> {
    let all: Vec<usize> = (0..n).collect();
    let start = Instant::now();
    let mut c = Cluster::start(ClusterSpec { nodes: n, profile: profile.clone(), netns, ..Default::default() })?;
    let everyone: Vec<(String, &str)> = all.iter().map(|&i| (c.node(i).name.clone(), "alive")).collect();
    let formed = c.wait_all_see(&all, &everyone, Duration::from_secs(180))?;
    let place = if netns { "each in its own network namespace" } else { "on loopback" };
    println!("profile {profile}, {n} agents {place} (2-core machine)");
    println!(
        "cluster formed (all {n} see all alive) {:.2} s after the last agent answered, {:.1} s after launch",
        formed.as_secs_f64(),
        start.elapsed().as_secs_f64()
    );

    let before = total(&c, &all, "trellis_gossip_bytes_out_total");
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(steady));
    let after = total(&c, &all, "trellis_gossip_bytes_out_total");
    let bps = (after - before) / n as f64 / t0.elapsed().as_secs_f64();
    println!("steady-state gossip: {bps:.0} bytes/s per node sent (payload incl. envelope, excl. QUIC/UDP headers)");

    let joiner = c.add_node("joiner", &[c.node(0).peer_addr])?;
    let t = c.wait_all_see(&all, &[("joiner".into(), "alive")], Duration::from_secs(60))?;
    println!("join known by all {n}: {:.2} s (from the joiner's API answering)", t.as_secs_f64());

    c.kill(joiner);
    let t = c.wait_all_see(&all, &[("joiner".into(), "down")], Duration::from_secs(120))?;
    println!("kill -9 declared down by all {n}: {:.2} s", t.as_secs_f64());
    drop(c);

    // The loss: in the kernel (5% of the UDP each namespace receives), or by the agents.
    let extra_args = if netns { vec![] } else { vec!["--fault-drop-rate".into(), "0.05".into()] };
    let c =
        Cluster::start(ClusterSpec { nodes: n, profile: profile.clone(), extra_args, netns, ..Default::default() })?;
    c.wait_all_see(&all, &everyone, Duration::from_secs(180))?;
    if let Some(net) = c.net() {
        let five = trellis_chaos::netns::Rules { loss_from: [(None, 5)].into(), ..Default::default() };
        for i in 0..n {
            net.apply(i, &five)?;
        }
    }
    let s0 = total(&c, &all, "trellis_suspicions_raised_total");
    let mut downs = 0.0f64;
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(loss) {
        std::thread::sleep(Duration::from_secs(1));
        downs = downs.max(total(&c, &all, "trellis_members{state=\"down\"}"));
    }
    let s1 = total(&c, &all, "trellis_suspicions_raised_total");
    let what = if netns { "inbound peer packets dropped by nftables" } else { "outgoing peer messages" };
    println!(
        "5% loss of {what} for {loss} s: {} suspicions raised, max (viewer, member) pairs down at once: {downs}",
        s1 - s0
    );
    Ok(())
}

fn subset(k: usize) -> serde_json::Value {
    serde_json::json!({"service": "bench", "labels": {"version": format!("v{k}")}})
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Times from a PUT on one node until every node lists the object, via blocking reads.
fn bench_policy(n: usize, profile: String, writes: usize, catch_up: usize) -> anyhow::Result<()> {
    let all: Vec<usize> = (0..n).collect();
    let mut c = Cluster::start(ClusterSpec { nodes: n, profile: profile.clone(), ..Default::default() })?;
    let everyone: Vec<(String, &str)> = all.iter().map(|&i| (c.node(i).name.clone(), "alive")).collect();
    c.wait_all_see(&all, &everyone, Duration::from_secs(120))?;
    println!("profile {profile}, {n} agents on loopback (2-core machine), {writes} writes of one small object each");
    let gossip_before = total(&c, &all, "trellis_gossip_bytes_out_total");
    let mut all_seen = Vec::new();
    for k in 0..writes {
        let name = format!("w{k}");
        let writer = k % n;
        let t0 = Instant::now();
        let (s, body) = c.node(writer).api().put_json(&format!("/v1/policy/subsets/{name}"), &subset(k))?;
        anyhow::ensure!(s == 200, "PUT: {s} {body}");
        let apis: Vec<_> = all.iter().map(|&i| c.node(i).api()).collect();
        let seen: Vec<f64> = std::thread::scope(|scope| {
            let handles: Vec<_> = apis
                .iter()
                .map(|api| {
                    let name = name.clone();
                    scope.spawn(move || loop {
                        let v = api.get_json("/v1/policy/subsets?index=0&wait=0s").unwrap_or_default();
                        let has = v["objects"].as_array().is_some_and(|o| o.iter().any(|o| o["name"] == name.as_str()));
                        if has || t0.elapsed() > Duration::from_secs(10) {
                            return t0.elapsed().as_secs_f64() * 1000.0;
                        }
                        let index = v["index"].as_u64().unwrap_or(0);
                        let _ = api.get_json(&format!("/v1/policy/subsets?index={index}&wait=2s"));
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        all_seen.push(seen.iter().cloned().fold(0.0, f64::max));
        std::thread::sleep(Duration::from_millis(50));
    }
    let gossip_after = total(&c, &all, "trellis_gossip_bytes_out_total");
    all_seen.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "PUT -> visible on all {n}: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms (includes the writer's fsync and HTTP polling)",
        percentile(&all_seen, 0.5),
        percentile(&all_seen, 0.99),
        all_seen.last().unwrap()
    );
    println!(
        "gossip bytes sent cluster-wide during the writes: {:.0} per write (membership traffic included)",
        (gossip_after - gossip_before) / writes as f64
    );

    if catch_up > 0 {
        let t = Instant::now();
        let dir = c.root().join("bench-policy.toml");
        let mut text = String::new();
        for k in 0..catch_up {
            text += &format!("[subsets.c{k}]\nservice = \"bench\"\nlabels = {{ version = \"v{k}\" }}\n");
        }
        std::fs::write(&dir, text)?;
        let out = std::process::Command::new(trellis_chaos::cluster::try_trellis_bin()?)
            .args(["policy", "apply", "-f", dir.to_str().unwrap(), "--http-addr", &c.node(0).api_addr.to_string()])
            .stdout(std::process::Stdio::null())
            .output()?;
        anyhow::ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let writes_took = t.elapsed();
        let target =
            c.node(0).api().get_json("/v1/policy/subsets")?["objects"].as_array().map(|a| a.len()).unwrap_or(0);
        let seed = c.node(0).peer_addr;
        let t = Instant::now();
        let late = c.add_node("late", &[seed])?;
        let api_up = t.elapsed();
        let late_api = c.node(late).api();
        c.wait_until(Duration::from_secs(120), "late joiner catch-up", || {
            let v = late_api.get_json("/v1/policy/subsets").ok()?;
            (v["objects"].as_array()?.len() >= target).then_some(())
        })?;
        println!(
            "{catch_up} objects written one PUT each (fsync per write) in {:.1} s; a new node held all {target} {:.2} s after start ({:.2} s after its API answered)",
            writes_took.as_secs_f64(),
            t.elapsed().as_secs_f64(),
            (t.elapsed() - api_up).as_secs_f64()
        );
    }
    Ok(())
}
