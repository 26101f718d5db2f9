//! `trellis-chaos bench-mesh`: the data plane against a direct connection, in one run.
//! Three real agents; one HTTP server; requests go (a) straight to the server, (b) through
//! node 0's proxy to an instance on node 0, (c) through node 0's proxy over QUIC to an
//! instance on node 2. Each request opens a new client connection, on every path, so the
//! paths differ only by the mesh. Reproduce with
//! `cargo build --release && TRELLIS_BIN=target/release/trellis cargo run --release -p trellis-chaos -- bench-mesh`.

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::cluster::{Cluster, ClusterSpec};

/// A keep-nothing HTTP/1.1 server: one thread per connection, 200 with a 1 KiB body.
fn server() -> SocketAddr {
    crate::plain::serve(|_| (200, vec![b'x'; 1024]))
}

/// One GET; true when it got a 200 with the whole body.
fn get(to: SocketAddr, host: &str) -> bool {
    crate::plain::get(to, host, "/", &[], Duration::from_secs(10))
        .is_some_and(|r| r.status == 200 && r.body == [b'x'; 1024])
}

struct Run {
    p50: Duration,
    p99: Duration,
    rps: f64,
    errors: u64,
}

/// `n` sequential requests for latency, then `workers` concurrent loops for `secs`.
fn measure(to: SocketAddr, host: &str, n: usize, workers: usize, secs: u64) -> Run {
    let mut lat: Vec<Duration> = Vec::with_capacity(n);
    let mut errors = 0;
    for _ in 0..n {
        let t = Instant::now();
        errors += u64::from(!get(to, host));
        lat.push(t.elapsed());
    }
    lat.sort();
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + Duration::from_secs(secs);
    std::thread::scope(|s| {
        for _ in 0..workers {
            let (done, failed) = (done.clone(), failed.clone());
            s.spawn(move || {
                while Instant::now() < end {
                    if get(to, host) {
                        done.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    Run {
        p50: lat[n / 2],
        p99: lat[n * 99 / 100],
        rps: done.load(Ordering::Relaxed) as f64 / secs as f64,
        errors: errors + failed.load(Ordering::Relaxed),
    }
}

/// Latencies at a fixed rate: request k is due at k/rate; its latency counts from when it
/// was due, not from when a busy worker got to send it, so a stall shows in the tail
/// instead of hiding (coordinated omission).
fn fixed_rate(to: SocketAddr, host: &str, rate: f64, secs: u64, workers: usize) -> (Vec<Duration>, u64) {
    let total = (rate * secs as f64) as u64;
    let next = AtomicU64::new(0);
    let failed = AtomicU64::new(0);
    let t0 = Instant::now() + Duration::from_millis(50);
    let mut all: Vec<Duration> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..workers)
            .map(|_| {
                s.spawn(|| {
                    let mut lat = Vec::new();
                    loop {
                        let k = next.fetch_add(1, Ordering::Relaxed);
                        if k >= total {
                            return lat;
                        }
                        let due = t0 + Duration::from_secs_f64(k as f64 / rate);
                        if let Some(wait) = due.checked_duration_since(Instant::now()) {
                            std::thread::sleep(wait);
                        }
                        if !get(to, host) {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                        lat.push(due.elapsed());
                    }
                })
            })
            .collect();
        hs.into_iter().flat_map(|h| h.join().expect("worker")).collect()
    });
    all.sort();
    (all, failed.load(Ordering::Relaxed))
}

fn q(v: &[Duration], p: f64) -> f64 {
    v[((v.len() - 1) as f64 * p) as usize].as_secs_f64() * 1e6
}

/// CPU seconds (user + system) a process has used, from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<f64> = after.split_whitespace().filter_map(|x| x.parse().ok()).collect();
    // Fields after the command: state is not numeric, so utime and stime sit at 10 and 11.
    (f.get(10).copied().unwrap_or(0.0) + f.get(11).copied().unwrap_or(0.0)) / 100.0
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

pub fn run(n: usize, workers: usize, secs: u64) -> anyhow::Result<()> {
    let proxy: SocketAddr = {
        let l = TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?
    };
    let node_args = vec![vec!["--proxy".to_string(), proxy.to_string()]];
    let c = Cluster::start(ClusterSpec { nodes: 3, node_args, profile: "lan".into(), ..Default::default() })?;
    let all = [0, 1, 2];
    let alive: Vec<(String, &str)> = all.iter().map(|&i| (c.node(i).name.clone(), "alive")).collect();
    c.wait_all_see(&all, &alive, Duration::from_secs(20))?;
    let srv = server();
    for (node, service) in [(0, "local"), (2, "remote")] {
        let body = json!({"service": service, "address": "127.0.0.1", "port": srv.port()});
        let (s, v) = c.node(node).api().put_json(&format!("/v1/agent/services/{service}-1"), &body)?;
        anyhow::ensure!(s == 200, "register {service}: {v}");
    }
    c.wait_until(Duration::from_secs(10), "both instances on node 0", || {
        let v = c.node(0).api().get_json("/v1/catalog/services").ok()?;
        (v.get("local").is_some() && v.get("remote").is_some()).then_some(())
    })?;
    let pids: Vec<u32> = [0, 2].iter().filter_map(|&i| c.node(i).pid()).collect();
    for (i, pid) in [0, 2].iter().zip(&pids) {
        println!("node {i} RSS idle: {:.1} MiB", rss_mib(*pid));
    }
    println!("{n} sequential requests for latency, then {workers} concurrent clients for {secs} s; new connection per request");
    println!("{:<36} {:>9} {:>9} {:>10} {:>8} {:>16}", "path", "p50", "p99", "req/s", "errors", "agent CPU ms/req");
    let direct = measure(srv, "direct", n, workers, secs);
    let row = |name: &str, r: &Run, cpu: Option<f64>| {
        let cpu = cpu.map_or("-".to_string(), |c| format!("{c:.3}"));
        println!(
            "{name:<36} {:>7.0}µs {:>7.0}µs {:>10.0} {:>8} {:>16}",
            r.p50.as_secs_f64() * 1e6,
            r.p99.as_secs_f64() * 1e6,
            r.rps,
            r.errors,
            cpu
        );
    };
    row("direct to the server (baseline)", &direct, None);
    for (name, host) in
        [("proxy, instance on this node", "local"), ("proxy, instance on another node (QUIC)", "remote")]
    {
        let cpu0: f64 = pids.iter().map(|p| cpu_seconds(*p)).sum();
        let r = measure(proxy, host, n, workers, secs);
        let cpu = pids.iter().map(|p| cpu_seconds(*p)).sum::<f64>() - cpu0;
        let total = (n as f64 + r.rps * secs as f64).max(1.0);
        row(name, &r, Some(cpu * 1000.0 / total));
        println!(
            "{:<36} p50 {:.2}x, p99 {:.2}x, throughput {:.2}x of direct",
            "",
            r.p50.as_secs_f64() / direct.p50.as_secs_f64(),
            r.p99.as_secs_f64() / direct.p99.as_secs_f64(),
            r.rps / direct.rps
        );
    }
    for rate in [1000.0, 5000.0] {
        println!(
            "\nFixed rate {rate:.0} requests/s for {secs} s ({} senders), latency from the due time:",
            workers * 4
        );
        println!(
            "{:<36} {:>9} {:>9} {:>9} {:>8} {:>20}",
            "path", "p50", "p99", "p99.9", "errors", "agent cores/1000 rps"
        );
        let (d, derr) = fixed_rate(srv, "direct", rate, secs, workers * 4);
        println!(
            "{:<36} {:>7.0}µs {:>7.0}µs {:>7.0}µs {:>8} {:>20}",
            "direct (baseline)",
            q(&d, 0.5),
            q(&d, 0.99),
            q(&d, 0.999),
            derr,
            "-"
        );
        for (name, host) in [("proxy, instance on this node", "local"), ("proxy, instance on another node", "remote")] {
            let cpu0: f64 = pids.iter().map(|p| cpu_seconds(*p)).sum();
            let (m, err) = fixed_rate(proxy, host, rate, secs, workers * 4);
            let cores = (pids.iter().map(|p| cpu_seconds(*p)).sum::<f64>() - cpu0) / secs as f64 / (rate / 1000.0);
            println!(
                "{name:<36} {:>7.0}µs {:>7.0}µs {:>7.0}µs {:>8} {:>20.3}",
                q(&m, 0.5),
                q(&m, 0.99),
                q(&m, 0.999),
                err,
                cores
            );
            println!(
                "{:<36} added: p50 {:+.0}µs, p99 {:+.0}µs, p99.9 {:+.0}µs",
                "",
                q(&m, 0.5) - q(&d, 0.5),
                q(&m, 0.99) - q(&d, 0.99),
                q(&m, 0.999) - q(&d, 0.999)
            );
        }
    }
    for (i, pid) in [0, 2].iter().zip(&pids) {
        println!("node {i} RSS after the run: {:.1} MiB", rss_mib(*pid));
    }
    Ok(())
}
