//! The counter maps, read by whoever serves `/metrics`. They are the kernel's to write
//! and ours only to read, so they are held apart from the policy maps and their owner:
//! a scrape never waits behind a reload.

use aya::maps::{MapData, PerCpuArray, PerCpuHashMap};
use mcp_guard_common::{FlowCounterKey, STAT_COUNT};

use super::{map_err, MapsError};

/// Counters summed over CPUs.
#[derive(Debug, Clone, Default)]
pub struct Counters {
    pub stats: [u64; STAT_COUNT as usize],
    pub flows: Vec<(FlowCounterKey, u64)>,
    /// Accepted connections per workload id (`ACCEPTS_1`).
    pub accepted: Vec<(u32, u64)>,
}

/// `STATS_1` and `FLOWS_1`.
pub struct CounterMaps {
    stats: PerCpuArray<MapData, u64>,
    flows: PerCpuHashMap<MapData, FlowCounterKey, u64>,
    accepts: PerCpuHashMap<MapData, u32, u64>,
}

impl CounterMaps {
    /// Takes the counter maps out of a loaded object.
    ///
    /// # Errors
    /// A map is missing or has an unexpected type.
    pub fn take(ebpf: &mut aya::Ebpf) -> Result<Self, MapsError> {
        let mut take = |name: &'static str| ebpf.take_map(name).ok_or(MapsError::Missing(name));
        Ok(Self {
            stats: PerCpuArray::try_from(take("STATS_1")?).map_err(map_err("STATS_1"))?,
            flows: PerCpuHashMap::try_from(take("FLOWS_1")?).map_err(map_err("FLOWS_1"))?,
            accepts: PerCpuHashMap::try_from(take("ACCEPTS_1")?).map_err(map_err("ACCEPTS_1"))?,
        })
    }

    /// Reads every counter, summed over CPUs.
    ///
    /// # Errors
    /// A map read failed.
    pub fn read(&self) -> Result<Counters, MapsError> {
        let mut c = Counters::default();
        for (i, v) in c.stats.iter_mut().enumerate() {
            let per_cpu = self.stats.get(&(i as u32), 0).map_err(map_err("STATS_1"))?;
            *v = per_cpu.iter().sum();
        }
        for item in self.flows.iter() {
            let (k, per_cpu) = item.map_err(map_err("FLOWS_1"))?;
            c.flows.push((k, per_cpu.iter().sum()));
        }
        for item in self.accepts.iter() {
            let (k, per_cpu) = item.map_err(map_err("ACCEPTS_1"))?;
            c.accepted.push((k, per_cpu.iter().sum()));
        }
        Ok(c)
    }
}
