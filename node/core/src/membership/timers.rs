//! foca asks for timers by duration; the core keeps them as deadlines so the caller (a
//! tokio task or the simulator's virtual clock) only has to ask "when next?" and "now".

use std::collections::BTreeMap;
use std::time::Instant;

use foca::Timer;
use trellis_proto::NodeIdentity;

/// A deadline the core keeps: foca's own timers, and the suspicions the core runs itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CoreTimer {
    Swim(Timer<NodeIdentity>),
    /// Time to look at a suspicion of `member` this node heard of and times itself.
    SuspectToDown {
        member: NodeIdentity,
        incarnation: u16,
    },
}

#[derive(Default, Debug)]
pub struct TimerQueue {
    queue: BTreeMap<(Instant, u64), CoreTimer>,
    seq: u64,
}

impl TimerQueue {
    pub fn schedule(&mut self, at: Instant, timer: CoreTimer) {
        self.seq += 1;
        self.queue.insert((at, self.seq), timer);
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.queue.keys().next().map(|(at, _)| *at)
    }

    /// Removes and returns the earliest timer due at or before `now`.
    pub fn pop_due(&mut self, now: Instant) -> Option<CoreTimer> {
        let (&(at, _), _) = self.queue.first_key_value()?;
        if at > now {
            return None;
        }
        self.queue.pop_first().map(|(_, t)| t)
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}
