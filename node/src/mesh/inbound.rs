//! The destination side of every stream to an instance on this node: from a peer over a
//! QUIC stream, and from this node's own proxy and listeners over an in-memory pipe. Both
//! speak the same forward header and status byte, so a local call meets exactly the check
//! a remote one does, and a new way in cannot skip it.
//!
//! A stream is decided once at open (caller, service) and copied as bytes, unless the
//! service has intentions that look into requests: then the stream is served as HTTP and
//! every request is decided on its own ([`trellis_core::mesh::authz`]). Open streams are decided again
//! whenever policy changes, and end when their instance goes critical or away.

use std::convert::Infallible;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use trellis_proto::forward::{ForwardOpen, ForwardStatus, MAX_FORWARD_HEADER};

use super::instance_http;
use super::io::{QuicIo, Stream};
use super::view::MeshView;
use crate::access_log::{Counted, Pending, TcpLine};
use crate::transport::BiStream;
use std::time::Instant;
use tokio::sync::mpsc;
use trellis_core::mesh::access_log::{Entry, Side};
use trellis_core::mesh::authz::{self, Caller, HttpRequest};
use trellis_core::mesh::catalog::{InstanceView, Snapshot};
use trellis_core::policy::model::{Action, Health, Protocol};

/// How an inbound stream ended, for the shell to close it the right way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Either side closed, or the stream was refused with a status byte.
    Done,
    /// Intentions stopped allowing it while it was open.
    Denied,
    /// Its instance went critical or away, or the service's mode changed (it now needs
    /// request-level checks): the caller opens a new stream.
    Gone,
    /// No forward header within the stream read timeout.
    HeaderTimeout,
}

impl MeshView {
    /// Does the access log take this service's requests here?
    /// Does this agent look at each request of `service` (its access log, or spans)?
    fn watches(&self, service: &str) -> bool {
        self.node.spans.is_some() || self.node.access_log.as_ref().is_some_and(|l| l.wants(service))
    }

    /// Serves one stream to a local instance for the node `from` (its name and SPIFFE id:
    /// a peer's, or this node's own). The calling service the header names counts only
    /// when that node hosts an instance of it (`callers::may_claim`).
    pub async fn inbound<S: Stream>(self: &Arc<Self>, from: (&str, &str), io: &mut S) -> anyhow::Result<Ended> {
        let within = self.node.transport.limits.stream_read_timeout;
        let Ok(header) = tokio::time::timeout(within, read_header(io)).await else {
            return Ok(Ended::HeaderTimeout);
        };
        let open = match header? {
            Ok(open) => open,
            Err(why) => {
                io.write_all(&[ForwardStatus::BadRequest as u8]).await?;
                anyhow::bail!("{why}");
            }
        };
        let snap = self.snapshot();
        let caller = caller_of(&snap, from, open.caller_service.as_deref());
        let caller = &caller;
        let Some(target) = local_target(&snap, &self.node.members.identity.name, &open).cloned() else {
            io.write_all(&[ForwardStatus::UnknownInstance as u8]).await?;
            anyhow::bail!("no local instance {}", open.instance);
        };
        let l7 = per_request(&snap, &target, self.watches(&open.service));
        if !l7 && stream_decision(&snap, caller, &open.service) == Action::Deny {
            self.stats.denied.fetch_add(1, Relaxed);
            io.write_all(&[ForwardStatus::Denied as u8]).await?;
            let _ = io.shutdown().await;
            tracing::info!(%caller, service = %open.service, "denied by intentions");
            return Ok(Ended::Done);
        }
        let up = match super::io::connect(target.instance.address, target.instance.port).await {
            Ok(up) => up,
            Err(e) => {
                self.stats.failed.fetch_add(1, Relaxed);
                io.write_all(&[ForwardStatus::Unreachable as u8]).await?;
                return Err(e);
            }
        };
        self.stats.inbound.fetch_add(1, Relaxed);
        io.write_all(&[ForwardStatus::Ok as u8]).await?;
        if l7 {
            self.serve_requests(caller, &open.service, &target, io, up).await
        } else {
            self.copy_while_allowed(caller, &open.service, &target, io, up).await
        }
    }

