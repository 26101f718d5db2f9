//! CLI commands that talk to a running agent's HTTP API.

use std::net::SocketAddr;
use std::time::Duration;

use crate::api_types::MemberJson;

/// How a listing is printed.
#[derive(Clone, Copy, Debug, clap::ValueEnum, PartialEq, Eq)]
pub enum Output {
    Table,
    Text,
    Json,
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(5)))
        .http_status_as_error(false)
        .build()
        .into()
}

/// Calls the API; a non-2xx answer becomes an error carrying the agent's message and hint.
fn call(addr: SocketAddr, method: &str, path: &str, body: Option<String>) -> anyhow::Result<String> {
    let url = format!("http://{addr}{path}");
    let a = agent();
    // With API tokens on, TRELLIS_HTTP_TOKEN carries one.
    let auth = std::env::var("TRELLIS_HTTP_TOKEN").ok().map(|t| format!("Bearer {t}")).unwrap_or_default();
    let res = match (method, body) {
        ("GET", _) => a.get(&url).header("authorization", &auth).call(),
        ("DELETE", _) => a.delete(&url).header("authorization", &auth).call(),
        ("PUT", Some(b)) => {
            a.put(&url).header("authorization", &auth).header("content-type", "application/json").send(b)
        }
        (_, Some(b)) => a.post(&url).header("authorization", &auth).header("content-type", "application/json").send(b),
        (_, None) => a.post(&url).header("authorization", &auth).send_empty(),
    };
    let mut res = res.map_err(|e| {
        anyhow::anyhow!(
            "cannot reach the agent API at {addr}: {e}; is the agent running? set --http-addr or TRELLIS_HTTP_ADDR"
        )
    })?;
    let status = res.status().as_u16();
    let text = res.body_mut().read_to_string()?;
    if !(200..300).contains(&status) {
        anyhow::bail!("agent answered {status}: {text}");
    }
    Ok(text)
}

/// `GET path` on the agent's API; the body of a 2xx answer.
pub fn get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    call(addr, "GET", path, None)
}

/// `PUT path` with a JSON body on the agent's API; the body of a 2xx answer.
pub fn put(addr: SocketAddr, path: &str, json: &str) -> anyhow::Result<String> {
    call(addr, "PUT", path, Some(json.to_string()))
}

/// `POST path` with a JSON body (none when empty) on the agent's API; the body of a 2xx answer.
pub fn post(addr: SocketAddr, path: &str, json: &str) -> anyhow::Result<String> {
    call(addr, "POST", path, (!json.is_empty()).then(|| json.to_string()))
}

/// `DELETE path` on the agent's API; the body of a 2xx answer.
pub fn delete(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    call(addr, "DELETE", path, None)
}

/// One `GET path` with `Host: host` through an agent's HTTP proxy: the status and the raw
/// answer (as curl would show it with `-i`).
pub fn get_through(proxy: SocketAddr, host: &str, path: &str) -> anyhow::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut tcp = std::net::TcpStream::connect_timeout(&proxy, Duration::from_secs(2))?;
    tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(tcp, "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")?;
    let mut answer = String::new();
    tcp.read_to_string(&mut answer)?;
    let status = answer.split_whitespace().nth(1).and_then(|s| s.parse().ok());
    let status = status.ok_or_else(|| anyhow::anyhow!("{proxy} sent no HTTP status line"))?;
    Ok((status, answer))
}

/// Prints an API answer as pretty JSON (`-o json`) or through `table`.
pub fn show(v: &serde_json::Value, output: Output, table: fn(&serde_json::Value) -> String) -> anyhow::Result<()> {
    if output == Output::Json {
        println!("{}", serde_json::to_string_pretty(v)?);
    } else {
        print!("{}", table(v));
    }
    Ok(())
}

pub fn fetch_members(addr: SocketAddr) -> anyhow::Result<Vec<MemberJson>> {
    Ok(serde_json::from_str(&call(addr, "GET", "/v1/members", None)?)?)
}

pub fn members(addr: SocketAddr, output: Output) -> anyhow::Result<()> {
    let members = fetch_members(addr)?;
    if output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&members)?);
    } else {
        print!("{}", member_table(&members));
    }
    Ok(())
}

/// A fixed-width member table for humans.
pub fn member_table(members: &[MemberJson]) -> String {
    let mut out =
        format!("{:<16} {:<22} {:<8} {:<14} {:<8} LABELS\n", "NAME", "PEER", "STATE", "INCARNATION", "VERSION");
    for m in members {
        let labels: Vec<String> = m.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        out += &format!(
            "{:<16} {:<22} {:<8} {:<14} {:<8} {}\n",
            m.name,
            m.peer_addr.to_string(),
            m.state.as_str(),
            m.incarnation,
            m.version,
            labels.join(",")
        );
    }
    out
}

pub fn join(addr: SocketAddr, addrs: &[SocketAddr]) -> anyhow::Result<()> {
    let body = serde_json::json!({ "addrs": addrs }).to_string();
    println!("{}", call(addr, "POST", "/v1/agent/join", Some(body))?);
    Ok(())
}

pub fn leave(addr: SocketAddr) -> anyhow::Result<()> {
    println!("{}", call(addr, "POST", "/v1/agent/leave", None)?);
    Ok(())
}

/// `trellis ratelimits`: each limit's share here and the cluster-wide rates.
pub fn ratelimits(addr: SocketAddr, name: Option<&str>, output: Output) -> anyhow::Result<()> {
    let path = name.map_or("/v1/ratelimits".to_string(), |n| format!("/v1/ratelimits/{n}"));
    let body: serde_json::Value = serde_json::from_str(&call(addr, "GET", &path, None)?)?;
    if output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&body)?);
        return Ok(());
    }
    let limits = if body.is_array() { body.as_array().cloned().unwrap_or_default() } else { vec![body] };
    print!("{}", ratelimit_table(&limits));
    Ok(())
}

