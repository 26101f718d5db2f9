//! Real rustls handshakes in memory: no sockets, exact outcomes.

use super::*;
use crate::test_dir::TestDir;
use std::sync::Mutex;

fn tmp(tag: &str) -> TestDir {
    TestDir::new(&format!("pki-{tag}"))
}

/// A CA and one node cert in a fresh dir; returns (ca_dir, tls_dir).
fn node(ca: &Path, name: &str) -> PathBuf {
    let out = ca.parent().unwrap().join(format!("{name}-tls"));
    issue_cert(ca, name, &out, Duration::from_secs(3600)).unwrap();
    out
}

/// A CA's directory, inside a test dir that goes with it.
struct CaDir {
    path: PathBuf,
    _root: TestDir,
}

impl std::ops::Deref for CaDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.path
    }
}

fn ca(tag: &str, cluster: &str) -> CaDir {
    let root = tmp(tag);
    let path = root.join("ca");
    init_ca(&path, Some(cluster)).unwrap();
    CaDir { path, _root: root }
}

type Seen = Arc<Mutex<Vec<RefusalReason>>>;

fn sink() -> (RefusalSink, Seen) {
    let seen: Seen = Arc::default();
    let s = seen.clone();
    (Arc::new(move |r| s.lock().unwrap().push(r)), seen)
}

/// Drives a handshake to completion or error; returns the server's view of the client.
fn handshake(
    client: rustls::ClientConfig,
    server: rustls::ServerConfig,
) -> Result<Option<PeerIdentity>, rustls::Error> {
    let mut c = rustls::ClientConnection::new(Arc::new(client), ServerName::try_from("trellis").unwrap())?;
    let mut s = rustls::ServerConnection::new(Arc::new(server))?;
    for _ in 0..20 {
        let mut buf = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut buf).unwrap();
        }
        if !buf.is_empty() {
            s.read_tls(&mut &buf[..]).unwrap();
            s.process_new_packets()?;
        }
        let mut buf = Vec::new();
        while s.wants_write() {
            s.write_tls(&mut buf).unwrap();
        }
        if !buf.is_empty() {
            c.read_tls(&mut &buf[..]).unwrap();
            c.process_new_packets()?;
        }
        if !c.is_handshaking() && !s.is_handshaking() {
            return Ok(s.peer_certificates().map(|certs| peer_identity(&certs[0]).unwrap()));
        }
    }
    panic!("handshake did not finish");
}

fn configs(client_dir: &Path, server_dir: &Path) -> (rustls::ClientConfig, rustls::ServerConfig, Seen, Seen) {
    let (cs, cseen) = sink();
    let (ss, sseen) = sink();
    let client = client_config(&load_tls_dir_unchecked(client_dir).unwrap(), cs).unwrap();
    let server = server_config(&load_tls_dir_unchecked(server_dir).unwrap(), ss).unwrap();
    (client, server, cseen, sseen)
}

#[test]
fn mutual_tls_between_two_nodes_of_one_cluster_succeeds() {
    let ca = ca("ok", "prod");
    let (a, b) = (node(&ca, "a"), node(&ca, "b"));
    let (client, server, cseen, sseen) = configs(&a, &b);
    let peer = handshake(client, server).unwrap();
    assert_eq!(peer, Some(PeerIdentity { cluster_id: "prod".into(), name: "a".into() }));
    assert!(cseen.lock().unwrap().is_empty() && sseen.lock().unwrap().is_empty());
    assert_eq!(load_tls_dir(&a).unwrap().identity, "spiffe://prod/node/a");
}

#[test]
fn client_from_another_ca_is_refused_as_unknown_ca() {
    let (good, evil) = (ca("g", "prod"), ca("e", "prod"));
    let (mallory, server_dir) = (node(&evil, "mallory"), node(&good, "b"));
    // The rogue trusts our CA (it copied ca.pem) so the refusal is the server's.
    fs::copy(server_dir.join("ca.pem"), mallory.join("ca.pem")).unwrap();
    let (client, server, _, sseen) = configs(&mallory, &server_dir);
    assert!(handshake(client, server).is_err());
    assert_eq!(*sseen.lock().unwrap(), vec![RefusalReason::UnknownCa]);
}

#[test]
fn server_from_another_ca_is_refused_by_the_client() {
    let (good, evil) = (ca("g2", "prod"), ca("e2", "prod"));
    let (client_dir, evil_server) = (node(&good, "a"), node(&evil, "b"));
    let (client, server, cseen, _) = configs(&client_dir, &evil_server);
    assert!(handshake(client, server).is_err());
    assert_eq!(*cseen.lock().unwrap(), vec![RefusalReason::UnknownCa]);
}

