//! Config layering: defaults < TOML file, or a directory of `*.toml` files merged in name
//! order < environment (`TRELLIS_*`) < flags.
//!
//! Each file is parsed on its own first, so syntax, type and unknown-key errors name the
//! exact file and line; the raw tables are then merged (tables key by key, everything else
//! replaced) and deserialized once more. [`Origins`] remembers where every key was set last,
//! so a value refused later (timing bounds, instances) is still reported at its file and line.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::{ConfigError, FileConfig};

/// Environment variables the CLI reads for itself; never config.
pub const RESERVED_ENV: &[&str] = &[
    "TRELLIS_HTTP_ADDR",
    "TRELLIS_HTTP_TOKEN",
    // A join token is a flag's value (`--token`), not a config key: it is never written down.
    "TRELLIS_JOIN_TOKEN",
    // Runtime threads, read before the config (node/src/run.rs).
    "TRELLIS_WORKER_THREADS",
    // Test harness: which binary to run, whether to keep temp dirs.
    "TRELLIS_BIN",
    "TRELLIS_KEEP_TMP",
];

/// `TRELLIS_CONFIG`: the config file or directory, when `--config` is not given.
pub const CONFIG_ENV: &str = "TRELLIS_CONFIG";

/// How an environment value is turned into a TOML value.
#[derive(Clone, Copy, Debug, PartialEq)]
enum EnvKind {
    Str,
    Int,
    Float,
    /// `true` or `false`
    Bool,
    /// `a,b,c`
    List,
    /// `k=v,k=v`
    Map,
}

/// Every key the environment may set, with its TOML shape. Nested keys use `__`:
/// `TRELLIS_TIMING__PROBE_PERIOD` is `timing.probe_period`.
const ENV_KEYS: &[(&str, EnvKind)] = &[
    ("name", EnvKind::Str),
    ("bind", EnvKind::Str),
    ("advertise", EnvKind::Str),
    ("api", EnvKind::Str),
    ("join", EnvKind::List),
    ("data_dir", EnvKind::Str),
    ("tls_dir", EnvKind::Str),
    ("labels", EnvKind::Map),
    ("profile", EnvKind::Str),
    ("expected_size", EnvKind::Int),
    ("log_level", EnvKind::Str),
    ("upstreams", EnvKind::Map),
    ("proxy", EnvKind::Str),
    ("api_tokens_file", EnvKind::Str),
    ("api_allowed_hosts", EnvKind::List),
    ("timing.probe_period", EnvKind::Str),
    ("timing.probe_rtt", EnvKind::Str),
    ("timing.suspect_to_down_after", EnvKind::Str),
    ("timing.remove_down_after", EnvKind::Str),
    ("timing.gossip_interval", EnvKind::Str),
    ("timing.gossip_fanout", EnvKind::Int),
    ("timing.announce_interval", EnvKind::Str),
    ("timing.sync_interval", EnvKind::Str),
    ("timing.tombstone_grace", EnvKind::Str),
    ("access_log.enabled", EnvKind::Bool),
    ("access_log.format", EnvKind::Str),
    ("access_log.path", EnvKind::Str),
    ("access_log.max_size", EnvKind::Int),
    ("access_log.keep", EnvKind::Int),
    ("access_log.sample", EnvKind::Float),
    ("access_log.errors_only", EnvKind::Bool),
    ("access_log.slow", EnvKind::Str),
    ("access_log.services", EnvKind::List),
    ("access_log.headers", EnvKind::List),
    ("traces.enabled", EnvKind::Bool),
    ("traces.endpoint", EnvKind::Str),
    ("traces.sample", EnvKind::Float),
    ("traces.max_queue", EnvKind::Int),
    ("traces.max_batch", EnvKind::Int),
    ("traces.delay", EnvKind::Str),
    ("traces.timeout", EnvKind::Str),
    ("dns.enabled", EnvKind::Bool),
    ("dns.bind", EnvKind::Str),
    ("virtual_addresses.enabled", EnvKind::Bool),
    ("virtual_addresses.range", EnvKind::Str),
];

/// Where a setting came from.
#[derive(Clone, Debug, PartialEq)]
pub enum Origin {
    File { path: PathBuf, line: usize, text: String },
    Env { var: String, value: String },
    Flag { flag: String },
}

