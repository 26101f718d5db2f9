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

/// Instances whose body names the node their object name says (`<id>@<node>`, which the
/// store ties to the writer's proof): a node cannot pass its instance off as another's.
fn registered(store: &PolicyStore) -> impl Iterator<Item = (String, Instance)> + '_ {
    store.objects(Kind::Instances).filter_map(|(k, o)| match o {
        Object::Instance(i) if model::instance_node(&k.name) == Some(i.node.as_str()) => Some((k.name.clone(), i)),
        _ => None,
    })
}

/// Instances of `service` (all services when None) on alive nodes.
pub fn instances(store: &PolicyStore, service: Option<&str>, alive: &HashSet<String>) -> Vec<InstanceView> {
    registered(store)
        .filter(|(_, i)| alive.contains(&i.node) && service.is_none_or(|s| s == i.service))
        .map(|(name, instance)| InstanceView { name, instance })
        .collect()
}

pub fn intentions(store: &PolicyStore) -> Vec<Intention> {
    store
        .objects(Kind::Intentions)
        .filter_map(|(_, o)| match o {
            Object::Intention(i) => Some(i),
            _ => None,
        })
        .collect()
}

pub fn intention_default(store: &PolicyStore) -> Action {
    store
        .objects(Kind::Settings)
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
    /// Refuses a write that would put request-level intentions on a `tcp` service, whose
    /// streams cannot be looked into: an L7 intention for one, or a service turned `tcp`
    /// that has some. (Writes racing on two nodes can still meet; then the L7 deny fails
    /// closed, see `authz`.)
    pub fn refuse_l7_on_tcp(&self, name: &str, obj: &Object) -> Result<(), model::FieldError> {
        let fix =
            "L7 rules (paths, methods, headers) need an HTTP service: drop them, or use protocol http, http2 or grpc";
        match obj {
            Object::Intention(i) if i.is_l7() && self.protocols.get(&i.destination) == Some(&model::Protocol::Tcp) => {
                let field = if !i.paths.is_empty() {
                    "paths"
                } else if !i.methods.is_empty() {
                    "methods"
                } else {
                    "headers"
                };
                Err(model::FieldError {
                    path: format!("intentions.{name}.{field}"),
                    message: format!("{} is a tcp service", i.destination),
                    fix: fix.into(),
                })
            }
            Object::Service(s)
                if s.protocol == model::Protocol::Tcp && super::authz::has_l7(self.intentions.iter(), name) =>
            {
                Err(model::FieldError {
                    path: format!("services.{name}.protocol"),
                    message: format!("intentions for {name} look into HTTP requests"),
                    fix: "remove the paths, methods and headers of its intentions first".into(),
                })
            }
            _ => Ok(()),
        }
    }

    pub fn build(store: &PolicyStore) -> Snapshot {
        let instances: Vec<InstanceView> =
            registered(store).map(|(name, instance)| InstanceView { name, instance }).collect();
        let services: std::collections::HashMap<String, model::Service> = store
            .objects(Kind::Services)
            .filter_map(|(k, o)| match o {
                Object::Service(s) => Some((k.name.clone(), s)),
                _ => None,
            })
            .collect();
        // A service object's protocol is how the mesh speaks to all its instances; without
        // one, the instances' own.
        let mut protocols: std::collections::HashMap<String, model::Protocol> =
            instances.iter().map(|i| (i.instance.service.clone(), i.instance.protocol)).collect();
        protocols.extend(services.iter().map(|(name, s)| (name.clone(), s.protocol)));
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

    /// The protocol the mesh speaks to `service`'s instances (`http` when nothing says).
    pub fn protocol_of(&self, service: &str) -> model::Protocol {
        self.protocols.get(service).copied().unwrap_or_default()
    }

    /// `service`'s settings: its policy's, else the defaults.
    pub fn settings(&self, service: &str) -> &model::Service {
        static DEFAULT: std::sync::OnceLock<model::Service> = std::sync::OnceLock::new();
        self.services.get(service).unwrap_or_else(|| DEFAULT.get_or_init(model::Service::default))
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
