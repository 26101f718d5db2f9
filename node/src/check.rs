//! `trellis check`: health checks of a node, one line each with a hint.
//!
//! The checks are plain functions over [`Facts`]; [`gather`] is the only part that reads
//! files and calls the API, so every verdict is unit-tested without a running agent.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use crate::api_types::PeerJson;

/// A certificate expiring sooner than this is a warning.
pub const EXPIRY_WARN_DAYS: i64 = 30;
/// Clock skew above this is a warning; SWIM and rate limits tolerate it, humans reading logs less.
pub const SKEW_WARN: Duration = Duration::from_secs(1);
/// Clock skew above this is a failure: certificates are backdated by 60 s, so a peer this
/// far behind refuses fresh certificates as not yet valid.
pub const SKEW_FAIL: Duration = Duration::from_secs(60);
/// A live peer silent for longer than this is a warning (gossip runs every few hundred ms).
pub const SILENT_WARN: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    Warn,
    Fail,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pass => "pass",
            Status::Warn => "warn",
            Status::Fail => "fail",
        }
    }
}

/// One line of `trellis check`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Check {
    pub status: Status,
    pub name: &'static str,
    pub detail: String,
    pub hint: String,
}

fn check(status: Status, name: &'static str, detail: impl Into<String>, hint: impl Into<String>) -> Check {
    Check { status, name, detail: detail.into(), hint: hint.into() }
}

/// `GET /v1/agent/self`, the fields checks use.
#[derive(Clone, Debug, Deserialize, Default)]
pub struct AgentSelf {
    pub name: String,
    pub id: String,
    pub cluster_id: String,
    pub version: String,
    #[serde(default)]
    pub unix_ms: Option<u64>,
    /// Where the agent keeps its files (absent from older agents).
    #[serde(default)]
    pub tls_dir: Option<PathBuf>,
    #[serde(default)]
    pub data_dir: Option<PathBuf>,
}

/// The directories checked, and whether they are only the packaged defaults: nobody (flag,
/// agent or config) said where the files are, so a missing one is a warning, not a failure.
#[derive(Clone, Debug)]
pub struct Dirs {
    pub tls: PathBuf,
    pub data: PathBuf,
    pub guessed: bool,
}

impl Dirs {
    /// Flags win, then what the running agent reports, then the config layers, then the
    /// packaged defaults.
    pub fn pick(flags: [Option<PathBuf>; 2], agent: Option<&AgentSelf>, config: [Option<PathBuf>; 2]) -> Dirs {
        let [tls_flag, data_flag] = flags;
        let [tls_config, data_config] = config;
        let from_agent = |f: fn(&AgentSelf) -> &Option<PathBuf>| agent.and_then(|a| f(a).clone());
        let tls = tls_flag.or_else(|| from_agent(|a| &a.tls_dir)).or(tls_config);
        let data = data_flag.or_else(|| from_agent(|a| &a.data_dir)).or(data_config);
        Dirs {
            guessed: tls.is_none() || data.is_none(),
            tls: tls.unwrap_or_else(|| PathBuf::from("/etc/trellis/tls")),
            data: data.unwrap_or_else(|| PathBuf::from("/var/lib/trellis")),
        }
    }
}

/// The certificate in the tls dir, as read from disk.
#[derive(Clone, Debug)]
pub struct CertFacts {
    pub path: PathBuf,
    pub identity: String,
    pub cluster_id: String,
    pub issuer: String,
    pub days_left: i64,
    /// Err: why node.pem does not verify against ca.pem.
    pub verifies: Result<(), String>,
}

/// Handshake refusals and dial failures this agent counted (from /metrics).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LinkCounters {
    pub refused: BTreeMap<String, u64>,
    pub dial_failures: u64,
}

/// A member's clock minus ours in ms, and the measurement's uncertainty in ms.
pub type Skew = (i64, u64);

