//! Bootstrap with join tokens, certificate renewal and revocation.
//!
//! The protocol, in short:
//! 1. `trellis token create --ca-dir DIR` stores `(id, sha256(secret), expiry, used)` in
//!    `DIR/join-tokens.json` (0600) and prints `trellis1:<cluster>:<id>.<secret>:<sha256(CA)>`.
//! 2. The joiner makes its key, connects with ALPN `trellis-enroll/1` and no client
//!    certificate; the server sends its leaf and the CA, the joiner accepts only a CA whose
//!    SHA-256 is the token's and a leaf of the token's cluster.
//! 3. On one stream it sends `{name, csr, token id+secret, its clock}`; a signer (an agent
//!    started with `--ca-dir DIR`, labelled `trellis.signer=true`) checks clock skew, the token
//!    (unknown, used, expired), revocation and that no live member has the name, uses the
//!    token up on disk, and answers the certificate and the CA. A non-signer answers with the
//!    signers it knows, and the joiner follows once.
//! 4. Renewal is the same request without a token, on a `trellis-enroll/1` connection from the
//!    agent's own endpoint that presents the current certificate (mTLS); the name must be the
//!    certified one. The new certificate is swapped in for new handshakes; live connections stay.
//! 5. `revocations/<name>` policy objects feed the verifiers' revocation list; connections to
//!    a newly revoked name are closed, so it fails SWIM probes and goes down everywhere.

pub mod client;
pub mod renewal;
pub mod revocation;
pub mod server;
pub mod token;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::config::AgentConfig;
use crate::membership::Members;
use crate::pki::{self, CertAuthority, TlsMaterial};
use crate::policy::Policy;
use crate::transport::Transport;
pub use server::{EnrollStats, Signer, SIGNER_LABEL};
use token::{JoinToken, TokenStore};

/// Unix milliseconds as the enrollment exchange and the token book count them.
fn now_ms() -> i64 {
    crate::policy::now_ms() as i64
}

/// Default lifetime of certificates a signer issues, as `trellis cert issue`.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(90 * 86_400);
/// Share of the lifetime after which an agent renews.
pub const DEFAULT_RENEW_AT: f64 = 2.0 / 3.0;

/// The agent flags of this module.
#[derive(Debug, Clone)]
pub struct Options {
    pub token: Option<JoinToken>,
    pub ca_dir: Option<PathBuf>,
    pub cert_lifetime: Duration,
    pub renew_at: f64,
}

impl Options {
    pub fn from_args(args: &crate::config::flags::AgentArgs) -> anyhow::Result<Options> {
        let token = args.token.as_deref().map(JoinToken::parse).transpose()?;
        let cert_lifetime = args.cert_lifetime.unwrap_or(DEFAULT_LIFETIME);
        if cert_lifetime < Duration::from_secs(10) {
            anyhow::bail!("cert_lifetime: {cert_lifetime:?} is too short to renew in time; give at least 10s");
        }
        let renew_at = args.cert_renew_at.unwrap_or(DEFAULT_RENEW_AT);
        if !(0.1..=0.95).contains(&renew_at) {
            anyhow::bail!("cert_renew_at: {renew_at} is not a share of the lifetime; give 0.1 to 0.95, e.g. 0.67");
        }
        Ok(Options { token, ca_dir: args.ca_dir.clone(), cert_lifetime, renew_at })
    }

    fn signer(&self) -> anyhow::Result<Option<Arc<Signer>>> {
        let Some(dir) = &self.ca_dir else { return Ok(None) };
        let ca = CertAuthority::load(dir).map_err(|e| anyhow::anyhow!("ca_dir: {e}"))?;
        Ok(Some(Arc::new(Signer { ca, tokens: TokenStore::new(dir), lifetime: self.cert_lifetime })))
    }
}

/// Makes sure `cfg.tls_dir` holds a certificate before the agent starts: a signer issues its
/// own, a joiner with a token enrolls; then loads and checks it. Marks signers by label.
pub fn bootstrap(cfg: &mut AgentConfig, opts: &Options) -> anyhow::Result<TlsMaterial> {
    let have_cert = cfg.tls_dir.join("node.pem").exists();
    let signer = opts.signer()?;
    if let Some(s) = &signer {
        cfg.labels.insert(SIGNER_LABEL.into(), "true".into());
        if !have_cert {
            let issued = pki::issue_cert(&s.ca.dir, &cfg.name, &cfg.tls_dir, opts.cert_lifetime)?;
            tracing::info!(identity = %issued.identity, not_after = %issued.not_after, "issued our own certificate from --ca-dir");
        }
    } else if let (false, Some(token)) = (have_cert, &opts.token) {
        enroll(cfg, token)?;
    } else if have_cert && opts.token.is_some() {
        tracing::info!(tls_dir = %cfg.tls_dir.display(), "already enrolled; --token is not needed any more");
    }
    let tls = pki::load_tls_dir(&cfg.tls_dir).map_err(|e| {
        anyhow::anyhow!("{e}\nhint: a new host joins with `--join SEED --token TOKEN` (from `trellis token create`)")
    })?;
    if let Some(s) = &signer {
        if s.ca.ca_der != tls.ca {
            anyhow::bail!(
                "ca_dir: {} holds another CA than {}; point --ca-dir at this cluster's CA",
                s.ca.dir.display(),
                cfg.tls_dir.join("ca.pem").display()
            );
        }
    }
    Ok(tls)
}

