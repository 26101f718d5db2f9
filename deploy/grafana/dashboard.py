#!/usr/bin/env python3
"""Writes trellis.json, the Grafana dashboard for the agents' Prometheus metrics.

    python3 deploy/grafana/dashboard.py > deploy/grafana/trellis.json

Every metric and label it queries is checked against a real agent's /metrics by
.ci/deploy_check.py.
"""
import json

DS = {"type": "prometheus", "uid": "${datasource}"}
I = 'instance=~"$instance"'
R = "$__rate_interval"
panels = []
y = 0


def row(title):
    global y
    panels.append({"type": "row", "title": title, "collapsed": False, "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                   "id": len(panels) + 1, "panels": []})
    y += 1


def panel(title, targets, unit="short", w=8, h=8, kind="timeseries", x=None, desc=""):
    global y
    used = sum(p["gridPos"]["w"] for p in panels if p["gridPos"]["y"] == y and p["type"] != "row")
    if used + w > 24:
        y += h
        used = 0
    p = {
        "type": kind,
        "title": title,
        "description": desc,
        "id": len(panels) + 1,
        "datasource": DS,
        "gridPos": {"h": h, "w": w, "x": used, "y": y},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
        "targets": [{"datasource": DS, "expr": e, "legendFormat": l, "refId": chr(65 + i)}
                    for i, (e, l) in enumerate(targets)],
    }
    if kind == "stat":
        p["options"] = {"reduceOptions": {"calcs": ["lastNotNull"]}, "colorMode": "value"}
    panels.append(p)


def end_row():
    global y
    y += 8


row("Membership")
panel("Alive peers (as each agent sees the others)", [(f'trellis_peers{{state="alive",{I}}}', "{{instance}}")],
      kind="stat", w=6)
panel("Members by state (worst view)", [(f"max by (state) (trellis_members{{{I}}})", "{{state}}")], w=6)
panel("Failed probes", [(f"sum(rate(trellis_probes_failed_total{{{I}}}[{R}])) / sum(rate(trellis_probes_total{{{I}}}[{R}]))",
                         "failed / sent")], unit="percentunit", w=6)
panel("Suspicions", [(f"sum(rate(trellis_suspicions_raised_total{{{I}}}[{R}]))", "raised"),
                     (f"sum(rate(trellis_suspicions_refuted_total{{{I}}}[{R}]))", "refuted")], unit="ops", w=6)
end_row()

row("Gossip and peer transport")
panel("Gossip bytes", [(f"sum by (instance) (rate(trellis_gossip_bytes_out_total{{{I}}}[{R}]))", "out {{instance}}"),
                       (f"sum by (instance) (rate(trellis_gossip_bytes_in_total{{{I}}}[{R}]))", "in {{instance}}")],
      unit="Bps", w=6)
panel("QUIC payload bytes", [(f"sum by (instance) (rate(trellis_quic_bytes_out_total{{{I}}}[{R}]))", "out {{instance}}"),
                             (f"sum by (instance) (rate(trellis_quic_bytes_in_total{{{I}}}[{R}]))", "in {{instance}}")],
      unit="Bps", w=6)
panel("Peer connections", [(f"trellis_quic_connections{{{I}}}", "{{instance}}"),
                           (f"sum(rate(trellis_quic_dial_failures_total{{{I}}}[{R}]))", "dial failures/s")], w=6)
panel("Refused handshakes by reason", [(f"sum by (reason) (rate(trellis_handshakes_refused_total{{{I}}}[{R}]))",
                                        "{{reason}}")], unit="ops", w=6,
      desc="Peers refused for a missing, expired, foreign-CA or wrong-cluster certificate.")
end_row()
panel("Malformed input", [(f"sum(rate(trellis_gossip_malformed_total{{{I}}}[{R}]))", "gossip"),
                          (f"sum(rate(trellis_gossip_identity_mismatch_total{{{I}}}[{R}]))", "identity mismatch"),
                          (f"sum(rate(trellis_quic_closed_malformed_total{{{I}}}[{R}]))", "connections closed")],
      unit="ops", w=12)
panel("Messages dropped before sending", [(f"sum by (instance) (rate(trellis_quic_dropped_out_total{{{I}}}[{R}]))",
                                           "{{instance}}")], unit="ops", w=12)
end_row()

row("Policy")
panel("Policy objects", [(f"trellis_policy_objects{{{I}}}", "{{instance}}")], w=6,
      desc="Every agent should hold the same number; a lasting gap means sync is stuck.")
panel("Policy writes and merges", [(f"sum(rate(trellis_policy_local_writes_total{{{I}}}[{R}]))", "local writes"),
                                   (f"sum(rate(trellis_policy_merged_total{{{I}}}[{R}]))", "merged from peers")],
      unit="ops", w=6)
panel("Conflicts and refusals", [(f"sum(increase(trellis_policy_conflicts_total{{{I}}}[1h]))", "conflicts (1h)"),
                                 (f"sum(increase(trellis_policy_refused_total{{{I}}}[1h]))", "refused (1h)")], w=6)
panel("Tombstones collected", [(f"sum(increase(trellis_policy_tombstones_collected_total{{{I}}}[1h]))", "per hour")],
      w=6)
end_row()

row("Service traffic (proxy)")
S = 'service=~"$service"'
panel("Requests by service", [(f"sum by (service) (rate(trellis_requests_total{{{S},{I}}}[{R}]))", "{{service}}")],
      unit="reqps", w=8)
panel("Error ratio (5xx) by service",
      [(f'sum by (service) (rate(trellis_requests_total{{class="5xx",{S},{I}}}[{R}])) / '
        f"sum by (service) (rate(trellis_requests_total{{{S},{I}}}[{R}]))", "{{service}}")],
      unit="percentunit", w=8)
panel("Requests by status class", [(f"sum by (class) (rate(trellis_requests_total{{{S},{I}}}[{R}]))", "{{class}}")],
      unit="reqps", w=8)
end_row()
panel("Latency p50 / p99 by service",
      [(f"histogram_quantile(0.5, sum by (service, le) (rate(trellis_request_duration_seconds_bucket{{{S},{I}}}[{R}])))",
        "p50 {{service}}"),
       (f"histogram_quantile(0.99, sum by (service, le) (rate(trellis_request_duration_seconds_bucket{{{S},{I}}}[{R}])))",
        "p99 {{service}}")], unit="s", w=12)
panel("Mean latency by service",
      [(f"sum by (service) (rate(trellis_request_duration_seconds_sum{{{S},{I}}}[{R}])) / "
        f"sum by (service) (rate(trellis_request_duration_seconds_count{{{S},{I}}}[{R}]))", "{{service}}")],
      unit="s", w=12)
end_row()

row("Forwarding")
panel("Streams", [(f"sum(rate(trellis_forward_outbound_total{{{I}}}[{R}]))", "outbound"),
                  (f"sum(rate(trellis_forward_inbound_total{{{I}}}[{R}]))", "inbound")], unit="ops", w=8)
panel("Refusals and failures", [(f"sum(rate(trellis_forward_denied_total{{{I}}}[{R}]))", "denied by intentions"),
                                (f"sum(rate(trellis_forward_failed_total{{{I}}}[{R}]))", "failed"),
                                (f"sum(rate(trellis_forward_no_instance_total{{{I}}}[{R}]))", "no instance"),
                                (f"sum(rate(trellis_forward_timeouts_total{{{I}}}[{R}]))", "timeouts")],
      unit="ops", w=8)
panel("Resilience", [(f"sum(rate(trellis_forward_retries_total{{{I}}}[{R}]))", "retries"),
                     (f"sum(rate(trellis_forward_retry_budget_exhausted_total{{{I}}}[{R}]))", "retry budget spent"),
                     (f"sum(rate(trellis_forward_circuit_open_total{{{I}}}[{R}]))", "circuit open"),
                     (f"sum(rate(trellis_forward_ejections_total{{{I}}}[{R}]))", "ejections")], unit="ops", w=8)
end_row()

row("Rate limits")
panel("Admitted and refused by limit",
      [(f"sum by (limit) (rate(trellis_ratelimit_admitted_total{{{I}}}[{R}]))", "admitted {{limit}}"),
       (f"sum by (limit) (rate(trellis_ratelimit_refused_total{{{I}}}[{R}]))", "refused {{limit}}")],
      unit="reqps", w=12)
panel("Refused share by limit",
      [(f"sum by (limit) (rate(trellis_ratelimit_refused_total{{{I}}}[{R}])) / "
        f"(sum by (limit) (rate(trellis_ratelimit_admitted_total{{{I}}}[{R}])) + "
        f"sum by (limit) (rate(trellis_ratelimit_refused_total{{{I}}}[{R}])))", "{{limit}}")],
      unit="percentunit", w=6)
panel("Rate-limit coordination", [(f"sum(rate(trellis_ratelimit_bytes_out_total{{{I}}}[{R}]))", "bytes out/s"),
                                  (f"sum(rate(trellis_ratelimit_peer_refused_total{{{I}}}[{R}]))", "peer msgs refused/s")],
      w=6)
end_row()

row("Agent process")
panel("CPU", [(f"rate(process_cpu_seconds_total{{{I}}}[{R}])", "{{instance}}")], unit="percentunit", w=8)
panel("Resident memory", [(f"process_resident_memory_bytes{{{I}}}", "{{instance}}")], unit="bytes", w=8)
panel("Open file descriptors", [(f"process_open_fds{{{I}}}", "{{instance}}"),
                                (f"process_max_fds{{{I}}}", "limit {{instance}}")], w=8)
end_row()

dashboard = {
    "title": "Trellis service mesh",
    "uid": "trellis-mesh",
    "description": "Membership, gossip, mTLS handshakes, policy, proxied traffic, forwarding and rate limits "
                   "of Trellis agents (their /metrics).",
    "tags": ["trellis", "service-mesh"],
    "editable": True,
    "schemaVersion": 39,
    "version": 1,
    "time": {"from": "now-1h", "to": "now"},
    "refresh": "30s",
    "timezone": "",
    "graphTooltip": 1,
    "templating": {"list": [
        {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus"},
        {"name": "instance", "label": "Agent", "type": "query", "datasource": DS,
         "query": {"query": "label_values(trellis_members, instance)", "refId": "instance"},
         "definition": "label_values(trellis_members, instance)",
         "includeAll": True, "multi": True, "allValue": ".*", "current": {"text": "All", "value": "$__all"},
         "refresh": 2},
        {"name": "service", "label": "Service", "type": "query", "datasource": DS,
         "query": {"query": "label_values(trellis_requests_total, service)", "refId": "service"},
         "definition": "label_values(trellis_requests_total, service)",
         "includeAll": True, "multi": True, "allValue": ".*", "current": {"text": "All", "value": "$__all"},
         "refresh": 2},
    ]},
    "annotations": {"list": []},
    "panels": panels,
}
print(json.dumps(dashboard, indent=2))
