//! The JSON the HTTP API answers with, shared by the server (`api`) and its clients (the
//! CLI's `client`, `check`), so both sides read one definition.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use trellis_core::membership::MemberState;

/// One member as the API shows it.
#[derive(Debug, Serialize, Deserialize, Clone, PartialEq)]
pub struct MemberJson {
    pub name: String,
    pub id: String,
    pub peer_addr: SocketAddr,
    pub api_addr: Option<SocketAddr>,
    pub state: MemberState,
    /// Generation of the member's identity: changes every time the agent restarts.
    pub incarnation: u64,
    /// SWIM incarnation within that generation (bumped to refute suspicion).
    pub swim_incarnation: u16,
    pub labels: BTreeMap<String, String>,
    pub version: String,
}

/// `GET /v1/agent/peers`: one member as this agent sees it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PeerJson {
    pub name: String,
    pub peer_addr: SocketAddr,
    pub api_addr: Option<SocketAddr>,
    pub state: String,
    pub version: String,
    /// Milliseconds since this agent last received a gossip message from the member.
    pub last_heard_ms: Option<u64>,
}
