//! Which service a local connection calls for. An instance that declares the Unix user it
//! runs as (`run_as`) claims that user's connections: the shell finds a connection's
//! owner through the kernel's socket diagnostics, this decides what it means. The claim
//! then travels in the stream header, vouched for by this node's certificate.

use super::catalog::Snapshot;

/// Does any instance on `node` declare a user? Only then is a connection's owner looked up.
pub fn any_declared(snap: &Snapshot, node: &str) -> bool {
    snap.instances.iter().any(|i| i.instance.node == node && i.instance.run_as.is_some())
}

/// The service whose instances on `node` run as `uid` (`uid_of` resolves a declared user
/// name or number). None when no instance claims it, or when instances of two services do:
/// an ambiguous caller is its node alone, never a guess.
pub fn service_of_uid<'a>(
    snap: &'a Snapshot,
    node: &str,
    uid: u32,
    uid_of: impl Fn(&str) -> Option<u32>,
) -> Option<&'a str> {
    let mut found: Option<&str> = None;
    let claims = snap.instances.iter().filter(|i| i.instance.node == node);
    for i in claims.filter(|i| i.instance.run_as.as_deref().and_then(&uid_of) == Some(uid)) {
        match found {
            Some(s) if s != i.instance.service => return None,
            _ => found = Some(&i.instance.service),
        }
    }
    found
}

/// Whether a peer may speak for `service`: it runs an instance of it. A node can only
/// claim services it hosts, so a compromised node cannot pass as any caller in the mesh.
pub fn may_claim(snap: &Snapshot, node: &str, service: &str) -> bool {
    snap.instances.iter().any(|i| i.instance.node == node && i.instance.service == service)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::catalog::InstanceView;
    use crate::policy::model::{Health, Instance, Protocol};

    fn inst(service: &str, node: &str, run_as: Option<&str>) -> InstanceView {
        InstanceView {
            name: format!("{service}-1@{node}"),
            instance: Instance {
                service: service.into(),
                node: node.into(),
                address: [127, 0, 0, 1].into(),
                port: 80,
                protocol: Protocol::Http,
                labels: Default::default(),
                weight: 1,
                check: None,
                health: Health::Passing,
                run_as: run_as.map(Into::into),
            },
        }
    }

    fn uid(user: &str) -> Option<u32> {
        match user {
            "web" => Some(1001),
            "batch" => Some(1002),
            n => n.parse().ok(),
        }
    }

    #[test]
    fn a_declared_user_names_its_service_on_its_node_only() {
        let snap = Snapshot {
            instances: vec![
                inst("web", "a", Some("web")),
                inst("batch", "a", Some("1002")),
                inst("db", "b", Some("web")),
            ],
            ..Default::default()
        };
        assert!(any_declared(&snap, "a") && !any_declared(&snap, "c"));
        assert_eq!(service_of_uid(&snap, "a", 1001, uid), Some("web"));
        assert_eq!(service_of_uid(&snap, "a", 1002, uid), Some("batch"));
        assert_eq!(service_of_uid(&snap, "a", 0, uid), None);
        assert_eq!(service_of_uid(&snap, "b", 1001, uid), Some("db"));
        assert!(may_claim(&snap, "a", "web") && !may_claim(&snap, "a", "db"));
    }

    #[test]
    fn two_services_on_one_user_leave_the_caller_unnamed() {
        let snap = Snapshot {
            instances: vec![inst("web", "a", Some("web")), inst("admin", "a", Some("1001"))],
            ..Default::default()
        };
        assert_eq!(service_of_uid(&snap, "a", 1001, uid), None);
    }
}
