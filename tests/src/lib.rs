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

    /// A server that waits `delay`, then answers `status` with `body`.
    pub fn slow_server(delay: Duration, status: u16, body: &'static str) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind a test server");
        let addr = l.local_addr().expect("local addr");
        std::thread::spawn(move || {
            for mut s in l.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    let _ = s.read(&mut buf);
                    std::thread::sleep(delay);
                    let resp = format!(
                        "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = s.write_all(resp.as_bytes());
                });
            }
        });
        addr
    }

    /// Like [`server`], but `/healthz` answers 200 while `healthy` is set and 500 after.
    pub fn health_server(body: &'static str, healthy: std::sync::Arc<std::sync::atomic::AtomicBool>) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind a test server");
        let addr = l.local_addr().expect("local addr");
        std::thread::spawn(move || {
            for mut s in l.incoming().flatten() {
                let healthy = healthy.clone();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    let n = s.read(&mut buf).unwrap_or(0);
                    let head = String::from_utf8_lossy(&buf[..n]);
                    let probe = head.starts_with("GET /healthz ");
                    let status = if probe && !healthy.load(std::sync::atomic::Ordering::SeqCst) { 500 } else { 200 };
                    let resp = format!(
                        "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = s.write_all(resp.as_bytes());
                });
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

/// HTTP/2 with prior knowledge (h2c), as gRPC speaks it: a server and a client.
pub mod h2 {
    use std::net::SocketAddr;

    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper::{HeaderMap, Request, Response};
    use hyper_util::rt::{TokioExecutor, TokioIo};

    /// A server that answers every request with its body echoed back, a `x-served-by:
    /// <name>` header and a `grpc-status: 0` trailer. Runs on its own thread and runtime.
    pub fn echo_server(name: &'static str) -> SocketAddr {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        l.set_nonblocking(true).expect("nonblocking");
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async move {
                let l = tokio::net::TcpListener::from_std(l).expect("listener");
                loop {
                    let Ok((tcp, _)) = l.accept().await else { continue };
                    tokio::spawn(async move {
                        let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| async move {
                            let body = req.into_body().collect().await?.to_bytes();
                            let mut trailers = HeaderMap::new();
                            trailers.insert("grpc-status", "0".parse().expect("value"));
                            let body = Full::new(body)
                                .map_err(|never| match never {})
                                .with_trailers(async move { Some(Ok::<_, hyper::Error>(trailers)) });
                            let resp = Response::builder()
                                .header("content-type", "application/grpc")
                                .header("x-served-by", name)
                                .body(body)
                                .expect("response");
                            Ok::<_, hyper::Error>(resp)
                        });
                        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(tcp), svc)
                            .await;
                    });
                }
            });
        });
        addr
    }

    /// What came back: status, the `x-served-by` header, body, and the `grpc-status`
    /// trailer.
    pub struct Reply {
        pub status: u16,
        pub served_by: String,
        pub body: Bytes,
        pub grpc_status: Option<String>,
    }

    /// One POST over HTTP/2 with prior knowledge to `proxy`, with `:authority` set.
    pub async fn post(proxy: SocketAddr, authority: &str, path: &str, body: Bytes) -> anyhow::Result<Reply> {
        let tcp = tokio::net::TcpStream::connect(proxy).await?;
        let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = Request::post(format!("http://{authority}{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(body))?;
        let resp = send.send_request(req).await?;
        let status = resp.status().as_u16();
        let served_by = resp.headers().get("x-served-by").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        let collected = resp.into_body().collect().await?;
        let grpc_status =
            collected.trailers().and_then(|t| t.get("grpc-status")).and_then(|v| v.to_str().ok()).map(String::from);
        Ok(Reply { status, served_by, body: collected.to_bytes(), grpc_status })
    }
}
