//! What the DNS interface answers, from the local catalog only (never recursing): the
//! names of the `trellis` domain, as Consul answers `.consul`.
//!
//! - `<service>.service.trellis` A/AAAA: healthy instances on live nodes, shuffled; SRV:
//!   their ports, each target an `<hex address>.addr.trellis` name whose A/AAAA record
//!   rides in the additional section. `_<service>._tcp.service.trellis` is the RFC 2782
//!   spelling of the same SRV question.
//! - `<subset>.<service>.service.trellis`: the instances a `subsets/<subset>` policy
//!   selects; `<id>.<service>.service.trellis`: the instance(s) registered with that id.
//! - `<node>.node.trellis`: a live node's address.
//! - `<service>.trellis`: the service's virtual address on this host (see `vip`).
//! - Other names in the domain: NXDOMAIN; names outside it: REFUSED.
//!
//! The wire format is the shell's (hickory); here are only names, records and codes.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use super::catalog::{InstanceView, Snapshot};
use crate::membership::AliveMembers;
use crate::policy::model::Health;

/// The domain answered.
pub const DOMAIN: &str = "trellis";
/// Seconds a client may cache an answer: short, so instances that fail a check or whose
/// node goes down leave answers within a few seconds.
pub const TTL: u32 = 5;

/// The record types answered; anything else gets an empty answer (NODATA) for a known name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Want {
    A,
    Aaaa,
    Srv,
    Any,
    Other,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    NoError,
    NxDomain,
    Refused,
}

/// One record of an answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rec {
    Addr { name: String, ip: IpAddr },
    Srv { name: String, port: u16, weight: u16, target: String },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub code: Code,
    pub answers: Vec<Rec>,
    pub additional: Vec<Rec>,
}

impl Answer {
    fn code(code: Code) -> Answer {
        Answer { code, answers: Vec::new(), additional: Vec::new() }
    }
}

/// A name of the domain, read.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Name<'a> {
    /// A service, or a subset or instance of it.
    Service {
        service: &'a str,
        within: Option<&'a str>,
    },
    Node(&'a str),
    Addr(&'a str),
    Virtual(&'a str),
}

/// The answer to `name` (any case, with or without the root dot) for `want`. `seed`
/// shuffles the addresses (the shell draws it per query); `vips` are this host's virtual
/// service addresses.
pub fn answer(
    name: &str,
    want: Want,
    snap: &Snapshot,
    alive: &AliveMembers,
    vips: &BTreeMap<String, Ipv4Addr>,
    seed: u64,
) -> Answer {
    let lower = name.trim_end_matches('.').to_ascii_lowercase();
    let Some(rest) = lower.strip_suffix(DOMAIN).filter(|r| r.is_empty() || r.ends_with('.')) else {
        return Answer::code(Code::Refused);
    };
    let labels: Vec<&str> = rest.trim_end_matches('.').split('.').filter(|l| !l.is_empty()).collect();
    match read(&labels) {
        Some(Name::Service { service, within }) => service_answer(&lower, service, within, want, snap, alive, seed),
        Some(Name::Node(node)) => match alive.get(node) {
            Some((addr, _)) => addresses(&lower, [addr.ip()].into_iter(), want),
            None => Answer::code(Code::NxDomain),
        },
        Some(Name::Virtual(service)) => match vips.get(service) {
            Some(ip) => addresses(&lower, [IpAddr::V4(*ip)].into_iter(), want),
            None => Answer::code(Code::NxDomain),
        },
        Some(Name::Addr(hex)) => match parse_hex_ip(hex) {
            Some(ip) => addresses(&lower, [ip].into_iter(), want),
            None => Answer::code(Code::NxDomain),
        },
        None => Answer::code(Code::NxDomain),
    }
}

/// The labels before the domain, read as one of the names answered.
fn read<'a>(labels: &[&'a str]) -> Option<Name<'a>> {
    match labels {
        [node, "node"] => Some(Name::Node(node)),
        [service] => Some(Name::Virtual(service)),
        [hex, "addr"] => Some(Name::Addr(hex)),
        [service, "service"] => Some(Name::Service { service, within: None }),
        [srv, proto, "service"] if proto.starts_with('_') => {
            Some(Name::Service { service: srv.strip_prefix('_')?, within: None })
        }
        [within, service, "service"] => Some(Name::Service { service, within: Some(within) }),
        _ => None,
    }
}

