//! Whether a signer signs a request: plain logic over the request, what the TLS handshake
//! proved, the membership and the revocation list, and the token book.

use std::collections::BTreeSet;
use std::net::SocketAddr;

use trellis_proto::enroll::{Refusal, Request, VERSION};

/// Why a token was not accepted; the joiner sees the message and the fix.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the join token {id} is not known to this signer; create one with `trellis token create --ca-dir DIR` on a host holding the CA, and send it to the signer that uses that DIR")]
    Unknown { id: String },
    #[error("the join token {id} was already used (by {by:?}, {ago_s} s ago); tokens are single-use: create a new one with `trellis token create`")]
    Used { id: String, by: String, ago_s: i64 },
    #[error("the join token {id} expired {ago_s} s ago (by the signer's clock); create a new one with `trellis token create --ttl ...`")]
    Expired { id: String, ago_s: i64 },
}

impl TokenError {
    pub fn code(&self) -> &'static str {
        match self {
            TokenError::Unknown { .. } => "token_unknown",
            TokenError::Used { .. } => "token_used",
            TokenError::Expired { .. } => "token_expired",
        }
    }
}

/// Clocks further apart than this break handshakes (certificates are backdated 60 s) and
/// token expiry; the joiner is told to fix its clock instead of failing later, obscurely.
pub const MAX_CLOCK_SKEW_MS: i64 = 30_000;

/// What the signer knows when a request arrives.
pub struct Context<'a> {
    pub now_ms: i64,
    /// This node holds the CA key.
    pub is_signer: bool,
    /// Signers known from member labels, for a redirect.
    pub signers: Vec<SocketAddr>,
    /// The name in the client certificate, when the client presented one (verified).
    pub authenticated: Option<&'a str>,
    /// Names of members alive or suspect right now.
    pub live_names: &'a BTreeSet<String>,
    pub revoked: &'a dyn Fn(&str) -> bool,
    /// The token book's verdict on (id, secret), without using the token up.
    pub check_token: &'a dyn Fn(&str, &str) -> Result<(), TokenError>,
}

/// The verdict.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Sign for `name`; use the token up first if there is one.
    Sign {
        name: String,
        token: Option<(String, String)>,
    },
    Refuse(Refusal),
}

fn refuse(code: &str, message: String) -> Decision {
    Decision::Refuse(Refusal { code: code.into(), message, signers: vec![] })
}

