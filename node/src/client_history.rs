//! `trellis policy history KIND NAME` and `trellis policy revert KIND NAME --to VERSION`:
//! an object's recent versions on this agent, and undo as a new write of an old one.

use std::net::SocketAddr;

use serde_json::Value;

use crate::client::Output;

fn versions(api: SocketAddr, kind: &str, name: &str) -> anyhow::Result<Value> {
    Ok(serde_json::from_str(&crate::client::get(api, &format!("/v1/policy/{kind}/{name}?history"))?)?)
}

/// Prints the versions newest first: VERSION, WRITTEN_AT, WRITER and what it was.
pub fn history(api: SocketAddr, kind: &str, name: &str, output: Output) -> anyhow::Result<()> {
    crate::client::show(&versions(api, kind, name)?, output, table)
}

pub fn table(h: &Value) -> String {
    let mut out = format!("{:<24} {:<26} {:<16} BODY\n", "VERSION", "WRITTEN_AT", "WRITER");
    for v in h["versions"].as_array().into_iter().flatten() {
        let version = v["version"].as_str().unwrap_or("");
        let mark = if h["current"].as_str() == Some(version) { "*" } else { "" };
        let body = if v["deleted"] == true { "(deleted)".to_string() } else { v["body"].to_string() };
        out.push_str(&format!(
            "{:<24} {:<26} {:<16} {body}\n",
            format!("{version}{mark}"),
            v["written_at"].as_str().unwrap_or("-"),
            v["writer"].as_str().unwrap_or("-"),
        ));
    }
    out
}

/// Writes version `to`'s content again (or deletes, when `to` was a delete), checked
/// against the current version so a write that lands meanwhile is not overwritten.
pub fn revert(api: SocketAddr, kind: &str, name: &str, to: &str) -> anyhow::Result<()> {
    let h = versions(api, kind, name)?;
    let list = h["versions"].as_array().cloned().unwrap_or_default();
    let Some(old) = list.iter().find(|v| v["version"] == to) else {
        let known: Vec<&str> = list.iter().filter_map(|v| v["version"].as_str()).collect();
        anyhow::bail!("--to: {kind}/{name} has no version {to} on this agent; versions: {}", known.join(", "));
    };
    let current = h["current"].as_str().unwrap_or("0");
    if current == to {
        println!("{kind}/{name} is at {to} already");
        return Ok(());
    }
    let path = format!("/v1/policy/{kind}/{name}?cas={current}");
    let res = if old["deleted"] == true {
        crate::client::delete(api, &path)?
    } else {
        crate::client::put(api, &path, &old["body"].to_string())?
    };
    let new: Value = serde_json::from_str(&res)?;
    println!("{kind}/{name} reverted to the content of {to} as version {}", new["version"].as_str().unwrap_or("?"));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_marks_the_current_version_and_deletes() {
        let h = serde_json::json!({"current": "9.a", "versions": [
            {"version": "9.a", "written_at": "2026-12-07T04:00:00Z", "writer": "n1", "deleted": false, "body": {"ports": [80]}},
            {"version": "8.a", "written_at": "2026-12-07T03:59:00Z", "writer": "n2", "deleted": true, "body": null},
        ]});
        let t = table(&h);
        let rows: Vec<Vec<&str>> = t.lines().map(|l| l.split_whitespace().collect()).collect();
        assert_eq!(rows[0], ["VERSION", "WRITTEN_AT", "WRITER", "BODY"]);
        assert_eq!(rows[1][..3], ["9.a*", "2026-12-07T04:00:00Z", "n1"]);
        assert_eq!(rows[2][3], "(deleted)");
    }
}
