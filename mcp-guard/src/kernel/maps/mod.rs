//! Writing compiled policy into the kernel maps, and reading the counters back.
//!
//! Policy lives in two slots. A new policy is written whole into the inactive slot and
//! then made live by one update of `CONFIG_1`: a program run reads the slot once, so no
//! decision ever sees half of a policy. The old slot is cleared only at the next switch,
//! long after any program run that could still be reading it has finished.

use std::{collections::BTreeMap, path::Path};

use aya::maps::{lpm_trie::Key, Array, HashMap, LpmTrie, Map, MapData, MapError};
use mcp_guard_common::{
    scope, CgroupKey, Config as KConfig, ExactKey, LpmData, McpInstance, MkdirKey, MkdirMatch,
    PolicyEntry, WorkloadInfo, CGROUP_PATH_LEN,
};
use tracing::{info, warn};

use crate::{host::cgroup, policy::Compiled};

mod batch;
mod counters;
mod homes;
mod mcp;
mod pods;
mod registrations;
mod repair;
mod unix;

pub use counters::{CounterMaps, Counters};
pub use homes::{Homes, Pass as HomesPass};

use pods::{live_pods, UNSELECTED_CLAIM};
pub use pods::{PodEntry, PodOwner};

#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    #[error("map {0} is missing from the eBPF object")]
    Missing(&'static str),
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
}

fn map_err(name: &'static str) -> impl Fn(MapError) -> MapsError {
    move |source| MapsError::Map { name, source }
}

/// Every existing cgroup a workload names (a path or a pattern), or an identified pod
/// lives in, mapped to its workload. Pods come first (they are more specific than the
/// pending patterns that also match them); a cgroup named by two workloads belongs to
/// the first in the config.
fn resolve(compiled: &Compiled, pods: &[PodEntry], mount: &Path) -> BTreeMap<u64, u32> {
    let mut out = BTreeMap::new();
    let named = live_pods(compiled, pods).chain(
        compiled
            .workloads
            .iter()
            .filter_map(|w| Some((w.id, w.cgroup.as_deref()?))),
    );
    for (wid, c) in named {
        for id in cgroup::resolve(mount, c) {
            out.entry(id).or_insert(wid);
        }
    }
    out.retain(|_, w| *w != UNSELECTED_CLAIM);
    out
}

/// Each workload's kernel entry, by workload id (one pass: registering many cgroups of
/// many workloads looks each up in constant time).
fn infos_of(compiled: &Compiled) -> std::collections::HashMap<u32, WorkloadInfo> {
    compiled.workloads.iter().map(|w| (w.id, info(w))).collect()
}

fn info(w: &crate::policy::CompiledWorkload) -> WorkloadInfo {
    WorkloadInfo {
        workload_id: w.id,
        default: w.default,
        mode: w.mode,
        flags: w.flags,
        _pad: 0,
    }
}

/// The kernel's key of a compiled entry in one policy slot.
trait SlotKey {
    type Key;
    fn key(&self, slot: u32) -> Self::Key;
}

impl SlotKey for crate::policy::LpmEntry {
    type Key = Key<LpmData>;
    fn key(&self, slot: u32) -> Key<LpmData> {
        Key::new(
            32 + u32::from(self.plen),
            LpmData {
                scope: scope(self.scope, slot),
                addr_be: self.addr,
            },
        )
    }
}

impl SlotKey for crate::policy::ExactEntry {
    type Key = ExactKey;
    fn key(&self, slot: u32) -> ExactKey {
        ExactKey {
            scope: scope(self.scope, slot),
            addr_be: self.addr,
        }
    }
}

/// The two clocks learned expiries are converted between: Unix time (DNS answers, the
/// learned file) and `CLOCK_BOOTTIME` (`bpf_ktime_get_boot_ns`, what the programs compare).
pub struct Clock {
    unix_ns: u128,
    boot_ns: u64,
}

