//! The API held to its documents: every route in `openapi.json` and served, every
//! documented example parses, the documented properties are the policy types' fields, and
//! every policy field has a row in the README's conformance table.

use std::collections::BTreeSet;

use serde_json::Value;

use crate::api_openapi::*;
use trellis_core::policy::model::{self, Kind};

fn doc() -> Value {
    serde_json::from_str(DOCUMENT).expect("openapi.json is JSON")
}

/// Each policy kind and the schema in `components.schemas` that documents its body.
const KIND_SCHEMAS: [(Kind, &str); 11] = [
    (Kind::Services, "Service"),
    (Kind::Subsets, "Subset"),
    (Kind::Routes, "Route"),
    (Kind::Splits, "Split"),
    (Kind::Ratelimits, "RateLimit"),
    (Kind::Intentions, "Intention"),
    (Kind::Settings, "Settings"),
    (Kind::Instances, "Instance"),
    (Kind::Revocations, "Revocation"),
    (Kind::Rollouts, "Rollout"),
    (Kind::Rolloutstatus, "RolloutStatus"),
];

fn served() -> BTreeSet<(String, String)> {
    let all = crate::api::routes().merge(crate::api::fault_table());
    all.table().iter().map(|(m, p)| (m.to_string(), p.to_string())).collect()
}

#[test]
fn every_route_is_documented_and_every_documented_route_is_served() {
    let documented: BTreeSet<_> = documented_operations(&doc()).into_iter().collect();
    let served = served();
    let undocumented: Vec<_> = served.difference(&documented).collect();
    let phantom: Vec<_> = documented.difference(&served).collect();
    assert!(undocumented.is_empty(), "routes missing from node/src/openapi.json: {undocumented:?}");
    assert!(phantom.is_empty(), "documented in node/src/openapi.json but not served: {phantom:?}");
    assert!(served.len() >= 20, "the table lost routes: {served:?}");
}

#[test]
fn document_is_openapi_3_1_and_every_reference_resolves() {
    let d = doc();
    assert_eq!(d["openapi"], "3.1.0");
    assert_eq!(d["components"]["securitySchemes"]["bearerAuth"]["scheme"], "bearer");
    let mut refs = Vec::new();
    collect_refs(&d, &mut refs);
    assert!(refs.len() > 50, "{}", refs.len());
    for r in refs {
        assert!(pointer(&d, &r).is_some(), "dangling $ref {r}");
    }
    // The blocking-read and check-and-set parameters are where the handlers read them.
    let params = |path: &str, m: &str| -> Vec<String> {
        let item = &d["paths"][path];
        let all = item["parameters"]
            .as_array()
            .into_iter()
            .flatten()
            .chain(item[m]["parameters"].as_array().into_iter().flatten());
        all.map(|p| resolve(&d, p)["name"].as_str().unwrap_or_default().to_string()).collect()
    };
    for path in ["/v1/policy", "/v1/policy/{kind}", "/v1/policy/{kind}/{name}"] {
        let p = params(path, "get");
        assert!(p.contains(&"index".into()) && p.contains(&"wait".into()), "{path}: {p:?}");
    }
    assert!(params("/v1/policy/{kind}/{name}", "put").contains(&"cas".into()));
    assert!(params("/v1/policy/{kind}/{name}", "delete").contains(&"cas".into()));
    let error = &d["components"]["schemas"]["Error"]["properties"];
    assert!(error["error"].is_object() && error["field"].is_object() && error["hint"].is_object());
}

#[test]
fn policy_schemas_match_the_real_types() {
    let d = doc();
    assert_eq!(KIND_SCHEMAS.len(), Kind::ALL.len(), "every policy kind is documented");
    let body_kinds: Vec<String> = d["components"]["schemas"]["PolicyBody"]["anyOf"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["$ref"].as_str().unwrap().rsplit('/').next().unwrap().to_string())
        .collect();
    for (kind, schema_name) in KIND_SCHEMAS {
        let schema = &d["components"]["schemas"][schema_name];
        let example = &schema["example"];
        assert!(example.is_object(), "{schema_name} has no example");
        let name = if kind == Kind::Settings { "mesh" } else { "x" };
        let parsed = model::parse(kind, name, example.to_string().as_bytes())
            .unwrap_or_else(|e| panic!("the {schema_name} example does not parse: {e}"));
        // Serialized back, the real type shows every field it has (deny_unknown_fields
        // already refused any documented field it does not have).
        let real = serde_json::to_value(&parsed).unwrap();
        same_fields(&d, schema, &real, schema_name);
        if kind != Kind::Instances {
            assert!(body_kinds.contains(&schema_name.to_string()), "{schema_name} missing from PolicyBody");
        }
    }
    // The examples with everything default still parse to the defaults: `{}` is a service.
    assert!(model::parse(Kind::Services, "x", b"{}").is_ok());
}

