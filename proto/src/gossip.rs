//! The foca codec (foca 2 ships none) and the custom broadcast items riding on gossip.
//!
//! A foca packet is a header followed by member updates and custom broadcasts; the codec
//! encodes each item with bincode. Identities are length-delimited blobs, which is where new
//! fields go, so the layout of headers and members never has to change within a version.

use bytes::{Buf, BufMut};
use foca::{Header, Member};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

use crate::{DecodeError, NodeIdentity};

/// Encodes foca headers and members with bincode 2.
#[derive(Debug, Default, Clone, Copy)]
pub struct GossipCodec;

impl GossipCodec {
    fn decode_item<T: serde::de::DeserializeOwned>(what: &'static str, mut buf: impl Buf) -> Result<T, DecodeError> {
        let (item, used) = bincode::serde::decode_from_slice(buf.chunk(), crate::bincode_config())
            .map_err(|e| DecodeError::Malformed { what, detail: e.to_string() })?;
        buf.advance(used);
        Ok(item)
    }

    fn encode_item(what: &'static str, item: &impl Serialize, mut buf: impl BufMut) -> Result<(), DecodeError> {
        let bytes = bincode::serde::encode_to_vec(item, crate::bincode_config())
            .map_err(|e| DecodeError::Malformed { what, detail: e.to_string() })?;
        // foca requires a clean buffer when an item does not fit.
        if buf.remaining_mut() < bytes.len() {
            return Err(DecodeError::TooLarge { len: bytes.len(), max: buf.remaining_mut() });
        }
        buf.put_slice(&bytes);
        Ok(())
    }
}

impl foca::Codec<NodeIdentity> for GossipCodec {
    type Error = DecodeError;

    fn encode_header(&mut self, header: &Header<NodeIdentity>, buf: impl BufMut) -> Result<(), DecodeError> {
        Self::encode_item("gossip header", header, buf)
    }

    fn decode_header(&mut self, buf: impl Buf) -> Result<Header<NodeIdentity>, DecodeError> {
        Self::decode_item("gossip header", buf)
    }

    fn encode_member(&mut self, member: &Member<NodeIdentity>, buf: impl BufMut) -> Result<(), DecodeError> {
        Self::encode_item("gossip member", member, buf)
    }

    fn decode_member(&mut self, buf: impl Buf) -> Result<Member<NodeIdentity>, DecodeError> {
        Self::decode_item("gossip member", buf)
    }
}

/// Reads only the header of a gossip packet: the transport uses it to check that the
/// sender's claimed name matches its certificate before foca sees the packet.
pub fn peek_header(packet: &[u8]) -> Result<Header<NodeIdentity>, DecodeError> {
    GossipCodec::decode_item("gossip header", packet)
}

/// Custom broadcast item kinds (first byte of an item).
pub const ITEM_LEAVE: u8 = 1;

/// "This node left on purpose": lets every member tell a graceful leave from a crash.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LeaveNotice {
    pub addr: SocketAddr,
    pub generation: u64,
    pub name: String,
}

impl LeaveNotice {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![ITEM_LEAVE];
        out.extend(bincode::serde::encode_to_vec(self, crate::bincode_config()).expect("Vec writer"));
        out
    }

    pub fn decode(item: &[u8]) -> Result<LeaveNotice, DecodeError> {
        match item.split_first() {
            Some((&ITEM_LEAVE, body)) => GossipCodec::decode_item("leave notice", body),
            Some((&crate::policy::ITEM_POLICY, _)) => Err(DecodeError::UnknownKind(crate::policy::ITEM_POLICY)),
            Some((&kind, _)) => Err(DecodeError::UnknownKind(kind)),
            None => Err(DecodeError::Truncated),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::tests::sample;
    use foca::{Codec, Message, State};

    #[test]
    fn header_and_members_round_trip_back_to_back() {
        let mut codec = GossipCodec;
        let header = Header {
            src: sample("a", 1),
            src_incarnation: 3,
            dst: sample("b", 2),
            message: Message::PingReq { target: sample("c", 3), probe_number: 9 },
        };
        let member = Member::new(sample("c", 3), 7, State::Suspect);
        let mut buf = Vec::new();
        codec.encode_header(&header, &mut buf).unwrap();
        codec.encode_member(&member, &mut buf).unwrap();
        let mut rd = &buf[..];
        assert_eq!(codec.decode_header(&mut rd).unwrap(), header);
        assert_eq!(codec.decode_member(&mut rd).unwrap(), member);
        assert!(rd.is_empty());
    }

    #[test]
    fn member_that_does_not_fit_leaves_buffer_clean() {
        let mut space = [0u8; 10];
        let mut buf = &mut space[..];
        let member = Member::new(sample("c", 3), 7, State::Alive);
        assert!(GossipCodec.encode_member(&member, &mut buf).is_err());
        assert_eq!(buf.len(), 10);
    }

    #[test]
    fn random_bytes_never_panic_the_decoder() {
        use rand_like::Lcg;
        let mut rng = Lcg(42);
        for len in 0..400 {
            let bytes: Vec<u8> = (0..len).map(|_| rng.next()).collect();
            let _ = GossipCodec.decode_header(&bytes[..]);
            let _ = GossipCodec.decode_member(&bytes[..]);
            let _ = LeaveNotice::decode(&bytes);
            let _ = NodeIdentity::from_blob(&bytes);
        }
    }

    #[test]
    fn leave_notice_round_trips_and_rejects_unknown_items() {
        let n = LeaveNotice { addr: "127.0.0.2:7946".parse().unwrap(), generation: 5, name: "a".into() };
        assert_eq!(LeaveNotice::decode(&n.encode()), Ok(n));
        assert_eq!(LeaveNotice::decode(&[200, 1]), Err(DecodeError::UnknownKind(200)));
    }

    /// A tiny deterministic byte source so this crate needs no rand dependency.
    mod rand_like {
        pub struct Lcg(pub u64);
        impl Lcg {
            pub fn next(&mut self) -> u8 {
                self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (self.0 >> 56) as u8
            }
        }
    }
}
