//! Size limits shared by every peer. A peer that exceeds them is refused, never trusted.

/// Largest QUIC datagram payload we send. Below the 1200-byte QUIC minimum path MTU minus
/// QUIC's own framing, so gossip never depends on path MTU discovery.
pub const MAX_DATAGRAM: usize = 1100;

/// Largest gossip packet foca may build: a datagram minus the envelope header.
pub const MAX_GOSSIP_PACKET: usize = MAX_DATAGRAM - crate::envelope::HEADER_LEN;

/// Largest message carried on a QUIC stream.
pub const MAX_STREAM_MESSAGE: usize = 4 * 1024 * 1024;

/// Largest encoded node identity (name, addresses, version and labels).
pub const MAX_IDENTITY_BYTES: usize = 1024;

/// Node names: short enough to keep identities small in every gossip packet.
pub const MAX_NAME_LEN: usize = 63;

/// Labels a node may carry, and the length of each key and value.
pub const MAX_LABELS: usize = 32;
pub const MAX_LABEL_KEY_LEN: usize = 63;
pub const MAX_LABEL_VALUE_LEN: usize = 128;

/// Length of the agent version string.
pub const MAX_VERSION_LEN: usize = 32;