/// Everything the checks look at, gathered once.
#[derive(Clone, Debug)]
pub struct Facts {
    pub api_addr: SocketAddr,
    pub agent: Result<AgentSelf, String>,
    pub cert: Result<CertFacts, String>,
    pub peers: Result<Vec<PeerJson>, String>,
    pub links: LinkCounters,
    /// Per member: its clock minus ours in ms, with the measurement's uncertainty (half the
    /// round trip), or why it could not be measured.
    pub clocks: Vec<(String, Result<Skew, String>)>,
    pub data_dir: (PathBuf, Result<(), String>),
    /// The dirs are the packaged defaults, not known to be this agent's.
    pub guessed: bool,
}

impl Facts {
    /// A file that is not where we guessed is a warning: a guess never fails a healthy node.
    fn missing_status(&self) -> Status {
        if self.guessed {
            Status::Warn
        } else {
            Status::Fail
        }
    }

    fn guess_note(&self) -> &'static str {
        if self.guessed {
            " (a default path: the agent did not say where its files are)"
        } else {
            ""
        }
    }
}

/// Runs every check, in the order printed.
pub fn run_checks(f: &Facts) -> Vec<Check> {
    vec![api_check(f), cert_check(f), ca_check(f), peers_check(f), clock_check(f), data_dir_check(f), versions_check(f)]
}

fn api_check(f: &Facts) -> Check {
    match &f.agent {
        Ok(a) => check(Status::Pass, "api", format!("agent {} answers at {} (version {})", a.name, f.api_addr, a.version), ""),
        Err(e) => check(
            Status::Fail,
            "api",
            format!("no answer at {}: {e}", f.api_addr),
            "start the agent, or point at it with --http-addr / TRELLIS_HTTP_ADDR (and TRELLIS_HTTP_TOKEN if the API needs tokens)",
        ),
    }
}

fn cert_check(f: &Facts) -> Check {
    let issue = "issue a new one: `trellis cert issue --ca-dir CA --name NODE --out TLS_DIR`, then restart the agent";
    match &f.cert {
        Err(e) => check(
            f.missing_status(),
            "certificate",
            format!("{e}{}", f.guess_note()),
            "give --tls-dir the directory holding ca.pem, node.pem and node.key",
        ),
        Ok(c) if c.days_left < 0 => {
            check(Status::Fail, "certificate", format!("{} expired {} days ago", c.path.display(), -c.days_left), issue)
        }
        Ok(c) if c.days_left < EXPIRY_WARN_DAYS => check(
            Status::Warn,
            "certificate",
            format!("{} ({}) expires in {} days", c.path.display(), c.identity, c.days_left),
            issue,
        ),
        Ok(c) => check(
            Status::Pass,
            "certificate",
            format!("{} ({}) valid, expires in {} days", c.path.display(), c.identity, c.days_left),
            "",
        ),
    }
}

fn ca_check(f: &Facts) -> Check {
    let reissue = "issue node.pem from the cluster's CA (`trellis cert issue --ca-dir <cluster CA dir>`) and copy the cluster's ca.pem into the tls dir";
    let cert = match &f.cert {
        Ok(c) => c,
        Err(_) => return check(f.missing_status(), "ca", "no certificate to check", "see the certificate line"),
    };
    if let Err(e) = &cert.verifies {
        return check(Status::Fail, "ca", format!("node.pem is not signed by the tls dir's ca.pem: {e}"), reissue);
    }
    if let Ok(a) = &f.agent {
        if a.cluster_id != cert.cluster_id || a.id != cert.identity {
            return check(
                Status::Fail,
                "ca",
                format!(
                    "the running agent is {} in cluster {}, but the tls dir holds {} (cluster {})",
                    a.id, a.cluster_id, cert.identity, cert.cluster_id
                ),
                "the tls dir changed under a running agent; send SIGHUP or restart it, or put back the cluster's certificate",
            );
        }
    }
    let alive = f.peers.as_ref().map(|p| p.iter().filter(|m| m.state == "alive").count()).unwrap_or(0);
    let foreign: u64 = ["unknown_ca", "wrong_cluster"].iter().filter_map(|r| f.links.refused.get(*r)).sum();
    if foreign > 0 {
        let detail = format!(
            "{foreign} peer handshakes refused for another CA or cluster id (issuer of our node.pem: {}, cluster {})",
            cert.issuer, cert.cluster_id
        );
        // Alone and refusing: it is our certificate that is foreign to the cluster.
        if alive == 0 {
            return check(Status::Fail, "ca", format!("{detail}; no peer accepted us"), reissue);
        }
        return check(
            Status::Warn,
            "ca",
            detail,
            "a host with a certificate from another CA keeps trying to join; see the log for its address",
        );
    }
    check(
        Status::Pass,
        "ca",
        format!("node.pem is from the tls dir's CA ({}), cluster {}", cert.issuer, cert.cluster_id),
        "",
    )
}

