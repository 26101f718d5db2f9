//! Prometheus text exposition.
//!
//! The counters live as plain integers inside the sans-IO cores and as atomics in the
//! transport; this module only renders a snapshot, so no metrics registry is needed.

use std::fmt::Write;

/// Labels, cumulative bucket counts, sum and count of one histogram series.
pub type HistogramRow<'a> = (Vec<(&'a str, String)>, Vec<u64>, f64, u64);

/// Builds one exposition document.
#[derive(Default)]
pub struct Exposition {
    out: String,
}

impl Exposition {
    fn header(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    pub fn counter(&mut self, name: &str, help: &str, value: u64) {
        self.header(name, "counter", help);
        let _ = writeln!(self.out, "{name} {value}");
    }

    /// A counter of a quantity that is not a whole number (seconds).
    pub fn counter_f64(&mut self, name: &str, help: &str, value: f64) {
        self.header(name, "counter", help);
        let _ = writeln!(self.out, "{name} {value}");
    }

    pub fn gauge(&mut self, name: &str, help: &str, value: f64) {
        self.header(name, "gauge", help);
        let _ = writeln!(self.out, "{name} {value}");
    }

    /// One metric with a single label over several values.
    pub fn labelled(&mut self, kind: &str, name: &str, help: &str, label: &str, values: &[(&str, u64)]) {
        self.header(name, kind, help);
        for (v, n) in values {
            let _ = writeln!(self.out, "{name}{{{label}=\"{}\"}} {n}", escape(v));
        }
    }

    /// One metric over rows that each carry several labels.
    pub fn series(&mut self, kind: &str, name: &str, help: &str, rows: &[(Vec<(&str, String)>, f64)]) {
        self.header(name, kind, help);
        for (labels, v) in rows {
            let l: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{}\"", escape(v))).collect();
            let _ = writeln!(self.out, "{name}{{{}}} {v}", l.join(","));
        }
    }

    /// A Prometheus histogram per row of labels: cumulative buckets, sum and count.
    pub fn histogram(&mut self, name: &str, help: &str, bounds: &[f64], rows: &[HistogramRow<'_>]) {
        self.header(name, "histogram", help);
        for (labels, buckets, sum, count) in rows {
            let l: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{}\"", escape(v))).collect();
            let l = l.join(",");
            for (bound, n) in bounds.iter().zip(buckets) {
                let _ = writeln!(self.out, "{name}_bucket{{{l},le=\"{bound}\"}} {n}");
            }
            let _ = writeln!(self.out, "{name}_bucket{{{l},le=\"+Inf\"}} {count}");
            let _ = writeln!(self.out, "{name}_sum{{{l}}} {sum}");
            let _ = writeln!(self.out, "{name}_count{{{l}}} {count}");
        }
    }

    pub fn finish(self) -> String {
        self.out
    }
}

/// What peers and clients were refused, by reason: the transport's refusals, forged leave
/// notices from the membership core, invalid policy from peers, and the client listeners'.
pub fn refusals(
    e: &mut Exposition,
    transport: &crate::transport::TransportStats,
    membership: &trellis_core::membership::Stats,
    policy_refused: u64,
    clients: &crate::listen::ClientGates,
) {
    use crate::listen::ClientRefusal;
    use crate::transport::PeerRefusal;
    let mut peer: Vec<(&str, u64)> =
        PeerRefusal::ALL.iter().map(|r| (r.as_str(), transport.peer_refused(*r))).collect();
    peer.push(("leave_not_from_leaver", membership.leaves_refused));
    peer.push(("address_taken", membership.address_conflicts));
    peer.push(("invalid_policy", policy_refused));
    e.labelled(
        "counter",
        "trellis_peer_refused_total",
        "Input from certified peers refused, by reason.",
        "reason",
        &peer,
    );
    let gates = clients.labelled();
    let mut rows = Vec::new();
    for (listener, gate) in &gates {
        for r in ClientRefusal::ALL {
            let labels = vec![("listener", listener.clone()), ("reason", r.as_str().to_string())];
            rows.push((labels, gate.stats.refused(r) as f64));
        }
    }
    e.series(
        "counter",
        "trellis_client_refused_total",
        "Client connections refused or cut, by listener and reason.",
        &rows,
    );
    let open: Vec<_> = gates.iter().map(|(l, g)| (vec![("listener", l.clone())], g.open() as f64)).collect();
    e.series("gauge", "trellis_client_connections", "Open client connections by listener.", &open);
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let mut e = Exposition::default();
        e.counter("a_total", "A.", 3);
        e.labelled("gauge", "m", "M.", "state", &[("alive", 2), ("q\"", 1)]);
        let s = e.finish();
        assert!(s.contains("# TYPE a_total counter\na_total 3\n"));
        assert!(s.contains("m{state=\"alive\"} 2\n"));
        assert!(s.contains("m{state=\"q\\\"\"} 1\n"));
    }
}
