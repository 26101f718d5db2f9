//! Helper processes a benchmark starts beside the agents (HAProxy, relays): free ports to
//! give them, a wait until they listen, and a handle that kills them on drop.

use std::net::SocketAddr;
use std::process::Child;
use std::time::{Duration, Instant};

/// Processes killed (and reaped) when dropped, so a failed run leaves none behind.
#[derive(Default)]
pub struct Children(pub Vec<Child>);

impl Children {
    pub fn pids(&self) -> Vec<u32> {
        self.0.iter().map(Child::id).collect()
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A port on `ip` nothing listens on now.
pub fn free(ip: &str) -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind((ip, 0))?.local_addr()?)
}

/// Waits up to 10 s until every address accepts connections.
pub fn wait_listening(addrs: &[SocketAddr]) -> anyhow::Result<()> {
    let end = Instant::now() + Duration::from_secs(10);
    for a in addrs {
        while std::net::TcpStream::connect_timeout(a, Duration::from_millis(200)).is_err() {
            anyhow::ensure!(Instant::now() < end, "nothing listened on {a} within 10 s");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(())
}

/// What /proc/<pid>/stat says of a process: its CPU time (user and kernel, all threads,
/// in clock ticks of 10 ms) and whether it has exited and waits to be reaped.
pub struct Stat {
    pub cpu_secs: f64,
    pub zombie: bool,
}

pub fn stat(pid: u32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, after) = text.rsplit_once(')')?;
    let f: Vec<&str> = after.split_whitespace().collect();
    // After the command: state, then utime and stime at 11 and 12 (of the whole group).
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0) / 100.0;
    Some(Stat { cpu_secs: tick(11) + tick(12), zombie: f.first() == Some(&"Z") })
}

/// Nanoseconds the process's threads have spent on a CPU, from each thread's
/// /proc/<pid>/task/<tid>/schedstat (exact, where /proc/<pid>/stat counts 10 ms ticks).
/// Threads that exited before the reading are not counted.
pub fn cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return 0 };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// Resident memory of a process in MiB.
pub fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    kb / 1024.0
}
