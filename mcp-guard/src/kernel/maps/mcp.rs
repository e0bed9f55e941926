//! MCP instances in the kernel (`MCP_INSTANCES_1`): per `exec --mcp` server cgroup, the
//! tool sets its calls in flight activate, per policy slot. The daemon writes an entry
//! whole before it acknowledges a relay's call, so the call is forwarded only once the
//! kernel enforces it; a reload writes the new slot's masks before switching slots.

use super::*;

/// What the daemon keeps per instance (the kernel entry is computed from it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct InstanceState {
    pub(super) workload_id: u32,
    pub(super) seq: u32,
    /// Tools of the calls in flight (empty: no call).
    pub(super) tools: Vec<String>,
}

/// The active mask of `state` under `compiled` (0 if its workload is gone).
pub(super) fn mask(compiled: Option<&Compiled>, state: &InstanceState) -> u64 {
    compiled
        .and_then(|c| c.workloads.iter().find(|w| w.id == state.workload_id))
        .map_or(0, |w| {
            w.mcp_mask(
                state.tools.iter().map(String::as_str),
                !state.tools.is_empty(),
            )
        })
}

impl PolicyMaps {
    /// The kernel entry for `state`: the live slot's mask from the live policy; the other
    /// slot is written again (from the next policy) before any switch to it.
    pub(super) fn instance_value(&self, state: &InstanceState) -> McpInstance {
        let live = mask(self.live.as_ref(), state);
        let mut active = [live; 2];
        active[(1 - self.active) as usize] = live;
        McpInstance {
            workload_id: state.workload_id,
            seq: state.seq,
            active,
        }
    }

    /// Writes (or rewrites) instance `cgroup_id`: its calls in flight use `tools`. When
    /// this returns Ok, every later decision for that cgroup sees the new tools.
    ///
    /// # Errors
    /// The map update failed (the map is full); the caller must not forward the call as
    /// if its tools were active.
    pub fn set_instance(
        &mut self,
        cgroup_id: u64,
        workload_id: u32,
        seq: u32,
        tools: Vec<String>,
    ) -> Result<(), MapsError> {
        let state = InstanceState {
            workload_id,
            seq,
            tools,
        };
        let value = self.instance_value(&state);
        self.instances
            .insert(cgroup_id, value, 0)
            .map_err(map_err("MCP_INSTANCES_1"))?;
        self.mcp.insert(cgroup_id, state);
        Ok(())
    }

    /// Forgets instance `cgroup_id`: its processes have no tool active from now on.
    pub fn remove_instance(&mut self, cgroup_id: u64) {
        self.mcp.remove(&cgroup_id);
        let _ = self.instances.remove(&cgroup_id);
    }

    /// Instances the daemon keeps in the kernel.
    #[must_use]
    pub fn instance_count(&self) -> usize {
        self.mcp.len()
    }

    /// During `install`: every instance's mask for `slot` under the incoming policy.
    pub(super) fn write_instances_for(
        &mut self,
        compiled: &Compiled,
        slot: u32,
    ) -> Result<(), MapsError> {
        let states: Vec<(u64, InstanceState)> =
            self.mcp.iter().map(|(k, v)| (*k, v.clone())).collect();
        for (id, state) in states {
            let mut value = self.instance_value(&state);
            value.active[slot as usize & 1] = mask(Some(compiled), &state);
            self.instances
                .insert(id, value, 0)
                .map_err(map_err("MCP_INSTANCES_1"))?;
        }
        Ok(())
    }

    /// Self-repair: entries equal to what the daemon keeps, none extra (an entry no
    /// relay stands behind, for example one an earlier daemon left, is removed: its
    /// tools are inactive). Returns how many were repaired.
    pub(super) fn repair_instances(&mut self) -> u64 {
        let kernel: std::collections::HashMap<u64, McpInstance> =
            self.instances.iter().filter_map(Result::ok).collect();
        let mut n = 0;
        for id in kernel.keys() {
            if !self.mcp.contains_key(id) && self.instances.remove(id).is_ok() {
                n += 1;
            }
        }
        let states: Vec<(u64, InstanceState)> =
            self.mcp.iter().map(|(k, v)| (*k, v.clone())).collect();
        for (id, state) in states {
            let want = self.instance_value(&state);
            if kernel.get(&id) != Some(&want) && self.instances.insert(id, want, 0).is_ok() {
                n += 1;
            }
        }
        n
    }
}
