//! Agent configuration: defaults < TOML file or directory < environment < command-line flags
//! (the layering is in [`layers`]).
//!
//! Every error names the field (and for files, the file, line and column) and the fix.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use trellis_core::membership::{Profile, Timing};

pub mod flags;
pub mod layers;

/// The settings of a running agent, fully resolved.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub name: String,
    pub bind: SocketAddr,
    pub advertise: SocketAddr,
    pub api: SocketAddr,
    pub join: Vec<SocketAddr>,
    pub data_dir: PathBuf,
    pub tls_dir: PathBuf,
    pub labels: BTreeMap<String, String>,
    pub profile: Profile,
    pub timing: Timing,
    /// Cluster size the SWIM fan-outs are tuned for.
    pub expected_size: u32,
    /// Test-only fault injection (off by default).
    pub faults: crate::faults::Faults,
    /// Test-only: whether /v1/fault is served.
    pub fault_injection: bool,
    /// Local TCP listeners, one per upstream service: (service, listen address).
    pub upstreams: Vec<(String, SocketAddr)>,
    /// The local HTTP proxy listener, if any.
    pub proxy: Option<SocketAddr>,
    /// Who may use the HTTP API (tokens, accepted Host names).
    pub api_access: crate::api_access::Access,
    /// Service instances on this host from the config file: (id, checked instance JSON).
    pub services: Vec<(String, serde_json::Value)>,
    /// Bounds on what peers and clients may use (`[limits]`).
    pub limits: crate::limits::Limits,
    /// The config file or directory read (`--config` or `TRELLIS_CONFIG`), if any.
    pub config_source: Option<PathBuf>,
    /// The access log, when on.
    pub access_log: Option<crate::access_log::AccessLogConfig>,
    /// Span export, when on.
    pub traces: Option<crate::spans::TracesConfig>,
    /// The DNS interface's address, and whether the operator chose it; None when off.
    pub dns: Option<(SocketAddr, bool)>,
    /// Where virtual service addresses come from; None when off.
    pub virtual_range: Option<trellis_core::mesh::vip::Range>,
}

/// The config file: every field optional, unknown keys refused.
#[derive(Debug, Default, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub name: Option<String>,
    pub bind: Option<SocketAddr>,
    pub advertise: Option<SocketAddr>,
    pub api: Option<SocketAddr>,
    #[serde(default)]
    pub join: Vec<SocketAddr>,
    pub data_dir: Option<PathBuf>,
    pub tls_dir: Option<PathBuf>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub profile: Option<Profile>,
    pub expected_size: Option<u32>,
    pub log_level: Option<String>,
    /// service = "127.0.0.1:PORT": a local listener that forwards to that service.
    #[serde(default)]
    pub upstreams: BTreeMap<String, SocketAddr>,
    pub proxy: Option<SocketAddr>,
    #[serde(default)]
    pub timing: TimingOverrides,
    /// API tokens file (see `trellis agent --help`).
    pub api_tokens_file: Option<PathBuf>,
    /// Host names the API answers to besides IP literals and localhost.
    #[serde(default)]
    pub api_allowed_hosts: Vec<String>,
    /// Instances on this host, by id: the body `PUT /v1/agent/services/{id}` takes.
    #[serde(default)]
    pub services: BTreeMap<String, toml::Value>,
    /// Peer and client bounds; see [`crate::limits::Limits`].
    #[serde(default)]
    pub limits: crate::limits::Limits,
    /// One line per proxied request; see [`crate::access_log::AccessLogConfig`].
    pub access_log: Option<crate::access_log::AccessLogConfig>,
    /// Spans of proxied requests over OTLP/HTTP; see [`crate::spans::TracesConfig`].
    pub traces: Option<crate::spans::TracesConfig>,
    /// The DNS interface; see [`crate::dns::DnsConfig`].
    pub dns: Option<crate::dns::DnsConfig>,
    /// Virtual service addresses; see [`crate::mesh::vips::VipConfig`].
    pub virtual_addresses: Option<crate::mesh::vips::VipConfig>,
}

/// Timing settings that override the profile's.
#[derive(Debug, Default, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct TimingOverrides {
    #[serde(default, with = "humantime_serde")]
    pub probe_period: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub probe_rtt: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub suspect_to_down_after: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub remove_down_after: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub gossip_interval: Option<Duration>,
    pub gossip_fanout: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    pub announce_interval: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub sync_interval: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub tombstone_grace: Option<Duration>,
}

/// A configuration error, printed as-is to the operator.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

impl FileConfig {
    /// Reads and parses a TOML file.
    pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("{}: cannot read config file: {e}", path.display())))?;
        FileConfig::parse(&text, path)
    }

    /// Parses one TOML file; an error names the file, line, field, what was found, what is
    /// accepted and the fix.
    pub fn parse(text: &str, path: &Path) -> Result<FileConfig, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError(file_error(text, path, &e)))
    }
}