fn peers_check(f: &Facts) -> Check {
    let peers = match &f.peers {
        Ok(p) => p,
        Err(e) => return check(Status::Fail, "peers", format!("cannot list peers: {e}"), "see the api line"),
    };
    let live: Vec<&PeerJson> = peers.iter().filter(|p| p.state != "left").collect();
    if live.is_empty() {
        let cause = refusal_cause(&f.links);
        return match cause {
            Some((why, fix)) => check(Status::Fail, "peers", format!("no other members: {why}"), fix),
            None if f.links.dial_failures > 0 => check(
                Status::Fail,
                "peers",
                format!("no other members; {} connection attempts got no answer over UDP", f.links.dial_failures),
                "check that the seeds run and that UDP to their --bind port (7946 by default) is open in every firewall on the way",
            ),
            None => check(Status::Warn, "peers", "no other members", "join a cluster: --join SEED or `trellis join SEED`"),
        };
    }
    let mut bad = Vec::new();
    let mut quiet = Vec::new();
    for p in &live {
        match (p.state.as_str(), p.last_heard_ms) {
            ("alive", Some(ms)) if Duration::from_millis(ms) > SILENT_WARN => {
                quiet.push(format!("{} ({}s)", p.name, ms / 1000))
            }
            ("alive", _) => {}
            (state, heard) => bad.push(match heard {
                Some(ms) => format!("{} {state}, last heard {}s ago", p.name, ms / 1000),
                None => format!("{} {state}, never heard", p.name),
            }),
        }
    }
    let n = live.len();
    if !bad.is_empty() {
        return check(
            Status::Fail,
            "peers",
            format!("{} of {n} members unreachable: {}", bad.len(), bad.join("; ")),
            "check that those agents run and that UDP to their peer port is open both ways",
        );
    }
    if !quiet.is_empty() {
        return check(
            Status::Warn,
            "peers",
            format!("alive but quiet: {}", quiet.join(", ")),
            "check packet loss between the hosts",
        );
    }
    let worst = live.iter().filter_map(|p| p.last_heard_ms).max().unwrap_or(0);
    check(Status::Pass, "peers", format!("{n} members alive over UDP, each heard within {worst} ms"), "")
}

/// The cause of refused handshakes, worst first, with the fix.
fn refusal_cause(l: &LinkCounters) -> Option<(String, &'static str)> {
    let n = |r: &str| l.refused.get(r).copied().unwrap_or(0);
    let causes = [
        (
            "unknown_ca",
            "peers' certificates are from another CA",
            "issue node.pem from the cluster's CA and use the cluster's ca.pem",
        ),
        ("wrong_cluster", "peers' certificates name another cluster id", "issue node.pem from this cluster's CA"),
        ("expired", "a certificate has expired", "issue a new certificate with `trellis cert issue`"),
        ("not_yet_valid", "a certificate is not valid yet (clock skew)", "synchronise the clocks (NTP) of both hosts"),
        ("no_certificate", "a peer sent no certificate", "give that peer --tls-dir"),
    ];
    causes.iter().find(|(r, ..)| n(r) > 0).map(|(r, why, fix)| (format!("{} handshakes refused: {why}", n(r)), *fix))
}

