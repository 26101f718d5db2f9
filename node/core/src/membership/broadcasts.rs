//! Custom items carried on gossip: leave notices (so members can tell a graceful leave from
//! a crash, which SWIM alone sees as the same "down") and small policy changes.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use foca::{BroadcastHandler, Invalidates};
use trellis_proto::gossip::ITEM_LEAVE;
use trellis_proto::policy::ITEM_POLICY;
use trellis_proto::{DecodeError, LeaveNotice, NodeIdentity, PolicyEntry};

/// At most this many leave notices are remembered; old ones only matter until the member
/// is forgotten, so an attacker flooding notices cannot grow memory without bound.
const MAX_REMEMBERED_LEAVES: usize = 4096;

/// Members known to have left: (address, generation). Shared with the core because foca
/// keeps its handler private; only the core's own thread ever touches it.
pub type LeftSet = Arc<Mutex<HashSet<(SocketAddr, u64)>>>;

/// Takes a piggybacked policy item (without its kind byte); `local` is true for our own
/// writes. Returns whether the item is news worth spreading further.
pub type PolicyItems = Arc<dyn Fn(&[u8], bool) -> Result<bool, String> + Send + Sync>;

#[derive(Default)]
pub struct ClusterBroadcasts {
    pub left: LeftSet,
    pub policy: Option<PolicyItems>,
    /// Leave notices refused because they did not come from the leaving node itself.
    pub leaves_refused: Arc<AtomicU64>,
}

/// Identifies an item so a newer one replaces an older one in foca's queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ItemKey {
    Leave(SocketAddr, u64),
    Policy { kind: String, name: String, version: (u64, u64) },
}

impl Invalidates for ItemKey {
    fn invalidates(&self, other: &Self) -> bool {
        match (self, other) {
            (ItemKey::Policy { kind, name, version }, ItemKey::Policy { kind: k2, name: n2, version: v2 }) => {
                kind == k2 && name == n2 && version >= v2
            }
            (a, b) => a == b,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ItemError {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("policy item refused: {0}")]
    Policy(String),
}

impl BroadcastHandler<NodeIdentity> for ClusterBroadcasts {
    type Key = ItemKey;
    type Error = ItemError;

    fn receive_item(&mut self, data: &[u8], sender: Option<&NodeIdentity>) -> Result<Option<ItemKey>, ItemError> {
        match data.split_first() {
            Some((&ITEM_LEAVE, _)) => {
                let notice = LeaveNotice::decode(data)?;
                // Only the leaver may say it left: its own notice (`sender` is None), or one
                // whose sender is the leaver, whose name the transport checked against the
                // connection's certificate. A relayed notice is refused, so a certified peer
                // cannot relabel a crashed member as departed; the leaver therefore tells
                // every member itself (see `Membership::leave`) and nobody relays.
                let from_leaver = match sender {
                    None => true,
                    Some(s) => s.name == notice.name && s.addr == notice.addr && s.generation == notice.generation,
                };
                if !from_leaver {
                    self.leaves_refused.fetch_add(1, Relaxed);
                    return Ok(None);
                }
                let mut left = self.left.lock().expect("left set poisoned");
                if left.len() >= MAX_REMEMBERED_LEAVES {
                    left.clear();
                }
                let key = (notice.addr, notice.generation);
                let fresh = left.insert(key);
                Ok((fresh && sender.is_none()).then_some(ItemKey::Leave(key.0, key.1)))
            }
            Some((&ITEM_POLICY, body)) => {
                let Some(handler) = &self.policy else { return Ok(None) };
                let entry = PolicyEntry::decode_item(body)?;
                let fresh = handler(body, sender.is_none()).map_err(ItemError::Policy)?;
                Ok(fresh.then_some(ItemKey::Policy { kind: entry.kind, name: entry.name, version: entry.version }))
            }
            Some((&kind, _)) => Err(DecodeError::UnknownKind(kind).into()),
            None => Err(DecodeError::Truncated.into()),
        }
    }
}