fn file_error(text: &str, path: &Path, e: &toml::de::Error) -> String {
    let (line, field) = e.span().map(|s| locate(text, s.start)).unwrap_or((0, None));
    let msg = e.message().trim_end();
    let (found, accepted) = layers::explain(msg);
    let fix = if msg.starts_with("unknown field") {
        let key = field.as_deref().and_then(|f| f.rsplit('.').next()).unwrap_or("");
        let options: Vec<&str> = accepted.split('`').skip(1).step_by(2).collect();
        let mean =
            layers::closest(key, options.into_iter()).map(|k| format!("did you mean `{k}`? ")).unwrap_or_default();
        format!("{mean}remove the key or correct its name; each `trellis agent` flag has a key of the same name (dashes become underscores); timing keys go under [timing]")
    } else if ["invalid type", "invalid value", "unknown variant", "invalid length"].iter().any(|p| msg.starts_with(p))
    {
        let f = field.as_deref().unwrap_or("");
        format!("write it as `{} = {}`", f.rsplit('.').next().unwrap_or(f), layers::example(f))
    } else {
        return format!(
            "{}:{} found invalid TOML ({found}); accepted: TOML (`key = value` lines, quoted strings, [table] headers); fix: correct the syntax on that line",
            path.display(),
            at(line, field.as_deref())
        );
    };
    format!("{}:{} found {found}; accepted: {accepted}; fix: {fix}", path.display(), at(line, field.as_deref()))
}

fn at(line: usize, field: Option<&str>) -> String {
    match field {
        Some(f) => format!(" line {line}, field `{f}`:"),
        None => format!(" line {line}:"),
    }
}

/// The line number and the dotted field path at the byte offset of an error.
fn locate(text: &str, offset: usize) -> (usize, Option<String>) {
    let offset = offset.min(text.len());
    let line_no = text[..offset].matches('\n').count() + 1;
    let mut section = String::new();
    for l in text.lines().take(line_no - 1) {
        let l = l.trim();
        if l.starts_with('[') && l.ends_with(']') {
            section = l.trim_matches(|c| c == '[' || c == ']').trim().replace('"', "");
        }
    }
    let line = text.lines().nth(line_no - 1).unwrap_or("");
    match line.split_once('=') {
        Some((key, _)) if !line.trim_start().starts_with('[') => {
            let key = key.trim().trim_matches('"');
            let field = if section.is_empty() { key.to_string() } else { format!("{section}.{key}") };
            (line_no, Some(field))
        }
        _ => (line_no, None),
    }
}

impl TimingOverrides {
    pub fn apply(&self, mut t: Timing) -> Timing {
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = self.$f { t.$f = v; } )* };
        }
        set!(
            probe_period,
            probe_rtt,
            suspect_to_down_after,
            remove_down_after,
            gossip_interval,
            gossip_fanout,
            announce_interval,
            sync_interval,
            tombstone_grace
        );
        t
    }
}

/// Checks the config file's instances exactly as the API checks a registration; errors
/// name `services.<id>.<field>`.
pub fn file_services(file: &FileConfig, node: &str) -> Result<Vec<(String, serde_json::Value)>, Vec<String>> {
    use trellis_core::policy::model::{self, Kind};
    let mut out = Vec::new();
    let mut problems = Vec::new();
    for (id, value) in &file.services {
        let mut json = match serde_json::to_value(value) {
            Ok(j) => j,
            Err(e) => {
                problems.push(format!("services.{id}: {e}"));
                continue;
            }
        };
        if let Some(map) = json.as_object_mut() {
            map.insert("node".into(), serde_json::json!(node));
        }
        let name = trellis_core::policy::model::instance_name(id, node);
        let bytes = serde_json::to_vec(&json).expect("json");
        match model::parse(Kind::Instances, &name, &bytes) {
            Ok(_) => out.push((id.clone(), json)),
            Err(e) => {
                let field = e.path.strip_prefix(&format!("instances.{name}")).unwrap_or(&e.path);
                let fix = if e.fix.is_empty() { "see README.md, section Service traffic" } else { &e.fix };
                problems.push(format!("services.{id}{field}: {}; {fix}", e.message));
            }
        }
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(problems)
    }
}

/// Parses `service=HOST:PORT` upstream flags.
pub fn parse_upstream(s: &str) -> Result<(String, SocketAddr), String> {
    let (name, addr) =
        s.split_once('=').ok_or_else(|| format!("upstream {s:?} must look like service=127.0.0.1:9000"))?;
    let addr = addr.parse().map_err(|e| format!("upstream {s:?}: {addr:?} is not HOST:PORT ({e})"))?;
    Ok((name.to_string(), addr))
}

