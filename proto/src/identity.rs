//! The identity a node gossips: who it is, where to reach it, and its metadata.
//!
//! On the wire an identity is one length-delimited blob, so a later wire version can append
//! fields (older peers ignore the tail) without shifting anything around it in a packet.
//! The name inside is only a claim: the transport checks it against the peer's certificate.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::limits::*;
use crate::DecodeError;

/// A member of the cluster as SWIM sees it.
///
/// `addr` is foca's notion of address: two identities with one `addr` are the same host,
/// and the one with the higher `generation` wins, which is how a restarted agent replaces
/// its previous life at once instead of waiting for it to be declared down.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct NodeIdentity {
    /// Advertised peer (QUIC/UDP) address.
    pub addr: SocketAddr,
    /// Chosen at start (wall-clock milliseconds) and bumped on every rejoin.
    pub generation: u64,
    /// Node name; equals the name in the node's certificate.
    pub name: String,
    pub meta: NodeMeta,
}

/// What operators and other agents want to know about a node besides how to probe it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NodeMeta {
    /// Where the node's local HTTP API listens (informational; usually loopback).
    pub api_addr: Option<SocketAddr>,
    /// Agent version string.
    pub version: String,
    /// Operator labels: cloud, region, zone, anything else.
    pub labels: BTreeMap<String, String>,
}

/// The fields of wire version 1, in wire order. Append only.
#[derive(Serialize, Deserialize)]
struct IdentityV1 {
    addr: SocketAddr,
    generation: u64,
    name: String,
    api_addr: Option<SocketAddr>,
    version: String,
    labels: Vec<(String, String)>,
}

impl NodeIdentity {
    /// A placeholder for a seed known only by address. foca accepts an announce sent to any
    /// identity with the receiver's address, so this is enough to join through it.
    pub fn seed(addr: SocketAddr) -> NodeIdentity {
        NodeIdentity { addr, generation: 0, name: String::new(), meta: NodeMeta::default() }
    }

    /// Checks the limits every peer enforces; the error names the offending field.
    pub fn validate(&self) -> Result<(), DecodeError> {
        let bad = |detail: String| Err(DecodeError::Malformed { what: "identity", detail });
        if self.name.len() > MAX_NAME_LEN {
            return bad(format!("name is {} bytes, at most {MAX_NAME_LEN}", self.name.len()));
        }
        if self.meta.version.len() > MAX_VERSION_LEN {
            return bad(format!("version is longer than {MAX_VERSION_LEN} bytes"));
        }
        if self.meta.labels.len() > MAX_LABELS {
            return bad(format!("{} labels, at most {MAX_LABELS}", self.meta.labels.len()));
        }
        for (k, v) in &self.meta.labels {
            if k.is_empty() || k.len() > MAX_LABEL_KEY_LEN || v.len() > MAX_LABEL_VALUE_LEN {
                return bad(format!("label {k:?} exceeds {MAX_LABEL_KEY_LEN}/{MAX_LABEL_VALUE_LEN} bytes or is empty"));
            }
        }
        Ok(())
    }

    /// Encodes the identity blob (without its length prefix).
    pub fn to_blob(&self) -> Vec<u8> {
        let v1 = IdentityV1 {
            addr: self.addr,
            generation: self.generation,
            name: self.name.clone(),
            api_addr: self.meta.api_addr,
            version: self.meta.version.clone(),
            labels: self.meta.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        };
        bincode::serde::encode_to_vec(&v1, crate::bincode_config()).expect("Vec writer cannot fail")
    }

    /// Decodes an identity blob, ignoring fields appended by newer versions.
    pub fn from_blob(blob: &[u8]) -> Result<NodeIdentity, DecodeError> {
        if blob.len() > MAX_IDENTITY_BYTES {
            return Err(DecodeError::TooLarge { len: blob.len(), max: MAX_IDENTITY_BYTES });
        }
        let (v1, _tail): (IdentityV1, usize) = bincode::serde::decode_from_slice(blob, crate::bincode_config())
            .map_err(|e| DecodeError::Malformed { what: "identity", detail: e.to_string() })?;
        let id = NodeIdentity {
            addr: v1.addr,
            generation: v1.generation,
            name: v1.name,
            meta: NodeMeta { api_addr: v1.api_addr, version: v1.version, labels: v1.labels.into_iter().collect() },
        };
        id.validate()?;
        Ok(id)
    }
}

impl foca::Identity for NodeIdentity {
    type Addr = SocketAddr;

    /// Rejoin at once under a bumped generation after being declared down.
    fn renew(&self) -> Option<Self> {
        Some(NodeIdentity { generation: self.generation.wrapping_add(1), ..self.clone() })
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The newer life of a host (higher generation) replaces the older one.
    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.generation > adversary.generation
    }
}

impl fmt::Debug for NodeIdentity {
    // Terse on purpose: identities appear in foca's trace logs many times per second.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}#{}", self.name, self.addr, self.generation)
    }
}

impl Serialize for NodeIdentity {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.to_blob())
    }
}

impl<'de> Deserialize<'de> for NodeIdentity {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_bytes(BlobVisitor)
    }
}

struct BlobVisitor;

impl<'de> serde::de::Visitor<'de> for BlobVisitor {
    type Value = NodeIdentity;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a length-delimited node identity")
    }

    fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<NodeIdentity, E> {
        NodeIdentity::from_blob(v).map_err(E::custom)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<NodeIdentity, A::Error> {
        let mut blob = Vec::new();
        while let Some(b) = seq.next_element::<u8>()? {
            if blob.len() == MAX_IDENTITY_BYTES {
                return Err(serde::de::Error::custom("identity too large"));
            }
            blob.push(b);
        }
        self.visit_bytes(&blob)
    }
}

/// Checks a node name against what certificates and gossip accept; the error says the rule.
pub fn validate_node_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "name: {name:?} is not a valid node name; use 1-63 characters of a-z, 0-9, '.', '_', '-', starting with a letter or digit"
        ))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample(name: &str, port: u16) -> NodeIdentity {
        NodeIdentity {
            addr: SocketAddr::from(([127, 0, 0, 2], port)),
            generation: 1_700_000_000_000,
            name: name.into(),
            meta: NodeMeta {
                api_addr: Some(SocketAddr::from(([127, 0, 0, 1], 8500))),
                version: "0.1.0".into(),
                labels: [("zone".to_string(), "eu-1a".to_string())].into(),
            },
        }
    }

    #[test]
    fn blob_round_trips() {
        let id = sample("n1", 7946);
        assert_eq!(NodeIdentity::from_blob(&id.to_blob()), Ok(id));
    }

    #[test]
    fn appended_fields_from_a_newer_version_are_ignored() {
        let id = sample("n1", 7946);
        let mut blob = id.to_blob();
        blob.extend_from_slice(&[1, 2, 3, 4]);
        assert_eq!(NodeIdentity::from_blob(&blob), Ok(id));
    }

    #[test]
    fn oversized_names_and_label_floods_are_refused() {
        let mut id = sample(&"x".repeat(MAX_NAME_LEN + 1), 1);
        assert!(NodeIdentity::from_blob(&id.to_blob()).is_err());
        id.name = "ok".into();
        id.meta.labels = (0..=MAX_LABELS).map(|i| (format!("k{i}"), "v".into())).collect();
        assert!(NodeIdentity::from_blob(&id.to_blob()).is_err());
    }
}
