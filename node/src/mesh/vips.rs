//! Virtual service addresses' shell: keeps one listener per (service address, port) open
//! as policy and the catalog change, each serving like an `--upstream` listener (HTTP
//! through the L7 path, `tcp` services as byte streams), and keeps the assignments in the
//! data dir. Which address and which ports is `trellis_core::mesh::vip`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use trellis_core::mesh::vip::{self, PortState, Published, Range, Table};

use super::forward::Forwarder;

/// `[virtual_addresses]` in the agent's config.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VipConfig {
    /// On unless set false.
    pub enabled: Option<bool>,
    /// The loopback block addresses come from (default 127.100.0.0/16). Agents sharing a
    /// host (a dev cluster) need a block each.
    pub range: Option<String>,
}

impl VipConfig {
    /// The range to use, or None when off; a bad range names the field and the fix.
    pub fn resolve(cfg: Option<&VipConfig>, flag: Option<&str>) -> Result<Option<Range>, String> {
        let cfg = cfg.cloned().unwrap_or_default();
        if flag.is_none() && cfg.enabled == Some(false) {
            return Ok(None);
        }
        match flag.or(cfg.range.as_deref()) {
            None => Ok(Some(Range::default())),
            Some("off") => Ok(None),
            Some(text) => text.parse().map(Some).map_err(|e| format!("virtual_addresses.range: {e}")),
        }
    }
}

/// The file the assignments are kept in, under the data dir.
const FILE: &str = "virtual-addresses.json";

/// The running listeners, by address.
struct Listeners {
    open: BTreeMap<SocketAddr, JoinHandle<()>>,
    /// Addresses that failed to bind, with why; retried at the next change.
    failed: BTreeMap<SocketAddr, String>,
}

/// Starts the manager, which publishes the current addresses on `tx` (nothing when off).
pub fn start(
    fwd: Arc<Forwarder>,
    range: Option<Range>,
    data_dir: &Path,
    limits: crate::limits::Limits,
    gate: Arc<crate::listen::ConnGate>,
    tx: watch::Sender<Arc<Published>>,
) {
    if let Some(range) = range {
        let path = data_dir.join(FILE);
        let table = Table::new(range, load(&path));
        tracing::info!(%range, "virtual service addresses");
        tokio::spawn(run(fwd, table, path, limits, gate, tx));
    }
}

async fn run(
    fwd: Arc<Forwarder>,
    mut table: Table,
    path: PathBuf,
    limits: crate::limits::Limits,
    gate: Arc<crate::listen::ConnGate>,
    tx: watch::Sender<Arc<Published>>,
) {
    let mut changes = fwd.view.node.policy.index.subscribe();
    let mut listeners = Listeners { open: BTreeMap::new(), failed: BTreeMap::new() };
    loop {
        let snap = fwd.snapshot();
        let ports = vip::ports(&snap);
        if table.assign(ports.keys().map(String::as_str)) {
            if let Err(e) = save(&path, &table) {
                tracing::warn!(file = %path.display(), error = %e, "cannot keep the virtual addresses");
            }
        }
        let want: BTreeMap<SocketAddr, String> = ports
            .iter()
            .filter_map(|(svc, ports)| Some((table.get(svc)?, svc, ports)))
            .flat_map(|(ip, svc, ports)| ports.iter().map(move |p| (SocketAddr::new(ip.into(), *p), svc.clone())))
            .collect();
        listeners.apply(&want, |addr, listener, service| {
            let fwd = fwd.clone();
            tracing::info!(%service, listen = %addr, "virtual address listener");
            tokio::spawn(fwd.serve_upstream(service, listener, limits.clone(), gate.clone()))
        });
        tx.send_replace(Arc::new(published(&table, &ports, &listeners)));
        if changes.changed().await.is_err() {
            return;
        }
    }
}

impl Listeners {
    /// Opens what `want` has and is not open (retrying failed ones), closes the rest.
    fn apply(
        &mut self,
        want: &BTreeMap<SocketAddr, String>,
        mut spawn: impl FnMut(SocketAddr, tokio::net::TcpListener, String) -> JoinHandle<()>,
    ) {
        self.open.retain(|addr, task| {
            let keep = want.contains_key(addr) && !task.is_finished();
            if !keep {
                task.abort();
            }
            keep
        });
        self.failed.retain(|addr, _| want.contains_key(addr));
        for (addr, service) in want {
            if self.open.contains_key(addr) {
                continue;
            }
            match bind(*addr) {
                Ok(l) => {
                    self.failed.remove(addr);
                    self.open.insert(*addr, spawn(*addr, l, service.clone()));
                }
                Err(e) => {
                    if self.failed.insert(*addr, e.to_string()).is_none() {
                        tracing::warn!(%service, %addr, error = %e, "virtual address not listening; if an instance on this host listens on 0.0.0.0 at that port, bind it to a specific address or set the service's ports");
                    }
                }
            }
        }
    }
}

fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let l = std::net::TcpListener::bind(addr)?;
    l.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(l)
}

fn published(table: &Table, ports: &BTreeMap<String, BTreeSet<u16>>, l: &Listeners) -> Published {
    let mut out = Published { addresses: table.all().clone(), ports: BTreeMap::new() };
    for (svc, ports) in ports {
        let Some(ip) = table.get(svc) else { continue };
        let states = ports
            .iter()
            .map(|&port| PortState { port, error: l.failed.get(&SocketAddr::new(ip.into(), port)).cloned() })
            .collect();
        out.ports.insert(svc.clone(), states);
    }
    out
}

/// The kept assignments; a missing or unreadable file starts afresh (addresses are then
/// given again, mostly the same ones: they come from a hash of the name).
fn load(path: &Path) -> BTreeMap<String, Ipv4Addr> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            tracing::warn!(file = %path.display(), error = %e, "virtual addresses file unreadable; assigning afresh");
            BTreeMap::new()
        }),
        Err(_) => BTreeMap::new(),
    }
}

/// Writes the table to a temporary file and renames it over the old one, so a crash
/// leaves one whole version or the other.
fn save(path: &Path, table: &Table) -> std::io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(table.all()).expect("a map of strings serializes"))?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_on_and_bad_ranges_name_the_field() {
        assert_eq!(VipConfig::resolve(None, None), Ok(Some(Range::default())));
        let off = VipConfig { enabled: Some(false), range: None };
        assert_eq!(VipConfig::resolve(Some(&off), None), Ok(None));
        let flagged = VipConfig::resolve(Some(&off), Some("127.101.0.0/16")).unwrap().unwrap();
        assert_eq!(flagged.to_string(), "127.101.0.0/16");
        let bad = VipConfig { enabled: None, range: Some("10.0.0.0/8".into()) };
        assert!(VipConfig::resolve(Some(&bad), None).unwrap_err().starts_with("virtual_addresses.range:"));
    }

    #[test]
    fn assignments_survive_a_restart_through_the_file() {
        let dir = std::env::temp_dir().join(format!("trellis-vips-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(FILE);
        let mut t = Table::new(Range::default(), load(&path));
        t.assign(["web", "db"]);
        save(&path, &t).unwrap();
        let again = Table::new(Range::default(), load(&path));
        assert_eq!(again.all(), t.all());
        std::fs::write(&path, b"{not json").unwrap();
        assert!(load(&path).is_empty(), "a damaged file starts afresh rather than failing the agent");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
