//! Which share of a limit this side of the cluster may use, from the membership it sees.
//!
//! A crash and a partition look the same from inside. The rule: every node counts the
//! members of the last stable membership it knew; a side admits `seen / stable` of the
//! limit. Members that are down for longer than a grace period leave the stable set only if
//! the side still sees a strict majority of it, so after a crash the survivors take the
//! whole limit back, while in a partition only the majority side does and each minority side
//! keeps its proportional share. Graceful leaves shrink the stable set at once.
//!
//! Bound (documented in `mod.rs`): during the first `down_grace` after a split the sides sum
//! to the limit; afterwards a two-way split admits at most `limit * (1 + minority/stable)`,
//! under 1.5 times the limit, and a split with no majority side stays at the limit.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use crate::membership::MemberState;

#[derive(Clone, Debug)]
pub struct SideView {
    me: String,
    grace: Duration,
    stable: BTreeSet<String>,
    /// Members seen alive or suspect now (us included), in name order.
    alive: Vec<String>,
    down_since: BTreeMap<String, Instant>,
    /// When each member last came into view (joined, or back after a partition).
    appeared: BTreeMap<String, Instant>,
    /// Since when this side has seen a strict majority of `stable` (`None`: a minority now).
    /// A down member's grace counts from the later of its going down and this, so time spent
    /// as a minority never counts: a minority that meets one member of the majority after a
    /// heal would otherwise drop the rest at once, while they still hold their own view.
    majority_since: Option<Instant>,
}

impl SideView {
    pub fn new(me: &str, grace: Duration) -> SideView {
        SideView {
            me: me.to_string(),
            grace,
            stable: BTreeSet::from([me.to_string()]),
            alive: vec![me.to_string()],
            down_since: BTreeMap::new(),
            appeared: BTreeMap::new(),
            majority_since: None,
        }
    }

