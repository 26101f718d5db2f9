//! Every request leaves an agent with an `x-request-id` (the client's, or a new one) and a
//! `traceparent` naming this agent's hop as the parent of the next (`trellis_core::mesh::trace`).

use hyper::header::HeaderValue;
use hyper::HeaderMap;
use trellis_core::mesh::trace::{self, Hop, REQUEST_ID, TRACEPARENT};

/// Stamps `headers` with this hop's ids; returns the hop (its trace, span and parent).
/// New traces are not sampled: this agent exports no spans yet, and says so downstream.
pub(crate) fn stamp(headers: &mut HeaderMap) -> Hop {
    let incoming = headers.get(REQUEST_ID).and_then(|v| v.to_str().ok());
    if let Some(id) = trace::request_id(incoming, rand::random()) {
        headers.insert(REQUEST_ID, HeaderValue::from_str(&id).expect("a UUID is a header value"));
    }
    let parent = headers.get(TRACEPARENT).and_then(|v| v.to_str().ok());
    let hop = Hop::next(parent, non_zero(rand::random()), non_zero(rand::random()), false);
    let value = HeaderValue::from_str(&hop.outgoing().header()).expect("hex is a header value");
    headers.insert(TRACEPARENT, value);
    hop
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
        let first = stamp(&mut h);
        let id = request_id(&h);
        assert_eq!(id.len(), 36, "a UUID: {id}");
        assert_eq!(first.parent, None);
        // The next agent keeps the id and the trace, and takes the first hop as its parent.
        let second = stamp(&mut h);
        assert_eq!(request_id(&h), id);
        assert_eq!((second.trace_id, second.parent), (first.trace_id, Some(first.span_id)));
        assert_ne!(second.span_id, first.span_id);
        assert_eq!(h.get(TRACEPARENT).unwrap().to_str().unwrap(), second.outgoing().header());
        assert_eq!(non_zero([0u8; 8]), [0, 0, 0, 0, 0, 0, 0, 1]);
    }
}
