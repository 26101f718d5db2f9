//! Entry points for fuzzing what the agent parses from outside: policy documents (JSON,
//! YAML, TOML) and objects, the config file, the proxy's per-request decisions (Host to
//! service, routes), and writer proofs (a peer's certificate and signature). Used by `fuzz/fuzz_targets/` and by the property tests below;
//! none may panic on any input.

use std::path::Path;

use trellis_core::mesh::router::{RequestInfo, RouteTable};
use trellis_core::policy::model::{self, Kind};

/// A policy document in each format, and each object in it through the model's checks.
pub fn policy_text(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    for ext in ["json", "yaml", "toml"] {
        if let Ok(objects) = crate::client::parse_policy_text(&text, ext, &"fuzz") {
            for (kind, name, body) in objects {
                if let Ok(kind) = Kind::parse(&kind) {
                    let _ = model::parse(kind, &name, body.to_string().as_bytes());
                }
            }
        }
    }
    for kind in Kind::ALL {
        let _ = model::parse(kind, "x", data);
    }
}

/// The config file, and the instances it declares.
pub fn config_file(data: &[u8]) {
    if let Ok(file) = crate::config::FileConfig::parse(&String::from_utf8_lossy(data), Path::new("fuzz.toml")) {
        let _ = crate::config::file_services(&file, "n1");
    }
}

/// A DNS query, as bytes from any client, through the DNS interface's request path (parse,
/// answer from a catalog with instances and a subset, encode, truncate).
pub fn dns_query(data: &[u8]) {
    crate::dns::fuzz_respond(data);
}

/// A request's Host, method, path, query and headers through the proxy's routing, against
/// a route table of regex, prefix and header matches.
pub fn proxy_request(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.split('\n');
    let host = parts.next().unwrap_or("");
    let method = parts.next().unwrap_or("GET");
    let path = parts.next().unwrap_or("/");
    let query = parts.next().unwrap_or("");
    let headers: Vec<(String, String)> = parts
        .filter_map(|l| l.split_once(':').map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string())))
        .collect();
    let service = crate::mesh::http::service_of(host);
    let table = routes();
    let info = RequestInfo { service, method, path, query, headers: &headers };
    let _ = table.resolve(&info, 0.5);
}

/// A writer proof as a peer could bend it: the first byte picks what the rest replaces or
/// flips in a genuine proof (certificate bytes, signature, scheme), so both junk and
/// near-valid certificates reach x509 parsing, chain building and signature checks.
pub fn writer_proof(data: &[u8]) {
    use trellis_core::policy::WriterAuth;
    let Some((&mode, rest)) = data.split_first() else { return };
    let (id, good) = proof_fixture();
    let mut p = good.clone();
    match mode % 4 {
        0 => p.cert = rest.to_vec(),
        1 => p.sig = rest.to_vec(),
        2 => {
            let n = p.cert.len();
            for (i, b) in rest.iter().enumerate() {
                p.cert[(i * 31 + usize::from(mode)) % n] ^= b;
            }
        }
        _ => p.scheme = u16::from_le_bytes([rest.first().copied().unwrap_or(0), rest.get(1).copied().unwrap_or(0)]),
    }
    let _ = id.verify(PROOF_MESSAGE, &p, crate::policy::now_ms());
}

const PROOF_MESSAGE: &[u8] = b"fuzzed entry";

/// A node identity under a throwaway CA, and a genuine proof it signed.
fn proof_fixture() -> &'static (std::sync::Arc<crate::pki::LiveIdentity>, trellis_proto::WriterProof) {
    use std::sync::OnceLock;
    use trellis_core::policy::WriterAuth;
    static FIXTURE: OnceLock<(std::sync::Arc<crate::pki::LiveIdentity>, trellis_proto::WriterProof)> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("trellis-fuzz-ca-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        crate::pki::init_ca(&dir.join("ca"), Some("fuzz")).expect("fuzz CA");
        let tls = dir.join("tls");
        crate::pki::issue_cert(&dir.join("ca"), "n1", &tls, std::time::Duration::from_secs(3600)).expect("fuzz cert");
        let id = crate::pki::LiveIdentity::new(&crate::pki::load_tls_dir(&tls).expect("fuzz tls")).expect("identity");
        let proof = id.sign(PROOF_MESSAGE).expect("sign");
        // The identity is held in memory from here on.
        let _ = std::fs::remove_dir_all(&dir);
        (id, proof)
    })
}

