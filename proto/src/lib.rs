//! Trellis wire types.
//!
//! Everything that crosses the network between agents is defined here: the versioned
//! [`envelope`], the node [`identity`] carried by membership, the foca [`gossip`] codec and
//! the size [`limits`]. Decoding never panics: every malformed input is a [`DecodeError`].
#![forbid(unsafe_code)]

pub mod enroll;
pub mod envelope;
pub mod forward;
/// Entry points for the fuzz targets (`fuzz/`); not in a normal build.
#[cfg(any(test, feature = "fuzz"))]
pub mod fuzz;
pub mod gossip;
pub mod identity;
pub mod limits;
pub mod policy;
pub mod ratelimit;
pub mod stats;

pub use envelope::{DecodeError, MessageKind, WIRE_VERSION};
pub use gossip::{GossipCodec, LeaveNotice};
pub use identity::{NodeIdentity, NodeMeta};
pub use policy::{PolicyEntry, PolicySync, WriterProof};

/// The bincode configuration every Trellis message uses: varint integers and a hard cap on
/// what one decode may allocate, so a lying length prefix cannot exhaust memory.
pub(crate) fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<{ limits::MAX_STREAM_MESSAGE }>()
}
