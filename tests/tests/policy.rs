//! Cluster policy on real agents: concurrent writes, partitions, crashes, late joiners,
//! hostile peers, and the CLI.

use std::time::Duration;

use serde_json::{json, Value};
use trellis_chaos::cluster::{Cluster, ClusterSpec};
use trellis_tests::{metric, raw_peer};

fn cluster(nodes: usize) -> Cluster {
    let c = Cluster::start(ClusterSpec { nodes, extra_args: vec!["--fault-injection".into()], ..Default::default() })
        .unwrap();
    let all: Vec<usize> = (0..nodes).collect();
    let alive: Vec<(String, &str)> = all.iter().map(|&i| (c.node(i).name.clone(), "alive")).collect();
    c.wait_all_see(&all, &alive, Duration::from_secs(15)).unwrap();
    c
}

/// Drops all traffic between node `i` and the nodes in `peers` (both ways when called on both).
fn block(c: &Cluster, i: usize, peers: &[usize]) {
    let addrs: Vec<String> = peers.iter().map(|&p| c.node(p).peer_addr.to_string()).collect();
    let (s, body) = c.node(i).api().post_json("/v1/fault", &json!({ "block": addrs })).unwrap();
    assert_eq!(s, 200, "{body}");
}

fn put(c: &Cluster, i: usize, path: &str, body: Value) -> Value {
    let (s, v) = c.node(i).api().put_json(path, &body).unwrap();
    assert_eq!(s, 200, "PUT {path} on node {i}: {v}");
    v
}

fn snapshot(c: &Cluster, i: usize) -> Value {
    c.node(i).api().get_json("/v1/policy").unwrap()
}

/// Waits until every node in `nodes` holds the same policy (same root and versions).
fn wait_identical(c: &Cluster, nodes: &[usize], timeout: Duration) -> Value {
    let versions = |v: &Value| -> Vec<(String, String, String)> {
        v["objects"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| (o["kind"].to_string(), o["name"].to_string(), o["version"].to_string()))
            .collect()
    };
    c.wait_until(timeout, "identical policy on all nodes", || {
        let first = snapshot(c, nodes[0]);
        nodes
            .iter()
            .all(|&i| {
                let s = snapshot(c, i);
                s["root"] == first["root"] && versions(&s) == versions(&first)
            })
            .then_some(first)
    })
    .unwrap()
}

#[test]
fn the_same_object_written_concurrently_on_three_nodes_ends_identical_with_the_loser_reported() {
    let c = cluster(3);
    for i in 0..3 {
        block(&c, i, &[0, 1, 2]);
    }
    for i in 0..3 {
        put(&c, i, "/v1/policy/services/web", json!({ "timeout": format!("{}s", i + 1) }));
    }
    for i in 0..3 {
        block(&c, i, &[]);
    }
    let state = wait_identical(&c, &[0, 1, 2], Duration::from_secs(20));
    let web = &state["objects"][0];
    println!("winner: {} timeout {}", web["version"], web["body"]["timeout"]);
    let conflicts: usize = (0..3)
        .map(|i| {
            let o = c.node(i).api().get_json("/v1/policy/services/web").unwrap();
            o["conflicts"].as_array().map(|a| a.len()).unwrap_or(0)
        })
        .sum();
    assert!(conflicts >= 2, "the two losing versions are reported as conflicts ({conflicts})");
    let m: f64 = (0..3)
        .map(|i| metric(&c.node(i).api().get_text("/metrics").unwrap(), "trellis_policy_conflicts_total").unwrap())
        .sum();
    assert!(m >= 2.0);
}

