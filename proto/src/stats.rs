//! Mesh-wide golden metrics on the wire: each node sends each service's owners what its
//! callers' requests to that service did over its last interval, by route and the node that
//! answered. The sender is the source of every row: its certificate names it, so no row can
//! speak for another node. Queries and answers travel as [`StatsCall`].

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
            counts_hold(r.requests, r.errors, &r.latency)?;
        }
        Ok(())
    }
}

/// Groups one answer may carry, across all its services.
pub const MAX_GROUPS: usize = 4096;
/// Longest group name: an edge names two nodes and a service.
pub const MAX_GROUP_NAME: usize = 3 * crate::limits::MAX_NAME_LEN + 8;

/// A question to the nodes that keep services' figures, and their answer (message kind
/// `StatsQuery`). Each service's rows go to a few owner nodes rather than to every node, so
/// a mesh-wide answer is one round trip to them instead of every node holding everything.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum StatsCall {
    Ask(StatsAsk),
    Answer { id: u64, held: Vec<StatsHeld> },
}

/// Figures for `service` (every service the node keeps when None), over the last
/// `window_ms`, grouped `by` (service, route, source, node, edge), or one group per interval
/// when `series`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatsAsk {
    pub id: u64,
    pub service: Option<String>,
    pub by: String,
    pub window_ms: u64,
    pub series: bool,
}

/// What one node keeps of one service, already merged over the window.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatsHeld {
    pub service: String,
    /// How much of the window its digests cover (the longest of any source's).
    pub covered_ms: u64,
    pub groups: Vec<StatsGroup>,
}

/// One group's merged counts: named by the grouping, or one interval of a series.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatsGroup {
    pub name: String,
    pub start_ms: u64,
    pub len_ms: u32,
    pub requests: u64,
    pub errors: u64,
    pub latency: Vec<(u16, u64)>,
    pub tcp_open: u64,
}

impl StatsCall {
    pub fn encode(&self) -> Vec<u8> {
        bincode::serde::encode_to_vec(self, crate::bincode_config()).expect("Vec writer")
    }

    /// Decodes and checks bounds: names, group counts, buckets, counts that add up.
    pub fn decode(body: &[u8]) -> Result<StatsCall, DecodeError> {
        let c: StatsCall = bincode::serde::decode_from_slice(body, crate::bincode_config())
            .map(|(v, _)| v)
            .map_err(|e| malformed(e.to_string()))?;
        match &c {
            StatsCall::Ask(a) => {
                if a.service.as_ref().is_some_and(|s| s.is_empty() || s.len() > crate::limits::MAX_NAME_LEN) {
                    return Err(malformed("an empty or too long service name".into()));
                }
                if a.by.len() > 16 {
                    return Err(malformed("a grouping name that is too long".into()));
                }
            }
            StatsCall::Answer { held, .. } => {
                let groups: usize = held.iter().map(|h| h.groups.len()).sum();
                if held.len() > MAX_ROWS || groups > MAX_GROUPS {
                    return Err(malformed(format!(
                        "{} services and {groups} groups, at most {MAX_GROUPS}",
                        held.len()
                    )));
                }
                for h in held {
                    if h.service.is_empty() || h.service.len() > crate::limits::MAX_NAME_LEN {
                        return Err(malformed("an empty or too long service name".into()));
                    }
                    for g in &h.groups {
                        if g.name.len() > MAX_GROUP_NAME {
                            return Err(malformed("a group name that is too long".into()));
                        }
                        counts_hold(g.requests, g.errors, &g.latency)?;
                    }
                }
            }
        }
        Ok(c)
    }
}

/// Errors within requests, latency buckets ascending, in range and within the requests.
fn counts_hold(requests: u64, errors: u64, latency: &[(u16, u64)]) -> Result<(), DecodeError> {
    if errors > requests {
        return Err(malformed(format!("{errors} errors of {requests} requests")));
    }
    let ascending = latency.windows(2).all(|w| w[0].0 < w[1].0);
    let in_range = latency.iter().all(|(b, _)| usize::from(*b) < MAX_BUCKETS);
    let total = latency.iter().try_fold(0u64, |t, (_, n)| t.checked_add(*n));
    if latency.len() > MAX_BUCKETS || !ascending || !in_range || total.is_none_or(|t| t > requests) {
        return Err(malformed("latency buckets out of range, out of order, or more than the requests".into()));
    }
    Ok(())
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

    #[test]
    fn asks_and_answers_round_trip_and_bad_ones_are_refused() {
        let ask = StatsCall::Ask(StatsAsk {
            id: 7,
            service: Some("web".into()),
            by: "node".into(),
            window_ms: 60_000,
            series: false,
        });
        assert_eq!(StatsCall::decode(&ask.encode()), Ok(ask));
        let group = |requests, errors| StatsGroup {
            name: "n1 -> web@n2".into(),
            start_ms: 0,
            len_ms: 0,
            requests,
            errors,
            latency: vec![(3, requests)],
            tcp_open: 0,
        };
        let answer = |g: StatsGroup| StatsCall::Answer {
            id: 7,
            held: vec![StatsHeld { service: "web".into(), covered_ms: 1000, groups: vec![g] }],
        };
        assert_eq!(StatsCall::decode(&answer(group(5, 1)).encode()), Ok(answer(group(5, 1))));
        assert!(StatsCall::decode(&answer(group(5, 6)).encode()).is_err(), "more errors than requests");
        let mut long = group(1, 0);
        long.name = "x".repeat(MAX_GROUP_NAME + 1);
        assert!(StatsCall::decode(&answer(long).encode()).is_err());
        let many = StatsCall::Answer {
            id: 1,
            held: vec![StatsHeld { service: "web".into(), covered_ms: 0, groups: vec![group(1, 0); MAX_GROUPS + 1] }],
        };
        assert!(StatsCall::decode(&many.encode()).is_err());
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
