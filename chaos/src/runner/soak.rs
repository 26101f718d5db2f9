//! Resource figures of a long run: every node's RSS, open fds, async tasks and QUIC
//! connections sampled on a fixed period, a least-squares fit of RSS against time, and a
//! picture. A leak shows as a slope that does not flatten, so the verdict is on the fit
//! after a warm-up, not on one high sample.

use std::fmt::Write;

use serde::Serialize;

/// One node at one instant. `run` counts the node's starts: a restarted process begins a
/// new series, since its memory starts from nothing again.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Sample {
    pub t_s: f64,
    pub node: usize,
    pub run: u32,
    pub rss_mib: f64,
    pub fds: f64,
    pub tasks: f64,
    pub quic: f64,
}

/// The value of an unlabelled series in Prometheus text, e.g. `process_open_fds 17`.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(name)?;
        rest.starts_with(' ').then(|| rest.trim().parse().ok()).flatten()
    })
}

/// A sample from one scrape of `/metrics`; None when the scrape lacks the process figures.
pub fn from_metrics(text: &str, t_s: f64, node: usize, run: u32) -> Option<Sample> {
    Some(Sample {
        t_s,
        node,
        run,
        rss_mib: metric(text, "process_resident_memory_bytes")? / (1024.0 * 1024.0),
        fds: metric(text, "process_open_fds")?,
        tasks: metric(text, "trellis_runtime_tasks").unwrap_or(0.0),
        quic: metric(text, "trellis_quic_connections").unwrap_or(0.0),
    })
}

/// Least-squares slope and intercept of `points` (x, y); None with fewer than 3 points or
/// no spread in x.
pub fn fit(points: &[(f64, f64)]) -> Option<(f64, f64)> {
    let n = points.len() as f64;
    if points.len() < 3 {
        return None;
    }
    let (mx, my) = points.iter().fold((0.0, 0.0), |(a, b), (x, y)| (a + x / n, b + y / n));
    let sxx: f64 = points.iter().map(|(x, _)| (x - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|(x, y)| (x - mx) * (y - my)).sum();
    (sxx > 0.0).then(|| (sxy / sxx, my - sxy / sxx * mx))
}

/// The RSS growth of one node's run: MiB per hour over the samples after `warmup_s` of it.
#[derive(Debug, Clone, Serialize)]
pub struct Growth {
    pub node: usize,
    pub run: u32,
    pub span_s: f64,
    pub end_s: f64,
    /// The fit's value at `end_s`.
    pub fitted_end_mib: f64,
    pub first_mib: f64,
    pub last_mib: f64,
    pub mib_per_hour: f64,
}

/// The growth of every run that lasted at least `min_span_s` after its warm-up.
pub fn growth(samples: &[Sample], warmup_s: f64, min_span_s: f64) -> Vec<Growth> {
    let mut runs: Vec<(usize, u32)> = samples.iter().map(|s| (s.node, s.run)).collect();
    runs.sort_unstable();
    runs.dedup();
    runs.into_iter()
        .filter_map(|(node, run)| {
            let of_run: Vec<&Sample> = samples.iter().filter(|s| s.node == node && s.run == run).collect();
            let start = of_run.first()?.t_s;
            let points: Vec<(f64, f64)> =
                of_run.iter().filter(|s| s.t_s - start >= warmup_s).map(|s| (s.t_s, s.rss_mib)).collect();
            let span_s = points.last()?.0 - points.first()?.0;
            let (slope, intercept) = fit(&points).filter(|_| span_s >= min_span_s)?;
            let end_s = points.last()?.0;
            Some(Growth {
                node,
                run,
                span_s,
                end_s,
                fitted_end_mib: intercept + slope * end_s,
                first_mib: points.first()?.1,
                last_mib: points.last()?.1,
                mib_per_hour: slope * 3600.0,
            })
        })
        .collect()
}

/// Picks one figure out of a sample.
type Column = fn(&Sample) -> f64;

const W: f64 = 960.0;
const PANEL: f64 = 120.0;
const LEFT: f64 = 70.0;
const TOP: f64 = 30.0;
const COLOURS: [&str; 8] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"];

/// Four panels (RSS, fds, tasks, QUIC connections), one line per node run, and node 0's RSS
/// fit drawn dashed over its panel.
pub fn svg(title: &str, samples: &[Sample], fits: &[Growth]) -> String {
    let end = samples.iter().map(|s| s.t_s).fold(1.0, f64::max);
    let x = |t: f64| LEFT + (W - LEFT - 20.0) * t / end;
    let panels: [(&str, Column); 4] = [
        ("RSS (MiB)", |s| s.rss_mib),
        ("open fds", |s| s.fds),
        ("async tasks", |s| s.tasks),
        ("QUIC connections", |s| s.quic),
    ];
    let height = TOP + 4.0 * (PANEL + 30.0) + 20.0;
    let mut out = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height}" font-family="sans-serif" font-size="11"><text x="{LEFT}" y="18" font-size="14">{title}</text>"#
    );
    for (k, (name, value)) in panels.iter().enumerate() {
        let top = TOP + k as f64 * (PANEL + 30.0);
        let max = samples.iter().map(value).fold(1.0, f64::max) * 1.1;
        let y = |v: f64| top + PANEL - PANEL * v / max;
        let _ = write!(
            out,
            r##"<rect x="{LEFT}" y="{top}" width="{}" height="{PANEL}" fill="none" stroke="#999"/><text x="{LEFT}" y="{}">{name}</text><text x="4" y="{}">{max:.0}</text><text x="4" y="{}">0</text>"##,
            W - LEFT - 20.0,
            top - 4.0,
            top + 10.0,
            top + PANEL
        );
        let mut runs: Vec<(usize, u32)> = samples.iter().map(|s| (s.node, s.run)).collect();
        runs.sort_unstable();
        runs.dedup();
        for (node, run) in runs {
            let pts: Vec<String> = samples
                .iter()
                .filter(|s| s.node == node && s.run == run)
                .map(|s| format!("{:.1},{:.1}", x(s.t_s), y(value(s))))
                .collect();
            let colour = COLOURS[node % COLOURS.len()];
            let _ = write!(out, r#"<polyline fill="none" stroke="{colour}" points="{}"/>"#, pts.join(" "));
        }
        if k == 0 {
            fit_line(&mut out, fits, &x, &y);
        }
    }
    let legend_y = height - 6.0;
    let _ = write!(
        out,
        r#"<text x="{LEFT}" y="{legend_y}">one line per node and run (colour by node; node 0, never faulted, in blue); dashed: node 0's RSS fit</text></svg>"#
    );
    out
}

