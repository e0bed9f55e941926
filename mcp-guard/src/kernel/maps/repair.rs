//! The self-repair check: what the kernel holds against what the daemon installed.

use super::*;

impl PolicyMaps {
    /// Compares what the kernel holds for the live policy with what this daemon
    /// installed, and repairs every difference: the config entry, workload
    /// registrations, policy entries (present, equal, nothing extra in the live slot),
    /// learned expiries and registration-at-creation entries. Anyone with access to the
    /// pinned maps can change them; nothing they do lasts longer than a check.
    /// Returns what was repaired, by kind, with counts.
    pub fn repair(&mut self, mount: &Path) -> Vec<(&'static str, u64)> {
        let Some(compiled) = self.live.take() else {
            return Vec::new();
        };
        let mut out = self.repair_with(&compiled, mount);
        self.live = Some(compiled);
        let n = self.repair_instances();
        if n > 0 {
            out.push(("mcp_instance", n));
        }
        out
    }

    fn repair_with(&mut self, compiled: &Compiled, mount: &Path) -> Vec<(&'static str, u64)> {
        let slot = self.active;
        let mut out = Vec::new();
        let want = KConfig {
            slot,
            generation: self.generation,
            rate_limit_per_sec: self.rate_limit,
            object_hash: crate::kernel::loader::object_hash(),
        };
        if self.config.get(&0, 0).ok() != Some(want) && self.config.set(0, want, 0).is_ok() {
            out.push(("config", 1));
        }

        // Registrations: one missing or changed is written again if the cgroup is still
        // there (a fresh look: the rmdir tracepoint drops those of removed cgroups). One
        // pass over the kernel's map; one lookup table of the workloads.
        let infos = infos_of(compiled);
        let kernel: std::collections::HashMap<u64, WorkloadInfo> = self
            .cgroups
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, _)| k.slot == slot)
            .map(|(k, v)| (k.cgroup_id, v))
            .collect();
        let missing: Vec<u64> = self
            .registered
            .iter()
            .filter(|(id, wid)| kernel.get(id) != infos.get(wid))
            .map(|(id, _)| *id)
            .collect();
        if !missing.is_empty() {
            let now = resolve(compiled, &self.pods, mount);
            let mut n = 0;
            for id in missing {
                let key = CgroupKey {
                    cgroup_id: id,
                    slot,
                    _pad: 0,
                };
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
            if n > 0 {
                out.push(("cgroup", n));
            }
        }
        // A registration of the live slot naming no workload of this policy is not ours.
        let mut n = 0;
        for (id, v) in &kernel {
            if !infos.contains_key(&v.workload_id) {
                let key = CgroupKey {
                    cgroup_id: *id,
                    slot,
                    _pad: 0,
                };
                if self.cgroups.remove(&key).is_ok() {
                    n += 1;
                }
            }
        }
        if n > 0 {
            out.push(("cgroup", n));
        }

        // The workloads' strict registrations (what a task that left a workload whose
        // cgroup is gone is judged by).
        let mut n = 0;
        for (key, info) in super::homes::strict_entries(&infos, slot) {
            if self.cgroups.get(&key, 0).ok() != Some(info)
                && self.cgroups.insert(key, info, 0).is_ok()
            {
                n += 1;
            }
        }
        if n > 0 {
            out.push(("cgroup", n));
        }

        // Policy entries of the live slot.
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
            if self.exact.get(&key, 0).ok() != Some(e.entry)
                && self.exact.insert(key, e.entry, 0).is_ok()
            {
                n += 1;
            }
        }
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
        for k in extra_lpm {
            if self.lpm.remove(&k).is_ok() {
                n += 1;
            }
        }
        let keep_exact: std::collections::HashSet<&ExactKey> = live.exact.iter().collect();
        let extra_exact: Vec<ExactKey> = self
            .exact
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.scope & 1 == slot && !keep_exact.contains(k))
            .collect();
        for k in extra_exact {
            if self.exact.remove(&k).is_ok() {
                n += 1;
            }
        }
        if n > 0 {
            out.push(("policy", n));
        }

        // Registration at creation, for the live slot (as installed): one entry per
        // workload, so every fifth check (a 264-byte key per lookup adds up with 10,000).
        self.checks = self.checks.wrapping_add(1);
        if !self.checks.is_multiple_of(5) {
            return out;
        }
        let register = std::mem::take(&mut self.live_register);
        let mut n = 0;
        for (k, v) in &register {
            if self.register.get(k, 0).ok() != Some(*v) && self.register.insert(k, v, 0).is_ok() {
                n += 1;
            }
        }
        self.live_register = register;
        if n > 0 {
            out.push(("register", n));
        }
        out
    }
}
