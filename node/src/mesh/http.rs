//! The local HTTP proxy listener (HTTP/1.1, and HTTP/2 with prior knowledge, so gRPC
//! clients work): routes each request by its `Host` or `:authority` (`<service>` or
//! `<service>.trellis`) through the policy router, then sends it over a fresh stream to an
//! instance picked by the balancer, in the instance's protocol. Bodies and trailers stream
//! through.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Empty};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use tokio::net::TcpListener;

use crate::access_log::{Counted, Logged, Pending};
use crate::limits::Limits;
use crate::listen::{ConnGate, FirstRequest};

use super::answer::error;
use super::body::Answer;
use super::forward::{Forwarder, OpenError, SendError};
use super::instance_http;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};
use trellis_core::mesh::access_log::{Entry, Side};
use trellis_core::mesh::catalog::Snapshot;
use trellis_core::mesh::circuit::{Admit, Breakers};
use trellis_core::mesh::outlier::Outcome;
use trellis_core::mesh::retry::backoff;
use trellis_core::mesh::router::{RequestInfo, Resolved};
use trellis_core::policy::model::{RetryOn, RetryPolicy, Route, Service};

/// Answers to clients: an instance's body may also fail on its own (its node went away).
type Body = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// Accepts HTTP/1.1 and HTTP/2 clients (told apart by the HTTP/2 preface); one task per
/// connection, within the gate's connection caps and the header read deadline.
pub async fn serve(fwd: Arc<Forwarder>, listener: TcpListener, limits: Limits, gate: Arc<ConnGate>) {
    crate::listen::serve_http(listener, gate, &limits, move |tcp, first, builder| {
        serve_connection(fwd.clone(), tcp, None, builder, first)
    })
    .await
}

/// Serves one proxied connection. `fixed` names the service of a per-upstream listener,
/// whose requests go there whatever their `Host` says (for apps that cannot set it).
pub async fn serve_connection(
    fwd: Arc<Forwarder>,
    tcp: tokio::net::TcpStream,
    fixed: Option<Arc<str>>,
    builder: Arc<crate::listen::HttpBuilder>,
    first: FirstRequest,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let _ = tcp.set_nodelay(true);
    let client = tcp.peer_addr().ok();
    let caller = fwd.caller_of(&tcp);
    let svc = move |req| {
        first.seen();
        proxy(fwd.clone(), req, (fixed.clone(), caller.clone()), client)
    };
    // A malformed request gets hyper's 400 and closes only this connection.
    crate::parked::serve(tcp, &builder, svc).await
}

/// 429 with the limit, what is left here and when to come back, in the headers of the
/// IETF RateLimit draft and the standard `Retry-After`.
fn too_many_requests(r: &trellis_core::ratelimit::limiter::Refusal) -> Response<Body> {
    let wait = r.verdict.retry_after.as_secs_f64().ceil().max(1.0) as u64;
    let mut resp = error(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        format!("rate limit {} ({} requests/s across the cluster) exceeded", r.limit, r.rate),
    );
    let h = resp.headers_mut();
    for (name, value) in [
        ("retry-after", wait.to_string()),
        ("ratelimit-limit", format!("{}", r.rate.round() as u64)),
        ("ratelimit-remaining", r.verdict.remaining.to_string()),
        ("ratelimit-reset", wait.to_string()),
        ("ratelimit-policy", format!("{};w=1", r.rate.round() as u64)),
    ] {
        h.insert(name, value.parse().expect("digits are a header value"));
    }
    resp
}

/// The service a request is for: its Host without port and without `.trellis`.
pub fn service_of(host: &str) -> &str {
    let host = host.rsplit_once(':').filter(|(_, p)| p.chars().all(|c| c.is_ascii_digit())).map_or(host, |(h, _)| h);
    host.strip_suffix(".trellis").unwrap_or(host)
}

/// A client's request body, counted when the access log wants its size.
pub(crate) type InBody = Counted<Incoming>;