#[test]
fn expired_client_certificate_is_refused_as_expired() {
    let ca = ca("x", "prod");
    let old = ca.parent().unwrap().join("old-tls");
    let now = OffsetDateTime::now_utc();
    issue_cert_with_validity(&ca, "old", &old, now - Duration::from_secs(7200), now - Duration::from_secs(3600))
        .unwrap();
    let (client, server, _, sseen) = configs(&old, &node(&ca, "b"));
    assert!(handshake(client, server).is_err());
    assert_eq!(*sseen.lock().unwrap(), vec![RefusalReason::Expired]);
    let err = load_tls_dir(&old).unwrap_err().to_string();
    assert!(err.contains("node.pem: expired") && err.contains("trellis cert issue"), "{err}");
}

#[test]
fn same_ca_key_but_other_cluster_id_is_refused_by_both_sides() {
    let ca = ca("w", "prod");
    let server_dir = node(&ca, "b");
    // Same CA key, but the cluster-id file says "staging": the cert it issues names staging.
    fs::write(ca.join("cluster-id"), "staging\n").unwrap();
    let stray = node(&ca, "c");
    // An honest staging client refuses the prod server (TLS 1.3: the client checks first).
    let (client, server, cseen, _) = configs(&stray, &server_dir);
    assert!(handshake(client, server).is_err());
    assert_eq!(*cseen.lock().unwrap(), vec![RefusalReason::WrongCluster]);
    // A client that accepts anything from the CA still cannot get its staging cert past the server.
    let mut lying = load_tls_dir_unchecked(&stray).unwrap();
    lying.cluster_id = "prod".into();
    let (cs, _) = sink();
    let (ss, sseen) = sink();
    let server = server_config(&load_tls_dir(&server_dir).unwrap(), ss).unwrap();
    assert!(handshake(client_config(&lying, cs).unwrap(), server).is_err());
    assert_eq!(*sseen.lock().unwrap(), vec![RefusalReason::WrongCluster]);
}

#[test]
fn client_without_certificate_is_refused() {
    let ca = ca("n", "prod");
    let server_dir = node(&ca, "b");
    let m = load_tls_dir(&server_dir).unwrap();
    let (cs, _) = sink();
    let verifier = Arc::new(ClusterServerVerifier {
        roots: roots(&m.ca).unwrap(),
        cluster_id: "prod".into(),
        sink: cs,
        provider: crypto(),
        revoked: None,
    });
    let mut client = rustls::ClientConfig::builder_with_provider(crypto())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    client.alpn_protocols = vec![ALPN.to_vec()];
    let (ss, _) = sink();
    let err = handshake(client, server_config(&m, ss).unwrap()).unwrap_err();
    assert_eq!(RefusalReason::from_tls(&err), RefusalReason::NoCertificate, "{err}");
}

#[test]
fn key_files_are_written_0600() {
    use std::os::unix::fs::PermissionsExt;
    let ca = ca("p", "prod");
    let tls = node(&ca, "a");
    for f in [ca.join("ca.key"), tls.join("node.key")] {
        assert_eq!(fs::metadata(&f).unwrap().permissions().mode() & 0o777, 0o600, "{}", f.display());
    }
}

#[test]
fn init_ca_refuses_to_overwrite() {
    let ca = ca("o", "prod");
    let err = init_ca(&ca, None).unwrap_err().to_string();
    assert!(err.contains("a CA already exists"), "{err}");
}

#[test]
fn show_cert_prints_identity_and_expiry_and_refuses_keys() {
    let ca = ca("s", "prod");
    let tls = node(&ca, "web-1");
    let s = show_cert(&tls.join("node.pem")).unwrap();
    assert_eq!(s.identity.as_deref(), Some("spiffe://prod/node/web-1"));
    assert!(s.subject.contains("CN=web-1") && s.issuer.contains("Trellis CA prod"), "{s}");
    assert!((0..=1).contains(&s.expires_in_days));
    let err = show_cert(&tls.join("node.key")).unwrap_err().to_string();
    assert!(err.contains("private key") && !err.contains("BEGIN"), "{err}");
}

#[test]
fn load_tls_dir_names_missing_file_and_fix() {
    let err = load_tls_dir(&tmp("missing")).unwrap_err().to_string();
    assert!(err.contains("ca.pem") && err.contains("trellis cert issue"), "{err}");
}

