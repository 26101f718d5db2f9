//! `trellis dev`: a throwaway local cluster of real agent processes, for trying Trellis.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command};
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
    /// Exit once the cluster has formed instead of running until Ctrl-C (for scripts).
    #[arg(long)]
    pub exit_when_ready: bool,
}

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
    let exe = std::env::current_exe()?;
    let mut children: Vec<Child> = Vec::new();
    for i in 0..args.nodes {
        let name = format!("node{}", i + 1);
        let node_dir = dir.join(&name);
        crate::pki::issue_cert(&ca, &name, &node_dir.join("tls"), Duration::from_secs(7 * 86_400))?;
        let log = std::fs::File::create(node_dir.join("agent.log"))?;
        let mut cmd = Command::new(&exe);
        cmd.args(["agent", "--name", &name, "--profile", "fast"])
            .args(["--bind", &addr(i, 7946).to_string(), "--api", &addr(i, 8500).to_string()])
            .args(["--proxy", &addr(i, 15001).to_string()])
            .args(["--label", &format!("zone=dev-{}", (b'a' + i % 3) as char)])
            .arg("--data-dir")
            .arg(node_dir.join("data"))
            .arg("--tls-dir")
            .arg(node_dir.join("tls"))
            .stderr(log);
        if i > 0 {
            cmd.args(["--join", &addr(0, 7946).to_string()]);
        }
        children.push(cmd.spawn()?);
    }
    let api = addr(0, 8500);
    let formed = wait_formed(api, args.nodes as usize, Duration::from_secs(30));
    println!("Trellis dev cluster: {} agents, mTLS with a throwaway CA in {}", args.nodes, dir.display());
    for i in 0..args.nodes {
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
    if !formed {
        eprintln!("warning: the cluster did not form within 30 s; see the agent.log files in {}", dir.display());
    }
    println!("\nTry: TRELLIS_HTTP_ADDR={api} {} members", exe.display());
    if args.exit_when_ready {
        stop_all(&mut children);
        anyhow::ensure!(formed, "cluster did not form");
        return Ok(());
    }
    println!("Ctrl-C stops the cluster (each agent leaves gracefully).");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async { tokio::signal::ctrl_c().await })?;
    stop_all(&mut children);
    Ok(())
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

/// SIGTERM each agent (graceful leave), then wait for them.
fn stop_all(children: &mut [Child]) {
    for c in children.iter() {
        let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
    }
    for c in children.iter_mut() {
        let _ = c.wait();
    }
}
