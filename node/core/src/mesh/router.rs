//! L7 routing decisions from policy: which service (and which subset of its instances) a
//! request goes to. Sans-IO: the random draw for splits is an argument, so tests are exact.
//!
//! Order: the routes of the requested service by descending `priority`, then by name; the
//! first that matches decides. With no matching route, a split whose `service` is the
//! requested one applies (the first by name); otherwise the service itself, any instance.

use std::collections::BTreeMap;

use crate::policy::model::{Destination, Object, PathMatch, Route, Split, Subset, ValueMatch};
use crate::policy::{Kind, PolicyStore};

use super::headers::Headers;

/// What the router needs to know of a request.
pub struct RequestInfo<'a> {
    pub service: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub query: &'a str,
    pub headers: &'a dyn Headers,
}

/// Where a request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub service: String,
    /// Instances must carry all of these labels.
    pub labels: BTreeMap<String, String>,
    pub route: Option<String>,
    /// (matched prefix, replacement) when the route rewrites.
    pub rewrite: Option<(String, String)>,
    /// The subset the request went to, when a route or split named one: the mesh-wide
    /// figures of a canary against its stable subset come from it.
    pub subset: Option<String>,
}

#[derive(Debug, Default, Clone)]
pub struct RouteTable {
    routes: Vec<(String, Route)>,
    splits: Vec<(String, Split)>,
    subsets: BTreeMap<String, Subset>,
    /// Every regex the routes use, compiled once per policy view, not per request.
    regexes: std::collections::HashMap<String, regex::Regex>,
}

impl RouteTable {
    /// The `subsets/<name>` policy, when there is one.
    pub fn subset_named(&self, name: &str) -> Option<&Subset> {
        self.subsets.get(name)
    }

    #[cfg(test)]
    pub(crate) fn insert_subset(&mut self, name: &str, s: Subset) {
        self.subsets.insert(name.to_string(), s);
    }

    pub fn from_store(store: &PolicyStore) -> RouteTable {
        let mut t = RouteTable::default();
        let kinds = [Kind::Routes, Kind::Splits, Kind::Subsets];
        for (k, obj) in kinds.into_iter().flat_map(|kind| store.objects(kind)) {
            match obj {
                Object::Route(route) => t.routes.push((k.name.clone(), route)),
                Object::Split(s) => t.splits.push((k.name.clone(), s)),
                Object::Subset(s) => {
                    t.subsets.insert(k.name.clone(), s);
                }
                _ => {}
            }
        }
        t.routes.sort_by(|a, b| b.1.priority.cmp(&a.1.priority).then(a.0.cmp(&b.0)));
        t.regexes = t
            .routes
            .iter()
            .flat_map(|(_, r)| regexes_of(r))
            .filter_map(|re| Some((re.to_string(), regex::Regex::new(re).ok()?)))
            .collect();
        t
    }

    /// The route named `name` (for its timeout and retry policy).
    pub fn route(&self, name: &str) -> Option<&Route> {
        self.routes.iter().find(|(n, _)| n == name).map(|(_, r)| r)
    }

    /// The labels of the subset a request on `route` is mirrored to, when `draw` (uniform
    /// in [0, 1), drawn apart from the split's) falls within the route's mirror share and
    /// the subset exists for the route's service.
    pub fn mirror(&self, route: &str, draw: f64) -> Option<(&str, &BTreeMap<String, String>)> {
        let r = self.route(route)?;
        let m = r.mirror.as_ref().filter(|m| draw * 100.0 < m.percent)?;
        let subset = self.subsets.get(&m.subset).filter(|s| s.service == r.service)?;
        Some((m.subset.as_str(), &subset.labels))
    }

    /// Resolves a request; `draw` is uniform in [0, 1) and picks a split backend.
    pub fn resolve(&self, req: &RequestInfo, draw: f64) -> Resolved {
        for (name, r) in self.routes.iter().filter(|(_, r)| r.service == req.service) {
            if let Some(prefix) = matches(r, req, &self.regexes) {
                let mut out = self.destination(&r.destination, req.service, draw);
                out.route = Some(name.clone());
                out.rewrite = r.rewrite_prefix.clone().map(|to| (prefix, to));
                return out;
            }
        }
        if let Some((_, split)) = self.splits.iter().find(|(_, s)| s.service == req.service) {
            return self.split(split, draw);
        }
        self.plain(req.service)
    }

