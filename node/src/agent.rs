//! The composition root: binds the listeners, opens the policy log, and starts each
//! subsystem with the narrow inputs it needs (the transport, the policy, a [`Members`]
//! handle, a [`PolicyWriter`]). It decides nothing; the API gets the [`AgentHandle`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, watch};
use trellis_core::membership::{Membership, PolicyItems};
use trellis_core::policy::Key;
use trellis_proto::{NodeIdentity, NodeMeta};

use crate::config::AgentConfig;
use crate::membership::Members;
use crate::mesh::forward::Forwarder;
use crate::mesh::view::{ForwardStats, MeshView};
use crate::pki::TlsMaterial;
use crate::policy::Policy;
use crate::policy_writer::PolicyWriter;
use crate::ratelimit::RateLimits;
use crate::transport::Transport;

/// Agent version, gossiped so operators can see mixed-version clusters.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// What the API and the process's run loop hold of a running agent.
#[derive(Clone)]
pub struct AgentHandle {
    pub members: Members,
    pub writer: PolicyWriter,
    pub spiffe_id: String,
    pub transport: Arc<Transport>,
    pub policy: Arc<Policy>,
    pub forward: Arc<ForwardStats>,
    pub ratelimits: Arc<RateLimits>,
    /// Connection caps of the proxy and API listeners, with their counters.
    pub clients: Arc<crate::listen::ClientGates>,
    pub started: Instant,
    /// Flips to true when the agent should stop (after a leave).
    pub shutdown: watch::Sender<bool>,
    /// Enrollment, renewal and revocation state (`crate::enroll`).
    pub lifecycle: Arc<crate::enroll::Lifecycle>,
    pub files: Arc<AgentFiles>,
    /// The access log, when on (for its counters).
    pub access_log: Option<Arc<crate::access_log::AccessLog>>,
    /// The span exporter, when traces are on.
    pub spans: Option<Arc<crate::spans::Spans>>,
    /// The DNS interface's address (None when off) and its counters.
    pub dns: (Option<std::net::SocketAddr>, Arc<crate::dns::DnsStats>),
    /// The virtual address range (None when off) and the addresses given.
    pub vips: (Option<trellis_core::mesh::vip::Range>, watch::Receiver<Arc<trellis_core::mesh::vip::Published>>),
    /// Mesh-wide metrics (`/v1/stats`).
    pub stats: Arc<crate::stats::Stats>,
    /// Rollout step figures, shared with the rollouts' driver.
    pub rollout_figures: Arc<crate::rollouts::FiguresMemo>,
}

/// How often mesh-wide metrics are closed and sent: every second under the test profile,
/// every 10 s otherwise (Prometheus' usual scrape interval).
fn stats_interval(profile: trellis_core::membership::timing::Profile) -> std::time::Duration {
    use trellis_core::membership::timing::Profile;
    match profile {
        Profile::Fast => std::time::Duration::from_secs(1),
        Profile::Lan | Profile::Wan => std::time::Duration::from_secs(10),
    }
}

/// Where this agent keeps its files, as absolute paths: `trellis check` asks rather than
/// guesses.
#[derive(Debug, serde::Serialize)]
pub struct AgentFiles {
    pub tls_dir: PathBuf,
    pub data_dir: PathBuf,
    /// The config file or directory read at start, if any.
    pub config: Option<PathBuf>,
}

impl AgentFiles {
    fn of(cfg: &AgentConfig) -> AgentFiles {
        let abs = |p: &std::path::Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
        AgentFiles {
            tls_dir: abs(&cfg.tls_dir),
            data_dir: abs(&cfg.data_dir),
            config: cfg.config_source.as_deref().map(abs),
        }
    }
}

impl AgentHandle {
    /// Leaves gracefully, then asks the process to stop.
    pub async fn leave(&self) {
        self.members.leave().await;
        // Spans still queued go to the collector before the process ends.
        if let Some(spans) = self.spans.clone() {
            let _ = tokio::task::spawn_blocking(move || spans.flush()).await;
        }
        let _ = self.shutdown.send(true);
    }
}

