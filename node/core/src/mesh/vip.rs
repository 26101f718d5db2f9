//! Virtual service addresses: each service gets a loopback address of its own on this host
//! (`web.trellis` -> 127.100.7.42), where the agent listens on the service's ports, so an
//! unchanged application can dial `http://web.trellis:8080/`.
//!
//! The local agent assigns them alone, with no coordination: a hash of the name picks the
//! first candidate in the range (so most services get the same address on every host),
//! a taken one moves on to the next. Once given, an address stays with its service for
//! the life of the data dir (the shell keeps the table there), so a client that resolved
//! it once keeps reaching the same service.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use super::catalog::Snapshot;
use crate::policy::model::MAX_SERVICE_PORTS;

/// A block of loopback addresses, such as `127.100.0.0/16`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    base: u32,
    prefix: u8,
}

impl Default for Range {
    fn default() -> Self {
        Range { base: u32::from(Ipv4Addr::new(127, 100, 0, 0)), prefix: 16 }
    }
}

impl std::str::FromStr for Range {
    type Err = String;

    /// Parses `A.B.C.D/N`: inside 127.0.0.0/8 (Linux answers all of it on `lo` with no
    /// setup), N within 8..=28 so there are addresses to give.
    fn from_str(s: &str) -> Result<Range, String> {
        let (ip, n) = s.split_once('/').ok_or_else(|| format!("{s:?} is not A.B.C.D/N, e.g. 127.100.0.0/16"))?;
        let ip: Ipv4Addr = ip.parse().map_err(|_| format!("{ip:?} is not an IPv4 address"))?;
        let prefix: u8 = n.parse().ok().filter(|n| (8..=28).contains(n)).ok_or_else(|| {
            format!("/{n} is not a prefix length within 8..28 (a /28 gives 14 services, a /16 65,000)")
        })?;
        if !ip.is_loopback() {
            return Err(format!("{ip} is not a loopback address; use a block inside 127.0.0.0/8"));
        }
        let mask = u32::MAX << (32 - prefix);
        Ok(Range { base: u32::from(ip) & mask, prefix })
    }
}

impl std::fmt::Display for Range {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", Ipv4Addr::from(self.base), self.prefix)
    }
}

impl Range {
    fn size(&self) -> u32 {
        1 << (32 - self.prefix)
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip).wrapping_sub(self.base) < self.size()
    }

    /// The `i`th address to try for `name`. Addresses ending in .0 or .255 are skipped:
    /// they read as network and broadcast addresses to people and some tools.
    fn candidate(&self, name: &str, i: u32) -> Option<Ipv4Addr> {
        let at = (fnv(name).wrapping_add(i)) % self.size();
        let ip = Ipv4Addr::from(self.base + at);
        (!matches!(ip.octets()[3], 0 | 255)).then_some(ip)
    }
}

/// 32-bit FNV-1a: stable across builds and platforms, unlike std's hasher.
fn fnv(s: &str) -> u32 {
    s.bytes().fold(0x811c_9dc5, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193))
}

/// The addresses given so far, by service.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Table {
    range: Range,
    by_service: BTreeMap<String, Ipv4Addr>,
}

impl Table {
    /// A table over `range`, keeping the `saved` assignments that fit it (one address per
    /// service, one service per address).
    pub fn new(range: Range, saved: BTreeMap<String, Ipv4Addr>) -> Table {
        let mut t = Table { range, by_service: BTreeMap::new() };
        let mut taken = BTreeSet::new();
        for (service, ip) in saved {
            if range.contains(ip) && taken.insert(ip) {
                t.by_service.insert(service, ip);
            }
        }
        t
    }

    pub fn range(&self) -> Range {
        self.range
    }

    pub fn get(&self, service: &str) -> Option<Ipv4Addr> {
        self.by_service.get(service).copied()
    }

    pub fn all(&self) -> &BTreeMap<String, Ipv4Addr> {
        &self.by_service
    }

    /// Gives an address to each of `services` that has none; true when any was given.
    /// A full range leaves the rest without one (never an address twice).
    pub fn assign<'a>(&mut self, services: impl IntoIterator<Item = &'a str>) -> bool {
        let mut taken: BTreeSet<Ipv4Addr> = self.by_service.values().copied().collect();
        let mut changed = false;
        for service in services {
            if self.by_service.contains_key(service) {
                continue;
            }
            let free =
                (0..self.range.size()).filter_map(|i| self.range.candidate(service, i)).find(|ip| !taken.contains(ip));
            if let Some(ip) = free {
                taken.insert(ip);
                self.by_service.insert(service.to_string(), ip);
                changed = true;
            }
        }
        changed
    }
}

