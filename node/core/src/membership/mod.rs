//! Membership: foca's SWIM inside a sans-IO core.
//!
//! [`Membership`] takes packets and the current time and hands back packets to send, the
//! next deadline and member events, like `quinn-proto` does for QUIC. The agent's tokio
//! shell and the deterministic simulator drive the very same code.

mod broadcasts;
mod down_reports;
mod timers;
pub mod timing;

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use foca::{Codec, Foca, Member, Notification, OwnedNotification, Runtime, State, Timer};
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};
use serde::Serialize;
use trellis_proto::{envelope, gossip, limits, GossipCodec, LeaveNotice, MessageKind, NodeIdentity};

pub use broadcasts::PolicyItems;
use broadcasts::{ClusterBroadcasts, LeftSet};
use down_reports::{other_holder, DownReportCodec, Heard, HeardSuspicion, Holders};
pub use timers::{CoreTimer, TimerQueue};
pub use timing::{Profile, Timing};

type Swim = Foca<NodeIdentity, DownReportCodec, SmallRng, ClusterBroadcasts>;

/// A packet the core wants delivered: a complete Trellis message (envelope included).
#[derive(Debug, Clone)]
pub struct Transmit {
    pub to: SocketAddr,
    pub data: Vec<u8>,
}

/// Alive members by name, with their peer address and labels: what the data plane
/// balances over, published by the agent task whenever it changes.
pub type AliveMembers =
    std::collections::HashMap<String, (std::net::SocketAddr, std::collections::BTreeMap<String, String>)>;

/// The alive members among `members`.
pub fn alive_members(members: &[MemberView]) -> AliveMembers {
    members
        .iter()
        .filter(|m| m.state == MemberState::Alive)
        .map(|m| (m.id.name.clone(), (m.id.addr, m.id.meta.labels.clone())))
        .collect()
}

/// Members neither declared down nor gone (alive or suspect): a request already in flight
/// to one of them goes on. A suspicion is SWIM's question, often raised by a few lost
/// packets and refuted within a probe period; new requests avoid the node meanwhile (it
/// is not in [`alive_members`]), but cutting the ones under way lost answers at 10% loss.
pub fn standing_members(members: &[MemberView]) -> std::collections::HashSet<String> {
    members
        .iter()
        .filter(|m| matches!(m.state, MemberState::Alive | MemberState::Suspect))
        .map(|m| m.id.name.clone())
        .collect()
}

/// Members that became suspect and members cleared of a suspicion between two looks, from
/// the alive and standing sets of each: for the log, since foca reports neither.
pub fn suspicions(
    before: (&AliveMembers, &std::collections::HashSet<String>),
    now: (&AliveMembers, &std::collections::HashSet<String>),
) -> (Vec<String>, Vec<String>) {
    let suspect = |(alive, standing): (&AliveMembers, &std::collections::HashSet<String>)| {
        let mut v: Vec<String> = standing.iter().filter(|n| !alive.contains_key(*n)).cloned().collect();
        v.sort();
        v
    };
    let (was, is) = (suspect(before), suspect(now));
    let raised = is.iter().filter(|n| !was.contains(n)).cloned().collect();
    let cleared = was.iter().filter(|n| now.0.contains_key(*n)).cloned().collect();
    (raised, cleared)
}

/// What changed in the member list, for logs and subscribers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberEvent {
    Up(NodeIdentity),
    Down(NodeIdentity),
    /// Down after announcing a graceful leave.
    Left(NodeIdentity),
    Renamed {
        old: NodeIdentity,
        new: NodeIdentity,
    },
    /// We are known by at least one live member.
    Joined,
    /// Every other member is gone; we keep trying our seeds.
    Isolated,
    /// We were declared down and rejoined under a new generation.
    Rejoined(NodeIdentity),
}

/// A member's state as operators see it: SWIM's three states plus a graceful leave.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberState {
    Alive,
    Suspect,
    Down,
    Left,
}

impl MemberState {
    pub fn as_str(self) -> &'static str {
        match self {
            MemberState::Alive => "alive",
            MemberState::Suspect => "suspect",
            MemberState::Down => "down",
            MemberState::Left => "left",
        }
    }
}

/// One row of the member list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberView {
    pub id: NodeIdentity,
    pub state: MemberState,
    /// SWIM incarnation: bumped by a member to refute a suspicion of itself.
    pub incarnation: u16,
}

