//! The line protocol between an `exec --mcp` relay and the daemon, on the daemon's MCP
//! socket (`daemon.mcp_socket`, root only): one JSON object per line each way, every
//! request answered by one [`Reply`] before the relay goes on. The daemon answers a
//! `call` only once the kernel enforces the call's tools; when the connection closes
//! (the relay exited or was killed) the daemon clears the instance's tools.

use serde::{Deserialize, Serialize};

/// Default path of the daemon's MCP socket.
pub const DEFAULT_SOCKET: &str = "/run/mcp-guard/mcp.sock";

/// The longest line either side accepts.
pub const MAX_LINE: usize = 64 * 1024;

/// A program's name and version, as `initialize` gives them (`clientInfo`, `serverInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    pub name: String,
    pub version: String,
}

/// What a relay tells the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ToDaemon {
    /// First line: a new instance, whose server runs in cgroup `cgroup_id` (a child of
    /// the workload's cgroup the relay created).
    Start {
        workload: String,
        cgroup_id: u64,
        relay_pid: u32,
        command: Vec<String>,
        /// Announced again after the connection broke (the daemon restarted): the
        /// daemon counts it. Absent from older relays (false).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        resumed: bool,
    },
    /// First line from a pod's MCP proxy sidecar (`mcp-guard mcp-proxy --container`):
    /// the instance is the container named `container` in the sidecar's own pod. The
    /// daemon finds the pod from the connection's peer credentials (pid -> cgroup ->
    /// pod through the runtime) and takes it only from the container the pod's workload
    /// names in `pods.mcp_proxy`.
    StartPod {
        container: String,
        relay_pid: u32,
        command: Vec<String>,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        resumed: bool,
    },
    /// `initialize` was seen: who talks to whom.
    Peers {
        client: Option<Peer>,
        server: Option<Peer>,
    },
    /// The server's `tools/list` answer (names only).
    Tools { names: Vec<String> },
    /// A `tools/call` the relay is about to forward: answered once its tools are active.
    Call {
        request_id: String,
        tool: String,
        arguments: String,
        /// The Streamable HTTP session (`Mcp-Session-Id`) the call belongs to; request
        /// ids are unique only within it. Absent on stdio.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        session: Option<String>,
    },
    /// A call ended: "result", "error", "cancelled" or "timeout".
    End {
        request_id: String,
        outcome: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        session: Option<String>,
    },
    /// Lines (bodies) the relay passed through without reading them, and (HTTP)
    /// requests refused because a header disagreed with the body.
    Counts {
        malformed: u64,
        oversized: u64,
        #[serde(default, skip_serializing_if = "is_zero")]
        mismatched: u64,
    },
}

/// The daemon's answer to every line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The instance's call-state sequence after this change.
    #[serde(default)]
    pub seq: u32,
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference
fn is_zero(n: &u64) -> bool {
    *n == 0
}
