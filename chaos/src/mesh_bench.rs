//! `trellis-chaos bench-mesh`: the data plane against a direct connection and against
//! HAProxy, side by side in one run, measured by one calibrated generator (oha, open loop,
//! corrected for coordinated omission) against one real server (nginx, 1 KiB answers).
//! Paths: (a) direct to nginx; (b) node 0's proxy to an instance on node 0; (c) node 0's
//! proxy over QUIC mTLS to node 2's agent and its instance; (d) two HAProxy processes on
//! node 0's and node 2's addresses with mutual TLS between them (same certificates).
//! (e) and (f): as (c) with the access log on, and with spans on (nodes 3 and 4 export to an
//! OTLP receiver in this process) at 1% of new traces and at 100% (every request carries a
//! sampled `traceparent`).
//! The paths take interleaved turns; each figure is the median of the turns.
//! Reproduce with `chaos/bench-mesh.sh` (installs oha, nginx and HAProxy, builds release).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::cluster::{Cluster, ClusterSpec};
use crate::oha::{self, Load, Seen};
use crate::procs::{cpu_ns, rss_mib};

/// The answer's size, as in the calibration.
const BODY: usize = 1024;
/// Keep-alive connections of the fixed-rate runs (oha's `-c`) and of the throughput runs.
const RATE_CONNS: usize = 16;
const THROUGHPUT_CONNS: usize = 32;

struct Path {
    /// What `--only` selects it by.
    key: &'static str,
    name: &'static str,
    to: SocketAddr,
    host: &'static str,
    /// The proxy processes whose CPU this path costs (beyond oha and nginx).
    pids: Vec<u32>,
    /// Their CPU nanoseconds per second when idle, subtracted from a turn's.
    idle_ns_per_s: f64,
    /// A header every request carries.
    header: Option<&'static str>,
}

/// A sampled parent: every request through the traced agents is traced.
const SAMPLED: &str = "traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

/// Options of one run.
pub struct Options {
    pub secs: f64,
    pub rates: Vec<f64>,
    pub bulk_mib: u64,
    pub open_conns: usize,
    /// Interleaved turns each path takes per figure (at least 3 for a median).
    pub reps: usize,
    /// Only these paths (`direct`, `local`, `remote`, `logged`, `traced1`, `traced100`,
    /// `haproxy`), e.g. to attach a profiler to one. Empty runs every path.
    pub only: Vec<String>,
    pub phases: Vec<Phase>,
    /// The round trip of the wan phase.
    pub rtt_ms: u64,
}

/// A part of the benchmark, selectable so a profile or an A/B run takes only what it needs.
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum Phase {
    /// Latency and CPU at the fixed rates.
    Rates,
    /// Throughput with no rate set.
    Unthrottled,
    /// RSS of the client side holding idle client connections.
    Idle,
    /// One-way bulk TCP.
    Bulk,
    /// One-way bulk TCP through the mesh over a WAN's round trip (`rtt_ms`), delayed under
    /// QUIC by the agents' fault injection: needs a build with that feature.
    Wan,
}

/// One turn of one path: what oha saw, and the proxies' CPU per request.
#[derive(Clone, Default)]
struct Turn {
    seen: Seen,
    cpu_us_per_req: f64,
}

