//! Peer transport: one QUIC endpoint per agent, mutual TLS against the cluster CA.
//!
//! Connections are pooled per peer address and reused in both directions. Gossip travels
//! as QUIC datagrams; a message too large for a datagram goes on a unidirectional stream.
//! A peer's name comes from its certificate (checked by the verifiers in [`crate::pki`])
//! and is attached to everything it sends; nothing a peer writes in a message can change it.

use crate::faults::Faults;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use tokio::sync::mpsc;
use trellis_proto::limits;

use crate::limits::Limits;
use crate::listen::{ConnGate, Ticket};
use crate::pki::{self, RefusalReason, TlsMaterial};
use trellis_core::ratelimit::bucket::TokenBucket;

/// Socket buffer size asked of the kernel. The 208 KiB default drops packets under bursts
/// on loopback; the kernel caps the request at `net.core.rmem_max`.
const SOCKET_BUFFER: usize = 4 * 1024 * 1024;
/// The largest UDP payload path MTU discovery tries (a 9000-byte jumbo frame less IPv6 and UDP
/// headers); larger gains little once a GSO batch already fills a syscall.
const MTU_UPPER_BOUND: u16 = 8952;
/// Why we close a connection, as QUIC application error codes.
pub const CLOSE_MALFORMED: u32 = 1;
pub const CLOSE_SHUTDOWN: u32 = 2;
/// Stream stop codes: over the connection's message rate, or not finished in time.
pub const CLOSE_RATE: u32 = 3;
pub const CLOSE_TIMEOUT: u32 = 4;
/// The peer's identity is revoked (policy `revocations/<name>`).
pub const CLOSE_REVOKED: u32 = 6;
/// A peer ALPN connection without a client certificate.
pub const CLOSE_NO_CERTIFICATE: u32 = 5;

/// Takes accepted `trellis-enroll/1` connections (see [`crate::enroll`]).
pub type EnrollHandler = Arc<dyn Fn(quinn::Connection) + Send + Sync>;

/// Everything a peer sent us, tagged with who it provably is.
#[derive(Debug)]
pub struct Inbound {
    pub from: SocketAddr,
    pub peer_name: String,
    pub data: Bytes,
    pub conn: quinn::Connection,
}

/// A bidirectional stream a peer opened (service traffic), with who it provably is.
pub struct BiStream {
    pub from: SocketAddr,
    pub peer_name: String,
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
}

/// Why input from a certified peer was refused, as the `reason` label of
/// `trellis_peer_refused_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerRefusal {
    /// A datagram or stream message beyond `limits.max_datagram` / `max_stream_message`.
    Oversized,
    /// Beyond `limits.peer_messages_per_second` on one connection.
    Rate,
    /// A unidirectional stream not finished within `limits.stream_read_timeout`.
    StreamTimeout,
    /// A bidirectional stream the agent had no room to take (its hand-off queue was full).
    StreamLimit,
    /// Gossip whose claimed sender is not the name in the connection's certificate.
    Identity,
    /// Bytes that are not a Trellis message, or a message that does not decode.
    Malformed,
    /// A wire version this agent does not speak.
    Version,
    /// A new connection beyond `limits.max_peer_connections`.
    ConnectionLimit,
    /// A new connection beyond `limits.max_peer_connections_per_ip` from one address.
    PerSourceLimit,
}

impl PeerRefusal {
    pub const ALL: [PeerRefusal; 9] = [
        PeerRefusal::Oversized,
        PeerRefusal::Rate,
        PeerRefusal::StreamTimeout,
        PeerRefusal::StreamLimit,
        PeerRefusal::Identity,
        PeerRefusal::Malformed,
        PeerRefusal::Version,
        PeerRefusal::ConnectionLimit,
        PeerRefusal::PerSourceLimit,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PeerRefusal::Oversized => "oversized",
            PeerRefusal::Rate => "rate",
            PeerRefusal::StreamTimeout => "stream_timeout",
            PeerRefusal::StreamLimit => "stream_limit",
            PeerRefusal::Identity => "identity",
            PeerRefusal::Malformed => "malformed",
            PeerRefusal::Version => "version",
            PeerRefusal::ConnectionLimit => "connection_limit",
            PeerRefusal::PerSourceLimit => "per_source_limit",
        }
    }

    /// The refusal a decode error stands for.
    pub fn of(e: &trellis_proto::DecodeError) -> PeerRefusal {
        use trellis_proto::DecodeError as D;
        match e {
            D::UnsupportedVersion { .. } => PeerRefusal::Version,
            D::TooLarge { .. } => PeerRefusal::Oversized,
            D::Truncated | D::BadMagic(_) | D::UnknownKind(_) | D::Malformed { .. } => PeerRefusal::Malformed,
        }
    }
}