fn clock_check(f: &Facts) -> Check {
    if f.clocks.is_empty() {
        return check(Status::Pass, "clock", "no other members to compare with", "");
    }
    let mut worst: Option<(&str, i64, u64)> = None;
    let mut unknown = Vec::new();
    for (name, c) in &f.clocks {
        match c {
            Ok((skew, err)) if worst.is_none_or(|(_, w, _)| skew.abs() > w.abs()) => worst = Some((name, *skew, *err)),
            Ok(_) => {}
            Err(e) => unknown.push(format!("{name}: {e}")),
        }
    }
    let ntp = "synchronise the clocks with NTP (chrony, systemd-timesyncd)";
    if let Some((name, skew, err)) = worst {
        let detail = format!("largest skew {skew:+} ms against {name} (±{err} ms)");
        let abs = Duration::from_millis(skew.unsigned_abs());
        if abs > SKEW_FAIL + Duration::from_millis(err) {
            return check(Status::Fail, "clock", detail, ntp);
        }
        if abs > SKEW_WARN + Duration::from_millis(err) {
            return check(Status::Warn, "clock", detail, ntp);
        }
        if unknown.is_empty() {
            return check(Status::Pass, "clock", detail, "");
        }
        return check(
            Status::Warn,
            "clock",
            format!("{detail}; not measured: {}", unknown.join("; ")),
            "the clock is read through each member's API; run check where those APIs are reachable",
        );
    }
    check(
        Status::Warn,
        "clock",
        format!("not measured: {}", unknown.join("; ")),
        "the clock is read through each member's API; run check where those APIs are reachable",
    )
}

fn data_dir_check(f: &Facts) -> Check {
    let (dir, res) = &f.data_dir;
    match res {
        Ok(()) => check(Status::Pass, "data_dir", format!("{} is writable", dir.display()), ""),
        Err(e) => check(
            f.missing_status(),
            "data_dir",
            format!("{} is not writable: {e}{}", dir.display(), f.guess_note()),
            "give the agent's user write access (chown), or pick another --data-dir",
        ),
    }
}

fn versions_check(f: &Facts) -> Check {
    let (Ok(a), Ok(peers)) = (&f.agent, &f.peers) else {
        return check(Status::Warn, "versions", "unknown without the API", "see the api line");
    };
    let mut by: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    by.entry(a.version.as_str()).or_default().push(a.name.as_str());
    for p in peers.iter().filter(|p| p.state == "alive") {
        by.entry(p.version.as_str()).or_default().push(p.name.as_str());
    }
    if by.len() == 1 {
        let n: usize = by.values().map(Vec::len).sum();
        return check(Status::Pass, "versions", format!("all {n} live members run {}", a.version), "");
    }
    let list: Vec<String> = by.iter().map(|(v, names)| format!("{v}: {}", names.join(", "))).collect();
    check(
        Status::Warn,
        "versions",
        format!("mixed versions ({})", list.join("; ")),
        "finish the rolling upgrade so every member runs the same version",
    )
}

/// Whether any check failed (the exit code).
pub fn any_failed(checks: &[Check]) -> bool {
    checks.iter().any(|c| c.status == Status::Fail)
}

/// One line per check.
pub fn render(checks: &[Check]) -> String {
    let mut out = String::new();
    for c in checks {
        out += &format!("{:<4} {:<12} {}", c.status.as_str(), c.name, c.detail);
        if !c.hint.is_empty() {
            out += &format!("; hint: {}", c.hint);
        }
        out.push('\n');
    }
    out
}

/// Reads the tls dir as the agent would.
pub fn cert_facts(tls_dir: &Path) -> Result<CertFacts, String> {
    let m = crate::pki::load_tls_dir_unchecked(tls_dir).map_err(|e| e.to_string())?;
    let path = tls_dir.join("node.pem");
    let summary = crate::pki::show_cert(&path).map_err(|e| e.to_string())?;
    let verifies = match crate::pki::load_tls_dir(tls_dir) {
        Ok(_) => Ok(()),
        // Expiry has its own line; only a failed signature check counts here.
        Err(_) if summary.expires_in_days < 0 => Ok(()),
        Err(e) => Err(e.to_string()),
    };
    Ok(CertFacts {
        path,
        identity: m.identity,
        cluster_id: m.cluster_id,
        issuer: summary.issuer,
        days_left: summary.expires_in_days,
        verifies,
    })
}

/// Creates and removes a file in the data dir.
pub fn probe_data_dir(dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let probe = dir.join(format!(".trellis-check-{}", std::process::id()));
    std::fs::write(&probe, b"check").map_err(|e| e.to_string())?;
    std::fs::remove_file(&probe).map_err(|e| e.to_string())
}

