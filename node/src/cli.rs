//! The `trellis` command line: the agent itself, PKI chores, and thin clients of the API.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::builder::TypedValueParser as _;
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::client::Output;
use crate::config::{parse_label, validate_name, AgentConfig};
use trellis_core::membership::Profile;

#[derive(Parser, Debug)]
#[command(name = "trellis", version, about = "Trellis: a decentralized service mesh agent")]
pub struct Cli {
    /// Address of the local agent's HTTP API, for client commands.
    #[arg(long, global = true, env = "TRELLIS_HTTP_ADDR", default_value = "127.0.0.1:8500")]
    pub http_addr: SocketAddr,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the agent.
    Agent(Box<AgentArgs>),
    /// Manage the cluster certificate authority.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Issue and inspect node certificates.
    #[command(subcommand)]
    Cert(CertCommand),
    /// Single-use join tokens for new hosts (run where the CA key is).
    #[command(subcommand)]
    Token(TokenCommand),
    /// List the cluster's members as the local agent sees them.
    Members {
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Ask the local agent to join through these peer addresses.
    Join {
        #[arg(required = true)]
        addrs: Vec<SocketAddr>,
    },
    /// Ask the local agent to leave the cluster gracefully and stop.
    Leave,
    /// Read and write cluster policy.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Show cluster-wide rate limits: this node's share, what it admits, the cluster total.
    Ratelimits {
        /// One limit; all when omitted.
        name: Option<String>,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Check a config file or directory (with the TRELLIS_* environment) exactly as the
    /// agent does at start.
    Validate { file: PathBuf },
    /// Check this node: API, certificate, CA, peers over UDP, clock skew, data dir, versions.
    /// One line per check; exits non-zero if any fails.
    Check(CheckArgs),
    /// Start a throwaway local cluster of real agents (new CA, mTLS, 127.0.0.x).
    Dev(crate::dev::DevArgs),
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// The agent's config file or directory (for tls_dir and data_dir; TRELLIS_* apply too).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Directory holding ca.pem, node.pem and node.key (default: from the config, else /etc/trellis/tls).
    #[arg(long)]
    pub tls_dir: Option<PathBuf>,
    /// The agent's data dir (default: from the config, else /var/lib/trellis).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    #[arg(short, long, value_enum, default_value = "text")]
    pub output: Output,
}

#[derive(Subcommand, Debug)]
pub enum CaCommand {
    /// Create a cluster CA (10-year lifetime) and a cluster id.
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// Cluster id (default: random).
        #[arg(long)]
        cluster_id: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum CertCommand {
    /// Issue a node certificate and key signed by the cluster CA.
    Issue {
        #[arg(long)]
        ca_dir: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long)]
        out: PathBuf,
        /// Lifetime in days.
        #[arg(long, default_value_t = 90)]
        days: u64,
        /// Lifetime as a duration (e.g. 2m), overriding --days; for trying renewal.
        #[arg(long, hide = true, value_parser = humantime::parse_duration)]
        lifetime: Option<Duration>,
    },
    /// Print a certificate's subject, identity, issuer and expiry (never a key).
    Show {
        file: PathBuf,
        #[arg(short, long, value_enum, default_value = "text")]
        output: Output,
    },
}

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Print a new single-use join token; its hash is kept in CA_DIR/join-tokens.json, where
    /// the agent started with --ca-dir CA_DIR (the signer) checks it.
    Create {
        #[arg(long)]
        ca_dir: PathBuf,
        /// How long the token stays valid (1s to 7d).
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// Peer address of the signer, written into the token; without it the joiner asks its
        /// --join seed (which points it to a signer if it is not one).
        #[arg(long)]
        signer: Option<SocketAddr>,
    },
}

#[derive(Subcommand, Debug)]
pub enum PolicyCommand {
    /// Write every object in a TOML or JSON file (`[kind.name]` tables).
    Apply {
        #[arg(short, long)]
        file: PathBuf,
        /// Validate only; write nothing.
        #[arg(long)]
        check: bool,
    },
    /// Show objects: all, one kind, or one object.
    Get {
        kind: Option<String>,
        name: Option<String>,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Delete one object.
    Delete { kind: String, name: String },
}


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
    /// Test only: drop this share (0..1) of outgoing peer messages.
    #[arg(long, hide = true)]
    pub fault_drop_rate: Option<f64>,
    /// Test only: serve POST /v1/fault to inject loss and partitions at run time.
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
    /// Renew this node's certificate once this share of its lifetime has passed (default 0.67).
    #[arg(long, hide = true)]
    pub cert_renew_at: Option<f64>,
}

impl AgentArgs {
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
        let log_level = self.log_level.clone().or(file.log_level.clone());
        if let Some(level) = &log_level {
            if let Err(e) = crate::run::log_filter(level) {
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
            faults: crate::faults::Faults {
                drop_rate: self.fault_drop_rate.unwrap_or(0.0).clamp(0.0, 1.0),
                blocked: Default::default(),
                blocked_out: Default::default(),
                delay: Default::default(),
            },
            fault_injection: self.fault_injection,
            upstreams: upstreams.into_iter().collect(),
            proxy: self.proxy.or(file.proxy),
            services,
            limits: file.limits.clone(),
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
        ];
        for (field, flag, given) in set {
            if given {
                v.push((field, flag));
            }
        }
        v
    }
}

