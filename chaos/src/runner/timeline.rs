//! The run at a glance: success rate, p99 latency and members seen per second, with the
//! injected faults marked, as a self-contained SVG (no plotting crate).

use std::fmt::Write;

use crate::runner::Report;

const W: f64 = 960.0;
const PANEL: f64 = 110.0;
const LEFT: f64 = 70.0;
const TOP: f64 = 30.0;

/// Picks one value out of a timeline point (second, success, p99 ms, members).
type Column = fn(&(u64, f64, f64, usize)) -> f64;

/// Three panels over the same time axis, faults as vertical lines labelled by kind.
pub fn svg(r: &Report) -> String {
    let secs = r.timeline.len().max(1) as f64;
    let x = |t: f64| LEFT + (W - LEFT - 20.0) * t / secs;
    let max_lat = r.timeline.iter().map(|p| p.2).fold(1.0, f64::max);
    let max_members = r.timeline.iter().map(|p| p.3).max().unwrap_or(1).max(1) as f64;
    let height = TOP + 3.0 * (PANEL + 30.0) + 20.0;
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height}" font-family="sans-serif" font-size="11">"#
    );
    let _ = write!(
        s,
        r#"<text x="{LEFT}" y="18" font-size="14">{} (seed {}): {}</text>"#,
        r.scenario,
        r.seed,
        if r.passed() { "PASS" } else { "FAIL" }
    );
    let panels: [(&str, Column, f64); 3] = [
        ("success rate", |p| p.1, 1.0),
        ("p99 latency (ms)", |p| p.2, max_lat),
        ("members node 0 sees alive", |p| p.3 as f64, max_members),
    ];
    for (k, (title, value, max)) in panels.iter().enumerate() {
        let y0 = TOP + k as f64 * (PANEL + 30.0) + 20.0;
        let y = |v: f64| y0 + PANEL - PANEL * (v / max).clamp(0.0, 1.0);
        let _ = write!(
            s,
            r##"<rect x="{LEFT}" y="{y0}" width="{}" height="{PANEL}" fill="#f7f7f7" stroke="#ccc"/>"##,
            W - LEFT - 20.0
        );
        let _ = write!(s, r#"<text x="{LEFT}" y="{}">{title} (max {max:.1})</text>"#, y0 - 4.0);
        let points: Vec<String> =
            r.timeline.iter().map(|p| format!("{:.1},{:.1}", x(p.0 as f64 + 0.5), y(value(p)))).collect();
        let _ =
            write!(s, r##"<polyline fill="none" stroke="#1f77b4" stroke-width="1.5" points="{}"/>"##, points.join(" "));
        for f in &r.schedule {
            let fx = x(f.at.as_secs_f64());
            let _ = write!(
                s,
                r##"<line x1="{fx:.1}" y1="{y0}" x2="{fx:.1}" y2="{}" stroke="#d62728" stroke-dasharray="3,2"/>"##,
                y0 + PANEL
            );
            if k == 0 {
                let _ = write!(
                    s,
                    r##"<text x="{:.1}" y="{}" fill="#d62728" font-size="9">{:?} {:?}</text>"##,
                    fx + 2.0,
                    y0 + 10.0,
                    f.kind,
                    f.nodes
                );
            }
        }
    }
    let _ = write!(
        s,
        r#"<text x="{LEFT}" y="{}">seconds since the traffic started (0..{secs})</text></svg>"#,
        height - 4.0
    );
    s
}