    /// Copies bytes both ways until either side closes, or policy no longer lets the
    /// stream stand as it is.
    async fn copy_while_allowed<S: Stream>(
        self: &Arc<Self>,
        caller: &Caller,
        service: &str,
        target: &InstanceView,
        io: &mut S,
        mut up: tokio::net::TcpStream,
    ) -> anyhow::Result<Ended> {
        // A stream lives as long as its caller keeps it (pooled HTTP connections, long TCP
        // sessions), so it is decided again whenever policy changes.
        let mut changes = self.node.policy.index.subscribe();
        let mut line = TcpLine::start(self.node.access_log.as_ref(), Side::Inbound, caller.to_string(), service);
        if let Some(l) = &mut line {
            l.instance(&target.name, (target.instance.address, target.instance.port).into());
        }
        let copy = super::io::relay(&mut up, io);
        tokio::pin!(copy);
        loop {
            tokio::select! {
                r = &mut copy => {
                    let (sent, received) = r.inspect_err(|_| line.iter_mut().for_each(|l| l.failed("upstream")))?;
                    line.iter_mut().for_each(|l| l.bytes(received, sent));
                    return Ok(Ended::Done);
                }
                Ok(()) = changes.changed() => {
                    let snap = self.snapshot();
                    if stream_decision(&snap, caller, service) == Action::Deny {
                        line.iter_mut().for_each(|l| l.failed("denied"));
                        self.stats.denied.fetch_add(1, Relaxed);
                        tracing::info!(%caller, %service, "open stream closed: intentions now deny");
                        return Ok(Ended::Denied);
                    }
                    if !serves(&snap, target) || per_request(&snap, target, self.watches(service)) {
                        return Ok(Ended::Gone);
                    }
                }
            }
        }
    }

    /// Serves the stream as HTTP in the instance's protocol, deciding each request.
    async fn serve_requests<S: Stream>(
        self: &Arc<Self>,
        caller: &Caller,
        service: &str,
        target: &InstanceView,
        io: &mut S,
        up: tokio::net::TcpStream,
    ) -> anyhow::Result<Ended> {
        let h2 = instance_http::is_h2(self.snapshot().protocol_of(service));
        let sender = instance_http::handshake(Box::new(up), h2).await?;
        let fwd = self.clone();
        let (caller, service): (Arc<Caller>, Arc<str>) = (Arc::new(caller.clone()), service.into());
        let instance = Arc::new(Instance {
            name: target.name.clone(),
            sender: tokio::sync::Mutex::new(sender),
            addr: (target.instance.address, target.instance.port),
            h2,
        });
        let svc = hyper::service::service_fn(move |req| {
            request(fwd.clone(), caller.clone(), service.clone(), instance.clone(), req)
        });
        let io = TokioIo::new(io);
        let mut changes = self.node.policy.index.subscribe();
        let conn = async {
            if h2 {
                hyper::server::conn::http2::Builder::new(TokioExecutor::new()).serve_connection(io, svc).await
            } else {
                hyper::server::conn::http1::Builder::new().serve_connection(io, svc).await
            }
        };
        tokio::pin!(conn);
        loop {
            tokio::select! {
                r = &mut conn => {
                    r?;
                    return Ok(Ended::Done);
                }
                Ok(()) = changes.changed() => {
                    if !serves(&self.snapshot(), target) {
                        return Ok(Ended::Gone);
                    }
                }
            }
        }
    }
}

/// The connection to the instance behind one inbound HTTP stream.
struct Instance {
    /// `<id>@<node>`, for the access log.
    name: String,
    sender: tokio::sync::Mutex<instance_http::Sender>,
    addr: (std::net::IpAddr, u16),
    h2: bool,
}

