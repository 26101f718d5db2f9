//! `trellis-chaos run SCENARIO.toml`: a real cluster, real traffic, a timeline of faults, and
//! invariants checked at the end, reported as a summary, JSON and an SVG timeline.
//!
//! Node 0 carries the client traffic (its proxy listener) and is never faulted, so the
//! success rate measures what the mesh does about the other nodes' faults. Every run has a
//! seed: random faults and the nodes policy writes go to come from it, so a seed replays the
//! same fault schedule.

pub mod history;
mod soak;
mod timeline;

use std::collections::{BTreeSet, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::cluster::{Cluster, ClusterSpec};
use crate::http::Api;
use crate::netns;
use crate::plain;
use history::{Kind, Op, Outcome};
use trellis_core::policy::store::Version;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    #[serde(default = "four")]
    pub nodes: usize,
    #[serde(with = "humantime_serde")]
    pub duration: Duration,
    /// Quiet time after the last fault, before the invariants are checked.
    #[serde(default = "ten_secs", with = "humantime_serde")]
    pub settle: Duration,
    #[serde(default = "fast")]
    pub profile: String,
    #[serde(default)]
    pub workload: Workload,
    #[serde(default)]
    pub faults: Vec<Fault>,
    #[serde(default)]
    pub random: Option<RandomFaults>,
    #[serde(default)]
    pub invariants: Invariants,
    /// When set, every node's RSS, open fds, tasks and QUIC connections are sampled this
    /// often (for soaks: `resources.csv`, `resources.svg` and an RSS fit in the report).
    #[serde(default, with = "humantime_serde")]
    pub sample_every: Option<Duration>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Workload {
    pub http_rps: f64,
    pub policy_writes_per_sec: f64,
    /// A cluster-wide limit on the `limited` service (0: none), and the load each node's
    /// proxy offers it.
    pub limit_rps: f64,
    pub limited_rps_per_node: f64,
}

impl Default for Workload {
    fn default() -> Self {
        Workload { http_rps: 40.0, policy_writes_per_sec: 2.0, limit_rps: 30.0, limited_rps_per_node: 20.0 }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    Kill,
    Restart,
    Pause,
    Resume,
    Partition,
    OneWay,
    Loss,
    /// Adds `delay_ms` to every peer message the nodes send.
    Delay,
    Heal,
    Wipe,
    Join,
    /// Cut off from everyone: in namespace mode the node's link goes down (the harness loses
    /// it too), else the agent drops every peer.
    Isolate,
    /// Everything arriving on one port (`port`, UDP and TCP) is dropped: namespace mode only
    /// (the peer port cuts the node off its peers while its API and proxy still answer).
    BlockPort,
    /// The agent answers policy writes 200 and stores nothing: a deliberately broken node,
    /// so the history checker's failure can be seen (not in the library).
    DropWrites,
}

/// Where faults happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Agents on loopback addresses; partitions, loss and isolation by the agents' own
    /// fault control (`--fault-injection`).
    Agent,
    /// Each agent in its own network namespace on a bridge; partitions, loss and isolation
    /// by nftables and link state in the kernel, freezes of the whole namespace.
    Netns,
}

/// Policy objects the workload writes and reads: few, so writes on different nodes
/// overwrite each other and the merge rule decides.
const KEYS: usize = 6;
/// Every agent's proxy listener port, on the agent's own address.
const PROXY_PORT: u16 = 18080;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    #[serde(with = "humantime_serde")]
    pub at: Duration,
    pub kind: FaultKind,
    /// The nodes it hits (for partitions: one side; the rest is the other side).
    #[serde(default)]
    pub nodes: Vec<usize>,
    /// For `loss`: the share of peer packets dropped.
    #[serde(default)]
    pub rate: Option<f64>,
    /// For `delay`: milliseconds added to each peer message.
    #[serde(default)]
    pub delay_ms: Option<u64>,
    /// For `block_port`: the port whose inbound packets (UDP and TCP) the nodes drop.
    #[serde(default)]
    pub port: Option<u16>,
}

/// Faults drawn from the seed: one every `every`, of the given kinds, on random nodes
/// other than node 0; a kill or pause is undone `every / 2` later.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RandomFaults {
    #[serde(with = "humantime_serde")]
    pub every: Duration,
    pub kinds: Vec<FaultKind>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Invariants {
    pub min_success: f64,
    #[serde(with = "humantime_serde")]
    pub membership_bound: Duration,
    #[serde(with = "humantime_serde")]
    pub policy_bound: Duration,
    pub max_rss_mib: f64,
    /// The most RSS may grow per hour, from a least-squares fit of each node's run after a
    /// warm-up of a tenth of the duration; judged on runs covering half the duration or more.
    pub max_rss_growth_mib_per_hour: Option<f64>,
}

impl Default for Invariants {
    fn default() -> Self {
        Invariants {
            min_success: 0.999,
            membership_bound: Duration::from_secs(20),
            policy_bound: Duration::from_secs(20),
            max_rss_mib: 200.0,
            max_rss_growth_mib_per_hour: None,
        }
    }
}

