//! The local HTTP API. Handlers parse, ask the agent, and map errors to JSON bodies that
//! name the field and the fix. Nothing here needs a socket to be tested but the server.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde::Deserialize;

use crate::agent::{AgentHandle, VERSION};
pub use crate::api_error::{parse_body, ApiError};
use crate::api_routes::Routes;
use crate::api_types::{MemberJson, PeerJson};
use crate::metrics::Exposition;
use crate::pki::RefusalReason;
use trellis_core::membership::{MemberState, MemberView};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JoinRequest {
    addrs: Vec<SocketAddr>,
}

/// Serves the API on `listener` within the client connection caps and the header read
/// deadline, until `stop` resolves (open connections finish on their own tasks).
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    limits: &crate::limits::Limits,
    gate: std::sync::Arc<crate::listen::ConnGate>,
    stop: impl std::future::Future<Output = ()>,
) {
    let accept = crate::listen::serve_http(listener, gate, limits, move |tcp, first, builder| {
        let tower = hyper_util::service::TowerToHyperService::new(router.clone());
        let svc = hyper::service::service_fn(move |req| {
            first.seen();
            hyper::service::Service::call(&tower, req)
        });
        async move { builder.auto.serve_connection(hyper_util::rt::TokioIo::new(tcp), svc).await }
    });
    tokio::select! {
        _ = accept => {}
        _ = stop => {}
    }
}

/// Every route but the test-only `/v1/fault`; the OpenAPI test reads its table.
pub fn routes() -> Routes<AgentHandle> {
    Routes::new()
        .get("/v1/health", health)
        .get("/v1/agent/self", agent_self)
        .get("/v1/members", members)
        .get("/v1/agent/peers", peers)
        .post("/v1/agent/join", join)
        .post("/v1/agent/leave", leave)
        .get("/v1/agent/traffic", traffic)
        .get("/metrics", metrics)
        .merge(crate::api_policy::routes())
        .merge(crate::api_catalog::routes())
        .merge(crate::api_ratelimit::routes())
        .merge(crate::api_rollouts::routes())
        .merge(crate::api_stats::routes())
        .merge(crate::api_openapi::routes())
        .merge(crate::dashboard::routes())
}

pub fn router(agent: AgentHandle) -> Router {
    routes().into_router().fallback(not_found).with_state(agent)
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such endpoint".into(), "see README.md, section HTTP API, for the endpoints")
}

async fn health(State(a): State<AgentHandle>) -> Json<serde_json::Value> {
    let members = a.members.list().await;
    let alive = members.iter().filter(|m| m.state == MemberState::Alive).count();
    Json(serde_json::json!({"status": "ok", "name": a.members.identity.name, "alive_members": alive}))
}

async fn agent_self(State(a): State<AgentHandle>) -> Json<serde_json::Value> {
    let id = &a.members.identity;
    Json(serde_json::json!({
        "name": id.name,
        "id": a.spiffe_id,
        "peer_addr": id.addr,
        "api_addr": id.meta.api_addr,
        "cluster_id": a.members.cluster_id,
        "version": VERSION,
        "labels": id.meta.labels,
        "generation": id.generation,
        "uptime_seconds": a.started.elapsed().as_secs(),
        // Wall clock, so `trellis check` can measure skew between members.
        "unix_ms": crate::policy::now_ms(),
        // Where its files are, so `trellis check` checks those rather than guessing.
        "tls_dir": a.files.tls_dir,
        "data_dir": a.files.data_dir,
        "config": a.files.config,
        "dns_addr": a.dns.0,
    }))
}

/// `GET /v1/agent/peers`: every other member with the time since we last heard from it.
async fn peers(State(a): State<AgentHandle>) -> Json<Vec<PeerJson>> {
    let list = a.members.peers().await;
    Json(
        list.into_iter()
            .map(|(m, heard)| PeerJson {
                name: m.id.name.clone(),
                peer_addr: m.id.addr,
                api_addr: m.id.meta.api_addr,
                state: m.state.as_str().to_string(),
                version: m.id.meta.version.clone(),
                last_heard_ms: heard.map(|d| d.as_millis() as u64),
            })
            .collect(),
    )
}

