//! Service traffic through the mesh: real agents, real TCP servers, QUIC mTLS between nodes.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use serde_json::json;
use trellis_chaos::cluster::{Cluster, ClusterSpec};
use trellis_tests::metric;

/// A TCP server that first writes `greeting\n`, then echoes everything back.
fn echo_server(greeting: &'static str) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                let _ = s.write_all(format!("{greeting}\n").as_bytes());
                let mut r = s.try_clone().unwrap();
                let _ = std::io::copy(&mut r, &mut s);
            });
        }
    });
    addr
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Three agents, all alive everywhere; node 0 gets `node0_args`.
fn three_agents(node0_args: Vec<String>) -> Cluster {
    let c = Cluster::start(ClusterSpec { nodes: 3, node_args: vec![node0_args], ..Default::default() }).unwrap();
    let all = [0, 1, 2];
    let alive: Vec<(String, &str)> = all.iter().map(|&i| (c.node(i).name.clone(), "alive")).collect();
    c.wait_all_see(&all, &alive, Duration::from_secs(15)).unwrap();
    c
}

/// Three agents; node 0 has an `echo` upstream listener; returns (cluster, listener address).
fn mesh(extra: Vec<String>) -> (Cluster, SocketAddr) {
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut args0 = vec!["--upstream".to_string(), format!("echo={listen}")];
    args0.extend(extra);
    (three_agents(args0), listen)
}

/// Three agents; node 0 runs the HTTP proxy listener; returns (cluster, proxy address).
fn proxy_mesh() -> (Cluster, SocketAddr) {
    let proxy: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    (three_agents(vec!["--proxy".into(), proxy.to_string()]), proxy)
}

fn register(c: &Cluster, node: usize, id: &str, server: SocketAddr) {
    let body = json!({"service": "echo", "address": server.ip().to_string(), "port": server.port(), "protocol": "tcp"});
    let (s, v) = c.node(node).api().put_json(&format!("/v1/agent/services/{id}"), &body).unwrap();
    assert_eq!(s, 200, "{v}");
}

fn wait_instances(c: &Cluster, viewer: usize, n: usize) {
    c.wait_until(Duration::from_secs(10), "instances in the catalog", || {
        let v = c.node(viewer).api().get_json("/v1/catalog/services/echo").ok()?;
        (v.as_array()?.len() == n).then_some(())
    })
    .unwrap();
}

fn greeting(listen: SocketAddr) -> Option<String> {
    let mut s = TcpStream::connect(listen).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).ok()?;
    (n > 0).then(|| String::from_utf8_lossy(&buf[..n]).trim().to_string())
}

#[test]
fn a_tcp_echo_on_another_node_carries_100_mib_intact() {
    let (c, listen) = mesh(vec![]);
    register(&c, 2, "echo-1", echo_server("n2"));
    wait_instances(&c, 0, 1);
    let mut s = TcpStream::connect(listen).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut line = [0u8; 3];
    s.read_exact(&mut line).unwrap();
    assert_eq!(&line, b"n2\n");
    echo_100_mib(s);
    let m = c.node(2).api().get_text("/metrics").unwrap();
    assert!(metric(&m, "trellis_forward_inbound_total").unwrap() >= 1.0);
    // Loopback carries jumbo datagrams: path MTU discovery climbs past Ethernet's 1472
    // bytes (quinn's endpoint default used to cap it there), and stays there: a GSO batch
    // over 64 KiB would fail, count as loss, and black-hole detection would fall to 1200.
    let m = c.node(0).api().get_text("/metrics").unwrap();
    let mtu = metric(&m, &format!("trellis_quic_path_mtu_bytes{{peer=\"{}\"}}", c.node(2).name));
    assert!(mtu.is_some_and(|m| m > 1472.0), "path MTU to node 2: {mtu:?}\n{m}");
}

/// Sends 100 MiB of pseudo-random bytes through `s` (an echo behind the mesh) and checks
/// every byte comes back, in order.
fn echo_100_mib(mut s: TcpStream) {
    const TOTAL: usize = 100 << 20;
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let mut x: u64 = 0x243f6a8885a308d3;
        let mut chunk = vec![0u8; 64 << 10];
        let mut sum: u64 = 0;
        for _ in 0..TOTAL / chunk.len() {
            for b in chunk.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
                sum = sum.wrapping_mul(31).wrapping_add(*b as u64);
            }
            w.write_all(&chunk).unwrap();
        }
        w.shutdown(std::net::Shutdown::Write).unwrap();
        sum
    });
    let start = std::time::Instant::now();
    let (mut got, mut sum, mut buf) = (0usize, 0u64, vec![0u8; 64 << 10]);
    loop {
        let n = s.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        for b in &buf[..n] {
            sum = sum.wrapping_mul(31).wrapping_add(*b as u64);
        }
        got += n;
    }
    let sent = writer.join().unwrap();
    println!("100 MiB echoed through the mesh in {:?}", start.elapsed());
    assert_eq!(got, TOTAL);
    assert_eq!(sum, sent, "echoed bytes differ from the sent bytes");
}

#[test]
fn connections_are_spread_over_instances_on_two_nodes() {
    let (c, listen) = mesh(vec![]);
    register(&c, 1, "echo-a", echo_server("a"));
    register(&c, 2, "echo-b", echo_server("b"));
    wait_instances(&c, 0, 2);
    let mut counts = std::collections::HashMap::new();
    for _ in 0..40 {
        *counts.entry(greeting(listen).unwrap()).or_insert(0) += 1;
    }
    assert_eq!(counts.get("a"), Some(&20), "{counts:?}");
    assert_eq!(counts.get("b"), Some(&20), "{counts:?}");
}

#[test]
fn intentions_deny_then_allow_the_caller() {
    let (c, listen) = mesh(vec![]);
    register(&c, 2, "echo-1", echo_server("n2"));
    wait_instances(&c, 0, 1);
    let caller = c.node(0).api().get_json("/v1/agent/self").unwrap()["id"].as_str().unwrap().to_string();
    let put = |path: &str, body: serde_json::Value| {
        let (s, v) = c.node(1).api().put_json(path, &body).unwrap();
        assert_eq!(s, 200, "{v}");
    };
    put("/v1/policy/intentions/deny-all-echo", json!({"source": "*", "destination": "echo", "action": "deny"}));
    c.wait_until(Duration::from_secs(10), "deny in force", || greeting(listen).is_none().then_some(())).unwrap();
    let m = c.node(2).api().get_text("/metrics").unwrap();
    assert!(metric(&m, "trellis_forward_denied_total").unwrap() >= 1.0);
    put("/v1/policy/intentions/allow-n0", json!({"source": caller, "destination": "echo", "action": "allow"}));
    c.wait_until(Duration::from_secs(10), "allow in force", || (greeting(listen)? == "n2").then_some(())).unwrap();
}

#[test]
fn instances_of_a_killed_node_leave_the_catalog() {
    let (mut c, listen) = mesh(vec![]);
    register(&c, 1, "echo-a", echo_server("a"));
    register(&c, 2, "echo-b", echo_server("b"));
    wait_instances(&c, 0, 2);
    c.kill(2);
    wait_instances(&c, 0, 1);
    for _ in 0..10 {
        assert_eq!(greeting(listen).as_deref(), Some("a"));
    }
    let (s, body) = c.node(0).api().put_json("/v1/policy/instances/x@n1", &json!({})).unwrap();
    assert_eq!((s, body["field"].as_str()), (400, Some("kind")), "operators cannot write node-owned instances");
}

/// One request through the proxy; returns (status line, body).
fn http_get(proxy: SocketAddr, host: &str, path: &str) -> (String, String) {
    let mut s = TcpStream::connect(proxy).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out.lines().next().unwrap_or("").to_string();
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

#[test]
fn http_requests_are_routed_by_host_and_split_ninety_ten_across_nodes() {
    let (c, proxy) = proxy_mesh();
    for (node, version) in [(1, "v1"), (2, "v2")] {
        let srv = trellis_tests::http::server(if version == "v1" { "v1" } else { "v2" });
        let body =
            json!({"service": "web", "address": "127.0.0.1", "port": srv.port(), "labels": {"version": version}});
        let (s, v) = c.node(node).api().put_json(&format!("/v1/agent/services/web-{version}"), &body).unwrap();
        assert_eq!(s, 200, "{v}");
    }
    let api = c.node(0).api();
    for (kind, name, body) in [
        ("subsets", "v1", json!({"service": "web", "labels": {"version": "v1"}})),
        ("subsets", "v2", json!({"service": "web", "labels": {"version": "v2"}})),
        (
            "splits",
            "web-canary",
            json!({"service": "web", "backends": [{"subset": "v1", "weight": 90}, {"subset": "v2", "weight": 10}]}),
        ),
        (
            "routes",
            "api",
            json!({"service": "web", "match": {"path": {"prefix": "/api"}}, "destination": {"subset": "v2"}, "rewrite_prefix": "/v2api"}),
        ),
    ] {
        let (s, v) = api.put_json(&format!("/v1/policy/{kind}/{name}"), &body).unwrap();
        assert_eq!(s, 200, "{v}");
    }
    c.wait_until(Duration::from_secs(10), "both instances routable", || {
        let v = c.node(0).api().get_json("/v1/catalog/services/web").ok()?;
        (v.as_array()?.len() == 2).then_some(())
    })
    .unwrap();
    let mut v2 = 0;
    let n = 10_000;
    let start = std::time::Instant::now();
    for _ in 0..n {
        let (status, body) = http_get(proxy, "web.trellis", "/");
        assert!(status.contains("200"), "{status} {body}");
        if body.starts_with("v2") {
            v2 += 1;
        }
    }
    println!("{n} requests through the mesh in {:?}: {v2} to v2", start.elapsed());
    // Within 2 percentage points of 10%.
    assert!((800..=1200).contains(&v2), "a 90/10 split sent {v2} of {n} to v2");
    // A route with a prefix rewrite goes to v2 with the new path.
    let (status, body) = http_get(proxy, "web", "/api/items");
    assert!(status.contains("200"), "{status}");
    assert_eq!(body, "v2 /v2api/items");
    // No instance: 503; malformed HTTP: 400, and the proxy keeps serving.
    let (status, _) = http_get(proxy, "nothing-here", "/");
    assert!(status.contains("503"), "{status}");
    let mut s = TcpStream::connect(proxy).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"NOT HTTP AT ALL\r\n\r\n").unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    assert!(out.starts_with("HTTP/1.1 400"), "{out:?}");
    assert!(http_get(proxy, "web", "/").0.contains("200"));
}

/// Like `trellis_tests::http::server`, but stops accepting (connections refused) once `stop` is set.
fn stoppable_http_server(body: &'static str) -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicBool>) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.set_nonblocking(true).unwrap();
    let addr = l.local_addr().unwrap();
    let flag = stop.clone();
    std::thread::spawn(move || {
        while !flag.load(Ordering::Relaxed) {
            match l.accept() {
                Ok((mut s, _)) => {
                    s.set_nonblocking(false).unwrap();
                    let mut buf = [0u8; 4096];
                    let _ = s.read(&mut buf);
                    let resp =
                        format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
                    let _ = s.write_all(resp.as_bytes());
                }
                Err(_) => std::thread::sleep(Duration::from_millis(1)),
            }
        }
    });
    (addr, stop)
}

