//! Request metrics per service: counts by status class and a latency histogram (time to
//! the response headers), for the outbound side of the proxy, answers of the proxy's own
//! (429, 403, 503, 504, 502, 400) included, by their reason. Labels stay low-cardinality:
//! a service name is used only when the service is known to policy or the catalog;
//! anything else a client writes in `Host` counts as `_other`, and reasons come from a
//! fixed list.

use std::collections::BTreeMap;
use std::time::Duration;

/// Histogram bucket bounds, in seconds.
pub const BUCKETS: [f64; 12] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];

#[derive(Clone, Debug, Default)]
pub struct ServiceTraffic {
    /// Responses by class: index 1 for 1xx through 5 for 5xx.
    pub classes: [u64; 6],
    /// Cumulative counts per bucket bound.
    pub buckets: [u64; BUCKETS.len()],
    pub count: u64,
    pub sum_seconds: f64,
    /// Answers of the proxy's own (here or at the destination's agent), by status and
    /// reason; they are also in `classes`.
    pub reasons: BTreeMap<(u16, &'static str), u64>,
}

/// Every reason the proxies give in `x-trellis-reason`: anything else (an instance may
/// send the header too) is not a label.
pub const REASONS: [&str; 11] = [
    "rate_limited",
    "denied",
    "no_host",
    "no_instance",
    "circuit_open",
    "timeout",
    "per_try_timeout",
    "unreachable",
    "handshake",
    "upstream",
    "instance_gone",
];

/// The listed reason equal to `r`, as a `'static` label.
pub fn reason(r: &str) -> Option<&'static str> {
    REASONS.iter().copied().find(|x| *x == r)
}

#[derive(Debug, Default)]
pub struct Traffic {
    by_service: BTreeMap<String, ServiceTraffic>,
}

impl Traffic {
    /// One answer; `reason` is set when the proxy answered itself.
    pub fn record(&mut self, service: &str, status: u16, reason: Option<&'static str>, took: Duration) {
        let t = super::keyed::at_sorted(&mut self.by_service, service, Default::default);
        t.classes[usize::from(status / 100).min(5)] += 1;
        if let Some(r) = reason {
            *t.reasons.entry((status, r)).or_default() += 1;
        }
        let secs = took.as_secs_f64();
        for (b, bound) in t.buckets.iter_mut().zip(BUCKETS) {
            if secs <= bound {
                *b += 1;
            }
        }
        t.count += 1;
        t.sum_seconds += secs;
    }

    pub fn services(&self) -> &BTreeMap<String, ServiceTraffic> {
        &self.by_service
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_class_and_fills_cumulative_buckets() {
        let mut t = Traffic::default();
        t.record("web", 200, None, Duration::from_millis(3));
        t.record("web", 503, None, Duration::from_millis(700));
        t.record("web", 429, reason("rate_limited"), Duration::from_secs(10));
        let w = &t.services()["web"];
        assert_eq!((w.classes[2], w.classes[4], w.classes[5], w.count), (1, 1, 1, 3));
        assert_eq!(w.reasons[&(429, "rate_limited")], 1);
        assert_eq!(reason("made-up"), None, "reasons are a closed list");
        assert_eq!(w.buckets[0], 0, "3 ms is over the 1 ms bound");
        assert_eq!(w.buckets[2], 1, "3 ms is within 5 ms");
        assert_eq!(w.buckets[BUCKETS.len() - 1], 2, "10 s is past every bound");
    }
}
