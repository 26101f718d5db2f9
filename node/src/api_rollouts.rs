//! `/v1/rollouts`: each rollout with its status (or `pending` before its owner started it),
//! the agent that drives it, and the operator's commands.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};

use crate::agent::AgentHandle;
use crate::api_error::ApiError;
use crate::api_routes::Routes;
use crate::metrics::Exposition;
use crate::rollouts::{self, Command};
use trellis_core::policy::rollout::{Phase, Rollout, RolloutStatus};

pub fn routes() -> Routes<AgentHandle> {
    Routes::new()
        .get("/v1/rollouts", all)
        .get("/v1/rollouts/{name}", one)
        .post("/v1/rollouts/{name}/{command}", command)
}

/// The current step's figures so far, as the owner judges them (mesh-wide), while it runs.
async fn figures(a: &AgentHandle, name: &str, spec: &Rollout, status: Option<&RolloutStatus>) -> Value {
    let Some(s) = status.filter(|s| s.phase == Phase::Progressing) else { return Value::Null };
    let sources = rollouts::Sources { stats: &a.stats, members: &a.members, transport: &a.transport };
    let f = a.rollout_figures.get(sources, name, spec, s, crate::policy::now_ms()).await;
    let window = |w: &trellis_core::rollout::Window| {
        json!({"requests": w.requests, "errors": w.errors, "success_rate": w.success(),
               "p99_ms": w.p99.map(|d| d.as_secs_f64() * 1000.0)})
    };
    json!({"canary": window(&f.canary), "stable": window(&f.stable)})
}

fn view(name: &str, spec: &Rollout, status: Option<&RolloutStatus>, alive: &[String], figures: Value) -> Value {
    let phase = status.map_or_else(|| json!("pending"), |s| json!(s.phase));
    json!({
        "figures": figures,
        "name": name,
        "phase": phase,
        "owner": trellis_core::rollout::owner(name, alive),
        "split": rollouts::split_name(name),
        "spec": spec,
        "status": status,
    })
}

async fn all(State(a): State<AgentHandle>) -> Json<Vec<Value>> {
    let alive = rollouts::alive(&a.members).await;
    let mut out = Vec::new();
    for (n, r, s) in rollouts::all(&a.writer) {
        let f = figures(&a, &n, &r, s.as_ref()).await;
        out.push(view(&n, &r, s.as_ref(), &alive, f));
    }
    Json(out)
}

fn find(a: &AgentHandle, name: &str) -> Result<(Rollout, Option<RolloutStatus>), ApiError> {
    rollouts::all(&a.writer).into_iter().find(|(n, _, _)| n == name).map(|(_, r, s)| (r, s)).ok_or_else(|| {
        ApiError::not_found(format!("no rollout {name:?}"), "start one with PUT /v1/policy/rollouts/<name>")
    })
}

async fn one(State(a): State<AgentHandle>, Path(name): Path<String>) -> Result<Json<Value>, ApiError> {
    let (spec, status) = find(&a, &name)?;
    let alive = rollouts::alive(&a.members).await;
    let f = figures(&a, &name, &spec, status.as_ref()).await;
    Ok(Json(view(&name, &spec, status.as_ref(), &alive, f)))
}

/// `pause`, `resume`, `promote` or `abort`: a write of the status (and for promote and
/// abort of the split) from this agent, which every agent then follows.
async fn command(
    State(a): State<AgentHandle>,
    Path((name, cmd)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let conflict =
        |error: String, hint: &str| ApiError { status: StatusCode::CONFLICT, error, field: None, hint: hint.into() };
    let Some(cmd) = Command::parse(&cmd) else {
        return Err(ApiError {
            status: StatusCode::BAD_REQUEST,
            error: format!("unknown command {cmd:?}"),
            field: Some("command".into()),
            hint: "use pause, resume, promote or abort".into(),
        });
    };
    let (spec, status) = find(&a, &name)?;
    let Some(status) = status else {
        return Err(conflict(format!("{name} has not started yet"), "its owner starts it within a second; retry"));
    };
    let next = rollouts::command(cmd, &status, crate::policy::now_ms())
        .map_err(|e| conflict(e, "see GET /v1/rollouts/<name>"))?;
    let failed = |e: anyhow::Error| ApiError {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        error: e.to_string(),
        field: None,
        hint: "see the agent log".into(),
    };
    rollouts::keep_split(&a.writer, &name, &spec, next.weight).await.map_err(failed)?;
    rollouts::write_status(&a.writer, &name, &next).await.map_err(failed)?;
    let alive = rollouts::alive(&a.members).await;
    Ok(Json(view(&name, &spec, Some(&next), &alive, Value::Null)))
}

/// `trellis_rollout_canary_weight{rollout}`: the canary's weight as the status says.
pub fn metrics(a: &AgentHandle, e: &mut Exposition) {
    let all = rollouts::all(&a.writer);
    let weights: Vec<(&str, u64)> =
        all.iter().map(|(n, _, s)| (n.as_str(), s.as_ref().map_or(0, |s| u64::from(s.weight)))).collect();
    e.labelled(
        "gauge",
        "trellis_rollout_canary_weight",
        "The canary's share of its service's traffic, in percent.",
        "rollout",
        &weights,
    );
}