impl Clock {
    #[must_use]
    pub fn now() -> Self {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime with a valid out struct.
        unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &raw mut ts) };
        let boot_ns = ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64;
        let unix_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        Self { unix_ns, boot_ns }
    }

    /// The `CLOCK_BOOTTIME` nanosecond of Unix second `unix` (now, if it is past).
    #[must_use]
    pub fn boot_ns_at(&self, unix: u64) -> u64 {
        let ahead = (u128::from(unix) * 1_000_000_000).saturating_sub(self.unix_ns);
        self.boot_ns
            .saturating_add(u64::try_from(ahead).unwrap_or(u64::MAX))
    }
}

/// One `REGISTER_1` entry.
pub type RegisterEntry = (MkdirKey, MkdirMatch);

/// What the `cgroup:cgroup_mkdir` program registers new cgroups as, for one slot: one
/// `REGISTER_1` entry per workload whose cgroup it can decide. Also returns the
/// workloads it cannot (name, why), which only the scan registers.
#[must_use]
pub fn register_entries(
    compiled: &Compiled,
    root: &str,
    slot: u32,
) -> (Vec<RegisterEntry>, Vec<(String, String)>) {
    let mut entries = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut scan_only = Vec::new();
    for (order, w) in compiled.workloads.iter().enumerate() {
        let Some(c) = w.cgroup.as_deref() else {
            continue;
        };
        match cgroup::mkdir_key(root, c) {
            Ok((kind, path)) => {
                let mut key = MkdirKey {
                    slot,
                    kind,
                    path: [0; CGROUP_PATH_LEN],
                };
                key.path[..path.len()].copy_from_slice(path.as_bytes());
                // The first workload to name a cgroup keeps it (as in the scan).
                if !seen.insert(key) {
                    continue;
                }
                entries.push((
                    key,
                    MkdirMatch {
                        info: info(w),
                        order: order as u32,
                        _pad: 0,
                    },
                ));
            }
            Err(why) => scan_only.push((w.name.clone(), why)),
        }
    }
    (entries, scan_only)
}

/// What one slot currently holds, so it can be cleared exactly.
#[derive(Default)]
struct SlotContents {
    lpm: Vec<Key<LpmData>>,
    exact: Vec<ExactKey>,
    /// Exact keys that carry an expiry in `EXPIRY_1`.
    expiry: Vec<ExactKey>,
    cgroups: Vec<CgroupKey>,
    register: Vec<MkdirKey>,
    unix: Vec<Key<mcp_guard_common::UnixLpmData>>,
}

pub struct PolicyMaps {
    config: Array<MapData, KConfig>,
    cgroups: HashMap<MapData, CgroupKey, WorkloadInfo>,
    lpm: LpmTrie<MapData, LpmData, PolicyEntry>,
    unix: unix::UnixMap,
    exact: HashMap<MapData, ExactKey, PolicyEntry>,
    /// Expiry (`CLOCK_BOOTTIME` ns) of exact entries learned from DNS.
    expiry: HashMap<MapData, ExactKey, u64>,
    /// Registration at cgroup creation (`cgroup:cgroup_mkdir`).
    register: HashMap<MapData, MkdirKey, MkdirMatch>,
    sources: HashMap<MapData, u32, u64>,
    /// Registration epoch: bumped after every change of a cgroup registration, so the
    /// cgroup_skb backstop decides again what it cached for a socket.
    epoch: Array<MapData, u32>,
    /// What `sources` holds now.
    source_entries: BTreeMap<u32, u64>,
    slots: [SlotContents; 2],
    active: u32,
    generation: u32,
    rate_limit: u32,
    /// cgroup id -> workload id, as registered in the active slot.
    registered: BTreeMap<u64, u32>,
    /// The policy the live slot holds (what [`Self::repair`] restores).
    live: Option<Compiled>,
    /// The registration-at-creation entries of the live slot.
    live_register: Vec<RegisterEntry>,
    /// Self-repair checks made (the whole maps are read every fifth).
    checks: u64,
    /// Workloads of the installed policy whose cgroups only the scan registers (name, why).
    scan_only: Vec<(String, String)>,
    /// Finds workload cgroups for the 100 ms rescan.
    scanner: cgroup::Scanner,
    /// `exec --mcp` instances (`MCP_INSTANCES_1`) and what the daemon keeps of them.
    instances: HashMap<MapData, u64, McpInstance>,
    mcp: BTreeMap<u64, mcp::InstanceState>,
    /// An incomplete scan was reported (once until a scan completes again).
    warned_incomplete: bool,
    /// Pod cgroups identified through the CRI.
    pods: Vec<PodEntry>,
    /// Bumped whenever `pods` changes (the scanner plans again).
    pods_version: u32,
}