    fn plain(&self, service: &str) -> Resolved {
        Resolved { service: service.into(), labels: BTreeMap::new(), route: None, rewrite: None, subset: None }
    }

    fn subset(&self, name: &str, fallback: &str) -> Resolved {
        match self.subsets.get(name) {
            Some(s) => Resolved {
                service: s.service.clone(),
                labels: s.labels.clone(),
                route: None,
                rewrite: None,
                subset: Some(name.to_string()),
            },
            // A destination naming a missing subset goes nowhere rather than everywhere.
            None => Resolved {
                service: fallback.into(),
                labels: [("trellis.missing-subset".to_string(), name.to_string())].into(),
                route: None,
                rewrite: None,
                subset: None,
            },
        }
    }

    fn destination(&self, d: &Destination, service: &str, draw: f64) -> Resolved {
        if let Some(s) = &d.service {
            return self.plain(s);
        }
        if let Some(s) = &d.subset {
            return self.subset(s, service);
        }
        if let Some(name) = &d.split {
            if let Some((_, split)) = self.splits.iter().find(|(n, _)| n == name) {
                return self.split(split, draw);
            }
        }
        self.plain(service)
    }

    fn split(&self, split: &Split, draw: f64) -> Resolved {
        let mut at = draw.clamp(0.0, 0.999_999) * 100.0;
        for b in &split.backends {
            if at < f64::from(b.weight) {
                return match (&b.service, &b.subset) {
                    (Some(s), _) => self.plain(s),
                    (None, Some(sub)) => self.subset(sub, &split.service),
                    (None, None) => self.plain(&split.service),
                };
            }
            at -= f64::from(b.weight);
        }
        self.plain(&split.service)
    }
}

/// The regexes a route's match uses.
fn regexes_of(r: &Route) -> impl Iterator<Item = &str> {
    let m = &r.matches;
    let path = match &m.path {
        Some(PathMatch::Regex(re)) => Some(re.as_str()),
        _ => None,
    };
    path.into_iter().chain(m.headers.iter().chain(&m.query).filter_map(|v| v.regex.as_deref()))
}

