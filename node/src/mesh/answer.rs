//! The proxy's own answers (refusals, timeouts, gateway errors): a status, the reason in
//! `x-trellis-reason` and a JSON body, the same on the outbound and the inbound side.

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::{Response, StatusCode};

/// An answer of the proxy's own, with the reason in a header and in the JSON body.
pub fn error<E>(status: StatusCode, reason: &str, msg: String) -> Response<BoxBody<Bytes, E>> {
    let body = serde_json::json!({"error": msg, "reason": reason}).to_string();
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("x-trellis-reason", reason)
        .body(Full::new(Bytes::from(body)).map_err(|never| match never {}).boxed())
        .expect("static response")
}
