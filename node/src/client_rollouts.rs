//! `trellis rollout`: start a canary, watch it, and steer it (pause, resume, promote,
//! abort), over the agent's `/v1/rollouts` and `/v1/policy/rollouts` API.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{json, Value};

use crate::client::Output;

/// What `trellis rollout start` takes.
#[derive(clap::Args, Debug)]
pub struct StartArgs {
    pub name: String,
    #[arg(long)]
    pub service: String,
    /// The subset serving now.
    #[arg(long)]
    pub stable: String,
    /// The subset rolled out.
    #[arg(long)]
    pub canary: String,
    /// The canary's weight at each step, e.g. 5,25,50,100.
    #[arg(long, value_delimiter = ',', required = true)]
    pub steps: Vec<u32>,
    /// How long each step runs before its gates are judged.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub interval: Duration,
    #[arg(long)]
    pub min_success_rate: Option<f64>,
    #[arg(long)]
    pub max_success_drop: Option<f64>,
    #[arg(long, value_parser = humantime::parse_duration)]
    pub max_p99: Option<Duration>,
    #[arg(long)]
    pub min_requests: Option<u64>,
    #[arg(long)]
    pub failures_allowed: Option<u32>,
}

/// Writes `rollouts/<name>`; its owner starts it within a tick.
pub fn start(api: SocketAddr, a: &StartArgs) -> anyhow::Result<()> {
    let mut analysis = serde_json::Map::new();
    let mut set = |k: &str, v: Option<Value>| {
        if let Some(v) = v {
            analysis.insert(k.into(), v);
        }
    };
    set("min_success_rate", a.min_success_rate.map(Value::from));
    set("max_success_drop", a.max_success_drop.map(Value::from));
    set("max_p99", a.max_p99.map(|d| Value::from(humantime::format_duration(d).to_string())));
    set("min_requests", a.min_requests.map(Value::from));
    set("failures_allowed", a.failures_allowed.map(Value::from));
    let body = json!({
        "service": a.service,
        "stable": a.stable,
        "canary": a.canary,
        "steps": a.steps,
        "interval": humantime::format_duration(a.interval).to_string(),
        "analysis": analysis,
    });
    crate::client::put(api, &format!("/v1/policy/rollouts/{}", a.name), &body.to_string())?;
    println!("rollout {} written; `trellis rollout status {}` follows it", a.name, a.name);
    Ok(())
}

/// Every rollout as a row, or one with its timeline.
pub fn status(api: SocketAddr, name: Option<&str>, output: Output) -> anyhow::Result<()> {
    let path = name.map_or("/v1/rollouts".to_string(), |n| format!("/v1/rollouts/{n}"));
    let v: Value = serde_json::from_str(&crate::client::get(api, &path)?)?;
    crate::client::show(&v, output, table)
}

/// Rows of NAME, PHASE, WEIGHT, STEP, OWNER, REASON; for one rollout, its timeline below.
pub fn table(v: &Value) -> String {
    let one = v.is_object();
    let list: Vec<&Value> = if one { vec![v] } else { v.as_array().into_iter().flatten().collect() };
    let mut out = format!("{:<20} {:<12} {:<7} {:<6} {:<12} REASON\n", "NAME", "PHASE", "WEIGHT", "STEP", "OWNER");
    for r in &list {
        let s = &r["status"];
        let steps = r["spec"]["steps"].as_array().map_or(0, Vec::len);
        let step = s["step"].as_u64().map_or("-".to_string(), |k| format!("{}/{steps}", k + 1));
        let weight = s["weight"].as_u64().map_or("-".to_string(), |w| format!("{w}%"));
        out.push_str(&format!(
            "{:<20} {:<12} {:<7} {:<6} {:<12} {}\n",
            r["name"].as_str().unwrap_or(""),
            r["phase"].as_str().unwrap_or(""),
            weight,
            step,
            r["owner"].as_str().unwrap_or("-"),
            s["reason"].as_str().unwrap_or(""),
        ));
    }
    if one {
        out.push_str("\nTIMELINE\n");
        for e in v["status"]["timeline"].as_array().into_iter().flatten() {
            let at = e["at_ms"].as_u64().and_then(|ms| {
                let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).ok()?;
                t.format(&time::format_description::well_known::Rfc3339).ok()
            });
            out.push_str(&format!(
                "{:<30} {:>4}%  {}\n",
                at.unwrap_or_default(),
                e["weight"],
                e["note"].as_str().unwrap_or("")
            ));
        }
    }
    out
}

/// `pause`, `resume`, `promote` or `abort`.
pub fn command(api: SocketAddr, name: &str, cmd: &str) -> anyhow::Result<()> {
    let v: Value = serde_json::from_str(&crate::client::post(api, &format!("/v1/rollouts/{name}/{cmd}"), "")?)?;
    print!("{}", table(&v));
    Ok(())
}
