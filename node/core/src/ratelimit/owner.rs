//! The owner's side of one limit key: the demand each node reported, and the share each
//! gets. Shares follow demand, so a node with all the load gets almost all the limit, and
//! they never sum past what this side of the cluster may admit.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::side::SideView;
use super::timing::ExchangeTiming;

/// How long after a member comes into view it is assumed to be on its fallback share
/// unless it reports: about the time SWIM takes to spread a join or a heal.
const SETTLE: Duration = Duration::from_secs(3);

/// Demand below this (requests per second) counts as idle.
const IDLE_RATE: f64 = 0.5;

/// Share of the side's limit spread evenly over reporters, so an idle node's first
/// requests pass while its demand report is on the way.
const EVEN_SHARE: f64 = 0.01;

#[derive(Clone, Debug)]
struct NodeDemand {
    offered: f64,
    admitted: f64,
    at: Instant,
    granted: f64,
    granted_at: Instant,
}

/// A node's share of one key, as the owner grants it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Share {
    pub rate: f64,
    pub burst: f64,
}

/// What the cluster does with one key, as far as the owner knows.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct ClusterRates {
    pub offered: f64,
    pub admitted: f64,
    pub nodes: usize,
}

#[derive(Clone, Debug)]
pub struct OwnerTable {
    created: Instant,
    nodes: HashMap<String, NodeDemand>,
}

impl OwnerTable {
    pub fn new(now: Instant) -> OwnerTable {
        OwnerTable { created: now, nodes: HashMap::new() }
    }

    pub fn record(&mut self, now: Instant, node: &str, offered: f64, admitted: f64) {
        let (granted, granted_at) = self.nodes.get(node).map_or((0.0, now), |d| (d.granted, d.granted_at));
        self.nodes.insert(node.to_string(), NodeDemand { offered, admitted, at: now, granted, granted_at });
    }

    /// The share of `node` of a limit of `rate` (burst `burst`), given everyone's demand.
    ///
    /// Nodes that stopped reporting while busy may be cut off from us and running on their
    /// fallback share, so that share stays reserved for them until membership drops them.
    /// A new table reserves the fallback for everyone it has not heard from yet.
    pub fn allocate(
        &mut self,
        now: Instant,
        node: &str,
        limit: (f64, f64),
        side: &SideView,
        t: &ExchangeTiming,
    ) -> Share {
        let (rate, burst) = limit;
        let alive = side.alive();
        self.nodes.retain(|n, _| alive.binary_search(n).is_ok());
        let cap = rate * side.fraction();
        let fallback = cap / alive.len().max(1) as f64;
        let warm = now.saturating_duration_since(self.created) < t.stale;
        let even = EVEN_SHARE * fallback;
        let (mut reserved, mut outstanding) = (0.0, 0.0);
        let mine = self.nodes.get(node).map_or(0.0, |d| d.offered) + even;
        let mut demands = vec![mine];
        for n in alive.iter().filter(|n| *n != node) {
            let Some(d) = self.nodes.get(n) else {
                // Not heard from: idle, or new here and maybe on its fallback share while
                // membership views settle.
                if warm || side.appeared_within(n, now, SETTLE) {
                    reserved += fallback;
                }
                continue;
            };
            let live = now < d.granted_at + t.lease;
            if now.saturating_duration_since(d.at) <= t.stale {
                demands.push(d.offered + even);
                outstanding += if live { d.granted } else { 0.0 };
            } else if d.offered >= IDLE_RATE {
                // Gone silent while busy: it may be cut off from us, spending its last grant
                // until the lease ends and then its fallback share.
                reserved += if live { d.granted.max(fallback) } else { fallback };
            }
        }
        let avail = (cap - reserved).max(0.0);
        let (target, headroom) = fair_share(&demands, avail);
        // Never more than others leave free, so grants in force do not sum past what may
        // be granted; a node whose demand grows gets its full share once the others shrank.
        let share_rate = target.min(avail + headroom - outstanding).max(0.0);
        if let Some(d) = self.nodes.get_mut(node) {
            d.granted = share_rate;
            d.granted_at = now;
        }
        let share_burst = if cap > 0.0 { burst * share_rate / rate } else { 0.0 };
        Share { rate: share_rate, burst: share_burst.max(1.0) }
    }

