//! Progressive rollouts decided by the agents, with no controller: every agent computes
//! the same owner for a rollout from the members it sees, and the owner steps it with
//! ordinary policy writes (the split's weights and the rollout's status), so when it dies
//! the next owner continues from the replicated status: the step is in the status, never
//! in the owner's memory, so none is skipped or repeated.
//!
//! Partitions: advancing needs all but at most one of the members alive at the start
//! ([`quorum`]). Two disjoint sides of a partition cannot both see that many (for three
//! members or more), so at most one side advances; any side may abort, which only moves
//! towards the safe state. A side that cannot advance writes nothing, so after the heal the
//! status of the side that acted holds everywhere.
//!
//! Gates are judged on the mesh-wide figures of the step's interval, canary against stable.
//! Too few canary requests is reported as "insufficient samples n of N" and is never a
//! failure; a failing gate is acted on as soon as enough samples show it, not at the end
//! of the interval.

use std::time::Duration;

use crate::policy::model::{Backend, Split};
use crate::policy::rollout::{Analysis, Event, Phase, Rollout, RolloutStatus, MAX_EVENTS};

/// One subset's requests over the step so far.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Window {
    pub requests: u64,
    pub errors: u64,
    pub p99: Option<Duration>,
}

impl Window {
    /// Success rate in percent; None without requests.
    pub fn success(&self) -> Option<f64> {
        (self.requests > 0)
            .then(|| 100.0 * (self.requests - self.errors.min(self.requests)) as f64 / self.requests as f64)
    }
}

impl std::fmt::Display for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} req", self.requests)?;
        if let Some(ok) = self.success() {
            write!(f, ", {ok:.1}% ok")?;
        }
        if let Some(p99) = self.p99 {
            write!(f, ", p99 {} ms", p99.as_millis())?;
        }
        Ok(())
    }
}

/// The canary's and the stable subset's figures.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Figures {
    pub canary: Window,
    pub stable: Window,
}

impl std::fmt::Display for Figures {
    /// What a step's verdict was judged on, for its timeline event.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "canary {}; stable {}", self.canary, self.stable)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    Pass,
    Fail(String),
    Insufficient(String),
}

/// The gates on `f`.
pub fn verdict(a: &Analysis, f: &Figures) -> Verdict {
    let c = &f.canary;
    if c.requests < a.min_requests {
        return Verdict::Insufficient(format!("insufficient samples {} of {}", c.requests, a.min_requests));
    }
    let success = c.success().unwrap_or(0.0);
    if success < a.min_success_rate {
        return Verdict::Fail(format!("canary success {success:.1}% below {}%", a.min_success_rate));
    }
    if let (Some(drop), Some(stable)) = (a.max_success_drop, f.stable.success()) {
        if stable - success > drop {
            return Verdict::Fail(format!(
                "canary success {success:.1}% is {:.1} points below stable's {stable:.1}%",
                stable - success
            ));
        }
    }
    if let (Some(max), Some(p99)) = (a.max_p99, c.p99) {
        if p99 > max {
            return Verdict::Fail(format!("canary p99 {} ms above {} ms", p99.as_millis(), max.as_millis()));
        }
    }
    Verdict::Pass
}

/// May the owner advance? All but at most one of the members at the start are alive (all
/// of them below three members).
pub fn quorum(at_start: &[String], alive: &[String]) -> bool {
    let missing = at_start.iter().filter(|m| !alive.contains(m)).count();
    missing == 0 || (at_start.len() >= 3 && missing <= 1)
}

/// The members as rollouts count them, from one membership list: the live ones' names
/// (this agent included), sorted, and how many are known in any state but left.
pub fn members_in_view(me: &str, members: &[crate::membership::MemberView]) -> (Vec<String>, usize) {
    use crate::membership::MemberState;
    let names = |keep: &dyn Fn(MemberState) -> bool| {
        let mut v: Vec<String> =
            members.iter().filter(|m| keep(m.state) || m.id.name == me).map(|m| m.id.name.clone()).collect();
        v.push(me.to_string());
        v.sort();
        v.dedup();
        v
    };
    let alive = names(&|s| s == MemberState::Alive);
    let known = names(&|s| s != MemberState::Left).len();
    (alive, known)
}

