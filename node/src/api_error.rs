//! The API's error answer and strict body parsing, below every handler module.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// An API error: `{"error": ..., "field": ..., "hint": ...}` with a 4xx status.
#[derive(Debug, Serialize)]
pub struct ApiError {
    #[serde(skip)]
    pub status: StatusCode,
    pub error: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    pub hint: String,
}

impl ApiError {
    /// 404 for something that does not exist, with how to find or create it.
    pub fn not_found(error: String, hint: impl Into<String>) -> ApiError {
        ApiError { status: StatusCode::NOT_FOUND, error, field: None, hint: hint.into() }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self)).into_response()
    }
}

/// Parses a JSON body strictly, reporting the path of the offending field.
pub fn parse_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let field = match (path.as_str(), inner.classify()) {
            (".", _) => unknown_field(&inner.to_string()),
            _ => Some(path),
        };
        ApiError {
            status: StatusCode::BAD_REQUEST,
            error: inner.to_string(),
            field,
            hint: "send a JSON object with only the documented fields; see README.md, section HTTP API".into(),
        }
    })
}

/// serde reports an unknown field at the parent path; pull its name out of the message.
fn unknown_field(msg: &str) -> Option<String> {
    let rest = msg.strip_prefix("unknown field `")?;
    Some(rest.split('`').next()?.to_string())
}
