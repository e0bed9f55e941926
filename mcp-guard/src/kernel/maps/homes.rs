//! Sticky identity, the daemon's part (`HOMES_1`; the kernel's part is `home.rs` in the
//! eBPF crate). The tracepoints give a home to every task created by a guarded task and
//! to every task moved into a workload; tasks that were already running when the
//! programs were first attached are found here: every task in a registered workload
//! cgroup (or below one) without a home gets its workload's. Entries of tasks that
//! exited while no exit tracepoint ran are removed, so a reused thread id finds none.
//! Runs at start (after the tracepoints are attached, before the daemon says ready)
//! and then every few seconds, off the state owner's thread.

use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use aya::maps::{Array, HashMap, Map, MapData, MapError};
use mcp_guard_common::{CgroupKey, Config as KConfig, Home, WorkloadInfo, MAX_CGROUP_LEVEL};

use super::{map_err, MapsError};
use crate::kernel::pins::Pins;

/// Only new entries: a home the kernel recorded is never replaced.
const BPF_NOEXIST: u64 = 1;
/// cgroups looked at per pass, at most.
const MAX_DIRS: usize = 200_000;

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

/// `HOMES_1` with read access to the registrations it is seeded from.
pub struct Homes {
    homes: HashMap<MapData, u32, Home>,
    cgroups: HashMap<MapData, CgroupKey, WorkloadInfo>,
    config: Array<MapData, KConfig>,
}

fn pinned(pins: &Pins, name: &'static str) -> Result<MapData, MapsError> {
    MapData::from_pin(pins.map(name)).map_err(map_err(name))
}

impl Homes {
    /// Takes `HOMES_1` out of the loaded object and opens the pinned registrations.
    ///
    /// # Errors
    /// A map is missing, unpinned or of another type.
    pub fn take(ebpf: &mut aya::Ebpf, pins: &Pins) -> Result<Self, MapsError> {
        let homes = ebpf
            .take_map("HOMES_1")
            .ok_or(MapsError::Missing("HOMES_1"))?;
        Ok(Self {
            homes: HashMap::try_from(homes).map_err(map_err("HOMES_1"))?,
            cgroups: HashMap::try_from(Map::HashMap(pinned(pins, "CGROUPS_1")?))
                .map_err(map_err("CGROUPS_1"))?,
            config: Array::try_from(Map::Array(pinned(pins, "CONFIG_1")?))
                .map_err(map_err("CONFIG_1"))?,
        })
    }

    /// Removes the entries of tasks that are gone, then gives a home to every task of a
    /// registered workload cgroup that has none.
    pub fn pass(&mut self, mount: &Path) -> Pass {
        let mut pass = Pass {
            swept: self.sweep(),
            ..Pass::default()
        };
        let slot = self.config.get(&0, 0).map_or(0, |c| c.slot & 1);
        // Depth-first below the mount: (dir, level, home of the nearest registered
        // ancestor or the dir itself).
        let mut stack: Vec<(PathBuf, u32, Option<Home>)> = vec![(mount.to_path_buf(), 0, None)];
        let mut budget = MAX_DIRS;
        while let Some((dir, level, inherited)) = stack.pop() {
            if budget == 0 {
                break;
            }
            budget -= 1;
            let Ok(meta) = std::fs::metadata(&dir) else {
                continue;
            };
            let key = CgroupKey {
                cgroup_id: meta.ino(),
                slot,
                _pad: 0,
            };
            let home = match self.cgroups.get(&key, 0) {
                Ok(info) => Some(Home {
                    cgroup_id: meta.ino(),
                    level,
                    workload_id: info.workload_id,
                }),
                Err(_) => inherited,
            };
            if let Some(h) = &home {
                self.seed_dir(&dir, h, &mut pass);
            }
            if level + 1 >= MAX_CGROUP_LEVEL {
                continue;
            }
            let Ok(rd) = std::fs::read_dir(&dir) else {
                continue;
            };
            for ent in rd.flatten() {
                if ent.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push((ent.path(), level + 1, home));
                }
            }
        }
        pass.tracked = self.homes.keys().filter(Result::is_ok).count();
        pass
    }

    /// Every thread of every process in `dir` (this cgroup only) without a home gets `home`.
    fn seed_dir(&mut self, dir: &Path, home: &Home, pass: &mut Pass) {
        for pid in crate::host::cgroup::procs(dir) {
            let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
                continue;
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
