//! The cluster PKI: a CA per cluster, node certificates whose SAN URI is the node's
//! identity (`spiffe://<cluster-id>/node/<name>`), and the rustls verifiers that enforce it.
//!
//! Verification is plain logic over certificate bytes, tested with in-memory rustls
//! handshakes; the transport only plugs the configs into quinn.

use std::fmt;
use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{ring as provider, CryptoProvider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName as TlsDn, RootCertStore, SignatureScheme};
use serde::Serialize;
use time::OffsetDateTime;

/// ALPN protocol of Trellis peer links; a peer speaking anything else is refused.
pub const ALPN: &[u8] = b"trellis/1";
/// ALPN of enrollment and renewal connections (see [`crate::enroll`]): the only protocol a
/// client without a certificate may speak, and it carries nothing but signing requests.
pub const ENROLL_ALPN: &[u8] = b"trellis-enroll/1";
const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 86_400);
/// Backdating of not_before, so a peer whose clock is a little behind accepts a new cert.
pub const CLOCK_SKEW: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {what}; {fix}")]
    File { path: PathBuf, what: String, fix: String },
    #[error("{field}: {what}; {fix}")]
    Invalid { field: &'static str, what: String, fix: &'static str },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("TLS setup failed: {0}")]
    Tls(#[from] rustls::Error),
}

pub(crate) fn file_err(path: &Path, what: impl fmt::Display, fix: &str) -> PkiError {
    PkiError::File { path: path.to_path_buf(), what: what.to_string(), fix: fix.to_string() }
}

/// Why a peer was refused at the handshake; a metrics label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RefusalReason {
    NoCertificate,
    Expired,
    NotYetValid,
    UnknownCa,
    WrongCluster,
    BadIdentity,
    /// The identity is listed in the `revocations` policy kind.
    Revoked,
    Other,
}

impl RefusalReason {
    /// Every reason, in the order metrics list them.
    pub const ALL: [RefusalReason; 8] = [
        RefusalReason::NoCertificate,
        RefusalReason::Expired,
        RefusalReason::NotYetValid,
        RefusalReason::UnknownCa,
        RefusalReason::WrongCluster,
        RefusalReason::BadIdentity,
        RefusalReason::Revoked,
        RefusalReason::Other,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            RefusalReason::NoCertificate => "no_certificate",
            RefusalReason::Expired => "expired",
            RefusalReason::NotYetValid => "not_yet_valid",
            RefusalReason::UnknownCa => "unknown_ca",
            RefusalReason::WrongCluster => "wrong_cluster",
            RefusalReason::BadIdentity => "bad_identity",
            RefusalReason::Revoked => "revoked",
            RefusalReason::Other => "other",
        }
    }

    /// What the operator of the refused peer should do.
    pub fn hint(&self) -> &'static str {
        match self {
            RefusalReason::NoCertificate => {
                "the peer sent no certificate; start it with --tls-dir holding node.pem and node.key"
            }
            RefusalReason::Expired => {
                "the certificate has expired (agents renew at 2/3 of the lifetime through a signer; this one could not): re-enroll with `trellis token create` + `trellis agent --token`, or issue one with `trellis cert issue`"
            }
            RefusalReason::NotYetValid => "the certificate is not valid yet; check the clocks of both hosts (NTP)",
            RefusalReason::UnknownCa => {
                "the certificate is from another CA; issue it from this cluster's CA (`trellis cert issue --ca-dir`)"
            }
            RefusalReason::WrongCluster => "the certificate names another cluster id; issue it from this cluster's CA",
            RefusalReason::BadIdentity => {
                "the certificate lacks a spiffe://<cluster>/node/<name> URI; issue it with `trellis cert issue`"
            }
            RefusalReason::Revoked => {
                "the node's identity is revoked (policy object revocations/<name>); delete the revocation to let it back in"
            }
            RefusalReason::Other => "see the agent log for the TLS error",
        }
    }

    fn from_tls(e: &rustls::Error) -> RefusalReason {
        use CertificateError::*;
        match e {
            rustls::Error::NoCertificatesPresented => RefusalReason::NoCertificate,
            rustls::Error::InvalidCertificate(c) => match c {
                Expired | ExpiredContext { .. } => RefusalReason::Expired,
                NotValidYet | NotValidYetContext { .. } => RefusalReason::NotYetValid,
                UnknownIssuer | BadSignature => RefusalReason::UnknownCa,
                _ => RefusalReason::Other,
            },
            _ => RefusalReason::Other,
        }
    }
}

