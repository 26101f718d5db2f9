//! Active health checks of the instances on this node. The core (`trellis_core::health::Checker`) turns probe
//! results into a verdict with rise/fall hysteresis, so one lost probe does not flap an
//! instance; the shell runs the probes on each check's interval (spread by a random first
//! delay, so checks of many instances do not fire together) and writes a changed verdict
//! into the instance object, which spreads to every node like any other write.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::policy::WriteError;
use crate::policy_writer::PolicyWriter;
use trellis_core::health::Checker;
use trellis_core::policy::model::{self, Check, CheckTiming, Health, HealthCheckDefaults, Instance, Kind, Object};
use trellis_core::policy::{Key, StoreError, Version};

/// One probe: an HTTP/1.1 GET (status as expected, any 2xx by default) or a TCP connect,
/// within `timeout`.
pub async fn probe(inst: &Instance, check: &Check, timeout: Duration) -> bool {
    let run = async {
        let mut s = TcpStream::connect((inst.address, inst.port)).await?;
        let Some(path) = &check.http else { return anyhow::Ok(true) };
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nUser-Agent: trellis-health\r\n\r\n",
            inst.address
        );
        s.write_all(req.as_bytes()).await?;
        let mut head = [0u8; 16];
        let n = s.read(&mut head).await?;
        let status: u16 = std::str::from_utf8(&head[..n])?.split_whitespace().nth(1).unwrap_or("").parse()?;
        Ok(match check.expect_status {
            Some(want) => status == want,
            None => (200..300).contains(&status),
        })
    };
    matches!(tokio::time::timeout(timeout, run).await, Ok(Ok(true)))
}

struct Tracked {
    checker: Checker,
    next: Instant,
    /// The check it was made for: a re-registration with another check, or new service
    /// defaults, start over.
    check: (Check, CheckTiming),
}

/// Runs the checks of this node's instances until the agent stops.
pub async fn run(writer: PolicyWriter) {
    let mut tracked: HashMap<String, Tracked> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tick.tick().await;
        let now = Instant::now();
        let local = local_checked(&writer);
        tracked.retain(|name, _| local.iter().any(|(n, ..)| n == name));
        // Due probes run together, so a slow one does not hold up the others.
        let mut probes = tokio::task::JoinSet::new();
        for (name, inst, version, timing) in local {
            let check = inst.check.clone().expect("filtered");
            let t = tracked.entry(name.clone()).or_insert_with(|| Tracked {
                checker: Checker::new(timing.rise, timing.fall, inst.health),
                next: now + timing.interval.mul_f64(rand::random::<f64>()),
                check: (check.clone(), timing),
            });
            if t.check != (check.clone(), timing) {
                *t = Tracked {
                    checker: Checker::new(timing.rise, timing.fall, inst.health),
                    next: now,
                    check: (check.clone(), timing),
                };
            }
            if now < t.next {
                continue;
            }
            t.next = now + timing.interval;
            probes.spawn(async move {
                let ok = probe(&inst, &check, timing.timeout).await;
                (name, inst, version, ok)
            });
        }
        while let Some(Ok((name, inst, version, ok))) = probes.join_next().await {
            let Some(t) = tracked.get_mut(&name) else { continue };
            if let Some(verdict) = t.checker.observe(ok, inst.health) {
                tracing::info!(instance = %name, health = ?verdict, "health changed");
                publish(&writer, &name, inst, version, verdict).await;
            }
        }
    }
}

/// This node's instances that carry a check, by object name, with the check's timings
/// (the service's `health_check` fills what the check leaves unset). Runs every tick on
/// the data plane's thread, so only this node's entries (`<id>@<node>`) are parsed, not
/// the whole cluster's catalog. The version read goes with each, so a verdict never
/// overwrites a registration made while its probe ran.
fn local_checked(writer: &PolicyWriter) -> Vec<(String, Instance, Version, CheckTiming)> {
    let me = writer.members.identity.name.as_str();
    let store = writer.policy.store.lock().expect("policy lock");
    let defaults = |service: &str| {
        let key = Key { kind: Kind::Services, name: service.to_string() };
        let body = store.get(&key).and_then(|r| r.val.body.clone());
        match body.map(|b| model::parse(Kind::Services, service, b.as_bytes())) {
            Some(Ok(Object::Service(s))) => s.health_check,
            _ => HealthCheckDefaults::default(),
        }
    };
    store
        .iter()
        .filter(|(k, _)| k.kind == Kind::Instances && model::instance_node(&k.name) == Some(me))
        .filter_map(|(k, r)| {
            let Ok(Object::Instance(i)) = model::parse(k.kind, &k.name, r.val.body.as_ref()?.as_bytes()) else {
                return None;
            };
            let timing = effective(i.check.as_ref()?.timing(&defaults(&i.service)));
            (i.node == me).then(|| (k.name.clone(), i, r.marker, timing))
        })
        .collect()
}

/// A probe never outlives its interval, whatever mix of instance and service values made it.
fn effective(mut t: CheckTiming) -> CheckTiming {
    t.interval = t.interval.max(Duration::from_millis(100));
    t.timeout = t.timeout.min(t.interval).max(Duration::from_millis(1));
    t
}

/// Writes a verdict over the body it was probed for; if the instance changed meanwhile the
/// write is refused and the next tick probes what is there now.
async fn publish(writer: &PolicyWriter, name: &str, mut inst: Instance, version: Version, health: Health) {
    inst.health = health;
    let bytes = serde_json::to_vec(&inst).expect("json");
    let key = Key { kind: Kind::Instances, name: name.to_string() };
    match writer.write(key, Some(bytes), Some(version)).await {
        Err(WriteError::Store(StoreError::CasMismatch { .. })) => {
            tracing::debug!(instance = %name, "instance changed while probed; its health is decided again")
        }
        Err(e) => tracing::warn!(instance = %name, error = %e, "could not record health"),
        Ok(_) => {}
    }
}