/// Transport counters, exported as metrics.
#[derive(Debug, Default)]
pub struct TransportStats {
    pub dials: AtomicU64,
    pub dial_failures: AtomicU64,
    pub accepted: AtomicU64,
    pub incoming_failed: AtomicU64,
    pub datagrams_out: AtomicU64,
    pub datagrams_in: AtomicU64,
    pub streams_out: AtomicU64,
    pub streams_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub bytes_in: AtomicU64,
    pub dropped_out: AtomicU64,
    pub closed_malformed: AtomicU64,
    pub refused: Mutex<HashMap<RefusalReason, u64>>,
    /// Input refused from certified peers, indexed by [`PeerRefusal`].
    pub peer_refused: [AtomicU64; PeerRefusal::ALL.len()],
}

impl TransportStats {
    pub fn peer_refuse(&self, r: PeerRefusal) {
        self.peer_refused[r as usize].fetch_add(1, Relaxed);
    }

    pub fn peer_refused(&self, r: PeerRefusal) -> u64 {
        self.peer_refused[r as usize].load(Relaxed)
    }

    fn refuse(&self, reason: RefusalReason) {
        *self.refused.lock().expect("stats lock").entry(reason).or_default() += 1;
    }
}

#[derive(Default)]
struct Pool {
    conns: HashMap<SocketAddr, quinn::Connection>,
    dialing: HashMap<SocketAddr, Vec<Bytes>>,
    /// Every connection being read, pooled or not, with its peer's name (for revocation).
    live: HashMap<usize, (quinn::Connection, String)>,
    /// What connections that ended had counted, so totals never go down.
    closed: QuicTotals,
}

/// QUIC's own counters summed over every peer connection since start: how many datagrams
/// and system calls the mesh costs, how many ACKs it sends, and what it loses.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct QuicTotals {
    pub datagrams_out: u64,
    pub datagrams_in: u64,
    pub ios_out: u64,
    pub ios_in: u64,
    pub acks_out: u64,
    pub acks_in: u64,
    pub lost_packets: u64,
}

impl QuicTotals {
    fn add(&mut self, s: &quinn::ConnectionStats) {
        self.datagrams_out += s.udp_tx.datagrams;
        self.datagrams_in += s.udp_rx.datagrams;
        self.ios_out += s.udp_tx.ios;
        self.ios_in += s.udp_rx.ios;
        self.acks_out += s.frame_tx.acks;
        self.acks_in += s.frame_rx.acks;
        self.lost_packets += s.path.lost_packets;
    }
}

/// The agent's QUIC endpoint and its connection pool.
pub struct Transport {
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
    pool: Mutex<Pool>,
    inbound: mpsc::Sender<Inbound>,
    streams: mpsc::Sender<BiStream>,
    pub stats: Arc<TransportStats>,
    log: Arc<RefusalLog>,
    /// Injected faults, only when the agent was started for the chaos harness: a normal
    /// agent's message path never takes this lock.
    pub faults: Option<Mutex<Faults>>,
    /// The peer socket, for the fault injector's packet delay.
    socket: Arc<crate::quic_socket::QuicSocket>,
    pub limits: Limits,
    /// Caps on inbound connections, in all and per source address.
    inbound_gate: Arc<ConnGate>,
    /// Our certificate (swapped on renewal) and the revocation list the verifiers consult.
    pub identity: Arc<pki::LiveIdentity>,
    sink: pki::RefusalSink,
    enroll: std::sync::OnceLock<EnrollHandler>,
}

impl Transport {
    /// Binds the UDP socket and starts accepting peers. Inbound messages arrive on the
    /// returned channel.
    pub fn bind(
        bind: SocketAddr,
        tls: &TlsMaterial,
        faults: Option<Faults>,
        limits: Limits,
    ) -> anyhow::Result<(Arc<Transport>, mpsc::Receiver<Inbound>, mpsc::Receiver<BiStream>)> {
        let stats = Arc::new(TransportStats::default());
        let log = Arc::new(RefusalLog::default());
        let sink: pki::RefusalSink = {
            let (stats, log) = (stats.clone(), log.clone());
            Arc::new(move |reason| {
                stats.refuse(reason);
                log.note(reason);
            })
        };
        let transport_cfg = Arc::new(transport_config(&limits));
        let identity = pki::LiveIdentity::new(tls)?;
        let server_tls = QuicServerConfig::try_from(pki::live_server_config(&identity, sink.clone())?)?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(server_tls));
        server.transport_config(transport_cfg.clone());
        let client_tls = QuicClientConfig::try_from(pki::live_client_config(&identity, sink.clone(), pki::ALPN)?)?;
        let mut client = quinn::ClientConfig::new(Arc::new(client_tls));
        client.transport_config(transport_cfg);