/// Starts the transport, the membership task and the data plane.
pub fn start(cfg: &AgentConfig, tls: &TlsMaterial) -> anyhow::Result<AgentHandle> {
    if tls.name != cfg.name {
        anyhow::bail!(
            "name: the agent is named {:?} but its certificate ({}) is for {:?}; start with --name {} or issue a certificate for {:?}",
            cfg.name,
            cfg.tls_dir.join("node.pem").display(),
            tls.name,
            tls.name,
            cfg.name
        );
    }
    let (transport, inbound, streams) = Transport::bind(cfg.bind, tls, faults_of(cfg), cfg.limits.clone())?;
    let upstreams = bind_upstreams(&cfg.upstreams)?;
    let proxy = cfg.proxy.map(|a| bind_upstreams(&[("http proxy".to_string(), a)])).transpose()?;
    let generation = crate::policy::now_ms().max(1);
    let identity = NodeIdentity {
        addr: cfg.advertise,
        generation,
        name: cfg.name.clone(),
        meta: NodeMeta { api_addr: Some(cfg.api), version: VERSION.into(), labels: cfg.labels.clone() },
    };
    identity.validate().map_err(|e| anyhow::anyhow!("labels: {e}"))?;
    let grace_ms = cfg.timing.tombstone_grace.as_millis() as u64;
    let auth: Arc<dyn trellis_core::policy::WriterAuth> = transport.identity.clone();
    let policy = Policy::open(&cfg.data_dir, &cfg.name, grace_ms, Some(auth))
        .map_err(|e| anyhow::anyhow!("data_dir: cannot open the policy log in {}: {e}", cfg.data_dir.display()))?;
    // Instances from the config file, written before gossip starts; spread once it has.
    let mut registered = Vec::new();
    for (id, json) in &cfg.services {
        let bytes = serde_json::to_vec(json).expect("json");
        let entry = policy
            .write(Key::instance(id, &cfg.name), Some(&bytes), None)
            .map_err(|e| anyhow::anyhow!("services.{id}: cannot register the instance from the config file: {e}"))?;
        registered.push(entry);
    }
    let items: PolicyItems = {
        let policy = policy.clone();
        Arc::new(move |body, local| policy.receive_item(body, local))
    };
    let mut core = Membership::with_policy(identity, &cfg.timing, cfg.expected_size, generation, Some(items));
    core.join(Instant::now(), &cfg.join);
    let (limit_tx, limit_rx) = mpsc::channel(1024);
    let (stats_tx, stats_rx) = mpsc::channel(1024);
    let links = crate::membership::Links {
        transport: transport.clone(),
        policy: policy.clone(),
        sync_every: cfg.timing.sync_interval,
        inbound,
        limits: limit_tx,
        stats: stats_tx,
    };
    let members = crate::membership::spawn(core, tls.cluster_id.clone(), links, registered);
    let writer = PolicyWriter { policy: policy.clone(), members: members.clone() };
    let ratelimit_timing = trellis_core::ratelimit::ExchangeTiming::default();
    let ratelimits = RateLimits::new(&cfg.name, ratelimit_timing.clone());
    let (shutdown, _) = watch::channel(false);
    let clients = crate::listen::ClientGates::new(&cfg.limits, cfg.upstreams.iter().map(|(s, _)| s.as_str()));
    let forward = Arc::<ForwardStats>::default();
    tokio::spawn(crate::ratelimit::shell::run(
        ratelimits.clone(),
        members.clone(),
        policy.clone(),
        transport.clone(),
        limit_rx,
        ratelimit_timing,
    ));
    tokio::spawn(crate::mesh::health::run(writer.clone()));
    let stats = crate::stats::Stats::new(stats_interval(cfg.profile));
    tokio::spawn(crate::stats::run(stats.clone(), members.clone(), transport.clone(), stats_rx));
    let access_log = cfg.access_log.as_ref().map(crate::access_log::AccessLog::start).transpose()?;
    let spans = cfg.traces.as_ref().map(|t| crate::spans::Spans::start(t, &cfg.name)).transpose()?;
    let dns = match cfg.dns {
        Some((addr, explicit)) => crate::dns::bind(addr, explicit)?,
        None => None,
    };
    let (vips_tx, vips) = watch::channel(Arc::default());
    let view = MeshView::new(
        crate::mesh::view::Inputs {
            members: members.clone(),
            policy: policy.clone(),
            transport: transport.clone(),
            ratelimits: ratelimits.clone(),
            spiffe_id: tls.identity.clone(),
            access_log: access_log.clone(),
            spans: spans.clone(),
            stats: stats.clone(),
            vips: vips.clone(),
        },
        forward.clone(),
    );
    tokio::spawn(view.clone().serve_streams(streams));
    let rollout_figures = Arc::new(crate::rollouts::FiguresMemo::default());
    tokio::spawn(crate::rollouts::run(crate::rollouts::Driver {
        writer: writer.clone(),
        stats: stats.clone(),
        members: members.clone(),
        transport: transport.clone(),
        view: view.clone(),
        memo: rollout_figures.clone(),
    }));
    let dns_stats = Arc::new(crate::dns::DnsStats::default());
    let dns_addr = dns.as_ref().and_then(|(udp, _)| udp.local_addr().ok());
    if let Some((udp, tcp)) = dns {
        tracing::info!(listen = ?dns_addr, "DNS interface (UDP and TCP) for the trellis domain");
        tokio::spawn(crate::dns::serve(view.clone(), dns_stats.clone(), udp, tcp));
    }
    let fwd = Forwarder::new(view);
    if let Some((_, listener)) = proxy.and_then(|mut v| v.pop()) {
        tracing::info!(listen = %listener.local_addr()?, "http proxy listener");
        tokio::spawn(crate::mesh::http::serve(fwd.clone(), listener, cfg.limits.clone(), clients.proxy.clone()));
    }
    let gate = clients.virtual_addrs.clone();
    crate::mesh::vips::start(fwd.clone(), cfg.virtual_range, &cfg.data_dir, cfg.limits.clone(), gate, vips_tx);
    for (service, listener) in upstreams {
        tracing::info!(%service, listen = %listener.local_addr()?, "upstream listener");
        let gate = clients.upstreams[&service].clone();
        tokio::spawn(fwd.clone().serve_upstream(service, listener, cfg.limits.clone(), gate));
    }
    Ok(AgentHandle {
        members,
        writer,
        spiffe_id: tls.identity.clone(),
        transport,
        policy,
        forward,
        ratelimits,
        clients,
        started: Instant::now(),
        shutdown,
        lifecycle: Arc::default(),
        files: Arc::new(AgentFiles::of(cfg)),
        access_log,
        spans,
        stats,
        dns: (dns_addr, dns_stats),
        vips: (cfg.virtual_range, vips),
        rollout_figures,
    })
}

/// The chaos harness's faults, when the agent was started for it (`--fault-injection`,
/// or a drop rate); None on every normal start.
fn faults_of(cfg: &AgentConfig) -> Option<crate::faults::Faults> {
    (cfg.fault_injection || cfg.faults.drop_rate > 0.0).then(|| cfg.faults.clone())
}

/// Binds every upstream listener before anything starts, so a taken port fails the start
/// with the flag named.
fn bind_upstreams(list: &[(String, SocketAddr)]) -> anyhow::Result<Vec<(String, tokio::net::TcpListener)>> {
    list.iter()
        .map(|(service, addr)| {
            let l = std::net::TcpListener::bind(addr).map_err(|e| {
                anyhow::anyhow!("upstream: cannot listen on {addr} for {service}: {e}; pick another --upstream port")
            })?;
            l.set_nonblocking(true)?;
            Ok((service.clone(), tokio::net::TcpListener::from_std(l)?))
        })
        .collect()
}