fn service_answer(
    name: &str,
    service: &str,
    within: Option<&str>,
    want: Want,
    snap: &Snapshot,
    alive: &AliveMembers,
    seed: u64,
) -> Answer {
    let known = snap.services.contains_key(service) || snap.instances.iter().any(|i| i.instance.service == service);
    if !known {
        return Answer::code(Code::NxDomain);
    }
    let serving = |i: &&InstanceView| {
        i.instance.service == service && i.instance.health != Health::Critical && alive.contains_key(&i.instance.node)
    };
    let mut picked: Vec<&InstanceView> = match within {
        None => snap.instances.iter().filter(serving).collect(),
        Some(w) => match snap.routes.subset_named(w).filter(|s| s.service == service) {
            Some(subset) => snap
                .instances
                .iter()
                .filter(serving)
                .filter(|i| subset.labels.iter().all(|(k, v)| i.instance.labels.get(k) == Some(v)))
                .collect(),
            None => {
                let id = |i: &&InstanceView| i.name.split('@').next().is_some_and(|n| n.eq_ignore_ascii_case(w));
                let registered: Vec<&InstanceView> =
                    snap.instances.iter().filter(|i| i.instance.service == service).filter(id).collect();
                if registered.is_empty() {
                    return Answer::code(Code::NxDomain);
                }
                registered.into_iter().filter(serving).collect()
            }
        },
    };
    shuffle(&mut picked, seed);
    match want {
        Want::Srv => {
            let mut a = Answer::code(Code::NoError);
            for i in picked {
                let target = format!("{}.addr.{DOMAIN}", hex_ip(i.instance.address));
                a.additional.push(Rec::Addr { name: target.clone(), ip: i.instance.address });
                let weight = u16::try_from(i.instance.weight).unwrap_or(u16::MAX);
                a.answers.push(Rec::Srv { name: name.to_string(), port: i.instance.port, weight, target });
            }
            a
        }
        _ => addresses(name, picked.iter().map(|i| i.instance.address), want),
    }
}

/// Address records of `name` of the family `want` asks for (both for ANY).
fn addresses(name: &str, ips: impl Iterator<Item = IpAddr>, want: Want) -> Answer {
    let mut a = Answer::code(Code::NoError);
    let mut seen = Vec::new();
    for ip in ips {
        let fits = matches!((want, ip), (Want::A | Want::Any, IpAddr::V4(_)) | (Want::Aaaa | Want::Any, IpAddr::V6(_)));
        if fits && !seen.contains(&ip) {
            seen.push(ip);
            a.answers.push(Rec::Addr { name: name.to_string(), ip });
        }
    }
    a
}

/// Fisher-Yates with a xorshift stream from `seed`: clients that take the first address
/// spread over the instances.
fn shuffle<T>(v: &mut [T], seed: u64) {
    let mut x = seed | 1;
    for i in (1..v.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.swap(i, (x % (i as u64 + 1)) as usize);
    }
}

/// An address as one DNS label: 8 hex digits for IPv4, 32 for IPv6.
pub fn hex_ip(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.octets().iter().map(|b| format!("{b:02x}")).collect(),
        IpAddr::V6(v6) => v6.octets().iter().map(|b| format!("{b:02x}")).collect(),
    }
}

