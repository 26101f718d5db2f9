//! The data plane: catalog views, load balancing and authorization as plain logic, and
//! the forwarding shell that carries service traffic over QUIC streams.

pub mod authz;
pub mod balance;
pub mod catalog;
pub mod circuit;
pub mod forward;
pub mod hashing;
pub mod health;
pub mod http;
pub mod inbound;
pub mod lb;
pub mod locality;
pub mod outlier;
pub mod p2c;
pub mod pool;
pub mod retry;
pub mod router;
pub mod traffic;
pub mod upstream;