fn four() -> usize {
    4
}
fn ten_secs() -> Duration {
    Duration::from_secs(10)
}
fn fast() -> String {
    "fast".into()
}

impl Scenario {
    pub fn load(path: &Path) -> anyhow::Result<Scenario> {
        let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let s: Scenario = toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.message()))?;
        anyhow::ensure!(s.nodes >= 2, "{}: nodes: at least 2 (node 0 carries the traffic)", path.display());
        for f in &s.faults {
            if let Some(n) = f.nodes.iter().find(|n| f.kind != FaultKind::Join && (**n == 0 || **n >= s.nodes)) {
                anyhow::bail!("{}: faults: node {n} cannot be faulted (node 0 carries the traffic)", path.display());
            }
        }
        Ok(s)
    }

    /// The whole fault schedule: the listed faults and the seeded random ones, by time.
    pub fn schedule(&self, seed: u64) -> Vec<Fault> {
        let mut all = self.faults.clone();
        if let Some(r) = &self.random {
            let mut rng = SmallRng::seed_from_u64(seed);
            let mut t = r.every;
            while t + r.every / 2 < self.duration && !r.kinds.is_empty() {
                let kind = r.kinds[rng.random_range(0..r.kinds.len())];
                let nodes = vec![rng.random_range(1..self.nodes)];
                let port = Some(crate::cluster::PEER_PORT);
                all.push(Fault { at: t, kind, nodes: nodes.clone(), rate: Some(0.1), delay_ms: Some(100), port });
                let undo = match kind {
                    FaultKind::Kill | FaultKind::Wipe => Some(FaultKind::Restart),
                    FaultKind::Pause => Some(FaultKind::Resume),
                    FaultKind::Partition
                    | FaultKind::OneWay
                    | FaultKind::Loss
                    | FaultKind::Delay
                    | FaultKind::Isolate
                    | FaultKind::BlockPort
                    | FaultKind::DropWrites => Some(FaultKind::Heal),
                    _ => None,
                };
                if let Some(undo) = undo {
                    all.push(Fault { at: t + r.every / 2, kind: undo, nodes, rate: None, delay_ms: None, port: None });
                }
                t += r.every;
            }
        }
        all.sort_by_key(|f| f.at);
        all
    }
}

/// One request's outcome.
#[derive(Debug, Clone, Copy, Serialize)]
struct Sample {
    at_ms: u64,
    ok: bool,
    wrong: bool,
    latency_us: u64,
}

/// A failed request or a complete answer with the wrong content: what was asked and what
/// came back (the status and body of a failure, or "no answer").
#[derive(Debug, Clone, Serialize)]
pub struct WrongAnswer {
    pub at_ms: u64,
    pub path: String,
    pub body: String,
}

#[derive(Debug, Serialize)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub scenario: String,
    pub seed: u64,
    pub nodes: usize,
    pub duration_s: f64,
    pub schedule: Vec<Fault>,
    pub requests: usize,
    pub succeeded: usize,
    pub wrong: usize,
    /// The first failed requests and wrong answers, for diagnosis.
    pub wrong_answers: Vec<WrongAnswer>,
    pub writes_acked: usize,
    pub membership_converged_s: Option<f64>,
    pub policy_converged_s: Option<f64>,
    pub max_rss_mib: f64,
    /// RSS growth per node run, when resources were sampled.
    pub rss_growth: Vec<soak::Growth>,
    pub checks: Vec<Check>,
    /// Per second: (second, success rate, p99 latency in ms, members node 0 sees alive).
    pub timeline: Vec<(u64, f64, f64, usize)>,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.ok)
    }
}

/// An HTTP server that answers `<name> <path>`, so a wrong answer is seen.
fn echo_server(ip: std::net::Ipv4Addr, name: String) -> SocketAddr {
    plain::serve_at(ip, move |head| (200, format!("{name} {}", plain::path_of(head)).into_bytes()))
}

/// The status of one GET through a proxy, or None when the proxy could not be reached.
fn status_of(proxy: SocketAddr, host: &str) -> Option<u16> {
    plain::get(proxy, host, "/", &[], Duration::from_secs(5)).map(|r| r.status)
}

/// The documented bound: a side of a partition may admit its share, and a majority side the
/// whole limit, so the cluster never admits more than 1.5 times the limit in any second,
/// plus the burst; over the whole run, the limit within 10%.
fn judge_limit(mut r: Report, limit: f64, admitted: &[u64]) -> Report {
    if limit <= 0.0 {
        return r;
    }
    let secs = admitted.iter().max().map_or(0, |m| m + 1);
    let per_sec: Vec<usize> = (0..secs).map(|s| admitted.iter().filter(|t| **t == s).count()).collect();
    // The first second holds the burst of a cold start.
    let worst = per_sec.iter().skip(1).copied().max().unwrap_or(0) as f64;
    let burst = (limit / 20.0).max(5.0);
    let mean = admitted.len() as f64 / secs.max(1) as f64;
    r.checks.push(Check {
        name: "the cluster-wide rate limit holds during and after the faults".into(),
        ok: worst <= 1.5 * limit + burst && mean <= 1.1 * limit,
        detail: format!(
            "limit {limit}/s: busiest second {worst:.0} (bound {:.0}), mean {mean:.1}/s (bound {:.1})",
            1.5 * limit + burst,
            1.1 * limit
        ),
    });
    r
}

