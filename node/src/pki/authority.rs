//! The cluster CA as a signer: loaded once from `--ca-dir`, it signs certificates for
//! signing requests. The requester's key never reaches it; only the CSR's public key is
//! used, and every field of the certificate is the signer's own choice.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{Certificate, CertificateParams, CertificateSigningRequestParams, KeyPair};
use rustls::pki_types::{CertificateDer, CertificateSigningRequestDer};
use time::OffsetDateTime;

use super::{
    file_err, node_params, pem_certs, read, spiffe_id, validate_cluster_id, validate_name, PkiError, CLOCK_SKEW,
};

/// The CA key and certificate of the cluster, ready to sign.
pub struct CertAuthority {
    pub dir: PathBuf,
    pub cluster_id: String,
    pub ca_pem: String,
    pub ca_der: CertificateDer<'static>,
    cert: Certificate,
    key: KeyPair,
}

impl fmt::Debug for CertAuthority {
    // Never prints the key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CertAuthority({}, {})", self.cluster_id, self.dir.display())
    }
}

impl CertAuthority {
    /// Loads `dir`/{ca.pem,ca.key,cluster-id}.
    pub fn load(dir: &Path) -> Result<CertAuthority, PkiError> {
        let ca_pem = read(&dir.join("ca.pem"), "run `trellis ca init --dir DIR` first, or point --ca-dir at it")?;
        let key_pem = read(&dir.join("ca.key"), "the CA key is needed to sign; run this on the host that holds it")?;
        let cluster_id =
            read(&dir.join("cluster-id"), "the CA directory is incomplete; re-create it with `trellis ca init`")?
                .trim()
                .to_string();
        validate_cluster_id(&cluster_id)?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| file_err(&dir.join("ca.key"), e, "restore the CA key"))?;
        let params = CertificateParams::from_ca_cert_pem(&ca_pem)
            .map_err(|e| file_err(&dir.join("ca.pem"), e, "restore the CA certificate"))?;
        // Only the issuer's name and key identifier are taken from this re-signed copy.
        let cert = params.self_signed(&key)?;
        let ca_der = pem_certs(&dir.join("ca.pem"), &ca_pem)?.remove(0);
        Ok(CertAuthority { dir: dir.to_path_buf(), cluster_id, ca_pem, ca_der, cert, key })
    }

    /// Signs a certificate for `name` over the public key of `csr` (whose self-signature
    /// rcgen checks), valid from now (backdated by the clock allowance) for `lifetime`.
    pub fn sign_csr(&self, csr: &[u8], name: &str, lifetime: Duration) -> Result<(String, OffsetDateTime), PkiError> {
        validate_name(name)?;
        let bad = |e: rcgen::Error| PkiError::Invalid {
            field: "csr",
            what: format!("not a valid, self-signed certificate signing request ({e})"),
            fix: "send the CSR made with the node's own key",
        };
        let mut req = CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr.to_vec()))
            .map_err(bad)?;
        let now = OffsetDateTime::now_utc();
        let not_after = now + lifetime;
        req.params = node_params(&spiffe_id(&self.cluster_id, name), name, now - CLOCK_SKEW, not_after)?;
        let cert = req.signed_by(&self.cert, &self.key)?;
        Ok((cert.pem(), not_after))
    }
}

/// A signing request for `name` made with `key` (the key stays with the caller).
pub fn make_csr(key: &KeyPair, name: &str) -> Result<Vec<u8>, PkiError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = super::dn(name);
    Ok(params.serialize_request(key)?.der().to_vec())
}
