//! Hostile peers against real agents: a peer with a valid certificate from the cluster CA
//! that sends oversized messages, floods gossip, opens streams without end, pushes invalid
//! policy, claims another node's name, sends junk, forges a leave notice or reports a live
//! member down. Each test checks
//! that the agent keeps serving with its honest membership and accepted policy intact, and
//! that `trellis_peer_refused_total{reason}` counted the refusal.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value};
use trellis_chaos::cluster::{Cluster, ClusterSpec};
use trellis_proto::{envelope, MessageKind};
use trellis_tests::{metric, raw_peer, rss_and_fds, GossipPeer};

/// Two agents that see each other alive, with one policy object written, and optional
/// `[limits]` lines for node 0.
fn honest_pair(limits: &str) -> Cluster {
    honest_pair_with(limits, vec![])
}

/// [`honest_pair`] with more flags for node 0.
fn honest_pair_with(limits: &str, node0_args: Vec<String>) -> Cluster {
    let mut spec = ClusterSpec { nodes: 2, node_args: vec![node0_args], ..ClusterSpec::default() };
    let dir = std::env::temp_dir().join(format!("trellis-hostile-{}-{}", std::process::id(), rand_suffix()));
    if !limits.is_empty() {
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("limits.toml");
        std::fs::write(&file, format!("[limits]\n{limits}\n")).unwrap();
        spec.node_args[0].extend(["--config".into(), file.display().to_string()]);
    }
    let c = Cluster::start(spec).unwrap();
    // The agents read their config at start; only a SIGHUP would read it again.
    let _ = std::fs::remove_dir_all(&dir);
    wait_pair_alive(&c);
    let (s, b) = c.node(0).api().put_json("/v1/policy/services/web", &json!({"timeout": "2s"})).unwrap();
    assert_eq!(s, 200, "{b}");
    c.wait_until(Duration::from_secs(10), "policy on both", || {
        (c.node(1).api().get_json("/v1/policy/services/web").ok()?.get("timeout").is_some()).then_some(())
    })
    .ok();
    c
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 % 1_000_000_007
}

fn wait_pair_alive(c: &Cluster) {
    let want: Vec<(String, &str)> = (0..2).map(|i| (c.node(i).name.clone(), "alive")).collect();
    c.wait_all_see(&[0, 1], &want, Duration::from_secs(15)).unwrap();
}

/// A certificate from the cluster CA for a node that is not in the cluster.
fn mallory(c: &Cluster) -> PathBuf {
    let dir = c.root().join(format!("mallory-tls-{}", rand_suffix()));
    trellis_node::pki::issue_cert(c.ca_dir(), "mallory", &dir, Duration::from_secs(3600)).unwrap();
    dir
}

fn refused(c: &Cluster, i: usize, reason: &str) -> f64 {
    let m = c.node(i).api().get_text("/metrics").unwrap();
    metric(&m, &format!("trellis_peer_refused_total{{reason=\"{reason}\"}}"))
        .unwrap_or_else(|| panic!("no {reason} in {m}"))
}

/// (name, generation) of every member node `i` sees in `state`.
fn members_in(c: &Cluster, i: usize, state: &str) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = c
        .node(i)
        .api()
        .members()
        .unwrap()
        .iter()
        .filter(|m| m["state"] == state)
        .map(|m| (m["name"].as_str().unwrap().to_string(), m["incarnation"].as_u64().unwrap()))
        .collect();
    v.sort();
    v
}

fn policy(c: &Cluster, i: usize) -> Value {
    c.node(i).api().get_json("/v1/policy").unwrap()
}

/// The agent answers, the honest pair still sees each other alive under the same
/// generations (nobody was declared down and rejoined), and the accepted policy is as before.
fn assert_intact(c: &Cluster, alive_before: &[(String, u64)], policy_before: &Value) {
    assert_eq!(c.node(0).api().get_json("/v1/health").unwrap()["status"], "ok");
    wait_pair_alive(c);
    let alive: Vec<(String, u64)> =
        members_in(c, 0, "alive").into_iter().filter(|(n, _)| alive_before.iter().any(|(b, _)| b == n)).collect();
    assert_eq!(alive, alive_before, "honest members, same generations");
    assert_eq!(&policy(c, 0), policy_before, "accepted policy unchanged");
}

