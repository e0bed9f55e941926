//! MCP awareness: `mcp-guard exec --mcp` relays an MCP server's stdio transport
//! (newline-delimited JSON-RPC 2.0), follows `initialize`, `tools/list` and every
//! `tools/call`, and tells the daemon about each call before forwarding it; the daemon
//! activates the call's tools in the kernel (rules scoped with `tools = [...]`) and
//! names the call in every event of that instance.
//!
//! - [`jsonrpc`] reads one message without changing it (what the relay learns from it).
//! - [`wire`] is the line protocol between a relay and the daemon (its MCP socket).
//! - [`registry`] is the daemon's record of instances and their calls, for attribution.
//! - [`relay`] is the relay itself (the `exec --mcp` side).
//! - [`http_proxy`] is its Streamable HTTP counterpart (`exec --mcp-http`).

pub mod approvals;
pub mod gate;
mod held;
mod http_headers;
pub mod http_proxy;
pub mod jsonrpc;
pub mod pump;
pub mod registry;
pub mod relay;
pub mod secrets;
pub mod sse;
pub mod wire;
