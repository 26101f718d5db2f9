//! The header at the start of a forwarded stream: which instance the caller wants. The
//! caller's identity is not in it: the receiver takes it from the connection's certificate.

use serde::{Deserialize, Serialize};

use crate::DecodeError;

/// Largest forward header accepted.
pub const MAX_FORWARD_HEADER: usize = 4096;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardOpen {
    pub service: String,
    /// The instance's object name (`<id>@<node>`).
    pub instance: String,
}

/// The receiver's one-byte answer before any payload flows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ForwardStatus {
    Ok = 0,
    Denied = 1,
    Unreachable = 2,
    UnknownInstance = 3,
    BadRequest = 4,
}

impl ForwardStatus {
    pub fn from_byte(b: u8) -> ForwardStatus {
        match b {
            0 => ForwardStatus::Ok,
            1 => ForwardStatus::Denied,
            2 => ForwardStatus::Unreachable,
            3 => ForwardStatus::UnknownInstance,
            _ => ForwardStatus::BadRequest,
        }
    }
}

impl ForwardOpen {
    /// `[len: u16 BE][envelope(kind Forward, bincode)]`.
    pub fn encode(&self) -> Vec<u8> {
        let body = bincode::serde::encode_to_vec(self, crate::bincode_config()).expect("Vec writer");
        let mut env = Vec::new();
        crate::envelope::encode(crate::MessageKind::Forward, &body, &mut env);
        let mut out = (env.len() as u16).to_be_bytes().to_vec();
        out.extend(env);
        out
    }

    /// Decodes the enveloped header (without the length prefix).
    pub fn decode(env: &[u8]) -> Result<ForwardOpen, DecodeError> {
        match crate::envelope::decode(env, MAX_FORWARD_HEADER)? {
            (crate::MessageKind::Forward, body) => bincode::serde::decode_from_slice(body, crate::bincode_config())
                .map(|(v, _)| v)
                .map_err(|e| DecodeError::Malformed { what: "forward header", detail: e.to_string() }),
            (k, _) => Err(DecodeError::Malformed { what: "forward header", detail: format!("kind {}", k.as_str()) }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_junk_is_refused() {
        let h = ForwardOpen { service: "echo".into(), instance: "e1@n2".into() };
        let enc = h.encode();
        let len = u16::from_be_bytes([enc[0], enc[1]]) as usize;
        assert_eq!(ForwardOpen::decode(&enc[2..2 + len]), Ok(h));
        assert!(ForwardOpen::decode(&[1, 2, 3, 4]).is_err());
    }
}