/// Reads refusal and dial-failure counters from a Prometheus text page.
pub fn link_counters(metrics: &str) -> LinkCounters {
    let mut l = LinkCounters::default();
    for line in metrics.lines().filter(|l| !l.starts_with('#')) {
        let Some((key, value)) = line.rsplit_once(' ') else { continue };
        let Ok(v) = value.parse::<f64>() else { continue };
        if let Some(reason) = key.strip_prefix("trellis_handshakes_refused_total{reason=\"") {
            l.refused.insert(reason.trim_end_matches("\"}").to_string(), v as u64);
        } else if key == "trellis_quic_dial_failures_total" {
            l.dial_failures = v as u64;
        }
    }
    l
}

/// Gathers the facts from the local files and the API at `api`.
pub fn gather(api: SocketAddr, dirs: &Dirs) -> Facts {
    let agent = crate::client::get(api, "/v1/agent/self")
        .and_then(|t| Ok(serde_json::from_str::<AgentSelf>(&t)?))
        .map_err(|e| format!("{e:#}"));
    let peers = if agent.is_ok() {
        crate::client::get(api, "/v1/agent/peers")
            .and_then(|t| Ok(serde_json::from_str::<Vec<PeerJson>>(&t)?))
            .map_err(|e| format!("{e:#}"))
    } else {
        Err("API not reachable".into())
    };
    let links = crate::client::get(api, "/metrics").map(|m| link_counters(&m)).unwrap_or_default();
    let clocks = match &peers {
        Ok(list) => {
            list.iter().filter(|p| p.state == "alive").map(|p| (p.name.clone(), clock_skew(p.api_addr))).collect()
        }
        Err(_) => Vec::new(),
    };
    Facts {
        api_addr: api,
        agent,
        cert: cert_facts(&dirs.tls),
        peers,
        links,
        clocks,
        data_dir: (dirs.data.clone(), probe_data_dir(&dirs.data)),
        guessed: dirs.guessed,
    }
}

