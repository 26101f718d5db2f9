//! The forwarding shell: a local TCP listener per upstream service; each connection goes
//! to an instance picked by the balancer, over a QUIC stream to the instance's node, or
//! over an in-memory pipe when the instance is on this node. Either way the instance's
//! agent runs [`Forwarder::inbound`], which checks the caller's identity against the
//! intentions before it connects. Bytes are copied as they come; nothing is buffered whole.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::{Request, Response};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use trellis_proto::forward::{ForwardOpen, ForwardStatus};

use super::inbound::Ended;
use super::upstream;
use crate::membership::Members;
use crate::policy::Policy;
use crate::ratelimit::RateLimits;
use crate::transport::{BiStream, Transport};
use trellis_core::membership::AliveMembers;
use trellis_core::mesh::balance::{Balancer, Candidate};
use trellis_core::mesh::catalog;
use trellis_core::mesh::circuit::{Breakers, Slot, SlotKind};
use trellis_core::mesh::locality::Place;
use trellis_core::mesh::pool::IdlePool;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// The QUIC error code a stream is reset with when intentions stop allowing it.
const DENIED_CODE: quinn::VarInt = quinn::VarInt::from_u32(0x403);
/// ... and when its forward header did not arrive within the stream read timeout.
const TIMEOUT_CODE: quinn::VarInt = quinn::VarInt::from_u32(0x408);
/// ... and when its instance went critical or away (the caller may try another).
const GONE_CODE: quinn::VarInt = quinn::VarInt::from_u32(0x410);
/// The in-memory pipe between a local caller and this node's inbound side: one QUIC
/// stream's worth of window.
const LOCAL_PIPE: usize = 256 * 1024;
/// Idle connections kept per instance: enough for a busy caller's steady concurrency,
/// few enough that idle QUIC streams never crowd out new ones (256 per peer).
const POOL_PER_INSTANCE: usize = 32;
/// Below the usual keep-alive timeouts of HTTP servers (60 s and up), so a pooled
/// connection is rarely one the instance is about to close.
const POOL_IDLE: Duration = Duration::from_secs(20);

/// A byte stream to an instance, local or through a peer.
pub trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Stream for T {}
pub type Io = Box<dyn Stream>;

/// Why an HTTP request got no response from the instance.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error(transparent)]
    Open(OpenError),
    #[error("HTTP handshake with the instance failed: {0}")]
    Handshake(hyper::Error),
    #[error("the instance did not answer: {0}")]
    Upstream(hyper::Error),
    /// `max_connections` are open and `max_pending` requests already wait for one.
    #[error("{0}")]
    Overflow(String),
}

/// Why no stream to an instance could be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("no live instance of {0}")]
    NoInstance(String),
    #[error("denied by intentions on {0}")]
    Denied(String),
    #[error("instance unreachable: {0}")]
    Unreachable(anyhow::Error),
}

#[derive(Debug, Default)]
pub struct ForwardStats {
    pub outbound: AtomicU64,
    pub inbound: AtomicU64,
    pub denied: AtomicU64,
    pub failed: AtomicU64,
    pub no_instance: AtomicU64,
    pub retries: AtomicU64,
    pub ejections: AtomicU64,
    /// Requests refused at once because the service's circuit was open.
    pub circuit_open: AtomicU64,
    /// Bytes written to and read from instances by this node's callers (HTTP and TCP,
    /// headers included), counted as they move.
    pub bytes_to_instances: Arc<AtomicU64>,
    pub bytes_from_instances: Arc<AtomicU64>,
    /// HTTP requests sent on a pooled connection rather than a new one.
    pub pool_reused: AtomicU64,
    /// Requests that ran out of their (route or service) timeout.
    pub timeouts: AtomicU64,
    /// Retries not taken because the retry budget was spent.
    pub budget_exhausted: AtomicU64,
    /// Proxied requests per service: status classes and latency.
    pub traffic: Mutex<trellis_core::mesh::traffic::Traffic>,
}

/// What the data plane takes from the rest of the agent.
pub struct Inputs {
    pub members: Members,
    pub policy: Arc<Policy>,
    pub transport: Arc<Transport>,
    pub ratelimits: Arc<RateLimits>,
    /// This node's SPIFFE id: the caller of what its proxies send.
    pub spiffe_id: String,
}