    /// Takes the member list (without us) as membership reports it.
    pub fn update<'a>(&mut self, now: Instant, members: impl IntoIterator<Item = (&'a str, MemberState)>) {
        let mut alive = BTreeSet::from([self.me.clone()]);
        for (name, state) in members {
            if name == self.me {
                continue;
            }
            match state {
                MemberState::Alive | MemberState::Suspect => {
                    alive.insert(name.to_string());
                }
                MemberState::Left => {
                    self.stable.remove(name);
                }
                MemberState::Down => {}
            }
        }
        // Joins grow the stable set; members gone from the list count as down.
        self.stable.extend(alive.iter().cloned());
        for name in &self.stable {
            if alive.contains(name) {
                self.down_since.remove(name);
            } else {
                self.down_since.entry(name.clone()).or_insert(now);
            }
        }
        self.down_since.retain(|n, _| self.stable.contains(n));
        for name in &alive {
            if self.alive.binary_search(name).is_err() {
                self.appeared.insert(name.clone(), now);
            }
        }
        self.appeared.retain(|n, _| alive.contains(n));
        self.alive = alive.into_iter().collect();
        self.promote(now);
    }

    /// Drops members down past the grace, when what remains is a strict majority.
    fn promote(&mut self, now: Instant) {
        let seen = self.seen();
        if 2 * seen <= self.stable.len() {
            self.majority_since = None;
            return;
        }
        let majority = *self.majority_since.get_or_insert(now);
        let expired: Vec<String> = self
            .down_since
            .iter()
            .filter(|(_, down)| now.saturating_duration_since((**down).max(majority)) >= self.grace)
            .map(|(n, _)| n.clone())
            .collect();
        for n in expired {
            self.stable.remove(&n);
            self.down_since.remove(&n);
        }
    }

    fn seen(&self) -> usize {
        self.alive.iter().filter(|n| self.stable.contains(*n)).count()
    }

    /// The share of every limit this side may admit, in (0, 1].
    pub fn fraction(&self) -> f64 {
        self.seen() as f64 / self.stable.len().max(1) as f64
    }

    /// Members this side sees (alive or suspect), us included, in name order.
    pub fn alive(&self) -> &[String] {
        &self.alive
    }

    /// Did `name` come into view less than `window` ago? Views of a new or returning member
    /// take a moment to agree across the cluster.
    pub fn appeared_within(&self, name: &str, now: Instant, window: Duration) -> bool {
        self.appeared.get(name).is_some_and(|t| now.saturating_duration_since(*t) < window)
    }

    pub fn me(&self) -> &str {
        &self.me
    }

    pub fn stable_len(&self) -> usize {
        self.stable.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use MemberState::*;

    const GRACE: Duration = Duration::from_secs(5);

    fn view(names: &[(&'static str, MemberState)], now: Instant) -> SideView {
        let mut v = SideView::new("a", GRACE);
        v.update(now, names.iter().copied());
        v
    }

    #[test]
    fn a_whole_cluster_takes_the_whole_limit() {
        let v = view(&[("b", Alive), ("c", Suspect)], Instant::now());
        assert_eq!(v.fraction(), 1.0);
        assert_eq!(v.alive(), ["a", "b", "c"]);
    }

    #[test]
    fn survivors_of_a_crash_take_its_share_after_the_grace() {
        let t0 = Instant::now();
        let mut v = view(&[("b", Alive), ("c", Alive)], t0);
        v.update(t0, [("b", Alive), ("c", Down)]);
        assert!((v.fraction() - 2.0 / 3.0).abs() < 1e-9, "within the grace the dead share is held");
        v.update(t0 + GRACE, [("b", Alive), ("c", Down)]);
        assert_eq!(v.fraction(), 1.0);
    }

    #[test]
    fn a_minority_side_keeps_its_share_for_ever_and_a_majority_takes_all() {
        let t0 = Instant::now();
        let everyone = [("b", Alive), ("c", Alive), ("d", Alive), ("e", Alive)];
        let mut minority = view(&everyone, t0);
        let later = t0 + GRACE * 100;
        minority.update(t0, [("b", Alive), ("c", Down), ("d", Down), ("e", Down)]);
        minority.update(later, [("b", Alive), ("c", Down), ("d", Down), ("e", Down)]);
        assert!((minority.fraction() - 0.4).abs() < 1e-9);
        let mut majority = view(&everyone, t0);
        majority.update(t0, [("b", Down), ("c", Alive), ("d", Alive), ("e", Down)]);
        assert!((majority.fraction() - 0.6).abs() < 1e-9);
        majority.update(later, [("b", Down), ("c", Alive), ("d", Alive), ("e", Down)]);
        assert_eq!(majority.fraction(), 1.0);
    }

    #[test]
    fn a_minority_that_meets_one_member_of_the_majority_waits_a_fresh_grace() {
        let t0 = Instant::now();
        let mut v = view(&[("b", Alive), ("c", Alive), ("d", Alive), ("e", Alive)], t0);
        v.update(t0, [("b", Alive), ("c", Down), ("d", Down), ("e", Down)]);
        // Down far longer than the grace, but as a minority: the heal brings c back first.
        let heal = t0 + GRACE * 3;
        v.update(heal, [("b", Alive), ("c", Alive), ("d", Down), ("e", Down)]);
        assert!((v.fraction() - 0.6).abs() < 1e-9, "promoted at once: {}", v.fraction());
        v.update(heal + GRACE / 2, [("b", Alive), ("c", Alive), ("d", Down), ("e", Down)]);
        assert!((v.fraction() - 0.6).abs() < 1e-9);
        v.update(heal + GRACE, [("b", Alive), ("c", Alive), ("d", Down), ("e", Down)]);
        assert_eq!(v.fraction(), 1.0, "a majority for a whole grace takes the rest");
    }

    #[test]
    fn an_even_split_never_promotes() {
        let t0 = Instant::now();
        let mut v = view(&[("b", Alive), ("c", Alive), ("d", Alive)], t0);
        v.update(t0 + GRACE * 10, [("b", Alive), ("c", Down), ("d", Down)]);
        assert_eq!(v.fraction(), 0.5);
    }

    #[test]
    fn a_graceful_leave_shrinks_the_cluster_at_once_and_a_rejoin_counts_again() {
        let t0 = Instant::now();
        let mut v = view(&[("b", Alive), ("c", Alive)], t0);
        v.update(t0, [("b", Alive), ("c", Left)]);
        assert_eq!(v.fraction(), 1.0);
        assert_eq!(v.stable_len(), 2);
        v.update(t0, [("b", Alive), ("c", Alive)]);
        assert_eq!(v.stable_len(), 3);
    }
}
