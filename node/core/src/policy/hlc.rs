//! A hybrid logical clock: wall-clock milliseconds in the high 48 bits, a counter in the
//! low 16. Versions follow real time when clocks agree and stay causal when they do not.

#[derive(Debug, Default, Clone, Copy)]
pub struct Hlc {
    last: u64,
}

impl Hlc {
    /// A new timestamp, later than every one issued or observed.
    pub fn tick(&mut self, now_ms: u64) -> u64 {
        self.last = (now_ms << 16).max(self.last + 1);
        self.last
    }

    /// Takes a timestamp seen from a peer into account.
    pub fn observe(&mut self, remote: u64) {
        self.last = self.last.max(remote);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_monotonic_and_pass_observed_times() {
        let mut c = Hlc::default();
        let a = c.tick(1000);
        let b = c.tick(1000);
        assert!(b > a);
        c.observe(5000 << 16);
        assert!(c.tick(1000) > 5000 << 16);
        assert_eq!(c.tick(9000) >> 16, 9000);
    }
}
