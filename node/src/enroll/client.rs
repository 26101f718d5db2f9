//! The requesting side: a joiner with a token and no certificate, or a member renewing its
//! certificate over mTLS. One connection, one stream, one request, one response.

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use super::token::JoinToken;
use crate::pki::{self, PkiError};
use trellis_proto::enroll::{self as wire, Credentials, Refusal, Request, Response};

/// The whole exchange, handshake included, ends within this.
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a request did not get a certificate.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The signer answered no, saying why.
    #[error("{} refused ({}): {}", .at, .refusal.code, .refusal.message)]
    Refused { at: SocketAddr, refusal: Refusal },
    /// Anything else: unreachable, wrong CA, bad answer.
    #[error("{0}")]
    Failed(String),
}

/// The joiner checks the server against the CA whose hash the token carries: the server
/// sends the CA after its leaf on enrollment connections (see `pki::LiveIdentity`).
struct PinnedCa {
    ca_sha256: String,
    cluster_id: String,
    provider: Arc<rustls::crypto::CryptoProvider>,
    /// The precise reason of a refusal, for the operator (TLS alerts carry none).
    why: Mutex<Option<String>>,
}

impl fmt::Debug for PinnedCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PinnedCa({})", self.ca_sha256)
    }
}

impl PinnedCa {
    fn check(&self, leaf: &CertificateDer<'_>, rest: &[CertificateDer<'_>], now: UnixTime) -> Result<(), String> {
        let Some(ca) = rest.iter().find(|c| pki::sha256_hex(c) == self.ca_sha256) else {
            let seen: Vec<String> = rest.iter().map(|c| pki::sha256_hex(c)).collect();
            return Err(format!(
                "CA hash mismatch: the server's CA has SHA-256 {}, the token pins {}; this seed belongs to another cluster (or the token does): join through a node of the cluster that made the token",
                seen.first().map(String::as_str).unwrap_or("(none sent; an older agent?)"),
                self.ca_sha256
            ));
        };
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone().into_owned()).map_err(|e| format!("the pinned CA is not a usable CA: {e}"))?;
        let parsed = rustls::server::ParsedCertificate::try_from(leaf).map_err(|e| e.to_string())?;
        let algs = self.provider.signature_verification_algorithms.all;
        rustls::client::verify_server_cert_signed_by_trust_anchor(&parsed, &roots, &[], now, algs)
            .map_err(|e| format!("the server's certificate does not verify against the pinned CA: {e}"))?;
        pki::check_cluster(leaf, &self.cluster_id).map_err(|r| {
            format!(
                "the server's certificate is not of cluster {:?} ({}); check the token",
                self.cluster_id,
                r.as_str()
            )
        })
    }
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity, intermediates, now).map(|()| ServerCertVerified::assertion()).map_err(|why| {
            *self.why.lock().expect("why lock") = Some(why.clone());
            rustls::Error::General(why)
        })
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

fn quic_client(tls: rustls::ClientConfig) -> Result<quinn::ClientConfig, RequestError> {
    let crypto =
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| RequestError::Failed(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    let mut t = quinn::TransportConfig::default();
    // A handshake on any real network takes well under this; silence means unreachable.
    t.max_idle_timeout(Some(Duration::from_secs(5).try_into().expect("fits")));
    cfg.transport_config(Arc::new(t));
    Ok(cfg)
}

/// Connects, sends `req`, reads the response. `why` holds a verifier's precise refusal.
async fn exchange(
    endpoint: &quinn::Endpoint,
    cfg: quinn::ClientConfig,
    to: SocketAddr,
    req: &Request,
    why: Option<&Mutex<Option<String>>>,
) -> Result<Response, RequestError> {
    let failed = |what: String| RequestError::Failed(format!("{to}: {what}"));
    let run = async {
        let connecting = endpoint.connect_with(cfg, to, "trellis").map_err(|e| failed(e.to_string()))?;
        let conn = connecting.await.map_err(|e| {
            let detail = why.and_then(|w| w.lock().expect("why lock").take());
            failed(detail.unwrap_or_else(|| handshake_hint(&e)))
        })?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| failed(e.to_string()))?;
        send.write_all(&wire::encode(req)).await.map_err(|e| failed(e.to_string()))?;
        send.finish().map_err(|e| failed(e.to_string()))?;
        let bytes = recv.read_to_end(wire::MAX_MESSAGE).await.map_err(|e| failed(format!("no answer: {e}")))?;
        conn.close(0u32.into(), b"done");
        wire::decode::<Response>(&bytes).map_err(failed)
    };
    tokio::time::timeout(EXCHANGE_TIMEOUT, run).await.unwrap_or_else(|_| {
        Err(failed(format!(
            "no answer within {EXCHANGE_TIMEOUT:?}; check the address and that UDP to it is not blocked"
        )))
    })
}

fn handshake_hint(e: &quinn::ConnectionError) -> String {
    let s = e.to_string();
    if s.contains("no_application_protocol") || s.contains("120") {
        format!("{s} (the peer does not offer enrollment: an older agent?)")
    } else if s.contains("timed out") {
        format!("{s}: nothing answered; check the address and that UDP to it is not blocked")
    } else {
        s
    }
}

/// What a joiner got: the files are written, the key never left this host.
pub struct Enrolled {
    pub signer: SocketAddr,
    pub not_after_ms: i64,
}