fn parse_hex_ip(hex: &str) -> Option<IpAddr> {
    let bytes: Option<Vec<u8>> =
        (0..hex.len()).step_by(2).map(|i| hex.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok())).collect();
    match bytes?.as_slice() {
        b if b.len() == 4 => Some(IpAddr::from(<[u8; 4]>::try_from(b).ok()?)),
        b if b.len() == 16 => Some(IpAddr::from(<[u8; 16]>::try_from(b).ok()?)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::policy::model::{Instance, Protocol, Subset};

    static NO_VIPS: BTreeMap<String, Ipv4Addr> = BTreeMap::new();

    fn instance(id: &str, node: &str, ip: &str, port: u16, version: &str, health: Health) -> InstanceView {
        InstanceView {
            name: format!("{id}@{node}"),
            instance: Instance {
                service: "web".into(),
                node: node.into(),
                address: ip.parse().unwrap(),
                port,
                protocol: Protocol::Http,
                labels: [("version".to_string(), version.to_string())].into(),
                weight: 1,
                check: None,
                health,
                run_as: None,
            },
        }
    }

    fn mesh() -> (Snapshot, AliveMembers) {
        let mut snap = Snapshot {
            instances: vec![
                instance("web-1", "n1", "10.0.0.1", 8080, "v1", Health::Passing),
                instance("web-2", "n2", "10.0.0.2", 8081, "v2", Health::Unknown),
                instance("web-3", "n3", "10.0.0.3", 8080, "v1", Health::Passing),
                instance("web-4", "n1", "10.0.0.4", 8080, "v1", Health::Critical),
                instance("web-5", "n1", "fd00::5", 8080, "v2", Health::Passing),
            ],
            ..Snapshot::default()
        };
        snap.routes.insert_subset(
            "v2",
            Subset { service: "web".into(), labels: [("version".to_string(), "v2".to_string())].into() },
        );
        let alive: AliveMembers = ["n1", "n2"]
            .iter()
            .enumerate()
            .map(|(i, n)| (n.to_string(), (format!("192.168.1.{}:7946", i + 1).parse().unwrap(), BTreeMap::new())))
            .collect();
        (snap, alive)
    }

    fn ips(a: &Answer) -> Vec<String> {
        let mut v: Vec<String> = a
            .answers
            .iter()
            .map(|r| match r {
                Rec::Addr { ip, .. } => ip.to_string(),
                Rec::Srv { port, target, .. } => format!("{target}:{port}"),
            })
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_service_answers_its_healthy_instances_on_live_nodes() {
        let (snap, alive) = mesh();
        let a = answer("WEB.service.trellis.", Want::A, &snap, &alive, &NO_VIPS, 7);
        assert_eq!(a.code, Code::NoError);
        // web-3's node is down, web-4 is critical, web-5 is IPv6.
        assert_eq!(ips(&a), ["10.0.0.1", "10.0.0.2"]);
        assert_eq!(ips(&answer("web.service.trellis", Want::Aaaa, &snap, &alive, &NO_VIPS, 7)), ["fd00::5"]);
        let srv = answer("_web._tcp.service.trellis", Want::Srv, &snap, &alive, &NO_VIPS, 7);
        assert_eq!(
            ips(&srv),
            [
                "0a000001.addr.trellis:8080",
                "0a000002.addr.trellis:8081",
                "fd000000000000000000000000000005.addr.trellis:8080"
            ]
        );
        assert_eq!(srv.additional.len(), 3, "each target's address rides along");
        let target = answer("0a000002.addr.trellis", Want::A, &snap, &alive, &NO_VIPS, 0);
        assert_eq!(ips(&target), ["10.0.0.2"]);
    }

    #[test]
    fn subsets_instances_and_nodes_have_names_too() {
        let (snap, alive) = mesh();
        assert_eq!(
            ips(&answer("v2.web.service.trellis", Want::Any, &snap, &alive, &NO_VIPS, 1)),
            ["10.0.0.2", "fd00::5"]
        );
        assert_eq!(ips(&answer("web-1.web.service.trellis", Want::A, &snap, &alive, &NO_VIPS, 1)), ["10.0.0.1"]);
        let critical = answer("web-4.web.service.trellis", Want::A, &snap, &alive, &NO_VIPS, 1);
        assert_eq!((critical.code, critical.answers.len()), (Code::NoError, 0), "registered, not serving");
        assert_eq!(ips(&answer("n2.node.trellis", Want::A, &snap, &alive, &NO_VIPS, 1)), ["192.168.1.2"]);
    }

    #[test]
    fn unknown_names_are_nxdomain_and_other_domains_refused() {
        let (snap, alive) = mesh();
        for name in
            ["db.service.trellis", "n3.node.trellis", "web-9.web.service.trellis", "x.trellis", "zz.addr.trellis"]
        {
            assert_eq!(answer(name, Want::A, &snap, &alive, &NO_VIPS, 1).code, Code::NxDomain, "{name}");
        }
        for name in ["example.com", "web.service.consul", "nottrellis"] {
            assert_eq!(answer(name, Want::A, &snap, &alive, &NO_VIPS, 1).code, Code::Refused, "{name}");
        }
    }

    #[test]
    fn a_service_name_in_the_domain_answers_its_virtual_address() {
        let (snap, alive) = mesh();
        let vips = BTreeMap::from([("web".to_string(), Ipv4Addr::new(127, 100, 4, 2))]);
        assert_eq!(ips(&answer("web.trellis.", Want::A, &snap, &alive, &vips, 1)), ["127.100.4.2"]);
        let v6 = answer("web.trellis", Want::Aaaa, &snap, &alive, &vips, 1);
        assert_eq!((v6.code, v6.answers.len()), (Code::NoError, 0), "no IPv6 virtual address: NODATA");
        assert_eq!(answer("db.trellis", Want::A, &snap, &alive, &vips, 1).code, Code::NxDomain);
    }

    #[test]
    fn answers_are_shuffled_by_the_seed() {
        let (mut snap, mut alive) = mesh();
        alive.insert("n3".into(), ("192.168.1.3:7946".parse().unwrap(), BTreeMap::new()));
        snap.instances.retain(|i| i.instance.address.is_ipv4() && i.instance.health != Health::Critical);
        let firsts: std::collections::BTreeSet<String> = (0..50u64)
            .map(|seed| {
                match &answer("web.service.trellis", Want::A, &snap, &alive, &NO_VIPS, seed * 7919).answers[0] {
                    Rec::Addr { ip, .. } => ip.to_string(),
                    other => panic!("{other:?}"),
                }
            })
            .collect();
        assert_eq!(firsts.len(), 3, "every instance comes first sometimes: {firsts:?}");
        assert_eq!(hex_ip("127.0.0.2".parse().unwrap()), "7f000002");
        assert_eq!(parse_hex_ip("7f000002"), Some("127.0.0.2".parse().unwrap()));
    }
}
