//! The DNS interface's shell: a UDP socket and a TCP listener (both on `dns.bind`), the
//! wire format by hickory-proto, the answers by `trellis_core::mesh::dns` from this agent's
//! catalog and member list. It never recurses: a name outside `trellis` is REFUSED.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, SRV};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
use trellis_core::membership::AliveMembers;
use trellis_core::mesh::catalog::Snapshot;
use trellis_core::mesh::dns::{self, Code, Rec, Want};

use crate::mesh::view::MeshView;

/// The port Consul's DNS interface uses, so resolvers configured for it need one change.
pub const PORT: u16 = 8600;
/// The EDNS payload size this server advertises and honours at most (the DNS flag day's
/// 1232 bytes: no IP fragmentation on common paths).
const MAX_UDP: u16 = 1232;
/// How long a TCP client may take to send its query.
const TCP_READ: Duration = Duration::from_secs(5);
/// TCP connections served at once; more wait in the accept queue.
const MAX_TCP: usize = 64;

/// `[dns]` in the agent's config.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DnsConfig {
    /// On unless set false.
    pub enabled: Option<bool>,
    /// UDP and TCP address; default port 8600 on the API's loopback address (127.0.0.1 when
    /// the API listens elsewhere).
    pub bind: Option<SocketAddr>,
}

/// Where DNS listens: `Some((addr, explicit))`, or None when it is off.
pub fn resolve(cfg: Option<&DnsConfig>, flag: Option<SocketAddr>, api: SocketAddr) -> Option<(SocketAddr, bool)> {
    if let Some(addr) = flag {
        return Some((addr, true));
    }
    let cfg = cfg.cloned().unwrap_or_default();
    if cfg.enabled == Some(false) {
        return None;
    }
    let ip = if api.ip().is_loopback() { api.ip() } else { IpAddr::from([127, 0, 0, 1]) };
    Some(cfg.bind.map_or((SocketAddr::new(ip, PORT), false), |b| (b, true)))
}

/// Counts by answer code, for `/metrics`.
#[derive(Debug, Default)]
pub struct DnsStats {
    pub noerror: AtomicU64,
    pub nxdomain: AtomicU64,
    pub refused: AtomicU64,
    /// Malformed or unsupported queries (FORMERR, NOTIMP).
    pub bad: AtomicU64,
    /// UDP answers cut to the header and question (TC set): the client asks again over TCP.
    pub truncated: AtomicU64,
}

/// Binds UDP and TCP on `addr`. A default address in use (another agent on this host) only
/// turns DNS off with a warning; an address the operator chose must be free.
pub fn bind(addr: SocketAddr, explicit: bool) -> anyhow::Result<Option<(UdpSocket, TcpListener)>> {
    let bound = || -> std::io::Result<(UdpSocket, TcpListener)> {
        let udp = std::net::UdpSocket::bind(addr)?;
        let tcp = std::net::TcpListener::bind(addr)?;
        udp.set_nonblocking(true)?;
        tcp.set_nonblocking(true)?;
        Ok((UdpSocket::from_std(udp)?, TcpListener::from_std(tcp)?))
    };
    match bound() {
        Ok(pair) => Ok(Some(pair)),
        Err(e) if !explicit && e.kind() == std::io::ErrorKind::AddrInUse => {
            tracing::warn!(%addr, "DNS interface off: the default address is in use; set --dns ADDR or [dns] bind");
            Ok(None)
        }
        Err(e) => Err(anyhow::anyhow!(
            "dns.bind: cannot listen on {addr} ({e}); choose a free address with --dns ADDR or [dns] bind, or set [dns] enabled = false"
        )),
    }
}

/// Serves both sockets until the agent stops: TCP on the runtime, UDP on a thread of its
/// own. A query is a few microseconds of work, so the cost to beat is the wake-up: a blocking
/// `recv_from` returns straight from the kernel, where a task waits for epoll, a runtime
/// worker and the other tasks queued on it (p99 was 2x dnsmasq's that way).
pub async fn serve(view: Arc<MeshView>, stats: Arc<DnsStats>, udp: UdpSocket, tcp: TcpListener) {
    tokio::spawn(serve_tcp(view.clone(), stats.clone(), tcp));
    let udp = match udp.into_std().and_then(|u| u.set_nonblocking(false).map(|()| u)) {
        Ok(u) => u,
        Err(e) => return tracing::error!(error = %e, "DNS over UDP off: cannot take the socket to a thread"),
    };
    let spawned = std::thread::Builder::new().name("trellis-dns".into()).spawn(move || serve_udp(&view, &stats, &udp));
    if let Err(e) = spawned {
        tracing::error!(error = %e, "DNS over UDP off: cannot start its thread");
    }
}

