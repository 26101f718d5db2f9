//! Who may use the local HTTP API.
//!
//! - Tokens: with a tokens file configured, every request but the [`PUBLIC`] ones needs
//!   `Authorization: Bearer <token>`: a read token for GET and HEAD, a write token for
//!   anything else (a write token also reads). Missing: 401; wrong or too weak: 403.
//!   Tokens are compared in constant time and never logged.
//! - DNS rebinding: a web page cannot reach the API through a name it controls, because
//!   `Host` must be an IP literal or `localhost` (or a name listed in the config), and a
//!   request that carries a browser `Origin` is refused unless that origin is this very
//!   host and port.
//!
//! The decision ([`Access::decide`]) is plain logic; the axum layer only maps it.

use std::path::Path;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

/// Paths served without a token: the health probe, and the static documents (dashboard page
/// and assets, API description) that hold no cluster data: the page asks for a token and
/// sends it with its own API reads.
pub const PUBLIC: [&str; 5] = ["/v1/health", "/ui", "/ui/app.js", "/ui/app.css", "/v1/openapi.json"];

/// Shortest token accepted: 128 bits of hex.
pub const MIN_TOKEN_LEN: usize = 32;

#[derive(Clone, Default)]
pub struct Access {
    read: Vec<Vec<u8>>,
    write: Vec<Vec<u8>>,
    /// Host names (besides IP literals and localhost) the API answers to.
    allowed_hosts: Vec<String>,
}

/// Never prints a token: only how many there are.
impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Access")
            .field("read_tokens", &self.read.len())
            .field("write_tokens", &self.write.len())
            .field("allowed_hosts", &self.allowed_hosts)
            .finish()
    }
}

/// Why a request was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    NoToken,
    BadToken,
    ReadOnly,
    Host,
    Origin,
}

impl Access {
    /// Reads a tokens file: one `read:<token>` or `write:<token>` per line; `#` comments.
    pub fn load(path: &Path, allowed_hosts: Vec<String>) -> Result<Access, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("api_tokens_file: cannot read {}: {e}", path.display()))?;
        let mut access = Access { allowed_hosts, ..Access::default() };
        for (i, line) in text.lines().enumerate().map(|(i, l)| (i + 1, l.trim())) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let at = || format!("api_tokens_file: {} line {i}", path.display());
            let (scope, token) =
                line.split_once(':').ok_or_else(|| format!("{}: expected read:<token> or write:<token>", at()))?;
            if token.len() < MIN_TOKEN_LEN {
                return Err(format!(
                    "{}: token shorter than {MIN_TOKEN_LEN} characters; make one with `openssl rand -hex 16`",
                    at()
                ));
            }
            match scope {
                "read" => access.read.push(token.as_bytes().to_vec()),
                "write" => access.write.push(token.as_bytes().to_vec()),
                other => return Err(format!("{}: scope {other:?} is neither read nor write", at())),
            }
        }
        if access.read.is_empty() && access.write.is_empty() {
            return Err(format!("api_tokens_file: {} holds no token", path.display()));
        }
        Ok(access)
    }

    /// Only the host checks apply: no tokens configured.
    pub fn open(allowed_hosts: Vec<String>) -> Access {
        Access { allowed_hosts, ..Access::default() }
    }

    pub fn has_tokens(&self) -> bool {
        !self.read.is_empty() || !self.write.is_empty()
    }

    pub fn decide(&self, method: &Method, path: &str, headers: &HeaderMap) -> Result<(), Refusal> {
        let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
        if !self.host_ok(host) {
            return Err(Refusal::Host);
        }
        if let Some(origin) = headers.get(header::ORIGIN) {
            let same = origin.to_str().ok().and_then(|o| o.strip_prefix("http://")).is_some_and(|o| o == host);
            if !same {
                return Err(Refusal::Origin);
            }
        }
        if !self.has_tokens() || PUBLIC.contains(&path) {
            return Ok(());
        }
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or(Refusal::NoToken)?
            .as_bytes();
        let writes = self.write.iter().any(|t| same_bytes(t, token));
        let reads = writes || self.read.iter().any(|t| same_bytes(t, token));
        match (reads, writes, matches!(*method, Method::GET | Method::HEAD)) {
            (false, _, _) => Err(Refusal::BadToken),
            (true, false, false) => Err(Refusal::ReadOnly),
            _ => Ok(()),
        }
    }

    fn host_ok(&self, host: &str) -> bool {
        let name = match host.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or(""),
            None => host.rsplit_once(':').map_or(host, |(h, _)| h),
        };
        name.parse::<std::net::IpAddr>().is_ok() || name == "localhost" || self.allowed_hosts.iter().any(|h| h == name)
    }
}

/// Compares in time that depends only on the lengths, so a caller cannot find a token byte
/// by byte from response times.
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The axum layer over [`Access::decide`].
pub async fn layer(State(access): State<Arc<Access>>, req: Request, next: Next) -> Response {
    match access.decide(req.method(), req.uri().path(), req.headers()) {
        Ok(()) => next.run(req).await,
        Err(r) => refuse(r),
    }
}

