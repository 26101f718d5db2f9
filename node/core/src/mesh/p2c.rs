//! Power of two choices: pick two endpoints at random, send to the less loaded. Nearly as
//! good as asking everyone, at the cost of two lookups. Load is either requests in flight
//! (least request) or latency times requests in flight (peak EWMA, as linkerd and Finagle
//! do), so a slow endpoint is avoided before it fails.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::RngExt;

/// How fast an old latency sample fades.
const DECAY: Duration = Duration::from_secs(10);

/// Latency estimate that jumps up at once and decays slowly: one slow answer marks an
/// endpoint slow at once, many fast ones are needed to clear it.
#[derive(Clone, Copy, Debug)]
struct PeakEwma {
    value: f64,
    at: Instant,
}

/// Requests in flight and latency per endpoint name.
#[derive(Debug, Default)]
pub struct Load {
    inflight: HashMap<String, u32>,
    latency: HashMap<String, PeakEwma>,
}

impl Load {
    pub fn start(&mut self, name: &str) {
        *super::keyed::at(&mut self.inflight, name, Default::default) += 1;
    }

    pub fn end(&mut self, name: &str) {
        if let Some(n) = self.inflight.get_mut(name) {
            *n = n.saturating_sub(1);
        }
    }

    pub fn observe(&mut self, now: Instant, name: &str, rtt: Duration) {
        let sample = rtt.as_secs_f64();
        let e = super::keyed::at(&mut self.latency, name, || PeakEwma { value: sample, at: now });
        if sample > e.value {
            e.value = sample;
        } else {
            let w = (-now.saturating_duration_since(e.at).as_secs_f64() / DECAY.as_secs_f64()).exp();
            e.value = e.value * w + sample * (1.0 - w);
        }
        e.at = now;
    }

    pub fn inflight(&self, name: &str) -> u32 {
        self.inflight.get(name).copied().unwrap_or(0)
    }

    /// Latency times load; an endpoint never measured costs nothing, so it gets tried.
    fn ewma_cost(&self, name: &str) -> f64 {
        let lat = self.latency.get(name).map_or(0.0, |e| e.value);
        lat * f64::from(self.inflight(name) + 1)
    }

    /// Forgets endpoints no longer listed.
    pub fn retain(&mut self, names: &[&str]) {
        self.inflight.retain(|n, _| names.contains(&n.as_str()));
        self.latency.retain(|n, _| names.contains(&n.as_str()));
    }
}

/// Two distinct random indexes (one when there is one).
fn two(rng: &mut SmallRng, n: usize) -> (usize, usize) {
    let a = rng.random_range(0..n);
    if n == 1 {
        return (a, a);
    }
    let b = (a + 1 + rng.random_range(0..n - 1)) % n;
    (a, b)
}

pub fn least_request(rng: &mut SmallRng, load: &Load, names: &[&str]) -> Option<usize> {
    if names.is_empty() {
        return None;
    }
    let (a, b) = two(rng, names.len());
    Some(if load.inflight(names[b]) < load.inflight(names[a]) { b } else { a })
}

pub fn peak_ewma(rng: &mut SmallRng, load: &Load, names: &[&str]) -> Option<usize> {
    if names.is_empty() {
        return None;
    }
    let (a, b) = two(rng, names.len());
    Some(if load.ewma_cost(names[b]) < load.ewma_cost(names[a]) { b } else { a })
}

/// Weighted random: each endpoint in proportion to its weight.
pub fn random(rng: &mut SmallRng, weights: &[u32]) -> Option<usize> {
    let total: u64 = weights.iter().map(|w| u64::from((*w).max(1))).sum();
    if total == 0 {
        return None;
    }
    let mut x = rng.random_range(0..total);
    weights.iter().position(|w| {
        let w = u64::from((*w).max(1));
        if x < w {
            true
        } else {
            x -= w;
            false
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    const NAMES: [&str; 4] = ["a", "b", "c", "d"];

    #[test]
    fn least_request_keeps_a_backed_up_endpoint_under_its_share() {
        let mut rng = SmallRng::seed_from_u64(1);
        let mut load = Load::default();
        for _ in 0..10 {
            load.start("a");
        }
        let mut counts = [0; 4];
        for _ in 0..10_000 {
            counts[least_request(&mut rng, &load, &NAMES).unwrap()] += 1;
        }
        // "a" wins a pair only against itself: never, since the pair is distinct.
        assert_eq!(counts[0], 0, "{counts:?}");
        assert!(counts[1..].iter().all(|c| (3_000..3_700).contains(c)), "{counts:?}");
    }

    #[test]
    fn peak_ewma_avoids_a_slow_endpoint_and_forgives_it_slowly() {
        let mut rng = SmallRng::seed_from_u64(2);
        let mut load = Load::default();
        let t0 = Instant::now();
        for n in NAMES {
            load.observe(t0, n, Duration::from_millis(2));
        }
        load.observe(t0, "c", Duration::from_millis(200));
        let mut counts = [0; 4];
        for _ in 0..10_000 {
            counts[peak_ewma(&mut rng, &load, &NAMES).unwrap()] += 1;
        }
        assert_eq!(counts[2], 0, "{counts:?}");
        // Fast answers pull it back over time, not at once.
        load.observe(t0 + Duration::from_secs(1), "c", Duration::from_millis(2));
        assert!(load.ewma_cost("c") > 0.1, "one fast answer does not clear a peak");
        load.observe(t0 + Duration::from_secs(60), "c", Duration::from_millis(2));
        assert!(load.ewma_cost("c") < 0.005);
    }

    #[test]
    fn random_follows_weights() {
        let mut rng = SmallRng::seed_from_u64(3);
        let mut counts = [0; 2];
        for _ in 0..40_000 {
            counts[random(&mut rng, &[1, 3]).unwrap()] += 1;
        }
        let share = counts[1] as f64 / 40_000.0;
        assert!((0.74..0.76).contains(&share), "{share}");
        assert_eq!(random(&mut rng, &[]), None);
    }
}