pub fn run(o: Options) -> anyhow::Result<()> {
    let oha_bin = oha::find()?;
    let proxy = crate::procs::free("127.0.0.1")?;
    let bulk_listen = crate::procs::free("127.0.0.1")?;
    // Both agents log the `logged` service's requests (a JSON line per request to a file), and
    // nothing else: the `logged` path costs what access logging costs.
    let logs = Scratch(std::env::temp_dir().join(format!("trellis-bench-logs-{}", std::process::id())));
    std::fs::create_dir_all(&logs.0)?;
    let logs = &logs.0;
    let config = |n: usize| -> anyhow::Result<String> {
        let path = logs.join(format!("node{n}.toml"));
        let log = logs.join(format!("access-{n}.log"));
        std::fs::write(
            &path,
            format!("[access_log]\npath = {:?}\nservices = [\"logged\"]\n", log.display().to_string()),
        )?;
        Ok(path.display().to_string())
    };
    let mut node0 = vec!["--proxy".into(), proxy.to_string(), "--upstream".into(), format!("bulk={bulk_listen}")];
    node0.extend(["--config".to_string(), config(0)?]);
    let node2 = vec!["--config".to_string(), config(2)?];
    // Nodes 3 and 4 export spans of 1% of new traces (and of every sampled one) to `otlp`.
    let otlp = crate::otlp::Receiver::counting();
    let traces = logs.join("traces.toml");
    std::fs::write(&traces, format!("[traces]\nendpoint = \"http://{}\"\nsample = 0.01\n", otlp.addr))?;
    let traced_proxy = crate::procs::free("127.0.0.1")?;
    let node3 = vec!["--proxy".into(), traced_proxy.to_string(), "--config".into(), traces.display().to_string()];
    let node4 = vec!["--config".to_string(), traces.display().to_string()];
    let node_args = vec![node0, vec![], node2, node3, node4];
    // The wan phase delays datagrams through the agents' fault control.
    let extra_args = if o.phases.contains(&Phase::Wan) { vec!["--fault-injection".into()] } else { vec![] };
    let spec = ClusterSpec { nodes: 5, node_args, profile: "lan".into(), extra_args, ..Default::default() };
    let c = Cluster::start(spec)?;
    let all = [0, 1, 2, 3, 4];
    let alive: Vec<(String, &str)> = all.iter().map(|&i| (c.node(i).name.clone(), "alive")).collect();
    c.wait_all_see(&all, &alive, Duration::from_secs(20))?;
    let nginx = crate::nginx::start(&c.root().join("nginx"), "127.0.0.1", BODY)?;
    let srv = nginx.addr;
    let sink = crate::loadgen::serve_sink("127.0.0.1");
    for (node, id, body) in [
        (0, "local-1", json!({"service": "local", "address": "127.0.0.1", "port": srv.port()})),
        (2, "remote-1", json!({"service": "remote", "address": "127.0.0.1", "port": srv.port()})),
        (2, "logged-1", json!({"service": "logged", "address": "127.0.0.1", "port": srv.port()})),
        (2, "bulk-1", json!({"service": "bulk", "address": "127.0.0.1", "port": sink.port(), "protocol": "tcp"})),
        (4, "traced-1", json!({"service": "traced", "address": "127.0.0.1", "port": srv.port()})),
    ] {
        let (s, v) = c.node(node).api().put_json(&format!("/v1/agent/services/{id}"), &body)?;
        anyhow::ensure!(s == 200, "register {id}: {v}");
    }
    c.wait_until(Duration::from_secs(10), "instances on nodes 0 and 3", || {
        let v = c.node(0).api().get_json("/v1/catalog/services").ok()?;
        let w = c.node(3).api().get_json("/v1/catalog/services").ok()?;
        let all = ["local", "remote", "logged", "bulk"].iter().all(|s| v.get(s).is_some());
        (all && w.get("traced").is_some()).then_some(())
    })?;
    let agents: Vec<u32> = [0, 2].iter().filter_map(|&i| c.node(i).pid()).collect();
    let traced: Vec<u32> = [3, 4].iter().filter_map(|&i| c.node(i).pid()).collect();
    let (a_ip, b_ip) = (c.node(0).peer_addr.ip().to_string(), c.node(2).peer_addr.ip().to_string());
    let hap = crate::haproxy::start(
        &c.root().join("haproxy"),
        (&a_ip, &c.node(0).tls_dir),
        (&b_ip, &c.node(2).tls_dir),
        srv,
        sink,
    )?;
    println!(
        "machine: {} cores; generator {} {}; instance nginx ({BODY} B answers); {} s per turn, {} interleaved turns per figure, medians",
        cores(),
        oha_bin.display(),
        oha::VERSION,
        o.secs,
        o.reps
    );
    println!(
        "idle RSS MiB: trellis node 0 + node 2 = {}; haproxy client + server side = {}",
        rss_of(&agents),
        rss_of(&hap.pids())
    );
    let paths = [
        ("direct", "direct to nginx (baseline)", srv, "direct", vec![], None),
        ("local", "trellis, instance on this node", proxy, "local", agents[..1].to_vec(), None),
        ("remote", "trellis two-hop QUIC mTLS", proxy, "remote", agents.clone(), None),
        ("logged", "trellis two-hop, access log on", proxy, "logged", agents.clone(), None),
        ("traced1", "trellis two-hop, spans at 1%", traced_proxy, "traced", traced.clone(), None),
        ("traced100", "trellis two-hop, spans at 100%", traced_proxy, "traced", traced.clone(), Some(SAMPLED)),
        ("haproxy", "haproxy two-hop TLS 1.3 mTLS", hap.http, "remote", hap.pids(), None),
    ];
    let mut paths: Vec<Path> = paths
        .into_iter()
        .filter(|p| o.only.is_empty() || o.only.iter().any(|n| n == p.0))
        .map(|(key, name, to, host, pids, header)| Path { key, name, to, host, pids, idle_ns_per_s: 0.0, header })
        .collect();
    if !o.only.is_empty() {
        println!("agent pids: {}", agents.iter().map(u32::to_string).collect::<Vec<_>>().join(","));
    }
    for p in &paths {
        let warm =
            oha::run(&oha_bin, &Load { to: p.to, host: p.host, rate: None, conns: 4, secs: 1.0, header: p.header })?;
        anyhow::ensure!(warm.errors == 0 && warm.ok > 0, "{}: {} errors while warming up", p.name, warm.errors);
    }
    idle_cost(&mut paths, Duration::from_secs(3));
    let rates = if o.phases.contains(&Phase::Rates) { &o.rates[..] } else { &[] };
    for &rate in rates {
        println!(
            "\nfixed rate {rate:.0} req/s (oha -q {rate:.0} -c {RATE_CONNS} --latency-correction), µs; CPU of the proxies, idle cost subtracted"
        );
        let turns = interleaved(
            &o,
            &paths,
            |p| Load { to: p.to, host: p.host, rate: Some(rate), conns: RATE_CONNS, secs: o.secs, header: p.header },
            &oha_bin,
        )?;
        print_rate_table(&paths, &turns);
    }
    if o.phases.contains(&Phase::Unthrottled) {
        println!("\nunthrottled: oha -c {THROUGHPUT_CONNS}, no rate, {} s per turn", o.secs);
        let turns = interleaved(
            &o,
            &paths,
            |p| Load { to: p.to, host: p.host, rate: None, conns: THROUGHPUT_CONNS, secs: o.secs, header: p.header },
            &oha_bin,
        )?;
        print_throughput(&paths, &turns);
    }
    if o.phases.contains(&Phase::Idle) {
        open_connections(&o, &paths, &agents, &hap.pids())?;
    }
    if o.phases.contains(&Phase::Bulk) {
        bulk(&o, sink, bulk_listen, hap.tcp)?;
    }
    if o.phases.contains(&Phase::Wan) {
        wan(&o, &c, bulk_listen)?;
    }
    println!("\nRSS MiB after the run: trellis {}; haproxy {}", rss_of(&agents), rss_of(&hap.pids()));
    println!("spans received by the OTLP receiver: {}", otlp.count());
    Ok(())
}

