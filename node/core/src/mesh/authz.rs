//! Authorization of service traffic by intentions: who (caller identity) may reach which
//! service, and for HTTP services which requests. Sans-IO: the caller identity comes from
//! the peer certificate (or is this node's own for local callers), checked by the shell.
//!
//! Precedence, most specific first (as Consul orders intentions and then their L7
//! permissions):
//! 1. a named source (the calling node, or the calling service as `svc:<name>`) beats `*`;
//!    a node and a service rank alike, so between an allow of one and a deny of the
//!    other the deny wins (a node's deny covers every service it vouches for);
//! 2. then the path rule: an exact path beats a prefix, a longer prefix a shorter one,
//!    and any path rule beats none;
//! 3. then an intention naming methods beats one that does not;
//! 4. then more header conditions beat fewer;
//! 5. at equal specificity deny beats allow. With no match, the mesh default applies.
//!
//! Paths are compared after normalization (`//`, `.` and `..` segments resolved,
//! percent-encoded unreserved characters decoded), so `/./admin` meets a rule on `/admin`.
//! An opaque TCP stream cannot be looked into: there an L7 deny counts as matching and an
//! L7 allow does not, so a rule that cannot be checked fails closed.

use crate::policy::model::{Action, Intention, ValueMatch};

use super::headers::Headers;

/// Who calls: the node (the SPIFFE id of its certificate, or this node's own for local
/// callers) and, when the calling agent recognised it, the calling service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub node: std::sync::Arc<str>,
    pub service: Option<std::sync::Arc<str>>,
}

impl Caller {
    pub fn node(node: &str) -> Caller {
        Caller { node: node.into(), service: None }
    }
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.service {
            Some(s) => write!(f, "{}{s}@{}", crate::policy::model::SERVICE_SOURCE, self.node),
            None => f.write_str(&self.node),
        }
    }
}

/// What an L7 decision sees of an HTTP request.
pub struct HttpRequest<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub headers: &'a dyn Headers,
}

/// How specific a matching intention is; compared field by field, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Rank {
    source: u8,
    path: u32,
    methods: u8,
    headers: u32,
}

/// Decides for a caller, a destination and (for HTTP services) the request.
pub fn decide<'a>(
    intentions: impl Iterator<Item = &'a Intention>,
    default: Action,
    caller: &Caller,
    service: &str,
    req: Option<&HttpRequest>,
) -> Action {
    let path = req.map(|r| normalize(r.path));
    let mut best: Option<(Rank, Action)> = None;
    for i in intentions.filter(|i| i.destination == service) {
        let Some(rank) = rank(i, caller, req, path.as_deref()) else { continue };
        best = match best {
            Some((r, a)) if r > rank || (r == rank && a == Action::Deny) => Some((r, a)),
            _ => Some((rank, i.action)),
        };
    }
    best.map(|(_, a)| a).unwrap_or(default)
}

/// Does any intention for `service` look into requests? Then its streams are served
/// request by request at the destination.
pub fn has_l7<'a>(mut intentions: impl Iterator<Item = &'a Intention>, service: &str) -> bool {
    intentions.any(|i| i.destination == service && i.is_l7())
}

/// The rank of `i` for this request, or None when it does not apply.
fn rank(i: &Intention, caller: &Caller, req: Option<&HttpRequest>, path: Option<&str>) -> Option<Rank> {
    let by_service = |svc: &str| caller.service.as_deref() == Some(svc);
    let source = match i.source.as_str() {
        "*" => 1,
        s if s == &*caller.node => 2,
        s if s.strip_prefix(crate::policy::model::SERVICE_SOURCE).is_some_and(by_service) => 2,
        _ => return None,
    };
    let (req, path) = match (req, path) {
        (Some(r), Some(p)) => (r, p),
        // An opaque stream: only the deny side of an L7 rule applies (fails closed).
        _ if i.is_l7() && i.action == Action::Allow => return None,
        _ => return Some(Rank { source, path: best_path(&i.paths, None)?, methods: 0, headers: 0 }),
    };
    let methods = if i.methods.is_empty() {
        0
    } else if i.methods.iter().any(|m| m.eq_ignore_ascii_case(req.method)) {
        1
    } else {
        return None;
    };
    if !i.headers.iter().all(|h| header_matches(h, req.headers)) {
        return None;
    }
    Some(Rank { source, path: best_path(&i.paths, Some(path))?, methods, headers: i.headers.len() as u32 })
}