    /// The sum of fresh reports.
    pub fn cluster(&self, now: Instant, stale: Duration) -> ClusterRates {
        self.nodes.values().filter(|d| now.saturating_duration_since(d.at) <= stale).fold(
            ClusterRates::default(),
            |mut c, d| {
                c.offered += d.offered;
                c.admitted += d.admitted;
                c.nodes += 1;
                c
            },
        )
    }

    /// Per-node rows for the API: (node, offered, admitted, granted rate).
    pub fn rows(&self) -> Vec<(String, f64, f64, f64)> {
        let mut rows: Vec<_> = self.nodes.iter().map(|(n, d)| (n.clone(), d.offered, d.admitted, d.granted)).collect();
        rows.sort_by(|a, b| a.0.cmp(&b.0));
        rows
    }

    /// Nothing heard for this long: the table can go.
    pub fn idle_since(&self, now: Instant) -> Duration {
        self.nodes.values().map(|d| now.saturating_duration_since(d.at)).min().unwrap_or(Duration::MAX)
    }
}

/// Headroom over a node's measured demand, so its random bursts pass.
const HEADROOM: f64 = 1.1;

/// What a node with demand `d` (requests/s) asks for: 10% more, plus one standard
/// deviation of a Poisson count over a quarter second (as a rate, 2 * sqrt(d)), which is
/// what a node with a few requests per tick needs (measured: at N=50 with Zipf load, nodes
/// under 10 requests/s lost a quarter of their requests with 10% headroom alone).
fn ask(d: f64) -> f64 {
    d * HEADROOM + 2.0 * d.sqrt()
}

/// The share of `demands[0]` in a max-min fair split of `avail`, and the headroom granted
/// beyond `avail`.
///
/// The fair level is computed on measured demand: nodes under it get their demand plus
/// headroom (see [`ask`]), nodes over it get the level. The headroom of the small nodes is
/// granted on top of `avail`: a node under the level uses about its demand, so the
/// headroom only covers its random bursts, which do not line up across nodes. Spare
/// capacity under the limit goes out evenly.
///
/// Why max-min and not shares in proportion to demand: with many nodes each sees only a few
/// requests per tick, and proportional shares follow that noise. Measured in the simulator
/// at N=50, twice the limit offered evenly: proportional shares admitted 93.7% of the limit,
/// max-min 99.8%, since every node above the fair level gets exactly that level.
pub fn fair_share(demands: &[f64], avail: f64) -> (f64, f64) {
    let total: f64 = demands.iter().sum();
    if total <= avail {
        let asks: Vec<f64> = demands.iter().map(|d| ask(*d)).collect();
        let spare = (avail - asks.iter().sum::<f64>()).max(0.0);
        let over = (asks.iter().sum::<f64>() - avail).max(0.0);
        return (asks[0] + spare / asks.len() as f64, over);
    }
    let level = fair_level(demands, avail);
    let headroom: f64 = demands.iter().filter(|d| **d < level).map(|d| ask(*d).min(level) - d).sum();
    let mine = if demands[0] < level { ask(demands[0]).min(level) } else { level };
    (mine, headroom)
}

