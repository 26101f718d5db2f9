//! `/v1/policy`: read, write and delete policy objects; check-and-set; blocking reads;
//! each object's recent versions (`?history`).

use std::collections::HashMap;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use crate::agent::AgentHandle;
use crate::api_error::ApiError;
use crate::api_routes::Routes;
use crate::policy::WriteError;
use trellis_core::policy::store::{Conflict, Register};
use trellis_core::policy::{FieldError, Key, Kind, StoreError, Version};

const MAX_WAIT: Duration = Duration::from_secs(300);

pub fn routes() -> Routes<AgentHandle> {
    Routes::new()
        .get("/v1/policy", get_all)
        .get("/v1/policy/{kind}", get_kind)
        .get("/v1/policy/{kind}/{name}", get_one)
        .put("/v1/policy/{kind}/{name}", put_one)
        .delete("/v1/policy/{kind}/{name}", delete_one)
}

fn bad(e: FieldError) -> ApiError {
    ApiError { status: StatusCode::BAD_REQUEST, error: e.message, field: Some(e.path), hint: e.fix }
}

fn kind_of(s: &str) -> Result<Kind, ApiError> {
    Kind::parse(s).map_err(bad)
}

/// Parses `?index=N&wait=30s`: how long to block for a change past N.
fn blocking(q: &HashMap<String, String>) -> Result<Option<(u64, Duration)>, ApiError> {
    let Some(index) = q.get("index") else { return Ok(None) };
    let field = |f: &str, hint: &str| ApiError {
        status: StatusCode::BAD_REQUEST,
        error: format!("invalid {f}"),
        field: Some(f.into()),
        hint: hint.into(),
    };
    let index = index.parse().map_err(|_| field("index", "give the X-Trellis-Index of a previous read"))?;
    let wait = match q.get("wait") {
        Some(w) => humantime::parse_duration(w).map_err(|_| field("wait", "a duration such as 30s"))?,
        None => Duration::from_secs(30),
    };
    Ok(Some((index, wait.min(MAX_WAIT))))
}

/// Waits (bounded) until the policy index moves past `index`; returns the index now.
async fn wait_past(a: &AgentHandle, q: &HashMap<String, String>) -> Result<u64, ApiError> {
    let mut rx = a.policy.index.subscribe();
    if let Some((index, wait)) = blocking(q)? {
        let _ = tokio::time::timeout(wait, rx.wait_for(|i| *i > index)).await;
    }
    let now = *rx.borrow();
    Ok(now)
}

fn with_index(index: u64, body: Value) -> Response {
    let mut h = HeaderMap::new();
    h.insert("x-trellis-index", HeaderValue::from(index));
    (h, Json(body)).into_response()
}

fn object_json(key: &Key, reg: &Register, conflicts: &[Conflict]) -> Value {
    let body: Value = reg.val.body.as_deref().and_then(|b| serde_json::from_str(b).ok()).unwrap_or(Value::Null);
    let mut v = json!({"kind": key.kind, "name": key.name, "version": reg.marker.token(), "body": body});
    if !conflicts.is_empty() {
        v["conflicts"] = conflicts
            .iter()
            .map(|c| {
                json!({
                    "version": c.version.token(),
                    "lost_to": c.lost_to.token(),
                    "body": c.body.as_deref().and_then(|b| serde_json::from_str::<Value>(b).ok()),
                })
            })
            .collect();
    }
    v
}

fn list(a: &AgentHandle, kind: Option<Kind>) -> Value {
    let store = a.policy.store.lock().expect("policy lock");
    let objects: Vec<Value> = store
        .iter()
        .filter(|(k, r)| r.val.body.is_some() && kind.is_none_or(|want| k.kind == want))
        .map(|(k, r)| object_json(k, r, store.conflicts(k)))
        .collect();
    json!({
        "index": store.index(),
        "root": format!("{:016x}", store.root()),
        "tombstones": store.tombstones(),
        "objects": objects,
    })
}

async fn get_all(State(a): State<AgentHandle>, Query(q): Query<HashMap<String, String>>) -> Result<Response, ApiError> {
    let index = wait_past(&a, &q).await?;
    Ok(with_index(index, list(&a, None)))
}

async fn get_kind(
    State(a): State<AgentHandle>,
    Path(kind): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let kind = kind_of(&kind)?;
    let index = wait_past(&a, &q).await?;
    Ok(with_index(index, list(&a, Some(kind))))
}

