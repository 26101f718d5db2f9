//! Join tokens, kubeadm-style: `trellis1:<cluster-id>:<id>.<secret>:<ca-sha256>[@<signer>]`.
//!
//! The joiner learns from the token what to trust (the CA by the SHA-256 of its certificate,
//! the cluster id) and what to prove (the secret, 128 random bits). The signer keeps only the
//! id, the SHA-256 of the secret, the expiry and whether it was used ([`TokenBook`], plain
//! logic), in a 0600 file in the CA directory ([`TokenStore`]), so single use survives
//! restarts and `trellis token create` works without a running agent.

use std::fmt;
use std::fs;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::pki::{self, sha256, sha256_hex};

const PREFIX: &str = "trellis1";
const ID_BYTES: usize = 6;
const SECRET_BYTES: usize = 16;
/// Used or expired entries are kept this long past expiry, so a late retry hears "used" or
/// "expired" rather than "unknown".
const KEEP_MS: i64 = 86_400_000;
/// Longest `--ttl`: a join token is meant for the next few hours, not as a standing secret.
pub const MAX_TTL_MS: i64 = 7 * 86_400_000;

/// A parsed join token. `Debug` and `Display` never show the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    pub cluster_id: String,
    pub id: String,
    secret: String,
    /// SHA-256 of the cluster CA certificate (DER), hex.
    pub ca_sha256: String,
    /// Where to send the signing request; else the first `--join` seed.
    pub signer: Option<SocketAddr>,
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JoinToken(id {}, cluster {})", self.id, self.cluster_id)
    }
}

/// Why a token string is not a token.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("token: {0}; copy the whole line `trellis token create` printed (trellis1:<cluster>:<id>.<secret>:<ca-sha256>[@signer])")]
pub struct TokenFormatError(String);

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl JoinToken {
    /// A fresh token for the CA `ca_der` of `cluster_id`.
    pub fn generate(cluster_id: &str, ca_der: &[u8], signer: Option<SocketAddr>) -> JoinToken {
        let mut bytes = [0u8; ID_BYTES + SECRET_BYTES];
        // The OS RNG through ring; a failure here means the host cannot make keys either.
        pki::crypto().secure_random.fill(&mut bytes).expect("system random source");
        JoinToken {
            cluster_id: cluster_id.to_string(),
            id: pki::hex(&bytes[..ID_BYTES]),
            secret: pki::hex(&bytes[ID_BYTES..]),
            ca_sha256: sha256_hex(ca_der),
            signer,
        }
    }

    /// The string handed to the operator (the only place the secret appears).
    pub fn expose(&self) -> String {
        let mut s = format!("{PREFIX}:{}:{}.{}:{}", self.cluster_id, self.id, self.secret, self.ca_sha256);
        if let Some(a) = self.signer {
            s.push('@');
            s.push_str(&a.to_string());
        }
        s
    }

    pub fn parse(s: &str) -> Result<JoinToken, TokenFormatError> {
        let bad = |m: &str| TokenFormatError(m.to_string());
        let s = s.trim();
        let (body, signer) = match s.split_once('@') {
            Some((b, a)) => (b, Some(a.parse().map_err(|_| bad(&format!("signer {a:?} is not HOST:PORT")))?)),
            None => (s, None),
        };
        let parts: Vec<&str> = body.split(':').collect();
        let [prefix, cluster, secret, hash] = parts[..] else {
            return Err(bad("expected 4 parts separated by ':'"));
        };
        if prefix != PREFIX {
            return Err(bad(&format!("starts with {prefix:?}, not {PREFIX:?} (a token of another version or tool)")));
        }
        pki::validate_cluster_id(cluster).map_err(|e| bad(&e.to_string()))?;
        let (id, secret) = secret.split_once('.').ok_or_else(|| bad("the id and the secret must be joined by '.'"))?;
        if !is_hex(id, 2 * ID_BYTES) || !is_hex(secret, 2 * SECRET_BYTES) {
            return Err(bad("the id or the secret is not of the expected length of hex digits"));
        }
        if !is_hex(hash, 64) {
            return Err(bad("the CA hash is not 64 hex digits (SHA-256)"));
        }
        Ok(JoinToken {
            cluster_id: cluster.into(),
            id: id.into(),
            secret: secret.into(),
            ca_sha256: hash.into(),
            signer,
        })
    }

    pub fn secret_sha256(&self) -> [u8; 32] {
        sha256(self.secret.as_bytes())
    }

    /// What goes over the wire to the signer (inside TLS, after the server was checked).
    pub fn credentials(&self) -> (String, String) {
        (self.id.clone(), self.secret.clone())
    }
}

