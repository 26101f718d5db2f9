//! `trellis stat`: the mesh's golden metrics from any agent (`GET /v1/stats`), with the
//! columns operators know from `linkerd viz stat`.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;

use crate::client::Output;

pub fn stat(api: SocketAddr, service: Option<&str>, by: &str, window: &str, output: Output) -> anyhow::Result<()> {
    let mut path = format!("/v1/stats?by={by}&window={window}");
    if let Some(s) = service {
        path.push_str(&format!("&service={s}"));
    }
    let v: Value = serde_json::from_str(&crate::client::get(api, &path)?)?;
    crate::client::show(&v, output, table)
}

/// `trellis top`: the busiest paths through the mesh (calling node, service, answering
/// node), redrawn every `every` until interrupted, or `count` times.
pub fn top(api: SocketAddr, window: &str, every: Duration, count: Option<u32>) -> anyhow::Result<()> {
    let path = format!("/v1/stats?by=edge&window={window}");
    for n in 1.. {
        let body = match crate::client::get(api, &path).and_then(|t| Ok(serde_json::from_str::<Value>(&t)?)) {
            Ok(v) => table(&v),
            Err(e) => format!("{e:#}\n"),
        };
        let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
        // Clear the screen and go home, then the frame: one write, so it never flickers half drawn.
        print!("\x1b[2J\x1b[H{now}  trellis top: busiest paths across the mesh over {window}, every {every:?}; Ctrl-C quits\n\n{body}");
        std::io::Write::flush(&mut std::io::stdout())?;
        if count.is_some_and(|c| n >= c) {
            break;
        }
        std::thread::sleep(every);
    }
    Ok(())
}

/// NAME SUCCESS RPS LATENCY_P50 LATENCY_P95 LATENCY_P99 TCP_CONN, one row per group.
pub fn table(v: &Value) -> String {
    let by = match v["by"].as_str().unwrap_or("service") {
        "edge" => "SOURCE -> SERVICE@NODE".to_string(),
        other => other.to_uppercase(),
    };
    let rows = v["rows"].as_array().map(Vec::as_slice).unwrap_or_default();
    let w = rows.iter().filter_map(|r| r["name"].as_str()).map(str::len).chain([24, by.len()]).max().unwrap_or(24);
    let mut out = format!(
        "{by:<w$} {:>8} {:>10} {:>12} {:>12} {:>12} {:>8}\n",
        "SUCCESS", "RPS", "LATENCY_P50", "LATENCY_P95", "LATENCY_P99", "TCP_CONN"
    );
    let ms = |x: &Value| {
        x.as_f64().map_or("-".to_string(), |m| if m < 10.0 { format!("{m:.1}ms") } else { format!("{m:.0}ms") })
    };
    for r in rows {
        let success = r["success"].as_f64().map_or("-".to_string(), |s| format!("{:.2}%", s * 100.0));
        let rps = format!("{:.1}rps", r["rps"].as_f64().unwrap_or(0.0));
        out.push_str(&format!(
            "{:<w$} {success:>8} {rps:>10} {:>12} {:>12} {:>12} {:>8}\n",
            r["name"].as_str().unwrap_or("-"),
            ms(&r["p50_ms"]),
            ms(&r["p95_ms"]),
            ms(&r["p99_ms"]),
            r["tcp_open"].as_u64().unwrap_or(0),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_has_linkerds_columns() {
        let v = serde_json::json!({"by": "service", "rows": [
            {"name": "web", "success": 0.9333, "rps": 25.0, "p50_ms": 1.19, "p95_ms": 4.0, "p99_ms": 33.6, "tcp_open": 0},
            {"name": "db", "success": null, "rps": 0.0, "p50_ms": null, "p95_ms": null, "p99_ms": null, "tcp_open": 3},
        ]});
        let t = table(&v);
        let rows: Vec<Vec<&str>> = t.lines().map(|l| l.split_whitespace().collect()).collect();
        assert_eq!(rows[0], ["SERVICE", "SUCCESS", "RPS", "LATENCY_P50", "LATENCY_P95", "LATENCY_P99", "TCP_CONN"]);
        assert_eq!(rows[1], ["web", "93.33%", "25.0rps", "1.2ms", "4.0ms", "34ms", "0"]);
        assert_eq!(rows[2], ["db", "-", "0.0rps", "-", "-", "-", "3"]);
    }
}
