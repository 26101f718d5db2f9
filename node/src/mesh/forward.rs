//! The outbound side of the data plane: picks an instance by the balancer, opens a stream
//! to it (a QUIC stream to the instance's node, or an in-memory pipe when the instance is
//! on this node), and sends HTTP requests on pooled connections. Either way the instance's
//! agent runs [`MeshView::inbound`], which checks the caller against the intentions
//! before it connects. Bytes are copied as they come; nothing is buffered whole.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::{Request, Response};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use trellis_core::membership::AliveMembers;
use trellis_core::mesh::balance::{Balancer, Candidate};
use trellis_core::mesh::catalog;
use trellis_core::mesh::circuit::{Breakers, Slot, SlotKind};
use trellis_core::mesh::locality::Place;
use trellis_core::mesh::pool::IdlePool;
use trellis_proto::forward::{ForwardOpen, ForwardStatus};

use super::body::{GiveBack, Reuse};
use super::instance_http;
use super::io::{InFlight, Io, Metered, Stream};
use super::view::{ForwardStats, MeshView};

/// The in-memory pipe between a local caller and this node's inbound side: one QUIC
/// stream's worth of window.
const LOCAL_PIPE: usize = 256 * 1024;
/// Idle connections kept per instance: enough for a busy caller's steady concurrency,
/// few enough that idle QUIC streams never crowd out new ones (256 per peer).
const POOL_PER_INSTANCE: usize = 32;
/// Below the usual keep-alive timeouts of HTTP servers (60 s and up), so a pooled
/// connection is rarely one the instance is about to close.
const POOL_IDLE: Duration = Duration::from_secs(20);

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

pub struct Forwarder {
    /// The agent's inputs, the counters and the policy view, shared with the inbound side.
    pub(crate) view: Arc<MeshView>,
    /// Alive members as the agent task last published them: read per request without
    /// a round trip to that task.
    alive: watch::Receiver<Arc<AliveMembers>>,
    /// Members not declared down nor gone: in-flight requests end when theirs leaves it.
    standing: watch::Receiver<Arc<std::collections::HashSet<String>>>,
    /// Idle HTTP connections to instances, reused across requests.
    pool: Arc<Mutex<IdlePool<instance_http::Sender>>>,
    balancer: Arc<Mutex<Balancer>>,
    outliers: Mutex<trellis_core::mesh::outlier::OutlierDetector>,
    pub stats: Arc<ForwardStats>,
    pub(crate) breakers: Arc<Mutex<trellis_core::mesh::circuit::Breakers>>,
    pub(crate) budgets: Mutex<HashMap<String, trellis_core::mesh::retry::RetryBudget>>,
    /// Woken when a connection to an instance closes or goes back to the pool, so
    /// requests waiting under `max_connections` look again.
    freed: Arc<tokio::sync::Notify>,
    /// What a released connection slot calls: wakes those waiters.
    on_free: Arc<dyn Fn() + Send + Sync>,
    /// What a response body read to its end calls with its connection: pools it.
    give_back: GiveBack,
}

impl Forwarder {
    pub fn new(view: Arc<MeshView>) -> Arc<Forwarder> {
        let (balancer, outliers) = (Arc::default(), Mutex::default());
        let (breakers, budgets) = (Arc::default(), Mutex::default());
        let alive = view.node.members.alive.clone();
        let standing = view.node.members.standing.clone();
        let pool = Arc::new(Mutex::new(IdlePool::new(POOL_PER_INSTANCE, POOL_IDLE)));
        let freed = Arc::new(tokio::sync::Notify::new());
        let give_back = {
            let (pool, freed) = (pool.clone(), freed.clone());
            Arc::new(move |name: &str, sender| {
                pool.lock().expect("pool lock").put(name, sender, Instant::now());
                freed.notify_waiters();
            })
        };
        Arc::new(Forwarder {
            stats: view.stats.clone(),
            view,
            alive,
            standing,
            pool,
            balancer,
            outliers,
            breakers,
            budgets,
            freed: freed.clone(),
            on_free: Arc::new(move || freed.notify_waiters()),
            give_back,
        })
    }