/// Where refusals are reported (metrics, rate-limited logs).
pub type RefusalSink = Arc<dyn Fn(RefusalReason) + Send + Sync>;

#[derive(Debug)]
pub struct CaInfo {
    pub cluster_id: String,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    pub not_after: OffsetDateTime,
}

#[derive(Debug)]
pub struct IssuedCert {
    pub identity: String,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    pub not_after: OffsetDateTime,
}

/// A node's TLS material, loaded and checked.
pub struct TlsMaterial {
    pub cluster_id: String,
    pub name: String,
    pub identity: String,
    pub ca: CertificateDer<'static>,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub not_after: OffsetDateTime,
}

impl fmt::Debug for TlsMaterial {
    // Never prints the key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsMaterial").field("identity", &self.identity).field("not_after", &self.not_after).finish()
    }
}

/// A certified peer identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    pub cluster_id: String,
    pub name: String,
}

/// What `trellis cert show` prints.
#[derive(Debug, Serialize)]
pub struct CertSummary {
    pub subject: String,
    pub identity: Option<String>,
    pub issuer: String,
    pub not_before: String,
    pub not_after: String,
    pub expires_in_days: i64,
    pub is_ca: bool,
}

impl fmt::Display for CertSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "subject: {}", self.subject)?;
        writeln!(f, "identity: {}", self.identity.as_deref().unwrap_or("(none)"))?;
        writeln!(f, "issuer: {}", self.issuer)?;
        writeln!(f, "not before: {}", self.not_before)?;
        writeln!(f, "not after: {}", self.not_after)?;
        writeln!(f, "expires in: {} days", self.expires_in_days)?;
        writeln!(f, "is CA: {}", self.is_ca)
    }
}

pub fn spiffe_id(cluster_id: &str, name: &str) -> String {
    format!("spiffe://{cluster_id}/node/{name}")
}

pub(crate) fn validate_cluster_id(id: &str) -> Result<(), PkiError> {
    let ok = !id.is_empty()
        && id.len() <= 63
        && id.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    ok.then_some(()).ok_or(PkiError::Invalid {
        field: "cluster_id",
        what: format!("{id:?} is not a valid cluster id"),
        fix: "use 1-63 characters of a-z, 0-9 and '-'",
    })
}

pub(crate) fn validate_name(name: &str) -> Result<(), PkiError> {
    trellis_proto::identity::validate_node_name(name).map_err(|e| PkiError::Invalid {
        field: "name",
        what: e.to_string(),
        fix: "pick another --name",
    })
}

/// Creates a write-only-by-owner file; the mode is set at creation, never widened.
pub(crate) fn write_secret(path: &Path, data: &str) -> Result<(), PkiError> {
    let _ = fs::remove_file(path);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| file_err(path, e, "check the directory exists and is writable"))?;
    f.write_all(data.as_bytes()).map_err(|e| file_err(path, e, "check free disk space"))
}

pub(crate) fn write_public(path: &Path, data: &str) -> Result<(), PkiError> {
    fs::write(path, data).map_err(|e| file_err(path, e, "check the directory exists and is writable"))
}

pub(crate) fn read(path: &Path, fix: &str) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(|e| file_err(path, e, fix))
}

pub(crate) fn mkdir(dir: &Path) -> Result<(), PkiError> {
    fs::create_dir_all(dir).map_err(|e| file_err(dir, e, "pick a writable directory"))
}