pub fn member_json(a: &AgentHandle, m: &MemberView) -> MemberJson {
    MemberJson {
        name: m.id.name.clone(),
        id: a.members.spiffe_of(&m.id.name),
        peer_addr: m.id.addr,
        api_addr: m.id.meta.api_addr,
        state: m.state,
        incarnation: m.id.generation,
        swim_incarnation: m.incarnation,
        labels: m.id.meta.labels.clone(),
        version: m.id.meta.version.clone(),
    }
}

async fn members(State(a): State<AgentHandle>) -> Json<Vec<MemberJson>> {
    let mut v: Vec<MemberJson> = a.members.list().await.iter().map(|m| member_json(&a, m)).collect();
    v.sort_by(|x, y| x.name.cmp(&y.name).then(y.incarnation.cmp(&x.incarnation)));
    Json(v)
}

async fn join(State(a): State<AgentHandle>, body: Bytes) -> Result<Json<serde_json::Value>, ApiError> {
    let req: JoinRequest = parse_body(&body)?;
    if req.addrs.is_empty() {
        return Err(ApiError {
            status: StatusCode::BAD_REQUEST,
            error: "addrs is empty".into(),
            field: Some("addrs".into()),
            hint: "give at least one peer address, e.g. {\"addrs\": [\"10.0.0.5:7946\"]}".into(),
        });
    }
    let n = req.addrs.len();
    a.members.join(req.addrs).await;
    Ok(Json(serde_json::json!({"joining": n})))
}

async fn leave(State(a): State<AgentHandle>) -> Json<serde_json::Value> {
    tokio::spawn(async move { a.leave().await });
    Json(serde_json::json!({"leaving": true}))
}