fn enroll(cfg: &AgentConfig, token: &JoinToken) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    tracing::info!(token = %token.id, cluster = %token.cluster_id, "no certificate yet; enrolling");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let done = rt.block_on(client::join(token, &cfg.join, &cfg.name, &cfg.tls_dir)).map_err(anyhow::Error::msg)?;
    tracing::info!(
        signer = %done.signer,
        tls_dir = %cfg.tls_dir.display(),
        took_ms = started.elapsed().as_millis() as u64,
        "enrolled: certificate and CA written, the key never left this host"
    );
    Ok(())
}

/// Everything this module keeps at run time, reachable from the agent's handle.
#[derive(Default)]
pub struct Lifecycle {
    pub enroll: Arc<EnrollStats>,
    pub renewal: Arc<renewal::RenewalStats>,
}

/// What enrollment and renewal take from the agent: who is in the cluster, and the
/// transport whose certificate they renew and whose connections they serve.
#[derive(Clone)]
pub struct Inputs {
    pub members: Members,
    pub transport: Arc<Transport>,
}

/// Starts the enrollment service, the renewal task and the revocation watcher.
pub fn start(
    node: Inputs,
    policy: Arc<Policy>,
    lifecycle: &Lifecycle,
    cfg: &AgentConfig,
    opts: &Options,
) -> anyhow::Result<()> {
    let signer = opts.signer()?;
    let service = server::EnrollService::new(node.clone(), signer.clone(), lifecycle.enroll.clone());
    node.transport.set_enroll_handler(Arc::new(move |conn| service.accept(conn)));
    tokio::spawn(revocation::watch(policy, node.transport.clone()));
    let renew = renewal::Renewal {
        node,
        tls_dir: cfg.tls_dir.clone(),
        signer,
        fraction: opts.renew_at,
        stats: lifecycle.renewal.clone(),
    };
    tokio::spawn(renew.run());
    Ok(())
}

/// Metrics of this module, for `/metrics`.
pub fn metrics(transport: &Transport, lifecycle: &Lifecycle, e: &mut crate::metrics::Exposition) {
    let (_, not_after) = transport.identity.validity();
    let left = (not_after - time::OffsetDateTime::now_utc()).as_seconds_f64();
    e.gauge("trellis_cert_expiry_seconds", "Seconds until this node's certificate expires.", left.floor());
    let r = &lifecycle.renewal;
    use std::sync::atomic::Ordering::Relaxed;
    e.counter("trellis_cert_renewals_total", "Certificates renewed by this node.", r.renewed.load(Relaxed));
    e.counter("trellis_cert_renewal_failures_total", "Failed renewal attempts.", r.failed.load(Relaxed));
    let outcomes = lifecycle.enroll.outcomes.lock().expect("stats lock").clone();
    let rows: Vec<(&str, u64)> = outcomes.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    e.labelled("counter", "trellis_enroll_requests_total", "Signing requests served, by outcome.", "outcome", &rows);
    e.gauge("trellis_revocations", "Revoked node identities in force.", transport.identity.revoked.len() as f64);
}

/// `trellis token create`: stores the token's hash in the CA dir, returns the token.
pub fn create_token(
    ca_dir: &std::path::Path,
    ttl: Duration,
    signer: Option<std::net::SocketAddr>,
) -> anyhow::Result<(JoinToken, i64)> {
    let ttl_ms = ttl.as_millis() as i64;
    if !(1_000..=token::MAX_TTL_MS).contains(&ttl_ms) {
        anyhow::bail!("ttl: {ttl:?} is out of range; give 1s to 7d, e.g. --ttl 1h");
    }
    let ca = CertAuthority::load(ca_dir).map_err(|e| anyhow::anyhow!("ca_dir: {e}"))?;
    let t = JoinToken::generate(&ca.cluster_id, &ca.ca_der, signer);
    let now = now_ms();
    TokenStore::new(ca_dir)
        .update(|b| {
            b.add(&t, now, ttl_ms);
            Ok::<_, ()>(())
        })?
        .expect("infallible");
    Ok((t, now + ttl_ms))
}