/// One port of a service's virtual address, as `GET /v1/agent/virtual-addresses` shows it.
#[derive(Clone, Debug, serde::Serialize, PartialEq, Eq)]
pub struct PortState {
    pub port: u16,
    /// Why it is not listening (e.g. the port is taken by a wildcard listener on this host).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What the shell publishes to DNS and the API: the addresses given and, per service, the
/// ports and whether each is listening.
#[derive(Clone, Debug, Default)]
pub struct Published {
    pub addresses: BTreeMap<String, Ipv4Addr>,
    pub ports: BTreeMap<String, Vec<PortState>>,
}

/// The ports each service's virtual address listens on: those its `services/<name>`
/// policy lists, else those its instances registered (at most [`MAX_SERVICE_PORTS`],
/// lowest first, so one service's odd registrations cannot open listeners without end).
pub fn ports(snap: &Snapshot) -> BTreeMap<String, BTreeSet<u16>> {
    let mut out: BTreeMap<String, BTreeSet<u16>> = BTreeMap::new();
    for i in &snap.instances {
        out.entry(i.instance.service.clone()).or_default().insert(i.instance.port);
    }
    for (name, s) in &snap.services {
        if !s.ports.is_empty() {
            out.insert(name.clone(), s.ports.iter().copied().collect());
        }
    }
    for ports in out.values_mut() {
        while ports.len() > MAX_SERVICE_PORTS {
            ports.pop_last();
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_inside_loopback_only_and_name_the_fix() {
        let r: Range = "127.100.3.4/16".parse().unwrap();
        assert_eq!(r.to_string(), "127.100.0.0/16");
        assert!(r.contains(Ipv4Addr::new(127, 100, 255, 1)) && !r.contains(Ipv4Addr::new(127, 101, 0, 1)));
        assert!("10.0.0.0/16".parse::<Range>().unwrap_err().contains("loopback"));
        assert!("127.100.0.0/30".parse::<Range>().unwrap_err().contains("8..28"));
        assert!("127.100.0.0".parse::<Range>().unwrap_err().contains("A.B.C.D/N"));
    }

    #[test]
    fn addresses_are_stable_distinct_and_kept_across_restarts() {
        let mut t = Table::new(Range::default(), BTreeMap::new());
        assert!(t.assign(["web", "db", "batch"]));
        assert!(!t.assign(["web", "db"]), "nothing new");
        let web = t.get("web").unwrap();
        let distinct: BTreeSet<_> = t.all().values().collect();
        assert_eq!(distinct.len(), 3);
        // The same name hashes to the same address on another host.
        let mut other = Table::new(Range::default(), BTreeMap::new());
        other.assign(["web"]);
        assert_eq!(other.get("web"), Some(web));
        // A restart keeps what was given, whatever order services come back in.
        let mut again = Table::new(Range::default(), t.all().clone());
        again.assign(["batch", "db", "web", "new"]);
        assert_eq!(again.get("web"), Some(web));
        assert_eq!(again.get("db"), t.get("db"));
        assert!(again.all().values().all(|ip| !matches!(ip.octets()[3], 0 | 255)));
    }

    #[test]
    fn a_full_range_gives_no_address_twice_and_bad_saved_entries_are_dropped() {
        let r: Range = "127.9.9.0/24".parse().unwrap();
        let names: Vec<String> = (0..300).map(|i| format!("s{i}")).collect();
        let mut t = Table::new(r, BTreeMap::new());
        t.assign(names.iter().map(String::as_str));
        assert_eq!(t.all().len(), 254, "254 usable addresses in a /24");
        let distinct: BTreeSet<_> = t.all().values().collect();
        assert_eq!(distinct.len(), 254);
        let ip = Ipv4Addr::new(127, 9, 9, 7);
        let saved = BTreeMap::from([
            ("a".to_string(), ip),
            ("b".to_string(), ip),
            ("c".to_string(), Ipv4Addr::new(127, 1, 1, 1)),
        ]);
        let t = Table::new(r, saved);
        assert_eq!(t.all().len(), 1, "a duplicate and an address outside the range are dropped");
    }
}