#[test]
fn idempotent_gets_see_no_errors_when_an_instance_dies() {
    let (c, proxy) = proxy_mesh();
    let (a, stop_a) = stoppable_http_server("a");
    let (b, _stop_b) = stoppable_http_server("b");
    for (node, id, srv) in [(1, "api-a", a), (2, "api-b", b)] {
        let body = json!({"service": "api", "address": "127.0.0.1", "port": srv.port()});
        let (s, v) = c.node(node).api().put_json(&format!("/v1/agent/services/{id}"), &body).unwrap();
        assert_eq!(s, 200, "{v}");
    }
    c.wait_until(Duration::from_secs(10), "both instances", || {
        (c.node(0).api().get_json("/v1/catalog/services/api").ok()?.as_array()?.len() == 2).then_some(())
    })
    .unwrap();
    let mut served = std::collections::HashMap::new();
    for i in 0..200 {
        if i == 50 {
            stop_a.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        let (status, body) = http_get(proxy, "api", "/");
        assert!(status.contains("200"), "request {i}: {status} {body}");
        *served.entry(body).or_insert(0) += 1;
    }
    println!("served: {served:?}");
    let m = c.node(0).api().get_text("/metrics").unwrap();
    let retries = metric(&m, "trellis_forward_retries_total").unwrap();
    assert!(retries >= 1.0, "the dead instance was retried around");
    // Five failures in a row eject it (default policy), so it stops costing retries.
    assert!(retries <= 10.0, "{retries} retries: the dead instance was not ejected");
    assert!(metric(&m, "trellis_forward_ejections_total").unwrap() >= 1.0);
}

#[test]
fn grpc_over_http2_crosses_the_mesh_with_body_and_trailers_intact() {
    use trellis_tests::h2;
    let (c, proxy) = proxy_mesh();
    let server = h2::echo_server("n2");
    let body = json!({"service": "greeter", "address": "127.0.0.1", "port": server.port(), "protocol": "grpc"});
    let (s, v) = c.node(2).api().put_json("/v1/agent/services/greeter-1", &body).unwrap();
    assert_eq!(s, 200, "{v}");
    c.wait_until(Duration::from_secs(10), "the instance in node 0's catalog", || {
        let v = c.node(0).api().get_json("/v1/catalog/services/greeter").ok()?;
        (v.as_array()?.len() == 1).then_some(())
    })
    .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    // A 1 MiB message of known bytes, over HTTP/2 with prior knowledge, as gRPC sends it.
    let payload: Vec<u8> = (0..1u32 << 20).map(|i| (i.wrapping_mul(2654435761) >> 24) as u8).collect();
    let reply = rt
        .block_on(h2::post(proxy, "greeter.trellis", "/helloworld.Greeter/SayHello", payload.clone().into()))
        .unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(reply.served_by, "n2");
    assert!(reply.body == payload, "the echoed body differs ({} bytes back)", reply.body.len());
    assert_eq!(reply.grpc_status.as_deref(), Some("0"), "the grpc-status trailer was lost");
    // An HTTP/1.1 client reaches the same HTTP/2 instance; the proxy speaks h2 upstream.
    let (status, body) = http_get(proxy, "greeter", "/");
    assert!(status.contains("200"), "{status}");
    assert_eq!(body, "");
}

/// One request with extra headers; returns the body.
fn http_get_with(proxy: SocketAddr, host: &str, header: (&str, &str)) -> String {
    let r = trellis_tests::http::get(proxy, host, "/", &[header]);
    assert_eq!(r.status, 200, "{} {}", r.headers, r.text());
    r.text()
}

#[test]
fn maglev_on_a_header_keeps_each_user_on_one_instance_and_spreads_users() {
    let (c, proxy) = proxy_mesh();
    for (node, name) in [(1, "one"), (2, "two")] {
        let srv = trellis_tests::http::server(name);
        let body = json!({"service": "web", "address": "127.0.0.1", "port": srv.port()});
        let (s, v) = c.node(node).api().put_json(&format!("/v1/agent/services/web-{name}"), &body).unwrap();
        assert_eq!(s, 200, "{v}");
    }
    let lb = json!({"lb": {"policy": "maglev", "hash_header": "x-user"}});
    let (s, v) = c.node(1).api().put_json("/v1/policy/services/web", &lb).unwrap();
    assert_eq!(s, 200, "{v}");
    c.wait_until(Duration::from_secs(10), "two instances and the lb policy on node 0", || {
        let v = c.node(0).api().get_json("/v1/catalog/services/web").ok()?;
        let p = c.node(0).api().get_json("/v1/policy/services/web").ok()?;
        (v.as_array()?.len() == 2 && p.to_string().contains("maglev")).then_some(())
    })
    .unwrap();
    let mut homes = std::collections::HashMap::new();
    for u in 0..20 {
        let user = format!("user-{u}");
        let first = http_get_with(proxy, "web", ("x-user", &user));
        for _ in 0..5 {
            assert_eq!(http_get_with(proxy, "web", ("x-user", &user)), first, "{user} moved");
        }
        *homes.entry(first).or_insert(0) += 1;
    }
    assert_eq!(homes.len(), 2, "20 users all landed on one instance: {homes:?}");
    let m = c.node(0).api().get_text("/metrics").unwrap();
    let ok = metric(&m, "trellis_requests_total{service=\"web\",direction=\"outbound\",class=\"2xx\"}");
    assert_eq!(ok, Some(120.0), "{m}");
    assert_eq!(metric(&m, "trellis_request_duration_seconds_count{service=\"web\"}"), Some(120.0));
    assert_eq!(metric(&m, "trellis_request_duration_seconds_bucket{service=\"web\",le=\"+Inf\"}"), Some(120.0));
}

#[test]
fn timeouts_open_circuits_and_retry_budgets_hold_on_real_agents() {
    use trellis_tests::http::{get, slow_server};
    let (c, proxy) = proxy_mesh();
    let services = [
        ("slow", slow_server(Duration::from_secs(3), 200, "late")),
        ("busy", slow_server(Duration::from_millis(800), 200, "done")),
        ("broken", slow_server(Duration::ZERO, 500, "oops")),
    ];
    for (name, srv) in services {
        let body = json!({"service": name, "address": "127.0.0.1", "port": srv.port()});
        let (s, v) = c.node(1).api().put_json(&format!("/v1/agent/services/{name}-1"), &body).unwrap();
        assert_eq!(s, 200, "{v}");
    }
    let policies = [
        ("slow", json!({"timeout": "300ms"})),
        ("busy", json!({"circuit_breaker": {"max_requests": 2}})),
        ("broken", json!({"retry": {"attempts": 3, "on": ["5xx"], "budget_percent": 0, "min_retries_per_second": 0}})),
    ];
    for (name, body) in &policies {
        let (s, v) = c.node(0).api().put_json(&format!("/v1/policy/services/{name}"), body).unwrap();
        assert_eq!(s, 200, "{v}");
    }
    c.wait_until(Duration::from_secs(10), "three instances on node 0", || {
        let v = c.node(0).api().get_json("/v1/catalog/services").ok()?;
        (v.to_string().matches("\"node\"").count() >= 3).then_some(())
    })
    .unwrap();
    // Timeout: a 3 s answer is cut at 300 ms with 504.
    let t = std::time::Instant::now();
    let r = get(proxy, "slow", "/", &[]);
    assert_eq!((r.status, r.header("x-trellis-reason")), (504, Some("timeout")), "{}", r.text());
    assert!(t.elapsed() < Duration::from_secs(2), "took {:?}", t.elapsed());
    // Circuit: six at once to a service allowing two in flight: four fail fast with 503.
    let replies: Vec<(u16, Option<String>)> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..6)
            .map(|_| {
                s.spawn(|| {
                    let r = get(proxy, "busy", "/", &[]);
                    (r.status, r.header("x-trellis-reason").map(String::from))
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let open = replies.iter().filter(|(s, why)| *s == 503 && why.as_deref() == Some("circuit_open")).count();
    let ok = replies.iter().filter(|(s, _)| *s == 200).count();
    assert!(ok >= 2 && open >= 3 && ok + open == 6, "{replies:?}");
    // Budget: a zero retry budget means a 500 is not retried, and the refusal is counted.
    let r = get(proxy, "broken", "/", &[]);
    assert_eq!(r.status, 500);
    let m = c.node(0).api().get_text("/metrics").unwrap();
    assert!(metric(&m, "trellis_forward_retry_budget_exhausted_total").unwrap() >= 1.0, "{m}");
    assert!(metric(&m, "trellis_forward_circuit_open_total").unwrap() >= 3.0);
    assert!(metric(&m, "trellis_forward_timeouts_total").unwrap() >= 1.0);
}

#[test]
fn an_instance_failing_its_health_check_gets_no_traffic_until_it_passes_again() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use trellis_tests::http::{health_server, server};
    let (c, proxy) = proxy_mesh();
    let healthy = std::sync::Arc::new(AtomicBool::new(true));
    let one = server("one");
    let two = health_server("two", healthy.clone());
    let check = json!({"http": "/healthz", "interval": "200ms", "timeout": "150ms", "rise": 1, "fall": 2});
    for (node, name, srv, check) in [(1, "one", one, None), (2, "two", two, Some(check))] {
        let mut body = json!({"service": "web", "address": "127.0.0.1", "port": srv.port()});
        if let Some(check) = check {
            body["check"] = check;
        }
        let (s, v) = c.node(node).api().put_json(&format!("/v1/agent/services/web-{name}"), &body).unwrap();
        assert_eq!(s, 200, "{v}");
    }
    let health_of_two = |want: &'static str| {
        c.wait_until(Duration::from_secs(10), want, || {
            let v = c.node(0).api().get_json("/v1/catalog/services/web").ok()?;
            let two =
                v.as_array()?.iter().find(|i| i["name"].as_str().is_some_and(|n| n.starts_with("web-two")))?.clone();
            (two["health"] == want).then_some(())
        })
        .unwrap()
    };
    health_of_two("passing");
    let spread = |n| -> std::collections::HashMap<String, u32> {
        let mut seen = std::collections::HashMap::new();
        for _ in 0..n {
            let (status, body) = http_get(proxy, "web", "/");
            assert!(status.contains("200"), "{status}");
            *seen.entry(body.split_whitespace().next().unwrap_or("").to_string()).or_insert(0) += 1;
        }
        seen
    };
    assert_eq!(spread(20).len(), 2, "both instances serve while both pass");
    healthy.store(false, Ordering::SeqCst);
    health_of_two("critical");
    let seen = spread(30);
    assert_eq!(seen.get("two"), None, "a critical instance got traffic: {seen:?}");
    healthy.store(true, Ordering::SeqCst);
    health_of_two("passing");
    assert_eq!(spread(20).len(), 2, "back in rotation after it passes again");
}

#[test]
fn a_killed_node_costs_failures_only_within_the_detection_window() {
    let (mut c, proxy) = proxy_mesh();
    for (node, name) in [(1, "one"), (2, "two")] {
        let srv = trellis_tests::http::server(name);
        let body = json!({"service": "api", "address": "127.0.0.1", "port": srv.port()});
        let (s, v) = c.node(node).api().put_json(&format!("/v1/agent/services/api-{name}"), &body).unwrap();
        assert_eq!(s, 200, "{v}");
    }
    c.wait_until(Duration::from_secs(10), "both instances", || {
        (c.node(0).api().get_json("/v1/catalog/services/api").ok()?.as_array()?.len() == 2).then_some(())
    })
    .unwrap();
    let t0 = std::time::Instant::now();
    let kill_at = Duration::from_secs(2);
    let mut killed = false;
    let mut failures = Vec::new();
    let mut after = 0;
    while t0.elapsed() < Duration::from_secs(10) {
        if !killed && t0.elapsed() >= kill_at {
            c.kill(2);
            killed = true;
        }
        let at = t0.elapsed();
        let (status, _) = http_get(proxy, "api", "/");
        if !status.contains("200") {
            failures.push((at, status));
        } else if at > kill_at + Duration::from_secs(4) {
            after += 1;
        }
    }
    println!("failures: {failures:?}; successes after the detection window: {after}");
    // Fast profile: detection within about 2 s; retries on the other instance cover most of it.
    assert!(failures.iter().all(|(at, _)| *at >= kill_at && *at < kill_at + Duration::from_secs(4)), "{failures:?}");
    assert!(after > 50, "too few requests after the window to judge: {after}");
}

#[test]
fn instances_declared_in_the_config_file_are_registered_and_served() {
    let srv = trellis_tests::http::server("from-file");
    let dir = std::env::temp_dir().join(format!("trellis-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("agent.toml");
    let text = format!("[services.files-1]\nservice = \"files\"\naddress = \"127.0.0.1\"\nport = {}\n", srv.port());
    std::fs::write(&cfg, text).unwrap();
    let proxy: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let node_args = vec![vec!["--proxy".into(), proxy.to_string()], vec!["--config".into(), cfg.display().to_string()]];
    let c = Cluster::start(ClusterSpec { nodes: 3, node_args, ..Default::default() }).unwrap();
    c.wait_until(Duration::from_secs(15), "the file's instance in node 0's catalog", || {
        let v = c.node(0).api().get_json("/v1/catalog/services/files").ok()?;
        (v.as_array()?.first()?["node"] == c.node(1).name.as_str()).then_some(())
    })
    .unwrap();
    let (status, body) = http_get(proxy, "files", "/x");
    assert!(status.contains("200"), "{status}");
    assert_eq!(body, "from-file /x");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn pooled_connections_to_instances_are_reused_and_a_new_deny_cuts_them() {
    let (c, proxy) = proxy_mesh();
    let srv = trellis_chaos::loadgen::serve_keepalive("127.0.0.1", 16);
    let body = json!({"service": "kept", "address": "127.0.0.1", "port": srv.port()});
    let (s, v) = c.node(2).api().put_json("/v1/agent/services/kept-1", &body).unwrap();
    assert_eq!(s, 200, "{v}");
    let get = || trellis_tests::http::get(proxy, "kept", "/", &[]);
    c.wait_until(Duration::from_secs(10), "kept reachable", || (get().status == 200).then_some(())).unwrap();
    // Every client says `Connection: close`; the agent's connection to the instance stays.
    for _ in 0..50 {
        let r = get();
        assert_eq!((r.status, r.body.len()), (200, 16));
        assert!(r.header("connection").is_none_or(|v| v == "close"), "hop-by-hop headers are ours, not the instance's");
    }
    let m0 = c.node(0).api().get_text("/metrics").unwrap();
    let reused = metric(&m0, "trellis_forward_pool_reused_total").unwrap();
    assert!(reused >= 45.0, "only {reused} of 50 requests reused a pooled connection");
    let streams = metric(&c.node(2).api().get_text("/metrics").unwrap(), "trellis_forward_inbound_total").unwrap();
    assert!(streams <= 5.0, "{streams} QUIC streams opened to node 2 for 51 sequential requests");
    let sent = metric(&m0, "trellis_forward_bytes_total{direction=\"to_instance\"}").unwrap();
    let received = metric(&m0, "trellis_forward_bytes_total{direction=\"from_instance\"}").unwrap();
    assert!(received >= 51.0 * 16.0 && sent >= 51.0 * 20.0, "bytes counted: {sent} out, {received} in");
    // Intentions are checked on every stream, and again on open ones when policy changes.
    let deny = json!({"source": "*", "destination": "kept", "action": "deny"});
    let (s, v) = c.node(1).api().put_json("/v1/policy/intentions/deny-kept", &deny).unwrap();
    assert_eq!(s, 200, "{v}");
    let r = c.wait_until(Duration::from_secs(10), "deny in force", || Some(get()).filter(|r| r.status == 403)).unwrap();
    assert_eq!(r.header("x-trellis-reason"), Some("denied"));
    for _ in 0..10 {
        assert_eq!(get().status, 403, "a pooled connection must not outlive the deny");
    }
}

#[test]
fn an_http_upstream_listener_applies_routes_whatever_the_host() {
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let c = three_agents(vec!["--upstream".into(), format!("web={listen}")]);
    for (node, version) in [(1, "v1"), (2, "v2")] {
        let srv = trellis_tests::http::server(if version == "v1" { "v1" } else { "v2" });
        let body =
            json!({"service": "web", "address": "127.0.0.1", "port": srv.port(), "labels": {"version": version}});
        let (s, v) = c.node(node).api().put_json(&format!("/v1/agent/services/web-{version}"), &body).unwrap();
        assert_eq!(s, 200, "{v}");
    }
    let route = json!({"service": "web", "match": {"path": {"prefix": "/api"}}, "destination": {"subset": "v2"}, "rewrite_prefix": "/v2api"});
    for (kind, name, body) in
        [("subsets", "v2", json!({"service": "web", "labels": {"version": "v2"}})), ("routes", "api", route)]
    {
        let (s, v) = c.node(0).api().put_json(&format!("/v1/policy/{kind}/{name}"), &body).unwrap();
        assert_eq!(s, 200, "{v}");
    }
    // The app talks to 127.0.0.1:<port> and says so in Host; the listener knows the service.
    let host = listen.to_string();
    let get = |path: &str| trellis_tests::http::get(listen, &host, path, &[]);
    c.wait_until(Duration::from_secs(10), "route in force", || {
        (get("/api/items").text() == "v2 /v2api/items").then_some(())
    })
    .unwrap();
    for _ in 0..20 {
        assert_eq!(get("/api/items").text(), "v2 /v2api/items", "the route and its rewrite apply");
    }
    let m = c.node(0).api().get_text("/metrics").unwrap();
    let ok = metric(&m, "trellis_requests_total{service=\"web\",direction=\"outbound\",class=\"2xx\"}").unwrap();
    assert!(ok >= 21.0, "requests through the upstream listener are counted as web's: {ok}");
}

/// One request with `method` and no body through `to`; returns the status (0 when the
/// connection failed) and the `x-trellis-reason` header.
fn request(to: SocketAddr, method: &str, host: &str, path: &str) -> (u16, Option<String>) {
    let Ok(mut s) = TcpStream::connect(to) else { return (0, None) };
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let _ = write!(s, "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let reason = out
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("x-trellis-reason:").map(|v| v.trim().to_string()));
    (status, reason)
}

fn put(c: &Cluster, node: usize, path: &str, body: serde_json::Value) {
    let (s, v) = c.node(node).api().put_json(path, &body).unwrap();
    assert_eq!(s, 200, "PUT {path}: {v}");
}

fn self_id(c: &Cluster, node: usize) -> String {
    c.node(node).api().get_json("/v1/agent/self").unwrap()["id"].as_str().unwrap().to_string()
}

#[test]
fn deny_all_holds_on_every_path_local_and_remote_http_and_tcp() {
    let addr = || -> SocketAddr { format!("127.0.0.1:{}", free_port()).parse().unwrap() };
    let (p0, p2, web0, echo0, echo2) = (addr(), addr(), addr(), addr(), addr());
    let up = |name: &str, a: SocketAddr| vec!["--upstream".to_string(), format!("{name}={a}")];
    let node0 = [vec!["--proxy".to_string(), p0.to_string()], up("web", web0), up("echo", echo0)].concat();
    let node2 = [vec!["--proxy".to_string(), p2.to_string()], up("echo", echo2)].concat();
    let c =
        Cluster::start(ClusterSpec { nodes: 3, node_args: vec![node0, vec![], node2], ..Default::default() }).unwrap();
    let all: Vec<(String, &str)> = (0..3).map(|i| (c.node(i).name.clone(), "alive")).collect();
    c.wait_all_see(&[0, 1, 2], &all, Duration::from_secs(15)).unwrap();
    let web = trellis_tests::http::server("web");
    put(&c, 2, "/v1/agent/services/web-1", json!({"service": "web", "address": "127.0.0.1", "port": web.port()}));
    register(&c, 2, "echo-1", echo_server("n2"));
    // Node 0 reaches node 2's instances over QUIC; node 2 reaches its own over the pipe.
    let http_paths = [("remote proxy", p0, "web"), ("remote upstream", web0, "127.0.0.1"), ("local proxy", p2, "web")];
    c.wait_until(Duration::from_secs(15), "every path open", || {
        let http = http_paths.iter().all(|(_, to, host)| request(*to, "GET", host, "/").0 == 200);
        (http && greeting(echo0)? == "n2" && greeting(echo2)? == "n2").then_some(())
    })
    .unwrap();
    put(&c, 1, "/v1/policy/intentions/deny-web", json!({"source": "*", "destination": "web", "action": "deny"}));
    put(&c, 1, "/v1/policy/intentions/deny-echo", json!({"source": "*", "destination": "echo", "action": "deny"}));
    c.wait_until(Duration::from_secs(10), "deny on every path", || {
        let http =
            http_paths.iter().all(|(_, to, host)| request(*to, "GET", host, "/") == (403, Some("denied".into())));
        (http && greeting(echo0).is_none() && greeting(echo2).is_none()).then_some(())
    })
    .unwrap();
    for (what, to, host) in http_paths {
        for _ in 0..3 {
            assert_eq!(request(to, "GET", host, "/").0, 403, "{what}");
        }
    }
    // An allow for one source opens exactly that caller: node 0, not node 2.
    put(
        &c,
        1,
        "/v1/policy/intentions/allow-n0",
        json!({"source": self_id(&c, 0), "destination": "web", "action": "allow"}),
    );
    c.wait_until(Duration::from_secs(10), "allow for node 0", || {
        (request(p0, "GET", "web", "/").0 == 200).then_some(())
    })
    .unwrap();
    assert_eq!(request(web0, "GET", "127.0.0.1", "/").0, 200);
    assert_eq!(request(p2, "GET", "web", "/").0, 403, "node 2 is another caller");
    // The refusals are counted with their reason, in metrics and in the traffic JSON.
    for (node, proxy) in [(0, p0), (2, p2)] {
        let m = c.node(node).api().get_text("/metrics").unwrap();
        let denied = "trellis_requests_total{service=\"web\",direction=\"outbound\",class=\"4xx\",reason=\"denied\"}";
        assert!(metric(&m, denied).unwrap_or(0.0) >= 3.0, "node {node} via {proxy}: {m}");
        let t = c.node(node).api().get_json("/v1/agent/traffic").unwrap();
        let reasons = t["services"]["web"]["reasons"].as_array().unwrap().clone();
        assert!(reasons.iter().any(|r| r["reason"] == "denied" && r["status"] == 403), "{reasons:?}");
    }
    // 429 and 503 are counted the same way.
    put(&c, 0, "/v1/policy/ratelimits/web", json!({"service": "web", "requests_per_second": 1, "burst": 1}));
    let limited = c
        .wait_until(Duration::from_secs(10), "a 429", || {
            (0..5).map(|_| request(p0, "GET", "web", "/")).find(|r| r.0 == 429)
        })
        .unwrap();
    assert_eq!(limited.1.as_deref(), Some("rate_limited"));
    put(&c, 0, "/v1/policy/services/ghost", json!({}));
    c.wait_until(Duration::from_secs(10), "a 503", || (request(p0, "GET", "ghost", "/").0 == 503).then_some(()))
        .unwrap();
    let m = c.node(0).api().get_text("/metrics").unwrap();
    let row = |service: &str, class: &str, reason: &str| {
        format!("trellis_requests_total{{service=\"{service}\",direction=\"outbound\",class=\"{class}\",reason=\"{reason}\"}}")
    };
    assert!(metric(&m, &row("web", "4xx", "rate_limited")).unwrap_or(0.0) >= 1.0, "{m}");
    assert!(metric(&m, &row("ghost", "5xx", "no_instance")).unwrap_or(0.0) >= 1.0, "{m}");
}

#[test]
fn l7_intentions_decide_each_request_at_the_destination() {
    let (p0, p2) = (free_port(), free_port());
    let (p0, p2): (SocketAddr, SocketAddr) =
        (format!("127.0.0.1:{p0}").parse().unwrap(), format!("127.0.0.1:{p2}").parse().unwrap());
    let args = |p: SocketAddr| vec!["--proxy".to_string(), p.to_string()];
    let c = Cluster::start(ClusterSpec { nodes: 3, node_args: vec![args(p0), vec![], args(p2)], ..Default::default() })
        .unwrap();
    let all: Vec<(String, &str)> = (0..3).map(|i| (c.node(i).name.clone(), "alive")).collect();
    c.wait_all_see(&[0, 1, 2], &all, Duration::from_secs(15)).unwrap();
    let web = trellis_tests::http::server("web");
    put(&c, 2, "/v1/agent/services/web-1", json!({"service": "web", "address": "127.0.0.1", "port": web.port()}));
    register(&c, 2, "echo-1", echo_server("n2"));
    c.wait_until(Duration::from_secs(15), "web through both proxies", || {
        (request(p0, "GET", "web", "/").0 == 200 && request(p2, "GET", "web", "/").0 == 200).then_some(())
    })
    .unwrap();
    let deny = json!({"source": "*", "destination": "web", "action": "deny", "paths": ["/admin"], "methods": ["GET"]});
    put(&c, 1, "/v1/policy/intentions/deny-get-admin", deny);
    c.wait_until(Duration::from_secs(10), "the L7 deny in force", || {
        (request(p0, "GET", "web", "/admin").0 == 403 && request(p2, "GET", "web", "/admin").0 == 403).then_some(())
    })
    .unwrap();
    for proxy in [p0, p2] {
        assert_eq!(request(proxy, "GET", "web", "/admin"), (403, Some("denied".into())));
        assert_eq!(request(proxy, "GET", "web", "/./admin").0, 403, "paths are normalized");
        assert_eq!(request(proxy, "GET", "web", "/").0, 200);
        assert_eq!(request(proxy, "POST", "web", "/admin").0, 200);
        assert_eq!(request(proxy, "GET", "web", "/admin/x").0, 200, "an exact path is exact");
    }
    // Precedence: a longer prefix beats a shorter one, an exact path beats a prefix.
    put(
        &c,
        1,
        "/v1/policy/intentions/deny-internal",
        json!({"source": "*", "destination": "web", "action": "deny", "paths": ["/api/internal/*"]}),
    );
    put(
        &c,
        1,
        "/v1/policy/intentions/allow-health",
        json!({"source": "*", "destination": "web", "action": "allow", "paths": ["/api/internal/health"]}),
    );
    c.wait_until(Duration::from_secs(10), "three L7 rules", || {
        (request(p0, "GET", "web", "/api/internal/keys").0 == 403).then_some(())
    })
    .unwrap();
    c.wait_until(Duration::from_secs(10), "the exact allow", || {
        (request(p0, "GET", "web", "/api/internal/health").0 == 200).then_some(())
    })
    .unwrap();
    assert_eq!(request(p0, "GET", "web", "/api/internalx").0, 200, "prefixes match whole segments");
    assert_eq!(request(p0, "GET", "web", "/api/users").0, 200);
    // An L7 rule on a tcp service is refused at write time, naming the field.
    let l7_tcp = json!({"source": "*", "destination": "echo", "action": "deny", "methods": ["GET"]});
    let (s, v) = c.node(0).api().put_json("/v1/policy/intentions/tcp-l7", &l7_tcp).unwrap();
    assert_eq!((s, v["field"].as_str()), (400, Some("intentions.tcp-l7.methods")), "{v}");
    let (s, v) = c.node(0).api().put_json("/v1/policy/services/web", &json!({"protocol": "tcp"})).unwrap();
    assert_eq!((s, v["field"].as_str()), (400, Some("services.web.protocol")), "{v}");
    // Route prefixes match by segments too: /api does not take /apiary.
    let route = json!({"service": "web", "match": {"path": {"prefix": "/api"}}, "destination": {"service": "web"}, "rewrite_prefix": "/v1api"});
    put(&c, 0, "/v1/policy/routes/api", route);
    c.wait_until(Duration::from_secs(10), "the rewrite", || {
        (trellis_tests::http::get(p0, "web", "/api/x", &[]).text() == "web /v1api/x").then_some(())
    })
    .unwrap();
    assert_eq!(trellis_tests::http::get(p0, "web", "/apiary", &[]).text(), "web /apiary");
    assert_eq!(trellis_tests::http::get(p0, "web", "/api", &[]).text(), "web /v1api");
}

#[test]
fn an_instance_answering_500_is_ejected_and_returns_after_the_ejection_time() {
    use std::sync::atomic::AtomicBool;
    let (c, proxy) = proxy_mesh();
    let ejection = Duration::from_secs(4);
    let od = json!({"consecutive_5xx": 3, "base_ejection_time": "4s", "ejection_growth": 1.0});
    put(&c, 0, "/v1/policy/services/flaky", json!({"outlier_detection": od}));
    let good = trellis_tests::http::server("good");
    let bad = trellis_tests::http::slow_server(Duration::ZERO, 500, "bad");
    put(
        &c,
        1,
        "/v1/agent/services/flaky-good",
        json!({"service": "flaky", "address": "127.0.0.1", "port": good.port()}),
    );
    put(&c, 2, "/v1/agent/services/flaky-bad", json!({"service": "flaky", "address": "127.0.0.1", "port": bad.port()}));
    c.wait_until(Duration::from_secs(10), "both instances", || {
        (c.node(0).api().get_json("/v1/catalog/services/flaky").ok()?.as_array()?.len() == 2).then_some(())
    })
    .unwrap();
    let t0 = std::time::Instant::now();
    let errors = (0..1000).filter(|_| request(proxy, "GET", "flaky", "/").0 >= 500).count();
    let took = t0.elapsed();
    let windows = 1 + (took.as_millis() / ejection.as_millis()) as usize;
    println!("1000 GETs in {took:?}: {errors} 5xx ({windows} ejection windows)");
    assert!(errors <= 3 * windows, "{errors} 5xx in 1000 GETs, at most 3 per {ejection:?} window");
    let ejections =
        |c: &Cluster| metric(&c.node(0).api().get_text("/metrics").unwrap(), "trellis_forward_ejections_total");
    let before = ejections(&c).unwrap();
    assert!(before >= 1.0);
    // After the ejection time it is back in rotation, and ejected again.
    std::thread::sleep(ejection);
    let back = (0..20).filter(|_| request(proxy, "GET", "flaky", "/").0 == 500).count();
    assert!((1..=3).contains(&back), "{back} of 20 answered 500 after the ejection time");
    assert_eq!(ejections(&c), Some(before + 1.0));

    // The service's health_check supplies what an instance's check leaves unset: a
    // 200 ms interval and a fall of 2 make it critical in well under the default 15 s.
    let hc = json!({"interval": "200ms", "timeout": "100ms", "unhealthy_threshold": 2});
    put(&c, 0, "/v1/policy/services/checked", json!({"health_check": hc}));
    let healthy = std::sync::Arc::new(AtomicBool::new(false));
    let srv = trellis_tests::http::health_server("checked", healthy);
    let inst = json!({"service": "checked", "address": "127.0.0.1", "port": srv.port(), "check": {"http": "/healthz"}});
    c.wait_until(Duration::from_secs(5), "service defaults on node 1", || {
        let v = c.node(1).api().get_json("/v1/policy/services/checked").ok()?;
        (v["body"]["health_check"]["interval"] == "200ms").then_some(())
    })
    .unwrap();
    put(&c, 1, "/v1/agent/services/checked-1", inst);
    let t = std::time::Instant::now();
    c.wait_until(Duration::from_secs(4), "critical by the service's timings", || {
        let v = c.node(0).api().get_json("/v1/catalog/services/checked").ok()?;
        (v.as_array()?.first()?["health"] == "critical").then_some(())
    })
    .unwrap();
    println!("critical after {:?}", t.elapsed());

    // A breaker on the error rate: 5 answers, all 500, open it; after open_for one probe
    // goes through and, failing, opens it again.
    let cb = json!({"failure_rate_percent": 50, "min_requests": 5, "window": "10s", "open_for": "1s"});
    let off = json!({"consecutive_failures": 0, "consecutive_5xx": 0});
    put(&c, 0, "/v1/policy/services/broken", json!({"circuit_breaker": cb, "outlier_detection": off}));
    put(&c, 2, "/v1/agent/services/broken-1", json!({"service": "broken", "address": "127.0.0.1", "port": bad.port()}));
    c.wait_until(Duration::from_secs(10), "broken in node 0's catalog", || {
        (c.node(0).api().get_json("/v1/catalog/services/broken").ok()?.as_array()?.len() == 1).then_some(())
    })
    .unwrap();
    let replies: Vec<(u16, Option<String>)> = (0..10).map(|_| request(proxy, "GET", "broken", "/")).collect();
    let open = replies.iter().filter(|r| r.1.as_deref() == Some("circuit_open")).count();
    assert!(open >= 5, "{replies:?}");
    std::thread::sleep(Duration::from_millis(1100));
    let probe = request(proxy, "GET", "broken", "/");
    assert_eq!(probe.0, 500, "the probe reaches the instance");
    assert_eq!(request(proxy, "GET", "broken", "/").1.as_deref(), Some("circuit_open"), "a failed probe reopens it");
}

/// A raw HTTP server that writes `head` (headers and the start of a body) on each
/// connection, then holds the connection open without another byte.
fn stalling_server(head: &'static [u8]) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let _ = conn.read(&mut buf);
                let _ = conn.write_all(head);
                std::thread::sleep(Duration::from_secs(30));
            });
        }
    });
    addr
}