/// Counters the core keeps; the shell exports them as metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Stats {
    pub msgs_out: u64,
    pub bytes_out: u64,
    pub msgs_in: u64,
    pub bytes_in: u64,
    pub probes_sent: u64,
    pub probes_failed: u64,
    pub suspicions_raised: u64,
    pub suspicions_refuted: u64,
    pub malformed_in: u64,
    pub identity_mismatches: u64,
    /// Leave notices that did not come from the leaving node (relayed or forged).
    pub leaves_refused: u64,
    /// Packets refused because an update put another name at an active member's address.
    pub address_conflicts: u64,
    /// Down reports about another member (relayed or forged) read as suspicions: only this
    /// node's own timer declares a member down.
    pub downs_downgraded: u64,
}

/// Why a packet was refused.
#[derive(Debug, thiserror::Error)]
pub enum PacketError {
    #[error("malformed gossip: {0}")]
    Malformed(String),
    #[error("sender's certificate names {cert:?} but its gossip claims {claimed:?}")]
    IdentityMismatch { cert: String, claimed: String },
    #[error("{name:?} gossips from {addr}, the address of the live member {holder:?}")]
    AddressTaken { name: String, addr: SocketAddr, holder: String },
    #[error("gossip refused: {0}")]
    Refused(String),
}

/// Retry pacing for seeds: an agent started before its seeds keeps knocking, ever slower.
#[derive(Debug)]
struct SeedRetry {
    seeds: Vec<SocketAddr>,
    attempt: u32,
    next_at: Option<Instant>,
}

/// Down members announced to at most, per probe period, when one comes back.
const HEAL_ANNOUNCES: usize = 8;
const SEED_RETRY_MIN: Duration = Duration::from_millis(500);
const SEED_RETRY_MAX: Duration = Duration::from_secs(30);

/// The membership state machine of one node.
pub struct Membership {
    swim: Swim,
    io: Pending,
    seeds: SeedRetry,
    rng: SmallRng,
    left_sent: bool,
    left: LeftSet,
    leaves_refused: std::sync::Arc<std::sync::atomic::AtomicU64>,
    heard: Heard,
    holders: Holders,
    address_conflicts: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// The suspicions this node runs itself, by (member, incarnation).
    suspicions: HashMap<(NodeIdentity, u16), Suspicion>,
    suspect_to_down_after: Duration,
    /// Paces [`Membership::announce_to_down`]: at most once per probe period.
    probe_period: Duration,
    heal_announced_at: Option<Instant>,
}

/// A suspicion this node heard of and times itself. A member is declared down here once
/// both have happened: its suspicion ran a full period here without a refutation (`ripe`),
/// and a Down report came in (`reported`), i.e. another node's own timer ran out too.
#[derive(Debug, Default)]
struct Suspicion {
    reported: bool,
    ripe: bool,
}

/// What became of a suspicion of (member, incarnation).
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    StillSuspect,
    /// Alive again, or at a higher incarnation.
    Refuted,
    /// Down, or no longer known under that identity.
    Gone,
}

impl Membership {
    /// A node that knows nobody yet. `seed` makes every random choice replayable.
    pub fn new(identity: NodeIdentity, timing: &Timing, expected_size: u32, seed: u64) -> Self {
        Self::with_policy(identity, timing, expected_size, seed, None)
    }

    /// Like [`Membership::new`], with a handler for policy items piggybacked on gossip.
    pub fn with_policy(
        identity: NodeIdentity,
        timing: &Timing,
        expected_size: u32,
        seed: u64,
        policy: Option<PolicyItems>,
    ) -> Self {
        let handler = ClusterBroadcasts { policy, ..ClusterBroadcasts::default() };
        let left = handler.left.clone();
        let leaves_refused = handler.leaves_refused.clone();
        let codec = DownReportCodec::default();
        let heard = codec.heard.clone();
        let (holders, address_conflicts) = (codec.holders.clone(), codec.address_conflicts.clone());
        let swim = Foca::with_custom_broadcast(
            identity,
            timing.foca_config(expected_size),
            SmallRng::seed_from_u64(seed),
            codec,
            handler,
        );
        Membership {
            swim,
            io: Pending { left: left.clone(), holders_stale: true, ..Pending::default() },
            seeds: SeedRetry { seeds: Vec::new(), attempt: 0, next_at: None },
            rng: SmallRng::seed_from_u64(seed ^ 0x5eed),
            left_sent: false,
            left,
            leaves_refused,
            heard,
            holders,
            address_conflicts,
            suspicions: HashMap::new(),
            suspect_to_down_after: timing.suspect_to_down_after,
            probe_period: timing.probe_period,
            heal_announced_at: None,
        }
    }

