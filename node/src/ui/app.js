// Trellis dashboard: polls this agent's own API (same origin) and renders it with DOM calls
// and text nodes only, never parsing strings as markup, so names from the cluster cannot inject any.
"use strict";

const POLL_MS = 1500;
const TOKEN_KEY = "trellis-api-token";
let previous = null; // { at: agent uptime ms, traffic } from the last poll, for rates

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else if (k.startsWith("data-")) e.setAttribute(k, v);
    else e[k] = v;
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

function fill(tbody, rows, cols, emptyText) {
  tbody.replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { class: "empty", colSpan: cols }, emptyText))]));
}

class AuthError extends Error {}

async function api(path) {
  const headers = {};
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers["Authorization"] = "Bearer " + token;
  const r = await fetch(path, { headers, cache: "no-store", credentials: "omit" });
  if (r.status === 401 || r.status === 403) {
    const body = await r.json().catch(() => ({}));
    throw new AuthError(body.error || "HTTP " + r.status);
  }
  if (!r.ok) throw new Error(path + ": HTTP " + r.status);
  return r.json();
}

const pill = (s) => el("span", { class: "pill " + s }, s);
const chips = (labels) => Object.entries(labels || {}).map(([k, v]) => el("span", { class: "chip" }, k + "=" + v));

function fmtRate(x) {
  if (x === null || x === undefined) return "–";
  return x >= 100 ? x.toFixed(0) : x >= 10 ? x.toFixed(1) : x.toFixed(2);
}

function fmtSecs(s) {
  if (s === null || s === undefined) return "–";
  if (s === Infinity) return "> 5 s";
  return s < 1 ? (s * 1000).toFixed(s < 0.01 ? 1 : 0) + " ms" : s.toFixed(2) + " s";
}

function fmtUptime(s) {
  const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60);
  return d ? d + "d " + h + "h" : h ? h + "h " + m + "m" : m + "m " + (s % 60) + "s";
}

// The q-quantile of a cumulative histogram delta, interpolated within its bucket.
function quantile(q, bounds, cum, count) {
  if (!count) return null;
  const rank = q * count;
  for (let i = 0; i < bounds.length; i++) {
    if (cum[i] >= rank) {
      const lo = i ? bounds[i - 1] : 0, below = i ? cum[i - 1] : 0, inBucket = cum[i] - below;
      return lo + (bounds[i] - lo) * (inBucket ? (rank - below) / inBucket : 1);
    }
  }
  return Infinity;
}

// Per-service rate, error share and latency between two traffic reads.
function rates(prev, cur, seconds) {
  const out = {};
  for (const [name, t] of Object.entries(cur.services)) {
    const p = (prev && prev.services[name]) || { count: 0, classes: {}, buckets: t.buckets.map(() => 0) };
    const n = t.count - p.count;
    const errors = (t.classes["5xx"] || 0) - (p.classes["5xx"] || 0);
    const cum = t.buckets.map((b, i) => b - p.buckets[i]);
    // The proxies' own answers (429, 403, 503...) since the last read, by status and reason.
    const before = new Map((p.reasons || []).map((r) => [r.status + " " + r.reason, r.count]));
    const refused = (t.reasons || []).map((r) => [r.status + " " + r.reason, r.count - (before.get(r.status + " " + r.reason) || 0)])
      .filter(([, n]) => prev && n > 0).map(([k, n]) => k + " ×" + n);
    out[name] = {
      refused,
      rps: prev && seconds > 0 ? n / seconds : null,
      errors: prev ? (n ? errors / n : 0) : null,
      p50: prev ? quantile(0.5, cur.bounds, cum, n) : null,
      p99: prev ? quantile(0.99, cur.bounds, cum, n) : null,
    };
  }
  return out;
}

const SVG = "http://www.w3.org/2000/svg";