/// Object keys of `real` (recursively, where the schema has `properties`) equal the schema's.
fn same_fields(d: &Value, schema: &Value, real: &Value, at: &str) {
    let schema = resolve(d, schema);
    match real {
        Value::Object(m) => {
            let Some(props) = schema["properties"].as_object() else { return };
            let documented: BTreeSet<&String> = props.keys().collect();
            let fields: BTreeSet<&String> = m.keys().collect();
            assert_eq!(documented, fields, "schema properties vs real fields at {at}");
            for (k, v) in m {
                same_fields(d, &props[k], v, &format!("{at}.{k}"));
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                same_fields(d, &schema["items"], v, &format!("{at}[{i}]"));
            }
        }
        _ => {}
    }
}

/// No silent fields: every policy field has a row in README.md's conformance table, and no row is stale.
#[test]
fn every_policy_field_in_the_schema_has_a_conformance_row() {
    let d = doc();
    let mut fields = BTreeSet::new();
    for (kind, schema_name) in KIND_SCHEMAS {
        leaves(&d, &d["components"]["schemas"][schema_name], kind.as_str(), &mut fields);
    }
    assert!(fields.len() > 80, "the schema walk lost fields: {fields:?}");
    let readme = include_str!("../../README.md");
    let section = readme.split("\n## Policy conformance\n").nth(1).expect("README.md has ## Policy conformance");
    let section = section.split("\n## ").next().unwrap_or_default();
    let rows: Vec<&str> = section.lines().filter_map(|l| l.strip_prefix("| `")?.split('`').next()).collect();
    let listed: BTreeSet<String> = rows.iter().map(|r| r.to_string()).collect();
    let hint = "README.md, section Policy conformance";
    assert_eq!(listed.len(), rows.len(), "a field has two rows in {hint}");
    let missing: Vec<_> = fields.difference(&listed).collect();
    assert!(missing.is_empty(), "fields without a row (add a row to {hint}): {missing:?}");
    let stale: Vec<_> = listed.difference(&fields).collect();
    assert!(stale.is_empty(), "rows for fields the schema does not have (remove them from {hint}): {stale:?}");
}

/// Leaf fields under `schema` as `at.a.b[].c`, through `$ref`, `oneOf`/`anyOf` and arrays of
/// objects; an object with no `properties` (a map such as `labels`) is a leaf.
fn leaves(d: &Value, schema: &Value, at: &str, out: &mut BTreeSet<String>) {
    let s = resolve(d, schema);
    let alternatives: Vec<&Value> = ["oneOf", "anyOf"].iter().filter_map(|k| s[*k].as_array()).flatten().collect();
    for alt in &alternatives {
        leaves(d, alt, at, out);
    }
    if let Some(props) = s["properties"].as_object() {
        for (k, v) in props {
            leaves(d, v, &format!("{at}.{k}"), out);
        }
    } else if s["type"] == "array" && resolve(d, &s["items"])["properties"].is_object() {
        leaves(d, &s["items"], &format!("{at}[]"), out);
    } else if alternatives.is_empty() && s["type"] != "null" {
        out.insert(at.to_string());
    }
}

fn resolve<'a>(d: &'a Value, v: &'a Value) -> &'a Value {
    match v["$ref"].as_str() {
        Some(r) => pointer(d, r).unwrap_or_else(|| panic!("dangling {r}")),
        None => v,
    }
}

fn pointer<'a>(d: &'a Value, r: &str) -> Option<&'a Value> {
    d.pointer(r.strip_prefix('#')?)
}

fn collect_refs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            if let Some(Value::String(r)) = m.get("$ref") {
                out.push(r.clone());
            }
            m.values().for_each(|x| collect_refs(x, out));
        }
        Value::Array(a) => a.iter().for_each(|x| collect_refs(x, out)),
        _ => {}
    }
}
