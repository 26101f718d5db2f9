//! Anti-entropy between two nodes, as pure functions of the store: compare roots, then
//! buckets, then swap the entries of differing buckets, in bounded chunks.

use trellis_proto::{PolicyEntry, PolicySync};

use super::store::PolicyStore;

/// Entries per message, so one exchange never needs an unbounded buffer.
pub const MAX_ENTRIES_PER_MESSAGE: usize = 512;

/// The opening message of a sync round.
pub fn open(store: &PolicyStore) -> PolicySync {
    PolicySync::Root { root: store.root(), objects: store.len() as u64 }
}

/// What to answer to a sync message (entries are merged by the caller first). May be
/// several messages when the answer is large.
pub fn answer(store: &PolicyStore, msg: &PolicySync) -> Vec<PolicySync> {
    match msg {
        PolicySync::Root { root, .. } if *root == store.root() => vec![],
        PolicySync::Root { .. } => vec![PolicySync::Buckets { buckets: store.buckets().to_vec() }],
        PolicySync::Buckets { buckets } => {
            let diff = store.diff(buckets);
            if diff.is_empty() {
                return vec![];
            }
            chunk(store.entries_in(&diff), diff)
        }
        PolicySync::Entries { want, .. } if want.is_empty() => vec![],
        PolicySync::Entries { want, .. } => chunk(store.entries_in(want), vec![]),
    }
}

/// Splits entries into bounded messages; `want` rides on the first.
fn chunk(entries: Vec<PolicyEntry>, want: Vec<u16>) -> Vec<PolicySync> {
    let mut out = Vec::new();
    let mut want = Some(want);
    let mut it = entries.into_iter().peekable();
    loop {
        let part: Vec<PolicyEntry> = it.by_ref().take(MAX_ENTRIES_PER_MESSAGE).collect();
        let w = want.take().unwrap_or_default();
        if part.is_empty() && w.is_empty() && !out.is_empty() {
            break;
        }
        out.push(PolicySync::Entries { entries: part, want: w });
        if it.peek().is_none() {
            break;
        }
    }
    out
}
