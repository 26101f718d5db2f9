//! The dashboard in a real headless Chromium against a real 3-agent cluster, and the OpenAPI
//! document probed against a real agent: every documented operation is served.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use trellis_chaos::cluster::{Cluster, ClusterSpec};
use trellis_chaos::plain;

/// How long one Chromium run may take before the test kills it and fails.
const CHROMIUM_TIMEOUT: Duration = Duration::from_secs(90);

/// Chromium, or a failure that says how to get it: a missing browser must not pass as a skip.
fn chromium() -> PathBuf {
    let bin = std::env::var_os("CHROMIUM").map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from);
    assert!(
        bin.is_file(),
        "no Chromium at {}: install Debian's package with `apt-get install -y chromium` (.ci/run does), \
         or point CHROMIUM at a chromium binary",
        bin.display()
    );
    bin
}

/// Runs headless Chromium on `url` with a fresh profile; returns its stdout.
fn run_chromium(url: &str, extra: &[String], profile: &Path) -> String {
    let _ = std::fs::remove_dir_all(profile);
    std::fs::create_dir_all(profile).unwrap();
    let mut child = Command::new(chromium())
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"])
        .args(["--disable-background-networking", "--disable-component-update", "--disable-sync"])
        // Loopback only: a proxy from the environment must not see the agent's API.
        .arg("--no-proxy-server")
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("--virtual-time-budget=5000")
        .args(extra)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start chromium");
    // Read both pipes on threads so a chatty Chromium cannot block on a full pipe.
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || std::io::read_to_string(&mut out).unwrap_or_default());
    let err = std::thread::spawn(move || std::io::read_to_string(&mut err).unwrap_or_default());
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > CHROMIUM_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish {url} within {CHROMIUM_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let (out, err) = (out.join().unwrap(), err.join().unwrap());
    assert!(status.success(), "chromium failed on {url} ({status}):\n{err}");
    out
}

fn artifacts_dir() -> PathBuf {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| workspace.join("target"), |t| workspace.join(t));
    let dir = target.join("artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn wait_alive(c: &Cluster) {
    let all: Vec<usize> = (0..c.len()).collect();
    let alive: Vec<(String, &str)> = all.iter().map(|&i| (c.node(i).name.clone(), "alive")).collect();
    c.wait_all_see(&all, &alive, Duration::from_secs(15)).unwrap();
}

