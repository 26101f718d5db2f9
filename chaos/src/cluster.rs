//! Runs a cluster of real `trellis agent` processes on loopback and drives them: start,
//! stop (graceful), kill -9, pause (SIGSTOP), resume, restart. Used by the integration
//! tests and by `trellis-chaos`.
//!
//! Linux only: every node gets its own 127.A.B.x address (all of 127/8 routes to `lo`), and
//! liveness is read from `/proc`.

use std::ffi::OsString;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

use crate::http::Api;
use crate::netns::Net as Netns;

/// Peer and API ports; every node has its own loopback address, so these never clash.
pub const PEER_PORT: u16 = 7946;
pub const API_PORT: u16 = 8500;

/// How long a freshly started agent has to answer `/v1/health`.
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(20);
/// How long `stop` waits for a graceful leave before SIGKILL.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Host numbers .2 ..= .254 of a subnet: at most this many nodes per cluster.
pub const MAX_NODES: usize = 253;

pub struct ClusterSpec {
    pub nodes: usize,
    /// Membership timing profile (`fast` for tests).
    pub profile: String,
    /// Labels per node (may be shorter than `nodes`).
    pub labels: Vec<Vec<(String, String)>>,
    /// The node everyone else joins through.
    pub seed_index: usize,
    /// Extra flags for every agent.
    pub extra_args: Vec<String>,
    /// Extra flags per node (may be shorter than `nodes`); `{ip}` in them stands for the
    /// node's address.
    pub node_args: Vec<Vec<String>>,
    /// Each agent in its own network namespace on a bridge (see [`crate::netns`]) instead of
    /// on its own loopback address.
    pub netns: bool,
}

impl Default for ClusterSpec {
    fn default() -> Self {
        ClusterSpec {
            nodes: 3,
            profile: "fast".into(),
            labels: vec![],
            seed_index: 0,
            extra_args: vec![],
            node_args: vec![],
            netns: false,
        }
    }
}

pub struct NodeHandle {
    pub name: String,
    pub peer_addr: SocketAddr,
    pub api_addr: SocketAddr,
    pub data_dir: PathBuf,
    pub tls_dir: PathBuf,
    pub log_path: PathBuf,
    join: Vec<SocketAddr>,
    labels: Vec<(String, String)>,
    args: Vec<String>,
    /// Not reaped until `kill`/`stop`, so the pid cannot be recycled under our signals.
    child: Option<Child>,
    paused: bool,
    starts: u32,
}

impl NodeHandle {
    pub fn api(&self) -> Api {
        Api::new(self.api_addr)
    }

    /// The pid of the current process, also after it exited on its own (until it is reaped
    /// by `kill`, `stop`, `restart` or drop).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Whether the process exists and has not exited (a paused one counts as running).
    pub fn is_running(&self) -> bool {
        // `Child::try_wait` needs `&mut`; an exited, unreaped child is a zombie in /proc.
        self.pid().is_some_and(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|stat| proc_state(&stat).is_some_and(|s| s != 'Z' && s != 'X'))
        })
    }

    pub fn is_paused(&self) -> bool {
        self.paused
    }
}

/// The state letter of a `/proc/PID/stat` line; the command name before it may hold spaces
/// and parentheses, so look after the last `)`.
fn proc_state(stat: &str) -> Option<char> {
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

pub struct Cluster {
    root: PathBuf,
    ca_dir: PathBuf,
    subnet: (u8, u8),
    nodes: Vec<NodeHandle>,
    profile: String,
    extra_args: Vec<String>,
    /// Dropped after the agents (field order), so no namespace is deleted under a process.
    net: Option<Netns>,
    /// The write token of every API, in namespace mode.
    token: Option<String>,
}

/// The `trellis` binary; panics with the reason if there is none (see [`try_trellis_bin`]).
pub fn trellis_bin() -> PathBuf {
    try_trellis_bin().unwrap_or_else(|e| panic!("{e}"))
}

/// The `trellis` binary: `TRELLIS_BIN` if set, else `<target>/debug/trellis` of this
/// workspace, built first (once per process) if it is missing or older than the node and
/// proto sources, so a test never runs an agent that predates the code it tests.
pub fn try_trellis_bin() -> anyhow::Result<PathBuf> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    // get_or_init blocks concurrent callers (parallel tests) until the one build is done.
    BIN.get_or_init(|| locate_or_build().map_err(|e| format!("{e:#}"))).clone().map_err(anyhow::Error::msg)
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("chaos/ lives in the workspace").to_path_buf()
}

