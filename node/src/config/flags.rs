//! The agent's command-line flags (and their environment variables), and how they resolve
//! over the config file and the defaults into one [`AgentConfig`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::builder::TypedValueParser as _;
use clap::{Args, ValueEnum};
use trellis_core::membership::Profile;

use super::{parse_label, validate_name, AgentConfig};

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Args, Debug, Default, Clone)]
pub struct AgentArgs {
    /// Node name; must match the name in the node certificate.
    #[arg(long)]
    pub name: Option<String>,
    /// Peer (QUIC/UDP) address to bind.
    #[arg(long)]
    pub bind: Option<SocketAddr>,
    /// Peer address other nodes should use (default: --bind).
    #[arg(long)]
    pub advertise: Option<SocketAddr>,
    /// HTTP API address (default 127.0.0.1:8500; loopback unless you say otherwise).
    #[arg(long)]
    pub api: Option<SocketAddr>,
    /// Seed peer address to join through (repeatable).
    #[arg(long = "join")]
    pub join: Vec<SocketAddr>,
    /// Where the agent keeps its state.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Directory holding ca.pem, node.pem and node.key (as written by `trellis cert issue`).
    #[arg(long)]
    pub tls_dir: Option<PathBuf>,
    /// Node label key=value (repeatable).
    #[arg(long = "label", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// Timing profile for membership.
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(Profile::NAMES).map(|s| s.parse::<Profile>().expect("a listed profile")))]
    pub profile: Option<Profile>,
    /// TOML config file, or a directory of *.toml files merged in name order, with the same
    /// fields; TRELLIS_* variables win over it, flags over both.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Log level (error, warn, info, debug, trace) or a tracing filter.
    #[arg(long)]
    pub log_level: Option<String>,
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Local HTTP proxy listener that routes by Host (<service> or <service>.trellis).
    #[arg(long)]
    pub proxy: Option<SocketAddr>,
    /// API tokens, one `read:<token>` or `write:<token>` per line; required when --api is
    /// not a loopback address.
    #[arg(long)]
    pub api_tokens_file: Option<PathBuf>,
    /// Local listener for a service: NAME=127.0.0.1:PORT (repeatable).
    #[arg(long = "upstream", value_parser = crate::config::parse_upstream)]
    pub upstreams: Vec<(String, SocketAddr)>,
    /// Access log of proxied requests to `stdout`, `stderr` or a file (JSON lines; the
    /// `[access_log]` config section sets the format, sampling, filters and rotation).
    #[arg(long, value_name = "DEST")]
    pub access_log: Option<String>,
    /// Export spans of proxied requests over OTLP/HTTP to this collector, e.g.
    /// http://127.0.0.1:4318 (the `[traces]` config section sets sampling and batching).
    #[arg(long, value_name = "URL")]
    pub otlp_endpoint: Option<String>,
    /// DNS interface address, UDP and TCP (default: port 8600 on the API's loopback address;
    /// `[dns] enabled = false` turns it off).
    #[arg(long, value_name = "ADDR")]
    pub dns: Option<SocketAddr>,
    /// Loopback block virtual service addresses come from (default 127.100.0.0/16; `off`
    /// or `[virtual_addresses] enabled = false` turns them off).
    #[arg(long, value_name = "CIDR")]
    pub virtual_range: Option<String>,
    /// Test only: drop this share (0..1) of outgoing peer messages.
    #[cfg(feature = "fault-injection")]
    #[arg(long, hide = true)]
    pub fault_drop_rate: Option<f64>,
    /// Test only: serve POST /v1/fault to inject loss and partitions at run time.
    #[cfg(feature = "fault-injection")]
    #[arg(long, hide = true)]
    pub fault_injection: bool,
    /// Join token from `trellis token create`: with no certificate in --tls-dir yet, the agent
    /// makes its key, has it certified through --join SEED and starts with it.
    #[arg(long, env = "TRELLIS_JOIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// The cluster CA directory: this agent signs enrollments and renewals (a signer), and
    /// issues its own certificate if --tls-dir has none.
    #[arg(long)]
    pub ca_dir: Option<PathBuf>,
    /// Lifetime of the certificates this signer issues (default 90d).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub cert_lifetime: Option<Duration>,
    /// Leave the cluster and exit when stdin closes: how `trellis dev` makes sure its agents
    /// never outlive it, even when it is killed.
    #[arg(long, hide = true)]
    pub stop_with_stdin: bool,
    /// Renew this node's certificate once this share of its lifetime has passed (default 0.67).
    #[arg(long, hide = true)]
    pub cert_renew_at: Option<f64>,
}