pub fn decide(req: &Request, ctx: &Context<'_>) -> Decision {
    if req.version != VERSION {
        return refuse(
            "bad_request",
            format!("enrollment version {} is not spoken here (this agent speaks {VERSION}); run the same Trellis version on both hosts", req.version),
        );
    }
    if let Err(e) = trellis_proto::identity::validate_node_name(&req.name) {
        return refuse("bad_request", e);
    }
    if !ctx.is_signer {
        let message = if ctx.signers.is_empty() {
            "this node holds no CA key and knows no signer; join through the host started with --ca-dir, or create the token with `--signer HOST:PORT`".to_string()
        } else {
            "this node holds no CA key; try a signer".to_string()
        };
        return Decision::Refuse(Refusal { code: "not_signer".into(), message, signers: ctx.signers.clone() });
    }
    let skew = req.time_ms - ctx.now_ms;
    if skew.abs() > MAX_CLOCK_SKEW_MS {
        return refuse(
            "clock_skew",
            format!(
                "this host's clock is {} s {} the signer's (at most {} s allowed); synchronise clocks (NTP, e.g. `timedatectl set-ntp true`) and retry",
                skew.abs() / 1000,
                if skew > 0 { "ahead of" } else { "behind" },
                MAX_CLOCK_SKEW_MS / 1000
            ),
        );
    }
    if let Some(cert_name) = ctx.authenticated {
        // A renewal: the handshake proved the name; it cannot be changed here.
        if req.token.is_some() || cert_name != req.name {
            return refuse(
                "name_mismatch",
                format!(
                    "a renewal over the certificate of {cert_name:?} can only be for {cert_name:?}, without a token"
                ),
            );
        }
        return Decision::Sign { name: req.name.clone(), token: None };
    }
    let Some(token) = &req.token else {
        return refuse(
            "bad_request",
            "no join token and no client certificate; give --token from `trellis token create`".into(),
        );
    };
    if let Err(e) = (ctx.check_token)(&token.id, &token.secret) {
        return refuse(e.code(), e.to_string());
    }
    if (ctx.revoked)(&req.name) {
        return refuse(
            "revoked",
            format!("the name {:?} is revoked (policy object revocations/{}); delete the revocation, or pick another --name", req.name, req.name),
        );
    }
    if ctx.live_names.contains(&req.name) {
        return refuse(
            "name_taken",
            format!("a live member is already named {:?}; pick another --name, or stop that node (`trellis leave` on it) and wait until it is down or left", req.name),
        );
    }
    Decision::Sign { name: req.name.clone(), token: Some((token.id.clone(), token.secret.clone())) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_proto::enroll::Credentials;

    fn req(name: &str, token: bool, time_ms: i64) -> Request {
        Request {
            version: VERSION,
            name: name.into(),
            csr: String::new(),
            token: token.then(|| Credentials { id: "abc".into(), secret: "s".into() }),
            time_ms,
        }
    }

    fn run(r: &Request, authenticated: Option<&str>, token: Result<(), TokenError>, is_signer: bool) -> Decision {
        let live: BTreeSet<String> = ["n1".to_string(), "n2".to_string()].into();
        let revoked = |n: &str| n == "bad";
        let check = move |_: &str, _: &str| token.clone();
        let ctx = Context {
            now_ms: 1_000_000,
            is_signer,
            signers: vec!["10.0.0.1:7946".parse().unwrap()],
            authenticated,
            live_names: &live,
            revoked: &revoked,
            check_token: &check,
        };
        decide(r, &ctx)
    }

    fn code(d: Decision) -> String {
        match d {
            Decision::Refuse(r) => r.code,
            Decision::Sign { .. } => "sign".into(),
        }
    }

    #[test]
    fn a_valid_token_for_a_free_name_is_signed_and_names_the_token_to_use_up() {
        let d = run(&req("n3", true, 1_000_000), None, Ok(()), true);
        assert_eq!(d, Decision::Sign { name: "n3".into(), token: Some(("abc".into(), "s".into())) });
    }

    #[test]
    fn each_refusal_has_its_code() {
        let ok = Ok(());
        assert_eq!(code(run(&req("n1", true, 1_000_000), None, ok.clone(), true)), "name_taken");
        assert_eq!(code(run(&req("bad", true, 1_000_000), None, ok.clone(), true)), "revoked");
        assert_eq!(code(run(&req("n3", false, 1_000_000), None, ok.clone(), true)), "bad_request");
        assert_eq!(code(run(&req("N 3", true, 1_000_000), None, ok.clone(), true)), "bad_request");
        let used = Err(TokenError::Used { id: "abc".into(), by: "x".into(), ago_s: 1 });
        assert_eq!(code(run(&req("n3", true, 1_000_000), None, used, true)), "token_used");
        let expired = Err(TokenError::Expired { id: "abc".into(), ago_s: 1 });
        assert_eq!(code(run(&req("n3", true, 1_000_000), None, expired, true)), "token_expired");
    }

    #[test]
    fn a_skewed_clock_is_refused_with_the_direction_and_the_fix() {
        let Decision::Refuse(r) = run(&req("n3", true, 1_000_000 + 45_000), None, Ok(()), true) else { panic!() };
        assert_eq!(r.code, "clock_skew");
        assert!(r.message.contains("45 s ahead of") && r.message.contains("NTP"), "{}", r.message);
        assert_eq!(code(run(&req("n3", true, 1_000_000 - 29_000), None, Ok(()), true)), "sign");
    }

    #[test]
    fn a_bad_token_is_reported_before_the_member_names_are_looked_at() {
        // An unauthenticated caller learns nothing about names without a valid token.
        let unknown = Err(TokenError::Unknown { id: "abc".into() });
        assert_eq!(code(run(&req("n1", true, 1_000_000), None, unknown, true)), "token_unknown");
    }

    #[test]
    fn renewal_over_mtls_keeps_the_certified_name_and_needs_no_token() {
        let d = run(&req("n1", false, 1_000_000), Some("n1"), Err(TokenError::Unknown { id: "".into() }), true);
        assert_eq!(d, Decision::Sign { name: "n1".into(), token: None });
        assert_eq!(code(run(&req("n2", false, 1_000_000), Some("n1"), Ok(()), true)), "name_mismatch");
        assert_eq!(code(run(&req("n1", true, 1_000_000), Some("n1"), Ok(()), true)), "name_mismatch");
    }

    #[test]
    fn a_node_without_the_ca_key_points_at_the_signers() {
        let Decision::Refuse(r) = run(&req("n3", true, 1_000_000), None, Ok(()), false) else { panic!() };
        assert_eq!(r.code, "not_signer");
        assert_eq!(r.signers, vec!["10.0.0.1:7946".parse().unwrap()]);
    }
}
