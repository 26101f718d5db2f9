//! The policy objects of a progressive rollout: `rollouts/<name>`, what the operator asks
//! for, and `rolloutstatus/<name>`, where the agent driving it records each step. Two
//! objects so that neither writer overwrites the other's fields (each is a last-writer-wins
//! register). The decisions are `crate::rollout`.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Most weight steps a rollout may take.
pub const MAX_STEPS: usize = 20;
/// Events kept in a status's timeline (the oldest go first).
pub const MAX_EVENTS: usize = 40;
/// Longest reason or note.
pub const MAX_TEXT: usize = 256;

/// A canary of `service`: its `canary` subset takes `steps` of the traffic, one per
/// `interval`, while the `analysis` gates hold against the `stable` subset.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rollout {
    pub service: String,
    /// `subsets/<name>` of the service now serving.
    pub stable: String,
    /// `subsets/<name>` of the service being rolled out.
    pub canary: String,
    /// The canary's weight at each step, in percent, rising; after the last, promotion (100).
    pub steps: Vec<u32>,
    /// How long each step runs before its gates are judged.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    #[serde(default)]
    pub analysis: Analysis,
}

/// The gates a step must pass, on the mesh-wide figures of the step's interval.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Analysis {
    /// The canary's success rate, in percent, at least this.
    pub min_success_rate: f64,
    /// ... and at most this many points below the stable subset's, when set.
    pub max_success_drop: Option<f64>,
    /// The canary's p99 latency at most this, when set.
    #[serde(with = "humantime_serde")]
    pub max_p99: Option<Duration>,
    /// Requests the canary must have served before any verdict; fewer is "insufficient
    /// samples", never a failure.
    pub min_requests: u64,
    /// Failed gates tolerated before the rollout aborts (each failure restarts the step).
    pub failures_allowed: u32,
}

impl Default for Analysis {
    fn default() -> Self {
        Analysis {
            min_success_rate: 99.0,
            max_success_drop: None,
            max_p99: None,
            min_requests: 20,
            failures_allowed: 0,
        }
    }
}

/// Where a rollout is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Progressing,
    Paused,
    Promoted,
    Aborted,
}

/// What the driving agent (or an operator's command) last recorded.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutStatus {
    pub phase: Phase,
    /// Index into the rollout's steps.
    pub step: u32,
    /// The canary's weight now, in percent.
    pub weight: u32,
    /// When the current step's interval began (ms since the Unix epoch).
    pub step_started_ms: u64,
    /// Failed gates so far.
    pub failures: u32,
    /// Why it is where it is (the last verdict, or the operator's command).
    #[serde(default)]
    pub reason: String,
    /// The members alive when it started: advancing needs all but at most one of them
    /// (`crate::rollout::quorum`), so two sides of a partition cannot both promote.
    pub members: Vec<String>,
    /// Every step, verdict and command, oldest first (at most [`MAX_EVENTS`]).
    #[serde(default)]
    pub timeline: Vec<Event>,
}

/// One entry of a rollout's timeline.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Event {
    pub at_ms: u64,
    pub phase: Phase,
    pub step: u32,
    pub weight: u32,
    pub note: String,
}