        let socket = crate::quic_socket::QuicSocket::new(udp_socket(bind)?)?;
        let endpoint = quinn::Endpoint::new_with_abstract_socket(
            endpoint_config(),
            Some(server),
            socket.clone(),
            Arc::new(quinn::TokioRuntime),
        )?;
        let (tx, rx) = mpsc::channel(4096);
        let (streams, streams_rx) = mpsc::channel(1024);
        let pool = Mutex::new(Pool::default());
        let faults = faults.map(Mutex::new);
        let inbound_gate = ConnGate::new(limits.max_peer_connections, limits.max_peer_connections_per_ip);
        let enroll = std::sync::OnceLock::new();
        let t = Arc::new(Transport {
            endpoint,
            client,
            pool,
            inbound: tx,
            streams,
            stats,
            log,
            faults,
            socket,
            limits,
            inbound_gate,
            identity,
            sink,
            enroll,
        });
        tokio::spawn(t.clone().accept_loop());
        Ok((t, rx, streams_rx))
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Open peer connections right now.
    pub fn connections(&self) -> usize {
        self.pool.lock().expect("pool lock").conns.len()
    }

    /// QUIC counters over every connection, ended ones included.
    pub fn quic_totals(&self) -> QuicTotals {
        let pool = self.pool.lock().expect("pool lock");
        let mut t = pool.closed;
        for (conn, _) in pool.live.values() {
            t.add(&conn.stats());
        }
        t
    }

    /// The path MTU QUIC found to each peer, the smallest over that peer's connections: a
    /// path held at QUIC's 1200-byte minimum points at a black hole or a small tunnel MTU.
    pub fn path_mtus(&self) -> BTreeMap<String, u16> {
        let pool = self.pool.lock().expect("pool lock");
        let mut mtus = BTreeMap::new();
        for (conn, name) in pool.live.values() {
            let mtu = conn.stats().path.current_mtu;
            mtus.entry(name.clone()).and_modify(|m: &mut u16| *m = (*m).min(mtu)).or_insert(mtu);
        }
        mtus
    }

    /// Fault injection: delays every datagram this agent sends by `delay`, under QUIC, so
    /// its RTT estimate, congestion and flow-control windows meet a WAN's round trip.
    pub fn set_packet_delay(&self, delay: Duration) {
        self.socket.set_delay(delay);
    }

