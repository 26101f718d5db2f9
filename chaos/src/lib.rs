//! Trellis chaos harness: real agent clusters on loopback, and a deterministic simulator.
#![forbid(unsafe_code)]

pub mod cluster;
pub mod dns_bench;
pub mod dns_probe;
pub mod flood_bench;
pub mod haproxy;
pub mod http;
pub mod loadgen;
pub mod mesh_bench;
pub mod netns;
pub mod nginx;
pub mod oha;
pub mod otlp;
pub mod plain;
pub mod procs;
pub mod ratelimit_bench;
pub mod rollout_bench;
pub mod runner;
pub mod sim;
pub mod stats_bench;
