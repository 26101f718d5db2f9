//! The identity a running agent presents, swappable while it runs, and the set of revoked
//! node names its verifiers consult.
//!
//! rustls asks a resolver for the certificate on every handshake, so swapping the value
//! behind the lock renews the certificate for new connections while established QUIC
//! connections (which never look at it again) carry on untouched.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::{Arc, RwLock};

use rustls::client::ResolvesClientCert;
use rustls::pki_types::CertificateDer;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::SignatureScheme;
use time::OffsetDateTime;

use super::{crypto, PkiError, TlsMaterial, ENROLL_ALPN};

/// SHA-256 through the TLS provider's own hash (no extra crypto dependency).
pub fn sha256(data: &[u8]) -> [u8; 32] {
    let suite = rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256.tls13().expect("a TLS 1.3 suite");
    let out = suite.common.hash_provider.hash(data);
    out.as_ref().try_into().expect("SHA-256 is 32 bytes")
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex(&sha256(data))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Node names whose certificates every handshake refuses, from `revocations/<name>`.
#[derive(Debug, Default)]
pub struct Revocations(RwLock<BTreeSet<String>>);

impl Revocations {
    pub fn contains(&self, name: &str) -> bool {
        self.0.read().expect("revocations lock").contains(name)
    }

    /// Replaces the set; returns the names that are newly revoked.
    pub fn replace(&self, names: BTreeSet<String>) -> Vec<String> {
        let mut cur = self.0.write().expect("revocations lock");
        let added = names.difference(&cur).cloned().collect();
        *cur = names;
        added
    }

    pub fn len(&self) -> usize {
        self.0.read().expect("revocations lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What is presented right now.
struct Current {
    /// Leaf only: what peers get.
    peer: Arc<CertifiedKey>,
    /// Leaf and CA: what a joiner gets, which pins the CA by hash and has no copy yet.
    enroll: Arc<CertifiedKey>,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
}

/// The agent's certificate, swappable at run time, and its revocation list.
pub struct LiveIdentity {
    pub cluster_id: String,
    pub name: String,
    pub identity: String,
    pub ca: CertificateDer<'static>,
    pub revoked: Arc<Revocations>,
    current: RwLock<Arc<Current>>,
}

impl fmt::Debug for LiveIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LiveIdentity({})", self.identity)
    }
}

fn current(m: &TlsMaterial) -> Result<Current, PkiError> {
    let key = crypto().key_provider.load_private_key(m.key.clone_key())?;
    let peer = Arc::new(CertifiedKey::new(m.chain.clone(), key.clone()));
    peer.keys_match().or_else(|e| match e {
        rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown) => Ok(()),
        e => Err(e),
    })?;
    let mut with_ca = m.chain.clone();
    with_ca.push(m.ca.clone());
    let enroll = Arc::new(CertifiedKey::new(with_ca, key));
    let not_before = x509_parser::parse_x509_certificate(&m.chain[0])
        .map(|(_, x)| x.validity().not_before.to_datetime())
        .unwrap_or(m.not_after);
    Ok(Current { peer, enroll, not_before, not_after: m.not_after })
}

impl LiveIdentity {
    pub fn new(m: &TlsMaterial) -> Result<Arc<LiveIdentity>, PkiError> {
        Ok(Arc::new(LiveIdentity {
            cluster_id: m.cluster_id.clone(),
            name: m.name.clone(),
            identity: m.identity.clone(),
            ca: m.ca.clone(),
            revoked: Arc::default(),
            current: RwLock::new(Arc::new(current(m)?)),
        }))
    }

    /// Presents `m` from the next handshake on. It must be the same identity under the same CA.
    pub fn swap(&self, m: &TlsMaterial) -> Result<(), PkiError> {
        if m.identity != self.identity || m.ca != self.ca {
            return Err(PkiError::Invalid {
                field: "certificate",
                what: format!("the new certificate is for {} (or another CA), not {}", m.identity, self.identity),
                fix: "a renewal keeps the node's name and cluster CA",
            });
        }
        let next = Arc::new(current(m)?);
        *self.current.write().expect("identity lock") = next;
        Ok(())
    }

    /// Validity of the certificate presented now.
    pub fn validity(&self) -> (OffsetDateTime, OffsetDateTime) {
        let c = self.current.read().expect("identity lock");
        (c.not_before, c.not_after)
    }

    /// The leaf presented now (DER).
    pub fn leaf(&self) -> CertificateDer<'static> {
        self.current.read().expect("identity lock").peer.cert[0].clone()
    }

    /// The leaf and key presented now: what writer proofs are signed with.
    pub(super) fn signing_key(&self) -> (CertificateDer<'static>, Arc<dyn rustls::sign::SigningKey>) {
        let c = self.now();
        (c.peer.cert[0].clone(), c.peer.key.clone())
    }

    fn now(&self) -> Arc<Current> {
        self.current.read().expect("identity lock").clone()
    }
}

impl ResolvesServerCert for LiveIdentity {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let enrolling = hello.alpn().is_some_and(|mut protos| protos.any(|p| p == ENROLL_ALPN));
        let c = self.now();
        Some(if enrolling { c.enroll.clone() } else { c.peer.clone() })
    }
}

impl ResolvesClientCert for LiveIdentity {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.now().peer.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}
