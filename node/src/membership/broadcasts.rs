//! Custom items carried on gossip. Today: leave notices, so that every member can tell a
//! graceful leave from a crash (SWIM alone sees both as "down").

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use foca::{BroadcastHandler, Invalidates};
use trellis_proto::{DecodeError, LeaveNotice, NodeIdentity};

/// At most this many leave notices are remembered; old ones only matter until the member
/// is forgotten, so an attacker flooding notices cannot grow memory without bound.
const MAX_REMEMBERED_LEAVES: usize = 4096;

/// Members known to have left: (address, generation). Shared with the core because foca
/// keeps its handler private; only the core's own thread ever touches it.
pub type LeftSet = Arc<Mutex<HashSet<(SocketAddr, u64)>>>;

#[derive(Default)]
pub struct ClusterBroadcasts {
    pub left: LeftSet,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemKey(SocketAddr, u64);

impl Invalidates for ItemKey {
    fn invalidates(&self, other: &Self) -> bool {
        self == other
    }
}

impl BroadcastHandler<NodeIdentity> for ClusterBroadcasts {
    type Key = ItemKey;
    type Error = DecodeError;

    fn receive_item(&mut self, data: &[u8], _sender: Option<&NodeIdentity>) -> Result<Option<ItemKey>, DecodeError> {
        let notice = LeaveNotice::decode(data)?;
        let mut left = self.left.lock().expect("left set poisoned");
        if left.len() >= MAX_REMEMBERED_LEAVES {
            left.clear();
        }
        let key = (notice.addr, notice.generation);
        Ok(left.insert(key).then_some(ItemKey(key.0, key.1)))
    }
}
