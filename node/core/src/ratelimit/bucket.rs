//! A token bucket whose rate and size change at run time, as the node's share of a
//! cluster-wide limit moves. Time is an argument, so tests and the simulator drive it.

use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct TokenBucket {
    rate: f64,
    capacity: f64,
    tokens: f64,
    last: Instant,
}

/// The answer for one request, with what the response headers need.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Verdict {
    pub admitted: bool,
    /// Whole tokens left after this decision.
    pub remaining: u64,
    /// When a refused caller may expect a token.
    pub retry_after: Duration,
}

impl TokenBucket {
    /// A bucket holding `initial` tokens, and at least one: a limit that was idle may take
    /// that much at once, and a new caller's first request always passes.
    pub fn new(now: Instant, rate: f64, capacity: f64, initial: f64) -> TokenBucket {
        let capacity = capacity.max(1.0);
        TokenBucket { rate: rate.max(0.0), capacity, tokens: initial.clamp(1.0, capacity), last: now }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * self.rate).min(self.capacity);
        self.last = self.last.max(now);
    }

    /// A new share. Tokens already held are kept up to the new size, never granted anew, so
    /// a growing share cannot release a burst the cluster did not allow.
    pub fn reshape(&mut self, now: Instant, rate: f64, capacity: f64) {
        self.refill(now);
        self.rate = rate.max(0.0);
        self.capacity = capacity.max(1.0);
        self.tokens = self.tokens.min(self.capacity);
    }

    pub fn rate(&self) -> f64 {
        self.rate
    }

    pub fn capacity(&self) -> f64 {
        self.capacity
    }

    /// Would a request pass now? Takes nothing.
    pub fn check(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= 1.0
    }

    /// How long until a token is there (zero when one is); None when none ever comes.
    pub fn wait(&mut self, now: Instant) -> Option<Duration> {
        self.refill(now);
        if self.tokens >= 1.0 {
            return Some(Duration::ZERO);
        }
        (self.rate > 0.0).then(|| Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
    }

    /// Takes the next token, now or in the future: the bucket may go below zero, so each
    /// later reservation waits behind this one and the admitted rate stays the rate.
    pub fn reserve(&mut self, now: Instant) {
        self.refill(now);
        self.tokens -= 1.0;
    }

    /// Takes one token if there is one.
    pub fn take(&mut self, now: Instant) -> Verdict {
        self.refill(now);
        let admitted = self.tokens >= 1.0;
        if admitted {
            self.tokens -= 1.0;
        }
        let missing = (1.0 - self.tokens).max(0.0);
        let retry_after = if admitted || missing == 0.0 {
            Duration::ZERO
        } else if self.rate > 0.0 {
            Duration::from_secs_f64((missing / self.rate).min(60.0))
        } else {
            Duration::from_secs(1)
        };
        Verdict { admitted, remaining: self.tokens.max(0.0) as u64, retry_after }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_the_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(t0, 10.0, 5.0, 5.0);
        let burst = (0..20).filter(|_| b.take(t0).admitted).count();
        assert_eq!(burst, 5);
        // One second later: ten more, not more.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!((0..20).filter(|_| b.take(t1).admitted).count(), 5);
        let t2 = t1 + Duration::from_millis(500);
        assert_eq!((0..20).filter(|_| b.take(t2).admitted).count(), 5);
    }

    #[test]
    fn reservations_queue_behind_each_other_at_the_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(t0, 10.0, 2.0, 2.0);
        let mut waits = Vec::new();
        for _ in 0..6 {
            waits.push(b.wait(t0).unwrap());
            b.reserve(t0);
        }
        let ms: Vec<u128> = waits.iter().map(|w| w.as_millis()).collect();
        assert_eq!(ms, [0, 0, 100, 200, 300, 400], "the burst at once, then one per 100 ms");
        // Half a second later the debt is paid down by five tokens.
        assert_eq!(b.wait(t0 + Duration::from_millis(500)).unwrap().as_millis(), 0);
        let mut zero = TokenBucket::new(t0, 0.0, 1.0, 1.0);
        zero.reserve(t0);
        assert_eq!(zero.wait(t0), None, "no rate, no token ever");
    }

    #[test]
    fn refusal_says_when_a_token_comes() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(t0, 4.0, 1.0, 1.0);
        assert!(b.take(t0).admitted);
        let v = b.take(t0);
        assert!(!v.admitted);
        assert_eq!(v.retry_after, Duration::from_millis(250));
    }

    #[test]
    fn a_growing_share_grants_no_tokens_at_once() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(t0, 1.0, 1.0, 1.0);
        assert!(b.take(t0).admitted);
        b.reshape(t0, 1000.0, 100.0);
        assert!(!b.take(t0).admitted, "a bigger bucket starts from what was held");
        assert!(b.take(t0 + Duration::from_millis(2)).admitted);
    }

    #[test]
    fn a_zero_rate_refuses_after_the_burst_and_clock_steps_back_are_harmless() {
        let t0 = Instant::now() + Duration::from_secs(10);
        let mut b = TokenBucket::new(t0, 0.0, 1.0, 1.0);
        assert!(b.take(t0).admitted);
        assert!(!b.take(t0 + Duration::from_secs(100)).admitted);
        assert!(!b.take(t0 - Duration::from_secs(5)).admitted);
    }
}
