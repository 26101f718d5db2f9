//! Bootstrap with join tokens and certificate renewal, with real `trellis` processes on
//! loopback, run exactly as README's "A real cluster on three hosts" shows: `ca init` and
//! `agent --ca-dir` on the first host, `token create` there for each new host, and one
//! `agent --join SEED --token T` on each new host.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use trellis_chaos::cluster::{trellis_bin, Cluster, ClusterSpec};
use trellis_chaos::http::Api;
use trellis_tests::metric;

const PEER_PORT: u16 = 7946;
const API_PORT: u16 = 8500;

/// Hosts on 127.255.B.x: the cluster harness never hands out 127.255/16, so nothing clashes.
struct Hosts {
    root: PathBuf,
    subnet: u8,
    agents: Vec<(String, Child)>,
}

fn free(subnet: u8) -> bool {
    (2..6).all(|i| UdpSocket::bind((Ipv4Addr::new(127, 255, subnet, i), PEER_PORT)).is_ok())
}

impl Hosts {
    fn new() -> Hosts {
        static N: AtomicU32 = AtomicU32::new(0);
        let pid = std::process::id();
        let mut subnet = 0;
        for _ in 0..256 {
            subnet = ((pid * 7 + N.fetch_add(1, Ordering::Relaxed)) % 256) as u8;
            if free(subnet) {
                break;
            }
        }
        let root = std::env::temp_dir().join(format!("trellis-enroll-{pid}-{subnet}"));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        Hosts { root, subnet, agents: vec![] }
    }

