//! The forwarding shell: a local TCP listener per upstream service; each connection goes
//! to an instance picked by the balancer, directly when the instance is on this node and
//! otherwise over a QUIC stream to the instance's node, which checks the caller's
//! certified identity against the intentions before it connects. Bytes are copied as they
//! come; nothing is buffered whole.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use trellis_proto::forward::{ForwardOpen, ForwardStatus, MAX_FORWARD_HEADER};

use super::balance::{Balancer, Candidate};
use super::locality::Place;
use super::{authz, catalog};
use crate::agent::AgentHandle;
use crate::membership::MemberState;
use crate::policy::model::{Action, Kind};
use crate::transport::BiStream;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// A byte stream to an instance, local or through a peer.
pub trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Stream for T {}
pub type Io = Box<dyn Stream>;

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
    /// Requests that ran out of their (route or service) timeout.
    pub timeouts: AtomicU64,
    /// Retries not taken because the retry budget was spent.
    pub budget_exhausted: AtomicU64,
    /// Proxied requests per service: status classes and latency.
    pub traffic: Mutex<super::traffic::Traffic>,
}

pub struct Forwarder {
    pub(crate) agent: AgentHandle,
    balancer: Arc<Mutex<Balancer>>,
    outliers: Mutex<super::outlier::OutlierDetector>,
    snap: Mutex<Arc<catalog::Snapshot>>,
    pub stats: Arc<ForwardStats>,
    pub(crate) breakers: Arc<Mutex<super::circuit::Breakers>>,
    pub(crate) budgets: Mutex<HashMap<String, super::retry::RetryBudget>>,
}

impl Forwarder {
    pub fn new(agent: AgentHandle, stats: Arc<ForwardStats>) -> Arc<Forwarder> {
        let (balancer, outliers, snap) = (Arc::default(), Mutex::default(), Mutex::default());
        let (breakers, budgets) = (Arc::default(), Mutex::default());
        Arc::new(Forwarder { agent, balancer, outliers, snap, stats, breakers, budgets })
    }

    pub fn agent(&self) -> &AgentHandle {
        &self.agent
    }

    /// Alive nodes by name, with their peer addresses and labels (ourselves included).
    async fn alive(&self) -> HashMap<String, (SocketAddr, BTreeMap<String, String>)> {
        self.agent
            .members()
            .await
            .into_iter()
            .filter(|m| m.state == MemberState::Alive)
            .map(|m| (m.id.name.clone(), (m.id.addr, m.id.meta.labels)))
            .collect()
    }

