//! `/v1/ratelimits`: each limit as this node sees it: its share, what it admits, and the
//! cluster-wide rates as of the owner's last answer (with every node's row on the owner).

use axum::extract::{Path, State};
use axum::Json;

use crate::agent::AgentHandle;
use crate::api_error::ApiError;
use crate::api_routes::Routes;
use crate::metrics::Exposition;
use trellis_core::ratelimit::limiter::LimitView;

pub fn routes() -> Routes<AgentHandle> {
    Routes::new().get("/v1/ratelimits", all).get("/v1/ratelimits/{name}", one)
}

async fn all(State(a): State<AgentHandle>) -> Json<Vec<LimitView>> {
    Json(a.ratelimits.view())
}

async fn one(State(a): State<AgentHandle>, Path(name): Path<String>) -> Result<Json<LimitView>, ApiError> {
    a.ratelimits.view().into_iter().find(|v| v.name == name).map(Json).ok_or_else(|| {
        ApiError::not_found(format!("no rate limit {name:?}"), "create it with PUT /v1/policy/ratelimits/<name>")
    })
}

/// Rate-limit lines of `/metrics`: decisions per limit (low cardinality: one series per
/// limit object, never per key value) and the bytes limiting costs.
pub fn metrics(a: &AgentHandle, e: &mut Exposition) {
    let (counts, bytes, refused_peer) = a.ratelimits.metrics();
    let admitted: Vec<(&str, u64)> = counts.iter().map(|(n, c)| (n.as_str(), c.admitted)).collect();
    let refused: Vec<(&str, u64)> = counts.iter().map(|(n, c)| (n.as_str(), c.refused)).collect();
    let delayed: Vec<(&str, u64)> = counts.iter().map(|(n, c)| (n.as_str(), c.delayed)).collect();
    e.labelled("counter", "trellis_ratelimit_admitted_total", "Requests admitted by each limit.", "limit", &admitted);
    e.labelled(
        "counter",
        "trellis_ratelimit_delayed_total",
        "Requests a delay-mode limit admitted after a wait for their token (also counted as admitted).",
        "limit",
        &delayed,
    );
    e.labelled(
        "counter",
        "trellis_ratelimit_refused_total",
        "Requests refused (429) by each limit.",
        "limit",
        &refused,
    );
    e.counter("trellis_ratelimit_bytes_out_total", "Rate-limit reports and grants sent to peers.", bytes);
    e.counter(
        "trellis_ratelimit_peer_refused_total",
        "Rate-limit messages or report entries from peers refused (malformed, not a member, unknown limit, no room).",
        refused_peer,
    );
}
