//! When an agent renews its certificate and when it warns: plain logic over the
//! certificate's validity and the time, tested without a clock or a socket.
//!
//! A certificate is renewed once `fraction` (2/3 by default) of its lifetime has passed,
//! then retried with backoff until it works. Warnings fire once per threshold (30 days,
//! 7 days, expired) for each certificate, so a failing renewal does not flood the log.

use std::time::Duration;

/// Every Trellis certificate is backdated by this much; the lifetime counts from issue.
const BACKDATE_MS: i64 = super::CLOCK_SKEW.as_millis() as i64;
const DAY_MS: i64 = 86_400_000;
/// Longest sleep between checks, so a jump of the wall clock is noticed.
const MAX_WAKE_MS: i64 = 3_600_000;
const MIN_WAKE_MS: i64 = 100;

/// A warning, by how close the expiry is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Warning {
    ThirtyDays,
    SevenDays,
    Expired,
}

impl Warning {
    fn reached(remaining_ms: i64) -> Option<Warning> {
        match remaining_ms {
            r if r <= 0 => Some(Warning::Expired),
            r if r <= 7 * DAY_MS => Some(Warning::SevenDays),
            r if r <= 30 * DAY_MS => Some(Warning::ThirtyDays),
            _ => None,
        }
    }
}

/// What to do now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Step {
    pub renew: bool,
    pub warn: Option<Warning>,
    /// Call `poll` again after this long at the latest.
    pub wake_in: Duration,
}

/// The renewal state of the certificate in use. Times are Unix milliseconds.
#[derive(Clone, Debug)]
pub struct RenewSchedule {
    fraction: f64,
    issued: i64,
    not_after: i64,
    warned: Option<Warning>,
    failures: u32,
    retry_at: Option<i64>,
}

impl RenewSchedule {
    /// `fraction` of the lifetime after issue, the certificate is renewed (clamped to 0.1..0.95).
    pub fn new(fraction: f64, not_before: i64, not_after: i64) -> RenewSchedule {
        let fraction = if fraction.is_finite() { fraction.clamp(0.1, 0.95) } else { 2.0 / 3.0 };
        let issued = (not_before + BACKDATE_MS).min(not_after);
        RenewSchedule { fraction, issued, not_after, warned: None, failures: 0, retry_at: None }
    }

    pub fn renew_at(&self) -> i64 {
        self.issued + ((self.not_after - self.issued) as f64 * self.fraction) as i64
    }

    pub fn not_after(&self) -> i64 {
        self.not_after
    }

    pub fn failures(&self) -> u32 {
        self.failures
    }

    pub fn poll(&mut self, now: i64) -> Step {
        let remaining = self.not_after - now;
        let warn = Warning::reached(remaining).filter(|w| self.warned.is_none_or(|old| *w > old));
        if warn.is_some() {
            self.warned = warn;
        }
        let due = self.retry_at.unwrap_or_else(|| self.renew_at());
        let renew = now >= due;
        let mut next = if renew { now + self.backoff() } else { due };
        // Wake at the next warning threshold too.
        for t in [30 * DAY_MS, 7 * DAY_MS, 0] {
            let at = self.not_after - t;
            if at > now {
                next = next.min(at);
            }
        }
        let wake = (next - now).clamp(MIN_WAKE_MS, MAX_WAKE_MS);
        Step { renew, warn, wake_in: Duration::from_millis(wake as u64) }
    }

    /// A new certificate is in use: start over.
    pub fn renewed(&mut self, not_before: i64, not_after: i64) {
        *self = RenewSchedule::new(self.fraction, not_before, not_after);
    }

    /// The renewal attempt at `now` failed; the next one waits longer.
    pub fn failed(&mut self, now: i64) {
        self.failures += 1;
        self.retry_at = Some(now + self.backoff());
    }

