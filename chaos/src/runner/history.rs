//! Every client operation of a run (policy writes with their answers, reads with what they
//! saw, wipes) and its check against what correct replicas may answer. The merge rule is
//! last-writer-wins per object by (HLC, writer id), the order of [`Version`]; so after the
//! heal every node must hold, per key, the acknowledged write with the highest version (or a
//! later write whose answer was lost), and no node may go back on what it returned.
//!
//! Plain logic over a recorded history: the runner records, [`check`] judges.

use std::collections::BTreeMap;

use serde::Serialize;
use trellis_core::policy::store::Version;

/// How a write ended for the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Outcome {
    /// 200 with the version the node gave it.
    Acked(Version),
    /// Refused with a status: never applied.
    Refused(u16),
    /// No answer (timeout, reset): may or may not have been applied.
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Kind {
    Write {
        value: String,
        outcome: Outcome,
    },
    /// What the node answered: the version and value, or `None` for no such object.
    Read {
        seen: Option<(Version, String)>,
    },
    /// The node's data dir was wiped: it may start over, so its reads are judged afresh.
    Wipe,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Op {
    pub node: usize,
    pub start_ms: u64,
    pub end_ms: u64,
    pub key: String,
    pub kind: Kind,
}

/// A broken rule and the operations that show it.
#[derive(Debug, Clone, Serialize)]
pub struct Violation {
    pub rule: &'static str,
    pub detail: String,
    pub ops: Vec<Op>,
}

/// What each node holds for each key once the cluster has settled.
pub type Finals = BTreeMap<(usize, String), Option<(Version, String)>>;

/// Every violation in `history` and the settled state `finals`, earliest first per rule.
pub fn check(history: &[Op], finals: &Finals) -> Vec<Violation> {
    let mut out = final_state(history, finals);
    out.extend(phantom_reads(history));
    out.extend(monotonic_reads(history));
    out.extend(read_your_writes(history));
    out
}

fn writes_of<'a>(history: &'a [Op], key: &'a str) -> impl Iterator<Item = (&'a Op, &'a str, Outcome)> + 'a {
    history.iter().filter(move |op| op.key == key).filter_map(|op| match &op.kind {
        Kind::Write { value, outcome } => Some((op, value.as_str(), *outcome)),
        _ => None,
    })
}

fn acked_version(outcome: Outcome) -> Option<Version> {
    match outcome {
        Outcome::Acked(v) => Some(v),
        _ => None,
    }
}

/// After the heal every node holds, per key, the newest acknowledged write, or a newer one
/// whose answer was lost; never an older one (an acknowledged write lost) or anything else.
fn final_state(history: &[Op], finals: &Finals) -> Vec<Violation> {
    let mut out = Vec::new();
    for ((node, key), held) in finals {
        let newest = writes_of(history, key).filter_map(|(op, _, o)| Some((acked_version(o)?, op))).max_by_key(|w| w.0);
        let held_version = held.as_ref().map(|h| h.0);
        let why = match (newest, held) {
            (None, None) => None,
            (Some((v, op)), _) if held_version < Some(v) => Some((
                "an acknowledged write is lost",
                format!("node {node} holds {held:?} for {key}"),
                vec![op.clone()],
            )),
            (Some((v, op)), Some((hv, value))) if *hv == v => match &op.kind {
                Kind::Write { value: w, .. } if w != value => Some((
                    "the settled value differs from the write of its version",
                    format!("node {node} holds {value}"),
                    vec![op.clone()],
                )),
                _ => None,
            },
            (_, Some((_, value))) => {
                // Newer than every acknowledged write: only a write whose answer was lost may be.
                let unknown = writes_of(history, key).any(|(_, w, o)| o == Outcome::Unknown && w == value);
                (!unknown).then(|| {
                    (
                        "a node holds a value no pending write explains",
                        format!("node {node} holds {held:?} for {key}"),
                        vec![],
                    )
                })
            }
            (Some(_), None) => None,
        };
        if let Some((rule, detail, ops)) = why {
            out.push(Violation { rule, detail, ops });
        }
    }
    out
}

/// A read returns only what some write wrote, with that write's version.
fn phantom_reads(history: &[Op]) -> Vec<Violation> {
    history
        .iter()
        .filter_map(|op| match &op.kind {
            Kind::Read { seen: Some((v, value)) } => Some((op, v, value)),
            _ => None,
        })
        .filter(|(op, v, value)| {
            !writes_of(history, &op.key)
                .any(|(_, w, o)| w == value.as_str() && (acked_version(o) == Some(**v) || o == Outcome::Unknown))
        })
        .map(|(op, _, _)| Violation {
            rule: "a read returned a value no write made",
            detail: format!("node {} key {}", op.node, op.key),
            ops: vec![op.clone()],
        })
        .collect()
}

/// The version a read saw; no object counts as the lowest.
fn seen_version(op: &Op) -> Option<Option<Version>> {
    match &op.kind {
        Kind::Read { seen } => Some(seen.as_ref().map(|s| s.0)),
        _ => None,
    }
}

/// A node never answers an older version of a key than one it already returned (until its
/// data dir is wiped).
fn monotonic_reads(history: &[Op]) -> Vec<Violation> {
    let mut out = Vec::new();
    let mut best: BTreeMap<(usize, &str), &Op> = BTreeMap::new();
    let mut ops: Vec<&Op> = history.iter().collect();
    ops.sort_by_key(|op| op.start_ms);
    for op in ops {
        if op.kind == Kind::Wipe {
            best.retain(|(n, _), _| *n != op.node);
            continue;
        }
        let Some(v) = seen_version(op) else { continue };
        let slot = (op.node, op.key.as_str());
        match best.get(&slot) {
            Some(prev) if seen_version(prev) > Some(v) && prev.end_ms <= op.start_ms => out.push(Violation {
                rule: "a node went back to an older version (monotonic reads)",
                detail: format!("node {} key {}", op.node, op.key),
                ops: vec![(*prev).clone(), op.clone()],
            }),
            Some(prev) if seen_version(prev) >= Some(v) => {}
            _ => {
                best.insert(slot, op);
            }
        }
    }
    out
}

/// A read on the node that acknowledged a write, started after the acknowledgement, sees
/// that write or a newer one.
fn read_your_writes(history: &[Op]) -> Vec<Violation> {
    let mut out = Vec::new();
    for w in history {
        let Kind::Write { outcome: Outcome::Acked(v), .. } = &w.kind else { continue };
        let wiped_after = |t: u64| {
            history
                .iter()
                .any(|o| o.kind == Kind::Wipe && o.node == w.node && o.start_ms >= w.end_ms && o.start_ms <= t)
        };
        let stale = history.iter().find(|r| {
            r.node == w.node
                && r.key == w.key
                && r.start_ms > w.end_ms
                && seen_version(r).is_some_and(|seen| seen < Some(*v))
                && !wiped_after(r.start_ms)
        });
        if let Some(r) = stale {
            out.push(Violation {
                rule: "a node answered older than a write it had acknowledged (read your writes)",
                detail: format!("node {} key {}", w.node, w.key),
                ops: vec![w.clone(), r.clone()],
            });
        }
    }
    out
}

/// The first `n` violations, one line each with their operations, for a report.
pub fn describe(violations: &[Violation], n: usize) -> String {
    violations
        .iter()
        .take(n)
        .map(|v| {
            let ops: Vec<String> = v.ops.iter().map(describe_op).collect();
            format!("{}: {} [{}]", v.rule, v.detail, ops.join("; "))
        })
        .collect::<Vec<_>>()
        .join(" | ")
}

fn describe_op(op: &Op) -> String {
    let what = match &op.kind {
        Kind::Write { value, outcome: Outcome::Acked(v) } => format!("write {}={value} -> acked {}", op.key, v.token()),
        Kind::Write { value, outcome } => format!("write {}={value} -> {outcome:?}", op.key),
        Kind::Read { seen: Some((v, value)) } => format!("read {} -> {value} at {}", op.key, v.token()),
        Kind::Read { seen: None } => format!("read {} -> none", op.key),
        Kind::Wipe => "wipe".into(),
    };
    format!("node {} {}..{} ms: {what}", op.node, op.start_ms, op.end_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(hlc: u64, node: u64) -> Version {
        Version { hlc, node }
    }

    fn write(node: usize, at: u64, key: &str, value: &str, outcome: Outcome) -> Op {
        Op { node, start_ms: at, end_ms: at + 5, key: key.into(), kind: Kind::Write { value: value.into(), outcome } }
    }

    fn read(node: usize, at: u64, key: &str, seen: Option<(Version, &str)>) -> Op {
        let seen = seen.map(|(v, s)| (v, s.to_string()));
        Op { node, start_ms: at, end_ms: at + 2, key: key.into(), kind: Kind::Read { seen } }
    }

    /// (node, key, what it holds)
    type Held<'a> = (usize, &'a str, Option<(Version, &'a str)>);

    fn finals(entries: &[Held]) -> Finals {
        entries.iter().map(|(n, k, h)| ((*n, k.to_string()), h.map(|(v, s)| (v, s.to_string())))).collect()
    }

    #[test]
    fn a_correct_history_with_concurrent_writes_passes() {
        let h = vec![
            write(0, 0, "k", "a", Outcome::Acked(v(10, 1))),
            write(1, 1, "k", "b", Outcome::Acked(v(12, 2))),
            write(2, 2, "k", "c", Outcome::Refused(503)),
            read(0, 20, "k", Some((v(10, 1), "a"))),
            read(0, 40, "k", Some((v(12, 2), "b"))),
            read(1, 41, "k", Some((v(12, 2), "b"))),
        ];
        let f = finals(&[(0, "k", Some((v(12, 2), "b"))), (1, "k", Some((v(12, 2), "b")))]);
        assert!(check(&h, &f).is_empty(), "{:?}", check(&h, &f));
    }

    #[test]
    fn a_lost_acknowledged_write_is_named_with_its_operation() {
        let lost = write(1, 5, "k", "b", Outcome::Acked(v(12, 2)));
        let h = vec![write(0, 0, "k", "a", Outcome::Acked(v(10, 1))), lost.clone()];
        let f = finals(&[(0, "k", Some((v(10, 1), "a")))]);
        let bad = check(&h, &f);
        assert_eq!(bad.len(), 1, "{bad:?}");
        assert_eq!(bad[0].rule, "an acknowledged write is lost");
        assert_eq!(bad[0].ops, vec![lost]);
        assert!(describe(&bad, 3).contains("write k=b -> acked 12.2"));
        assert_eq!(check(&h, &finals(&[(2, "k", None)]))[0].rule, "an acknowledged write is lost");
    }

    #[test]
    fn a_newer_value_needs_a_write_whose_answer_was_lost() {
        let h = vec![write(0, 0, "k", "a", Outcome::Acked(v(10, 1))), write(1, 5, "k", "z", Outcome::Unknown)];
        assert!(check(&h, &finals(&[(0, "k", Some((v(30, 2), "z")))])).is_empty());
        let bad = check(&h, &finals(&[(0, "k", Some((v(30, 2), "q")))]));
        assert_eq!(bad[0].rule, "a node holds a value no pending write explains");
    }

    #[test]
    fn going_back_on_a_read_breaks_monotonic_reads_until_a_wipe() {
        let w1 = write(0, 0, "k", "a", Outcome::Acked(v(10, 1)));
        let w2 = write(0, 10, "k", "b", Outcome::Acked(v(12, 1)));
        let newer = read(1, 30, "k", Some((v(12, 1), "b")));
        let older = read(1, 40, "k", Some((v(10, 1), "a")));
        let h = vec![w1.clone(), w2.clone(), newer.clone(), older.clone()];
        let bad = check(&h, &finals(&[]));
        assert_eq!(bad.len(), 1, "{bad:?}");
        assert_eq!(bad[0].ops, vec![newer.clone(), older.clone()]);
        let wipe = Op { node: 1, start_ms: 35, end_ms: 35, key: String::new(), kind: Kind::Wipe };
        assert!(check(&[w1, w2, newer, wipe, older], &finals(&[])).is_empty());
    }

    #[test]
    fn a_node_must_show_its_own_acknowledged_writes_and_only_real_values() {
        let w = write(2, 0, "k", "a", Outcome::Acked(v(10, 3)));
        let stale = read(2, 20, "k", None);
        let bad = check(&[w.clone(), stale.clone()], &finals(&[]));
        assert_eq!(bad[0].rule, "a node answered older than a write it had acknowledged (read your writes)");
        assert_eq!(bad[0].ops, vec![w.clone(), stale]);
        let other_node = read(1, 20, "k", None);
        assert!(check(&[w.clone(), other_node], &finals(&[])).is_empty(), "other nodes may lag");
        let phantom = read(1, 20, "k", Some((v(10, 3), "x")));
        assert_eq!(check(&[w, phantom], &finals(&[]))[0].rule, "a read returned a value no write made");
    }
}
