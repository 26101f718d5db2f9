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