#[test]
fn a_node_killed_with_slow_requests_in_flight_answers_each_promptly() {
    let (mut c, proxy) = proxy_mesh();
    let fast = trellis_tests::http::server("fast");
    let slow = trellis_tests::http::slow_server(Duration::from_secs(12), 200, "slow");
    put(&c, 1, "/v1/agent/services/s-fast", json!({"service": "s", "address": "127.0.0.1", "port": fast.port()}));
    put(&c, 2, "/v1/agent/services/s-slow", json!({"service": "s", "address": "127.0.0.1", "port": slow.port()}));
    c.wait_until(Duration::from_secs(10), "both instances", || {
        (c.node(0).api().get_json("/v1/catalog/services/s").ok()?.as_array()?.len() == 2).then_some(())
    })
    .unwrap();
    // `t` sends its headers and the first bytes of its body, then stalls.
    let stall = stalling_server(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nfirst bytes");
    put(&c, 2, "/v1/agent/services/t-stall", json!({"service": "t", "address": "127.0.0.1", "port": stall.port()}));
    c.wait_until(Duration::from_secs(10), "t's instance", || {
        (c.node(0).api().get_json("/v1/catalog/services/t").ok()?.as_array()?.len() == 1).then_some(())
    })
    .unwrap();
    let t0 = std::time::Instant::now();
    let kill_at = Duration::from_secs(1);
    type Reply = (u16, Option<String>, Duration);
    let (replies, streamed): (Vec<Reply>, (String, Duration)) = std::thread::scope(|s| {
        let hs: Vec<_> = (0..20)
            .map(|_| {
                s.spawn(|| {
                    let (status, reason) = request(proxy, "GET", "s", "/");
                    (status, reason, t0.elapsed())
                })
            })
            .collect();
        let streaming = s.spawn(|| {
            let mut tcp = TcpStream::connect(proxy).unwrap();
            tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            tcp.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            // Reads until the proxy ends the connection (EOF or reset).
            while let Ok(n @ 1..) = tcp.read(&mut buf) {
                got.extend_from_slice(&buf[..n]);
            }
            (String::from_utf8_lossy(&got).into_owned(), t0.elapsed())
        });
        std::thread::sleep(kill_at);
        c.kill(2);
        (hs.into_iter().map(|h| h.join().unwrap()).collect(), streaming.join().unwrap())
    });
    println!("{replies:?} {streamed:?}");
    // The answer that was streaming from the killed node ends at detection, not at
    // QUIC's idle timeout; the client saw the start of the body and no more.
    assert!(streamed.0.starts_with("HTTP/1.1 200") && streamed.0.ends_with("first bytes"), "{streamed:?}");
    assert!(streamed.1 < kill_at + Duration::from_secs(3), "the stalled body ended at {:?}", streamed.1);
    let to_slow = replies.iter().filter(|r| r.2 > kill_at).count();
    assert!(to_slow >= 5, "too few requests were waiting on the slow instance: {replies:?}");
    // Fast profile: the node is down in every view within about 2 s of the kill.
    let limit = kill_at + Duration::from_secs(2) + Duration::from_secs(1);
    for (status, reason, at) in &replies {
        assert!(*at < limit, "answered {status} {reason:?} at {at:?}, after detection + 1 s");
        assert!(*status == 200 || (*status == 503 && reason.as_deref() == Some("instance_gone")), "{replies:?}");
    }
    assert!(
        replies.iter().filter(|r| r.0 == 200 && r.2 > kill_at).count() >= 1,
        "idempotent ones are retried: {replies:?}"
    );
}

#[test]
fn requests_in_flight_to_an_instance_turning_critical_end_at_once() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let (c, proxy) = proxy_mesh();
    // `c-slow` answers after 12 s; its /healthz fails once `healthy` is cleared.
    let healthy = Arc::new(AtomicBool::new(true));
    let h = healthy.clone();
    let slow = trellis_chaos::plain::serve(move |head| {
        if trellis_chaos::plain::path_of(head) == "/healthz" {
            return (if h.load(Ordering::SeqCst) { 200 } else { 500 }, b"ok".to_vec());
        }
        std::thread::sleep(Duration::from_secs(12));
        (200, b"slow".to_vec())
    });
    let fast = trellis_tests::http::server("fast");
    let check = json!({"http": "/healthz", "interval": "200ms", "timeout": "150ms", "rise": 1, "fall": 1});
    let slow_instance = json!({"service": "c", "address": "127.0.0.1", "port": slow.port(), "check": check});
    put(&c, 2, "/v1/agent/services/c-slow", slow_instance);
    put(&c, 1, "/v1/agent/services/c-fast", json!({"service": "c", "address": "127.0.0.1", "port": fast.port()}));
    c.wait_until(Duration::from_secs(10), "both instances passing on node 0", || {
        let v = c.node(0).api().get_json("/v1/catalog/services/c").ok()?;
        let a = v.as_array()?;
        (a.len() == 2 && a.iter().all(|i| i["health"] != "critical") && a.iter().any(|i| i["health"] == "passing"))
            .then_some(())
    })
    .unwrap();
    let t0 = std::time::Instant::now();
    let turn_at = Duration::from_secs(1);
    let replies: Vec<(u16, Option<String>, Duration)> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..10)
            .map(|_| {
                s.spawn(|| {
                    let (status, reason) = request(proxy, "GET", "c", "/");
                    (status, reason, t0.elapsed())
                })
            })
            .collect();
        std::thread::sleep(turn_at);
        healthy.store(false, Ordering::SeqCst);
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    println!("{replies:?}");
    let waiting = replies.iter().filter(|r| r.2 > turn_at).count();
    assert!(waiting >= 2, "too few requests were waiting on the slow instance: {replies:?}");
    // One failed probe (fall 1, interval 200 ms) turns it critical; its agent then resets
    // the streams to it and the callers retry them on the other instance.
    for (status, reason, at) in &replies {
        assert!(*at < turn_at + Duration::from_millis(1500), "answered {status} {reason:?} at {at:?}: {replies:?}");
        assert_eq!(*status, 200, "{reason:?}: {replies:?}");
    }
}

