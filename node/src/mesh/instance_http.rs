//! HTTP to an instance over a forwarded byte stream, in the instance's own protocol:
//! HTTP/1.1, or HTTP/2 with prior knowledge for `http2` and `grpc` instances. A request
//! that came in as one version leaves as the other when the instance speaks it.

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2, TrySendError};
use hyper::header::{HeaderName, HeaderValue, CONNECTION, HOST, TE, TRANSFER_ENCODING, UPGRADE};
use hyper::{Request, Response, Uri, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};

use super::io::Io;
use trellis_core::policy::model::Protocol;

pub type Body = BoxBody<Bytes, hyper::Error>;

/// Does `protocol` speak HTTP/2 to its instances?
pub fn is_h2(protocol: Protocol) -> bool {
    matches!(protocol, Protocol::Http2 | Protocol::Grpc)
}

/// One connection's request sender.
pub enum Sender {
    H1(http1::SendRequest<Body>),
    H2(http2::SendRequest<Body>),
}

/// Speaks HTTP over `io`; the connection is driven by a task of its own.
pub async fn handshake(io: Io, h2: bool) -> hyper::Result<Sender> {
    let io = TokioIo::new(io);
    if h2 {
        let (send, conn) = http2::handshake(TokioExecutor::new(), io).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Sender::H2(send))
    } else {
        let (send, conn) = http1::handshake(io).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Sender::H1(send))
    }
}

impl Sender {
    /// Sends `req`, rewritten for this connection's version; `authority` is the host the
    /// client asked for. A request the connection could not take (it had closed) comes
    /// back in the error, to go out on another one.
    pub async fn send(
        &mut self,
        mut req: Request<Body>,
        authority: &str,
    ) -> Result<Response<Incoming>, TrySendError<Request<Body>>> {
        match self {
            Sender::H1(s) => {
                for_h1(&mut req, authority);
                s.try_send_request(req).await
            }
            Sender::H2(s) => {
                for_h2(&mut req, authority);
                s.try_send_request(req).await
            }
        }
    }

    /// Can this idle connection take a request now?
    pub fn is_usable(&self) -> bool {
        match self {
            Sender::H1(s) => s.is_ready(),
            Sender::H2(s) => s.is_ready(),
        }
    }

    /// May this pooled connection be taken? An HTTP/1.1 one handed back as its last body
    /// ended may not be ready yet, but is usable unless closed ([`Sender::idle`] waits).
    pub fn is_open(&self) -> bool {
        match self {
            Sender::H1(s) => !s.is_closed(),
            Sender::H2(s) => s.is_ready(),
        }
    }

    /// An HTTP/2 connection carries many requests at once: it stays in the pool while in
    /// use, as a second handle.
    pub fn shared(&self) -> Option<Sender> {
        match self {
            Sender::H1(_) => None,
            Sender::H2(s) => Some(Sender::H2(s.clone())),
        }
    }

    /// Resolves when an HTTP/1.1 connection is idle again (its response body was read to
    /// the end), false when it closed instead.
    pub async fn idle(&mut self) -> bool {
        match self {
            Sender::H1(s) => s.ready().await.is_ok(),
            Sender::H2(s) => s.ready().await.is_ok(),
        }
    }
}

/// HTTP/2 carries the authority in the URI and forbids connection-specific headers.
pub fn for_h2(req: &mut Request<Body>, authority: &str) {
    *req.version_mut() = Version::HTTP_2;
    strip_hop_by_hop(req.headers_mut());
    req.headers_mut().remove(HOST);
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    if let Ok(uri) = format!("http://{authority}{path}").parse::<Uri>() {
        *req.uri_mut() = uri;
    }
}

