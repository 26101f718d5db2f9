//! Real rustls handshakes in memory: no sockets, exact outcomes.

use super::*;
use std::sync::Mutex;

/// A fresh directory under the system temp dir, removed (with everything under its root)
/// when the test ends.
struct Scratch {
    root: PathBuf,
    path: PathBuf,
}

impl std::ops::Deref for Scratch {
    type Target = PathBuf;
    fn deref(&self) -> &PathBuf {
        &self.path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.root);
    }
}

/// `sub` inside a new unique root; the root itself is not created.
fn scratch(tag: &str, sub: &str) -> Scratch {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let root = std::env::temp_dir().join(format!(
        "trellis-pki-{}-{}-{tag}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = fs::remove_dir_all(&root);
    Scratch { path: root.join(sub), root }
}

fn tmp(tag: &str) -> Scratch {
    scratch(tag, "")
}

/// A node cert for `name` next to the CA dir; returns its TLS dir.
fn node(ca: &Path, name: &str) -> PathBuf {
    let out = ca.parent().unwrap().join(format!("{name}-tls"));
    issue_cert(ca, name, &out, Duration::from_secs(3600)).unwrap();
    out
}

/// A CA for `cluster` in `<fresh root>/ca`; node dirs go beside it.
fn ca(tag: &str, cluster: &str) -> Scratch {
    let dir = scratch(tag, "ca");
    init_ca(&dir, Some(cluster)).unwrap();
    dir
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
            assert_eq!((c.alpn_protocol(), s.alpn_protocol()), (Some(ALPN), Some(ALPN)));
            assert_eq!(c.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
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
fn same_ca_file_but_other_cluster_id_is_refused() {
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
    assert_eq!(err, rustls::Error::NoCertificatesPresented);
    assert_eq!(RefusalReason::from_tls(&err), RefusalReason::NoCertificate, "{err}");
}

#[test]
fn key_files_are_written_0600() {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let ca = ca("p", "prod");
    let tls = node(&ca, "a");
    for f in [ca.join("ca.key"), tls.join("node.key")] {
        assert_eq!(mode(&f), 0o600, "{}", f.display());
    }
    assert_eq!(mode(&ca), 0o700);
    // A re-issue replaces a key file whose mode was widened instead of writing into it.
    fs::set_permissions(tls.join("node.key"), fs::Permissions::from_mode(0o644)).unwrap();
    issue_cert(&ca, "a", &tls, Duration::from_secs(60)).unwrap();
    assert_eq!(mode(&tls.join("node.key")), 0o600);
}

#[test]
fn init_ca_refuses_to_overwrite() {
    let ca = ca("o", "prod");
    let key_before = fs::read(ca.join("ca.key")).unwrap();
    let err = init_ca(&ca, None).unwrap_err().to_string();
    assert!(err.contains("ca.pem: a CA already exists") && err.contains("pick another --dir"), "{err}");
    // Even with ca.pem gone, the key is never replaced.
    fs::remove_file(ca.join("ca.pem")).unwrap();
    let err = init_ca(&ca, Some("other")).unwrap_err().to_string();
    assert!(err.contains("ca.key: a CA already exists"), "{err}");
    assert_eq!(fs::read(ca.join("ca.key")).unwrap(), key_before);
}

#[test]
fn show_cert_prints_identity_and_expiry_and_refuses_keys() {
    let ca = ca("s", "prod");
    let tls = node(&ca, "web-1");
    let s = show_cert(&tls.join("node.pem")).unwrap();
    assert_eq!(s.identity.as_deref(), Some("spiffe://prod/node/web-1"));
    assert!(s.subject.contains("CN=web-1") && s.issuer.contains("Trellis CA prod"), "{s}");
    assert!((0..=1).contains(&s.expires_in_days));
    assert!(!s.is_ca);
    let text = s.to_string();
    assert!(text.contains("identity: spiffe://prod/node/web-1\n"), "{text}");
    assert!(text.contains(&format!("not after: {}\n", s.not_after)) && s.not_after.ends_with(" UTC"), "{text}");
    let json = serde_json::to_value(&s).unwrap();
    assert_eq!(json["identity"], "spiffe://prod/node/web-1");
    let ca_summary = show_cert(&ca.join("ca.pem")).unwrap();
    assert!(ca_summary.is_ca && ca_summary.identity.is_none() && ca_summary.expires_in_days > 3600);
    let key_pem = fs::read_to_string(tls.join("node.key")).unwrap();
    for key_file in [tls.join("node.key"), ca.join("ca.key")] {
        let err = show_cert(&key_file).unwrap_err().to_string();
        assert!(err.contains("private key") && err.contains("give the certificate"), "{err}");
        assert!(!err.contains("BEGIN") && !err.contains(key_pem.lines().nth(1).unwrap()), "{err}");
    }
}

#[test]
fn load_tls_dir_names_missing_file_and_fix() {
    let err = load_tls_dir(&tmp("missing")).unwrap_err().to_string();
    assert!(err.contains("ca.pem") && err.contains("trellis cert issue"), "{err}");
    let ca = ca("lm", "prod");
    let tls = node(&ca, "a");
    fs::remove_file(tls.join("node.key")).unwrap();
    let err = load_tls_dir(&tls).unwrap_err().to_string();
    assert!(err.contains("node.key") && err.contains("trellis cert issue"), "{err}");
}

#[test]
fn bad_names_and_cluster_ids_are_rejected() {
    let bad_dir = tmp("bad");
    let err = init_ca(&bad_dir, Some("Prod_1")).unwrap_err().to_string();
    assert!(err.starts_with("cluster_id:") && err.contains("1-63 characters"), "{err}");
    assert!(!bad_dir.exists(), "nothing is written for a bad cluster id");
    for id in ["", "a.b", "prod/x", &"x".repeat(64)] {
        assert!(validate_cluster_id(id).is_err(), "{id:?}");
    }
    for id in ["prod", "eu-1", "-", &"x".repeat(63)] {
        assert!(validate_cluster_id(id).is_ok(), "{id:?}");
    }
    for name in ["", "-a", ".a", "_a", "A", "web 1", "web/1", "ü", &"x".repeat(64)] {
        assert!(validate_name(name).is_err(), "{name:?}");
    }
    for name in ["a", "0", "web-1.eu_2", &"x".repeat(63)] {
        assert!(validate_name(name).is_ok(), "{name:?}");
    }
    assert_eq!(MAX_ID_LEN, trellis_proto::limits::MAX_NAME_LEN);
    let ca = ca("bn", "prod");
    let out = tmp("bn-out");
    let err = issue_cert(&ca, "Bad Name", &out, Duration::from_secs(60)).unwrap_err().to_string();
    assert!(err.starts_with("name:") && err.contains("starting with a letter or digit"), "{err}");
    assert!(!out.exists(), "nothing is written for a bad name");
}

#[test]
fn init_ca_without_cluster_id_picks_a_random_valid_one() {
    let (a, b) = (tmp("r1"), tmp("r2"));
    let (ia, ib) = (init_ca(&a, None).unwrap(), init_ca(&b, None).unwrap());
    assert!(ia.cluster_id.starts_with("trellis-") && ia.cluster_id.len() == "trellis-".len() + 8, "{ia:?}");
    validate_cluster_id(&ia.cluster_id).unwrap();
    assert_ne!(ia.cluster_id, ib.cluster_id);
    assert_eq!(fs::read_to_string(a.join("cluster-id")).unwrap().trim(), ia.cluster_id);
    let ten_years = OffsetDateTime::now_utc() + Duration::from_secs(3650 * 86_400);
    assert!((ia.not_after - ten_years).abs() < time::Duration::days(4), "{ia:?}");
}

#[test]
fn issued_certificate_has_one_spiffe_uri_both_ekus_and_backdated_start() {
    let ca = ca("iss", "prod");
    let out = ca.parent().unwrap().join("a-tls");
    let issued = issue_cert(&ca, "a", &out, Duration::from_secs(3600)).unwrap();
    assert_eq!(issued.identity, "spiffe://prod/node/a");
    assert_eq!(fs::read(out.join("ca.pem")).unwrap(), fs::read(ca.join("ca.pem")).unwrap());
    let der = pem_certs(&out, &fs::read_to_string(&issued.cert_path).unwrap()).unwrap().remove(0);
    let (_, x) = x509_parser::parse_x509_certificate(&der).unwrap();
    let eku = x.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    assert!(!x.is_ca());
    let now = OffsetDateTime::now_utc();
    let nb = x.validity().not_before.to_datetime();
    assert!(nb < now - Duration::from_secs(30) && nb > now - Duration::from_secs(120), "{nb}");
    assert_eq!(peer_identity(&der).unwrap(), PeerIdentity { cluster_id: "prod".into(), name: "a".into() });
    // Re-issuing overwrites the node files in place.
    let again = issue_cert(&ca, "a", &out, Duration::from_secs(7200)).unwrap();
    assert!(again.not_after > issued.not_after);
    assert_eq!(load_tls_dir(&out).unwrap().not_after.unix_timestamp(), again.not_after.unix_timestamp());
}

#[test]
fn issue_refuses_a_ca_key_of_another_ca_and_lifetimes_past_the_ca() {
    let (ca1, ca2) = (ca("k1", "prod"), ca("k2", "prod"));
    fs::remove_file(ca1.join("ca.key")).unwrap();
    fs::copy(ca2.join("ca.key"), ca1.join("ca.key")).unwrap();
    let err = issue_cert(&ca1, "a", &tmp("k-out"), Duration::from_secs(60)).unwrap_err().to_string();
    assert!(err.contains("ca.key: does not belong to ca.pem"), "{err}");
    let err = issue_cert(&ca2, "a", &tmp("k-out2"), Duration::from_secs(20 * 365 * 86_400)).unwrap_err().to_string();
    assert!(err.starts_with("lifetime:") && err.contains("outlive the CA"), "{err}");
    let now = OffsetDateTime::now_utc();
    let err = issue_cert_with_validity(&ca2, "a", &tmp("k-out3"), now, now).unwrap_err().to_string();
    assert!(err.starts_with("lifetime:"), "{err}");
}

#[test]
fn not_yet_valid_client_certificate_is_refused_as_not_yet_valid() {
    let ca = ca("nyv", "prod");
    let early = ca.parent().unwrap().join("early-tls");
    let now = OffsetDateTime::now_utc();
    issue_cert_with_validity(&ca, "early", &early, now + Duration::from_secs(3600), now + Duration::from_secs(7200))
        .unwrap();
    let (client, server, _, sseen) = configs(&early, &node(&ca, "b"));
    assert!(handshake(client, server).is_err());
    assert_eq!(*sseen.lock().unwrap(), vec![RefusalReason::NotYetValid]);
    let err = load_tls_dir(&early).unwrap_err().to_string();
    assert!(err.contains("node.pem: is not valid until") && err.contains("NTP"), "{err}");
}

#[test]
fn load_tls_dir_refuses_a_key_of_another_cert_and_a_cert_of_another_ca() {
    let ca1 = ca("mk", "prod");
    let (a, b) = (node(&ca1, "a"), node(&ca1, "b"));
    fs::remove_file(a.join("node.key")).unwrap();
    fs::copy(b.join("node.key"), a.join("node.key")).unwrap();
    let err = load_tls_dir(&a).unwrap_err().to_string();
    assert!(err.contains("node.key: does not match node.pem"), "{err}");

    let other = node(&ca("mk2", "prod"), "c");
    fs::copy(ca1.join("ca.pem"), other.join("ca.pem")).unwrap();
    let err = load_tls_dir(&other).unwrap_err().to_string();
    assert!(err.contains("node.pem: does not verify against ca.pem"), "{err}");
}

#[test]
fn peer_identity_requires_exactly_one_well_formed_spiffe_uri() {
    let cert = |uris: &[&str]| {
        let mut p = CertificateParams::default();
        p.subject_alt_names = uris.iter().map(|u| SanType::URI((*u).try_into().unwrap())).collect();
        CertificateDer::from(p.self_signed(&KeyPair::generate().unwrap()).unwrap().der().to_vec())
    };
    let ok = peer_identity(&cert(&["spiffe://prod/node/a"])).unwrap();
    assert_eq!(ok, PeerIdentity { cluster_id: "prod".into(), name: "a".into() });
    for uris in [
        &[][..],
        &["spiffe://prod/node/a", "spiffe://staging/node/a"][..],
        &["spiffe://prod/node/a", "https://example.com/"][..],
        &["https://prod/node/a"][..],
        &["spiffe://prod/svc/a"][..],
        &["spiffe://Prod/node/a"][..],
        &["spiffe://prod/node/a/b"][..],
        &["spiffe://prod/node/"][..],
    ] {
        assert!(peer_identity(&cert(uris)).is_err(), "{uris:?}");
    }
    assert!(peer_identity(&CertificateDer::from(vec![0x30, 0x03, 1, 2, 3])).is_err());
}

#[test]
fn tls_material_clones_and_its_debug_omits_the_key() {
    let ca = ca("dbg", "prod");
    let m = load_tls_dir(&node(&ca, "a")).unwrap();
    let c = m.clone();
    assert_eq!(c.key.secret_der(), m.key.secret_der());
    assert_eq!((c.name.as_str(), c.cluster_id.as_str()), ("a", "prod"));
    let dbg = format!("{m:?}");
    assert!(dbg.contains("spiffe://prod/node/a") && !dbg.contains("key"), "{dbg}");
}

#[test]
fn refusal_reasons_have_stable_labels_and_hints() {
    use RefusalReason::*;
    let all = [NoCertificate, Expired, NotYetValid, UnknownCa, WrongCluster, BadIdentity, Other];
    let labels: Vec<_> = all.iter().map(|r| r.as_str()).collect();
    assert_eq!(
        labels,
        ["no_certificate", "expired", "not_yet_valid", "unknown_ca", "wrong_cluster", "bad_identity", "other"]
    );
    assert!(all.iter().all(|r| !r.hint().is_empty()));
    assert_eq!(Expired.hint(), "the certificate has expired; issue a new one with `trellis cert issue`");
}