/// Every request is counted, the proxy's own refusals included, and leaves with this hop's
/// request id and trace context. `fixed` is the listener's service, `caller` the calling
/// service the connection was recognised as.
async fn proxy(
    fwd: Arc<Forwarder>,
    req: Request<Incoming>,
    (fixed, caller): (Option<Arc<str>>, Option<Arc<str>>),
    client: Option<std::net::SocketAddr>,
) -> Result<Response<Body>, Infallible> {
    let started = Instant::now();
    let snap = fwd.snapshot();
    let mut req = req;
    let spans = fwd.view.node.spans.as_ref();
    let hop = super::ids::stamp(req.headers_mut(), spans.map_or(0.0, |s| s.ratio()));
    let log = fwd.view.node.access_log.as_ref();
    let received = log.map(|_| Arc::new(std::sync::atomic::AtomicU64::new(0)));
    let mut req = req.map(|b| Counted::new(b, received.clone()));
    let mut span = None;
    let mut subset = None;
    let (label, route, line, resp) = match Target::of(&snap, &req, fixed.as_deref(), caller) {
        Some(target) => {
            let route = target.resolved.route.clone();
            subset.clone_from(&target.resolved.subset);
            let service = &target.resolved.service;
            let line = log.filter(|l| l.wants(service)).map(|l| Entry {
                route: route.clone(),
                ..l.begin(&req, &hop, Side::Outbound, source(client), service)
            });
            let tee = mirror(&fwd, &target, &req);
            req = req.map(|b| b.teed(tee));
            span = super::ids::hop_span(spans, &hop, Side::Outbound, &req, service).map(|mut s| {
                s.attributes.push(opentelemetry::KeyValue::new("trellis.route", route.clone().unwrap_or_default()));
                req.extensions_mut().insert(s.parent());
                s
            });
            (target.label(), route, line, stack(&fwd, &target, req).await)
        }
        None => {
            let line = log.map(|l| l.begin(&req, &hop, Side::Outbound, source(client), "_other"));
            let resp = error(StatusCode::BAD_REQUEST, "no_host", "set Host: <service> or <service>.trellis".into());
            ("_other", None, line, resp)
        }
    };
    let route = trellis_core::stats::route_key(route.as_deref().unwrap_or(""), subset.as_deref());
    record(&fwd, label, &route, &resp, started.elapsed());
    let resp = super::ids::traced(resp, span);
    Ok(match (line, log, received) {
        (Some(entry), Some(log), Some(received)) => {
            logged(resp, Pending { log: log.clone(), entry, started, received })
        }
        _ => resp,
    })
}

/// Sends a copy of the request to the route's mirror subset when this request falls in
/// its share (see `mirror`); the tee its body feeds, if it has one.
fn mirror(fwd: &Arc<Forwarder>, t: &Target<'_>, req: &Request<InBody>) -> Option<super::tee::Tee> {
    let route = t.resolved.route.as_deref()?;
    let (subset, labels) = t.snap.routes.mirror(route, rand::random::<f64>())?;
    let copy = super::mirror::Copy {
        service: t.resolved.service.clone(),
        subset: subset.to_string(),
        labels: labels.clone(),
        authority: t.authority.clone(),
        h2: t.h2,
        timeout: t.timeout(),
        caller: t.caller.clone(),
    };
    super::mirror::start(fwd, req, copy)
}

fn source(client: Option<std::net::SocketAddr>) -> String {
    client.map_or_else(|| "-".into(), |c| c.to_string())
}

/// Fills in what the answer says (status, the proxy's reason, the instance, attempts) and
/// writes the line once the body has gone to the client.
pub(crate) fn logged<E: 'static>(mut resp: Response<BoxBody<Bytes, E>>, mut p: Pending) -> Response<BoxBody<Bytes, E>> {
    let e = &mut p.entry;
    e.status = resp.status().as_u16();
    e.reason = resp.headers().get("x-trellis-reason").and_then(|v| v.to_str().ok()).map(str::to_string);
    if let Some(Picked { name, addr }) = resp.extensions_mut().remove::<Picked>() {
        (e.instance, e.upstream) = (Some(name), Some(addr.to_string()));
    }
    e.attempts = resp.extensions_mut().remove::<Attempts>().map_or(u32::from(e.reason.is_none()), |a| a.0);
    resp.map(|b| Logged::new(b, p).boxed())
}

/// The instance an answer came from, for the access log.
#[derive(Clone)]
pub(crate) struct Picked {
    pub(crate) name: String,
    pub(crate) addr: std::net::SocketAddr,
}

/// How many attempts a request took, for the access log.
#[derive(Clone, Copy)]
struct Attempts(u32);