// A sparkline of `values` (nulls skipped) scaled to its own maximum, with the latest value.
function spark(name, values, fmt, bad) {
  const w = 220, h = 40, n = values.length;
  const svg = document.createElementNS(SVG, "svg");
  for (const [k, v] of [["viewBox", `0 0 ${w} ${h}`], ["width", w], ["height", h], ["class", "spark"], ["data-chart", name]]) {
    svg.setAttribute(k, v);
  }
  const nums = values.filter((v) => v !== null && v !== undefined);
  const max = Math.max(...nums, 1e-9);
  const points = values.map((v, i) => v === null || v === undefined ? null
    : ((n > 1 ? i / (n - 1) : 1) * (w - 2) + 1).toFixed(1) + "," + (h - 2 - (v / max) * (h - 4)).toFixed(1));
  const line = document.createElementNS(SVG, "polyline");
  line.setAttribute("points", points.filter(Boolean).join(" "));
  if (bad) line.setAttribute("class", "bad");
  const title = document.createElementNS(SVG, "title");
  title.textContent = name + ": peak " + fmt(max) + " over " + n + " intervals";
  svg.append(title, line);
  return el("div", { class: "chart" }, svg, el("span", { class: "last" }, nums.length ? fmt(nums[nums.length - 1]) : "–"));
}

function renderMesh(series) {
  const names = Object.keys(series.services).filter((n) => n !== "_other").sort();
  const rows = names.map((name) => {
    const pts = series.services[name];
    const errors = pts.map((p) => (p.requests ? (100 * p.errors) / p.requests : null));
    return el("tr", { "data-mesh-service": name }, el("td", {}, el("b", {}, name)),
      el("td", {}, spark(name + "-rps", pts.map((p) => p.rps), fmtRate)),
      el("td", {}, spark(name + "-errors", errors, (v) => v.toFixed(1) + " %", true)),
      el("td", {}, spark(name + "-p99", pts.map((p) => p.p99_ms), (v) => fmtSecs(v / 1000))));
  });
  fill(document.querySelector("#mesh tbody"), rows, 4, "no requests in the last 15 minutes");
  const count = names.length + (names.length === 1 ? " service" : " services");
  document.getElementById("mesh-count").textContent = count + " · a point every " + series.interval_seconds + " s";
}

function renderErrors(recent) {
  const rows = recent.errors.slice().reverse().map((e) =>
    el("tr", { "data-error": e.request_id || e.start_ms },
      el("td", {}, new Date(e.start_ms).toLocaleTimeString()), el("td", {}, e.side), el("td", {}, e.service),
      el("td", { class: "mono" }, e.method ? e.method + " " + e.path : e.protocol),
      el("td", { class: "num bad" }, e.status || "–"), el("td", {}, e.reason || "–"),
      el("td", { class: "mono" }, e.instance || "–"), el("td", { class: "num" }, e.duration_ms)));
  const empty = recent.access_log ? "no errors" : "the access log is off on this agent (--access-log)";
  fill(document.querySelector("#errors tbody"), rows, 8, empty);
  document.getElementById("errors-count").textContent = recent.errors.length;
}

function renderAgent(self) {
  const a = document.getElementById("agent");
  a.replaceChildren("agent ", el("b", {}, self.name), "  ·  cluster " + self.cluster_id + "  ·  v" + self.version +
    "  ·  up " + fmtUptime(self.uptime_seconds));
}

function latestMembers(members) {
  const seen = new Set();
  return members.filter((m) => !seen.has(m.name) && seen.add(m.name));
}

function renderMembers(members) {
  const rows = members.map((m) => {
    const labels = Object.fromEntries(Object.entries(m.labels || {}).filter(([k]) => k !== "zone"));
    return el("tr", { "data-member": m.name, "data-state": m.state },
      el("td", {}, el("b", {}, m.name)), el("td", {}, pill(m.state)), el("td", {}, m.labels.zone || "–"),
      el("td", {}, ...chips(labels)), el("td", {}, m.version), el("td", { class: "mono" }, m.peer_addr));
  });
  fill(document.querySelector("#members tbody"), rows, 6, "no members");
  const alive = members.filter((m) => m.state === "alive").length;
  document.getElementById("members-count").textContent = alive + " of " + members.length + " alive";
}