/// The score of the most specific rule in `paths` that matches `path` (every rule, for an
/// opaque stream); 0 when there are no rules, None when rules exist and none matches.
fn best_path(paths: &[String], path: Option<&str>) -> Option<u32> {
    if paths.is_empty() {
        return Some(0);
    }
    paths.iter().filter_map(|rule| path_score(rule, path)).max()
}

const EXACT: u32 = 1 << 20;

fn path_score(rule: &str, path: Option<&str>) -> Option<u32> {
    match rule.strip_suffix("/*") {
        Some(stem) => {
            let ok = path.is_none_or(|p| segment_prefix(stem, p));
            ok.then_some(1 + stem.len().min(EXACT as usize - 2) as u32)
        }
        None => path.is_none_or(|p| p == rule).then_some(EXACT),
    }
}

/// `/api` is a prefix of `/api` and `/api/x`, not of `/apiary`; `` and `/` are of all.
pub fn segment_prefix(prefix: &str, path: &str) -> bool {
    let stem = prefix.trim_end_matches('/');
    stem.is_empty() || path == stem || path.strip_prefix(stem).is_some_and(|rest| rest.starts_with('/'))
}

fn header_matches(want: &ValueMatch, have: &dyn Headers) -> bool {
    have.any(&want.name, &mut |v| {
        want.exact.as_ref().is_none_or(|e| e == v)
            && want.regex.as_ref().is_none_or(|re| regex::Regex::new(re).is_ok_and(|re| re.is_match(v)))
    })
}

/// The path as the rules see it: no query, `%XX` of unreserved characters decoded, empty
/// and `.` segments dropped, `..` taking the segment before it.
pub fn normalize(path: &str) -> String {
    let path = path.split(['?', '#']).next().unwrap_or("");
    let decoded = decode_unreserved(path);
    let mut out: Vec<&str> = Vec::new();
    for seg in decoded.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let trailing = decoded.len() > 1 && decoded.ends_with('/') && !out.is_empty();
    let mut s = format!("/{}", out.join("/"));
    if trailing {
        s.push('/');
    }
    s
}

