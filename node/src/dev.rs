//! `trellis dev`: a throwaway local cluster of real agent processes, for trying Trellis.
//!
//! The agents are children whose stdin is a pipe from this process: they stop gracefully
//! when it closes, so they never outlive `dev`, whether it stops on a signal or is killed.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Args;

#[derive(Args, Debug)]
pub struct DevArgs {
    /// How many agents to start.
    #[arg(long, default_value_t = 3)]
    pub nodes: u8,
    /// Where to keep the CA, certificates, data and logs (default: a new temp dir).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Exit once the cluster has formed (and the demo answers) instead of running until
    /// a signal (for scripts).
    #[arg(long)]
    pub exit_when_ready: bool,
    /// Start no demo service.
    #[arg(long)]
    pub no_demo: bool,
}

/// Dev certificates outlive any dev session without tripping the 30-day expiry warning.
const CERT_LIFETIME: Duration = Duration::from_secs(365 * 86_400);
/// How long agents get to leave gracefully after their pipe closes, before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Node i listens on 127.0.0.(i+2): peer UDP 7946, API 8500, so every agent looks like a host.
fn addr(i: u8, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + i)), port)
}

pub fn run(args: DevArgs) -> anyhow::Result<()> {
    anyhow::ensure!((1..=50).contains(&args.nodes), "--nodes: {} is out of range; use 1 to 50", args.nodes);
    let dir = match args.dir {
        Some(d) => d,
        None => std::env::temp_dir().join(format!("trellis-dev-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir)?;
    let ca = dir.join("ca");
    if !ca.join("ca.pem").exists() {
        crate::pki::init_ca(&ca, None)?;
    }
    // One worker thread runs the demo's servers while the main thread waits and prints.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let mut agents = Agents::start(&dir, &ca, args.nodes)?;
    let api = addr(0, 8500);
    let formed = wait_formed(api, args.nodes as usize, Duration::from_secs(30));
    print_cluster(&dir, args.nodes, api);
    if !formed {
        eprintln!("warning: the cluster did not form within 30 s; see the agent.log files in {}", dir.display());
    }
    let demo = match (args.no_demo, formed) {
        (false, true) => Some(crate::dev_demo::start(&rt, &dir, args.nodes, addr)),
        _ => None,
    };
    if let Some(Err(e)) = &demo {
        eprintln!("warning: the demo service did not come up: {e:#}");
    }
    let exe = std::env::current_exe()?;
    match &demo {
        Some(Ok(d)) => print!("{}", crate::dev_demo::try_commands(d, &exe)),
        _ => println!("\nTry: TRELLIS_HTTP_ADDR={api} {} members", exe.display()),
    }
    if args.exit_when_ready {
        agents.stop();
        anyhow::ensure!(formed, "cluster did not form");
        if let Some(Err(e)) = demo {
            return Err(e.context("the demo service did not come up"));
        }
        return Ok(());
    }
    println!("\nCtrl-C (or SIGTERM, SIGHUP) stops the cluster; each agent leaves gracefully.");
    let signal = rt.block_on(wait_for_stop_signal())?;
    println!("{signal}: stopping the agents");
    agents.stop();
    Ok(())
}

fn print_cluster(dir: &Path, nodes: u8, api: SocketAddr) {
    println!("Trellis dev cluster: {nodes} agents, mTLS with a throwaway CA in {}", dir.display());
    for i in 0..nodes {
        println!(
            "  node{}  peer {}  api http://{}  http proxy {}",
            i + 1,
            addr(i, 7946),
            addr(i, 8500),
            addr(i, 15001)
        );
    }
    match crate::client::fetch_members(api) {
        Ok(m) => print!("\n{}", crate::client::member_table(&m)),
        Err(e) => eprintln!("could not list members: {e:#}"),
    }
}

/// The agent processes, each holding the read end of a pipe whose write end is here.
struct Agents {
    children: Vec<Child>,
}

impl Agents {
    /// Node 1 also holds the CA (a signer), so renewal and `trellis token create` work as in
    /// a real cluster.
    fn start(dir: &Path, ca: &Path, nodes: u8) -> anyhow::Result<Agents> {
        let exe = std::env::current_exe()?;
        let mut agents = Agents { children: Vec::new() };
        for i in 0..nodes {
            let name = format!("node{}", i + 1);
            let node_dir = dir.join(&name);
            crate::pki::issue_cert(ca, &name, &node_dir.join("tls"), CERT_LIFETIME)?;
            let log = std::fs::File::create(node_dir.join("agent.log"))?;
            let mut cmd = Command::new(&exe);
            cmd.args(["agent", "--name", &name, "--profile", "fast", "--stop-with-stdin"])
                .args(["--bind", &addr(i, 7946).to_string(), "--api", &addr(i, 8500).to_string()])
                .args(["--proxy", &addr(i, 15001).to_string()])
                // Each agent on this host gets its own block of virtual service addresses.
                .args(["--virtual-range", &format!("127.{}.0.0/16", 100 + i)])
                .args(["--label", &format!("zone=dev-{}", (b'a' + i % 3) as char)])
                .arg("--data-dir")
                .arg(node_dir.join("data"))
                .arg("--tls-dir")
                .arg(node_dir.join("tls"))
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(log);
            if i == 0 {
                cmd.arg("--ca-dir").arg(ca);
            } else {
                cmd.args(["--join", &addr(0, 7946).to_string()]);
            }
            // On failure the agents started so far stop as `agents` drops.
            agents.children.push(cmd.spawn()?);
        }
        Ok(agents)
    }

    /// Closes every agent's pipe (each leaves the cluster and exits), waits for them, and
    /// kills any that has not exited within [`STOP_GRACE`].
    fn stop(&mut self) {
        for c in &mut self.children {
            drop(c.stdin.take());
        }
        let deadline = Instant::now() + STOP_GRACE;
        for c in &mut self.children {
            while Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(50));
            }
            if matches!(c.try_wait(), Ok(None)) {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
        self.children.clear();
    }
}

impl Drop for Agents {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The first of SIGINT, SIGTERM and SIGHUP, by name.
async fn wait_for_stop_signal() -> anyhow::Result<&'static str> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(tokio::select! {
        _ = int.recv() => "SIGINT",
        _ = term.recv() => "SIGTERM",
        _ = hup.recv() => "SIGHUP",
    })
}

fn wait_formed(api: SocketAddr, n: usize, within: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < within {
        if let Ok(m) = crate::client::fetch_members(api) {
            if m.iter().filter(|m| m.state == trellis_core::membership::MemberState::Alive).count() >= n {
                return true;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}
