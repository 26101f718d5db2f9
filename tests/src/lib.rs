//! Helpers shared by the multi-node integration tests: a raw QUIC peer that speaks mTLS
//! with any certificate, to play hostile or broken peers against real agents.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use trellis_node::pki;

/// Connects to an agent's peer port presenting the certificate in `tls_dir`, and returns
/// the connection (or the handshake error).
pub async fn raw_peer(tls_dir: &Path, to: SocketAddr) -> anyhow::Result<quinn::Connection> {
    let tls = pki::load_tls_dir_unchecked(tls_dir)?;
    let sink: pki::RefusalSink = Arc::new(|_| {});
    connect(pki::client_config(&tls, sink)?, to).await
}

/// Connects presenting no client certificate at all (the server is still verified).
pub async fn raw_peer_without_certificate(tls_dir: &Path, to: SocketAddr) -> anyhow::Result<quinn::Connection> {
    let tls = pki::load_tls_dir_unchecked(tls_dir)?;
    let sink: pki::RefusalSink = Arc::new(|_| {});
    let mut cfg = pki::client_config(&tls, sink)?;
    cfg.client_auth_cert_resolver = Arc::new(NoClientCert);
    connect(cfg, to).await
}

#[derive(Debug)]
struct NoClientCert;

impl rustls::client::ResolvesClientCert for NoClientCert {
    fn resolve(&self, _: &[&[u8]], _: &[rustls::SignatureScheme]) -> Option<Arc<rustls::sign::CertifiedKey>> {
        None
    }

    fn has_certs(&self) -> bool {
        false
    }
}

async fn connect(cfg: rustls::ClientConfig, to: SocketAddr) -> anyhow::Result<quinn::Connection> {
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(cfg)?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(Duration::from_secs(5).try_into()?));
    client.transport_config(Arc::new(transport));
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    endpoint.set_default_client_config(client);
    Ok(endpoint.connect(to, "trellis")?.await?)
}

/// Reads one counter (any labels given inline, e.g. `x_total{reason="expired"}`) from a
/// Prometheus text document.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (k, v) = l.rsplit_once(' ')?;
        (k == name).then(|| v.parse().ok())?
    })
}

/// Plain HTTP/1.1 over std sockets, for tests that drive the mesh's proxy listener.
pub mod http {
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpListener, TcpStream};
    use std::time::Duration;

    /// A server answering every request with 200 and `<body> <path>`, one thread per
    /// connection.
    pub fn server(body: &'static str) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind a test server");
        let addr = l.local_addr().expect("local addr");
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                std::thread::spawn(move || answer(s, body));
            }
        });
        addr
    }

    fn answer(mut s: TcpStream, body: &str) {
        let mut buf = [0u8; 4096];
        let mut got = Vec::new();
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        let path = String::from_utf8_lossy(&got).split_whitespace().nth(1).unwrap_or("").to_string();
        let text = format!("{body} {path}");
        let resp = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}", text.len());
        let _ = s.write_all(resp.as_bytes());
    }

    /// A response: status code, header block (lowercased) and body.
    pub struct Reply {
        pub status: u16,
        pub headers: String,
        pub body: String,
    }

    impl Reply {
        pub fn header(&self, name: &str) -> Option<&str> {
            self.headers.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(": "))
        }
    }

    /// One GET through `proxy` with `Host: host` and extra headers; status 0 when the
    /// connection failed.
    pub fn get(proxy: SocketAddr, host: &str, path: &str, extra: &[(&str, &str)]) -> Reply {
        let fail = Reply { status: 0, headers: String::new(), body: String::new() };
        let Ok(mut s) = TcpStream::connect(proxy) else { return fail };
        let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
        let mut req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
        for (k, v) in extra {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        if s.write_all(req.as_bytes()).is_err() {
            return fail;
        }
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
        let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        let headers = head.lines().skip(1).map(|l| l.to_ascii_lowercase()).collect::<Vec<_>>().join("\n");
        Reply { status, headers, body: body.to_string() }
    }
}
