//! Sticky identity, the daemon's part (`HOMES_1`; the kernel's part is `home.rs` in the
//! eBPF crate). The tracepoints give a home to every task created by a guarded task and
//! to every task moved into a workload; tasks that were already running when the
//! programs were first attached are found here: every task in a registered workload
//! cgroup (or below one) without a home gets its workload's. Entries of tasks that
//! exited while no exit tracepoint ran are removed, so a reused thread id finds none.
//! Runs at start (after the tracepoints are attached, before the daemon says ready)
//! and then every few seconds, off the state owner's thread.

use std::path::Path;

use aya::maps::{HashMap, MapData, MapError};
use mcp_guard_common::{CgroupKey, Home, WorkloadInfo, MAX_CGROUP_LEVEL};

use super::{map_err, MapsError};
use crate::host::attribution::Registered;

/// Only new entries: a home the kernel recorded is never replaced.
const BPF_NOEXIST: u64 = 1;
/// Processes looked at per pass, at most.
const MAX_TASKS: usize = 200_000;

/// What one pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pass {
    /// Tasks given a home by this pass (they predate the tracepoints).
    pub seeded: usize,
    /// Entries of tasks that no longer exist, removed.
    pub swept: usize,
    /// Entries now.
    pub tracked: usize,
    /// Homes that could not be written (the map is full): those tasks are judged by
    /// their current cgroup only.
    pub failed: usize,
}

/// `HOMES_1`.
pub struct Homes {
    homes: HashMap<MapData, u32, Home>,
}

impl Homes {
    /// Takes `HOMES_1` out of the loaded object.
    ///
    /// # Errors
    /// The map is missing or of another type.
    pub fn take(ebpf: &mut aya::Ebpf) -> Result<Self, MapsError> {
        let homes = ebpf
            .take_map("HOMES_1")
            .ok_or(MapsError::Missing("HOMES_1"))?;
        Ok(Self {
            homes: HashMap::try_from(homes).map_err(map_err("HOMES_1"))?,
        })
    }

    /// Removes the entries of tasks that are gone, then gives a home to every task
    /// below a registered workload cgroup that has none: the nearest registered cgroup
    /// above it, as the kernel decides ([`Registered`]).
    pub fn pass(&mut self, registered: &Registered) -> Pass {
        let mut pass = Pass {
            swept: self.sweep(),
            ..Pass::default()
        };
        for (pid, dir) in registered.processes(MAX_TASKS) {
            // Deeper than the kernel's ancestor walk: it cannot decide by it either.
            if dir.level >= MAX_CGROUP_LEVEL {
                continue;
            }
            let home = Home {
                cgroup_id: dir.id,
                level: dir.level,
                workload_id: dir.workload_id,
            };
            self.seed_process(pid, &home, &mut pass);
        }
        pass.tracked = self.homes.keys().filter(Result::is_ok).count();
        pass
    }

    /// The process `pid` and each of its threads without a home get `home`.
    fn seed_process(&mut self, pid: u32, home: &Home, pass: &mut Pass) {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return;
        };
        let tids = tasks
            .flatten()
            .filter_map(|t| t.file_name().to_str()?.parse::<u32>().ok());
        for tid in std::iter::once(pid).chain(tids) {
            match self.homes.insert(tid, home, BPF_NOEXIST) {
                Ok(()) => pass.seeded += 1,
                // Already has one (the kernel's, or the process id done above).
                Err(MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::EEXIST) => {}
                Err(_) => pass.failed += 1,
            }
        }
    }

    /// Removes entries whose task no longer exists.
    fn sweep(&mut self) -> usize {
        let gone: Vec<u32> = self
            .homes
            .keys()
            .filter_map(Result::ok)
            .filter(|tid| !Path::new(&format!("/proc/{tid}")).exists())
            .collect();
        let mut n = 0;
        for tid in gone {
            if self.homes.remove(&tid).is_ok() {
                n += 1;
            }
        }
        n
    }

    /// The home recorded for a thread id.
    #[must_use]
    pub fn get(&self, tid: u32) -> Option<Home> {
        self.homes.get(&tid, 0).ok()
    }
}

/// Each workload's strict registration under [`mcp_guard_common::strict_key`] in
/// `slot` (see `home.rs` in the eBPF crate).
pub(super) fn strict_entries(
    infos: &std::collections::HashMap<u32, WorkloadInfo>,
    slot: u32,
) -> Vec<(CgroupKey, WorkloadInfo)> {
    infos
        .iter()
        .map(|(&wid, info)| {
            (
                CgroupKey {
                    cgroup_id: mcp_guard_common::strict_key(wid),
                    slot,
                    _pad: 0,
                },
                info.strictest(),
            )
        })
        .collect()
}
