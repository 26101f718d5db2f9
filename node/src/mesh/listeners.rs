//! The edge of this node's callers: a TCP listener per `--upstream` service. HTTP
//! services get the proxy's L7 path whatever `Host` says; TCP ones are carried as byte
//! streams to a picked instance.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use tokio::net::{TcpListener, TcpStream};
use trellis_core::mesh::access_log::Side;
use trellis_core::mesh::callers;
use trellis_core::mesh::circuit::SlotKind;

use crate::access_log::TcpLine;

use super::forward::Forwarder;

impl Forwarder {
    /// Accepts local clients of one upstream service, within `gate`'s connection caps:
    /// HTTP services get the proxy's L7 path (routes, splits, retries, limits, metrics,
    /// the header read deadline) whatever `Host` says; `tcp` ones (and services policy does
    /// not name) are carried as opaque byte streams.
    pub async fn serve_upstream(
        self: Arc<Self>,
        service: String,
        listener: TcpListener,
        limits: crate::limits::Limits,
        gate: Arc<crate::listen::ConnGate>,
    ) {
        let name: Arc<str> = service.as_str().into();
        crate::listen::serve_http(listener, gate, &limits, move |tcp, first, builder| {
            let (fwd, name) = (self.clone(), name.clone());
            async move {
                let l7 = fwd
                    .snapshot()
                    .protocols
                    .get(&*name)
                    .is_some_and(|p| *p != trellis_core::policy::model::Protocol::Tcp);
                if l7 {
                    return super::http::serve_connection(fwd, tcp, Some(name), builder, first).await;
                }
                // No headers to wait for: with some protocols the server speaks first.
                first.seen();
                if let Err(e) = fwd.client(&name, tcp).await {
                    tracing::debug!(service = %name, error = %e, "forwarding failed");
                }
                Ok(())
            }
        })
        .await
    }

    /// The service a local client connection calls for: the one whose instances on this
    /// node run as the connection's owner (`run_as`), looked up only when some instance
    /// here declares a user. None when unknown: the caller is then this node alone.
    pub(crate) fn caller_of(&self, tcp: &TcpStream) -> Option<Arc<str>> {
        let snap = self.snapshot();
        let me = &self.view.node.members.identity.name;
        if !callers::any_declared(&snap, me) {
            return None;
        }
        let (client, server) = (tcp.peer_addr().ok()?, tcp.local_addr().ok()?);
        let uid = crate::socket_owner::uid_of(client, server)
            .inspect_err(|e| tracing::debug!(%client, error = %e, "owner of a client connection not found"))
            .ok()?;
        callers::service_of_uid(&snap, me, uid, crate::socket_owner::uid_of_user).map(Into::into)
    }

    /// Carries one TCP client; it is closed when the instance's node goes away, rather
    /// than when QUIC's idle timeout notices.
    pub(crate) async fn client(&self, service: &str, mut tcp: TcpStream) -> anyhow::Result<()> {
        let source = tcp.peer_addr().map_or_else(|_| "-".into(), |a| a.to_string());
        let mut line = TcpLine::start(self.view.node.access_log.as_ref(), Side::Outbound, source, service);
        let (mut pick, in_flight) = self
            .pick(&self.snapshot(), service, &BTreeMap::new(), None, &mut Vec::new())
            .inspect_err(|_| line.iter_mut().for_each(|l| l.failed("no_instance")))?;
        pick.caller = self.caller_of(&tcp);
        if let Some(l) = &mut line {
            l.instance(&pick.name, pick.addr);
        }
        let Some(slot) = self.slot(service, SlotKind::Connection, pick.circuit_breaker.max_connections) else {
            self.stats.circuit_open.fetch_add(1, Relaxed);
            line.iter_mut().for_each(|l| l.failed("circuit_open"));
            anyhow::bail!(
                "{} connections to {service} already open from this node",
                pick.circuit_breaker.max_connections
            );
        };
        let started = Instant::now();
        let io = self
            .connect(service, &pick)
            .await
            .inspect_err(|_| line.iter_mut().for_each(|l| l.failed("unreachable")))?;
        self.observe(&pick, started.elapsed());
        let _open = self.view.node.stats.tcp_open(service);
        let mut up = self.metered(io, Some(in_flight), Some(slot));
        tokio::select! {
            r = super::io::relay(&mut tcp, &mut up) => {
                let (received, sent) = r.inspect_err(|_| line.iter_mut().for_each(|l| l.failed("upstream")))?;
                line.iter_mut().for_each(|l| l.bytes(received, sent));
            }
            _ = self.node_gone(&pick.node), if pick.peer.is_some() => {
                line.iter_mut().for_each(|l| l.failed("instance_gone"));
                tracing::debug!(%service, node = %pick.node, "connection closed: the instance's node is gone");
            }
        }
        Ok(())
    }
}