/// One query at a time, as dnsmasq does; until the process exits.
fn serve_udp(view: &MeshView, stats: &DnsStats, udp: &std::net::UdpSocket) {
    let mut buf = vec![0u8; 4096];
    loop {
        let Ok((n, from)) = udp.recv_from(&mut buf) else { continue };
        if let Some(out) = respond(&catalog(view), stats, &buf[..n], true) {
            let _ = udp.send_to(&out, from);
        }
    }
}

async fn serve_tcp(view: Arc<MeshView>, stats: Arc<DnsStats>, tcp: TcpListener) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_TCP));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else { return };
        let Ok((mut conn, _)) = tcp.accept().await else { continue };
        let (view, stats) = (view.clone(), stats.clone());
        tokio::spawn(async move {
            let _permit = permit;
            // Queries on one connection, each behind its two-byte length, until it closes.
            while let Ok(Ok(len)) = tokio::time::timeout(TCP_READ, conn.read_u16()).await {
                let mut q = vec![0u8; usize::from(len)];
                if tokio::time::timeout(TCP_READ, conn.read_exact(&mut q)).await.is_err() {
                    return;
                }
                let Some(out) = respond(&catalog(&view), &stats, &q, false) else { return };
                let Ok(n) = u16::try_from(out.len()) else { return };
                if conn.write_u16(n).await.is_err() || conn.write_all(&out).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// What answers are made from: the policy view, the live members and this host's virtual
/// addresses, as this agent sees them.
type Catalog = (Arc<Snapshot>, Arc<AliveMembers>, Arc<trellis_core::mesh::vip::Published>);

fn catalog(view: &MeshView) -> Catalog {
    (view.snapshot(), view.node.members.alive.borrow().clone(), view.node.vips.borrow().clone())
}

/// The answer to one query message; None when it is not even a DNS header.
fn respond((snap, alive, vips): &Catalog, stats: &DnsStats, query: &[u8], udp: bool) -> Option<Vec<u8>> {
    let q = match Message::from_vec(query) {
        Ok(q) => q,
        Err(_) => {
            stats.bad.fetch_add(1, Relaxed);
            let id = u16::from_be_bytes([*query.first()?, *query.get(1)?]);
            return Message::error_msg(id, OpCode::Query, ResponseCode::FormErr).to_vec().ok();
        }
    };
    let mut out = Message::response(q.metadata.id, q.metadata.op_code);
    out.metadata.recursion_desired = q.metadata.recursion_desired;
    out.metadata.authoritative = true;
    if q.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(MAX_UDP);
        out.set_edns(edns);
    }
    let question = match (q.metadata.message_type, q.metadata.op_code, q.queries.as_slice()) {
        (MessageType::Query, OpCode::Query, [one]) => one.clone(),
        (MessageType::Query, OpCode::Query, _) => return refuse(stats, out, ResponseCode::FormErr),
        _ => return refuse(stats, out, ResponseCode::NotImp),
    };
    out.add_query(question.clone());
    let want = match question.query_type() {
        RecordType::A => Want::A,
        RecordType::AAAA => Want::Aaaa,
        RecordType::SRV => Want::Srv,
        RecordType::ANY => Want::Any,
        _ => Want::Other,
    };
    let a = dns::answer(&question.name().to_ascii(), want, snap, alive, &vips.addresses, rand::random());
    out.metadata.response_code = match a.code {
        Code::NoError => ResponseCode::NoError,
        Code::NxDomain => ResponseCode::NXDomain,
        Code::Refused => ResponseCode::Refused,
    };
    let counter = match a.code {
        Code::NoError => &stats.noerror,
        Code::NxDomain => &stats.nxdomain,
        Code::Refused => &stats.refused,
    };
    counter.fetch_add(1, Relaxed);
    out.add_answers(a.answers.iter().filter_map(|r| record(r, Some(question.name()))));
    out.add_additionals(a.additional.iter().filter_map(|r| record(r, None)));
    let bytes = out.to_vec().ok()?;
    let limit = usize::from(q.max_payload().min(MAX_UDP));
    if udp && bytes.len() > limit {
        stats.truncated.fetch_add(1, Relaxed);
        let mut cut = out.truncate();
        cut.metadata.id = q.metadata.id;
        return cut.to_vec().ok();
    }
    Some(bytes)
}

fn refuse(stats: &DnsStats, mut out: Message, code: ResponseCode) -> Option<Vec<u8>> {
    stats.bad.fetch_add(1, Relaxed);
    out.metadata.response_code = code;
    out.to_vec().ok()
}

/// A core record in hickory's terms; answers keep the question's own spelling of the name.
fn record(r: &Rec, question: Option<&Name>) -> Option<Record> {
    let name = |s: &str| question.cloned().map_or_else(|| Name::from_ascii(format!("{s}.")).ok(), Some);
    Some(match r {
        Rec::Addr { name: n, ip: IpAddr::V4(v4) } => Record::from_rdata(name(n)?, dns::TTL, RData::A(A(*v4))),
        Rec::Addr { name: n, ip: IpAddr::V6(v6) } => Record::from_rdata(name(n)?, dns::TTL, RData::AAAA(AAAA(*v6))),
        Rec::Srv { name: n, port, weight, target } => {
            let target = Name::from_ascii(format!("{target}.")).ok()?;
            Record::from_rdata(name(n)?, dns::TTL, RData::SRV(SRV::new(1, *weight, *port, target)))
        }
    })
}

/// The request path over a small fixed catalog (two instances, one IPv6, on a live node),
/// for the fuzz target.
#[cfg(any(test, feature = "fuzz"))]
pub fn fuzz_respond(data: &[u8]) {
    use trellis_core::mesh::catalog::InstanceView;
    use trellis_core::policy::model::{Health, Instance, Protocol};
    let instance = |id: &str, ip: &str| InstanceView {
        name: format!("{id}@n1"),
        instance: Instance {
            service: "web".into(),
            node: "n1".into(),
            address: ip.parse().expect("literal"),
            port: 8080,
            protocol: Protocol::Http,
            labels: Default::default(),
            weight: 1,
            check: None,
            health: Health::Passing,
            run_as: None,
        },
    };
    let snap = Snapshot {
        instances: vec![instance("web-1", "10.0.0.1"), instance("web-2", "fd00::2")],
        ..Snapshot::default()
    };
    let alive: AliveMembers =
        [("n1".to_string(), ("10.0.0.9:7946".parse().expect("literal"), Default::default()))].into();
    let vips = trellis_core::mesh::vip::Published {
        addresses: [("web".to_string(), std::net::Ipv4Addr::new(127, 100, 0, 7))].into(),
        ports: Default::default(),
    };
    let _ = respond(&(Arc::new(snap), Arc::new(alive), Arc::new(vips)), &DnsStats::default(), data, true);
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;
    use proptest::prelude::*;

    fn empty() -> Catalog {
        (Arc::new(Snapshot::default()), Arc::new(AliveMembers::new()), Arc::default())
    }

    #[test]
    fn junk_gets_formerr_with_its_id_and_a_short_read_nothing() {
        let stats = DnsStats::default();
        let out = respond(&empty(), &stats, &[0xab, 0xcd, 0xff, 0xff, 0xff], true).unwrap();
        let m = Message::from_vec(&out).unwrap();
        assert_eq!((m.metadata.id, m.metadata.response_code), (0xabcd, ResponseCode::FormErr));
        assert_eq!(respond(&empty(), &stats, &[7], true), None);
        // Two questions in one message: FORMERR too; an update: NOTIMP.
        let mut two = Message::query();
        two.add_query(Query::query(Name::from_ascii("a.trellis.").unwrap(), RecordType::A));
        two.add_query(Query::query(Name::from_ascii("b.trellis.").unwrap(), RecordType::A));
        let m = Message::from_vec(&respond(&empty(), &stats, &two.to_vec().unwrap(), true).unwrap()).unwrap();
        assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
        let mut update = Message::query();
        update.metadata.op_code = OpCode::Update;
        let m = Message::from_vec(&respond(&empty(), &stats, &update.to_vec().unwrap(), true).unwrap()).unwrap();
        assert_eq!(m.metadata.response_code, ResponseCode::NotImp);
        assert_eq!(stats.bad.load(Relaxed), 4);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]
        /// Whatever arrives, the server answers or stays silent; it never panics.
        #[test]
        fn any_bytes_are_answered_or_ignored(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = respond(&empty(), &DnsStats::default(), &bytes, true);
        }
    }
}