/// Parses `key=value` labels from flags.
pub fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("label {s:?} must look like key=value, e.g. zone=eu-1a"))?;
    if k.is_empty() {
        return Err(format!("label {s:?} has an empty key"));
    }
    Ok((k.to_string(), v.to_string()))
}

/// Checks a node name against what certificates and gossip accept.
pub fn validate_name(name: &str) -> Result<(), ConfigError> {
    trellis_proto::identity::validate_node_name(name).map_err(ConfigError)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrong_type_names_file_line_and_field() {
        let err = FileConfig::parse("name = \"n1\"\nbind = 7946\n", Path::new("/etc/trellis.toml")).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("/etc/trellis.toml: line 2, field `bind`"), "{msg}");
        assert!(msg.contains("socket address") || msg.contains("invalid type"), "{msg}");
    }

    #[test]
    fn errors_in_a_section_name_the_dotted_path() {
        let err = FileConfig::parse("name = \"a\"\n[timing]\ngossip_fanout = -1\n", Path::new("c.toml")).unwrap_err();
        assert!(err.to_string().contains("line 3, field `timing.gossip_fanout`"), "{err}");
    }

    #[test]
    fn unknown_key_is_an_error() {
        let err = FileConfig::parse("nmae = \"n1\"\n", Path::new("c.toml")).unwrap_err().to_string();
        assert!(err.contains("found unknown key `nmae`"), "{err}");
    }

    fn parse_err(text: &str) -> String {
        FileConfig::parse(text, Path::new("/etc/trellis/agent.toml")).unwrap_err().to_string()
    }

    #[test]
    fn syntax_error_full_message() {
        assert_eq!(
            parse_err("name = \"n1\"\nbind = 127.0.0.1:7946\n"),
            "/etc/trellis/agent.toml: line 2, field `bind`: found invalid TOML (expected newline, `#`); accepted: TOML (`key = value` lines, quoted strings, [table] headers); fix: correct the syntax on that line"
        );
    }

    #[test]
    fn type_error_full_message() {
        assert_eq!(
            parse_err("name = \"n1\"\nbind = 7946\n"),
            "/etc/trellis/agent.toml: line 2, field `bind`: found integer `7946`; accepted: socket address; fix: write it as `bind = \"10.0.0.11:7946\"`"
        );
    }

    #[test]
    fn unknown_key_full_message() {
        assert_eq!(
            parse_err("name = \"n1\"\n[timing]\nprobe_perod = \"1s\"\n"),
            "/etc/trellis/agent.toml: line 3, field `timing.probe_perod`: found unknown key `probe_perod`; accepted: one of `probe_period`, `probe_rtt`, `suspect_to_down_after`, `remove_down_after`, `gossip_interval`, `gossip_fanout`, `announce_interval`, `sync_interval`, `tombstone_grace`; fix: did you mean `probe_period`? remove the key or correct its name; each `trellis agent` flag has a key of the same name (dashes become underscores); timing keys go under [timing]"
        );
    }

    #[test]
    fn bad_value_full_message() {
        assert_eq!(
            parse_err("profile = \"lna\"\n"),
            "/etc/trellis/agent.toml: line 1, field `profile`: found `lna`; accepted: one of `lan`, `wan`, `fast`; fix: write it as `profile = \"lan\" (or \"wan\", \"fast\")`"
        );
        assert_eq!(
            parse_err("[timing]\nprobe_period = \"1 fortnight\"\n"),
            "/etc/trellis/agent.toml: line 2, field `timing.probe_period`: found string \"1 fortnight\"; accepted: a duration; fix: write it as `probe_period = \"1s\" (a duration: 500ms, 2s, 5m)`"
        );
    }

    #[test]
    fn a_value_refused_after_parsing_names_file_line_and_field() {
        let dir = std::env::temp_dir().join(format!("trellis-cfg-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("agent.toml");
        std::fs::write(&p, "name = \"n1\"\nbind = \"127.0.0.1:7946\"\n[timing]\nprobe_rtt = \"3s\"\n").unwrap();
        let args = flags::AgentArgs { config: Some(p.clone()), ..Default::default() };
        let err = args.resolve_with(&[], None).unwrap_err().to_string();
        let want = format!(
            "{}: line 4, field `timing.probe_rtt` (found `probe_rtt = \"3s\"`): timing.probe_rtt (3s) must be shorter than timing.probe_period (500ms); fix: change line 4 of {}",
            p.display(),
            p.display()
        );
        assert_eq!(err, want);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn flags_override_the_environment_which_overrides_the_file() {
        let dir = std::env::temp_dir().join(format!("trellis-cfg-layers-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("agent.toml");
        std::fs::write(
            &p,
            "name = \"file\"\nbind = \"127.0.0.1:1\"\njoin = [\"127.0.0.9:1\"]\n[labels]\nzone = \"f\"\nrack = \"f\"\n",
        )
        .unwrap();
        let env: Vec<(String, String)> = [
            ("TRELLIS_NAME", "env"),
            ("TRELLIS_BIND", "127.0.0.1:2"),
            ("TRELLIS_LABELS", "zone=e,row=e"),
            ("TRELLIS_LOG_LEVEL", "debug"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let args = flags::AgentArgs {
            config: Some(p.clone()),
            name: Some("flag".into()),
            join: vec!["127.0.0.3:3".parse().unwrap()],
            labels: vec![("zone".into(), "l".into())],
            ..Default::default()
        };
        let (cfg, level) = args.resolve_with(&env, None).unwrap();
        assert_eq!(cfg.name, "flag");
        assert_eq!(cfg.bind, "127.0.0.1:2".parse().unwrap(), "env over file");
        assert_eq!(cfg.join, vec!["127.0.0.3:3".parse().unwrap()], "flag list replaces");
        let labels: Vec<(&str, &str)> = cfg.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(labels, [("rack", "f"), ("row", "e"), ("zone", "l")]);
        assert_eq!(level.as_deref(), Some("debug"));
        // TRELLIS_CONFIG names the file when --config does not.
        let env = vec![("TRELLIS_CONFIG".to_string(), p.display().to_string())];
        let (cfg, _) = flags::AgentArgs::default().resolve_with(&env, None).unwrap();
        assert_eq!(cfg.name, "file");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn timing_overrides_apply_over_the_profile() {
        let f = FileConfig::parse("[timing]\nprobe_period = \"2s\"\n", Path::new("c.toml")).unwrap();
        let t = f.timing.apply(Profile::Lan.timing());
        assert_eq!(t.probe_period, Duration::from_secs(2));
        assert_eq!(t.probe_rtt, Profile::Lan.timing().probe_rtt);
    }

    #[test]
    fn instances_in_the_file_are_checked_like_registrations() {
        let ok = "[services.web-1]\nservice = \"web\"\naddress = \"127.0.0.1\"\nport = 8080\ncheck = { http = \"/healthz\", interval = \"1s\" }\n";
        let f = FileConfig::parse(ok, Path::new("c.toml")).unwrap();
        let list = file_services(&f, "n1").unwrap();
        assert_eq!(list[0].0, "web-1");
        assert_eq!(list[0].1["node"], "n1");
        let bad = "[services.web-1]\nservice = \"web\"\naddress = \"127.0.0.1\"\nport = 0\n";
        let f = FileConfig::parse(bad, Path::new("c.toml")).unwrap();
        let err = file_services(&f, "n1").unwrap_err().join("\n");
        assert!(err.starts_with("services.web-1.port: "), "{err}");
        let typo = "[services.web-1]\nservice = \"web\"\naddress = \"127.0.0.1\"\nport = 80\nweigth = 2\n";
        let f = FileConfig::parse(typo, Path::new("c.toml")).unwrap();
        assert!(file_services(&f, "n1").unwrap_err()[0].contains("weigth"));
    }

    #[test]
    fn limits_table_overrides_defaults_and_bad_values_name_the_field() {
        let f = FileConfig::parse(
            "[limits]\nmax_concurrent_uni_streams = 8\nidle_timeout = \"20s\"\n",
            Path::new("c.toml"),
        )
        .unwrap();
        assert_eq!(f.limits.max_concurrent_uni_streams, 8);
        assert_eq!(f.limits.idle_timeout, Duration::from_secs(20));
        assert_eq!(f.limits.max_pending_per_peer, crate::limits::Limits::default().max_pending_per_peer);
        let err = FileConfig::parse("[limits]\nmax_datagram = -1\n", Path::new("c.toml")).unwrap_err();
        assert!(err.to_string().contains("field `limits.max_datagram`"), "{err}");
        let err = FileConfig::parse("[limits]\nmax_streams = 1\n", Path::new("c.toml")).unwrap_err();
        let err = err.to_string();
        assert!(err.contains("field `limits.max_streams`") && err.contains("unknown key `max_streams`"), "{err}");
        let f = FileConfig::parse("[limits]\npeer_messages_per_second = 1\n", Path::new("c.toml")).unwrap();
        let errs = f.limits.validate().unwrap_err();
        assert!(errs[0].starts_with("limits.peer_messages_per_second: 1 is outside 100..="), "{errs:?}");
    }

    #[test]
    fn names_and_labels_are_checked() {
        assert!(validate_name("node-1.eu").is_ok());
        assert!(validate_name("Node 1").unwrap_err().to_string().contains("name:"));
        assert_eq!(parse_label("zone=a"), Ok(("zone".into(), "a".into())));
        assert!(parse_label("zone").is_err());
    }
}
