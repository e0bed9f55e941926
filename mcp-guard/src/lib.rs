//! mcp-guard: per-workload egress policy for MCP servers, enforced in the kernel.
//!
//! The modules follow the data path:
//! - [`config`] parses and validates the TOML config ([`config::sets`]: the named
//!   address sets).
//! - [`policy`] compiles a config into map entries and evaluates them like the kernel
//!   (pure: no kernel, no filesystem).
//! - [`kernel`] is every bpf call and pin: loading and attaching the programs, writing
//!   policy into the maps and repairing it, TC, pins, the preflight, exec's enforcement
//!   check.
//! - [`host`] is the machine around the kernel: cgroupfs, socket diagnostics, pod
//!   interfaces and addresses, the capability posture and exec's hardening.
//! - [`dns`] resolves host rules and runs the DNS proxy that learns answers, behind the
//!   rebinding guard.
//! - [`telemetry`] reads and enriches events and renders metrics.
//! - [`api`] serves the TCP listener and the control socket, and is the CLI's client.
//! - [`mcp`] is MCP awareness: the `exec --mcp` relay, its line protocol with the
//!   daemon, and the daemon's record of instances and tool calls.
//! - [`pods`] is Kubernetes pods, node-locally: the CRI client and which workload holds
//!   which pod.
//! - [`exec`] is `mcp-guard exec` (and `exec --mcp`).
//! - [`daemon`] ties it together for `mcp-guard run`.

pub mod api;
pub mod config;
pub mod daemon;
pub mod dns;
pub mod exec;
pub mod host;
pub mod kernel;
pub mod mcp;
pub mod pods;
pub mod policy;
pub mod telemetry;

/// Deepest cgroup level a `**` pattern walks to.
pub const MAX_DEPTH: usize = 16;