fn honest_alive(c: &Cluster) -> Vec<(String, u64)> {
    let mut v = members_in(c, 0, "alive");
    v.retain(|(n, _)| n == &c.node(0).name || n == &c.node(1).name);
    v
}

fn envelope_of(kind: MessageKind, body: &[u8]) -> bytes::Bytes {
    let mut out = Vec::new();
    envelope::encode(kind, body, &mut out);
    out.into()
}

/// Sends policy entries to node 0 as one sync message, from the peer certified by `tls`.
fn send_entries(c: &Cluster, tls: &std::path::Path, entries: Vec<trellis_proto::PolicyEntry>) {
    let data =
        envelope_of(MessageKind::PolicySync, &trellis_proto::PolicySync::Entries { entries, want: vec![] }.encode());
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let conn = raw_peer(tls, c.node(0).peer_addr).await.unwrap();
        let mut s = conn.open_uni().await.unwrap();
        s.write_all(&data).await.unwrap();
        s.finish().unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
    });
}

#[test]
fn an_oversized_stream_message_closes_only_that_connection_and_is_counted() {
    let c = honest_pair("");
    let (alive, pol) = (honest_alive(&c), policy(&c, 0));
    let tls = mallory(&c);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let reason = rt.block_on(async {
        let conn = raw_peer(&tls, c.node(0).peer_addr).await.unwrap();
        let mut s = conn.open_uni().await.unwrap();
        // 4 MiB + 1: one byte over limits.max_stream_message.
        let big = vec![0x7e; trellis_proto::limits::MAX_STREAM_MESSAGE + 1];
        let _ = s.write_all(&big).await;
        let _ = s.finish();
        tokio::time::timeout(Duration::from_secs(10), conn.closed()).await.unwrap()
    });
    assert!(reason.to_string().contains("malformed"), "{reason}");
    assert!(refused(&c, 0, "oversized") >= 1.0);
    assert_intact(&c, &alive, &pol);
}

#[test]
fn a_gossip_flood_is_rate_limited_and_honest_members_stay_alive() {
    let c = honest_pair("");
    let (alive, pol) = (honest_alive(&c), policy(&c, 0));
    let tls = mallory(&c);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sent = rt.block_on(async {
        let mut peer = GossipPeer::connect(&tls, c.node(0).peer_addr, "mallory").await.unwrap();
        // The first packet the core makes is a valid announce under its certified name.
        let announce = peer.core.poll_transmit().unwrap().data;
        peer.pump(Duration::from_secs(1)).await;
        let pkt = bytes::Bytes::from(announce);
        let mut sent = 0u32;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        for i in 0..20_000u32 {
            if tokio::time::Instant::now() > deadline {
                break;
            }
            if i % 10 == 0 {
                // Some of the flood on streams too: each is a message of its own.
                if let Ok(mut s) = peer.conn.open_uni().await {
                    let _ = s.write_all(&pkt).await;
                    let _ = s.finish();
                }
            } else if peer.conn.send_datagram_wait(pkt.clone()).await.is_err() {
                break;
            }
            sent += 1;
        }
        peer.pump(Duration::from_secs(1)).await;
        sent
    });
    println!("flood: {sent} messages sent");
    assert!(sent >= 10_000, "the flood was sent ({sent})");
    let rate = refused(&c, 0, "rate");
    println!("refused for rate: {rate}");
    assert!(rate >= 1.0, "the flood went past limits.peer_messages_per_second");
    assert_intact(&c, &alive, &pol);
}

