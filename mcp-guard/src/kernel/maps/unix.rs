//! `UNIX_RULES_1`: the AF_UNIX entries of each policy slot, written and cleared with the
//! rest of the slot (see `PolicyMaps::install`).

use std::collections::HashSet;

use aya::maps::{lpm_trie::Key, LpmTrie, MapData};
use mcp_guard_common::{UnixLpmData, UnixRule};

use super::{map_err, MapsError};
use crate::policy::unix::UnixEntry;

pub(super) struct UnixMap(LpmTrie<MapData, UnixLpmData, UnixRule>);

impl UnixMap {
    pub(super) fn take(ebpf: &mut aya::Ebpf) -> Result<Self, MapsError> {
        let m = ebpf
            .take_map("UNIX_RULES_1")
            .ok_or(MapsError::Missing("UNIX_RULES_1"))?;
        Ok(Self(LpmTrie::try_from(m).map_err(map_err("UNIX_RULES_1"))?))
    }

    /// The keys each slot holds now (after a restart: what the last daemon wrote).
    pub(super) fn keys_by_slot(&self) -> Result<[Vec<Key<UnixLpmData>>; 2], MapsError> {
        let mut slots = [Vec::new(), Vec::new()];
        for k in self.0.keys() {
            let k = k.map_err(map_err("UNIX_RULES_1"))?;
            slots[(k.data().scope & 1) as usize].push(k);
        }
        Ok(slots)
    }

    /// Writes a slot's entries (each update atomic); returns the keys written.
    pub(super) fn write(
        &mut self,
        entries: &[UnixEntry],
        slot: u32,
        written: &mut Vec<Key<UnixLpmData>>,
    ) -> Result<(), MapsError> {
        for e in entries {
            let key = e.key(slot);
            self.0
                .insert(&key, e.rule, 0)
                .map_err(map_err("UNIX_RULES_1"))?;
            written.push(key);
        }
        Ok(())
    }

    /// Removes the keys `old` held that `new` does not.
    pub(super) fn remove_stale(&mut self, old: &[Key<UnixLpmData>], new: &[Key<UnixLpmData>]) {
        let keep: HashSet<(u32, UnixLpmData)> =
            new.iter().map(|k| (k.prefix_len(), k.data())).collect();
        for k in old
            .iter()
            .filter(|k| !keep.contains(&(k.prefix_len(), k.data())))
        {
            let _ = self.0.remove(k);
        }
    }
}
