//! Retries that cannot become a retry storm: a budget (retries at most a share of recent
//! requests, plus a small floor so a quiet service can still retry), and jittered
//! exponential backoff between attempts (full jitter, so retries of many clients spread).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// The window over which requests and retries are counted.
const WINDOW: Duration = Duration::from_secs(10);

#[derive(Debug, Default)]
pub struct RetryBudget {
    requests: VecDeque<Instant>,
    retries: VecDeque<Instant>,
}

impl RetryBudget {
    fn trim(&mut self, now: Instant) {
        for q in [&mut self.requests, &mut self.retries] {
            while q.front().is_some_and(|t| now.saturating_duration_since(*t) > WINDOW) {
                q.pop_front();
            }
        }
    }

    /// A first attempt went out.
    pub fn request(&mut self, now: Instant) {
        self.trim(now);
        self.requests.push_back(now);
    }

    /// May one more retry go out? Takes it from the budget when it may.
    pub fn try_retry(&mut self, now: Instant, percent: f64, min_per_second: u32) -> bool {
        self.trim(now);
        let allowed = self.requests.len() as f64 * percent / 100.0 + f64::from(min_per_second) * WINDOW.as_secs_f64();
        if (self.retries.len() as f64) < allowed {
            self.retries.push_back(now);
            true
        } else {
            false
        }
    }
}

/// The wait before retry number `attempt` (1 for the first retry): uniform in
/// [0, min(max, base * 2^(attempt-1))]. `unit` is a random number in [0, 1).
pub fn backoff(attempt: u32, base: Duration, max: Duration, unit: f64) -> Duration {
    let ceiling = base.saturating_mul(1u32 << attempt.saturating_sub(1).min(16)).min(max);
    ceiling.mul_f64(unit.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_allows_its_share_of_requests_plus_the_floor() {
        let t0 = Instant::now();
        let mut b = RetryBudget::default();
        for _ in 0..1000 {
            b.request(t0);
        }
        // 20% of 1000 plus 1/s over the 10 s window.
        let allowed = (0..1000).filter(|_| b.try_retry(t0, 20.0, 1)).count();
        assert_eq!(allowed, 210);
        // The window slides: old requests and retries stop counting.
        let later = t0 + WINDOW + Duration::from_secs(1);
        assert!(b.try_retry(later, 20.0, 1), "the floor lets a quiet service retry");
    }

    #[test]
    fn a_zero_budget_allows_no_retry() {
        let t0 = Instant::now();
        let mut b = RetryBudget::default();
        b.request(t0);
        assert!(!b.try_retry(t0, 0.0, 0));
    }

    #[test]
    fn backoff_grows_exponentially_up_to_the_max_and_jitters_below_it() {
        let (base, max) = (Duration::from_millis(25), Duration::from_millis(250));
        assert_eq!(backoff(1, base, max, 0.999_999).as_millis(), 24);
        assert_eq!(backoff(3, base, max, 0.999_999).as_millis(), 99);
        assert_eq!(backoff(10, base, max, 0.999_999).as_millis(), 249);
        assert_eq!(backoff(3, base, max, 0.0), Duration::ZERO);
        assert_eq!(backoff(3, base, max, 0.5), Duration::from_millis(50));
    }
}