impl AgentArgs {
    /// The chaos harness's faults; only a build with the `fault-injection` feature has
    /// the flags that set them.
    fn faults(&self) -> crate::faults::Faults {
        #[cfg(feature = "fault-injection")]
        let drop_rate = self.fault_drop_rate.unwrap_or(0.0).clamp(0.0, 1.0);
        #[cfg(not(feature = "fault-injection"))]
        let drop_rate = 0.0;
        crate::faults::Faults { drop_rate, ..Default::default() }
    }

    fn fault_injection(&self) -> bool {
        #[cfg(feature = "fault-injection")]
        return self.fault_injection;
        #[cfg(not(feature = "fault-injection"))]
        return false;
    }
    /// Merges defaults < file or directory < environment < flags and checks the result:
    /// the one function both the agent and `trellis validate` run.
    pub fn resolve(&self) -> Result<(AgentConfig, Option<String>), crate::config::ConfigError> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        self.resolve_with(&env, None)
    }

    /// [`AgentArgs::resolve`] over a given environment; `default_name` stands in when no
    /// layer names the node (`trellis validate` of a file that leaves the name to a flag).
    pub fn resolve_with(
        &self,
        env: &[(String, String)],
        default_name: Option<&str>,
    ) -> Result<(AgentConfig, Option<String>), crate::config::ConfigError> {
        use crate::config::layers;
        use crate::config::ConfigError;
        let config_path = self
            .config
            .clone()
            .or_else(|| env.iter().find(|(k, _)| k == layers::CONFIG_ENV).map(|(_, v)| PathBuf::from(v)));
        let sources = match &config_path {
            Some(p) => layers::read_sources(p)?,
            None => Vec::new(),
        };
        let mut layered = layers::merge(&sources, env)?;
        for (field, flag) in self.flag_fields() {
            layered.origins.0.insert(field.into(), layers::Origin::Flag { flag: flag.into() });
        }
        let file = layered.file;
        let origins = layered.origins;
        let name = self.name.clone().or(file.name.clone()).or(default_name.map(str::to_string)).ok_or_else(|| {
            ConfigError(
                "name: missing; give --name NODE (or name = \"...\" in the config file, or TRELLIS_NAME)".into(),
            )
        })?;
        validate_name(&name).map_err(|e| ConfigError(origins.locate(&e.0)))?;
        let bind = self.bind.or(file.bind).unwrap_or_else(|| "0.0.0.0:7946".parse().expect("literal"));
        let advertise = self.advertise.or(file.advertise).unwrap_or(bind);
        let profile = self.profile.or(file.profile).unwrap_or_default();
        let timing = file.timing.apply(profile.timing());
        // Report every problem at once, so a fix-and-retry loop takes one round.
        let mut problems = Vec::new();
        if advertise.ip().is_unspecified() {
            problems.push(format!(
                "advertise: {advertise} is not an address peers can reach; give --advertise HOST:PORT (or bind to a specific address)"
            ));
        }
        if let Err(e) = timing.validate() {
            problems.push(e);
        }
        if let Err(e) = file.limits.validate() {
            problems.extend(e);
        }
        let services = crate::config::file_services(&file, &name).unwrap_or_else(|e| {
            problems.extend(e);
            Vec::new()
        });
        let api = self.api.or(file.api).unwrap_or_else(|| "127.0.0.1:8500".parse().expect("literal"));
        let hosts = file.api_allowed_hosts.clone();
        let access = match self.api_tokens_file.as_ref().or(file.api_tokens_file.as_ref()) {
            Some(p) => crate::api_access::Access::load(p, hosts).unwrap_or_else(|e| {
                problems.push(e);
                crate::api_access::Access::default()
            }),
            None => crate::api_access::Access::open(hosts),
        };
        if !api.ip().is_loopback() && !access.has_tokens() {
            problems.push(format!(
                "api: {api} is not a loopback address, so anyone who reaches it could operate this agent; give --api-tokens-file FILE, or bind the API to 127.0.0.1"
            ));
        }
        let access_log = match (&self.access_log, file.access_log.clone()) {
            (Some(dest), Some(section)) => {
                Some(crate::access_log::AccessLogConfig { path: dest.clone(), enabled: true, ..section })
            }
            (Some(dest), None) => Some(crate::access_log::AccessLogConfig::to(dest)),
            (None, section) => section.filter(|s| s.enabled),
        };
        if let Some(Err(e)) = access_log.as_ref().map(crate::access_log::AccessLogConfig::check) {
            problems.push(e);
        }
        let traces = match (&self.otlp_endpoint, file.traces.clone()) {
            (Some(url), Some(section)) => {
                Some(crate::spans::TracesConfig { endpoint: url.clone(), enabled: true, ..section })
            }
            (Some(url), None) => Some(crate::spans::TracesConfig::to(url)),
            (None, section) => section.filter(|s| s.enabled),
        };
        if let Some(Err(e)) = traces.as_ref().map(crate::spans::TracesConfig::check) {
            problems.push(e);
        }
        let virtual_range =
            crate::mesh::vips::VipConfig::resolve(file.virtual_addresses.as_ref(), self.virtual_range.as_deref())
                .unwrap_or_else(|e| {
                    problems.push(e);
                    None
                });
        let log_level = self.log_level.clone().or(file.log_level.clone());
        if let Some(level) = &log_level {
            if let Err(e) = log_filter(level) {
                problems.push(e);
            }
        }
        if !problems.is_empty() {
            let located: Vec<String> = problems.iter().map(|p| origins.locate(p)).collect();
            return Err(ConfigError(located.join("\n")));
        }
        let mut labels = file.labels.clone();
        labels.extend(self.labels.iter().cloned());
        // A list given at a higher layer replaces the lower one.
        let join = if self.join.is_empty() { file.join.clone() } else { self.join.clone() };
        let mut upstreams = file.upstreams.clone();
        upstreams.extend(self.upstreams.iter().cloned());
        let cfg = AgentConfig {
            data_dir: self
                .data_dir
                .clone()
                .or(file.data_dir.clone())
                .unwrap_or_else(|| PathBuf::from("/var/lib/trellis")),
            tls_dir: self.tls_dir.clone().or(file.tls_dir.clone()).unwrap_or_else(|| PathBuf::from("/etc/trellis/tls")),
            api,
            api_access: access,
            name,
            bind,
            advertise,
            join,
            labels,
            profile,
            timing,
            expected_size: file.expected_size.unwrap_or(64),
            faults: self.faults(),
            fault_injection: self.fault_injection(),
            upstreams: upstreams.into_iter().collect(),
            proxy: self.proxy.or(file.proxy),
            services,
            limits: file.limits.clone(),
            config_source: config_path,
            access_log,
            traces,
            dns: crate::dns::resolve(file.dns.as_ref(), self.dns, api),
            virtual_range,
        };
        Ok((cfg, log_level))
    }

    /// The config fields set by flags, so a refused value names the flag.
    fn flag_fields(&self) -> Vec<(&'static str, &'static str)> {
        let mut v = Vec::new();
        let set = [
            ("name", "--name", self.name.is_some()),
            ("bind", "--bind", self.bind.is_some()),
            ("advertise", "--advertise", self.advertise.is_some()),
            ("api", "--api", self.api.is_some()),
            ("join", "--join", !self.join.is_empty()),
            ("data_dir", "--data-dir", self.data_dir.is_some()),
            ("tls_dir", "--tls-dir", self.tls_dir.is_some()),
            ("profile", "--profile", self.profile.is_some()),
            ("log_level", "--log-level", self.log_level.is_some()),
            ("proxy", "--proxy", self.proxy.is_some()),
            ("api_tokens_file", "--api-tokens-file", self.api_tokens_file.is_some()),
            ("traces.endpoint", "--otlp-endpoint", self.otlp_endpoint.is_some()),
            ("dns.bind", "--dns", self.dns.is_some()),
            ("virtual_addresses.range", "--virtual-range", self.virtual_range.is_some()),
        ];
        for (field, flag, given) in set {
            if given {
                v.push((field, flag));
            }
        }
        v
    }
}

/// The log filter for a level (or a full tracing filter), with noisy dependencies quieted.
pub fn log_filter(level: &str) -> Result<tracing_subscriber::EnvFilter, String> {
    tracing_subscriber::EnvFilter::try_new(format!("{level},foca=warn,quinn=warn,rustls=warn")).map_err(|e| {
        format!("log_level: {level:?} is not a level or filter ({e}); use error, warn, info, debug or trace")
    })
}