#[test]
fn streams_beyond_the_cap_wait_and_stalled_ones_are_reset() {
    let c =
        honest_pair("max_concurrent_uni_streams = 16\nmax_concurrent_bidi_streams = 32\nstream_read_timeout = \"1s\"");
    let (alive, pol) = (honest_alive(&c), policy(&c, 0));
    let pid = c.node(0).pid().unwrap();
    let (rss_before, fds_before) = rss_and_fds(pid).unwrap();
    let tls = mallory(&c);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (uni_open_at_block, bidi_open_at_block, total_uni) = rt.block_on(async {
        let conn = raw_peer(&tls, c.node(0).peer_addr).await.unwrap();
        // Uni streams that each carry one byte and never finish: stalled messages. All are
        // held to the end (a dropped stream would finish, and one byte is junk).
        let mut held = Vec::new();
        let mut blocked_at = None;
        let until = tokio::time::Instant::now() + Duration::from_secs(4);
        while tokio::time::Instant::now() < until && held.len() < 10_000 {
            match tokio::time::timeout(Duration::from_millis(300), conn.open_uni()).await {
                Ok(Ok(mut s)) => {
                    let _ = s.write_all(&[0x7e]).await;
                    held.push(s);
                }
                Ok(Err(e)) => panic!("connection lost: {e}"),
                Err(_) => {
                    blocked_at.get_or_insert(held.len());
                }
            }
        }
        let (uni_open_at_block, total) = (blocked_at.unwrap_or(usize::MAX), held.len());
        let mut bidi = Vec::new();
        while let Ok(Ok((mut send, recv))) = tokio::time::timeout(Duration::from_millis(300), conn.open_bi()).await {
            send.write_all(&[0]).await.unwrap();
            bidi.push((send, recv));
            if bidi.len() > 10_000 {
                break;
            }
        }
        let bidi_open_at_block = bidi.len();
        conn.close(0u32.into(), b"done");
        drop((held, bidi));
        (uni_open_at_block, bidi_open_at_block, total)
    });
    println!(
        "uni streams open when blocked: {uni_open_at_block}, opened in all: {total_uni}; bidi: {bidi_open_at_block}"
    );
    assert_eq!(uni_open_at_block, 16, "the peer waits at limits.max_concurrent_uni_streams");
    assert_eq!(bidi_open_at_block, 32, "the peer waits at limits.max_concurrent_bidi_streams");
    assert!(refused(&c, 0, "stream_timeout") >= 16.0);
    let (rss_after, fds_after) = rss_and_fds(pid).unwrap();
    println!("agent RSS {rss_before} -> {rss_after} KiB, fds {fds_before} -> {fds_after}");
    assert!(rss_after < rss_before + 64 * 1024, "memory stays bounded");
    assert!(fds_after <= fds_before + 8, "no descriptor per stream");
    assert_intact(&c, &alive, &pol);
}

#[test]
fn connections_beyond_the_per_address_cap_are_refused() {
    let c = honest_pair("max_peer_connections_per_ip = 2");
    let (alive, pol) = (honest_alive(&c), policy(&c, 0));
    let tls = mallory(&c);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let results = rt.block_on(async {
        let mut held = Vec::new();
        let mut results = Vec::new();
        for _ in 0..3 {
            let r = raw_peer(&tls, c.node(0).peer_addr).await;
            results.push(r.is_ok());
            if let Ok(conn) = r {
                held.push(conn);
            }
        }
        results
    });
    assert_eq!(results, [true, true, false], "the third connection from 127.0.0.1 is refused");
    assert!(refused(&c, 0, "per_source_limit") >= 1.0);
    assert_intact(&c, &alive, &pol);
}

