//! The balancer: picks one endpoint of a service by the service's `lb` policy, after the
//! locality preference. Sans-IO: candidates, loads and hashes in, an index out. Each
//! algorithm lives in its own module (`lb`, `p2c`, `hashing`, `locality`) with tests of its
//! distribution.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::SeedableRng;

use super::hashing::{Maglev, Ring};
use super::locality::{self, Place};
use super::p2c::{self, Load};
use super::round_robin::RoundRobin;
use crate::policy::model::{LbPolicy, LoadBalancing};

/// One endpoint a request may go to.
#[derive(Clone, Copy, Debug)]
pub struct Candidate<'a> {
    pub name: &'a str,
    pub weight: u32,
    pub place: Place<'a>,
}

enum Table {
    Ring(Ring),
    Maglev(Maglev),
}

pub struct Balancer {
    rr: RoundRobin,
    load: Load,
    rng: SmallRng,
    /// Hash tables per service key, with the endpoint set they were built for.
    tables: HashMap<String, (Vec<(String, u32)>, Table)>,
}

impl Default for Balancer {
    fn default() -> Balancer {
        Balancer::new(rand::random())
    }
}

impl Balancer {
    pub fn new(seed: u64) -> Balancer {
        Balancer {
            rr: RoundRobin::default(),
            load: Load::default(),
            rng: SmallRng::seed_from_u64(seed),
            tables: HashMap::new(),
        }
    }

    /// Picks among `cands` for the service `key`; `hash` is the request's hash-header value
    /// (ring hash and Maglev fall back to round robin without one).
    pub fn pick(
        &mut self,
        key: &str,
        lb: &LoadBalancing,
        me: Place<'_>,
        cands: &[Candidate<'_>],
        hash: Option<u64>,
    ) -> Option<usize> {
        // Locality narrows the candidates to the nearest; without it they are all in play
        // and no index list is made (this runs on every request).
        let near = lb.locality.then(|| {
            let places: Vec<Place<'_>> = cands.iter().map(|c| c.place).collect();
            locality::nearest(me, &places)
        });
        let at = |i: usize| near.as_ref().map_or(i, |n| n[i]);
        let sub = (0..near.as_ref().map_or(cands.len(), Vec::len)).map(|i| &cands[at(i)]);
        let names = || sub.clone().map(|c| c.name).collect::<Vec<&str>>();
        let weighted = |equal: bool| -> Vec<(&str, u32)> {
            sub.clone().map(|c| (c.name, if equal { 1 } else { c.weight })).collect()
        };
        let i = match (lb.policy, hash) {
            (LbPolicy::RoundRobin, _) => self.rr.pick(key, &weighted(true)),
            (LbPolicy::Weighted, _) => self.rr.pick(key, &weighted(false)),
            (LbPolicy::Random, _) => p2c::random(&mut self.rng, &sub.clone().map(|c| c.weight).collect::<Vec<_>>()),
            (LbPolicy::LeastRequest, _) => p2c::least_request(&mut self.rng, &self.load, &names()),
            (LbPolicy::PeakEwma, _) => p2c::peak_ewma(&mut self.rng, &self.load, &names()),
            (LbPolicy::RingHash | LbPolicy::Maglev, Some(h)) => self.table(key, lb.policy, weighted(false)).pick(h),
            (LbPolicy::RingHash | LbPolicy::Maglev, None) => self.rr.pick(key, &weighted(false)),
        }?;
        Some(at(i))
    }

    fn table(&mut self, key: &str, policy: LbPolicy, endpoints: Vec<(&str, u32)>) -> &Table {
        let fresh = match self.tables.get(key) {
            Some((eps, t)) => {
                eps.iter().map(|(n, w)| (n.as_str(), *w)).eq(endpoints.iter().copied())
                    && matches!(
                        (t, policy),
                        (Table::Ring(_), LbPolicy::RingHash) | (Table::Maglev(_), LbPolicy::Maglev)
                    )
            }
            None => false,
        };
        if !fresh {
            let endpoints: Vec<(String, u32)> = endpoints.into_iter().map(|(n, w)| (n.to_string(), w)).collect();
            let t = if policy == LbPolicy::Maglev {
                Table::Maglev(Maglev::new(&endpoints))
            } else {
                Table::Ring(Ring::new(&endpoints))
            };
            self.tables.insert(key.to_string(), (endpoints, t));
        }
        &self.tables[key].1
    }

    /// A request (or connection) to `name` started or ended; feeds least request.
    pub fn start(&mut self, name: &str) {
        self.load.start(name);
    }

    pub fn end(&mut self, name: &str) {
        self.load.end(name);
    }

    /// How long `name` took to answer; feeds peak EWMA.
    pub fn observe(&mut self, now: Instant, name: &str, rtt: Duration) {
        self.load.observe(now, name, rtt);
    }
}

impl Table {
    fn pick(&self, hash: u64) -> Option<usize> {
        match self {
            Table::Ring(r) => r.pick(hash),
            Table::Maglev(m) => m.pick(hash),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::hashing::key_hash;

    fn cands<'a>(names: &'a [String], zones: &'a [&'a str]) -> Vec<Candidate<'a>> {
        names
            .iter()
            .zip(zones)
            .map(|(n, z)| Candidate { name: n, weight: 1, place: Place { zone: Some(z), region: Some("eu") } })
            .collect()
    }

