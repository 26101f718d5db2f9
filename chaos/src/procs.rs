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