/// Scrapes one node's `/metrics` every `every` until `stop`; a node that does not answer
/// (killed, paused) leaves a gap. The process start time tells one run from the next.
fn sample_resources(
    node: usize,
    api: SocketAddr,
    every: Duration,
    t0: Instant,
    stop: &AtomicBool,
    out: &Mutex<Vec<soak::Sample>>,
) {
    let mut due = t0;
    while !stop.load(Ordering::Relaxed) {
        if let Ok(text) = Api::new(api).get_text("/metrics") {
            let run = soak::metric(&text, "process_start_time_seconds").unwrap_or(0.0) as u32;
            if let Some(s) = soak::from_metrics(&text, t0.elapsed().as_secs_f64(), node, run) {
                out.lock().unwrap().push(s);
            }
        }
        due += every;
        while Instant::now() < due && !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(200).min(every));
        }
    }
}

/// The RSS fit of every long enough node run against the scenario's bound; writes the
/// samples and their picture next to the report.
fn judge_growth(mut r: Report, scenario: &Scenario, samples: &[soak::Sample], out: &Path) -> anyhow::Result<Report> {
    if scenario.sample_every.is_none() {
        return Ok(r);
    }
    let secs = scenario.duration.as_secs_f64();
    r.rss_growth = soak::growth(samples, (secs / 10.0).max(60.0), secs / 2.0);
    std::fs::write(out.join("resources.csv"), soak::csv(samples))?;
    let title = format!(
        "{} (seed {}): resources per node, sampled every {:?}",
        r.scenario,
        r.seed,
        scenario.sample_every.unwrap_or_default()
    );
    std::fs::write(out.join("resources.svg"), soak::svg(&title, samples, &r.rss_growth))?;
    if let Some(bound) = scenario.invariants.max_rss_growth_mib_per_hour {
        let worst = r.rss_growth.iter().max_by(|a, b| a.mib_per_hour.total_cmp(&b.mib_per_hour));
        let fits: Vec<String> = r
            .rss_growth
            .iter()
            .map(|g| {
                format!(
                    "n{} {:+.2} MiB/h ({:.1}->{:.1} over {:.0} s)",
                    g.node, g.mib_per_hour, g.first_mib, g.last_mib, g.span_s
                )
            })
            .collect();
        r.checks.push(Check {
            name: "RSS does not keep growing".into(),
            ok: !r.rss_growth.is_empty() && worst.is_none_or(|g| g.mib_per_hour <= bound),
            detail: format!(
                "bound {bound} MiB/h; fits after warm-up: {}",
                if fits.is_empty() { "none long enough".into() } else { fits.join(", ") }
            ),
        });
    }
    Ok(r)
}

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
        / 1024.0
}

/// Milliseconds since `t0`.
fn ms(t0: Instant) -> u64 {
    t0.elapsed().as_millis() as u64
}

/// One policy write of the workload on `api`, recorded with its outcome.
fn write_op(api: SocketAddr, node: usize, key: String, value: String, t0: Instant) -> Op {
    let start_ms = ms(t0);
    let body = json!({"service": "echo", "labels": {"write": value}});
    let outcome = match Api::new(api).put_json(&format!("/v1/policy/subsets/{key}"), &body) {
        Ok((200, v)) => v["version"].as_str().and_then(Version::parse_token).map_or(Outcome::Unknown, Outcome::Acked),
        Ok((status, _)) => Outcome::Refused(status),
        Err(_) => Outcome::Unknown,
    };
    Op { node, start_ms, end_ms: ms(t0), key, kind: Kind::Write { value, outcome } }
}

/// What `api` holds for `key`: Some(None) for no such object, None when it did not answer.
fn read_key(api: SocketAddr, key: &str) -> Option<Option<(Version, String)>> {
    match Api::new(api).get_json(&format!("/v1/policy/subsets/{key}")) {
        Ok(v) => {
            let version = v["version"].as_str().and_then(Version::parse_token)?;
            let value = v["body"]["labels"]["write"].as_str()?.to_string();
            Some(Some((version, value)))
        }
        Err(e) if e.to_string().contains(": 404 ") => Some(None),
        Err(_) => None,
    }
}