    /// Accepts local clients of one upstream service.
    pub async fn serve_upstream(self: Arc<Self>, service: String, listener: TcpListener) {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { continue };
            let (fwd, service) = (self.clone(), service.clone());
            tokio::spawn(async move {
                if let Err(e) = fwd.client(&service, tcp).await {
                    tracing::debug!(%service, error = %e, "forwarding failed");
                }
            });
        }
    }

    async fn client(&self, service: &str, mut tcp: TcpStream) -> anyhow::Result<()> {
        let mut up = self.open(service, &BTreeMap::new(), None, &mut Vec::new()).await?;
        tokio::io::copy_bidirectional(&mut tcp, &mut up).await?;
        Ok(())
    }

    /// Picks a live instance of `service` carrying `labels` (by the service's balancer;
    /// `hash` is the request's hash-header value; not one in `tried`, where it can, and
    /// adds the pick to it) and opens a byte stream to it: a local TCP
    /// connection, or a QUIC stream through the instance's agent.
    pub async fn open(
        &self,
        service: &str,
        labels: &BTreeMap<String, String>,
        hash: Option<u64>,
        tried: &mut Vec<String>,
    ) -> Result<Io, OpenError> {
        let alive = self.alive().await;
        let names: std::collections::HashSet<String> = alive.keys().cloned().collect();
        let snap = self.snapshot();
        let instances: Vec<&catalog::InstanceView> = snap.instances_of(service, &names, labels).collect();
        let od = snap.services.get(service).map(|s| s.outlier_detection.clone()).unwrap_or_default();
        let now = std::time::Instant::now();
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
        let mine = &self.agent.identity.meta.labels;
        let me = Place { zone: mine.get("zone").map(String::as_str), region: mine.get("region").map(String::as_str) };
        let lb = snap.services.get(service).map(|s| s.lb.clone()).unwrap_or_default();
        let key = format!("{service}{labels:?}");
        let pick = self.balancer.lock().expect("balancer lock").pick(&key, &lb, me, &cands, hash);
        let Some(pick) = pick else {
            self.stats.no_instance.fetch_add(1, Relaxed);
            return Err(OpenError::NoInstance(service.into()));
        };
        let inst = &instances[admitted[pick]];
        tried.push(inst.name.clone());
        self.stats.outbound.fetch_add(1, Relaxed);
        let started = std::time::Instant::now();
        let res = if inst.instance.node == self.agent.identity.name {
            match connect(inst.instance.address, inst.instance.port).await {
                Ok(up) => Ok(Box::new(up) as Io),
                Err(e) => Err(OpenError::Unreachable(e)),
            }
        } else {
            self.remote(service, inst, alive[&inst.instance.node].0).await
        };
        // Opening the stream (QUIC stream, the far agent's connect, its answer) is the
        // latency peak EWMA sees; the open stream counts as a request in flight.
        let res = res.map(|io| {
            let mut b = self.balancer.lock().expect("balancer lock");
            b.observe(std::time::Instant::now(), &inst.name, started.elapsed());
            b.start(&inst.name);
            Box::new(Tracked { io, name: inst.name.clone(), balancer: self.balancer.clone() }) as Io
        });
        let ok = !matches!(res, Err(OpenError::Unreachable(_)));
        if self.outliers.lock().expect("outlier lock").record(now, &inst.name, ok, &od) {
            self.stats.ejections.fetch_add(1, Relaxed);
            tracing::warn!(instance = %inst.name, %service, "instance ejected after consecutive failures");
        }
        res
    }

    /// The policy view for this request: rebuilt only when the store has changed.
    pub fn snapshot(&self) -> Arc<catalog::Snapshot> {
        let store = self.agent.policy.store.lock().expect("policy lock");
        let mut cur = self.snap.lock().expect("snapshot lock");
        if cur.index != store.index() || cur.index == 0 {
            *cur = Arc::new(catalog::Snapshot::build(&store));
        }
        cur.clone()
    }

    async fn remote(&self, service: &str, inst: &catalog::InstanceView, peer: SocketAddr) -> Result<Io, OpenError> {
        let open = async {
            let (mut send, mut recv) = self.agent.transport.open_bi(peer).await?;
            send.write_all(&ForwardOpen { service: service.into(), instance: inst.name.clone() }.encode()).await?;
            let status = ForwardStatus::from_byte(recv.read_u8().await?);
            anyhow::Ok((status, send, recv))
        };
        // A peer that died keeps its pooled connection until QUIC gives up on it; the
        // service's connect timeout bounds the wait, so a retry can go elsewhere.
        let limit = self.snapshot().services.get(service).map_or(CONNECT_TIMEOUT, |s| s.connect_timeout);
        let opened = tokio::time::timeout(limit, open)
            .await
            .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer from {} within {limit:?}", inst.instance.node)));
        let (status, send, recv) = opened.map_err(|e| {
            self.stats.failed.fetch_add(1, Relaxed);
            OpenError::Unreachable(e)
        })?;
        match status {
            ForwardStatus::Ok => Ok(Box::new(tokio::io::join(recv, send))),
            ForwardStatus::Denied => {
                self.stats.denied.fetch_add(1, Relaxed);
                Err(OpenError::Denied(inst.instance.node.clone()))
            }
            other => {
                self.stats.failed.fetch_add(1, Relaxed);
                Err(OpenError::Unreachable(anyhow::anyhow!("{} answered {other:?}", inst.instance.node)))
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

    async fn server(&self, s: BiStream) -> anyhow::Result<()> {
        let BiStream { peer_name, mut send, mut recv, .. } = s;
        let len = recv.read_u16().await? as usize;
        if len > MAX_FORWARD_HEADER {
            send.write_all(&[ForwardStatus::BadRequest as u8]).await?;
            anyhow::bail!("forward header of {len} bytes");
        }
        let mut buf = vec![0; len];
        recv.read_exact(&mut buf).await?;
        let open = match ForwardOpen::decode(&buf) {
            Ok(o) => o,
            Err(e) => {
                send.write_all(&[ForwardStatus::BadRequest as u8]).await?;
                anyhow::bail!("bad forward header: {e}");
            }
        };
        let caller = self.agent.spiffe_of(&peer_name);
        let snap = self.snapshot();
        let me = &self.agent.identity.name;
        let target = snap
            .instances
            .iter()
            .find(|i| i.name == open.instance && &i.instance.node == me && i.instance.service == open.service)
            .cloned();
        let action = authz::decide(snap.intentions.iter(), snap.intention_default, &caller, &open.service);
        let Some(target) = target else {
            send.write_all(&[ForwardStatus::UnknownInstance as u8]).await?;
            anyhow::bail!("no local instance {}", open.instance);
        };
        if action == Action::Deny {
            self.stats.denied.fetch_add(1, Relaxed);
            send.write_all(&[ForwardStatus::Denied as u8]).await?;
            let _ = send.finish();
            tracing::info!(%caller, service = %open.service, "denied by intentions");
            return Ok(());
        }
        let mut up = match connect(target.instance.address, target.instance.port).await {
            Ok(up) => up,
            Err(e) => {
                self.stats.failed.fetch_add(1, Relaxed);
                send.write_all(&[ForwardStatus::Unreachable as u8]).await?;
                return Err(e);
            }
        };
        self.stats.inbound.fetch_add(1, Relaxed);
        send.write_all(&[ForwardStatus::Ok as u8]).await?;
        let mut quic = tokio::io::join(recv, send);
        tokio::io::copy_bidirectional(&mut quic, &mut up).await?;
        Ok(())
    }
}

/// A stream to an instance that counts as in flight until dropped.
struct Tracked {
    io: Io,
    name: String,
    balancer: Arc<Mutex<Balancer>>,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if let Ok(mut b) = self.balancer.lock() {
            b.end(&self.name);
        }
    }
}

impl tokio::io::AsyncRead for Tracked {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Tracked {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
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

async fn connect(ip: std::net::IpAddr, port: u16) -> anyhow::Result<TcpStream> {
    let s = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((ip, port))).await??;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Kinds the operator API may not write (they belong to nodes).
pub fn node_owned(kind: Kind) -> bool {
    kind == Kind::Instances
}
