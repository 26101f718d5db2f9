//! `trellis-chaos bench-flood`: an agent's memory and file descriptors (from /proc) while
//! (i) idle, (ii) clients flood its HTTP proxy and API with held TCP connections and then
//! with slowloris partial requests, (iii) a certified peer opens QUIC streams as fast as it
//! can. Every phase is bounded in count and time; every socket is closed at the end.
//! Run it with a raised descriptor limit, e.g.
//! `ulimit -n 65536 && cargo run -p trellis-chaos -- bench-flood`.

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cluster::{Cluster, ClusterSpec};

/// RSS in KiB and open descriptors of `pid`.
pub fn rss_and_fds(pid: u32) -> (u64, usize) {
    let kib = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0);
    (kib, fds)
}

/// This process's soft limit on open descriptors.
fn fd_limit() -> u64 {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(1024)
}

/// Peak RSS and fds of `pid`, sampled every 100 ms while `work` runs.
fn peak_while<T>(pid: u32, work: impl FnOnce() -> T) -> (T, u64, usize) {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut rss, mut fds) = rss_and_fds(pid);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (r, f) = rss_and_fds(pid);
                (rss, fds) = (rss.max(r), fds.max(f));
                std::thread::sleep(Duration::from_millis(100));
            }
            (rss, fds)
        })
    };
    let out = work();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (rss, fds) = sampler.join().expect("sampler");
    (out, rss, fds)
}

/// How long a health request to the API takes right now (None: no answer in 5 s).
fn health_latency(api: &crate::http::Api) -> Option<Duration> {
    let t = Instant::now();
    api.get_json("/v1/health").ok().map(|_| t.elapsed())
}

/// One line of the table; RSS also as a ratio to the idle figure of the same run.
fn row(phase: &str, (rss, fds): (u64, usize), idle: u64, note: &str) {
    let ratio = rss as f64 / idle.max(1) as f64;
    println!("{phase:<44} {:>8.1} MiB ({ratio:.2}x idle) {fds:>7} fds  {note}", rss as f64 / 1024.0);
}

/// Opens up to `n` connections to `to` and holds them for `hold`; returns how many opened.
fn hold_connections(targets: &[SocketAddr], n: usize, hold: Duration) -> (usize, usize) {
    let mut held = Vec::with_capacity(n);
    let mut failed = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    for i in 0..n {
        if Instant::now() > deadline {
            break;
        }
        match TcpStream::connect_timeout(&targets[i % targets.len()], Duration::from_millis(500)) {
            Ok(s) => held.push(s),
            Err(_) => failed += 1,
        }
    }
    std::thread::sleep(hold);
    // Which of them the agent has closed meanwhile (the header read timeout, the caps).
    let mut closed = 0;
    for s in &held {
        let _ = s.set_nonblocking(true);
        let mut b = [0u8; 1];
        let mut r: &TcpStream = s;
        closed += usize::from(matches!(std::io::Read::read(&mut r, &mut b), Ok(0)));
    }
    let opened = held.len();
    drop(held);
    let _ = failed;
    (opened, closed)
}

/// `n` connections that each send a request line and then one header byte per second.
fn slowloris(targets: &[SocketAddr], n: usize, secs: u64) -> (usize, usize) {
    let mut socks: Vec<TcpStream> = (0..n)
        .filter_map(|i| TcpStream::connect_timeout(&targets[i % targets.len()], Duration::from_millis(500)).ok())
        .collect();
    for s in &mut socks {
        let _ = s.write_all(b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ");
    }
    let opened = socks.len();
    for _ in 0..secs {
        std::thread::sleep(Duration::from_secs(1));
        socks.retain_mut(|s| s.write_all(b"a").is_ok());
    }
    let cut = opened - socks.len();
    (opened, cut)
}

/// A certified raw peer opening uni and bidi streams as fast as the agent grants them for
/// `secs`, each with one byte and never finished; returns the streams opened.
fn stream_flood(tls_dir: &std::path::Path, to: SocketAddr, secs: u64) -> anyhow::Result<(u64, u64)> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    rt.block_on(async {
        let tls = trellis_node::pki::load_tls_dir_unchecked(tls_dir)?;
        let sink: trellis_node::pki::RefusalSink = Arc::new(|_| {});
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(trellis_node::pki::client_config(&tls, sink)?)?;
        let mut client = quinn::ClientConfig::new(Arc::new(crypto));
        let mut transport = quinn::TransportConfig::default();
        transport.max_idle_timeout(Some(Duration::from_secs(30).try_into()?));
        client.transport_config(Arc::new(transport));
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
        endpoint.set_default_client_config(client);
        let conn = endpoint.connect(to, "trellis")?.await?;
        let until = tokio::time::Instant::now() + Duration::from_secs(secs);
        let (mut uni, mut bi) = (Vec::new(), Vec::new());
        while tokio::time::Instant::now() < until && uni.len() + bi.len() < 2_000_000 {
            let step = Duration::from_millis(20);
            if let Ok(Ok(mut s)) = tokio::time::timeout(step, conn.open_uni()).await {
                let _ = s.write_all(&[0x7e]).await;
                uni.push(s);
            }
            if let Ok(Ok((mut s, r))) = tokio::time::timeout(step, conn.open_bi()).await {
                let _ = s.write_all(&[0]).await;
                bi.push((s, r));
            }
        }
        let opened = (uni.len() as u64, bi.len() as u64);
        conn.close(0u32.into(), b"bench done");
        drop((uni, bi));
        endpoint.wait_idle().await;
        anyhow::Ok(opened)
    })
}