/// Runs `scenario` with `seed`, faults injected as `mode` says; writes report.json,
/// history.json and timeline.svg into `out`.
pub fn run(scenario: &Scenario, seed: u64, out: &Path, mode: Mode) -> anyhow::Result<Report> {
    std::fs::create_dir_all(out)?;
    let schedule = scenario.schedule(seed);
    println!(
        "scenario {} seed {seed} ({mode:?} mode): {} nodes, {:?}, {} faults",
        scenario.name,
        scenario.nodes,
        scenario.duration,
        schedule.len()
    );
    // Every node has a proxy: node 0's carries the checked traffic, all carry limited load.
    let proxy_arg = vec!["--proxy".to_string(), format!("{{ip}}:{PROXY_PORT}")];
    let spec = ClusterSpec {
        nodes: scenario.nodes,
        profile: scenario.profile.clone(),
        extra_args: vec!["--fault-injection".into()],
        node_args: vec![proxy_arg; scenario.nodes],
        netns: mode == Mode::Netns,
        ..Default::default()
    };
    if mode == Mode::Agent && schedule.iter().any(|f| f.kind == FaultKind::BlockPort) {
        anyhow::bail!("{}: block_port drops packets in the kernel; run it with --netns", scenario.name);
    }
    let mut c = Cluster::start(spec)?;
    let proxies: Vec<SocketAddr> =
        (0..scenario.nodes).map(|i| SocketAddr::new(c.node(i).peer_addr.ip(), PROXY_PORT)).collect();
    let proxy = proxies[0];
    let mut net = c.net().map(|_| netns::Faults::new(c.nodes().iter().map(|n| ip4(n.peer_addr)).collect()));
    let all: Vec<usize> = (0..scenario.nodes).collect();
    let alive: Vec<(String, &str)> = all.iter().map(|&i| (c.node(i).name.clone(), "alive")).collect();
    c.wait_all_see(&all, &alive, Duration::from_secs(30))?;
    let mut instance_names = HashSet::new();
    for i in 0..scenario.nodes {
        let name = format!("echo-{i}");
        // Test servers listen where every agent reaches them: the bridge in namespace mode.
        let srv = echo_server(c.host_ip(), format!("{name}@{}", c.node(i).name));
        instance_names.insert(format!("{name}@{}", c.node(i).name));
        let address = c.host_ip().to_string();
        let body = json!({"service": "echo", "address": address, "port": srv.port()});
        let (s, v) = c.node(i).api().put_json(&format!("/v1/agent/services/{name}"), &body)?;
        anyhow::ensure!(s == 200, "register {name}: {v}");
        let body = json!({"service": "limited", "address": address, "port": srv.port()});
        let (s, v) = c.node(i).api().put_json(&format!("/v1/agent/services/limited-{i}"), &body)?;
        anyhow::ensure!(s == 200, "register limited-{i}: {v}");
    }
    let limit = scenario.workload.limit_rps;
    if limit > 0.0 {
        let body = json!({"service": "limited", "requests_per_second": limit});
        let (s, v) = c.node(0).api().put_json("/v1/policy/ratelimits/limited", &body)?;
        anyhow::ensure!(s == 200, "rate limit: {v}");
    }
    c.wait_until(Duration::from_secs(15), "every instance in node 0's catalog", || {
        let v = c.node(0).api().get_json("/v1/catalog/services/echo").ok()?;
        (v.as_array()?.len() == scenario.nodes).then_some(())
    })?;

    let t0 = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let faulted: Arc<Mutex<BTreeSet<usize>>> = Arc::default();
    let samples: Arc<Mutex<Vec<Sample>>> = Arc::default();
    let wrong_answers: Arc<Mutex<Vec<WrongAnswer>>> = Arc::default();
    let ops: Arc<Mutex<Vec<Op>>> = Arc::default();
    let members_seen: Arc<Mutex<Vec<(u64, usize)>>> = Arc::default();
    let limited: Arc<Mutex<Vec<u64>>> = Arc::default();
    let apis: Vec<SocketAddr> = all.iter().map(|&i| c.node(i).api_addr).collect();
    let resources: Arc<Mutex<Vec<soak::Sample>>> = Arc::default();
    let mut max_rss = 0.0f64;
    std::thread::scope(|s| -> anyhow::Result<()> {
        // HTTP traffic through node 0, open loop.
        let rate = scenario.workload.http_rps;
        for w in 0..4u32 {
            let (stop, samples, names, wrongs) =
                (stop.clone(), samples.clone(), instance_names.clone(), wrong_answers.clone());
            s.spawn(move || {
                let gap = Duration::from_secs_f64(4.0 / rate.max(0.1));
                let mut due = t0 + gap * w / 4;
                let mut k = u64::from(w);
                while !stop.load(Ordering::Relaxed) {
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    let path = format!("/req-{k}");
                    let started = Instant::now();
                    let reply = plain::try_get(proxy, "echo", &path, Duration::from_secs(10));
                    let body = reply.as_ref().ok().filter(|r| r.status == 200).map(|r| r.text());
                    let wrong = body.as_ref().is_some_and(|b| {
                        let (inst, p) = b.split_once(' ').unwrap_or(("", ""));
                        p != path || !names.contains(inst)
                    });
                    let at_ms = due.saturating_duration_since(t0).as_millis() as u64;
                    let latency_us = started.elapsed().as_micros() as u64;
                    if body.is_none() {
                        // What a failed request got: its status and body, or why there was no
                        // answer, and when.
                        let got = match reply {
                            Ok(r) => format!("{} {}", r.status, r.text()),
                            Err(why) => format!("no answer in {} ms: {why}", latency_us / 1000),
                        };
                        let failed = WrongAnswer { at_ms, path: path.clone(), body: got.chars().take(200).collect() };
                        eprintln!("failed request: {failed:?}");
                        wrongs.lock().unwrap().push(failed);
                    }
                    if let Some(body) = body.as_ref().filter(|_| wrong) {
                        let answer = WrongAnswer { at_ms, path: path.clone(), body: body.chars().take(200).collect() };
                        eprintln!("wrong answer: {answer:?}");
                        wrongs.lock().unwrap().push(answer);
                    }
                    samples.lock().unwrap().push(Sample { at_ms, ok: body.is_some() && !wrong, wrong, latency_us });
                    due += gap;
                    k += 4;
                }
            });
        }
        // Load on the limited service through every node's proxy; admissions by second.
        if limit > 0.0 {
            for &p in &proxies {
                let (stop, limited) = (stop.clone(), limited.clone());
                let gap = Duration::from_secs_f64(1.0 / scenario.workload.limited_rps_per_node.max(0.1));
                s.spawn(move || {
                    let mut due = t0;
                    while !stop.load(Ordering::Relaxed) {
                        if let Some(wait) = due.checked_duration_since(Instant::now()) {
                            std::thread::sleep(wait);
                        }
                        if let Some(status) = status_of(p, "limited") {
                            if status != 429 {
                                limited.lock().unwrap().push(t0.elapsed().as_secs());
                            }
                        }
                        due += gap;
                    }
                });
            }
        }
        // Policy writes of a few keys on random live nodes, every one recorded with its answer.
        {
            let (stop, faulted, ops, apis) = (stop.clone(), faulted.clone(), ops.clone(), apis.clone());
            let every = Duration::from_secs_f64(1.0 / scenario.workload.policy_writes_per_sec.max(0.01));
            s.spawn(move || {
                let mut rng = SmallRng::seed_from_u64(seed ^ 0x5eed);
                let mut k = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(every);
                    let live: Vec<usize> = (0..apis.len()).filter(|i| !faulted.lock().unwrap().contains(i)).collect();
                    let node = live[rng.random_range(0..live.len())];
                    let key = format!("h-{}", rng.random_range(0..KEYS));
                    let op = write_op(apis[node], node, key, format!("w-{k}"), t0);
                    ops.lock().unwrap().push(op);
                    k += 1;
                }
            });
        }
        // Reads of those keys on every live node, one reader per node, recorded with what they saw.
        for (node, &api) in apis.iter().enumerate() {
            let (stop, faulted, ops) = (stop.clone(), faulted.clone(), ops.clone());
            s.spawn(move || {
                let mut rng = SmallRng::seed_from_u64(seed ^ node as u64);
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(250));
                    if faulted.lock().unwrap().contains(&node) {
                        continue;
                    }
                    let key = format!("h-{}", rng.random_range(0..KEYS));
                    let start_ms = ms(t0);
                    if let Some(seen) = read_key(api, &key) {
                        ops.lock().unwrap().push(Op { node, start_ms, end_ms: ms(t0), key, kind: Kind::Read { seen } });
                    }
                }
            });
        }
        // Resources of every node, when the scenario asks.
        if let Some(every) = scenario.sample_every {
            for (node, &api) in apis.iter().enumerate() {
                let (stop, resources) = (stop.clone(), resources.clone());
                s.spawn(move || sample_resources(node, api, every, t0, &stop, &resources));
            }
        }
        // Members node 0 sees alive, every second.
        {
            let (stop, seen, api) = (stop.clone(), members_seen.clone(), apis[0]);
            s.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let alive = Api::new(api)
                        .members()
                        .map(|m| m.iter().filter(|x| x["state"] == "alive").count())
                        .unwrap_or(0);
                    seen.lock().unwrap().push((t0.elapsed().as_secs(), alive));
                    std::thread::sleep(Duration::from_secs(1));
                }
            });
        }
        // The fault timeline, on this thread.
        for f in &schedule {
            if let Some(wait) = (t0 + f.at).checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            println!("{:>6.1}s {:?} {:?}", t0.elapsed().as_secs_f64(), f.kind, f.nodes);
            if f.kind == FaultKind::Wipe {
                let at = ms(t0);
                let wiped = f.nodes.iter().map(|&node| Op {
                    node,
                    start_ms: at,
                    end_ms: at,
                    key: String::new(),
                    kind: Kind::Wipe,
                });
                ops.lock().unwrap().extend(wiped);
            }
            apply(&mut c, f, &faulted, net.as_mut())?;
            max_rss = max_rss.max(all.iter().filter_map(|&i| c.node(i).pid()).map(rss_mib).fold(0.0, f64::max));
        }
        if let Some(wait) = (t0 + scenario.duration).checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        // Undo what is left, then let the cluster settle under traffic.
        let heal =
            Fault { at: Duration::ZERO, kind: FaultKind::Heal, nodes: vec![0], rate: None, delay_ms: None, port: None };
        apply(&mut c, &heal, &faulted, net.as_mut())?;
        for i in 1..scenario.nodes {
            if c.node(i).is_paused() {
                c.resume(i);
            }
            if !c.node(i).is_running() {
                c.restart(i)?;
            }
        }
        faulted.lock().unwrap().clear();
        std::thread::sleep(scenario.settle);
        stop.store(true, Ordering::Relaxed);
        Ok(())
    })?;
    max_rss = max_rss.max(all.iter().filter_map(|&i| c.node(i).pid()).map(rss_mib).fold(0.0, f64::max));
    let ops = std::mem::take(&mut *ops.lock().unwrap());
    let report =
        judge(scenario, seed, &c, schedule, t0, &samples.lock().unwrap(), &ops, &members_seen.lock().unwrap(), max_rss);
    let mut report = judge_limit(report, limit, &limited.lock().unwrap());
    report.wrong_answers = wrong_answers.lock().unwrap().iter().take(20).cloned().collect();
    let traffic = ["idempotent requests succeed", "no wrong or corrupt response"];
    for check in report.checks.iter_mut().filter(|c| !c.ok && traffic.contains(&c.name.as_str())) {
        if let Some(first) = report.wrong_answers.first() {
            check.detail +=
                &format!("; first failed or wrong at {} ms: asked {}, got {:?}", first.at_ms, first.path, first.body);
        }
    }
    let report = judge_growth(report, scenario, &resources.lock().unwrap(), out)?;
    std::fs::write(out.join("report.json"), serde_json::to_string_pretty(&report)?)?;
    std::fs::write(out.join("history.json"), serde_json::to_string(&ops)?)?;
    std::fs::write(out.join("timeline.svg"), timeline::svg(&report))?;
    print!("{}", summary(&report));
    println!("report: {}", out.join("report.json").display());
    Ok(report)
}