fn refuse(r: Refusal) -> Response {
    let (status, error, hint) = match r {
        Refusal::NoToken => (StatusCode::UNAUTHORIZED, "a token is required", "send Authorization: Bearer <token>"),
        Refusal::BadToken => {
            (StatusCode::FORBIDDEN, "the token is not valid", "use a token from the agent's tokens file")
        }
        Refusal::ReadOnly => (StatusCode::FORBIDDEN, "a read token cannot write", "use a write token"),
        Refusal::Host => (
            StatusCode::FORBIDDEN,
            "the Host header names this agent by a name it does not answer to",
            "use the agent's IP address or localhost, or list the name in api_allowed_hosts",
        ),
        Refusal::Origin => (
            StatusCode::FORBIDDEN,
            "cross-origin requests are refused",
            "call the API from the agent's own origin, or without a browser",
        ),
    };
    let body = serde_json::json!({"error": error, "hint": hint});
    let mut resp = (status, axum::Json(body)).into_response();
    if status == StatusCode::UNAUTHORIZED {
        resp.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: &str = "wwwwwwwwwwwwwwwwwwwwwwwwwwwwwwww";
    const R: &str = "rrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrr";

    fn access() -> Access {
        Access { read: vec![R.into()], write: vec![W.into()], allowed_hosts: vec!["agent.internal".into()] }
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        }
        h
    }

    #[test]
    fn reads_need_a_token_and_writes_a_write_token() {
        let a = access();
        let host = ("host", "127.0.0.1:8500");
        assert_eq!(a.decide(&Method::GET, "/v1/members", &headers(&[host])), Err(Refusal::NoToken));
        let read = format!("Bearer {R}");
        let write = format!("Bearer {W}");
        assert_eq!(a.decide(&Method::GET, "/v1/members", &headers(&[host, ("authorization", &read)])), Ok(()));
        assert_eq!(
            a.decide(&Method::PUT, "/v1/policy/x/y", &headers(&[host, ("authorization", &read)])),
            Err(Refusal::ReadOnly)
        );
        assert_eq!(a.decide(&Method::PUT, "/v1/policy/x/y", &headers(&[host, ("authorization", &write)])), Ok(()));
        assert_eq!(
            a.decide(&Method::GET, "/v1/members", &headers(&[host, ("authorization", "Bearer nope")])),
            Err(Refusal::BadToken)
        );
        assert_eq!(a.decide(&Method::GET, "/v1/health", &headers(&[host])), Ok(()), "health stays open for probes");
    }

    #[test]
    fn dashboard_assets_are_public_but_its_data_needs_a_token() {
        let a = access();
        let host = ("host", "127.0.0.1:8500");
        for path in ["/ui", "/ui/app.js", "/ui/app.css", "/v1/openapi.json"] {
            assert_eq!(a.decide(&Method::GET, path, &headers(&[host])), Ok(()), "{path}");
        }
        assert_eq!(a.decide(&Method::GET, "/ui/other", &headers(&[host])), Err(Refusal::NoToken));
        assert_eq!(a.decide(&Method::GET, "/v1/agent/traffic", &headers(&[host])), Err(Refusal::NoToken));
        // The page's own reads: same origin (Chromium sends Origin on some same-origin fetches) plus the token.
        let read = format!("Bearer {R}");
        for (host, origin) in [("127.0.0.1:8500", "http://127.0.0.1:8500"), ("localhost:8500", "http://localhost:8500")]
        {
            let h = headers(&[("host", host), ("origin", origin), ("authorization", &read)]);
            assert_eq!(a.decide(&Method::GET, "/v1/members", &h), Ok(()), "{host}");
        }
        // A public path still refuses a foreign origin and a rebindable name.
        let cross = headers(&[host, ("origin", "http://evil.example")]);
        assert_eq!(a.decide(&Method::GET, "/ui", &cross), Err(Refusal::Origin));
        assert_eq!(a.decide(&Method::GET, "/ui", &headers(&[("host", "evil.example")])), Err(Refusal::Host));
    }

    #[test]
    fn names_that_could_be_rebound_and_foreign_origins_are_refused() {
        let a = Access::open(vec!["agent.internal".into()]);
        for ok in ["127.0.0.1:8500", "localhost:8500", "[::1]:8500", "10.0.0.5", "agent.internal:8500"] {
            assert_eq!(a.decide(&Method::GET, "/v1/members", &headers(&[("host", ok)])), Ok(()), "{ok}");
        }
        assert_eq!(
            a.decide(&Method::GET, "/v1/members", &headers(&[("host", "evil.example:8500")])),
            Err(Refusal::Host)
        );
        let cross = headers(&[("host", "127.0.0.1:8500"), ("origin", "http://evil.example")]);
        assert_eq!(a.decide(&Method::POST, "/v1/agent/leave", &cross), Err(Refusal::Origin));
        let same = headers(&[("host", "127.0.0.1:8500"), ("origin", "http://127.0.0.1:8500")]);
        assert_eq!(a.decide(&Method::POST, "/v1/agent/leave", &same), Ok(()));
    }

    #[test]
    fn token_files_are_checked_line_by_line() {
        let dir = std::env::temp_dir().join(format!("trellis-tokens-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("tokens");
        std::fs::write(&p, format!("# ops\nread:{R}\nwrite:{W}\n")).unwrap();
        assert!(Access::load(&p, vec![]).unwrap().has_tokens());
        std::fs::write(&p, "write:short\n").unwrap();
        assert!(Access::load(&p, vec![]).unwrap_err().contains("line 1: token shorter than 32"));
        std::fs::write(&p, format!("admin:{W}\n")).unwrap();
        assert!(Access::load(&p, vec![]).unwrap_err().contains("neither read nor write"));
        assert!(same_bytes(b"abc", b"abc") && !same_bytes(b"abc", b"abd") && !same_bytes(b"abc", b"ab"));
        let shown = format!("{:?}", access());
        assert!(!shown.contains(R) && !shown.contains(W) && shown.contains("read_tokens: 1"), "{shown}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
