//! The line protocol between an `exec --mcp` relay and the daemon, on the daemon's MCP
//! socket (`daemon.mcp_socket`, root only): one JSON object per line each way, every
//! request answered by one [`Reply`] before the relay goes on. The daemon answers a
//! `call` only once the kernel enforces the call's tools; when the connection closes
//! (the relay exited or was killed) the daemon clears the instance's tools.

use std::collections::BTreeMap;

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
    /// The server's `tools/list` answer (names only), before the client sees it; the
    /// reply's `hidden` names the tools the relay takes out of it.
    Tools {
        names: Vec<String>,
        /// Tools whose definition (name, description, input schema) changed since the
        /// session's first list.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        changed: Vec<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        session: Option<String>,
    },
    /// A `tools/call` the relay is about to forward: answered once its tools are active.
    Call {
        request_id: String,
        tool: String,
        arguments: String,
        /// The Streamable HTTP session (`Mcp-Session-Id`) the call belongs to; request
        /// ids are unique only within it. Absent on stdio.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        session: Option<String>,
        /// Destinations its arguments name (`host:port`, or `host`), for the argument
        /// check.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        targets: Vec<String>,
        /// The tool's definition changed since the session's first `tools/list`.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        changed: bool,
        /// Credentials found in its arguments, by kind (masked with `mask = "secrets"`).
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        masked: BTreeMap<String, u32>,
        /// A call held for approval, asked about again: the request's id (the reply's
        /// `pending` until someone decides).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        approval: Option<String>,
    },
    /// A call ended: "result", "error", "cancelled" or "timeout".
    End {
        request_id: String,
        outcome: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        session: Option<String>,
        /// Credentials found in its result, by kind.
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        masked: BTreeMap<String, u32>,
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
    /// A `call` the relay must not forward: answered with a JSON-RPC error carrying this
    /// text (the rule that refused it). Older relays ignore it (the kernel still
    /// enforces whatever the server does).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
    /// A `call` that waits for a person's approval: hold it and send it again with this
    /// id in `approval` until the answer is no longer pending.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<String>,
    /// A `tools` list: the tools to take out of it before the client sees it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hidden: Vec<String>,
    /// The workload's policy at the relay, on `start` and `call` replies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<RelayView>,
}

/// What the relay applies by itself: masking, and whether calls are refused while the
/// daemon cannot be asked (the workload has tool rules).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RelayView {
    pub mask: crate::config::relay_keys::Mask,
    #[serde(default)]
    pub fail_closed: bool,
}

impl Reply {
    #[must_use]
    pub fn ok(seq: u32) -> Self {
        Self {
            ok: true,
            error: None,
            seq,
            refused: None,
            pending: None,
            hidden: Vec::new(),
            relay: None,
        }
    }
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference
fn is_zero(n: &u64) -> bool {
    *n == 0
}