/// One line per limit key: this node's share and rates, and the cluster's as last reported.
pub fn ratelimit_table(limits: &[serde_json::Value]) -> String {
    let mut out = format!(
        "{:<20} {:<12} {:>8} {:>6} {:>9} {:>9} {:>11} {:<16} VALUE\n",
        "LIMIT", "SERVICE", "LIMIT/S", "SIDE", "SHARE/S", "ADMIT/S", "CLUSTER/S", "OWNER"
    );
    let num = |v: &serde_json::Value| v.as_f64().unwrap_or(0.0);
    for l in limits {
        let keys = l["keys"].as_array().cloned().unwrap_or_default();
        let rows = if keys.is_empty() { vec![serde_json::Value::Null] } else { keys };
        for k in rows {
            out += &format!(
                "{:<20} {:<12} {:>8.0} {:>6.2} {:>9.1} {:>9.1} {:>11.1} {:<16} {}\n",
                l["name"].as_str().unwrap_or(""),
                l["service"].as_str().unwrap_or(""),
                num(&l["rate"]),
                num(&l["side_fraction"]),
                num(&k["share_rate"]),
                num(&k["admitted"]),
                num(&k["cluster"]["admitted"]),
                k["owner"].as_str().unwrap_or("-"),
                k["value"].as_str().unwrap_or(""),
            );
        }
    }
    out
}

/// Reads a policy file: TOML (`[services.web]` ...), YAML (`services: {web: {...}}`) or JSON
/// (`{"services": {"web": {...}}}`), by extension; returns (kind, name, JSON body) per object.
pub fn read_policy_file(path: &std::path::Path) -> anyhow::Result<Vec<(String, String, serde_json::Value)>> {
    let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    parse_policy_text(&text, ext, &path.display())
}

/// A policy document's objects, `ext` (json, yaml/yml, or anything else for TOML) naming
/// the format; `origin` names the document in errors.
pub fn parse_policy_text(
    text: &str,
    ext: &str,
    origin: &dyn std::fmt::Display,
) -> anyhow::Result<Vec<(String, String, serde_json::Value)>> {
    struct Shown<'a>(&'a dyn std::fmt::Display);
    impl Shown<'_> {
        fn display(&self) -> &dyn std::fmt::Display {
            self.0
        }
    }
    let path = Shown(origin);
    let doc: serde_json::Value = if ext == "json" {
        serde_json::from_str(text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
    } else if ext == "yaml" || ext == "yml" {
        serde_yaml_ng::from_str(text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
    } else {
        let t: toml::Table =
            toml::from_str(text).map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.message()))?;
        serde_json::to_value(t)?
    };
    let serde_json::Value::Object(kinds) = doc else {
        anyhow::bail!("{}: expected tables of kinds, e.g. [services.web]", path.display())
    };
    let mut out = Vec::new();
    for (kind, objects) in kinds {
        let kind_ok =
            trellis_core::policy::Kind::parse(&kind).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let serde_json::Value::Object(objects) = objects else {
            anyhow::bail!("{}: `{kind}` must be a table of named objects, e.g. [{kind}.NAME]", path.display())
        };
        for (name, body) in objects {
            out.push((kind_ok.as_str().to_string(), name, body));
        }
    }
    Ok(out)
}

pub fn policy_apply(addr: SocketAddr, path: &std::path::Path, check: bool) -> anyhow::Result<()> {
    let objects = read_policy_file(path)?;
    let mut errors = Vec::new();
    for (kind, name, body) in &objects {
        let k = trellis_core::policy::Kind::parse(kind)?;
        if let Err(e) = trellis_core::policy::model::parse(k, name, body.to_string().as_bytes()) {
            errors.push(format!("{}: {e}", path.display()));
        }
    }
    if !errors.is_empty() {
        anyhow::bail!("{} invalid object(s), nothing written:\n{}", errors.len(), errors.join("\n"));
    }
    if check {
        println!("{}: {} object(s) valid", path.display(), objects.len());
        return Ok(());
    }
    for (kind, name, body) in objects {
        let res = call(addr, "PUT", &format!("/v1/policy/{kind}/{name}"), Some(body.to_string()))?;
        let v: serde_json::Value = serde_json::from_str(&res)?;
        println!("{kind}/{name} written, version {}", v["version"].as_str().unwrap_or("?"));
    }
    Ok(())
}

pub fn policy_get(addr: SocketAddr, kind: Option<&str>, name: Option<&str>, output: Output) -> anyhow::Result<()> {
    let path = match (kind, name) {
        (Some(k), Some(n)) => format!("/v1/policy/{k}/{n}"),
        (Some(k), None) => format!("/v1/policy/{k}"),
        _ => "/v1/policy".to_string(),
    };
    let v: serde_json::Value = serde_json::from_str(&call(addr, "GET", &path, None)?)?;
    if output == Output::Json || name.is_some() {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("{:<12} {:<24} {:<32} CONFLICTS", "KIND", "NAME", "VERSION");
    for o in v["objects"].as_array().into_iter().flatten() {
        let conflicts = o["conflicts"].as_array().map(|c| c.len()).unwrap_or(0);
        println!(
            "{:<12} {:<24} {:<32} {}",
            o["kind"].as_str().unwrap_or(""),
            o["name"].as_str().unwrap_or(""),
            o["version"].as_str().unwrap_or(""),
            conflicts
        );
    }
    Ok(())
}

pub fn policy_delete(addr: SocketAddr, kind: &str, name: &str) -> anyhow::Result<()> {
    println!("{}", call(addr, "DELETE", &format!("/v1/policy/{kind}/{name}"), None)?);
    Ok(())
}
