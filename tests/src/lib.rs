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

/// HTTP/1.1 test servers and a client, over the harness's plain sockets.
pub mod http {
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use trellis_chaos::plain;
    pub use trellis_chaos::plain::Reply;

    /// A server answering every request with 200 and `<body> <path>`.
    pub fn server(body: &'static str) -> SocketAddr {
        plain::serve(move |head| (200, format!("{body} {}", plain::path_of(head)).into_bytes()))
    }

    /// A server that waits `delay`, then answers `status` with `body`.
    pub fn slow_server(delay: Duration, status: u16, body: &'static str) -> SocketAddr {
        plain::serve(move |_| {
            std::thread::sleep(delay);
            (status, body.as_bytes().to_vec())
        })
    }

    /// Answers `body`, but `/healthz` answers 500 once `healthy` is cleared.
    pub fn health_server(body: &'static str, healthy: Arc<AtomicBool>) -> SocketAddr {
        plain::serve(move |head| {
            let failing = plain::path_of(head) == "/healthz" && !healthy.load(Ordering::SeqCst);
            (if failing { 500 } else { 200 }, body.as_bytes().to_vec())
        })
    }

    /// One GET through `proxy` with `Host: host` and extra headers; status 0 when the
    /// connection failed.
    pub fn get(proxy: SocketAddr, host: &str, path: &str, extra: &[(&str, &str)]) -> Reply {
        plain::get(proxy, host, path, extra, Duration::from_secs(10)).unwrap_or(Reply {
            status: 0,
            headers: String::new(),
            body: Vec::new(),
        })
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