/// Where the binary is expected, from `TRELLIS_BIN` and `CARGO_TARGET_DIR` (a relative
/// target dir counts from the workspace root, where we run cargo).
fn bin_path(trellis_bin: Option<OsString>, cargo_target_dir: Option<OsString>, workspace: &Path) -> PathBuf {
    if let Some(bin) = trellis_bin.filter(|b| !b.is_empty()) {
        return PathBuf::from(bin);
    }
    let target = match cargo_target_dir.filter(|t| !t.is_empty()) {
        Some(t) => workspace.join(t),
        None => workspace.join("target"),
    };
    target.join("debug").join("trellis")
}

fn locate_or_build() -> anyhow::Result<PathBuf> {
    let workspace = workspace_root();
    let explicit = std::env::var_os("TRELLIS_BIN").filter(|b| !b.is_empty());
    let bin = bin_path(explicit.clone(), std::env::var_os("CARGO_TARGET_DIR"), &workspace);
    if explicit.is_some() {
        anyhow::ensure!(bin.is_file(), "TRELLIS_BIN={} is not a file", bin.display());
        return Ok(bin);
    }
    let built = modified(&bin);
    let stale = match built {
        None => true,
        Some(built) => newest_source(&workspace).is_some_and(|src| src > built),
    };
    if !stale {
        return Ok(bin);
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    eprintln!("trellis-chaos: building {} (missing or older than node/ and proto/)", bin.display());
    let out = Command::new(cargo)
        // The feature the workspace build unifies in: the harness's faults need it, and the
        // same features mean the same artifact as `cargo build --workspace`.
        .args(["build", "-p", "trellis-node", "--bin", "trellis", "--features", "fault-injection"])
        .current_dir(&workspace)
        .stdin(Stdio::null())
        .output();
    let why = match out {
        Ok(out) if out.status.success() && bin.is_file() => return Ok(bin),
        Ok(out) if out.status.success() => format!("cargo succeeded but {} is not there", bin.display()),
        Ok(out) => tail(&String::from_utf8_lossy(&out.stderr), 30),
        Err(e) => format!("cannot run cargo: {e}"),
    };
    if built.is_some() {
        // Someone is mid-edit in node/; the last good binary beats no test run at all.
        eprintln!("trellis-chaos: build failed, using the older {}:\n{why}", bin.display());
        return Ok(bin);
    }
    anyhow::bail!(
        "no trellis binary at {} and `cargo build -p trellis-node --bin trellis --features fault-injection` failed \
         (set TRELLIS_BIN to use another one):\n{why}",
        bin.display()
    )
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// The newest mtime among the sources the `trellis` binary is built from.
fn newest_source(workspace: &Path) -> Option<SystemTime> {
    fn walk(dir: &Path, newest: &mut Option<SystemTime>) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, newest);
            } else if path.extension().is_some_and(|e| e == "rs") || path.ends_with("Cargo.toml") {
                *newest = (*newest).max(modified(&path));
            }
        }
    }
    let mut newest = modified(&workspace.join("Cargo.lock")).max(modified(&workspace.join("Cargo.toml")));
    for krate in ["node", "proto"] {
        newest = newest.max(modified(&workspace.join(krate).join("Cargo.toml")));
        walk(&workspace.join(krate).join("src"), &mut newest);
    }
    newest
}

/// Loopback subnets 127.A.B.0/24 we hand out: A in 1..=254 (127.0.0.x is localhost's and
/// `trellis dev`'s), B in 0..=255.
const SUBNETS: u32 = 254 * 256;

