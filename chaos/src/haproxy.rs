//! HAProxy as the same two-hop path an operator might build instead of a mesh: a
//! client-side instance routing HTTP by Host (and a TCP port for bulk), mutual TLS to a
//! server-side instance, which hands plain TCP to the server. Both instances use the
//! cluster's own certificates, so the TLS work matches the mesh's.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::procs::{free, wait_listening, Children};

/// Two running HAProxy processes; killed on drop.
pub struct TwoHop {
    children: Children,
    /// The client-side HTTP listener (route by `Host: remote`).
    pub http: SocketAddr,
    /// The client-side TCP listener for bulk transfers.
    pub tcp: SocketAddr,
}

impl TwoHop {
    pub fn pids(&self) -> Vec<u32> {
        self.children.pids()
    }
}

/// HAProxy wants certificate and key in one PEM file.
fn bundle(tls: &Path, out: &Path) -> anyhow::Result<PathBuf> {
    let mut pem = std::fs::read_to_string(tls.join("node.pem"))?;
    pem.push_str(&std::fs::read_to_string(tls.join("node.key"))?);
    std::fs::write(out, pem)?;
    Ok(out.to_path_buf())
}

/// Starts the pair on free ports: client side on `a_ip`, server side on `b_ip`,
/// forwarding HTTP to `http_server` and TCP to `sink`. `a_tls`/`b_tls` are node TLS
/// dirs (node.pem, node.key, ca.pem) of the same CA.
pub fn start(
    dir: &Path,
    (a_ip, a_tls): (&str, &Path),
    (b_ip, b_tls): (&str, &Path),
    http_server: SocketAddr,
    sink: SocketAddr,
) -> anyhow::Result<TwoHop> {
    which()?;
    std::fs::create_dir_all(dir)?;
    let ca = a_tls.join("ca.pem");
    let (a_pem, b_pem) = (bundle(a_tls, &dir.join("a.pem"))?, bundle(b_tls, &dir.join("b.pem"))?);
    let (http, tcp) = (free(a_ip)?, free(a_ip)?);
    let (b_http, b_tcp) = (free(b_ip)?, free(b_ip)?);
    let common =
        "global\n  maxconn 8000\n\ndefaults\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\n";
    let client_side = format!(
        "{common}frontend web\n  mode http\n  bind {http}\n  acl remote hdr(host) -i remote\n  use_backend hop_http if remote\n\n\
         backend hop_http\n  mode http\n  http-reuse always\n  server b {b_http} ssl crt {a} ca-file {ca} verify required\n\n\
         frontend bulk\n  mode tcp\n  bind {tcp}\n  default_backend hop_tcp\n\n\
         backend hop_tcp\n  mode tcp\n  server b {b_tcp} ssl crt {a} ca-file {ca} verify required\n",
        a = a_pem.display(),
        ca = ca.display()
    );
    let server_side = format!(
        "{common}frontend from_a_http\n  mode http\n  bind {b_http} ssl crt {b} ca-file {ca} verify required\n  default_backend app\n\n\
         backend app\n  mode http\n  http-reuse always\n  server s {http_server}\n\n\
         frontend from_a_tcp\n  mode tcp\n  bind {b_tcp} ssl crt {b} ca-file {ca} verify required\n  default_backend sink\n\n\
         backend sink\n  mode tcp\n  server s {sink}\n",
        b = b_pem.display(),
        ca = ca.display()
    );
    let mut children = Children::default();
    for (name, text) in [("client-side", client_side), ("server-side", server_side)] {
        let cfg = dir.join(format!("{name}.cfg"));
        std::fs::write(&cfg, text)?;
        let check = Command::new("haproxy").arg("-c").arg("-q").arg("-f").arg(&cfg).output()?;
        anyhow::ensure!(check.status.success(), "haproxy {name}: {}", String::from_utf8_lossy(&check.stderr));
        let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
        children
            .0
            .push(Command::new("haproxy").arg("-db").arg("-f").arg(&cfg).stdout(log.try_clone()?).stderr(log).spawn()?);
    }
    let pair = TwoHop { children, http, tcp };
    wait_listening(&[http, tcp, b_http, b_tcp])?;
    Ok(pair)
}

fn which() -> anyhow::Result<()> {
    match Command::new("haproxy").arg("-v").stdout(Stdio::null()).status() {
        Ok(s) if s.success() => Ok(()),
        _ => anyhow::bail!("haproxy is not installed: `apt-get install -y haproxy` (chaos/bench-mesh.sh does it)"),
    }
}