pub struct Forwarder {
    /// Itself, for the tasks that serve local calls' inbound side.
    me: Weak<Forwarder>,
    pub(crate) node: Inputs,
    /// Alive members as the agent task last published them: read per request without
    /// a round trip to that task.
    alive: watch::Receiver<Arc<AliveMembers>>,
    /// Idle HTTP connections to instances, reused across requests.
    pool: Arc<Mutex<IdlePool<upstream::Sender>>>,
    balancer: Arc<Mutex<Balancer>>,
    outliers: Mutex<trellis_core::mesh::outlier::OutlierDetector>,
    snap: Mutex<Arc<catalog::Snapshot>>,
    pub stats: Arc<ForwardStats>,
    pub(crate) breakers: Arc<Mutex<trellis_core::mesh::circuit::Breakers>>,
    pub(crate) budgets: Mutex<HashMap<String, trellis_core::mesh::retry::RetryBudget>>,
    /// Woken when a connection to an instance closes or goes back to the pool, so
    /// requests waiting under `max_connections` look again.
    freed: Arc<tokio::sync::Notify>,
    /// What a released connection slot calls: wakes those waiters.
    on_free: Arc<dyn Fn() + Send + Sync>,
}

impl Forwarder {
    pub fn new(node: Inputs, stats: Arc<ForwardStats>) -> Arc<Forwarder> {
        let (balancer, outliers, snap) = (Arc::default(), Mutex::default(), Mutex::default());
        let (breakers, budgets) = (Arc::default(), Mutex::default());
        let alive = node.members.alive.clone();
        let pool = Arc::new(Mutex::new(IdlePool::new(POOL_PER_INSTANCE, POOL_IDLE)));
        let freed = Arc::new(tokio::sync::Notify::new());
        Arc::new_cyclic(|me| Forwarder {
            me: me.clone(),
            node,
            alive,
            pool,
            balancer,
            outliers,
            snap,
            stats,
            breakers,
            budgets,
            freed: freed.clone(),
            on_free: Arc::new(move || freed.notify_waiters()),
        })
    }

    pub(crate) fn me(&self) -> Arc<Forwarder> {
        self.me.upgrade().expect("a Forwarder is only used through its Arc")
    }

    /// Accepts local clients of one upstream service, within `gate`'s connection caps:
    /// HTTP services get the proxy's L7 path (routes, splits, retries, limits, metrics,
    /// the header read deadline) whatever `Host` says; `tcp` ones (and services policy does
    /// not name) are carried as opaque byte streams.
    pub async fn serve_upstream(
        self: Arc<Self>,
        service: String,
        listener: TcpListener,
        limits: crate::limits::Limits,
        gate: Arc<crate::listen::ConnGate>,
    ) {
        let name: Arc<str> = service.as_str().into();
        let builder = Arc::new(crate::listen::http_builder(&limits));
        crate::listen::accept_loop(listener, gate, limits.header_read_timeout, move |tcp, first| {
            let (fwd, name, builder) = (self.clone(), name.clone(), builder.clone());
            async move {
                let l7 = fwd
                    .snapshot()
                    .protocols
                    .get(&*name)
                    .is_some_and(|p| *p != trellis_core::policy::model::Protocol::Tcp);
                if l7 {
                    return super::http::serve_connection(fwd, tcp, Some(name), builder, first).await;
                }
                // No headers to wait for: with some protocols the server speaks first.
                first.seen();
                if let Err(e) = fwd.client(&name, tcp).await {
                    tracing::debug!(service = %name, error = %e, "forwarding failed");
                }
                Ok(())
            }
        })
        .await
    }

    /// Carries one TCP client; it is closed when the instance's node goes away, rather
    /// than when QUIC's idle timeout notices.
    async fn client(&self, service: &str, mut tcp: TcpStream) -> anyhow::Result<()> {
        let (pick, in_flight) = self.pick(service, &BTreeMap::new(), None, &mut Vec::new())?;
        let Some(slot) = self.slot(service, SlotKind::Connection, pick.circuit_breaker.max_connections) else {
            self.stats.circuit_open.fetch_add(1, Relaxed);
            anyhow::bail!(
                "{} connections to {service} already open from this node",
                pick.circuit_breaker.max_connections
            );
        };
        let started = Instant::now();
        let io = self.connect(service, &pick).await?;
        self.observe(&pick, started.elapsed());
        let mut up = self.metered(io, Some(in_flight), Some(slot));
        tokio::select! {
            r = tokio::io::copy_bidirectional(&mut tcp, &mut up) => { r?; }
            _ = self.node_gone(&pick.node), if pick.peer.is_some() => {
                tracing::debug!(%service, node = %pick.node, "connection closed: the instance's node is gone");
            }
        }
        Ok(())
    }