/// A member's clock minus ours, read from its API's `unix_ms` between two readings of our
/// clock; the uncertainty is half the round trip.
fn clock_skew(api: Option<SocketAddr>) -> Result<Skew, String> {
    let api = api.ok_or("the member announces no API address")?;
    let now_ms = || crate::policy::now_ms() as i64;
    let before = now_ms();
    let text = crate::client::get(api, "/v1/agent/self").map_err(|e| format!("API at {api} not reachable ({e:#})"))?;
    let after = now_ms();
    let theirs = serde_json::from_str::<AgentSelf>(&text)
        .ok()
        .and_then(|a| a.unix_ms)
        .ok_or("the member's API does not report its clock (older version)")?;
    let mid = (before + after) / 2;
    Ok((theirs as i64 - mid, ((after - before) / 2) as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(name: &str, state: &str, heard: Option<u64>, version: &str) -> PeerJson {
        PeerJson {
            name: name.into(),
            peer_addr: "127.0.0.2:7946".parse().unwrap(),
            api_addr: None,
            state: state.into(),
            version: version.into(),
            last_heard_ms: heard,
        }
    }

    fn healthy() -> Facts {
        Facts {
            api_addr: "127.0.0.1:8500".parse().unwrap(),
            agent: Ok(AgentSelf {
                name: "n0".into(),
                id: "spiffe://c1/node/n0".into(),
                cluster_id: "c1".into(),
                version: "0.1.0".into(),
                unix_ms: Some(1),
                ..Default::default()
            }),
            cert: Ok(CertFacts {
                path: "/tls/node.pem".into(),
                identity: "spiffe://c1/node/n0".into(),
                cluster_id: "c1".into(),
                issuer: "CN=Trellis CA c1".into(),
                days_left: 89,
                verifies: Ok(()),
            }),
            peers: Ok(vec![peer("n1", "alive", Some(120), "0.1.0"), peer("n2", "alive", Some(300), "0.1.0")]),
            links: LinkCounters::default(),
            clocks: vec![("n1".into(), Ok((3, 1))), ("n2".into(), Ok((-12, 2)))],
            data_dir: ("/var/lib/trellis".into(), Ok(())),
            guessed: false,
        }
    }

    fn line<'a>(checks: &'a [Check], name: &str) -> &'a Check {
        checks.iter().find(|c| c.name == name).unwrap()
    }

    #[test]
    fn a_healthy_node_passes_every_check() {
        let checks = run_checks(&healthy());
        assert!(checks.iter().all(|c| c.status == Status::Pass), "{}", render(&checks));
        assert!(!any_failed(&checks));
        assert_eq!(line(&checks, "peers").detail, "2 members alive over UDP, each heard within 300 ms");
        assert_eq!(line(&checks, "clock").detail, "largest skew -12 ms against n2 (±2 ms)");
        assert_eq!(
            line(&checks, "certificate").detail,
            "/tls/node.pem (spiffe://c1/node/n0) valid, expires in 89 days"
        );
    }

    #[test]
    fn expiry_warns_under_30_days_and_fails_once_expired() {
        let mut f = healthy();
        f.cert.as_mut().unwrap().days_left = 29;
        assert_eq!(line(&run_checks(&f), "certificate").status, Status::Warn);
        f.cert.as_mut().unwrap().days_left = -2;
        let checks = run_checks(&f);
        let c = line(&checks, "certificate");
        assert_eq!((c.status, c.detail.as_str()), (Status::Fail, "/tls/node.pem expired 2 days ago"));
        assert!(c.hint.contains("trellis cert issue"));
        assert!(any_failed(&checks));
    }

    #[test]
    fn a_foreign_ca_fails_the_ca_line_when_no_peer_accepts_us() {
        let mut f = healthy();
        f.peers = Ok(vec![]);
        f.links.refused.insert("unknown_ca".into(), 3);
        let checks = run_checks(&f);
        let ca = line(&checks, "ca");
        assert_eq!(ca.status, Status::Fail);
        assert!(ca.detail.starts_with("3 peer handshakes refused for another CA or cluster id"), "{}", ca.detail);
        assert!(ca.hint.contains("cluster's CA"), "{}", ca.hint);
        let peers = line(&checks, "peers");
        assert_eq!(peers.status, Status::Fail);
        assert!(peers.detail.contains("peers' certificates are from another CA"), "{}", peers.detail);
        // With live peers it is someone else's foreign certificate: a warning.
        f.peers = Ok(vec![peer("n1", "alive", Some(5), "0.1.0")]);
        assert_eq!(line(&run_checks(&f), "ca").status, Status::Warn);
    }

    #[test]
    fn a_certificate_not_signed_by_ca_pem_or_another_identity_fails() {
        let mut f = healthy();
        f.cert.as_mut().unwrap().verifies = Err("UnknownIssuer".into());
        assert_eq!(line(&run_checks(&f), "ca").status, Status::Fail);
        let mut f = healthy();
        f.cert.as_mut().unwrap().cluster_id = "c2".into();
        let checks = run_checks(&f);
        assert!(line(&checks, "ca").detail.contains("but the tls dir holds"), "{}", render(&checks));
    }

    #[test]
    fn unreachable_and_silent_peers_and_udp_without_answer() {
        let mut f = healthy();
        f.peers = Ok(vec![peer("n1", "down", Some(40_000), "0.1.0"), peer("n2", "alive", Some(20_000), "0.1.0")]);
        let c = run_checks(&f);
        assert_eq!(line(&c, "peers").detail, "1 of 2 members unreachable: n1 down, last heard 40s ago");
        f.peers = Ok(vec![peer("n2", "alive", Some(20_000), "0.1.0")]);
        assert_eq!(line(&run_checks(&f), "peers").status, Status::Warn);
        f.peers = Ok(vec![]);
        f.links.dial_failures = 4;
        let c = run_checks(&f);
        assert_eq!(line(&c, "peers").status, Status::Fail);
        assert!(line(&c, "peers").hint.contains("UDP"), "{}", line(&c, "peers").hint);
    }

    #[test]
    fn clock_skew_thresholds_allow_for_the_measurement_error() {
        let mut f = healthy();
        f.clocks = vec![("n1".into(), Ok((1500, 100)))];
        assert_eq!(line(&run_checks(&f), "clock").status, Status::Warn);
        f.clocks = vec![("n1".into(), Ok((1050, 100)))];
        assert_eq!(line(&run_checks(&f), "clock").status, Status::Pass);
        f.clocks = vec![("n1".into(), Ok((-61_000, 10)))];
        assert_eq!(line(&run_checks(&f), "clock").status, Status::Fail);
        f.clocks = vec![("n1".into(), Err("API at 10.0.0.1:8500 not reachable".into()))];
        assert_eq!(line(&run_checks(&f), "clock").status, Status::Warn);
    }

    #[test]
    fn mixed_versions_warn_and_an_unwritable_data_dir_fails() {
        let mut f = healthy();
        f.peers = Ok(vec![peer("n1", "alive", Some(1), "0.2.0")]);
        f.data_dir.1 = Err("Permission denied (os error 13)".into());
        let c = run_checks(&f);
        assert_eq!(line(&c, "versions").detail, "mixed versions (0.1.0: n0; 0.2.0: n1)");
        assert_eq!(line(&c, "data_dir").status, Status::Fail);
        assert_eq!(
            render(&c[5..6]),
            "fail data_dir     /var/lib/trellis is not writable: Permission denied (os error 13); hint: give the agent's user write access (chown), or pick another --data-dir\n"
        );
    }

    #[test]
    fn missing_files_at_guessed_paths_warn_and_at_known_paths_fail() {
        let mut f = healthy();
        f.cert = Err("/etc/trellis/tls/node.pem: No such file or directory".into());
        f.data_dir.1 = Err("No such file or directory".into());
        let failed = |f: &Facts| run_checks(f).iter().filter(|c| c.status == Status::Fail).count();
        assert_eq!(failed(&f), 3, "certificate, ca, data_dir");
        f.guessed = true;
        let checks = run_checks(&f);
        assert_eq!(failed(&f), 0, "{}", render(&checks));
        assert!(line(&checks, "certificate")
            .detail
            .ends_with("(a default path: the agent did not say where its files are)"));
    }

    #[test]
    fn dirs_come_from_flags_then_the_agent_then_the_config() {
        let agent =
            AgentSelf { tls_dir: Some("/a/tls".into()), data_dir: Some("/a/data".into()), ..Default::default() };
        let none = [None, None];
        let d = Dirs::pick(none.clone(), Some(&agent), [Some("/c/tls".into()), None]);
        assert_eq!((d.tls.to_str(), d.data.to_str(), d.guessed), (Some("/a/tls"), Some("/a/data"), false));
        let d = Dirs::pick([Some("/f/tls".into()), None], Some(&agent), none.clone());
        assert_eq!((d.tls.to_str(), d.data.to_str()), (Some("/f/tls"), Some("/a/data")));
        let d = Dirs::pick(none.clone(), None, [Some("/c/tls".into()), Some("/c/data".into())]);
        assert_eq!((d.tls.to_str(), d.guessed), (Some("/c/tls"), false));
        let d = Dirs::pick(none.clone(), None, none);
        assert_eq!(
            (d.tls.to_str(), d.data.to_str(), d.guessed),
            (Some("/etc/trellis/tls"), Some("/var/lib/trellis"), true)
        );
    }

    #[test]
    fn an_unreachable_api_fails_with_the_address() {
        let mut f = healthy();
        f.agent = Err("connection refused".into());
        let c = line(&run_checks(&f), "api").clone();
        assert_eq!(c.detail, "no answer at 127.0.0.1:8500: connection refused");
        assert!(c.hint.contains("TRELLIS_HTTP_ADDR"));
    }

    #[test]
    fn counters_are_read_from_metrics() {
        let m = "# HELP x\ntrellis_handshakes_refused_total{reason=\"unknown_ca\"} 2\ntrellis_handshakes_refused_total{reason=\"expired\"} 0\ntrellis_quic_dial_failures_total 5\n";
        let l = link_counters(m);
        assert_eq!(l.refused["unknown_ca"], 2);
        assert_eq!(l.dial_failures, 5);
    }
}