impl PolicyMaps {
    /// Takes the maps out of a loaded object.
    ///
    /// # Errors
    /// A map is missing or has an unexpected type.
    pub fn take(ebpf: &mut aya::Ebpf) -> Result<Self, MapsError> {
        fn take(ebpf: &mut aya::Ebpf, name: &'static str) -> Result<Map, MapsError> {
            ebpf.take_map(name).ok_or(MapsError::Missing(name))
        }
        let mut instances: HashMap<MapData, u64, McpInstance> =
            HashMap::try_from(take(ebpf, "MCP_INSTANCES_1")?)
                .map_err(map_err("MCP_INSTANCES_1"))?;
        // The instance map is pinned: entries an earlier daemon left (a call in flight at
        // a kill -9 among them) have no relay behind them yet. Cleared, every instance has
        // no tool active until its relay registers it again (fail closed).
        let stale: Vec<u64> = instances.keys().filter_map(Result::ok).collect();
        for k in stale {
            let _ = instances.remove(&k);
        }
        Ok(Self {
            config: Array::try_from(take(ebpf, "CONFIG_1")?).map_err(map_err("CONFIG_1"))?,
            cgroups: HashMap::try_from(take(ebpf, "CGROUPS_1")?).map_err(map_err("CGROUPS_1"))?,
            lpm: LpmTrie::try_from(take(ebpf, "POLICY_LPM_1")?).map_err(map_err("POLICY_LPM_1"))?,
            unix: unix::UnixMap::take(ebpf)?,
            exact: HashMap::try_from(take(ebpf, "POLICY_EXACT_1")?)
                .map_err(map_err("POLICY_EXACT_1"))?,
            expiry: HashMap::try_from(take(ebpf, "EXPIRY_1")?).map_err(map_err("EXPIRY_1"))?,
            register: HashMap::try_from(take(ebpf, "REGISTER_1")?)
                .map_err(map_err("REGISTER_1"))?,
            sources: HashMap::try_from(take(ebpf, "IFACES_1")?).map_err(map_err("IFACES_1"))?,
            epoch: Array::try_from(take(ebpf, "EPOCH_1")?).map_err(map_err("EPOCH_1"))?,
            source_entries: BTreeMap::new(),
            slots: [SlotContents::default(), SlotContents::default()],
            active: 0,
            generation: 0,
            rate_limit: 0,
            registered: BTreeMap::new(),
            live: None,
            live_register: Vec::new(),
            checks: 0,
            scan_only: Vec::new(),
            scanner: cgroup::Scanner::default(),
            warned_incomplete: false,
            pods: Vec::new(),
            pods_version: 0,
            instances,
            mcp: BTreeMap::new(),
        })
    }

    #[must_use]
    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// Workloads of the installed policy whose cgroups the kernel cannot register at
    /// creation (name, why): only the scan does, up to 100 ms later.
    #[must_use]
    pub fn scan_only(&self) -> &[(String, String)] {
        &self.scan_only
    }