#[test]
fn invalid_policy_from_a_certified_peer_is_refused_counted_and_changes_nothing() {
    let c = honest_pair("");
    let (alive, pol) = (honest_alive(&c), policy(&c, 0));
    let tls = mallory(&c);
    let now = trellis_node::policy::now_ms() << 16;
    let bad = |kind: &str, name: &str, body: &str, n: u64| trellis_proto::PolicyEntry {
        kind: kind.into(),
        name: name.into(),
        version: (now + n, 99),
        ancestors: [(0, 0); 2],
        body: Some(body.into()),
        proof: None,
    };
    let entries = vec![
        // Overwrites the accepted object with a newer but invalid version.
        bad("services", "web", r#"{"timeout": "forever"}"#, 1),
        bad("splits", "canary", r#"{"service": "web", "backends": [{"subset": "v1", "weight": 97}]}"#, 2),
        bad("no-such-kind", "x", "{}", 3),
        bad("services", "web2", "not json", 4),
    ];
    send_entries(&c, &tls, entries);
    let n = c
        .wait_until(Duration::from_secs(5), "refusals counted", || {
            Some(refused(&c, 0, "invalid_policy")).filter(|v| *v >= 4.0)
        })
        .unwrap();
    assert_eq!(n, 4.0);
    assert_intact(&c, &alive, &pol);
    assert_eq!(policy(&c, 1), pol, "nothing reached the other node either");
}

/// Entries from a certified peer that sign as itself: an instance under node 1's name (with
/// node 1's writer id) and a tombstone of its own revocation, dated 50 s ahead so that a
/// revocation written within that window would lose to it.
#[test]
fn a_certified_peer_cannot_write_another_nodes_instance_or_pre_empt_its_own_revocation() {
    use trellis_core::policy::{store::fnv64, WriterAuth};
    let c = honest_pair("");
    let (alive, pol) = (honest_alive(&c), policy(&c, 0));
    let tls = mallory(&c);
    let me = trellis_node::pki::LiveIdentity::new(&trellis_node::pki::load_tls_dir(&tls).unwrap()).unwrap();
    let victim = c.node(1).name.clone();
    let now = trellis_node::policy::now_ms();
    let signed = |kind: &str, name: &str, version: (u64, u64), body: Option<String>| {
        let mut e = trellis_proto::PolicyEntry {
            kind: kind.into(),
            name: name.into(),
            version,
            ancestors: [(0, 0); 2],
            body,
            proof: None,
        };
        e.proof = Some(me.sign(&e.signed_message()).unwrap());
        e
    };
    let instance = json!({"service": "web", "address": "127.0.0.1", "port": 9, "node": victim}).to_string();
    let entries = vec![
        signed("instances", &format!("web-9@{victim}"), (now << 16, fnv64(&[victim.as_bytes()])), Some(instance)),
        signed("revocations", "mallory", ((now + 50_000) << 16, fnv64(&[b"mallory"])), None),
    ];
    let rt = tokio::runtime::Runtime::new().unwrap();
    send_entries(&c, &tls, entries);
    c.wait_until(Duration::from_secs(5), "both refused", || {
        Some(refused(&c, 0, "invalid_policy")).filter(|v| *v >= 2.0)
    })
    .unwrap();
    assert_intact(&c, &alive, &pol);
    let web = c.node(0).api().get_json("/v1/catalog/services/web");
    assert!(web.map_or(true, |w| !w.to_string().contains("web-9")), "no forged instance");
    let tomb = c.node(0).api().get_json("/v1/policy/revocations/mallory");
    assert!(tomb.is_err() || tomb.as_ref().unwrap()["body"].is_null(), "no tombstone taken: {tomb:?}");
    // No node's own API writes its revocation.
    let own = format!("/v1/policy/revocations/{}", c.node(0).name);
    let (s, b) = c.node(0).api().put_json(&own, &json!({"reason": "self"})).unwrap();
    assert_eq!((s, b["field"].as_str()), (403, Some("name")), "{b}");
    // The operator revokes mallory now, well inside the 50 s: the revocation holds everywhere.
    let (s, b) = c.node(0).api().put_json("/v1/policy/revocations/mallory", &json!({"reason": "test"})).unwrap();
    assert_eq!(s, 200, "{b}");
    for i in 0..2 {
        c.wait_until(Duration::from_secs(10), "revocation everywhere", || {
            let got = c.node(i).api().get_json("/v1/policy/revocations/mallory").ok()?;
            (got["body"]["reason"] == "test").then_some(())
        })
        .unwrap();
    }
    // TLS 1.3: the client finishes first, then the server checks its certificate and closes.
    let cut = rt.block_on(async {
        match raw_peer(&tls, c.node(1).peer_addr).await {
            Ok(conn) => tokio::time::timeout(Duration::from_secs(5), conn.closed()).await.is_ok(),
            Err(_) => true,
        }
    });
    let m = c.node(1).api().get_text("/metrics").unwrap();
    let refused_at_handshake =
        cut && metric(&m, "trellis_handshakes_refused_total{reason=\"revoked\"}").unwrap_or(0.0) >= 1.0;
    assert!(refused_at_handshake, "node 1 refuses the revoked mallory");
}

#[test]
fn gossip_under_another_nodes_name_is_refused_by_its_certificate() {
    let c = honest_pair("");
    let (alive, pol) = (honest_alive(&c), policy(&c, 0));
    let tls = mallory(&c);
    let victim = c.node(1).name.clone();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let closed = rt.block_on(async {
        // Certificate says mallory; the gossip says it is node 1.
        let mut peer = GossipPeer::connect(&tls, c.node(0).peer_addr, &victim).await.unwrap();
        peer.pump(Duration::from_secs(2)).await;
        tokio::time::timeout(Duration::from_secs(5), peer.conn.closed()).await.unwrap()
    });
    assert!(closed.to_string().contains("malformed"), "{closed}");
    assert!(refused(&c, 0, "identity") >= 1.0);
    let m = c.node(0).api().members().unwrap();
    assert!(m.iter().all(|m| m["name"] != "mallory"), "{m:?}");
    let entries: Vec<&Value> = m.iter().filter(|m| m["name"] == victim.as_str()).collect();
    assert_eq!(entries.len(), 1, "one {victim}, at its own address: {m:?}");
    assert_eq!(entries[0]["peer_addr"], c.node(1).peer_addr.to_string());
    assert_intact(&c, &alive, &pol);
}

#[test]
fn junk_and_wrong_version_envelopes_are_refused_by_kind_and_unknown_kinds_skipped() {
    let c = honest_pair("");
    let (alive, pol) = (honest_alive(&c), policy(&c, 0));
    let tls = mallory(&c);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let future = envelope::WIRE_VERSION + 1;
    let inputs: Vec<(&str, Vec<u8>)> = vec![
        ("malformed", b"\x16\x03\x01 a TLS record, not trellis".to_vec()),
        ("version", vec![envelope::MAGIC, future, MessageKind::Gossip as u8, 1, 2, 3]),
        ("malformed", vec![envelope::MAGIC, envelope::WIRE_VERSION, MessageKind::Gossip as u8, 0xff, 0xff, 0xff]),
    ];
    for (reason, bytes) in inputs {
        let before = refused(&c, 0, reason);
        let closed = rt.block_on(async {
            let conn = raw_peer(&tls, c.node(0).peer_addr).await.unwrap();
            conn.send_datagram(bytes.into()).unwrap();
            tokio::time::timeout(Duration::from_secs(5), conn.closed()).await.unwrap()
        });
        assert!(closed.to_string().contains("malformed"), "{reason}: {closed}");
        assert_eq!(refused(&c, 0, reason), before + 1.0, "{reason} counted once");
    }
    // A message kind this version does not know (a newer peer's) is counted and skipped;
    // the link stays, so a rolling upgrade keeps its connections.
    let before = refused(&c, 0, "malformed");
    let still_open = rt.block_on(async {
        let conn = raw_peer(&tls, c.node(0).peer_addr).await.unwrap();
        conn.send_datagram(vec![envelope::MAGIC, envelope::WIRE_VERSION, 200, 0].into()).unwrap();
        tokio::time::timeout(Duration::from_secs(2), conn.closed()).await.is_err()
    });
    assert!(still_open, "an unknown kind does not close the connection");
    assert_eq!(refused(&c, 0, "malformed"), before + 1.0, "the unknown kind counted once");
    assert_intact(&c, &alive, &pol);
}

#[test]
fn a_certified_peer_cannot_relabel_a_crashed_member_as_left() {
    let mut c = Cluster::start(ClusterSpec { nodes: 3, ..ClusterSpec::default() }).unwrap();
    let all: Vec<(String, &str)> = (0..3).map(|i| (c.node(i).name.clone(), "alive")).collect();
    c.wait_all_see(&[0, 1, 2], &all, Duration::from_secs(15)).unwrap();
    let crashed = c.node(2).name.clone();
    let crashed_id = c.node(0).api().members().unwrap().into_iter().find(|m| m["name"] == crashed.as_str()).unwrap();
    c.kill(2);
    c.wait_all_see(&[0, 1], &[(crashed.clone(), "down")], Duration::from_secs(10)).unwrap();
    let tls = mallory(&c);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut peer = GossipPeer::connect(&tls, c.node(0).peer_addr, "mallory").await.unwrap();
        peer.pump(Duration::from_secs(2)).await;
        let agent = peer.agent_identity().expect("joined: the agent's identity is known");
        let me = peer.core.identity().clone();
        let notice = trellis_proto::LeaveNotice {
            addr: crashed_id["peer_addr"].as_str().unwrap().parse().unwrap(),
            generation: crashed_id["incarnation"].as_u64().unwrap(),
            name: crashed.clone(),
        };
        let pkt = trellis_core::membership::broadcast_packet(&me, 0, &agent, &notice.encode()).unwrap();
        peer.conn.send_datagram(pkt.into()).unwrap();
        peer.pump(Duration::from_secs(1)).await;
    });
    let refusals = c
        .wait_until(Duration::from_secs(5), "forged leave counted", || {
            Some(refused(&c, 0, "leave_not_from_leaver")).filter(|v| *v >= 1.0)
        })
        .unwrap();
    assert!(refusals >= 1.0);
    let state = c.node(0).api().members().unwrap().into_iter().find(|m| m["name"] == crashed.as_str()).unwrap();
    assert_eq!(state["state"], "down", "a crash stays a crash: {state}");
    // A real leave still reads as left everywhere (the leaver tells each member itself).
    let (s, _) = c.node(1).api().post_json("/v1/agent/leave", &json!({})).unwrap();
    assert_eq!(s, 200);
    c.wait_all_see(&[0], &[(c.node(1).name.clone(), "left")], Duration::from_secs(5)).unwrap();
}

