//! A small blocking JSON client for agent APIs. Non-2xx answers are returned, not raised,
//! so tests can assert on them; short timeouts keep a dead or paused agent from hanging a test.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use serde_json::Value;

/// How long one request may take. A paused (SIGSTOPped) agent still completes TCP handshakes
/// in the kernel and then never answers, so this bound is what unblocks a poll loop.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Clone, Debug)]
pub struct Api {
    base: String,
    agent: ureq::Agent,
    token: Option<String>,
}

/// API tokens by address: an agent whose API is off loopback (namespace mode) needs one, and
/// every client of this process made for that address sends it.
fn tokens() -> &'static Mutex<HashMap<SocketAddr, String>> {
    static TOKENS: OnceLock<Mutex<HashMap<SocketAddr, String>>> = OnceLock::new();
    TOKENS.get_or_init(Mutex::default)
}

/// From now on, clients of `addr` send `token` as a bearer token.
pub fn register_token(addr: SocketAddr, token: &str) {
    tokens().lock().unwrap_or_else(|e| e.into_inner()).insert(addr, token.to_string());
}

impl Api {
    pub fn new(addr: SocketAddr) -> Api {
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(REQUEST_TIMEOUT))
            .http_status_as_error(false)
            // Agents live on loopback; an HTTP_PROXY from the developer's shell must not intercept.
            .proxy(None)
            .build()
            .into();
        let token = tokens().lock().unwrap_or_else(|e| e.into_inner()).get(&addr).cloned();
        Api { base: format!("http://{addr}"), agent, token }
    }

    fn auth<B>(&self, req: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match &self.token {
            Some(t) => req.header("authorization", format!("Bearer {t}")),
            None => req,
        }
    }

    /// `http://ip:port`, for error messages and hand-built URLs.
    pub fn base(&self) -> &str {
        &self.base
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn get(&self, path: &str) -> ureq::RequestBuilder<ureq::typestate::WithoutBody> {
        let req = self.auth(self.agent.get(self.url(path)));
        match blocking_wait(path) {
            // A blocking read may legitimately hold the answer back for its whole `wait`.
            Some(wait) => req.config().timeout_global(Some(wait + REQUEST_TIMEOUT)).build(),
            None => req,
        }
    }

    fn finish(
        method: &str,
        path: &str,
        res: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> anyhow::Result<(u16, Value)> {
        let mut res = res.map_err(|e| anyhow::anyhow!("{method} {path}: {e}"))?;
        let status = res.status().as_u16();
        let text = res.body_mut().read_to_string().map_err(|e| anyhow::anyhow!("{method} {path}: body: {e}"))?;
        // Error pages that are not JSON still reach the caller, as a string.
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok((status, body))
    }

    /// GET a text document (e.g. `/metrics`); a non-2xx status is an error.
    pub fn get_text(&self, path: &str) -> anyhow::Result<String> {
        let mut res = self.get(path).call().map_err(|e| anyhow::anyhow!("GET {}{path}: {e}", self.base))?;
        let status = res.status();
        let text = res.body_mut().read_to_string().map_err(|e| anyhow::anyhow!("GET {path}: body: {e}"))?;
        anyhow::ensure!(status.is_success(), "GET {}{path}: {status}: {text}", self.base);
        Ok(text)
    }

    /// GET a JSON document; a non-2xx status is an error (use the status-returning calls to
    /// assert on refusals).
    pub fn get_json(&self, path: &str) -> anyhow::Result<Value> {
        let (status, body) = Self::finish("GET", path, self.get(path).call())?;
        anyhow::ensure!((200..300).contains(&status), "GET {}{path}: {status} {body}", self.base);
        Ok(body)
    }

    pub fn post_json(&self, path: &str, body: &Value) -> anyhow::Result<(u16, Value)> {
        self.post_raw(path, &body.to_string())
    }

    /// POST a body verbatim (for malformed-input tests).
    pub fn post_raw(&self, path: &str, body: &str) -> anyhow::Result<(u16, Value)> {
        let req = self.auth(self.agent.post(self.url(path))).header("content-type", "application/json");
        Self::finish("POST", path, req.send(body))
    }

    pub fn put_json(&self, path: &str, body: &Value) -> anyhow::Result<(u16, Value)> {
        let req = self.auth(self.agent.put(self.url(path))).header("content-type", "application/json");
        Self::finish("PUT", path, req.send(body.to_string()))
    }

    pub fn delete(&self, path: &str) -> anyhow::Result<(u16, Value)> {
        Self::finish("DELETE", path, self.auth(self.agent.delete(self.url(path))).call())
    }

    /// `GET /v1/members`.
    pub fn members(&self) -> anyhow::Result<Vec<Value>> {
        match self.get_json("/v1/members")? {
            Value::Array(v) => Ok(v),
            other => anyhow::bail!("GET {}/v1/members is not a list: {other}", self.base),
        }
    }
}

/// The `wait=` of a blocking read (`?index=N&wait=2s`): `500ms`, `2s`, `1m`; `None` if absent
/// or in a form we do not read, in which case the default timeout applies.
fn blocking_wait(path: &str) -> Option<Duration> {
    let (_, query) = path.split_once('?')?;
    let value = query.split('&').find_map(|kv| kv.strip_prefix("wait="))?;
    let digits = value.find(|c: char| !c.is_ascii_digit()).unwrap_or(value.len());
    let n: u64 = value[..digits].parse().ok()?;
    match &value[digits..] {
        "ms" => Some(Duration::from_millis(n)),
        "s" | "" => Some(Duration::from_secs(n)),
        "m" => Some(Duration::from_secs(n * 60)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocking_reads_get_their_wait_on_top_of_the_timeout() {
        assert_eq!(blocking_wait("/v1/policy?index=3&wait=2s"), Some(Duration::from_secs(2)));
        assert_eq!(blocking_wait("/v1/policy?wait=250ms&index=3"), Some(Duration::from_millis(250)));
        assert_eq!(blocking_wait("/v1/policy?index=3&wait=1m"), Some(Duration::from_secs(60)));
        assert_eq!(blocking_wait("/v1/policy?index=3"), None);
        assert_eq!(blocking_wait("/v1/members"), None);
        assert_eq!(blocking_wait("/v1/policy?nowait=5s"), None);
        assert_eq!(blocking_wait("/v1/policy?wait=1h30m"), None);
    }

    #[test]
    fn a_dead_agent_is_an_error_not_a_hang() {
        // Nothing listens on this loopback address.
        let api = Api::new("127.254.254.254:9".parse().unwrap());
        let t = std::time::Instant::now();
        assert!(api.get_json("/v1/health").is_err());
        assert!(api.post_json("/v1/agent/leave", &Value::Null).is_err());
        assert!(t.elapsed() < REQUEST_TIMEOUT * 2, "took {:?}", t.elapsed());
    }
}