/// The `k`-th subnet of process `pid`. Each process starts in its own A (from the pid) and walks
/// on, so one process never repeats a subnet within 65 024 clusters, and two processes meet
/// only if their pids agree mod 254 (and then [`subnet_is_free`] skips the taken ones).
fn subnet(pid: u32, k: u32) -> (u8, u8) {
    let idx = ((pid % 254) * 256 + k % SUBNETS) % SUBNETS;
    ((idx / 256 + 1) as u8, (idx % 256) as u8)
}

/// Node `i`'s block of virtual service addresses: agents sharing a host need one each,
/// inside the cluster's own subnet so parallel clusters never meet. The top half of the
/// /24 holds eight /28s (14 addresses each); nodes past the eighth have none.
pub fn virtual_range(subnet: (u8, u8), i: usize) -> String {
    if i >= 8 {
        return "off".into();
    }
    format!("127.{}.{}.{}/28", subnet.0, subnet.1, 128 + 16 * i)
}

fn node_ip(subnet: (u8, u8), i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, subnet.0, subnet.1, i as u8 + 2)
}

/// Whether no other process (another test binary, a `trellis-chaos up`, agents orphaned by a
/// crashed run) holds the first few node addresses of `subnet` or its namespace bridge.
fn subnet_is_free(subnet: (u8, u8)) -> bool {
    !Netns::taken(subnet)
        && (0..5).all(|i| {
            let ip = IpAddr::V4(node_ip(subnet, i));
            TcpListener::bind((ip, API_PORT)).is_ok() && UdpSocket::bind((ip, PEER_PORT)).is_ok()
        })
}

/// A subnet no cluster of this process has used and no other process seems to be using.
fn next_subnet() -> (u8, u8) {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let pid = std::process::id();
    let mut candidate = subnet(pid, COUNTER.fetch_add(1, Ordering::Relaxed));
    for _ in 0..64 {
        if subnet_is_free(candidate) {
            break;
        }
        candidate = subnet(pid, COUNTER.fetch_add(1, Ordering::Relaxed));
    }
    candidate
}

fn path_arg(p: &Path) -> anyhow::Result<&str> {
    p.to_str().ok_or_else(|| anyhow::anyhow!("path is not UTF-8: {}", p.display()))
}

