//! The renewal task: follows [`crate::pki::renew::RenewSchedule`], gets a new certificate
//! for the same key from a signer (itself, when it holds the CA), writes it to the tls dir
//! by rename, and swaps it into the live identity. Established connections are not touched.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use time::OffsetDateTime;

use super::server::{signers, Signer};
use crate::pki::renew::{RenewSchedule, Warning};
use crate::pki::{self, TlsMaterial};

#[derive(Debug, Default)]
pub struct RenewalStats {
    pub renewed: AtomicU64,
    pub failed: AtomicU64,
}

pub struct Renewal {
    pub node: super::Inputs,
    pub tls_dir: PathBuf,
    pub signer: Option<Arc<Signer>>,
    pub fraction: f64,
    pub stats: Arc<RenewalStats>,
}

fn ms(t: OffsetDateTime) -> i64 {
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}

impl Renewal {
    pub async fn run(self) {
        let live = self.node.transport.identity.clone();
        let (nb, na) = live.validity();
        let mut schedule = RenewSchedule::new(self.fraction, ms(nb), ms(na));
        loop {
            let step = schedule.poll(super::now_ms());
            if step.renew {
                match self.renew_once().await {
                    Ok(m) => {
                        let (nb, na) = live.validity();
                        schedule.renewed(ms(nb), ms(na));
                        self.stats.renewed.fetch_add(1, Relaxed);
                        tracing::info!(not_after = %m.not_after, "certificate renewed; new handshakes use it, open connections stay");
                        continue;
                    }
                    Err(e) => {
                        schedule.failed(super::now_ms());
                        self.stats.failed.fetch_add(1, Relaxed);
                        // The first failure and then every tenth: enough to see, not a flood.
                        if schedule.failures() % 10 == 1 {
                            tracing::warn!(error = %e, failures = schedule.failures(), "certificate renewal failed; retrying");
                        }
                    }
                }
            }
            if let Some(w) = step.warn {
                warn(w, &live);
            }
            tokio::time::sleep(step.wake_in).await;
        }
    }

    async fn renew_once(&self) -> Result<TlsMaterial, String> {
        let key_path = self.tls_dir.join("node.key");
        let key_pem = pki::read(&key_path, "the key is needed to renew").map_err(|e| e.to_string())?;
        let key = rcgen::KeyPair::from_pem(&key_pem).map_err(|e| format!("{}: {e}", key_path.display()))?;
        let live = &self.node.transport.identity;
        let csr = pki::make_csr(&key, &live.name).map_err(|e| e.to_string())?;
        let cert_pem = match &self.signer {
            Some(s) => s.ca.sign_csr(&csr, &live.name, s.lifetime).map_err(|e| e.to_string())?.0,
            None => self.ask_signers(&csr).await?,
        };
        let ca_path = self.tls_dir.join("ca.pem");
        let ca_pem = pki::read(&ca_path, "the CA certificate is needed").map_err(|e| e.to_string())?;
        let cert_path = self.tls_dir.join("node.pem");
        let m = pki::material_from_pem([(&ca_path, &ca_pem), (&cert_path, &cert_pem), (&key_path, &key_pem)], "")
            .map_err(|e| e.to_string())?;
        pki::check_material(&m, &cert_path).map_err(|e| e.to_string())?;
        live.swap(&m).map_err(|e| e.to_string())?;
        // Written after the swap succeeded, by rename: a restart finds a whole, matching file.
        let tmp = self.tls_dir.join("node.pem.new");
        pki::write_public(&tmp, &cert_pem).map_err(|e| e.to_string())?;
        std::fs::rename(&tmp, &cert_path).map_err(|e| format!("{}: {e}", cert_path.display()))?;
        Ok(m)
    }

    async fn ask_signers(&self, csr: &[u8]) -> Result<String, String> {
        let members = self.node.members.list().await;
        let found = signers(&members);
        if found.is_empty() {
            return Err(format!(
                "no signer among the live members (label {}=true); start an agent with --ca-dir",
                super::SIGNER_LABEL
            ));
        }
        let mut errors = vec![];
        for s in found {
            match super::client::renew_remote(self.node.transport.endpoint(), &self.node.transport.identity, s, csr)
                .await
            {
                Ok(pem) => return Ok(pem),
                Err(e) => errors.push(e.to_string()),
            }
        }
        Err(errors.join("; "))
    }
}

fn warn(w: Warning, live: &pki::LiveIdentity) {
    let (_, not_after) = live.validity();
    let days = (not_after - OffsetDateTime::now_utc()).whole_days();
    let hint =
        "check that a signer (an agent with --ca-dir) is alive; or issue one with `trellis cert issue` and restart";
    match w {
        Warning::ThirtyDays | Warning::SevenDays => {
            tracing::warn!(days_left = days, not_after = %not_after, hint, "certificate expires soon and was not renewed")
        }
        Warning::Expired => {
            tracing::error!(not_after = %not_after, hint, "certificate expired: peers refuse new connections from this node")
        }
    }
}