/// Why rollout `r` may not start on this side yet, or `None` once it may: most known members
/// must be in view ([`may_start`]) and the canary must serve ([`canary_ready`]).
pub fn start_blocker(
    r: &Rollout,
    in_view: (usize, usize),
    snap: &crate::mesh::catalog::Snapshot,
    alive: &crate::membership::AliveMembers,
) -> Option<String> {
    let (alive_n, known) = in_view;
    if !may_start(alive_n, known) {
        return Some(format!("{alive_n} of {known} members in view; waiting for most"));
    }
    canary_ready(r, snap, alive).err()
}

/// Is the canary serving? A rollout starts only once its canary subset has an instance on a
/// live node that is not failing its health check: its first step would otherwise send its
/// share of the service's requests to nothing (503 `no_instance`).
fn canary_ready(
    r: &Rollout,
    snap: &crate::mesh::catalog::Snapshot,
    alive: &crate::membership::AliveMembers,
) -> Result<(), String> {
    let subset = snap
        .routes
        .subset_named(&r.canary)
        .filter(|s| s.service == r.service)
        .ok_or_else(|| format!("waiting for subset {} of {}", r.canary, r.service))?;
    match snap.instances_of(&r.service, alive, &subset.labels).next() {
        Some(_) => Ok(()),
        None => Err(format!("waiting for a serving instance of {} ({})", r.canary, r.service)),
    }
}

/// May a rollout start on this side? Only with most of the members known (alive, suspect
/// or down, not left) in view. Two sides of a partition that each started it would each hold
/// their own starting members, and each side's [`quorum`] would then let it advance; a
/// majority start means at most one side starts.
fn may_start(alive: usize, known: usize) -> bool {
    alive * 2 > known
}

/// The agent that drives rollout `name`: highest rendezvous score among `alive`.
pub fn owner<'a>(name: &str, alive: &'a [String]) -> Option<&'a str> {
    alive.iter().max_by_key(|m| crate::policy::store::fnv64(&[name.as_bytes(), b"/", m.as_bytes()])).map(String::as_str)
}

/// The split a rollout keeps for its service at `weight` percent to the canary.
pub fn split(r: &Rollout, weight: u32) -> Split {
    let backend = |subset: &str, weight: u32| Backend { service: None, subset: Some(subset.to_string()), weight };
    Split { service: r.service.clone(), backends: vec![backend(&r.stable, 100 - weight), backend(&r.canary, weight)] }
}

/// The next status of rollout `r`, or None when nothing is to be written now. `figures`
/// cover the current step's interval so far; `alive` are the members this agent sees.
pub fn decide(
    r: &Rollout,
    status: Option<&RolloutStatus>,
    now_ms: u64,
    figures: &Figures,
    alive: &[String],
) -> Option<RolloutStatus> {
    let Some(s) = status else {
        let mut s = RolloutStatus {
            phase: Phase::Progressing,
            step: 0,
            weight: r.steps[0],
            step_started_ms: now_ms,
            failures: 0,
            reason: String::new(),
            members: alive.to_vec(),
            timeline: Vec::new(),
        };
        note(&mut s, now_ms, format!("started: {}% to {}", r.steps[0], r.canary));
        return Some(s);
    };
    if s.phase != Phase::Progressing {
        return None;
    }
    let mut next = s.clone();
    let elapsed = Duration::from_millis(now_ms.saturating_sub(s.step_started_ms));
    match verdict(&r.analysis, figures) {
        Verdict::Fail(why) => {
            next.failures += 1;
            if next.failures > r.analysis.failures_allowed {
                abort(&mut next, now_ms, format!("gate failed: {why} ({figures})"));
            } else {
                next.step_started_ms = now_ms;
                next.reason = format!(
                    "gate failed ({} of {} tolerated): {why} ({figures})",
                    next.failures, r.analysis.failures_allowed
                );
                let reason = next.reason.clone();
                note(&mut next, now_ms, reason);
            }
            Some(next)
        }
        _ if elapsed < r.interval => None,
        Verdict::Insufficient(why) => {
            // Waits for traffic; written only when the reason changes, not every tick.
            (s.reason != why).then(|| {
                next.reason = why;
                next
            })
        }
        Verdict::Pass if !quorum(&s.members, alive) => None,
        Verdict::Pass => {
            let step = s.step as usize + 1;
            next.step_started_ms = now_ms;
            next.reason = "gates passed".into();
            match r.steps.get(step) {
                Some(&w) => {
                    next.step = step as u32;
                    next.weight = w;
                    note(&mut next, now_ms, format!("gates passed ({figures}): step {} at {w}%", step + 1));
                }
                None => {
                    next.phase = Phase::Promoted;
                    next.weight = 100;
                    note(&mut next, now_ms, format!("gates passed ({figures}): promoted, 100% to the canary"));
                }
            }
            Some(next)
        }
    }
}

