//! Each agent in its own network namespace, joined to the others by a bridge, so that
//! faults happen in the kernel rather than in the agent: a partition is packets dropped by
//! nftables, loss is `numgen random` drops, isolation is the link going down, a freeze is
//! every process of the namespace stopped. QUIC's loss recovery, the UDP socket buffers and
//! the OS's view of a dead link all take part.
//!
//! Addresses: the cluster's 10.A.B.0/24 (A.B from its loopback subnet, so parallel clusters
//! never meet); the bridge holds .1 in the host's namespace, so the harness reaches every
//! API, proxy and test server without crossing a fault, and node `i` is .(i+2) on its
//! `eth0`. Drops are made on input only: an output drop makes `sendto` fail with EPERM, which
//! no real network does.
//!
//! Neighbours are static: every namespace gets a permanent ARP entry for every other node
//! and the bridge, from MAC addresses fixed by the node's index. The kernel's neighbour table
//! is shared by all namespaces (`gc_thresh3`, 1024 entries by default) and a full mesh of 50
//! namespaces needs 2450 entries; dynamic entries past the limit fail with "neighbor table
//! overflow" and the agents' sends with ENOBUFS, while permanent ones are exempt.
//!
//! [`Rules`] and [`Faults`] are plain data (what each namespace drops, from the faults in
//! force), tested without a kernel; [`Net`] only runs `ip` and `nft`.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

/// What one namespace drops on input: everything from some addresses (partitions), and a
/// share of the UDP from some addresses or from anyone (loss).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Rules {
    pub blocked_from: BTreeSet<Ipv4Addr>,
    /// Percent of inbound UDP dropped per source; `None` as the key means every source.
    pub loss_from: BTreeMap<Option<Ipv4Addr>, u8>,
    /// Ports whose inbound packets (UDP and TCP) are all dropped.
    pub blocked_ports: BTreeSet<u16>,
}

/// The nftables ruleset for `rules`: one table, replaced whole on every change.
pub fn ruleset(rules: &Rules) -> String {
    let mut lines = vec!["table inet trellis_chaos {".to_string()];
    lines.push("  chain input {".into());
    lines.push("    type filter hook input priority 0; policy accept;".into());
    if !rules.blocked_from.is_empty() {
        let set: Vec<String> = rules.blocked_from.iter().map(Ipv4Addr::to_string).collect();
        lines.push(format!("    iifname \"eth0\" ip saddr {{ {} }} drop", set.join(", ")));
    }
    if !rules.blocked_ports.is_empty() {
        let set: Vec<String> = rules.blocked_ports.iter().map(u16::to_string).collect();
        lines.push(format!("    iifname \"eth0\" meta l4proto {{ tcp, udp }} th dport {{ {} }} drop", set.join(", ")));
    }
    for (from, pct) in &rules.loss_from {
        let source = from.map(|ip| format!("ip saddr {ip} ")).unwrap_or_default();
        lines.push(format!("    iifname \"eth0\" {source}meta l4proto udp numgen random mod 100 < {pct} drop"));
    }
    lines.push("  }".into());
    lines.push("}".into());
    // Deleting first makes the file replace the table rather than add to it.
    format!("table inet trellis_chaos\ndelete table inet trellis_chaos\n{}\n", lines.join("\n"))
}

/// The faults in force on a cluster of namespaces, as each namespace's [`Rules`].
#[derive(Debug, Clone)]
pub struct Faults {
    ips: Vec<Ipv4Addr>,
    rules: Vec<Rules>,
}

impl Faults {
    pub fn new(ips: Vec<Ipv4Addr>) -> Faults {
        let rules = vec![Rules::default(); ips.len()];
        Faults { ips, rules }
    }

    /// A node that joined later, with nothing dropped yet.
    pub fn add(&mut self, ip: Ipv4Addr) {
        self.ips.push(ip);
        self.rules.push(Rules::default());
    }

    pub fn rules(&self, i: usize) -> &Rules {
        &self.rules[i]
    }

    fn others(&self, side: &[usize]) -> Vec<usize> {
        (0..self.ips.len()).filter(|i| !side.contains(i)).collect()
    }

