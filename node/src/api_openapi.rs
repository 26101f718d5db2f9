//! `/v1/openapi.json`: the OpenAPI 3.1 description of this API, kept as a file next to the
//! code. The tests (`api_conformance`) hold it to the real router (every route documented, every documented
//! route served) and to the real policy types (every documented example parses, and the
//! documented properties are exactly the fields the types have).

use axum::http::header;

use crate::agent::AgentHandle;
use crate::api_routes::Routes;

pub const DOCUMENT: &str = include_str!("openapi.json");

pub fn routes() -> Routes<AgentHandle> {
    Routes::new().get("/v1/openapi.json", || async { ([(header::CONTENT_TYPE, "application/json")], DOCUMENT) })
}

/// (method, path) of every operation in the document, methods upper-case.
pub fn documented_operations(doc: &serde_json::Value) -> Vec<(String, String)> {
    const METHODS: [&str; 8] = ["get", "put", "post", "delete", "patch", "head", "options", "trace"];
    let mut ops = Vec::new();
    for (path, item) in doc["paths"].as_object().into_iter().flatten() {
        for m in METHODS.iter().filter(|m| item.get(**m).is_some()) {
            ops.push((m.to_uppercase(), path.clone()));
        }
    }
    ops.sort();
    ops
}
