//! Writer proofs: a node signs its attributed policy writes with its TLS key, and any node
//! checks a proof against the cluster CA, so a relaying peer cannot pass off its own write
//! as another node's (see `policy::store::WriterAuth`).

use std::time::Duration;

use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::SignatureScheme;
use trellis_proto::policy::{MAX_PROOF_CERT, MAX_PROOF_SIG};
use trellis_proto::WriterProof;

use super::live::LiveIdentity;
use super::{crypto, peer_identity, roots};
use trellis_core::policy::store::WriterAuth;

/// Schemes a node key may sign with, in order of preference.
const SCHEMES: [SignatureScheme; 3] =
    [SignatureScheme::ECDSA_NISTP256_SHA256, SignatureScheme::ECDSA_NISTP384_SHA384, SignatureScheme::ED25519];

impl WriterAuth for LiveIdentity {
    fn sign(&self, message: &[u8]) -> Result<WriterProof, String> {
        let (cert, key) = self.signing_key();
        let signer = key.choose_scheme(&SCHEMES).ok_or("the node key cannot sign with ECDSA or Ed25519")?;
        let sig = signer.sign(message).map_err(|e| format!("signing failed: {e}"))?;
        Ok(WriterProof { cert: cert.to_vec(), scheme: u16::from(signer.scheme()), sig })
    }

    fn verify(&self, message: &[u8], proof: &WriterProof, at_ms: u64) -> Result<String, String> {
        verify(&self.ca, &self.cluster_id, message, proof, at_ms)
    }
}

/// The certified name of `proof`'s signer, if its certificate chained to `ca` at `at_ms`,
/// names `cluster_id`, and its key signed `message`.
pub fn verify(
    ca: &CertificateDer<'static>,
    cluster_id: &str,
    message: &[u8],
    proof: &WriterProof,
    at_ms: u64,
) -> Result<String, String> {
    if proof.cert.len() > MAX_PROOF_CERT || proof.sig.len() > MAX_PROOF_SIG {
        return Err("oversized certificate or signature".into());
    }
    let cert = CertificateDer::from(proof.cert.as_slice());
    let parsed = ParsedCertificate::try_from(&cert).map_err(|e| format!("certificate: {e}"))?;
    let roots = roots(ca).map_err(|e| e.to_string())?;
    let algs = crypto().signature_verification_algorithms;
    let at = UnixTime::since_unix_epoch(Duration::from_millis(at_ms));
    verify_server_cert_signed_by_trust_anchor(&parsed, &roots, &[], at, algs.all)
        .map_err(|e| format!("certificate at the write's time: {e}"))?;
    let id = peer_identity(&cert).map_err(|e| e.to_string())?;
    if id.cluster_id != cluster_id {
        return Err(format!("certificate is for cluster {:?}", id.cluster_id));
    }
    let scheme = SignatureScheme::from(proof.scheme);
    let alg = SCHEMES
        .contains(&scheme)
        .then(|| algs.mapping.iter().find(|(s, _)| *s == scheme).and_then(|(_, a)| a.first()))
        .flatten()
        .ok_or_else(|| format!("unsupported signature scheme {scheme:?}"))?;
    let (_, x) = x509_parser::parse_x509_certificate(&proof.cert).map_err(|e| format!("certificate: {e}"))?;
    alg.verify_signature(&x.public_key().subject_public_key.data, message, &proof.sig)
        .map_err(|_| "the signature does not match the entry".to_string())?;
    Ok(id.name)
}