pub fn run(connections: usize, slow: usize, stream_secs: u64) -> anyhow::Result<()> {
    let limit = fd_limit();
    // Two sockets per connection on loopback would be the agent's; ours is one each.
    let connections = connections.min(limit.saturating_sub(200) as usize);
    println!("descriptor limit of this process (and the agents): {limit}; client connections per flood: {connections}");
    let proxy: SocketAddr = TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let node_args = vec![vec!["--proxy".to_string(), proxy.to_string()]];
    let c = Cluster::start(ClusterSpec { nodes: 2, node_args, ..Default::default() })?;
    let alive: Vec<(String, &str)> = (0..2).map(|i| (c.node(i).name.clone(), "alive")).collect();
    c.wait_all_see(&[0, 1], &alive, Duration::from_secs(20))?;
    let pid = c.node(0).pid().ok_or_else(|| anyhow::anyhow!("node 0 is not running"))?;
    let api = c.node(0).api();
    std::thread::sleep(Duration::from_secs(3));
    println!("{:<44} {:>26} {:>11}", "phase (node 0)", "peak RSS", "peak fds");
    let (idle_rss, idle_fds) = rss_and_fds(pid);
    row("idle", (idle_rss, idle_fds), idle_rss, "");

    let targets = [proxy, c.node(0).api_addr];
    let ((opened, closed), rss, fds) =
        peak_while(pid, || hold_connections(&targets, connections, Duration::from_secs(12)));
    let during = health_latency(&api);
    row(
        "held TCP connections (proxy + API), 12 s",
        (rss, fds),
        idle_rss,
        &format!("{opened} opened, {closed} closed by the agent after 12 s; health afterwards {during:?}"),
    );
    std::thread::sleep(Duration::from_secs(1));
    let ((opened, cut), rss, fds) = peak_while(pid, || slowloris(&targets, slow, 15));
    row(
        "slowloris (1 header byte/s), 15 s",
        (rss, fds),
        idle_rss,
        &format!("{opened} opened, {cut} cut by the header read timeout; health {:?}", health_latency(&api)),
    );
    std::thread::sleep(Duration::from_secs(1));
    let tls = c.root().join("flood-peer-tls");
    trellis_node::pki::issue_cert(c.ca_dir(), "flood-peer", &tls, Duration::from_secs(3600))?;
    let (res, rss, fds) = peak_while(pid, || stream_flood(&tls, c.node(0).peer_addr, stream_secs));
    let (uni, bi) = res?;
    let m = api.get_text("/metrics").unwrap_or_default();
    let timeouts =
        m.lines().find(|l| l.starts_with("trellis_peer_refused_total{reason=\"stream_timeout\"}")).unwrap_or("");
    row(
        &format!("peer stream flood, {stream_secs} s"),
        (rss, fds),
        idle_rss,
        &format!("{uni} uni + {bi} bidi streams opened; {timeouts}; health {:?}", health_latency(&api)),
    );
    std::thread::sleep(Duration::from_secs(2));
    let (after_rss, after_fds) = rss_and_fds(pid);
    row("after (2 s later)", (after_rss, after_fds), idle_rss, "");
    let members = c.node(1).api().members()?;
    let ok = members.iter().any(|m| m["name"] == c.node(0).name.as_str() && m["state"] == "alive");
    println!("node 0 alive in node 1's view at the end: {ok}");
    Ok(())
}
