//! `trellis-chaos bench-dns`: the agent's DNS interface against dnsmasq serving the same
//! records, in one run, measured by dnsperf (the usual DNS load generator). Both servers
//! are pinned to core 1 and dnsperf to core 0, so "on one core" holds for both. Turns
//! interleave; each figure is the median of the turns. Then an instance's node is killed
//! and the time until the answers drop it is set beside the time until the agent declares
//! the node down. Reproduce with `chaos/bench-dns.sh`.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::cluster::{Cluster, ClusterSpec};
use crate::dns_probe::{median, quantile, Probe};

/// The name asked and the instances behind it.
const NAME: &str = "web.service.trellis";
const ADDRS: [&str; 2] = ["127.0.10.1", "127.0.10.2"];

pub struct Options {
    pub secs: u64,
    /// Fixed rate of the latency runs, queries per second.
    pub rate: u64,
    pub reps: usize,
}

/// One turn's figures: unthrottled rate, and latencies at the fixed rate (µs).
#[derive(Default, Clone, Copy)]
struct Turn {
    qps: f64,
    p50: f64,
    p99: f64,
    lost: u64,
}

pub fn run(o: Options) -> anyhow::Result<()> {
    let dnsperf = which("dnsperf")?;
    let mut c = Cluster::start(ClusterSpec { nodes: 3, profile: "lan".into(), ..Default::default() })?;
    let all = [0, 1, 2];
    let alive: Vec<(String, &str)> = all.iter().map(|&i| (c.node(i).name.clone(), "alive")).collect();
    c.wait_all_see(&all, &alive, Duration::from_secs(30))?;
    for (node, id, ip) in [(1, "web-1", ADDRS[0]), (2, "web-2", ADDRS[1])] {
        let body = json!({"service": "web", "address": ip, "port": 8080});
        let (s, v) = c.node(node).api().put_json(&format!("/v1/agent/services/{id}"), &body)?;
        anyhow::ensure!(s == 200, "register {id}: {v}");
    }
    let me = c.node(0).api().get_json("/v1/agent/self")?;
    let trellis: SocketAddr = me["dns_addr"].as_str().ok_or_else(|| anyhow::anyhow!("node 0 has no DNS"))?.parse()?;
    c.wait_until(Duration::from_secs(10), "both instances in node 0's DNS", || {
        (answers(trellis).len() == 2).then_some(())
    })?;
    let agent = c.node(0).pid().ok_or_else(|| anyhow::anyhow!("node 0 has no pid"))?;
    crate::dns_probe::pin(agent, 1, true)?;
    let dnsmasq_addr = crate::procs::free("127.0.0.1")?;
    let _dnsmasq = Dnsmasq::start(dnsmasq_addr)?;
    anyhow::ensure!(answers(dnsmasq_addr).len() == 2, "dnsmasq does not answer both records");
    let queries = std::env::temp_dir().join(format!("trellis-dns-queries-{}", std::process::id()));
    std::fs::write(&queries, format!("{NAME} A\n"))?;
    println!(
        "machine: {} cores; servers pinned to core 1, dnsperf to core 0; `{NAME} A` ({} records); {} s per turn, {} interleaved turns, medians",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        ADDRS.len(),
        o.secs,
        o.reps
    );
    let servers = [("trellis agent (node 0 of 3)", trellis), ("dnsmasq 2.90", dnsmasq_addr)];
    let mut turns = vec![Vec::new(); servers.len()];
    for _ in 0..o.reps {
        for (i, (_, addr)) in servers.iter().enumerate() {
            let qps = dnsperf_run(&dnsperf, *addr, &queries, o.secs, None)?;
            let fixed = dnsperf_run(&dnsperf, *addr, &queries, o.secs, Some(o.rate))?;
            turns[i].push(Turn { qps: qps.qps, ..fixed });
        }
    }
    println!("{:<32} {:>10} {:>12} {:>12} {:>6}", "server", "qps", "p50 µs", "p99 µs", "lost");
    for ((name, _), t) in servers.iter().zip(&turns) {
        let lost: u64 = t.iter().map(|x| x.lost).sum();
        println!(
            "{name:<32} {:>10.0} {:>12.1} {:>12.1} {lost:>6}",
            median(t, |x| x.qps),
            median(t, |x| x.p50),
            median(t, |x| x.p99)
        );
    }
    println!(
        "trellis / dnsmasq: rate {:.2}x (target: at least 1.00), p99 {:.2}x; trellis p99 {:.1} µs at {} q/s (target: at most 50)",
        median(&turns[0], |x| x.qps) / median(&turns[1], |x| x.qps),
        median(&turns[0], |x| x.p99) / median(&turns[1], |x| x.p99),
        median(&turns[0], |x| x.p99),
        o.rate
    );
    probe_table(&o, &servers, &turns)?;
    // An instance's node dies: when do the answers drop it, against when node 0 declares it down?
    let killed = c.node(2).name.clone();
    let t0 = Instant::now();
    c.kill(2);
    let (mut gone, mut down) = (None, None);
    while t0.elapsed() < Duration::from_secs(60) && (gone.is_none() || down.is_none()) {
        if gone.is_none() && answers(trellis) == [ADDRS[0]] {
            gone = Some(t0.elapsed());
        }
        if down.is_none() && state_of(&c, &killed).as_deref() == Some("down") {
            down = Some(t0.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let s = |d: Option<Duration>| d.map_or("never (60 s)".into(), |d| format!("{:.2} s", d.as_secs_f64()));
    println!(
        "node {killed} killed: node 0 declared it down after {}, its instance left the DNS answers after {} (target: detection + 1 s at most)",
        s(down),
        s(gone)
    );
    let _ = std::fs::remove_file(&queries);
    Ok(())
}

/// The same servers at the same rate, read by the paced probe (one query at a time, from
/// core 0), with a bare UDP echo on core 1 as the floor: dnsperf's own cost puts its median
/// near 110 µs for any server here, so the 50 µs target is read from the probe.
fn probe_table(o: &Options, servers: &[(&str, SocketAddr)], dnsperf: &[Vec<Turn>]) -> anyhow::Result<()> {
    let echo = crate::dns_probe::echo(1)?;
    let mut all = vec![("udp echo (the probe's floor)", echo)];
    all.extend_from_slice(servers);
    let mut turns: Vec<Vec<Probe>> = all.iter().map(|_| Vec::new()).collect();
    for _ in 0..o.reps {
        for (i, (_, addr)) in all.iter().enumerate() {
            turns[i].push(crate::dns_probe::run(*addr, NAME, o.rate, o.secs, 0)?);
        }
    }
    let med = |t: &[Probe], q: f64| median(t, |p| p.pct(q));
    println!(
        "\npaced probe at {} q/s, one query at a time, latency from each query's due time, µs (medians of {} turns)",
        o.rate, o.reps
    );
    println!("{:<32} {:>10} {:>10} {:>10} {:>6}", "server", "p50", "p99", "p99.9", "lost");
    for ((name, _), t) in all.iter().zip(&turns) {
        let lost: u64 = t.iter().map(|p| p.lost).sum();
        println!("{name:<32} {:>10.1} {:>10.1} {:>10.1} {lost:>6}", med(t, 0.5), med(t, 0.99), med(t, 0.999));
    }
    let p50_dnsperf = |i: usize| median(&dnsperf[i], |t| t.p50);
    println!(
        "calibration: dnsmasq p50 {:.1} µs by dnsperf, {:.1} by the probe; trellis / dnsmasq p50 {:.2}x by dnsperf, {:.2}x by the probe",
        p50_dnsperf(1),
        med(&turns[2], 0.5),
        p50_dnsperf(0) / p50_dnsperf(1),
        med(&turns[1], 0.5) / med(&turns[2], 0.5)
    );
    println!(
        "trellis p99 {:.1} µs by the probe (target: at most 50), {:.2}x dnsmasq's {:.1}",
        med(&turns[1], 0.99),
        med(&turns[1], 0.99) / med(&turns[2], 0.99),
        med(&turns[2], 0.99)
    );
    Ok(())
}

/// The A records `server` answers for [`NAME`], sorted.
fn answers(server: SocketAddr) -> Vec<String> {
    use hickory_proto::rr::RecordType;
    let Ok(m) = trellis_node::client_dns::query(server, NAME, RecordType::A, false) else { return Vec::new() };
    let mut v: Vec<String> = m.answers.iter().map(|r| r.data.to_string()).collect();
    v.sort();
    v
}

fn state_of(c: &Cluster, name: &str) -> Option<String> {
    let v = c.node(0).api().get_json("/v1/members").ok()?;
    let m = v.as_array()?.iter().find(|m| m["name"] == name)?;
    m["state"].as_str().map(str::to_string)
}

/// One dnsperf run against `to`: unthrottled (100 queries outstanding) or at `rate` with
/// every query's latency printed (`-v`), from which the percentiles come.
fn dnsperf_run(
    bin: &str,
    to: SocketAddr,
    queries: &std::path::Path,
    secs: u64,
    rate: Option<u64>,
) -> anyhow::Result<Turn> {
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", "0", bin, "-s", &to.ip().to_string(), "-p", &to.port().to_string(), "-l", &secs.to_string()])
        .arg("-d")
        .arg(queries);
    if let Some(r) = rate {
        cmd.args(["-Q", &r.to_string(), "-v"]);
    }
    let out = cmd.stderr(Stdio::null()).output()?;
    anyhow::ensure!(out.status.success(), "dnsperf failed against {to}");
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |key: &str| -> f64 {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(key))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0.0)
    };
    let mut lat: Vec<f64> = text
        .lines()
        .filter(|l| l.starts_with("> "))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|s| s * 1e6)
        .collect();
    lat.sort_by(f64::total_cmp);
    let pct = |q: f64| quantile(&lat, q);
    Ok(Turn { qps: field("Queries per second:"), p50: pct(0.5), p99: pct(0.99), lost: field("Queries lost:") as u64 })
}

