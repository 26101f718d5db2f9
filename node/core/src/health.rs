//! Health verdicts: probe results turned into passing or critical with rise/fall
//! hysteresis, so one lost probe does not flap an instance. The probes themselves run in
//! the agent's shell (`trellis_node::mesh::health`).

use crate::policy::model::Health;

/// Hysteresis over probe results.
#[derive(Clone, Debug)]
pub struct Checker {
    rise: u32,
    fall: u32,
    oks: u32,
    fails: u32,
    state: Health,
}

impl Checker {
    pub fn new(rise: u32, fall: u32, state: Health) -> Checker {
        Checker { rise: rise.max(1), fall: fall.max(1), oks: 0, fails: 0, state }
    }

    /// One probe result; returns the new verdict when it changes.
    pub fn record(&mut self, ok: bool) -> Option<Health> {
        if ok {
            self.oks += 1;
            self.fails = 0;
        } else {
            self.fails += 1;
            self.oks = 0;
        }
        let next = match self.state {
            Health::Passing if self.fails >= self.fall => Health::Critical,
            Health::Critical if self.oks >= self.rise => Health::Passing,
            Health::Unknown if self.oks >= self.rise => Health::Passing,
            Health::Unknown if self.fails >= self.fall => Health::Critical,
            s => s,
        };
        (next != self.state).then(|| {
            self.state = next;
            next
        })
    }

    /// One probe result against the health the store holds: the verdict to write when it
    /// differs. Unlike [`Checker::record`] this also answers when the store lost a verdict
    /// that did not change here (a re-registration wrote the default `unknown`, a write
    /// failed), which would otherwise keep a dead instance served until its next flip.
    pub fn observe(&mut self, ok: bool, stored: Health) -> Option<Health> {
        self.record(ok);
        (self.state != Health::Unknown && self.state != stored).then_some(self.state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fall_failures_in_a_row_make_it_critical_and_rise_passes_bring_it_back() {
        let mut c = Checker::new(2, 3, Health::Passing);
        assert_eq!(c.record(false), None);
        assert_eq!(c.record(true), None, "a pass resets the failure run");
        assert_eq!(c.record(false), None);
        assert_eq!(c.record(false), None);
        assert_eq!(c.record(false), Some(Health::Critical));
        assert_eq!(c.record(true), None);
        assert_eq!(c.record(true), Some(Health::Passing));
    }

    #[test]
    fn an_unchecked_instance_settles_either_way() {
        let mut c = Checker::new(1, 2, Health::Unknown);
        assert_eq!(c.record(true), Some(Health::Passing));
        let mut c = Checker::new(1, 2, Health::Unknown);
        assert_eq!(c.record(false), None);
        assert_eq!(c.record(false), Some(Health::Critical));
    }

    #[test]
    fn a_verdict_the_store_lost_is_written_again() {
        let mut c = Checker::new(1, 1, Health::Unknown);
        assert_eq!(c.observe(false, Health::Unknown), Some(Health::Critical));
        assert_eq!(c.observe(false, Health::Critical), None, "stored: nothing more to write");
        // Registered again with the same check: the store says unknown again.
        assert_eq!(c.observe(false, Health::Unknown), Some(Health::Critical));
        assert_eq!(c.observe(true, Health::Critical), Some(Health::Passing));
        let mut c = Checker::new(2, 2, Health::Unknown);
        assert_eq!(c.observe(false, Health::Unknown), None, "no verdict yet: nothing to write");
        assert_eq!(c.observe(false, Health::Unknown), Some(Health::Critical));
    }
}
