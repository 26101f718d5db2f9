//! The rollouts' shell: every agent ticks, and for each rollout it owns (see
//! `trellis_core::rollout::owner`) asks the mesh for the step's figures by subset, lets the
//! core decide, and writes the split and the status as ordinary policy. Operators' commands
//! (pause, resume, promote, abort) are writes of the status from any agent.

use std::sync::Arc;
use std::time::Duration;

use trellis_core::policy::model::Object;
use trellis_core::policy::rollout::{Phase, Rollout, RolloutStatus};
use trellis_core::policy::{Key, Kind};
use trellis_core::rollout::{self, Figures, Window};
pub use trellis_core::rollout::{command, Command};
use trellis_core::stats::By;

use crate::membership::Members;
use crate::policy_writer::PolicyWriter;
use crate::stats::Stats;
use crate::transport::Transport;

/// How often an owner looks at its rollouts.
const TICK: Duration = Duration::from_millis(500);

/// What a rollout's owner needs.
pub struct Driver {
    pub writer: PolicyWriter,
    pub stats: Arc<Stats>,
    pub members: Members,
    pub transport: Arc<Transport>,
    /// The catalog the data plane routes by: a rollout starts once its canary serves there.
    pub view: Arc<crate::mesh::view::MeshView>,
    /// The step figures, shared with the API.
    pub memo: Arc<FiguresMemo>,
}

/// The last step figures of each rollout, so the owner's ticks and any number of API
/// readers (the dashboard polls every 1.5 s) cost at most one mesh-wide query per rollout
/// per [`TICK`] on each agent.
#[derive(Default)]
pub struct FiguresMemo(std::sync::Mutex<std::collections::HashMap<String, (u64, std::time::Instant, Figures)>>);

impl FiguresMemo {
    /// The figures of rollout `name`'s current step: the memo's when it holds this step's,
    /// younger than a tick; else asked of the mesh and kept.
    pub async fn get(&self, d: Sources<'_>, name: &str, spec: &Rollout, s: &RolloutStatus, now_ms: u64) -> Figures {
        let fresh =
            |(step, at, _): &(u64, std::time::Instant, Figures)| *step == s.step_started_ms && at.elapsed() < TICK;
        if let Some(hit) = self.0.lock().expect("memo lock").get(name).filter(|e| fresh(e)) {
            return hit.2;
        }
        let f = step_figures(d, spec, s, now_ms).await;
        self.0.lock().expect("memo lock").insert(name.to_string(), (s.step_started_ms, std::time::Instant::now(), f));
        f
    }
}

/// Runs until the agent stops.
pub async fn run(d: Driver) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Why each rollout has not started, as last logged (logged again only when it changes).
    let mut waiting: std::collections::HashMap<String, String> = Default::default();
    loop {
        tick.tick().await;
        let (alive, known) = rollout::members_in_view(&d.members.identity.name, &d.members.list().await);
        for (name, spec, status) in all(&d.writer) {
            if rollout::owner(&name, &alive) != Some(d.members.identity.name.as_str()) {
                continue;
            }
            if status.is_none() {
                let alive_members = d.view.node.members.alive.borrow().clone();
                let blocker = rollout::start_blocker(&spec, (alive.len(), known), &d.view.snapshot(), &alive_members);
                if let Some(why) = blocker {
                    if waiting.get(&name) != Some(&why) {
                        tracing::info!(rollout = %name, reason = %why, "rollout not started");
                        waiting.insert(name, why);
                    }
                    continue;
                }
                waiting.remove(&name);
            }
            if let Err(e) = step(&d, &name, &spec, status.as_ref(), &alive).await {
                tracing::warn!(rollout = %name, error = %e, "rollout step not written");
            }
        }
    }
}

