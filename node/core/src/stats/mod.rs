//! Mesh-wide golden metrics: each node counts what its callers' requests did (requests,
//! errors, a latency histogram) per service, route and answering node, and closes the
//! counts every interval into a digest whose rows go to their services' owners
//! ([`owners`]). An owner keeps every source's recent rows and answers a query with them
//! merged over the window ([`MeshStats::held`]); the asker keeps one answer per service
//! ([`pick`]) and merges across services ([`rows`], [`points`]). Counts and fixed-bucket
//! histograms merge by addition, so the answer does not depend on the order anything
//! arrives in.

use crate::mesh::keyed::at_sorted;
use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use serde::Serialize;
use trellis_proto::stats::{StatsDigest, StatsGroup, StatsHeld, StatsRow, MAX_BUCKETS, MAX_GROUPS, MAX_ROWS};

pub mod owners;

/// The lowest bucket's upper bound; buckets grow by 2^(1/4), about 19% each, so a
/// quantile read from them is within 19% of the true value, up to about 53 s.
const FIRST_BOUND_US: f64 = 50.0;
const PER_OCTAVE: f64 = 4.0;
/// Buckets used (the last one takes everything slower).
pub const BUCKETS: usize = 81;
const _: () = assert!(BUCKETS <= MAX_BUCKETS);

/// Latency counts in fixed logarithmic buckets.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Histogram {
    counts: BTreeMap<u16, u64>,
}

impl Histogram {
    pub fn record(&mut self, took: Duration) {
        *self.counts.entry(bucket_of(took)).or_default() += 1;
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (b, n) in &other.counts {
            *self.counts.entry(*b).or_default() += n;
        }
    }

    pub fn count(&self) -> u64 {
        self.counts.values().sum()
    }

    /// The upper bound of the bucket holding the `q` quantile (0 < q <= 1); None when empty.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let total = self.count();
        let rank = ((q * total as f64).ceil() as u64).clamp(1, total.max(1));
        let mut seen = 0;
        for (b, n) in &self.counts {
            seen += n;
            if seen >= rank && total > 0 {
                return Some(upper_bound(*b));
            }
        }
        None
    }

    pub fn sparse(&self) -> Vec<(u16, u64)> {
        self.counts.iter().map(|(b, n)| (*b, *n)).collect()
    }

    /// From the wire's sparse form (already bounds-checked by the decoder).
    pub fn from_sparse(buckets: &[(u16, u64)]) -> Histogram {
        Histogram { counts: buckets.iter().filter(|(_, n)| *n > 0).map(|(b, n)| (*b, *n)).collect() }
    }
}

fn bucket_of(took: Duration) -> u16 {
    let us = took.as_secs_f64() * 1e6;
    if us <= FIRST_BOUND_US {
        return 0;
    }
    let b = (PER_OCTAVE * (us / FIRST_BOUND_US).log2()).ceil();
    (b as usize).min(BUCKETS - 1) as u16
}

fn upper_bound(bucket: u16) -> Duration {
    Duration::from_secs_f64(FIRST_BOUND_US * 2f64.powf(f64::from(bucket) / PER_OCTAVE) / 1e6)
}

/// The requests of one (service, route, answering node) from one source.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Counts {
    pub requests: u64,
    pub errors: u64,
    pub latency: Histogram,
    /// Open TCP connections at the interval's end (a gauge: not added across intervals).
    pub tcp_open: u64,
}

/// This node's counts for the interval in progress, by service, route and answering node.
/// Nested by name so a request finds its row without allocating (this runs per request).
#[derive(Debug, Default)]
pub struct Recorder {
    current: BTreeMap<String, BTreeMap<String, BTreeMap<String, Counts>>>,
    rows: usize,
    /// Requests folded into `_other` because the interval already had [`MAX_ROWS`] rows.
    pub folded: u64,
}

impl Recorder {
    /// One request, ended with `error` after `took`.
    pub fn request(&mut self, service: &str, route: &str, dest: &str, error: bool, took: Duration) {
        let c = self.row(service, route, dest);
        c.requests += 1;
        c.errors += u64::from(error);
        c.latency.record(took);
    }

    /// Sets the open TCP connections to `service` (reported with the interval).
    pub fn tcp_open(&mut self, service: &str, open: u64) {
        self.row(service, "", "").tcp_open = open;
    }

