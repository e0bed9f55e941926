//! mcp-guard: per-workload egress policy for MCP servers, enforced in the kernel.
//!
//! - [`config`] parses and validates the TOML config.
//! - [`sets`] holds the named address sets (metadata endpoints, internal ranges).
//! - [`policy`] compiles a config into map entries and evaluates them like the kernel.
//! - [`loader`] loads and attaches the eBPF programs; [`maps`] writes policy and reads counters.
//! - [`events`] reads and enriches denied-flow events; [`metrics`] and [`http`] serve them.
//! - [`dns`] resolves host rules and runs the DNS proxy that learns answers, behind
//!   the rebinding guard; [`sockdiag`] tells it which cgroup asked.
//! - [`daemon`] ties it together for `mcp-guard run`; [`client`] talks to a running daemon.

pub mod cgroup;

/// Deepest cgroup level a `**` pattern walks to.
pub const MAX_DEPTH: usize = 16;
pub mod client;
pub mod config;
pub mod daemon;
pub mod dns;
pub mod enforced;
pub mod events;
pub mod features;
pub mod harden;
pub mod http;
pub mod loader;
pub mod maps;
pub mod metrics;
pub mod pins;
pub mod podlinks;
pub mod policy;
pub mod posture;
pub mod sets;
pub mod sockdiag;
pub mod sources;
pub mod tc;
