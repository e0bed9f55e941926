//! Registration at creation: the `cgroup:cgroup_mkdir` tracepoint runs in the `mkdir`
//! of every new cgroup, before it returns, so a workload's cgroup that is removed and
//! created again (a unit restart, a new pod) is registered before any process can join
//! it. The daemon compiles each workload's cgroup into `REGISTER_1` keys: its exact
//! path, or for a pattern its fixed parent with any child (`parent/*`) or with a child
//! name prefix (`parent/prefix*`). Patterns of other shapes, and paths longer than
//! `CGROUP_PATH_LEN`, are left to the daemon's scan.
//!
//! `cgroup:cgroup_rmdir` removes the registrations of a cgroup that is gone (cgroup ids
//! are never reused), so short-lived cgroups leave nothing behind.

use aya_ebpf::{
    helpers::generated::bpf_probe_read_kernel_str,
    macros::{map, tracepoint},
    maps::PerCpuArray,
    programs::TracePointContext,
    EbpfContext,
};
use mcp_guard_common::{
    CgroupKey, MkdirKey, MkdirMatch, WorkloadInfo, CGROUP_PATH_LEN, MKDIR_CHILD, MKDIR_EXACT,
    MKDIR_PREFIX, MKDIR_PREFIX_MAX,
};

use crate::maps::{CGROUPS_1, REGISTER_1};

/// Offsets in the `cgroup_mkdir`/`cgroup_rmdir` record
/// (/sys/kernel/tracing/events/cgroup/cgroup_mkdir/format): `int root; int level;
/// u64 id; __data_loc char[] path`.
const OFF_ROOT: usize = 8;
const OFF_ID: usize = 16;
const OFF_PATH: usize = 24;
/// The unified (cgroup v2) hierarchy's id; v1 hierarchies of a hybrid system have others.
const DEFAULT_HIERARCHY: i32 = 0;

/// The key being built, off the stack (264 bytes), and the position of the path's last
/// '/'. That position goes through map memory on purpose: the verifier then knows it
/// only as a bounded number, instead of following every value it could have through
/// the loops after (which exceeds its complexity limit).
#[repr(C)]
struct Scratch {
    key: MkdirKey,
    last: u64,
    len: u64,
}

#[map]
static MKDIR_SCRATCH_1: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// Best match per slot: (config order, registration); `u32::MAX` for none.
struct Best {
    order: [u32; 2],
    info: [WorkloadInfo; 2],
}

#[inline(always)]
fn consider(key: &mut MkdirKey, kind: u32, best: &mut Best) {
    key.kind = kind;
    let mut slot = 0;
    while slot < 2 {
        key.slot = slot as u32;
        // SAFETY: values are replaced whole by user space; plain data.
        if let Some(m) = unsafe { REGISTER_1.get(&*key) } {
            let m: &MkdirMatch = m;
            if m.order < best.order[slot] {
                best.order[slot] = m.order;
                best.info[slot] = m.info;
            }
        }
        slot += 1;
    }
}

#[tracepoint]
pub fn mcpg_cgroup_mkdir(ctx: TracePointContext) -> u32 {
    let _ = register(&ctx);
    0
}

#[tracepoint]
pub fn mcpg_cgroup_rmdir(ctx: TracePointContext) -> u32 {
    // SAFETY: reads of the tracepoint record at the offsets its format gives.
    let Ok(root) = (unsafe { ctx.read_at::<i32>(OFF_ROOT) }) else {
        return 0;
    };
    let Ok(id) = (unsafe { ctx.read_at::<u64>(OFF_ID) }) else {
        return 0;
    };
    if root == DEFAULT_HIERARCHY {
        for slot in 0..2 {
            let _ = CGROUPS_1.remove(&CgroupKey {
                cgroup_id: id,
                slot,
                _pad: 0,
            });
        }
    }
    0
}

/// Zeroes the key's path (constant stores: nothing for the verifier to branch on).
#[inline(always)]
fn clear(key: &mut MkdirKey) {
    let words = key.path.as_mut_ptr().cast::<u64>();
    let mut i = 0;
    while i < CGROUP_PATH_LEN / 8 {
        // SAFETY: within the 256-byte array, which is 8-byte aligned in the key.
        unsafe { core::ptr::write_volatile(words.add(i), 0) };
        i += 1;
    }
}

