//! Consistent hashing for session affinity: a request hashed on a header goes to the same
//! endpoint while the endpoint set stays the same, and when it changes only the keys of the
//! endpoints that came or went move. Two tables, as Envoy offers: a ring (ketama, weighted
//! by virtual nodes) and Maglev (Google's lookup table, even load, small moves).

use trellis_proto::ratelimit::value_hash;

/// Virtual nodes per unit of weight on the ring.
const VNODES: u32 = 100;
/// Maglev table size: a prime well above 100 times the endpoints we expect.
pub const MAGLEV_SIZE: usize = 65_537;

fn h(parts: &[&[u8]]) -> u64 {
    let mut bytes = Vec::new();
    for p in parts {
        bytes.extend_from_slice(p);
        bytes.push(0xff);
    }
    // FNV-1a spreads short similar strings poorly in the high bits; finish with a mix.
    let mut x = value_hash(&bytes);
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

/// The hash of a request key (a header value).
pub fn key_hash(key: &[u8]) -> u64 {
    h(&[b"key", key])
}

/// A ketama ring: points sorted by hash, each owned by an endpoint.
#[derive(Debug, Clone)]
pub struct Ring {
    points: Vec<(u64, usize)>,
}

impl Ring {
    /// `endpoints`: (name, weight).
    pub fn new(endpoints: &[(String, u32)]) -> Ring {
        let mut points = Vec::new();
        for (i, (name, weight)) in endpoints.iter().enumerate() {
            for v in 0..VNODES * (*weight).max(1) {
                points.push((h(&[name.as_bytes(), &v.to_le_bytes()]), i));
            }
        }
        points.sort_unstable();
        Ring { points }
    }

    /// The first point at or after `hash`, wrapping around.
    pub fn pick(&self, hash: u64) -> Option<usize> {
        if self.points.is_empty() {
            return None;
        }
        let i = self.points.partition_point(|(p, _)| *p < hash);
        Some(self.points[i % self.points.len()].1)
    }
}

/// A Maglev lookup table.
#[derive(Debug, Clone)]
pub struct Maglev {
    table: Vec<u32>,
}

impl Maglev {
    /// Each endpoint fills table slots in its own permutation order, in turn, until the
    /// table is full; weights are not used (every endpoint gets about size/N slots).
    pub fn new(endpoints: &[(String, u32)]) -> Maglev {
        let n = endpoints.len();
        if n == 0 {
            return Maglev { table: Vec::new() };
        }
        let m = MAGLEV_SIZE as u64;
        let perms: Vec<(u64, u64)> = endpoints
            .iter()
            .map(|(name, _)| (h(&[b"offset", name.as_bytes()]) % m, h(&[b"skip", name.as_bytes()]) % (m - 1) + 1))
            .collect();
        let mut next = vec![0u64; n];
        let mut table = vec![u32::MAX; MAGLEV_SIZE];
        let mut filled = 0;
        'fill: loop {
            for (i, (offset, skip)) in perms.iter().enumerate() {
                let mut slot = ((offset + next[i] * skip) % m) as usize;
                while table[slot] != u32::MAX {
                    next[i] += 1;
                    slot = ((offset + next[i] * skip) % m) as usize;
                }
                table[slot] = i as u32;
                next[i] += 1;
                filled += 1;
                if filled == MAGLEV_SIZE {
                    break 'fill;
                }
            }
        }
        Maglev { table }
    }

    pub fn pick(&self, hash: u64) -> Option<usize> {
        (!self.table.is_empty()).then(|| self.table[(hash % self.table.len() as u64) as usize] as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eps(n: usize) -> Vec<(String, u32)> {
        (0..n).map(|i| (format!("web-{i}@n{i}"), 1)).collect()
    }

    /// Share of 20,000 keys that pick a different endpoint name in `b` than in `a`.
    fn moved(
        a: &dyn Fn(u64) -> Option<usize>,
        an: &[(String, u32)],
        b: &dyn Fn(u64) -> Option<usize>,
        bn: &[(String, u32)],
    ) -> f64 {
        let keys = 20_000;
        let moved = (0..keys)
            .filter(|k| {
                let key = key_hash(format!("user-{k}").as_bytes());
                an[a(key).unwrap()].0 != bn[b(key).unwrap()].0
            })
            .count();
        moved as f64 / keys as f64
    }

    fn spread(pick: &dyn Fn(u64) -> Option<usize>, n: usize) -> Vec<usize> {
        let mut counts = vec![0; n];
        for k in 0..50_000 {
            counts[pick(key_hash(format!("user-{k}").as_bytes())).unwrap()] += 1;
        }
        counts
    }

    #[test]
    fn ring_keeps_keys_and_moves_about_one_nth_when_an_endpoint_goes() {
        let (five, four) = (eps(5), eps(4));
        let (a, b) = (Ring::new(&five), Ring::new(&four));
        let key = key_hash(b"alice");
        assert_eq!(a.pick(key), a.pick(key));
        let m = moved(&|k| a.pick(k), &five, &|k| b.pick(k), &four);
        assert!(m > 0.15 && m < 0.25, "{m:.3} of keys moved; endpoint 4 held about 0.2");
        let counts = spread(&|k| a.pick(k), 5);
        assert!(counts.iter().all(|c| (7_000..13_000).contains(c)), "{counts:?}");
    }

    #[test]
    fn ring_weights_give_more_keys() {
        let eps = vec![("a".to_string(), 1), ("b".to_string(), 3)];
        let r = Ring::new(&eps);
        let counts = spread(&|k| r.pick(k), 2);
        let share = counts[1] as f64 / 50_000.0;
        assert!((0.70..0.80).contains(&share), "weight 3 of 4 got {share:.3}");
    }

    #[test]
    fn maglev_spreads_evenly_and_moves_about_one_nth() {
        let (five, four) = (eps(5), eps(4));
        let (a, b) = (Maglev::new(&five), Maglev::new(&four));
        let mut slots = vec![0usize; 5];
        for s in &a.table {
            slots[*s as usize] += 1;
        }
        let even = MAGLEV_SIZE / 5;
        assert!(slots.iter().all(|s| s.abs_diff(even) <= even / 50), "{slots:?}");
        let m = moved(&|k| a.pick(k), &five, &|k| b.pick(k), &four);
        assert!(m > 0.18 && m < 0.25, "{m:.3} of keys moved; endpoint 4 held 0.2");
    }

    #[test]
    fn empty_tables_pick_nothing() {
        assert_eq!(Ring::new(&[]).pick(1), None);
        assert_eq!(Maglev::new(&[]).pick(1), None);
    }
}