#[test]
fn partitioned_writes_on_both_sides_converge_after_heal() {
    let c = cluster(5);
    let (a, b) = ([0, 1], [2, 3, 4]);
    for i in a {
        block(&c, i, &b);
    }
    for i in b {
        block(&c, i, &a);
    }
    let mut acked = Vec::new();
    for k in 0..5 {
        let name = format!("side-a-{k}");
        put(&c, a[k % 2], &format!("/v1/policy/services/{name}"), json!({"timeout": "1s"}));
        acked.push(name);
        let name = format!("side-b-{k}");
        put(&c, b[k % 3], &format!("/v1/policy/services/{name}"), json!({"timeout": "2s"}));
        acked.push(name);
    }
    put(&c, 0, "/v1/policy/services/shared", json!({"timeout": "3s"}));
    put(&c, 4, "/v1/policy/services/shared", json!({"timeout": "4s"}));
    std::thread::sleep(Duration::from_secs(2));
    for i in 0..5 {
        block(&c, i, &[]);
    }
    let state = wait_identical(&c, &[0, 1, 2, 3, 4], Duration::from_secs(30));
    let names: Vec<&str> = state["objects"].as_array().unwrap().iter().map(|o| o["name"].as_str().unwrap()).collect();
    for n in &acked {
        assert!(names.contains(&n.as_str()), "acknowledged write {n} is missing after the heal");
    }
    assert!(names.contains(&"shared"));
    let shared: Vec<Value> = (0..5).map(|i| c.node(i).api().get_json("/v1/policy/services/shared").unwrap()).collect();
    assert!(shared.iter().any(|o| o["conflicts"].is_array()), "the losing `shared` write is reported somewhere");
}

#[test]
fn a_write_acknowledged_just_before_kill_9_survives_and_spreads_after_restart() {
    let mut c = cluster(3);
    block(&c, 2, &[0, 1]);
    put(
        &c,
        2,
        "/v1/policy/splits/web-canary",
        json!({"service": "web", "backends": [{"subset": "v1", "weight": 90}, {"subset": "v2", "weight": 10}]}),
    );
    c.kill(2);
    c.restart(2).unwrap();
    let got = c.node(2).api().get_json("/v1/policy/splits/web-canary").unwrap();
    assert_eq!(got["body"]["backends"][1]["weight"], 10);
    wait_identical(&c, &[0, 1, 2], Duration::from_secs(20));
    assert_eq!(c.node(0).api().get_json("/v1/policy/splits/web-canary").unwrap()["body"]["service"], "web");
}

#[test]
fn a_write_spreads_over_a_link_delayed_under_quic_and_an_out_of_range_delay_is_refused() {
    let c = cluster(2);
    let (s, v) = c.node(0).api().post_json("/v1/fault", &json!({ "packet_delay_ms": 20_000 })).unwrap();
    assert_eq!((s, v["field"].as_str()), (400, Some("packet_delay_ms")), "{v}");
    for i in 0..2 {
        let (s, v) = c.node(i).api().post_json("/v1/fault", &json!({ "packet_delay_ms": 150 })).unwrap();
        assert_eq!(s, 200, "{v}");
    }
    // Every datagram either node sends waits 150 ms: the write cannot arrive sooner, and
    // QUIC (RTT estimate, loss timers) carries it over the 300 ms round trip.
    let written = std::time::Instant::now();
    put(&c, 0, "/v1/policy/services/far", json!({"timeout": "1s"}));
    let state = wait_identical(&c, &[0, 1], Duration::from_secs(15));
    assert!(written.elapsed() >= Duration::from_millis(150), "arrived in {:?}", written.elapsed());
    assert_eq!(state["objects"].as_array().unwrap().len(), 1);
}

#[test]
fn a_node_that_joins_late_receives_the_full_state() {
    let mut c = cluster(2);
    for k in 0..300 {
        put(&c, k % 2, &format!("/v1/policy/services/svc-{k}"), json!({"timeout": "1s"}));
    }
    let seed = c.node(0).peer_addr;
    let late = c.add_node("late", &[seed]).unwrap();
    let state = wait_identical(&c, &[0, 1, late], Duration::from_secs(20));
    assert_eq!(state["objects"].as_array().unwrap().len(), 300);
}

