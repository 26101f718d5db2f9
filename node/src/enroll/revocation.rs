//! Revocation: the `revocations` policy objects become the verifiers' revocation list, and
//! connections to a newly revoked node are closed. Replication is the policy store's, so a
//! revocation written on any node takes effect everywhere within the policy propagation time.

use std::collections::BTreeSet;
use std::time::Duration;

use std::sync::Arc;

use crate::policy::Policy;
use crate::transport::Transport;
use trellis_core::policy::model::{Kind, Object};
use trellis_core::policy::PolicyStore;

/// A handshake verified just before a revocation arrived can be pooled just after the first
/// sweep; sweeping again this often while anything is revoked closes that gap.
const RESWEEP: Duration = Duration::from_secs(1);

/// The revoked node names in a policy store.
pub fn revoked_names(store: &PolicyStore) -> BTreeSet<String> {
    store
        .objects(Kind::Revocations)
        .filter(|(_, o)| matches!(o, Object::Revocation(_)))
        .map(|(k, _)| k.name.clone())
        .collect()
}

/// Keeps the transport's revocation list equal to the policy's, and closes connections of
/// revoked peers.
pub async fn watch(policy: Arc<Policy>, transport: Arc<Transport>) {
    let mut index = policy.index.subscribe();
    let live = transport.identity.clone();
    loop {
        let names = revoked_names(&policy.store.lock().expect("policy lock"));
        let added = live.revoked.replace(names);
        if added.iter().any(|n| *n == live.name) {
            tracing::error!(node = %live.name, "this node's identity is revoked: every peer refuses it; delete revocations/{} to undo", live.name);
        }
        let closed = transport.close_revoked(|n| live.revoked.contains(n));
        if !added.is_empty() || closed > 0 {
            tracing::warn!(revoked = ?added, closed_connections = closed, "revoked identities refused from now on");
        }
        let wait = if live.revoked.is_empty() { Duration::from_secs(3600) } else { RESWEEP };
        tokio::select! {
            r = index.changed() => if r.is_err() { break },
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_core::policy::Key;

    #[test]
    fn only_live_revocation_objects_count() {
        let mut s = PolicyStore::new("n1");
        let key = |name: &str| Key { kind: Kind::Revocations, name: name.into() };
        for (name, body) in [("n3", &br#"{"reason": "stolen laptop"}"#[..]), ("n4", b"{}")] {
            let reg = s.prepare(1_000, &key(name), Some(body), None).unwrap();
            s.commit(key(name), reg);
        }
        let other = Key { kind: Kind::Services, name: "n5".into() };
        let reg = s.prepare(1_000, &other, Some(b"{}"), None).unwrap();
        s.commit(other, reg);
        assert_eq!(revoked_names(&s), ["n3".to_string(), "n4".to_string()].into());
        // A deleted revocation (a tombstone) lets the node back in.
        let reg = s.prepare(2_000, &key("n4"), None, None).unwrap();
        s.commit(key("n4"), reg);
        assert_eq!(revoked_names(&s), ["n3".to_string()].into());
    }
}