/// Copies the first `count` bytes of the record's path into the key, NUL after them.
/// Returns the helper's result (bytes copied with the NUL, or a negative error).
#[inline(always)]
fn copy_path(key: &mut MkdirKey, src: *const u8, count: usize) -> i64 {
    // SAFETY: the helper bounds the copy by the size, which is 1..=CGROUP_PATH_LEN.
    unsafe {
        bpf_probe_read_kernel_str(
            key.path.as_mut_ptr().cast(),
            ((count & (CGROUP_PATH_LEN - 1)) + 1) as u32,
            src.cast(),
        )
    }
}

#[inline(always)]
fn register(ctx: &TracePointContext) -> Option<()> {
    // SAFETY: reads of the tracepoint record at the offsets its format gives.
    let root = unsafe { ctx.read_at::<i32>(OFF_ROOT) }.ok()?;
    if root != DEFAULT_HIERARCHY {
        return None;
    }
    let id = unsafe { ctx.read_at::<u64>(OFF_ID) }.ok()?;
    let loc = unsafe { ctx.read_at::<u32>(OFF_PATH) }.ok()?;
    // SAFETY: the record holds the string at this offset from its start.
    let src = unsafe { ctx.as_ptr().cast::<u8>().add((loc & 0xffff) as usize) };
    let scratch = MKDIR_SCRATCH_1.get_ptr_mut(0)?;
    // SAFETY: this CPU's scratch slot; programs do not migrate while running.
    let scratch = unsafe { &mut *scratch };
    clear(&mut scratch.key);
    let n = copy_path(&mut scratch.key, src, CGROUP_PATH_LEN - 1);
    // n counts the NUL; a path that filled the buffer may have been cut: the scan's.
    if n <= 1 || n as usize >= CGROUP_PATH_LEN {
        return None;
    }
    let mut best = Best {
        order: [u32::MAX; 2],
        info: [WorkloadInfo {
            workload_id: 0,
            default: 0,
            mode: 0,
            flags: 0,
            _pad: 0,
        }; 2],
    };
    consider(&mut scratch.key, MKDIR_EXACT, &mut best);

    // The last '/' splits the parent from the new cgroup's name. Length and position
    // go through map memory (see `Scratch`).
    // SAFETY (this block): plain stores and loads in this CPU's scratch value.
    unsafe {
        core::ptr::write_volatile(&raw mut scratch.last, 0);
        core::ptr::write_volatile(&raw mut scratch.len, (n - 1) as u64);
    }
    let len = (n - 1) as usize;
    let mut i = 0usize;
    while i < CGROUP_PATH_LEN {
        if i >= len {
            break;
        }
        if scratch.key.path[i] == b'/' {
            unsafe { core::ptr::write_volatile(&raw mut scratch.last, i as u64) };
        }
        i += 1;
    }
    let last = unsafe { core::ptr::read_volatile(&raw const scratch.last) } as usize;
    let len = unsafe { core::ptr::read_volatile(&raw const scratch.len) } as usize;
    if last >= len || len >= CGROUP_PATH_LEN {
        return None;
    }
    let name_len = len - last - 1;
    let longest = if name_len < MKDIR_PREFIX_MAX {
        name_len
    } else {
        MKDIR_PREFIX_MAX
    };
    // `parent/prefix` keys, shortest first: each copy overwrites the previous one and
    // its NUL, so the key is exact without clearing in between.
    clear(&mut scratch.key);
    let mut plen = 1;
    while plen <= MKDIR_PREFIX_MAX {
        if plen > longest {
            break;
        }
        if copy_path(&mut scratch.key, src, last + 1 + plen) < 0 {
            return None;
        }
        consider(&mut scratch.key, MKDIR_PREFIX, &mut best);
        plen += 1;
    }
    // The parent alone: `parent/*`.
    clear(&mut scratch.key);
    if copy_path(&mut scratch.key, src, last) < 0 {
        return None;
    }
    consider(&mut scratch.key, MKDIR_CHILD, &mut best);

    let mut slot = 0;
    while slot < 2 {
        if best.order[slot] != u32::MAX {
            let _ = CGROUPS_1.insert(
                &CgroupKey {
                    cgroup_id: id,
                    slot: slot as u32,
                    _pad: 0,
                },
                &best.info[slot],
                0,
            );
        }
        slot += 1;
    }
    Some(())
}
