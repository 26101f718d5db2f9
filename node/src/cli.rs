//! The `trellis` command line: the agent itself, PKI chores, and thin clients of the API.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::client::Output;
use crate::config::flags::AgentArgs;

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
    /// Progressive rollouts: start a canary, follow it, pause, resume, promote or abort it.
    #[command(subcommand)]
    Rollout(RolloutCommand),
    /// Show cluster-wide rate limits: this node's share, what it admits, the cluster total.
    Ratelimits {
        /// One limit; all when omitted.
        name: Option<String>,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// The service catalog: list services (the default), register instances on this host
    /// from a file, deregister one.
    Services {
        #[command(subcommand)]
        command: Option<ServicesCommand>,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Ask this agent's DNS interface, as an application would: `web.service.trellis`,
    /// `v2.web.service.trellis` (a subset), `_web._tcp.service.trellis` (SRV),
    /// `node2.node.trellis`.
    Dns {
        name: String,
        /// A, AAAA, SRV or ANY.
        #[arg(short = 't', long = "type", default_value = "A")]
        rtype: String,
        /// Ask over TCP instead of UDP.
        #[arg(long)]
        tcp: bool,
    },
    /// The mesh's golden metrics from every agent: success rate, requests per second, latency
    /// p50/p95/p99 and open TCP connections, by service (or route, source node, answering node).
    Stat {
        /// One service; all when omitted.
        service: Option<String>,
        /// Group rows by service, route, source (the calling node) or node (the answering one).
        #[arg(long, default_value = "service", value_parser = ["service", "route", "source", "node", "edge"])]
        by: String,
        /// How far back to look (1s to 15m).
        #[arg(long, default_value = "1m")]
        window: String,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// The busiest paths through the mesh (calling node -> service@answering node), redrawn
    /// every second until Ctrl-C.
    Top {
        /// How far back each frame looks.
        #[arg(long, default_value = "10s")]
        window: String,
        /// Time between frames.
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        every: Duration,
        /// Stop after this many frames (for scripts).
        #[arg(long, hide = true)]
        count: Option<u32>,
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
    /// Directory holding ca.pem, node.pem and node.key (default: where the agent says, else
    /// from the config, else /etc/trellis/tls).
    #[arg(long)]
    pub tls_dir: Option<PathBuf>,
    /// The agent's data dir (default: where the agent says, else from the config, else
    /// /var/lib/trellis).
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
pub enum ServicesCommand {
    /// Every service: instances healthy/total on live nodes, protocols, nodes.
    List {
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Register (or replace) the instances in a TOML, JSON or YAML file on the local agent:
    /// one instance with an `id`, or a table of them by id (`[web-1]`).
    Register {
        #[arg(short, long)]
        file: PathBuf,
    },
    /// Remove an instance this agent registered.
    Deregister { id: String },
}

#[derive(Subcommand, Debug)]
pub enum RolloutCommand {
    /// Start a canary: writes `rollouts/<name>`; the agent that owns it steps it.
    Start(crate::client_rollouts::StartArgs),
    /// Every rollout, or one with its timeline.
    Status {
        name: Option<String>,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Hold the current step.
    Pause { name: String },
    /// Go on from the current step (its interval starts again).
    Resume { name: String },
    /// 100% to the canary now.
    Promote { name: String },
    /// 100% to the stable subset now.
    Abort { name: String },
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
    /// The object's recent versions on this agent, newest first (`*`: the current one).
    History {
        kind: String,
        name: String,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Write an earlier version's content again, as a new version (a delete, if it was one).
    Revert {
        kind: String,
        name: String,
        /// The version to go back to, as `policy history` lists it.
        #[arg(long)]
        to: String,
    },
}

fn rollout(api: SocketAddr, cmd: RolloutCommand) -> anyhow::Result<()> {
    use crate::client_rollouts as r;
    match cmd {
        RolloutCommand::Start(args) => r::start(api, &args),
        RolloutCommand::Status { name, output } => r::status(api, name.as_deref(), output),
        RolloutCommand::Pause { name } => r::command(api, &name, "pause"),
        RolloutCommand::Resume { name } => r::command(api, &name, "resume"),
        RolloutCommand::Promote { name } => r::command(api, &name, "promote"),
        RolloutCommand::Abort { name } => r::command(api, &name, "abort"),
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
    let agent = crate::client::get(http, "/v1/agent/self").ok().and_then(|t| serde_json::from_str(&t).ok());
    let flags = [args.tls_dir.clone(), args.data_dir.clone()];
    let dirs = crate::check::Dirs::pick(flags, agent.as_ref(), [file.tls_dir, file.data_dir]);
    let checks = crate::check::run_checks(&crate::check::gather(http, &dirs));
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
        Command::Services { command, output } => match command {
            None => crate::client_services::list(cli.http_addr, output),
            Some(ServicesCommand::List { output }) => crate::client_services::list(cli.http_addr, output),
            Some(ServicesCommand::Register { file }) => crate::client_services::register(cli.http_addr, &file),
            Some(ServicesCommand::Deregister { id }) => crate::client_services::deregister(cli.http_addr, &id),
        },
        Command::Stat { service, by, window, output } => {
            crate::client_stat::stat(cli.http_addr, service.as_deref(), &by, &window, output)
        }
        Command::Dns { name, rtype, tcp } => crate::client_dns::run(cli.http_addr, &name, &rtype, tcp),
        Command::Top { window, every, count } => crate::client_stat::top(cli.http_addr, &window, every, count),
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
        Command::Rollout(cmd) => rollout(cli.http_addr, cmd),
        Command::Policy(PolicyCommand::History { kind, name, output }) => {
            crate::client_history::history(cli.http_addr, &kind, &name, output)
        }
        Command::Policy(PolicyCommand::Revert { kind, name, to }) => {
            crate::client_history::revert(cli.http_addr, &kind, &name, &to)
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
