//! `trellis services`: the catalog from the command line (list, register from a file,
//! deregister), over the agent's `/v1/catalog` and `/v1/agent/services` API.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;

use serde_json::Value;

use crate::client::Output;

/// `trellis services`: one row per service, or the catalog as JSON.
pub fn list(api: SocketAddr, output: Output) -> anyhow::Result<()> {
    let catalog: Value = serde_json::from_str(&crate::client::get(api, "/v1/catalog/services")?)?;
    if output == Output::Json {
        return crate::client::show(&catalog, output, |c| table(c, &Value::Null));
    }
    // An older agent has no virtual addresses to show.
    let vips = crate::client::get(api, "/v1/agent/virtual-addresses")
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .unwrap_or(Value::Null);
    print!("{}", table(&catalog, &vips));
    Ok(())
}

/// Rows of SERVICE, HEALTHY/TOTAL (instances on live nodes that get traffic: passing or not
/// checked yet), PROTOCOLS, the virtual address on this host (`address:port,...`, a port
/// not listening marked `!`) and NODES.
pub fn table(catalog: &Value, vips: &Value) -> String {
    let mut out = format!("{:<24} {:<9} {:<16} {:<28} NODES\n", "SERVICE", "HEALTHY", "PROTOCOLS", "VIRTUAL");
    for (service, instances) in catalog.as_object().into_iter().flatten() {
        let list = instances.as_array().map(Vec::as_slice).unwrap_or_default();
        let healthy = list.iter().filter(|i| i["health"] != "critical").count();
        let set = |field: &str| -> String {
            let s: BTreeSet<&str> = list.iter().filter_map(|i| i[field].as_str()).collect();
            s.into_iter().collect::<Vec<_>>().join(",")
        };
        let count = format!("{healthy}/{}", list.len());
        let v = virtual_of(&vips["services"][service]);
        out.push_str(&format!("{service:<24} {count:<9} {:<16} {v:<28} {}\n", set("protocol"), set("node")));
    }
    out
}

