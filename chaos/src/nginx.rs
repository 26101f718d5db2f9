//! nginx as the benchmark's instance: a real HTTP server in its own process, so the load
//! generator, the server and the proxies under test never share a runtime. One process
//! (no master), keep-alive connections held for the whole run, a static body.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::procs::{free, wait_listening, Children};

/// A running nginx; killed on drop.
pub struct Nginx {
    _children: Children,
    pub addr: SocketAddr,
}

/// Starts nginx on a free port of `ip`, answering every GET with `body` bytes.
pub fn start(dir: &Path, ip: &str, body: usize) -> anyhow::Result<Nginx> {
    which()?;
    let www = dir.join("www");
    std::fs::create_dir_all(dir.join("tmp"))?;
    std::fs::create_dir_all(&www)?;
    std::fs::write(www.join("index.html"), vec![b'x'; body])?;
    let addr = free(ip)?;
    let d = dir.display();
    // Root keeps its own user: with no master process there are no workers to drop to.
    let conf = format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
         events {{ worker_connections 8192; }}\n\
         http {{\n  access_log off;\n  keepalive_requests 10000000;\n  keepalive_timeout 300s;\n\
           client_body_temp_path {d}/tmp;\n  proxy_temp_path {d}/tmp;\n  fastcgi_temp_path {d}/tmp;\n\
           uwsgi_temp_path {d}/tmp;\n  scgi_temp_path {d}/tmp;\n\
           server {{\n    listen {addr};\n    root {www};\n  }}\n}}\n",
        www = www.display()
    );
    let cfg = dir.join("nginx.conf");
    std::fs::write(&cfg, conf)?;
    let log = std::fs::File::create(dir.join("stderr.log"))?;
    let child = Command::new("nginx")
        .arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(&cfg)
        .arg("-e")
        .arg(dir.join("error.log"))
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    let nginx = Nginx { _children: Children(vec![child]), addr };
    wait_listening(&[addr])?;
    Ok(nginx)
}

fn which() -> anyhow::Result<()> {
    match Command::new("nginx").arg("-v").stderr(Stdio::null()).status() {
        Ok(s) if s.success() => Ok(()),
        _ => anyhow::bail!("nginx is not installed: `apt-get install -y nginx-light` (chaos/bench-mesh.sh does it)"),
    }
}