impl Origin {
    fn describe(&self, field: &str) -> String {
        match self {
            Origin::File { path, line, text } => {
                format!("{}: line {line}, field `{field}` (found `{text}`)", path.display())
            }
            Origin::Env { var, value } => format!("environment {var}, field `{field}` (found {value:?})"),
            Origin::Flag { flag } => format!("flag {flag}, field `{field}`"),
        }
    }
}

/// Dotted field path -> where it was set last.
#[derive(Clone, Debug, Default)]
pub struct Origins(pub BTreeMap<String, Origin>);

impl Origins {
    /// Where `field` (or the closest enclosing key, e.g. `services.web` for
    /// `services.web.port`) was set, if not a default.
    pub fn of(&self, field: &str) -> Option<(&str, &Origin)> {
        let mut f = field;
        loop {
            if let Some((k, o)) = self.0.get_key_value(f) {
                return Some((k.as_str(), o));
            }
            f = &f[..f.rfind('.')?];
        }
    }

    /// Prefixes a problem that starts with a field path (`timing.probe_rtt ...`,
    /// `services.web.port: ...`) with the file and line, variable or flag that set it.
    pub fn locate(&self, problem: &str) -> String {
        let field = problem.split([':', ' ', '(']).next().unwrap_or("");
        let Some((_, origin)) = self.of(field) else { return problem.to_string() };
        // Problems that carry no fix of their own get the place to change.
        let fix = match origin {
            _ if problem.contains("; ") => String::new(),
            Origin::File { path, line, .. } => format!("; fix: change line {line} of {}", path.display()),
            Origin::Env { var, .. } => format!("; fix: change {var}"),
            Origin::Flag { flag } => format!("; fix: change {flag}"),
        };
        format!("{}: {problem}{fix}", origin.describe(field))
    }

    fn set(&mut self, field: String, origin: Origin) {
        // A higher layer setting a table replaces what lower layers said about its keys' origins
        // only for the keys it sets; keep the rest.
        self.0.insert(field, origin);
    }
}

/// The merged lower layers (files and environment), ready for flags on top.
#[derive(Clone, Debug, Default)]
pub struct Layered {
    pub file: FileConfig,
    pub origins: Origins,
    /// The files read, in merge order.
    pub files: Vec<PathBuf>,
}

/// Reads a config file, or every `*.toml` in a directory in name order.
pub fn read_sources(path: &Path) -> Result<Vec<(PathBuf, String)>, ConfigError> {
    let fix = "give --config a readable TOML file or a directory of *.toml files";
    let meta = std::fs::metadata(path)
        .map_err(|e| ConfigError(format!("{}: cannot read config: {e}; fix: {fix}", path.display())))?;
    let files = if meta.is_dir() {
        let mut v: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| ConfigError(format!("{}: cannot list config directory: {e}; fix: {fix}", path.display())))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml") && p.is_file())
            .collect();
        v.sort();
        if v.is_empty() {
            return Err(ConfigError(format!(
                "{}: the config directory holds no *.toml files; fix: put the settings in e.g. {}/10-agent.toml",
                path.display(),
                path.display()
            )));
        }
        v
    } else {
        vec![path.to_path_buf()]
    };
    files
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p)
                .map_err(|e| ConfigError(format!("{}: cannot read config file: {e}; fix: {fix}", p.display())))?;
            Ok((p, text))
        })
        .collect()
}

/// Merges files (in the order given) and then the environment. Reports every file's and
/// variable's errors at once.
pub fn merge(files: &[(PathBuf, String)], env: &[(String, String)]) -> Result<Layered, ConfigError> {
    let mut problems = Vec::new();
    let mut acc = toml::Table::new();
    let mut origins = Origins::default();
    for (path, text) in files {
        if let Err(e) = FileConfig::parse(text, path) {
            problems.push(e.0);
            continue;
        }
        let table: toml::Table = text.parse().expect("parsed above as a FileConfig");
        for (field, line, text) in key_lines(text) {
            origins.set(field, Origin::File { path: path.clone(), line, text });
        }
        merge_table(&mut acc, table);
    }
    match env_table(env) {
        Ok((table, env_origins)) => {
            merge_table(&mut acc, table);
            for (f, o) in env_origins {
                origins.set(f, o);
            }
        }
        Err(e) => problems.extend(e),
    }
    if !problems.is_empty() {
        return Err(ConfigError(problems.join("\n")));
    }
    let file: FileConfig = toml::Value::Table(acc)
        .try_into()
        .map_err(|e: toml::de::Error| ConfigError(format!("merged config: {}", e.message())))?;
    Ok(Layered { file, origins, files: files.iter().map(|(p, _)| p.clone()).collect() })
}