#[test]
fn client_connections_beyond_the_cap_are_refused_and_slow_headers_cut() {
    // Node 0 also has a per-upstream listener for `web` (an HTTP service in honest_pair's
    // policy): it is under the same caps and header deadline as the API.
    let upstream = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let limits = "max_client_connections_per_ip = 8\nheader_read_timeout = \"500ms\"";
    let c = honest_pair_with(limits, vec!["--upstream".into(), format!("web={upstream}")]);
    let api = c.node(0).api_addr;
    let hold =
        |to| -> Vec<std::net::TcpStream> { (0..12).filter_map(|_| std::net::TcpStream::connect(to).ok()).collect() };
    let held = (hold(api), hold(upstream));
    std::thread::sleep(Duration::from_millis(100));
    let m = || c.node(0).api().get_text("/metrics");
    // The held connections send nothing; after the header timeout they are closed and the
    // API answers again.
    let text = c
        .wait_until(Duration::from_secs(5), "API answers again", || m().ok().filter(|t| t.contains("trellis_client")))
        .unwrap();
    let refused = |text: &str, listener: &str, reason: &str| {
        metric(text, &format!("trellis_client_refused_total{{listener=\"{listener}\",reason=\"{reason}\"}}"))
    };
    for listener in ["api", "upstream:web"] {
        let per_source = refused(&text, listener, "per_source_limit").unwrap();
        assert!(per_source >= 4.0, "{listener}: {text}");
        let timeouts = c
            .wait_until(Duration::from_secs(5), "header timeouts counted", || {
                refused(&m().ok()?, listener, "header_timeout").filter(|v| *v >= 8.0)
            })
            .unwrap();
        assert!(timeouts >= 8.0, "{listener}");
    }
    drop(held);
    assert_eq!(c.node(0).api().get_json("/v1/health").unwrap()["status"], "ok");
    // The upstream listener serves again: web has no instance, so the proxy's own 503.
    let r = trellis_tests::http::get(upstream, "web", "/", &[]);
    assert_eq!((r.status, r.header("x-trellis-reason")), (503, Some("no_instance")), "{}", r.text());
}