async fn metrics(State(a): State<AgentHandle>) -> Response {
    let members = a.members.list().await;
    let stats = a.members.stats().await;
    let t = &a.transport.stats;
    let mut e = Exposition::default();
    // `list()` puts this node first.
    let count = |skip: usize, s: MemberState| members.iter().skip(skip).filter(|m| m.state == s).count() as u64;
    let states = [MemberState::Alive, MemberState::Suspect, MemberState::Down, MemberState::Left];
    let by_state = |skip| states.iter().map(|s| (s.as_str(), count(skip, *s))).collect::<Vec<(&str, u64)>>();
    let help =
        "Cluster members by state in this node's view, this node included (as /v1/health and `trellis members`).";
    e.labelled("gauge", "trellis_members", help, "state", &by_state(0));
    let help = "Other members (peers) by state in this node's view, this node excluded.";
    e.labelled("gauge", "trellis_peers", help, "state", &by_state(1));
    e.counter("trellis_gossip_messages_out_total", "Gossip messages sent.", stats.msgs_out);
    e.counter("trellis_gossip_bytes_out_total", "Gossip bytes sent (envelope included).", stats.bytes_out);
    e.counter("trellis_gossip_messages_in_total", "Gossip messages received.", stats.msgs_in);
    e.counter("trellis_gossip_bytes_in_total", "Gossip bytes received.", stats.bytes_in);
    e.counter("trellis_probes_total", "Direct probes sent.", stats.probes_sent);
    e.counter("trellis_probes_failed_total", "Probes with no ack, direct or indirect.", stats.probes_failed);
    e.counter("trellis_suspicions_raised_total", "Members that became suspect in this view.", stats.suspicions_raised);
    e.counter("trellis_suspicions_refuted_total", "Suspicions refuted before the deadline.", stats.suspicions_refuted);
    e.counter(
        "trellis_gossip_downs_downgraded_total",
        "Down reports about another member (relayed or forged) taken as suspicions.",
        stats.downs_downgraded,
    );
    e.counter("trellis_gossip_malformed_total", "Gossip messages refused as malformed.", stats.malformed_in);
    e.counter(
        "trellis_gossip_identity_mismatch_total",
        "Gossip whose claimed sender differs from its certificate.",
        stats.identity_mismatches,
    );
    e.gauge("trellis_quic_connections", "Open peer connections.", a.transport.connections() as f64);
    let tasks = tokio::runtime::Handle::current().metrics().num_alive_tasks();
    e.gauge(
        "trellis_runtime_tasks",
        "Tasks alive on the agent's async runtime (a leak shows as growth).",
        tasks as f64,
    );
    quic_metrics(&mut e, &a.transport.quic_totals());
    let mtus = a.transport.path_mtus();
    let rows: Vec<(&str, u64)> = mtus.iter().map(|(peer, mtu)| (peer.as_str(), u64::from(*mtu))).collect();
    e.labelled(
        "gauge",
        "trellis_quic_path_mtu_bytes",
        "Path MTU QUIC found to each connected peer (UDP payload).",
        "peer",
        &rows,
    );
    e.counter("trellis_quic_dials_total", "Outgoing peer connection attempts.", t.dials.load(Relaxed));
    e.counter(
        "trellis_quic_dial_failures_total",
        "Outgoing peer connections that failed.",
        t.dial_failures.load(Relaxed),
    );
    e.counter("trellis_quic_accepted_total", "Incoming peer connections accepted.", t.accepted.load(Relaxed));
    e.counter(
        "trellis_quic_incoming_failed_total",
        "Incoming peer handshakes that failed.",
        t.incoming_failed.load(Relaxed),
    );
    e.counter(
        "trellis_quic_closed_malformed_total",
        "Connections closed for malformed input.",
        t.closed_malformed.load(Relaxed),
    );
    e.counter(
        "trellis_quic_datagrams_out_total",
        "Peer messages (gossip, policy, rate limits, stats digests) sent as QUIC DATAGRAM frames; UDP packets are trellis_quic_udp_datagrams_total.",
        t.datagrams_out.load(Relaxed),
    );
    e.counter(
        "trellis_quic_datagrams_in_total",
        "Peer messages received as QUIC DATAGRAM frames.",
        t.datagrams_in.load(Relaxed),
    );
    e.counter(
        "trellis_quic_bytes_out_total",
        "Bytes of peer messages sent (datagrams and one-way streams); service traffic is trellis_forward_bytes_total.",
        t.bytes_out.load(Relaxed),
    );
    e.counter("trellis_quic_bytes_in_total", "Bytes of peer messages received.", t.bytes_in.load(Relaxed));
    e.counter(
        "trellis_quic_dropped_out_total",
        "Peer messages dropped before sending (connection closing or send buffer full).",
        t.dropped_out.load(Relaxed),
    );
    let refused = t.refused.lock().expect("stats lock").clone();
    let reasons = RefusalReason::ALL;
    let by_reason: Vec<(&str, u64)> =
        reasons.iter().map(|r| (r.as_str(), refused.get(r).copied().unwrap_or(0))).collect();
    e.labelled(
        "counter",
        "trellis_handshakes_refused_total",
        "Peer certificates refused, by reason.",
        "reason",
        &by_reason,
    );
    let (objects, p) = {
        let store = a.policy.store.lock().expect("policy lock");
        (store.iter().filter(|(_, r)| r.val.body.is_some()).count(), store.stats)
    };
    e.gauge("trellis_policy_objects", "Live policy objects held.", objects as f64);
    e.counter("trellis_policy_local_writes_total", "Policy writes accepted on this node.", p.local_writes);
    e.counter("trellis_policy_merged_total", "Policy versions from peers that changed state.", p.merged_new);
    e.counter("trellis_policy_conflicts_total", "Concurrent policy writes that lost (kept as conflicts).", p.conflicts);
    e.counter("trellis_policy_refused_total", "Policy entries from peers refused as invalid.", p.refused);
    crate::metrics::refusals(&mut e, t, &stats, p.refused, &a.clients);
    e.counter(
        "trellis_policy_tombstones_collected_total",
        "Deletes forgotten after every peer had them.",
        p.tombstones_collected,
    );
    let f = &a.forward;
    e.counter(
        "trellis_forward_outbound_total",
        "Client connections forwarded to an instance.",
        f.outbound.load(Relaxed),
    );
    if let Some(log) = &a.access_log {
        let written = log.written.load(Relaxed);
        e.counter("trellis_access_log_lines_total", "Access log lines written.", written);
        let help = "Access log lines dropped because the writer fell behind (the queue holds 8192).";
        e.counter("trellis_access_log_dropped_total", help, log.dropped.load(Relaxed));
    }
    if let Some(s) = &a.spans {
        let (ended, c) = (s.ended.load(Relaxed), &s.counts);
        let (sent, failed) = (c.sent.load(Relaxed), c.failed.load(Relaxed));
        let help = "Spans ended (queued for export), exported (accepted by the collector), failed (a batch the collector refused or never got); ended minus the others were dropped from a full queue or are still queued.";
        e.labelled(
            "counter",
            "trellis_trace_spans_total",
            help,
            "result",
            &[("ended", ended), ("exported", sent), ("failed", failed)],
        );
    }
    let d = &a.dns.1;
    e.labelled(
        "counter",
        "trellis_dns_queries_total",
        "DNS queries answered, by answer code (bad: malformed or unsupported; truncated: cut for UDP, asked again over TCP).",
        "rcode",
        &[
            ("noerror", d.noerror.load(Relaxed)),
            ("nxdomain", d.nxdomain.load(Relaxed)),
            ("refused", d.refused.load(Relaxed)),
            ("bad", d.bad.load(Relaxed)),
            ("truncated", d.truncated.load(Relaxed)),
        ],
    );
    let digests = "Peers' mesh-wide stats digests, kept or refused as malformed.";
    let (kept, refused_digests) = (a.stats.digests_in.load(Relaxed), a.stats.digests_refused.load(Relaxed));
    e.labelled(
        "counter",
        "trellis_stats_digests_total",
        digests,
        "result",
        &[("kept", kept), ("refused", refused_digests)],
    );
    let asks = "Mesh-wide stats queries peers asked of this node (it owns some services' figures).";
    e.counter("trellis_stats_queries_total", asks, a.stats.asks_in.load(Relaxed));
    e.counter("trellis_forward_inbound_total", "Streams to a local instance connected after the intentions allowed them, from peers or from this node's own proxy and listeners.", f.inbound.load(Relaxed));
    e.counter("trellis_forward_denied_total", "Refusals by intentions: streams, HTTP requests (L7 rules) and open streams closed by a policy change at this node's instances, and this node's streams a peer refused.", f.denied.load(Relaxed));
    e.counter("trellis_forward_failed_total", "Forwarding attempts that failed.", f.failed.load(Relaxed));
    e.counter(
        "trellis_forward_retries_total",
        "Proxied requests retried on another instance.",
        f.retries.load(Relaxed),
    );
    e.counter("trellis_forward_ejections_total", "Instances ejected by outlier detection.", f.ejections.load(Relaxed));
    e.counter(
        "trellis_forward_circuit_open_total",
        "Requests refused by an open circuit.",
        f.circuit_open.load(Relaxed),
    );
    e.counter(
        "trellis_forward_timeouts_total",
        "Requests past their route or service timeout.",
        f.timeouts.load(Relaxed),
    );
    e.counter(
        "trellis_forward_retry_budget_exhausted_total",
        "Retries not taken because the retry budget was spent.",
        f.budget_exhausted.load(Relaxed),
    );
    let m = &f.mirror;
    e.labelled(
        "counter",
        "trellis_mirror_requests_total",
        "Mirrored copies of requests: answered by the mirror subset, failed (no instance or no answer in time), skipped (body over 1 MiB, or the client went away).",
        "result",
        &[("sent", m.sent.load(Relaxed)), ("failed", m.failed.load(Relaxed)), ("skipped", m.skipped.load(Relaxed))],
    );
    e.counter(
        "trellis_forward_no_instance_total",
        "Connections with no live instance to go to.",
        f.no_instance.load(Relaxed),
    );
    e.labelled(
        "counter",
        "trellis_forward_bytes_total",
        "Bytes this node's callers exchanged with instances (HTTP and TCP, headers included).",
        "direction",
        &[("to_instance", f.bytes_to_instances.load(Relaxed)), ("from_instance", f.bytes_from_instances.load(Relaxed))],
    );
    e.counter(
        "trellis_forward_pool_reused_total",
        "HTTP requests sent on a pooled connection to an instance instead of a new one.",
        f.pool_reused.load(Relaxed),
    );
    traffic_metrics(&a, &mut e);
    crate::api_ratelimit::metrics(&a, &mut e);
    crate::api_rollouts::metrics(&a, &mut e);
    crate::enroll::metrics(&a.transport, &a.lifecycle, &mut e);
    let started = std::time::SystemTime::now() - a.started.elapsed();
    crate::metrics_process::render(&mut e, &crate::metrics_process::read(), started, VERSION);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], e.finish()).into_response()
}

