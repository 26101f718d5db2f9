//! `trellis-chaos bench-mesh`: the data plane against a direct connection and against
//! HAProxy, side by side in one run. Three real agents; one keep-alive HTTP server
//! answering 1 KiB to 1 KiB POSTs; four paths to it:
//! (a) direct; (b) node 0's proxy to an instance on node 0; (c) node 0's proxy over QUIC
//! mTLS to node 2's agent and its instance (client, agent, QUIC, agent, server); (d) two
//! HAProxy instances on node 0's and node 2's addresses with mutual TLS between them
//! (same certificates). Clients keep their connections open, as real callers do.
//! Reproduce with `chaos/bench-mesh.sh` (installs HAProxy, builds release, runs this).

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::json;

use crate::cluster::{Cluster, ClusterSpec};
use crate::loadgen::{self, Conn, RateRun};

const BODY: usize = 1024;

struct Path {
    /// What `--only` selects it by.
    key: &'static str,
    name: &'static str,
    to: SocketAddr,
    host: &'static str,
    /// Processes whose CPU this path costs (beyond client and server).
    pids: Vec<u32>,
}

/// CPU seconds processes used, in user space and in the kernel.
#[derive(Clone, Copy, Default)]
struct Cpu {
    user: f64,
    system: f64,
}

impl Cpu {
    fn total(self) -> f64 {
        self.user + self.system
    }

    fn minus(self, o: Cpu) -> Cpu {
        Cpu { user: self.user - o.user, system: self.system - o.system }
    }

    fn plus(self, o: Cpu) -> Cpu {
        Cpu { user: self.user + o.user, system: self.system + o.system }
    }
}

/// CPU seconds a process has used, from /proc.
fn cpu_seconds(pid: u32) -> Cpu {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<f64> = after.split_whitespace().filter_map(|x| x.parse().ok()).collect();
    // Fields after the command: state is not numeric, so utime and stime sit at 10 and 11.
    let at = |i: usize| f.get(i).copied().unwrap_or(0.0) / 100.0;
    Cpu { user: at(10), system: at(11) }
}

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    kb / 1024.0
}

fn cpu_of(pids: &[u32]) -> Cpu {
    pids.iter().fold(Cpu::default(), |sum, p| sum.plus(cpu_seconds(*p)))
}

fn rss_of(pids: &[u32]) -> String {
    pids.iter().map(|p| format!("{:.1}", rss_mib(*p))).collect::<Vec<_>>().join(" + ")
}

/// Options of one run.
pub struct Options {
    pub secs: f64,
    pub rates: Vec<f64>,
    pub bulk_mib: u64,
    pub open_conns: usize,
    /// Turns each path takes per fixed rate (the run's seconds are split among them).
    pub reps: usize,
    /// Only the fixed-rate runs, and only these paths (`direct`, `local`, `remote`,
    /// `haproxy`, `relay`): for attaching a profiler to one path. Empty runs everything.
    pub only: Vec<String>,
}

