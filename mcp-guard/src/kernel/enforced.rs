//! Whether the kernel enforces a workload's cgroup right now, read from the kernel's own
//! state (the pinned maps and links, and the programs the kernel lists as attached),
//! never from a listener that any local process could answer on. `mcp-guard exec` runs
//! a command only after this says yes.

use std::{fs::File, path::Path};

use aya::{
    maps::{Array, HashMap, Map, MapData},
    programs::links::{FdLink, PinnedLink},
};
use mcp_guard_common::{CgroupKey, Config as KConfig, WorkloadInfo};

use crate::{config::Config, kernel::loader, kernel::pins::Pins};

/// Why a cgroup is not (yet) enforced, in words for the user.
pub fn check(
    cfg: &Config,
    workload_id: u32,
    cgroup_id: u64,
    attach_dir: &Path,
) -> Result<(), String> {
    let pins = Pins::new(&cfg.pin_dir);
    let open = |name: &str| {
        MapData::from_pin(pins.map(name)).map_err(|e| {
            format!(
                "no enforcement state pinned at {} ({e}): is `mcp-guard run --config {}` running (or was it, with on_exit = \"keep\")?",
                pins.map(name).display(),
                cfg.path.display()
            )
        })
    };
    let config: Array<MapData, KConfig> =
        Array::try_from(Map::Array(open("CONFIG_1")?)).map_err(|e| format!("CONFIG_1: {e}"))?;
    let live = config.get(&0, 0).map_err(|e| format!("CONFIG_1: {e}"))?;
    let cgroups: HashMap<MapData, CgroupKey, WorkloadInfo> =
        HashMap::try_from(Map::HashMap(open("CGROUPS_1")?))
            .map_err(|e| format!("CGROUPS_1: {e}"))?;
    let key = CgroupKey {
        cgroup_id,
        slot: live.slot & 1,
        _pad: 0,
    };
    match cgroups.get(&key, 0) {
        Ok(info) if info.workload_id == workload_id => {}
        Ok(info) => {
            return Err(format!(
                "the kernel enforces this cgroup as workload id {}, not {workload_id}: is the daemon running with this config?",
                info.workload_id
            ))
        }
        Err(_) => return Err("the kernel does not enforce this cgroup yet (no registration in the live policy)".into()),
    }
    let cg = File::open(attach_dir).map_err(|e| format!("{}: {e}", attach_dir.display()))?;
    for (_, hook, _, attach_type) in crate::kernel::manifest::cgroup_programs() {
        if hook == "cgroup_skb" && !cfg.cgroup_skb {
            continue;
        }
        let link = PinnedLink::from_pin(pins.link(hook))
            .map_err(|e| format!("no pinned {hook} link ({e})"))?;
        let prog = FdLink::from(link)
            .info()
            .map_err(|e| format!("{hook} link: {e}"))?
            .program_id();
        if !loader::attached_ids(&cg, attach_type).is_ok_and(|ids| ids.contains(&prog)) {
            return Err(format!(
                "the {hook} program is not attached to {}",
                attach_dir.display()
            ));
        }
    }
    Ok(())
}