fn decode_unreserved(path: &str) -> String {
    let b = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok());
            if let Some(c) = hex.filter(|c| c.is_ascii_alphanumeric() || b"-._~".contains(c)) {
                out.push(c as char);
                i += 3;
                continue;
            }
        }
        let c = path[i..].chars().next().expect("i is on a char boundary");
        out.push(c);
        i += c.len_utf8();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn i(source: &str, dest: &str, action: Action) -> Intention {
        Intention {
            source: source.into(),
            destination: dest.into(),
            action,
            paths: vec![],
            methods: vec![],
            headers: vec![],
        }
    }

    fn l7(action: Action, paths: &[&str], methods: &[&str]) -> Intention {
        Intention {
            paths: paths.iter().map(|p| p.to_string()).collect(),
            methods: methods.iter().map(|m| m.to_string()).collect(),
            ..i("*", "web", action)
        }
    }

    fn http<'a>(method: &'a str, path: &'a str) -> HttpRequest<'a> {
        HttpRequest { method, path, headers: &[] }
    }

    fn on(list: &[Intention], default: Action, method: &str, path: &str) -> Action {
        decide(list.iter(), default, &Caller::node("spiffe://c/node/a"), "web", Some(&http(method, path)))
    }

    #[test]
    fn exact_source_beats_wildcard_and_deny_beats_allow_at_equal_rank() {
        let me = "spiffe://c/node/a";
        let list = [i("*", "web", Action::Deny), i(me, "web", Action::Allow)];
        assert_eq!(decide(list.iter(), Action::Deny, &Caller::node(me), "web", None), Action::Allow);
        assert_eq!(decide(list.iter(), Action::Allow, &Caller::node("spiffe://c/node/b"), "web", None), Action::Deny);
        let both = [i(me, "web", Action::Allow), i(me, "web", Action::Deny)];
        assert_eq!(decide(both.iter(), Action::Allow, &Caller::node(me), "web", None), Action::Deny);
    }

    #[test]
    fn no_match_falls_back_to_the_default() {
        let list = [i("*", "db", Action::Deny)];
        assert_eq!(decide(list.iter(), Action::Allow, &Caller::node("x"), "web", None), Action::Allow);
        assert_eq!(decide(list.iter(), Action::Deny, &Caller::node("x"), "web", None), Action::Deny);
    }

    #[test]
    fn a_get_admin_deny_leaves_other_paths_and_methods_alone() {
        let list = [l7(Action::Deny, &["/admin"], &["GET"])];
        assert_eq!(on(&list, Action::Allow, "GET", "/admin"), Action::Deny);
        assert_eq!(on(&list, Action::Allow, "get", "/admin?x=1"), Action::Deny);
        assert_eq!(on(&list, Action::Allow, "GET", "/"), Action::Allow);
        assert_eq!(on(&list, Action::Allow, "POST", "/admin"), Action::Allow);
        assert_eq!(on(&list, Action::Allow, "GET", "/admin/x"), Action::Allow, "exact is exact");
    }

    #[test]
    fn path_tricks_meet_the_rule_they_try_to_avoid() {
        let list = [l7(Action::Deny, &["/admin/*"], &[])];
        for p in ["/admin", "/admin/", "//admin/x", "/./admin", "/x/../admin/y", "/%61dmin/y", "/admin/%2e%2e/admin"] {
            assert_eq!(on(&list, Action::Allow, "GET", p), Action::Deny, "{p}");
        }
        assert_eq!(on(&list, Action::Allow, "GET", "/administrator"), Action::Allow);
        assert_eq!(on(&list, Action::Allow, "GET", "/x/../api"), Action::Allow);
    }

    #[test]
    fn the_more_specific_rule_wins_and_deny_wins_ties() {
        // Allow /api/* but deny /api/internal/*: the longer prefix decides.
        let list = [l7(Action::Allow, &["/api/*"], &[]), l7(Action::Deny, &["/api/internal/*"], &[])];
        assert_eq!(on(&list, Action::Deny, "GET", "/api/users"), Action::Allow);
        assert_eq!(on(&list, Action::Deny, "GET", "/api/internal/keys"), Action::Deny);
        assert_eq!(on(&list, Action::Deny, "GET", "/other"), Action::Deny, "the default");
        // An exact path beats a prefix; a rule with methods beats one without.
        let list = [l7(Action::Deny, &["/api/*"], &[]), l7(Action::Allow, &["/api/health"], &[])];
        assert_eq!(on(&list, Action::Allow, "GET", "/api/health"), Action::Allow);
        let list = [l7(Action::Deny, &["/api/*"], &[]), l7(Action::Allow, &["/api/*"], &["GET"])];
        assert_eq!(on(&list, Action::Allow, "GET", "/api/x"), Action::Allow);
        assert_eq!(on(&list, Action::Allow, "DELETE", "/api/x"), Action::Deny);
        // Equal specificity: deny.
        let list = [l7(Action::Allow, &["/api/*"], &["GET"]), l7(Action::Deny, &["/api/*"], &["GET"])];
        assert_eq!(on(&list, Action::Allow, "GET", "/api/x"), Action::Deny);
        // An exact source outranks any L7 rule of `*`.
        let mine = Intention { source: "spiffe://c/node/a".into(), ..i("*", "web", Action::Allow) };
        let list = [l7(Action::Deny, &["/admin"], &[]), mine];
        assert_eq!(on(&list, Action::Deny, "GET", "/admin"), Action::Allow);
    }

    #[test]
    fn header_conditions_must_all_hold() {
        let mut rule = l7(Action::Deny, &[], &[]);
        rule.headers = vec![
            ValueMatch { name: "x-env".into(), exact: Some("prod".into()), regex: None },
            ValueMatch { name: "x-user".into(), exact: None, regex: Some("^bot-".into()) },
        ];
        let list = [rule];
        let h = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
        };
        let both = h(&[("X-Env", "prod"), ("x-user", "bot-7")]);
        let one = h(&[("x-env", "prod"), ("x-user", "alice")]);
        let r = |headers| {
            decide(
                list.iter(),
                Action::Allow,
                &Caller::node("c"),
                "web",
                Some(&HttpRequest { method: "GET", path: "/", headers }),
            )
        };
        assert_eq!(r(&both), Action::Deny);
        assert_eq!(r(&one), Action::Allow);
    }

    #[test]
    fn on_an_opaque_stream_l7_denies_fail_closed_and_l7_allows_do_not_apply() {
        let deny = [l7(Action::Deny, &["/admin"], &[])];
        assert_eq!(decide(deny.iter(), Action::Allow, &Caller::node("c"), "web", None), Action::Deny);
        let allow = [l7(Action::Allow, &["/public"], &[])];
        assert_eq!(decide(allow.iter(), Action::Deny, &Caller::node("c"), "web", None), Action::Deny);
        assert!(has_l7(deny.iter(), "web") && !has_l7(deny.iter(), "db"));
    }

    #[test]
    fn a_calling_service_is_named_by_svc_and_a_node_deny_still_wins() {
        let web = Caller { node: "spiffe://c/node/a".into(), service: Some("web".into()) };
        let batch = Caller { service: Some("batch".into()), ..web.clone() };
        let list = [i("svc:batch", "db", Action::Deny), i("*", "db", Action::Allow)];
        assert_eq!(decide(list.iter(), Action::Deny, &batch, "db", None), Action::Deny);
        assert_eq!(decide(list.iter(), Action::Deny, &web, "db", None), Action::Allow);
        assert_eq!(decide(list.iter(), Action::Deny, &Caller::node("spiffe://c/node/a"), "db", None), Action::Allow);
        // Allowing a service does not undo a deny of the node that vouches for it.
        let list = [i("svc:web", "db", Action::Allow), i("spiffe://c/node/a", "db", Action::Deny)];
        assert_eq!(decide(list.iter(), Action::Allow, &web, "db", None), Action::Deny);
        // Only the recognised service matches: an unrecognised caller is its node alone.
        let list = [i("svc:web", "db", Action::Allow)];
        assert_eq!(decide(list.iter(), Action::Deny, &Caller::node("spiffe://c/node/a"), "db", None), Action::Deny);
        assert_eq!(web.to_string(), "svc:web@spiffe://c/node/a");
    }

    #[test]
    fn prefixes_match_whole_segments() {
        assert!(
            segment_prefix("/api", "/api") && segment_prefix("/api", "/api/x") && segment_prefix("/api/", "/api/x")
        );
        assert!(!segment_prefix("/api", "/apiary"));
        assert!(segment_prefix("/", "/anything") && segment_prefix("", "/"));
        assert_eq!(normalize("/a//b/./c/../d?q=1"), "/a/b/d");
        assert_eq!(normalize("/a/%7Eb/%2F"), "/a/~b/%2F", "only unreserved characters are decoded");
        assert_eq!(normalize("/../.."), "/");
    }
}
