//! Runs a cluster of real `trellis agent` processes on loopback and drives them: start,
//! stop (graceful), kill -9, pause (SIGSTOP), resume, restart. Used by the integration
//! tests and by `trellis-chaos`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::http::Api;

/// Peer and API ports; every node has its own loopback address, so these never clash.
pub const PEER_PORT: u16 = 7946;
pub const API_PORT: u16 = 8500;

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
    /// Extra flags per node (may be shorter than `nodes`).
    pub node_args: Vec<Vec<String>>,
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
    child: Option<Child>,
    paused: bool,
}

impl NodeHandle {
    pub fn api(&self) -> Api {
        Api::new(self.api_addr)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Whether the process is still running (reaps it if it exited).
    pub fn is_running(&self) -> bool {
        // try_wait needs &mut; a signal 0 probe does not.
        self.pid().is_some_and(|pid| {
            Path::new(&format!("/proc/{pid}")).exists()
                && !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z "))
        })
    }
}

pub struct Cluster {
    root: PathBuf,
    ca_dir: PathBuf,
    subnet: (u8, u8),
    nodes: Vec<NodeHandle>,
    profile: String,
    extra_args: Vec<String>,
}

/// The `trellis` binary: `TRELLIS_BIN`, else the workspace's debug build (built on demand).
pub fn trellis_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Ok(p) = std::env::var("TRELLIS_BIN") {
            return PathBuf::from(p);
        }
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf();
        let target = std::env::var("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|_| workspace.join("target"));
        let bin = target.join("debug").join("trellis");
        let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["build", "-q", "-p", "trellis-node", "--bin", "trellis"])
            .current_dir(&workspace)
            .status();
        match status {
            Ok(s) if s.success() => bin,
            _ if bin.exists() => bin,
            other => panic!("cannot build the trellis binary ({other:?}); run `cargo build -p trellis-node`"),
        }
    })
    .clone()
}

/// A loopback /16-ish slice unique to this process and cluster: 127.A.B.x.
fn next_subnet() -> (u8, u8) {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let a = 10 + (std::process::id() % 200) as u8;
    (a, (n % 250) as u8 + 1)
}