/// Creates the cluster CA in `dir`: ca.pem, ca.key (0600) and cluster-id.
pub fn init_ca(dir: &Path, cluster_id: Option<&str>) -> Result<CaInfo, PkiError> {
    let cert_path = dir.join("ca.pem");
    let key_path = dir.join("ca.key");
    if cert_path.exists() || key_path.exists() {
        return Err(file_err(
            &cert_path,
            "a CA already exists here",
            "use it, or pick another --dir to make a new cluster",
        ));
    }
    let cluster_id = match cluster_id {
        Some(id) => id.to_string(),
        None => format!("trellis-{:08x}", rand::random::<u32>()),
    };
    validate_cluster_id(&cluster_id)?;
    mkdir(dir)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = dn(&format!("Trellis CA {cluster_id}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - CLOCK_SKEW;
    params.not_after = now + CA_LIFETIME;
    let cert = params.self_signed(&key)?;
    write_secret(&key_path, &key.serialize_pem())?;
    write_public(&cert_path, &cert.pem())?;
    write_public(&dir.join("cluster-id"), &format!("{cluster_id}\n"))?;
    Ok(CaInfo { cluster_id, cert_path, key_path, not_after: now + CA_LIFETIME })
}

pub(crate) fn dn(cn: &str) -> DistinguishedName {
    let mut d = DistinguishedName::new();
    d.push(DnType::CommonName, cn);
    d.push(DnType::OrganizationName, "Trellis");
    d
}

/// What every node certificate says: the SPIFFE URI, and use for TLS client and server.
/// Signers set these themselves; nothing a CSR asks for is copied.
pub(crate) fn node_params(
    identity: &str,
    name: &str,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = dn(name);
    params.subject_alt_names = vec![SanType::URI(identity.try_into()?)];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.not_before = not_before;
    params.not_after = not_after;
    Ok(params)
}

/// Issues a node certificate valid from now for `lifetime`.
pub fn issue_cert(ca_dir: &Path, name: &str, out: &Path, lifetime: Duration) -> Result<IssuedCert, PkiError> {
    let now = OffsetDateTime::now_utc();
    issue_cert_with_validity(ca_dir, name, out, now - CLOCK_SKEW, now + lifetime)
}

/// Issues a node certificate with an explicit validity window (tests make expired ones).
pub fn issue_cert_with_validity(
    ca_dir: &Path,
    name: &str,
    out: &Path,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<IssuedCert, PkiError> {
    validate_name(name)?;
    let ca_pem = read(&ca_dir.join("ca.pem"), "run `trellis ca init --dir DIR` first, or point --ca-dir at it")?;
    let ca_key_pem = read(&ca_dir.join("ca.key"), "the CA key is needed to issue; run this on the host that holds it")?;
    let cluster_id =
        read(&ca_dir.join("cluster-id"), "the CA directory is incomplete; re-create it with `trellis ca init`")?
            .trim()
            .to_string();
    validate_cluster_id(&cluster_id)?;
    let ca_key =
        KeyPair::from_pem(&ca_key_pem).map_err(|e| file_err(&ca_dir.join("ca.key"), e, "restore the CA key"))?;
    let ca_params = CertificateParams::from_ca_cert_pem(&ca_pem)
        .map_err(|e| file_err(&ca_dir.join("ca.pem"), e, "restore the CA certificate"))?;
    let ca_cert = ca_params.self_signed(&ca_key)?;

    let identity = spiffe_id(&cluster_id, name);
    let key = KeyPair::generate()?;
    let params = node_params(&identity, name, not_before, not_after)?;
    let cert = params.signed_by(&key, &ca_cert, &ca_key)?;
    mkdir(out)?;
    let key_path = out.join("node.key");
    let cert_path = out.join("node.pem");
    write_secret(&key_path, &key.serialize_pem())?;
    write_public(&cert_path, &cert.pem())?;
    write_public(&out.join("ca.pem"), &ca_pem)?;
    Ok(IssuedCert { identity, cert_path, key_path, not_after })
}

pub(crate) fn pem_certs(path: &Path, text: &str) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    use rustls::pki_types::pem::PemObject;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(text.as_bytes()).collect::<Result<_, _>>().map_err(|e| {
        file_err(path, format!("not a PEM certificate ({e:?})"), "give the .pem file written by `trellis cert issue`")
    })?;
    if certs.is_empty() {
        return Err(file_err(path, "holds no certificate", "give the .pem file written by `trellis cert issue`"));
    }
    Ok(certs)
}

/// Summarises a certificate file; refuses files holding private keys.
pub fn show_cert(path: &Path) -> Result<CertSummary, PkiError> {
    let text = read(path, "give the path of a certificate (.pem)")?;
    if text.contains("PRIVATE KEY") {
        return Err(file_err(
            path,
            "this file holds a private key, which is never printed",
            "give the certificate (.pem) instead",
        ));
    }
    let der = pem_certs(path, &text)?.remove(0);
    let (_, x) = x509_parser::parse_x509_certificate(&der).map_err(|e| {
        file_err(path, format!("cannot parse certificate: {e}"), "give a certificate written by Trellis")
    })?;
    let not_after = x.validity().not_after.to_datetime();
    Ok(CertSummary {
        subject: x.subject().to_string(),
        identity: spiffe_uri(&x),
        issuer: x.issuer().to_string(),
        not_before: x.validity().not_before.to_datetime().to_string(),
        not_after: not_after.to_string(),
        expires_in_days: (not_after - OffsetDateTime::now_utc()).whole_days(),
        is_ca: x.is_ca(),
    })
}

fn spiffe_uri(x: &x509_parser::certificate::X509Certificate<'_>) -> Option<String> {
    use x509_parser::extensions::GeneralName;
    let san = x.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|g| match g {
        GeneralName::URI(u) if u.starts_with("spiffe://") => Some(u.to_string()),
        _ => None,
    })
}

/// Extracts the certified (cluster id, name) from a peer's end-entity certificate.
pub fn peer_identity(cert: &CertificateDer<'_>) -> Result<PeerIdentity, PkiError> {
    let bad = |what: &str| PkiError::Invalid {
        field: "certificate",
        what: what.to_string(),
        fix: "issue node certificates with `trellis cert issue`",
    };
    let (_, x) = x509_parser::parse_x509_certificate(cert).map_err(|_| bad("unparseable certificate"))?;
    let uri = spiffe_uri(&x).ok_or_else(|| bad("no spiffe:// URI in the certificate"))?;
    let rest = uri.strip_prefix("spiffe://").expect("checked prefix");
    let (cluster_id, name) =
        rest.split_once("/node/").ok_or_else(|| bad("URI is not spiffe://<cluster>/node/<name>"))?;
    if validate_cluster_id(cluster_id).is_err() || validate_name(name).is_err() {
        return Err(bad("malformed cluster id or node name in the URI"));
    }
    Ok(PeerIdentity { cluster_id: cluster_id.into(), name: name.into() })
}

/// Loads `dir`/{ca.pem,node.pem,node.key} and checks them as peers will.
pub fn load_tls_dir(dir: &Path) -> Result<TlsMaterial, PkiError> {
    let m = load_tls_dir_unchecked(dir)?;
    check_material(&m, &dir.join("node.pem"))?;
    Ok(m)
}

/// The checks peers will make: not expired, chains to the CA.
pub fn check_material(m: &TlsMaterial, cert_path: &Path) -> Result<(), PkiError> {
    let now = OffsetDateTime::now_utc();
    if m.not_after < now {
        return Err(file_err(
            cert_path,
            format!("expired on {}", m.not_after),
            "issue a new one with `trellis cert issue`, or re-enroll: move the tls dir away and start with --token",
        ));
    }
    let roots = roots(&m.ca)?;
    let parsed = rustls::server::ParsedCertificate::try_from(&m.chain[0])?;
    let algs = provider::default_provider().signature_verification_algorithms.all;
    rustls::client::verify_server_cert_signed_by_trust_anchor(&parsed, &roots, &m.chain[1..], UnixTime::now(), algs)
        .map_err(|e| {
            file_err(cert_path, format!("does not verify against ca.pem: {e}"), "issue it from this cluster's CA")
        })?;
    Ok(())
}

/// Loads TLS material without the validity checks (test peers present bad certs on purpose).
pub fn load_tls_dir_unchecked(dir: &Path) -> Result<TlsMaterial, PkiError> {
    let fix = "run `trellis cert issue --ca-dir CA --name NODE --out DIR` and give that DIR as --tls-dir";
    let texts = [dir.join("ca.pem"), dir.join("node.pem"), dir.join("node.key")].map(|p| read(&p, fix).map(|t| (p, t)));
    let [ca, cert, key] = texts;
    let ((ca_path, ca), (cert_path, cert), (key_path, key)) = (ca?, cert?, key?);
    material_from_pem([(&ca_path, &ca), (&cert_path, &cert), (&key_path, &key)], fix)
}

/// Builds TLS material from the PEM texts of (ca.pem, node.pem, node.key), each with the
/// path errors should name.
pub fn material_from_pem(files: [(&Path, &str); 3], fix: &str) -> Result<TlsMaterial, PkiError> {
    use rustls::pki_types::pem::PemObject;
    let [(ca_path, ca), (cert_path, cert), (key_path, key)] = files;
    let ca = pem_certs(ca_path, ca)?.remove(0);
    let chain = pem_certs(cert_path, cert)?;
    let key =
        PrivateKeyDer::from_pem_slice(key.as_bytes()).map_err(|_| file_err(key_path, "not a PEM private key", fix))?;
    let id = peer_identity(&chain[0]).map_err(|e| file_err(cert_path, e, fix))?;
    let not_after = x509_parser::parse_x509_certificate(&chain[0])
        .map_err(|e| file_err(cert_path, e, fix))?
        .1
        .validity()
        .not_after
        .to_datetime();
    Ok(TlsMaterial {
        identity: spiffe_id(&id.cluster_id, &id.name),
        cluster_id: id.cluster_id,
        name: id.name,
        ca,
        chain,
        key,
        not_after,
    })
}

pub(crate) fn roots(ca: &CertificateDer<'static>) -> Result<RootCertStore, PkiError> {
    let mut roots = RootCertStore::empty();
    roots.add(ca.clone())?;
    Ok(roots)
}

pub(crate) fn crypto() -> Arc<CryptoProvider> {
    Arc::new(provider::default_provider())
}

/// Checks that a verified chain's leaf names our cluster.
pub(crate) fn check_cluster(cert: &CertificateDer<'_>, cluster_id: &str) -> Result<(), RefusalReason> {
    match peer_identity(cert) {
        Ok(id) if id.cluster_id == cluster_id => Ok(()),
        Ok(_) => Err(RefusalReason::WrongCluster),
        Err(_) => Err(RefusalReason::BadIdentity),
    }
}

/// The cluster check plus the revocation list: what both sides apply after the chain.
fn check_peer(cert: &CertificateDer<'_>, cluster_id: &str, revoked: Option<&Revocations>) -> Result<(), RefusalReason> {
    check_cluster(cert, cluster_id)?;
    match (revoked, peer_identity(cert)) {
        (Some(r), Ok(id)) if r.contains(&id.name) => Err(RefusalReason::Revoked),
        _ => Ok(()),
    }
}

pub(crate) fn refusal_error(reason: RefusalReason) -> rustls::Error {
    match reason {
        RefusalReason::WrongCluster | RefusalReason::BadIdentity | RefusalReason::Revoked => {
            rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure)
        }
        _ => rustls::Error::General(reason.as_str().into()),
    }
}

