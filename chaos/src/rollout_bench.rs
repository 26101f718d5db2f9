//! `trellis-chaos bench-rollback`: how long a bad canary serves after its first error. Three
//! agents in the LAN profile (stats every 10 s, as an operator runs them), a canary whose
//! instance answers 500 to one request in twenty (5%), 2 requests/s through one agent's
//! proxy. Each trial starts a rollout and measures from the canary instance's first 500 to
//! the moment the rollout's split is back at 100% stable, against the rollback times
//! Flagger and Argo Rollouts document.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::cluster::{Cluster, ClusterSpec};

/// Flagger's documented rollback: `interval` x `threshold`, 1 m x 10 in its examples.
const FLAGGER_S: f64 = 600.0;
/// Argo Rollouts with its documented 5 m analysis interval and failure limit 3: about 15 min.
const ARGO_S: f64 = 900.0;
/// The target.
const TARGET_S: f64 = 15.0;

pub fn run(trials: usize) -> anyhow::Result<()> {
    let proxy: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let c = Cluster::start(ClusterSpec {
        nodes: 3,
        profile: "lan".into(),
        node_args: vec![vec!["--proxy".into(), proxy.to_string()]],
        ..Default::default()
    })?;
    let all = [0, 1, 2];
    let alive: Vec<(String, &str)> = all.iter().map(|&i| (c.node(i).name.clone(), "alive")).collect();
    c.wait_all_see(&all, &alive, Duration::from_secs(30))?;
    // The canary's instance: every twentieth answer a 500, the time of the first noted.
    let count = Arc::new(AtomicU64::new(0));
    let first_error: Arc<Mutex<Option<Instant>>> = Arc::default();
    let canary = {
        let (count, first_error) = (count.clone(), first_error.clone());
        crate::plain::serve(move |_| {
            if count.fetch_add(1, Relaxed) % 20 == 19 {
                first_error.lock().expect("lock").get_or_insert_with(Instant::now);
                (500, b"canary error".to_vec())
            } else {
                (200, b"v2".to_vec())
            }
        })
    };
    let stable = crate::plain::serve(|_| (200, b"v1".to_vec()));
    for (node, id, at, v) in [(1, "web-1", stable, "v1"), (2, "web-2", canary, "v2")] {
        let body = json!({"service": "web", "address": "127.0.0.1", "port": at.port(), "labels": {"version": v}});
        put(&c, node, &format!("/v1/agent/services/{id}"), &body)?;
        put(&c, 0, &format!("/v1/policy/subsets/{v}"), &json!({"service": "web", "labels": {"version": v}}))?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            // 2 requests/s, bounded by the stop flag and 30 minutes.
            let t0 = Instant::now();
            while !stop.load(Relaxed) && t0.elapsed() < Duration::from_secs(1800) {
                let _ = crate::plain::get(proxy, "web", "/", &[], Duration::from_secs(5));
                std::thread::sleep(Duration::from_millis(500));
            }
        })
    };
    println!(
        "3 agents (LAN profile, stats every 10 s), canary failing 5% of its requests, 2 requests/s through node 0"
    );
    println!("rollout: steps 50,100, interval 5m, min_success_rate 99, min_requests 10");
    let mut took = Vec::new();
    for k in 0..trials {
        let name = format!("web-v2-{k}");
        *first_error.lock().expect("lock") = None;
        count.store(0, Relaxed);
        let spec = json!({"service": "web", "stable": "v1", "canary": "v2", "steps": [50, 100], "interval": "5m",
                          "analysis": {"min_success_rate": 99, "min_requests": 10}});
        put(&c, 0, &format!("/v1/policy/rollouts/{name}"), &spec)?;
        let stable_again = c.wait_until(Duration::from_secs(600), "the canary cut", || {
            let s = c.node(0).api().get_json(&format!("/v1/policy/splits/rollout-{name}")).ok()?;
            (s["body"]["backends"][1]["weight"] == 0).then(Instant::now)
        })?;
        let first = first_error.lock().expect("lock").ok_or_else(|| anyhow::anyhow!("cut before any error"))?;
        let secs = stable_again.duration_since(first).as_secs_f64();
        let reason = c.node(0).api().get_json(&format!("/v1/rollouts/{name}"))?["status"]["reason"].clone();
        println!("trial {}: first canary error to 100% stable in {secs:.1} s ({reason})", k + 1);
        took.push(secs);
        // Out of the next trial's way: the rollout, its status, then its split.
        for kind in ["rollouts", "rolloutstatus", "splits"] {
            let key = if kind == "splits" { format!("rollout-{name}") } else { name.clone() };
            c.node(0).api().delete(&format!("/v1/policy/{kind}/{key}"))?;
        }
    }
    stop.store(true, Relaxed);
    let _ = load.join();
    took.sort_by(f64::total_cmp);
    let (median, worst) = (took[took.len() / 2], took[took.len() - 1]);
    println!(
        "median {median:.1} s, worst {worst:.1} s (target at most {TARGET_S} s); Flagger {FLAGGER_S:.0} s: {:.3}x, Argo Rollouts {ARGO_S:.0} s: {:.3}x",
        worst / FLAGGER_S,
        worst / ARGO_S
    );
    Ok(())
}

fn put(c: &Cluster, node: usize, path: &str, body: &serde_json::Value) -> anyhow::Result<()> {
    let (s, v) = c.node(node).api().put_json(path, body)?;
    anyhow::ensure!(s == 200, "PUT {path}: {s} {v}");
    Ok(())
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}
