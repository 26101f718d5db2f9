//! The envelope in front of every message: `[MAGIC, version, kind] ++ body`.
//!
//! Compatibility rule: within one wire version, messages only grow by appending fields at
//! the end of a length-delimited item (see [`crate::identity`]); older peers ignore the tail.
//! A change that older peers could misread takes a new version, and a peer refuses a version
//! it does not speak with [`DecodeError::UnsupportedVersion`] instead of guessing.

use thiserror::Error;

/// First byte of every Trellis message; catches stray or misdirected traffic early.
pub const MAGIC: u8 = 0x7e;

/// The wire version this build speaks.
///
/// 2: policy entries carry a writer proof (`PolicyEntry::proof`).
pub const WIRE_VERSION: u8 = 2;

/// Bytes of envelope before the body.
pub const HEADER_LEN: usize = 3;

/// What the body holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum MessageKind {
    /// A foca SWIM packet, encoded with [`crate::GossipCodec`].
    Gossip = 1,
    /// Policy anti-entropy and pushes, a [`crate::PolicySync`].
    PolicySync = 2,
    /// The header of a forwarded service stream, a [`crate::forward::ForwardOpen`].
    Forward = 3,
    /// Rate-limit demand reports and share grants, a [`crate::ratelimit::RateLimitMsg`].
    RateLimit = 4,
    /// A node's mesh-wide metrics for its last interval, a [`crate::stats::StatsDigest`].
    Stats = 5,
    /// A question for the nodes that keep services' figures, or an answer, a
    /// [`crate::stats::StatsCall`].
    StatsQuery = 6,
}

impl MessageKind {
    fn from_byte(b: u8) -> Option<MessageKind> {
        match b {
            1 => Some(MessageKind::Gossip),
            2 => Some(MessageKind::PolicySync),
            3 => Some(MessageKind::Forward),
            4 => Some(MessageKind::RateLimit),
            5 => Some(MessageKind::Stats),
            6 => Some(MessageKind::StatsQuery),
            _ => None,
        }
    }

    /// A stable label for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            MessageKind::Gossip => "gossip",
            MessageKind::PolicySync => "policy_sync",
            MessageKind::Forward => "forward",
            MessageKind::RateLimit => "rate_limit",
            MessageKind::Stats => "stats",
            MessageKind::StatsQuery => "stats_query",
        }
    }
}

/// Why bytes from a peer could not be read. Each names what was wrong.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum DecodeError {
    #[error("message is empty or shorter than the {HEADER_LEN}-byte envelope header")]
    Truncated,
    #[error("bad magic byte {0:#04x}: not a Trellis message")]
    BadMagic(u8),
    #[error("wire version {got} is not supported (this agent speaks {supported}); upgrade the older agent")]
    UnsupportedVersion { got: u8, supported: u8 },
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    #[error("message of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("malformed {what}: {detail}")]
    Malformed { what: &'static str, detail: String },
}

/// Writes the envelope header and `body` into `out`.
pub fn encode(kind: MessageKind, body: &[u8], out: &mut Vec<u8>) {
    out.reserve(HEADER_LEN + body.len());
    out.extend_from_slice(&[MAGIC, WIRE_VERSION, kind as u8]);
    out.extend_from_slice(body);
}

/// Splits a message into its kind and body, refusing anything oversized or unknown.
pub fn decode(buf: &[u8], max: usize) -> Result<(MessageKind, &[u8]), DecodeError> {
    if buf.len() > max {
        return Err(DecodeError::TooLarge { len: buf.len(), max });
    }
    let [magic, version, kind, body @ ..] = buf else {
        return Err(DecodeError::Truncated);
    };
    if *magic != MAGIC {
        return Err(DecodeError::BadMagic(*magic));
    }
    if *version != WIRE_VERSION {
        return Err(DecodeError::UnsupportedVersion { got: *version, supported: WIRE_VERSION });
    }
    let kind = MessageKind::from_byte(*kind).ok_or(DecodeError::UnknownKind(*kind))?;
    Ok((kind, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_kind_and_body() {
        let mut out = Vec::new();
        encode(MessageKind::Gossip, b"hello", &mut out);
        assert_eq!(decode(&out, 100), Ok((MessageKind::Gossip, &b"hello"[..])));
    }

    #[test]
    fn refuses_future_version_instead_of_misreading_it() {
        let msg = [MAGIC, WIRE_VERSION + 1, 1, 0, 0];
        assert_eq!(
            decode(&msg, 100),
            Err(DecodeError::UnsupportedVersion { got: WIRE_VERSION + 1, supported: WIRE_VERSION })
        );
    }

    #[test]
    fn refuses_short_foreign_unknown_and_oversized_input() {
        assert_eq!(decode(&[MAGIC, 1], 100), Err(DecodeError::Truncated));
        assert_eq!(decode(&[0x16, 3, 1], 100), Err(DecodeError::BadMagic(0x16)));
        assert_eq!(decode(&[MAGIC, WIRE_VERSION, 99], 100), Err(DecodeError::UnknownKind(99)));
        assert_eq!(decode(&[0; 10], 5), Err(DecodeError::TooLarge { len: 10, max: 5 }));
    }
}