/// The max-min fair level: every ask under it is met, every ask over it gets it.
fn fair_level(asks: &[f64], avail: f64) -> f64 {
    let mut sorted = asks.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mut remaining = avail;
    for (k, ask) in sorted.iter().enumerate() {
        let level = remaining / (sorted.len() - k) as f64;
        if *ask >= level {
            return level;
        }
        remaining -= ask;
    }
    f64::INFINITY
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::membership::MemberState::*;

    #[test]
    fn fair_share_is_max_min_with_headroom() {
        // Over the limit: 100 and 1000 ask for 1000 in all; the small one gets 110.
        // Over the limit: 100 gets its 100 and headroom (10% and 2 * sqrt(100)), on top of
        // the 900 left for the busy node.
        let (small, headroom) = fair_share(&[100.0, 1000.0], 1000.0);
        assert!((small - 130.0).abs() < 1e-9 && (headroom - 30.0).abs() < 1e-9);
        assert!((fair_share(&[1000.0, 100.0], 1000.0).0 - 900.0).abs() < 1e-9);
        // Even demand splits evenly.
        assert!((fair_share(&[900.0, 900.0, 900.0], 900.0).0 - 300.0).abs() < 1e-9);
        // Under the limit: the ask plus an even part of what is spare.
        let (a, b) = (ask(10.0), ask(30.0));
        assert!((fair_share(&[10.0, 30.0], 100.0).0 - (a + (100.0 - a - b) / 2.0)).abs() < 1e-9);
    }

    const STALE: Duration = Duration::from_millis(150);

    fn timing() -> ExchangeTiming {
        ExchangeTiming::default()
    }

    fn side(now: Instant) -> SideView {
        let mut s = SideView::new("a", Duration::from_secs(5));
        s.update(now, [("b", Alive), ("c", Alive)]);
        s
    }

    fn settled(now: Instant) -> (OwnerTable, Instant) {
        (OwnerTable::new(now - STALE * 2), now)
    }

    #[test]
    fn small_demands_are_met_and_the_rest_goes_to_the_busy_node() {
        let (mut t, now) = settled(Instant::now());
        let s = side(now);
        for (n, d) in [("a", 1800.0), ("b", 200.0), ("c", 0.0)] {
            t.record(now, n, d, d);
        }
        let shares: Vec<f64> =
            ["a", "b", "c"].iter().map(|n| t.allocate(now, n, (1000.0, 50.0), &s, &timing()).rate).collect();
        // b gets its 200 and headroom (10% and 2 * sqrt(200)), c nearly nothing; a takes the
        // rest of the limit. Only the small nodes' headroom goes past the limit.
        let b = 200.0 * 1.1 + 2.0 * 200f64.sqrt();
        assert!((shares[1] - b).abs() < 5.0 && shares[2] < 10.0 && shares[0] > 790.0, "{shares:?}");
        let total: f64 = shares.iter().sum();
        assert!(total <= 1000.0 + (b - 200.0) + shares[2] + 1e-6, "{shares:?}");
    }

    #[test]
    fn a_busy_node_gone_silent_keeps_its_share_reserved() {
        let (mut t, now) = settled(Instant::now());
        let s = side(now);
        t.record(now, "c", 500.0, 333.0);
        t.allocate(now, "c", (1000.0, 50.0), &s, &timing());
        let later = now + timing().lease * 2;
        t.record(later, "a", 1000.0, 333.0);
        t.record(later, "b", 1000.0, 333.0);
        let a = t.allocate(later, "a", (1000.0, 50.0), &s, &timing()).rate;
        let b = t.allocate(later, "b", (1000.0, 50.0), &s, &timing()).rate;
        assert!((a + b - 1000.0 * 2.0 / 3.0).abs() < 1.0, "{a} + {b}: c's fallback share stays reserved");
    }

    #[test]
    fn a_new_owner_reserves_for_those_it_has_not_heard() {
        let now = Instant::now();
        let mut t = OwnerTable::new(now);
        let s = side(now);
        t.record(now, "a", 5000.0, 0.0);
        let a = t.allocate(now, "a", (900.0, 90.0), &s, &timing());
        assert!((a.rate - 300.0).abs() < 1e-6, "{a:?}");
        assert!((a.burst - 30.0).abs() < 1e-6, "{a:?}");
    }

    #[test]
    fn a_minority_side_grants_only_its_fraction() {
        let (mut t, now) = settled(Instant::now());
        let mut s = SideView::new("a", Duration::from_secs(5));
        s.update(now, [("b", Alive), ("c", Alive), ("d", Alive), ("e", Alive)]);
        s.update(now, [("b", Alive), ("c", Down), ("d", Down), ("e", Down)]);
        t.record(now, "a", 5000.0, 0.0);
        t.record(now, "b", 5000.0, 0.0);
        let total: f64 = ["a", "b"].iter().map(|n| t.allocate(now, n, (1000.0, 0.0), &s, &timing()).rate).sum();
        assert!((total - 400.0).abs() < 1e-6, "{total}");
    }
}