    /// Picks a live instance of `service` carrying `labels` by the service's balancer
    /// (`hash` is the request's hash-header value), not one in `tried` where it can, and
    /// adds the pick to it. The pick counts as a request in flight until the guard drops.
    pub fn pick(
        &self,
        snap: &catalog::Snapshot,
        service: &str,
        labels: &BTreeMap<String, String>,
        hash: Option<u64>,
        tried: &mut Vec<String>,
    ) -> Result<(Pick, InFlight), OpenError> {
        let alive = self.alive.borrow().clone();
        let instances: Vec<&catalog::InstanceView> = snap.instances_of(service, &alive, labels).collect();
        let settings = snap.settings(service);
        let (od, lb) = (&settings.outlier_detection, &settings.lb);
        let now = Instant::now();
        let names: Vec<&str> = instances.iter().map(|i| i.name.as_str()).collect();
        let mut admitted = self.outliers.lock().expect("outlier lock").admit(now, &names, od.max_ejected_percent);
        // A retry goes to an instance not tried yet for this request, while there is one.
        if admitted.iter().any(|&i| !tried.contains(&instances[i].name)) {
            admitted.retain(|&i| !tried.contains(&instances[i].name));
        }
        let cands: Vec<Candidate<'_>> = admitted
            .iter()
            .map(|&i| Candidate {
                name: &instances[i].name,
                weight: instances[i].instance.weight,
                place: place_of(instances[i], &alive, lb.locality),
            })
            .collect();
        let mine = &self.view.node.members.identity.meta.labels;
        let me = Place::of_labels(mine, None);
        // The balancer's state is kept per service and subset.
        let key: std::borrow::Cow<'_, str> =
            if labels.is_empty() { service.into() } else { format!("{service}{labels:?}").into() };
        let mut balancer = self.balancer.lock().expect("balancer lock");
        let Some(at) = balancer.pick(&key, lb, me, &cands, hash) else {
            self.stats.no_instance.fetch_add(1, Relaxed);
            return Err(OpenError::NoInstance(service.into()));
        };
        let inst = instances[admitted[at]];
        balancer.start(&inst.name);
        drop(balancer);
        tried.push(inst.name.clone());
        self.stats.outbound.fetch_add(1, Relaxed);
        let local = inst.instance.node == self.view.node.members.identity.name;
        let pick = Pick {
            name: inst.name.clone(),
            node: inst.instance.node.clone(),
            addr: SocketAddr::new(inst.instance.address, inst.instance.port),
            peer: if local { None } else { Some(alive[&inst.instance.node].0) },
            caller: None,
            connect_timeout: settings.connect_timeout,
            outlier_detection: od.clone(),
            circuit_breaker: settings.circuit_breaker.clone(),
        };
        Ok((pick, InFlight::new(inst.name.clone(), self.balancer.clone())))
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
    pub(crate) fn metered(&self, io: Io, in_flight: Option<InFlight>, slot: Option<Slot>) -> Io {
        let (sent, received) = (self.stats.bytes_to_instances.clone(), self.stats.bytes_from_instances.clone());
        Box::new(Metered { io, sent, received, _in_flight: in_flight, _slot: slot })
    }

    pub(crate) fn slot(&self, service: &str, kind: SlotKind, max: u32) -> Option<Slot> {
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
    /// request back unsent, and it goes out on the next one. An HTTP/1.1 connection comes
    /// back with the response, for its body to return it to the pool when read.
    pub async fn request(
        &self,
        service: &str,
        pick: &Pick,
        mut req: Request<instance_http::Body>,
        authority: &str,
        h2: bool,
    ) -> Result<(Response<Incoming>, Option<Reuse>), SendError> {
        let mut waiting = None;
        loop {
            let key = pick.pool_key();
            let idle = self.pool.lock().expect("pool lock").take(&key, Instant::now(), instance_http::Sender::is_open);
            let reused = idle.is_some();
            let mut sender = match idle {
                Some(s) => s,
                // The cold path is boxed: its state would otherwise be part of every
                // request's future, and be moved with it.
                None => match Box::pin(self.new_connection(service, pick, h2, &mut waiting)).await? {
                    Some(s) => s,
                    None => continue,
                },
            };
            // A connection handed back as its last body ended may not have seen that end
            // yet: it is ready at once, or closed.
            if reused && !sender.idle().await {
                continue;
            }
            drop(waiting.take());
            let shared = sender.shared().map(|again| {
                self.pool.lock().expect("pool lock").put(&key, again, Instant::now());
            });
            match sender.send(req, authority).await {
                Ok(resp) => {
                    self.stats.pool_reused.fetch_add(u64::from(reused), Relaxed);
                    let reuse = shared.is_none().then(|| Reuse {
                        sender,
                        name: key.to_string(),
                        give_back: self.give_back.clone(),
                    });
                    return Ok((resp, reuse));
                }
                Err(mut e) => match e.take_message() {
                    Some(back) if reused => req = back,
                    _ => return Err(SendError::Upstream(e.into_error())),
                },
            }
        }
    }

    /// A new HTTP connection to `pick`, within the service's connection limits; None when
    /// the wait for a slot ended without one (the pool may hold a connection again).
    async fn new_connection(
        &self,
        service: &str,
        pick: &Pick,
        h2: bool,
        waiting: &mut Option<Slot>,
    ) -> Result<Option<instance_http::Sender>, SendError> {
        let Some(slot) = self.connection_slot(service, pick, waiting).await? else { return Ok(None) };
        let io = self.connect(service, pick).await.map_err(SendError::Open)?;
        let sender = instance_http::handshake(self.metered(io, None, Some(slot)), h2).await;
        sender.map(Some).map_err(SendError::Handshake)
    }

    /// Feeds the outlier detector with what one attempt on `pick` came to.
    pub fn record(&self, service: &str, pick: &Pick, outcome: trellis_core::mesh::outlier::Outcome) {
        let now = Instant::now();
        if self.outliers.lock().expect("outlier lock").record(now, &pick.name, outcome, &pick.outlier_detection) {
            self.stats.ejections.fetch_add(1, Relaxed);
            tracing::warn!(instance = %pick.name, %service, "instance ejected after consecutive failures");
        }
    }

    /// Resolves when `node` is declared down or leaves. Not at a suspicion: requests under
    /// way to a suspect node go on (see `standing_members`), new ones avoid it.
    pub fn node_gone(&self, node: &str) -> impl std::future::Future<Output = ()> + Send + 'static {
        let (mut standing, node) = (self.standing.clone(), node.to_string());
        async move {
            loop {
                if !standing.borrow_and_update().contains(&node) {
                    return;
                }
                if standing.changed().await.is_err() {
                    return std::future::pending().await;
                }
            }
        }
    }

    /// The latency peak EWMA sees for `pick`.
    pub fn observe(&self, pick: &Pick, took: Duration) {
        self.balancer.lock().expect("balancer lock").observe(Instant::now(), &pick.name, took);
    }

    /// The policy view for this request (see [`MeshView::snapshot`]).
    pub fn snapshot(&self) -> Arc<catalog::Snapshot> {
        self.view.snapshot()
    }

    async fn remote(&self, service: &str, pick: &Pick, peer: SocketAddr) -> Result<Io, OpenError> {
        let transport = self.view.node.transport.clone();
        let stream = async move {
            let (send, recv) = transport.open_bi(peer).await?;
            anyhow::Ok(super::io::QuicIo { recv, send })
        };
        self.handshake(service, pick, stream).await
    }

    /// A call from this node to its own instance: the far end of a pipe is served by
    /// [`MeshView::inbound`] as a peer's stream would be, with this node as the caller.
    async fn local(&self, service: &str, pick: &Pick) -> Result<Io, OpenError> {
        let (near, mut far) = tokio::io::duplex(LOCAL_PIPE);
        let view = self.view.clone();
        tokio::spawn(async move {
            let me = (view.node.members.identity.name.as_str(), view.node.spiffe_id.as_str());
            if let Err(e) = view.inbound(me, &mut far).await {
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
            let caller_service = pick.caller.as_deref().map(String::from);
            io.write_all(
                &ForwardOpen { service: service.into(), instance: pick.name.clone(), caller_service }.encode(),
            )
            .await?;
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
}

/// Where `i` runs, from its labels, else its node's; looked up only when the balancer
/// weighs locality.
fn place_of<'a>(i: &'a catalog::InstanceView, alive: &'a AliveMembers, locality: bool) -> Place<'a> {
    if !locality {
        return Place::default();
    }
    Place::of_labels(&i.instance.labels, alive.get(&i.instance.node).map(|(_, l)| l))
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
    /// The calling service, when this node recognised the client (see `callers`): named in
    /// the stream header, so streams are pooled per calling service.
    pub caller: Option<Arc<str>>,
    /// The service's settings as of the pick, so the request's later steps need not look
    /// at policy again.
    pub connect_timeout: Duration,
    pub outlier_detection: trellis_core::policy::model::OutlierDetection,
    pub circuit_breaker: trellis_core::policy::model::CircuitBreaker,
}

impl Pick {
    /// The idle pool's key: a stream's header names its calling service, so a pooled
    /// connection is only reused for the same one.
    pub fn pool_key(&self) -> std::borrow::Cow<'_, str> {
        match &self.caller {
            Some(svc) => format!("{}|{svc}", self.name).into(),
            None => self.name.as_str().into(),
        }
    }
}