#[test]
fn invalid_objects_are_refused_on_the_api_and_from_a_peer() {
    let c = cluster(2);
    let (s, body) = c
        .node(0)
        .api()
        .put_json(
            "/v1/policy/splits/canary",
            &json!({"service": "web", "backends": [{"subset": "v1", "weight": 90}, {"subset": "v2", "weight": 7}]}),
        )
        .unwrap();
    assert_eq!(s, 400);
    assert_eq!(body["field"], "splits.canary.backends[1].weight");
    assert_eq!(body["error"], "weights sum to 97, must be 100");

    // A peer with a valid certificate pushes the same invalid split directly.
    let entry = trellis_proto::PolicyEntry {
        kind: "splits".into(),
        name: "canary".into(),
        version: (trellis_node::policy::now_ms() << 16, 42),
        ancestors: [(0, 0); 2],
        body: Some(r#"{"service": "web", "backends": [{"subset": "v1", "weight": 97}]}"#.into()),
        proof: None,
    };
    let msg = trellis_proto::PolicySync::Entries { entries: vec![entry], want: vec![] };
    let mut data = Vec::new();
    trellis_proto::envelope::encode(trellis_proto::MessageKind::PolicySync, &msg.encode(), &mut data);
    let tls = c.node(1).tls_dir.clone();
    let target = c.node(0).peer_addr;
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let conn = raw_peer(&tls, target).await.unwrap();
        let mut s = conn.open_uni().await.unwrap();
        s.write_all(&data).await.unwrap();
        s.finish().unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
    });
    let refused = c
        .wait_until(Duration::from_secs(5), "refusal counted", || {
            metric(&c.node(0).api().get_text("/metrics").ok()?, "trellis_policy_refused_total").filter(|v| *v >= 1.0)
        })
        .unwrap();
    assert!(refused >= 1.0);
    let (s, _) = c.node(0).api().delete("/v1/policy/splits/canary").unwrap();
    assert_eq!(s, 404, "the invalid split was never stored");
}