    /// Sends one message to a peer; never blocks. Dials the peer first if needed, queueing
    /// a bounded number of messages meanwhile. Delivery is best effort, as for UDP.
    pub fn send(self: &Arc<Self>, to: SocketAddr, data: Bytes) {
        if self.faulted(to) {
            self.stats.dropped_out.fetch_add(1, Relaxed);
            return;
        }
        let delay = self.faults.as_ref().map_or(Duration::ZERO, |f| f.lock().expect("faults lock").delay);
        if !delay.is_zero() {
            let me = self.clone();
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                me.send_now(to, data);
            });
            return;
        }
        self.send_now(to, data);
    }

    fn send_now(self: &Arc<Self>, to: SocketAddr, data: Bytes) {
        let mut pool = self.pool.lock().expect("pool lock");
        if let Some(conn) = pool.conns.get(&to).cloned() {
            drop(pool);
            self.send_on(conn, data);
            return;
        }
        if let Some(queue) = pool.dialing.get_mut(&to) {
            if queue.len() < self.limits.max_pending_per_peer {
                queue.push(data);
            } else {
                self.stats.dropped_out.fetch_add(1, Relaxed);
            }
            return;
        }
        pool.dialing.insert(to, vec![data]);
        drop(pool);
        tokio::spawn(self.clone().dial(to));
    }

    /// Whether injected faults cut `peer` off from us.
    fn blocked_in(&self, peer: SocketAddr) -> bool {
        self.faults.as_ref().is_some_and(|f| f.lock().expect("faults lock").blocked.contains(&peer))
    }

    /// Whether injected faults eat a message to or from `peer`.
    fn faulted(&self, peer: SocketAddr) -> bool {
        let Some(f) = &self.faults else { return false };
        let f = f.lock().expect("faults lock");
        f.blocked.contains(&peer)
            || f.blocked_out.contains(&peer)
            || (f.drop_rate > 0.0 && rand::random::<f64>() < f.drop_rate)
    }

    fn send_on(self: &Arc<Self>, conn: quinn::Connection, data: Bytes) {
        let len = data.len() as u64;
        let fits = conn.max_datagram_size().is_some_and(|max| data.len() <= max.min(limits::MAX_DATAGRAM));
        if fits {
            match conn.send_datagram(data) {
                Ok(()) => {
                    self.stats.datagrams_out.fetch_add(1, Relaxed);
                    self.stats.bytes_out.fetch_add(len, Relaxed);
                }
                Err(_) => {
                    self.stats.dropped_out.fetch_add(1, Relaxed);
                }
            }
            return;
        }
        let stats = self.stats.clone();
        tokio::spawn(async move {
            let sent = async {
                let mut s = conn.open_uni().await?;
                s.write_all(&data).await?;
                s.finish()?;
                anyhow::Ok(())
            };
            match sent.await {
                Ok(()) => {
                    stats.streams_out.fetch_add(1, Relaxed);
                    stats.bytes_out.fetch_add(len, Relaxed);
                }
                Err(_) => {
                    stats.dropped_out.fetch_add(1, Relaxed);
                }
            }
        });
    }

    /// Opens a bidirectional stream to a peer, dialling it first if there is no connection.
    pub async fn open_bi(self: &Arc<Self>, to: SocketAddr) -> anyhow::Result<(quinn::SendStream, quinn::RecvStream)> {
        let blocked = self.faults.as_ref().is_some_and(|f| {
            let f = f.lock().expect("faults lock");
            f.blocked.contains(&to) || f.blocked_out.contains(&to)
        });
        if blocked {
            anyhow::bail!("fault injection blocks {to}");
        }
        let pooled = self.pool.lock().expect("pool lock").conns.get(&to).cloned();
        let conn = match pooled {
            Some(c) => c,
            None => {
                self.stats.dials.fetch_add(1, Relaxed);
                let conn = self.endpoint.connect_with(self.client.clone(), to, "trellis")?.await?;
                let name = peer_name(&conn)?;
                self.adopt(conn.clone(), name, None);
                conn
            }
        };
        Ok(conn.open_bi().await?)
    }

    async fn dial(self: Arc<Self>, to: SocketAddr) {
        self.stats.dials.fetch_add(1, Relaxed);
        let res = match self.endpoint.connect_with(self.client.clone(), to, "trellis") {
            Ok(connecting) => connecting.await.map_err(anyhow::Error::from),
            Err(e) => Err(e.into()),
        };
        let queued = self.pool.lock().expect("pool lock").dialing.remove(&to).unwrap_or_default();
        match res.and_then(|conn| Ok((peer_name(&conn)?, conn))) {
            Ok((name, conn)) => {
                tracing::debug!(peer = %name, addr = %to, "connected");
                self.adopt(conn.clone(), name, None);
                for data in queued {
                    self.send_on(conn.clone(), data);
                }
            }
            Err(e) => {
                self.stats.dial_failures.fetch_add(1, Relaxed);
                self.stats.dropped_out.fetch_add(queued.len() as u64, Relaxed);
                self.log.dial_failed(to, &e);
            }
        }
    }

    async fn accept_loop(self: Arc<Self>) {
        while let Some(incoming) = self.endpoint.accept().await {
            let t = self.clone();
            let from = incoming.remote_address();
            // Counted before the handshake, so a flood of handshakes is bounded too.
            let ticket = match self.inbound_gate.admit(from.ip()) {
                Ok(ticket) => ticket,
                Err(r) => {
                    let r = match r {
                        crate::listen::ClientRefusal::PerSource => PeerRefusal::PerSourceLimit,
                        _ => PeerRefusal::ConnectionLimit,
                    };
                    self.stats.peer_refuse(r);
                    self.log.peer_refused(from, r);
                    incoming.refuse();
                    continue;
                }
            };
            tokio::spawn(async move {
                let conn = match incoming.await {
                    Ok(c) if alpn(&c).as_deref() == Some(pki::ENROLL_ALPN) => return t.divert_enrollment(c),
                    Ok(c) if peer_name(&c).is_err() => {
                        // Client certificates are optional at the TLS layer only so joiners
                        // can reach enrollment; the peer protocol requires one.
                        c.close(CLOSE_NO_CERTIFICATE.into(), b"client certificate required");
                        Err(anyhow::anyhow!("peer presented no certificates"))
                    }
                    res => res.map_err(anyhow::Error::from),
                };
                match conn.and_then(|c| Ok((peer_name(&c)?, c))) {
                    Ok((name, conn)) => {
                        t.stats.accepted.fetch_add(1, Relaxed);
                        tracing::debug!(peer = %name, addr = %from, "accepted");
                        t.adopt(conn, name, Some(ticket));
                    }
                    Err(e) => {
                        t.stats.incoming_failed.fetch_add(1, Relaxed);
                        // A missing client certificate never reaches our verifier.
                        if e.to_string().contains("no certificates") {
                            t.stats.refuse(RefusalReason::NoCertificate);
                            t.log.note(RefusalReason::NoCertificate);
                        }
                        t.log.incoming_failed(from, &e);
                    }
                }
            });
        }
    }

    /// Hands an enrollment connection to the enrollment service; it is never pooled or read
    /// here, so nothing on it reaches gossip or forwarding.
    fn divert_enrollment(&self, conn: quinn::Connection) {
        match self.enroll.get() {
            Some(h) => h(conn),
            None => conn.close(CLOSE_SHUTDOWN.into(), b"enrollment not ready; retry"),
        }
    }

    /// Sets who serves `trellis-enroll/1` connections (once, after the agent started).
    pub fn set_enroll_handler(&self, h: EnrollHandler) {
        let _ = self.enroll.set(h);
    }

    /// The QUIC endpoint, for renewal connections from our own socket.
    pub fn endpoint(&self) -> &quinn::Endpoint {
        &self.endpoint
    }

    /// Where handshake refusals are counted and logged.
    pub fn refusal_sink(&self) -> pki::RefusalSink {
        self.sink.clone()
    }

    /// Closes every connection to a peer whose name `revoked` says; returns how many.
    pub fn close_revoked(&self, revoked: impl Fn(&str) -> bool) -> usize {
        let pool = self.pool.lock().expect("pool lock");
        let doomed: Vec<_> = pool.live.values().filter(|(_, name)| revoked(name)).map(|(c, _)| c.clone()).collect();
        drop(pool);
        for c in &doomed {
            tracing::debug!(peer = %c.remote_address(), id = c.stable_id(), closed = ?c.close_reason(), "closing a revoked peer's connection");
            c.close(CLOSE_REVOKED.into(), b"identity revoked");
        }
        doomed.len()
    }

    /// Pools a connection (the newest one to an address wins) and reads from it. An inbound
    /// connection holds its `ticket` (its slot under the connection caps) until it ends.
    fn adopt(self: &Arc<Self>, conn: quinn::Connection, name: String, ticket: Option<Ticket>) {
        let addr = conn.remote_address();
        let mut pool = self.pool.lock().expect("pool lock");
        pool.live.insert(conn.stable_id(), (conn.clone(), name.clone()));
        pool.conns.insert(addr, conn.clone());
        drop(pool);
        tokio::spawn(self.clone().read_loop(conn, name, ticket));
    }

    /// Takes one message's worth from the connection's rate budget, counting a refusal.
    fn within_rate(&self, bucket: &mut TokenBucket) -> bool {
        let ok = bucket.take(std::time::Instant::now()).admitted;
        if !ok {
            self.stats.peer_refuse(PeerRefusal::Rate);
        }
        ok
    }

    async fn read_loop(self: Arc<Self>, conn: quinn::Connection, name: String, _ticket: Option<Ticket>) {
        let from = conn.remote_address();
        let rate = f64::from(self.limits.peer_messages_per_second);
        let mut bucket = TokenBucket::new(std::time::Instant::now(), rate, 2.0 * rate, 2.0 * rate);
        loop {
            let data = tokio::select! {
                d = conn.read_datagram() => match d {
                    Ok(d) => {
                        self.stats.datagrams_in.fetch_add(1, Relaxed);
                        if d.len() > self.limits.max_datagram {
                            self.stats.peer_refuse(PeerRefusal::Oversized);
                            continue;
                        }
                        if !self.within_rate(&mut bucket) {
                            continue;
                        }
                        d
                    }
                    Err(_) => break,
                },
                s = conn.accept_uni() => match s {
                    // Each stream is read on its own task, so a slow one cannot stall gossip.
                    Ok(mut s) => {
                        if !self.within_rate(&mut bucket) {
                            let _ = s.stop(quinn::VarInt::from_u32(CLOSE_RATE));
                            continue;
                        }
                        tokio::spawn(self.clone().read_uni(conn.clone(), name.clone(), s));
                        continue;
                    }
                    Err(_) => break,
                },
                b = conn.accept_bi() => match b {
                    Ok((send, recv)) => {
                        let stream = BiStream { from, peer_name: name.clone(), send, recv };
                        let (blocked, delay) = self.faults.as_ref().map_or((false, Duration::ZERO), |f| {
                            let f = f.lock().expect("faults lock");
                            (f.blocked.contains(&from), f.delay)
                        });
                        if blocked {
                            continue;
                        }
                        if !delay.is_zero() {
                            // A delayed node answers service streams late too.
                            let me = self.clone();
                            tokio::spawn(async move {
                                tokio::time::sleep(delay).await;
                                let _ = me.streams.send(stream).await;
                            });
                            continue;
                        }
                        if self.streams.try_send(stream).is_err() {
                            self.stats.peer_refuse(PeerRefusal::StreamLimit);
                        }
                        continue;
                    }
                    Err(_) => break,
                },
            };
            self.stats.bytes_in.fetch_add(data.len() as u64, Relaxed);
            if self.blocked_in(from) {
                continue;
            }
            let msg = Inbound { from, peer_name: name.clone(), data, conn: conn.clone() };
            if self.inbound.send(msg).await.is_err() {
                break;
            }
        }
        let mut pool = self.pool.lock().expect("pool lock");
        if pool.live.remove(&conn.stable_id()).is_some() {
            pool.closed.add(&conn.stats());
        }
        if pool.conns.get(&from).is_some_and(|c| c.stable_id() == conn.stable_id()) {
            pool.conns.remove(&from);
        }
    }

    async fn read_uni(self: Arc<Self>, conn: quinn::Connection, name: String, mut s: quinn::RecvStream) {
        let from = conn.remote_address();
        let read = tokio::time::timeout(self.limits.stream_read_timeout, s.read_to_end(self.limits.max_stream_message));
        let data = match read.await {
            Ok(Ok(d)) => Bytes::from(d),
            Ok(Err(quinn::ReadToEndError::TooLong)) => {
                return self.refuse(&conn, PeerRefusal::Oversized, "stream message over limits.max_stream_message")
            }
            Ok(Err(_)) => return self.close_malformed(&conn, "stream reset before its end"),
            Err(_) => {
                // Only this stream goes: its slot is freed, the connection keeps working.
                self.stats.peer_refuse(PeerRefusal::StreamTimeout);
                let _ = s.stop(quinn::VarInt::from_u32(CLOSE_TIMEOUT));
                return;
            }
        };
        self.stats.streams_in.fetch_add(1, Relaxed);
        self.stats.bytes_in.fetch_add(data.len() as u64, Relaxed);
        if self.blocked_in(from) {
            return;
        }
        let _ = self.inbound.send(Inbound { from, peer_name: name, data, conn }).await;
    }

    /// Counts a refusal of `reason` and closes the connection that earned it.
    pub fn refuse(&self, conn: &quinn::Connection, reason: PeerRefusal, why: &str) {
        self.stats.peer_refuse(reason);
        self.close_malformed(conn, why);
    }

    /// Closes a connection whose peer sent bytes we cannot read.
    pub fn close_malformed(&self, conn: &quinn::Connection, why: &str) {
        self.stats.closed_malformed.fetch_add(1, Relaxed);
        self.log.malformed(conn.remote_address(), why);
        conn.close(quinn::VarInt::from_u32(CLOSE_MALFORMED), b"malformed message");
    }

    /// Closes every connection, letting peers see a clean close rather than a timeout.
    pub async fn shutdown(&self) {
        self.endpoint.close(quinn::VarInt::from_u32(CLOSE_SHUTDOWN), b"agent shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }
}

/// The negotiated ALPN of a connection.
fn alpn(conn: &quinn::Connection) -> Option<Vec<u8>> {
    conn.handshake_data()?.downcast::<quinn::crypto::rustls::HandshakeData>().ok()?.protocol
}

fn peer_name(conn: &quinn::Connection) -> anyhow::Result<String> {
    let certs = conn
        .peer_identity()
        .and_then(|any| any.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>().ok())
        .ok_or_else(|| anyhow::anyhow!("peer presented no certificate"))?;
    let leaf = certs.first().ok_or_else(|| anyhow::anyhow!("peer presented an empty chain"))?;
    Ok(pki::peer_identity(leaf)?.name)
}

fn transport_config(limits: &Limits) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    // Validated to 10 s..1 h, which fits QUIC's idle timeout.
    t.max_idle_timeout(limits.idle_timeout.try_into().ok());
    t.keep_alive_interval(Some(crate::limits::KEEP_ALIVE));
    t.max_concurrent_uni_streams(limits.max_concurrent_uni_streams.into());
    t.max_concurrent_bidi_streams(limits.max_concurrent_bidi_streams.into());
    t.datagram_receive_buffer_size(Some(1 << 20));
    // Validated to 64 KiB..1 GiB, within a QUIC varint.
    let window = |w: u64| quinn::VarInt::from_u64(w).unwrap_or(quinn::VarInt::MAX);
    t.stream_receive_window(window(limits.stream_receive_window));
    t.receive_window(window(limits.connection_receive_window));
    t.send_window(limits.connection_receive_window);
    // Path MTU discovery may climb past Ethernet's 1500 (jumbo frames in a cloud VPC, 64 KiB on
    // loopback): fewer, larger packets cost fewer syscalls, ACKs and header protections per byte.
    // Quinn probes upward and backs off on black holes, so a high bound is safe on any path.
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MTU_UPPER_BOUND);
    t.mtu_discovery_config(Some(mtu));
    t
}