/// Enrolls `name` with `token`: makes a key, sends a CSR to the token's signer (or the
/// seeds, following one redirect to a signer), checks and writes the result into `tls_dir`.
pub async fn join(token: &JoinToken, seeds: &[SocketAddr], name: &str, tls_dir: &Path) -> Result<Enrolled, String> {
    let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let csr = pki::make_csr(&key, name).map_err(|e| e.to_string())?;
    let (id, secret) = token.credentials();
    let mut targets: Vec<SocketAddr> = token.signer.into_iter().chain(seeds.iter().copied()).collect();
    if targets.is_empty() {
        return Err("join: no address to enroll through; give --join SEED (or a token made with --signer)".into());
    }
    let bind: SocketAddr = if targets[0].is_ipv6() { "[::]:0" } else { "0.0.0.0:0" }.parse().expect("literal");
    let endpoint = quinn::Endpoint::client(bind).map_err(|e| format!("cannot open a UDP socket: {e}"))?;
    let mut errors = Vec::new();
    let mut redirected = false;
    let mut i = 0;
    while i < targets.len() {
        let to = targets[i];
        i += 1;
        let pinned = Arc::new(PinnedCa {
            ca_sha256: token.ca_sha256.clone(),
            cluster_id: token.cluster_id.clone(),
            provider: pki::crypto(),
            why: Mutex::default(),
        });
        let mut tls = rustls::ClientConfig::builder_with_provider(pki::crypto())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(pinned.clone())
            .with_no_client_auth();
        tls.alpn_protocols = vec![pki::ENROLL_ALPN.to_vec()];
        let cfg = quic_client(tls).map_err(|e| e.to_string())?;
        let req = Request {
            version: wire::VERSION,
            name: name.to_string(),
            csr: pki::hex(&csr),
            token: Some(Credentials { id: id.clone(), secret: secret.clone() }),
            time_ms: super::now_ms(),
        };
        match exchange(&endpoint, cfg, to, &req, Some(&pinned.why)).await {
            Ok(Response::Granted { cert_pem, ca_pem, not_after_ms, .. }) => {
                if pki::sha256_hex(&pem_der(&ca_pem)?) != token.ca_sha256 {
                    return Err(format!("{to} sent a CA other than the one the token pins; refusing it"));
                }
                write_enrolled(tls_dir, &key, &cert_pem, &ca_pem, name, &token.cluster_id)?;
                endpoint.close(0u32.into(), b"done");
                return Ok(Enrolled { signer: to, not_after_ms });
            }
            Ok(Response::Refused { refusal, .. }) if refusal.code == "not_signer" && !redirected => {
                redirected = true;
                tracing::info!(seed = %to, signers = ?refusal.signers, "seed is not a signer; asking a signer");
                errors.push(format!("{to}: {}", refusal.message));
                let more: Vec<SocketAddr> = refusal.signers.iter().copied().filter(|s| !targets.contains(s)).collect();
                targets.splice(i..i, more);
            }
            Ok(Response::Refused { refusal, .. }) => {
                return Err(RequestError::Refused { at: to, refusal }.to_string());
            }
            Err(e) => errors.push(e.to_string()),
        }
    }
    Err(format!("join: enrollment failed: {}", errors.join("; ")))
}

fn pem_der(pem: &str) -> Result<Vec<u8>, String> {
    Ok(pki::pem_certs(Path::new("response"), pem).map_err(|e| e.to_string())?.remove(0).to_vec())
}

/// Checks the granted certificate against our key, name and the CA, then writes the files.
fn write_enrolled(
    dir: &Path,
    key: &rcgen::KeyPair,
    cert_pem: &str,
    ca_pem: &str,
    name: &str,
    cluster: &str,
) -> Result<(), String> {
    let key_pem = key.serialize_pem();
    let at = Path::new("the signer's answer");
    let m = pki::material_from_pem([(at, ca_pem), (at, cert_pem), (at, &key_pem)], "report this as a bug")
        .map_err(|e| e.to_string())?;
    if m.name != name || m.cluster_id != cluster {
        return Err(format!("the signer issued {} instead of {}", m.identity, pki::spiffe_id(cluster, name)));
    }
    pki::check_material(&m, at).map_err(|e| e.to_string())?;
    pki::LiveIdentity::new(&m).map_err(|e| format!("the certificate does not match our key: {e}"))?;
    pki::mkdir(dir).map_err(|e| e.to_string())?;
    let write = || -> Result<(), PkiError> {
        pki::write_secret(&dir.join("node.key"), &key_pem)?;
        pki::write_public(&dir.join("ca.pem"), ca_pem)?;
        pki::write_public(&dir.join("node.pem"), cert_pem)
    };
    write().map_err(|e| e.to_string())
}

/// Asks `signer` for a new certificate over `endpoint`, presenting the live certificate.
pub async fn renew_remote(
    endpoint: &quinn::Endpoint,
    live: &Arc<pki::LiveIdentity>,
    signer: SocketAddr,
    csr: &[u8],
) -> Result<String, RequestError> {
    let sink: pki::RefusalSink = Arc::new(|_| {});
    let tls = pki::live_client_config(live, sink, pki::ENROLL_ALPN).map_err(|e| RequestError::Failed(e.to_string()))?;
    let req = Request {
        version: wire::VERSION,
        name: live.name.clone(),
        csr: pki::hex(csr),
        token: None,
        time_ms: super::now_ms(),
    };
    match exchange(endpoint, quic_client(tls)?, signer, &req, None).await? {
        Response::Granted { cert_pem, .. } => Ok(cert_pem),
        Response::Refused { refusal, .. } => Err(RequestError::Refused { at: signer, refusal }),
    }
}
