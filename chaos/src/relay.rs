//! The floor of the data-plane benchmark: two plain TCP relays in a chain (client, relay,
//! relay, server), each its own process on one tokio thread copying bytes both ways. No
//! TLS, no HTTP parsing, no routing: whatever CPU per request it costs, no two-hop proxy
//! on the same machine can cost less, so the mesh's figure is read against it.

use std::net::SocketAddr;
use std::process::{Command, Stdio};

use crate::procs::{free, wait_listening, Children};

/// Runs one relay until killed: every connection to `listen` is copied to a new one to `to`.
pub fn serve(listen: SocketAddr, to: SocketAddr) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        loop {
            let (mut client, _) = listener.accept().await?;
            tokio::spawn(async move {
                let _ = client.set_nodelay(true);
                if let Ok(mut server) = tokio::net::TcpStream::connect(to).await {
                    let _ = server.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    })
}

/// Two relay processes, on the two nodes' addresses, in front of `server`.
pub struct TwoRelays {
    children: Children,
    /// Where clients connect (the first relay).
    pub entry: SocketAddr,
}

impl TwoRelays {
    pub fn start(a_ip: &str, b_ip: &str, server: SocketAddr) -> anyhow::Result<TwoRelays> {
        let exe = std::env::current_exe()?;
        let (entry, second) = (free(a_ip)?, free(b_ip)?);
        let mut children = Children::default();
        for (listen, to) in [(second, server), (entry, second)] {
            let mut cmd = Command::new(&exe);
            cmd.args(["relay", "--listen", &listen.to_string(), "--to", &to.to_string()]);
            children.0.push(cmd.stdout(Stdio::null()).spawn()?);
        }
        let relays = TwoRelays { children, entry };
        wait_listening(&[second, entry])?;
        Ok(relays)
    }

    pub fn pids(&self) -> Vec<u32> {
        self.children.pids()
    }
}