#[test]
fn dashboard_in_headless_chromium_shows_members_services_and_traffic() {
    let started = Instant::now();
    let proxy: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let zones = ["eu-west-1a", "eu-west-1b", "us-east-1a"];
    let labels = zones.iter().map(|z| vec![("zone".to_string(), z.to_string())]).collect();
    let c = Cluster::start(ClusterSpec {
        nodes: 3,
        labels,
        node_args: vec![vec!["--proxy".into(), proxy.to_string(), "--access-log".into(), "stderr".into()]],
        ..Default::default()
    })
    .unwrap();
    wait_alive(&c);

    // A service with an instance on each of nodes 1 and 2, some policy and a rate limit.
    for node in [1, 2] {
        let srv = trellis_tests::http::server("hello");
        let body = json!({"service": "web", "address": "127.0.0.1", "port": srv.port(), "labels": {"version": "v1"}});
        let (s, v) = c.node(node).api().put_json(&format!("/v1/agent/services/web-{node}"), &body).unwrap();
        assert_eq!(s, 200, "{v}");
    }
    // The canary's instance, for the rollout below.
    let canary = trellis_tests::http::server("hello from v2");
    let body = json!({"service": "web", "address": "127.0.0.1", "port": canary.port(), "labels": {"version": "v2"}});
    let (s, v) = c.node(2).api().put_json("/v1/agent/services/web-v2", &body).unwrap();
    assert_eq!(s, 200, "{v}");
    let api = c.node(0).api();
    for (path, body) in [
        ("/v1/policy/services/web", json!({"protocol": "http", "lb": {"policy": "least_request"}, "timeout": "2s"})),
        ("/v1/policy/subsets/v1", json!({"service": "web", "labels": {"version": "v1"}})),
        ("/v1/policy/ratelimits/web", json!({"service": "web", "requests_per_second": 500, "burst": 50})),
        ("/v1/policy/intentions/web-any", json!({"source": "*", "destination": "web", "action": "allow"})),
        // A canary at its first step, judged only at the end of the hour-long interval.
        ("/v1/policy/subsets/v2", json!({"service": "web", "labels": {"version": "v2"}})),
        (
            "/v1/policy/rollouts/web-v2",
            json!({"service": "web", "stable": "v1", "canary": "v2", "steps": [10, 50], "interval": "1h",
                   "analysis": {"min_success_rate": 99.5, "min_requests": 50}}),
        ),
    ] {
        let (s, v) = api.put_json(path, &body).unwrap();
        assert_eq!(s, 200, "{path}: {v}");
    }
    c.wait_until(Duration::from_secs(10), "the three instances in node 0's catalog", || {
        let v = api.get_json("/v1/catalog/services/web").ok()?;
        (v.as_array()?.len() == 3).then_some(())
    })
    .unwrap();

    // Requests through node 0's proxy while the page polls, so it has rates to show
    // (bounded: at most 20 000 requests or 2 minutes).
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let t = Instant::now();
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) && n < 20_000 && t.elapsed() < Duration::from_secs(120) {
                let _ = plain::get(proxy, "web", "/", &[], Duration::from_secs(2));
                n += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
            n
        })
    };
    // One error for the access log's list: a service nobody registered.
    assert_eq!(plain::get(proxy, "nosuch", "/x", &[], Duration::from_secs(2)).unwrap().status, 503);
    c.wait_until(Duration::from_secs(10), "traffic counted", || {
        let t = api.get_json("/v1/agent/traffic").ok()?;
        (t["services"]["web"]["count"].as_u64()? > 10).then_some(())
    })
    .unwrap();
    // The chart draws a line once the owners of web's figures hold two closed intervals.
    c.wait_until(Duration::from_secs(15), "two intervals of web in the mesh-wide series", || {
        let s = api.get_json("/v1/stats/series?window=15m").ok()?;
        (s["services"]["web"].as_array()?.len() >= 2).then_some(())
    })
    .unwrap();

    c.wait_until(Duration::from_secs(15), "the rollout started by its owner", || {
        let r = api.get_json("/v1/rollouts/web-v2").ok()?;
        (r["phase"] == "progressing").then_some(())
    })
    .unwrap();

    let url = format!("http://{}/ui", c.node(0).api_addr);
    let profile = c.root().join("chromium-profile");
    let t = Instant::now();
    let dom = run_chromium(&url, &["--dump-dom".into()], &profile);
    let dom_took = t.elapsed();
    assert!(dom.contains("data-loaded=\"true\""), "the page never rendered the API's data:\n{dom}");
    for n in c.nodes() {
        let row = format!("data-member=\"{}\" data-state=\"alive\"", n.name);
        assert!(dom.contains(&row), "{} is not listed as alive:\n{dom}", n.name);
    }
    for z in zones {
        assert!(dom.contains(&format!("<td>{z}</td>")), "zone {z} missing:\n{dom}");
    }
    for node in [1, 2] {
        let row = format!("data-instance=\"web-{node}@n{node}\"");
        assert!(dom.contains(&row), "the instance on n{node} is missing:\n{dom}");
    }
    assert!(dom.contains("data-service=\"web\""), "{dom}");
    assert!(dom.contains("data-limit=\"web\""), "rate limit missing:\n{dom}");
    // The access log's recent errors on this agent.
    assert!(dom.contains("no_instance") && dom.contains("GET /x"), "the 503 is not in the errors list:\n{dom}");
    // The mesh-wide charts: web's requests per second as a line of at least two points.
    assert!(dom.contains("data-mesh-service=\"web\""), "no mesh-wide row for web:\n{dom}");
    let chart = dom.split("data-chart=\"web-rps\"").nth(1).unwrap_or_else(|| panic!("no rps chart:\n{dom}"));
    let points = chart.split("points=\"").nth(1).and_then(|p| p.split('"').next()).unwrap_or("");
    assert!(points.split_whitespace().count() >= 2, "a line needs two points: {points:?}");
    // The rollout: its phase, its steps with the current one marked, its gates and timeline.
    let rollout = dom.split("data-rollout=\"web-v2\"").nth(1).unwrap_or_else(|| panic!("no rollout:\n{dom}"));
    let rollout = rollout.split("data-rollout=").next().unwrap_or(rollout);
    assert!(rollout.starts_with(" data-phase=\"progressing\""), "{rollout}");
    assert!(rollout.contains("class=\"chip step now\" data-step=\"0\">step 1: 10 %"), "{rollout}");
    assert!(rollout.contains("step 2: 50 %") && rollout.contains("success ≥ 99.5 %"), "{rollout}");
    assert!(rollout.contains("data-event="), "no timeline events: {rollout}");
    // The step's mesh-wide figures so far, both subsets.
    assert!(rollout.contains("this step so far") && rollout.contains("data-subset=\"canary\""), "{rollout}");
    let canary = api.get_json("/v1/rollouts/web-v2").unwrap();
    assert!(canary["figures"]["stable"]["requests"].as_u64().is_some(), "{canary}");
    for kind in ["services", "subsets", "ratelimits", "intentions", "rollouts"] {
        assert!(dom.contains(&format!("data-kind=\"{kind}\"")), "policy kind {kind} missing:\n{dom}");
    }

    let shot = artifacts_dir().join("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    let t = Instant::now();
    run_chromium(&url, &[format!("--screenshot={}", shot.display()), "--window-size=1280,1500".into()], &profile);
    let shot_took = t.elapsed();
    stop.store(true, Ordering::Relaxed);
    let requests = load.join().unwrap();
    let png = std::fs::read(&shot).unwrap_or_else(|e| panic!("no screenshot at {}: {e}", shot.display()));
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "{} is not a real screenshot", shot.display());
    println!("dashboard screenshot: {}", shot.display());
    println!(
        "chromium: DOM in {dom_took:?}, screenshot in {shot_took:?}; {requests} requests through the proxy; \
         test {:?}",
        started.elapsed()
    );
}