    fn row(&mut self, service: &str, route: &str, dest: &str) -> &mut Counts {
        let known = self.current.get(service).and_then(|r| r.get(route)).is_some_and(|d| d.contains_key(dest));
        let (service, route, dest) = match known {
            false if self.rows >= MAX_ROWS - 1 => {
                self.folded += 1;
                ("_other", "", "")
            }
            _ => (service, route, dest),
        };
        let by_service = at_sorted(&mut self.current, service, Default::default);
        let by_dest = at_sorted(by_service, route, Default::default);
        if !by_dest.contains_key(dest) {
            self.rows += 1;
        }
        at_sorted(by_dest, dest, Default::default)
    }

    /// Closes the interval that started at `start_ms` and lasted `len_ms`.
    pub fn close(&mut self, start_ms: u64, len_ms: u32) -> StatsDigest {
        self.rows = 0;
        let mut rows = Vec::new();
        for (service, by_route) in std::mem::take(&mut self.current) {
            for (route, by_dest) in by_route {
                for (dest, c) in by_dest {
                    rows.push(StatsRow {
                        service: service.clone(),
                        route: route.clone(),
                        dest,
                        requests: c.requests,
                        errors: c.errors,
                        latency: c.latency.sparse(),
                        tcp_open: c.tcp_open,
                    });
                }
            }
        }
        StatsDigest { start_ms, len_ms, rows }
    }
}

/// The start of the interval of `len_ms` that ended last at `now_ms`: intervals are aligned
/// to the wall clock, so every node's line up.
pub fn closing_interval(now_ms: u64, len_ms: u64) -> u64 {
    (now_ms / len_ms.max(1)).saturating_sub(1) * len_ms
}

/// How `trellis stat` groups rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum By {
    Service,
    Route,
    /// The calling node.
    Source,
    /// The node whose instance answered.
    Node,
    /// Calling node, service and answering node: one path through the mesh (`trellis top`).
    Edge,
    /// The subset the request went to (`-`: none); a rollout's canary against its stable.
    Subset,
}

impl By {
    pub fn name(self) -> &'static str {
        match self {
            By::Service => "service",
            By::Route => "route",
            By::Source => "source",
            By::Node => "node",
            By::Edge => "edge",
            By::Subset => "subset",
        }
    }

    pub fn parse(s: &str) -> Option<By> {
        match s {
            "service" => Some(By::Service),
            "route" => Some(By::Route),
            "source" => Some(By::Source),
            "node" => Some(By::Node),
            "edge" => Some(By::Edge),
            "subset" => Some(By::Subset),
            _ => None,
        }
    }
}

/// One line of the answer.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Row {
    /// The group: a service, route, source node or answering node.
    pub name: String,
    pub requests: u64,
    pub errors: u64,
    /// Share of requests that did not fail, 0..1; None without requests.
    pub success: Option<f64>,
    pub rps: f64,
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub tcp_open: u64,
}

/// One interval of one service across the mesh, for charts.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Point {
    pub start_ms: u64,
    pub requests: u64,
    pub errors: u64,
    pub rps: f64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

/// Every node's recent digests.
#[derive(Debug)]
pub struct MeshStats {
    /// How far back digests are kept (the longest window a query may ask for).
    keep: Duration,
    by_node: BTreeMap<String, VecDeque<StatsDigest>>,
}

impl MeshStats {
    pub fn new(keep: Duration) -> MeshStats {
        MeshStats { keep, by_node: BTreeMap::new() }
    }

    /// Keeps `node`'s digest (one per interval start: a repeat replaces), and drops its
    /// digests older than `keep` before its newest.
    pub fn add(&mut self, node: &str, d: StatsDigest) {
        let list = self.by_node.entry(node.to_string()).or_default();
        list.retain(|old| old.start_ms != d.start_ms);
        let at = list.partition_point(|old| old.start_ms < d.start_ms);
        list.insert(at, d);
        let newest = list.back().map_or(0, |n| n.start_ms);
        let keep_ms = self.keep.as_millis() as u64;
        while list.front().is_some_and(|o| o.start_ms + keep_ms < newest) {
            list.pop_front();
        }
    }

    /// Forgets nodes `alive` does not name (they left or are down).
    pub fn retain_nodes(&mut self, alive: impl Fn(&str) -> bool) {
        self.by_node.retain(|n, _| alive(n));
    }

    /// Per service, one point per interval that ended within `window` before `now_ms`,
    /// merged across nodes: their intervals line up, being aligned to the wall clock.
    pub fn series(&self, window: Duration, now_ms: u64) -> BTreeMap<String, Vec<Point>> {
        points(&self.held(None, By::Service, window, now_ms, true))
    }

