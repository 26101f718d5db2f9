//! The serving side of `trellis-enroll/1`: every agent answers (a non-signer with a
//! redirect to the signers it knows), a signer also signs. A connection gets one stream,
//! one bounded request and one answer, then it is closed; it never joins the peer pool, so
//! it can neither gossip nor forward.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::token::TokenStore;
use crate::pki::{self, CertAuthority};
use trellis_core::enroll::{decide, Context, Decision};
use trellis_core::membership::MemberState;
use trellis_proto::enroll::{self as wire, Refusal, Request, Response};

/// Member label that marks a node holding the CA key.
pub const SIGNER_LABEL: &str = "trellis.signer";
/// Enrollment connections served at once; more are closed at once (a flood costs little).
const MAX_CONCURRENT: usize = 16;
const CLOSE_DONE: u32 = 0;
const CLOSE_BUSY: u32 = 4;

/// A node holding the CA key: what it signs with and how long certificates last.
pub struct Signer {
    pub ca: CertAuthority,
    pub tokens: TokenStore,
    pub lifetime: Duration,
}

/// Counters of the enrollment service, by outcome code.
#[derive(Default)]
pub struct EnrollStats {
    pub outcomes: Mutex<BTreeMap<String, u64>>,
}

impl EnrollStats {
    fn count(&self, code: &str) {
        *self.outcomes.lock().expect("stats lock").entry(code.to_string()).or_default() += 1;
    }
}

pub struct EnrollService {
    node: super::Inputs,
    signer: Option<Arc<Signer>>,
    stats: Arc<EnrollStats>,
    active: AtomicUsize,
}

/// The signers among live members, from their labels.
pub fn signers(members: &[trellis_core::membership::MemberView]) -> Vec<SocketAddr> {
    members
        .iter()
        .filter(|m| m.state == MemberState::Alive && m.id.meta.labels.get(SIGNER_LABEL).is_some_and(|v| v == "true"))
        .map(|m| m.id.addr)
        .collect()
}

impl EnrollService {
    pub fn new(node: super::Inputs, signer: Option<Arc<Signer>>, stats: Arc<EnrollStats>) -> Arc<EnrollService> {
        Arc::new(EnrollService { node, signer, stats, active: AtomicUsize::new(0) })
    }

    /// Takes one accepted `trellis-enroll/1` connection.
    pub fn accept(self: &Arc<Self>, conn: quinn::Connection) {
        if self.active.fetch_add(1, Ordering::SeqCst) >= MAX_CONCURRENT {
            self.active.fetch_sub(1, Ordering::SeqCst);
            self.stats.count("busy");
            conn.close(CLOSE_BUSY.into(), b"too many enrollments at once; retry shortly");
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            let from = conn.remote_address();
            let res = tokio::time::timeout(super::client::EXCHANGE_TIMEOUT, me.serve(&conn)).await;
            if let Ok(Err(e)) | Err(e) = res.map_err(|_| "timed out".to_string()) {
                me.stats.count("bad_request");
                tracing::info!(peer = %from, error = %e, "enrollment connection failed");
            }
            // Let the answer drain before closing; the client closes first normally.
            let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
            conn.close(CLOSE_DONE.into(), b"done");
            me.active.fetch_sub(1, Ordering::SeqCst);
        });
    }

    async fn serve(&self, conn: &quinn::Connection) -> Result<(), String> {
        let (mut send, mut recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
        let bytes = recv.read_to_end(wire::MAX_MESSAGE).await.map_err(|e| e.to_string())?;
        let now = super::now_ms();
        let response = match wire::decode::<Request>(&bytes) {
            Ok(req) => self.answer(conn, &req, now).await,
            Err(e) => refused(Refusal { code: "bad_request".into(), message: e, signers: vec![] }, now),
        };
        if let Response::Refused { refusal, .. } = &response {
            self.stats.count(&refusal.code);
            tracing::warn!(peer = %conn.remote_address(), code = %refusal.code, reason = %refusal.message, "enrollment refused");
        }
        send.write_all(&wire::encode(&response)).await.map_err(|e| e.to_string())?;
        send.finish().map_err(|e| e.to_string())?;
        Ok(())
    }

    async fn answer(&self, conn: &quinn::Connection, req: &Request, now: i64) -> Response {
        let members = self.node.members.list().await;
        let live_names: BTreeSet<String> = members
            .iter()
            .filter(|m| matches!(m.state, MemberState::Alive | MemberState::Suspect))
            .map(|m| m.id.name.clone())
            .collect();
        let authenticated = client_name(conn);
        let revoked = |n: &str| self.node.transport.identity.revoked.contains(n);
        let check_token = |id: &str, secret: &str| match &self.signer {
            Some(s) => s.tokens.view(|b| b.check(id, secret, now)).unwrap_or_else(|e| {
                tracing::error!(error = %e, "token store unreadable");
                Err(super::token::TokenError::Unknown { id: id.to_string() })
            }),
            None => Err(super::token::TokenError::Unknown { id: id.to_string() }),
        };
        let ctx = Context {
            now_ms: now,
            is_signer: self.signer.is_some(),
            signers: signers(&members),
            authenticated: authenticated.as_deref(),
            live_names: &live_names,
            revoked: &revoked,
            check_token: &check_token,
        };
        match decide(req, &ctx) {
            Decision::Refuse(r) => refused(r, now),
            Decision::Sign { name, token } => self.sign(req, &name, token, now),
        }
    }

    fn sign(&self, req: &Request, name: &str, token: Option<(String, String)>, now: i64) -> Response {
        let signer = self.signer.as_ref().expect("decide signs only on signers");
        let internal = |m: String| refused(Refusal { code: "internal".into(), message: m, signers: vec![] }, now);
        if let Some((id, secret)) = &token {
            // Used up under the store's lock before signing: single use even when two
            // joiners race with one token.
            match signer.tokens.update(|b| b.redeem(id, secret, now, name)) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    return refused(Refusal { code: e.code().into(), message: e.to_string(), signers: vec![] }, now)
                }
                Err(e) => return internal(format!("the signer cannot update its token store: {e}")),
            }
        }
        let Some(csr) = wire::unhex(&req.csr) else {
            return refused(
                Refusal { code: "bad_request".into(), message: "csr is not hex".into(), signers: vec![] },
                now,
            );
        };
        match signer.ca.sign_csr(&csr, name, signer.lifetime) {
            Ok((cert_pem, not_after)) => {
                let what = if token.is_some() { "enrolled" } else { "renewed" };
                self.stats.count(what);
                tracing::info!(node = %name, token = ?token.as_ref().map(|t| &t.0), not_after = %not_after, "{what} a node certificate");
                Response::Granted {
                    cert_pem,
                    ca_pem: signer.ca.ca_pem.clone(),
                    not_after_ms: (not_after.unix_timestamp_nanos() / 1_000_000) as i64,
                    time_ms: now,
                }
            }
            Err(e) => refused(Refusal { code: "bad_request".into(), message: e.to_string(), signers: vec![] }, now),
        }
    }
}

fn refused(refusal: Refusal, now: i64) -> Response {
    Response::Refused { refusal, time_ms: now }
}

/// The verified client certificate's name, if the client presented one.
fn client_name(conn: &quinn::Connection) -> Option<String> {
    let certs = conn.peer_identity()?.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>().ok()?;
    pki::peer_identity(certs.first()?).ok().map(|id| id.name)
}