    /// `side` and the rest no longer hear each other, both ways.
    pub fn partition(&mut self, side: &[usize]) {
        let rest = self.others(side);
        self.block(side, &rest);
        self.block(&rest, side);
    }

    /// What `side` sends to the rest is lost; what the rest sends still arrives.
    pub fn one_way(&mut self, side: &[usize]) {
        let rest = self.others(side);
        self.block(side, &rest);
    }

    /// Packets from `from` no longer arrive at `to`.
    fn block(&mut self, from: &[usize], to: &[usize]) {
        for &t in to {
            let ips: Vec<Ipv4Addr> = from.iter().map(|&f| self.ips[f]).collect();
            self.rules[t].blocked_from.extend(ips);
        }
    }

    /// `pct` percent of node `i`'s UDP lost on the way in and on the way out (dropped by
    /// every receiver).
    pub fn loss(&mut self, i: usize, pct: u8) {
        let ip = self.ips[i];
        self.rules[i].loss_from.insert(None, pct);
        for j in self.others(&[i]) {
            self.rules[j].loss_from.insert(Some(ip), pct);
        }
    }

    /// Node `i` drops whatever arrives on `port`.
    pub fn block_port(&mut self, i: usize, port: u16) {
        self.rules[i].blocked_ports.insert(port);
    }

    pub fn heal(&mut self) {
        self.rules.iter_mut().for_each(|r| *r = Rules::default());
    }
}

/// Whether this machine can run namespace mode: root, with `ip` and `nft`.
pub fn usable() -> Result<(), String> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let uid = status.lines().find_map(|l| l.strip_prefix("Uid:")).and_then(|v| v.split_whitespace().next());
    if uid != Some("0") {
        return Err("namespace mode needs root (network namespaces, veth pairs, nftables)".into());
    }
    for tool in ["ip", "nft"] {
        let found = Command::new(tool).arg("-V").stdout(Stdio::null()).stderr(Stdio::null()).status();
        if !found.is_ok_and(|s| s.success()) {
            return Err(format!("namespace mode needs `{tool}` (Debian: iproute2, nftables)"));
        }
    }
    Ok(())
}

/// Whether a route of the host (other than the default) already covers `net`.
fn overlaps_host_route(routes: &str, net: Ipv4Addr) -> bool {
    routes.lines().filter_map(|l| l.split_whitespace().next()).filter(|p| *p != "default").any(|prefix| {
        let (addr, len) = prefix.split_once('/').unwrap_or((prefix, "32"));
        let (Ok(addr), Ok(len)) = (addr.parse::<Ipv4Addr>(), len.parse::<u32>()) else { return false };
        let mask = if len == 0 { 0 } else { u32::MAX << (32 - len.min(32)) };
        // Either one contains the other's base address.
        let m24 = u32::MAX << 8;
        (u32::from(net) & mask) == (u32::from(addr) & mask) || (u32::from(addr) & m24) == (u32::from(net) & m24)
    })
}

/// A locally administered MAC for host number `host` of 10.A.B.0/24.
fn mac(net: (u8, u8), host: u8) -> String {
    format!("02:00:0a:{:02x}:{:02x}:{host:02x}", net.0, net.1)
}

/// `ip -batch` lines giving `dev` permanent entries for `hosts` of 10.A.B.0/24.
fn neighbour_lines(net: (u8, u8), hosts: impl Iterator<Item = u8>, dev: &str) -> String {
    hosts
        .map(|h| format!("neigh replace 10.{}.{}.{h} lladdr {} dev {dev} nud permanent\n", net.0, net.1, mac(net, h)))
        .collect()
}

/// A bridge and one namespace per node; removed on drop.
pub struct Net {
    prefix: String,
    net: (u8, u8),
    nodes: usize,
}