    /// The merged answer over the digests that ended within `window` before `now_ms`,
    /// for `service` (all when None), grouped by `by`, busiest first.
    pub fn query(&self, service: Option<&str>, by: By, window: Duration, now_ms: u64) -> Vec<Row> {
        rows(&self.held(service, by, window, now_ms, false), window)
    }

    /// What this node keeps for a query, per service, merged over the window: groups named
    /// by `by`, or one group per interval when `series`. At most [`MAX_GROUPS`] groups in
    /// all, the busiest kept.
    pub fn held(&self, service: Option<&str>, by: By, window: Duration, now_ms: u64, series: bool) -> Vec<StatsHeld> {
        let since = now_ms.saturating_sub(window.as_millis() as u64);
        // Per service: how much of the window any source covers, and the groups.
        type Groups = BTreeMap<(String, u64), (Counts, u32)>;
        let mut per: BTreeMap<String, (u64, Groups)> = BTreeMap::new();
        for (node, list) in &self.by_node {
            let recent: Vec<&StatsDigest> = list.iter().filter(|d| d.start_ms + u64::from(d.len_ms) > since).collect();
            let covered: u64 = recent.iter().map(|d| u64::from(d.len_ms)).sum();
            let newest = list.back().map(|d| d.start_ms);
            for d in recent {
                for r in d.rows.iter().filter(|r| service.is_none_or(|s| s == r.service)) {
                    let (cov, groups) = per.entry(r.service.clone()).or_default();
                    *cov = (*cov).max(covered);
                    let key = if series { (String::new(), d.start_ms) } else { (group_name(by, node, r), 0) };
                    let (c, len) = groups.entry(key).or_default();
                    c.requests += r.requests;
                    c.errors += r.errors;
                    c.latency.merge(&Histogram::from_sparse(&r.latency));
                    *len = (*len).max(d.len_ms);
                    if !series && Some(d.start_ms) == newest {
                        c.tcp_open += r.tcp_open;
                    }
                }
            }
        }
        let mut held: Vec<StatsHeld> = per
            .into_iter()
            .map(|(service, (covered_ms, groups))| StatsHeld {
                service,
                covered_ms,
                groups: groups
                    .into_iter()
                    .map(|((name, start_ms), (c, len_ms))| StatsGroup {
                        name,
                        start_ms,
                        len_ms,
                        requests: c.requests,
                        errors: c.errors,
                        latency: c.latency.sparse(),
                        tcp_open: c.tcp_open,
                    })
                    .collect(),
            })
            .collect();
        cap_groups(&mut held);
        held
    }
}

/// The route dimension of a row: the route's name, then `#<subset>` when the request went
/// to a subset and both fit the wire's name length (older agents see one more route name).
pub fn route_key<'a>(route: &'a str, subset: Option<&str>) -> std::borrow::Cow<'a, str> {
    match subset {
        Some(s) if route.len() + 1 + s.len() <= trellis_proto::limits::MAX_NAME_LEN => format!("{route}#{s}").into(),
        _ => route.into(),
    }
}

/// A row's group under `by`, from `node`'s digest.
fn group_name(by: By, node: &str, r: &StatsRow) -> String {
    let or_dash = |s: &str| if s.is_empty() { "-".to_string() } else { s.to_string() };
    let (route, subset) = r.route.split_once('#').unwrap_or((&r.route, ""));
    match by {
        By::Service => r.service.clone(),
        By::Route => or_dash(route),
        By::Subset => or_dash(subset),
        By::Source => node.to_string(),
        By::Node => or_dash(&r.dest),
        By::Edge => format!("{node} -> {}@{}", r.service, or_dash(&r.dest)),
    }
}

/// Keeps the [`MAX_GROUPS`] busiest groups of an answer (an edge view of a large mesh has
/// more); the least busy go first.
fn cap_groups(held: &mut [StatsHeld]) {
    let total: usize = held.iter().map(|h| h.groups.len()).sum();
    if total <= MAX_GROUPS {
        return;
    }
    let mut sizes: Vec<u64> = held.iter().flat_map(|h| h.groups.iter().map(|g| g.requests)).collect();
    sizes.sort_unstable_by(|a, b| b.cmp(a));
    let floor = sizes[MAX_GROUPS - 1];
    let mut at_floor = MAX_GROUPS - sizes.iter().filter(|&&n| n > floor).count();
    for h in held.iter_mut() {
        h.groups.retain(|g| match g.requests.cmp(&floor) {
            std::cmp::Ordering::Greater => true,
            std::cmp::Ordering::Equal if at_floor > 0 => {
                at_floor -= 1;
                true
            }
            _ => false,
        });
    }
}