impl Instance {
    /// Sends `req`, first opening a new connection when the instance closed the last one
    /// (servers that answer `Connection: close`, or idle timeouts).
    async fn send(&self, req: Request<instance_http::Body>, authority: &str) -> anyhow::Result<Response<Incoming>> {
        // HTTP/2 carries requests side by side on one connection; HTTP/1.1 one at a time.
        if let Some(mut s) = self.sender.lock().await.shared().filter(instance_http::Sender::is_usable) {
            return Ok(s.send(req, authority).await.map_err(|e| e.into_error())?);
        }
        let mut s = self.sender.lock().await;
        if !s.idle().await {
            let up = super::io::connect(self.addr.0, self.addr.1).await?;
            *s = instance_http::handshake(Box::new(up), self.h2).await?;
        }
        Ok(s.send(req, authority).await.map_err(|e| e.into_error())?)
    }
}

/// One request on an inbound HTTP stream: decided, then sent to the instance.
async fn request(
    fwd: Arc<MeshView>,
    caller: Arc<Caller>,
    service: Arc<str>,
    instance: Arc<Instance>,
    mut req: Request<Incoming>,
) -> Result<Response<instance_http::Body>, Infallible> {
    let started = Instant::now();
    let spans = fwd.node.spans.as_ref();
    let hop = super::ids::stamp(req.headers_mut(), spans.map_or(0.0, |s| s.ratio()));
    let span = super::ids::hop_span(spans, &hop, Side::Inbound, &req, &service).map(|mut s| {
        s.attributes.extend([
            opentelemetry::KeyValue::new("trellis.caller", caller.to_string()),
            opentelemetry::KeyValue::new("trellis.instance", instance.name.clone()),
        ]);
        s
    });
    let line = fwd.node.access_log.as_ref().filter(|l| l.wants(&service)).map(|log| {
        let received = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let entry = Entry {
            instance: Some(instance.name.clone()),
            upstream: Some(std::net::SocketAddr::from(instance.addr).to_string()),
            attempts: 1,
            ..log.begin(&req, &hop, Side::Inbound, caller.to_string(), &service)
        };
        (Pending { log: log.clone(), entry, started, received: received.clone() }, received)
    });
    let (line, received) = line.map_or((None, None), |(p, r)| (Some(p), Some(r)));
    let resp = decide_and_send(&fwd, &caller, &service, &instance, req.map(|b| Counted::new(b, received))).await;
    let resp = super::ids::traced(resp, span);
    Ok(match line {
        Some(p) => super::http::logged(resp, p),
        None => resp,
    })
}

/// One request's decision by the intentions, then its trip to the instance.
async fn decide_and_send(
    fwd: &MeshView,
    caller: &Caller,
    service: &str,
    instance: &Instance,
    req: Request<Counted<Incoming>>,
) -> Response<instance_http::Body> {
    let snap = fwd.snapshot();
    let action = {
        let headers = super::http::HeaderMapView(req.headers());
        let http = HttpRequest { method: req.method().as_str(), path: req.uri().path(), headers: &headers };
        authz::decide(snap.intentions.iter(), snap.intention_default, caller, service, Some(&http))
    };
    if action == Action::Deny {
        fwd.stats.denied.fetch_add(1, Relaxed);
        tracing::info!(%caller, %service, method = %req.method(), path = %req.uri().path(), "request denied by intentions");
        let msg = format!("{} {} on {service} denied by intentions", req.method(), req.uri().path());
        return super::answer::error(StatusCode::FORBIDDEN, "denied", msg);
    }
    let authority = req
        .headers()
        .get(hyper::header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()))
        .unwrap_or(service)
        .to_string();
    match instance.send(req.map(|b| b.boxed()), &authority).await {
        Ok(resp) => {
            // This hop's connection is ours: the instance's `Connection: close` must not
            // end the caller's stream.
            let mut resp = resp.map(|b| b.boxed());
            instance_http::strip_hop_by_hop(resp.headers_mut());
            resp
        }
        Err(e) => {
            fwd.stats.failed.fetch_add(1, Relaxed);
            let msg = format!("the instance did not answer: {e}");
            super::answer::error(StatusCode::BAD_GATEWAY, "upstream", msg)
        }
    }
}