/// Whether a route matches; returns the path prefix it matched on (for rewrites).
/// `regexes` holds the route's compiled regexes (one missing failed to compile: no match).
fn matches(r: &Route, req: &RequestInfo, regexes: &std::collections::HashMap<String, regex::Regex>) -> Option<String> {
    let is_match = |re: &str, v: &str| regexes.get(re).is_some_and(|re| re.is_match(v));
    let m = &r.matches;
    let prefix = match &m.path {
        None => String::new(),
        Some(PathMatch::Exact(p)) => (req.path == p).then(|| p.clone())?,
        // By segments: `/api` matches `/api` and `/api/x`, never `/apiary`.
        Some(PathMatch::Prefix(p)) => {
            super::authz::segment_prefix(p, req.path).then(|| p.trim_end_matches('/').to_string())?
        }
        Some(PathMatch::Regex(re)) => is_match(re, req.path).then(String::new)?,
    };
    if !m.methods.is_empty() && !m.methods.iter().any(|x| x.eq_ignore_ascii_case(req.method)) {
        return None;
    }
    let query: Vec<(&str, &str)> =
        req.query.split('&').filter(|kv| !kv.is_empty()).map(|kv| kv.split_once('=').unwrap_or((kv, ""))).collect();
    let value_ok = |w: &ValueMatch, v: &str| {
        w.exact.as_ref().is_none_or(|e| e == v) && w.regex.as_ref().is_none_or(|re| is_match(re, v))
    };
    let headers_ok = m.headers.iter().all(|w| req.headers.any(&w.name, &mut |v| value_ok(w, v)));
    let query_ok = m.query.iter().all(|w| query.iter().any(|(k, v)| *k == w.name && value_ok(w, v)));
    (headers_ok && query_ok).then_some(prefix)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::store::PolicyStore;

    fn table(objects: &[(Kind, &str, &str)]) -> RouteTable {
        let mut s = PolicyStore::new("t");
        for (k, n, body) in objects {
            let key = crate::policy::Key { kind: *k, name: n.to_string() };
            let r = s.prepare(1000, &key, Some(body.as_bytes()), None).unwrap();
            s.commit(key, r);
        }
        RouteTable::from_store(&s)
    }

    fn req<'a>(path: &'a str, headers: &'a dyn Headers) -> RequestInfo<'a> {
        RequestInfo { service: "web", method: "GET", path, query: "", headers }
    }

    #[test]
    fn ninety_ten_split_holds_within_two_points_over_ten_thousand_requests() {
        let t = table(&[
            (Kind::Subsets, "v1", r#"{"service": "web", "labels": {"version": "v1"}}"#),
            (Kind::Subsets, "v2", r#"{"service": "web", "labels": {"version": "v2"}}"#),
            (
                Kind::Splits,
                "web-canary",
                r#"{"service": "web", "backends": [{"subset": "v1", "weight": 90}, {"subset": "v2", "weight": 10}]}"#,
            ),
        ]);
        let mut x: u64 = 12345;
        let mut v2 = 0;
        for _ in 0..10_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let draw = (x >> 11) as f64 / (1u64 << 53) as f64;
            if t.resolve(&req("/", &[]), draw).labels["version"] == "v2" {
                v2 += 1;
            }
        }
        assert!((800..=1200).contains(&v2), "v2 got {v2} of 10000");
    }

    #[test]
    fn a_mirror_takes_its_share_of_a_routes_requests_to_an_existing_subset_of_its_service() {
        let route = |subset: &str, percent: u32| {
            format!(
                r#"{{"service": "web", "destination": {{"service": "web"}}, "mirror": {{"subset": "{subset}", "percent": {percent}}}}}"#
            )
        };
        let (main, wrong) = (route("shadow", 25), route("other", 100));
        let shadow = r#"{"service": "web", "labels": {"version": "v9"}}"#;
        let other = r#"{"service": "db", "labels": {"version": "v9"}}"#;
        let t = table(&[
            (Kind::Subsets, "shadow", shadow),
            (Kind::Subsets, "other", other),
            (Kind::Routes, "main", &main),
            (Kind::Routes, "wrong", &wrong),
        ]);
        let mirrored = (0..1000).filter(|i| t.mirror("main", *i as f64 / 1000.0).is_some()).count();
        assert_eq!(mirrored, 250);
        assert_eq!(t.mirror("main", 0.1).unwrap().1["version"], "v9");
        assert!(t.mirror("wrong", 0.0).is_none(), "a subset of another service is not a mirror");
        assert!(t.mirror("nope", 0.0).is_none());
    }

    #[test]
    fn routes_match_by_priority_then_name_and_rewrite_prefixes() {
        let t = table(&[
            (
                Kind::Routes,
                "a-api",
                r#"{"service": "web", "priority": 1, "match": {"path": {"prefix": "/api"}}, "destination": {"service": "api"}, "rewrite_prefix": "/"}"#,
            ),
            (
                Kind::Routes,
                "b-api-v2",
                r#"{"service": "web", "priority": 5, "match": {"path": {"prefix": "/api"}, "headers": [{"name": "x-canary", "exact": "1"}]}, "destination": {"service": "api-next"}}"#,
            ),
        ]);
        let canary = [("X-Canary".to_string(), "1".to_string())];
        assert_eq!(t.resolve(&req("/api/x", &canary), 0.5).service, "api-next");
        let r = t.resolve(&req("/api/x", &[]), 0.5);
        assert_eq!((r.service.as_str(), r.route.as_deref()), ("api", Some("a-api")));
        assert_eq!(r.rewrite, Some(("/api".into(), "/".into())));
        assert_eq!(t.resolve(&req("/home", &[]), 0.5).service, "web");
        assert_eq!(t.resolve(&req("/apiary", &[]), 0.5).service, "web", "a prefix matches whole segments");
        assert_eq!(t.resolve(&req("/api", &[]), 0.5).service, "api");
    }
}
