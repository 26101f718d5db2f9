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
    assert_eq!(metric(&m, "trellis_members{state=\"alive\"}"), Some(5.0), "every member, this node too: {m}");
    assert_eq!(metric(&m, "trellis_peers{state=\"alive\"}"), Some(4.0), "the others: {m}");
    // The standard process series and the build.
    assert!(metric(&m, "process_resident_memory_bytes").unwrap() > 1e6, "{m}");
    assert!(metric(&m, "process_cpu_seconds_total").unwrap() > 0.0);
    assert!(metric(&m, "process_open_fds").unwrap() >= 5.0);
    let start = metric(&m, "process_start_time_seconds").unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    assert!(start < now && start > now - 120.0, "started within the test: {start} vs {now}");
    assert!(m.contains(&format!("trellis_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"))), "{m}");
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

/// An agent process started by a test itself (the harness sets no environment); killed on drop.
struct OwnAgent(std::process::Child);

impl Drop for OwnAgent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn label_of(c: &Cluster, viewer: usize, member: &str, key: &str) -> Option<String> {
    let members = c.node(viewer).api().members().ok()?;
    members
        .iter()
        .filter(|m| m["name"] == member && m["state"] == "alive")
        .find_map(|m| m["labels"][key].as_str().map(str::to_string))
}

#[test]
fn an_environment_variable_and_a_config_dir_take_effect() {
    let c = Cluster::start(spec(1)).unwrap();
    let seed = c.node(0).peer_addr;
    let ip = seed.ip();
    let dir = c.root().join("own");
    let tls = dir.join("tls");
    trellis_node::pki::issue_cert(c.ca_dir(), "layered", &tls, Duration::from_secs(3600)).unwrap();
    let conf = dir.join("conf.d");
    std::fs::create_dir_all(&conf).unwrap();
    std::fs::write(
        conf.join("10-base.toml"),
        format!("name = \"layered\"\nprofile = \"fast\"\njoin = [\"{seed}\"]\n[labels]\nzone = \"a\"\nrack = \"1\"\n"),
    )
    .unwrap();
    std::fs::write(conf.join("20-site.toml"), "[labels]\nzone = \"b\"\n").unwrap();
    let log = std::fs::File::create(dir.join("agent.log")).unwrap();
    let child = std::process::Command::new(trellis_chaos::cluster::trellis_bin())
        .args(["agent", "--config", conf.to_str().unwrap()])
        .env("TRELLIS_BIND", format!("{ip}:7999"))
        .env("TRELLIS_API", format!("{ip}:8999"))
        .env("TRELLIS_DATA_DIR", dir.join("data"))
        .env("TRELLIS_TLS_DIR", &tls)
        .env("TRELLIS_LABELS", "rack=7")
        .env_remove("TRELLIS_HTTP_ADDR")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let _agent = OwnAgent(child);
    let labels = c.wait_until(Duration::from_secs(15), "layered agent seen by n0", || {
        Some((label_of(&c, 0, "layered", "zone")?, label_of(&c, 0, "layered", "rack")?))
    });
    let log = std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default();
    assert_eq!(labels.unwrap_or_else(|e| panic!("{e}\n{log}")), ("b".to_string(), "7".to_string()));

    // An unknown TRELLIS_ variable stops the agent with its name, `validate` says the same.
    for args in [vec!["agent", "--config", conf.to_str().unwrap()], vec!["validate", conf.to_str().unwrap()]] {
        let out = std::process::Command::new(trellis_chaos::cluster::trellis_bin())
            .args(&args)
            .env("TRELLIS_LABLES", "x=1")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.contains("environment TRELLIS_LABLES: not a config variable")
                && err.contains("did you mean TRELLIS_LABELS?"),
            "{err}"
        );
    }
}