#[test]
fn a_service_stream_whose_forward_header_never_comes_is_reset() {
    let c = honest_pair("stream_read_timeout = \"1s\"");
    let (alive, pol) = (honest_alive(&c), policy(&c, 0));
    let before = refused(&c, 0, "stream_timeout");
    let tls = mallory(&c);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let answer = rt.block_on(async {
        let conn = raw_peer(&tls, c.node(0).peer_addr).await.unwrap();
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        // One byte of the two-byte header length, then nothing.
        send.write_all(&[0]).await.unwrap();
        let mut buf = [0u8; 8];
        tokio::time::timeout(Duration::from_secs(10), recv.read(&mut buf)).await
    });
    let answer = answer.expect("the agent gave the stream up within the read timeout, not never");
    assert!(answer.is_err(), "the stream was reset, not answered: {answer:?}");
    assert!(refused(&c, 0, "stream_timeout") > before, "counted as stream_timeout");
    assert_intact(&c, &alive, &pol);
}

#[test]
fn a_certified_peer_reporting_a_live_member_down_only_raises_a_suspicion_it_refutes() {
    let c = Cluster::start(ClusterSpec { nodes: 3, ..ClusterSpec::default() }).unwrap();
    let all: Vec<(String, &str)> = (0..3).map(|i| (c.node(i).name.clone(), "alive")).collect();
    c.wait_all_see(&[0, 1, 2], &all, Duration::from_secs(15)).unwrap();
    let honest = |i: usize| {
        let mut v = members_in(&c, i, "alive");
        v.retain(|(n, _)| (0..3).any(|j| n == &c.node(j).name));
        v
    };
    let before: Vec<Vec<(String, u64)>> = (0..3).map(honest).collect();
    assert!(before.iter().all(|v| v.len() == 3), "{before:?}");
    let victim = c.node(2).name.clone();
    let swim_incarnation = |i: usize| {
        let m = c.node(i).api().members().unwrap();
        m.iter().find(|m| m["name"] == victim.as_str()).unwrap()["swim_incarnation"].as_u64().unwrap() as u16
    };
    let tls = mallory(&c);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let rounds = 20;
    rt.block_on(async {
        // Mallory joins through nodes 0 and 1 under its own certified name.
        let mut peers = Vec::new();
        for i in [0, 1] {
            let mut peer = GossipPeer::connect(&tls, c.node(i).peer_addr, "mallory").await.unwrap();
            peer.pump(Duration::from_secs(2)).await;
            peers.push((i, peer));
        }
        for _ in 0..rounds {
            for (i, peer) in peers.iter_mut() {
                let agent = peer.agent_identity().expect("joined: the agent's identity is known");
                let about = peer.core.members().into_iter().map(|m| m.id).find(|id| id.name == victim).unwrap();
                // "The victim is down", at the very incarnation this agent knows it by.
                let me = peer.core.identity().clone();
                let pkt =
                    trellis_core::membership::down_report_packet(&me, 0, &agent, &about, swim_incarnation(*i)).unwrap();
                peer.conn.send_datagram(pkt.into()).unwrap();
                peer.pump(Duration::from_millis(150)).await;
            }
        }
    });
    // Past a suspicion period (750 ms with the fast profile) after the last forgery.
    std::thread::sleep(Duration::from_secs(2));
    for (i, was) in before.iter().enumerate() {
        assert_eq!(&honest(i), was, "node {i}: every honest member alive under the same generation");
        let m = c.node(i).api().get_text("/metrics").unwrap();
        let downgraded = metric(&m, "trellis_gossip_downs_downgraded_total").unwrap();
        if i < 2 {
            assert!(downgraded >= f64::from(rounds), "node {i} counted the forged reports: {downgraded}");
        }
    }
    assert!(swim_incarnation(0) > 0, "the victim refuted the suspicions");
}
