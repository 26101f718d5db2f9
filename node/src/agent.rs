//! The agent's async shell: it moves bytes between the transport and the membership core,
//! wakes the core at its deadlines, and answers the API's questions. No decisions here.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};
use trellis_proto::{NodeIdentity, NodeMeta};

use crate::config::AgentConfig;
use crate::membership::{MemberEvent, MemberView, Membership, PacketError, Stats};
use crate::pki::TlsMaterial;
use crate::transport::{Inbound, Transport};

/// Agent version, gossiped so operators can see mixed-version clusters.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Questions and orders for the membership task.
pub enum Command {
    Members(oneshot::Sender<Vec<MemberView>>),
    Stats(oneshot::Sender<Stats>),
    Join(Vec<SocketAddr>),
    Leave(oneshot::Sender<()>),
}

/// What the API needs to reach a running agent.
#[derive(Clone)]
pub struct AgentHandle {
    pub identity: NodeIdentity,
    pub cluster_id: String,
    pub spiffe_id: String,
    pub commands: mpsc::Sender<Command>,
    pub transport: Arc<Transport>,
    pub started: Instant,
    /// Flips to true when the agent should stop (after a leave).
    pub shutdown: watch::Sender<bool>,
}

impl AgentHandle {
    pub async fn members(&self) -> Vec<MemberView> {
        let (tx, rx) = oneshot::channel();
        let _ = self.commands.send(Command::Members(tx)).await;
        rx.await.unwrap_or_default()
    }

    pub async fn stats(&self) -> Stats {
        let (tx, rx) = oneshot::channel();
        let _ = self.commands.send(Command::Stats(tx)).await;
        rx.await.unwrap_or_default()
    }

    /// Leaves gracefully, then asks the process to stop.
    pub async fn leave(&self) {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::Leave(tx)).await.is_ok() {
            let _ = rx.await;
        }
        let _ = self.shutdown.send(true);
    }

    /// The SPIFFE identity of a member, derived from its certified name.
    pub fn spiffe_of(&self, name: &str) -> String {
        format!("spiffe://{}/node/{}", self.cluster_id, name)
    }
}

/// Starts the transport and the membership task.
pub fn start(cfg: &AgentConfig, tls: &TlsMaterial) -> anyhow::Result<AgentHandle> {
    if tls.name != cfg.name {
        anyhow::bail!(
            "name: the agent is named {:?} but its certificate ({}) is for {:?}; start with --name {} or issue a certificate for {:?}",
            cfg.name,
            cfg.tls_dir.join("node.pem").display(),
            tls.name,
            tls.name,
            cfg.name
        );
    }
    let (transport, inbound) = Transport::bind(cfg.bind, tls, cfg.faults)?;
    let generation = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(1);
    let identity = NodeIdentity {
        addr: cfg.advertise,
        generation,
        name: cfg.name.clone(),
        meta: NodeMeta { api_addr: Some(cfg.api), version: VERSION.into(), labels: cfg.labels.clone() },
    };
    identity.validate().map_err(|e| anyhow::anyhow!("labels: {e}"))?;
    let mut core = Membership::new(identity.clone(), &cfg.timing, cfg.expected_size, generation);
    core.join(Instant::now(), &cfg.join);
    let (cmd_tx, cmd_rx) = mpsc::channel(256);
    let (shutdown, _) = watch::channel(false);
    tokio::spawn(run(core, transport.clone(), inbound, cmd_rx));
    Ok(AgentHandle {
        identity,
        cluster_id: tls.cluster_id.clone(),
        spiffe_id: tls.identity.clone(),
        commands: cmd_tx,
        transport,
        started: Instant::now(),
        shutdown,
    })
}

/// The membership task: the only owner of the core.
async fn run(
    mut core: Membership,
    transport: Arc<Transport>,
    mut inbound: mpsc::Receiver<Inbound>,
    mut commands: mpsc::Receiver<Command>,
) {
    loop {
        let wake = core.poll_timeout().unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
        tokio::select! {
            msg = inbound.recv() => {
                let Some(msg) = msg else { break };
                on_inbound(&mut core, &transport, msg);
            }
            cmd = commands.recv() => {
                let Some(cmd) = cmd else { break };
                on_command(&mut core, cmd);
            }
            _ = tokio::time::sleep_until(wake.into()) => core.handle_timeout(Instant::now()),
        }
        flush(&mut core, &transport);
    }
}

fn on_inbound(core: &mut Membership, transport: &Transport, msg: Inbound) {
    match core.handle_datagram(Instant::now(), Some(&msg.peer_name), &msg.data) {
        Ok(()) => {}
        Err(PacketError::Malformed(why)) => transport.close_malformed(&msg.conn, &why),
        Err(e @ PacketError::IdentityMismatch { .. }) => transport.close_malformed(&msg.conn, &e.to_string()),
        Err(PacketError::Refused(why)) => {
            tracing::debug!(peer = %msg.peer_name, %why, "gossip refused")
        }
    }
}

fn on_command(core: &mut Membership, cmd: Command) {
    match cmd {
        Command::Members(tx) => {
            let _ = tx.send(core.members());
        }
        Command::Stats(tx) => {
            let _ = tx.send(core.stats());
        }
        Command::Join(addrs) => core.join(Instant::now(), &addrs),
        Command::Leave(tx) => {
            core.leave(Instant::now());
            let _ = tx.send(());
        }
    }
}

fn flush(core: &mut Membership, transport: &Arc<Transport>) {
    while let Some(t) = core.poll_transmit() {
        transport.send(t.to, Bytes::from(t.data));
    }
    while let Some(ev) = core.poll_event() {
        match ev {
            MemberEvent::Up(id) => tracing::info!(member = %id.name, addr = %id.addr, "member up"),
            MemberEvent::Down(id) => {
                tracing::warn!(member = %id.name, addr = %id.addr, "member down")
            }
            MemberEvent::Left(id) => tracing::info!(member = %id.name, addr = %id.addr, "member left"),
            MemberEvent::Renamed { old, new } => {
                tracing::info!(member = %new.name, old_generation = old.generation, new_generation = new.generation, "member restarted")
            }
            MemberEvent::Joined => tracing::info!("joined the cluster"),
            MemberEvent::Isolated => tracing::warn!("no live members left; retrying seeds"),
            MemberEvent::Rejoined(id) => tracing::warn!(generation = id.generation, "we were declared down; rejoined"),
        }
    }
}