/// Later tables merge into earlier ones key by key; any other value replaces.
pub fn merge_table(into: &mut toml::Table, from: toml::Table) {
    for (k, v) in from {
        match (into.get_mut(&k), v) {
            (Some(toml::Value::Table(a)), toml::Value::Table(b)) => merge_table(a, b),
            (_, v) => {
                into.insert(k, v);
            }
        }
    }
}

/// The environment's table and where each of its keys came from.
pub type EnvLayer = (toml::Table, Vec<(String, Origin)>);

/// The config keys set by `TRELLIS_*` variables, as a TOML table, with their origins.
/// Each variable is checked on its own so an error names it.
pub fn env_table(env: &[(String, String)]) -> Result<EnvLayer, Vec<String>> {
    let mut table = toml::Table::new();
    let mut origins = Vec::new();
    let mut problems = Vec::new();
    let mut vars: Vec<&(String, String)> = env.iter().filter(|(k, _)| is_config_var(k)).collect();
    vars.sort();
    for (var, value) in vars {
        let field = env_field(var);
        let Some(&(_, kind)) = ENV_KEYS.iter().find(|(k, _)| *k == field) else {
            problems.push(unknown_var(var, &field));
            continue;
        };
        let v = match env_value(kind, value) {
            Ok(v) => v,
            Err(why) => {
                problems.push(format!("environment {var}, field `{field}`: found {value:?}; accepted: {why}; fix: set {var} to that form or unset it"));
                continue;
            }
        };
        let mut one = toml::Table::new();
        insert_path(&mut one, &field, v);
        if let Err(e) = toml::Value::Table(one.clone()).try_into::<FileConfig>() {
            let (found, accepted) = explain(e.message());
            problems.push(format!(
                "environment {var}, field `{field}`: found {value:?} ({found}); accepted: {accepted}; fix: set {var}={}",
                example(&field)
            ));
            continue;
        }
        merge_table(&mut table, one);
        origins.push((field, Origin::Env { var: var.clone(), value: value.clone() }));
    }
    if problems.is_empty() {
        Ok((table, origins))
    } else {
        Err(problems)
    }
}

/// Whether a variable is meant for the agent's config (the CLI's own are reserved).
fn is_config_var(name: &str) -> bool {
    name.starts_with("TRELLIS_") && !RESERVED_ENV.contains(&name) && name != CONFIG_ENV
}

/// `TRELLIS_TIMING__PROBE_PERIOD` -> `timing.probe_period`.
fn env_field(var: &str) -> String {
    var.trim_start_matches("TRELLIS_").to_ascii_lowercase().replace("__", ".")
}

fn unknown_var(var: &str, field: &str) -> String {
    let accepted: Vec<String> = ENV_KEYS.iter().map(|(k, _)| env_name(k)).collect();
    let hint = closest(field, ENV_KEYS.iter().map(|(k, _)| *k))
        .map(|k| format!("did you mean {}? ", env_name(k)))
        .unwrap_or_default();
    let services =
        if field.starts_with("services") { "instances ([services.<id>]) are set in config files only; " } else { "" };
    format!(
        "environment {var}: not a config variable; accepted: {}; reserved for the CLI: {}; fix: {services}{hint}rename or unset {var}",
        accepted.join(", "),
        RESERVED_ENV.join(", ")
    )
}

fn env_name(field: &str) -> String {
    format!("TRELLIS_{}", field.replace('.', "__").to_ascii_uppercase())
}

fn env_value(kind: EnvKind, value: &str) -> Result<toml::Value, &'static str> {
    let items = || value.split(',').map(str::trim).filter(|s| !s.is_empty());
    Ok(match kind {
        EnvKind::Str => toml::Value::String(value.to_string()),
        // Not a number: pass the string on, so the type error names what is accepted.
        EnvKind::Int => {
            value.trim().parse::<i64>().map(toml::Value::Integer).unwrap_or(toml::Value::String(value.into()))
        }
        // Not a number or a boolean: the string goes on, so the type error names what is accepted.
        EnvKind::Float => {
            value.trim().parse::<f64>().map(toml::Value::Float).unwrap_or(toml::Value::String(value.into()))
        }
        EnvKind::Bool => {
            value.trim().parse::<bool>().map(toml::Value::Boolean).unwrap_or(toml::Value::String(value.into()))
        }
        EnvKind::List => toml::Value::Array(items().map(|s| toml::Value::String(s.into())).collect()),
        EnvKind::Map => {
            let mut t = toml::Table::new();
            for item in items() {
                let (k, v) = item.split_once('=').ok_or("a comma-separated list of key=value, e.g. zone=a,rack=3")?;
                if k.trim().is_empty() {
                    return Err("a comma-separated list of key=value with non-empty keys");
                }
                t.insert(k.trim().into(), toml::Value::String(v.trim().into()));
            }
            toml::Value::Table(t)
        }
    })
}