/// Runs a `trellis` CLI command (ca init, cert issue) to completion.
fn run_cli(args: &[&str]) -> anyhow::Result<()> {
    let bin = try_trellis_bin()?;
    let out = Command::new(&bin)
        .args(args)
        .env_remove("TRELLIS_HTTP_ADDR")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| anyhow::anyhow!("cannot run {}: {e}", bin.display()))?;
    anyhow::ensure!(
        out.status.success(),
        "`trellis {}` failed ({}):\n{}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

impl Cluster {
    /// Makes a CA and a cert per node, starts the seed, then the others joining it, and
    /// returns once every agent's API answers.
    pub fn start(spec: ClusterSpec) -> anyhow::Result<Cluster> {
        anyhow::ensure!((1..=MAX_NODES).contains(&spec.nodes), "nodes must be 1..={MAX_NODES}, not {}", spec.nodes);
        anyhow::ensure!(spec.seed_index < spec.nodes, "seed_index {} but {} nodes", spec.seed_index, spec.nodes);
        static ROOTS: AtomicU32 = AtomicU32::new(0);
        let root = std::env::temp_dir().join(format!(
            "trellis-cluster-{}-{}",
            std::process::id(),
            ROOTS.fetch_add(1, Ordering::Relaxed)
        ));
        // Left over from an earlier process with the same pid.
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root)?;
        // From here on, Drop cleans up whatever was started if a step fails.
        let mut c = Cluster {
            ca_dir: root.join("ca"),
            root,
            subnet: next_subnet(),
            nodes: vec![],
            profile: spec.profile,
            extra_args: spec.extra_args,
            net: None,
            token: None,
        };
        if spec.netns {
            c.net = Some(Netns::create(c.subnet)?);
            // Off loopback, an agent's API needs a token (the secure default holds in tests too).
            let token = format!("{:032x}", rand::random::<u128>());
            std::fs::write(c.root.join("api-tokens"), format!("write:{token}\n"))?;
            c.extra_args.extend(["--api-tokens-file".into(), path_arg(&c.root.join("api-tokens"))?.to_string()]);
            c.token = Some(token);
        }
        run_cli(&["ca", "init", "--dir", path_arg(&c.ca_dir)?])?;
        let seed = SocketAddr::new(IpAddr::V4(c.ip_of(spec.seed_index)), PEER_PORT);
        // Indices are fixed by the spec, so create every handle before starting anyone.
        for i in 0..spec.nodes {
            let join = if i == spec.seed_index { vec![] } else { vec![seed] };
            let labels = spec.labels.get(i).cloned().unwrap_or_default();
            let args = spec.node_args.get(i).cloned().unwrap_or_default();
            c.push_node(&format!("n{i}"), None, join, labels, args)?;
        }
        // The seed first, so the first join attempts find it listening.
        c.spawn(spec.seed_index)?;
        c.wait_healthy(spec.seed_index)?;
        for i in (0..spec.nodes).filter(|&i| i != spec.seed_index) {
            c.spawn(i)?;
        }
        for i in 0..spec.nodes {
            c.wait_healthy(i)?;
        }
        Ok(c)
    }

    /// Node `i`'s address: in its namespace, or on loopback.
    fn ip_of(&self, i: usize) -> Ipv4Addr {
        self.net.as_ref().map_or_else(|| node_ip(self.subnet, i), |n| n.node_ip(i))
    }

    /// The namespaces, in namespace mode.
    pub fn net(&self) -> Option<&Netns> {
        self.net.as_ref()
    }

    /// Where the harness's test servers listen so every agent reaches them: the bridge's
    /// address in namespace mode, else localhost.
    pub fn host_ip(&self) -> Ipv4Addr {
        self.net.as_ref().map_or(Ipv4Addr::LOCALHOST, |n| n.host_ip())
    }

    pub fn ca_dir(&self) -> &Path {
        &self.ca_dir
    }

    /// The cluster's temp dir: `ca/`, one dir per node, and room for a test's own files.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A fresh, unrelated CA (for rogue peers): `<root>/other-ca-N/ca`, so its parent is a
    /// scratch dir for the certificates it issues.
    pub fn new_ca_dir(&self) -> PathBuf {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = self.root.join(format!("other-ca-{}", N.fetch_add(1, Ordering::Relaxed))).join("ca");
        let made = path_arg(&dir).and_then(|d| run_cli(&["ca", "init", "--dir", d]));
        if let Err(e) = made {
            panic!("cannot make a second CA: {e:#}");
        }
        dir
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn node(&self, i: usize) -> &NodeHandle {
        &self.nodes[i]
    }

    pub fn nodes(&self) -> &[NodeHandle] {
        &self.nodes
    }

    /// Starts one more agent with a certificate from the cluster CA; waits for its API.
    pub fn add_node(&mut self, name: &str, join: &[SocketAddr]) -> anyhow::Result<usize> {
        let i = self.push_node(name, None, join.to_vec(), vec![], vec![])?;
        self.spawn(i)?;
        self.wait_healthy(i)?;
        Ok(i)
    }

    /// Starts one more agent with the TLS material in `tls_dir` (e.g. from another CA).
    pub fn add_node_with_tls(&mut self, name: &str, tls_dir: PathBuf, join: &[SocketAddr]) -> anyhow::Result<usize> {
        let i = self.push_node(name, Some(tls_dir), join.to_vec(), vec![], vec![])?;
        self.spawn(i)?;
        self.wait_healthy(i)?;
        Ok(i)
    }

    /// Allocates the node's address and dirs and issues its cert; does not start it.
    fn push_node(
        &mut self,
        name: &str,
        tls: Option<PathBuf>,
        join: Vec<SocketAddr>,
        labels: Vec<(String, String)>,
        args: Vec<String>,
    ) -> anyhow::Result<usize> {
        let i = self.nodes.len();
        anyhow::ensure!(i < MAX_NODES, "at most {MAX_NODES} nodes per cluster");
        anyhow::ensure!(self.nodes.iter().all(|n| n.name != name), "node name {name} is taken");
        let dir = self.root.join(name);
        std::fs::create_dir_all(&dir)?;
        let tls_dir = match tls {
            Some(t) => t,
            None => {
                let t = dir.join("tls");
                let (ca, out) = (path_arg(&self.ca_dir)?, path_arg(&t)?);
                run_cli(&["cert", "issue", "--ca-dir", ca, "--name", name, "--out", out])?;
                t
            }
        };
        if let Some(net) = &mut self.net {
            net.add_node(i)?;
        }
        let ip = IpAddr::V4(self.ip_of(i));
        if let Some(token) = &self.token {
            crate::http::register_token(SocketAddr::new(ip, API_PORT), token);
        }
        self.nodes.push(NodeHandle {
            name: name.into(),
            peer_addr: SocketAddr::new(ip, PEER_PORT),
            api_addr: SocketAddr::new(ip, API_PORT),
            data_dir: dir.join("data"),
            tls_dir,
            log_path: dir.join("agent.log"),
            join,
            labels,
            args,
            child: None,
            paused: false,
            starts: 0,
        });
        Ok(i)
    }

    fn spawn(&mut self, i: usize) -> anyhow::Result<()> {
        let bin = try_trellis_bin()?;
        let profile = &self.profile;
        let n = &mut self.nodes[i];
        n.starts += 1;
        let mut log = std::fs::OpenOptions::new().create(true).append(true).open(&n.log_path)?;
        // Restarts append to the same log; mark where each run begins.
        writeln!(log, "=== trellis-chaos: start #{} of {} ===", n.starts, n.name)?;
        let ip = n.peer_addr.ip().to_string();
        let mut cmd = match &self.net {
            Some(net) => net.command(i, &bin),
            None => Command::new(&bin),
        };
        cmd.args(["agent", "--name", &n.name, "--profile", profile])
            .args(["--bind", &n.peer_addr.to_string(), "--api", &n.api_addr.to_string()])
            .arg("--data-dir")
            .arg(&n.data_dir)
            .arg("--tls-dir")
            .arg(&n.tls_dir)
            .args(["--virtual-range", &virtual_range(self.subnet, i)]);
        for j in &n.join {
            cmd.args(["--join", &j.to_string()]);
        }
        for (k, v) in &n.labels {
            cmd.args(["--label", &format!("{k}={v}")]);
        }
        cmd.args(&self.extra_args)
            .args(n.args.iter().map(|a| a.replace("{ip}", &ip)))
            .env_remove("TRELLIS_HTTP_ADDR")
            // Plain text in the log files that error messages quote.
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd.spawn().map_err(|e| anyhow::anyhow!("cannot start {} for {}: {e}", bin.display(), n.name))?;
        n.child = Some(child);
        n.paused = false;
        Ok(())
    }

    /// Waits for node `i` to answer `/v1/health`; fails at once if it exits meanwhile.
    fn wait_healthy(&self, i: usize) -> anyhow::Result<()> {
        let n = &self.nodes[i];
        let api = n.api();
        let start = Instant::now();
        let failure = loop {
            if api.get_json("/v1/health").is_ok() {
                // An agent orphaned by a crashed run could hold this address; make sure it is ours.
                match api.get_json("/v1/agent/self").ok().and_then(|v| v["name"].as_str().map(str::to_string)) {
                    Some(other) if other != n.name => {
                        break format!("another agent ({other}) answers on {}", n.api_addr);
                    }
                    _ => return Ok(()),
                }
            }
            if !n.is_running() {
                break format!("{} exited before its API at {} answered", n.name, n.api_addr);
            }
            if start.elapsed() > HEALTH_TIMEOUT {
                break format!("{} did not answer GET {}/v1/health within {HEALTH_TIMEOUT:?}", n.name, api.base());
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        anyhow::bail!("{failure}\n--- last 30 lines of {} ---\n{}", n.log_path.display(), self.log_tail(i, 30))
    }

    /// Signals node `i`'s agent, or in namespace mode every process of its namespace (a
    /// whole host frozen or resumed).
    fn signal(&self, i: usize, sig: &str) {
        let pids = match (&self.net, sig) {
            (Some(net), "-STOP" | "-CONT") => net.pids(i),
            // The child is never reaped before kill/stop, so this pid is still ours.
            _ => self.nodes[i].pid().into_iter().collect(),
        };
        for pid in pids {
            let _ = Command::new("kill").args([sig, &pid.to_string()]).stderr(Stdio::null()).status();
        }
    }

    /// SIGKILL (a crash), and reap.
    pub fn kill(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        if let Some(mut c) = n.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        n.paused = false;
    }

    /// SIGTERM (graceful leave); SIGKILL if still there after [`STOP_TIMEOUT`].
    pub fn stop(&mut self, i: usize) {
        if self.nodes[i].paused {
            // A stopped process does not act on SIGTERM until continued.
            self.resume(i);
        }
        self.signal(i, "-TERM");
        if let Some(mut c) = self.nodes[i].child.take() {
            let start = Instant::now();
            while start.elapsed() < STOP_TIMEOUT {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGSTOP: the process stays but answers nothing (a hung host).
    pub fn pause(&mut self, i: usize) {
        if self.nodes[i].is_running() {
            self.signal(i, "-STOP");
            self.nodes[i].paused = true;
        }
    }

    /// SIGCONT.
    pub fn resume(&mut self, i: usize) {
        self.signal(i, "-CONT");
        self.nodes[i].paused = false;
    }

    /// Starts node `i` again with the same name, dirs, addresses and flags (SIGKILLing it
    /// first if it still runs); waits for its API.
    pub fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        self.kill(i);
        self.spawn(i)?;
        self.wait_healthy(i)
    }

    /// Polls `f` every 100 ms until it yields, or fails saying what was awaited.
    pub fn wait_until<T>(&self, timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> anyhow::Result<T> {
        let start = Instant::now();
        loop {
            if let Some(v) = f() {
                return Ok(v);
            }
            if start.elapsed() > timeout {
                anyhow::bail!("timed out after {timeout:?} waiting for {what}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until every node in `live` lists each expected (name, state); returns how long.
    /// A name listed more than once (a restarted node under a new id) counts by its highest
    /// incarnation.
    pub fn wait_all_see(
        &self,
        live: &[usize],
        expect: &[(String, &str)],
        timeout: Duration,
    ) -> anyhow::Result<Duration> {
        let start = Instant::now();
        let mut last = String::new();
        let res = self.wait_until(timeout, "membership views", || {
            for &i in live {
                let members = match self.nodes[i].api().members() {
                    Ok(m) => m,
                    Err(e) => {
                        last = format!("{}: {e:#}", self.nodes[i].name);
                        return None;
                    }
                };
                for (name, state) in expect {
                    let seen = members
                        .iter()
                        .filter(|m| m["name"] == name.as_str())
                        .max_by_key(|m| m["incarnation"].as_u64().unwrap_or(0))
                        .and_then(|m| m["state"].as_str().map(str::to_string));
                    if seen.as_deref() != Some(*state) {
                        last = format!("{} sees {name} as {seen:?}, want {state}", self.nodes[i].name);
                        return None;
                    }
                }
            }
            Some(())
        });
        res.map(|_| start.elapsed()).map_err(|e| anyhow::anyhow!("{e}; last: {last}"))
    }

    /// The last `lines` lines of node `i`'s log (every run of it, stdout and stderr).
    pub fn log_tail(&self, i: usize, lines: usize) -> String {
        tail(&std::fs::read_to_string(&self.nodes[i].log_path).unwrap_or_default(), lines)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            if self.nodes[i].paused {
                self.resume(i);
            }
            self.kill(i);
        }
        if std::env::var_os("TRELLIS_KEEP_TMP").is_none() {
            let _ = std::fs::remove_dir_all(&self.root);
        } else {
            eprintln!("trellis-chaos: kept {}", self.root.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn subnets_of_one_process_never_repeat_across_a_thousand_clusters() {
        for pid in [1, 253, 254, 4_194_303, std::process::id()] {
            let got: HashSet<_> = (0..1000).map(|k| subnet(pid, k)).collect();
            assert_eq!(got.len(), 1000, "pid {pid}");
        }
    }

    #[test]
    fn subnets_stay_clear_of_localhost_and_broadcast() {
        for pid in [0, 1, 253, 254, 255, u32::MAX] {
            for k in (0..2000).chain([SUBNETS - 1, SUBNETS, u32::MAX]) {
                let (a, _) = subnet(pid, k);
                assert!((1..=254).contains(&a), "pid {pid} k {k}: 127.{a}.x.x");
            }
        }
        assert_eq!(node_ip((1, 0), 0), Ipv4Addr::new(127, 1, 0, 2));
        assert_eq!(node_ip((1, 0), MAX_NODES - 1), Ipv4Addr::new(127, 1, 0, 254));
    }

    #[test]
    fn neighbouring_processes_get_disjoint_subnets() {
        let a: HashSet<_> = (0..200).map(|k| subnet(1000, k)).collect();
        let b: HashSet<_> = (0..200).map(|k| subnet(1001, k)).collect();
        assert!(a.is_disjoint(&b));
    }

    #[test]
    fn concurrent_allocations_in_one_process_never_collide() {
        let threads: Vec<_> =
            (0..8).map(|_| std::thread::spawn(|| (0..125).map(|_| next_subnet()).collect::<Vec<_>>())).collect();
        let mut all = HashSet::new();
        for t in threads {
            for s in t.join().unwrap() {
                assert!(all.insert(s), "{s:?} handed out twice");
            }
        }
        assert_eq!(all.len(), 1000);
    }

    #[test]
    fn trellis_bin_env_wins_over_the_workspace_build() {
        let ws = Path::new("/w");
        assert_eq!(bin_path(Some("/opt/trellis".into()), Some("/t".into()), ws), Path::new("/opt/trellis"));
        assert_eq!(bin_path(Some("".into()), None, ws), Path::new("/w/target/debug/trellis"));
        assert_eq!(bin_path(None, None, ws), Path::new("/w/target/debug/trellis"));
        assert_eq!(bin_path(None, Some("/t".into()), ws), Path::new("/t/debug/trellis"));
        assert_eq!(bin_path(None, Some("tgt".into()), ws), Path::new("/w/tgt/debug/trellis"));
    }

    #[test]
    fn workspace_root_holds_the_node_crate() {
        assert!(workspace_root().join("node").join("Cargo.toml").is_file());
        assert!(newest_source(&workspace_root()).is_some());
    }

    #[test]
    fn proc_state_reads_past_odd_command_names() {
        assert_eq!(proc_state("42 (trellis) S 1 42"), Some('S'));
        assert_eq!(proc_state("42 (a) Z (b)) Z 1"), Some('Z'));
        assert_eq!(proc_state("42 (x) T 1"), Some('T'));
        assert_eq!(proc_state("garbage"), None);
    }

    #[test]
    fn a_dead_child_is_not_running() {
        let child = Command::new("true").spawn().unwrap();
        let mut n = NodeHandle {
            name: "t".into(),
            peer_addr: "127.0.0.1:1".parse().unwrap(),
            api_addr: "127.0.0.1:2".parse().unwrap(),
            data_dir: PathBuf::new(),
            tls_dir: PathBuf::new(),
            log_path: PathBuf::new(),
            join: vec![],
            labels: vec![],
            args: vec![],
            child: Some(child),
            paused: false,
            starts: 1,
        };
        let start = Instant::now();
        while n.is_running() {
            assert!(start.elapsed() < Duration::from_secs(5), "`true` still running");
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = n.child.take().unwrap().wait();
        assert!(!n.is_running());
    }
}
