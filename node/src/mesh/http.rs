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
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::limits::Limits;
use crate::listen::{ConnGate, FirstRequest};

use super::answer::error;
use super::forward::{Forwarder, OpenError, SendError};
use super::instance_http;
use super::io::Counted;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;
use trellis_core::mesh::circuit::{Admit, Breakers};
use trellis_core::mesh::outlier::Outcome;
use trellis_core::mesh::retry::backoff;
use trellis_core::mesh::router::{RequestInfo, Resolved};
use trellis_core::policy::model::{RetryOn, RetryPolicy};

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
    let svc = hyper::service::service_fn(move |req| {
        first.seen();
        proxy(fwd.clone(), req, fixed.clone())
    });
    // A malformed request gets hyper's 400 and closes only this connection.
    builder.serve_connection(TokioIo::new(tcp), svc).await
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

/// Every request is counted, the proxy's own refusals included.
async fn proxy(
    fwd: Arc<Forwarder>,
    req: Request<Incoming>,
    fixed: Option<Arc<str>>,
) -> Result<Response<Body>, Infallible> {
    let started = Instant::now();
    let (service, resp) = answer(&fwd, req, fixed).await;
    record(&fwd, &service, &resp, started.elapsed());
    Ok(resp)
}

/// The answer to one request, and the service it was for.
async fn answer(fwd: &Arc<Forwarder>, mut req: Request<Incoming>, fixed: Option<Arc<str>>) -> (String, Response<Body>) {
    // HTTP/2 clients send `:authority` (in the URI) instead of a Host header.
    let host = req
        .headers()
        .get(hyper::header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()))
        .unwrap_or("")
        .to_string();
    let service = fixed.as_deref().unwrap_or_else(|| service_of(&host)).to_string();
    let host = if host.is_empty() { service.clone() } else { host };
    if service.is_empty() {
        return (service, error(StatusCode::BAD_REQUEST, "no_host", "set Host: <service> or <service>.trellis".into()));
    }
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
        .collect();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let resolved = {
        let snap = fwd.snapshot();
        let table = &snap.routes;
        let info = RequestInfo {
            service: &service,
            method: req.method().as_str(),
            path: &path,
            query: &query,
            headers: &headers,
        };
        table.resolve(&info, rand::random::<f64>())
    };
    if let Err(refusal) = fwd.view.node.ratelimits.check(
        &service,
        resolved.route.as_deref(),
        |name| headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str()),
        &fwd.view.node.spiffe_id,
    ) {
        return (service, too_many_requests(&refusal));
    }
    if let Some((prefix, to)) = &resolved.rewrite {
        let rest = path.strip_prefix(prefix.as_str()).unwrap_or(&path);
        let mut new_path = format!("{}{}", to.trim_end_matches('/'), rest);
        if !new_path.starts_with('/') {
            new_path.insert(0, '/');
        }
        let pq = if query.is_empty() { new_path } else { format!("{new_path}?{query}") };
        if let Ok(uri) = pq.parse() {
            *req.uri_mut() = uri;
        }
    }
    let resp = guarded(fwd, &resolved, &host, req).await;
    (service, resp)
}

/// Counts a proxied request under its service, or `_other` for names neither policy nor
/// the catalog knows (the Host header is the client's to write).
/// An answer of a proxy's own (this one's, or the destination agent's) is known by its
/// `x-trellis-reason`.
fn record(fwd: &Forwarder, service: &str, resp: &Response<Body>, took: std::time::Duration) {
    let known = fwd.snapshot().protocols.contains_key(service);
    let label = if known { service } else { "_other" };
    let reason = resp
        .headers()
        .get("x-trellis-reason")
        .and_then(|v| v.to_str().ok())
        .and_then(trellis_core::mesh::traffic::reason);
    fwd.stats.traffic.lock().expect("traffic lock").record(label, resp.status().as_u16(), reason, took);
}

/// The request's way out, as layers: circuit -> timeout -> retries (budget, backoff,
/// per-try timeout) -> one attempt.
async fn guarded(fwd: &Arc<Forwarder>, resolved: &Resolved, host: &str, req: Request<Incoming>) -> Response<Body> {
    let snap = fwd.snapshot();
    let svc = snap.services.get(&resolved.service).cloned().unwrap_or_default();
    let route = resolved.route.as_deref().and_then(|r| snap.routes.route(r));
    let timeout = route.and_then(|r| r.timeout).unwrap_or(svc.timeout);
    let retry = route.and_then(|r| r.retry.clone()).unwrap_or(svc.retry.clone());
    let max = svc.circuit_breaker.max_requests;
    let Some(_permit) = Breakers::acquire(&fwd.breakers, &resolved.service, max) else {
        fwd.stats.circuit_open.fetch_add(1, Relaxed);
        let msg = format!("{max} requests to {} already in flight from this node", resolved.service);
        return error(StatusCode::SERVICE_UNAVAILABLE, "circuit_open", msg);
    };
    let cb = &svc.circuit_breaker;
    // The error-rate breaker is off by default: then no lock is taken for it.
    let rated = cb.failure_rate_percent > 0.0;
    let admit = if rated {
        fwd.breakers.lock().expect("breakers lock").admit(Instant::now(), &resolved.service, cb)
    } else {
        Admit::Yes
    };
    if admit == Admit::No {
        fwd.stats.circuit_open.fetch_add(1, Relaxed);
        let msg = format!(
            "{} failed {}% or more of its last answers; one probe goes through every {:?}",
            resolved.service, cb.failure_rate_percent, cb.open_for
        );
        return error(StatusCode::SERVICE_UNAVAILABLE, "circuit_open", msg);
    }
    let resp = match tokio::time::timeout(timeout, attempts(fwd, resolved, host, req, &retry)).await {
        Ok(resp) => resp,
        Err(_) => {
            fwd.stats.timeouts.fetch_add(1, Relaxed);
            error(StatusCode::GATEWAY_TIMEOUT, "timeout", format!("no answer within {timeout:?}"))
        }
    };
    if rated {
        let (failed, probe) = (resp.status().is_server_error(), admit == Admit::Probe);
        fwd.breakers.lock().expect("breakers lock").record(Instant::now(), &resolved.service, failed, probe, cb);
    }
    resp
}