/// One tick of one owned rollout: the split kept at the status's weight, then the next
/// status when the core has one.
async fn step(
    d: &Driver,
    name: &str,
    spec: &Rollout,
    status: Option<&RolloutStatus>,
    alive: &[String],
) -> anyhow::Result<()> {
    let now = crate::policy::now_ms();
    let figures = match status {
        Some(s) if s.phase == Phase::Progressing => d.memo.get(d.into(), name, spec, s, now).await,
        _ => Figures::default(),
    };
    let next = rollout::decide(spec, status, now, &figures, alive);
    // Kept while the rollout runs (a new owner repairs a step whose split was not written);
    // once promoted or aborted, the split is the operator's to keep or delete.
    let running = status.filter(|s| matches!(s.phase, Phase::Progressing | Phase::Paused));
    if let Some(s) = next.as_ref().or(running) {
        keep_split(&d.writer, name, spec, s.weight).await?;
    }
    if let Some(s) = next {
        let last = s.timeline.last().map(|e| e.note.clone()).unwrap_or_default();
        write_status(&d.writer, name, &s).await?;
        tracing::info!(rollout = %name, phase = ?s.phase, weight = s.weight, reason = %s.reason, event = %last, "rollout");
    }
    Ok(())
}

/// Where the mesh-wide figures come from: the agent's stats and its peers.
pub struct Sources<'a> {
    pub stats: &'a Stats,
    pub members: &'a Members,
    pub transport: &'a Arc<Transport>,
}

impl<'a> From<&'a Driver> for Sources<'a> {
    fn from(d: &'a Driver) -> Self {
        Sources { stats: &d.stats, members: &d.members, transport: &d.transport }
    }
}

/// The canary's and the stable subset's requests since the step started, from the
/// service's stats owners. Only digests that began after the start count (a query's window
/// takes every digest that ended within it, and the one that ended first may have begun
/// before the step: with the previous rollout's errors, say), so nothing before one stats
/// interval has passed.
pub async fn step_figures(d: Sources<'_>, spec: &Rollout, s: &RolloutStatus, now_ms: u64) -> Figures {
    let since = Duration::from_millis(now_ms.saturating_sub(s.step_started_ms));
    let window = since.saturating_sub(d.stats.interval);
    if window.is_zero() {
        return Figures::default();
    }
    let rows = d.stats.query((d.members, d.transport), Some(&spec.service), By::Subset, window).await.figures;
    let of = |subset: &str| {
        rows.iter().find(|r| r.name == subset).map_or(Window::default(), |r| Window {
            requests: r.requests,
            errors: r.errors,
            p99: r.p99_ms.map(|ms| Duration::from_secs_f64(ms / 1000.0)),
        })
    };
    Figures { canary: of(&spec.canary), stable: of(&spec.stable) }
}

/// Writes the rollout's split when it is not already at `weight`.
pub async fn keep_split(w: &PolicyWriter, name: &str, spec: &Rollout, weight: u32) -> anyhow::Result<()> {
    let key = Key { kind: Kind::Splits, name: split_name(name) };
    let want = rollout::split(spec, weight);
    let current = w.policy.store.lock().expect("policy lock").objects(Kind::Splits).find_map(|(k, o)| match o {
        Object::Split(s) if k.name == key.name => Some(s),
        _ => None,
    });
    if current.as_ref() != Some(&want) {
        w.write(key, Some(serde_json::to_vec(&want)?), None).await?;
    }
    Ok(())
}

/// The split a rollout writes for its service.
pub fn split_name(rollout: &str) -> String {
    format!("rollout-{rollout}")
}

pub async fn write_status(w: &PolicyWriter, name: &str, s: &RolloutStatus) -> anyhow::Result<()> {
    let key = Key { kind: Kind::Rolloutstatus, name: name.to_string() };
    w.write(key, Some(serde_json::to_vec(s)?), None).await?;
    Ok(())
}

/// Every rollout with its status, if any.
pub fn all(w: &PolicyWriter) -> Vec<(String, Rollout, Option<RolloutStatus>)> {
    let store = w.policy.store.lock().expect("policy lock");
    let statuses: std::collections::BTreeMap<String, RolloutStatus> = store
        .objects(Kind::Rolloutstatus)
        .filter_map(|(k, o)| match o {
            Object::RolloutStatus(s) => Some((k.name.clone(), s)),
            _ => None,
        })
        .collect();
    store
        .objects(Kind::Rollouts)
        .filter_map(|(k, o)| match o {
            Object::Rollout(r) => Some((k.name.clone(), r, statuses.get(&k.name).cloned())),
            _ => None,
        })
        .collect()
}

/// Members alive as this agent sees them (itself included), sorted: the same list the
/// owners' tick picks owners from, so the API names the owner that drives.
pub async fn alive(members: &Members) -> Vec<String> {
    rollout::members_in_view(&members.identity.name, &members.list().await).0
}