/// Of several nodes' answers for the same service (its owners), the one that covers the
/// most of the window, then the one with the most requests: replicas hold the same rows,
/// so merging them would count twice.
pub fn pick(answers: impl IntoIterator<Item = StatsHeld>) -> Vec<StatsHeld> {
    let mut best: BTreeMap<String, StatsHeld> = BTreeMap::new();
    let weight = |h: &StatsHeld| (h.covered_ms, h.groups.iter().map(|g| g.requests).sum::<u64>());
    for h in answers {
        match best.get(&h.service) {
            Some(b) if weight(b) >= weight(&h) => {}
            _ => {
                best.insert(h.service.clone(), h);
            }
        }
    }
    best.into_values().collect()
}

/// The rows of an answer: groups of the same name merged across services, busiest first;
/// rates over the covered part of `window`.
pub fn rows(held: &[StatsHeld], window: Duration) -> Vec<Row> {
    let mut groups: BTreeMap<&str, Counts> = BTreeMap::new();
    for g in held.iter().flat_map(|h| &h.groups) {
        let c = groups.entry(&g.name).or_default();
        c.requests += g.requests;
        c.errors += g.errors;
        c.latency.merge(&Histogram::from_sparse(&g.latency));
        c.tcp_open += g.tcp_open;
    }
    let covered_ms = held.iter().map(|h| h.covered_ms).max().unwrap_or(0);
    let secs = (covered_ms.min(window.as_millis() as u64) as f64 / 1000.0).max(1e-3);
    let ms = |q: f64, h: &Histogram| h.quantile(q).map(|d| d.as_secs_f64() * 1000.0);
    let mut rows: Vec<Row> = groups
        .into_iter()
        .filter(|(_, c)| c.requests > 0 || c.tcp_open > 0)
        .map(|(name, c)| Row {
            name: name.to_string(),
            requests: c.requests,
            errors: c.errors,
            success: (c.requests > 0).then(|| 1.0 - c.errors as f64 / c.requests as f64),
            rps: c.requests as f64 / secs,
            p50_ms: ms(0.5, &c.latency),
            p95_ms: ms(0.95, &c.latency),
            p99_ms: ms(0.99, &c.latency),
            tcp_open: c.tcp_open,
        })
        .collect();
    rows.sort_by(|a, b| b.requests.cmp(&a.requests).then(a.name.cmp(&b.name)));
    rows
}

