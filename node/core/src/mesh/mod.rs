//! The data plane's decisions: the catalog view, routing, authorization, balancing,
//! outlier ejection, circuit breaking, retry budgets and the idle-connection pool, as
//! plain logic with time passed in. The agent's `mesh` shell carries the bytes.

pub mod access_log;
pub mod authz;
pub mod balance;
pub mod callers;
pub mod catalog;
pub mod circuit;
pub mod dns;
pub mod hashing;
pub mod headers;
pub mod keyed;
pub mod locality;
pub mod outlier;
pub mod p2c;
pub mod pool;
pub mod retry;
pub mod round_robin;
pub mod router;
pub mod trace;
pub mod traffic;
pub mod vip;