#[test]
fn dashboard_asks_for_a_token_when_tokens_are_on_and_serves_strict_headers() {
    let dir = std::env::temp_dir().join(format!("trellis-ui-tokens-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let tokens = dir.join("tokens");
    std::fs::write(&tokens, "read:0123456789abcdef0123456789abcdef\n").unwrap();
    let c = Cluster::start(ClusterSpec {
        nodes: 1,
        extra_args: vec!["--api-tokens-file".into(), tokens.display().to_string()],
        ..Default::default()
    })
    .unwrap();
    let addr = c.node(0).api_addr;
    let host = addr.to_string();
    let page = plain::get(addr, &host, "/ui", &[], Duration::from_secs(5)).unwrap();
    assert_eq!(page.status, 200, "the page itself is public");
    let csp = page.header("content-security-policy").unwrap_or_default();
    assert!(csp.contains("default-src 'none'") && csp.contains("script-src 'self'") && !csp.contains("unsafe"));
    assert_eq!(page.header("x-frame-options"), Some("deny"));
    for asset in ["/ui/app.js", "/ui/app.css", "/v1/openapi.json"] {
        assert_eq!(plain::get(addr, &host, asset, &[], Duration::from_secs(5)).unwrap().status, 200, "{asset}");
    }
    assert_eq!(plain::get(addr, &host, "/v1/members", &[], Duration::from_secs(5)).unwrap().status, 401);
    // From a page on another origin, even the public page is refused.
    let cross = plain::get(addr, &host, "/ui", &[("Origin", "http://evil.example")], Duration::from_secs(5)).unwrap();
    assert_eq!(cross.status, 403);

    let dom = run_chromium(&format!("http://{addr}/ui"), &["--dump-dom".into()], &dir.join("profile"));
    assert!(dom.contains("<form id=\"token-form\" class=\"token\">"), "the token form is not shown:\n{dom}");
    assert!(!dom.contains("data-member="), "members shown without a token:\n{dom}");
    assert!(dom.contains("token needed"), "{dom}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A request for `op` on a real agent: (status, body).
fn call(c: &Cluster, method: &str, path: &str) -> (u16, Value) {
    let api = c.node(0).api();
    match method {
        "GET" => {
            let addr = c.node(0).api_addr;
            let r = plain::get(addr, &addr.to_string(), path, &[], Duration::from_secs(5)).unwrap();
            (r.status, serde_json::from_slice(&r.body).unwrap_or(Value::Null))
        }
        "PUT" => api.put_json(path, &json!({})).unwrap(),
        "POST" => api.post_json(path, &json!({})).unwrap(),
        "DELETE" => api.delete(path).unwrap(),
        other => panic!("no probe for {other}"),
    }
}

fn is_fallback(status: u16, body: &Value) -> bool {
    status == 405 || (status == 404 && body["error"] == "no such endpoint")
}

#[test]
fn every_documented_operation_is_served_by_a_real_agent() {
    let c =
        Cluster::start(ClusterSpec { nodes: 1, extra_args: vec!["--fault-injection".into()], ..Default::default() })
            .unwrap();
    let served = plain::get(
        c.node(0).api_addr,
        &c.node(0).api_addr.to_string(),
        "/v1/openapi.json",
        &[],
        Duration::from_secs(5),
    )
    .unwrap();
    assert_eq!(served.status, 200);
    assert_eq!(served.text(), trellis_node::api_openapi::DOCUMENT, "the agent serves the document in the repo");
    let doc: Value = serde_json::from_str(trellis_node::api_openapi::DOCUMENT).unwrap();
    let mut ops = trellis_node::api_openapi::documented_operations(&doc);
    // Leaving stops the agent: probe it last.
    ops.sort_by_key(|(m, p)| (p == "/v1/agent/leave", m.clone(), p.clone()));
    assert!(is_fallback(call(&c, "GET", "/v1/no-such-thing").0, &call(&c, "GET", "/v1/no-such-thing").1));
    for (method, path) in &ops {
        let concrete = path.replace("{kind}", "services").replace("{name}", "web").replace("{id}", "probe-1");
        let (status, body) = call(&c, method, &concrete);
        assert!(!is_fallback(status, &body), "{method} {path} is documented but not served: {status} {body}");
        assert!(status < 500, "{method} {concrete}: {status} {body}");
    }
    println!("{} documented operations served", ops.len());
}
