//! CLI commands that talk to a running agent's HTTP API.

use std::net::SocketAddr;
use std::time::Duration;

use crate::api::MemberJson;
use crate::cli::Output;

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
    let res = match (method, body) {
        ("GET", _) => a.get(&url).call(),
        (_, Some(b)) => a.post(&url).header("content-type", "application/json").send(b),
        (_, None) => a.post(&url).send_empty(),
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
