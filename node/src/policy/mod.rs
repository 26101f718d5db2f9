//! Cluster policy: typed objects in last-writer-wins registers, replicated by gossip and
//! anti-entropy, kept in a write-ahead log. No leader, no central store.

pub mod wal;

use std::path::Path;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use trellis_proto::PolicyEntry;

use std::time::{SystemTime, UNIX_EPOCH};

use trellis_core::policy::{store, Key, PolicyStore, StoreError, Version};

/// Milliseconds since the Unix epoch by this host's clock (0 if it is before 1970): the
/// time every policy write and check here is stamped with.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// A write that failed.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("could not persist the write: {0}; check the data dir's disk")]
    Io(#[from] std::io::Error),
}

/// The node's policy: the store, its log, and a watch for blocking reads. Shared by the
/// API handlers, the gossip handler and the agent task.
pub struct Policy {
    pub store: Mutex<PolicyStore>,
    wal: Mutex<wal::Wal>,
    pub index: watch::Sender<u64>,
}

impl Policy {
    /// Opens the log in `data_dir` and replays it; `auth` signs and checks writer proofs
    /// (the log's own entries included).
    pub fn open(
        data_dir: &Path,
        node_name: &str,
        tombstone_grace_ms: u64,
        auth: Option<Arc<dyn store::WriterAuth>>,
    ) -> std::io::Result<Arc<Policy>> {
        let (wal, records) = wal::Wal::open(data_dir)?;
        let mut store = PolicyStore::new(node_name);
        store.tombstone_grace_ms = tombstone_grace_ms;
        if let Some(auth) = auth {
            store.set_auth(auth);
        }
        let now = now_ms();
        let mut refused = 0;
        for (k, r) in records {
            if store.merge(now.max(r.marker.hlc >> 16), k, r).is_err() {
                refused += 1;
            }
        }
        store.take_dirty();
        if refused > 0 {
            tracing::warn!(refused, "policy log held entries that no longer validate; skipped them");
        }
        tracing::info!(objects = store.len(), "policy loaded");
        let index = watch::channel(store.index()).0;
        Ok(Arc::new(Policy { store: Mutex::new(store), wal: Mutex::new(wal), index }))
    }

    /// A local write or delete (`body: None`): validated, fsynced, then applied. Returns
    /// the entry to publish.
    pub fn write(&self, key: Key, body: Option<&[u8]>, cas: Option<Version>) -> Result<PolicyEntry, WriteError> {
        let mut store = self.store.lock().expect("policy lock");
        let reg = store.prepare(now_ms(), &key, body, cas)?;
        let mut wal = self.wal.lock().expect("wal lock");
        wal.append(&[(key.clone(), reg.clone())], true)?;
        store.commit(key.clone(), reg.clone());
        // Entries merged from peers since the last persist are dirty too: log them now, or
        // they would reach disk only at the next compaction.
        let merged: Vec<_> = store.take_dirty().into_iter().filter(|(k, _)| *k != key).collect();
        if !merged.is_empty() {
            if let Err(e) = wal.append(&merged, true) {
                tracing::error!(error = %e, "could not persist replicated policy; it stays in memory and will be re-synced");
            }
        }
        let _ = wal.maybe_compact(store.iter());
        self.index.send_replace(store.index());
        Ok(store::to_wire(&key, &reg))
    }

    /// Merges entries from a peer; returns (new, refused). Invalid entries are refused
    /// one by one, never stored. The caller persists them ([`Policy::persist`]) off the
    /// runtime thread: the agent loop does after every event.
    pub fn merge_entries(&self, entries: Vec<PolicyEntry>) -> (usize, usize) {
        let mut store = self.store.lock().expect("policy lock");
        let (mut new, mut refused) = (0, 0);
        let now = now_ms();
        for e in entries {
            match store::from_wire(e).map_err(StoreError::from).and_then(|(k, r)| store.merge(now, k, r)) {
                Ok(store::Merged::New) => new += 1,
                Ok(store::Merged::Stale) => {}
                Err(err) => {
                    refused += 1;
                    store.stats.refused += 1;
                    tracing::warn!(error = %err, "refused a policy entry from a peer");
                }
            }
        }
        (new, refused)
    }

    /// Writes merged changes to the log and wakes blocking readers.
    pub fn persist(&self) {
        let mut store = self.store.lock().expect("policy lock");
        let dirty = store.take_dirty();
        if dirty.is_empty() {
            return;
        }
        let mut wal = self.wal.lock().expect("wal lock");
        if let Err(e) = wal.append(&dirty, true) {
            tracing::error!(error = %e, "could not persist replicated policy; it stays in memory and will be re-synced");
        }
        let _ = wal.maybe_compact(store.iter());
        self.index.send_replace(store.index());
    }

    /// Collects tombstones every live peer has confirmed (see `PolicyStore::collect_tombstones`).
    pub fn collect(&self, live_peers: &[String]) {
        let mut store = self.store.lock().expect("policy lock");
        let n = store.collect_tombstones(now_ms(), live_peers);
        if n > 0 {
            tracing::debug!(collected = n, "policy tombstones collected");
            self.index.send_replace(store.index());
        }
    }

    /// The gossip handler's entry point for a piggybacked entry: returns whether it was new
    /// (so foca spreads it further). Local items (already committed) always spread.
    pub fn receive_item(&self, body: &[u8], local: bool) -> Result<bool, String> {
        let entry = PolicyEntry::decode_item(body).map_err(|e| e.to_string())?;
        if local {
            return Ok(true);
        }
        let mut store = self.store.lock().expect("policy lock");
        let res = store::from_wire(entry).map_err(StoreError::from).and_then(|(k, r)| store.merge(now_ms(), k, r));
        match res {
            Ok(m) => Ok(m == store::Merged::New),
            Err(e) => {
                store.stats.refused += 1;
                Err(e.to_string())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_core::policy::Kind;

    #[test]
    fn entries_merged_from_a_peer_are_logged_by_the_next_local_write() {
        let root = crate::test_dir::TestDir::new("policy");
        let key = |n: &str| Key { kind: Kind::Instances, name: n.into() };
        let body = br#"{"service": "web", "address": "127.0.0.1", "port": 8080}"#;
        let peer = Policy::open(&root.join("b"), "b", 60_000, None).unwrap();
        let entry = peer.write(key("web-1@b"), Some(body), None).unwrap();
        let a = Policy::open(&root.join("a"), "a", 60_000, None).unwrap();
        assert_eq!(a.merge_entries(vec![entry]), (1, 0));
        // No persist before the local write: the agent loop may not have reached it yet.
        a.write(key("web-2@a"), Some(body), None).unwrap();
        drop(a);
        let reopened = Policy::open(&root.join("a"), "a", 60_000, None).unwrap();
        let store = reopened.store.lock().unwrap();
        let held = (store.get(&key("web-1@b")).is_some(), store.get(&key("web-2@a")).is_some());
        assert_eq!(held, (true, true), "the peer's entry and the local one both survive a restart");
    }
}