/// `127.100.4.2:8080,9090!` (`!`: not listening, see `/v1/agent/virtual-addresses`), or `-`.
fn virtual_of(v: &Value) -> String {
    let Some(addr) = v["address"].as_str() else { return "-".into() };
    let ports: Vec<String> = v["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| format!("{}{}", p["port"], if p["error"].is_string() { "!" } else { "" }))
        .collect();
    format!("{addr}:{}", ports.join(","))
}

/// `trellis services register -f FILE`: every instance in the file is checked first, then
/// registered on the agent at `api` (the host the instances run on); nothing is written if
/// any is invalid.
pub fn register(api: SocketAddr, file: &Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(file).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    let ext = file.extension().and_then(|e| e.to_str()).unwrap_or("");
    let instances = parse(&text, ext).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    for (id, body) in &instances {
        let res = crate::client::put(api, &format!("/v1/agent/services/{id}"), &body.to_string())?;
        let v: Value = serde_json::from_str(&res)?;
        println!("registered {}", v["instance"].as_str().unwrap_or(id));
    }
    Ok(())
}

/// `trellis services deregister ID`.
pub fn deregister(api: SocketAddr, id: &str) -> anyhow::Result<()> {
    crate::client::delete(api, &format!("/v1/agent/services/{id}"))?;
    println!("deregistered {id}");
    Ok(())
}

/// Instances in a registration file, as (id, JSON body): either one instance with an `id`
/// field, or a table of them by id (`[web-1]` in TOML, `{"web-1": {...}}` in JSON or YAML).
/// Each is checked as the agent will check it.
pub fn parse(text: &str, ext: &str) -> anyhow::Result<Vec<(String, Value)>> {
    let doc: Value = match ext {
        "json" => serde_json::from_str(text)?,
        "yaml" | "yml" => serde_yaml_ng::from_str(text)?,
        _ => {
            serde_json::to_value(toml::from_str::<toml::Table>(text).map_err(|e| anyhow::anyhow!("{}", e.message()))?)?
        }
    };
    let Value::Object(mut map) = doc else {
        anyhow::bail!("expected an instance (service, address, port, with an id) or a table of them by id")
    };
    let instances: Vec<(String, Value)> = if map.contains_key("service") {
        let Some(Value::String(id)) = map.remove("id") else {
            anyhow::bail!("id: missing; name the instance, e.g. id = \"web-1\" (or key a table by id: [web-1])")
        };
        vec![(id, Value::Object(map))]
    } else {
        map.into_iter().collect()
    };
    anyhow::ensure!(!instances.is_empty(), "no instance in the file; e.g. [web-1] service = \"web\" ...");
    for (id, body) in &instances {
        check(id, body)?;
    }
    Ok(instances)
}

/// The model's own validation, with the node this agent will fill in.
fn check(id: &str, body: &Value) -> anyhow::Result<()> {
    let mut with_node = body.clone();
    let Some(obj) = with_node.as_object_mut() else {
        anyhow::bail!("{id}: expected an object with service, address and port")
    };
    obj.insert("node".into(), Value::from("local"));
    let name = format!("{id}@local");
    let kind = trellis_core::policy::Kind::Instances;
    trellis_core::policy::model::parse(kind, &name, with_node.to_string().as_bytes())
        .map_err(|e| anyhow::anyhow!("{}", e.to_string().replacen(&format!("instances.{name}"), id, 1)))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_instance_or_a_table_by_id_in_toml_json_and_yaml() {
        let one = "id = \"web-1\"\nservice = \"web\"\naddress = \"127.0.0.1\"\nport = 8080\n";
        assert_eq!(parse(one, "toml").unwrap()[0].0, "web-1");
        let many = "[web-1]\nservice = \"web\"\naddress = \"127.0.0.1\"\nport = 8080\n[api-1]\nservice = \"api\"\naddress = \"127.0.0.1\"\nport = 9090\nprotocol = \"http2\"\n";
        let ids: Vec<String> = parse(many, "toml").unwrap().into_iter().map(|(id, _)| id).collect();
        assert_eq!(ids, ["api-1", "web-1"]);
        let json = r#"{"web-2": {"service": "web", "address": "::1", "port": 1}}"#;
        assert_eq!(parse(json, "json").unwrap()[0].1["address"], "::1");
        let yaml = "id: web-3\nservice: web\naddress: 127.0.0.1\nport: 80\n";
        assert_eq!(parse(yaml, "yaml").unwrap()[0].0, "web-3");
    }

    #[test]
    fn a_bad_instance_is_named_with_its_field_and_nothing_passes() {
        let no_id = "service = \"web\"\naddress = \"127.0.0.1\"\nport = 8080\n";
        assert!(parse(no_id, "toml").unwrap_err().to_string().starts_with("id: missing"));
        let bad = "[web-1]\nservice = \"web\"\naddress = \"not-an-ip\"\nport = 8080\n";
        let e = parse(bad, "toml").unwrap_err().to_string();
        assert!(e.starts_with("web-1") && e.contains("address"), "{e}");
        let port = r#"{"w": {"service": "web", "address": "127.0.0.1", "port": 70000}}"#;
        assert!(parse(port, "json").unwrap_err().to_string().contains("port"));
        assert!(parse("[]", "json").is_err());
    }

    #[test]
    fn the_table_counts_healthy_instances_and_joins_protocols_and_nodes() {
        let catalog = serde_json::json!({
            "api": [{"protocol": "grpc", "node": "n1", "health": "passing"}],
            "web": [
                {"protocol": "http", "node": "n2", "health": "passing"},
                {"protocol": "http", "node": "n3", "health": "critical"},
                {"protocol": "http", "node": "n2", "health": "unknown"},
            ],
        });
        let vips = serde_json::json!({"range": "127.100.0.0/16", "services": {
            "web": {"address": "127.100.4.2", "ports": [{"port": 8080}, {"port": 9090, "error": "in use"}]},
        }});
        let t = table(&catalog, &vips);
        let rows: Vec<Vec<&str>> = t.lines().map(|l| l.split_whitespace().collect()).collect();
        assert_eq!(rows[0], ["SERVICE", "HEALTHY", "PROTOCOLS", "VIRTUAL", "NODES"]);
        assert_eq!(rows[1], ["api", "1/1", "grpc", "-", "n1"]);
        assert_eq!(rows[2], ["web", "2/3", "http", "127.100.4.2:8080,9090!", "n2,n3"]);
    }
}