/// What the signer remembers of one token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenEntry {
    pub id: String,
    pub secret_sha256: String,
    pub created_ms: i64,
    pub expires_ms: i64,
    #[serde(default)]
    pub used_ms: Option<i64>,
    #[serde(default)]
    pub used_by: Option<String>,
}

pub use trellis_core::enroll::TokenError;

/// The signer's tokens. Plain data: the file store loads and saves it around each change.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBook {
    pub tokens: Vec<TokenEntry>,
}

/// Constant-time equality, so a guess cannot be refined by timing.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl TokenBook {
    /// Remembers a new token valid for `ttl_ms` from `now`.
    pub fn add(&mut self, token: &JoinToken, now: i64, ttl_ms: i64) {
        self.prune(now);
        self.tokens.push(TokenEntry {
            id: token.id.clone(),
            secret_sha256: pki::hex(&token.secret_sha256()),
            created_ms: now,
            expires_ms: now + ttl_ms,
            used_ms: None,
            used_by: None,
        });
    }

    /// Whether (id, secret) would be accepted now, without using it up.
    pub fn check(&self, id: &str, secret: &str, now: i64) -> Result<(), TokenError> {
        let hash = pki::hex(&sha256(secret.as_bytes()));
        let unknown = || TokenError::Unknown { id: id.to_string() };
        let e = self.tokens.iter().find(|e| e.id == id).ok_or_else(unknown)?;
        if !same(e.secret_sha256.as_bytes(), hash.as_bytes()) {
            // A wrong secret for a real id looks exactly like an unknown token.
            return Err(unknown());
        }
        if let Some(at) = e.used_ms {
            return Err(TokenError::Used {
                id: id.into(),
                by: e.used_by.clone().unwrap_or_default(),
                ago_s: (now - at) / 1000,
            });
        }
        if now >= e.expires_ms {
            return Err(TokenError::Expired { id: id.into(), ago_s: (now - e.expires_ms) / 1000 });
        }
        Ok(())
    }

    /// Checks and uses up the token for `name`.
    pub fn redeem(&mut self, id: &str, secret: &str, now: i64, name: &str) -> Result<(), TokenError> {
        self.check(id, secret, now)?;
        let e = self.tokens.iter_mut().find(|e| e.id == id).expect("checked");
        e.used_ms = Some(now);
        e.used_by = Some(name.to_string());
        Ok(())
    }

    fn prune(&mut self, now: i64) {
        self.tokens.retain(|e| e.expires_ms + KEEP_MS > now);
    }
}

/// The token book on disk: `<ca-dir>/join-tokens.json` (0600), changed under an exclusive
/// lock on `<ca-dir>/join-tokens.lock` and replaced by rename, so the CLI and a running
/// signer never lose each other's changes and a crash never leaves half a file.
pub struct TokenStore {
    path: PathBuf,
    lock: PathBuf,
}

impl TokenStore {
    pub fn new(ca_dir: &Path) -> TokenStore {
        TokenStore { path: ca_dir.join("join-tokens.json"), lock: ca_dir.join("join-tokens.lock") }
    }