    pub fn identity(&self) -> &NodeIdentity {
        self.swim.identity()
    }

    /// Whether at least one other member is alive in our view.
    pub fn is_joined(&self) -> bool {
        self.swim.num_members() > 0
    }

    pub fn stats(&self) -> Stats {
        let relaxed = std::sync::atomic::Ordering::Relaxed;
        Stats {
            leaves_refused: self.leaves_refused.load(relaxed),
            address_conflicts: self.address_conflicts.load(relaxed),
            ..self.io.stats
        }
    }

    /// Who holds which address now: the active members and ourselves. Rebuilt only after
    /// the member set changed, not per packet: the gossip loop stays O(packet).
    fn refresh_holders(&mut self) {
        if !std::mem::take(&mut self.io.holders_stale) {
            return;
        }
        let mut h = self.holders.lock().expect("holders lock");
        h.clear();
        for m in self.swim.iter_members().filter(|m| m.state() != State::Down) {
            h.insert(m.id().addr, m.id().name.clone());
        }
        let me = self.identity();
        h.insert(me.addr, me.name.clone());
    }

    /// Adds seeds and announces to them now; retried with backoff until we are joined.
    pub fn join(&mut self, now: Instant, seeds: &[SocketAddr]) {
        let own = self.identity().addr;
        for s in seeds.iter().filter(|s| **s != own) {
            if !self.seeds.seeds.contains(s) {
                self.seeds.seeds.push(*s);
            }
        }
        self.seeds.attempt = 0;
        // No seed (the first node of a cluster, or only ourselves): nothing to retry, and a
        // deadline would be in the past for ever, spinning the shell.
        self.seeds.next_at = (!self.seeds.seeds.is_empty()).then_some(now);
        self.retry_seeds(now);
    }

    /// Feeds one gossip body (the envelope already removed). `cert_name` is the sender's
    /// name from its certificate; the claimed source must match it.
    pub fn handle_gossip(&mut self, now: Instant, cert_name: Option<&str>, body: &[u8]) -> Result<(), PacketError> {
        self.io.stats.msgs_in += 1;
        self.io.stats.bytes_in += (body.len() + envelope::HEADER_LEN) as u64;
        // A member that has left takes no more news: another leaver's view of it as down
        // would otherwise make foca rejoin it under a new generation on its way out.
        if self.left_sent {
            return Ok(());
        }
        self.refresh_holders();
        if let Some(cert) = cert_name {
            let header = gossip::peek_header(body).map_err(|e| {
                self.io.stats.malformed_in += 1;
                PacketError::Malformed(e.to_string())
            })?;
            if header.src.name != cert {
                self.io.stats.identity_mismatches += 1;
                return Err(PacketError::IdentityMismatch { cert: cert.into(), claimed: header.src.name });
            }
            if let Some(holder) = other_holder(&self.holders, header.src.addr, &header.src.name) {
                self.io.stats.identity_mismatches += 1;
                return Err(PacketError::AddressTaken { name: header.src.name, addr: header.src.addr, holder });
            }
        }
        let backlog = self.swim.custom_broadcast_backlog();
        let events = self.io.events.len();
        let mut fx = Effects { now, io: &mut self.io };
        let res = self.swim.handle_data(body, &mut fx);
        self.take_heard(now);
        if let Err(e) = res {
            self.io.stats.malformed_in += 1;
            return Err(PacketError::Refused(e.to_string()));
        }
        let back =
            |e: &MemberEvent| matches!(e, MemberEvent::Up(_) | MemberEvent::Renamed { .. } | MemberEvent::Rejoined(_));
        if self.io.events.iter().skip(events).any(back) {
            self.announce_to_down(now);
        }
        // A broadcast item we had not seen (a policy change) is passed on at once: the
        // change then spreads at network speed, log3(N) hops, not a gossip tick per hop.
        if self.swim.custom_broadcast_backlog() > backlog {
            let mut fx = Effects { now, io: &mut self.io };
            if let Err(e) = self.swim.gossip(&mut fx) {
                tracing::debug!(error = %e, "gossip");
            }
        }
        Ok(())
    }