/// Server side: a client must present a cert from our CA naming our cluster.
struct ClusterClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    cluster_id: String,
    sink: RefusalSink,
    revoked: Option<Arc<Revocations>>,
    /// False on the agent's endpoint: a client without a certificate may finish the
    /// handshake, and the transport then serves it enrollment only (see `transport.rs`).
    mandatory: bool,
}

impl fmt::Debug for ClusterClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClusterClientVerifier({})", self.cluster_id)
    }
}

impl ClientCertVerifier for ClusterClientVerifier {
    fn root_hint_subjects(&self) -> &[TlsDn] {
        self.inner.root_hint_subjects()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)
            .inspect_err(|e| (self.sink)(RefusalReason::from_tls(e)))?;
        check_peer(end_entity, &self.cluster_id, self.revoked.as_deref()).map_err(|r| {
            (self.sink)(r);
            refusal_error(r)
        })?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Client side: the server must chain to our CA and name our cluster. Host names are not
/// checked: peers are dialled by address, and the identity is the URI.
struct ClusterServerVerifier {
    roots: RootCertStore,
    cluster_id: String,
    sink: RefusalSink,
    provider: Arc<CryptoProvider>,
    revoked: Option<Arc<Revocations>>,
}

impl fmt::Debug for ClusterServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClusterServerVerifier({})", self.cluster_id)
    }
}