/// quinn's endpoint advertises a 1472-byte `max_udp_payload_size` by default, which caps
/// the peer's path MTU discovery there whatever its own bound: raised to that bound. On
/// loopback this moves bulk streams in 8.9 KB packets instead of 1.5 KB ones.
fn endpoint_config() -> quinn::EndpointConfig {
    let mut e = quinn::EndpointConfig::default();
    e.max_udp_payload_size(MTU_UPPER_BOUND).expect("within QUIC's bounds");
    e
}

fn udp_socket(bind: SocketAddr) -> anyhow::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(bind), Type::DGRAM, Some(Protocol::UDP))?;
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
    socket.bind(&bind.into()).map_err(|e| {
        anyhow::anyhow!("cannot bind peer UDP socket {bind}: {e} (is another agent using it? pick another --bind)")
    })?;
    tracing::debug!(rcvbuf = socket.recv_buffer_size().unwrap_or(0), "peer socket bound");
    Ok(socket.into())
}

/// Logs refusals and failures at most once per second per kind, with a count of what was
/// suppressed, so a flood of bad handshakes cannot fill the disk.
#[derive(Default)]
pub struct RefusalLog {
    last: Mutex<HashMap<&'static str, (std::time::Instant, u64)>>,
}

impl RefusalLog {
    /// Returns how many were suppressed since the last log line, or None to stay quiet.
    fn admit(&self, kind: &'static str) -> Option<u64> {
        let now = std::time::Instant::now();
        let mut last = self.last.lock().expect("log lock");
        match last.get_mut(kind) {
            Some((at, suppressed)) if now.duration_since(*at) < Duration::from_secs(1) => {
                *suppressed += 1;
                None
            }
            Some((at, suppressed)) => {
                *at = now;
                Some(std::mem::take(suppressed))
            }
            None => {
                last.insert(kind, (now, 0));
                Some(0)
            }
        }
    }