    /// Decodes a full Trellis message and feeds it if it is gossip.
    pub fn handle_datagram(&mut self, now: Instant, cert_name: Option<&str>, data: &[u8]) -> Result<(), PacketError> {
        match envelope::decode(data, limits::MAX_STREAM_MESSAGE) {
            Ok((MessageKind::Gossip, body)) => self.handle_gossip(now, cert_name, body),
            Ok((kind, _)) => Err(PacketError::Refused(format!("{} is not gossip", kind.as_str()))),
            Err(e) => {
                self.io.stats.malformed_in += 1;
                Err(PacketError::Malformed(e.to_string()))
            }
        }
    }

    /// The next time [`Membership::handle_timeout`] has work to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let seed = if self.is_joined() { None } else { self.seeds.next_at };
        match (self.io.timers.next_deadline(), seed) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Fires every timer due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(timer) = self.io.timers.pop_due(now) {
            let timer = match timer {
                CoreTimer::Swim(t) => t,
                CoreTimer::SuspectToDown { member, incarnation } => {
                    self.check_suspicion(now, member, incarnation);
                    continue;
                }
            };
            // foca 2.0.0 still sends TurnUndead when a refuted suspicion's timer fires, and
            // the live member then rejoins under a new generation (found by the simulator at
            // 10% loss): such a timer has nothing left to do, so it never reaches foca.
            if self.note_refutation(&timer) {
                continue;
            }
            let mut fx = Effects { now, io: &mut self.io };
            if let Err(e) = self.swim.handle_timer(timer, &mut fx) {
                tracing::debug!(error = %e, "foca timer");
            }
        }
        self.retry_seeds(now);
    }

    /// Replaces our identity (new labels) and tells the cluster at once; peers replace the
    /// old one because the new generation is higher.
    pub fn change_identity(&mut self, now: Instant, id: NodeIdentity) -> Result<(), String> {
        id.validate().map_err(|e| format!("labels: {e}"))?;
        let mut fx = Effects { now, io: &mut self.io };
        self.swim.change_identity(id, &mut fx).map_err(|e| e.to_string())
    }

    /// Leaves the cluster on purpose: tells a few members, who spread it.
    pub fn leave(&mut self, now: Instant) {
        if self.left_sent {
            return;
        }
        self.left_sent = true;
        let me = self.identity().clone();
        let notice = LeaveNotice { addr: me.addr, generation: me.generation, name: me.name.clone() }.encode();
        if let Err(e) = self.swim.add_broadcast(&notice) {
            tracing::warn!(error = %e, "could not queue leave notice");
        }
        // Receivers only believe a notice, and a Down, from the leaver itself, so both go to
        // every live member directly, ahead of foca's own leave gossip; the notice first, so
        // the Down already reads as a leave.
        let live: Vec<NodeIdentity> =
            self.swim.iter_members().filter(|m| m.state() != State::Down).map(|m| m.id().clone()).collect();
        for dst in live {
            let inc = self.io.incarnation;
            for packet in [broadcast_packet(&me, inc, &dst, &notice), down_report_packet(&me, inc, &dst, &me, 0)] {
                match packet {
                    Ok(data) => {
                        self.io.stats.msgs_out += 1;
                        self.io.stats.bytes_out += data.len() as u64;
                        self.io.out.push_back(Transmit { to: dst.addr, data });
                    }
                    Err(e) => tracing::warn!(error = %e, "could not build a leave packet"),
                }
            }
        }
        let mut fx = Effects { now, io: &mut self.io };
        if let Err(e) = self.swim.leave_cluster(&mut fx) {
            tracing::warn!(error = %e, "leave");
        }
        self.seeds.next_at = None;
    }

    /// Queues an item to piggyback on gossip. Returns false when it is too large for a
    /// gossip packet; the caller then pushes it over a stream instead.
    pub fn broadcast(&mut self, now: Instant, item: &[u8]) -> bool {
        if item.len() > limits::MAX_GOSSIP_PACKET / 2 {
            return false;
        }
        match self.swim.add_broadcast(item) {
            Ok(_) => {
                // Push it out now rather than at the next gossip tick: a write's latency is
                // then a few network hops, not a gossip interval.
                let mut fx = Effects { now, io: &mut self.io };
                if let Err(e) = self.swim.gossip(&mut fx) {
                    tracing::debug!(error = %e, "gossip");
                }
                true
            }
            Err(e) => {
                tracing::debug!(error = %e, "broadcast refused");
                false
            }
        }
    }

    /// Addresses of the members we believe alive (for pushes and anti-entropy).
    pub fn alive_peers(&self) -> Vec<SocketAddr> {
        self.swim.iter_members().filter(|m| m.state() != State::Down).map(|m| m.id().addr).collect()
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.io.out.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<MemberEvent> {
        self.io.events.pop_front()
    }

    /// Every member we know of, ourselves first.
    pub fn members(&self) -> Vec<MemberView> {
        let left = self.left.lock().expect("left set poisoned");
        let me = self.identity();
        let mut v = vec![MemberView {
            id: me.clone(),
            state: if self.left_sent { MemberState::Left } else { MemberState::Alive },
            incarnation: self.io.incarnation,
        }];
        v.extend(self.swim.iter_membership_state().map(|m| view(m, &left)));
        v
    }

    fn retry_seeds(&mut self, now: Instant) {
        let Some(at) = self.seeds.next_at else { return };
        if self.left_sent || self.seeds.seeds.is_empty() {
            self.seeds.next_at = None;
            return;
        }
        if now < at {
            return;
        }
        if self.is_joined() {
            // Joined: rest, but start again promptly if we ever end up alone.
            self.seeds.attempt = 0;
            self.seeds.next_at = Some(now + SEED_RETRY_MIN);
            return;
        }
        for seed in self.seeds.seeds.clone() {
            let mut fx = Effects { now, io: &mut self.io };
            if let Err(e) = self.swim.announce(NodeIdentity::seed(seed), &mut fx) {
                tracing::debug!(error = %e, %seed, "announce");
            }
        }
        let base = SEED_RETRY_MIN.saturating_mul(1 << self.seeds.attempt.min(6)).min(SEED_RETRY_MAX);
        let jitter = self.rng.random_range(0.8..1.2);
        self.seeds.attempt += 1;
        self.seeds.next_at = Some(now + base.mul_f64(jitter));
    }

    /// A member came back, or we did: a partition may have healed, so the members still down
    /// here may be reachable again. foca looks for them only by its periodic announce to two
    /// down members (every 10 s in the fast profile, 60 s on a LAN), which can leave two
    /// nodes holding each other down that long while a third sees both. Announcing to the
    /// down members now (at most once per probe period) links such a pair within a round
    /// trip: one that holds us down answers, and the rejoin under a new generation follows.
    fn announce_to_down(&mut self, now: Instant) {
        if self.heal_announced_at.is_some_and(|t| now < t + self.probe_period) {
            return;
        }
        let mut down: Vec<NodeIdentity> = {
            let left = self.left.lock().expect("left set poisoned");
            self.swim
                .iter_membership_state()
                .filter(|m| m.state() == State::Down && !left.contains(&(m.id().addr, m.id().generation)))
                .map(|m| m.id().clone())
                .collect()
        };
        if down.is_empty() {
            return;
        }
        // A random few when many are down (a large split healing): every Up here triggers
        // another round, so the rest are reached within a few probe periods.
        let (few, _) = down.partial_shuffle(&mut self.rng, HEAL_ANNOUNCES);
        let few = few.to_vec();
        self.heal_announced_at = Some(now);
        for id in few {
            let mut fx = Effects { now, io: &mut self.io };
            if let Err(e) = self.swim.announce(id, &mut fx) {
                tracing::debug!(error = %e, "announce to a down member");
            }
        }
    }

    /// A suspicion timer whose member has since refuted (new incarnation or alive) or gone
    /// down counts as refuted (or not); returns whether it has nothing left to do.
    fn note_refutation(&mut self, timer: &Timer<NodeIdentity>) -> bool {
        if let Timer::ChangeSuspectToDown { member_id, incarnation, .. } = timer {
            match self.outcome(member_id, *incarnation) {
                Outcome::StillSuspect => return false,
                Outcome::Refuted => self.io.stats.suspicions_refuted += 1,
                Outcome::Gone => {}
            }
            return true;
        }
        false
    }

    fn outcome(&self, member: &NodeIdentity, incarnation: u16) -> Outcome {
        match self.swim.iter_membership_state().find(|m| m.id() == member) {
            Some(m) if m.state() == State::Down => Outcome::Gone,
            Some(m) if m.state() == State::Suspect && m.incarnation() == incarnation => Outcome::StillSuspect,
            Some(_) => Outcome::Refuted,
            None => Outcome::Gone,
        }
    }

    /// Takes the suspicions the codec decoded: each new one foca now holds starts our own
    /// timer (foca times only the members its own probes failed), and a Down report makes a
    /// ripe one down at once. `suspicions_raised` stays a count of our own probes' verdicts.
    fn take_heard(&mut self, now: Instant) {
        let heard = std::mem::take(&mut *self.heard.lock().expect("heard lock"));
        for HeardSuspicion { member, incarnation, down_report } in heard {
            self.io.stats.downs_downgraded += u64::from(down_report);
            if self.outcome(&member, incarnation) != Outcome::StillSuspect {
                continue;
            }
            let key = (member, incarnation);
            match self.suspicions.get_mut(&key) {
                Some(s) if s.ripe && down_report => {
                    self.suspicions.remove(&key);
                    self.declare_down(now, key.0, key.1);
                }
                Some(s) => s.reported |= down_report,
                None => {
                    let at = now + self.suspect_to_down_after;
                    self.io.timers.schedule(at, CoreTimer::SuspectToDown { member: key.0.clone(), incarnation });
                    self.suspicions.insert(key, Suspicion { reported: down_report, ripe: false });
                }
            }
        }
    }

    /// Our timer on a suspicion ran out: down if another node reported it down too, else
    /// ripe (a report makes it down at once), checked again a period later until it ends.
    fn check_suspicion(&mut self, now: Instant, member: NodeIdentity, incarnation: u16) {
        let outcome = self.outcome(&member, incarnation);
        let key = (member, incarnation);
        let Some(s) = self.suspicions.get_mut(&key) else { return };
        match outcome {
            Outcome::StillSuspect if s.reported => {
                self.suspicions.remove(&key);
                self.declare_down(now, key.0, incarnation);
            }
            Outcome::StillSuspect => {
                s.ripe = true;
                let at = now + self.suspect_to_down_after;
                self.io.timers.schedule(at, CoreTimer::SuspectToDown { member: key.0, incarnation });
            }
            Outcome::Refuted | Outcome::Gone => {
                self.suspicions.remove(&key);
            }
        }
    }

    /// Down in our view, gossiped like foca's own verdict (each receiver again decides for
    /// itself).
    fn declare_down(&mut self, now: Instant, member: NodeIdentity, incarnation: u16) {
        let mut fx = Effects { now, io: &mut self.io };
        let down = Member::new(member, incarnation, State::Down);
        if let Err(e) = self.swim.apply_many(std::iter::once(down), true, &mut fx) {
            tracing::debug!(error = %e, "declaring a suspect down");
        }
    }
}

