//! The daemon's endpoints (the TCP listener, the root-only control socket) and the
//! CLI's client for them.

pub mod approvals;
pub mod client;
pub mod http;