#[test]
fn route_matches_timeouts_and_retries_hold_on_real_agents() {
    use std::time::Instant;
    use trellis_tests::http::{server, slow_server};
    /// One request with `method`, extra headers and no body; returns (status, reason, body).
    fn call(
        to: SocketAddr,
        method: &str,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (u16, Option<String>, String) {
        let Ok(mut s) = TcpStream::connect(to) else { return (0, None, String::new()) };
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        let _ = s.write_all(req.as_bytes());
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        let (head, body) = out.split_once("\r\n\r\n").unwrap_or((out.as_str(), ""));
        let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        let reason = head
            .lines()
            .find_map(|l| l.to_ascii_lowercase().strip_prefix("x-trellis-reason:").map(|v| v.trim().to_string()));
        (status, reason, body.to_string())
    }
    let (c, proxy) = proxy_mesh();
    let instance = |service: &str, port: u16| json!({"service": service, "address": "127.0.0.1", "port": port});

    // Backends answer "<name> <path>", so a reply names the destination that took it.
    let backends = [
        "shop",
        "to-exact",
        "to-regex",
        "to-method",
        "to-header",
        "to-query-name",
        "to-query-exact",
        "to-query-regex",
        "to-high",
        "to-low",
        "to-header-exact",
        "checkout-v1",
        "checkout-v2",
    ];
    for (i, name) in backends.into_iter().enumerate() {
        put(&c, 1 + i % 2, &format!("/v1/agent/services/{name}-1"), instance(name, server(name).port()));
    }
    // `flip` and `floor` each have an instance answering 500 (node 1) and one answering 200 (node 2).
    let (bad, good) = (slow_server(Duration::ZERO, 500, "bad"), server("good"));
    for service in ["flip", "floor"] {
        put(&c, 1, &format!("/v1/agent/services/{service}-bad"), instance(service, bad.port()));
        put(&c, 2, &format!("/v1/agent/services/{service}-good"), instance(service, good.port()));
    }
    // `lag` and `pertry` answer after 1 s; `pertry-retried` has that instance and a fast one.
    let lag = slow_server(Duration::from_secs(1), 200, "lag");
    put(&c, 1, "/v1/agent/services/lag-1", instance("lag", lag.port()));
    put(&c, 1, "/v1/agent/services/pertry-1", instance("pertry", lag.port()));
    put(&c, 1, "/v1/agent/services/pertry-retried-slow", instance("pertry-retried", lag.port()));
    put(&c, 2, "/v1/agent/services/pertry-retried-fast", instance("pertry-retried", good.port()));
    // `hang` and `hang-long`: a listener whose accept queue is full, so connecting to it
    // hangs (the kernel drops the SYNs) rather than failing.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let hung = rt.block_on(async {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        s.listen(0).unwrap()
    });
    let hung_addr = hung.local_addr().unwrap();
    let _queued: Vec<TcpStream> =
        (0..3).filter_map(|_| TcpStream::connect_timeout(&hung_addr, Duration::from_millis(200)).ok()).collect();
    assert!(
        TcpStream::connect_timeout(&hung_addr, Duration::from_millis(500)).is_err(),
        "precondition: a connect to the full listener hangs"
    );
    put(&c, 2, "/v1/agent/services/hang-1", instance("hang", hung_addr.port()));
    put(&c, 2, "/v1/agent/services/hang-long-1", instance("hang-long", hung_addr.port()));
    // Checked instances: a TCP check only connects (its instance answers HTTP 500), and an
    // HTTP check with `expect_status` wants that status, not any 2xx.
    let closed = free_port();
    let timing = json!({"interval": "200ms", "timeout": "150ms", "rise": 1, "fall": 1});
    let check = |extra: serde_json::Value| {
        let mut ch = timing.clone();
        ch.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        ch
    };
    let checked = [
        ("tcp-open", bad.port(), check(json!({"tcp": true})), "passing"),
        ("tcp-closed", closed, check(json!({"tcp": true})), "critical"),
        ("want-500", bad.port(), check(json!({"http": "/healthz", "expect_status": 500})), "passing"),
        ("want-204", good.port(), check(json!({"http": "/healthz", "expect_status": 204})), "critical"),
        ("want-2xx", bad.port(), check(json!({"http": "/healthz"})), "critical"),
    ];
    for (id, port, check, _) in &checked {
        let mut body = instance("probed", *port);
        body["check"] = check.clone();
        put(&c, 1, &format!("/v1/agent/services/{id}"), body);
    }

    let no_outliers = json!({"consecutive_failures": 0, "consecutive_5xx": 0});
    let route = |service: &str, m: serde_json::Value, to: serde_json::Value| json!({"service": service, "match": m, "destination": to});
    let with = |mut r: serde_json::Value, field: &str, v: serde_json::Value| {
        r[field] = v;
        r
    };
    let to = |service: &str| json!({"service": service});
    let prefix = |p: &str| json!({"path": {"prefix": p}});
    let policy = [
        ("services", "flip", json!({"outlier_detection": no_outliers})),
        ("services", "floor", json!({"outlier_detection": no_outliers})),
        ("services", "lag", json!({"timeout": "5s"})),
        ("services", "pertry", json!({"retry": {"attempts": 0, "per_try_timeout": "200ms"}})),
        (
            "services",
            "pertry-retried",
            json!({"retry": {"attempts": 1, "on": ["timeout"], "per_try_timeout": "200ms"}}),
        ),
        ("services", "hang", json!({"connect_timeout": "300ms", "retry": {"attempts": 0}})),
        ("services", "hang-long", json!({"connect_timeout": "1s", "retry": {"attempts": 0}})),
        ("routes", "by-exact", route("shop", json!({"path": {"exact": "/exact"}}), to("to-exact"))),
        ("routes", "by-regex", route("shop", json!({"path": {"regex": "^/items/[0-9]+$"}}), to("to-regex"))),
        (
            "routes",
            "by-method",
            route("shop", json!({"path": {"prefix": "/m"}, "methods": ["DELETE"]}), to("to-method")),
        ),
        (
            "routes",
            "by-header",
            route(
                "shop",
                json!({"path": {"prefix": "/h"}, "headers": [{"name": "x-tier", "regex": "^(gold|platinum)$"}]}),
                to("to-header"),
            ),
        ),
        (
            "routes",
            "by-header-exact",
            route(
                "shop",
                json!({"path": {"prefix": "/he"}, "headers": [{"name": "x-env", "exact": "canary"}]}),
                to("to-header-exact"),
            ),
        ),
        // By name `a-low` would be tried first; its lower priority puts it second.
        ("routes", "a-low", with(route("shop", prefix("/p"), to("to-low")), "priority", json!(1))),
        ("routes", "b-high", with(route("shop", prefix("/p"), to("to-high")), "priority", json!(5))),
        ("routes", "c-low-only", with(route("shop", prefix("/lo"), to("to-low")), "priority", json!(-3))),
        (
            "routes",
            "by-query-name",
            route("shop", json!({"path": {"exact": "/q"}, "query": [{"name": "debug"}]}), to("to-query-name")),
        ),
        (
            "routes",
            "by-query-exact",
            route(
                "shop",
                json!({"path": {"exact": "/q"}, "query": [{"name": "v", "exact": "2"}]}),
                to("to-query-exact"),
            ),
        ),
        (
            "routes",
            "by-query-regex",
            route(
                "shop",
                json!({"path": {"exact": "/q"}, "query": [{"name": "id", "regex": "^[0-9a-f]{4}$"}]}),
                to("to-query-regex"),
            ),
        ),
        (
            "splits",
            "checkout",
            json!({"service": "checkout", "backends": [{"service": "checkout-v1", "weight": 50}, {"service": "checkout-v2", "weight": 50}]}),
        ),
        ("routes", "by-split", route("shop", prefix("/checkout"), json!({"split": "checkout"}))),
        ("routes", "limited", route("shop", prefix("/limited"), to("shop"))),
        (
            "ratelimits",
            "shop-limited",
            json!({"service": "shop", "route": "limited", "requests_per_second": 1, "burst": 1}),
        ),
        ("routes", "lag-quick", with(route("lag", prefix("/quick"), to("lag")), "timeout", json!("300ms"))),
        (
            "routes",
            "lag-per-try",
            with(
                route("lag", prefix("/per-try"), to("lag")),
                "retry",
                json!({"attempts": 0, "per_try_timeout": "200ms"}),
            ),
        ),
        (
            "routes",
            "flip-retry",
            with(route("flip", prefix("/retry"), to("flip")), "retry", json!({"attempts": 1, "on": ["5xx"]})),
        ),
        (
            "routes",
            "flip-once",
            with(route("flip", prefix("/once"), to("flip")), "retry", json!({"attempts": 0, "on": ["5xx"]})),
        ),
        (
            "routes",
            "flip-gateway",
            with(
                route("flip", prefix("/gateway"), to("flip")),
                "retry",
                json!({"attempts": 2, "on": ["gateway_error"]}),
            ),
        ),
        (
            "routes",
            "flip-no-budget",
            with(
                route("flip", prefix("/no-budget"), to("flip")),
                "retry",
                json!({"attempts": 2, "on": ["5xx"], "budget_percent": 0, "min_retries_per_second": 0}),
            ),
        ),
        (
            "routes",
            "flip-full-budget",
            with(
                route("flip", prefix("/full-budget"), to("flip")),
                "retry",
                json!({"attempts": 1, "on": ["5xx"], "budget_percent": 100, "min_retries_per_second": 0}),
            ),
        ),
        (
            "routes",
            "flip-backoff",
            with(
                route("flip", prefix("/backoff"), to("flip")),
                "retry",
                json!({"attempts": 1, "on": ["5xx"], "budget_percent": 100, "backoff_base": "1s", "backoff_max": "1s"}),
            ),
        ),
        (
            "routes",
            "flip-backoff-capped",
            with(
                route("flip", prefix("/capped"), to("flip")),
                "retry",
                json!({"attempts": 1, "on": ["5xx"], "budget_percent": 100, "backoff_base": "1s", "backoff_max": "1ms"}),
            ),
        ),
        (
            "routes",
            "floor-all",
            with(
                route("floor", json!({}), to("floor")),
                "retry",
                json!({"attempts": 1, "on": ["5xx"], "budget_percent": 0, "min_retries_per_second": 1}),
            ),
        ),
    ];
    for (kind, name, body) in &policy {
        put(&c, 0, &format!("/v1/policy/{kind}/{name}"), body.clone());
    }
    let mut expected: Vec<(&str, usize)> = backends.iter().map(|b| (*b, 1)).collect();
    expected.extend([("flip", 2), ("floor", 2), ("lag", 1), ("pertry", 1), ("pertry-retried", 2), ("hang", 1)]);
    expected.extend([("hang-long", 1), ("probed", 5)]);
    c.wait_until(Duration::from_secs(10), "every instance in node 0's catalog, checked ones settled", || {
        let api = c.node(0).api();
        for (service, n) in &expected {
            if api.get_json(&format!("/v1/catalog/services/{service}")).ok()?.as_array()?.len() != *n {
                return None;
            }
        }
        let probed = api.get_json("/v1/catalog/services/probed").ok()?;
        checked
            .iter()
            .all(|(id, _, _, want)| {
                probed.as_array().is_some_and(|a| {
                    a.iter().any(|i| {
                        i["name"].as_str().is_some_and(|n| n.starts_with(&format!("{id}@"))) && i["health"] == *want
                    })
                })
            })
            .then_some(())
    })
    .unwrap();
    let t0 = Instant::now();

    // Path (exact, regex), methods, header regex, query (name, exact, regex).
    let shop = |method: &str, path: &str, headers: &[(&str, &str)]| {
        let (status, why, body) = call(proxy, method, "shop", path, headers);
        assert_eq!(status, 200, "{method} {path} {headers:?}: {why:?} {body}");
        body
    };
    c.wait_until(Duration::from_secs(10), "routes in force on node 0", || {
        (shop("GET", "/exact", &[]) == "to-exact /exact").then_some(())
    })
    .unwrap();
    type Case<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)], &'a str);
    let cases: &[Case] = &[
        ("GET", "/exact", &[], "to-exact"),
        ("GET", "/exact/more", &[], "shop"),
        ("GET", "/exactly", &[], "shop"),
        ("GET", "/items/42", &[], "to-regex"),
        ("GET", "/items/42x", &[], "shop"),
        ("GET", "/items/abc", &[], "shop"),
        ("DELETE", "/m/1", &[], "to-method"),
        ("GET", "/m/1", &[], "shop"),
        ("POST", "/m/1", &[], "shop"),
        ("GET", "/h", &[("x-tier", "gold")], "to-header"),
        ("GET", "/h/x", &[("X-Tier", "platinum")], "to-header"),
        ("GET", "/h", &[("x-tier", "golden")], "shop"),
        ("GET", "/h", &[], "shop"),
        ("GET", "/he", &[("x-env", "canary")], "to-header-exact"),
        ("GET", "/he", &[("x-env", "canary2")], "shop"),
        ("GET", "/he", &[("x-env", "Canary")], "shop"),
        ("GET", "/he", &[], "shop"),
        ("GET", "/p/1", &[], "to-high"),
        ("GET", "/lo", &[], "to-low"),
        ("GET", "/q?debug", &[], "to-query-name"),
        ("GET", "/q?a=1&debug=yes", &[], "to-query-name"),
        ("GET", "/q?debugger=1", &[], "shop"),
        ("GET", "/q?v=2", &[], "to-query-exact"),
        ("GET", "/q?v=20", &[], "shop"),
        ("GET", "/q?id=beef", &[], "to-query-regex"),
        ("GET", "/q?id=beefy", &[], "shop"),
        ("GET", "/q?id=BEEF", &[], "shop"),
        ("GET", "/other?v=2&debug", &[], "shop"),
    ];
    for (method, path, headers, want) in cases {
        assert_eq!(shop(method, path, headers), format!("{want} {path}"), "{method} {path} {headers:?}");
    }

    // A route to a split whose backends are other services.
    let mut split = std::collections::HashMap::new();
    for _ in 0..60 {
        *split.entry(shop("GET", "/checkout/pay", &[])).or_insert(0) += 1;
    }
    let v1 = split.get("checkout-v1 /checkout/pay").copied().unwrap_or(0);
    let v2 = split.get("checkout-v2 /checkout/pay").copied().unwrap_or(0);
    assert!(v1 + v2 == 60 && v1 >= 10 && v2 >= 10, "a 50/50 split over 60 requests: {split:?}");

    // A rate limit on one route: 429 there, never on the service's other routes.
    let limited = c
        .wait_until(Duration::from_secs(10), "a 429 on the limited route", || {
            (0..5).map(|_| call(proxy, "GET", "shop", "/limited", &[])).find(|r| r.0 == 429)
        })
        .unwrap();
    assert_eq!(limited.1.as_deref(), Some("rate_limited"), "{limited:?}");
    for path in ["/exact", "/other", "/checkout/x"] {
        for _ in 0..10 {
            let (status, why, body) = call(proxy, "GET", "shop", path, &[]);
            assert_eq!(status, 200, "{path} is not on the limited route: {why:?} {body}");
        }
    }

    // Route retries: the route's policy replaces the service's (whose `on` lacks 5xx).
    let count = |m: &str, name: &str| metric(m, name).unwrap_or(0.0);
    let counters = || {
        let m = c.node(0).api().get_text("/metrics").unwrap();
        (count(&m, "trellis_forward_retries_total"), count(&m, "trellis_forward_retry_budget_exhausted_total"))
    };
    // `n` GETs: their statuses, the retries sent and the retries the budget refused.
    let gets = |host: &str, path: &str, n: usize| -> (Vec<u16>, f64, f64) {
        let (retries, refused) = counters();
        let replies = (0..n)
            .map(|_| {
                let (status, why, body) = call(proxy, "GET", host, path, &[]);
                assert!(status == 200 || (status == 500 && body == "bad"), "{host}{path}: {status} {why:?} {body}");
                status
            })
            .collect();
        let (retries2, refused2) = counters();
        (replies, retries2 - retries, refused2 - refused)
    };
    let errors = |replies: &[u16]| replies.iter().filter(|s| **s == 500).count();
    let (replies, retries, _) = gets("flip", "/retry", 20);
    assert_eq!(errors(&replies), 0, "attempts 1 on 5xx: each 500 retried onto the good instance: {replies:?}");
    assert!(retries >= 1.0, "the 500s were retried ({retries} retries): {replies:?}");
    for path in ["/", "/once", "/gateway"] {
        let (replies, retries, _) = gets("flip", path, 10);
        assert!(errors(&replies) >= 3 && retries == 0.0, "{path}: 500s not retried ({retries} retries): {replies:?}");
    }
    let (replies, retries, refused) = gets("flip", "/no-budget", 10);
    assert!(errors(&replies) >= 3 && retries == 0.0, "budget_percent 0, no floor: no retry: {replies:?}");
    assert_eq!(refused as usize, errors(&replies), "each 500 is a retry the budget refused: {replies:?}");
    let (replies, retries, refused) = gets("flip", "/full-budget", 20);
    assert_eq!(errors(&replies), 0, "budget_percent 100 allows a retry per request: {replies:?}");
    assert!(retries >= 1.0 && refused == 0.0, "{retries} retries, {refused} refused: {replies:?}");
    // Backoff before a retry: uniform in [0, min(backoff_max, backoff_base)] for the first
    // one, so 1s/1s waits up to a second and 1s/1ms at most a millisecond.
    let timed_retries = |path: &str| -> Vec<Duration> {
        (0..16)
            .filter_map(|_| {
                let (before, _) = counters();
                let t = Instant::now();
                let (status, why, body) = call(proxy, "GET", "flip", path, &[]);
                let took = t.elapsed();
                assert_eq!((status, body), (200, format!("good {path}")), "{why:?}");
                (counters().0 > before).then_some(took)
            })
            .collect()
    };
    let slow = timed_retries("/backoff");
    let longest = slow.iter().max().copied().unwrap_or_default();
    assert!(slow.len() >= 3 && longest >= Duration::from_millis(100), "1s backoff: retried requests took {slow:?}");
    let capped = timed_retries("/capped");
    println!("retried requests took {slow:?} with a 1s backoff, {capped:?} with backoff_max 1ms");
    let longest = capped.iter().max().copied().unwrap_or_default();
    assert!(!capped.is_empty() && longest < Duration::from_millis(100), "1ms backoff_max: retried took {capped:?}");
    // The floor alone (budget_percent 0, one retry per second) lets a few retries through.
    let (replies, retries, refused) = gets("floor", "/", 40);
    assert!((1.0..=10.0).contains(&retries), "min_retries_per_second 1 allowed {retries} retries: {replies:?}");
    assert!(refused >= 1.0 && refused as usize == errors(&replies), "past the floor, no retry: {replies:?}");

    // A route's timeout, shorter than the service's.
    let timed = |host: &str, path: &str| {
        let t = Instant::now();
        let (status, why, body) = call(proxy, "GET", host, path, &[]);
        (status, why, body, t.elapsed())
    };
    let (status, why, body, took) = timed("lag", "/quick");
    assert_eq!((status, why.as_deref()), (504, Some("timeout")), "the route's 300ms timeout: {body}");
    assert!(took < Duration::from_millis(900), "cut at 300ms, took {took:?}");
    let (status, why, body, took) = timed("lag", "/slow");
    assert_eq!((status, body.as_str()), (200, "lag"), "off the route, the service's 5s timeout: {why:?}");
    assert!(took >= Duration::from_millis(900), "the 1s answer was awaited: {took:?}");
    // Per-try timeouts: on a route, on a service, and retried when `on` lists timeout.
    for (host, path) in [("lag", "/per-try"), ("pertry", "/")] {
        let (status, why, body, took) = timed(host, path);
        assert_eq!((status, why.as_deref()), (504, Some("per_try_timeout")), "{host}{path}: {body}");
        assert!(took < Duration::from_millis(800), "{host}{path}: cut at 200ms, took {took:?}");
    }
    let (retries, _) = counters();
    for _ in 0..6 {
        let (status, why, body, took) = timed("pertry-retried", "/");
        assert_eq!((status, body.as_str()), (200, "good /"), "a slow try is retried on the fast instance: {why:?}");
        assert!(took < Duration::from_millis(800), "took {took:?}");
    }
    assert!(counters().0 > retries, "the slow instance's tries timed out and were retried");
    // connect_timeout bounds opening a stream to an instance that does not accept.
    for (host, at_least, below) in [("hang", 250, 1000), ("hang-long", 900, 1900)] {
        let (status, why, body, took) = timed(host, "/");
        assert_eq!((status, why.as_deref()), (502, Some("unreachable")), "{host}: {body}");
        let (lo, hi) = (Duration::from_millis(at_least), Duration::from_millis(below));
        assert!(took >= lo && took < hi, "{host}: gave up after {took:?}, expected within {lo:?}..{hi:?}");
    }
    println!("assertions took {:?} after setup", t0.elapsed());
    drop(hung);
}