    /// A fiftieth of the lifetime (1 s to 1 min), doubling per failure up to a tenth of it.
    fn backoff(&self) -> i64 {
        let lifetime = (self.not_after - self.issued).max(0);
        let base = (lifetime / 50).clamp(1_000, 60_000);
        let cap = (lifetime / 10).clamp(base, MAX_WAKE_MS);
        base.saturating_mul(1 << self.failures.saturating_sub(1).min(20)).min(cap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = 1000;

    /// A 90-day certificate issued at t=0 (backdated as Trellis does).
    fn ninety_days() -> RenewSchedule {
        RenewSchedule::new(2.0 / 3.0, -BACKDATE_MS, 90 * DAY_MS)
    }

    #[test]
    fn renews_at_two_thirds_of_the_lifetime_counted_from_issue() {
        let mut s = ninety_days();
        assert_eq!(s.renew_at(), 60 * DAY_MS);
        let step = s.poll(10 * DAY_MS);
        assert!(!step.renew);
        assert_eq!(step.wake_in, Duration::from_millis(MAX_WAKE_MS as u64), "sleeps at most an hour");
        assert!(!s.poll(60 * DAY_MS - 1).renew);
        assert!(s.poll(60 * DAY_MS).renew);
    }

    #[test]
    fn a_short_certificate_renews_after_its_fraction_and_wakes_exactly_then() {
        // 15 s certificate, renew at 2/3: 10 s after issue.
        let mut s = RenewSchedule::new(2.0 / 3.0, -BACKDATE_MS, 15 * S);
        let step = s.poll(2 * S);
        assert!(!step.renew);
        assert_eq!(step.wake_in, Duration::from_secs(8));
        assert!(s.poll(10 * S).renew);
    }

    #[test]
    fn warnings_fire_once_per_threshold_not_every_tick() {
        let mut s = ninety_days();
        // Renewal keeps failing.
        let mut warnings = vec![];
        let mut t = 0;
        while t <= 91 * DAY_MS {
            let step = s.poll(t);
            if let Some(w) = step.warn {
                warnings.push((w, t / DAY_MS));
            }
            if step.renew {
                s.failed(t);
            }
            t += 3_600_000;
        }
        assert_eq!(
            warnings,
            vec![(Warning::ThirtyDays, 60), (Warning::SevenDays, 83), (Warning::Expired, 90)],
            "each threshold once"
        );
    }

    #[test]
    fn a_certificate_found_with_five_days_left_warns_seven_days_once() {
        let mut s = ninety_days();
        assert_eq!(s.poll(85 * DAY_MS).warn, Some(Warning::SevenDays));
        assert_eq!(s.poll(85 * DAY_MS + 1).warn, None);
    }

    #[test]
    fn failures_back_off_and_a_renewal_starts_over() {
        let mut s = ninety_days();
        let t = 60 * DAY_MS;
        assert!(s.poll(t).renew);
        s.failed(t);
        assert!(!s.poll(t + 59 * S).renew, "the first retry waits a fiftieth of the lifetime, at most a minute");
        assert!(s.poll(t + 60 * S).renew);
        s.failed(t + 60 * S);
        assert!(!s.poll(t + 60 * S + 119 * S).renew, "then twice that");
        assert!(s.poll(t + 180 * S).renew);
        for i in 0..30 {
            s.failed(t + i * 3_600_000);
        }
        let step = s.poll(t + 30 * 3_600_000);
        assert!(step.wake_in <= Duration::from_secs(3600), "backoff is capped");
        s.renewed(t - BACKDATE_MS, t + 90 * DAY_MS);
        assert_eq!(s.failures(), 0);
        assert!(!s.poll(t + DAY_MS).renew);
        assert_eq!(s.renew_at(), t + 60 * DAY_MS);
        // Warnings are armed again for the new certificate.
        assert_eq!(s.poll(t + 61 * DAY_MS).warn, Some(Warning::ThirtyDays));
    }

    #[test]
    fn odd_fractions_are_clamped() {
        assert_eq!(RenewSchedule::new(7.0, -BACKDATE_MS, 100 * S).renew_at(), 95 * S);
        assert_eq!(RenewSchedule::new(f64::NAN, -BACKDATE_MS, 90 * S).renew_at(), 60 * S);
    }
}