/// The client side of the data plane, top to bottom: rate limit, circuit (concurrency and
/// error rate), whole-request timeout, retries (budget, backoff, per-try timeout), then one
/// attempt (balance, connect or reuse a pooled connection, send). The router ran before,
/// in [`Target::of`]; authorization runs at the destination ([`super::inbound`]), for local
/// and remote instances alike. Each layer may answer in the instance's place.
async fn stack(fwd: &Forwarder, t: &Target<'_>, mut req: Request<InBody>) -> Response<Body> {
    match rate_limit(fwd, t, req.headers()) {
        Err(refusal) => return too_many_requests(&refusal),
        // A delay-mode limit over its rate: the request waits for its reserved token.
        Ok(wait) if !wait.is_zero() => tokio::time::sleep(wait).await,
        Ok(_) => {}
    }
    t.rewrite(&mut req);
    // Each layer gets the next as a closure and makes its future where it awaits it: a
    // future passed in by value is held twice by the layer's own (once as argument, once
    // as awaited), so three layers made the request's future 8 times the attempt's.
    circuit(fwd, t, || timeout(fwd, t, || attempts(fwd, t, req))).await
}

/// One request's target, computed once from one policy view: the service, route and split
/// the router chose, and the settings every layer below reads from it.
struct Target<'a> {
    snap: &'a Snapshot,
    resolved: Resolved,
    /// The authority the client asked for: `Host`, or HTTP/2's `:authority`.
    authority: String,
    /// The service's instances speak HTTP/2.
    h2: bool,
    /// The hash of the service's `lb.hash_header`, when the request carries it.
    hash: Option<u64>,
    /// The calling service, when the client was recognised as one.
    caller: Option<Arc<str>>,
}

impl<'a> Target<'a> {
    /// Routes `req` (by `fixed`, the service of a per-upstream listener, or by its host);
    /// None when it names no service.
    fn of(
        snap: &'a Snapshot,
        req: &Request<InBody>,
        fixed: Option<&str>,
        caller: Option<Arc<str>>,
    ) -> Option<Target<'a>> {
        // HTTP/2 clients send `:authority` (in the URI) instead of a Host header.
        let host = req
            .headers()
            .get(hyper::header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| req.uri().authority().map(|a| a.as_str()))
            .unwrap_or("");
        let service = fixed.unwrap_or_else(|| service_of(host));
        if service.is_empty() {
            return None;
        }
        let info = RequestInfo {
            service,
            method: req.method().as_str(),
            path: req.uri().path(),
            query: req.uri().query().unwrap_or(""),
            headers: &HeaderMapView(req.headers()),
        };
        let resolved = snap.routes.resolve(&info, rand::random::<f64>());
        let authority = if host.is_empty() { service } else { host }.to_string();
        let h2 = instance_http::is_h2(snap.protocol_of(&resolved.service));
        let hash = snap
            .settings(&resolved.service)
            .lb
            .hash_header
            .as_deref()
            .and_then(|name| Some(trellis_core::mesh::hashing::key_hash(req.headers().get(name)?.as_bytes())));
        Some(Target { snap, resolved, authority, h2, hash, caller })
    }

    /// The service's settings (the defaults when policy names none).
    fn service(&self) -> &'a Service {
        self.snap.settings(&self.resolved.service)
    }

    fn route(&self) -> Option<&'a Route> {
        self.resolved.route.as_deref().and_then(|r| self.snap.routes.route(r))
    }

    /// The route's timeout and retry policy, else the service's.
    fn timeout(&self) -> Duration {
        self.route().and_then(|r| r.timeout).unwrap_or(self.service().timeout)
    }

    fn retry(&self) -> &'a RetryPolicy {
        self.route().and_then(|r| r.retry.as_ref()).unwrap_or(&self.service().retry)
    }

    /// The metric label: the service, or `_other` for names neither policy nor the catalog
    /// knows (the Host header is the client's to write).
    fn label(&self) -> &'a str {
        self.snap.protocols.get_key_value(&self.resolved.service).map_or("_other", |(k, _)| k.as_str())
    }

    /// Applies the route's prefix rewrite to the request's path.
    fn rewrite(&self, req: &mut Request<InBody>) {
        let Some((prefix, to)) = &self.resolved.rewrite else { return };
        let (path, query) = (req.uri().path(), req.uri().query().unwrap_or(""));
        let rest = path.strip_prefix(prefix.as_str()).unwrap_or(path);
        let mut new_path = format!("{}{}", to.trim_end_matches('/'), rest);
        if !new_path.starts_with('/') {
            new_path.insert(0, '/');
        }
        let pq = if query.is_empty() { new_path } else { format!("{new_path}?{query}") };
        if let Ok(uri) = pq.parse() {
            *req.uri_mut() = uri;
        }
    }
}