async fn get_one(
    State(a): State<AgentHandle>,
    Path((kind, name)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let key = Key { kind: kind_of(&kind)?, name };
    if q.contains_key("history") {
        return history(&a, &key).await;
    }
    let index = wait_past(&a, &q).await?;
    let store = a.policy.store.lock().expect("policy lock");
    match store.get(&key) {
        Some(reg) if reg.val.body.is_some() => Ok(with_index(index, object_json(&key, reg, store.conflicts(&key)))),
        _ => Err(ApiError::not_found(
            format!("{}.{} does not exist", key.kind, key.name),
            format!("create it with PUT /v1/policy/{}/{}", key.kind, key.name),
        )),
    }
}

/// `?history`: the versions this agent installed, newest first, each with its writer (the
/// member whose id wrote it; the id in hex when no member has it now) and time.
async fn history(a: &AgentHandle, key: &Key) -> Result<Response, ApiError> {
    let mut names: HashMap<u64, String> = HashMap::new();
    for m in a.members.list().await {
        names.insert(trellis_core::policy::store::fnv64(&[m.id.name.as_bytes()]), m.id.name);
    }
    let store = a.policy.store.lock().expect("policy lock");
    let versions: Vec<Value> = store
        .history(key)
        .rev()
        .map(|p| {
            let at_ms = p.version.hlc >> 16;
            let at = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(at_ms) * 1_000_000)
                .ok()
                .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok());
            json!({
                "version": p.version.token(),
                "written_at": at,
                "writer": names.get(&p.version.node).cloned().unwrap_or_else(|| format!("{:x}", p.version.node)),
                "deleted": p.body.is_none(),
                "body": p.body.as_deref().and_then(|b| serde_json::from_str::<Value>(b).ok()),
            })
        })
        .collect();
    if versions.is_empty() {
        return Err(ApiError::not_found(
            format!("{}.{} has no history on this agent", key.kind, key.name),
            "list objects with GET /v1/policy",
        ));
    }
    let current = store.get(key).map(|r| r.marker.token());
    Ok(with_index(store.index(), json!({"kind": key.kind, "name": key.name, "current": current, "versions": versions})))
}

fn cas_of(q: &HashMap<String, String>) -> Result<Option<Version>, ApiError> {
    q.get("cas")
        .map(|c| {
            Version::parse_token(c).ok_or_else(|| ApiError {
                status: StatusCode::BAD_REQUEST,
                error: format!("cas {c:?} is not a version"),
                field: Some("cas".into()),
                hint: "give the `version` of a previous read, or 0 for create-only".into(),
            })
        })
        .transpose()
}

async fn write(a: AgentHandle, key: Key, body: Option<Bytes>, cas: Option<Version>) -> Result<Response, ApiError> {
    if key.kind.node_owned() {
        return Err(ApiError {
            status: StatusCode::BAD_REQUEST,
            error: "instances belong to the node they run on".into(),
            field: Some("kind".into()),
            hint: "register instances with PUT /v1/agent/services/{id} on that node".into(),
        });
    }
    if let Some(b) = &body {
        refuse_l7_on_tcp(&a, &key, b)?;
    }
    if let Some(made_up) = dropped_write(&a, &key) {
        return Ok(made_up);
    }
    let res = a.writer.write(key.clone(), body.map(|b| b.to_vec()), cas).await;
    let entry = res.map_err(|e| match e {
        WriteError::Store(StoreError::Invalid(f)) => bad(f),
        WriteError::Store(e @ StoreError::CasMismatch { .. }) => ApiError {
            status: StatusCode::CONFLICT,
            error: e.to_string(),
            field: Some("cas".into()),
            hint: "read the object again and retry with its current version".into(),
        },
        WriteError::Store(e @ StoreError::Forbidden(_)) => ApiError {
            status: StatusCode::FORBIDDEN,
            error: e.to_string(),
            field: Some("name".into()),
            hint: "write or lift this node's revocation through another node's API".into(),
        },
        other => ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            error: other.to_string(),
            field: None,
            hint: "see the agent log".into(),
        },
    })?;
    let version = Version { hlc: entry.version.0, node: entry.version.1 }.token();
    let index = *a.policy.index.borrow();
    Ok(with_index(index, json!({"kind": key.kind, "name": key.name, "version": version})))
}

/// Checks that span objects: an L7 intention needs an HTTP service (the store checks
/// each object alone).
fn refuse_l7_on_tcp(a: &AgentHandle, key: &Key, body: &[u8]) -> Result<(), ApiError> {
    if !matches!(key.kind, Kind::Intentions | Kind::Services) {
        return Ok(());
    }
    let obj = trellis_core::policy::model::parse(key.kind, &key.name, body).map_err(bad)?;
    let snap = trellis_core::mesh::catalog::Snapshot::build(&a.policy.store.lock().expect("policy lock"));
    snap.refuse_l7_on_tcp(&key.name, &obj).map_err(bad)
}

async fn put_one(
    State(a): State<AgentHandle>,
    Path((kind, name)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let key = Key { kind: kind_of(&kind)?, name };
    let cas = cas_of(&q)?;
    write(a, key, Some(body), cas).await
}

async fn delete_one(
    State(a): State<AgentHandle>,
    Path((kind, name)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let key = Key { kind: kind_of(&kind)?, name };
    let exists = a.policy.store.lock().expect("policy lock").get(&key).is_some_and(|r| r.val.body.is_some());
    if !exists {
        return Err(ApiError::not_found(
            format!("{}.{} does not exist", key.kind, key.name),
            "list objects with GET /v1/policy",
        ));
    }
    let cas = cas_of(&q)?;
    write(a, key, None, cas).await
}

/// The broken agent of the chaos checker's own test (fault `drop_writes`): an answer with a
/// made-up version, and nothing stored. Compiled only into the harness's builds.
#[cfg(feature = "fault-injection")]
fn dropped_write(a: &AgentHandle, key: &Key) -> Option<Response> {
    if !a.transport.faults.as_ref().is_some_and(|f| f.lock().expect("faults lock").drop_writes) {
        return None;
    }
    let ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis();
    let version = Version { hlc: (ms as u64) << 16, node: 0 }.token();
    Some(with_index(*a.policy.index.borrow(), json!({"kind": key.kind, "name": key.name, "version": version})))
}

#[cfg(not(feature = "fault-injection"))]
fn dropped_write(_: &AgentHandle, _: &Key) -> Option<Response> {
    None
}
