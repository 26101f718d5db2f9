//! Which nodes keep a service's figures. Every node sends each interval's rows for a
//! service to that service's owners only (the [`REPLICAS`] members with the highest
//! rendezvous hash, as the rate limiter picks its owners), so the bytes a node sends per
//! interval grow with the services it calls, not with the size of the mesh; a mesh-wide
//! answer is then one round trip to the owners.

use std::collections::BTreeMap;

use trellis_proto::stats::StatsDigest;

use crate::policy::store::fnv64;

/// Owners per service: one to answer, one more that already holds the history when the
/// first leaves or a newcomer takes its place.
pub const REPLICAS: usize = 2;

/// The owners of `service` among `members`, best first: every node that sees the same
/// members picks the same ones, and a member joining or leaving moves only its services.
pub fn owners<'a>(service: &str, members: &'a [String]) -> Vec<&'a str> {
    let mut ranked: Vec<(u64, &str)> = members.iter().map(|m| (rank(service, m), m.as_str())).collect();
    ranked.sort_unstable_by(|a, b| b.cmp(a));
    ranked.into_iter().take(REPLICAS).map(|(_, m)| m).collect()
}

/// FNV of (service, member), then a 64-bit finalizer (MurmurHash3's) so members whose names
/// differ in the last byte still rank far apart.
fn rank(service: &str, member: &str) -> u64 {
    let mut x = fnv64(&[service.as_bytes(), member.as_bytes()]);
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

/// `d` cut into one digest per owner, each with the rows of the services it keeps (a row
/// goes to every owner of its service); owners with nothing to keep get nothing.
pub fn split(d: &StatsDigest, members: &[String]) -> BTreeMap<String, StatsDigest> {
    let mut out: BTreeMap<String, StatsDigest> = BTreeMap::new();
    let mut cache: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for row in &d.rows {
        let to = cache.entry(row.service.as_str()).or_insert_with(|| owners(&row.service, members));
        for owner in to.iter() {
            let part = out.entry(owner.to_string()).or_insert_with(|| StatsDigest {
                start_ms: d.start_ms,
                len_ms: d.len_ms,
                rows: Vec::new(),
            });
            part.rows.push(row.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_proto::stats::StatsRow;

    fn members(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("node-{i}")).collect()
    }

    #[test]
    fn everyone_picks_the_same_owners_and_churn_moves_few_services() {
        let all = members(50);
        let mut shuffled = all.clone();
        shuffled.reverse();
        let services: Vec<String> = (0..200).map(|i| format!("svc-{i}")).collect();
        for s in &services {
            let o = owners(s, &all);
            assert_eq!(o.len(), REPLICAS);
            assert_ne!(o[0], o[1]);
            assert_eq!(o, owners(s, &shuffled), "the order members are seen in does not matter");
        }
        // One member leaves: only the services it owned change owners.
        let fewer: Vec<String> = all.iter().filter(|m| *m != "node-7").cloned().collect();
        for s in &services {
            let (before, after) = (owners(s, &all), owners(s, &fewer));
            if !before.contains(&"node-7") {
                assert_eq!(before, after, "{s} moved though its owners stayed");
            }
        }
        // Services spread over the members rather than piling onto a few.
        let mut load: BTreeMap<&str, usize> = BTreeMap::new();
        for s in &services {
            *load.entry(owners(s, &all)[0]).or_default() += 1;
        }
        assert!(load.len() >= 30 && load.values().all(|&n| n <= 12), "{load:?}");
        assert_eq!(owners("web", &members(1)), ["node-0"]);
    }

    #[test]
    fn a_digest_splits_into_its_services_owners() {
        let all = members(10);
        let row = |s: &str| StatsRow {
            service: s.into(),
            route: String::new(),
            dest: "node-1".into(),
            requests: 1,
            errors: 0,
            latency: vec![(3, 1)],
            tcp_open: 0,
        };
        let d = StatsDigest { start_ms: 10_000, len_ms: 1000, rows: vec![row("web"), row("db"), row("web")] };
        let parts = split(&d, &all);
        for (owner, part) in &parts {
            assert_eq!((part.start_ms, part.len_ms), (10_000, 1000));
            for r in &part.rows {
                assert!(owners(&r.service, &all).contains(&owner.as_str()));
            }
        }
        let sent: usize = parts.values().map(|p| p.rows.len()).sum();
        assert_eq!(sent, 3 * REPLICAS, "each row to each of its service's owners");
    }
}
