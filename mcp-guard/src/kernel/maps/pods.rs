//! Identified pods in the maps: pod cgroups registered for the workload that selects
//! them, or claimed as nobody's ([`PodOwner::Unselected`]).

use std::collections::BTreeMap;

use super::PolicyMaps;
use crate::policy::Compiled;

/// Whose an identified pod is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PodOwner {
    /// The workload (id) that selects it.
    Workload(u32),
    /// No workload selects it: registered as nobody's (it falls back to the workload of
    /// the cgroup above it), and claimed so that the pending pattern does not hold it.
    Unselected,
}

/// An identified pod: whose it is, and its cgroup path below the mount.
pub type PodEntry = (PodOwner, String);

/// How the cgroup scanner carries [`PodOwner::Unselected`]: a claim that registers
/// nothing (no workload has this id). Private to the maps; dropped before any write.
pub(super) const UNSELECTED_CLAIM: u32 = u32::MAX;

/// The identified pods whose workload the policy still has (after a reload dropped a
/// workload, its pods are held by the pending patterns until they are assigned again),
/// as scanner claims.
pub(super) fn live_pods<'a>(
    compiled: &'a Compiled,
    pods: &'a [PodEntry],
) -> impl Iterator<Item = (u32, &'a str)> + 'a {
    pods.iter().filter_map(|(owner, c)| {
        let claim = match *owner {
            PodOwner::Unselected => UNSELECTED_CLAIM,
            PodOwner::Workload(w) if compiled.workloads.iter().any(|x| x.id == w) => w,
            PodOwner::Workload(_) => return None,
        };
        Some((claim, c.as_str()))
    })
}

impl PolicyMaps {
    /// Sets the identified pod cgroups (see [`PodOwner`]); the next
    /// [`Self::refresh_cgroups`] registers them. Returns whether anything changed.
    pub fn set_pods(&mut self, mut pods: Vec<PodEntry>) -> bool {
        pods.sort();
        if pods == self.pods {
            return false;
        }
        self.pods = pods;
        self.pods_version = self.pods_version.wrapping_add(1);
        true
    }
}

impl PolicyMaps {
    /// Makes `IFACES_1` (pod mode: node-side interface index -> pod workload cgroup)
    /// equal `wanted`: new entries first, then stale ones removed. Returns how many
    /// entries changed.
    pub fn set_sources(&mut self, wanted: &BTreeMap<u32, u64>) -> usize {
        let mut changed = 0;
        for (a, id) in wanted {
            if self.source_entries.get(a) != Some(id) && self.sources.insert(a, id, 0).is_ok() {
                self.source_entries.insert(*a, *id);
                changed += 1;
            }
        }
        let stale: Vec<u32> = self
            .source_entries
            .keys()
            .filter(|a| !wanted.contains_key(*a))
            .copied()
            .collect();
        for a in stale {
            let _ = self.sources.remove(&a);
            self.source_entries.remove(&a);
            changed += 1;
        }
        changed
    }

    /// How many source addresses pod mode maps to workloads.
    #[must_use]
    pub fn source_count(&self) -> usize {
        self.source_entries.len()
    }
}
