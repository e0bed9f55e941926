//! The registrations of the live slot kept up to date with the cgroup tree: the 100 ms
//! scan, the cgroups it found (with their directories, for attribution) and the
//! registered cgroups per workload.

use super::*;

impl PolicyMaps {
    /// Brings the active slot's cgroup registrations up to date: cgroups that appeared
    /// (a unit started, a pod was scheduled), were recreated with a new id, or went away.
    /// Returns how many registrations changed.
    pub fn refresh_cgroups(&mut self, compiled: &Compiled, mount: &Path) -> usize {
        let slot = self.active;
        let mut desired = self.scan(compiled, self.generation, mount);
        let mut changed = self.adopt_kernel_registrations(&desired);
        desired.retain(|_, w| *w != UNSELECTED_CLAIM);
        // Only cgroups no workload names any more are removed; a cgroup that moves to
        // another workload is overwritten in place, so no decision finds it missing.
        // A scan that met an error (out of file descriptors, say) removes nothing: what
        // it could not see may still run a workload (fail closed).
        changed += self.remove_gone(&desired);
        let mut infos = None;
        for (&id, &wid) in &desired {
            if self.registered.get(&id) == Some(&wid) {
                continue;
            }
            let info = infos.get_or_insert_with(|| infos_of(compiled))[&wid];
            let key = CgroupKey {
                cgroup_id: id,
                slot,
                _pad: 0,
            };
            match self.cgroups.insert(key, info, 0) {
                Ok(()) => {
                    if !self.slots[slot as usize].cgroups.contains(&key) {
                        self.slots[slot as usize].cgroups.push(key);
                    }
                    self.registered.insert(id, wid);
                    let name = compiled
                        .workloads
                        .iter()
                        .find(|w| w.id == wid)
                        .map_or("?", |w| w.name.as_str());
                    info!(
                        workload = name,
                        cgroup_id = id,
                        "workload cgroup registered"
                    );
                    changed += 1;
                }
                Err(e) => warn!(workload_id = wid, error = %e, "cannot register workload cgroup"),
            }
        }
        if changed > 0 {
            self.bump_epoch();
        }
        changed
    }

    /// A cgroup this scan found may hold a registration the kernel made at mkdir that
    /// this daemon has not seen: it becomes known here, so what follows treats it like
    /// any other (kept, overwritten for another workload, or removed: a pod no workload
    /// selects leaves pending this way). Adopting one is a change: the published view
    /// learns its cgroup id. Returns how many.
    fn adopt_kernel_registrations(&mut self, desired: &BTreeMap<u64, u32>) -> usize {
        let slot = self.active;
        let mut changed = 0;
        for &id in desired.keys() {
            if self.registered.contains_key(&id) {
                continue;
            }
            let key = CgroupKey {
                cgroup_id: id,
                slot,
                _pad: 0,
            };
            if let Ok(info) = self.cgroups.get(&key, 0) {
                self.registered.insert(id, info.workload_id);
                changed += 1;
                if !self.slots[slot as usize].cgroups.contains(&key) {
                    self.slots[slot as usize].cgroups.push(key);
                }
            }
        }
        changed
    }

    /// Removes the registrations of cgroups no workload names any more (a cgroup that
    /// moves to another workload is overwritten in place, so no decision finds it
    /// missing). A scan that met an error (out of file descriptors, say) removes
    /// nothing: what it could not see may still run a workload (fail closed).
    fn remove_gone(&mut self, desired: &BTreeMap<u64, u32>) -> usize {
        if self.scanner.incomplete {
            if !self.warned_incomplete {
                warn!("cgroup scan incomplete (a filesystem error other than \"not there\"): registrations are kept until a scan completes");
                self.warned_incomplete = true;
            }
            return 0;
        }
        self.warned_incomplete = false;
        let slot = self.active;
        let gone: Vec<u64> = self
            .registered
            .keys()
            .filter(|id| !desired.contains_key(id))
            .copied()
            .collect();
        for &id in &gone {
            let key = CgroupKey {
                cgroup_id: id,
                slot,
                _pad: 0,
            };
            let _ = self.cgroups.remove(&key);
            self.slots[slot as usize].cgroups.retain(|k| *k != key);
            self.registered.remove(&id);
        }
        gone.len()
    }

    /// The cgroup_skb backstop decides again what it cached before a registration change.
    fn bump_epoch(&mut self) {
        let next = self.epoch.get(&0, 0).unwrap_or(0).wrapping_add(1);
        if let Err(e) = self.epoch.set(0, next, 0) {
            warn!(error = %e, "cannot bump the registration epoch: the packet backstop keeps decisions cached before this change until the next policy change");
        }
    }

    /// Every existing cgroup the workloads of `compiled` (installed as `generation`) and
    /// the pods placed in them name, with its workload; unselected pods' cgroups are
    /// claimed by [`UNSELECTED_CLAIM`]. The scanner keeps the directories.
    pub(super) fn scan(
        &mut self,
        compiled: &Compiled,
        generation: u32,
        mount: &Path,
    ) -> BTreeMap<u64, u32> {
        let pods = &self.pods;
        self.scanner.resolve(
            (u64::from(generation) << 32) | u64::from(self.pods_version),
            || {
                live_pods(compiled, pods)
                    .chain(
                        compiled
                            .workloads
                            .iter()
                            .filter_map(|w| Some((w.id, w.cgroup.as_deref()?))),
                    )
                    .collect()
            },
            mount,
        )
    }

    /// The registered cgroups with their directories and workload ids (as the last
    /// scan found them).
    pub fn registered_dirs(&self) -> Vec<(u64, std::path::PathBuf, u32)> {
        self.scanner
            .found()
            .filter_map(|(id, dir)| Some((id, dir.to_path_buf(), *self.registered.get(&id)?)))
            .collect()
    }

    /// The cgroup ids registered for a workload, in the active slot.
    #[must_use]
    pub fn cgroups_of(&self, workload_id: u32) -> Vec<u64> {
        self.registered
            .iter()
            .filter(|(_, w)| **w == workload_id)
            .map(|(id, _)| *id)
            .collect()
    }

    /// The cgroups the kernel holds a registration for in the live slot, with the
    /// workload id of each.
    #[must_use]
    pub fn registered(&self) -> &BTreeMap<u64, u32> {
        &self.registered
    }
}