    fn lb(policy: LbPolicy, locality: bool) -> LoadBalancing {
        LoadBalancing { policy, hash_header: Some("x-user".into()), locality }
    }

    #[test]
    fn every_policy_picks_within_the_candidates() {
        let names: Vec<String> = (0..5).map(|i| format!("e{i}")).collect();
        let c = cands(&names, &["a"; 5]);
        let mut b = Balancer::new(7);
        for policy in [
            LbPolicy::RoundRobin,
            LbPolicy::Random,
            LbPolicy::Weighted,
            LbPolicy::LeastRequest,
            LbPolicy::PeakEwma,
            LbPolicy::RingHash,
            LbPolicy::Maglev,
        ] {
            for k in 0..50u64 {
                let i = b.pick("web", &lb(policy, false), Place::default(), &c, Some(key_hash(&k.to_le_bytes())));
                assert!(i.is_some_and(|i| i < 5), "{policy:?}");
            }
            assert_eq!(b.pick("web", &lb(policy, false), Place::default(), &[], None), None);
        }
    }

    #[test]
    fn hash_policies_keep_a_user_on_one_endpoint() {
        let names: Vec<String> = (0..5).map(|i| format!("e{i}")).collect();
        let c = cands(&names, &["a"; 5]);
        let mut b = Balancer::new(7);
        for policy in [LbPolicy::RingHash, LbPolicy::Maglev] {
            let alice = key_hash(b"alice");
            let first = b.pick("web", &lb(policy, false), Place::default(), &c, Some(alice));
            assert!((0..100).all(|_| b.pick("web", &lb(policy, false), Place::default(), &c, Some(alice)) == first));
            let users: std::collections::HashSet<_> = (0..100)
                .filter_map(|u| {
                    b.pick("web", &lb(policy, false), Place::default(), &c, Some(key_hash(format!("u{u}").as_bytes())))
                })
                .collect();
            assert_eq!(users.len(), 5, "{policy:?}: users spread over every endpoint");
        }
    }

    #[test]
    fn locality_keeps_traffic_in_zone_and_fails_over() {
        let names: Vec<String> = (0..4).map(|i| format!("e{i}")).collect();
        let c = cands(&names, &["z1", "z2", "z2", "z3"]);
        let me = Place { zone: Some("z2"), region: Some("eu") };
        let mut b = Balancer::new(7);
        let picks: std::collections::HashSet<_> =
            (0..100).filter_map(|_| b.pick("web", &lb(LbPolicy::RoundRobin, true), me, &c, None)).collect();
        assert_eq!(picks, [1, 2].into_iter().collect());
        let away = [c[0], c[3]];
        let picks: std::collections::HashSet<_> =
            (0..100).filter_map(|_| b.pick("web", &lb(LbPolicy::RoundRobin, true), me, &away, None)).collect();
        assert_eq!(picks, [0, 1].into_iter().collect(), "no endpoint in the zone: the region");
    }
}
