//! The self-repair check: what the kernel holds against what the daemon installed.

use super::*;

impl PolicyMaps {
    /// Compares what the kernel holds for the live policy with what this daemon
    /// installed, and repairs every difference: the config entry, workload
    /// registrations, policy entries (present, equal, nothing extra in the live slot),
    /// learned expiries and registration-at-creation entries. Anyone with access to the
    /// pinned maps can change them: a policy entry or a registration they change or
    /// remove is restored by the next check (a second), an entry they add to the
    /// registrations or a workload's strict or registration-at-creation entry they change
    /// by the next full check ([`FULL_CHECK_EVERY`] checks).
    /// Returns what was repaired, by kind, with counts.
    pub fn repair(&mut self, mount: &Path) -> Vec<(&'static str, u64)> {
        let Some(compiled) = self.live.take() else {
            return Vec::new();
        };
        self.checks = self.checks.wrapping_add(1);
        let full = self.checks % FULL_CHECK_EVERY == 1;
        let mut out = Vec::new();
        self.repair_config(&mut out);
        let infos = infos_of(&compiled);
        self.repair_registrations(&compiled, &infos, mount, full, &mut out);
        self.repair_policy(&compiled, &mut out);
        if full {
            self.repair_register(&mut out);
        }
        self.live = Some(compiled);
        let n = self.repair_instances();
        if n > 0 {
            out.push(("mcp_instance", n));
        }
        out
    }