    /// Runs `f` on the book under the lock; saves it if `f` returns Ok.
    pub fn update<T, E>(&self, f: impl FnOnce(&mut TokenBook) -> Result<T, E>) -> Result<Result<T, E>, pki::PkiError> {
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&self.lock)
            .map_err(|e| pki::file_err(&self.lock, e, "run this as the user that owns the CA directory"))?;
        lock.lock().map_err(|e| pki::file_err(&self.lock, e, "check the file system supports locks"))?;
        let mut book = self.load()?;
        let res = f(&mut book);
        if res.is_ok() {
            self.save(&book)?;
        }
        Ok(res)
    }

    /// Reads the book under the lock, changing nothing.
    pub fn view<T>(&self, f: impl FnOnce(&TokenBook) -> T) -> Result<T, pki::PkiError> {
        self.update(|b| Err::<(), T>(f(b))).map(|r| r.expect_err("never saves"))
    }

    fn load(&self) -> Result<TokenBook, pki::PkiError> {
        match fs::read_to_string(&self.path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| {
                pki::file_err(&self.path, format!("not a token store ({e})"), "move it away; tokens in it are lost")
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(TokenBook::default()),
            Err(e) => Err(pki::file_err(&self.path, e, "check the CA directory's permissions")),
        }
    }

    fn save(&self, book: &TokenBook) -> Result<(), pki::PkiError> {
        let tmp = self.path.with_extension("json.tmp");
        let _ = fs::remove_file(&tmp);
        let write = || -> std::io::Result<()> {
            let mut f = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
            f.write_all(serde_json::to_string_pretty(book).expect("json").as_bytes())?;
            f.sync_all()?;
            fs::rename(&tmp, &self.path)
        };
        write().map_err(|e| pki::file_err(&self.path, e, "check free disk space and permissions"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> JoinToken {
        JoinToken::generate("prod-1", b"ca certificate bytes", None)
    }

    #[test]
    fn a_token_round_trips_and_carries_128_bits_of_secret() {
        let t = JoinToken::generate("prod-1", b"ca", Some("10.0.0.10:7946".parse().unwrap()));
        let s = t.expose();
        assert!(s.starts_with("trellis1:prod-1:"), "{s}");
        assert_eq!(JoinToken::parse(&s).unwrap(), t);
        assert_eq!(t.secret.len(), 32, "16 bytes in hex");
        assert_ne!(t.expose(), JoinToken::generate("prod-1", b"ca", None).expose(), "random");
        let v6 = JoinToken::generate("c", b"ca", Some("[::1]:7946".parse().unwrap()));
        assert_eq!(JoinToken::parse(&v6.expose()).unwrap(), v6);
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let t = token();
        let (_, secret) = t.credentials();
        assert!(!format!("{t:?}").contains(&secret));
    }

    #[test]
    fn malformed_tokens_are_refused_with_what_is_wrong() {
        let good = token().expose();
        let cases = [
            (String::new(), "4 parts"),
            ("kubeadm:x:y:z".into(), "not \"trellis1\""),
            (good.replace("trellis1:prod-1", "trellis1:Prod_1"), "cluster id"),
            (good[..good.len() - 1].to_string(), "CA hash"),
            (format!("{good}@nowhere"), "signer"),
            (good.replacen('.', "", 1), "joined by '.'"),
        ];
        for (s, want) in cases {
            let e = JoinToken::parse(&s).unwrap_err().to_string();
            assert!(e.contains(want), "{s:?}: {e}");
            assert!(e.contains("copy the whole line"), "{e}");
        }
    }

    #[test]
    fn a_token_is_accepted_once_then_reported_used() {
        let mut book = TokenBook::default();
        let t = token();
        book.add(&t, 1_000, 3_600_000);
        let (id, secret) = t.credentials();
        assert_eq!(book.check(&id, &secret, 2_000), Ok(()));
        book.redeem(&id, &secret, 2_000, "web-2").unwrap();
        let e = book.redeem(&id, &secret, 62_000, "web-3").unwrap_err();
        assert_eq!(e, TokenError::Used { id: id.clone(), by: "web-2".into(), ago_s: 60 });
        assert_eq!(e.code(), "token_used");
    }

    #[test]
    fn expired_wrong_and_unknown_tokens_are_refused() {
        let mut book = TokenBook::default();
        let t = token();
        book.add(&t, 0, 1_000);
        let (id, secret) = t.credentials();
        assert_eq!(book.check(&id, &secret, 1_000), Err(TokenError::Expired { id: id.clone(), ago_s: 0 }));
        let wrong = "0".repeat(32);
        assert_eq!(book.check(&id, &wrong, 10), Err(TokenError::Unknown { id: id.clone() }));
        let other = token();
        let (oid, osecret) = other.credentials();
        assert_eq!(book.check(&oid, &osecret, 10), Err(TokenError::Unknown { id: oid }));
    }

    #[test]
    fn the_book_keeps_only_a_hash_of_the_secret_and_prunes_old_entries() {
        let mut book = TokenBook::default();
        let t = token();
        book.add(&t, 0, 1_000);
        let json = serde_json::to_string(&book).unwrap();
        assert!(!json.contains(&t.credentials().1), "{json}");
        book.add(&token(), 1_000 + KEEP_MS, 1_000);
        assert_eq!(book.tokens.len(), 1, "the long-expired entry is gone");
    }

    #[test]
    fn the_store_survives_a_reload_and_is_0600() {
        let dir = std::env::temp_dir().join(format!("trellis-tokens-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let store = TokenStore::new(&dir);
        let t = token();
        let (id, secret) = t.credentials();
        store
            .update(|b| {
                b.add(&t, 0, 1 << 40);
                Ok::<_, ()>(())
            })
            .unwrap()
            .unwrap();
        store.update(|b| b.redeem(&id, &secret, 5, "n1")).unwrap().unwrap();
        // A new store object is a restarted signer: the token stays used.
        let again = TokenStore::new(&dir).update(|b| b.redeem(&id, &secret, 6, "n2")).unwrap();
        assert!(matches!(again, Err(TokenError::Used { .. })), "{again:?}");
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(dir.join("join-tokens.json")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let _ = fs::remove_dir_all(&dir);
    }
}