#[test]
fn max_connections_and_max_pending_cap_what_one_node_opens() {
    let (c, proxy) = proxy_mesh();
    let cb = json!({"max_connections": 1, "max_pending": 1});
    put(&c, 0, "/v1/policy/services/narrow", json!({"circuit_breaker": cb}));
    let srv = trellis_tests::http::slow_server(Duration::from_millis(800), 200, "done");
    put(&c, 1, "/v1/agent/services/narrow-1", json!({"service": "narrow", "address": "127.0.0.1", "port": srv.port()}));
    c.wait_until(Duration::from_secs(10), "narrow in node 0's catalog", || {
        (c.node(0).api().get_json("/v1/catalog/services/narrow").ok()?.as_array()?.len() == 1).then_some(())
    })
    .unwrap();
    // Four at once: one connection, one request waiting for it, two refused at once.
    let replies: Vec<(u16, Option<String>)> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..4)
            .map(|i| {
                s.spawn(move || {
                    std::thread::sleep(Duration::from_millis(20 * i));
                    request(proxy, "GET", "narrow", "/")
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ok = replies.iter().filter(|r| r.0 == 200).count();
    let refused = replies.iter().filter(|r| r.0 == 503 && r.1.as_deref() == Some("circuit_open")).count();
    assert_eq!((ok, refused), (2, 2), "{replies:?}");
}

#[test]
fn unit_only_policy_fields_hold_on_real_agents() {
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    use std::sync::Arc;
    use std::time::Instant;
    use trellis_tests::http::{get, server, slow_server};

    // Node 0 (the caller, running the proxy) and node 1 are in zone a, node 2 in zone b.
    let proxy: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let zone = |z: &str| vec![("zone".to_string(), z.to_string())];
    let c = Cluster::start(ClusterSpec {
        nodes: 3,
        labels: vec![zone("a"), zone("a"), zone("b")],
        node_args: vec![vec!["--proxy".into(), proxy.to_string()]],
        ..Default::default()
    })
    .unwrap();
    let all: Vec<(String, &str)> = (0..3).map(|i| (c.node(i).name.clone(), "alive")).collect();
    c.wait_all_see(&[0, 1, 2], &all, Duration::from_secs(15)).unwrap();
    let t0 = Instant::now();
    let instance = |service: &str, port: u16| json!({"service": service, "address": "127.0.0.1", "port": port});
    let listed = |node: usize, service: &str| -> usize {
        let v = c.node(node).api().get_json(&format!("/v1/catalog/services/{service}"));
        v.ok().and_then(|v| v.as_array().map(Vec::len)).unwrap_or(0)
    };
    let denied = Some("denied".to_string());

    // `rising`: its instance's check takes its timings from the service's health_check.
    // The server counts the probes it has answered, and answers them 200 while `healthy`
    // is set or while `oks` lasts, else 500.
    let healthy = Arc::new(AtomicBool::new(false));
    let (oks, probes) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
    let rising = {
        let (healthy, oks, probes) = (healthy.clone(), oks.clone(), probes.clone());
        trellis_chaos::plain::serve(move |head| {
            if trellis_chaos::plain::path_of(head) != "/healthz" {
                return (200, b"rising".to_vec());
            }
            let ok = healthy.load(Ordering::SeqCst)
                || oks.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok();
            // Counted once decided, so a probe counted after a read of `probes` was
            // decided after that read.
            probes.fetch_add(1, Ordering::SeqCst);
            (if ok { 200 } else { 500 }, b"rising".to_vec())
        })
    };
    let hc = json!({"interval": "200ms", "timeout": "150ms", "healthy_threshold": 4, "unhealthy_threshold": 3});
    put(&c, 1, "/v1/policy/services/rising", json!({"health_check": hc}));
    let mut checked = instance("rising", rising.port());
    checked["check"] = json!({"http": "/healthz"});
    put(&c, 1, "/v1/agent/services/rising-1", checked);

    // Every other service and its instances, registered up front.
    let (good, bad_a, bad_b) =
        (server("good"), slow_server(Duration::ZERO, 500, "bad-a"), slow_server(Duration::ZERO, 500, "bad-b"));
    let (in_a, in_b) = (server("in-a"), server("in-b"));
    let weighing =
        |port: u16, weight: u32| json!({"service": "weighted", "address": "127.0.0.1", "port": port, "weight": weight});
    let instances = [
        (1, "gate-1", instance("gate", server("gate").port())),
        (1, "closed-1", instance("closed", server("closed").port())),
        (2, "closed-2", instance("closed", server("closed").port())),
        (2, "hdr-1", instance("hdr", server("hdr").port())),
        (1, "capped-good", instance("capped", good.port())),
        (1, "capped-bad-a", instance("capped", bad_a.port())),
        (2, "capped-bad-b", instance("capped", bad_b.port())),
        (1, "uncapped-good", instance("uncapped", good.port())),
        (1, "uncapped-bad-a", instance("uncapped", bad_a.port())),
        (2, "uncapped-bad-b", instance("uncapped", bad_b.port())),
        (2, "growing-1", instance("growing", slow_server(Duration::ZERO, 500, "down").port())),
        (1, "weighted-light", weighing(server("light").port(), 1)),
        (2, "weighted-heavy", weighing(server("heavy").port(), 3)),
        (1, "near-a", instance("near", in_a.port())),
        (2, "near-b", instance("near", in_b.port())),
        (1, "far-a", instance("far", in_a.port())),
        (2, "far-b", instance("far", in_b.port())),
    ];
    let ejecting = |max_ejected_percent: u32| {
        let od = json!({"consecutive_5xx": 2, "base_ejection_time": "60s", "max_ejected_percent": max_ejected_percent});
        json!({"outlier_detection": od})
    };
    let growth = json!({
        "consecutive_5xx": 1, "base_ejection_time": "1s", "ejection_growth": 3.0, "max_ejected_percent": 100
    });
    let services = [
        ("capped", ejecting(50)),
        ("uncapped", ejecting(100)),
        ("growing", json!({"outlier_detection": growth})),
        ("weighted", json!({"lb": {"policy": "weighted"}})),
        ("near", json!({"lb": {"locality": true}})),
    ];
    for (node, id, body) in &instances {
        put(&c, *node, &format!("/v1/agent/services/{id}"), body.clone());
    }
    for (name, body) in &services {
        put(&c, 0, &format!("/v1/policy/services/{name}"), body.clone());
    }
    c.wait_until(Duration::from_secs(10), "every instance in node 0's catalog", || {
        let mut want: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
        for (_, _, body) in &instances {
            *want.entry(body["service"].as_str().unwrap()).or_default() += 1;
        }
        want.iter().all(|(service, n)| listed(0, service) == *n).then_some(())
    })
    .unwrap();

    // settings.intention_default: deny refuses every caller no intention lets in, at
    // every destination (closed has an instance on node 1 and on node 2, taken in turn).
    put(&c, 0, "/v1/policy/settings/mesh", json!({"intention_default": "deny"}));
    c.wait_until(Duration::from_secs(10), "the deny default on nodes 1 and 2", || {
        let closed = (0..4).all(|_| request(proxy, "GET", "closed", "/") == (403, denied.clone()));
        (closed && request(proxy, "GET", "gate", "/") == (403, denied.clone())).then_some(())
    })
    .unwrap();
    put(&c, 0, "/v1/policy/intentions/allow-gate", json!({"source": "*", "destination": "gate", "action": "allow"}));
    c.wait_until(Duration::from_secs(10), "the allow for gate", || {
        (request(proxy, "GET", "gate", "/").0 == 200).then_some(())
    })
    .unwrap();
    for _ in 0..4 {
        assert_eq!(get(proxy, "gate", "/", &[]).text(), "gate /", "an allow intention opens gate under a deny default");
        let r = request(proxy, "GET", "closed", "/");
        assert_eq!(r, (403, denied.clone()), "closed, which no intention names, keeps the deny default");
    }
    put(&c, 0, "/v1/policy/settings/mesh", json!({"intention_default": "allow"}));
    c.wait_until(Duration::from_secs(10), "the allow default back on nodes 1 and 2", || {
        (0..4).all(|_| request(proxy, "GET", "closed", "/").0 == 200).then_some(())
    })
    .unwrap();
    println!("intention_default done at {:?}", t0.elapsed());

    // intentions.headers[].name/.exact/.regex: a deny on a header value refuses only the
    // requests that carry it (names in any case, values exact or by an anchored regex).
    let deny_if =
        |header: serde_json::Value| json!({"source": "*", "destination": "hdr", "action": "deny", "headers": [header]});
    put(&c, 0, "/v1/policy/intentions/hdr-prod", deny_if(json!({"name": "x-env", "exact": "prod"})));
    put(&c, 0, "/v1/policy/intentions/hdr-bots", deny_if(json!({"name": "x-user", "regex": "^bot-[0-9]+$"})));
    c.wait_until(Duration::from_secs(10), "both header denies at node 2", || {
        let prod = get(proxy, "hdr", "/", &[("x-env", "prod")]).status == 403;
        (prod && get(proxy, "hdr", "/", &[("x-user", "bot-1")]).status == 403).then_some(())
    })
    .unwrap();
    type HeaderCase<'a> = (&'a [(&'a str, &'a str)], u16);
    let cases: &[HeaderCase] = &[
        (&[("x-env", "prod")], 403),
        (&[("X-Env", "prod")], 403),
        (&[("x-env", "dev"), ("x-env-2", "prod")], 200),
        (&[("x-env", "production")], 200),
        (&[("x-env", "Prod")], 200),
        (&[], 200),
        (&[("x-user", "bot-7")], 403),
        (&[("x-user", "robot-7")], 200),
        (&[("x-user", "bot-7x")], 200),
        (&[("x-user", "alice"), ("x-env", "staging")], 200),
        (&[("x-user", "alice"), ("x-env", "prod")], 403),
    ];
    for (headers, want) in cases {
        let r = get(proxy, "hdr", "/", headers);
        if *want == 403 {
            assert_eq!((r.status, r.header("x-trellis-reason")), (403, Some("denied")), "{headers:?}: {}", r.text());
        } else {
            assert_eq!((r.status, r.text().as_str()), (200, "hdr /"), "{headers:?} matches no header deny");
        }
    }
    println!("intention headers done at {:?}", t0.elapsed());

    // services.outlier_detection.max_ejected_percent: of three instances, two answer 500
    // and two 500s in a row eject one for 60 s. At 50% only one of three may be out at a
    // time, so the other bad one keeps answering 500s; at 100% both are out after their
    // first two 500s each (at most 10 requests, round robin) and only the good one answers.
    let answers = |service: &str, n: usize| -> Vec<(u16, String)> {
        (0..n).map(|_| get(proxy, service, "/", &[])).map(|r| (r.status, r.text())).collect()
    };
    let capped = answers("capped", 40);
    let uncapped = answers("uncapped", 40);
    println!("capped: {capped:?}\nuncapped: {uncapped:?}");
    let from_instances = |replies: &[(u16, String)]| {
        replies.iter().all(|(s, b)| (*s, b.as_str()) == (200, "good /") || (*s == 500 && b.starts_with("bad-")))
    };
    assert!(
        from_instances(&capped) && from_instances(&uncapped),
        "every answer is an instance's: {capped:?} {uncapped:?}"
    );
    let errors = |replies: &[(u16, String)]| replies.iter().filter(|(s, _)| *s == 500).count();
    assert!(errors(&capped[10..]) >= 5, "at 50% one bad instance stays in and answers 500s: {capped:?}");
    assert_eq!(errors(&uncapped[10..]), 0, "at 100% both bad instances are ejected: {uncapped:?}");
    let m = c.node(0).api().get_text("/metrics").unwrap();
    assert!(metric(&m, "trellis_forward_ejections_total").unwrap_or(0.0) >= 3.0, "ejections counted");

    // services.outlier_detection.ejection_growth: one instance, always 500, ejected at its
    // first 500 for 1 s, then for 1 s * 3. While it is out the proxy answers 503
    // no_instance; the gaps between the 500s are the ejection times. An ejection starts
    // when node 0 records the 500 (before the client has it) and the next 500 needs a
    // request sent after it ends, so a gap is never more than a few ms short of its
    // ejection; above it by the 20 ms polling and the request times. Margins: 100 ms and
    // 300 ms below, 1.5 s and 3 s above (no growth would make the second gap 1 s, growth
    // from the first ejection on would make the first 3 s).
    let mut fives: Vec<Instant> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    while fives.len() < 3 && Instant::now() < deadline {
        let r = get(proxy, "growing", "/", &[]);
        match (r.status, r.header("x-trellis-reason")) {
            (500, None) => fives.push(Instant::now()),
            (503, Some("no_instance")) => std::thread::sleep(Duration::from_millis(20)),
            other => panic!("growing answered {other:?}: {}", r.text()),
        }
    }
    assert_eq!(fives.len(), 3, "three 500s, with two ejections between them, within 15 s");
    let (first, second) = (fives[1] - fives[0], fives[2] - fives[1]);
    println!("ejections of growing: {first:?}, then {second:?}");
    assert!(
        first >= Duration::from_millis(900) && first < Duration::from_millis(2500),
        "the first lasts base_ejection_time (1 s): {first:?}"
    );
    assert!(
        second >= Duration::from_millis(2700) && second < Duration::from_secs(6),
        "the second lasts 1 s * ejection_growth 3: {second:?}"
    );

    // instances.weight: `weighted` is smooth weighted round robin, which sends exactly one
    // request in four to the weight-1 instance once both are in (100 of 400). The margin of
    // 10 only covers a cycle begun before; ignoring the weights would send 200 there.
    let mut light = 0;
    for _ in 0..400 {
        let r = get(proxy, "weighted", "/", &[]);
        assert_eq!(r.status, 200, "{}", r.text());
        light += usize::from(r.text() == "light /");
    }
    println!("weights 1 and 3: {light} of 400 to weight 1");
    assert!((90..=110).contains(&light), "weights 1 and 3 sent {light} of 400 to weight 1, want 100");

    // services.lb.locality: node 0 is in zone a. Its requests to `near` go only to the
    // instance on node 1 (zone a, from the node's label), while `far`, the same instances
    // without locality, uses both.
    let spread = |service: &str, n: usize| -> std::collections::BTreeMap<String, usize> {
        let mut seen = std::collections::BTreeMap::new();
        for _ in 0..n {
            let r = get(proxy, service, "/", &[]);
            assert_eq!(r.status, 200, "{service}: {}", r.text());
            *seen.entry(r.text()).or_insert(0) += 1;
        }
        seen
    };
    let near = spread("near", 20);
    assert_eq!(near.keys().collect::<Vec<_>>(), ["in-a /"], "locality keeps node 0's requests in zone a: {near:?}");
    let far = spread("far", 20);
    assert_eq!(far.len(), 2, "without locality both zones serve: {far:?}");
    // An instance's own zone label beats its node's: this one runs on node 2 (zone b).
    let mut labelled = instance("near", server("labelled-a").port());
    labelled["labels"] = json!({"zone": "a"});
    put(&c, 2, "/v1/agent/services/near-labelled", labelled);
    c.wait_until(Duration::from_secs(10), "the labelled instance in use", || {
        (get(proxy, "near", "/", &[]).text() == "labelled-a /").then_some(())
    })
    .unwrap();
    let near = spread("near", 20);
    assert_eq!(
        near.keys().collect::<Vec<_>>(),
        ["in-a /", "labelled-a /"],
        "zone a by node or instance label: {near:?}"
    );
    // No instance left in zone a (no region labels either): anywhere, so zone b.
    for (node, id) in [(1, "near-a"), (2, "near-labelled")] {
        let (s, v) = c.node(node).api().delete(&format!("/v1/agent/services/{id}")).unwrap();
        assert_eq!(s, 200, "DELETE {id}: {v}");
    }
    c.wait_until(Duration::from_secs(10), "zone a's instances gone from node 0's view", || {
        (listed(0, "near") == 1 && get(proxy, "near", "/", &[]).text() == "in-b /").then_some(())
    })
    .unwrap();
    let near = spread("near", 10);
    assert_eq!(near.keys().collect::<Vec<_>>(), ["in-b /"], "with zone a empty, locality fails over: {near:?}");
    println!("locality done at {:?}", t0.elapsed());

    // services.health_check.healthy_threshold: `rising` fails its probes until critical;
    // then 3 good probes (one short of the threshold of 4) leave it critical, and with its
    // probes passing for good it is passing again only after at least 4 of them.
    let health = || -> Option<String> {
        let v = c.node(1).api().get_json("/v1/catalog/services/rising").ok()?;
        v.as_array()?.first()?["health"].as_str().map(String::from)
    };
    c.wait_until(Duration::from_secs(10), "rising critical", || (health()? == "critical").then_some(())).unwrap();
    oks.store(3, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut spent_at = None;
    // Probes run one at a time, each verdict written on node 1 before the next probe; so
    // once a probe follows the third good one, what node 1 shows has seen all three.
    loop {
        assert_ne!(health().as_deref(), Some("passing"), "3 good probes made it passing, threshold 4");
        let n = probes.load(Ordering::SeqCst);
        match spent_at {
            None if oks.load(Ordering::SeqCst) == 0 => spent_at = Some(n),
            // `at` may miss the third good probe's count, not the one after it.
            Some(at) if n >= at + 2 => break,
            _ => {}
        }
        assert!(Instant::now() < deadline, "the 3 good probes and one more did not happen within 5 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(health().as_deref(), Some("critical"), "3 good probes in a row leave it critical (threshold 4)");
    let before = probes.load(Ordering::SeqCst);
    healthy.store(true, Ordering::SeqCst);
    let t = Instant::now();
    c.wait_until(Duration::from_secs(10), "rising passing again", || (health()? == "passing").then_some(())).unwrap();
    let good_probes = probes.load(Ordering::SeqCst) - before;
    println!("passing again after {:?}, {good_probes} probes", t.elapsed());
    assert!(good_probes >= 4, "passing again after {good_probes} good probes, threshold 4");
    println!("all done at {:?}", t0.elapsed());
}

/// Access log lines on both agents of a request carry the same request id and trace; the
/// caller's `traceparent` is continued, and the instance sees the destination's hop as parent.
#[test]
fn request_ids_and_trace_context_cross_two_agents_into_both_access_logs() {
    let dir = std::env::temp_dir().join(format!("trellis-access-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (log0, log1) = (dir.join("n0.log"), dir.join("n1.log"));
    let proxy: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let tcp: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let node_args = vec![
        vec![
            "--proxy".into(),
            proxy.to_string(),
            "--upstream".into(),
            format!("echo={tcp}"),
            "--access-log".into(),
            log0.display().to_string(),
        ],
        vec!["--access-log".into(), log1.display().to_string()],
    ];
    let c = Cluster::start(ClusterSpec { nodes: 2, node_args, ..Default::default() }).unwrap();
    // The instance answers with the request head it received.
    let server = trellis_chaos::plain::serve(|head| (200, head.as_bytes().to_vec()));
    let body = json!({"service": "web", "address": "127.0.0.1", "port": server.port(), "protocol": "http"});
    let (s, v) = c.node(1).api().put_json("/v1/agent/services/web-1", &body).unwrap();
    assert_eq!(s, 200, "{v}");
    let get = |extra: &[(&str, &str)]| trellis_tests::http::get(proxy, "web", "/hi?x=1", extra);
    c.wait_until(Duration::from_secs(10), "web through node 0", || (get(&[]).status == 200).then_some(())).unwrap();
    let lines = |p: &std::path::Path| -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(p).unwrap_or_default();
        text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    };
    // The line of request `id` in each agent's log, once both are written.
    let line_of = |id: &str| -> (serde_json::Value, serde_json::Value) {
        let find = |p: &std::path::Path| lines(p).into_iter().find(|l| l["request_id"] == id);
        c.wait_until(Duration::from_secs(5), "the access log lines", || Some((find(&log0)?, find(&log1)?))).unwrap()
    };

    // No ids from the client: the first agent makes them, the second keeps them.
    let r = get(&[]);
    let seen = r.text().to_ascii_lowercase();
    let header = |name: &str| {
        seen.lines().find_map(|l| l.strip_prefix(&format!("{name}: "))).unwrap_or_else(|| panic!("{name} in {seen}"))
    };
    let (out, inn) = line_of(header("x-request-id"));
    println!("{out}\n{inn}");
    assert_eq!((out["side"].as_str(), inn["side"].as_str()), (Some("outbound"), Some("inbound")));
    assert_eq!(out["trace_id"], inn["trace_id"]);
    assert!(out.get("parent_span_id").is_none(), "the first agent starts the trace");
    assert_eq!(inn["parent_span_id"], out["span_id"], "the destination's parent is the caller's hop");
    let tp = header("traceparent");
    assert_eq!(tp, format!("00-{}-{}-00", out["trace_id"].as_str().unwrap(), inn["span_id"].as_str().unwrap()));
    assert_eq!((out["status"].as_u64(), inn["status"].as_u64()), (Some(200), Some(200)));
    assert_eq!(out["instance"].as_str(), Some(format!("web-1@{}", c.node(1).name).as_str()));
    assert_eq!(
        (out["path"].as_str(), out["method"].as_str(), out["attempts"].as_u64()),
        (Some("/hi?x=1"), Some("GET"), Some(1))
    );
    assert_eq!(out["bytes_sent"].as_u64(), Some(r.body.len() as u64));
    assert_eq!(inn["source"].as_str(), Some(self_id(&c, 0).as_str()));
    for (p, l) in [(&log0, &out), (&log1, &inn)] {
        let same: Vec<_> = lines(p).into_iter().filter(|x| x["request_id"] == l["request_id"]).collect();
        assert_eq!(same.len(), 1, "one line per agent per request");
    }

    // The client's own ids: kept, and its trace continued with new spans.
    let parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    get(&[("x-request-id", "client-id-7"), ("traceparent", parent)]);
    let (out, inn) = line_of("client-id-7");
    for l in [&out, &inn] {
        assert_eq!(l["trace_id"].as_str(), Some("0af7651916cd43dd8448eb211c80319c"));
        assert_ne!(l["span_id"].as_str(), Some("b7ad6b7169203331"));
    }
    assert_eq!(out["parent_span_id"].as_str(), Some("b7ad6b7169203331"));
    assert_eq!(inn["parent_span_id"], out["span_id"]);

    // A TCP connection gets one line on each agent too, with its bytes both ways.
    register(&c, 1, "echo-1", echo_server("hello"));
    wait_instances(&c, 0, 1);
    let mut s = c.wait_until(Duration::from_secs(10), "the echo listener", || TcpStream::connect(tcp).ok()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 6];
    s.read_exact(&mut buf).unwrap();
    s.write_all(b"ping").unwrap();
    s.read_exact(&mut buf[..4]).unwrap();
    drop(s);
    let tcp_line = |p: &std::path::Path| lines(p).into_iter().find(|l| l["protocol"] == "TCP");
    let (out, inn) =
        c.wait_until(Duration::from_secs(5), "the TCP lines", || Some((tcp_line(&log0)?, tcp_line(&log1)?))).unwrap();
    println!("{out}\n{inn}");
    for l in [&out, &inn] {
        assert_eq!(
            (l["service"].as_str(), l["bytes_received"].as_u64(), l["bytes_sent"].as_u64()),
            (Some("echo"), Some(4), Some(10))
        );
        assert!(l.get("method").is_none() && l.get("request_id").is_none(), "{l}");
    }
    assert_eq!(inn["source"].as_str(), Some(self_id(&c, 0).as_str()));
    let written = lines(&log0).len() as f64;
    c.wait_until(Duration::from_secs(5), "the lines counted", || {
        let m = c.node(0).api().get_text("/metrics").ok()?;
        (metric(&m, "trellis_access_log_lines_total") == Some(written)).then_some(())
    })
    .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Requests through two agents' proxies show up, merged, in `/v1/stats` and `trellis stat`
/// on a third agent that proxied none of them, within two aggregation intervals.
#[test]
fn stat_on_any_agent_shows_the_whole_meshs_traffic() {
    let proxies: Vec<SocketAddr> = (0..2).map(|_| format!("127.0.0.1:{}", free_port()).parse().unwrap()).collect();
    let node_args = proxies.iter().map(|p| vec!["--proxy".to_string(), p.to_string()]).collect();
    let c = Cluster::start(ClusterSpec { nodes: 3, node_args, ..Default::default() }).unwrap();
    let all = [0, 1, 2];
    let alive: Vec<(String, &str)> = all.iter().map(|&i| (c.node(i).name.clone(), "alive")).collect();
    c.wait_all_see(&all, &alive, Duration::from_secs(15)).unwrap();
    let server = trellis_chaos::plain::serve(|head| match trellis_chaos::plain::path_of(head) {
        "/bad" => (500, b"bad".to_vec()),
        _ => (200, b"ok".to_vec()),
    });
    for service in ["web", "api"] {
        let body = json!({"service": service, "address": "127.0.0.1", "port": server.port(), "protocol": "http"});
        let (s, v) = c.node(2).api().put_json(&format!("/v1/agent/services/{service}-1"), &body).unwrap();
        assert_eq!(s, 200, "{v}");
    }
    // `web` warms both paths up; `api` is only waited for, so every request to it is counted.
    for p in &proxies {
        c.wait_until(Duration::from_secs(10), "web through the proxy", || {
            (trellis_tests::http::get(*p, "web", "/", &[]).status == 200).then_some(())
        })
        .unwrap();
    }
    for i in [0, 1] {
        c.wait_until(Duration::from_secs(10), "api in the catalog", || {
            let v = c.node(i).api().get_json("/v1/catalog/services/api").ok()?;
            (!v.as_array()?.is_empty()).then_some(())
        })
        .unwrap();
    }
    for i in 0..100 {
        let path = if i % 10 == 0 { "/bad" } else { "/ok" };
        assert_ne!(trellis_tests::http::get(proxies[0], "api", path, &[]).status, 0);
    }
    for _ in 0..50 {
        assert_eq!(trellis_tests::http::get(proxies[1], "api", "/ok", &[]).status, 200);
    }
    let sent = std::time::Instant::now();
    let stats = |by: &str| c.node(2).api().get_json(&format!("/v1/stats?service=api&by={by}&window=1m")).unwrap();
    let rows = c
        .wait_until(Duration::from_secs(5), "all 150 requests in node 2's answer", || {
            let v = stats("service");
            (v["rows"][0]["requests"].as_u64() == Some(150)).then_some(v)
        })
        .unwrap();
    println!("mesh-wide after {:?}: {rows}", sent.elapsed());
    let row = &rows["rows"][0];
    assert_eq!((row["name"].as_str(), row["errors"].as_u64()), (Some("api"), Some(10)));
    assert!((row["success"].as_f64().unwrap() - 140.0 / 150.0).abs() < 1e-9, "{row}");
    assert!(row["rps"].as_f64().unwrap() > 0.0 && row["p99_ms"].as_f64().unwrap() > 0.0, "{row}");
    let by_source = stats("source");
    let sources: Vec<(String, u64, u64)> = by_source["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (r["name"].as_str().unwrap().to_string(), r["requests"].as_u64().unwrap(), r["errors"].as_u64().unwrap())
        })
        .collect();
    assert_eq!(sources, [(c.node(0).name.clone(), 100, 10), (c.node(1).name.clone(), 50, 0)]);
    // The figures live on api's two owners; every node asks them and gets the same answer.
    assert_eq!((rows["asked"].as_u64(), rows["missing"].as_array().map(Vec::len)), (Some(2), Some(0)), "{rows}");
    for i in [0, 1] {
        let v = c.node(i).api().get_json("/v1/stats?service=api&window=1m").unwrap();
        assert_eq!(v["rows"][0]["requests"].as_u64(), Some(150), "node {i}: {v}");
    }
    let all = c.node(0).api().get_json("/v1/stats?window=1m").unwrap();
    assert_eq!(all["asked"].as_u64(), Some(3), "every member asked for every service: {all}");
    let names: Vec<&str> = all["rows"].as_array().unwrap().iter().filter_map(|r| r["name"].as_str()).collect();
    assert!(names.contains(&"api") && names.contains(&"web"), "{all}");
    let (mut kept, mut refused) = (0.0, 0.0);
    for i in 0..3 {
        let m = c.node(i).api().get_text("/metrics").unwrap();
        kept += metric(&m, "trellis_stats_digests_total{result=\"kept\"}").unwrap();
        refused += metric(&m, "trellis_stats_digests_total{result=\"refused\"}").unwrap();
    }
    assert!(kept >= 2.0 && refused == 0.0, "owners kept peers' digests: {kept} kept, {refused} refused");
    let by_node = stats("node");
    assert_eq!(by_node["rows"][0]["name"].as_str(), Some(c.node(2).name.as_str()), "node 2's instance answered");
    // The CLI on node 2, as an operator reads it.
    let out = std::process::Command::new(trellis_chaos::cluster::trellis_bin())
        .args(["stat", "api", "--http-addr", &c.node(2).api_addr.to_string()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}");
    let cols: Vec<Vec<&str>> = text.lines().map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(cols[0], ["SERVICE", "SUCCESS", "RPS", "LATENCY_P50", "LATENCY_P95", "LATENCY_P99", "TCP_CONN"]);
    assert_eq!((cols[1][0], cols[1][1]), ("api", "93.33%"), "{text}");
    let bad = c.node(2).api().get_json("/v1/stats?window=2h").unwrap_err().to_string();
    assert!(bad.contains("400") && bad.contains("window"), "{bad}");

    // `trellis top` in a real terminal (tmux), as an operator watches it.
    let tmux = |args: &[&str]| {
        let out = std::process::Command::new("tmux").args(args).output();
        out.unwrap_or_else(|e| panic!("tmux {args:?}: {e}; install Debian's tmux (.ci/run does)"))
    };
    let session = format!("trellis-top-{}", std::process::id());
    let cmd = format!(
        "{} top --window 1m --http-addr {}",
        trellis_chaos::cluster::trellis_bin().display(),
        c.node(2).api_addr
    );
    assert!(tmux(&["new-session", "-d", "-s", &session, "-x", "160", "-y", "30", &cmd]).status.success());
    let edge = |i: usize| format!("{} -> api@{}", c.node(i).name, c.node(2).name);
    let screen = c.wait_until(Duration::from_secs(10), "top's frame with both paths", || {
        let text = String::from_utf8_lossy(&tmux(&["capture-pane", "-p", "-t", &session]).stdout).to_string();
        (text.contains(&edge(0)) && text.contains(&edge(1))).then_some(text)
    });
    tmux(&["kill-session", "-t", &session]);
    let screen = screen.unwrap();
    println!("{screen}");
    assert!(screen.contains("trellis top: busiest paths across the mesh") && screen.contains("SOURCE -> SERVICE@NODE"));
    let line = screen.lines().find(|l| l.starts_with(&edge(0))).unwrap();
    assert!(line.split_whitespace().any(|w| w == "90.00%"), "node 0's path: 10 of 100 failed: {line}");
}

#[test]
fn spans_of_every_hop_reach_an_otlp_receiver_and_a_hung_collector_costs_requests_nothing() {
    use trellis_chaos::otlp::{Received, Receiver};
    let receiver = Receiver::start();
    // A collector that accepts connections and never answers.
    let hung = TcpListener::bind("127.0.0.1:0").unwrap();
    let dir = std::env::temp_dir().join(format!("trellis-otlp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = |name: &str, endpoint: SocketAddr, extra: &str| {
        let p = dir.join(name);
        std::fs::write(&p, format!("[traces]\nendpoint = \"http://{endpoint}\"\ndelay = \"100ms\"\n{extra}")).unwrap();
        p.display().to_string()
    };
    let (proxy, stuck_proxy): (SocketAddr, SocketAddr) =
        (format!("127.0.0.1:{}", free_port()).parse().unwrap(), format!("127.0.0.1:{}", free_port()).parse().unwrap());
    let node_args = vec![
        vec!["--proxy".into(), proxy.to_string(), "--config".into(), config("n0.toml", receiver.addr, "")],
        vec!["--config".into(), config("n1.toml", receiver.addr, "")],
        vec![
            "--proxy".into(),
            stuck_proxy.to_string(),
            "--config".into(),
            config("n2.toml", hung.local_addr().unwrap(), "max_queue = 16\nmax_batch = 8\ntimeout = \"2s\"\n"),
        ],
    ];
    let c = Cluster::start(ClusterSpec { nodes: 3, node_args, ..Default::default() }).unwrap();
    let server = trellis_chaos::plain::serve(|head| {
        let fail = trellis_chaos::plain::path_of(head) == "/fail";
        (if fail { 500 } else { 200 }, b"ok".to_vec())
    });
    let body = json!({"service": "web", "address": "127.0.0.1", "port": server.port(), "protocol": "http"});
    let (s, v) = c.node(1).api().put_json("/v1/agent/services/web-1", &body).unwrap();
    assert_eq!(s, 200, "{v}");
    for p in [proxy, stuck_proxy] {
        let ok = || (trellis_tests::http::get(p, "web", "/warm", &[]).status == 200).then_some(());
        c.wait_until(Duration::from_secs(10), "web through the proxy", ok).unwrap();
    }
    // The spans of trace `t`, once `n` have arrived.
    let trace = |t: &str, n: usize| -> Vec<Received> {
        c.wait_until(Duration::from_secs(10), "the spans of a trace", || {
            let s: Vec<Received> = receiver.spans().into_iter().filter(|s| s.trace_hex() == t).collect();
            (s.len() >= n).then_some(s)
        })
        .unwrap()
    };
    let one = |spans: &[Received], node: usize, kind: i32| -> Received {
        let name = &c.node(node).name;
        let mut m: Vec<&Received> = spans.iter().filter(|s| &s.node == name && s.span.kind == kind).collect();
        assert_eq!(m.len(), 1, "one span of kind {kind} from {name}: {spans:#?}");
        m.remove(0).clone()
    };
    const SERVER: i32 = 2;
    const CLIENT: i32 = 3;

    // A client continuing its own trace: one span per hop and one per attempt, linked.
    let parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    assert_eq!(trellis_tests::http::get(proxy, "web", "/hi", &[("traceparent", parent)]).status, 200);
    let spans = trace("0af7651916cd43dd8448eb211c80319c", 3);
    let clients: Vec<&Received> = spans.iter().filter(|s| s.node == c.node(0).name && s.span.kind == CLIENT).collect();
    assert_eq!(clients.len(), 2, "the hop and its attempt: {spans:#?}");
    let hop =
        clients.iter().find(|s| s.parent_hex() == "b7ad6b7169203331").expect("the hop's parent is the client's span");
    let attempt = clients.iter().find(|s| s.parent_hex() == hop.span_hex()).expect("the attempt is the hop's child");
    let inbound = one(&spans, 1, SERVER);
    assert_eq!(inbound.parent_hex(), attempt.span_hex(), "the destination's parent is the attempt");
    assert_eq!(hop.span.name, "GET web");
    assert_eq!(attempt.attr("trellis.instance"), Some(format!("web-1@{}", c.node(1).name)));
    assert_eq!(
        (hop.attr("http.response.status_code"), inbound.attr("url.path")),
        (Some("200".into()), Some("/hi".into()))
    );
    assert_eq!(inbound.attr("trellis.caller"), Some(self_id(&c, 0)));
    for s in &spans {
        assert_eq!(s.span.status.as_ref().map_or(0, |st| st.code), 0, "no error status on a 200: {s:?}");
        assert!(s.span.end_time_unix_nano >= s.span.start_time_unix_nano);
    }

    // A new trace from the first agent, answered 500: every span says error.
    let r = trellis_tests::http::get(proxy, "web", "/fail", &[("x-request-id", "fail-1")]);
    assert_eq!(r.status, 500);
    let t = c
        .wait_until(Duration::from_secs(10), "the failed request's spans", || {
            receiver.spans().into_iter().find(|s| s.attr("trellis.request_id").as_deref() == Some("fail-1"))
        })
        .unwrap()
        .trace_hex();
    let spans = trace(&t, 3);
    assert!(spans.iter().any(|s| s.node == c.node(0).name && s.span.parent_span_id.is_empty()), "a new root");
    for s in &spans {
        let st = s.span.status.clone().unwrap_or_default();
        assert_eq!((st.code, st.message.as_str()), (2, "HTTP 500"), "error status on every hop: {s:?}");
    }

    // A caller that decided not to sample: no spans.
    let unsampled = "00-1af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00";
    assert_eq!(trellis_tests::http::get(proxy, "web", "/quiet", &[("traceparent", unsampled)]).status, 200);

    // A hung collector: requests through the agent exporting to it are all answered, and
    // its spans wait in a queue of 16 at most (the rest are dropped, not buffered).
    for i in 0..300 {
        let r = trellis_tests::http::get(stuck_proxy, "web", &format!("/n{i}"), &[]);
        assert_eq!(r.status, 200, "request {i} through the agent with a hung collector");
    }
    // Each export waits 2 s for the hung collector and fails; once the queue has drained
    // that way, what failed is all that was ever held: the queue and one batch in flight.
    let spans = |r: &str| {
        let m = c.node(2).api().get_text("/metrics").unwrap();
        metric(&m, &format!("trellis_trace_spans_total{{result=\"{r}\"}}")).unwrap()
    };
    let mut last = (f64::NAN, std::time::Instant::now());
    let failed = c
        .wait_until(Duration::from_secs(30), "the queue drained by failed exports", || {
            let f = spans("failed");
            if f != last.0 {
                last = (f, std::time::Instant::now());
            }
            (f >= 8.0 && last.1.elapsed() > Duration::from_secs(5)).then_some(f)
        })
        .unwrap();
    let (ended, exported) = (spans("ended"), spans("exported"));
    println!("hung collector: {ended} spans ended, {failed} held and failed, {exported} exported, the rest dropped");
    assert!(ended >= 600.0 && exported == 0.0, "{ended} ended, {exported} exported");
    assert!(failed <= 16.0 + 2.0 * 8.0, "at most the queue (16) and a batch (8) in flight were held: {failed}");
    let m = c.node(0).api().get_text("/metrics").unwrap();
    assert!(metric(&m, "trellis_trace_spans_total{result=\"exported\"}").unwrap() >= 4.0);
    std::thread::sleep(Duration::from_millis(500));
    let quiet = receiver.spans().into_iter().filter(|s| s.trace_hex() == "1af7651916cd43dd8448eb211c80319c").count();
    assert_eq!(quiet, 0, "an unsampled trace exports nothing");
    drop(hung);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn dns_answers_healthy_instances_subsets_and_nodes_and_truncates_over_udp() {
    use hickory_proto::op::ResponseCode;
    use hickory_proto::rr::{RData, RecordType};
    use trellis_node::client_dns::query;
    let mut c = Cluster::start(ClusterSpec { nodes: 3, ..Default::default() }).unwrap();
    let all = [0, 1, 2];
    let alive: Vec<(String, &str)> = all.iter().map(|&i| (c.node(i).name.clone(), "alive")).collect();
    c.wait_all_see(&all, &alive, Duration::from_secs(15)).unwrap();
    let dns: SocketAddr =
        c.node(0).api().get_json("/v1/agent/self").unwrap()["dns_addr"].as_str().unwrap().parse().unwrap();
    assert_eq!(dns.port(), 8600, "Consul's port, on the agent's loopback address");
    // Three instances of web (addresses only answered, never dialled), one failing its check.
    let closed = free_port();
    let mut web3 = json!(null);
    for (node, id, ip, port, version, check) in [
        (1, "web-1", "127.0.10.1", 8080, "v1", false),
        (2, "web-2", "127.0.10.2", 8081, "v2", false),
        (2, "web-3", "127.0.10.3", closed, "v1", true),
    ] {
        let mut body = json!({"service": "web", "address": ip, "port": port, "labels": {"version": version}});
        if check {
            body["check"] = json!({"http": "/healthz", "interval": "200ms", "timeout": "150ms", "rise": 1, "fall": 1});
        }
        let (s, v) = c.node(node).api().put_json(&format!("/v1/agent/services/{id}"), &body).unwrap();
        assert_eq!(s, 200, "{v}");
        if id == "web-3" {
            web3 = body;
        }
    }
    let (s, v) = c
        .node(0)
        .api()
        .put_json("/v1/policy/subsets/v2", &json!({"service": "web", "labels": {"version": "v2"}}))
        .unwrap();
    assert_eq!(s, 200, "{v}");
    let addrs = |name: &str, t: RecordType, tcp: bool| -> (ResponseCode, Vec<String>) {
        let m = query(dns, name, t, tcp).unwrap();
        let mut v: Vec<String> = m.answers.iter().map(|r| r.data.to_string()).collect();
        v.sort();
        (m.metadata.response_code, v)
    };
    // web-3 is critical once its check has failed: node 0 knows it (its own name answers
    // NOERROR) but serves it not (no records), and web's answers hold web-1 and web-2 only.
    // Without the first half, an answer taken before web-3's registration reached node 0
    // looks the same, and web-3 (unknown until its first probe, and served) turns up next.
    c.wait_until(Duration::from_secs(15), "web-3 known but critical, web's healthy instances in DNS", || {
        let (code, web3) = addrs("web-3.web.service.trellis", RecordType::A, false);
        let known_not_served = code == ResponseCode::NoError && web3.is_empty();
        (known_not_served && addrs("web.service.trellis", RecordType::A, false).1 == ["127.0.10.1", "127.0.10.2"])
            .then_some(())
    })
    .unwrap();
    assert_eq!(
        addrs("WEB.Service.Trellis.", RecordType::A, true).1,
        ["127.0.10.1", "127.0.10.2"],
        "over TCP, any case"
    );
    // dig, as an operator asks (`.ci/run` installs dnsutils).
    let dig = |args: &[&str]| -> String {
        let out = std::process::Command::new("dig")
            .args([&format!("@{}", dns.ip()), "-p", &dns.port().to_string()])
            .args(args)
            .output()
            .expect("dig (apt-get install dnsutils)");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let short = |args: &[&str]| -> String {
        let mut v: Vec<String> = dig(&[args, &["+short"]].concat()).lines().map(str::to_string).collect();
        v.sort();
        v.join("\n")
    };
    assert_eq!(short(&["web.service.trellis"]), "127.0.10.1\n127.0.10.2");
    assert_eq!(
        short(&["web.service.trellis", "SRV"]),
        "1 1 8080 7f000a01.addr.trellis.\n1 1 8081 7f000a02.addr.trellis."
    );
    assert!(dig(&["db.service.trellis"]).contains("status: NXDOMAIN"));
    assert_eq!(addrs("v2.web.service.trellis", RecordType::A, false).1, ["127.0.10.2"], "a subset");
    assert_eq!(addrs("web-1.web.service.trellis", RecordType::A, false).1, ["127.0.10.1"], "an instance");
    let srv = query(dns, "_web._tcp.service.trellis", RecordType::SRV, false).unwrap();
    let mut targets: Vec<(u16, String)> = srv
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::SRV(s) => Some((s.port, s.target.to_string())),
            _ => None,
        })
        .collect();
    targets.sort();
    assert_eq!(targets, [(8080, "7f000a01.addr.trellis.".to_string()), (8081, "7f000a02.addr.trellis.".to_string())]);
    let extra: Vec<String> = srv.additionals.iter().map(|r| format!("{} {}", r.name, r.data)).collect();
    assert!(extra.contains(&"7f000a01.addr.trellis. 127.0.10.1".to_string()), "{extra:?}");
    let node2 = format!("{}.node.trellis", c.node(2).name);
    assert_eq!(addrs(&node2, RecordType::A, false).1, [c.node(2).peer_addr.ip().to_string()]);
    assert_eq!(addrs("db.service.trellis", RecordType::A, false).0, ResponseCode::NXDomain);
    assert_eq!(addrs("example.com", RecordType::A, false).0, ResponseCode::Refused, "never recursing");

    // 120 instances do not fit in 1232 bytes: UDP says so (TC, no records), TCP has them all.
    for i in 0..120 {
        let body = json!({"service": "big", "address": format!("127.0.20.{}", i + 1), "port": 80});
        let (s, v) = c.node(1).api().put_json(&format!("/v1/agent/services/big-{i}"), &body).unwrap();
        assert_eq!(s, 200, "{v}");
    }
    let big = c
        .wait_until(Duration::from_secs(15), "120 instances over TCP", || {
            let m = query(dns, "big.service.trellis", RecordType::A, true).ok()?;
            (m.answers.len() == 120).then_some(m)
        })
        .unwrap();
    assert!(!big.metadata.truncation);
    let udp = query(dns, "big.service.trellis", RecordType::A, false).unwrap();
    assert!(udp.metadata.truncation && udp.answers.is_empty(), "UDP answer cut to its header");

    // The CLI, as an operator asks it.
    let out = std::process::Command::new(trellis_chaos::cluster::trellis_bin())
        .args(["dns", "big.service.trellis", "--http-addr", &c.node(0).api_addr.to_string()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("after a truncated UDP answer") && text.matches("127.0.20.").count() == 120, "{text}");

    // web-3 registered again as it was (an orchestrator re-asserting it): the store says
    // unknown again, so its checker, critical all along, writes its verdict back. Asked of
    // node 2, whose own write comes first, so the answer can only go from served to not.
    let (s, v) = c.node(2).api().put_json("/v1/agent/services/web-3", &web3).unwrap();
    assert_eq!(s, 200, "{v}");
    let dns2: SocketAddr =
        c.node(2).api().get_json("/v1/agent/self").unwrap()["dns_addr"].as_str().unwrap().parse().unwrap();
    c.wait_until(Duration::from_secs(10), "web-3 critical again after its re-registration", || {
        let m = query(dns2, "web.service.trellis", RecordType::A, false).ok()?;
        (!m.answers.iter().any(|r| r.data.to_string() == "127.0.10.3")).then_some(())
    })
    .unwrap();

    // web-2's node crashes: once it is down, its instance leaves the answers.
    c.kill(2);
    c.wait_until(Duration::from_secs(20), "web-2 gone from DNS", || {
        (addrs("web.service.trellis", RecordType::A, false).1 == ["127.0.10.1"]).then_some(())
    })
    .unwrap();
    let m = c.node(0).api().get_text("/metrics").unwrap();
    assert!(metric(&m, "trellis_dns_queries_total{rcode=\"truncated\"}").unwrap() >= 2.0);
    assert!(metric(&m, "trellis_dns_queries_total{rcode=\"refused\"}").unwrap() >= 1.0);
}

/// An unchanged application finds services by name: `web.trellis` resolves through the
/// agent's DNS to a virtual address where the agent listens on the service's ports; HTTP
/// goes through the L7 path, a `tcp` service's bytes through unchanged. Two services on one
/// host are told apart by the Unix user they run as, so `svc:batch -> db deny` refuses
/// batch's calls and lets frontend's through.
#[test]
fn virtual_addresses_carry_http_and_tcp_and_callers_are_known_by_service() {
    let c = three_agents(vec![]);
    let (web, _) = stoppable_http_server("hello from web");
    let (db, _) = stoppable_http_server("db rows");
    let echo = echo_server("n1");
    let instance = |service: &str, a: SocketAddr, protocol: &str| json!({"service": service, "address": a.ip().to_string(), "port": a.port(), "protocol": protocol});
    put(&c, 0, "/v1/policy/services/web", json!({"ports": [8080]}));
    put(&c, 0, "/v1/policy/services/echo", json!({"protocol": "tcp"}));
    put(&c, 2, "/v1/agent/services/web-1", instance("web", web, "http"));
    put(&c, 2, "/v1/agent/services/db-1", instance("db", db, "http"));
    put(&c, 1, "/v1/agent/services/echo-1", instance("echo", echo, "tcp"));
    // Two callers on node 0, never called themselves: frontend runs as root, batch as nobody.
    let closed: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    for (id, service, user) in [("frontend-1", "frontend", "root"), ("batch-1", "batch", "65534")] {
        let mut body = instance(service, closed, "http");
        body["run_as"] = json!(user);
        put(&c, 0, &format!("/v1/agent/services/{id}"), body);
    }
    put(&c, 1, "/v1/policy/intentions/batch-db", json!({"source": "svc:batch", "destination": "db", "action": "deny"}));

    let api = c.node(0).api();
    let dns = api.get_json("/v1/agent/self").unwrap()["dns_addr"].as_str().unwrap().to_string();
    let dns: SocketAddr = dns.parse().unwrap();
    let vips = c
        .wait_until(Duration::from_secs(15), "virtual addresses for web, echo and db", || {
            let v = api.get_json("/v1/agent/virtual-addresses").ok()?;
            let listening = |svc: &str, port: u16| v["services"][svc]["ports"] == json!([{ "port": port }]);
            (listening("web", 8080) && listening("echo", echo.port()) && listening("db", db.port())).then_some(v)
        })
        .unwrap();
    // dig, as an application's resolver would ask.
    let dig = |name: &str| -> String {
        let out = std::process::Command::new("dig")
            .args([&format!("@{}", dns.ip()), "-p", &dns.port().to_string(), name, "+short"])
            .output()
            .expect("dig (apt-get install dnsutils)");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let web_ip = dig("web.trellis");
    assert_eq!(web_ip, vips["services"]["web"]["address"], "DNS answers the virtual address");
    assert!(web_ip.starts_with(&format!("127.{}.", c.node(0).peer_addr.ip().to_string().split('.').nth(1).unwrap())));

    // curl, unchanged, with the name resolved from dig's answer.
    let curl = |uid: Option<u32>, url: &str, host_port: &str, ip: &str| -> (String, String) {
        let mut cmd = std::process::Command::new("curl");
        cmd.args(["-s", "-m", "10", "-o", "-", "-w", "\n%{http_code}", "--resolve", &format!("{host_port}:{ip}"), url]);
        if let Some(uid) = uid {
            std::os::unix::process::CommandExt::uid(&mut cmd, uid);
        }
        let out = cmd.output().expect("curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        (code.to_string(), body.to_string())
    };
    let got = curl(None, "http://web.trellis:8080/", "web.trellis:8080", &web_ip);
    assert_eq!(got, ("200".into(), "hello from web".into()), "an instance on another node, through the L7 path");

    // 100 MiB of TCP through echo's virtual address, to an instance on node 1.
    let echo_ip: std::net::IpAddr = dig("echo.trellis").parse().unwrap();
    let mut s = TcpStream::connect((echo_ip, echo.port())).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut line = [0u8; 3];
    s.read_exact(&mut line).unwrap();
    assert_eq!(&line, b"n1\n");
    echo_100_mib(s);

    // Callers known by service: root's processes are frontend, nobody's are batch.
    let db_ip = dig("db.trellis");
    let db_url = format!("http://db.trellis:{}/", db.port());
    let db_host = format!("db.trellis:{}", db.port());
    c.wait_until(Duration::from_secs(10), "the intention on node 0", || {
        (curl(Some(65534), &db_url, &db_host, &db_ip).0 == "403").then_some(())
    })
    .unwrap();
    assert_eq!(curl(None, &db_url, &db_host, &db_ip), ("200".into(), "db rows".into()), "frontend's call passes");
    assert_eq!(curl(Some(65534), &db_url, &db_host, &db_ip).0, "403", "batch's call is refused");
    // The deny is batch's alone: node 0 itself (an unrecognised user) still gets through.
    assert_eq!(curl(Some(4242), &db_url, &db_host, &db_ip).0, "200");
}

/// What a recording server saw: (path, body, x-trellis-mirror) per request.
type Seen = std::sync::Arc<std::sync::Mutex<Vec<(String, String, String)>>>;

/// A keep-alive HTTP/1.1 server that answers `body` after `delay`, recording each request
/// as (path, body, x-trellis-mirror header).
fn recording_server(body: &'static str, delay: Duration) -> (SocketAddr, Seen) {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let log = seen.clone();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let log = log.clone();
            std::thread::spawn(move || {
                let mut r = std::io::BufReader::new(s.try_clone().unwrap());
                let mut w = s;
                loop {
                    let mut head = String::new();
                    loop {
                        let mut line = String::new();
                        if std::io::BufRead::read_line(&mut r, &mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        head.push_str(&line);
                    }
                    let header = |name: &str| {
                        head.lines()
                            .find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case(name)))
                            .map(|(_, v)| v.trim().to_string())
                    };
                    let len: usize = header("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
                    let mut req_body = vec![0u8; len];
                    r.read_exact(&mut req_body).unwrap();
                    let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
                    let mirror = header("x-trellis-mirror").unwrap_or_default();
                    log.lock().unwrap().push((path, String::from_utf8_lossy(&req_body).into_owned(), mirror));
                    std::thread::sleep(delay);
                    let resp = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len());
                    if w.write_all(resp.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, seen)
}

/// A route mirrors half its requests to a shadow subset: the shadow gets about that share,
/// bodies included, marked as copies; the caller only ever sees the stable answer, and not
/// the shadow's 300 ms either.
#[test]
fn a_route_mirrors_its_share_to_a_shadow_subset_without_the_caller_seeing_it() {
    let (c, proxy) = proxy_mesh();
    let (stable, _) = recording_server("stable", Duration::ZERO);
    let (shadow, seen) = recording_server("shadow", Duration::from_millis(300));
    for (node, id, at, version) in [(1, "web-1", stable, "v1"), (2, "web-2", shadow, "shadow")] {
        let body = json!({"service": "web", "address": "127.0.0.1", "port": at.port(), "labels": {"version": version}});
        put(&c, node, &format!("/v1/agent/services/{id}"), body);
    }
    put(&c, 0, "/v1/policy/subsets/v1", json!({"service": "web", "labels": {"version": "v1"}}));
    put(&c, 0, "/v1/policy/subsets/shadow", json!({"service": "web", "labels": {"version": "shadow"}}));
    let route =
        json!({"service": "web", "destination": {"subset": "v1"}, "mirror": {"subset": "shadow", "percent": 50}});
    put(&c, 0, "/v1/policy/routes/web-main", route);
    c.wait_until(Duration::from_secs(15), "the route and both instances on node 0", || {
        let p = c.node(0).api().get_json("/v1/policy/routes/web-main").ok()?;
        let web = c.node(0).api().get_json("/v1/catalog/services/web").ok()?;
        (p["body"]["mirror"]["percent"].as_f64() == Some(50.0) && web.as_array()?.len() == 2).then_some(())
    })
    .unwrap();
    let mut slowest = Duration::ZERO;
    for i in 0..120 {
        let started = std::time::Instant::now();
        let reply = if i % 6 == 0 {
            trellis_tests::http::post(proxy, "web", &format!("/p{i}"), format!("payload-{i}").as_bytes())
        } else {
            trellis_tests::http::get(proxy, "web", &format!("/g{i}"), &[])
        };
        slowest = slowest.max(started.elapsed());
        assert_eq!((reply.status, reply.text().as_str()), (200, "stable"), "request {i}");
    }
    assert!(slowest < Duration::from_millis(300), "a caller waited {slowest:?}: the mirror's 300 ms leaked");
    let copies = c
        .wait_until(Duration::from_secs(10), "every copy at the shadow", || {
            let m = c.node(0).api().get_text("/metrics").ok()?;
            let sent = metric(&m, "trellis_mirror_requests_total{result=\"sent\"}")?;
            let failed = metric(&m, "trellis_mirror_requests_total{result=\"failed\"}")?;
            let n = seen.lock().unwrap().len();
            (sent as usize == n && failed == 0.0 && n > 0).then_some(n)
        })
        .unwrap();
    println!("{copies} of 120 requests mirrored; slowest caller {slowest:?}");
    assert!((40..=80).contains(&copies), "{copies} of 120 mirrored at 50%");
    for (path, body, mirror) in seen.lock().unwrap().iter() {
        assert_eq!(mirror, "shadow", "a copy is marked as one");
        if let Some(i) = path.strip_prefix("/p") {
            assert_eq!(body, &format!("payload-{i}"), "a mirrored body arrives whole");
        } else {
            assert!(body.is_empty());
        }
    }
}

/// Rollouts decided by the agents: a canary failing 20% of its requests is cut at its
/// first gate, a healthy one climbs every step to promotion, and when the agent driving it
/// is killed mid-rollout another goes on from the same step, skipping and repeating none.
#[test]
fn rollouts_abort_a_failing_canary_and_promote_a_healthy_one_across_an_owners_death() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let proxy: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut c = Cluster::start(ClusterSpec {
        nodes: 4,
        node_args: vec![vec!["--proxy".into(), proxy.to_string()]],
        ..Default::default()
    })
    .unwrap();
    let all = [0, 1, 2, 3];
    let alive: Vec<(String, &str)> = all.iter().map(|&i| (c.node(i).name.clone(), "alive")).collect();
    c.wait_all_see(&all, &alive, Duration::from_secs(15)).unwrap();
    // A healthy rollout whose driver is node 3, which hosts no instance: killing it costs
    // the canary nothing, so any failure would be the takeover's.
    let names: Vec<String> = all.iter().map(|&i| c.node(i).name.clone()).collect();
    let good = (0..100)
        .map(|i| format!("api-v2-{i}"))
        .find(|n| trellis_core::rollout::owner(n, &names) == Some(names[3].as_str()))
        .unwrap();
    let hits = std::sync::Arc::new(AtomicU64::new(0));
    let n = hits.clone();
    let flaky = trellis_chaos::plain::serve(move |_| {
        // Every fifth request fails: 20%.
        if n.fetch_add(1, Ordering::Relaxed) % 5 == 4 {
            (500, b"canary error".to_vec())
        } else {
            (200, b"web v2".to_vec())
        }
    });
    let instances = [
        (1, "web-1", trellis_tests::http::server("web v1"), "web", "v1"),
        (2, "web-2", flaky, "web", "v2"),
        (1, "api-1", trellis_tests::http::server("api v1"), "api", "v1"),
        (2, "api-2", trellis_tests::http::server("api v2"), "api", "v2"),
    ];
    for (node, id, at, service, version) in instances {
        let body =
            json!({"service": service, "address": "127.0.0.1", "port": at.port(), "labels": {"version": version}});
        put(&c, node, &format!("/v1/agent/services/{id}"), body);
    }
    for service in ["web", "api"] {
        for v in ["v1", "v2"] {
            put(
                &c,
                0,
                &format!("/v1/policy/subsets/{service}-{v}"),
                json!({"service": service, "labels": {"version": v}}),
            );
        }
    }
    c.wait_until(Duration::from_secs(15), "four instances on node 0", || {
        let v = c.node(0).api().get_json("/v1/catalog/services").ok()?;
        (v["web"].as_array()?.len() == 2 && v["api"].as_array()?.len() == 2).then_some(())
    })
    .unwrap();
    // A rollout whose canary has no instance yet waits (its first step would send requests to
    // nothing), then starts once one serves.
    for v in ["v1", "v2"] {
        put(&c, 0, &format!("/v1/policy/subsets/idle-{v}"), json!({"service": "idle", "labels": {"version": v}}));
    }
    let idle = json!({"service": "idle", "stable": "idle-v1", "canary": "idle-v2", "steps": [50], "interval": "1h"});
    put(&c, 0, "/v1/policy/rollouts/idle-v2", idle);
    std::thread::sleep(Duration::from_secs(2));
    let phase = || c.node(0).api().get_json("/v1/rollouts/idle-v2").ok().map(|v| v["phase"].clone());
    assert_eq!(phase(), Some(json!("pending")), "started with no canary instance");
    let idle_v2 = trellis_tests::http::server("idle v2");
    let body = json!({"service": "idle", "address": "127.0.0.1", "port": idle_v2.port(), "labels": {"version": "v2"}});
    put(&c, 1, "/v1/agent/services/idle-2", body);
    c.wait_until(Duration::from_secs(10), "the idle rollout started", || (phase()? == "progressing").then_some(()))
        .unwrap();
    // Load through node 0 on both services until the test ends (bounded: 60 s).
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let t0 = std::time::Instant::now();
            while !stop.load(Ordering::Relaxed) && t0.elapsed() < Duration::from_secs(60) {
                for host in ["web", "api"] {
                    trellis_tests::http::get(proxy, host, "/", &[]);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let analysis = json!({"min_success_rate": 95, "min_requests": 10});
    let spec = |service: &str, steps: &[u32], interval: &str| {
        json!({"service": service, "stable": format!("{service}-v1"), "canary": format!("{service}-v2"),
               "steps": steps, "interval": interval, "analysis": analysis})
    };
    put(&c, 0, "/v1/policy/rollouts/web-v2", spec("web", &[20, 50, 100], "20s"));
    put(&c, 0, &format!("/v1/policy/rollouts/{good}"), spec("api", &[20, 50, 100], "3s"));
    let status =
        |c: &Cluster, node: usize, name: &str| c.node(node).api().get_json(&format!("/v1/rollouts/{name}")).ok();

    // The failing canary: aborted at its first gate, long before its 20 s interval ends.
    let started = std::time::Instant::now();
    let aborted = c
        .wait_until(Duration::from_secs(15), "web-v2 aborted", || {
            status(&c, 0, "web-v2").filter(|v| v["phase"] == "aborted")
        })
        .unwrap();
    println!("web-v2 aborted after {:?}: {}", started.elapsed(), aborted["status"]["reason"]);
    assert!(aborted["status"]["reason"].as_str().unwrap().contains("canary success"), "{aborted}");
    let split = c.node(2).api().get_json("/v1/policy/splits/rollout-web-v2").unwrap();
    assert_eq!(split["body"]["backends"][1]["weight"], 0, "100% stable again: {split}");
    c.wait_until(Duration::from_secs(5), "web answered by v1 only", || {
        (0..10).all(|_| trellis_tests::http::get(proxy, "web", "/", &[]).text().starts_with("web v1")).then_some(())
    })
    .unwrap();

    // The healthy canary: its owner dies at the second step; another agent goes on.
    c.wait_until(Duration::from_secs(20), "the good rollout at its second step", || {
        status(&c, 0, &good).filter(|v| v["status"]["weight"] == 50)
    })
    .unwrap();
    c.kill(3);
    let done = c
        .wait_until(Duration::from_secs(40), "the good rollout promoted", || {
            status(&c, 0, &good).filter(|v| v["phase"] == "promoted")
        })
        .unwrap();
    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();
    assert_ne!(done["owner"], names[3].as_str(), "another agent drove it to the end");
    let weights: Vec<u64> =
        done["status"]["timeline"].as_array().unwrap().iter().map(|e| e["weight"].as_u64().unwrap()).collect();
    assert_eq!(weights, [20, 50, 100, 100], "every step once, in order: {}", done["status"]["timeline"]);
    // The timeline, as an operator reads it.
    let out = std::process::Command::new(trellis_chaos::cluster::trellis_bin())
        .args(["rollout", "status", &good, "--http-addr", &c.node(1).api_addr.to_string()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}");
    assert!(text.contains("promoted") && text.contains("TIMELINE") && text.contains("gates passed"), "{text}");
}