/// `GET /v1/agent/traffic`: the proxy's per-service counters as JSON, so the dashboard can
/// take rates and latency quantiles from two reads without parsing Prometheus text.
async fn traffic(State(a): State<AgentHandle>) -> Json<serde_json::Value> {
    let traffic = a.forward.traffic.lock().expect("traffic lock");
    let mut v = traffic_json(traffic.services());
    // The agent's clock, so rates are right whatever the reader's clock does.
    v["uptime_ms"] = (a.started.elapsed().as_millis() as u64).into();
    Json(v)
}

/// QUIC's own counters: datagrams, system calls (fewer than datagrams when GSO/GRO batch),
/// ACK frames and lost packets, over all peer connections.
fn quic_metrics(e: &mut crate::metrics::Exposition, q: &crate::transport::QuicTotals) {
    let rows = [
        ("trellis_quic_udp_datagrams_total", "UDP datagrams of peer connections.", q.datagrams_out, q.datagrams_in),
        ("trellis_quic_udp_ios_total", "UDP send and receive calls of peer connections.", q.ios_out, q.ios_in),
        ("trellis_quic_ack_frames_total", "QUIC ACK frames of peer connections.", q.acks_out, q.acks_in),
    ];
    for (name, help, out, inn) in rows {
        e.labelled("counter", name, help, "direction", &[("out", out), ("in", inn)]);
    }
    e.counter("trellis_quic_lost_packets_total", "Packets QUIC declared lost on peer connections.", q.lost_packets);
}

