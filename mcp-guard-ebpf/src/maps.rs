//! Every map the programs use. Names are the kernel's map names: 15 characters at
//! most, versioned so that a layout change gets a new name.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
};
use mcp_guard_common::{
    CgroupKey, Config, ExactKey, FlowCounterKey, Home, LpmData, McpInstance, MkdirKey, MkdirMatch,
    PolicyEntry, RateKey, RateState, SkbVerdict, UnixLpmData, UnixPath, UnixRule, WorkloadInfo,
    EVENTS_RING_BYTES, STAT_COUNT,
};

/// Hash maps are not preallocated: memory follows the policy actually loaded.
const NO_PREALLOC: u32 = 1;

#[map]
pub static CONFIG_1: Array<Config> = Array::with_max_entries(1, 0);

#[map]
pub static CGROUPS_1: HashMap<CgroupKey, WorkloadInfo> =
    HashMap::with_max_entries(131_072, NO_PREALLOC);

/// Prefix rules: baseline, internal ranges, metadata class and workload prefixes.
#[map]
pub static POLICY_LPM_1: LpmTrie<LpmData, PolicyEntry> =
    LpmTrie::with_max_entries(mcp_guard_common::POLICY_LPM_MAX, 0);

/// Exact host rules (/32, /128) of workloads.
#[map]
pub static POLICY_EXACT_1: HashMap<ExactKey, PolicyEntry> =
    HashMap::with_max_entries(mcp_guard_common::POLICY_EXACT_MAX, NO_PREALLOC);

/// Pod mode of the TC classifier: node-side interface index -> registered workload
/// cgroup id of the pod on its other end.
#[map]
pub static IFACES_1: HashMap<u32, u64> = HashMap::with_max_entries(65_536, NO_PREALLOC);

#[map]
pub static STATS_1: PerCpuArray<u64> = PerCpuArray::with_max_entries(STAT_COUNT, 0);

#[map]
pub static FLOWS_1: PerCpuHashMap<FlowCounterKey, u64> =
    PerCpuHashMap::with_max_entries(16_384, NO_PREALLOC);

#[map]
pub static RATE_1: LruHashMap<RateKey, RateState> = LruHashMap::with_max_entries(16_384, 0);

#[map]
pub static EVENTS_1: RingBuf = RingBuf::with_byte_size(EVENTS_RING_BYTES, 0);

/// The cgroup_skb backstop's per-socket cache, by socket cookie (an LRU: a socket pushed
/// out is decided again, never let through undecided).
#[map]
pub static SKB_CACHE_2: LruHashMap<u64, SkbVerdict> = LruHashMap::with_max_entries(65_536, 0);

/// Bumped by the daemon whenever a cgroup registration changes: cached decisions made
/// under another epoch are made again (a socket's cgroup may have become a workload's).
#[map]
pub static EPOCH_1: Array<u32> = Array::with_max_entries(1, 0);

/// Expiry of exact entries that exist only because of learned DNS answers (flag
/// `ENTRY_F_EXPIRES`): `CLOCK_BOOTTIME` nanoseconds, per policy key. Checked at every
/// decision, so an expired answer is refused whether or not the daemon runs.
#[map]
pub static EXPIRY_1: HashMap<ExactKey, u64> = HashMap::with_max_entries(524_288, NO_PREALLOC);

/// What the `cgroup:cgroup_mkdir` program registers a new cgroup as: exact workload
/// paths, `parent/*` and `parent/prefix*` patterns, per policy slot (see `register.rs`).
#[map]
pub static REGISTER_1: HashMap<MkdirKey, MkdirMatch> =
    HashMap::with_max_entries(16_384, NO_PREALLOC);

/// `mcp-guard exec --mcp` instances, by the cgroup id their server runs in: which tool
/// sets are active now (per policy slot) and the call-state sequence events carry.
/// Looked up by the caller's own cgroup only: a process that leaves its instance's
/// cgroup (to the workload's, or a child it made) has no tool active (fail closed).
#[map]
pub static MCP_INSTANCES_1: HashMap<u64, McpInstance> =
    HashMap::with_max_entries(65_536, NO_PREALLOC);

/// Children of listening sockets (accepted TCP connections), by socket cookie: marked by
/// `cgroup/sock_ops` when the kernel reports them passively established, removed when
/// they close. Their packets go to the peer that connected (see `accept.rs`).
#[map]
pub static ACCEPTED_1: HashMap<u64, u8> = HashMap::with_max_entries(262_144, NO_PREALLOC);

/// Accepted connections per workload id (counted at their first packet).
#[map]
pub static ACCEPTS_1: PerCpuHashMap<u32, u64> =
    PerCpuHashMap::with_max_entries(16_384, NO_PREALLOC);

/// Sticky identity: the home of every task of a guarded workload, by thread id (see
/// `home.rs`). Written by the fork, exit and cgroup-attach tracepoints and by the
/// daemon's seeding of tasks that predate it; pinned, so it outlives the daemon.
#[map]
pub static HOMES_1: HashMap<u32, Home> =
    HashMap::with_max_entries(mcp_guard_common::HOMES_MAX, NO_PREALLOC);

/// AF_UNIX destinations per workload and policy slot (see `unix.rs`).
#[map]
pub static UNIX_RULES_1: LpmTrie<UnixLpmData, UnixRule> =
    LpmTrie::with_max_entries(mcp_guard_common::UNIX_RULES_MAX, 0);

/// Paths of refused AF_UNIX destinations, by the hash their events carry: the newest
/// 4,096 (an event whose path was pushed out names its hash only).
#[map]
pub static UNIX_PATHS_1: LruHashMap<u64, UnixPath> = LruHashMap::with_max_entries(4096, 0);

/// Per-CPU space for the key one unix hook run looks up (116 bytes, off the stack).
#[map]
pub static UNIX_SCRATCH_1: PerCpuArray<aya_ebpf::maps::lpm_trie::Key<UnixLpmData>> =
    PerCpuArray::with_max_entries(1, 0);
