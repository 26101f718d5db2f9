//! Every decoder in this crate, run on one input: the body of the fuzz target
//! `fuzz/fuzz_targets/wire.rs` and of the property test below. Decoding must never panic;
//! whatever it returns is fine.

use bytes::Buf;
use foca::Codec;

use crate::{
    envelope, forward, ratelimit, stats, DecodeError, GossipCodec, LeaveNotice, NodeIdentity, PolicyEntry, PolicySync,
};

/// Runs the envelope decoder, then the decoder of the kind it names, then every decoder on
/// the raw bytes as well (a hostile peer may send any body under any kind).
pub fn decode_everything(data: &[u8]) {
    if let Ok((kind, body)) = envelope::decode(data, crate::limits::MAX_STREAM_MESSAGE) {
        let _ = (kind.as_str(), body.len());
        bodies(body);
    }
    bodies(data);
}

fn bodies(data: &[u8]) {
    let _ = crate::gossip::peek_header(data);
    let mut codec = GossipCodec;
    let mut buf = data;
    if codec.decode_header(&mut buf).is_ok() {
        // Members follow the header until the buffer runs out or one fails.
        while buf.has_remaining() {
            let before = buf.remaining();
            let member: Result<foca::Member<NodeIdentity>, DecodeError> = codec.decode_member(&mut buf);
            if member.is_err() || buf.remaining() == before {
                break;
            }
        }
    }
    let _ = LeaveNotice::decode(data);
    let _ = PolicyEntry::decode_item(data);
    let _ = PolicySync::decode(data);
    let _ = forward::ForwardOpen::decode(data);
    let _ = ratelimit::RateLimitMsg::decode(data);
    let _ = stats::StatsDigest::decode(data);
    let _ = stats::StatsCall::decode(data);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]

        #[test]
        fn no_byte_string_makes_a_decoder_panic(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
            decode_everything(&data);
        }

        #[test]
        fn no_envelope_with_a_valid_header_makes_a_decoder_panic(
            kind in 0u8..8,
            body in proptest::collection::vec(any::<u8>(), 0..2048),
        ) {
            let mut data = vec![envelope::MAGIC, crate::WIRE_VERSION, kind];
            data.extend(body);
            decode_everything(&data);
        }
    }

    #[test]
    fn valid_messages_with_flipped_bytes_never_panic() {
        let sync = PolicySync::Entries {
            entries: vec![PolicyEntry {
                kind: "services".into(),
                name: "web".into(),
                version: (1, 2),
                ancestors: [(0, 0); 2],
                body: Some("{}".into()),
                proof: None,
            }],
            want: vec![1, 2],
        }
        .encode();
        for i in 0..sync.len() {
            for bit in 0..8 {
                let mut m = sync.clone();
                m[i] ^= 1 << bit;
                decode_everything(&m);
            }
        }
    }
}