    fn ip(&self, host: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(127, 255, self.subnet, host + 1))
    }

    fn peer(&self, host: u8) -> SocketAddr {
        SocketAddr::new(self.ip(host), PEER_PORT)
    }

    fn api(&self, host: u8) -> Api {
        Api::new(SocketAddr::new(self.ip(host), API_PORT))
    }

    /// `/etc/trellis` of host `h`.
    fn dir(&self, host: u8) -> PathBuf {
        self.root.join(format!("host{host}"))
    }

    /// Runs a CLI command to completion.
    fn cli(&self, args: &[&str]) -> Output {
        Command::new(trellis_bin()).args(args).env_remove("TRELLIS_HTTP_ADDR").output().unwrap()
    }

    /// `trellis agent --name hN --bind .. --api .. --tls-dir .. --data-dir .. <extra>` on host N.
    fn agent(&mut self, host: u8, extra: &[&str]) {
        let d = self.dir(host);
        let name = format!("h{host}");
        let log = std::fs::File::create(d.with_extension("log")).unwrap();
        let mut cmd = Command::new(trellis_bin());
        cmd.args(["agent", "--name", &name, "--profile", "fast"])
            .args(["--bind", &self.peer(host).to_string(), "--api", &format!("{}:{API_PORT}", self.ip(host))])
            .arg("--tls-dir")
            .arg(d.join("tls"))
            .arg("--data-dir")
            .arg(d.join("data"))
            .args(extra)
            .env("NO_COLOR", "1")
            .env_remove("TRELLIS_HTTP_ADDR")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        self.agents.push((name, cmd.spawn().unwrap()));
    }

    fn log(&self, host: u8) -> String {
        std::fs::read_to_string(self.dir(host).with_extension("log")).unwrap_or_default()
    }

    /// Waits for host N's API; fails with its log if the agent exits first.
    fn healthy(&mut self, host: u8) -> Duration {
        let start = Instant::now();
        let name = format!("h{host}");
        loop {
            if self.api(host).get_json("/v1/health").is_ok() {
                return start.elapsed();
            }
            let child = &mut self.agents.iter_mut().rev().find(|(n, _)| *n == name).unwrap().1;
            if let Ok(Some(status)) = child.try_wait() {
                panic!("{name} exited ({status}):\n{}", self.log(host));
            }
            assert!(start.elapsed() < Duration::from_secs(20), "{name} not healthy:\n{}", self.log(host));
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs an agent named `name` on host N that must fail; returns its output.
    fn failing_agent(&self, host: u8, name: &str, extra: &[&str]) -> String {
        let d = self.dir(host);
        let mut args: Vec<String> = ["agent", "--name", name, "--profile", "fast"].map(String::from).into();
        args.extend(["--bind".into(), self.peer(host).to_string()]);
        args.extend(["--api".into(), format!("{}:{API_PORT}", self.ip(host))]);
        args.extend(["--tls-dir".into(), d.join("tls").display().to_string()]);
        args.extend(["--data-dir".into(), d.join("data").display().to_string()]);
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut child = Command::new(trellis_bin())
            .args(&args)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let start = Instant::now();
        while child.try_wait().unwrap().is_none() {
            if start.elapsed() > Duration::from_secs(20) {
                let _ = child.kill();
                panic!("agent h{host} with {extra:?} did not exit");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(1), "h{host} {extra:?} should fail");
        String::from_utf8_lossy(&out.stderr).to_string()
    }

    fn token(&self, ca_dir: &Path, ttl: &str) -> String {
        let out = self.cli(&["token", "create", "--ca-dir", ca_dir.to_str().unwrap(), "--ttl", ttl]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    fn wait_alive(&self, hosts: &[u8], timeout: Duration) -> Duration {
        let start = Instant::now();
        loop {
            let ok = hosts.iter().all(|&h| {
                self.api(h).members().is_ok_and(|m| {
                    hosts.iter().all(|o| m.iter().any(|x| x["name"] == format!("h{o}") && x["state"] == "alive"))
                })
            });
            if ok {
                return start.elapsed();
            }
            assert!(start.elapsed() < timeout, "hosts {hosts:?} did not all see each other alive");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn kill(&mut self, host: u8) {
        let name = format!("h{host}");
        for (n, c) in self.agents.iter_mut().filter(|(n, _)| *n == name) {
            let _ = (n, c.kill(), c.wait());
        }
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for (_, c) in &mut self.agents {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn three_hosts_from_nothing_to_an_mtls_cluster_in_three_commands_each() {
    let mut h = Hosts::new();
    let ca = h.dir(1).join("ca");
    let seed = h.peer(1).to_string();
    // Host 1: the CA, and an agent that holds it (it issues its own certificate).
    let out = h.cli(&["ca", "init", "--dir", ca.to_str().unwrap()]);
    assert!(out.status.success());
    h.agent(1, &["--ca-dir", ca.to_str().unwrap()]);
    h.healthy(1);
    // Hosts 2 and 3: a token made on host 1, then one command.
    let (mut took, mut tokens) = (vec![], vec![]);
    for host in [2, 3] {
        let token = h.token(&ca, "10m");
        h.agent(host, &["--join", &seed, "--token", &token]);
        took.push(h.healthy(host));
        tokens.push(token);
    }
    let converged = h.wait_alive(&[1, 2, 3], Duration::from_secs(15));
    println!(
        "enrollment (process start to API up, key + CSR + signing included): {took:?}; all alive {converged:?} later"
    );

    for host in [2, 3] {
        let tls = h.dir(host).join("tls");
        assert_eq!(mode(&tls.join("node.key")), 0o600, "the key is private");
        assert_eq!(std::fs::read(tls.join("ca.pem")).unwrap(), std::fs::read(ca.join("ca.pem")).unwrap());
        let show = h.cli(&["cert", "show", tls.join("node.pem").to_str().unwrap(), "-o", "json"]);
        let s: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
        let cluster = std::fs::read_to_string(ca.join("cluster-id")).unwrap();
        assert_eq!(s["identity"], format!("spiffe://{}/node/h{host}", cluster.trim()));
        assert!(h.log(host).contains("enrolled"), "{}", h.log(host));
    }
    for (host, token) in [1u8, 2, 3].into_iter().zip(tokens.iter().cycle()) {
        let secret = token.split(':').nth(2).unwrap().split('.').nth(1).unwrap();
        assert!(!h.log(host).contains(secret), "no token secret in h{host}'s log");
    }
    let store = std::fs::read_to_string(ca.join("join-tokens.json")).unwrap();
    assert_eq!(mode(&ca.join("join-tokens.json")), 0o600);
    assert!(store.contains("\"used_by\": \"h2\"") && store.contains("\"used_by\": \"h3\""), "{store}");
    let m = h.api(1).get_text("/metrics").unwrap();
    assert_eq!(metric(&m, "trellis_enroll_requests_total{outcome=\"enrolled\"}"), Some(2.0), "{m}");
    // The members are real mTLS peers: each holds QUIC connections to the others.
    let m3 = h.api(3).get_text("/metrics").unwrap();
    assert!(metric(&m3, "trellis_quic_connections").unwrap() >= 1.0);
    let me = h.api(3).get_json("/v1/agent/self").unwrap();
    assert_eq!(me["cluster_id"], std::fs::read_to_string(ca.join("cluster-id")).unwrap().trim());
}

#[test]
fn join_failures_name_the_cause_and_single_use_survives_a_signer_restart() {
    let mut h = Hosts::new();
    let ca = h.dir(1).join("ca");
    let ca_arg = ca.to_str().unwrap().to_string();
    let seed = h.peer(1).to_string();
    assert!(h.cli(&["ca", "init", "--dir", &ca_arg]).status.success());
    h.agent(1, &["--ca-dir", &ca_arg]);
    h.healthy(1);
    let token = h.token(&ca, "10m");
    h.agent(2, &["--join", &seed, "--token", &token]);
    h.healthy(2);

    // The same token again.
    let err = h.failing_agent(3, "h3", &["--join", &seed, "--token", &token]);
    assert!(err.contains("token_used") && err.contains("already used") && err.contains("h2"), "{err}");
    // A name a live member has; the token is not used up by the refusal.
    let fresh = h.token(&ca, "10m");
    let taken = h.failing_agent(4, "h2", &["--join", &seed, "--token", &fresh]);
    assert!(taken.contains("name_taken") && taken.contains("pick another --name"), "{taken}");
    // Expired.
    let short = h.token(&ca, "1s");
    std::thread::sleep(Duration::from_millis(1500));
    let err = h.failing_agent(3, "h3", &["--join", &seed, "--token", &short]);
    assert!(err.contains("token_expired") && err.contains("expired"), "{err}");
    // A token of another cluster: the seed's CA is not the pinned one.
    let other = h.root.join("other-ca");
    assert!(h.cli(&["ca", "init", "--dir", other.to_str().unwrap()]).status.success());
    let foreign = h.token(&other, "10m");
    let err = h.failing_agent(3, "h3", &["--join", &seed, "--token", &foreign]);
    assert!(err.contains("CA hash mismatch") && err.contains("another cluster"), "{err}");
    // Garbage.
    let err = h.failing_agent(3, "h3", &["--join", &seed, "--token", "trellis1:nope"]);
    assert!(err.contains("copy the whole line"), "{err}");
    // Nothing listening: the cause, not "EOF".
    let nowhere = h.peer(5).to_string();
    let err = h.failing_agent(3, "h3", &["--join", &nowhere, "--token", &fresh]);
    assert!(err.contains("UDP") && err.contains(&nowhere), "{err}");
    // No failed attempt left a key or certificate behind.
    assert!(!h.dir(3).join("tls").join("node.key").exists());

    // Restart the signer: the used token stays used, the unused one still works.
    h.kill(1);
    h.agent(1, &["--ca-dir", &ca_arg]);
    h.healthy(1);
    let err = h.failing_agent(3, "h3", &["--join", &seed, "--token", &token]);
    assert!(err.contains("token_used"), "{err}");
    h.agent(3, &["--join", &seed, "--token", &fresh]);
    h.healthy(3);
    h.wait_alive(&[1, 3], Duration::from_secs(15));
    let m = h.api(1).get_text("/metrics").unwrap();
    assert!(metric(&m, "trellis_enroll_requests_total{outcome=\"token_used\"}").unwrap() >= 1.0, "{m}");
}

#[test]
fn a_joiner_sent_to_a_member_that_is_not_a_signer_is_redirected_to_the_signer() {
    let mut h = Hosts::new();
    let ca = h.dir(1).join("ca");
    let ca_arg = ca.to_str().unwrap().to_string();
    assert!(h.cli(&["ca", "init", "--dir", &ca_arg]).status.success());
    h.agent(1, &["--ca-dir", &ca_arg]);
    h.healthy(1);
    let t = h.token(&ca, "10m");
    h.agent(2, &["--join", &h.peer(1).to_string(), "--token", &t]);
    h.healthy(2);
    h.wait_alive(&[1, 2], Duration::from_secs(15));
    // Host 3 only knows host 2.
    let t = h.token(&ca, "10m");
    h.agent(3, &["--join", &h.peer(2).to_string(), "--token", &t]);
    h.healthy(3);
    h.wait_alive(&[1, 2, 3], Duration::from_secs(15));
    let m = h.api(2).get_text("/metrics").unwrap();
    assert_eq!(metric(&m, "trellis_enroll_requests_total{outcome=\"not_signer\"}"), Some(1.0), "{m}");
}

#[test]
fn a_certificate_renewed_under_http_load_fails_no_request_and_keeps_connections() {
    let mut h = Hosts::new();
    let ca = h.dir(1).join("ca");
    let ca_arg = ca.to_str().unwrap().to_string();
    let proxy: SocketAddr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    assert!(h.cli(&["ca", "init", "--dir", &ca_arg]).status.success());
    // 15 s certificates, renewed 10 s after issue.
    h.agent(1, &["--ca-dir", &ca_arg, "--cert-lifetime", "15s", "--proxy", &proxy.to_string()]);
    h.healthy(1);
    let t = h.token(&ca, "10m");
    h.agent(2, &["--join", &h.peer(1).to_string(), "--token", &t]);
    h.healthy(2);
    h.wait_alive(&[1, 2], Duration::from_secs(15));
    let server = trellis_tests::http::server("h2");
    let body = serde_json::json!({"service": "web", "address": "127.0.0.1", "port": server.port()});
    let (s, v) = h.api(2).put_json("/v1/agent/services/web-1", &body).unwrap();
    assert_eq!(s, 200, "{v}");
    let start = Instant::now();
    while h.api(1).get_json("/v1/catalog/services/web").map(|v| v.as_array().map_or(0, Vec::len)).unwrap_or(0) == 0 {
        assert!(start.elapsed() < Duration::from_secs(10), "instance not in h1's catalog");
        std::thread::sleep(Duration::from_millis(100));
    }
    let before_pem = std::fs::read_to_string(h.dir(2).join("tls/node.pem")).unwrap();
    let links = |h: &Hosts| -> Vec<f64> {
        [1, 2]
            .iter()
            .flat_map(|&i| {
                let m = h.api(i).get_text("/metrics").unwrap();
                [metric(&m, "trellis_quic_dials_total").unwrap(), metric(&m, "trellis_quic_accepted_total").unwrap()]
            })
            .collect()
    };
    let links_before = links(&h);

    // Load: two clients through h1's proxy, until both certificates were renewed (at most 30 s).
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..2)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let (mut sent, mut failed) = (0u32, 0u32);
                while !stop.load(Ordering::Relaxed) && sent < 50_000 {
                    let r = trellis_tests::http::get(proxy, "web", "/x", &[]);
                    sent += 1;
                    if r.status != 200 || !r.text().starts_with("h2 /x") {
                        failed += 1;
                    }
                }
                (sent, failed)
            })
        })
        .collect();
    let renewed = |i: u8| {
        let m = h.api(i).get_text("/metrics").unwrap_or_default();
        metric(&m, "trellis_cert_renewals_total").unwrap_or(0.0)
    };
    let start = Instant::now();
    while (renewed(1) < 1.0 || renewed(2) < 1.0) && start.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(200));
    }
    // A little traffic past the swap.
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    let (sent, failed) = clients.into_iter().map(|c| c.join().unwrap()).fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    println!("renewal under load: {sent} requests, {failed} failed, renewals h1 {} h2 {}", renewed(1), renewed(2));
    assert!(renewed(1) >= 1.0 && renewed(2) >= 1.0, "both renewed:\n{}\n{}", h.log(1), h.log(2));
    assert_eq!(failed, 0, "no request failed across the renewals ({sent} sent)");
    assert!(sent > 100, "load was offered ({sent})");
    let links_after = links(&h);
    println!("dials/accepted before {links_before:?} after {links_after:?}");
    assert_eq!(links_before, links_after, "no peer connection was re-made for the renewal");
    // The renewed certificate is on disk, later than the first, and verifies.
    let after_pem = std::fs::read_to_string(h.dir(2).join("tls/node.pem")).unwrap();
    assert_ne!(before_pem, after_pem);
    let m = h.api(2).get_text("/metrics").unwrap();
    let left = metric(&m, "trellis_cert_expiry_seconds").unwrap();
    assert!(left > 0.0 && left <= 15.0, "{left}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let fresh = rt.block_on(trellis_tests::raw_peer(&h.dir(2).join("tls"), h.peer(1)));
    assert!(fresh.is_ok(), "a new handshake with the renewed certificate: {:?}", fresh.err());
}

/// Accepts any server certificate: the hostile client below only needs a handshake.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

async fn anonymous(to: SocketAddr, alpn: &[u8]) -> anyhow::Result<quinn::Connection> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
        .with_no_client_auth();
    tls.alpn_protocols = vec![alpn.to_vec()];
    let cfg = quinn::ClientConfig::new(Arc::new(quinn::crypto::rustls::QuicClientConfig::try_from(tls)?));
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    endpoint.set_default_client_config(cfg);
    Ok(endpoint.connect(to, "trellis")?.await?)
}

#[test]
fn an_enrollment_connection_without_a_certificate_can_neither_gossip_nor_forward() {
    let c = Cluster::start(ClusterSpec { nodes: 1, ..ClusterSpec::default() }).unwrap();
    let node = c.node(0).peer_addr;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let answer = rt.block_on(async {
        let conn = anonymous(node, b"trellis-enroll/1").await?;
        // A gossip envelope as a datagram and on a stream, then a forward header on a
        // bidirectional stream, as a peer would send them.
        for _ in 0..5 {
            let _ = conn.send_datagram(bytes::Bytes::from_static(&[1, 1, 0, 0, 0, 0]));
        }
        let mut uni = conn.open_uni().await?;
        let _ = uni.write_all(&[1, 1, 0, 0]).await;
        let _ = uni.finish();
        let (mut send, mut recv) = conn.open_bi().await?;
        send.write_all(&[0, 4, 1, 2, 3, 4]).await?;
        send.finish()?;
        let answer = recv.read_to_end(64 * 1024).await?;
        let closed = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await?;
        anyhow::Ok((String::from_utf8_lossy(&answer).to_string(), closed))
    });
    let (answer, closed) = answer.unwrap();
    println!("enrollment connection answered {answer:?}, then {closed}");
    assert!(answer.contains("\"refused\"") && answer.contains("bad_request"), "{answer}");
    let m = c.node(0).api().get_text("/metrics").unwrap();
    assert_eq!(metric(&m, "trellis_quic_datagrams_in_total"), Some(0.0), "no datagram reached gossip: {m}");
    assert_eq!(metric(&m, "trellis_quic_accepted_total"), Some(0.0), "never pooled as a peer");
    assert_eq!(metric(&m, "trellis_forward_inbound_total"), Some(0.0));
    assert_eq!(metric(&m, "trellis_gossip_messages_in_total"), Some(0.0));
    assert_eq!(c.node(0).api().members().unwrap().len(), 1);

    // The peer protocol without a certificate is refused outright.
    let closed = rt.block_on(async {
        let conn = anonymous(node, b"trellis/1").await?;
        anyhow::Ok(tokio::time::timeout(Duration::from_secs(5), conn.closed()).await?)
    });
    let closed = closed.unwrap();
    assert!(closed.to_string().contains("client certificate required"), "{closed}");
    let m = c.node(0).api().get_text("/metrics").unwrap();
    assert!(metric(&m, "trellis_handshakes_refused_total{reason=\"no_certificate\"}").unwrap() >= 1.0);
}