    fn note(&self, reason: RefusalReason) {
        if let Some(suppressed) = self.admit(reason.as_str()) {
            tracing::warn!(reason = reason.as_str(), suppressed, hint = reason.hint(), "refused peer certificate");
        }
    }

    fn dial_failed(&self, to: SocketAddr, e: &anyhow::Error) {
        // Our own shutdown: the agent is leaving and its endpoint closing; nothing to fix.
        let stopping = e.chain().any(|c| matches!(c.downcast_ref(), Some(quinn::ConnectError::EndpointStopping)));
        if stopping {
            tracing::debug!(peer = %to, "no connection to {to}: this agent is stopping");
            return;
        }
        if let Some(suppressed) = self.admit("dial") {
            let (cause, fix) = dial_failure_cause(&format!("{e:#}"));
            tracing::warn!(peer = %to, suppressed, error = %e, "connection to {to} failed: {cause}; fix: {fix}");
        }
    }

    fn incoming_failed(&self, from: SocketAddr, e: &anyhow::Error) {
        if let Some(suppressed) = self.admit("incoming") {
            tracing::warn!(peer = %from, suppressed, error = %e, "incoming peer handshake failed");
        }
    }

    fn peer_refused(&self, from: SocketAddr, r: PeerRefusal) {
        if let Some(suppressed) = self.admit(r.as_str()) {
            tracing::warn!(peer = %from, suppressed, reason = r.as_str(), "refused a peer connection");
        }
    }

