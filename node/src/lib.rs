//! The Trellis agent: membership, transport, local API and CLI.
#![forbid(unsafe_code)]

pub mod access_log;
pub mod agent;
pub mod api;
pub mod api_access;
pub mod api_catalog;
#[cfg(test)]
mod api_conformance;
pub mod api_error;
pub mod api_openapi;
pub mod api_policy;
pub mod api_ratelimit;
pub mod api_rollouts;
pub mod api_routes;
pub mod api_stats;
pub mod api_types;
pub mod check;
pub mod cli;
pub mod client;
pub mod client_dns;
pub mod client_history;
pub mod client_rollouts;
pub mod client_services;
pub mod client_stat;
pub mod config;
pub mod dashboard;
pub mod delay_line;
pub mod dev;
pub mod dev_demo;
pub mod dns;
pub mod enroll;
pub mod faults;
/// Entry points for the fuzz targets (`fuzz/`); not in a normal build.
#[cfg(any(test, feature = "fuzz"))]
pub mod fuzz;
pub mod limits;
pub mod listen;
pub mod membership;
pub mod mesh;
pub mod metrics;
pub mod metrics_process;
pub mod notify;
pub mod parked;
pub mod pki;
pub mod policy;
pub mod policy_writer;
pub mod quic_socket;
pub mod ratelimit;
pub mod reload;
pub mod rollouts;
pub mod run;
pub mod socket_owner;
pub mod spans;
pub mod stats;
#[cfg(test)]
mod test_dir;
pub mod transport;