/// A request's own header map as the router and the authorizer look into it.
pub(crate) struct HeaderMapView<'a>(pub(crate) &'a hyper::HeaderMap);

impl trellis_core::mesh::headers::Headers for HeaderMapView<'_> {
    fn any(&self, name: &str, f: &mut dyn FnMut(&str) -> bool) -> bool {
        self.0.get_all(name).iter().filter_map(|v| v.to_str().ok()).any(f)
    }
}

/// The cluster-wide rate limits that apply to this request, by service, route, header and
/// caller.
fn rate_limit(
    fwd: &Forwarder,
    t: &Target<'_>,
    headers: &hyper::HeaderMap,
) -> Result<Duration, trellis_core::ratelimit::limiter::Refusal> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let node = &fwd.view.node;
    node.ratelimits.check(&t.resolved.service, t.resolved.route.as_deref(), header, &node.spiffe_id)
}

/// Counts a proxied request under its label. An answer of a proxy's own (this one's, or
/// the destination agent's) is known by its `x-trellis-reason`.
fn record(fwd: &Forwarder, label: &str, route: &str, resp: &Response<Body>, took: Duration) {
    let reason = resp
        .headers()
        .get("x-trellis-reason")
        .and_then(|v| v.to_str().ok())
        .and_then(trellis_core::mesh::traffic::reason);
    let status = resp.status().as_u16();
    fwd.stats.traffic.lock().expect("traffic lock").record(label, status, reason, took);
    let dest = resp.extensions().get::<Picked>().and_then(|p| trellis_core::policy::model::instance_node(&p.name));
    let error = status >= 500 || reason.is_some();
    fwd.view.node.stats.request(label, route, dest.unwrap_or(""), error, took);
}

/// The circuit layer: at most `max_requests` in flight to the service from this node, and
/// (when set) the error-rate breaker, which lets one probe through while open.
async fn circuit<F: std::future::Future<Output = Response<Body>>>(
    fwd: &Forwarder,
    t: &Target<'_>,
    inner: impl FnOnce() -> F,
) -> Response<Body> {
    let service = &t.resolved.service;
    let cb = &t.service().circuit_breaker;
    let Some(_permit) = Breakers::acquire(&fwd.breakers, service, cb.max_requests) else {
        fwd.stats.circuit_open.fetch_add(1, Relaxed);
        let msg = format!("{} requests to {service} already in flight from this node", cb.max_requests);
        return error(StatusCode::SERVICE_UNAVAILABLE, "circuit_open", msg);
    };
    // The error-rate breaker is off by default: then no lock is taken for it.
    let rated = cb.failure_rate_percent > 0.0;
    let admit =
        if rated { fwd.breakers.lock().expect("breakers lock").admit(Instant::now(), service, cb) } else { Admit::Yes };
    if admit == Admit::No {
        fwd.stats.circuit_open.fetch_add(1, Relaxed);
        let msg = format!(
            "{service} failed {}% or more of its last answers; one probe goes through every {:?}",
            cb.failure_rate_percent, cb.open_for
        );
        return error(StatusCode::SERVICE_UNAVAILABLE, "circuit_open", msg);
    }
    let resp = inner().await;
    if rated {
        let (failed, probe) = (resp.status().is_server_error(), admit == Admit::Probe);
        fwd.breakers.lock().expect("breakers lock").record(Instant::now(), service, failed, probe, cb);
    }
    resp
}

/// The whole-request timeout of the route, else the service.
async fn timeout<F: std::future::Future<Output = Response<Body>>>(
    fwd: &Forwarder,
    t: &Target<'_>,
    inner: impl FnOnce() -> F,
) -> Response<Body> {
    let limit = t.timeout();
    match tokio::time::timeout(limit, inner()).await {
        Ok(resp) => resp,
        Err(_) => {
            fwd.stats.timeouts.fetch_add(1, Relaxed);
            error(StatusCode::GATEWAY_TIMEOUT, "timeout", format!("no answer within {limit:?}"))
        }
    }
}