function renderServices(catalog, traffic) {
  const names = [...new Set([...Object.keys(catalog), ...Object.keys(traffic).filter((n) => n !== "_other")])].sort();
  const rows = names.map((name) => {
    const list = catalog[name] || [], t = traffic[name] || {};
    const passing = list.filter((i) => i.health !== "critical").length;
    const errShare = t.errors === null || t.errors === undefined ? "–" : (t.errors * 100).toFixed(1) + " %";
    const errCell = t.refused && t.refused.length ? errShare + " · " + t.refused.join(", ") : errShare;
    return el("tr", { "data-service": name },
      el("td", {}, el("b", {}, name)), el("td", {}, passing + " of " + list.length + " serving"),
      el("td", { class: "num" }, fmtRate(t.rps)), el("td", { class: "num" + (t.errors > 0 ? " bad" : "") }, errCell),
      el("td", { class: "num" }, fmtSecs(t.p50)), el("td", { class: "num" }, fmtSecs(t.p99)));
  });
  fill(document.querySelector("#services tbody"), rows, 6, "no services registered");
  document.getElementById("services-count").textContent = names.length;
  const instances = Object.values(catalog).flat().map((i) =>
    el("tr", { "data-instance": i.name, "data-health": i.health },
      el("td", { class: "mono" }, i.name), el("td", {}, i.service), el("td", {}, i.node),
      el("td", { class: "mono" }, i.address + ":" + i.port), el("td", {}, pill(i.health)),
      el("td", { class: "num" }, i.weight)));
  fill(document.querySelector("#instances tbody"), instances, 6, "no instances on live nodes");
  return instances.length;
}

function renderPolicy(policy) {
  const byKind = {};
  for (const o of policy.objects) (byKind[o.kind] = byKind[o.kind] || []).push(o);
  delete byKind.instances; // shown above, from the catalog
  const kinds = Object.keys(byKind).sort();
  const box = document.getElementById("policy");
  box.replaceChildren(...(kinds.length ? kinds.map((k) =>
    el("div", { class: "kind", "data-kind": k }, el("b", {}, k),
      ...byKind[k].map((o) => el("span", { class: "chip", title: JSON.stringify(o.body) }, o.name +
        (o.conflicts ? " (" + o.conflicts.length + " conflicts)" : "")))))
    : [el("div", { class: "empty" }, "no policy objects")]));
  const n = kinds.reduce((s, k) => s + byKind[k].length, 0);
  document.getElementById("policy-count").textContent = n + " objects · index " + policy.index;
  return n;
}

// The gates of a rollout's analysis, as the operator wrote them.
function gates(a) {
  const out = ["success ≥ " + a.min_success_rate + " %"];
  if (a.max_success_drop !== null && a.max_success_drop !== undefined) out.push("≤ " + a.max_success_drop + " points below stable");
  if (a.max_p99) out.push("p99 ≤ " + a.max_p99);
  out.push("≥ " + a.min_requests + " requests", a.failures_allowed + " failures allowed");
  return out;
}

// One subset's figures in the current step, mesh-wide.
function figure(name, w) {
  const rate = w.success_rate === null ? "–" : w.success_rate.toFixed(2) + " % ok";
  const p99 = w.p99_ms === null ? "–" : fmtSecs(w.p99_ms / 1000);
  return el("span", { "data-subset": name }, el("b", {}, name), " " + w.requests + " requests, " + rate + ", p99 " + p99);
}

function renderRollouts(list) {
  const box = document.getElementById("rollouts");
  box.replaceChildren(...(list.length ? list.map((r) => {
    const st = r.status || {}, spec = r.spec;
    const steps = spec.steps.map((w, i) => el("span", {
      class: "chip step" + (r.status && i === st.step && st.phase !== "promoted" && st.phase !== "aborted" ? " now" : ""),
      "data-step": i }, "step " + (i + 1) + ": " + w + " %"));
    const events = (st.timeline || []).slice().reverse().map((e) =>
      el("tr", { "data-event": e.at_ms }, el("td", {}, new Date(e.at_ms).toLocaleTimeString()), el("td", {}, pill(e.phase)),
        el("td", { class: "num" }, e.step + 1), el("td", { class: "num" }, e.weight + " %"), el("td", {}, e.note)));
    const table = el("table", { class: "timeline" }, el("thead", {}, el("tr", {}, el("th", {}, "time"), el("th", {}, "phase"),
      el("th", { class: "num" }, "step"), el("th", { class: "num" }, "canary"), el("th", {}, "verdict or command"))), el("tbody"));
    fill(table.querySelector("tbody"), events, 5, "not started yet");
    return el("div", { class: "rollout", "data-rollout": r.name, "data-phase": r.phase },
      el("div", {}, el("b", {}, r.name), " · ", spec.service, ": ", spec.stable, " → ", spec.canary, " ", pill(r.phase),
        " canary at " + (r.status ? st.weight : 0) + " % · every " + spec.interval + " · driven by " + (r.owner || "–")),
      el("div", {}, ...steps),
      el("div", { class: "muted" }, "gates: " + gates(spec.analysis).join(" · ")),
      r.figures ? el("div", { class: "figures", "data-figures": r.name }, "this step so far: ",
        figure("canary", r.figures.canary), " · ", figure("stable", r.figures.stable)) : "",
      st.reason ? el("div", { class: "reason" }, st.reason) : "",
      table);
  }) : [el("div", { class: "empty" }, "no rollouts")]));
  document.getElementById("rollouts-count").textContent = list.length;
}

