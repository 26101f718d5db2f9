//! Running the agent process: logging, runtime, API server, signals, graceful leave.

use std::time::Duration;

use crate::cli::{AgentArgs, LogFormat};

/// How long a leaving agent keeps running so its leave gossip reaches peers.
const LEAVE_GRACE: Duration = Duration::from_millis(500);

pub fn run_agent(args: AgentArgs) -> anyhow::Result<()> {
    let (mut cfg, log_level) = args.resolve()?;
    init_logging(log_level.as_deref().unwrap_or("info"), args.log_format)?;
    std::fs::create_dir_all(&cfg.data_dir).map_err(|e| {
        anyhow::anyhow!("data_dir: cannot create {}: {e}; pick a writable --data-dir", cfg.data_dir.display())
    })?;
    let enroll = crate::enroll::Options::from_args(&args)?;
    let tls = crate::enroll::bootstrap(&mut cfg, &enroll)?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(serve(cfg, tls, enroll))
}

async fn serve(
    cfg: crate::config::AgentConfig,
    tls: crate::pki::TlsMaterial,
    enroll: crate::enroll::Options,
) -> anyhow::Result<()> {
    let agent = crate::agent::start(&cfg, &tls)?;
    crate::enroll::start(&agent, &cfg, &enroll)?;
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
    let server = axum::serve(listener, router).with_graceful_shutdown(async move {
        let _ = stop.wait_for(|s| *s).await;
    });
    let mut server = std::pin::pin!(std::future::IntoFuture::into_future(server));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut left_via_api = agent.shutdown.subscribe();
    tokio::select! {
        r = &mut server => { r?; }
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted; leaving the cluster"),
        _ = term.recv() => tracing::info!("terminated; leaving the cluster"),
        _ = left_via_api.wait_for(|s| *s) => tracing::info!("left via the API"),
    }
    agent.leave().await;
    tokio::time::sleep(LEAVE_GRACE).await;
    agent.transport.shutdown().await;
    let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
    tracing::info!("stopped");
    Ok(())
}

fn init_logging(level: &str, format: LogFormat) -> anyhow::Result<()> {
    use tracing_subscriber::EnvFilter;
    let filter = match std::env::var("RUST_LOG") {
        Ok(f) if !f.is_empty() => EnvFilter::try_new(f),
        _ => EnvFilter::try_new(format!("{level},foca=warn,quinn=warn,rustls=warn")),
    }
    .map_err(|e| {
        anyhow::anyhow!("log_level: {level:?} is not a level or filter ({e}); use error, warn, info, debug or trace")
    })?;
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
}
