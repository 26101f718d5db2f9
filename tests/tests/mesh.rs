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

/// Three agents; node 0 has an `echo` upstream listener; returns (cluster, listener address).
fn mesh(extra: Vec<String>) -> (Cluster, SocketAddr) {
    let port = free_port();
    let listen: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut args0 = vec!["--upstream".to_string(), format!("echo={listen}")];
    args0.extend(extra);
    let c = Cluster::start(ClusterSpec { nodes: 3, node_args: vec![args0], ..Default::default() }).unwrap();
    let all = [0, 1, 2];
    let alive: Vec<(String, &str)> = all.iter().map(|&i| (c.node(i).name.clone(), "alive")).collect();
    c.wait_all_see(&all, &alive, Duration::from_secs(15)).unwrap();
    (c, listen)
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
    let m = c.node(2).api().get_text("/metrics").unwrap();
    assert!(metric(&m, "trellis_forward_inbound_total").unwrap() >= 1.0);
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
