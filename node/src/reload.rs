//! SIGHUP: what changed between the running config and the one re-read from the layers,
//! what can be applied while running, and what needs a restart.
//!
//! [`diff`] decides; `run.rs` applies. New files in the same tls dir are swapped into the
//! transport's live identity (as renewal does): new handshakes present them, open
//! connections stay.

use std::collections::BTreeMap;
use std::path::Path;

use crate::config::AgentConfig;

/// What a reload does.
#[derive(Debug, Default, PartialEq)]
pub struct ReloadPlan {
    /// New labels to gossip.
    pub labels: Option<BTreeMap<String, String>>,
    /// New log level or filter.
    pub log_level: Option<String>,
    /// Instances from the config file that are new or changed: (id, instance JSON).
    pub services_put: Vec<(String, serde_json::Value)>,
    /// Instances no longer in the config file.
    pub services_removed: Vec<String>,
    /// Seeds not in the running config: contacted now.
    pub new_seeds: Vec<std::net::SocketAddr>,
    /// The tls dir's files changed (the dir did not): present them from now on.
    pub certificates: bool,
    /// Settings that changed but only take effect after a restart.
    pub needs_restart: Vec<&'static str>,
}

impl ReloadPlan {
    pub fn is_empty(&self) -> bool {
        *self == ReloadPlan::default()
    }

    /// One log line's worth: what changed, and what could not be reloaded.
    pub fn summary(&self) -> String {
        let mut changed = Vec::new();
        if let Some(l) = &self.labels {
            let list: Vec<String> = l.iter().map(|(k, v)| format!("{k}={v}")).collect();
            changed.push(format!("labels [{}]", list.join(",")));
        }
        if let Some(l) = &self.log_level {
            changed.push(format!("log_level {l}"));
        }
        for (id, _) in &self.services_put {
            changed.push(format!("services.{id} registered"));
        }
        for id in &self.services_removed {
            changed.push(format!("services.{id} deregistered"));
        }
        if !self.new_seeds.is_empty() {
            let list: Vec<String> = self.new_seeds.iter().map(|s| s.to_string()).collect();
            changed.push(format!("join +[{}]", list.join(",")));
        }
        if self.certificates {
            changed.push("certificates".to_string());
        }
        let changed = if changed.is_empty() { "nothing".to_string() } else { changed.join(", ") };
        if self.needs_restart.is_empty() {
            format!("reloaded: {changed}")
        } else {
            format!("reloaded: {changed}; not reloaded, restart to apply: {}", self.needs_restart.join(", "))
        }
    }

    /// The running config after the plan is applied (restart-only settings keep their value).
    pub fn apply_to(&self, mut running: AgentConfig, new: &AgentConfig) -> AgentConfig {
        if let Some(l) = &self.labels {
            running.labels = l.clone();
        }
        running.services = new.services.clone();
        running.join.extend(self.new_seeds.iter().copied());
        running
    }
}

