//! `/v1/stats`: the mesh's golden metrics (success rate, requests per second, latency
//! quantiles, open TCP connections) over a recent window, from every agent's digests.

use std::collections::HashMap;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};
use trellis_core::stats::By;

use crate::agent::AgentHandle;
use crate::api_error::ApiError;
use crate::api_routes::Routes;

pub fn routes() -> Routes<AgentHandle> {
    Routes::new().get("/v1/stats", stats).get("/v1/stats/series", series).get("/v1/agent/errors", errors)
}

/// The access log's most recent error lines on this agent (the dashboard's list); the
/// access log must be on.
async fn errors(State(a): State<AgentHandle>) -> Json<Value> {
    match &a.access_log {
        Some(log) => Json(json!({"access_log": true, "errors": log.recent_errors()})),
        None => Json(json!({"access_log": false, "errors": []})),
    }
}

/// `?window=15m`: per service, one point per interval (requests, errors, rps, p50, p99),
/// merged across the mesh; what the dashboard charts.
async fn series(
    State(a): State<AgentHandle>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let mut q = q;
    q.entry("window".into()).or_insert_with(|| "15m".into());
    let (_, _, window) = params(&q)?;
    let answer = a.stats.series((&a.members, &a.transport), window).await;
    Ok(Json(json!({
        "window_seconds": window.as_secs_f64(),
        "interval_seconds": a.stats.interval.as_secs_f64(),
        "asked": answer.asked,
        "missing": answer.missing,
        "services": answer.figures,
    })))
}

/// `?service=NAME&by=service|route|source|node|edge&window=1m` (all optional).
async fn stats(
    State(a): State<AgentHandle>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let (service, by, window) = params(&q)?;
    let answer = a.stats.query((&a.members, &a.transport), service, by, window).await;
    Ok(Json(json!({
        "service": service,
        "by": by,
        "window_seconds": window.as_secs_f64(),
        "interval_seconds": a.stats.interval.as_secs_f64(),
        "asked": answer.asked,
        "missing": answer.missing,
        "rows": answer.figures,
    })))
}

fn params(q: &HashMap<String, String>) -> Result<(Option<&str>, By, Duration), ApiError> {
    let bad = |field: &str, error: String, hint: &str| ApiError {
        status: StatusCode::BAD_REQUEST,
        error,
        field: Some(field.into()),
        hint: hint.into(),
    };
    let by = match q.get("by") {
        None => By::Service,
        Some(b) => By::parse(b)
            .ok_or_else(|| bad("by", format!("{b:?} is not a grouping"), "use service, route, source, node or edge"))?,
    };
    let window = match q.get("window") {
        None => Duration::from_secs(60),
        Some(w) => humantime::parse_duration(w)
            .map_err(|e| bad("window", format!("{w:?}: {e}"), "use a duration such as 30s, 1m or 15m"))?,
    };
    if window.is_zero() || window > crate::stats::MAX_WINDOW {
        return Err(bad("window", format!("{window:?} is out of range"), "use 1s to 15m"));
    }
    Ok((q.get("service").map(String::as_str).filter(|s| !s.is_empty()), by, window))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn parameters_default_and_bad_ones_name_their_field() {
        let empty = q(&[]);
        assert_eq!(params(&empty).unwrap(), (None, By::Service, Duration::from_secs(60)));
        let all = q(&[("service", "web"), ("by", "node"), ("window", "30s")]);
        assert_eq!(params(&all).unwrap(), (Some("web"), By::Node, Duration::from_secs(30)));
        assert_eq!(params(&q(&[("by", "pod")])).unwrap_err().field.as_deref(), Some("by"));
        assert_eq!(params(&q(&[("window", "soon")])).unwrap_err().field.as_deref(), Some("window"));
        assert_eq!(params(&q(&[("window", "1h")])).unwrap_err().field.as_deref(), Some("window"));
    }
}