/// Idempotent requests without a body are retried on another instance when the one picked
/// fails as `retry.on` lists, within the service's retry budget, after a jittered backoff.
async fn attempts(fwd: &Forwarder, t: &Target<'_>, req: Request<InBody>) -> Response<Body> {
    let mut made = 0;
    let mut resp = attempts_counted(fwd, t, req, &mut made).await;
    if fwd.view.node.access_log.is_some() {
        resp.extensions_mut().insert(Attempts(made));
    }
    resp
}

/// [`attempts`], counting into `made` the attempts that reached an instance's agent.
async fn attempts_counted(fwd: &Forwarder, t: &Target<'_>, req: Request<InBody>, made: &mut u32) -> Response<Body> {
    let retry = t.retry();
    let tries = if retryable(&req) { 1 + retry.attempts } else { 1 };
    let (parts, body) = req.into_parts();
    let (mut parts, mut body) = (Some(parts), Some(body.boxed()));
    let service = &t.resolved.service;
    budget(fwd, service, |b| b.request(Instant::now()));
    let mut last = None;
    let mut tried = Vec::new();
    let trace = parts.as_mut().and_then(|p| p.extensions.remove::<crate::spans::Parent>());
    for attempt in 0..tries {
        if attempt > 0 {
            if !budget(fwd, service, |b| {
                b.try_retry(Instant::now(), retry.budget_percent, retry.min_retries_per_second)
            }) {
                fwd.stats.budget_exhausted.fetch_add(1, Relaxed);
                break;
            }
            fwd.stats.retries.fetch_add(1, Relaxed);
            tokio::time::sleep(backoff(attempt, retry.backoff_base, retry.backoff_max, rand::random())).await;
        }
        let body = body.take().unwrap_or_else(|| Empty::new().map_err(|never| match never {}).boxed());
        // The head is copied only while another attempt may need it.
        let head = if attempt + 1 < tries { parts.as_ref().map(head_copy) } else { parts.take() };
        let Some(mut head) = head else { break };
        *made += 1;
        let span = trace.as_ref().map(|p| super::ids::attempt_span(p, attempt, &mut head.headers));
        let req = Request::from_parts(head, body);
        // `once` is made in each arm, where it is awaited, so that its future is held once.
        let result = match retry.per_try_timeout {
            Some(limit) => match tokio::time::timeout(limit, once(fwd, t, req, &mut tried)).await {
                Ok(r) => r,
                Err(_) => {
                    let msg = format!("no answer within {limit:?}");
                    Err(Failure::Retry(error(StatusCode::GATEWAY_TIMEOUT, "per_try_timeout", msg), RetryOn::Timeout))
                }
            },
            None => once(fwd, t, req, &mut tried).await,
        };
        if let (Some(span), Ok(r) | Err(Failure::Final(r) | Failure::Retry(r, _))) = (span, &result) {
            let picked = r.extensions().get::<Picked>().map(|p| (p.name.as_str(), p.addr));
            super::ids::end_attempt(span, r, picked);
        }
        match result {
            Ok(resp) if attempt + 1 < tries && retry_status(&retry.on, resp.status()) => last = Some(resp),
            Ok(resp) | Err(Failure::Final(resp)) => return resp,
            Err(Failure::Retry(resp, on)) if retry.on.contains(&on) => last = Some(resp),
            Err(Failure::Retry(resp, _)) => return resp,
        }
    }
    last.unwrap_or_else(|| error(StatusCode::BAD_GATEWAY, "retry_budget", "retry budget spent".into()))
}

/// A request head for one more attempt: method, URI, version and headers. The extensions
/// (hyper's upgrade handle) stay with the original, which the last attempt takes.
fn head_copy(p: &hyper::http::request::Parts) -> hyper::http::request::Parts {
    let mut r = Request::new(());
    (*r.method_mut(), *r.uri_mut(), *r.version_mut()) = (p.method.clone(), p.uri.clone(), p.version);
    *r.headers_mut() = p.headers.clone();
    r.into_parts().0
}

/// Runs `f` on the service's retry budget (made on first use).
fn budget<R>(fwd: &Forwarder, service: &str, f: impl FnOnce(&mut trellis_core::mesh::retry::RetryBudget) -> R) -> R {
    let mut budgets = fwd.budgets.lock().expect("budget lock");
    match budgets.get_mut(service) {
        Some(b) => f(b),
        None => f(budgets.entry(service.to_string()).or_default()),
    }
}