/// The running config and what the layers say now. `tls_*` are fingerprints of the tls
/// dir's files ([`tls_fingerprint`]).
pub fn diff(
    old: &AgentConfig,
    old_level: Option<&str>,
    old_tls: u64,
    new: &AgentConfig,
    new_level: Option<&str>,
    new_tls: u64,
) -> ReloadPlan {
    let mut plan = ReloadPlan::default();
    if old.labels != new.labels {
        plan.labels = Some(new.labels.clone());
    }
    let level = |l: Option<&str>| l.unwrap_or("info").to_string();
    if level(old_level) != level(new_level) {
        plan.log_level = Some(level(new_level));
    }
    let old_services: BTreeMap<&String, &serde_json::Value> = old.services.iter().map(|(k, v)| (k, v)).collect();
    let new_services: BTreeMap<&String, &serde_json::Value> = new.services.iter().map(|(k, v)| (k, v)).collect();
    for (id, v) in &new_services {
        if old_services.get(id) != Some(v) {
            plan.services_put.push(((*id).clone(), (*v).clone()));
        }
    }
    plan.services_removed =
        old_services.keys().filter(|id| !new_services.contains_key(*id)).map(|s| (*s).clone()).collect();
    plan.new_seeds = new.join.iter().filter(|s| !old.join.contains(s)).copied().collect();
    let restart_only: [(&'static str, bool); 15] = [
        ("name", old.name != new.name),
        ("bind", old.bind != new.bind),
        ("advertise", old.advertise != new.advertise),
        ("api", old.api != new.api),
        ("data_dir", old.data_dir != new.data_dir),
        ("tls_dir", old.tls_dir != new.tls_dir),
        ("profile", old.profile != new.profile),
        ("timing", old.timing != new.timing),
        ("expected_size", old.expected_size != new.expected_size),
        ("upstreams", old.upstreams != new.upstreams),
        ("access_log", old.access_log != new.access_log),
        ("traces", old.traces != new.traces),
        ("dns", old.dns != new.dns),
        ("proxy", old.proxy != new.proxy),
        ("api_tokens_file/api_allowed_hosts", format!("{:?}", old.api_access) != format!("{:?}", new.api_access)),
    ];
    plan.needs_restart = restart_only.iter().filter(|(_, changed)| *changed).map(|(name, _)| *name).collect();
    plan.certificates = old_tls != new_tls && old.tls_dir == new.tls_dir;
    plan
}

/// A hash of the tls dir's certificate and key files, to tell whether they changed.
pub fn tls_fingerprint(dir: &Path) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for f in ["ca.pem", "node.pem", "node.key"] {
        std::fs::read(dir.join(f)).unwrap_or_default().hash(&mut h);
    }
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::flags::AgentArgs;

    fn cfg(extra: &[(&str, &str)]) -> AgentConfig {
        let mut env = BTreeMap::from([("TRELLIS_NAME".to_string(), "n1".to_string())]);
        env.insert("TRELLIS_BIND".into(), "127.0.0.1:7946".into());
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let env: Vec<(String, String)> = env.into_iter().collect();
        AgentArgs::default().resolve_with(&env, None).unwrap().0
    }

    #[test]
    fn nothing_changed_is_an_empty_plan() {
        let a = cfg(&[("TRELLIS_LABELS", "zone=a")]);
        let p = diff(&a, None, 1, &a.clone(), Some("info"), 1);
        assert!(p.is_empty(), "{p:?}");
        assert_eq!(p.summary(), "reloaded: nothing");
    }

    #[test]
    fn labels_level_and_seeds_reload_and_addresses_need_a_restart() {
        let a = cfg(&[("TRELLIS_LABELS", "zone=a"), ("TRELLIS_JOIN", "127.0.0.2:7946")]);
        let b = cfg(&[
            ("TRELLIS_LABELS", "zone=b,rack=1"),
            ("TRELLIS_JOIN", "127.0.0.2:7946,127.0.0.3:7946"),
            ("TRELLIS_BIND", "127.0.0.1:7947"),
            ("TRELLIS_DATA_DIR", "/tmp/x"),
        ]);
        let p = diff(&a, Some("info"), 1, &b, Some("debug"), 2);
        assert_eq!(p.labels.as_ref().unwrap()["zone"], "b");
        assert_eq!(p.log_level.as_deref(), Some("debug"));
        assert_eq!(p.new_seeds, vec!["127.0.0.3:7946".parse().unwrap()]);
        assert_eq!(p.needs_restart, vec!["bind", "advertise", "data_dir"]);
        assert!(p.certificates, "new files in the same tls dir are swapped in");
        assert_eq!(
            p.summary(),
            "reloaded: labels [rack=1,zone=b], log_level debug, join +[127.0.0.3:7946], certificates; not reloaded, restart to apply: bind, advertise, data_dir"
        );
        let running = p.apply_to(a.clone(), &b);
        assert_eq!(running.labels, b.labels);
        assert_eq!(running.bind, a.bind, "restart-only settings keep the running value");
        assert!(diff(&running, Some("debug"), 2, &b, Some("debug"), 2).labels.is_none());
    }

    #[test]
    fn service_instances_are_added_changed_and_removed() {
        let dir = std::env::temp_dir().join(format!("trellis-reload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = |body: &str| {
            let p = dir.join("agent.toml");
            std::fs::write(&p, format!("name = \"n1\"\nbind = \"127.0.0.1:7946\"\n{body}")).unwrap();
            let args = AgentArgs { config: Some(p), ..Default::default() };
            args.resolve_with(&[], None).unwrap().0
        };
        let web = "[services.web-1]\nservice = \"web\"\naddress = \"127.0.0.1\"\nport = 8080\n";
        let a = file(&format!("{web}[services.db-1]\nservice = \"db\"\naddress = \"127.0.0.1\"\nport = 5432\n"));
        let b = file(&format!(
            "{}[services.api-1]\nservice = \"api\"\naddress = \"127.0.0.1\"\nport = 9000\n",
            web.replace("8080", "8081")
        ));
        let p = diff(&a, None, 0, &b, None, 0);
        let put: Vec<&str> = p.services_put.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(put, ["api-1", "web-1"]);
        assert_eq!(p.services_removed, ["db-1"]);
        assert!(p.needs_restart.is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