/// Back to 100% stable, for `why`.
pub fn abort(s: &mut RolloutStatus, now_ms: u64, why: String) {
    s.phase = Phase::Aborted;
    s.weight = 0;
    s.reason = why.clone();
    note(s, now_ms, format!("aborted: {why}"));
}

/// Adds an event to the timeline, dropping the oldest past [`MAX_EVENTS`].
pub fn note(s: &mut RolloutStatus, at_ms: u64, note: String) {
    s.timeline.push(Event { at_ms, phase: s.phase, step: s.step, weight: s.weight, note });
    if s.timeline.len() > MAX_EVENTS {
        s.timeline.remove(0);
    }
}

/// An operator's command on a rollout (the shell writes the resulting status).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Pause,
    Resume,
    Promote,
    Abort,
}

impl Command {
    pub fn parse(s: &str) -> Option<Command> {
        match s {
            "pause" => Some(Command::Pause),
            "resume" => Some(Command::Resume),
            "promote" => Some(Command::Promote),
            "abort" => Some(Command::Abort),
            _ => None,
        }
    }
}

/// Applies `cmd` to the status: the next status, or why it does not apply.
pub fn command(cmd: Command, s: &RolloutStatus, now_ms: u64) -> Result<RolloutStatus, String> {
    let mut next = s.clone();
    match (cmd, s.phase) {
        (_, Phase::Promoted | Phase::Aborted) => {
            return Err(format!("the rollout is {:?} already", s.phase).to_lowercase())
        }
        (Command::Pause, Phase::Progressing) => next.phase = Phase::Paused,
        (Command::Resume, Phase::Paused) => {
            next.phase = Phase::Progressing;
            next.step_started_ms = now_ms;
        }
        (Command::Pause | Command::Resume, _) => return Err(format!("the rollout is {:?}", s.phase).to_lowercase()),
        (Command::Promote, _) => {
            next.phase = Phase::Promoted;
            next.weight = 100;
        }
        (Command::Abort, _) => {
            abort(&mut next, now_ms, "aborted by the operator".into());
            return Ok(next);
        }
    }
    next.reason = format!("{cmd:?} by the operator").to_lowercase();
    let reason = next.reason.clone();
    note(&mut next, now_ms, reason);
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rollout() -> Rollout {
        Rollout {
            service: "web".into(),
            stable: "v1".into(),
            canary: "v2".into(),
            steps: vec![10, 50, 100],
            interval: Duration::from_secs(10),
            analysis: Analysis { min_success_rate: 99.0, min_requests: 50, ..Analysis::default() },
        }
    }

    fn members(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("n{i}")).collect()
    }

    fn figures(requests: u64, errors: u64) -> Figures {
        Figures {
            canary: Window { requests, errors, p99: Some(Duration::from_millis(20)) },
            stable: Window { requests: 1000, errors: 1, p99: Some(Duration::from_millis(20)) },
        }
    }

    #[test]
    fn a_healthy_canary_climbs_each_step_at_the_end_of_its_interval_then_is_promoted() {
        let (r, alive) = (rollout(), members(3));
        let mut s = decide(&r, None, 0, &Figures::default(), &alive).unwrap();
        assert_eq!((s.phase, s.weight), (Phase::Progressing, 10));
        let good = figures(200, 0);
        assert_eq!(decide(&r, Some(&s), 9_000, &good, &alive), None, "not before the interval ends");
        for (at, weight) in [(10_000, 50), (20_000, 100)] {
            s = decide(&r, Some(&s), at, &good, &alive).unwrap();
            assert_eq!(s.weight, weight);
        }
        assert_eq!(s.phase, Phase::Progressing, "100% is still a step to watch");
        s = decide(&r, Some(&s), 30_000, &good, &alive).unwrap();
        assert_eq!((s.phase, s.weight), (Phase::Promoted, 100));
        let notes: Vec<&str> = s.timeline.iter().map(|e| e.note.as_str()).collect();
        assert_eq!(notes.len(), 4, "{notes:?}");
        // Each step's event carries the figures it was judged on, for the timeline and dashboard.
        let step =
            "gates passed (canary 200 req, 100.0% ok, p99 20 ms; stable 1000 req, 99.9% ok, p99 20 ms): step 2 at 50%";
        assert_eq!(notes[1], step);
        assert_eq!(decide(&r, Some(&s), 40_000, &good, &alive), None, "promoted is final");
    }

    #[test]
    fn too_few_samples_wait_and_are_never_a_failure() {
        let (r, alive) = (rollout(), members(3));
        let s = decide(&r, None, 0, &Figures::default(), &alive).unwrap();
        let waiting = decide(&r, Some(&s), 60_000, &figures(12, 12), &alive).unwrap();
        assert_eq!((waiting.phase, waiting.weight, waiting.failures), (Phase::Progressing, 10, 0));
        assert_eq!(waiting.reason, "insufficient samples 12 of 50");
        assert_eq!(decide(&r, Some(&waiting), 61_000, &figures(12, 12), &alive), None, "no rewrite of the same reason");
    }

    #[test]
    fn a_broken_canary_is_cut_at_once_and_a_tolerated_failure_restarts_the_step() {
        let (mut r, alive) = (rollout(), members(3));
        let s = decide(&r, None, 0, &Figures::default(), &alive).unwrap();
        let bad = figures(100, 20);
        let cut = decide(&r, Some(&s), 2_000, &bad, &alive).unwrap();
        assert_eq!((cut.phase, cut.weight), (Phase::Aborted, 0), "before the interval ends");
        assert!(cut.reason.contains("canary success 80.0% below 99% (canary 100 req, 80.0% ok"), "{}", cut.reason);
        r.analysis.failures_allowed = 1;
        let once = decide(&r, Some(&s), 2_000, &bad, &alive).unwrap();
        assert_eq!((once.phase, once.failures, once.step_started_ms), (Phase::Progressing, 1, 2_000));
        let twice = decide(&r, Some(&once), 3_000, &bad, &alive).unwrap();
        assert_eq!(twice.phase, Phase::Aborted);
        assert_eq!(split(&r, twice.weight).backends.iter().map(|b| b.weight).collect::<Vec<_>>(), [100, 0]);
    }

    #[test]
    fn stable_comparison_and_latency_gates() {
        let mut a = rollout().analysis;
        a.max_success_drop = Some(0.5);
        a.max_p99 = Some(Duration::from_millis(100));
        let mut f = figures(1000, 9);
        f.stable.errors = 0;
        assert!(matches!(verdict(&a, &f), Verdict::Fail(w) if w.contains("points below stable")));
        let mut f = figures(1000, 0);
        f.canary.p99 = Some(Duration::from_millis(250));
        assert!(matches!(verdict(&a, &f), Verdict::Fail(w) if w.contains("p99 250 ms")));
        assert_eq!(verdict(&a, &figures(1000, 2)), Verdict::Pass);
    }

    #[test]
    fn a_rollout_waits_for_a_serving_canary_instance() {
        use crate::mesh::catalog::{InstanceView, Snapshot};
        use crate::policy::model::{Health, Instance, Protocol, Subset};
        let r = rollout();
        let canary = |health: Health| InstanceView {
            name: "web-2@n1".into(),
            instance: Instance {
                service: "web".into(),
                node: "n1".into(),
                address: "10.0.0.2".parse().unwrap(),
                port: 8080,
                protocol: Protocol::Http,
                labels: [("version".to_string(), "v2".to_string())].into(),
                weight: 1,
                check: None,
                health,
                run_as: None,
            },
        };
        let alive: crate::membership::AliveMembers =
            [("n1".to_string(), ("10.0.0.1:7946".parse().unwrap(), Default::default()))].into();
        let mut snap = Snapshot::default();
        assert_eq!(canary_ready(&r, &snap, &alive).unwrap_err(), "waiting for subset v2 of web");
        let labels = [("version".to_string(), "v2".to_string())].into();
        snap.routes.insert_subset("v2", Subset { service: "web".into(), labels });
        assert_eq!(canary_ready(&r, &snap, &alive).unwrap_err(), "waiting for a serving instance of v2 (web)");
        snap.instances.push(canary(Health::Critical));
        assert!(canary_ready(&r, &snap, &alive).is_err(), "a failing instance does not serve");
        snap.instances.push(canary(Health::Unknown));
        assert_eq!(canary_ready(&r, &snap, &alive), Ok(()));
        assert!(canary_ready(&r, &snap, &Default::default()).is_err(), "nor one on a node that is down");
    }

    #[test]
    fn only_a_side_that_sees_most_known_members_may_start_a_rollout() {
        // Five known: the side of three may start, the side of two may not; an even split of
        // four starts on neither side.
        assert!(may_start(3, 5) && !may_start(2, 5));
        assert!(!may_start(2, 4) && may_start(3, 4));
        assert!(may_start(1, 1), "a lone agent starts its own rollouts");
    }

    #[test]
    fn one_membership_list_gives_the_live_names_and_the_known_count() {
        use crate::membership::{MemberState, MemberView};
        let m = |name: &str, state| MemberView {
            id: trellis_proto::NodeIdentity {
                name: name.into(),
                addr: "127.0.0.1:7946".parse().unwrap(),
                generation: 1,
                meta: Default::default(),
            },
            state,
            incarnation: 0,
        };
        let list = [
            m("b", MemberState::Alive),
            m("c", MemberState::Suspect),
            m("d", MemberState::Down),
            m("e", MemberState::Left),
        ];
        let (alive, known) = members_in_view("a", &list);
        assert_eq!(alive, ["a", "b"], "itself and the alive one, sorted");
        assert_eq!(known, 4, "a, b, c and d: every state but left");
        // Two of four in view: no start, with the reason; the canary is not even looked at.
        let r = rollout();
        let why = start_blocker(&r, (alive.len(), known), &Default::default(), &Default::default());
        assert_eq!(why.as_deref(), Some("2 of 4 members in view; waiting for most"));
        let why = start_blocker(&r, (3, 4), &Default::default(), &Default::default());
        assert_eq!(why.as_deref(), Some("waiting for subset v2 of web"), "then the canary");
    }

    #[test]
    fn no_side_of_a_two_three_partition_can_advance_but_either_may_abort() {
        let (r, all) = (rollout(), members(5));
        let s = decide(&r, None, 0, &Figures::default(), &all).unwrap();
        let (two, three) = (all[..2].to_vec(), all[2..].to_vec());
        for side in [&two, &three] {
            assert_eq!(decide(&r, Some(&s), 10_000, &figures(500, 0), side), None, "{side:?} must not advance");
            assert_eq!(decide(&r, Some(&s), 10_000, &figures(500, 100), side).unwrap().phase, Phase::Aborted);
        }
        // One member crashed (the owner, say): the other four go on.
        assert_eq!(decide(&r, Some(&s), 10_000, &figures(500, 0), &all[1..]).unwrap().weight, 50);
        assert!(quorum(&members(2), &members(2)) && !quorum(&members(2), &members(1)));
    }

    #[test]
    fn operator_commands_move_only_a_running_rollout() {
        let (r, alive) = (rollout(), members(3));
        let s = decide(&r, None, 0, &Figures::default(), &alive).unwrap();
        let paused = command(Command::Pause, &s, 5).unwrap();
        assert_eq!(paused.phase, Phase::Paused);
        assert_eq!(decide(&r, Some(&paused), 60_000, &figures(500, 0), &alive), None, "a paused rollout stays");
        let resumed = command(Command::Resume, &paused, 70).unwrap();
        assert_eq!((resumed.phase, resumed.step_started_ms), (Phase::Progressing, 70), "its interval starts again");
        assert!(command(Command::Resume, &resumed, 80).is_err(), "not paused");
        let promoted = command(Command::Promote, &resumed, 90).unwrap();
        assert_eq!((promoted.phase, promoted.weight), (Phase::Promoted, 100));
        assert!(command(Command::Abort, &promoted, 95).unwrap_err().contains("promoted"));
        let aborted = command(Command::Abort, &paused, 99).unwrap();
        assert_eq!((aborted.phase, aborted.weight), (Phase::Aborted, 0));
        assert_eq!(Command::parse("abort"), Some(Command::Abort));
        assert_eq!(Command::parse("rollback"), None);
    }

    #[test]
    fn every_agent_computes_the_same_owner_and_a_dead_owner_is_replaced() {
        let all = members(7);
        let owner = owner("web-v2", &all).unwrap().to_string();
        let mut shuffled = all.clone();
        shuffled.reverse();
        assert_eq!(super::owner("web-v2", &shuffled), Some(owner.as_str()));
        let rest: Vec<String> = all.iter().filter(|m| **m != owner).cloned().collect();
        let next = super::owner("web-v2", &rest).unwrap();
        assert_ne!(next, owner);
        let owners: std::collections::BTreeSet<&str> =
            (0..50).filter_map(|i| super::owner(&format!("r{i}"), &all)).collect();
        assert!(owners.len() >= 5, "rollouts spread over the agents: {owners:?}");
    }
}