fn ip4(addr: SocketAddr) -> std::net::Ipv4Addr {
    match addr.ip() {
        std::net::IpAddr::V4(ip) => ip,
        std::net::IpAddr::V6(_) => std::net::Ipv4Addr::UNSPECIFIED,
    }
}

/// Applies one fault: processes are killed, paused and restarted here; the network faults
/// go to the kernel (`net`, namespace mode) or to the agents' fault control.
fn apply(
    c: &mut Cluster,
    f: &Fault,
    faulted: &Mutex<BTreeSet<usize>>,
    mut net: Option<&mut netns::Faults>,
) -> anyhow::Result<()> {
    let n = c.len();
    let nodes: Vec<usize> = f.nodes.iter().copied().filter(|i| *i < n).collect();
    for &i in &nodes {
        match f.kind {
            FaultKind::Kill | FaultKind::Wipe => {
                faulted.lock().unwrap().insert(i);
                c.kill(i);
                if f.kind == FaultKind::Wipe {
                    let _ = std::fs::remove_dir_all(&c.node(i).data_dir);
                }
            }
            FaultKind::Restart => {
                c.restart(i)?;
                faulted.lock().unwrap().remove(&i);
            }
            FaultKind::Pause => {
                faulted.lock().unwrap().insert(i);
                c.pause(i);
            }
            FaultKind::Resume => {
                c.resume(i);
                faulted.lock().unwrap().remove(&i);
            }
            FaultKind::DropWrites => agent_fault(c, i, json!({"drop_writes": true}))?,
            // Delay stays in the transport in both modes: this kernel has no netem.
            FaultKind::Delay => agent_fault(c, i, json!({"delay_ms": f.delay_ms.unwrap_or(100)}))?,
            _ => {}
        }
    }
    if f.kind == FaultKind::Join {
        // A burst of new nodes at once, `nodes[0]` of them, joining through node 0.
        let count = f.nodes.first().copied().unwrap_or(1);
        let seed = [c.node(0).peer_addr];
        for k in 0..count {
            let name = format!("j{}-{k}", f.at.as_millis());
            let i = c.add_node(&name, &seed)?;
            if let Some(state) = net.as_deref_mut() {
                state.add(ip4(c.node(i).peer_addr));
            }
        }
    }
    match net {
        Some(net) => apply_in_kernel(c, f, &nodes, faulted, net),
        None => apply_in_agents(c, f, &nodes),
    }
}

