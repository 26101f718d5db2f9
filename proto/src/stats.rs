//! Mesh-wide golden metrics on the wire: each node sends every peer what its callers'
//! requests did over its last interval, by service, route and the node that answered. The
//! sender is the source of every row: its certificate names it, so no row can speak for
//! another node.

use serde::{Deserialize, Serialize};

use crate::DecodeError;

/// Rows one digest may carry (service x route x answering node); more are folded by the
/// sender.
pub const MAX_ROWS: usize = 2048;
/// Latency buckets a row may carry (the histogram's whole range).
pub const MAX_BUCKETS: usize = 96;
/// Longest interval a digest may cover.
pub const MAX_INTERVAL_MS: u32 = 60_000;

/// One node's closed interval.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatsDigest {
    /// Start of the interval, milliseconds since the Unix epoch (the sender's clock).
    pub start_ms: u64,
    pub len_ms: u32,
    pub rows: Vec<StatsRow>,
}

/// What requests from the sender to one service, route and answering node did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatsRow {
    pub service: String,
    /// Empty when no route matched.
    pub route: String,
    /// The node whose instance answered; empty when the proxy answered itself.
    pub dest: String,
    pub requests: u64,
    /// 5xx answers and the proxies' own refusals.
    pub errors: u64,
    /// Sparse latency histogram: (bucket, count), buckets ascending.
    pub latency: Vec<(u16, u64)>,
    /// TCP connections open from the sender to the service at the interval's end.
    pub tcp_open: u64,
}

impl StatsDigest {
    pub fn encode(&self) -> Vec<u8> {
        bincode::serde::encode_to_vec(self, crate::bincode_config()).expect("Vec writer")
    }

    /// Decodes and checks bounds: rows, name lengths, buckets, counts that add up.
    pub fn decode(body: &[u8]) -> Result<StatsDigest, DecodeError> {
        let d: StatsDigest = bincode::serde::decode_from_slice(body, crate::bincode_config())
            .map(|(v, _)| v)
            .map_err(|e| malformed(e.to_string()))?;
        d.check()?;
        Ok(d)
    }

    fn check(&self) -> Result<(), DecodeError> {
        if self.rows.len() > MAX_ROWS {
            return Err(malformed(format!("{} rows, at most {MAX_ROWS}", self.rows.len())));
        }
        if self.len_ms == 0 || self.len_ms > MAX_INTERVAL_MS {
            return Err(malformed(format!("an interval of {} ms", self.len_ms)));
        }
        for r in &self.rows {
            let long = [&r.service, &r.route, &r.dest].into_iter().any(|s| s.len() > crate::limits::MAX_NAME_LEN);
            if r.service.is_empty() || long {
                return Err(malformed("a service, route or node name is empty or too long".into()));
            }
            if r.errors > r.requests {
                return Err(malformed(format!("{} errors of {} requests", r.errors, r.requests)));
            }
            let ascending = r.latency.windows(2).all(|w| w[0].0 < w[1].0);
            let in_range = r.latency.iter().all(|(b, _)| usize::from(*b) < MAX_BUCKETS);
            let total = r.latency.iter().try_fold(0u64, |t, (_, n)| t.checked_add(*n));
            if r.latency.len() > MAX_BUCKETS || !ascending || !in_range || total.is_none_or(|t| t > r.requests) {
                return Err(malformed("latency buckets out of range, out of order, or more than the requests".into()));
            }
        }
        Ok(())
    }
}

fn malformed(detail: String) -> DecodeError {
    DecodeError::Malformed { what: "stats digest", detail }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row() -> StatsRow {
        StatsRow {
            service: "web".into(),
            route: String::new(),
            dest: "n2".into(),
            requests: 10,
            errors: 1,
            latency: vec![(3, 4), (7, 6)],
            tcp_open: 0,
        }
    }

    #[test]
    fn a_digest_round_trips() {
        let d = StatsDigest { start_ms: 1, len_ms: 10_000, rows: vec![row()] };
        assert_eq!(StatsDigest::decode(&d.encode()), Ok(d));
    }

    #[test]
    fn lies_and_junk_are_refused() {
        let with = |f: &dyn Fn(&mut StatsRow)| {
            let mut r = row();
            f(&mut r);
            StatsDigest::decode(&StatsDigest { start_ms: 1, len_ms: 1000, rows: vec![r] }.encode())
        };
        assert!(with(&|r| r.errors = 11).is_err(), "more errors than requests");
        assert!(with(&|r| r.latency = vec![(7, 1), (3, 1)]).is_err(), "buckets out of order");
        assert!(with(&|r| r.latency = vec![(200, 1)]).is_err(), "a bucket past the range");
        assert!(with(&|r| r.latency = vec![(1, 8), (2, 8)]).is_err(), "more latencies than requests");
        assert!(with(&|r| r.latency = vec![(1, u64::MAX), (2, 8)]).is_err(), "an overflowing total");
        assert!(with(&|r| r.service = String::new()).is_err());
        assert!(with(&|r| r.dest = "x".repeat(64)).is_err());
        let zero = StatsDigest { start_ms: 1, len_ms: 0, rows: vec![] };
        assert!(StatsDigest::decode(&zero.encode()).is_err());
        assert!(StatsDigest::decode(&[0xff; 7]).is_err());
    }
}

#[cfg(test)]
mod size {
    use super::*;

    /// What a digest costs on the wire, for the README's bandwidth figure: a node calling
    /// 10 services, each answered by 3 nodes, with 20 latency buckets in use per row.
    #[test]
    fn a_busy_nodes_digest_stays_under_ten_kib() {
        let row = |i: usize, d: usize| StatsRow {
            service: format!("service-{i}"),
            route: String::new(),
            dest: format!("node-{d}"),
            requests: 123_456,
            errors: 12,
            latency: (10..30).map(|b| (b, 6_000)).collect(),
            tcp_open: 0,
        };
        let rows = (0..10).flat_map(|i| (0..3).map(move |d| row(i, d))).collect();
        let d = StatsDigest { start_ms: 1_796_000_000_000, len_ms: 10_000, rows };
        let n = d.encode().len();
        assert!((3_000..10_240).contains(&n), "{n} bytes for 30 rows");
    }
}