/// Reads the forward header: Ok(Err(why)) when it arrived but is not one.
async fn read_header<S: Stream>(io: &mut S) -> anyhow::Result<Result<ForwardOpen, String>> {
    let len = io.read_u16().await? as usize;
    if len > MAX_FORWARD_HEADER {
        return Ok(Err(format!("forward header of {len} bytes")));
    }
    let mut buf = vec![0; len];
    io.read_exact(&mut buf).await?;
    Ok(ForwardOpen::decode(&buf).map_err(|e| format!("bad forward header: {e}")))
}

/// The instance a header names, when it is this node's and of that service.
fn local_target<'a>(snap: &'a Snapshot, me: &str, open: &ForwardOpen) -> Option<&'a InstanceView> {
    snap.instances
        .iter()
        .find(|i| i.name == open.instance && i.instance.node == me && i.instance.service == open.service)
}

/// The decision for a whole stream (no request to look into).
fn stream_decision(snap: &Snapshot, caller: &Caller, service: &str) -> Action {
    authz::decide(snap.intentions.iter(), snap.intention_default, caller, service, None)
}

/// The caller of a stream from node `(name, spiffe id)`: with the service its header
/// claims when that node hosts an instance of it, else the node alone (and the refused
/// claim is logged: an agent that claims services it does not host is misconfigured or
/// worse).
fn caller_of(snap: &Snapshot, (name, spiffe): (&str, &str), claimed: Option<&str>) -> Caller {
    let service = claimed.filter(|s| {
        let ok = trellis_core::mesh::callers::may_claim(snap, name, s);
        if !ok {
            tracing::warn!(node = %name, service = %s, "a peer claimed a calling service it hosts no instance of; treated as the node alone");
        }
        ok
    });
    Caller { node: spiffe.into(), service: service.map(Into::into) }
}

/// Must this instance's streams be served request by request: decided by L7 intentions,
/// or `watched` by the access log or spans?
fn per_request(snap: &Snapshot, target: &InstanceView, watched: bool) -> bool {
    let service = &target.instance.service;
    snap.protocol_of(service) != Protocol::Tcp && (watched || authz::has_l7(snap.intentions.iter(), service))
}

/// Is the instance still registered here and not failing its check?
fn serves(snap: &Snapshot, target: &InstanceView) -> bool {
    snap.instances.iter().any(|i| i.name == target.name && i.instance.health != Health::Critical)
}

/// The QUIC error code a stream is reset with when intentions stop allowing it.
const DENIED_CODE: quinn::VarInt = quinn::VarInt::from_u32(0x403);
/// ... and when its forward header did not arrive within the stream read timeout.
const TIMEOUT_CODE: quinn::VarInt = quinn::VarInt::from_u32(0x408);
/// ... and when its instance went critical or away (the caller may try another).
const GONE_CODE: quinn::VarInt = quinn::VarInt::from_u32(0x410);

impl MeshView {
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

    /// The QUIC shell around [`MeshView::inbound`]: the caller is the certified peer, and
    /// a stream that must end early is reset with a code saying why.
    async fn server(self: &Arc<Self>, s: BiStream) -> anyhow::Result<()> {
        let BiStream { peer_name, send, recv, .. } = s;
        let spiffe = self.node.members.spiffe_of(&peer_name);
        let mut quic = QuicIo { recv, send };
        let code = match self.inbound((&peer_name, &spiffe), &mut quic).await? {
            Ended::Done => return Ok(()),
            Ended::Denied => DENIED_CODE,
            Ended::Gone => GONE_CODE,
            Ended::HeaderTimeout => {
                self.node.transport.stats.peer_refuse(crate::transport::PeerRefusal::StreamTimeout);
                TIMEOUT_CODE
            }
        };
        let QuicIo { mut recv, mut send } = quic;
        let _ = send.reset(code);
        let _ = recv.stop(code);
        if code == TIMEOUT_CODE {
            anyhow::bail!("no forward header within {:?}", self.node.transport.limits.stream_read_timeout);
        }
        Ok(())
    }
}