impl ServerCertVerifier for ClusterServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let refuse = |e: rustls::Error| {
            (self.sink)(RefusalReason::from_tls(&e));
            e
        };
        let parsed = rustls::server::ParsedCertificate::try_from(end_entity).map_err(refuse)?;
        let algs = self.provider.signature_verification_algorithms.all;
        rustls::client::verify_server_cert_signed_by_trust_anchor(&parsed, &self.roots, intermediates, now, algs)
            .map_err(refuse)?;
        check_peer(end_entity, &self.cluster_id, self.revoked.as_deref()).map_err(|r| {
            (self.sink)(r);
            refusal_error(r)
        })?;
        Ok(ServerCertVerified::assertion())
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

/// TLS 1.3 server config requiring client certificates of our cluster.
pub fn server_config(m: &TlsMaterial, sink: RefusalSink) -> Result<rustls::ServerConfig, PkiError> {
    let inner = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots(&m.ca)?), crypto())
        .build()
        .map_err(|e| PkiError::Tls(rustls::Error::General(e.to_string())))?;
    let verifier = Arc::new(ClusterClientVerifier {
        inner,
        cluster_id: m.cluster_id.clone(),
        sink,
        revoked: None,
        mandatory: true,
    });
    let mut cfg = rustls::ServerConfig::builder_with_provider(crypto())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(m.chain.clone(), m.key.clone_key())?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(cfg)
}

