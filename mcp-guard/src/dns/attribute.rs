//! Which workload a DNS client belongs to: the cgroup of the asking socket (found in
//! the proxy's namespace) or, for a client in another namespace (a pod), the cgroup
//! whose namespace holds its source address; then the workload of that cgroup, as the
//! kernel decides it ([`crate::host::attribution`]).

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use super::engine::Engine;
use crate::policy;

/// How long a cgroup's workload is remembered by the proxy.
const OWNER_TTL: Duration = Duration::from_secs(5);
/// How often, at most, the proxy reads which source address is whose.
const SOURCES_RESCAN: Duration = Duration::from_secs(1);

impl Engine {
    /// The cgroup of a client in another network namespace than the proxy, by its source
    /// address (a pod's address belongs to the pod's namespace). The address map is read
    /// again on a miss, at most every [`SOURCES_RESCAN`].
    pub(super) fn cgroup_by_source(&mut self, ip: IpAddr) -> Option<u64> {
        let key = policy::addr16(ip.to_canonical());
        let stale = self.sources.0.is_none_or(|t| t.elapsed() >= SOURCES_RESCAN);
        if !self.sources.1.contains_key(&key) && stale {
            // The DNS thread's own namespace: /proc/thread-self is this thread.
            self.sources = (
                Some(Instant::now()),
                self.view.registered.sources("/proc/thread-self/ns/net"),
            );
        }
        self.sources.1.get(&key).copied()
    }

    /// The workload a cgroup belongs to (the nearest registered cgroup at or above it,
    /// as the kernel decides), remembered for a few seconds.
    pub(super) fn owner(&mut self, cgroup_id: u64) -> Option<String> {
        if let Some((at, w)) = self.owners.get(&cgroup_id) {
            if at.elapsed() < OWNER_TTL {
                return w.clone();
            }
        }
        if self.owners.len() > 4096 {
            self.owners.clear();
        }
        let w = self
            .view
            .registered
            .locate(cgroup_id)
            .map(|(_, d)| d.workload.clone());
        self.owners.insert(cgroup_id, (Instant::now(), w.clone()));
        w
    }

    /// The calls in flight in the `exec --mcp` instance whose cgroup asked, when the
    /// refusal happens (a DNS refusal is the daemon's, so it is named at once, not when
    /// the event is read).
    pub(super) fn tool_call(&self, cgroup_id: u64) -> Option<crate::mcp::registry::Attribution> {
        let seq = self.view.mcp.get(cgroup_id)?.seq;
        self.view.mcp.attribute(cgroup_id, seq)
    }
}
