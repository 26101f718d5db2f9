//! The data plane: catalog views, load balancing and authorization as plain logic, and
//! the forwarding shell that carries service traffic over QUIC streams.

pub mod authz;
pub mod catalog;
pub mod forward;
pub mod http;
pub mod lb;
pub mod outlier;
pub mod router;
pub mod upstream;
