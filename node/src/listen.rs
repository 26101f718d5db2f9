//! Accepting client TCP connections (the HTTP proxy, the per-upstream listeners and the
//! API) within bounds: a cap on
//! open connections in all and per source address, a deadline for request headers, and an
//! accept loop that backs off when the process runs out of file descriptors instead of
//! spinning. The admission decision ([`ConnGate`]) is plain logic with unit tests.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::net::{TcpListener, TcpStream};

use crate::limits::Limits;

/// Why a client connection was refused or cut, as a metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientRefusal {
    /// The listener already holds its maximum of open connections.
    Total,
    /// This source address already holds its maximum.
    PerSource,
    /// The request headers did not arrive within the header read timeout.
    HeaderTimeout,
}

impl ClientRefusal {
    pub const ALL: [ClientRefusal; 3] = [ClientRefusal::Total, ClientRefusal::PerSource, ClientRefusal::HeaderTimeout];

    pub fn as_str(self) -> &'static str {
        match self {
            ClientRefusal::Total => "connection_limit",
            ClientRefusal::PerSource => "per_source_limit",
            ClientRefusal::HeaderTimeout => "header_timeout",
        }
    }
}

/// Counters of one listener, exported as metrics.
#[derive(Debug, Default)]
pub struct GateStats {
    pub accepted: AtomicU64,
    pub refused: [AtomicU64; 3],
    pub accept_errors: AtomicU64,
}

impl GateStats {
    pub fn count(&self, r: ClientRefusal) {
        self.refused[r as usize].fetch_add(1, Relaxed);
    }

    pub fn refused(&self, r: ClientRefusal) -> u64 {
        self.refused[r as usize].load(Relaxed)
    }
}

#[derive(Debug, Default)]
struct Open {
    total: usize,
    by_source: HashMap<IpAddr, usize>,
}

/// Admits connections up to a total and a per-source cap; a [`Ticket`] gives the slot back
/// when the connection ends.
#[derive(Debug)]
pub struct ConnGate {
    max_total: usize,
    max_per_source: usize,
    open: Mutex<Open>,
    pub stats: GateStats,
}

/// One admitted connection; dropping it frees the slot.
#[derive(Debug)]
pub struct Ticket {
    gate: Arc<ConnGate>,
    source: IpAddr,
}

impl ConnGate {
    pub fn new(max_total: usize, max_per_source: usize) -> Arc<ConnGate> {
        Arc::new(ConnGate { max_total, max_per_source, open: Mutex::default(), stats: GateStats::default() })
    }

    /// The gate for one client listener under `limits`.
    pub fn for_clients(limits: &Limits) -> Arc<ConnGate> {
        ConnGate::new(limits.max_client_connections, limits.max_client_connections_per_ip)
    }

    /// Takes a slot for `source`, or says which cap is full (and counts it).
    pub fn admit(self: &Arc<Self>, source: IpAddr) -> Result<Ticket, ClientRefusal> {
        let mut open = self.open.lock().expect("gate lock");
        let refusal = if open.total >= self.max_total {
            Some(ClientRefusal::Total)
        } else if open.by_source.get(&source).copied().unwrap_or(0) >= self.max_per_source {
            Some(ClientRefusal::PerSource)
        } else {
            None
        };
        if let Some(r) = refusal {
            self.stats.count(r);
            return Err(r);
        }
        open.total += 1;
        *open.by_source.entry(source).or_default() += 1;
        self.stats.accepted.fetch_add(1, Relaxed);
        Ok(Ticket { gate: self.clone(), source })
    }

    /// Connections open right now.
    pub fn open(&self) -> usize {
        self.open.lock().expect("gate lock").total
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut open = self.gate.open.lock().expect("gate lock");
        open.total = open.total.saturating_sub(1);
        if let Some(n) = open.by_source.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                open.by_source.remove(&self.source);
            }
        }
    }
}

/// The gates of the agent's client listeners, each under the same `[limits]`.
#[derive(Debug)]
pub struct ClientGates {
    pub proxy: Arc<ConnGate>,
    pub api: Arc<ConnGate>,
    /// One per `--upstream` listener, by service.
    pub upstreams: BTreeMap<String, Arc<ConnGate>>,
    /// Shared by every virtual service address's listeners.
    pub virtual_addrs: Arc<ConnGate>,
}

impl ClientGates {
    pub fn new<'a>(limits: &Limits, upstreams: impl IntoIterator<Item = &'a str>) -> Arc<ClientGates> {
        let upstreams = upstreams.into_iter().map(|s| (s.to_string(), ConnGate::for_clients(limits))).collect();
        Arc::new(ClientGates {
            proxy: ConnGate::for_clients(limits),
            api: ConnGate::for_clients(limits),
            upstreams,
            virtual_addrs: ConnGate::for_clients(limits),
        })
    }

    /// Every gate with its metrics label: `proxy`, `api`, `virtual`, `upstream:<service>`.
    pub fn labelled(&self) -> Vec<(String, &Arc<ConnGate>)> {
        let fixed = [
            ("proxy".to_string(), &self.proxy),
            ("api".to_string(), &self.api),
            ("virtual".to_string(), &self.virtual_addrs),
        ];
        fixed.into_iter().chain(self.upstreams.iter().map(|(s, g)| (format!("upstream:{s}"), g))).collect()
    }
}