    /// Takes over maps pinned by an earlier daemon: which slot is live, the generation, and
    /// which keys each slot holds, read back from the maps themselves.
    ///
    /// # Errors
    /// A map read failed.
    /// Returns the object hash the previous daemon recorded (0 for fresh maps).
    pub fn adopt(&mut self) -> Result<u32, MapsError> {
        let cfg = self.config.get(&0, 0).map_err(map_err("CONFIG_1"))?;
        self.active = cfg.slot & 1;
        self.generation = cfg.generation;
        self.rate_limit = cfg.rate_limit_per_sec;
        let mut slots = [SlotContents::default(), SlotContents::default()];
        for k in self.lpm.keys() {
            let k = k.map_err(map_err("POLICY_LPM_1"))?;
            slots[(k.data().scope & 1) as usize].lpm.push(k);
        }
        for k in self.exact.keys() {
            let k = k.map_err(map_err("POLICY_EXACT_1"))?;
            slots[(k.scope & 1) as usize].exact.push(k);
        }
        for k in self.expiry.keys() {
            let k = k.map_err(map_err("EXPIRY_1"))?;
            slots[(k.scope & 1) as usize].expiry.push(k);
        }
        for k in self.register.keys() {
            let k = k.map_err(map_err("REGISTER_1"))?;
            slots[(k.slot & 1) as usize].register.push(k);
        }
        let [unix0, unix1] = self.unix.keys_by_slot()?;
        slots[0].unix = unix0;
        slots[1].unix = unix1;
        let mut registered = BTreeMap::new();
        for item in self.cgroups.iter() {
            let (k, v) = item.map_err(map_err("CGROUPS_1"))?;
            if k.slot == self.active {
                registered.insert(k.cgroup_id, v.workload_id);
            }
            slots[(k.slot & 1) as usize].cgroups.push(k);
        }
        self.slots = slots;
        self.registered = registered;
        Ok(cfg.object_hash)
    }

    /// Writes `compiled` into the inactive slot and switches to it in one update.
    ///
    /// # Errors
    /// A map update failed (for example a map is full); the active policy is unchanged.
    pub fn install(
        &mut self,
        compiled: &Compiled,
        mount: &Path,
        rate_limit: u32,
    ) -> Result<(), MapsError> {
        let slot = 1 - self.active;
        // Announce that the inactive slot is about to change: a program that read it
        // before the last switch and is still deciding sees the generation move and
        // decides again on the live slot (see mcp-guard-ebpf/src/decide.rs).
        self.generation = self.generation.wrapping_add(1);
        let announce = KConfig {
            slot: self.active,
            generation: self.generation,
            rate_limit_per_sec: self.rate_limit,
            object_hash: crate::kernel::loader::object_hash(),
        };
        self.config
            .set(0, announce, 0)
            .map_err(map_err("CONFIG_1"))?;
        // Rewrite the slot in place: entries the new policy keeps are overwritten (each
        // update is atomic), only keys it drops are deleted. A reader still on this slot
        // never finds an entry missing that both policies have.
        let old = std::mem::take(&mut self.slots[slot as usize]);
        let mut contents = SlotContents::default();
        // Registration at creation for this slot first, then the scan: a cgroup created
        // from here on is registered by the kernel, one created before is found below.
        let (register, scan_only) = register_entries(compiled, &cgroup::kernel_root(mount), slot);
        let register_result = self.write_register(&register, &mut contents);
        let mut registered = self.scan(compiled, self.generation.wrapping_add(1), mount);
        registered.retain(|_, w| *w != UNSELECTED_CLAIM);
        let result = register_result
            .and_then(|()| self.write_slot(compiled, slot, &registered, &mut contents));
        self.remove_stale(&old, &contents);
        self.slots[slot as usize] = contents;
        if result.is_err() {
            // The scan was planned for a policy that is not installed.
            self.scanner.forget();
        }
        result?;
        let cfg = KConfig {
            slot,
            generation: self.generation.wrapping_add(1),
            rate_limit_per_sec: rate_limit,
            object_hash: crate::kernel::loader::object_hash(),
        };
        if let Err(e) = self.config.set(0, cfg, 0) {
            self.scanner.forget();
            return Err(map_err("CONFIG_1")(e));
        }
        self.active = slot;
        self.generation = self.generation.wrapping_add(1);
        self.rate_limit = rate_limit;
        self.registered = registered;
        self.live = Some(compiled.clone());
        self.live_register = register;
        self.scan_only = scan_only;
        info!(
            generation = self.generation,
            slot,
            lpm = compiled.lpm.len(),
            exact = compiled.exact.len(),
            "policy installed"
        );
        Ok(())
    }

