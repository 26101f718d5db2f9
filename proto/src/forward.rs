//! The header at the start of a forwarded stream: which instance the caller wants. The
//! calling node's identity is not in it: the receiver takes it from the connection's
//! certificate. The calling service, when the sending agent recognised one, is: a claim
//! that node vouches for (the receiver accepts it only from a node that hosts the service).

use serde::{Deserialize, Serialize};

use crate::DecodeError;

/// Largest forward header accepted.
pub const MAX_FORWARD_HEADER: usize = 4096;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardOpen {
    pub service: String,
    /// The instance's object name (`<id>@<node>`).
    pub instance: String,
    /// The calling service, when known. Appended after the first release's two fields:
    /// older agents ignore it, and a header without it decodes as None.
    pub caller_service: Option<String>,
}

/// The header's first release, decoded first so a header without the tail still reads.
#[derive(Serialize, Deserialize)]
struct OpenV1 {
    service: String,
    instance: String,
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
        let v1 = OpenV1 { service: self.service.clone(), instance: self.instance.clone() };
        let mut body = bincode::serde::encode_to_vec(&v1, crate::bincode_config()).expect("Vec writer");
        if self.caller_service.is_some() {
            body.extend(
                bincode::serde::encode_to_vec(&self.caller_service, crate::bincode_config()).expect("Vec writer"),
            );
        }
        let mut env = Vec::new();
        crate::envelope::encode(crate::MessageKind::Forward, &body, &mut env);
        let mut out = (env.len() as u16).to_be_bytes().to_vec();
        out.extend(env);
        out
    }

    /// Decodes the enveloped header (without the length prefix).
    pub fn decode(env: &[u8]) -> Result<ForwardOpen, DecodeError> {
        match crate::envelope::decode(env, MAX_FORWARD_HEADER)? {
            (crate::MessageKind::Forward, body) => {
                let bad = |e: bincode::error::DecodeError| DecodeError::Malformed {
                    what: "forward header",
                    detail: e.to_string(),
                };
                let (v1, used): (OpenV1, usize) =
                    bincode::serde::decode_from_slice(body, crate::bincode_config()).map_err(bad)?;
                let tail = &body[used..];
                let caller_service = if tail.is_empty() {
                    None
                } else {
                    bincode::serde::decode_from_slice::<Option<String>, _>(tail, crate::bincode_config())
                        .map_err(bad)?
                        .0
                };
                Ok(ForwardOpen { service: v1.service, instance: v1.instance, caller_service })
            }
            (k, _) => Err(DecodeError::Malformed { what: "forward header", detail: format!("kind {}", k.as_str()) }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_junk_is_refused() {
        for caller_service in [None, Some("web".to_string())] {
            let h = ForwardOpen { service: "echo".into(), instance: "e1@n2".into(), caller_service };
            let enc = h.encode();
            let len = u16::from_be_bytes([enc[0], enc[1]]) as usize;
            assert_eq!(ForwardOpen::decode(&enc[2..2 + len]), Ok(h));
        }
        assert!(ForwardOpen::decode(&[1, 2, 3, 4]).is_err());
    }

    #[test]
    fn a_header_from_an_older_agent_reads_and_an_older_agent_reads_ours() {
        let old = OpenV1 { service: "echo".into(), instance: "e1@n2".into() };
        let body = bincode::serde::encode_to_vec(&old, crate::bincode_config()).unwrap();
        let mut env = Vec::new();
        crate::envelope::encode(crate::MessageKind::Forward, &body, &mut env);
        let h = ForwardOpen::decode(&env).unwrap();
        assert_eq!((h.service.as_str(), h.caller_service), ("echo", None));
        let new = ForwardOpen { caller_service: Some("web".into()), ..h }.encode();
        let (_, body) = crate::envelope::decode(&new[2..], MAX_FORWARD_HEADER).unwrap();
        let (v1, _): (OpenV1, usize) = bincode::serde::decode_from_slice(body, crate::bincode_config()).unwrap();
        assert_eq!(v1.instance, "e1@n2");
    }
}
