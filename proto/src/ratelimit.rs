//! Cluster-wide rate limiting on the wire: nodes report their demand for a limit key to the
//! key's owner, and the owner answers with each node's share as a short lease.
//!
//! Per-value keys (a header value, a caller) travel as a 64-bit FNV-1a hash of the value,
//! so header values such as user ids never leave the node that saw them.

use serde::{Deserialize, Serialize};

use crate::DecodeError;

/// Entries one message may carry; a node with more active keys sends several messages.
pub const MAX_ENTRIES: usize = 1024;

/// One limit bucket: the limit object's name and, for `per` limits, the hashed value.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct LimitKey {
    pub limit: String,
    /// 0 for a limit without `per`; otherwise [`value_hash`] of the value.
    pub value: u64,
}

/// What a node saw for one key over its last report interval, in requests per second.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Demand {
    pub key: LimitKey,
    pub offered: f32,
    pub admitted: f32,
}

/// The owner's answer for one key: the receiver's rate and burst until the lease ends,
/// plus the cluster-wide picture so any node can show it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Grant {
    pub key: LimitKey,
    pub rate: f32,
    pub burst: f32,
    pub lease_ms: u32,
    pub cluster_offered: f32,
    pub cluster_admitted: f32,
    pub nodes: u16,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum RateLimitMsg {
    Report(Vec<Demand>),
    Grant(Vec<Grant>),
}

impl RateLimitMsg {
    pub fn encode(&self) -> Vec<u8> {
        bincode::serde::encode_to_vec(self, crate::bincode_config()).expect("Vec writer")
    }

    /// Decodes and checks bounds: entry count, name length, finite non-negative rates.
    pub fn decode(body: &[u8]) -> Result<RateLimitMsg, DecodeError> {
        let msg: RateLimitMsg = bincode::serde::decode_from_slice(body, crate::bincode_config())
            .map(|(v, _)| v)
            .map_err(|e| malformed(e.to_string()))?;
        msg.check()?;
        Ok(msg)
    }

    fn check(&self) -> Result<(), DecodeError> {
        let (n, keys, rates): (usize, Vec<&LimitKey>, Vec<f32>) = match self {
            RateLimitMsg::Report(d) => {
                (d.len(), d.iter().map(|d| &d.key).collect(), d.iter().flat_map(|d| [d.offered, d.admitted]).collect())
            }
            RateLimitMsg::Grant(g) => (
                g.len(),
                g.iter().map(|g| &g.key).collect(),
                g.iter().flat_map(|g| [g.rate, g.burst, g.cluster_offered, g.cluster_admitted]).collect(),
            ),
        };
        if n > MAX_ENTRIES {
            return Err(malformed(format!("{n} entries, at most {MAX_ENTRIES}")));
        }
        if let Some(k) = keys.iter().find(|k| k.limit.is_empty() || k.limit.len() > crate::limits::MAX_NAME_LEN) {
            return Err(malformed(format!("limit name of {} bytes", k.limit.len())));
        }
        if rates.iter().any(|r| !r.is_finite() || *r < 0.0) {
            return Err(malformed("a rate is negative or not finite".into()));
        }
        Ok(())
    }
}

fn malformed(detail: String) -> DecodeError {
    DecodeError::Malformed { what: "rate limit message", detail }
}

/// FNV-1a, 64 bits: stable across builds and platforms, unlike std's hasher. Never 0, so 0
/// can mean "no value".
pub fn value_hash(value: &[u8]) -> u64 {
    let h = value.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3));
    h.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> LimitKey {
        LimitKey { limit: "web".into(), value: value_hash(b"alice") }
    }

    #[test]
    fn messages_round_trip() {
        let r = RateLimitMsg::Report(vec![Demand { key: key(), offered: 120.5, admitted: 100.0 }]);
        assert_eq!(RateLimitMsg::decode(&r.encode()), Ok(r));
        let g = RateLimitMsg::Grant(vec![Grant {
            key: key(),
            rate: 10.0,
            burst: 2.0,
            lease_ms: 250,
            cluster_offered: 3.0,
            cluster_admitted: 2.0,
            nodes: 3,
        }]);
        assert_eq!(RateLimitMsg::decode(&g.encode()), Ok(g));
    }

    #[test]
    fn junk_and_lies_are_errors() {
        assert!(RateLimitMsg::decode(&[0xff, 0xff, 0xff]).is_err());
        let neg = RateLimitMsg::Report(vec![Demand { key: key(), offered: -1.0, admitted: 0.0 }]);
        assert!(RateLimitMsg::decode(&neg.encode()).is_err());
        let nan = RateLimitMsg::Report(vec![Demand { key: key(), offered: f32::NAN, admitted: 0.0 }]);
        assert!(RateLimitMsg::decode(&nan.encode()).is_err());
        let unnamed = RateLimitMsg::Report(vec![Demand {
            key: LimitKey { limit: String::new(), value: 0 },
            offered: 1.0,
            admitted: 1.0,
        }]);
        assert!(RateLimitMsg::decode(&unnamed.encode()).is_err());
        let many = RateLimitMsg::Report(vec![Demand { key: key(), offered: 1.0, admitted: 1.0 }; MAX_ENTRIES + 1]);
        assert!(RateLimitMsg::decode(&many.encode()).is_err());
    }

    #[test]
    fn value_hash_is_stable_and_never_zero() {
        assert_eq!(value_hash(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(value_hash(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_ne!(value_hash(b"alice"), value_hash(b"bob"));
    }
}