/// A complete gossip message (envelope included) from `src` to `dst` that carries one
/// custom broadcast `item` and nothing else: foca's `Broadcast` message.
pub fn broadcast_packet(
    src: &NodeIdentity,
    incarnation: u16,
    dst: &NodeIdentity,
    item: &[u8],
) -> Result<Vec<u8>, trellis_proto::DecodeError> {
    let len = u16::try_from(item.len())
        .map_err(|_| trellis_proto::DecodeError::TooLarge { len: item.len(), max: u16::MAX.into() })?;
    let mut payload = len.to_be_bytes().to_vec();
    payload.extend_from_slice(item);
    gossip_packet(src, incarnation, dst, foca::Message::Broadcast, &payload)
}

/// A complete gossip message from `src` to `dst` whose one member update says `about` is
/// Down at `incarnation`: the leaver's own Down (`about` is `src`), or in tests a forgery.
pub fn down_report_packet(
    src: &NodeIdentity,
    src_incarnation: u16,
    dst: &NodeIdentity,
    about: &NodeIdentity,
    incarnation: u16,
) -> Result<Vec<u8>, trellis_proto::DecodeError> {
    let mut payload = 1u16.to_be_bytes().to_vec();
    GossipCodec.encode_member(&Member::new(about.clone(), incarnation, State::Down), &mut payload)?;
    gossip_packet(src, src_incarnation, dst, foca::Message::Gossip, &payload)
}

