//! Running the agent process: logging, runtime, API server, signals, graceful leave.

use std::time::Duration;

use crate::config::flags::{log_filter, AgentArgs, LogFormat};

/// How long a leaving agent keeps running so its leave gossip reaches peers.
const LEAVE_GRACE: Duration = Duration::from_millis(500);

pub fn run_agent(args: AgentArgs) -> anyhow::Result<()> {
    let (mut cfg, log_level) = args.resolve()?;
    let log = init_logging(log_level.as_deref().unwrap_or("info"), args.log_format)?;
    std::fs::create_dir_all(&cfg.data_dir).map_err(|e| {
        anyhow::anyhow!("data_dir: cannot create {}: {e}; pick a writable --data-dir", cfg.data_dir.display())
    })?;
    let enroll = crate::enroll::Options::from_args(&args)?;
    let tls = crate::enroll::bootstrap(&mut cfg, &enroll)?;
    // Every line this process logs carries the node's name: the span is entered on every
    // runtime thread for its whole life.
    let span = tracing::info_span!("agent", node = %cfg.name);
    let _main = span.clone().entered();
    // One thread: the current-thread scheduler, without the work-stealing machinery.
    let mut rt = match worker_threads() {
        1 => tokio::runtime::Builder::new_current_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
    };
    let rt = rt.enable_all().on_thread_start(move || std::mem::forget(span.clone().entered())).build()?;
    let reload = Reloader {
        tls: crate::reload::tls_fingerprint(&cfg.tls_dir),
        running: cfg.clone(),
        level: log_level,
        args,
        log,
    };
    rt.block_on(serve(cfg, tls, reload, enroll))
}

