//! Down reports are believed only from the member they are about.
//!
//! foca takes a gossiped `Down` as final: the member is dropped and must rejoin under a new
//! generation. SWIM updates are not signed, so one certified peer could drop any live
//! member from every view. The codec foca decodes with therefore reads a `Down` about
//! anyone but the packet's sender as `Suspect` at the same incarnation: the member gets to
//! refute it, and only a node's own suspicion timer declares a member down. A sender's
//! `Down` about itself (foca's graceful leave) stays `Down`. The codec also tells the core
//! of every suspicion it decodes, so the core can run its own timer on each.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use bytes::{Buf, BufMut};
use foca::{Codec, Header, Member, State};
use trellis_proto::{DecodeError, GossipCodec, NodeIdentity};

/// A suspicion in a packet foca is reading: a `Suspect` update, or a Down report read as one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeardSuspicion {
    pub member: NodeIdentity,
    pub incarnation: u16,
    pub down_report: bool,
}

/// Suspicions decoded since the core last looked. Shared with the core because foca keeps
/// its codec private; only the core's own thread ever touches it.
pub type Heard = Arc<Mutex<Vec<HeardSuspicion>>>;

/// The name of each active member (and ours) by address, refreshed by the core before each
/// packet: an update that puts another name at a held address is a takeover, since foca
/// lets the higher generation at an address replace whoever holds it.
pub type Holders = Arc<Mutex<HashMap<SocketAddr, String>>>;

/// [`GossipCodec`] on the wire, plus the rule above on decode.
#[derive(Default)]
pub struct DownReportCodec {
    /// The sender of the packet being decoded: foca decodes its header first.
    sender: Option<NodeIdentity>,
    pub heard: Heard,
    pub holders: Holders,
    /// Packets refused because an update claimed a held address under another name.
    pub address_conflicts: Arc<AtomicU64>,
}

/// The name holding `addr`, when it is not `name`.
pub fn other_holder(holders: &Holders, addr: SocketAddr, name: &str) -> Option<String> {
    holders.lock().expect("holders lock").get(&addr).filter(|h| h.as_str() != name).cloned()
}

impl DownReportCodec {
    fn vet(&mut self, update: Member<NodeIdentity>) -> Member<NodeIdentity> {
        let down_report = match update.state() {
            State::Alive => return update,
            State::Suspect => false,
            State::Down if self.sender.as_ref().is_some_and(|s| is_self_report(s, update.id())) => return update,
            State::Down => true,
        };
        let (member, incarnation) = (update.id().clone(), update.incarnation());
        self.heard.lock().expect("heard lock").push(HeardSuspicion {
            member: member.clone(),
            incarnation,
            down_report,
        });
        Member::new(member, incarnation, State::Suspect)
    }
}

/// Whether `member` is the sender itself, in this life or an earlier one at its address.
/// The name is what the transport checked against the sender's certificate.
fn is_self_report(sender: &NodeIdentity, member: &NodeIdentity) -> bool {
    member.name == sender.name && member.addr == sender.addr
}

impl Codec<NodeIdentity> for DownReportCodec {
    type Error = DecodeError;

    fn encode_header(&mut self, header: &Header<NodeIdentity>, buf: impl BufMut) -> Result<(), DecodeError> {
        GossipCodec.encode_header(header, buf)
    }

    fn decode_header(&mut self, buf: impl Buf) -> Result<Header<NodeIdentity>, DecodeError> {
        self.sender = None;
        let header = GossipCodec.decode_header(buf)?;
        self.sender = Some(header.src.clone());
        Ok(header)
    }

    fn encode_member(&mut self, member: &Member<NodeIdentity>, buf: impl BufMut) -> Result<(), DecodeError> {
        GossipCodec.encode_member(member, buf)
    }

    fn decode_member(&mut self, buf: impl Buf) -> Result<Member<NodeIdentity>, DecodeError> {
        let update = GossipCodec.decode_member(buf)?;
        if let Some(holder) = other_holder(&self.holders, update.id().addr, &update.id().name) {
            self.address_conflicts.fetch_add(1, Relaxed);
            let detail = format!("{} claims {}, which {holder} holds", update.id().name, update.id().addr);
            return Err(DecodeError::Malformed { what: "member update", detail });
        }
        Ok(self.vet(update))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_proto::NodeMeta;

    fn node(name: &str, last: u8, generation: u64) -> NodeIdentity {
        let addr = std::net::SocketAddr::from(([127, 0, 0, last], 7946));
        NodeIdentity { addr, generation, name: name.into(), meta: NodeMeta::default() }
    }

    /// Encodes a packet from `src` carrying `updates` and decodes it as foca does.
    fn decode(src: &NodeIdentity, updates: &[Member<NodeIdentity>]) -> (Vec<Member<NodeIdentity>>, Vec<bool>) {
        let header =
            Header { src: src.clone(), src_incarnation: 0, dst: node("me", 9, 1), message: foca::Message::Gossip };
        let mut buf = Vec::new();
        GossipCodec.encode_header(&header, &mut buf).unwrap();
        for u in updates {
            GossipCodec.encode_member(u, &mut buf).unwrap();
        }
        let mut codec = DownReportCodec::default();
        let mut rd = &buf[..];
        codec.decode_header(&mut rd).unwrap();
        let got = updates.iter().map(|_| codec.decode_member(&mut rd).unwrap()).collect();
        let heard = codec.heard.lock().unwrap().iter().map(|h| h.down_report).collect();
        (got, heard)
    }

    #[test]
    fn a_down_report_about_another_member_reads_as_suspect_at_the_same_incarnation() {
        let (mallory, x, y) = (node("mallory", 2, 1), node("x", 3, 1), node("y", 4, 1));
        let updates =
            [Member::new(x.clone(), 4, State::Down), Member::alive(y.clone()), Member::new(y, 2, State::Suspect)];
        let (got, heard) = decode(&mallory, &updates);
        assert_eq!(got[0], Member::new(x, 4, State::Suspect));
        assert_eq!(got[1..], updates[1..]);
        assert_eq!(heard, [true, false], "the core hears of both suspicions, one a Down report");
    }

    #[test]
    fn the_senders_own_down_stays_down_and_a_look_alike_does_not() {
        let leaver = node("a", 2, 5);
        let own = [Member::new(leaver.clone(), 3, State::Down), Member::down(node("a", 2, 4))];
        assert_eq!(decode(&leaver, &own), (own.to_vec(), vec![]), "its leave and an earlier life of it");
        // Its name at another member's address is not itself.
        let elsewhere = Member::down(node("a", 3, 6));
        assert_eq!(decode(&leaver, &[elsewhere]).1, [true]);
    }
}
