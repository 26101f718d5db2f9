//! Real agents (separate processes) on loopback, real QUIC and mTLS, real foca.

use std::time::{Duration, Instant};

use trellis_chaos::cluster::{Cluster, ClusterSpec};
use trellis_tests::{metric, raw_peer, raw_peer_without_certificate};

fn spec(nodes: usize) -> ClusterSpec {
    ClusterSpec { nodes, ..ClusterSpec::default() }
}

fn names(c: &Cluster, idx: &[usize]) -> Vec<String> {
    idx.iter().map(|&i| c.node(i).name.clone()).collect()
}

fn expect_all(c: &Cluster, idx: &[usize], state: &'static str) -> Vec<(String, &'static str)> {
    names(c, idx).into_iter().map(|n| (n, state)).collect()
}

#[test]
fn five_agents_joined_through_one_seed_list_each_other_alive() {
    let c = Cluster::start(spec(5)).unwrap();
    let all: Vec<usize> = (0..5).collect();
    let took = c.wait_all_see(&all, &expect_all(&c, &all, "alive"), Duration::from_secs(15)).unwrap();
    println!("5 agents converged in {took:?}");

    // The CLI shows the same table.
    let out = std::process::Command::new(trellis_chaos::cluster::trellis_bin())
        .args(["members", "--http-addr", &c.node(3).api_addr.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let table = String::from_utf8_lossy(&out.stdout);
    for n in names(&c, &all) {
        assert!(table.lines().any(|l| l.starts_with(&n) && l.contains("alive")), "{n} missing in:\n{table}");
    }
    // Metrics reflect the membership and the mTLS links.
    let m = c.node(0).api().get_text("/metrics").unwrap();
    assert_eq!(metric(&m, "trellis_members{state=\"alive\"}"), Some(4.0), "{m}");
    assert!(metric(&m, "trellis_quic_connections").unwrap() >= 1.0);
    let probes = c
        .wait_until(Duration::from_secs(5), "first probes", || {
            let m = c.node(0).api().get_text("/metrics").ok()?;
            metric(&m, "trellis_probes_total").filter(|p| *p >= 1.0)
        })
        .unwrap();
    assert!(probes >= 1.0);
}

#[test]
fn killed_agent_is_declared_down_by_all_and_alive_again_after_restart() {
    let mut c = Cluster::start(spec(4)).unwrap();
    let all: Vec<usize> = (0..4).collect();
    c.wait_all_see(&all, &expect_all(&c, &all, "alive"), Duration::from_secs(15)).unwrap();
    let before = generation_seen_by(&c, 0, 3);

    c.kill(3);
    let victim = vec![(c.node(3).name.clone(), "down")];
    // fast profile: probe 250 ms, suspicion 750 ms; the bound we promise is 5 s.
    let took = c.wait_all_see(&[0, 1, 2], &victim, Duration::from_secs(5)).unwrap();
    println!("kill -9 detected by all in {took:?}");

    c.restart(3).unwrap();
    let took = c.wait_all_see(&all, &expect_all(&c, &all, "alive"), Duration::from_secs(10)).unwrap();
    println!("restarted agent alive everywhere in {took:?}");
    let after = generation_seen_by(&c, 0, 3);
    assert!(after > before, "restarted agent must come back under a new incarnation ({before} -> {after})");
}

fn generation_seen_by(c: &Cluster, viewer: usize, subject: usize) -> u64 {
    let name = &c.node(subject).name;
    c.node(viewer)
        .api()
        .members()
        .unwrap()
        .iter()
        .filter(|m| m["name"] == name.as_str() && m["state"] == "alive")
        .map(|m| m["incarnation"].as_u64().unwrap())
        .max()
        .unwrap()
}

#[test]
fn graceful_leave_is_seen_as_left() {
    let mut c = Cluster::start(spec(3)).unwrap();
    let all: Vec<usize> = (0..3).collect();
    c.wait_all_see(&all, &expect_all(&c, &all, "alive"), Duration::from_secs(15)).unwrap();
    let (status, _) = c.node(2).api().post_json("/v1/agent/leave", &serde_json::json!({})).unwrap();
    assert_eq!(status, 200);
    c.wait_all_see(&[0, 1], &[(c.node(2).name.clone(), "left")], Duration::from_secs(5)).unwrap();
    c.wait_until(Duration::from_secs(10), "leaving agent exits", || (!c.node(2).is_running()).then_some(())).unwrap();
    c.stop(1);
    c.wait_all_see(&[0], &[(c.node(1).name.clone(), "left")], Duration::from_secs(5)).unwrap();
}

#[test]
fn agent_with_a_certificate_from_another_ca_cannot_join() {
    let mut c = Cluster::start(spec(2)).unwrap();
    c.wait_all_see(&[0, 1], &expect_all(&c, &[0, 1], "alive"), Duration::from_secs(15)).unwrap();
    let rogue_ca = c.new_ca_dir();
    let rogue_tls = rogue_ca.parent().unwrap().join("rogue-tls");
    trellis_node::pki::issue_cert(&rogue_ca, "rogue", &rogue_tls, Duration::from_secs(3600)).unwrap();
    let seed = c.node(0).peer_addr;
    let rogue = c.add_node_with_tls("rogue", rogue_tls, &[seed]).unwrap();

    // Give it several join attempts.
    std::thread::sleep(Duration::from_secs(4));
    for i in [0, 1] {
        let members = c.node(i).api().members().unwrap();
        assert!(members.iter().all(|m| m["name"] != "rogue"), "node {i} lists the rogue: {members:?}");
    }
    let rogue_members = c.node(rogue).api().members().unwrap();
    assert_eq!(rogue_members.len(), 1, "the rogue sees only itself: {rogue_members:?}");
    // The rogue refuses the cluster's server certificate (TLS 1.3: the client checks first);
    // the seed sees the aborted handshakes.
    let rm = c.node(rogue).api().get_text("/metrics").unwrap();
    assert!(metric(&rm, "trellis_handshakes_refused_total{reason=\"unknown_ca\"}").unwrap() >= 1.0, "{rm}");
    let sm = c.node(0).api().get_text("/metrics").unwrap();
    assert!(metric(&sm, "trellis_quic_incoming_failed_total").unwrap() >= 1.0, "{sm}");
}

#[test]
fn peers_with_expired_or_foreign_client_certificates_are_refused_by_reason() {
    let c = Cluster::start(spec(1)).unwrap();
    let seed = c.node(0).peer_addr;
    let dir = c.new_ca_dir().parent().unwrap().to_path_buf();
    // Expired, but from the cluster CA: the agent refuses it as expired.
    let expired = dir.join("expired-tls");
    let now = std::time::SystemTime::now();
    trellis_node::pki::issue_cert_with_validity(
        c.ca_dir(),
        "old",
        &expired,
        (now - Duration::from_secs(90 * 86_400)).into(),
        (now - Duration::from_secs(86_400)).into(),
    )
    .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let res = rt.block_on(async {
        let conn = raw_peer(&expired, seed).await?;
        // TLS 1.3 client auth fails after the client's handshake completes; the refusal
        // arrives as a close.
        tokio::time::timeout(Duration::from_secs(3), conn.closed()).await?;
        anyhow::Ok(())
    });
    println!("expired peer: {res:?}");
    // No certificate at all.
    let tls = c.node(0).tls_dir.clone();
    let res = rt.block_on(async {
        let conn = raw_peer_without_certificate(&tls, seed).await?;
        tokio::time::timeout(Duration::from_secs(3), conn.closed()).await?;
        anyhow::Ok(())
    });
    println!("peer without certificate: {res:?}");
    let m = c.node(0).api().get_text("/metrics").unwrap();
    assert!(metric(&m, "trellis_handshakes_refused_total{reason=\"expired\"}").unwrap() >= 1.0, "{m}");
    assert!(metric(&m, "trellis_handshakes_refused_total{reason=\"no_certificate\"}").unwrap() >= 1.0, "{m}");
    assert_eq!(c.node(0).api().members().unwrap().len(), 1);
    // The refusing agent's log names the reason and the fix.
    let log = std::fs::read_to_string(&c.node(0).log_path).unwrap();
    assert!(log.contains("reason=\"expired\"") || log.contains("reason=expired"), "{log}");
    assert!(log.contains("re-enroll with `trellis token create`"), "{log}");
    // An agent given the expired certificate does not start, and says why.
    let out = std::process::Command::new(trellis_chaos::cluster::trellis_bin())
        .args(["agent", "--name", "old", "--bind", "127.0.0.1:0", "--tls-dir"])
        .arg(&expired)
        .arg("--data-dir")
        .arg(dir.join("old-data"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("node.pem: expired on") && err.contains("--token"), "{err}");
}

#[test]
fn a_revoked_node_is_refused_by_every_peer_and_goes_down_everywhere() {
    let c = Cluster::start(spec(3)).unwrap();
    let all: Vec<usize> = (0..3).collect();
    c.wait_all_see(&all, &expect_all(&c, &all, "alive"), Duration::from_secs(15)).unwrap();
    let victim = c.node(2).name.clone();
    let api = c.node(0).api();
    // Validated like every kind.
    let (s, body) =
        api.put_json(&format!("/v1/policy/revocations/{victim}"), &serde_json::json!({"why": "x"})).unwrap();
    assert_eq!(s, 400, "{body}");
    assert!(body.to_string().contains("why"), "{body}");
    let t = Instant::now();
    let (s, body) = api
        .put_json(&format!("/v1/policy/revocations/{victim}"), &serde_json::json!({"reason": "key leaked"}))
        .unwrap();
    assert_eq!(s, 200, "{body}");
    let down = vec![(victim.clone(), "down")];
    let took = c.wait_all_see(&[0, 1], &down, Duration::from_secs(10)).unwrap();
    println!("revoked {victim}: down in every view {took:?} after the write ({:?} total)", t.elapsed());
    // Node 1 got the revocation by replication and refuses the victim's handshakes.
    let refused = |i: usize| {
        let m = c.node(i).api().get_text("/metrics").unwrap_or_default();
        metric(&m, "trellis_handshakes_refused_total{reason=\"revoked\"}").unwrap_or(0.0)
    };
    c.wait_until(Duration::from_secs(5), "node 1 refusing the revoked node", || (refused(1) >= 1.0).then_some(()))
        .unwrap();
    let before = refused(1);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let tls = c.node(2).tls_dir.clone();
    let target = c.node(1).peer_addr;
    let res = rt.block_on(async {
        let conn = raw_peer(&tls, target).await?;
        anyhow::Ok(tokio::time::timeout(Duration::from_secs(3), conn.closed()).await?)
    });
    println!("the revoked node's next handshake: {res:?}");
    c.wait_until(Duration::from_secs(3), "the new refusal counted", || (refused(1) > before).then_some(())).unwrap();
    let m = c.node(1).api().get_text("/metrics").unwrap();
    assert_eq!(metric(&m, "trellis_revocations"), Some(1.0));
    // A policy object: deleting it lets the node back in.
    let (s, _) = api.delete(&format!("/v1/policy/revocations/{victim}")).unwrap();
    assert_eq!(s, 200);
    c.wait_until(Duration::from_secs(5), "revocation lifted on node 1", || {
        let m = c.node(1).api().get_text("/metrics").ok()?;
        (metric(&m, "trellis_revocations")? == 0.0).then_some(())
    })
    .unwrap();
    // The victim's certificate is accepted again: the connection stays up.
    let still_open = rt.block_on(async {
        let conn = raw_peer(&tls, target).await?;
        anyhow::Ok(tokio::time::timeout(Duration::from_millis(1500), conn.closed()).await.is_err())
    });
    assert!(still_open.unwrap(), "after the delete, node 1 accepts the node again");
}

#[test]
fn random_bytes_from_a_peer_close_its_connection_and_the_agent_keeps_serving() {
    let c = Cluster::start(spec(2)).unwrap();
    c.wait_all_see(&[0, 1], &expect_all(&c, &[0, 1], "alive"), Duration::from_secs(15)).unwrap();
    let target = c.node(0).peer_addr;
    let tls = c.node(1).tls_dir.clone();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let closed = rt.block_on(async {
        let conn = raw_peer(&tls, target).await?;
        let mut x: u64 = 0x9e3779b97f4a7c15;
        for _ in 0..20 {
            let junk: Vec<u8> = (0..200)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let _ = conn.send_datagram(bytes::Bytes::from(junk));
        }
        anyhow::Ok(tokio::time::timeout(Duration::from_secs(5), conn.closed()).await?)
    });
    let reason = closed.unwrap();
    assert!(format!("{reason}").contains("malformed"), "closed with {reason}");
    let m = c.node(0).api().get_text("/metrics").unwrap();
    assert!(metric(&m, "trellis_quic_closed_malformed_total").unwrap() >= 1.0);
    // Still serving, and the honest peer is still a member.
    assert_eq!(c.node(0).api().get_json("/v1/health").unwrap()["status"], "ok");
    c.wait_all_see(&[0, 1], &expect_all(&c, &[0, 1], "alive"), Duration::from_secs(5)).unwrap();
}

#[test]
fn agent_started_before_its_seed_joins_once_the_seed_comes_up() {
    let mut c = Cluster::start(spec(1)).unwrap();
    let seed = c.node(0).peer_addr;
    c.stop(0);
    let early = c.add_node("early", &[seed]).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(c.node(early).api().members().unwrap().len(), 1, "alone while the seed is down");
    let t = Instant::now();
    c.restart(0).unwrap();
    c.wait_all_see(&[0, early], &expect_all(&c, &[0, early], "alive"), Duration::from_secs(40)).unwrap();
    println!("joined {:?} after the seed came up", t.elapsed());
}

#[test]
fn bad_api_input_gets_a_400_naming_the_field() {
    let c = Cluster::start(spec(1)).unwrap();
    let api = c.node(0).api();
    let (s, body) = api.post_json("/v1/agent/join", &serde_json::json!({"addrs": ["x"], "force": true})).unwrap();
    assert_eq!(s, 400);
    assert!(body["field"].is_string() && body["hint"].is_string(), "{body}");
    let (s, body) = api.post_json("/v1/agent/join", &serde_json::json!({"adrs": []})).unwrap();
    assert_eq!((s, body["field"].as_str()), (400, Some("adrs")), "{body}");
    let (s, body) = api.post_json("/v1/agent/join", &serde_json::json!({"addrs": [7946]})).unwrap();
    assert_eq!((s, body["field"].as_str()), (400, Some("addrs[0]")), "{body}");
    let (s, body) = api.post_raw("/v1/agent/join", "{not json").unwrap();
    assert_eq!(s, 400, "{body}");
    assert!(body["error"].as_str().unwrap().contains("key must be a string"), "{body}");
    assert_eq!(api.get_json("/v1/health").unwrap()["status"], "ok");
}

#[test]
fn bad_cli_flags_and_config_files_are_named() {
    let bin = trellis_chaos::cluster::trellis_bin();
    let out = std::process::Command::new(&bin).args(["agent", "--nmae", "x"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unexpected argument '--nmae'"));

    let dir = std::env::temp_dir().join(format!("trellis-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("agent.toml");
    std::fs::write(&file, "name = \"n1\"\nbind = \"127.0.0.1:7946\"\nexpected_size = \"big\"\n").unwrap();
    for args in [vec!["validate", file.to_str().unwrap()], vec!["agent", "--config", file.to_str().unwrap()]] {
        let out = std::process::Command::new(&bin).args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains("agent.toml: line 3") && err.contains("expected_size"), "{args:?}: {err}");
    }
    std::fs::write(&file, "name = \"n1\"\n[timing]\nprobe_period = \"1s\"\nprobe_rtt = \"3s\"\n").unwrap();
    let out = std::process::Command::new(&bin).args(["validate", file.to_str().unwrap()]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("timing.probe_rtt"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A raw request to an agent's API: (status, body).
fn api_request(
    to: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(to).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req.push_str(&format!("Host: {to}\r\n"));
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
}

#[test]
fn api_tokens_scope_reads_and_writes_and_rebinding_names_are_refused() {
    let dir = std::env::temp_dir().join(format!("trellis-tok-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (read, write) = ("r".repeat(32), "w".repeat(32));
    let tokens = dir.join("tokens");
    std::fs::write(&tokens, format!("read:{read}\nwrite:{write}\n")).unwrap();
    let args = vec![vec!["--api-tokens-file".to_string(), tokens.display().to_string()]];
    let c = Cluster::start(ClusterSpec { nodes: 1, node_args: args, ..spec(1) }).unwrap();
    let api = c.node(0).api_addr;
    let (r, w) = (format!("Bearer {read}"), format!("Bearer {write}"));
    assert_eq!(api_request(api, "GET", "/v1/health", &[], "").0, 200, "health stays open");
    assert_eq!(api_request(api, "GET", "/v1/members", &[], "").0, 401);
    assert_eq!(api_request(api, "GET", "/v1/members", &[("Authorization", &r)], "").0, 200);
    let body = r#"{"timeout": "2s"}"#;
    assert_eq!(api_request(api, "PUT", "/v1/policy/services/web", &[("Authorization", &r)], body).0, 403);
    let (s, b) = api_request(api, "PUT", "/v1/policy/services/web", &[("Authorization", &w)], body);
    assert_eq!(s, 200, "{b}");
    let evil = [("Authorization", w.as_str()), ("Host", "evil.example:8500")];
    assert_eq!(api_request(api, "GET", "/v1/members", &evil, "").0, 403, "a rebound name");
    let cross = [("Authorization", w.as_str()), ("Origin", "http://evil.example")];
    assert_eq!(api_request(api, "POST", "/v1/agent/leave", &cross, "").0, 403, "a foreign origin");
    // The CLI passes TRELLIS_HTTP_TOKEN.
    let bin = trellis_chaos::cluster::trellis_bin();
    let run = |token: &str| {
        std::process::Command::new(&bin)
            .args(["members", "--http-addr", &api.to_string()])
            .env("TRELLIS_HTTP_TOKEN", token)
            .output()
            .unwrap()
    };
    assert!(run(&read).status.success());
    assert!(!run("wrong").status.success());
    // A non-loopback API without tokens does not start.
    let out = std::process::Command::new(&bin)
        .args(["agent", "--name", "x", "--bind", "127.0.0.1:0", "--api", "0.0.0.0:0", "--tls-dir", "/nonexistent"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("api: 0.0.0.0:0 is not a loopback address") && err.contains("--api-tokens-file"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