/// `body` to node `i`'s fault control, if it runs.
fn agent_fault(c: &Cluster, i: usize, body: Value) -> anyhow::Result<()> {
    if c.node(i).is_running() && !c.node(i).is_paused() {
        let (s, v) = c.node(i).api().post_json("/v1/fault", &body)?;
        anyhow::ensure!(s == 200, "fault on node {i}: {v}");
    }
    Ok(())
}

/// Partitions, loss and isolation through the agents' own fault control.
fn apply_in_agents(c: &Cluster, f: &Fault, side: &[usize]) -> anyhow::Result<()> {
    let n = c.len();
    let addrs = |nodes: &[usize]| -> Vec<String> { nodes.iter().map(|&i| c.node(i).peer_addr.to_string()).collect() };
    let rest: Vec<usize> = (0..n).filter(|i| !side.contains(i)).collect();
    match f.kind {
        FaultKind::Loss => {
            for &i in side {
                agent_fault(c, i, json!({"drop_rate": f.rate.unwrap_or(0.1)}))?;
            }
        }
        FaultKind::Heal => {
            for j in 0..n {
                agent_fault(c, j, json!({}))?;
            }
        }
        // A partition drops both ways; one way drops only what the side sends.
        FaultKind::Partition | FaultKind::Isolate => {
            for &i in side {
                agent_fault(c, i, json!({"block": addrs(&rest)}))?;
            }
            for &i in &rest {
                agent_fault(c, i, json!({"block": addrs(side)}))?;
            }
        }
        FaultKind::OneWay => {
            for &i in side {
                agent_fault(c, i, json!({"block_out": addrs(&rest)}))?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// Partitions and loss as nftables drops in the namespaces, isolation as the link going
/// down, heal as every rule removed and every link up.
fn apply_in_kernel(
    c: &Cluster,
    f: &Fault,
    side: &[usize],
    faulted: &Mutex<BTreeSet<usize>>,
    state: &mut netns::Faults,
) -> anyhow::Result<()> {
    let net = c.net().expect("namespace mode");
    match f.kind {
        FaultKind::Partition => state.partition(side),
        FaultKind::OneWay => state.one_way(side),
        FaultKind::BlockPort => {
            let port = f.port.ok_or_else(|| anyhow::anyhow!("block_port needs `port`"))?;
            side.iter().for_each(|&i| state.block_port(i, port));
        }
        FaultKind::Loss => {
            for &i in side {
                state.loss(i, (f.rate.unwrap_or(0.1) * 100.0).round().clamp(0.0, 100.0) as u8);
            }
        }
        FaultKind::Isolate => {
            for &i in side {
                // The harness cannot reach it either: keep the workload off it.
                faulted.lock().unwrap().insert(i);
                net.set_link(i, false)?;
            }
            return Ok(());
        }
        FaultKind::Heal => {
            state.heal();
            for i in 0..c.len() {
                net.set_link(i, true)?;
                if c.node(i).is_running() && !c.node(i).is_paused() {
                    faulted.lock().unwrap().remove(&i);
                }
                agent_fault(c, i, json!({}))?;
            }
        }
        _ => return Ok(()),
    }
    for i in 0..c.len() {
        net.apply(i, state.rules(i))?;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn judge(
    scenario: &Scenario,
    seed: u64,
    c: &Cluster,
    schedule: Vec<Fault>,
    t0: Instant,
    samples: &[Sample],
    ops: &[Op],
    members_seen: &[(u64, usize)],
    max_rss: f64,
) -> Report {
    let inv = &scenario.invariants;
    let all: Vec<usize> = (0..c.len()).collect();
    let mut checks = Vec::new();
    // Membership: everyone sees everyone alive.
    let start = Instant::now();
    let alive: Vec<(String, &str)> = all.iter().map(|&i| (c.node(i).name.clone(), "alive")).collect();
    let members_ok = c.wait_all_see(&all, &alive, inv.membership_bound).is_ok();
    let membership_s = members_ok.then(|| start.elapsed().as_secs_f64());
    checks.push(Check {
        name: "membership converges after the faults".into(),
        ok: members_ok,
        detail: format!(
            "all {} nodes see all alive after {:?} (bound {:?})",
            all.len(),
            membership_s,
            inv.membership_bound
        ),
    });
    // Policy: identical everywhere, and the history of writes and reads one that correct
    // replicas under the merge rule may produce.
    let start = Instant::now();
    let versions = |v: &Value| -> Vec<String> {
        v["objects"]
            .as_array()
            .map(|a| a.iter().map(|o| format!("{}/{}@{}", o["kind"], o["name"], o["version"])).collect())
            .unwrap_or_default()
    };
    let same = c.wait_until(inv.policy_bound, "identical policy", || {
        let snaps: Vec<Value> =
            all.iter().map(|&i| c.node(i).api().get_json("/v1/policy").ok()).collect::<Option<_>>()?;
        snaps.iter().all(|s| s["root"] == snaps[0]["root"] && versions(s) == versions(&snaps[0])).then_some(())
    });
    let policy_s = same.as_ref().ok().map(|_| start.elapsed().as_secs_f64());
    checks.push(Check {
        name: "all nodes hold identical policy".into(),
        ok: same.is_ok(),
        detail: format!("identical after {policy_s:?} (bound {:?})", inv.policy_bound),
    });
    let mut finals = history::Finals::new();
    for &i in &all {
        for k in 0..KEYS {
            let key = format!("h-{k}");
            if let Some(held) = read_key(c.node(i).api_addr, &key) {
                finals.insert((i, key), held);
            }
        }
    }
    let violations = history::check(ops, &finals);
    let writes = ops.iter().filter(|o| matches!(o.kind, Kind::Write { .. })).count();
    let reads = ops.iter().filter(|o| matches!(o.kind, Kind::Read { .. })).count();
    checks.push(Check {
        name: "no acknowledged write lost, the merge rule's state everywhere, monotonic reads".into(),
        ok: violations.is_empty() && finals.len() == all.len() * KEYS,
        detail: format!(
            "{writes} writes ({} acknowledged), {reads} reads, {} of {} settled keys read; {} violations{}",
            acked_writes(ops),
            finals.len(),
            all.len() * KEYS,
            violations.len(),
            if violations.is_empty() {
                String::new()
            } else {
                format!(", first: {}", history::describe(&violations, 3))
            }
        ),
    });
    // Traffic.
    let ok = samples.iter().filter(|s| s.ok).count();
    let wrong = samples.iter().filter(|s| s.wrong).count();
    let rate = ok as f64 / samples.len().max(1) as f64;
    checks.push(Check {
        name: "idempotent requests succeed".into(),
        ok: rate >= inv.min_success,
        detail: format!("{ok} of {} ({:.3}%), target {:.3}%", samples.len(), rate * 100.0, inv.min_success * 100.0),
    });
    checks.push(Check {
        name: "no wrong or corrupt response".into(),
        ok: wrong == 0,
        detail: format!("{wrong} wrong"),
    });
    // Panics and memory.
    let panics: Vec<usize> = all.iter().copied().filter(|&i| c.log_tail(i, 100_000).contains("panicked at")).collect();
    checks.push(Check {
        name: "no agent panics".into(),
        ok: panics.is_empty(),
        detail: format!("panics in nodes {panics:?}"),
    });
    checks.push(Check {
        name: "RSS stays bounded".into(),
        ok: max_rss <= inv.max_rss_mib,
        detail: format!("largest RSS seen {max_rss:.1} MiB (bound {} MiB)", inv.max_rss_mib),
    });
    let secs = t0.elapsed().as_secs();
    let timeline = (0..secs)
        .map(|s| {
            let mut in_s: Vec<&Sample> = samples.iter().filter(|x| x.at_ms / 1000 == s).collect();
            in_s.sort_by_key(|x| x.latency_us);
            let okr =
                if in_s.is_empty() { 1.0 } else { in_s.iter().filter(|x| x.ok).count() as f64 / in_s.len() as f64 };
            let p99 = in_s.get(in_s.len().saturating_sub(1) * 99 / 100).map_or(0.0, |x| x.latency_us as f64 / 1000.0);
            let members = members_seen.iter().rev().find(|(t, _)| *t <= s).map_or(0, |(_, m)| *m);
            (s, okr, p99, members)
        })
        .collect();
    Report {
        scenario: scenario.name.clone(),
        seed,
        nodes: c.len(),
        duration_s: scenario.duration.as_secs_f64(),
        schedule,
        requests: samples.len(),
        succeeded: ok,
        wrong,
        wrong_answers: vec![],
        writes_acked: acked_writes(ops),
        membership_converged_s: membership_s,
        policy_converged_s: policy_s,
        max_rss_mib: max_rss,
        rss_growth: vec![],
        checks,
        timeline,
    }
}

fn acked_writes(ops: &[Op]) -> usize {
    ops.iter().filter(|o| matches!(o.kind, Kind::Write { outcome: Outcome::Acked(_), .. })).count()
}

pub fn summary(r: &Report) -> String {
    let mut out = format!("\n{} (seed {}): {}\n", r.scenario, r.seed, if r.passed() { "PASS" } else { "FAIL" });
    for c in &r.checks {
        out += &format!("  [{}] {}: {}\n", if c.ok { "ok" } else { "FAIL" }, c.name, c.detail);
    }
    out
}

/// `chaos/scenarios/*.toml` by name, without the long soak (run that one by its path).
pub fn library() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml") && !p.ends_with("soak.toml"))
        .collect();
    v.sort();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_library_scenario_parses_and_the_same_seed_gives_the_same_schedule() {
        let mut all = library();
        all.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/soak.toml"));
        assert!(all.len() >= 9, "{all:?}");
        for p in &all {
            let s = Scenario::load(p).unwrap();
            let (a, b) = (s.schedule(7), s.schedule(7));
            assert_eq!(format!("{a:?}"), format!("{b:?}"), "{}", p.display());
        }
        let soak = Scenario::load(&all[all.len() - 1]).unwrap();
        assert!(soak.schedule(1).len() > 1000, "a fault every 3 s for 30 minutes, each undone");
        assert_ne!(format!("{:?}", soak.schedule(1)), format!("{:?}", soak.schedule(2)));
    }

    #[test]
    fn bad_scenarios_name_the_problem() {
        let dir = std::env::temp_dir().join(format!("trellis-scn-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("x.toml");
        std::fs::write(&p, "name = \"x\"\nduration = \"5s\"\nnodse = 3\n").unwrap();
        assert!(Scenario::load(&p).unwrap_err().to_string().contains("nodse"));
        let kill0 = "name = \"x\"\nduration = \"5s\"\n[[faults]]\nat = \"1s\"\nkind = \"kill\"\nnodes = [0]\n";
        std::fs::write(&p, kill0).unwrap();
        assert!(Scenario::load(&p).unwrap_err().to_string().contains("node 0 cannot be faulted"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
