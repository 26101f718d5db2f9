//! The Trellis agent: membership, transport, local API and CLI.
#![forbid(unsafe_code)]

pub mod membership;