fn traffic_json(services: &BTreeMap<String, trellis_core::mesh::traffic::ServiceTraffic>) -> serde_json::Value {
    let services: serde_json::Map<String, serde_json::Value> = services
        .iter()
        .map(|(name, t)| {
            let classes: serde_json::Map<String, serde_json::Value> =
                (1..=5).map(|c| (format!("{c}xx"), t.classes[c].into())).collect();
            let reasons: Vec<serde_json::Value> = t
                .reasons
                .iter()
                .map(|((status, reason), n)| serde_json::json!({"status": status, "reason": reason, "count": n}))
                .collect();
            let v = serde_json::json!({
                "classes": classes, "count": t.count, "sum_seconds": t.sum_seconds, "buckets": t.buckets.to_vec(),
                "reasons": reasons,
            });
            (name.clone(), v)
        })
        .collect();
    serde_json::json!({"bounds": trellis_core::mesh::traffic::BUCKETS, "services": services})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traffic_json_has_every_class_and_cumulative_buckets() {
        let mut t = trellis_core::mesh::traffic::Traffic::default();
        t.record("web", 200, None, std::time::Duration::from_millis(3));
        t.record("web", 503, None, std::time::Duration::from_millis(700));
        t.record("web", 429, Some("rate_limited"), std::time::Duration::from_secs(10));
        let v = traffic_json(t.services());
        let web = &v["services"]["web"];
        assert_eq!(web["count"], 3);
        assert_eq!(web["reasons"][0], serde_json::json!({"status": 429, "reason": "rate_limited", "count": 1}));
        assert_eq!((web["classes"]["2xx"].as_u64(), web["classes"]["5xx"].as_u64()), (Some(1), Some(1)));
        assert_eq!(web["classes"]["4xx"], 1);
        assert_eq!(web["classes"]["3xx"], 0, "absent classes are zeros, not missing");
        assert_eq!(web["buckets"].as_array().unwrap().len(), v["bounds"].as_array().unwrap().len());
        assert_eq!(web["buckets"][2], 1, "3 ms is within the 5 ms bound");
    }

    #[test]
    fn malformed_json_is_a_400_naming_the_problem() {
        let e = parse_body::<JoinRequest>(b"{\"addrs\": [").unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(e.error.contains("EOF"), "{}", e.error);
    }

    #[test]
    fn unknown_field_is_named() {
        let e = parse_body::<JoinRequest>(br#"{"addrs": [], "force": true}"#).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("force"));
    }

    #[test]
    fn wrong_type_names_the_path() {
        let e = parse_body::<JoinRequest>(br#"{"addrs": ["not-an-addr"]}"#).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("addrs[0]"));
        assert!(e.error.contains("socket address"), "{}", e.error);
    }
}

/// Proxied requests per service: by status class, and the latency histogram.
fn traffic_metrics(a: &AgentHandle, e: &mut Exposition) {
    let traffic = a.forward.traffic.lock().expect("traffic lock");
    let mut counts = Vec::new();
    let mut hist = Vec::new();
    for (service, t) in traffic.services() {
        // Answers of the proxy's own carry their reason; the rest are the instances'.
        let mut own = [0u64; 6];
        for ((status, reason), n) in &t.reasons {
            own[usize::from(status / 100).min(5)] += n;
            let class = format!("{}xx", status / 100);
            let labels = vec![
                ("service", service.clone()),
                ("direction", "outbound".into()),
                ("class", class),
                ("reason", reason.to_string()),
            ];
            counts.push((labels, *n as f64));
        }
        for (class, n) in t.classes.iter().enumerate().skip(1) {
            let n = n - own[class];
            if n > 0 {
                let labels = vec![
                    ("service", service.clone()),
                    ("direction", "outbound".into()),
                    ("class", format!("{class}xx")),
                ];
                counts.push((labels, n as f64));
            }
        }
        hist.push((vec![("service", service.clone())], t.buckets.to_vec(), t.sum_seconds, t.count));
    }
    e.series(
        "counter",
        "trellis_requests_total",
        "Requests through the proxy listener by service and status class; the proxy's own answers with their reason.",
        &counts,
    );
    e.histogram(
        "trellis_request_duration_seconds",
        "Time from request to response headers through the proxy, by service.",
        &trellis_core::mesh::traffic::BUCKETS,
        &hist,
    );
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultRequest {
    #[serde(default)]
    drop_rate: f64,
    #[serde(default)]
    block: Vec<SocketAddr>,
    /// Peers we stop sending to but still hear (one-way partition).
    #[serde(default)]
    block_out: Vec<SocketAddr>,
    /// Added to every outgoing peer message.
    #[serde(default)]
    delay_ms: u64,
    /// Added to every datagram sent, under QUIC: a WAN path's one-way delay.
    #[serde(default)]
    packet_delay_ms: u64,
    /// Acknowledge policy writes without storing them (to show the history checker fails).
    #[serde(default)]
    drop_writes: bool,
}

/// `POST /v1/fault`: test-only loss and partitions, served only with `--fault-injection`.
pub fn fault_routes(agent: AgentHandle) -> Router {
    fault_table().into_router().with_state(agent)
}

pub fn fault_table() -> Routes<AgentHandle> {
    Routes::new().post("/v1/fault", set_faults)
}

async fn set_faults(State(a): State<AgentHandle>, body: Bytes) -> Result<Json<serde_json::Value>, ApiError> {
    let req: FaultRequest = parse_body(&body)?;
    if req.packet_delay_ms > 10_000 {
        return Err(ApiError {
            status: StatusCode::BAD_REQUEST,
            error: format!("packet_delay_ms: {} is over 10000", req.packet_delay_ms),
            field: Some("packet_delay_ms".into()),
            hint: "a one-way delay of 0..=10000 milliseconds".into(),
        });
    }
    let Some(faults) = &a.transport.faults else {
        return Err(ApiError::not_found("fault injection is off".into(), "start the agent with --fault-injection"));
    };
    let mut f = faults.lock().expect("faults lock");
    f.drop_rate = req.drop_rate.clamp(0.0, 1.0);
    f.blocked = req.block.into_iter().collect();
    f.blocked_out = req.block_out.into_iter().collect();
    f.delay = std::time::Duration::from_millis(req.delay_ms.min(60_000));
    a.transport.set_packet_delay(std::time::Duration::from_millis(req.packet_delay_ms));
    f.drop_writes = req.drop_writes;
    Ok(Json(
        serde_json::json!({"drop_rate": f.drop_rate, "blocked": f.blocked.len(), "blocked_out": f.blocked_out.len()}),
    ))
}
