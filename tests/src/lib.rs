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
    Ok(connect_endpoint(cfg, to).await?.1)
}

/// Like [`raw_peer`], also returning the client endpoint (its address is the peer's).
pub async fn raw_peer_endpoint(tls_dir: &Path, to: SocketAddr) -> anyhow::Result<(quinn::Endpoint, quinn::Connection)> {
    let tls = pki::load_tls_dir_unchecked(tls_dir)?;
    let sink: pki::RefusalSink = Arc::new(|_| {});
    connect_endpoint(pki::client_config(&tls, sink)?, to).await
}

async fn connect_endpoint(
    cfg: rustls::ClientConfig,
    to: SocketAddr,
) -> anyhow::Result<(quinn::Endpoint, quinn::Connection)> {
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(cfg)?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(Duration::from_secs(5).try_into()?));
    client.transport_config(Arc::new(transport));
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    endpoint.set_default_client_config(client);
    let conn = endpoint.connect(to, "trellis")?.await?;
    Ok((endpoint, conn))
}

/// A certified peer driven by a real membership core, so it speaks valid gossip: tests use
/// it to play a member that floods, claims another name, or forges notices.
pub struct GossipPeer {
    pub endpoint: quinn::Endpoint,
    pub conn: quinn::Connection,
    pub core: trellis_core::membership::Membership,
    /// The agent's name, from its certificate (what the core is told the sender is).
    pub agent_name: String,
}

impl GossipPeer {
    /// Connects with the certificate in `tls_dir` and gossips as `name` (which may lie);
    /// the advertised address is the peer's own, so the agent answers on this connection.
    pub async fn connect(tls_dir: &Path, to: SocketAddr, name: &str) -> anyhow::Result<GossipPeer> {
        use trellis_core::membership::{Membership, Profile};
        let (endpoint, conn) = raw_peer_endpoint(tls_dir, to).await?;
        let agent_name = peer_cert_name(&conn)?;
        let identity = trellis_proto::NodeIdentity {
            addr: endpoint.local_addr()?,
            generation: 1,
            name: name.to_string(),
            meta: trellis_proto::NodeMeta::default(),
        };
        let mut core = Membership::new(identity, &Profile::Fast.timing(), 8, 7);
        core.join(std::time::Instant::now(), &[to]);
        Ok(GossipPeer { endpoint, conn, core, agent_name })
    }

    /// Runs the core for `d`: sends what it wants sent, feeds it what the agent answers.
    pub async fn pump(&mut self, d: Duration) {
        let until = tokio::time::Instant::now() + d;
        loop {
            while let Some(t) = self.core.poll_transmit() {
                let _ = self.conn.send_datagram(bytes::Bytes::from(t.data));
            }
            let now = std::time::Instant::now();
            let wake = self.core.poll_timeout().map(tokio::time::Instant::from_std).unwrap_or(until).min(until);
            tokio::select! {
                d = self.conn.read_datagram() => match d {
                    Ok(d) => { let _ = self.core.handle_datagram(now, Some(&self.agent_name), &d); }
                    Err(_) => return,
                },
                _ = tokio::time::sleep_until(wake) => self.core.handle_timeout(std::time::Instant::now()),
            }
            if tokio::time::Instant::now() >= until {
                return;
            }
        }
    }

    /// The agent's full identity as its gossip told us, once joined.
    pub fn agent_identity(&self) -> Option<trellis_proto::NodeIdentity> {
        self.core.members().into_iter().map(|m| m.id).find(|id| id.name == self.agent_name)
    }
}

fn peer_cert_name(conn: &quinn::Connection) -> anyhow::Result<String> {
    let certs = conn
        .peer_identity()
        .and_then(|any| any.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>().ok())
        .ok_or_else(|| anyhow::anyhow!("agent presented no certificate"))?;
    Ok(pki::peer_identity(certs.first().ok_or_else(|| anyhow::anyhow!("empty chain"))?)?.name)
}

/// Resident memory and open file descriptors of a process, from /proc.
pub fn rss_and_fds(pid: u32) -> Option<(u64, usize)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib =
        status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count();
    Some((kib, fds))
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

    /// One POST of `body` through `proxy`; status 0 when the connection failed.
    pub fn post(proxy: SocketAddr, host: &str, path: &str, body: &[u8]) -> Reply {
        let no = Reply { status: 0, headers: String::new(), body: Vec::new() };
        plain::send(proxy, ("POST", host, path), &[], Some(body), Duration::from_secs(10)).unwrap_or(no)
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