    /// Picks a live instance of `service` carrying `labels` by the service's balancer
    /// (`hash` is the request's hash-header value), not one in `tried` where it can, and
    /// adds the pick to it. The pick counts as a request in flight until the guard drops.
    pub fn pick(
        &self,
        service: &str,
        labels: &BTreeMap<String, String>,
        hash: Option<u64>,
        tried: &mut Vec<String>,
    ) -> Result<(Pick, InFlight), OpenError> {
        let alive = self.alive.borrow().clone();
        let snap = self.snapshot();
        let instances: Vec<&catalog::InstanceView> = snap.instances_of(service, &alive, labels).collect();
        let od = snap.services.get(service).map(|s| s.outlier_detection.clone()).unwrap_or_default();
        let now = Instant::now();
        let names: Vec<String> = instances.iter().map(|i| i.name.clone()).collect();
        let mut admitted = self.outliers.lock().expect("outlier lock").admit(now, &names, od.max_ejected_percent);
        // A retry goes to an instance not tried yet for this request, while there is one.
        if admitted.iter().any(|&i| !tried.contains(&instances[i].name)) {
            admitted.retain(|&i| !tried.contains(&instances[i].name));
        }
        let place = |labels: &'_ BTreeMap<String, String>, node: &str| -> (Option<String>, Option<String>) {
            let of_node = alive.get(node).map(|(_, l)| l);
            let get = |k: &str| labels.get(k).or_else(|| of_node.and_then(|l| l.get(k))).cloned();
            (get("zone"), get("region"))
        };
        let places: Vec<(Option<String>, Option<String>)> =
            admitted.iter().map(|&i| place(&instances[i].instance.labels, &instances[i].instance.node)).collect();
        let cands: Vec<Candidate<'_>> = admitted
            .iter()
            .zip(&places)
            .map(|(&i, (zone, region))| Candidate {
                name: &instances[i].name,
                weight: instances[i].instance.weight,
                place: Place { zone: zone.as_deref(), region: region.as_deref() },
            })
            .collect();
        let mine = &self.node.members.identity.meta.labels;
        let me = Place { zone: mine.get("zone").map(String::as_str), region: mine.get("region").map(String::as_str) };
        let lb = snap.services.get(service).map(|s| s.lb.clone()).unwrap_or_default();
        let key = format!("{service}{labels:?}");
        let mut balancer = self.balancer.lock().expect("balancer lock");
        let Some(at) = balancer.pick(&key, &lb, me, &cands, hash) else {
            self.stats.no_instance.fetch_add(1, Relaxed);
            return Err(OpenError::NoInstance(service.into()));
        };
        let inst = instances[admitted[at]];
        balancer.start(&inst.name);
        drop(balancer);
        tried.push(inst.name.clone());
        self.stats.outbound.fetch_add(1, Relaxed);
        let local = inst.instance.node == self.node.members.identity.name;
        let pick = Pick {
            name: inst.name.clone(),
            node: inst.instance.node.clone(),
            addr: SocketAddr::new(inst.instance.address, inst.instance.port),
            peer: if local { None } else { Some(alive[&inst.instance.node].0) },
            connect_timeout: snap.services.get(service).map_or(CONNECT_TIMEOUT, |s| s.connect_timeout),
            outlier_detection: od,
            circuit_breaker: snap.services.get(service).map(|s| s.circuit_breaker.clone()).unwrap_or_default(),
        };
        Ok((pick, InFlight { name: inst.name.clone(), balancer: self.balancer.clone() }))
    }

    /// Opens a byte stream to a picked instance: a QUIC stream through the instance's
    /// agent, or a pipe to this agent's own inbound side. Failures count towards ejecting
    /// the instance.
    pub async fn connect(&self, service: &str, pick: &Pick) -> Result<Io, OpenError> {
        let res = match pick.peer {
            None => self.local(service, pick).await,
            Some(peer) => self.remote(service, pick, peer).await,
        };
        if matches!(res, Err(OpenError::Unreachable(_))) {
            self.record(service, pick, trellis_core::mesh::outlier::Outcome::GatewayFailure);
        }
        res
    }

    /// `io` with its bytes counted in the forwarding stats, holding its connection slot.
    fn metered(&self, io: Io, in_flight: Option<InFlight>, slot: Option<Slot>) -> Io {
        let (sent, received) = (self.stats.bytes_to_instances.clone(), self.stats.bytes_from_instances.clone());
        Box::new(Metered { io, sent, received, _in_flight: in_flight, _slot: slot })
    }

    fn slot(&self, service: &str, kind: SlotKind, max: u32) -> Option<Slot> {
        Breakers::slot(&self.breakers, service, kind, max, self.on_free.clone())
    }

    /// A place for a new connection to `pick`'s service, or None after waiting a while
    /// for one (then the pool may hold a connection again). Past `max_pending` waiters,
    /// the request is refused.
    async fn connection_slot(
        &self,
        service: &str,
        pick: &Pick,
        waiting: &mut Option<Slot>,
    ) -> Result<Option<Slot>, SendError> {
        let cb = &pick.circuit_breaker;
        let freed = self.freed.notified();
        tokio::pin!(freed);
        freed.as_mut().enable();
        if let Some(slot) = self.slot(service, SlotKind::Connection, cb.max_connections) {
            return Ok(Some(slot));
        }
        if waiting.is_none() {
            *waiting = self.slot(service, SlotKind::Pending, cb.max_pending);
            if waiting.is_none() {
                return Err(SendError::Overflow(format!(
                    "{} connections to {service} open and {} requests waiting for one on this node",
                    cb.max_connections, cb.max_pending
                )));
            }
            self.evict_idle(service, &pick.name);
        }
        // The timeout covers a wake-up lost between the pool check and `enable`.
        let _ = tokio::time::timeout(Duration::from_millis(50), freed).await;
        Ok(None)
    }

    /// Closes one idle connection to another instance of `service`, so its slot can go
    /// to the instance a request waits for.
    fn evict_idle(&self, service: &str, except: &str) {
        let snap = self.snapshot();
        let mut pool = self.pool.lock().expect("pool lock");
        let others = snap.instances.iter().filter(|i| i.instance.service == service && i.name != except);
        for i in others {
            if pool.take(&i.name, Instant::now(), |_| true).is_some() {
                return;
            }
        }
    }

    /// Sends an HTTP request to a picked instance, on an idle pooled connection when there
    /// is one, else on a new one. A pooled connection that closed under us hands the
    /// request back unsent, and it goes out on the next one.
    pub async fn request(
        &self,
        service: &str,
        pick: &Pick,
        mut req: Request<upstream::Body>,
        authority: &str,
        h2: bool,
    ) -> Result<Response<Incoming>, SendError> {
        let mut waiting = None;
        loop {
            let idle =
                self.pool.lock().expect("pool lock").take(&pick.name, Instant::now(), upstream::Sender::is_usable);
            let reused = idle.is_some();
            let mut sender = match idle {
                Some(s) => s,
                None => {
                    let Some(slot) = self.connection_slot(service, pick, &mut waiting).await? else { continue };
                    let io = self.connect(service, pick).await.map_err(SendError::Open)?;
                    upstream::handshake(self.metered(io, None, Some(slot)), h2).await.map_err(SendError::Handshake)?
                }
            };
            drop(waiting.take());
            let shared = sender.shared().map(|again| {
                self.pool.lock().expect("pool lock").put(&pick.name, again, Instant::now());
            });
            match sender.send(req, authority).await {
                Ok(resp) => {
                    self.stats.pool_reused.fetch_add(u64::from(reused), Relaxed);
                    if shared.is_none() {
                        self.keep_when_idle(pick.name.clone(), sender);
                    }
                    return Ok(resp);
                }
                Err(mut e) => match e.take_message() {
                    Some(back) if reused => req = back,
                    _ => return Err(SendError::Upstream(e.into_error())),
                },
            }
        }
    }

    /// Returns an HTTP/1.1 connection to the pool once its response has been read.
    fn keep_when_idle(&self, name: String, mut sender: upstream::Sender) {
        let (pool, freed) = (self.pool.clone(), self.freed.clone());
        tokio::spawn(async move {
            if sender.idle().await {
                pool.lock().expect("pool lock").put(&name, sender, Instant::now());
                freed.notify_waiters();
            }
        });
    }

    /// Feeds the outlier detector with what one attempt on `pick` came to.
    pub fn record(&self, service: &str, pick: &Pick, outcome: trellis_core::mesh::outlier::Outcome) {
        let now = Instant::now();
        if self.outliers.lock().expect("outlier lock").record(now, &pick.name, outcome, &pick.outlier_detection) {
            self.stats.ejections.fetch_add(1, Relaxed);
            tracing::warn!(instance = %pick.name, %service, "instance ejected after consecutive failures");
        }
    }

    /// Resolves when `node` is no longer an alive member (declared down, or left).
    pub fn node_gone(&self, node: &str) -> impl std::future::Future<Output = ()> + Send + 'static {
        let (mut alive, node) = (self.alive.clone(), node.to_string());
        async move {
            loop {
                if !alive.borrow_and_update().contains_key(&node) {
                    return;
                }
                if alive.changed().await.is_err() {
                    return std::future::pending().await;
                }
            }
        }
    }

    /// The latency peak EWMA sees for `pick`.
    pub fn observe(&self, pick: &Pick, took: Duration) {
        self.balancer.lock().expect("balancer lock").observe(Instant::now(), &pick.name, took);
    }

    /// The policy view for this request: rebuilt only when the store's published index
    /// moved, so a request never waits on the store lock (held across a log fsync).
    pub fn snapshot(&self) -> Arc<catalog::Snapshot> {
        let index = *self.node.policy.index.borrow();
        let mut cur = self.snap.lock().expect("snapshot lock");
        if cur.index != index || cur.index == 0 {
            let store = self.node.policy.store.lock().expect("policy lock");
            // Keyed by the published index, which may trail the store's own by an fsync.
            *cur = Arc::new(catalog::Snapshot { index, ..catalog::Snapshot::build(&store) });
        }
        cur.clone()
    }

    async fn remote(&self, service: &str, pick: &Pick, peer: SocketAddr) -> Result<Io, OpenError> {
        let transport = self.node.transport.clone();
        let stream = async move {
            let (send, recv) = transport.open_bi(peer).await?;
            anyhow::Ok(tokio::io::join(recv, send))
        };
        self.handshake(service, pick, stream).await
    }

    /// A call from this node to its own instance: the far end of a pipe is served by
    /// [`Forwarder::inbound`] as a peer's stream would be, with this node as the caller.
    async fn local(&self, service: &str, pick: &Pick) -> Result<Io, OpenError> {
        let (near, mut far) = tokio::io::duplex(LOCAL_PIPE);
        let (fwd, caller) = (self.me(), self.node.spiffe_id.clone());
        tokio::spawn(async move {
            if let Err(e) = fwd.inbound(&caller, &mut far).await {
                tracing::debug!(error = %e, "local inbound stream failed");
            }
        });
        self.handshake(service, pick, async { anyhow::Ok(near) }).await
    }

    /// Sends the forward header on a new stream and reads the inbound side's answer.
    async fn handshake<S: Stream + 'static>(
        &self,
        service: &str,
        pick: &Pick,
        stream: impl std::future::Future<Output = anyhow::Result<S>>,
    ) -> Result<Io, OpenError> {
        let open = async {
            let mut io = stream.await?;
            io.write_all(&ForwardOpen { service: service.into(), instance: pick.name.clone() }.encode()).await?;
            let status = ForwardStatus::from_byte(io.read_u8().await?);
            anyhow::Ok((status, io))
        };
        // A peer that died keeps its pooled connection until QUIC gives up on it; the
        // service's connect timeout bounds the wait, so a retry can go elsewhere.
        let limit = pick.connect_timeout;
        let opened = tokio::time::timeout(limit, open)
            .await
            .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer from {} within {limit:?}", pick.node)));
        let (status, io) = opened.map_err(|e| {
            self.stats.failed.fetch_add(1, Relaxed);
            OpenError::Unreachable(e)
        })?;
        match status {
            ForwardStatus::Ok => Ok(Box::new(io)),
            // A local call's inbound side counted its own refusal already.
            ForwardStatus::Denied => {
                self.stats.denied.fetch_add(u64::from(pick.peer.is_some()), Relaxed);
                Err(OpenError::Denied(pick.node.clone()))
            }
            other => {
                self.stats.failed.fetch_add(u64::from(pick.peer.is_some()), Relaxed);
                Err(OpenError::Unreachable(anyhow::anyhow!("{} answered {other:?}", pick.node)))
            }
        }
    }

    /// Serves streams that peers open towards our instances.
    pub async fn serve_streams(self: Arc<Self>, mut streams: mpsc::Receiver<BiStream>) {
        while let Some(s) = streams.recv().await {
            let fwd = self.clone();
            tokio::spawn(async move {
                let peer = s.peer_name.clone();
                if let Err(e) = fwd.server(s).await {
                    tracing::debug!(%peer, error = %e, "inbound stream failed");
                }
            });
        }
    }

    /// The QUIC shell around [`Forwarder::inbound`]: the caller is the certified peer, and
    /// a stream that must end early is reset with a code saying why.
    async fn server(&self, s: BiStream) -> anyhow::Result<()> {
        let BiStream { peer_name, send, recv, .. } = s;
        let caller = self.node.members.spiffe_of(&peer_name);
        let mut quic = tokio::io::join(recv, send);
        let code = match self.inbound(&caller, &mut quic).await? {
            Ended::Done => return Ok(()),
            Ended::Denied => DENIED_CODE,
            Ended::Gone => GONE_CODE,
            Ended::HeaderTimeout => {
                self.node.transport.stats.peer_refuse(crate::transport::PeerRefusal::StreamTimeout);
                TIMEOUT_CODE
            }
        };
        let (mut recv, mut send) = quic.into_inner();
        let _ = send.reset(code);
        let _ = recv.stop(code);
        if code == TIMEOUT_CODE {
            anyhow::bail!("no forward header within {:?}", self.node.transport.limits.stream_read_timeout);
        }
        Ok(())
    }
}

