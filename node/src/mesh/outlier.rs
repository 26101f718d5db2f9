//! Passive outlier detection: an instance that fails several times in a row is ejected for
//! a while, longer each time it happens again, but never more than the configured share of
//! a service's instances at once (so a bad deploy cannot eject everything). Sans-IO.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::policy::model::OutlierDetection;

#[derive(Debug, Default, Clone)]
struct Endpoint {
    consecutive_failures: u32,
    ejections: u32,
    ejected_until: Option<Instant>,
}

#[derive(Debug, Default)]
pub struct OutlierDetector {
    endpoints: HashMap<String, Endpoint>,
}

impl OutlierDetector {
    /// Records the outcome of one attempt on `instance`; returns true if it got ejected.
    pub fn record(&mut self, now: Instant, instance: &str, ok: bool, cfg: &OutlierDetection) -> bool {
        let e = self.endpoints.entry(instance.to_string()).or_default();
        if ok {
            e.consecutive_failures = 0;
            return false;
        }
        e.consecutive_failures += 1;
        if e.consecutive_failures < cfg.consecutive_failures.max(1) {
            return false;
        }
        e.consecutive_failures = 0;
        e.ejections += 1;
        let growth = cfg.ejection_growth.max(1.0).powi(e.ejections.saturating_sub(1).min(16) as i32);
        let time = cfg.base_ejection_time.mul_f64(growth).min(Duration::from_secs(3600));
        e.ejected_until = Some(now + time);
        true
    }

    fn ejected(&self, now: Instant, instance: &str) -> bool {
        self.endpoints.get(instance).and_then(|e| e.ejected_until).is_some_and(|t| t > now)
    }

    /// Indices of the candidates to balance over: the ejected ones are left out, but at most
    /// `max_ejected_percent` of them (the longest-ejected stay out first).
    pub fn admit(&self, now: Instant, candidates: &[String], max_ejected_percent: u32) -> Vec<usize> {
        let max_out = candidates.len() * max_ejected_percent.min(100) as usize / 100;
        let mut out: Vec<usize> = (0..candidates.len()).filter(|&i| self.ejected(now, &candidates[i])).collect();
        out.sort_by_key(|&i| std::cmp::Reverse(self.endpoints[&candidates[i]].ejected_until));
        out.truncate(max_out);
        (0..candidates.len()).filter(|i| !out.contains(i)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> OutlierDetection {
        OutlierDetection {
            consecutive_failures: 3,
            base_ejection_time: Duration::from_secs(10),
            ejection_growth: 2.0,
            max_ejected_percent: 50,
        }
    }

    #[test]
    fn consecutive_failures_eject_for_a_time_that_grows_with_repeats() {
        let (mut d, t0) = (OutlierDetector::default(), Instant::now());
        let names = vec!["a".to_string(), "b".to_string()];
        assert!(!d.record(t0, "a", false, &cfg()));
        assert!(!d.record(t0, "a", true, &cfg()), "a success resets the count");
        for _ in 0..2 {
            d.record(t0, "a", false, &cfg());
        }
        assert!(d.record(t0, "a", false, &cfg()));
        assert_eq!(d.admit(t0 + Duration::from_secs(9), &names, 50), vec![1]);
        assert_eq!(d.admit(t0 + Duration::from_secs(10), &names, 50), vec![0, 1]);
        let t1 = t0 + Duration::from_secs(11);
        for _ in 0..3 {
            d.record(t1, "a", false, &cfg());
        }
        assert_eq!(d.admit(t1 + Duration::from_secs(19), &names, 50), vec![1], "second ejection lasts 20 s");
        assert_eq!(d.admit(t1 + Duration::from_secs(20), &names, 50), vec![0, 1]);
    }

    #[test]
    fn never_ejects_more_than_the_allowed_share() {
        let (mut d, t0) = (OutlierDetector::default(), Instant::now());
        let names: Vec<String> = ["a", "b", "c", "d"].iter().map(|s| s.to_string()).collect();
        for n in &names {
            for _ in 0..3 {
                d.record(t0, n, false, &cfg());
            }
        }
        assert_eq!(d.admit(t0, &names, 50).len(), 2);
        assert_eq!(d.admit(t0, &names, 0).len(), 4);
    }
}