/// Does an answer with `status` ask for another try under `on`?
fn retry_status(on: &[RetryOn], status: StatusCode) -> bool {
    let gateway = matches!(status.as_u16(), 502..=504);
    (status.is_server_error() && on.contains(&RetryOn::ServerError)) || (gateway && on.contains(&RetryOn::GatewayError))
}

enum Failure {
    /// Another instance would not help.
    Final(Response<Body>),
    /// The instance failed before answering: another one may serve the request, if the
    /// retry policy's `on` lists this kind of failure.
    Retry(Response<Body>, RetryOn),
}

fn retryable<B: hyper::body::Body>(req: &Request<B>) -> bool {
    let idempotent = matches!(req.method().as_str(), "GET" | "HEAD" | "OPTIONS");
    idempotent && req.body().size_hint().exact() == Some(0)
}

/// One attempt: balance, then send on a pooled or new connection to the instance.
async fn once(
    fwd: &Forwarder,
    t: &Target<'_>,
    req: Request<instance_http::Body>,
    tried: &mut Vec<String>,
) -> Result<Response<Body>, Failure> {
    let resolved = &t.resolved;
    let (mut pick, in_flight) = match fwd.pick(t.snap, &resolved.service, &resolved.labels, t.hash, tried) {
        Ok(p) => p,
        Err(e) => return Err(Failure::Final(error(StatusCode::SERVICE_UNAVAILABLE, "no_instance", e.to_string()))),
    };
    pick.caller = t.caller.clone();
    let started = Instant::now();
    let sent = fwd.request(&resolved.service, &pick, req, &t.authority, t.h2);
    // A request to another node ends when that node is declared down or leaves, rather
    // than at its timeout: idempotent ones go to another instance, the rest get a 503.
    let result = tokio::select! {
        r = sent => r,
        _ = fwd.node_gone(&pick.node), if pick.peer.is_some() => {
            let msg = format!("{} left the cluster or was declared down with this request in flight", pick.node);
            return Err(Failure::Retry(error(StatusCode::SERVICE_UNAVAILABLE, "instance_gone", msg), RetryOn::Reset));
        }
    };
    match result {
        Ok((resp, reuse)) => {
            fwd.observe(&pick, started.elapsed());
            fwd.record(&resolved.service, &pick, Outcome::of_status(resp.status().as_u16()));
            let gone = pick.peer.is_some().then(|| fwd.node_gone(&pick.node));
            let mut resp = resp.map(|body| Answer::new(body, in_flight, gone, reuse).boxed());
            instance_http::strip_hop_by_hop(resp.headers_mut());
            resp.extensions_mut().insert(Picked { name: pick.name.clone(), addr: pick.addr });
            Ok(resp)
        }
        Err(e @ SendError::Overflow(_)) => {
            fwd.stats.circuit_open.fetch_add(1, Relaxed);
            Err(Failure::Final(error(StatusCode::SERVICE_UNAVAILABLE, "circuit_open", e.to_string())))
        }
        Err(e @ SendError::Open(OpenError::Denied(_))) => {
            Err(Failure::Final(error(StatusCode::FORBIDDEN, "denied", e.to_string())))
        }
        Err(e @ SendError::Open(_)) => {
            Err(Failure::Retry(error(StatusCode::BAD_GATEWAY, "unreachable", e.to_string()), RetryOn::ConnectFailure))
        }
        Err(e @ SendError::Handshake(_)) => {
            fwd.record(&resolved.service, &pick, Outcome::GatewayFailure);
            Err(Failure::Retry(error(StatusCode::BAD_GATEWAY, "handshake", e.to_string()), RetryOn::ConnectFailure))
        }
        Err(e @ SendError::Upstream(_)) => {
            fwd.record(&resolved.service, &pick, Outcome::GatewayFailure);
            Err(Failure::Retry(error(StatusCode::BAD_GATEWAY, "upstream", e.to_string()), RetryOn::Reset))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::service_of;

    #[test]
    fn host_names_map_to_services() {
        assert_eq!(service_of("web"), "web");
        assert_eq!(service_of("web.trellis"), "web");
        assert_eq!(service_of("web.trellis:15001"), "web");
        assert_eq!(service_of("web:80"), "web");
    }
}