/// Idempotent requests without a body are retried on another instance when the one picked
/// fails as `retry.on` lists, within the service's retry budget, after a jittered backoff.
async fn attempts(
    fwd: &Forwarder,
    resolved: &Resolved,
    host: &str,
    req: Request<Incoming>,
    retry: &RetryPolicy,
) -> Response<Body> {
    let tries = if retryable(&req) { 1 + retry.attempts } else { 1 };
    let (parts, body) = req.into_parts();
    let mut body = Some(body.boxed());
    let service = &resolved.service;
    fwd.budgets.lock().expect("budget lock").entry(service.clone()).or_default().request(Instant::now());
    let mut last = None;
    let mut tried = Vec::new();
    for attempt in 0..tries {
        if attempt > 0 {
            if !take_retry(fwd, service, retry) {
                fwd.stats.budget_exhausted.fetch_add(1, Relaxed);
                break;
            }
            fwd.stats.retries.fetch_add(1, Relaxed);
            tokio::time::sleep(backoff(attempt, retry.backoff_base, retry.backoff_max, rand::random())).await;
        }
        let body = body.take().unwrap_or_else(|| Empty::new().map_err(|never| match never {}).boxed());
        let one = once(fwd, resolved, host, Request::from_parts(parts.clone(), body), &mut tried);
        let result = match retry.per_try_timeout {
            Some(t) => match tokio::time::timeout(t, one).await {
                Ok(r) => r,
                Err(_) => {
                    let resp = error(StatusCode::GATEWAY_TIMEOUT, "per_try_timeout", format!("no answer within {t:?}"));
                    Err(Failure::Retry(resp, RetryOn::Timeout))
                }
            },
            None => one.await,
        };
        match result {
            Ok(resp) if attempt + 1 < tries && retry_status(&retry.on, resp.status()) => last = Some(resp),
            Ok(resp) | Err(Failure::Final(resp)) => return resp,
            Err(Failure::Retry(resp, on)) if retry.on.contains(&on) => last = Some(resp),
            Err(Failure::Retry(resp, _)) => return resp,
        }
    }
    last.unwrap_or_else(|| error(StatusCode::BAD_GATEWAY, "retry_budget", "retry budget spent".into()))
}

fn take_retry(fwd: &Forwarder, service: &str, retry: &RetryPolicy) -> bool {
    let mut budgets = fwd.budgets.lock().expect("budget lock");
    let budget = budgets.entry(service.to_string()).or_default();
    budget.try_retry(Instant::now(), retry.budget_percent, retry.min_retries_per_second)
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

async fn once(
    fwd: &Forwarder,
    resolved: &Resolved,
    host: &str,
    req: Request<instance_http::Body>,
    tried: &mut Vec<String>,
) -> Result<Response<Body>, Failure> {
    let h2 = fwd.snapshot().protocols.get(&resolved.service).is_some_and(|p| instance_http::is_h2(*p));
    let hash = hash_of(fwd, &resolved.service, req.headers());
    let (pick, in_flight) = match fwd.pick(&resolved.service, &resolved.labels, hash, tried) {
        Ok(p) => p,
        Err(e) => return Err(Failure::Final(error(StatusCode::SERVICE_UNAVAILABLE, "no_instance", e.to_string()))),
    };
    let started = Instant::now();
    let sent = fwd.request(&resolved.service, &pick, req, host, h2);
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
        Ok(resp) => {
            fwd.observe(&pick, started.elapsed());
            fwd.record(&resolved.service, &pick, Outcome::of_status(resp.status().as_u16()));
            let gone = pick.peer.is_some().then(|| fwd.node_gone(&pick.node));
            let mut resp = resp.map(|body| Counted::new(body, in_flight, gone).boxed());
            instance_http::strip_hop_by_hop(resp.headers_mut());
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

/// The hash of the service's `lb.hash_header` in this request, when it has one.
fn hash_of(fwd: &Forwarder, service: &str, headers: &hyper::HeaderMap) -> Option<u64> {
    let snap = fwd.snapshot();
    let name = snap.services.get(service)?.lb.hash_header.clone()?;
    Some(trellis_core::mesh::hashing::key_hash(headers.get(name.as_str())?.as_bytes()))
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