/// Per service, the points of a series answer in time order.
pub fn points(held: &[StatsHeld]) -> BTreeMap<String, Vec<Point>> {
    let ms = |q: f64, h: &Histogram| h.quantile(q).map(|d| d.as_secs_f64() * 1000.0);
    held.iter()
        .map(|h| {
            let mut groups: Vec<&StatsGroup> = h.groups.iter().collect();
            groups.sort_by_key(|g| g.start_ms);
            let points = groups
                .into_iter()
                .map(|g| {
                    let latency = Histogram::from_sparse(&g.latency);
                    Point {
                        start_ms: g.start_ms,
                        requests: g.requests,
                        errors: g.errors,
                        rps: g.requests as f64 * 1000.0 / f64::from(g.len_ms.max(1)),
                        p50_ms: ms(0.5, &latency),
                        p99_ms: ms(0.99, &latency),
                    }
                })
                .collect();
            (h.service.clone(), points)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn quantiles_come_within_a_bucket_of_the_truth() {
        let mut h = Histogram::default();
        for i in 1..=1000 {
            h.record(Duration::from_micros(i * 100));
        }
        for (q, truth) in [(0.5, 50.0), (0.95, 95.0), (0.99, 99.0)] {
            let got = h.quantile(q).unwrap().as_secs_f64() * 1000.0;
            assert!(got >= truth && got <= truth * 1.2, "q{q}: {got} ms against {truth}");
        }
        assert_eq!(Histogram::default().quantile(0.5), None);
        let mut slow = Histogram::default();
        slow.record(Duration::from_secs(3600));
        assert_eq!(slow.sparse(), vec![(BUCKETS as u16 - 1, 1)], "the last bucket takes the rest");
        assert_eq!(Histogram::from_sparse(&h.sparse()), h);
    }

    fn digest(start_ms: u64, rows: &[(&str, &str, u64, u64, u64)]) -> StatsDigest {
        let mut r = Recorder::default();
        for (service, dest, ok, bad, took) in rows {
            for i in 0..ok + bad {
                r.request(service, "", dest, i < *bad, ms(*took));
            }
        }
        r.close(start_ms, 1000)
    }

    #[test]
    fn the_mesh_answer_merges_every_nodes_counts_whatever_their_order() {
        let d1 = digest(10_000, &[("web", "n3", 90, 10, 2)]);
        let d2 = digest(10_000, &[("web", "n3", 50, 0, 20), ("db", "n4", 5, 0, 1)]);
        let d3 = digest(11_000, &[("web", "n2", 100, 0, 2)]);
        let mut a = MeshStats::new(Duration::from_secs(60));
        let mut b = MeshStats::new(Duration::from_secs(60));
        for (node, d) in [("n1", &d1), ("n2", &d2), ("n1", &d3)] {
            a.add(node, d.clone());
        }
        for (node, d) in [("n1", &d3), ("n2", &d2), ("n1", &d1)] {
            b.add(node, d.clone());
        }
        let now = 12_000;
        let rows = a.query(Some("web"), By::Service, Duration::from_secs(10), now);
        assert_eq!(rows, b.query(Some("web"), By::Service, Duration::from_secs(10), now));
        assert_eq!((rows.len(), rows[0].requests, rows[0].errors), (1, 250, 10));
        assert_eq!(rows[0].success, Some(0.96));
        assert!((rows[0].rps - 125.0).abs() < 1e-9, "250 over n1's 2 s of digests: {}", rows[0].rps);
        let by_source = a.query(Some("web"), By::Source, Duration::from_secs(10), now);
        let names: Vec<(&str, u64)> = by_source.iter().map(|r| (r.name.as_str(), r.requests)).collect();
        assert_eq!(names, [("n1", 200), ("n2", 50)]);
        let edges = a.query(Some("web"), By::Edge, Duration::from_secs(10), now);
        let names: Vec<(&str, u64)> = edges.iter().map(|r| (r.name.as_str(), r.requests)).collect();
        assert_eq!(names, [("n1 -> web@n2", 100), ("n1 -> web@n3", 100), ("n2 -> web@n3", 50)]);
        let by_node = a.query(None, By::Node, Duration::from_secs(10), now);
        let names: Vec<(&str, u64)> = by_node.iter().map(|r| (r.name.as_str(), r.requests)).collect();
        assert_eq!(names, [("n3", 150), ("n2", 100), ("n4", 5)]);
        // A window of one second sees only the newest interval.
        let last = a.query(Some("web"), By::Service, Duration::from_secs(1), now);
        assert_eq!(last[0].requests, 100);
    }

    #[test]
    fn a_series_has_one_point_per_interval_merged_across_nodes() {
        let mut m = MeshStats::new(Duration::from_secs(60));
        m.add("n1", digest(10_000, &[("web", "n3", 90, 10, 2)]));
        m.add("n2", digest(10_000, &[("web", "n3", 50, 0, 2)]));
        m.add("n1", digest(11_000, &[("web", "n3", 20, 0, 2), ("db", "n4", 5, 0, 1)]));
        let s = m.series(Duration::from_secs(60), 12_000);
        let web: Vec<(u64, u64, u64, f64)> =
            s["web"].iter().map(|p| (p.start_ms, p.requests, p.errors, p.rps)).collect();
        assert_eq!(web, [(10_000, 150, 10, 150.0), (11_000, 20, 0, 20.0)]);
        assert_eq!(s["db"].len(), 1);
        assert_eq!(m.series(Duration::from_secs(1), 12_000)["web"].len(), 1, "the window cuts older points");
    }

    #[test]
    fn repeats_replace_old_digests_age_out_and_departed_nodes_go() {
        let mut m = MeshStats::new(Duration::from_secs(5));
        m.add("n1", digest(1_000, &[("web", "n2", 1, 0, 1)]));
        m.add("n1", digest(1_000, &[("web", "n2", 3, 0, 1)]));
        assert_eq!(m.query(None, By::Service, Duration::from_secs(60), 2_000)[0].requests, 3, "a repeat replaces");
        m.add("n1", digest(10_000, &[("web", "n2", 7, 0, 1)]));
        assert_eq!(m.query(None, By::Service, Duration::from_secs(60), 11_000)[0].requests, 7, "older than keep");
        m.retain_nodes(|n| n != "n1");
        assert!(m.query(None, By::Service, Duration::from_secs(60), 11_000).is_empty());
    }

    #[test]
    fn tcp_connections_count_from_each_sources_newest_interval() {
        let mut r = Recorder::default();
        r.tcp_open("db", 4);
        let first = r.close(1_000, 1000);
        r.tcp_open("db", 2);
        let second = r.close(2_000, 1000);
        let mut m = MeshStats::new(Duration::from_secs(60));
        m.add("n1", first);
        m.add("n1", second);
        m.add("n2", digest(2_000, &[("db", "n3", 1, 0, 1)]));
        let rows = m.query(Some("db"), By::Service, Duration::from_secs(10), 3_000);
        assert_eq!((rows[0].tcp_open, rows[0].requests), (2, 1));
    }

    #[test]
    fn answers_from_owners_merge_without_counting_replicas_twice() {
        // Two owners of web hold the same rows; the newer one holds only the last interval.
        let (mut full, mut fresh, mut db) = (
            MeshStats::new(Duration::from_secs(60)),
            MeshStats::new(Duration::from_secs(60)),
            MeshStats::new(Duration::from_secs(60)),
        );
        full.add("n1", digest(10_000, &[("web", "n3", 90, 10, 2)]));
        full.add("n1", digest(11_000, &[("web", "n3", 100, 0, 2)]));
        fresh.add("n1", digest(11_000, &[("web", "n3", 100, 0, 2)]));
        db.add("n1", digest(11_000, &[("db", "n3", 5, 0, 1)]));
        let window = Duration::from_secs(10);
        let ask = |m: &MeshStats, by| m.held(None, by, window, 12_000, false);
        let mut answers = ask(&fresh, By::Node);
        answers.extend(ask(&full, By::Node));
        answers.extend(ask(&db, By::Node));
        let held = pick(answers);
        assert_eq!(held.len(), 2, "one answer per service");
        let rows = rows(&held, window);
        let got: Vec<(&str, u64, u64)> = rows.iter().map(|r| (r.name.as_str(), r.requests, r.errors)).collect();
        assert_eq!(got, [("n3", 205, 10)], "web from the owner holding both intervals, plus db, merged by node");
        assert!((rows[0].rps - 102.5).abs() < 1e-9, "over the 2 s covered: {}", rows[0].rps);
        // A series answer gives the same points as the store it came from.
        assert_eq!(points(&pick(full.held(None, By::Service, window, 12_000, true))), full.series(window, 12_000));
    }

    #[test]
    fn an_answer_keeps_its_busiest_groups() {
        let mut m = MeshStats::new(Duration::from_secs(60));
        let row = |i: usize| StatsRow {
            service: "web".into(),
            route: String::new(),
            dest: format!("n{i}"),
            requests: 1 + (i % 3) as u64,
            errors: 0,
            latency: vec![(3, 1)],
            tcp_open: 0,
        };
        let rows: Vec<StatsRow> = (0..MAX_GROUPS + 100).map(row).collect();
        // Spread over sources so no digest passes the row bound.
        for (k, chunk) in rows.chunks(MAX_ROWS).enumerate() {
            m.add(&format!("src{k}"), StatsDigest { start_ms: 10_000, len_ms: 1000, rows: chunk.to_vec() });
        }
        let held = m.held(Some("web"), By::Edge, Duration::from_secs(10), 12_000, false);
        let groups: Vec<u64> = held.iter().flat_map(|h| h.groups.iter().map(|g| g.requests)).collect();
        assert_eq!(groups.len(), MAX_GROUPS);
        assert_eq!(
            groups.iter().filter(|&&n| n == 3).count(),
            (0..MAX_GROUPS + 100).filter(|i| i % 3 == 2).count(),
            "every busiest group kept"
        );
    }

    #[test]
    fn the_closing_interval_is_the_one_that_just_ended() {
        assert_eq!(closing_interval(20_005, 10_000), 10_000);
        assert_eq!(closing_interval(29_999, 10_000), 10_000);
        assert_eq!(closing_interval(5, 10_000), 0);
    }

    #[test]
    fn a_recorder_folds_rows_past_the_bound() {
        let mut r = Recorder::default();
        for i in 0..MAX_ROWS + 10 {
            r.request(&format!("s{i}"), "", "n", false, ms(1));
        }
        let d = r.close(0, 1000);
        assert_eq!(d.rows.len(), MAX_ROWS);
        assert_eq!(r.folded, 11);
        assert_eq!(d.rows.iter().map(|r| r.requests).sum::<u64>(), (MAX_ROWS + 10) as u64);
    }
}