/// `trellis validate FILE|DIR`: the agent's own start-up config checks, nothing started.
fn validate(path: &std::path::Path) -> anyhow::Result<()> {
    let args = AgentArgs { config: Some(path.to_path_buf()), ..Default::default() };
    let env: Vec<(String, String)> = std::env::vars().collect();
    args.resolve_with(&env, Some("validate"))?;
    let files = crate::config::layers::read_sources(path)?;
    let names: Vec<String> = files.iter().map(|(p, _)| p.display().to_string()).collect();
    println!("{}: ok ({})", path.display(), names.join(", "));
    Ok(())
}

/// `trellis check`: the node's paths come from flags, else the same layers as the agent's.
fn check(http: SocketAddr, args: &CheckArgs) -> anyhow::Result<()> {
    use crate::config::layers;
    let env: Vec<(String, String)> = std::env::vars().collect();
    let path = args.config.clone().or_else(|| env.iter().find(|(k, _)| k == layers::CONFIG_ENV).map(|(_, v)| v.into()));
    let sources = path.as_deref().map(layers::read_sources).transpose()?.unwrap_or_default();
    let file = layers::merge(&sources, &env)?.file;
    let tls_dir = args.tls_dir.clone().or(file.tls_dir).unwrap_or_else(|| PathBuf::from("/etc/trellis/tls"));
    let data_dir = args.data_dir.clone().or(file.data_dir).unwrap_or_else(|| PathBuf::from("/var/lib/trellis"));
    let checks = crate::check::run_checks(&crate::check::gather(http, &tls_dir, &data_dir));
    if args.output == Output::Json {
        let ok = !crate::check::any_failed(&checks);
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({"ok": ok, "checks": checks}))?);
    } else {
        print!("{}", crate::check::render(&checks));
    }
    let failed = checks.iter().filter(|c| c.status == crate::check::Status::Fail).count();
    anyhow::ensure!(failed == 0, "{failed} of {} checks failed", checks.len());
    Ok(())
}

/// Entry point of the binary; returns the process exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    let res = match cli.command {
        Command::Agent(args) => crate::run::run_agent(*args),
        Command::Ca(CaCommand::Init { dir, cluster_id }) => crate::pki::init_ca(&dir, cluster_id.as_deref())
            .map(|ca| {
                println!("cluster id: {}", ca.cluster_id);
                println!("CA certificate: {}", ca.cert_path.display());
                println!("CA key: {} (keep it secret; mode 0600)", ca.key_path.display());
            })
            .map_err(Into::into),
        Command::Cert(CertCommand::Issue { ca_dir, name, out, days, lifetime }) => {
            crate::pki::issue_cert(&ca_dir, &name, &out, lifetime.unwrap_or(Duration::from_secs(days * 86_400)))
                .map(|c| {
                    println!("identity: {}", c.identity);
                    println!("certificate: {}", c.cert_path.display());
                    println!("key: {} (mode 0600)", c.key_path.display());
                    println!("expires: {}", c.not_after);
                })
                .map_err(Into::into)
        }
        Command::Cert(CertCommand::Show { file, output }) => crate::pki::show_cert(&file)
            .map(|s| {
                if output == Output::Json {
                    println!("{}", serde_json::to_string_pretty(&s).unwrap_or_default());
                } else {
                    print!("{s}");
                }
            })
            .map_err(Into::into),
        Command::Token(TokenCommand::Create { ca_dir, ttl, signer }) => {
            crate::enroll::create_token(&ca_dir, ttl, signer).map(|(t, expires_ms)| {
                // The token alone on stdout, so `T=$(trellis token create ...)` works.
                println!("{}", t.expose());
                let expires = time::OffsetDateTime::from_unix_timestamp(expires_ms / 1000).map(|t| t.to_string());
                eprintln!("token {}: single use, expires {}", t.id, expires.unwrap_or_default());
            })
        }
        Command::Members { output } => crate::client::members(cli.http_addr, output),
        Command::Join { addrs } => crate::client::join(cli.http_addr, &addrs),
        Command::Leave => crate::client::leave(cli.http_addr),
        Command::Ratelimits { name, output } => crate::client::ratelimits(cli.http_addr, name.as_deref(), output),
        Command::Validate { file } => validate(&file),
        Command::Check(args) => check(cli.http_addr, &args),
        Command::Dev(args) => crate::dev::run(args),
        Command::Policy(PolicyCommand::Apply { file, check }) => {
            crate::client::policy_apply(cli.http_addr, &file, check)
        }
        Command::Policy(PolicyCommand::Get { kind, name, output }) => {
            crate::client::policy_get(cli.http_addr, kind.as_deref(), name.as_deref(), output)
        }
        Command::Policy(PolicyCommand::Delete { kind, name }) => {
            crate::client::policy_delete(cli.http_addr, &kind, &name)
        }
    };
    match res {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    }
}