fn routes() -> RouteTable {
    use std::sync::OnceLock;
    static TABLE: OnceLock<RouteTable> = OnceLock::new();
    TABLE
        .get_or_init(|| {
            let mut store = trellis_core::policy::PolicyStore::new("fuzz");
            for (kind, name, body) in [
                (Kind::Routes, "r1", r#"{"service":"web","match":{"path":{"regex":"^/a/[0-9]+$"},"headers":[{"name":"x-v","exact":"2"}]},"destination":{"subset":"v2"}}"#),
                (Kind::Routes, "r2", r#"{"service":"web","match":{"path":{"prefix":"/api"}},"destination":{"service":"api"},"rewrite_prefix":"/"}"#),
                (Kind::Subsets, "v2", r#"{"service":"web","labels":{"version":"v2"}}"#),
                (Kind::Splits, "s", r#"{"service":"web","backends":[{"subset":"v2","weight":10},{"service":"web","weight":90}]}"#),
            ] {
                let key = trellis_core::policy::Key { kind, name: name.into() };
                if let Ok(reg) = store.prepare(1, &key, Some(body.as_bytes()), None) {
                    store.commit(key, reg);
                }
            }
            RouteTable::from_store(&store)
        })
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

        #[test]
        fn no_policy_text_panics(s in "\\PC{0,400}") {
            policy_text(s.as_bytes());
        }

        #[test]
        fn no_config_text_panics(s in "\\PC{0,400}") {
            config_file(s.as_bytes());
        }

        #[test]
        fn no_request_panics_the_router(s in "\\PC{0,400}") {
            proxy_request(s.as_bytes());
        }

        #[test]
        fn no_bent_writer_proof_panics(data in proptest::collection::vec(any::<u8>(), 0..600)) {
            writer_proof(&data);
        }
    }

    #[test]
    fn the_proof_fixture_verifies_and_a_flipped_byte_does_not() {
        use trellis_core::policy::WriterAuth;
        let (id, good) = proof_fixture();
        assert_eq!(id.verify(PROOF_MESSAGE, good, crate::policy::now_ms()).unwrap(), "n1");
        let mut bent = good.clone();
        bent.sig[5] ^= 1;
        assert!(id.verify(PROOF_MESSAGE, &bent, crate::policy::now_ms()).is_err());
    }

    /// Every seed and every past finding under `fuzz/seeds/<target>/` runs through its
    /// target here, so a crash once found stays fixed.
    #[test]
    fn fuzz_seeds_and_regressions_never_panic() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds");
        let mut ran = 0;
        for target in std::fs::read_dir(&root).expect("fuzz/seeds") {
            let target = target.unwrap().path();
            let name = target.file_name().unwrap().to_string_lossy().to_string();
            let run: fn(&[u8]) = match name.as_str() {
                "wire" => trellis_proto::fuzz::decode_everything,
                "policy" => policy_text,
                "config" => config_file,
                "proxy_request" => proxy_request,
                "writer_proof" => writer_proof,
                "dns" => dns_query,
                other => panic!("fuzz/seeds/{other}: no such fuzz target"),
            };
            for f in std::fs::read_dir(&target).unwrap() {
                run(&std::fs::read(f.unwrap().path()).unwrap());
                ran += 1;
            }
        }
        assert!(ran >= 5, "only {ran} seeds");
    }

    #[test]
    fn the_route_table_used_for_fuzzing_is_not_empty() {
        let headers = vec![("x-v".to_string(), "2".to_string())];
        let info = RequestInfo { service: "web", method: "GET", path: "/a/12", query: "", headers: &headers };
        assert_eq!(routes().resolve(&info, 0.5).route.as_deref(), Some("r1"));
    }
}
