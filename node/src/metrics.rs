//! Prometheus text exposition.
//!
//! The counters live as plain integers inside the sans-IO cores and as atomics in the
//! transport; this module only renders a snapshot, so no metrics registry is needed.

use std::fmt::Write;

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

    pub fn finish(self) -> String {
        self.out
    }
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
