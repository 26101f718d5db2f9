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

/// The data plane's view of policy, parsed once per store change rather than per request.
#[derive(Default)]
pub struct Snapshot {
    /// The published store index (`Policy::index`) this was built at.
    pub index: u64,
    pub routes: super::router::RouteTable,
    /// Every registered instance, on live nodes or not (filter with the member list).
    pub instances: Vec<InstanceView>,
    pub services: std::collections::HashMap<String, model::Service>,
    pub intentions: Vec<Intention>,
    pub intention_default: Action,
    /// Every service named by policy or by an instance, with its instances' protocol: the
    /// per-request lookups (metrics label, HTTP version upstream) stay O(1).
    pub protocols: std::collections::HashMap<String, model::Protocol>,
}

impl Snapshot {
    pub fn build(store: &PolicyStore) -> Snapshot {
        let instances: Vec<InstanceView> = objects(store, Kind::Instances)
            .filter_map(|(name, o)| match o {
                Object::Instance(i) => Some(InstanceView { name, instance: i }),
                _ => None,
            })
            .collect();
        let services: std::collections::HashMap<String, model::Service> = objects(store, Kind::Services)
            .filter_map(|(name, o)| match o {
                Object::Service(s) => Some((name, s)),
                _ => None,
            })
            .collect();
        let mut protocols: std::collections::HashMap<String, model::Protocol> =
            services.keys().map(|s| (s.clone(), model::Protocol::default())).collect();
        for i in &instances {
            protocols.insert(i.instance.service.clone(), i.instance.protocol);
        }
        Snapshot {
            protocols,
            index: store.index(),
            routes: super::router::RouteTable::from_store(store),
            instances,
            services,
            intentions: intentions(store),
            intention_default: intention_default(store),
        }
    }

    /// Instances of `service` on live nodes, not failing their health check, carrying all
    /// `labels`.
    pub fn instances_of<'a>(
        &'a self,
        service: &'a str,
        alive: &'a crate::membership::AliveMembers,
        labels: &'a std::collections::BTreeMap<String, String>,
    ) -> impl Iterator<Item = &'a InstanceView> + 'a {
        self.instances.iter().filter(move |i| {
            i.instance.service == service
                && i.instance.health != model::Health::Critical
                && alive.contains_key(&i.instance.node)
                && labels.iter().all(|(k, v)| i.instance.labels.get(k) == Some(v))
        })
    }
}
