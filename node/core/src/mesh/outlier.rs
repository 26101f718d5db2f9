//! Passive outlier detection: an instance that fails several times in a row is ejected for
//! a while, longer each time it happens again, but never more than the configured share of
//! a service's instances at once (so a bad deploy cannot eject everything). Sans-IO.
//!
//! Two runs are counted, as Envoy does: gateway failures (no connection, a reset, no
//! answer, or 502/503/504) and any 5xx (gateway failures included). Any other answer,
//! 4xx included, ends both runs: the instance worked, the request was wrong.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::policy::model::OutlierDetection;

/// What one attempt on an instance came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// An answer that is not a 5xx.
    Answered,
    /// A 5xx other than 502, 503, 504.
    ServerError,
    /// 502, 503, 504, or no answer at all (refused, reset, timed out).
    GatewayFailure,
}

impl Outcome {
    pub fn of_status(status: u16) -> Outcome {
        match status {
            502..=504 => Outcome::GatewayFailure,
            500..=599 => Outcome::ServerError,
            _ => Outcome::Answered,
        }
    }
}

#[derive(Debug, Default, Clone)]
struct Endpoint {
    consecutive_failures: u32,
    consecutive_5xx: u32,
    ejections: u32,
    ejected_until: Option<Instant>,
}

#[derive(Debug, Default)]
pub struct OutlierDetector {
    endpoints: HashMap<String, Endpoint>,
}

impl OutlierDetector {
    /// Records the outcome of one attempt on `instance`; returns true if it got ejected.
    pub fn record(&mut self, now: Instant, instance: &str, outcome: Outcome, cfg: &OutlierDetection) -> bool {
        let e = super::keyed::at(&mut self.endpoints, instance, Default::default);
        match outcome {
            Outcome::Answered => {
                e.consecutive_failures = 0;
                e.consecutive_5xx = 0;
                return false;
            }
            Outcome::ServerError => {
                e.consecutive_failures = 0;
                e.consecutive_5xx += 1;
            }
            Outcome::GatewayFailure => {
                e.consecutive_failures += 1;
                e.consecutive_5xx += 1;
            }
        }
        let reached = |run: u32, limit: u32| limit > 0 && run >= limit;
        if !reached(e.consecutive_failures, cfg.consecutive_failures)
            && !reached(e.consecutive_5xx, cfg.consecutive_5xx)
        {
            return false;
        }
        e.consecutive_failures = 0;
        e.consecutive_5xx = 0;
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
    pub fn admit(&self, now: Instant, candidates: &[impl AsRef<str>], max_ejected_percent: u32) -> Vec<usize> {
        let max_out = candidates.len() * max_ejected_percent.min(100) as usize / 100;
        let name = |i: usize| candidates[i].as_ref();
        let mut out: Vec<usize> = (0..candidates.len()).filter(|&i| self.ejected(now, name(i))).collect();
        out.sort_by_key(|&i| std::cmp::Reverse(self.endpoints[name(i)].ejected_until));
        out.truncate(max_out);
        (0..candidates.len()).filter(|i| !out.contains(i)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAIL: Outcome = Outcome::GatewayFailure;
    const OK: Outcome = Outcome::Answered;

    fn cfg() -> OutlierDetection {
        OutlierDetection {
            consecutive_failures: 3,
            consecutive_5xx: 0,
            base_ejection_time: Duration::from_secs(10),
            ejection_growth: 2.0,
            max_ejected_percent: 50,
        }
    }

    #[test]
    fn consecutive_failures_eject_for_a_time_that_grows_with_repeats() {
        let (mut d, t0) = (OutlierDetector::default(), Instant::now());
        let names = vec!["a".to_string(), "b".to_string()];
        assert!(!d.record(t0, "a", FAIL, &cfg()));
        assert!(!d.record(t0, "a", OK, &cfg()), "a success resets the count");
        for _ in 0..2 {
            d.record(t0, "a", FAIL, &cfg());
        }
        assert!(d.record(t0, "a", FAIL, &cfg()));
        assert_eq!(d.admit(t0 + Duration::from_secs(9), &names, 50), vec![1]);
        assert_eq!(d.admit(t0 + Duration::from_secs(10), &names, 50), vec![0, 1]);
        let t1 = t0 + Duration::from_secs(11);
        for _ in 0..3 {
            d.record(t1, "a", FAIL, &cfg());
        }
        assert_eq!(d.admit(t1 + Duration::from_secs(19), &names, 50), vec![1], "second ejection lasts 20 s");
        assert_eq!(d.admit(t1 + Duration::from_secs(20), &names, 50), vec![0, 1]);
    }

    #[test]
    fn five_500s_in_a_row_eject_and_a_4xx_breaks_the_run() {
        let (mut d, t0) = (OutlierDetector::default(), Instant::now());
        let cfg = OutlierDetection { consecutive_failures: 5, consecutive_5xx: 5, ..cfg() };
        for _ in 0..4 {
            assert!(!d.record(t0, "a", Outcome::of_status(500), &cfg));
        }
        assert!(!d.record(t0, "a", Outcome::of_status(404), &cfg), "the instance answered");
        for _ in 0..4 {
            assert!(!d.record(t0, "a", Outcome::of_status(500), &cfg));
        }
        assert!(d.record(t0, "a", Outcome::of_status(503), &cfg), "a gateway failure is a 5xx too");
        // 500s do not add to the gateway run: with consecutive_5xx off they never eject.
        let gw_only = OutlierDetection { consecutive_5xx: 0, ..cfg };
        for _ in 0..20 {
            assert!(!d.record(t0, "b", Outcome::of_status(500), &gw_only));
        }
        let ejected = (0..5).map(|_| d.record(t0, "b", Outcome::of_status(502), &gw_only)).filter(|e| *e).count();
        assert_eq!(ejected, 1);
    }

    #[test]
    fn never_ejects_more_than_the_allowed_share() {
        let (mut d, t0) = (OutlierDetector::default(), Instant::now());
        let names: Vec<String> = ["a", "b", "c", "d"].iter().map(|s| s.to_string()).collect();
        for n in &names {
            for _ in 0..3 {
                d.record(t0, n, FAIL, &cfg());
            }
        }
        assert_eq!(d.admit(t0, &names, 50).len(), 2);
        assert_eq!(d.admit(t0, &names, 0).len(), 4);
    }
}
