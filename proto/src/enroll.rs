//! The enrollment exchange: one JSON request and one JSON response on one bidirectional
//! stream of a `trellis-enroll/1` connection. Bounded in size; unknown fields refused.

use std::fmt;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

pub const VERSION: u8 = 1;
/// Largest request or response: a CSR, a certificate and a CA are about 2 KiB.
pub const MAX_MESSAGE: usize = 16 * 1024;

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    pub id: String,
    pub secret: String,
}

/// A signing request: enrollment (with a token) or renewal (over mTLS, no token).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    pub version: u8,
    pub name: String,
    /// The CSR (DER, hex): the public key and a signature by the requester's private key.
    pub csr: String,
    #[serde(default)]
    pub token: Option<Credentials>,
    /// The requester's clock (Unix ms), to refuse a skew that would break handshakes.
    pub time_ms: i64,
}

impl fmt::Debug for Request {
    // Never prints the token secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let token = self.token.as_ref().map(|t| t.id.as_str());
        write!(f, "Request(name {}, token id {token:?})", self.name)
    }
}

/// Why a request was refused, as a stable code plus a message with the fix.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    pub code: String,
    pub message: String,
    /// Signers the requester may try instead (answer of a node that is not one).
    #[serde(default)]
    pub signers: Vec<SocketAddr>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Granted { cert_pem: String, ca_pem: String, not_after_ms: i64, time_ms: i64 },
    Refused { refusal: Refusal, time_ms: i64 },
}

/// Decodes a message, refusing oversized or malformed input with what is wrong.
pub fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    if bytes.len() > MAX_MESSAGE {
        return Err(format!("message of {} bytes, at most {MAX_MESSAGE}", bytes.len()));
    }
    serde_json::from_slice(bytes).map_err(|e| format!("not an enrollment message: {e}"))
}

pub fn encode<T: Serialize>(m: &T) -> Vec<u8> {
    serde_json::to_vec(m).expect("serializable")
}

pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || s.len() > 2 * MAX_MESSAGE {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_unknown_fields_or_junk_are_refused() {
        let r = Request {
            version: 1,
            name: "n1".into(),
            csr: "00ff".into(),
            token: Some(Credentials { id: "a".into(), secret: "s3cr3t".into() }),
            time_ms: 5,
        };
        assert_eq!(decode::<Request>(&encode(&r)).unwrap(), r);
        assert!(!format!("{r:?}").contains("s3cr3t"));
        let e = decode::<Request>(br#"{"version":1,"name":"n","csr":"","time_ms":1,"admin":true}"#).unwrap_err();
        assert!(e.contains("unknown field `admin`"), "{e}");
        assert!(decode::<Request>(&[0xff; 64]).is_err());
        assert!(decode::<Request>(&vec![b' '; MAX_MESSAGE + 1]).unwrap_err().contains("at most"));
        assert_eq!(unhex("00ff10"), Some(vec![0, 255, 16]));
        assert_eq!(unhex("0"), None);
        assert_eq!(unhex("zz"), None);
    }
}