fn run_cli(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(trellis_bin()).args(args).output()?;
    anyhow::ensure!(out.status.success(), "trellis {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    Ok(())
}

impl Cluster {
    /// Makes a CA, a cert per node, starts the seed then the others, and waits for every
    /// API to answer.
    pub fn start(spec: ClusterSpec) -> anyhow::Result<Cluster> {
        static ROOTS: AtomicU32 = AtomicU32::new(0);
        let root = std::env::temp_dir().join(format!(
            "trellis-cluster-{}-{}",
            std::process::id(),
            ROOTS.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root)?;
        let ca_dir = root.join("ca");
        run_cli(&["ca", "init", "--dir", ca_dir.to_str().unwrap()])?;
        let mut c = Cluster {
            root,
            ca_dir,
            subnet: next_subnet(),
            nodes: vec![],
            profile: spec.profile,
            extra_args: spec.extra_args,
        };
        let seed = c.addr(spec.seed_index, PEER_PORT);
        for i in 0..spec.nodes {
            let join = if i == spec.seed_index { vec![] } else { vec![seed] };
            let labels = spec.labels.get(i).cloned().unwrap_or_default();
            let args = spec.node_args.get(i).cloned().unwrap_or_default();
            c.spawn_new(&format!("n{i}"), None, join, labels, args)?;
        }
        for i in 0..spec.nodes {
            c.wait_healthy(i)?;
        }
        Ok(c)
    }

    fn addr(&self, i: usize, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, self.subnet.0, self.subnet.1, i as u8 + 2)), port)
    }

    pub fn ca_dir(&self) -> &Path {
        &self.ca_dir
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A fresh, unrelated CA (for rogue peers).
    pub fn new_ca_dir(&self) -> PathBuf {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = self.root.join(format!("other-ca-{}", N.fetch_add(1, Ordering::Relaxed))).join("ca");
        run_cli(&["ca", "init", "--dir", dir.to_str().unwrap()]).expect("second CA");
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

    /// Starts one more agent with a certificate from the cluster CA.
    pub fn add_node(&mut self, name: &str, join: &[SocketAddr]) -> anyhow::Result<usize> {
        let i = self.spawn_new(name, None, join.to_vec(), vec![], vec![])?;
        self.wait_healthy(i)?;
        Ok(i)
    }

    /// Starts one more agent with the TLS material in `tls_dir` (e.g. from another CA).
    pub fn add_node_with_tls(&mut self, name: &str, tls_dir: PathBuf, join: &[SocketAddr]) -> anyhow::Result<usize> {
        let i = self.spawn_new(name, Some(tls_dir), join.to_vec(), vec![], vec![])?;
        self.wait_healthy(i)?;
        Ok(i)
    }

    fn spawn_new(
        &mut self,
        name: &str,
        tls: Option<PathBuf>,
        join: Vec<SocketAddr>,
        labels: Vec<(String, String)>,
        args: Vec<String>,
    ) -> anyhow::Result<usize> {
        let i = self.nodes.len();
        anyhow::ensure!(i < 250, "at most 250 nodes per cluster");
        let dir = self.root.join(name);
        std::fs::create_dir_all(&dir)?;
        let tls_dir = match tls {
            Some(t) => t,
            None => {
                let t = dir.join("tls");
                run_cli(&[
                    "cert",
                    "issue",
                    "--ca-dir",
                    self.ca_dir.to_str().unwrap(),
                    "--name",
                    name,
                    "--out",
                    t.to_str().unwrap(),
                ])?;
                t
            }
        };
        self.nodes.push(NodeHandle {
            name: name.into(),
            peer_addr: self.addr(i, PEER_PORT),
            api_addr: self.addr(i, API_PORT),
            data_dir: dir.join("data"),
            tls_dir,
            log_path: dir.join("agent.log"),
            join,
            labels,
            args,
            child: None,
            paused: false,
        });
        self.spawn(i)?;
        Ok(i)
    }

    fn spawn(&mut self, i: usize) -> anyhow::Result<()> {
        let n = &self.nodes[i];
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&n.log_path)?;
        let mut cmd = Command::new(trellis_bin());
        cmd.args(["agent", "--name", &n.name, "--profile", &self.profile])
            .args(["--bind", &n.peer_addr.to_string(), "--api", &n.api_addr.to_string()])
            .arg("--data-dir")
            .arg(&n.data_dir)
            .arg("--tls-dir")
            .arg(&n.tls_dir)
            .args(&self.extra_args)
            .args(&n.args)
            .env_remove("TRELLIS_HTTP_ADDR")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        for j in &n.join {
            cmd.args(["--join", &j.to_string()]);
        }
        for (k, v) in &n.labels {
            cmd.args(["--label", &format!("{k}={v}")]);
        }
        let child = cmd.spawn()?;
        let n = &mut self.nodes[i];
        n.child = Some(child);
        n.paused = false;
        Ok(())
    }

    fn wait_healthy(&self, i: usize) -> anyhow::Result<()> {
        let api = self.nodes[i].api();
        let res =
            self.wait_until(Duration::from_secs(20), &format!("{} to answer /v1/health", self.nodes[i].name), || {
                api.get_json("/v1/health").ok()
            });
        res.map(|_| ())
            .map_err(|e| anyhow::anyhow!("{e}\n--- log of {} ---\n{}", self.nodes[i].name, self.log_tail(i, 30)))
    }

    fn signal(&self, i: usize, sig: &str) {
        if let Some(pid) = self.nodes[i].pid() {
            let _ = Command::new("kill").args([sig, &pid.to_string()]).status();
        }
    }

    /// SIGKILL: a crash.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM: graceful leave; SIGKILL after 10 s.
    pub fn stop(&mut self, i: usize) {
        if self.nodes[i].paused {
            self.resume(i);
        }
        self.signal(i, "-TERM");
        if let Some(mut c) = self.nodes[i].child.take() {
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(10) {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn pause(&mut self, i: usize) {
        self.signal(i, "-STOP");
        self.nodes[i].paused = true;
    }

    pub fn resume(&mut self, i: usize) {
        self.signal(i, "-CONT");
        self.nodes[i].paused = false;
    }

    /// Same name, dirs and addresses; waits for its API.
    pub fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        if self.nodes[i].is_running() {
            self.kill(i);
        }
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
                        last = format!("{}: {e}", self.nodes[i].name);
                        return None;
                    }
                };
                for (name, state) in expect {
                    // The newest incarnation of a name is what counts.
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
        res.map(|_| start.elapsed()).map_err(|e| anyhow::anyhow!("{e}: {last}"))
    }

    pub fn log_tail(&self, i: usize, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.nodes[i].log_path).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
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
        }
    }
}

/// Serialises cluster starts that must not overlap (none today; kept for scenario runs).
pub static START_LOCK: Mutex<()> = Mutex::new(());
