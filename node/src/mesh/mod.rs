//! The data plane's shell: the listeners of this node's callers, the streams to and from
//! instances over QUIC, and the health probes. Its decisions are `trellis_core::mesh`.

pub mod answer;
pub mod body;
pub mod forward;
pub mod health;
pub mod http;
pub(crate) mod ids;
pub mod inbound;
pub mod instance_http;
pub mod io;
pub mod listeners;
pub mod mirror;
pub mod tee;
pub mod view;
pub mod vips;
