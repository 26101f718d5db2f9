//! The limiter's async shell: a tick timer, the member list, policy changes and peer
//! messages in; messages to peers out. Every decision is the core's.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::mpsc;
use trellis_proto::ratelimit::RateLimitMsg;
use trellis_proto::{envelope, MessageKind};

use crate::membership::Members;
use crate::policy::Policy;
use crate::transport::{Inbound, Transport};
use trellis_core::policy::model::{self, Object};
use trellis_core::policy::PolicyStore;
use trellis_core::ratelimit::limiter::{ExchangeTiming, LimitSpec, LimitView, Limiter, Outgoing, Per, Refusal};

/// Shared between the request path (decisions), the API (views) and the shell task.
pub struct RateLimits {
    limiter: Mutex<Limiter>,
    policy_index: AtomicU64,
    /// Peer messages that failed to decode or came from a non-member.
    pub refused_msgs: AtomicU64,
    pub msgs_in: AtomicU64,
}

impl RateLimits {
    pub fn new(me: &str, timing: ExchangeTiming) -> Arc<RateLimits> {
        Arc::new(RateLimits {
            limiter: Mutex::new(Limiter::new(me, timing)),
            policy_index: AtomicU64::new(u64::MAX),
            refused_msgs: AtomicU64::new(0),
            msgs_in: AtomicU64::new(0),
        })
    }

    /// The local decision for one request. Cost: one lock, one hash lookup per limit.
    pub fn check<'a>(
        &self,
        service: &str,
        route: Option<&str>,
        header: impl Fn(&str) -> Option<&'a str>,
        caller: &str,
    ) -> Result<std::time::Duration, Refusal> {
        let mut l = self.limiter.lock().expect("limiter lock");
        if !l.has_limits() {
            return Ok(std::time::Duration::ZERO);
        }
        let keys = l.keys_for(service, route, header, caller);
        if keys.is_empty() {
            return Ok(std::time::Duration::ZERO);
        }
        l.decide(Instant::now(), &keys)
    }

    pub fn view(&self) -> Vec<LimitView> {
        self.limiter.lock().expect("limiter lock").view(Instant::now())
    }

    /// Per limit, its counts (admitted, refused, delayed); bytes sent; peer report entries
    /// refused.
    pub fn metrics(&self) -> (Vec<(String, trellis_core::ratelimit::limiter::Counts)>, u64, u64) {
        let l = self.limiter.lock().expect("limiter lock");
        let counts = l.counts().iter().map(|(n, c)| (n.clone(), *c)).collect();
        (counts, l.bytes_out(), l.refused_reports() + self.refused_msgs.load(Relaxed))
    }

    /// Sets limits directly, bypassing policy: for benchmarks of the request path.
    #[cfg(feature = "bench")]
    pub fn set_limits_for_bench(&self, specs: Vec<LimitSpec>) {
        self.limiter.lock().expect("limiter lock").set_limits(specs);
    }

    fn reload(&self, store: &PolicyStore) {
        let index = store.index();
        if self.policy_index.swap(index, Relaxed) == index {
            return;
        }
        self.limiter.lock().expect("limiter lock").set_limits(specs(store));
    }
}

/// The `ratelimits` policy objects as limiter specs.
pub fn specs(store: &PolicyStore) -> Vec<LimitSpec> {
    store
        .objects(model::Kind::Ratelimits)
        .filter_map(|(k, o)| {
            let Object::RateLimit(rl) = o else { return None };
            let per = match rl.per.as_deref() {
                None => Per::All,
                Some("caller") => Per::Caller,
                Some(h) => Per::Header(h.trim_start_matches("header:").to_ascii_lowercase()),
            };
            Some(LimitSpec {
                name: k.name.clone(),
                service: rl.service,
                route: rl.route,
                rate: rl.requests_per_second,
                burst: rl.burst.map(f64::from).unwrap_or_else(|| LimitSpec::default_burst(rl.requests_per_second)),
                per,
                max_delay: (rl.mode == model::LimitMode::Delay).then_some(rl.max_delay).flatten(),
            })
        })
        .collect()
}

/// Runs until the agent stops: ticks, and answers peers.
pub async fn run(
    rl: Arc<RateLimits>,
    members: Members,
    policy: Arc<Policy>,
    transport: Arc<Transport>,
    mut inbound: mpsc::Receiver<Inbound>,
    timing: ExchangeTiming,
) {
    let mut tick = tokio::time::interval(timing.tick);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut addrs: HashMap<String, SocketAddr> = HashMap::new();
    loop {
        tokio::select! {
            _ = tick.tick() => {
                rl.reload(&policy.store.lock().expect("policy lock"));
                let list = members.list().await;
                addrs = list.iter().map(|m| (m.id.name.clone(), m.id.addr)).collect();
                let out = {
                    let mut l = rl.limiter.lock().expect("limiter lock");
                    let now = Instant::now();
                    let me = l.me().to_string();
                    l.set_members(now, list.iter().filter(|m| m.id.name != me).map(|m| (m.id.name.as_str(), m.state)));
                    if !l.has_limits() { continue }
                    l.tick(now)
                };
                send(&transport, &addrs, out);
            }
            msg = inbound.recv() => {
                let Some(msg) = msg else { break };
                rl.msgs_in.fetch_add(1, Relaxed);
                let decoded = RateLimitMsg::decode(&msg.data[envelope::HEADER_LEN..]);
                let Ok(m) = decoded else {
                    rl.refused_msgs.fetch_add(1, Relaxed);
                    transport.close_malformed(&msg.conn, &decoded.unwrap_err().to_string());
                    continue;
                };
                let out = rl.limiter.lock().expect("limiter lock").handle(Instant::now(), &msg.peer_name, m);
                send(&transport, &addrs, out);
            }
        }
    }
}

fn send(transport: &Arc<Transport>, addrs: &HashMap<String, SocketAddr>, out: Vec<Outgoing>) {
    for o in out {
        let Some(addr) = addrs.get(&o.to) else { continue };
        let mut buf = Vec::new();
        envelope::encode(MessageKind::RateLimit, &o.msg.encode(), &mut buf);
        transport.send(*addr, Bytes::from(buf));
    }
}