    fn malformed(&self, from: SocketAddr, why: &str) {
        if let Some(suppressed) = self.admit("malformed") {
            tracing::warn!(peer = %from, suppressed, why, "closed connection: malformed message");
        }
    }
}

/// Why a connection to a peer failed, in an operator's words, and the fix; from the text
/// of quinn's error (our verifier's rustls error, or the TLS alert the peer sent).
pub fn dial_failure_cause(err: &str) -> (&'static str, &'static str) {
    let e = err.to_ascii_lowercase();
    let by_peer = e.contains("aborted by peer") || e.contains("closed by peer");
    let ca_fix = "issue both nodes' certificates from the same cluster CA (`trellis cert issue --ca-dir <cluster CA>`) and put that CA's ca.pem in every tls dir";
    let clock_fix = "synchronise the clocks of both hosts (NTP); `trellis check` shows the skew";
    if e.contains("unknownissuer") || e.contains("badsignature") {
        ("the peer's certificate is not from our CA", ca_fix)
    } else if e.contains("applicationverificationfailure") {
        ("the peer's certificate names another cluster id", ca_fix)
    } else if e.contains("notvalidyet") || e.contains("not valid yet") {
        ("the peer's certificate is not valid yet (clock skew between the hosts?)", clock_fix)
    } else if e.contains("expired") && !by_peer {
        ("the peer's certificate has expired", "issue the peer a new certificate with `trellis cert issue`")
    } else if by_peer && e.contains("error 48") {
        ("the peer refused our certificate: it is not from the peer's CA", ca_fix)
    } else if by_peer && e.contains("error 49") {
        ("the peer refused our certificate: it names another cluster id", ca_fix)
    } else if by_peer && e.contains("error 45") {
        (
            "the peer refused our certificate as expired or not yet valid",
            "check this node's certificate (`trellis check`) and both hosts' clocks",
        )
    } else if by_peer && e.contains("error 116") {
        ("the peer wants a client certificate and got none", "give this agent --tls-dir with node.pem and node.key")
    } else if e.contains("timed out") {
        (
            "no answer over UDP: the peer is down, or UDP to its port is blocked",
            "check that the peer runs and that UDP to its --bind port is open both ways",
        )
    } else {
        ("the connection failed", "see the error; `trellis check` on both hosts names the usual causes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limits_windows_reach_quinn() {
        let limits = Limits { stream_receive_window: 3 << 20, connection_receive_window: 5 << 20, ..Limits::default() };
        let cfg = format!("{:?}", transport_config(&limits));
        assert!(cfg.contains("stream_receive_window: 3145728"), "{cfg}");
        assert!(cfg.contains("receive_window: 5242880"), "{cfg}");
        assert!(cfg.contains("send_window: 5242880"), "{cfg}");
    }

    #[test]
    fn dial_failures_name_their_cause() {
        let local = "the cryptographic handshake failed: error 48: invalid peer certificate: UnknownIssuer";
        assert_eq!(dial_failure_cause(local).0, "the peer's certificate is not from our CA");
        let peer = "aborted by peer: the cryptographic handshake failed: error 48";
        assert_eq!(dial_failure_cause(peer).0, "the peer refused our certificate: it is not from the peer's CA");
        let cluster =
            "the cryptographic handshake failed: error 49: invalid peer certificate: ApplicationVerificationFailure";
        assert_eq!(dial_failure_cause(cluster).0, "the peer's certificate names another cluster id");
        assert!(dial_failure_cause("timed out").0.starts_with("no answer over UDP"));
        let skew = "invalid peer certificate: certificate not valid yet: current time 1, but certificate is not valid before 2";
        assert!(dial_failure_cause(skew).1.contains("NTP"));
        let expired =
            "invalid peer certificate: certificate expired: verification time 2, but certificate is not valid after 1";
        assert_eq!(dial_failure_cause(expired).0, "the peer's certificate has expired");
    }
}
