//! The local HTTP/1.1 proxy listener: routes each request by its `Host` (`<service>` or
//! `<service>.trellis`) through the policy router, then sends it over a fresh stream to an
//! instance picked by the balancer. Request and response bodies stream through.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use super::forward::{Forwarder, OpenError};
use super::router::{RequestInfo, RouteTable};

type Body = BoxBody<Bytes, hyper::Error>;

/// Accepts HTTP/1.1 clients; one task per connection.
pub async fn serve(fwd: Arc<Forwarder>, listener: TcpListener) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else { continue };
        let _ = tcp.set_nodelay(true);
        let fwd = fwd.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| proxy(fwd.clone(), req));
            // A malformed request gets hyper's 400 and closes only this connection.
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc).await;
        });
    }
}

fn error(status: StatusCode, reason: &str, msg: String) -> Response<Body> {
    let body = serde_json::json!({"error": msg, "reason": reason}).to_string();
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("x-trellis-reason", reason)
        .body(Full::new(Bytes::from(body)).map_err(|never| match never {}).boxed())
        .expect("static response")
}

/// The service a request is for: its Host without port and without `.trellis`.
pub fn service_of(host: &str) -> &str {
    let host = host.rsplit_once(':').filter(|(_, p)| p.chars().all(|c| c.is_ascii_digit())).map_or(host, |(h, _)| h);
    host.strip_suffix(".trellis").unwrap_or(host)
}

async fn proxy(fwd: Arc<Forwarder>, mut req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let host = req.headers().get(hyper::header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("").to_string();
    let service = service_of(&host).to_string();
    if service.is_empty() {
        return Ok(error(StatusCode::BAD_REQUEST, "no_host", "set Host: <service> or <service>.trellis".into()));
    }
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
        .collect();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let resolved = {
        let table = RouteTable::from_store(&fwd.agent().policy.store.lock().expect("policy lock"));
        let info = RequestInfo {
            service: &service,
            method: req.method().as_str(),
            path: &path,
            query: &query,
            headers: &headers,
        };
        table.resolve(&info, rand::random::<f64>())
    };
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
    let io = match fwd.open(&resolved.service, &resolved.labels).await {
        Ok(io) => io,
        Err(e @ OpenError::NoInstance(_)) => {
            return Ok(error(StatusCode::SERVICE_UNAVAILABLE, "no_instance", e.to_string()))
        }
        Err(e @ OpenError::Denied(_)) => return Ok(error(StatusCode::FORBIDDEN, "denied", e.to_string())),
        Err(e @ OpenError::Unreachable(_)) => return Ok(error(StatusCode::BAD_GATEWAY, "unreachable", e.to_string())),
    };
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(io)).await {
        Ok(x) => x,
        Err(e) => return Ok(error(StatusCode::BAD_GATEWAY, "handshake", e.to_string())),
    };
    tokio::spawn(async move {
        let _ = conn.await;
    });
    match sender.send_request(req).await {
        Ok(resp) => Ok(resp.map(|b| b.boxed())),
        Err(e) => Ok(error(StatusCode::BAD_GATEWAY, "upstream", e.to_string())),
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