#[test]
fn sighup_reloads_labels_and_peers_see_them() {
    let dir = std::env::temp_dir().join(format!("trellis-hup-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("agent.toml");
    std::fs::write(&file, "[labels]\nzone = \"a\"\n").unwrap();
    let args = vec![vec![], vec!["--config".to_string(), file.display().to_string()]];
    let c = Cluster::start(ClusterSpec { node_args: args, ..spec(2) }).unwrap();
    c.wait_all_see(&[0, 1], &expect_all(&c, &[0, 1], "alive"), Duration::from_secs(15)).unwrap();
    assert_eq!(label_of(&c, 0, "n1", "zone").as_deref(), Some("a"));
    std::fs::write(&file, "[labels]\nzone = \"b\"\n[timing]\nprobe_period = \"300ms\"\n").unwrap();
    let pid = c.node(1).pid().unwrap();
    assert!(std::process::Command::new("kill").args(["-HUP", &pid.to_string()]).status().unwrap().success());
    c.wait_until(Duration::from_secs(10), "n0 sees zone=b on n1", || {
        (label_of(&c, 0, "n1", "zone")? == "b").then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", c.log_tail(1, 20)));
    // The peers may see the new labels before the reload's log line is written.
    let line = "reloaded: labels [zone=b]; not reloaded, restart to apply: timing";
    c.wait_until(Duration::from_secs(5), "the reload's log line", || c.log_tail(1, 200).contains(line).then_some(()))
        .unwrap_or_else(|e| panic!("one line says what changed and what needs a restart: {e}\n{}", c.log_tail(1, 50)));
    assert!(c.node(1).is_running());
    // A broken file is refused and the running config stays.
    std::fs::write(&file, "[labels]\nzone = 3\n").unwrap();
    assert!(std::process::Command::new("kill").args(["-HUP", &pid.to_string()]).status().unwrap().success());
    c.wait_until(Duration::from_secs(5), "reload refused", || {
        c.log_tail(1, 5).contains("reload refused").then_some(())
    })
    .unwrap();
    assert!(c.log_tail(1, 5).contains("agent.toml: line 2, field `labels.zone`"), "{}", c.log_tail(1, 5));
    assert_eq!(label_of(&c, 0, "n1", "zone").as_deref(), Some("b"));
    // New certificate files in the tls dir: SIGHUP swaps them in, peers stay connected.
    std::fs::write(&file, "[labels]\nzone = \"b\"\n[timing]\nprobe_period = \"300ms\"\n").unwrap();
    let expiry = || metric(&c.node(1).api().get_text("/metrics").unwrap(), "trellis_cert_expiry_seconds").unwrap();
    assert!(expiry() > 80.0 * 86400.0, "the harness issues 90-day certificates");
    let fresh = dir.join("fresh-tls");
    trellis_node::pki::issue_cert(c.ca_dir(), "n1", &fresh, Duration::from_secs(10 * 86400)).unwrap();
    for f in ["node.pem", "node.key"] {
        std::fs::copy(fresh.join(f), c.node(1).tls_dir.join(f)).unwrap();
    }
    assert!(std::process::Command::new("kill").args(["-HUP", &pid.to_string()]).status().unwrap().success());
    c.wait_until(Duration::from_secs(5), "the 10-day certificate in use", || (expiry() < 11.0 * 86400.0).then_some(()))
        .unwrap_or_else(|e| panic!("{e}\n{}", c.log_tail(1, 10)));
    assert!(c.log_tail(1, 5).contains("certificates"), "{}", c.log_tail(1, 5));
    c.wait_all_see(&[0, 1], &expect_all(&c, &[0, 1], "alive"), Duration::from_secs(5)).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

fn run_check(c: &Cluster, i: usize, json: bool) -> (i32, String) {
    let n = c.node(i);
    // No --tls-dir or --data-dir: check asks the agent where its (non-default) files are.
    let mut args = vec!["check".to_string(), "--http-addr".into(), n.api_addr.to_string()];
    if json {
        args.extend(["-o".into(), "json".into()]);
    }
    let out = std::process::Command::new(trellis_chaos::cluster::trellis_bin()).args(&args).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).to_string())
}

#[test]
fn check_passes_on_a_healthy_node_and_fails_the_ca_line_for_a_foreign_ca() {
    let mut c = Cluster::start(spec(3)).unwrap();
    let all = [0, 1, 2];
    c.wait_all_see(&all, &expect_all(&c, &all, "alive"), Duration::from_secs(15)).unwrap();
    // Peers are heard within a gossip round or two.
    std::thread::sleep(Duration::from_secs(1));
    let (code, out) = run_check(&c, 0, false);
    println!("{out}");
    assert_eq!(code, 0, "{out}");
    let names: Vec<&str> = out.lines().map(|l| l.split_whitespace().nth(1).unwrap_or("")).collect();
    assert_eq!(names, ["api", "certificate", "ca", "peers", "clock", "data_dir", "versions"], "{out}");
    assert!(out.lines().all(|l| l.starts_with("pass ")), "{out}");
    assert!(out.contains("2 members alive over UDP"), "{out}");
    let (code, json) = run_check(&c, 1, true);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!((code, v["ok"].as_bool()), (0, Some(true)), "{json}");
    assert_eq!(v["checks"].as_array().unwrap().len(), 7);

    let rogue_ca = c.new_ca_dir();
    let rogue_tls = rogue_ca.parent().unwrap().join("rogue-tls");
    trellis_node::pki::issue_cert(&rogue_ca, "rogue", &rogue_tls, Duration::from_secs(3600)).unwrap();
    let rogue = c.add_node_with_tls("rogue", rogue_tls, &[c.node(0).peer_addr]).unwrap();
    c.wait_until(Duration::from_secs(10), "the rogue's join attempts", || {
        let m = c.node(rogue).api().get_text("/metrics").ok()?;
        metric(&m, "trellis_handshakes_refused_total{reason=\"unknown_ca\"}").filter(|n| *n >= 1.0)
    })
    .unwrap();
    let (code, out) = run_check(&c, rogue, false);
    println!("{out}");
    assert_eq!(code, 1, "{out}");
    let ca = out.lines().find(|l| l.split_whitespace().nth(1) == Some("ca")).unwrap();
    assert!(ca.starts_with("fail ca") && ca.contains("refused for another CA"), "{ca}");
    assert!(ca.contains("hint: issue node.pem from the cluster's CA"), "{ca}");
    // The rogue's log names the cause of its failed join.
    let log = c.log_tail(rogue, 100);
    assert!(
        log.contains(&format!(
            "connection to {} failed: the peer's certificate is not from our CA",
            c.node(0).peer_addr
        )),
        "{log}"
    );
    assert!(log.contains("fix: issue both nodes' certificates from the same cluster CA"), "{log}");
}

#[test]
fn api_tokens_never_appear_in_the_agent_log() {
    let dir = std::env::temp_dir().join(format!("trellis-secret-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (read, write) = ("readsecret".repeat(4), "writesecret".repeat(4));
    let tokens = dir.join("tokens");
    std::fs::write(&tokens, format!("read:{read}\nwrite:{write}\n")).unwrap();
    let args = vec![
        "--api-tokens-file".to_string(),
        tokens.display().to_string(),
        "--log-level".into(),
        "trace".into(),
        "--log-format".into(),
        "json".into(),
    ];
    let c = Cluster::start(ClusterSpec { node_args: vec![args], ..spec(1) }).unwrap();
    let api = c.node(0).api_addr;
    for token in [read.as_str(), write.as_str(), "wrongtoken-wrongtoken-wrongtoken"] {
        let auth = format!("Bearer {token}");
        api_request(api, "GET", "/v1/members", &[("Authorization", &auth)], "");
        api_request(api, "PUT", "/v1/policy/services/web", &[("Authorization", &auth)], r#"{"timeout": "2s"}"#);
    }
    let pid = c.node(0).pid().unwrap();
    let _ = std::process::Command::new("kill").args(["-HUP", &pid.to_string()]).status();
    std::thread::sleep(Duration::from_millis(500));
    let log = std::fs::read_to_string(&c.node(0).log_path).unwrap();
    assert!(log.lines().count() > 5, "trace logging is on:\n{log}");
    for secret in [&read, &write, "wrongtoken-wrongtoken"] {
        assert!(!log.contains(secret), "a token is in the log");
    }
    assert!(!log.contains("PRIVATE KEY"), "a key is in the log");
    // Structured fields: every agent line carries the node.
    let started = log.lines().find(|l| l.contains("agent started")).unwrap();
    let v: serde_json::Value = serde_json::from_str(started).unwrap();
    assert_eq!(v["span"]["node"], "n0", "{started}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// What a `Type=notify` unit relies on (deploy/systemd/trellis.service): a real agent sends
/// READY=1 to `$NOTIFY_SOCKET` once it serves, and STOPPING=1 when SIGINT starts its leave.
#[test]
fn agent_notifies_ready_once_serving_and_stopping_on_sigint() {
    use std::os::unix::net::UnixDatagram;
    let c = Cluster::start(spec(1)).unwrap();
    let seed = c.node(0).peer_addr;
    // The next address of the harness's subnet (checked free when the subnet was picked).
    let std::net::IpAddr::V4(v4) = seed.ip() else { panic!("{seed} is not IPv4") };
    let [a, b, x, y] = v4.octets();
    let ip = std::net::IpAddr::V4(std::net::Ipv4Addr::new(a, b, x, y + 1));
    let (peer, api) = (std::net::SocketAddr::new(ip, seed.port()), std::net::SocketAddr::new(ip, 8500));
    let dir = c.root().join("notified");
    let tls = dir.join("tls");
    trellis_node::pki::issue_cert(c.ca_dir(), "notified", &tls, Duration::from_secs(3600)).unwrap();
    let sock_path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let log_path = dir.join("agent.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let child = std::process::Command::new(trellis_chaos::cluster::trellis_bin())
        .args(["agent", "--name", "notified", "--profile", "fast"])
        .args(["--bind", &peer.to_string(), "--api", &api.to_string(), "--join", &seed.to_string()])
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--tls-dir")
        .arg(&tls)
        .env("NOTIFY_SOCKET", &sock_path)
        .env_remove("TRELLIS_HTTP_ADDR")
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut agent = OwnAgent(child);
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let mut buf = [0u8; 512];
    let mut recv = |what: &str| {
        let n = sock.recv(&mut buf).unwrap_or_else(|e| panic!("no {what} within 20 s ({e}); log:\n{}", log()));
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };

    let ready = recv("READY=1");
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");
    assert!(ready.lines().any(|l| l.starts_with("STATUS=serving")), "{ready:?}");
    // Ready means serving: the first API request after it succeeds, no retry loop.
    let health = trellis_chaos::http::Api::new(api).get_json("/v1/health").unwrap();
    assert_eq!(health["name"], "notified");
    c.wait_all_see(&[0], &[("notified".to_string(), "alive")], Duration::from_secs(10)).unwrap();

    let pid = agent.0.id().to_string();
    assert!(std::process::Command::new("kill").args(["-INT", &pid]).status().unwrap().success());
    let stopping = recv("STOPPING=1");
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping:?}");
    // SIGINT is a graceful leave: the seed sees `left` (not `down`) and the agent exits 0.
    c.wait_all_see(&[0], &[("notified".to_string(), "left")], Duration::from_secs(5)).unwrap();
    let status =
        c.wait_until(Duration::from_secs(10), "the agent to exit", || agent.0.try_wait().ok().flatten()).unwrap();
    assert!(status.success(), "exit {status}; log:\n{}", log());
}

/// `trellis dev` as a new user meets it: its printed commands work, its logs are clean, and
/// its agents never outlive it.
#[test]
fn dev_shows_a_call_across_the_mesh_and_its_agents_stop_with_it() {
    let dir = std::env::temp_dir().join(format!("trellis-dev-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (mut dev, printed) = start_dev(&dir);
    println!("{printed}");
    // 1. The printed call by name through node1 is answered by an instance on another node.
    let curl = printed.lines().find(|l| l.contains("curl -s -H 'Host: web'")).expect("a call to try");
    let url = curl.split_whitespace().last().unwrap();
    let proxy: std::net::SocketAddr = url.trim_start_matches("http://").trim_end_matches("/hello").parse().unwrap();
    let answers: Vec<String> = (0..4).map(|_| trellis_tests::http::get(proxy, "web", "/hello", &[]).text()).collect();
    for a in &answers {
        assert!(a.starts_with("web-") && a.contains(" answered GET /hello"), "{answers:?}");
        assert!(!a.contains("on node1 "), "an instance on another node answers: {answers:?}");
    }
    let who: std::collections::BTreeSet<&str> = answers.iter().filter_map(|a| a.split(' ').next()).collect();
    assert_eq!(who.len(), 2, "round robin over both instances: {answers:?}");
    // The printed `stat` line: the four calls above, merged from every agent, by answering node.
    let stat = printed.lines().find(|l| l.contains(" stat web")).expect("a stat command to try");
    let by: Vec<&str> = stat.split_whitespace().skip(1).collect();
    wait_for(Duration::from_secs(10), "the calls in trellis stat", || {
        let out = trellis("127.0.0.2:8500", &by);
        let requests_seen = out.lines().filter(|l| l.starts_with("node2 ") || l.starts_with("node3 ")).count();
        requests_seen == 2
    });
    // The printed `dns` line: node1's DNS interface answers both instances' addresses.
    let dns = printed.lines().find(|l| l.contains(" dns web.service.trellis")).expect("a dns command to try");
    let args: Vec<&str> = dns.split('#').next().unwrap().split_whitespace().skip(1).collect();
    let out = trellis("127.0.0.2:8500", &args);
    assert!(out.contains("NOERROR") && out.contains("web.service.trellis.\t5\tA\t"), "{out}");
    // 2. The catalog CLI: the demo service, then an instance registered from a file and removed.
    let api = "127.0.0.2:8500";
    let services = trellis(api, &["services"]);
    let row = services.lines().map(|l| l.split_whitespace().collect::<Vec<_>>()).find(|r| r.first() == Some(&"web"));
    let row = row.unwrap_or_else(|| panic!("{services}"));
    assert_eq!([row[0], row[1], row[2], row[4]], ["web", "2/2", "http", "node2,node3"], "{services}");
    assert!(row[3].starts_with("127.100.") && row[3].ends_with(":9080"), "web's virtual address: {services}");
    // The printed call as an unchanged app makes it: web.trellis, resolved to node1's virtual address.
    let resolve = printed.lines().find(|l| l.contains("--resolve web.trellis")).expect("a call by virtual address");
    let vip = resolve.split_whitespace().skip_while(|w| *w != "--resolve").nth(1).unwrap();
    let vip: std::net::SocketAddr =
        vip.trim_start_matches("web.trellis:9080:").parse::<std::net::IpAddr>().map(|ip| (ip, 9080).into()).unwrap();
    assert_eq!(vip.to_string(), row[3]);
    let answer = trellis_tests::http::get(vip, "web.trellis:9080", "/hello", &[]).text();
    assert!(answer.starts_with("web-") && answer.contains(" answered GET /hello"), "{answer}");
    let file = dir.join("api.yaml");
    std::fs::write(&file, "api-1:\n  service: api\n  address: 127.0.0.2\n  port: 9\n  protocol: http2\n").unwrap();
    assert!(trellis(api, &["services", "register", "-f", file.to_str().unwrap()]).contains("registered api-1@node1"));
    let json: serde_json::Value = serde_json::from_str(&trellis(api, &["services", "-o", "json"])).unwrap();
    assert_eq!(json["api"][0]["protocol"], "http2", "{json}");
    trellis(api, &["services", "deregister", "api-1"]);
    assert!(!trellis(api, &["services"]).contains("api "), "deregistered");
    // 3. The printed deny takes effect on /admin/*, and its undo.
    let apply = printed.lines().find(|l| l.contains("policy apply -f")).unwrap();
    trellis(api, &["policy", "apply", "-f", apply.split_whitespace().last().unwrap()]);
    let status = |path: &str| trellis_tests::http::get(proxy, "web", path, &[]).status;
    wait_for(Duration::from_secs(10), "the deny on /admin/*", || status("/admin/users") == 403);
    assert_eq!(status("/hello"), 200, "other paths still allowed");
    trellis(api, &["policy", "delete", "intentions", "demo-deny-admin"]);
    wait_for(Duration::from_secs(10), "the undo", || status("/admin/users") == 200);
    // `check` finds the agent's own dirs with no flag but --http-addr.
    let out = std::process::Command::new(trellis_chaos::cluster::trellis_bin())
        .args(["check", "--http-addr", api])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.lines().all(|l| l.starts_with("pass ")), "{text}");
    assert!(text.contains(&dir.join("node1/tls/node.pem").display().to_string()), "{text}");

    // SIGTERM: dev stops its agents gracefully and exits.
    kill(dev.id(), "-TERM");
    let status = wait_exit(&mut dev, Duration::from_secs(20));
    assert!(status.success(), "dev exits cleanly on SIGTERM: {status:?}");
    assert_eq!(agents_of(&dir), Vec::<u32>::new(), "no agent outlives dev");
    for i in 1..=3 {
        let log = std::fs::read_to_string(dir.join(format!("node{i}/agent.log"))).unwrap();
        assert!(!log.contains('\u{1b}'), "no escape codes in node{i}'s log");
        assert!(!log.contains(" WARN ") && !log.contains(" ERROR "), "node{i}'s log is clean:\n{log}");
        assert!(log.contains("stdin closed"), "node{i} left because dev told it to:\n{log}");
    }
    // SIGKILL: dev cannot clean up, and its agents still go.
    let (mut dev, _) = start_dev(&dir);
    assert_eq!(agents_of(&dir).len(), 3);
    kill(dev.id(), "-KILL");
    wait_exit(&mut dev, Duration::from_secs(5));
    wait_for(Duration::from_secs(15), "the agents of a killed dev to exit", || agents_of(&dir).is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Starts `trellis dev --dir DIR` and reads its stdout up to the line that says how to stop it.
fn start_dev(dir: &std::path::Path) -> (std::process::Child, String) {
    use std::io::BufRead;
    let mut dev = std::process::Command::new(trellis_chaos::cluster::trellis_bin())
        .args(["dev", "--dir", dir.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = dev.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut printed = String::new();
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            printed.push_str(&line);
            printed.push('\n');
            if line.contains("stops the cluster") {
                let _ = tx.send(printed.clone());
            }
        }
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(printed) => (dev, printed),
        Err(_) => {
            let _ = dev.kill();
            panic!("trellis dev printed no ready line within 60 s");
        }
    }
}

/// Runs the CLI against `api`; its stdout, after asserting it succeeded.
fn trellis(api: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(trellis_chaos::cluster::trellis_bin())
        .args(args)
        .env("TRELLIS_HTTP_ADDR", api)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "trellis {args:?}: {text}{}", String::from_utf8_lossy(&out.stderr));
    text
}

fn kill(pid: u32, signal: &str) {
    std::process::Command::new("kill").args([signal, &pid.to_string()]).status().unwrap();
}

fn wait_exit(child: &mut std::process::Child, within: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(start.elapsed() < within, "process {} still running after {within:?}", child.id());
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_for(within: Duration, what: &str, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < within, "waited {within:?} for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Pids of agent processes whose command line names `dir` (the dev cluster's).
fn agents_of(dir: &std::path::Path) -> Vec<u32> {
    let needle = dir.display().to_string();
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(" agent ") && cmd.contains(&needle) {
            // A zombie has exited; only its parent has not reaped it yet.
            let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
            if !stat.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z') {
                pids.push(pid);
            }
        }
    }
    pids
}
