//! Which workload a DNS client belongs to: the cgroup of the asking socket (found in
//! the proxy's namespace) or, for a client in another namespace (a pod), the cgroup
//! whose namespace holds its source address; then the workload of that cgroup, as the
//! kernel decides it (the nearest workload cgroup or placed pod above it).

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use super::engine::Engine;
use crate::{
    host::{cgroup, sources},
    pods::Table,
    policy,
};

/// How long a cgroup's workload is remembered by the proxy.
const OWNER_TTL: Duration = Duration::from_secs(5);
/// How often, at most, the proxy reads which source address is whose.
const SOURCES_RESCAN: Duration = Duration::from_secs(1);

impl Engine {
    /// The pods placed in a workload (the daemon's pod watcher placed them). A pod no
    /// workload selects, or one not placed yet (pending), is nobody's: its queries are
    /// refused as unattributed.
    pub fn set_pods(&mut self, table: &Table) {
        let pods: Vec<(u64, String, String)> = table
            .iter()
            .filter_map(|(path, p)| Some((p.cgroup_id, path.clone(), p.workload.clone()?)))
            .collect();
        if pods != self.pods {
            self.pods = pods;
            // Who is whose may have changed: ask the tree again.
            self.owners.clear();
            self.sources.0 = None;
        }
    }

    /// The cgroup of a client in another network namespace than the proxy, by its source
    /// address (a pod's address belongs to the pod's namespace). The address map is read
    /// again on a miss, at most every [`SOURCES_RESCAN`].
    pub(super) fn cgroup_by_source(&mut self, ip: IpAddr) -> Option<u64> {
        let key = policy::addr16(ip.to_canonical());
        let stale = self.sources.0.is_none_or(|t| t.elapsed() >= SOURCES_RESCAN);
        if !self.sources.1.contains_key(&key) && stale {
            // Placed pods first: at equal depth a placed pod is its workload's, not
            // pods-pending's (whose patterns name the same cgroups).
            let mut dirs: Vec<_> = self
                .pods
                .iter()
                .map(|(id, path, _)| (*id, cgroup::fs_path(&self.mount, path)))
                .collect();
            dirs.extend(
                self.cfg
                    .workloads
                    .iter()
                    .filter_map(|w| w.cgroup.as_deref())
                    .flat_map(|c| cgroup::resolve_dirs(&self.mount, c)),
            );
            // The DNS thread's own namespace: /proc/thread-self is this thread.
            self.sources = (
                Some(Instant::now()),
                sources::scan_cgroups(dirs, "/proc/thread-self/ns/net"),
            );
        }
        self.sources.1.get(&key).copied()
    }

    /// The workload a cgroup belongs to (the nearest workload cgroup or placed pod above
    /// it, as the kernel decides), looked up in the cgroup tree and remembered for a few
    /// seconds.
    pub(super) fn owner(&mut self, cgroup_id: u64) -> Option<String> {
        if let Some((at, w)) = self.owners.get(&cgroup_id) {
            if at.elapsed() < OWNER_TTL {
                return w.clone();
            }
        }
        if self.owners.len() > 4096 {
            self.owners.clear();
        }
        let mut best: Option<(usize, String)> = None;
        let mut consider = |under: &str, workload: &str| {
            if let Some(found) = cgroup::find_by_id(&self.mount, under, cgroup_id) {
                let depth = under.len();
                if best.as_ref().is_none_or(|(d, _)| depth > *d) && found.starts_with(under) {
                    best = Some((depth, workload.to_string()));
                }
            }
        };
        // Placed pods first: a workload cgroup wins only if it is deeper (pods-pending
        // names the same cgroups as the placed pods).
        for (_, path, workload) in &self.pods {
            consider(path, workload);
        }
        for w in &self.cfg.workloads {
            let Some(c) = w.cgroup.as_deref() else {
                continue;
            };
            for (_, dir) in cgroup::resolve_dirs(&self.mount, c) {
                let Ok(rel) = dir.strip_prefix(&self.mount) else {
                    continue;
                };
                consider(&format!("/{}", rel.display()), &w.name);
            }
        }
        let w = best.map(|(_, n)| n);
        self.owners.insert(cgroup_id, (Instant::now(), w.clone()));
        w
    }

    /// The calls in flight in the `exec --mcp` instance whose cgroup asked, when the
    /// refusal happens (a DNS refusal is the daemon's, so it is named at once, not when
    /// the event is read).
    pub(super) fn tool_call(&self, cgroup_id: u64) -> Option<crate::mcp::registry::Attribution> {
        let seq = self.mcp.get(cgroup_id)?.seq;
        self.mcp.attribute(cgroup_id, seq)
    }
}