pub fn run(o: Options) -> anyhow::Result<()> {
    let proxy = crate::procs::free("127.0.0.1")?;
    let bulk_listen = crate::procs::free("127.0.0.1")?;
    let node0 = vec!["--proxy".into(), proxy.to_string(), "--upstream".into(), format!("bulk={bulk_listen}")];
    let c =
        Cluster::start(ClusterSpec { nodes: 3, node_args: vec![node0], profile: "lan".into(), ..Default::default() })?;
    let all = [0, 1, 2];
    let alive: Vec<(String, &str)> = all.iter().map(|&i| (c.node(i).name.clone(), "alive")).collect();
    c.wait_all_see(&all, &alive, Duration::from_secs(20))?;
    let srv = loadgen::serve_keepalive("127.0.0.1", BODY);
    let sink = loadgen::serve_sink("127.0.0.1");
    for (node, id, body) in [
        (0, "local-1", json!({"service": "local", "address": "127.0.0.1", "port": srv.port()})),
        (2, "remote-1", json!({"service": "remote", "address": "127.0.0.1", "port": srv.port()})),
        (2, "bulk-1", json!({"service": "bulk", "address": "127.0.0.1", "port": sink.port(), "protocol": "tcp"})),
    ] {
        let (s, v) = c.node(node).api().put_json(&format!("/v1/agent/services/{id}"), &body)?;
        anyhow::ensure!(s == 200, "register {id}: {v}");
    }
    c.wait_until(Duration::from_secs(10), "instances on node 0", || {
        let v = c.node(0).api().get_json("/v1/catalog/services").ok()?;
        ["local", "remote", "bulk"].iter().all(|s| v.get(s).is_some()).then_some(())
    })?;
    let agents: Vec<u32> = [0, 2].iter().filter_map(|&i| c.node(i).pid()).collect();
    let (a_ip, b_ip) = (c.node(0).peer_addr.ip().to_string(), c.node(2).peer_addr.ip().to_string());
    let hap = crate::haproxy::start(
        &c.root().join("haproxy"),
        (&a_ip, &c.node(0).tls_dir),
        (&b_ip, &c.node(2).tls_dir),
        srv,
        sink,
    )?;
    let relays = crate::relay::TwoRelays::start(&a_ip, &b_ip, srv)?;
    let bulk_relays = crate::relay::TwoRelays::start(&a_ip, &b_ip, sink)?;
    println!("machine: {} cores; {} s per fixed-rate run; {BODY} B request and response bodies", cores(), o.secs);
    println!(
        "idle RSS MiB: trellis node 0 + node 2 = {}; haproxy client + server side = {}",
        rss_of(&agents),
        rss_of(&hap.pids())
    );
    let paths = [
        Path { key: "direct", name: "direct (baseline)", to: srv, host: "direct", pids: vec![] },
        Path {
            key: "local",
            name: "trellis, instance on this node",
            to: proxy,
            host: "local",
            pids: agents[..1].to_vec(),
        },
        Path { key: "remote", name: "trellis, other node over QUIC", to: proxy, host: "remote", pids: agents.clone() },
        Path { key: "haproxy", name: "haproxy two-hop mTLS", to: hap.http, host: "remote", pids: hap.pids() },
        Path {
            key: "relay",
            name: "floor: two plain TCP relays",
            to: relays.entry,
            host: "relay",
            pids: relays.pids(),
        },
    ];
    let paths: Vec<Path> =
        paths.into_iter().filter(|p| o.only.is_empty() || o.only.iter().any(|n| n == p.key)).collect();
    if !o.only.is_empty() {
        println!("agent pids: {}", agents.iter().map(u32::to_string).collect::<Vec<_>>().join(","));
    }
    let body = vec![b'b'; BODY];
    for p in &paths {
        let (_, errors) = loadgen::closed_loop(p.to, p.host, &body, 1.0, 4);
        anyhow::ensure!(errors == 0, "{}: {errors} errors while warming up", p.name);
    }
    for &rate in &o.rates {
        let conns = ((rate / 100.0) as usize).max(16);
        println!(
            "\nfixed rate {rate:.0} req/s, {} s per path in {} interleaved turns, over {conns} keep-alive connections; latency from the due time (µs)",
            o.secs, o.reps
        );
        println!(
            "{:<32} {:>7} {:>7} {:>7} {:>8} {:>8} {:>8} {:>7} {:>12}",
            "path", "p50", "p90", "p99", "p99.9", "p99.99", "max", "errors", "cores/1krps"
        );
        // The paths take turns, `reps` slices each, so a slow stretch of the shared machine
        // falls on all of them rather than on one; each path's slices are merged.
        let mut runs: Vec<(RateRun, Cpu)> = Vec::new();
        let mut quic = [0.0; 5];
        for rep in 0..o.reps {
            for (i, p) in paths.iter().enumerate() {
                // Node 0's QUIC counters are read around the QUIC path's turns only.
                let over_quic = p.key == "remote";
                let q0 = if over_quic { quic_counts(&c) } else { [0.0; 5] };
                let cpu0 = cpu_of(&p.pids);
                let r = loadgen::fixed_rate(p.to, p.host, &body, rate, o.secs / o.reps as f64, conns);
                let cpu = cpu_of(&p.pids).minus(cpu0);
                if over_quic {
                    let q1 = quic_counts(&c);
                    for k in 0..5 {
                        quic[k] += (q1[k] - q0[k]) / r.hist.len().max(1) as f64;
                    }
                }
                if rep == 0 {
                    runs.push((r, cpu));
                } else {
                    runs[i].0.merge(&r);
                    runs[i].1 = runs[i].1.plus(cpu);
                }
            }
        }
        let q = quic.map(|v| v / o.reps as f64);
        if paths.iter().any(|p| p.key == "remote") {
            println!(
            "QUIC on node 0 per request over QUIC: datagrams out {:.2}, in {:.2}; send calls {:.2}, receive calls {:.2}; ACK frames out {:.2}",
            q[0], q[1], q[2], q[3], q[4]
            );
        }
        for (p, (r, cpu)) in paths.iter().zip(&runs) {
            let cores = cpu.total() / r.took.as_secs_f64() / (rate / 1000.0);
            let user = cpu.user / cpu.total().max(1e-9);
            println!(
                "{:<32} {:>7.0} {:>7.0} {:>7.0} {:>8.0} {:>8.0} {:>8.0} {:>7} {:>12}",
                p.name,
                r.us(0.5),
                r.us(0.9),
                r.us(0.99),
                r.us(0.999),
                r.us(0.9999),
                r.hist.max() as f64,
                r.errors,
                if p.pids.is_empty() { "-".to_string() } else { format!("{cores:.3} ({:.0}% user)", user * 100.0) }
            );
            // Added latency is against the direct path, when `--only` kept it.
            if p.key != "direct" && paths[0].key == "direct" {
                let b = &runs[0].0;
                println!(
                    "{:<32} added: p50 {:+.0} µs, p99 {:+.0} µs, p99.9 {:+.0} µs",
                    "",
                    r.us(0.5) - b.us(0.5),
                    r.us(0.99) - b.us(0.99),
                    r.us(0.999) - b.us(0.999)
                );
            }
        }
    }
    if !o.only.is_empty() {
        return Ok(());
    }
    println!("\nmaximum throughput: 32 connections back to back for {} s", o.secs);
    let mut direct_rps = 0.0;
    for p in &paths {
        let (rps, errors) = loadgen::closed_loop(p.to, p.host, &body, o.secs, 32);
        if p.pids.is_empty() {
            direct_rps = rps;
        }
        println!("{:<32} {rps:>9.0} req/s  {:.2}x direct  ({errors} errors)", p.name, rps / direct_rps);
    }
    println!("\n{} open client connections (each made one request, then held)", o.open_conns);
    for p in &paths[2..] {
        let mut held = Vec::with_capacity(o.open_conns);
        for _ in 0..o.open_conns {
            let mut conn = Conn::new(p.to, p.host, &body);
            conn.call().map_err(|e| anyhow::anyhow!("{}: opening connection {}: {e}", p.name, held.len()))?;
            held.push(conn);
        }
        std::thread::sleep(Duration::from_millis(500));
        println!("{:<32} RSS MiB {}", p.name, rss_of(&p.pids));
    }
    println!("\nbulk TCP: {} MiB one way, counted by the far end", o.bulk_mib);
    let bytes = o.bulk_mib * 1024 * 1024;
    let direct = loadgen::bulk(sink, bytes)?;
    println!("{:<32} {direct:>8.0} MiB/s", "direct (baseline)");
    for (name, to) in [
        ("trellis, other node over QUIC", bulk_listen),
        ("haproxy two-hop mTLS", hap.tcp),
        ("floor: two plain TCP relays", bulk_relays.entry),
    ] {
        let r = loadgen::bulk(to, bytes)?;
        println!("{name:<32} {r:>8.0} MiB/s  {:.2}x direct", r / direct);
    }
    println!("\nRSS MiB after the run: trellis {}; haproxy {}", rss_of(&agents), rss_of(&hap.pids()));
    Ok(())
}

/// Node 0's QUIC counters: datagrams out and in, send and receive calls, ACK frames out.
fn quic_counts(c: &Cluster) -> [f64; 5] {
    let text = c.node(0).api().get_text("/metrics").unwrap_or_default();
    let get = |name: &str, dir: &str| {
        let key = format!("{name}{{direction=\"{dir}\"}} ");
        text.lines().find_map(|l| l.strip_prefix(&key)).and_then(|v| v.trim().parse().ok()).unwrap_or(0.0)
    };
    [
        get("trellis_quic_udp_datagrams_total", "out"),
        get("trellis_quic_udp_datagrams_total", "in"),
        get("trellis_quic_udp_ios_total", "out"),
        get("trellis_quic_udp_ios_total", "in"),
        get("trellis_quic_ack_frames_total", "out"),
    ]
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}
