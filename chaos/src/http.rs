//! A small blocking JSON client for agent APIs. Non-2xx answers are returned, not raised,
//! so tests can assert on them; short timeouts keep a dead agent from hanging a test.

use std::time::Duration;

use serde_json::Value;

#[derive(Clone, Debug)]
pub struct Api {
    base: String,
    agent: ureq::Agent,
}

impl Api {
    pub fn new(addr: std::net::SocketAddr) -> Api {
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(3)))
            .http_status_as_error(false)
            .build()
            .into();
        Api { base: format!("http://{addr}"), agent }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn finish(res: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> anyhow::Result<(u16, Value)> {
        let mut res = res?;
        let status = res.status().as_u16();
        let text = res.body_mut().read_to_string()?;
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok((status, body))
    }

    pub fn get_text(&self, path: &str) -> anyhow::Result<String> {
        let mut res = self.agent.get(&self.url(path)).call()?;
        anyhow::ensure!(res.status().is_success(), "GET {path}: {}", res.status());
        Ok(res.body_mut().read_to_string()?)
    }

    pub fn get_json(&self, path: &str) -> anyhow::Result<Value> {
        let (status, body) = Self::finish(self.agent.get(&self.url(path)).call())?;
        anyhow::ensure!((200..300).contains(&status), "GET {path}: {status} {body}");
        Ok(body)
    }

    pub fn post_json(&self, path: &str, body: &Value) -> anyhow::Result<(u16, Value)> {
        self.post_raw(path, &body.to_string())
    }

    pub fn post_raw(&self, path: &str, body: &str) -> anyhow::Result<(u16, Value)> {
        let req = self.agent.post(&self.url(path)).header("content-type", "application/json");
        Self::finish(req.send(body))
    }

    pub fn put_json(&self, path: &str, body: &Value) -> anyhow::Result<(u16, Value)> {
        let req = self.agent.put(&self.url(path)).header("content-type", "application/json");
        Self::finish(req.send(body.to_string()))
    }

    pub fn delete(&self, path: &str) -> anyhow::Result<(u16, Value)> {
        Self::finish(self.agent.delete(&self.url(path)).call())
    }

    pub fn members(&self) -> anyhow::Result<Vec<Value>> {
        match self.get_json("/v1/members")? {
            Value::Array(v) => Ok(v),
            other => anyhow::bail!("/v1/members is not a list: {other}"),
        }
    }
}