/// TLS 1.3 client config presenting our certificate and checking the server's cluster.
pub fn client_config(m: &TlsMaterial, sink: RefusalSink) -> Result<rustls::ClientConfig, PkiError> {
    let verifier = Arc::new(ClusterServerVerifier {
        roots: roots(&m.ca)?,
        cluster_id: m.cluster_id.clone(),
        sink,
        provider: crypto(),
        revoked: None,
    });
    let mut cfg = rustls::ClientConfig::builder_with_provider(crypto())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(m.chain.clone(), m.key.clone_key())?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(cfg)
}

/// The agent endpoint's server config: certificates from the swappable [`LiveIdentity`]
/// (renewal without a restart), the revocation list consulted on every handshake, peer and
/// enrollment ALPNs, and client certificates optional so a joiner can reach enrollment.
pub fn live_server_config(live: &Arc<LiveIdentity>, sink: RefusalSink) -> Result<rustls::ServerConfig, PkiError> {
    let inner = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots(&live.ca)?), crypto())
        .allow_unauthenticated()
        .build()
        .map_err(|e| PkiError::Tls(rustls::Error::General(e.to_string())))?;
    let verifier = Arc::new(ClusterClientVerifier {
        inner,
        cluster_id: live.cluster_id.clone(),
        sink,
        revoked: Some(live.revoked.clone()),
        mandatory: false,
    });
    let mut cfg = rustls::ServerConfig::builder_with_provider(crypto())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(live.clone());
    cfg.alpn_protocols = vec![ALPN.to_vec(), ENROLL_ALPN.to_vec()];
    no_resumption_server(&mut cfg);
    Ok(cfg)
}

/// The agent's client config for `alpn`: presents the live certificate, checks the server's
/// chain, cluster and revocation.
pub fn live_client_config(
    live: &Arc<LiveIdentity>,
    sink: RefusalSink,
    alpn: &[u8],
) -> Result<rustls::ClientConfig, PkiError> {
    let verifier = Arc::new(ClusterServerVerifier {
        roots: roots(&live.ca)?,
        cluster_id: live.cluster_id.clone(),
        sink,
        provider: crypto(),
        revoked: Some(live.revoked.clone()),
    });
    let mut cfg = rustls::ClientConfig::builder_with_provider(crypto())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(live.clone());
    cfg.alpn_protocols = vec![alpn.to_vec()];
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(cfg)
}

/// A resumed TLS session skips certificate verification, so a peer revoked (or expired)
/// since its last handshake would get back in on a ticket: every handshake is a full one.
fn no_resumption_server(cfg: &mut rustls::ServerConfig) {
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
}

mod authority;
mod live;
pub mod proof;
pub mod renew;
pub use authority::make_csr;
pub use authority::CertAuthority;
pub use live::{hex, sha256, sha256_hex, LiveIdentity, Revocations};

#[cfg(test)]
mod tests;
