//! What a SIEM needs beside the event itself: how bad it is and where it happened.

use std::sync::OnceLock;

/// How bad an event is, from what it says alone (the same whether the flow was denied or
/// audited: an audited metadata request went through, which is worse, not better):
/// `critical` for the cloud metadata service (a refused connection, a DNS answer
/// rebinding to it) and a process leaving its workload's cgroup; `high` for internal
/// destinations, sockets below the hooks (raw, packet, ping, other protocols), malformed
/// packets, other rebinding refusals and names the DNS proxy refused (exfiltration
/// looks like that); `low` for the DNS proxy's budgets and unattributed or malformed
/// queries; `medium` for every other refusal.
#[must_use]
pub fn severity(reason: &str, dest_class: &str) -> &'static str {
    match (reason, dest_class) {
        ("left-workload" | "baseline-metadata" | "rebound-metadata", _) | (_, "metadata") => {
            "critical"
        }
        (
            "raw-socket" | "packet-socket" | "ping-socket" | "socket-protocol" | "malformed-packet"
            | "rebound-internal" | "rebound-baseline" | "name-not-allowed" | "tool-changed"
            | "secret",
            _,
        )
        | (_, "internal") => "high",
        ("rate-limited" | "in-flight-limited" | "unattributed" | "malformed-query", _) => "low",
        _ => "medium",
    }
}

/// The node the event happened on: `NODE_NAME` (the DaemonSet sets it from
/// `spec.nodeName`), else the kernel's host name.
pub fn host() -> &'static str {
    static HOST: OnceLock<String> = OnceLock::new();
    HOST.get_or_init(|| {
        std::env::var("NODE_NAME")
            .ok()
            .filter(|n| !n.is_empty())
            .or_else(|| {
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .ok()
                    .map(|h| h.trim().to_string())
            })
            .unwrap_or_default()
    })
}

#[cfg(test)]
mod tests {
    use super::severity;

    #[test]
    fn severities() {
        assert_eq!(severity("deny-internal", "metadata"), "critical");
        assert_eq!(severity("left-workload", "none"), "critical");
        assert_eq!(severity("deny-internal", "internal"), "high");
        assert_eq!(severity("name-not-allowed", "none"), "high");
        assert_eq!(severity("default-deny", "public"), "medium");
        assert_eq!(severity("rate-limited", "none"), "low");
    }
}