#[test]
fn bad_names_and_cluster_ids_are_rejected() {
    assert!(init_ca(&tmp("bad"), Some("Prod_1")).unwrap_err().to_string().contains("cluster_id"));
    let ca = ca("bn", "prod");
    let err = issue_cert(&ca, "Bad Name", &tmp("bn-out"), Duration::from_secs(60)).unwrap_err().to_string();
    assert!(err.starts_with("name:"), "{err}");
}

/// Like [`handshake`], also returning the chain the client saw.
fn handshake_seen(
    client: rustls::ClientConfig,
    server: rustls::ServerConfig,
) -> Result<(Option<PeerIdentity>, Vec<CertificateDer<'static>>), rustls::Error> {
    let mut c = rustls::ClientConnection::new(Arc::new(client), ServerName::try_from("trellis").unwrap())?;
    let mut s = rustls::ServerConnection::new(Arc::new(server))?;
    for _ in 0..20 {
        let mut buf = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut buf).unwrap();
        }
        if !buf.is_empty() {
            s.read_tls(&mut &buf[..]).unwrap();
            s.process_new_packets()?;
        }
        let mut buf = Vec::new();
        while s.wants_write() {
            s.write_tls(&mut buf).unwrap();
        }
        if !buf.is_empty() {
            c.read_tls(&mut &buf[..]).unwrap();
            c.process_new_packets()?;
        }
        if !c.is_handshaking() && !s.is_handshaking() {
            let client_id = s.peer_certificates().map(|certs| peer_identity(&certs[0]).unwrap());
            return Ok((client_id, c.peer_certificates().unwrap().to_vec()));
        }
    }
    panic!("handshake did not finish");
}

fn live(dir: &Path) -> Arc<LiveIdentity> {
    LiveIdentity::new(&load_tls_dir(dir).unwrap()).unwrap()
}

#[test]
fn a_revoked_peer_is_refused_by_both_sides_with_reason_revoked() {
    let ca = ca("rev", "prod");
    let (a, b) = (live(&node(&ca, "a")), live(&node(&ca, "b")));
    a.revoked.replace(["b".to_string()].into());
    // a serves, b dials: a refuses b's client certificate.
    let (ss, sseen) = sink();
    let client = live_client_config(&b, sink().0, ALPN).unwrap();
    assert!(handshake(client, live_server_config(&a, ss).unwrap()).is_err());
    assert_eq!(*sseen.lock().unwrap(), vec![RefusalReason::Revoked]);
    // The other way round: b refuses a's server certificate (the client checks first).
    a.revoked.replace(Default::default());
    b.revoked.replace(["a".to_string()].into());
    let (cs, cseen) = sink();
    assert!(handshake(live_client_config(&b, cs, ALPN).unwrap(), live_server_config(&a, sink().0).unwrap()).is_err());
    assert_eq!(*cseen.lock().unwrap(), vec![RefusalReason::Revoked]);
    // Lifting the revocation lets them talk.
    a.revoked.replace(Default::default());
    b.revoked.replace(Default::default());
    let (cs, _) = sink();
    let (ss, _) = sink();
    let seen = handshake(live_client_config(&b, cs, ALPN).unwrap(), live_server_config(&a, ss).unwrap()).unwrap();
    assert_eq!(seen.unwrap().name, "b");
}

#[test]
fn a_swapped_certificate_is_presented_from_the_next_handshake_on() {
    let ca = ca("swap", "prod");
    let a = live(&node(&ca, "a"));
    let b = live(&node(&ca, "b"));
    let (ss, _) = sink();
    let server = live_server_config(&a, ss).unwrap();
    let first = handshake_seen(live_client_config(&b, sink().0, ALPN).unwrap(), server.clone()).unwrap().1;
    // A renewal: a new certificate for the same name under the same CA.
    let renewed = ca.parent().unwrap().join("a-renewed");
    issue_cert(&ca, "a", &renewed, Duration::from_secs(7200)).unwrap();
    a.swap(&load_tls_dir(&renewed).unwrap()).unwrap();
    let second = handshake_seen(live_client_config(&b, sink().0, ALPN).unwrap(), server).unwrap().1;
    assert_ne!(first[0], second[0], "the server config built before the swap presents the new certificate");
    assert_eq!(second[0], a.leaf());
    // Another name is not a renewal.
    let other = live(&node(&ca, "c"));
    let e = other.swap(&load_tls_dir(&ca.parent().unwrap().join("a-renewed")).unwrap()).unwrap_err();
    assert!(e.to_string().contains("renewal keeps the node's name"), "{e}");
}

