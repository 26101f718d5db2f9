//! Load balancing decisions. Sans-IO: given the candidates, pick one.

use std::collections::HashMap;

/// Smooth weighted round robin per service (nginx's algorithm): with equal weights it is
/// plain round robin; with weights it interleaves rather than bursting.
#[derive(Debug, Default)]
pub struct RoundRobin {
    current: HashMap<String, HashMap<String, i64>>,
}

impl RoundRobin {
    /// Picks among `(instance name, weight)`; None when there are no candidates.
    pub fn pick(&mut self, service: &str, candidates: &[(&str, u32)]) -> Option<usize> {
        if candidates.is_empty() {
            return None;
        }
        let cur = super::keyed::at(&mut self.current, service, Default::default);
        cur.retain(|name, _| candidates.iter().any(|(n, _)| n == name));
        let total: i64 = candidates.iter().map(|(_, w)| i64::from(*w)).sum();
        let mut best = 0;
        let mut best_val = i64::MIN;
        for (i, (name, w)) in candidates.iter().enumerate() {
            let v = super::keyed::at(cur, name, || 0);
            *v += i64::from(*w);
            if *v > best_val {
                best_val = *v;
                best = i;
            }
        }
        *cur.get_mut(candidates[best].0).expect("just inserted") -= total;
        Some(best)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c<'a>(list: &[(&'a str, u32)]) -> Vec<(&'a str, u32)> {
        list.to_vec()
    }

    #[test]
    fn equal_weights_rotate_evenly() {
        let mut rr = RoundRobin::default();
        let cands = c(&[("a", 1), ("b", 1), ("c", 1)]);
        let mut counts = [0; 3];
        for _ in 0..300 {
            counts[rr.pick("s", &cands).unwrap()] += 1;
        }
        assert_eq!(counts, [100, 100, 100]);
    }

    #[test]
    fn weights_are_honoured_exactly_and_interleaved() {
        let mut rr = RoundRobin::default();
        let cands = c(&[("a", 9), ("b", 1)]);
        let picks: Vec<usize> = (0..10).map(|_| rr.pick("s", &cands).unwrap()).collect();
        assert_eq!(picks.iter().filter(|&&p| p == 1).count(), 1);
        assert_ne!(picks[..2], [1, 1]);
    }

    #[test]
    fn removed_candidates_are_forgotten_and_empty_sets_pick_nothing() {
        let mut rr = RoundRobin::default();
        rr.pick("s", &c(&[("a", 1), ("b", 1)]));
        assert_eq!(rr.pick("s", &c(&[("b", 1)])), Some(0));
        assert_eq!(rr.pick("s", &[]), None);
    }
}