fn gossip_packet(
    src: &NodeIdentity,
    incarnation: u16,
    dst: &NodeIdentity,
    message: foca::Message<NodeIdentity>,
    payload: &[u8],
) -> Result<Vec<u8>, trellis_proto::DecodeError> {
    let header = foca::Header { src: src.clone(), src_incarnation: incarnation, dst: dst.clone(), message };
    let mut body = Vec::new();
    GossipCodec.encode_header(&header, &mut body)?;
    body.extend_from_slice(payload);
    let mut msg = Vec::with_capacity(envelope::HEADER_LEN + body.len());
    envelope::encode(MessageKind::Gossip, &body, &mut msg);
    Ok(msg)
}

fn view(m: &Member<NodeIdentity>, left: &HashSet<(SocketAddr, u64)>) -> MemberView {
    let state = match m.state() {
        State::Alive => MemberState::Alive,
        State::Suspect => MemberState::Suspect,
        State::Down if left.contains(&(m.id().addr, m.id().generation)) => MemberState::Left,
        State::Down => MemberState::Down,
    };
    MemberView { id: m.id().clone(), state, incarnation: m.incarnation() }
}

/// Everything foca's calls produce, kept between calls.
#[derive(Default)]
struct Pending {
    timers: TimerQueue,
    out: VecDeque<Transmit>,
    events: VecDeque<MemberEvent>,
    stats: Stats,
    /// Our own SWIM incarnation, as last seen in a packet we sent (foca keeps it private).
    incarnation: u16,
    left: LeftSet,
    /// The member set changed since the codec's address holders were last rebuilt.
    holders_stale: bool,
}