#[test]
fn enrollment_alpn_admits_a_client_without_certificate_and_gets_the_ca_in_the_chain() {
    let ca = ca("enr", "prod");
    let a = live(&node(&ca, "a"));
    let verifier = Arc::new(ClusterServerVerifier {
        roots: roots(&a.ca).unwrap(),
        cluster_id: "prod".into(),
        sink: sink().0,
        provider: crypto(),
        revoked: None,
    });
    let mut client = rustls::ClientConfig::builder_with_provider(crypto())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    client.alpn_protocols = vec![ENROLL_ALPN.to_vec()];
    let (client_id, chain) = handshake_seen(client.clone(), live_server_config(&a, sink().0).unwrap()).unwrap();
    assert_eq!(client_id, None, "no client certificate: the transport serves it enrollment only");
    assert_eq!(chain.len(), 2);
    assert_eq!(sha256_hex(&chain[1]), sha256_hex(&a.ca), "the CA follows the leaf, for the token's pin");
    // Peers get the leaf alone.
    let b = live(&node(&ca, "b"));
    let chain =
        handshake_seen(live_client_config(&b, sink().0, ALPN).unwrap(), live_server_config(&a, sink().0).unwrap())
            .unwrap()
            .1;
    assert_eq!(chain.len(), 1);
}

#[test]
fn agent_configs_never_resume_sessions_so_every_handshake_checks_revocation() {
    let ca = ca("res", "prod");
    let a = live(&node(&ca, "a"));
    let server = live_server_config(&a, sink().0).unwrap();
    assert_eq!(server.send_tls13_tickets, 0);
    assert!(!server.session_storage.can_cache());
    let client = live_client_config(&a, sink().0, ALPN).unwrap();
    assert!(format!("{:?}", client.resumption).contains("NoClientSessionStorage"), "{:?}", client.resumption);
}

/// A live identity for `name` under the CA at `ca`.
fn live_named(ca: &Path, name: &str) -> Arc<LiveIdentity> {
    LiveIdentity::new(&load_tls_dir(&node(ca, name)).unwrap()).unwrap()
}

fn now_ms() -> u64 {
    crate::policy::now_ms()
}

#[test]
fn a_writer_proof_names_its_signer_and_fails_on_any_change() {
    use trellis_core::policy::WriterAuth;
    let dir = ca("proof", "prod");
    let (a, b) = (live_named(&dir, "a"), live_named(&dir, "b"));
    let proof = a.sign(b"entry").unwrap();
    assert_eq!(b.verify(b"entry", &proof, now_ms()).unwrap(), "a");
    assert!(b.verify(b"entrz", &proof, now_ms()).unwrap_err().contains("does not match"));
    let mut bent = proof.clone();
    bent.sig[10] ^= 1;
    assert!(b.verify(b"entry", &bent, now_ms()).is_err());
    assert!(b.verify(b"entry", &proof, 1_000).unwrap_err().contains("at the write's time"), "before the cert existed");
    let other = live_named(&ca("proof-other", "prod"), "a");
    let forged = other.sign(b"entry").unwrap();
    assert!(b.verify(b"entry", &forged, now_ms()).is_err(), "another CA's certificate");
    let huge = trellis_proto::WriterProof { cert: vec![0; 5000], ..proof.clone() };
    assert!(b.verify(b"entry", &huge, now_ms()).unwrap_err().contains("oversized"));
}

/// Stores for `names`, each signing with and checking by real certificates of one CA, and
/// their identities.
fn signed_stores(tag: &str, names: &[&str]) -> (Vec<trellis_core::policy::PolicyStore>, Vec<Arc<LiveIdentity>>) {
    let dir = ca(tag, "prod");
    let ids: Vec<Arc<LiveIdentity>> = names.iter().map(|n| live_named(&dir, n)).collect();
    let stores = names
        .iter()
        .zip(&ids)
        .map(|(n, id)| {
            let mut s = trellis_core::policy::PolicyStore::new(n);
            s.set_auth(id.clone());
            s
        })
        .collect();
    (stores, ids)
}

fn put(
    s: &mut trellis_core::policy::PolicyStore,
    key: &trellis_core::policy::Key,
    body: Option<&str>,
) -> trellis_proto::PolicyEntry {
    let reg = s.prepare(now_ms(), key, body.map(str::as_bytes), None).unwrap();
    s.commit(key.clone(), reg.clone());
    trellis_core::policy::store::to_wire(key, &reg)
}

fn take(s: &mut trellis_core::policy::PolicyStore, e: &trellis_proto::PolicyEntry) -> Result<(), String> {
    let (k, r) = trellis_core::policy::store::from_wire(e.clone()).map_err(|e| e.to_string())?;
    s.merge(now_ms(), k, r).map(|_| ()).map_err(|e| e.to_string())
}