/// An instance chosen for one request or connection.
#[derive(Debug, Clone)]
pub struct Pick {
    /// The instance's catalog name (`<id>@<node>`): the balancer's and the pool's key.
    pub name: String,
    pub node: String,
    pub addr: SocketAddr,
    /// The instance's agent, when it is not this one.
    pub peer: Option<SocketAddr>,
    /// The service's settings as of the pick, so the request's later steps need not look
    /// at policy again.
    pub connect_timeout: Duration,
    pub outlier_detection: trellis_core::policy::model::OutlierDetection,
    pub circuit_breaker: trellis_core::policy::model::CircuitBreaker,
}

/// A request in flight to an instance, for least-request and peak EWMA: it ends when
/// the guard drops (with the response body, or the TCP connection).
pub struct InFlight {
    name: String,
    balancer: Arc<Mutex<Balancer>>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Ok(mut b) = self.balancer.lock() {
            b.end(&self.name);
        }
    }
}

/// A response body that keeps its request in flight until it is dropped, and fails
/// when `gone` resolves (the instance's node left or was declared down), so a body
/// from a dead node ends at detection rather than at QUIC's idle timeout.
pub struct Counted<B> {
    body: B,
    _in_flight: InFlight,
    // In a Mutex only to be Sync for `BoxBody`; polled through `get_mut`, never locked.
    gone: Option<Mutex<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>>>,
}