/// `ip [-n ns] -batch -` with `lines` on stdin.
fn ip_batch(ns: Option<&str>, lines: &str) -> anyhow::Result<()> {
    let mut cmd = Command::new("ip");
    if let Some(ns) = ns {
        cmd.args(["-n", ns]);
    }
    let mut child = cmd.args(["-batch", "-"]).stdin(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    child.stdin.take().expect("piped").write_all(lines.as_bytes())?;
    let out = child.wait_with_output()?;
    anyhow::ensure!(out.status.success(), "ip -batch in {ns:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
    Ok(())
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip").args(args).stdin(Stdio::null()).output()?;
    anyhow::ensure!(
        out.status.success(),
        "`ip {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

impl Net {
    /// The bridge `tr<A>x<B>br` holding 10.A.B.1/24.
    pub fn create(net: (u8, u8)) -> anyhow::Result<Net> {
        usable().map_err(anyhow::Error::msg)?;
        // Made first: if a step below fails, dropping it removes what was made (see `Drop`).
        let n = Net { prefix: format!("tr{}x{}", net.0, net.1), net, nodes: 0 };
        let routes = String::from_utf8_lossy(&Command::new("ip").args(["-4", "route"]).output()?.stdout).into_owned();
        anyhow::ensure!(
            !overlaps_host_route(&routes, n.host_ip()),
            "10.{}.{}.0/24 overlaps a route of this host; not using it for a test network",
            net.0,
            net.1
        );
        let br = n.bridge();
        ip(&["link", "add", &br, "address", &mac(net, 1), "type", "bridge"])?;
        ip(&["addr", "add", &format!("{}/24", n.host_ip()), "dev", &br])?;
        ip(&["link", "set", &br, "up"])?;
        Ok(n)
    }

    /// Whether the bridge of `net` exists already (another run holds it).
    pub fn taken(net: (u8, u8)) -> bool {
        std::path::Path::new(&format!("/sys/class/net/tr{}x{}br", net.0, net.1)).exists()
    }

    fn bridge(&self) -> String {
        format!("{}br", self.prefix)
    }

    pub fn host_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, self.net.0, self.net.1, 1)
    }

    pub fn node_ip(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, self.net.0, self.net.1, i as u8 + 2)
    }

    pub fn ns(&self, i: usize) -> String {
        format!("{}n{i}", self.prefix)
    }

    /// Namespace `i` with `eth0` on the bridge at [`Net::node_ip`] and `lo` up.
    pub fn add_node(&mut self, i: usize) -> anyhow::Result<()> {
        let (ns, veth) = (self.ns(i), format!("{}v{i}", self.prefix));
        ip(&["netns", "add", &ns])?;
        self.nodes = self.nodes.max(i + 1);
        let host = i as u8 + 2;
        ip(&[
            "link",
            "add",
            &veth,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "address",
            &mac(self.net, host),
            "netns",
            &ns,
        ])?;
        ip(&["link", "set", &veth, "master", &self.bridge(), "up"])?;
        ip(&["-n", &ns, "addr", "add", &format!("{}/24", self.node_ip(i)), "dev", "eth0"])?;
        ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        self.neighbours(i)?;
        // Everyone already there, and the host, learn the newcomer.
        let line = neighbour_lines(self.net, std::iter::once(host), "eth0");
        for j in 0..i {
            ip_batch(Some(&self.ns(j)), &line)?;
        }
        ip_batch(None, &neighbour_lines(self.net, std::iter::once(host), &self.bridge()))
    }

    /// Namespace `i`'s permanent entries for the bridge and every other node (again after its
    /// link comes back up: taking a link down flushes them).
    fn neighbours(&self, i: usize) -> anyhow::Result<()> {
        let others = (0..self.nodes).filter(|&j| j != i).map(|j| j as u8 + 2);
        ip_batch(Some(&self.ns(i)), &neighbour_lines(self.net, std::iter::once(1).chain(others), "eth0"))
    }

    /// `program` to be run inside namespace `i` (`ip netns exec` execs it: same pid).
    pub fn command(&self, i: usize, program: &std::path::Path) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns(i)]).arg(program);
        cmd
    }

    /// Node `i`'s link up or down (down: it hears and reaches no one, the harness included).
    pub fn set_link(&self, i: usize, up: bool) -> anyhow::Result<()> {
        ip(&["-n", &self.ns(i), "link", "set", "eth0", if up { "up" } else { "down" }])?;
        if up {
            self.neighbours(i)?;
        }
        Ok(())
    }

    /// Replaces namespace `i`'s drop rules.
    pub fn apply(&self, i: usize, rules: &Rules) -> anyhow::Result<()> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.ns(i), "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        child.stdin.take().expect("piped").write_all(ruleset(rules).as_bytes())?;
        let out = child.wait_with_output()?;
        anyhow::ensure!(out.status.success(), "nft in {}: {}", self.ns(i), String::from_utf8_lossy(&out.stderr).trim());
        Ok(())
    }

    /// Every process in namespace `i`.
    pub fn pids(&self, i: usize) -> Vec<u32> {
        let out = Command::new("ip").args(["netns", "pids", &self.ns(i)]).output();
        out.map(|o| String::from_utf8_lossy(&o.stdout).split_whitespace().filter_map(|p| p.parse().ok()).collect())
            .unwrap_or_default()
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // Deleting a namespace takes its end of the veth pair, and so the pair, with it.
        for i in 0..self.nodes {
            let _ = ip(&["netns", "del", &self.ns(i)]);
        }
        let _ = ip(&["link", "del", &self.bridge()]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn four() -> Faults {
        Faults::new((0..4).map(|i| Ipv4Addr::new(10, 1, 2, i + 2)).collect())
    }

    #[test]
    fn a_partition_blocks_exactly_the_pairs_across_it_both_ways() {
        let mut f = four();
        f.partition(&[1, 2]);
        let ip = |i: u8| Ipv4Addr::new(10, 1, 2, i + 2);
        assert_eq!(f.rules(0).blocked_from, [ip(1), ip(2)].into());
        assert_eq!(f.rules(3).blocked_from, [ip(1), ip(2)].into());
        assert_eq!(f.rules(1).blocked_from, [ip(0), ip(3)].into());
        assert_eq!(f.rules(2).blocked_from, [ip(0), ip(3)].into());
        f.heal();
        assert!((0..4).all(|i| *f.rules(i) == Rules::default()));
    }

    #[test]
    fn one_way_drops_only_at_the_receivers_and_loss_both_ways() {
        let mut f = four();
        f.one_way(&[3]);
        assert!(f.rules(3).blocked_from.is_empty(), "node 3 still hears everyone");
        assert!((0..3).all(|i| f.rules(i).blocked_from.contains(&Ipv4Addr::new(10, 1, 2, 5))));
        f.loss(1, 10);
        assert_eq!(f.rules(1).loss_from.get(&None), Some(&10));
        assert_eq!(f.rules(0).loss_from.get(&Some(Ipv4Addr::new(10, 1, 2, 3))), Some(&10));
        let text = ruleset(f.rules(0));
        assert!(text.contains("iifname \"eth0\" ip saddr { 10.1.2.5 } drop"), "{text}");
        assert!(text.contains("ip saddr 10.1.2.3 meta l4proto udp numgen random mod 100 < 10 drop"), "{text}");
        assert!(ruleset(f.rules(1)).contains("iifname \"eth0\" meta l4proto udp numgen random mod 100 < 10 drop"));
        assert!(!text.contains("output"), "drops on output fail sendto with EPERM");
        f.block_port(2, 7946);
        let text = ruleset(f.rules(2));
        assert!(text.contains("iifname \"eth0\" meta l4proto { tcp, udp } th dport { 7946 } drop"), "{text}");
    }

    #[test]
    fn neighbours_are_permanent_with_macs_from_the_index() {
        assert_eq!(mac((10, 200), 2), "02:00:0a:0a:c8:02");
        let lines = neighbour_lines((10, 200), [1, 3].into_iter(), "eth0");
        assert_eq!(
            lines,
            "neigh replace 10.10.200.1 lladdr 02:00:0a:0a:c8:01 dev eth0 nud permanent\n\
             neigh replace 10.10.200.3 lladdr 02:00:0a:0a:c8:03 dev eth0 nud permanent\n"
        );
    }

    #[test]
    fn test_networks_stay_off_the_hosts_routes() {
        let routes = "default via 192.0.2.1 dev eth0\n192.0.2.0/24 dev eth0\n10.4.0.0/16 dev x\n";
        assert!(!overlaps_host_route(routes, Ipv4Addr::new(10, 3, 7, 1)));
        assert!(overlaps_host_route(routes, Ipv4Addr::new(10, 4, 9, 1)));
        assert!(overlaps_host_route("10.5.6.0/24 dev trx\n", Ipv4Addr::new(10, 5, 6, 1)));
    }
}