/// The bench's config and access-log files, removed however the run ends.
struct Scratch(std::path::PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Each path's processes' CPU while nothing is sent: gossip, health checks, timers.
fn idle_cost(paths: &mut [Path], over: Duration) {
    let before: Vec<u64> = paths.iter().map(|p| cpu_of(&p.pids)).collect();
    let t0 = Instant::now();
    std::thread::sleep(over);
    let secs = t0.elapsed().as_secs_f64();
    for (p, b) in paths.iter_mut().zip(before) {
        p.idle_ns_per_s = (cpu_of(&p.pids) - b) as f64 / secs;
    }
}

/// `reps` rounds in which every path takes one turn of `load`: a slow stretch of the
/// shared machine falls on all paths rather than on one. turns[path][rep].
fn interleaved(
    o: &Options,
    paths: &[Path],
    load: impl Fn(&Path) -> Load<'_>,
    bin: &std::path::Path,
) -> anyhow::Result<Vec<Vec<Turn>>> {
    let mut turns = vec![Vec::new(); paths.len()];
    for _ in 0..o.reps {
        for (i, p) in paths.iter().enumerate() {
            let (cpu0, t0) = (cpu_of(&p.pids), Instant::now());
            let seen = oha::run(bin, &load(p))?;
            let busy = (cpu_of(&p.pids) - cpu0) as f64 - p.idle_ns_per_s * t0.elapsed().as_secs_f64();
            let cpu_us_per_req = busy.max(0.0) / 1e3 / seen.ok.max(1) as f64;
            turns[i].push(Turn { seen, cpu_us_per_req });
        }
    }
    Ok(turns)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn med(turns: &[Turn], f: impl Fn(&Turn) -> f64) -> f64 {
    median(turns.iter().map(f).collect())
}

fn print_rate_table(paths: &[Path], turns: &[Vec<Turn>]) {
    println!(
        "{:<32} {:>6} {:>6} {:>7} {:>10} {:>10} {:>11} {:>10} {:>9} {:>7}",
        "path", "p50", "p99", "p99.9", "added p50", "added p99", "CPU µs/req", "cores/1k/s", "oha cores", "errors"
    );
    let base = paths.iter().position(|p| p.key == "direct");
    for (p, t) in paths.iter().zip(turns) {
        let (p50, p99) = (med(t, |x| x.seen.p50), med(t, |x| x.seen.p99));
        // Added latency: each turn against the direct path's turn of the same round.
        let added = |f: fn(&Seen) -> f64| match base {
            Some(b) if p.key != "direct" => {
                let v = median(t.iter().zip(&turns[b]).map(|(x, d)| f(&x.seen) - f(&d.seen)).collect());
                format!("{v:+.0}")
            }
            _ => "-".into(),
        };
        let cpu = med(t, |x| x.cpu_us_per_req);
        let secs: f64 = t.iter().map(|x| x.seen.ok as f64 / x.seen.rps.max(1e-9)).sum();
        let oha_cores = t.iter().map(|x| x.seen.generator_cpu).sum::<f64>() / secs.max(1e-9);
        let errors: u64 = t.iter().map(|x| x.seen.errors).sum();
        let (cpu_s, cores) = if p.pids.is_empty() {
            ("-".into(), "-".into())
        } else {
            (format!("{cpu:.1}"), format!("{:.3}", cpu / 1e3))
        };
        println!(
            "{:<32} {p50:>6.0} {p99:>6.0} {:>7.0} {:>10} {:>10} {cpu_s:>11} {cores:>10} {oha_cores:>9.2} {errors:>7}",
            p.name,
            med(t, |x| x.seen.p999),
            added(|s| s.p50),
            added(|s| s.p99),
        );
    }
    ratio_to_haproxy(paths, turns);
}

/// Trellis' two-hop figures over HAProxy's, the targets (at most 1.0).
fn ratio_to_haproxy(paths: &[Path], turns: &[Vec<Turn>]) {
    let at = |k: &str| paths.iter().position(|p| p.key == k);
    let (Some(d), Some(r), Some(h)) = (at("direct"), at("remote"), at("haproxy")) else { return };
    let added = |i: usize, f: fn(&Seen) -> f64| {
        median(turns[i].iter().zip(&turns[d]).map(|(x, b)| f(&x.seen) - f(&b.seen)).collect())
    };
    let cpu = |i: usize| med(&turns[i], |x| x.cpu_us_per_req);
    println!(
        "trellis / haproxy: added p50 {:.2}x, added p99 {:.2}x, CPU per request {:.2}x (target: at most 1.00)",
        added(r, |s| s.p50) / added(h, |s| s.p50),
        added(r, |s| s.p99) / added(h, |s| s.p99),
        cpu(r) / cpu(h)
    );
    for (key, what) in [("logged", "access log on"), ("traced1", "spans at 1%"), ("traced100", "spans at 100%")] {
        let Some(l) = at(key) else { continue };
        println!(
            "{what} / off: added p50 {:.2}x, added p99 {:.2}x, CPU per request {:.2}x",
            added(l, |s| s.p50) / added(r, |s| s.p50),
            added(l, |s| s.p99) / added(r, |s| s.p99),
            cpu(l) / cpu(r)
        );
    }
}

fn print_throughput(paths: &[Path], turns: &[Vec<Turn>]) {
    let rps: Vec<f64> = turns.iter().map(|t| med(t, |x| x.seen.rps)).collect();
    let direct = paths.iter().position(|p| p.key == "direct").map_or(f64::NAN, |i| rps[i]);
    for ((p, t), r) in paths.iter().zip(turns).zip(&rps) {
        let secs: f64 = t.iter().map(|x| x.seen.ok as f64 / x.seen.rps.max(1e-9)).sum();
        let oha_cores = t.iter().map(|x| x.seen.generator_cpu).sum::<f64>() / secs.max(1e-9);
        let errors: u64 = t.iter().map(|x| x.seen.errors).sum();
        println!(
            "{:<32} {r:>8.0} req/s  {:.2}x direct  CPU {:.1} µs/req  oha {oha_cores:.2} cores  {errors} errors",
            p.name,
            r / direct,
            med(t, |x| x.cpu_us_per_req)
        );
    }
    if let (Some(r), Some(h)) =
        (paths.iter().position(|p| p.key == "remote"), paths.iter().position(|p| p.key == "haproxy"))
    {
        println!("trellis / haproxy throughput: {:.2}x (target: at least 1.00)", rps[r] / rps[h]);
        for (key, what) in [("logged", "access log on"), ("traced1", "spans at 1%"), ("traced100", "spans at 100%")] {
            if let Some(l) = paths.iter().position(|p| p.key == key) {
                println!("{what} / off throughput: {:.2}x", rps[l] / rps[r]);
            }
        }
    }
}

/// RSS of the client-side proxy with many idle client connections held open.
fn open_connections(o: &Options, paths: &[Path], agents: &[u32], hap: &[u32]) -> anyhow::Result<()> {
    println!("\n{} idle client connections (each made one request, then held)", o.open_conns);
    let (mut growth, mut held_rss) = (Vec::new(), Vec::new());
    for (key, pid) in [("remote", agents[0]), ("haproxy", hap[0])] {
        let Some(p) = paths.iter().find(|p| p.key == key) else { continue };
        let before = rss_mib(pid);
        let mut held = Vec::with_capacity(o.open_conns);
        for _ in 0..o.open_conns {
            let mut conn = crate::loadgen::Conn::new(p.to, p.host, &[]);
            conn.call().map_err(|e| anyhow::anyhow!("{}: opening connection {}: {e}", p.name, held.len()))?;
            held.push(conn);
        }
        std::thread::sleep(Duration::from_millis(500));
        let after = rss_mib(pid);
        let per_conn_kb = (after - before) * 1024.0 / o.open_conns as f64;
        println!("{:<32} client side RSS {before:.1} -> {after:.1} MiB ({per_conn_kb:.1} KiB per connection)", p.name);
        growth.push(after - before);
        held_rss.push(after);
    }
    if let ([t, h], [tr, hr]) = (&growth[..], &held_rss[..]) {
        println!("trellis / haproxy RSS holding them: {:.2}x (target: at most 1.50); growth {:.2}x", tr / hr, t / h);
    }
    Ok(())
}

/// One-way bulk TCP through each path, interleaved turns, medians.
fn bulk(o: &Options, sink: SocketAddr, trellis: SocketAddr, haproxy: SocketAddr) -> anyhow::Result<()> {
    println!("\nbulk TCP: {} MiB one way, counted by the far end, median of {} turns", o.bulk_mib, o.reps);
    let bytes = o.bulk_mib * 1024 * 1024;
    let ways = [("direct (baseline)", sink), ("trellis two-hop QUIC mTLS", trellis), ("haproxy two-hop TLS", haproxy)];
    let mut rates = vec![Vec::new(); ways.len()];
    for _ in 0..o.reps {
        for (i, (_, to)) in ways.iter().enumerate() {
            rates[i].push(crate::loadgen::bulk(*to, bytes)?);
        }
    }
    let m: Vec<f64> = rates.into_iter().map(median).collect();
    for ((name, _), r) in ways.iter().zip(&m) {
        println!("{name:<32} {r:>8.0} MiB/s  {:.2}x direct", r / m[0]);
    }
    println!("trellis / haproxy bulk: {:.2}x (target: at least 1.00)", m[1] / m[2]);
    Ok(())
}

/// Bulk TCP through the mesh with each agent holding its datagrams for half of `rtt_ms`.
/// HAProxy's TCP cannot be delayed on this kernel (no netem), so the figure stands beside
/// the bound one QUIC stream's receive window sets: window / RTT.
fn wan(o: &Options, c: &Cluster, trellis: SocketAddr) -> anyhow::Result<()> {
    let set = |ms: u64| -> anyhow::Result<()> {
        for i in [0, 2] {
            let (s, v) = c.node(i).api().post_json("/v1/fault", &json!({ "packet_delay_ms": ms }))?;
            anyhow::ensure!(
                s == 200,
                "packet delay on node {i} (is the agent built with --features fault-injection?): {v}"
            );
        }
        Ok(())
    };
    let window = trellis_node::limits::Limits::default().stream_receive_window as f64 / (1024.0 * 1024.0);
    let bound = window / (o.rtt_ms.max(1) as f64 / 1000.0);
    println!(
        "\nbulk TCP over a {} ms round trip (delayed under QUIC by both agents): {} MiB one way, median of {} turns",
        o.rtt_ms, o.bulk_mib, o.reps
    );
    set(o.rtt_ms / 2)?;
    let mut rates = Vec::new();
    for _ in 0..o.reps {
        rates.push(crate::loadgen::bulk(trellis, o.bulk_mib * 1024 * 1024)?);
    }
    set(0)?;
    println!(
        "trellis two-hop QUIC mTLS        {:>8.0} MiB/s  (one stream's {window:.2} MiB window allows {bound:.0} MiB/s)",
        median(rates)
    );
    Ok(())
}

fn cpu_of(pids: &[u32]) -> u64 {
    pids.iter().map(|&p| cpu_ns(p)).sum()
}

fn rss_of(pids: &[u32]) -> String {
    pids.iter().map(|p| format!("{:.1}", rss_mib(*p))).collect::<Vec<_>>().join(" + ")
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}