impl<B> Counted<B> {
    pub fn new(
        body: B,
        in_flight: InFlight,
        gone: Option<impl std::future::Future<Output = ()> + Send + 'static>,
    ) -> Self {
        let gone =
            gone.map(|g| Mutex::new(Box::pin(g) as std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>));
        Counted { body, _in_flight: in_flight, gone }
    }
}

/// Why a response body stopped before its end.
#[derive(Debug, thiserror::Error)]
#[error("the instance's node left the cluster or was declared down while its answer was streaming")]
pub struct NodeGone;

impl<B> hyper::body::Body for Counted<B>
where
    B: hyper::body::Body + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = B::Data;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<B::Data>, Self::Error>>> {
        let this = self.get_mut();
        if let Some(gone) = this.gone.as_mut() {
            let gone = gone.get_mut().unwrap_or_else(|p| p.into_inner());
            if gone.as_mut().poll(cx).is_ready() {
                return std::task::Poll::Ready(Some(Err(Box::new(NodeGone))));
            }
        }
        std::pin::Pin::new(&mut this.body).poll_frame(cx).map_err(Into::into)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// A stream to an instance that counts the bytes it moves; for a TCP listener's
/// connection it also holds the connection in flight until dropped.
struct Metered {
    io: Io,
    sent: Arc<AtomicU64>,
    received: Arc<AtomicU64>,
    _in_flight: Option<InFlight>,
    _slot: Option<Slot>,
}

impl tokio::io::AsyncRead for Metered {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.io).poll_read(cx, buf);
        self.received.fetch_add((buf.filled().len() - before) as u64, Relaxed);
        r
    }
}

impl tokio::io::AsyncWrite for Metered {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.io).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = r {
            self.sent.fetch_add(n as u64, Relaxed);
        }
        r
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

pub(crate) async fn connect(ip: std::net::IpAddr, port: u16) -> anyhow::Result<TcpStream> {
    let s = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((ip, port))).await??;
    s.set_nodelay(true)?;
    Ok(s)
}
