//! Policy replication on the wire: one object version, and the anti-entropy exchange.
//!
//! Objects travel as JSON text inside bincode so that the receiver can run exactly the
//! validation the API runs; the kind is a string for the same reason (an unknown kind from a
//! newer peer is refused by name, not misread).

use serde::{Deserialize, Serialize};

use crate::DecodeError;

/// One version of one object. `body: None` is a tombstone (a delete).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyEntry {
    pub kind: String,
    pub name: String,
    /// (hybrid logical clock, writer id): the total order every node agrees on.
    pub version: (u64, u64),
    /// The two versions this one replaced on its writer, newest first ((0,0) = none).
    pub ancestors: [(u64, u64); 2],
    pub body: Option<String>,
    /// The writer's signature, for kinds whose writer matters (a node's own instances,
    /// revocations): receivers check it instead of trusting the claimed writer id, which any
    /// relaying peer could forge.
    pub proof: Option<WriterProof>,
}

/// A writer's certificate and its signature over [`PolicyEntry::signed_message`].
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct WriterProof {
    /// DER of the writer's node certificate (it names the writer and chains to the CA).
    pub cert: Vec<u8>,
    /// TLS `SignatureScheme` code of `sig`.
    pub scheme: u16,
    pub sig: Vec<u8>,
}

/// Largest certificate and signature a proof may carry.
pub const MAX_PROOF_CERT: usize = 4096;
pub const MAX_PROOF_SIG: usize = 512;

/// Anti-entropy: compare a root hash, then 256 bucket hashes, then swap the entries of the
/// buckets that differ. Each step is only taken when the previous one shows a difference.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PolicySync {
    Root {
        root: u64,
        objects: u64,
    },
    Buckets {
        buckets: Vec<u64>,
    },
    /// Entries of some buckets, and the buckets the sender wants in return.
    Entries {
        entries: Vec<PolicyEntry>,
        want: Vec<u16>,
    },
}

/// Broadcast item kind for a policy entry piggybacked on gossip.
pub const ITEM_POLICY: u8 = 2;

impl PolicyEntry {
    /// What a writer signs: every field but the proof, behind a domain tag so the signature
    /// cannot be replayed as any other kind of message.
    pub fn signed_message(&self) -> Vec<u8> {
        let fields = (&self.kind, &self.name, self.version, self.ancestors, &self.body);
        let mut out = b"trellis policy entry v1\0".to_vec();
        out.extend(bincode::serde::encode_to_vec(fields, crate::bincode_config()).expect("Vec writer"));
        out
    }

    /// As a gossip broadcast item.
    pub fn encode_item(&self) -> Vec<u8> {
        let mut out = vec![ITEM_POLICY];
        out.extend(bincode::serde::encode_to_vec(self, crate::bincode_config()).expect("Vec writer"));
        out
    }

    pub fn decode_item(body: &[u8]) -> Result<PolicyEntry, DecodeError> {
        decode("policy entry", body)
    }
}

impl PolicySync {
    pub fn encode(&self) -> Vec<u8> {
        bincode::serde::encode_to_vec(self, crate::bincode_config()).expect("Vec writer")
    }

    pub fn decode(body: &[u8]) -> Result<PolicySync, DecodeError> {
        decode("policy sync", body)
    }
}

fn decode<T: serde::de::DeserializeOwned>(what: &'static str, body: &[u8]) -> Result<T, DecodeError> {
    bincode::serde::decode_from_slice(body, crate::bincode_config())
        .map(|(v, _)| v)
        .map_err(|e| DecodeError::Malformed { what, detail: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(kind: &str, name: &str, proof: Option<WriterProof>) -> PolicyEntry {
        let (kind, name) = (kind.into(), name.into());
        PolicyEntry { kind, name, version: (5, 9), ancestors: [(1, 9), (0, 0)], body: Some("{}".into()), proof }
    }

    #[test]
    fn sync_messages_round_trip_and_junk_is_an_error() {
        let proof = WriterProof { cert: vec![1, 2, 3], scheme: 0x0403, sig: vec![4; 70] };
        let e = entry("services", "web", Some(proof));
        let m = PolicySync::Entries { entries: vec![e.clone()], want: vec![3, 200] };
        assert_eq!(PolicySync::decode(&m.encode()), Ok(m));
        assert_eq!(PolicyEntry::decode_item(&e.encode_item()[1..]), Ok(e));
        assert!(PolicySync::decode(&[9, 9, 9, 9]).is_err());
        assert!(PolicySync::decode(&[2, 0xfc, 0xff, 0xff, 0xff, 0xff]).is_err());
    }

    #[test]
    fn the_signed_message_covers_every_field_but_the_proof() {
        let e = entry("instances", "web-1@a", None);
        let base = e.signed_message();
        let with_proof =
            PolicyEntry { proof: Some(WriterProof { cert: vec![1], scheme: 1, sig: vec![2] }), ..e.clone() };
        assert_eq!(with_proof.signed_message(), base);
        let changes = [
            PolicyEntry { kind: "revocations".into(), ..e.clone() },
            PolicyEntry { name: "web-1@b".into(), ..e.clone() },
            PolicyEntry { version: (5, 8), ..e.clone() },
            PolicyEntry { ancestors: [(1, 9), (1, 1)], ..e.clone() },
            PolicyEntry { body: None, ..e.clone() },
        ];
        for c in changes {
            assert_ne!(c.signed_message(), base, "{c:?}");
        }
    }
}