/// The server side of client connections, with the header read deadline set (hyper only
/// enforces it when it has a timer): `auto` tells HTTP/1 from HTTP/2 itself; `h1` serves the
/// HTTP/1 connections the proxy parks between requests (`parked`).
pub struct HttpBuilder {
    pub auto: hyper_util::server::conn::auto::Builder<TokioExecutor>,
    pub h1: hyper::server::conn::http1::Builder,
    /// How long a parked HTTP/1 connection may wait for its next request: hyper's header
    /// read deadline, which it also applies to an idle keep-alive connection.
    pub idle: Duration,
}

/// Accepts HTTP clients of `listener` within `gate`'s caps and the header deadline of
/// `limits`; `serve` gets each connection with the one builder all of them share.
pub async fn serve_http<F, Fut>(listener: TcpListener, gate: Arc<ConnGate>, limits: &Limits, serve: F)
where
    F: Fn(TcpStream, FirstRequest, Arc<HttpBuilder>) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<(), Box<dyn std::error::Error + Send + Sync>>> + Send + 'static,
{
    let builder = Arc::new(http_builder(limits));
    accept_loop(listener, gate, limits.header_read_timeout, move |tcp, first| serve(tcp, first, builder.clone())).await
}

pub fn http_builder(limits: &Limits) -> HttpBuilder {
    let mut auto = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    auto.http1().timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
    auto.http2().timer(TokioTimer::new());
    let mut h1 = hyper::server::conn::http1::Builder::new();
    h1.timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
    HttpBuilder { auto, h1, idle: limits.header_read_timeout }
}

/// Told by the service when a connection's first request has arrived. Until then the
/// connection is on the header read deadline: hyper's own timer only starts once it knows
/// the HTTP version, and the version sniffing waits for bytes for ever.
#[derive(Clone, Debug, Default)]
pub struct FirstRequest(Arc<tokio::sync::Notify>);

impl FirstRequest {
    pub fn seen(&self) {
        self.0.notify_one();
    }
}

/// Accepts connections through `gate` and runs `serve` on each admitted one in its own task.
/// A refused connection is closed at once; one whose first request does not arrive within
/// `header_timeout` is closed and counted, as is hyper's header timeout on later requests.
pub async fn accept_loop<F, Fut>(listener: TcpListener, gate: Arc<ConnGate>, header_timeout: Duration, serve: F)
where
    F: Fn(TcpStream, FirstRequest) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<(), Box<dyn std::error::Error + Send + Sync>>> + Send + 'static,
{
    loop {
        let (tcp, from) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and friends: retrying at once would spin; the flood passes or the
                // held connections close meanwhile.
                gate.stats.accept_errors.fetch_add(1, Relaxed);
                tracing::debug!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(ticket) = gate.admit(from.ip()) else {
            drop(tcp);
            continue;
        };
        let (first, serve) = (FirstRequest::default(), serve.clone());
        tokio::spawn(async move {
            // Made here, in place: a future made outside and pinned inside would be held
            // twice for the connection's life (2.2 KB instead of 1.1 for a proxy client).
            let mut fut = std::pin::pin!(serve(tcp, first.clone()));
            let res = tokio::select! {
                r = &mut fut => r,
                seen = tokio::time::timeout(header_timeout, first.0.notified()) => match seen {
                    Ok(()) => fut.await,
                    Err(_) => {
                        ticket.gate.stats.count(ClientRefusal::HeaderTimeout);
                        return;
                    }
                },
            };
            if let Err(e) = res {
                if is_header_timeout(e.as_ref()) {
                    ticket.gate.stats.count(ClientRefusal::HeaderTimeout);
                }
            }
            drop(ticket);
        });
    }
}

fn is_header_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err.downcast_ref::<hyper::Error>().is_some_and(|h| h.is_timeout()) {
            return true;
        }
        cur = err.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gate_caps_total_and_per_source_and_frees_slots_on_drop() {
        let gate = ConnGate::new(3, 2);
        let (a, b): (IpAddr, IpAddr) = ("127.0.0.1".parse().unwrap(), "127.0.0.2".parse().unwrap());
        let t1 = gate.admit(a).unwrap();
        let _t2 = gate.admit(a).unwrap();
        assert_eq!(gate.admit(a).unwrap_err(), ClientRefusal::PerSource);
        let _t3 = gate.admit(b).unwrap();
        assert_eq!(gate.admit(b).unwrap_err(), ClientRefusal::Total);
        assert_eq!(gate.open(), 3);
        drop(t1);
        assert_eq!(gate.open(), 2);
        let _t4 = gate.admit(a).unwrap();
        assert_eq!(gate.stats.refused(ClientRefusal::PerSource), 1);
        assert_eq!(gate.stats.refused(ClientRefusal::Total), 1);
        assert_eq!(gate.stats.accepted.load(Relaxed), 4);
    }
}