    fn repair_config(&mut self, out: &mut Vec<(&'static str, u64)>) {
        let want = KConfig {
            slot: self.active,
            generation: self.generation,
            rate_limit_per_sec: self.rate_limit,
            object_hash: crate::kernel::loader::object_hash(),
        };
        if self.config.get(&0, 0).ok() != Some(want) && self.config.set(0, want, 0).is_ok() {
            out.push(("config", 1));
        }
    }

    /// Registrations: one missing or changed is written again if the cgroup is still
    /// there (a fresh look: the rmdir tracepoint drops those of removed cgroups). Each
    /// check looks up the registered cgroups; a full check reads the whole map in
    /// batches and also removes registrations naming no workload of this policy and
    /// restores the workloads' strict entries.
    fn repair_registrations(
        &mut self,
        compiled: &Compiled,
        infos: &std::collections::HashMap<u32, WorkloadInfo>,
        mount: &Path,
        full: bool,
        out: &mut Vec<(&'static str, u64)>,
    ) {
        let slot = self.active;
        let kernel: Option<std::collections::HashMap<u64, WorkloadInfo>> = full.then(|| {
            entries(&self.cgroups)
                .into_iter()
                .filter(|(k, _)| k.slot == slot)
                .map(|(k, v)| (k.cgroup_id, v))
                .collect()
        });
        let held = |id: u64| match &kernel {
            Some(k) => k.get(&id).copied(),
            None => self.cgroups.get(&cgroup_key(id, slot), 0).ok(),
        };
        let missing: Vec<u64> = self
            .registered
            .iter()
            .filter(|(id, wid)| held(**id).as_ref() != infos.get(wid))
            .map(|(id, _)| *id)
            .collect();
        if !missing.is_empty() {
            let n = self.register_again(compiled, infos, mount, missing);
            if n > 0 {
                out.push(("cgroup", n));
            }
        }
        let Some(kernel) = kernel else {
            return;
        };
        // A registration of the live slot naming no workload of this policy is not
        // ours; the workloads' strict entries are what a task that left a workload
        // whose cgroup is gone is judged by.
        let mut n = 0;
        for (id, v) in &kernel {
            if !infos.contains_key(&v.workload_id)
                && self.cgroups.remove(&cgroup_key(*id, slot)).is_ok()
            {
                n += 1;
            }
        }
        for (key, info) in super::homes::strict_entries(infos, slot) {
            if kernel.get(&key.cgroup_id) != Some(&info)
                && self.cgroups.insert(key, info, 0).is_ok()
            {
                n += 1;
            }
        }
        if n > 0 {
            out.push(("cgroup", n));
        }
    }

    /// Writes the registrations of `missing` cgroups again where the cgroup still exists
    /// and a workload still names it; forgets the others. Returns how many were written.
    fn register_again(
        &mut self,
        compiled: &Compiled,
        infos: &std::collections::HashMap<u32, WorkloadInfo>,
        mount: &Path,
        missing: Vec<u64>,
    ) -> u64 {
        let slot = self.active;
        let now = resolve(compiled, &self.pods, mount);
        let mut n = 0;
        for id in missing {
            let key = cgroup_key(id, slot);
            match now.get(&id).and_then(|wid| Some((*wid, *infos.get(wid)?))) {
                Some((wid, info)) => {
                    if self.cgroups.insert(key, info, 0).is_ok() {
                        self.registered.insert(id, wid);
                        n += 1;
                    }
                }
                None => {
                    self.registered.remove(&id);
                    self.slots[slot as usize].cgroups.retain(|k| *k != key);
                }
            }
        }
        n
    }

    /// Policy entries of the live slot: present, equal, learned expiries in place, and
    /// nothing extra.
    fn repair_policy(&mut self, compiled: &Compiled, out: &mut Vec<(&'static str, u64)>) {
        let slot = self.active;
        let mut n = 0;
        for e in &compiled.lpm {
            let key = e.key(slot);
            if self.lpm.get(&key, 0).ok() != Some(e.entry)
                && self.lpm.insert(&key, e.entry, 0).is_ok()
            {
                n += 1;
            }
        }
        let clock = Clock::now();
        let exact: std::collections::HashMap<ExactKey, PolicyEntry> =
            entries(&self.exact).into_iter().collect();
        for e in &compiled.exact {
            let key = e.key(slot);
            if let Some(unix) = e.expires_unix {
                let want = clock.boot_ns_at(unix);
                // Rewritten if missing or moved by more than a second (the two clocks
                // are read a moment apart).
                let off = self
                    .expiry
                    .get(&key, 0)
                    .map_or(u64::MAX, |v| v.abs_diff(want));
                if off > 1_000_000_000 && self.expiry.insert(key, want, 0).is_ok() {
                    n += 1;
                }
            }
            if exact.get(&key) != Some(&e.entry) && self.exact.insert(key, e.entry, 0).is_ok() {
                n += 1;
            }
        }
        n += self.remove_extra_policy(exact.into_keys());
        if n > 0 {
            out.push(("policy", n));
        }
    }

    /// Removes policy entries of the live slot this daemon did not install.
    fn remove_extra_policy(&mut self, exact: impl Iterator<Item = ExactKey>) -> u64 {
        let slot = self.active;
        let live = &self.slots[slot as usize];
        let keep_lpm: std::collections::HashSet<(u32, LpmData)> = live
            .lpm
            .iter()
            .map(|k| (k.prefix_len(), k.data()))
            .collect();
        let extra_lpm: Vec<Key<LpmData>> = self
            .lpm
            .keys()
            .filter_map(Result::ok)
            .filter(|k| {
                k.data().scope & 1 == slot && !keep_lpm.contains(&(k.prefix_len(), k.data()))
            })
            .collect();
        let keep_exact: std::collections::HashSet<&ExactKey> = live.exact.iter().collect();
        let extra_exact: Vec<ExactKey> = exact
            .filter(|k| k.scope & 1 == slot && !keep_exact.contains(k))
            .collect();
        let mut n = 0;
        for k in extra_lpm {
            if self.lpm.remove(&k).is_ok() {
                n += 1;
            }
        }
        for k in extra_exact {
            if self.exact.remove(&k).is_ok() {
                n += 1;
            }
        }
        n
    }

    /// Registration at creation, for the live slot (as installed): one entry per
    /// workload, read in one batch.
    fn repair_register(&mut self, out: &mut Vec<(&'static str, u64)>) {
        let register = std::mem::take(&mut self.live_register);
        let kernel: std::collections::HashMap<MkdirKey, MkdirMatch> =
            entries(&self.register).into_iter().collect();
        let mut n = 0;
        for (k, v) in &register {
            if kernel.get(k) != Some(v) && self.register.insert(k, v, 0).is_ok() {
                n += 1;
            }
        }
        self.live_register = register;
        if n > 0 {
            out.push(("register", n));
        }
    }
}

/// Every how many checks the whole registration maps are read (the other checks look up
/// the registered cgroups and the policy only): reading every workload's entries costs
/// milliseconds with 10,000 workloads.
pub const FULL_CHECK_EVERY: u64 = 5;

fn cgroup_key(cgroup_id: u64, slot: u32) -> CgroupKey {
    CgroupKey {
        cgroup_id,
        slot,
        _pad: 0,
    }
}

/// Every entry of a hash map: in batches where the kernel has them (5.6), else by
/// iteration.
fn entries<K: aya::Pod, V: aya::Pod>(map: &HashMap<MapData, K, V>) -> Vec<(K, V)> {
    super::batch::dump(map).unwrap_or_else(|_| map.iter().filter_map(Result::ok).collect())
}