#[test]
fn cli_applies_checks_lists_and_deletes_policy() {
    let c = cluster(1);
    let bin = trellis_chaos::cluster::trellis_bin();
    let api = c.node(0).api_addr.to_string();
    let dir = c.root().join("policy-files");
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.toml");
    std::fs::write(
        &good,
        "[services.web]\nprotocol = \"http\"\ntimeout = \"2s\"\n\n[splits.web-canary]\nservice = \"web\"\nbackends = [{subset = \"v1\", weight = 90}, {subset = \"v2\", weight = 10}]\n",
    )
    .unwrap();
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[splits.c]\nservice = \"web\"\nbackends = [{subset = \"v1\", weight = 97}]\n").unwrap();
    let run = |args: &[&str]| std::process::Command::new(&bin).args(args).args(["--http-addr", &api]).output().unwrap();

    let out = run(&["policy", "apply", "-f", bad.to_str().unwrap(), "--check"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("splits.c.backends[0].weight: weights sum to 97"));
    let out = run(&["policy", "apply", "-f", good.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let yaml = dir.join("more.yaml");
    std::fs::write(&yaml, "intentions:\n  deny-all:\n    source: \"*\"\n    destination: web\n    action: deny\n")
        .unwrap();
    let out = run(&["policy", "apply", "-f", yaml.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = run(&["policy", "get"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("web-canary") && table.contains("services") && table.contains("deny-all"), "{table}");
    let out = run(&["policy", "delete", "splits", "web-canary"]);
    assert!(out.status.success());
    let (s, _) = c.node(0).api().delete("/v1/policy/splits/web-canary").unwrap();
    assert_eq!(s, 404);
}

#[test]
fn a_delete_is_collected_everywhere_after_every_node_has_it() {
    let c = cluster(3);
    put(&c, 0, "/v1/policy/services/old", json!({}));
    wait_identical(&c, &[0, 1, 2], Duration::from_secs(10));
    let (s, _) = c.node(1).api().delete("/v1/policy/services/old").unwrap();
    assert_eq!(s, 200);
    // fast profile: grace 5 s; every node must see the delete, then drop the tombstone.
    let took = c
        .wait_until(Duration::from_secs(30), "tombstones collected on all nodes", || {
            (0..3)
                .all(|i| {
                    let v = snapshot(&c, i);
                    v["tombstones"] == 0 && v["objects"].as_array().is_some_and(|o| o.is_empty())
                })
                .then_some(())
        })
        .map(|_| ());
    took.unwrap();
    let m = metric(&c.node(2).api().get_text("/metrics").unwrap(), "trellis_policy_tombstones_collected_total");
    assert!(m.unwrap() >= 1.0);
    wait_identical(&c, &[0, 1, 2], Duration::from_secs(10));
}

#[test]
fn blocking_read_returns_when_the_state_moves() {
    let c = cluster(2);
    let index = c.node(1).api().get_json("/v1/policy").unwrap()["index"].as_u64().unwrap();
    let api = c.node(1).api();
    let waiter = std::thread::spawn(move || {
        let t = std::time::Instant::now();
        let v = api.get_json(&format!("/v1/policy?index={index}&wait=2s")).unwrap();
        (t.elapsed(), v)
    });
    std::thread::sleep(Duration::from_millis(300));
    put(&c, 0, "/v1/policy/services/web", json!({}));
    let (took, v) = waiter.join().unwrap();
    assert!(v["index"].as_u64().unwrap() > index);
    assert_eq!(v["objects"][0]["name"], "web");
    println!("blocking read returned after {took:?}");
}

#[test]
fn history_lists_the_last_versions_and_revert_writes_an_old_one_again() {
    let mut c = cluster(2);
    let versions: Vec<String> = (1..=12)
        .map(|i| {
            let v = put(&c, 0, "/v1/policy/services/web", json!({"timeout": format!("{i}s")}));
            v["version"].as_str().unwrap().to_string()
        })
        .collect();
    let history = |c: &Cluster| c.node(0).api().get_json("/v1/policy/services/web?history").unwrap();
    let h = history(&c);
    let listed: Vec<String> =
        h["versions"].as_array().unwrap().iter().map(|v| v["version"].as_str().unwrap().into()).collect();
    let newest_first: Vec<String> = versions.iter().rev().cloned().collect();
    assert_eq!(listed, newest_first, "every version, newest first");
    assert_eq!(h["current"], versions[11].as_str());
    assert_eq!(h["versions"][0]["writer"], c.node(0).name.as_str());
    assert_eq!(h["versions"][9]["body"]["timeout"], "3s");
    assert!(h["versions"][0]["written_at"].as_str().unwrap().starts_with("20"), "{}", h["versions"][0]);

    let cli = |args: &[&str]| {
        std::process::Command::new(trellis_chaos::cluster::trellis_bin())
            .args(args)
            .args(["--http-addr", &c.node(0).api_addr.to_string()])
            .output()
            .unwrap()
    };
    let out = cli(&["policy", "revert", "services", "web", "--to", &versions[2]]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let now = c.node(0).api().get_json("/v1/policy/services/web").unwrap();
    assert_eq!(now["body"]["timeout"], "3s", "the old content is back");
    assert!(!versions.contains(&now["version"].as_str().unwrap().to_string()), "as a new version");
    let out = cli(&["policy", "revert", "services", "web", "--to", "1.ff"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--to"), "{}", String::from_utf8_lossy(&out.stderr));
    let table = String::from_utf8_lossy(&cli(&["policy", "history", "services", "web"]).stdout).into_owned();
    assert_eq!(table.lines().count(), 14, "a header and 13 versions:\n{table}");
    assert!(table.lines().nth(1).unwrap().contains('*'), "the current version is marked:\n{table}");

    // The log keeps them across a restart (until it is compacted past 1 MiB).
    c.kill(0);
    c.restart(0).unwrap();
    let h = c
        .wait_until(Duration::from_secs(15), "the agent back", || {
            c.node(0).api().get_json("/v1/policy/services/web?history").ok()
        })
        .unwrap();
    assert_eq!(h["versions"].as_array().unwrap().len(), 13);
}

/// A 2|3 partition in the middle of a rollout: neither side advances it (each sees too few
/// of the members it started with), and after the heal it goes on to one outcome that
/// every node holds.
#[test]
fn no_side_of_a_two_three_partition_advances_a_rollout_and_one_outcome_holds_after_the_heal() {
    let proxy =
        format!("127.0.0.1:{}", std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port());
    let node_args = vec![vec![], vec![], vec![], vec!["--proxy".to_string(), proxy.clone()]];
    let c = Cluster::start(ClusterSpec {
        nodes: 5,
        node_args,
        extra_args: vec!["--fault-injection".into()],
        ..Default::default()
    })
    .unwrap();
    let all: Vec<usize> = (0..5).collect();
    let alive: Vec<(String, &str)> = all.iter().map(|&i| (c.node(i).name.clone(), "alive")).collect();
    c.wait_all_see(&all, &alive, Duration::from_secs(15)).unwrap();
    // Everything the rollout judges lives on the three side: instances on 2 and 4, load via 3.
    for (node, id, v) in [(4, "api-1", "v1"), (2, "api-2", "v2")] {
        let at = trellis_tests::http::server(v);
        put(
            &c,
            node,
            &format!("/v1/agent/services/{id}"),
            json!({"service": "api", "address": "127.0.0.1", "port": at.port(), "labels": {"version": v}}),
        );
        put(&c, 0, &format!("/v1/policy/subsets/{v}"), json!({"service": "api", "labels": {"version": v}}));
        put(&c, 0, &format!("/v1/policy/subsets/late-{v}"), json!({"service": "late", "labels": {"version": v}}));
    }
    // The late rollout's canary serves on the two side, so only the side rule can hold it back.
    let late = trellis_tests::http::server("late v2");
    let body = json!({"service": "late", "address": "127.0.0.1", "port": late.port(), "labels": {"version": "v2"}});
    put(&c, 0, "/v1/agent/services/late-2", body);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (stop, proxy) = (stop.clone(), proxy.parse().unwrap());
        std::thread::spawn(move || {
            let t0 = std::time::Instant::now();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && t0.elapsed() < Duration::from_secs(90) {
                trellis_tests::http::get(proxy, "api", "/", &[]);
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let spec = json!({"service": "api", "stable": "v1", "canary": "v2", "steps": [20, 50, 100], "interval": "4s",
                      "analysis": {"min_success_rate": 95, "min_requests": 5}});
    put(&c, 0, "/v1/policy/rollouts/api-v2", spec);
    let status = |i: usize| c.node(i).api().get_json("/v1/policy/rolloutstatus/api-v2").ok().map(|v| v["body"].clone());
    c.wait_until(Duration::from_secs(10), "the rollout started", || status(0).filter(|s| s["weight"] == 20)).unwrap();
    let (a, b) = ([0, 1], [2, 3, 4]);
    for i in a {
        block(&c, i, &b);
    }
    for i in b {
        block(&c, i, &a);
    }
    // A rollout written on the two side once it sees the others gone: a minority may not
    // start one (else each side would start it with its own members and could advance).
    let late_status =
        |i: usize| c.node(i).api().get_json("/v1/policy/rolloutstatus/late-v2").ok().map(|v| v["body"].clone());
    let started = std::time::Instant::now();
    c.wait_until(Duration::from_secs(15), "node 0 sees only its own side alive", || {
        let m = c.node(0).api().members().ok()?;
        (m.iter().filter(|x| x["state"] == "alive").count() == 2).then_some(())
    })
    .unwrap();
    let late = json!({"service": "late", "stable": "late-v1", "canary": "late-v2", "steps": [50], "interval": "1h"});
    put(&c, 0, "/v1/policy/rollouts/late-v2", late);
    std::thread::sleep(Duration::from_secs(3));
    for i in a {
        assert!(late_status(i).is_none(), "node {i}: a two-of-five side started a rollout: {:?}", late_status(i));
    }
    // Four intervals of passing gates on the three side: still at the first step everywhere.
    std::thread::sleep(Duration::from_secs(16).saturating_sub(started.elapsed()));
    for i in all.iter().copied() {
        let s = status(i).unwrap();
        assert_eq!((s["weight"].as_u64(), s["phase"].as_str()), (Some(20), Some("progressing")), "node {i}: {s}");
    }
    for i in all.iter().copied() {
        block(&c, i, &[]);
    }
    c.wait_until(Duration::from_secs(60), "promoted on every node", || {
        all.iter().all(|&i| status(i).is_some_and(|s| s["phase"] == "promoted")).then_some(())
    })
    .unwrap();
    // After the heal the whole cluster is in view: the late rollout starts, once.
    c.wait_until(Duration::from_secs(20), "the late rollout started everywhere", || {
        all.iter().all(|&i| late_status(i).is_some_and(|s| s["phase"] == "progressing")).then_some(())
    })
    .unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    load.join().unwrap();
    let outcomes: Vec<Value> = all.iter().map(|&i| status(i).unwrap()).collect();
    assert!(outcomes.windows(2).all(|w| w[0] == w[1]), "one status everywhere: {outcomes:?}");
    let weights: Vec<u64> =
        outcomes[0]["timeline"].as_array().unwrap().iter().map(|e| e["weight"].as_u64().unwrap()).collect();
    assert_eq!(weights, [20, 50, 100, 100], "each step once: {}", outcomes[0]["timeline"]);
}
