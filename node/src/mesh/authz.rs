//! Authorization of service traffic by intentions: who (caller identity) may reach which
//! service. Sans-IO: the caller identity comes from the peer certificate, checked upstream.

use crate::policy::model::{Action, Intention};

/// Decides for a caller and a destination. The most specific intention wins (an exact
/// source beats `*`); at equal specificity deny beats allow; with no match, `default`.
/// Intentions narrowed to paths or methods do not apply to opaque TCP streams.
pub fn decide<'a>(
    intentions: impl Iterator<Item = &'a Intention>,
    default: Action,
    caller: &str,
    service: &str,
) -> Action {
    let mut best: Option<(u8, Action)> = None;
    for i in intentions.filter(|i| i.destination == service && i.paths.is_empty() && i.methods.is_empty()) {
        let rank = if i.source == caller {
            2
        } else if i.source == "*" {
            1
        } else {
            continue;
        };
        best = match best {
            Some((r, a)) if r > rank || (r == rank && a == Action::Deny) => Some((r, a)),
            _ => Some((rank, i.action)),
        };
    }
    best.map(|(_, a)| a).unwrap_or(default)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn i(source: &str, dest: &str, action: Action) -> Intention {
        Intention { source: source.into(), destination: dest.into(), action, paths: vec![], methods: vec![] }
    }

    #[test]
    fn exact_source_beats_wildcard_and_deny_beats_allow_at_equal_rank() {
        let me = "spiffe://c/node/a";
        let list = [i("*", "web", Action::Deny), i(me, "web", Action::Allow)];
        assert_eq!(decide(list.iter(), Action::Deny, me, "web"), Action::Allow);
        assert_eq!(decide(list.iter(), Action::Allow, "spiffe://c/node/b", "web"), Action::Deny);
        let both = [i(me, "web", Action::Allow), i(me, "web", Action::Deny)];
        assert_eq!(decide(both.iter(), Action::Allow, me, "web"), Action::Deny);
    }

    #[test]
    fn no_match_falls_back_to_the_default() {
        let list = [i("*", "db", Action::Deny)];
        assert_eq!(decide(list.iter(), Action::Allow, "x", "web"), Action::Allow);
        assert_eq!(decide(list.iter(), Action::Deny, "x", "web"), Action::Deny);
    }
}