/// Runtime threads: `TRELLIS_WORKER_THREADS` (1..=64), else 1. The agent shares its host
/// with the apps it serves; on 2 cores one thread cost 17% less CPU per request and carried
/// 27% more requests than two (BENCHMARKS.md, data plane), and one thread runs on tokio's
/// current-thread scheduler, which cost a further 15-20% less per request than the
/// multi-thread one with a single worker. Blocking work (policy fsyncs, span export flushes)
/// leaves the thread through `spawn_blocking`; `block_in_place` would panic on this scheduler.
fn worker_threads() -> usize {
    std::env::var("TRELLIS_WORKER_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| (1..=64).contains(n))
        .unwrap_or(1)
}

/// What SIGHUP needs: how to re-read the config, and what is running now.
struct Reloader {
    args: AgentArgs,
    running: crate::config::AgentConfig,
    level: Option<String>,
    tls: u64,
    log: LogReload,
}

impl Reloader {
    /// Re-reads the layers (file or dir, environment, the same flags), applies what can be
    /// applied and logs one line saying what changed and what needs a restart.
    async fn reload(&mut self, agent: &crate::agent::AgentHandle) {
        let (new, level) = match self.args.resolve() {
            Ok(r) => r,
            Err(e) => return tracing::error!(error = %e, "reload refused; the running config stays"),
        };
        let tls = crate::reload::tls_fingerprint(&new.tls_dir);
        let plan = crate::reload::diff(&self.running, self.level.as_deref(), self.tls, &new, level.as_deref(), tls);
        let mut failed = Vec::new();
        if let Some(l) = &plan.log_level {
            match log_filter(l).map_err(anyhow::Error::msg).and_then(|f| Ok(self.log.reload(f)?)) {
                Ok(()) => self.level = level.clone(),
                Err(e) => failed.push(format!("log_level: {e}")),
            }
        }
        if let Some(labels) = &plan.labels {
            if let Err(e) = agent.members.set_labels(labels.clone()).await {
                failed.push(e);
            }
        }
        for (id, json) in &plan.services_put {
            if let Err(e) = put_instance(agent, id, Some(json)).await {
                failed.push(format!("services.{id}: {e}"));
            }
        }
        for id in &plan.services_removed {
            if let Err(e) = put_instance(agent, id, None).await {
                failed.push(format!("services.{id}: {e}"));
            }
        }
        if !plan.new_seeds.is_empty() {
            agent.members.join(plan.new_seeds.clone()).await;
        }
        if plan.certificates {
            let swapped = crate::pki::load_tls_dir(&self.running.tls_dir)
                .map_err(anyhow::Error::from)
                .and_then(|m| Ok(agent.transport.identity.swap(&m)?));
            match swapped {
                Ok(()) => self.tls = tls,
                // The fingerprint stays old, so the next SIGHUP tries again.
                Err(e) => failed.push(format!("certificates: {e}; the running certificate stays")),
            }
        }
        self.running = plan.apply_to(self.running.clone(), &new);
        if failed.is_empty() {
            tracing::info!(node = %self.running.name, "{}", plan.summary());
        } else {
            tracing::warn!(node = %self.running.name, failed = %failed.join("; "), "{}", plan.summary());
        }
    }
}

/// Registers (Some) or removes (None) a config-file instance, as the API does.
async fn put_instance(
    agent: &crate::agent::AgentHandle,
    id: &str,
    json: Option<&serde_json::Value>,
) -> anyhow::Result<()> {
    let key = trellis_core::policy::Key::instance(id, &agent.members.identity.name);
    let bytes = json.map(serde_json::to_vec).transpose()?;
    agent.writer.write(key, bytes, None).await?;
    Ok(())
}

async fn serve(
    cfg: crate::config::AgentConfig,
    tls: crate::pki::TlsMaterial,
    mut reload: Reloader,
    enroll: crate::enroll::Options,
) -> anyhow::Result<()> {
    let agent = crate::agent::start(&cfg, &tls)?;
    let inputs = crate::enroll::Inputs { members: agent.members.clone(), transport: agent.transport.clone() };
    crate::enroll::start(inputs, agent.policy.clone(), &agent.lifecycle, &cfg, &enroll)?;
    let listener = tokio::net::TcpListener::bind(cfg.api)
        .await
        .map_err(|e| anyhow::anyhow!("api: cannot listen on {}: {e}; pick another --api address", cfg.api))?;
    if cfg.api_access.has_tokens() {
        tracing::info!("API tokens required");
    }
    tracing::info!(
        name = %cfg.name, peer = %cfg.advertise, api = %cfg.api, cluster = %tls.cluster_id,
        profile = ?cfg.profile, seeds = ?cfg.join, "agent started"
    );
    let mut stop = agent.shutdown.subscribe();
    let mut router = crate::api::router(agent.clone());
    if cfg.fault_injection {
        tracing::warn!("fault injection is ON (/v1/fault): for tests only");
        router = router.merge(crate::api::fault_routes(agent.clone()));
    }
    let access = std::sync::Arc::new(cfg.api_access.clone());
    let router = router.layer(axum::middleware::from_fn_with_state(access, crate::api_access::layer));
    let stopped = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    let server = crate::api::serve(listener, router, &cfg.limits, agent.clients.api.clone(), stopped);
    let server = async move {
        server.await;
        anyhow::Ok(())
    };
    let mut server = std::pin::pin!(server);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let mut left_via_api = agent.shutdown.subscribe();
    let stdin_closed = stdin_closed(reload.args.stop_with_stdin);
    let mut stdin_closed = std::pin::pin!(stdin_closed);
    // Transport and membership run and the API socket listens (connections queue until the
    // select below polls the server): a Type=notify unit may start its dependents now.
    crate::notify::ready(&format!("serving; peer {}, api {}", cfg.advertise, cfg.api));
    loop {
        tokio::select! {
            r = &mut server => { r?; break; }
            _ = tokio::signal::ctrl_c() => { tracing::info!("interrupted; leaving the cluster"); break; }
            _ = term.recv() => { tracing::info!("terminated; leaving the cluster"); break; }
            _ = left_via_api.wait_for(|s| *s) => { tracing::info!("left via the API"); break; }
            _ = &mut stdin_closed => { tracing::info!("stdin closed (the parent is gone); leaving the cluster"); break; }
            _ = hup.recv() => reload.reload(&agent).await,
        }
    }
    crate::notify::stopping();
    agent.leave().await;
    tokio::time::sleep(LEAVE_GRACE).await;
    agent.transport.shutdown().await;
    let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
    tracing::info!("stopped");
    Ok(())
}

/// Completes when stdin reaches its end, if `watch` (else never): a parent holding the
/// pipe's other end has exited or let go.
async fn stdin_closed(watch: bool) {
    if !watch {
        return std::future::pending().await;
    }
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    // A plain thread: a blocking read has no cancellation, and the process ends with it.
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
        let _ = tx.send(());
    });
    let _ = rx.await;
}

/// Swaps the log filter of the running process (SIGHUP).
pub type LogReload = tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, tracing_subscriber::Registry>;

fn init_logging(level: &str, format: LogFormat) -> anyhow::Result<LogReload> {
    use tracing_subscriber::prelude::*;
    use tracing_subscriber::EnvFilter;
    let filter = match std::env::var("RUST_LOG") {
        Ok(f) if !f.is_empty() => EnvFilter::try_new(f).map_err(|e| anyhow::anyhow!("RUST_LOG: {e}"))?,
        _ => log_filter(level).map_err(anyhow::Error::msg)?,
    };
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    // Colour codes only for a person at a terminal, never in a log file or a journal.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(ansi);
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Text => registry.with(fmt).init(),
        LogFormat::Json => registry.with(fmt.json()).init(),
    }
    Ok(handle)
}