fn fit_line(out: &mut String, fits: &[Growth], x: &dyn Fn(f64) -> f64, y: &dyn Fn(f64) -> f64) {
    let Some(g) = fits.iter().find(|g| g.node == 0) else { return };
    let (x1, slope) = (g.end_s, g.mib_per_hour / 3600.0);
    let x0 = x1 - g.span_s;
    let at = |t: f64| g.fitted_end_mib + slope * (t - x1);
    let _ = write!(
        out,
        r##"<line x1="{:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#000" stroke-dasharray="4 3"/>"##,
        x(x0),
        y(at(x0)),
        x(x1),
        y(at(x1))
    );
}

/// The samples as CSV, one row per node per sample.
pub fn csv(samples: &[Sample]) -> String {
    let mut out = String::from("t_s,node,run,rss_mib,fds,tasks,quic\n");
    for s in samples {
        let _ = writeln!(out, "{:.1},{},{},{:.2},{},{},{}", s.t_s, s.node, s.run, s.rss_mib, s.fds, s.tasks, s.quic);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(node: usize, run: u32, f: impl Fn(f64) -> f64) -> Vec<Sample> {
        (0..60)
            .map(|k| {
                let t = k as f64 * 10.0;
                Sample { t_s: t, node, run, rss_mib: f(t), fds: 20.0, tasks: 40.0, quic: 4.0 }
            })
            .collect()
    }

    #[test]
    fn a_steady_node_fits_flat_and_a_leaking_one_shows_its_rate() {
        let mut all = series(0, 1, |t| 20.0 + if t < 60.0 { t / 10.0 } else { 6.0 });
        all.extend(series(1, 1, |t| 20.0 + t / 360.0)); // 10 MiB per hour
        let g = growth(&all, 60.0, 300.0);
        assert_eq!(g.len(), 2);
        assert!(g[0].mib_per_hour.abs() < 1e-9, "{g:?}");
        assert!((g[1].mib_per_hour - 10.0).abs() < 1e-6, "{g:?}");
    }

    #[test]
    fn short_runs_are_not_judged_and_restarts_start_a_new_series() {
        let mut all = series(2, 1, |_| 20.0);
        all.extend(series(2, 2, |t| 20.0 + t).into_iter().take(5));
        let g = growth(&all, 0.0, 300.0);
        assert_eq!(g.len(), 1, "the five-sample run is too short: {g:?}");
        assert_eq!(g[0].run, 1);
        assert!(fit(&[(1.0, 1.0), (1.0, 2.0), (1.0, 3.0)]).is_none(), "no spread in x");
    }

    #[test]
    fn metrics_are_read_by_exact_name_and_pictured() {
        let text = "# HELP x\nprocess_open_fds_max 9\nprocess_open_fds 17\nprocess_resident_memory_bytes 20971520\n\
                    trellis_runtime_tasks 33\ntrellis_quic_connections 3\n";
        let s = from_metrics(text, 5.0, 1, 1).unwrap();
        assert_eq!((s.fds, s.rss_mib, s.tasks, s.quic), (17.0, 20.0, 33.0, 3.0));
        assert!(from_metrics("trellis_quic_connections 3\n", 0.0, 0, 1).is_none());
        let all = series(0, 1, |t| 20.0 + t / 360.0);
        let picture = svg("soak", &all, &growth(&all, 0.0, 60.0));
        assert_eq!(picture.matches("<polyline").count(), 4);
        assert!(picture.contains("stroke-dasharray") && picture.ends_with("</svg>"));
        assert_eq!(csv(&all).lines().count(), 61);
    }
}
