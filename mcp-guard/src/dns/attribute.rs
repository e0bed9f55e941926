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
    /// The pods the daemon's pod watcher placed. A placed pod's queries are its
    /// workload's; a pod no workload selects is no longer pending (the kernel removed
    /// that registration), so the workload cgroup above it decides, as in the kernel; a
    /// pod not listed yet is `pods-pending`'s (no host rule: refused).
    pub fn set_pods(&mut self, table: &Table) {
        let pods: Vec<(u64, String, Option<String>)> = table
            .iter()
            .map(|(path, p)| (p.cgroup_id, path.clone(), p.workload.clone()))
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
            // Listed pods first: at equal depth a listed pod is its own (see
            // [`Self::owner`]), not pods-pending's (whose patterns name the same cgroups).
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
            let found = cgroup::find_by_id(&self.mount, under, cgroup_id).is_some();
            if found {
                let depth = under.len();
                if best.as_ref().is_none_or(|(d, _)| depth > *d) {
                    best = Some((depth, workload.to_string()));
                }
            }
            found
        };
        // Listed pods first: a workload cgroup wins only if it is deeper. pods-pending
        // names the same cgroups as the listed pods, so it is skipped for a listed one.
        let mut listed = false;
        for (_, path, workload) in &self.pods {
            listed |= match workload {
                Some(w) => consider(path, w),
                None => cgroup::find_by_id(&self.mount, path, cgroup_id).is_some(),
            };
        }
        for w in &self.cfg.workloads {
            let Some(c) = w.cgroup.as_deref() else {
                continue;
            };
            if listed && w.name == crate::config::pods::PENDING {
                continue;
            }
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
