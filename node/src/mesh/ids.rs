//! Every request leaves an agent with an `x-request-id` (the client's, or a new one) and a
//! `traceparent` naming this agent's hop as the parent of the next (`trellis_core::mesh::trace`);
//! sampled hops and their attempts become spans ([`crate::spans`]).

use std::borrow::Cow;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt};
use hyper::header::{HeaderName, HeaderValue};
use hyper::{HeaderMap, Request, Response};
use opentelemetry::KeyValue;
use trellis_core::mesh::access_log::Side;
use trellis_core::mesh::trace::{self, Hop, REQUEST_ID, TRACEPARENT};

use crate::spans::{OpenSpan, Parent, Spans, Traced};

/// The headers as names made once: inserting by `&str` copies a custom name on every call.
static REQUEST_ID_HEADER: HeaderName = HeaderName::from_static(REQUEST_ID);
static TRACEPARENT_HEADER: HeaderName = HeaderName::from_static(TRACEPARENT);

/// Stamps `headers` with this hop's ids; returns the hop (its trace, span and parent).
/// New traces are sampled at `ratio` (0 when this agent exports no spans, and says so
/// downstream).
pub(crate) fn stamp(headers: &mut HeaderMap, ratio: f64) -> Hop {
    let incoming = headers.get(REQUEST_ID).and_then(|v| v.to_str().ok());
    if let Some(id) = trace::request_id(incoming, rand::random()) {
        headers.insert(&REQUEST_ID_HEADER, HeaderValue::from_bytes(&id).expect("a UUID is a header value"));
    }
    let parent = headers.get(TRACEPARENT).and_then(|v| v.to_str().ok());
    let hop = Hop::next(parent, non_zero(rand::random()), non_zero(rand::random()), ratio);
    let value = HeaderValue::from_bytes(&hop.outgoing().header()).expect("hex is a header value");
    headers.insert(&TRACEPARENT_HEADER, value);
    hop
}

/// The span of this hop of `req` for `service`, when the hop is sampled and spans are on.
pub(crate) fn hop_span<B>(
    spans: Option<&Arc<Spans>>,
    hop: &Hop,
    side: Side,
    req: &Request<B>,
    service: &str,
) -> Option<OpenSpan> {
    // Nothing is formatted for a hop no span is made of (the usual case).
    let spans = spans.filter(|_| hop.sampled)?;
    let name = format!("{} {service}", req.method());
    let mut span = OpenSpan::begin(Some(spans), hop, side, Cow::Owned(name), hop.parent.is_some())?;
    let header = |n: &str| req.headers().get(n).and_then(|v| v.to_str().ok()).map(str::to_string);
    span.attributes.extend([
        KeyValue::new("http.request.method", req.method().to_string()),
        KeyValue::new("url.path", req.uri().path().to_string()),
        KeyValue::new("trellis.service", service.to_string()),
        KeyValue::new("trellis.request_id", header(REQUEST_ID).unwrap_or_default()),
    ]);
    if let Some(host) = header("host").or_else(|| req.uri().authority().map(|a| a.to_string())) {
        span.attributes.push(KeyValue::new("server.address", host));
    }
    Some(span)
}

/// Attempt `n` (0: the first) under `parent`: a child span, named in the request's
/// `traceparent` as the parent of the next agent's hop.
pub(crate) fn attempt_span(parent: &Parent, n: u32, headers: &mut HeaderMap) -> OpenSpan {
    let hop = parent.hop().child(non_zero(rand::random()));
    let value = HeaderValue::from_bytes(&hop.outgoing().header()).expect("hex is a header value");
    headers.insert(&TRACEPARENT_HEADER, value);
    let mut span = parent.child(hop, Cow::Borrowed(if n == 0 { "attempt" } else { "retry" }));
    if n > 0 {
        span.attributes.push(KeyValue::new("http.request.resend_count", i64::from(n)));
    }
    span
}

/// Ends an attempt's span with its answer and the instance that gave it.
pub(crate) fn end_attempt<B>(mut span: OpenSpan, resp: &Response<B>, picked: Option<(&str, std::net::SocketAddr)>) {
    if let Some((name, addr)) = picked {
        span.attributes.push(KeyValue::new("trellis.instance", name.to_string()));
        span.attributes.push(KeyValue::new("server.address", addr.ip().to_string()));
        span.attributes.push(KeyValue::new("server.port", i64::from(addr.port())));
    }
    span.end(resp.status().as_u16(), reason(resp));
}

/// The proxy's reason when it answered in the instance's place.
pub(crate) fn reason<B>(resp: &Response<B>) -> Option<&str> {
    resp.headers().get("x-trellis-reason").and_then(|v| v.to_str().ok())
}

/// Ends `span` when the response body has gone to the client.
pub(crate) fn traced<E: 'static>(
    resp: Response<BoxBody<Bytes, E>>,
    span: Option<OpenSpan>,
) -> Response<BoxBody<Bytes, E>> {
    let Some(span) = span else { return resp };
    let (status, why) = (resp.status().as_u16(), reason(&resp).map(str::to_string));
    resp.map(|b| Traced::new(b, span, status, why).boxed())
}

/// W3C forbids all-zero ids; a random draw of zeros (2^-64 at worst) becomes 1.
fn non_zero<const N: usize>(mut id: [u8; N]) -> [u8; N] {
    if id == [0; N] {
        id[N - 1] = 1;
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request_id(h: &HeaderMap) -> String {
        h.get(REQUEST_ID).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string()
    }

    #[test]
    fn a_request_gets_ids_once_and_keeps_the_clients() {
        let mut h = HeaderMap::new();
        let first = stamp(&mut h, 0.0);
        let id = request_id(&h);
        assert_eq!(id.len(), 36, "a UUID: {id}");
        assert_eq!(first.parent, None);
        // The next agent keeps the id and the trace, and takes the first hop as its parent.
        let second = stamp(&mut h, 0.0);
        assert_eq!(request_id(&h), id);
        assert_eq!((second.trace_id, second.parent), (first.trace_id, Some(first.span_id)));
        assert_ne!(second.span_id, first.span_id);
        assert_eq!(h.get(TRACEPARENT).unwrap().as_bytes(), second.outgoing().header());
        assert_eq!(non_zero([0u8; 8]), [0, 0, 0, 0, 0, 0, 0, 1]);
    }
}