#[test]
fn only_an_instances_own_node_can_write_it_whoever_relays_it() {
    use trellis_core::policy::{Key, Kind};
    let (mut s, ids) = signed_stores("owner", &["a", "b", "m"]);
    let key = Key { kind: Kind::Instances, name: "web-1@a".into() };
    let body = r#"{"service": "web", "address": "127.0.0.1", "port": 8080}"#;
    let honest = put(&mut s[0], &key, Some(body));
    assert!(honest.proof.is_some());
    take(&mut s[1], &honest).unwrap();
    // m relays a's write unchanged: fine, the proof is a's.
    take(&mut s[2], &honest).unwrap();
    // m writes an instance under a's name: signed by m, so refused.
    let mut forged = put(&mut s[2], &Key { kind: Kind::Instances, name: "web-2@a".into() }, Some(body));
    assert!(take(&mut s[1], &forged).unwrap_err().contains("does not own"));
    // ... claiming a's writer id does not help: the signer is still m.
    forged.version.1 = trellis_core::policy::store::fnv64(&[b"a"]);
    assert!(take(&mut s[1], &forged).unwrap_err().contains("does not match"), "the id is signed");
    forged.proof = Some(trellis_core::policy::WriterAuth::sign(&*ids[2], &forged.signed_message()).unwrap());
    assert!(take(&mut s[1], &forged).unwrap_err().contains("signed by m"));
    // A newer version of a's instance, changed by m, keeps a's proof but not its content.
    let mut bent = honest.clone();
    bent.version.0 += 1 << 16;
    bent.body = Some(r#"{"service": "web", "address": "127.0.0.9", "port": 8080}"#.into());
    assert!(take(&mut s[1], &bent).unwrap_err().contains("does not match"));
    let bare = trellis_proto::PolicyEntry { proof: None, ..bent.clone() };
    assert!(take(&mut s[1], &bare).unwrap_err().contains("no writer proof"));
    let got = s[1].get(&key).unwrap();
    assert!(got.val.body.as_deref().unwrap().contains("127.0.0.1"), "a's version stands");
    assert_eq!(got.val.proof, honest.proof, "and keeps its proof, to relay it");
}

#[test]
fn a_revoked_node_cannot_undo_its_own_revocation_but_another_node_can() {
    use trellis_core::policy::{Key, Kind, WriterAuth};
    let (mut s, ids) = signed_stores("revoke", &["a", "b", "m"]);
    let key = Key { kind: Kind::Revocations, name: "m".into() };
    let revoke = put(&mut s[0], &key, Some(r#"{"reason": "key leaked"}"#));
    for st in s.iter_mut().skip(1) {
        take(st, &revoke).unwrap();
    }
    // m's own API refuses, and a tombstone m signs anyway is refused by every peer.
    let err = s[2].prepare(now_ms(), &key, None, None).unwrap_err().to_string();
    assert!(err.contains("cannot write its own revocation"), "{err}");
    let mut undo = trellis_proto::PolicyEntry {
        version: ((now_ms() + 1) << 16, trellis_core::policy::store::fnv64(&[b"m"])),
        ancestors: [revoke.version, (0, 0)],
        body: None,
        proof: None,
        ..revoke.clone()
    };
    assert!(take(&mut s[1], &undo).unwrap_err().contains("no writer proof"));
    undo.proof = Some(ids[2].sign(&undo.signed_message()).unwrap());
    assert!(take(&mut s[1], &undo).unwrap_err().contains("its own revocation"));
    assert!(s[1].get(&key).unwrap().val.body.is_some(), "still revoked");
    // b may lift it, and a takes that.
    let lift = put(&mut s[1], &key, None);
    take(&mut s[0], &lift).unwrap();
    assert!(s[0].get(&key).unwrap().val.body.is_none());
}

#[test]
fn writer_proofs_survive_the_policy_log() {
    use crate::policy::Policy;
    use trellis_core::policy::{Key, Kind};
    let dir = ca("wal-proof", "prod");
    let data = dir.parent().unwrap().join("data");
    let key = Key { kind: Kind::Instances, name: "web-1@a".into() };
    let body = br#"{"service": "web", "address": "127.0.0.1", "port": 8080}"#;
    let a = live_named(&dir, "a");
    let written =
        Policy::open(&data, "a", 60_000, Some(a.clone())).unwrap().write(key.clone(), Some(body), None).unwrap();
    let reopened = Policy::open(&data, "a", 60_000, Some(a)).unwrap();
    let store = reopened.store.lock().unwrap();
    assert_eq!(store.get(&key).unwrap().val.proof, written.proof, "replayed, checked and kept");
    assert!(written.proof.is_some());
}
