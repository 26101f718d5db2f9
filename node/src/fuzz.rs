//! Entry points for fuzzing what the agent parses from outside: policy documents (JSON,
//! YAML, TOML) and objects, the config file, and the proxy's per-request decisions (Host
//! to service, routes). Used by `fuzz/fuzz_targets/` and by the property tests below;
//! none may panic on any input.

use std::path::Path;

use crate::mesh::router::{RequestInfo, RouteTable};
use crate::policy::model::{self, Kind};

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

fn routes() -> RouteTable {
    use std::sync::OnceLock;
    static TABLE: OnceLock<RouteTable> = OnceLock::new();
    TABLE
        .get_or_init(|| {
            let mut store = crate::policy::PolicyStore::new("fuzz");
            for (kind, name, body) in [
                (Kind::Routes, "r1", r#"{"service":"web","match":{"path":{"regex":"^/a/[0-9]+$"},"headers":[{"name":"x-v","exact":"2"}]},"destination":{"subset":"v2"}}"#),
                (Kind::Routes, "r2", r#"{"service":"web","match":{"path":{"prefix":"/api"}},"destination":{"service":"api"},"rewrite_prefix":"/"}"#),
                (Kind::Subsets, "v2", r#"{"service":"web","labels":{"version":"v2"}}"#),
                (Kind::Splits, "s", r#"{"service":"web","backends":[{"subset":"v2","weight":10},{"service":"web","weight":90}]}"#),
            ] {
                let key = crate::policy::Key { kind, name: name.into() };
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
    }

    #[test]
    fn the_route_table_used_for_fuzzing_is_not_empty() {
        let headers = vec![("x-v".to_string(), "2".to_string())];
        let info = RequestInfo { service: "web", method: "GET", path: "/a/12", query: "", headers: &headers };
        assert_eq!(routes().resolve(&info, 0.5).route.as_deref(), Some("r1"));
    }
}