    /// Writes the registration-at-creation entries of the incoming slot.
    fn write_register(
        &mut self,
        register: &[RegisterEntry],
        contents: &mut SlotContents,
    ) -> Result<(), MapsError> {
        for (k, v) in register {
            self.register
                .insert(k, v, 0)
                .map_err(map_err("REGISTER_1"))?;
            contents.register.push(*k);
        }
        Ok(())
    }

    /// Writes the policy, the registrations and the MCP instances of `compiled` into
    /// `slot` (not live yet), recording every key in `contents`.
    fn write_slot(
        &mut self,
        compiled: &Compiled,
        slot: u32,
        registered: &BTreeMap<u64, u32>,
        contents: &mut SlotContents,
    ) -> Result<(), MapsError> {
        for e in &compiled.lpm {
            let key = e.key(slot);
            self.lpm
                .insert(&key, e.entry, 0)
                .map_err(map_err("POLICY_LPM_1"))?;
            contents.lpm.push(key);
        }
        self.unix.write(&compiled.unix, slot, &mut contents.unix)?;
        let clock = Clock::now();
        for e in &compiled.exact {
            let key = e.key(slot);
            // The expiry first: an entry flagged to expire with no expiry stored is
            // ignored by the programs (fail closed), never allowed for good.
            if let Some(unix) = e.expires_unix {
                self.expiry
                    .insert(key, clock.boot_ns_at(unix), 0)
                    .map_err(map_err("EXPIRY_1"))?;
                contents.expiry.push(key);
            }
            self.exact
                .insert(key, e.entry, 0)
                .map_err(map_err("POLICY_EXACT_1"))?;
            contents.exact.push(key);
        }
        let infos = infos_of(compiled);
        for (&id, &wid) in registered {
            let key = CgroupKey {
                cgroup_id: id,
                slot,
                _pad: 0,
            };
            self.cgroups
                .insert(key, infos[&wid], 0)
                .map_err(map_err("CGROUPS_1"))?;
            contents.cgroups.push(key);
        }
        // What a task that left a workload whose cgroup is gone is judged by.
        for (key, info) in homes::strict_entries(&infos, slot) {
            self.cgroups
                .insert(key, info, 0)
                .map_err(map_err("CGROUPS_1"))?;
            contents.cgroups.push(key);
        }
        // MCP instances: their masks under the incoming policy, before it is live.
        self.write_instances_for(compiled, slot)
    }

    /// Deletes the keys of `old` that `new` does not have.
    fn remove_stale(&mut self, old: &SlotContents, new: &SlotContents) {
        let keep_lpm: std::collections::HashSet<(u32, LpmData)> =
            new.lpm.iter().map(|k| (k.prefix_len(), k.data())).collect();
        for k in old
            .lpm
            .iter()
            .filter(|k| !keep_lpm.contains(&(k.prefix_len(), k.data())))
        {
            let _ = self.lpm.remove(k);
        }
        let keep_exact: std::collections::HashSet<&ExactKey> = new.exact.iter().collect();
        for k in old.exact.iter().filter(|k| !keep_exact.contains(k)) {
            let _ = self.exact.remove(k);
        }
        let keep_expiry: std::collections::HashSet<&ExactKey> = new.expiry.iter().collect();
        for k in old.expiry.iter().filter(|k| !keep_expiry.contains(k)) {
            let _ = self.expiry.remove(k);
        }
        let keep_register: std::collections::HashSet<&MkdirKey> = new.register.iter().collect();
        for k in old.register.iter().filter(|k| !keep_register.contains(k)) {
            let _ = self.register.remove(k);
        }
        self.unix.remove_stale(&old.unix, &new.unix);
        let keep_cgroups: std::collections::HashSet<&CgroupKey> = new.cgroups.iter().collect();
        for k in old.cgroups.iter().filter(|k| !keep_cgroups.contains(k)) {
            let _ = self.cgroups.remove(k);
        }
    }
}