/// foca's runtime for one call.
struct Effects<'a> {
    now: Instant,
    io: &'a mut Pending,
}

impl Runtime<NodeIdentity> for Effects<'_> {
    fn notify(&mut self, n: Notification<'_, NodeIdentity>) {
        let ev = match n.to_owned() {
            OwnedNotification::MemberUp(id) => MemberEvent::Up(id),
            OwnedNotification::MemberDown(id) => {
                if self.io.left.lock().expect("left set poisoned").contains(&(id.addr, id.generation)) {
                    MemberEvent::Left(id)
                } else {
                    MemberEvent::Down(id)
                }
            }
            OwnedNotification::Rename(old, new) => MemberEvent::Renamed { old, new },
            OwnedNotification::Active => MemberEvent::Joined,
            OwnedNotification::Idle => MemberEvent::Isolated,
            OwnedNotification::Rejoin(id) => MemberEvent::Rejoined(id),
            OwnedNotification::Defunct => return,
            OwnedNotification::ProbeFailed(_, _) => {
                self.io.stats.probes_failed += 1;
                return;
            }
            OwnedNotification::DataSent(h) => {
                self.io.incarnation = h.src_incarnation;
                if matches!(h.message, foca::Message::Ping(_)) {
                    self.io.stats.probes_sent += 1;
                }
                return;
            }
            OwnedNotification::DataReceived(_) => return,
        };
        // Every event here changes who is active, hence who holds which address.
        self.io.holders_stale = true;
        self.io.events.push_back(ev);
    }

    fn send_to(&mut self, to: NodeIdentity, data: &[u8]) {
        let mut msg = Vec::with_capacity(envelope::HEADER_LEN + data.len());
        envelope::encode(MessageKind::Gossip, data, &mut msg);
        self.io.stats.msgs_out += 1;
        self.io.stats.bytes_out += msg.len() as u64;
        self.io.out.push_back(Transmit { to: to.addr, data: msg });
    }

    fn submit_after(&mut self, event: Timer<NodeIdentity>, after: Duration) {
        if matches!(event, Timer::ChangeSuspectToDown { .. }) {
            self.io.stats.suspicions_raised += 1;
        }
        self.io.timers.schedule(self.now + after, CoreTimer::Swim(event));
    }
}

#[cfg(test)]
mod tests;
