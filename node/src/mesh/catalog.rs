//! The service catalog: instances registered on nodes, as seen from here. An instance is
//! listed only while its node is alive, so a node's instances vanish with the node.

use std::collections::HashSet;

use crate::policy::model::{self, Action, Instance, Intention, Kind, Object, Settings};
use crate::policy::PolicyStore;

#[derive(Debug, Clone, serde::Serialize)]
pub struct InstanceView {
    /// `<id>@<node>`
    pub name: String,
    #[serde(flatten)]
    pub instance: Instance,
}

fn objects(store: &PolicyStore, kind: Kind) -> impl Iterator<Item = (String, Object)> + '_ {
    store.iter().filter(move |(k, _)| k.kind == kind).filter_map(|(k, r)| {
        let body = r.val.body.as_ref()?;
        Some((k.name.clone(), model::parse(k.kind, &k.name, body.as_bytes()).ok()?))
    })
}

/// Instances of `service` (all services when None) on alive nodes.
pub fn instances(store: &PolicyStore, service: Option<&str>, alive: &HashSet<String>) -> Vec<InstanceView> {
    objects(store, Kind::Instances)
        .filter_map(|(name, o)| match o {
            Object::Instance(i) if alive.contains(&i.node) && service.is_none_or(|s| s == i.service) => {
                Some(InstanceView { name, instance: i })
            }
            _ => None,
        })
        .collect()
}

pub fn intentions(store: &PolicyStore) -> Vec<Intention> {
    objects(store, Kind::Intentions)
        .filter_map(|(_, o)| match o {
            Object::Intention(i) => Some(i),
            _ => None,
        })
        .collect()
}

pub fn intention_default(store: &PolicyStore) -> Action {
    objects(store, Kind::Settings)
        .find_map(|(_, o)| match o {
            Object::Settings(Settings { intention_default }) => Some(intention_default),
            _ => None,
        })
        .unwrap_or(Action::Allow)
}