fn insert_path(t: &mut toml::Table, path: &str, v: toml::Value) {
    match path.split_once('.') {
        Some((head, rest)) => {
            let inner = t.entry(head).or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if let toml::Value::Table(inner) = inner {
                insert_path(inner, rest, v);
            }
        }
        None => {
            t.insert(path.into(), v);
        }
    }
}

/// `(field path, line, the line's text)` for every `key = value` line of a TOML text.
/// A line scan, not a parser: it only has to point an operator at the right line of a file
/// that already parsed.
pub fn key_lines(text: &str) -> Vec<(String, usize, String)> {
    let mut section = String::new();
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.starts_with('[') {
            section = line.trim_matches(|c| c == '[' || c == ']').split(']').next().unwrap_or("").trim().to_string();
            section = unquote_path(&section);
            continue;
        }
        let Some((key, _)) = line.split_once('=') else { continue };
        let key = unquote_path(key.trim());
        if key.is_empty() || line.starts_with('#') {
            continue;
        }
        let field = if section.is_empty() { key } else { format!("{section}.{key}") };
        let shown = line.split(" #").next().unwrap_or(line).trim().to_string();
        out.push((field, i + 1, shown));
    }
    out
}

fn unquote_path(p: &str) -> String {
    p.split('.').map(|s| s.trim().trim_matches('"').trim_matches('\'')).collect::<Vec<_>>().join(".")
}

/// Splits a serde message into what was found and what is accepted.
pub fn explain(msg: &str) -> (String, String) {
    let msg = msg.trim().replace('\n', " ");
    for prefix in ["invalid type: ", "invalid value: ", "invalid length "] {
        if let Some(rest) = msg.strip_prefix(prefix) {
            if let Some((found, accepted)) = rest.split_once(", expected ") {
                return (found.to_string(), accepted.to_string());
            }
        }
    }
    for (prefix, what) in [("unknown field ", "unknown key "), ("unknown variant ", "")] {
        if let Some(rest) = msg.strip_prefix(prefix) {
            if let Some((found, accepted)) = rest.split_once(", expected ") {
                return (format!("{what}{found}"), accepted.to_string());
            }
            if let Some((found, _)) = rest.split_once(", there are no fields") {
                return (format!("{what}{found}"), "no keys in this table".into());
            }
        }
    }
    (msg, "see README.md, section Agent flags and config".into())
}

/// The key of `candidates` nearest to `word` (edit distance <= 2), for "did you mean".
pub fn closest<'a>(word: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    candidates.map(|c| (distance(word, c), c)).filter(|(d, _)| *d <= 2).min_by_key(|(d, _)| *d).map(|(_, c)| c)
}

fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// A valid value for a field, as the fix shows it.
pub fn example(field: &str) -> &'static str {
    if field.starts_with("labels.") {
        return "\"eu-1a\" (a string)";
    }
    if field.starts_with("upstreams.") {
        return "\"127.0.0.1:9000\"";
    }
    match field.rsplit('.').next().unwrap_or(field) {
        "name" => "\"web-1\"",
        "bind" | "advertise" => "\"10.0.0.11:7946\"",
        "api" => "\"127.0.0.1:8500\"",
        "proxy" => "\"127.0.0.1:15001\"",
        "join" => "[\"10.0.0.10:7946\"]",
        "data_dir" => "\"/var/lib/trellis\"",
        "tls_dir" => "\"/etc/trellis/tls\"",
        "api_tokens_file" => "\"/etc/trellis/api-tokens\"",
        "labels" => "{ zone = \"eu-1a\" }",
        "upstreams" => "{ web = \"127.0.0.1:9000\" }",
        "api_allowed_hosts" => "[\"trellis.internal\"]",
        "profile" => "\"lan\" (or \"wan\", \"fast\")",
        "expected_size" => "64",
        "log_level" => "\"info\"",
        "gossip_fanout" => "3",
        "probe_period"
        | "probe_rtt"
        | "suspect_to_down_after"
        | "remove_down_after"
        | "gossip_interval"
        | "announce_interval"
        | "sync_interval"
        | "tombstone_grace" => "\"1s\" (a duration: 500ms, 2s, 5m)",
        _ => "a value as README.md, section Agent flags and config, shows",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(list: &[(&str, &str)]) -> Vec<(PathBuf, String)> {
        list.iter().map(|(p, t)| (PathBuf::from(p), t.to_string())).collect()
    }

    fn env(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn later_files_override_keys_and_tables_merge() {
        let f = files(&[
            ("d/10-base.toml", "name = \"a\"\nbind = \"127.0.0.1:1\"\n[labels]\nzone = \"z1\"\nrack = \"1\"\n"),
            ("d/20-site.toml", "bind = \"127.0.0.1:2\"\n[labels]\nrack = \"2\"\n"),
        ]);
        let l = merge(&f, &[]).unwrap();
        assert_eq!(l.file.name.as_deref(), Some("a"));
        assert_eq!(l.file.bind, Some("127.0.0.1:2".parse().unwrap()));
        assert_eq!(l.file.labels["zone"], "z1");
        assert_eq!(l.file.labels["rack"], "2");
        let (_, o) = l.origins.of("labels.rack").unwrap();
        assert_eq!(o, &Origin::File { path: "d/20-site.toml".into(), line: 3, text: "rack = \"2\"".into() });
    }

    #[test]
    fn environment_overrides_the_file() {
        let f = files(&[(
            "c.toml",
            "name = \"a\"\njoin = [\"127.0.0.1:1\"]\n[labels]\nzone = \"z1\"\n[timing]\nprobe_period = \"2s\"\n",
        )]);
        let e = env(&[
            ("TRELLIS_NAME", "b"),
            ("TRELLIS_JOIN", "127.0.0.2:7946, 127.0.0.3:7946"),
            ("TRELLIS_LABELS", "rack=3"),
            ("TRELLIS_TIMING__PROBE_PERIOD", "1s"),
            ("TRELLIS_EXPECTED_SIZE", "9"),
            ("TRELLIS_HTTP_ADDR", "127.0.0.1:1"),
            ("PATH", "/bin"),
        ]);
        let l = merge(&f, &e).unwrap();
        assert_eq!(l.file.name.as_deref(), Some("b"));
        assert_eq!(l.file.join, vec!["127.0.0.2:7946".parse().unwrap(), "127.0.0.3:7946".parse().unwrap()]);
        assert_eq!((l.file.labels["zone"].as_str(), l.file.labels["rack"].as_str()), ("z1", "3"));
        assert_eq!(l.file.timing.probe_period, Some(std::time::Duration::from_secs(1)));
        assert_eq!(l.file.expected_size, Some(9));
        assert_eq!(l.origins.of("name").unwrap().1, &Origin::Env { var: "TRELLIS_NAME".into(), value: "b".into() });
    }

    #[test]
    fn the_access_log_section_takes_the_environment_too() {
        let e = env(&[
            ("TRELLIS_ACCESS_LOG__SAMPLE", "0.25"),
            ("TRELLIS_ACCESS_LOG__ERRORS_ONLY", "true"),
            ("TRELLIS_ACCESS_LOG__SERVICES", "web, db"),
            ("TRELLIS_ACCESS_LOG__FORMAT", "envoy"),
        ]);
        let a = merge(&[], &e).unwrap().file.access_log.unwrap();
        assert_eq!((a.sample, a.errors_only, a.services.len()), (0.25, true, 2));
        assert_eq!(a.format, trellis_core::mesh::access_log::Format::Envoy);
        let err = merge(&[], &env(&[("TRELLIS_ACCESS_LOG__ERRORS_ONLY", "yes")])).unwrap_err().to_string();
        assert!(
            err.starts_with("environment TRELLIS_ACCESS_LOG__ERRORS_ONLY, field `access_log.errors_only`"),
            "{err}"
        );
    }

    #[test]
    fn unknown_environment_variable_is_named_with_the_fix() {
        let err = merge(&[], &env(&[("TRELLIS_NMAE", "x")])).unwrap_err().to_string();
        assert!(
            err.starts_with("environment TRELLIS_NMAE: not a config variable; accepted: TRELLIS_NAME, TRELLIS_BIND,"),
            "{err}"
        );
        assert!(err.contains("reserved for the CLI: TRELLIS_HTTP_ADDR, TRELLIS_HTTP_TOKEN"), "{err}");
        assert!(err.ends_with("fix: did you mean TRELLIS_NAME? rename or unset TRELLIS_NMAE"), "{err}");
    }

    #[test]
    fn bad_environment_value_names_variable_found_and_accepted() {
        let err = merge(&[], &env(&[("TRELLIS_BIND", "nowhere")])).unwrap_err().to_string();
        assert_eq!(
            err,
            "environment TRELLIS_BIND, field `bind`: found \"nowhere\" (invalid socket address syntax); accepted: see README.md, section Agent flags and config; fix: set TRELLIS_BIND=\"10.0.0.11:7946\""
        );
        let err = merge(&[], &env(&[("TRELLIS_EXPECTED_SIZE", "big")])).unwrap_err().to_string();
        assert_eq!(
            err,
            "environment TRELLIS_EXPECTED_SIZE, field `expected_size`: found \"big\" (string \"big\"); accepted: u32; fix: set TRELLIS_EXPECTED_SIZE=64"
        );
        let err = merge(&[], &env(&[("TRELLIS_LABELS", "zone")])).unwrap_err().to_string();
        assert!(err.starts_with("environment TRELLIS_LABELS, field `labels`: found \"zone\"; accepted: a comma-separated list of key=value"), "{err}");
    }

    #[test]
    fn errors_in_several_files_are_all_reported_with_their_file() {
        let f = files(&[("d/10.toml", "name = 1\n"), ("d/20.toml", "ok = true\n")]);
        let err = merge(&f, &[]).unwrap_err().to_string();
        assert!(err.contains("d/10.toml: line 1, field `name`"), "{err}");
        assert!(err.contains("d/20.toml: line 1, field `ok`"), "{err}");
    }

    #[test]
    fn problems_are_located_at_the_layer_that_set_the_field() {
        let f = files(&[("d/10.toml", "name = \"a\"\n\n[timing]\nprobe_rtt = \"3s\"\n")]);
        let l = merge(&f, &[]).unwrap();
        let msg = l.origins.locate("timing.probe_rtt (3s) must be shorter than timing.probe_period (1s)");
        assert_eq!(
            msg,
            "d/10.toml: line 4, field `timing.probe_rtt` (found `probe_rtt = \"3s\"`): timing.probe_rtt (3s) must be shorter than timing.probe_period (1s); fix: change line 4 of d/10.toml"
        );
        let f = files(&[("c.toml", "[services.web-1]\nservice = \"web\"\nport = 0\n")]);
        let l = merge(&f, &[]).unwrap();
        assert!(l
            .origins
            .locate("services.web-1.port: must be 1-65535")
            .starts_with("c.toml: line 3, field `services.web-1.port`"));
        assert_eq!(l.origins.locate("advertise: x"), "advertise: x", "defaults have no origin");
    }

    #[test]
    fn key_lines_follow_sections_quotes_and_comments() {
        let t = "# c\nname = \"a\" # the name\n[services.\"web-1\"]\nport = 80\n[[x]]\n";
        let k = key_lines(t);
        assert_eq!(k[0], ("name".into(), 2, "name = \"a\"".into()));
        assert_eq!(k[1], ("services.web-1.port".into(), 4, "port = 80".into()));
    }

    #[test]
    fn a_directory_is_read_in_name_order_and_an_empty_one_refused() {
        let dir = std::env::temp_dir().join(format!("trellis-layers-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let err = read_sources(&dir).unwrap_err().to_string();
        assert!(err.contains("holds no *.toml files"), "{err}");
        std::fs::write(dir.join("20-b.toml"), "name = \"b\"\n").unwrap();
        std::fs::write(dir.join("10-a.toml"), "name = \"a\"\n").unwrap();
        std::fs::write(dir.join("README"), "not toml").unwrap();
        let s = read_sources(&dir).unwrap();
        let names: Vec<_> = s.iter().map(|(p, _)| p.file_name().unwrap().to_str().unwrap().to_string()).collect();
        assert_eq!(names, ["10-a.toml", "20-b.toml"]);
        assert_eq!(merge(&s, &[]).unwrap().file.name.as_deref(), Some("b"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
