//! `/v1/agent/services` (instances on this node), `/v1/catalog` (instances everywhere)
//! and `/v1/agent/virtual-addresses` (this host's addresses for services).

use std::collections::{BTreeMap, HashSet};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};

use crate::agent::AgentHandle;
use crate::api_error::ApiError;
use crate::api_routes::Routes;
use crate::policy::WriteError;
use trellis_core::membership::MemberState;
use trellis_core::mesh::catalog;
use trellis_core::policy::Key;

pub fn routes() -> Routes<AgentHandle> {
    Routes::new()
        .put("/v1/agent/services/{id}", register)
        .delete("/v1/agent/services/{id}", deregister)
        .get("/v1/catalog/services", all_services)
        .get("/v1/catalog/services/{name}", one_service)
        .get("/v1/agent/virtual-addresses", virtual_addresses)
}

/// This host's virtual service addresses: the range, and per service its address and
/// ports (with why a port is not listening, when it is not).
async fn virtual_addresses(State(a): State<AgentHandle>) -> Json<Value> {
    let published = a.vips.1.borrow().clone();
    let services: BTreeMap<&String, Value> = published
        .addresses
        .iter()
        .map(|(svc, ip)| (svc, json!({"address": ip, "ports": published.ports.get(svc).cloned().unwrap_or_default()})))
        .collect();
    Json(json!({"range": a.vips.0.map(|r| r.to_string()), "services": services}))
}

fn key(a: &AgentHandle, id: &str) -> Key {
    Key::instance(id, &a.members.identity.name)
}

fn write_err(e: WriteError) -> ApiError {
    match e {
        WriteError::Store(trellis_core::policy::StoreError::Invalid(f)) => ApiError {
            status: StatusCode::BAD_REQUEST,
            field: Some(f.path.replacen("instances.", "services.", 1)),
            error: f.message,
            hint: f.fix,
        },
        other => ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            error: other.to_string(),
            field: None,
            hint: "see the agent log".into(),
        },
    }
}

/// Registers (or replaces) an instance running on this host.
async fn register(State(a): State<AgentHandle>, Path(id): Path<String>, body: Bytes) -> Result<Json<Value>, ApiError> {
    let mut obj: Value = crate::api_error::parse_body(&body)?;
    let Some(map) = obj.as_object_mut() else {
        return Err(ApiError {
            status: StatusCode::BAD_REQUEST,
            error: "the body must be a JSON object".into(),
            field: None,
            hint: "e.g. {\"service\": \"web\", \"address\": \"127.0.0.1\", \"port\": 8080}".into(),
        });
    };
    map.insert("node".into(), json!(a.members.identity.name));
    let k = key(&a, &id);
    let bytes = serde_json::to_vec(&obj).expect("json");
    a.writer.write(k.clone(), Some(bytes), None).await.map_err(write_err)?;
    Ok(Json(json!({"id": id, "instance": k.name})))
}

async fn deregister(State(a): State<AgentHandle>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let k = key(&a, &id);
    let exists = a.policy.store.lock().expect("policy lock").get(&k).is_some_and(|r| r.val.body.is_some());
    if !exists {
        return Err(ApiError::not_found(
            format!("no instance {id} on this node"),
            "list them with GET /v1/catalog/services",
        ));
    }
    a.writer.write(k, None, None).await.map_err(write_err)?;
    Ok(Json(json!({"id": id, "deleted": true})))
}

async fn alive(a: &AgentHandle) -> HashSet<String> {
    a.members.list().await.into_iter().filter(|m| m.state == MemberState::Alive).map(|m| m.id.name).collect()
}

async fn all_services(State(a): State<AgentHandle>) -> Json<Value> {
    let alive = alive(&a).await;
    let list = catalog::instances(&a.policy.store.lock().expect("policy lock"), None, &alive);
    let mut by: BTreeMap<String, Vec<catalog::InstanceView>> = BTreeMap::new();
    for i in list {
        by.entry(i.instance.service.clone()).or_default().push(i);
    }
    Json(json!(by))
}

async fn one_service(State(a): State<AgentHandle>, Path(name): Path<String>) -> Json<Value> {
    let alive = alive(&a).await;
    Json(json!(catalog::instances(&a.policy.store.lock().expect("policy lock"), Some(&name), &alive)))
}
