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
}