/// dnsmasq on `addr` (pinned to core 1), answering [`NAME`] with the same two records and
/// nothing else (no upstream, no hosts file, no cache of other names).
struct Dnsmasq(Child);

impl Dnsmasq {
    fn start(addr: SocketAddr) -> anyhow::Result<Dnsmasq> {
        let bin = which("dnsmasq")?;
        let mut cmd = Command::new("taskset");
        cmd.args([
            "-c",
            "1",
            &bin,
            "-k",
            "--bind-interfaces",
            "--no-resolv",
            "--no-hosts",
            "--pid-file=",
            "--user=root",
        ])
        .arg(format!("--listen-address={}", addr.ip()))
        .arg(format!("--port={}", addr.port()));
        for a in ADDRS {
            cmd.arg(format!("--host-record={NAME},{a}"));
        }
        let child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn()?;
        let d = Dnsmasq(child);
        let t0 = Instant::now();
        while answers(addr).is_empty() && t0.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(d)
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn which(bin: &str) -> anyhow::Result<String> {
    let out = Command::new("sh").args(["-c", &format!("command -v {bin}")]).output()?;
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    anyhow::ensure!(
        !path.is_empty(),
        "{bin} is not installed; chaos/bench-dns.sh installs it (apt-get install dnsperf dnsmasq-base)"
    );
    Ok(path)
}