/// Removes the headers that describe one hop's connection (RFC 9110 7.6.1), and those
/// `Connection` names: a client's `Connection: close` must not close our pooled
/// connection to the instance, nor an instance's close the client's. `TE: trailers` is
/// end to end in gRPC and stays.
pub fn strip_hop_by_hop(h: &mut hyper::HeaderMap) {
    static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
    static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
    // Runs on every request and answer: one pass over the names, and most have none.
    let hop =
        |n: &HeaderName| [&CONNECTION, &TRANSFER_ENCODING, &UPGRADE, &TE, &KEEP_ALIVE, &PROXY_CONNECTION].contains(&n);
    if !h.keys().any(hop) {
        return;
    }
    // `keep-alive` and `close` are the usual values: options, not header names, so nothing
    // is collected (nor allocated) for them.
    let named: Vec<String> = h
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(str::trim))
        .filter(|n| !n.is_empty() && !n.eq_ignore_ascii_case("keep-alive") && !n.eq_ignore_ascii_case("close"))
        .map(str::to_ascii_lowercase)
        .collect();
    for n in named {
        h.remove(n.as_str());
    }
    for n in [CONNECTION, TRANSFER_ENCODING, UPGRADE] {
        h.remove(n);
    }
    for n in [&KEEP_ALIVE, &PROXY_CONNECTION] {
        h.remove(n);
    }
    if h.get(TE).is_some_and(|v| v != "trailers") {
        h.remove(TE);
    }
}

/// HTTP/1.1 needs a `Host` header and an origin-form path.
pub fn for_h1(req: &mut Request<Body>, authority: &str) {
    *req.version_mut() = Version::HTTP_11;
    strip_hop_by_hop(req.headers_mut());
    if !req.headers().contains_key(HOST) {
        if let Ok(v) = HeaderValue::from_str(authority) {
            req.headers_mut().insert(HOST, v);
        }
    }
    if req.uri().authority().is_some() {
        let path = req.uri().path_and_query().map_or("/", |p| p.as_str()).to_string();
        if let Ok(uri) = path.parse::<Uri>() {
            *req.uri_mut() = uri;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Empty};

    fn req(uri: &str) -> Request<Body> {
        Request::builder()
            .uri(uri)
            .header("host", "web")
            .header("connection", "keep-alive")
            .header("x-user", "alice")
            .body(Empty::new().map_err(|never| match never {}).boxed())
            .unwrap()
    }

    #[test]
    fn h2_requests_carry_the_authority_and_no_connection_headers() {
        let mut r = req("/items?page=2");
        for_h2(&mut r, "web.trellis");
        assert_eq!(r.uri().to_string(), "http://web.trellis/items?page=2");
        assert_eq!(r.version(), Version::HTTP_2);
        assert!(r.headers().get("connection").is_none() && r.headers().get("host").is_none());
        assert_eq!(r.headers()["x-user"], "alice");
    }

    #[test]
    fn h1_requests_get_a_host_and_an_origin_form_path() {
        let mut r = Request::builder()
            .version(Version::HTTP_2)
            .uri("http://web/items")
            .body(Empty::new().map_err(|never| match never {}).boxed())
            .unwrap();
        for_h1(&mut r, "web");
        assert_eq!(r.uri().to_string(), "/items");
        assert_eq!(r.headers()["host"], "web");
        assert_eq!(r.version(), Version::HTTP_11);
    }

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_do_not_travel() {
        let mut r = Request::builder()
            .uri("/")
            .header("connection", "close, x-hop")
            .header("x-hop", "1")
            .header("keep-alive", "timeout=5")
            .header("te", "gzip")
            .header("x-user", "alice")
            .body(Empty::new().map_err(|never| match never {}).boxed())
            .unwrap();
        for_h1(&mut r, "web");
        let h = r.headers();
        for gone in ["connection", "x-hop", "keep-alive", "te"] {
            assert!(h.get(gone).is_none(), "{gone} was forwarded");
        }
        assert_eq!(h["x-user"], "alice");
        let mut h = hyper::HeaderMap::new();
        h.insert("te", "trailers".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h["te"], "trailers", "gRPC needs TE: trailers end to end");
    }

    #[test]
    fn grpc_and_http2_instances_speak_h2() {
        assert!(is_h2(Protocol::Grpc) && is_h2(Protocol::Http2));
        assert!(!is_h2(Protocol::Http) && !is_h2(Protocol::Tcp));
    }
}