function renderRateLimits(limits) {
  const rows = limits.map((l) => {
    const here = l.keys.reduce((s, k) => s + k.admitted, 0);
    const cluster = l.keys.reduce((s, k) => Math.max(s, k.cluster.admitted), 0);
    const use = l.rate > 0 ? Math.min(cluster / l.rate, 1) : 0;
    const used = el("span");
    used.style.width = (use * 100).toFixed(0) + "%";
    return el("tr", { "data-limit": l.name },
      el("td", {}, el("b", {}, l.name)), el("td", {}, l.service), el("td", { class: "num" }, fmtRate(l.rate)),
      el("td", { class: "num" }, fmtRate(here)), el("td", { class: "num" }, fmtRate(cluster)),
      el("td", {}, el("span", { class: "bar" + (use > 0.9 ? " hot" : "") }, used),
        el("span", { class: "pct" }, (use * 100).toFixed(0) + " %")),
      el("td", { class: "num" }, l.counts.refused));
  });
  fill(document.querySelector("#ratelimits tbody"), rows, 7, "no rate limits");
  document.getElementById("ratelimits-count").textContent = limits.length;
}

function renderSummary(items) {
  document.getElementById("summary").replaceChildren(...items.map(([k, v]) =>
    el("div", { class: "stat" }, el("div", { class: "v" }, v), el("div", { class: "k" }, k))));
}

function setStatus(kind, text) {
  document.getElementById("status").className = "status " + kind;
  document.getElementById("status-text").textContent = text;
}

async function poll() {
  try {
    const [self, members, catalog, policy, traffic, limits, series, recent, rollouts] = await Promise.all(
      ["/v1/agent/self", "/v1/members", "/v1/catalog/services", "/v1/policy", "/v1/agent/traffic", "/v1/ratelimits",
        "/v1/stats/series?window=15m", "/v1/agent/errors", "/v1/rollouts"].map(api));
    // The agent's own clock: right even when this tab is throttled or runs in virtual time.
    const now = traffic.uptime_ms;
    const r = rates(previous && previous.traffic, traffic, previous ? (now - previous.at) / 1000 : 0);
    previous = { at: now, traffic };
    document.getElementById("token-form").hidden = true;
    const ms = latestMembers(members);
    renderAgent(self);
    renderMembers(ms);
    const instances = renderServices(catalog, r);
    const objects = renderPolicy(policy);
    renderRateLimits(limits);
    renderMesh(series);
    renderErrors(recent);
    renderRollouts(rollouts);
    const total = Object.values(r).reduce((s, t) => s + (t.rps || 0), 0);
    renderSummary([["members alive", ms.filter((m) => m.state === "alive").length + " / " + ms.length],
      ["service instances", instances], ["requests / s (this proxy)", previous && r ? fmtRate(total) : "–"],
      ["policy objects", objects], ["rate limits", limits.length]]);
    document.body.setAttribute("data-loaded", "true");
    setStatus("live", "live · " + new Date().toLocaleTimeString());
  } catch (e) {
    if (e instanceof AuthError) {
      document.getElementById("token-form").hidden = false;
      document.getElementById("token-error").textContent = sessionStorage.getItem(TOKEN_KEY) ? e.message : "";
      setStatus("error", "token needed");
    } else {
      setStatus("error", "unreachable: " + e.message);
    }
  }
  setTimeout(poll, POLL_MS);
}

document.getElementById("token-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const input = document.getElementById("token");
  // sessionStorage only: the token is gone when the tab closes, and never in a cookie or URL.
  sessionStorage.setItem(TOKEN_KEY, input.value.trim());
  input.value = "";
  previous = null;
});

poll();
