//! Sticky identity: a task keeps the workload it ran in, wherever it moves.
//!
//! The socket hooks find a task's workload by its cgroup's ancestry; a root process can
//! write its pid into another cgroup's `cgroup.procs` (or be created in one with
//! `CLONE_INTO_CGROUP`) and would then be judged by where it went. So every task of a
//! guarded workload gets a home (`HOMES_1`, by thread id): at creation from its creator
//! (`task:task_newtask`, which runs in the creator), at a move into a workload
//! (`cgroup:cgroup_attach_task`), and by the daemon for tasks that predate it. It goes
//! at exit (`sched:sched_process_exit`), so a reused thread id never finds a stale one.
//! A task outside its home cgroup is judged by its home's workload, wherever it went
//! (into another workload too: a task keeps its first workload for life; see [`judge`]).
//! Tracepoints load where BPF LSM and fentry are refused; their records' fields used
//! here have the same offsets on every kernel this project supports.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, generated::bpf_get_current_ancestor_cgroup_id},
    macros::tracepoint,
    programs::TracePointContext,
};
use mcp_guard_common::{
    strict_key, CgroupKey, Home, WorkloadInfo, HOOK_CGROUP_ATTACH, MAX_CGROUP_LEVEL, MODE_AUDIT,
    REASON_LEFT_WORKLOAD, VERDICT_AUDITED, VERDICT_CONTAINED,
};

use crate::{
    maps::{CGROUPS_1, CONFIG_1, HOMES_1},
    report::{self, Flow, Origin},
};

/// `task_newtask`: `pid_t pid` (the new task's id) right after the common fields.
const OFF_NEWTASK_PID: usize = 8;
/// `cgroup_attach_task`: `int dst_root; int dst_level; u64 dst_id; int pid; ...`.
const OFF_ATTACH_ROOT: usize = 8;
const OFF_ATTACH_LEVEL: usize = 12;
const OFF_ATTACH_ID: usize = 16;
const OFF_ATTACH_PID: usize = 24;

#[inline(always)]
fn ancestor(level: u32) -> u64 {
    // SAFETY: a plain helper call; 0 above the task's own level.
    unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) }
}

/// The calling task's home: by thread, then by process (a move of a whole process
/// records its thread group id).
#[inline(always)]
pub(crate) fn own_home() -> Option<&'static Home> {
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: entries are replaced whole; Home is plain data.
    unsafe {
        HOMES_1
            .get(&(pid_tgid as u32))
            .or_else(|| HOMES_1.get(&((pid_tgid >> 32) as u32)))
    }
}

/// Whether the calling task runs in cgroup `id` or below it.
#[inline(always)]
fn inside(id: u64) -> bool {
    let mut level = 0;
    while level < MAX_CGROUP_LEVEL {
        let a = ancestor(level);
        if a == 0 {
            return false;
        }
        if a == id {
            return true;
        }
        level += 1;
    }
    false
}

#[inline(always)]
fn registration(cgroup_id: u64, slot: u32) -> Option<&'static WorkloadInfo> {
    let key = CgroupKey {
        cgroup_id,
        slot,
        _pad: 0,
    };
    // SAFETY: entries are replaced whole by user space; WorkloadInfo is plain data.
    unsafe { CGROUPS_1.get(&key) }
}

/// The workload the calling task is judged by in `slot`. A task in its home cgroup, or
/// without a home: its cgroup's or the nearest ancestor's that has a policy (walked at
/// decision time, so a child cgroup created after the policy was loaded, and any
/// process forked into it, is covered with no update at all). For a task outside its home
/// cgroup, its home's (the home cgroup's registration, or the workload's strict one
/// once that cgroup is gone); otherwise its cgroup's nearest registered ancestor's.
/// `None`: untouched. Every result points into `CGROUPS_1`, so the paths after the
/// call merge in the verifier (pointers into two maps would double them).
// A real BPF subprogram, called from the socket hooks' retry loops.
#[inline(never)]
pub(crate) fn judge(slot: u32) -> Option<&'static WorkloadInfo> {
    if let Some(home) = own_home() {
        if !inside(home.cgroup_id) {
            return match registration(home.cgroup_id, slot) {
                Some(w) => Some(w),
                None => registration(strict_key(home.workload_id), slot),
            };
        }
    }
    crate::decide::nearest_workload(slot, |level| ancestor(level as u32))
}

/// The level of the calling task's nearest ancestor cgroup registered in `slot`, or -1.
/// Deepest first, returning at the first found: a walk that carried "found so far"
/// through 32 levels made 6.1's verifier explore every combination (over its
/// million-instruction budget).
// A real BPF subprogram: called twice (both policy slots).
#[inline(never)]
fn workload_level(slot: u32) -> i64 {
    let mut depth = 0;
    while depth < MAX_CGROUP_LEVEL {
        if ancestor(depth) == 0 {
            break;
        }
        depth += 1;
    }
    let mut i = 0;
    while i < MAX_CGROUP_LEVEL {
        if i >= depth {
            break;
        }
        let level = depth - 1 - i;
        if registration(ancestor(level), slot).is_some() {
            return i64::from(level);
        }
        i += 1;
    }
    -1
}

/// The home the calling task gives a task it creates (or has as a task just moved into
/// a workload): its own home, else the workload cgroup it runs in (either policy slot:
/// a reload may be switching them).
#[inline(always)]
fn home_of_current() -> Option<Home> {
    if let Some(h) = own_home() {
        return Some(*h);
    }
    let cfg = CONFIG_1.get(0)?;
    // SAFETY: a field user space rewrites in place.
    let live = unsafe { core::ptr::read_volatile(&raw const cfg.slot) } & 1;
    let mut n = 0;
    while n < 2 {
        let slot = if n == 0 { live } else { live ^ 1 };
        let level = workload_level(slot);
        if level >= 0 {
            let id = ancestor(level as u32);
            let w = registration(id, slot)?;
            return Some(Home {
                cgroup_id: id,
                level: level as u32,
                workload_id: w.workload_id,
            });
        }
        n += 1;
    }
    None
}

/// A task is being created (a process or a thread, by `fork`, `clone`, `clone3` with
/// `CLONE_INTO_CGROUP`, `vfork`, io_uring workers): it inherits its creator's home.
#[tracepoint]
pub fn mcpg_task_newtask(ctx: TracePointContext) -> u32 {
    // SAFETY: a read of the record at the offset its format gives.
    let Ok(pid) = (unsafe { ctx.read_at::<i32>(OFF_NEWTASK_PID) }) else {
        return 0;
    };
    if let Some(home) = home_of_current() {
        let _ = HOMES_1.insert(&(pid as u32), &home, 0);
    }
    0
}

/// A task exits: its id may be reused by anyone.
#[tracepoint]
pub fn mcpg_process_exit(_ctx: TracePointContext) -> u32 {
    let tid = bpf_get_current_pid_tgid() as u32;
    let _ = HOMES_1.remove(&tid);
    0
}

/// A task (or a whole process, by its leader) moved to another cgroup; this runs in the
/// task that wrote `cgroup.procs`, after the move. A homed task that left its home is
/// reported; a task without a home that moved into a workload gets one.
#[tracepoint]
pub fn mcpg_cgroup_attach(ctx: TracePointContext) -> u32 {
    let _ = attach(&ctx);
    0
}

#[inline(always)]
fn attach(ctx: &TracePointContext) -> Option<()> {
    // SAFETY (these reads): the record at the offsets its format gives.
    let root = unsafe { ctx.read_at::<i32>(OFF_ATTACH_ROOT) }.ok()?;
    if root != 0 {
        // A cgroup v1 hierarchy of a hybrid system.
        return None;
    }
    let level = unsafe { ctx.read_at::<i32>(OFF_ATTACH_LEVEL) }.ok()? as u32;
    let dst = unsafe { ctx.read_at::<u64>(OFF_ATTACH_ID) }.ok()?;
    let pid = unsafe { ctx.read_at::<i32>(OFF_ATTACH_PID) }.ok()? as u32;
    let writer = (bpf_get_current_pid_tgid() >> 32) as u32;
    let cfg = CONFIG_1.get(0)?;
    // SAFETY: fields user space rewrites in place.
    let slot = unsafe { core::ptr::read_volatile(&raw const cfg.slot) } & 1;
    let generation = unsafe { core::ptr::read_volatile(&raw const cfg.generation) };
    // SAFETY: entries are replaced whole; Home is plain data.
    if let Some(home) = unsafe { HOMES_1.get(&pid) } {
        // A task that moved itself is where it went: its ancestry says whether that is
        // inside its home. Moved by another, only the destination's level and id are
        // known: a cgroup no deeper than the home that is not the home is outside it.
        let left = if writer == pid {
            !inside(home.cgroup_id)
        } else {
            level <= home.level && dst != home.cgroup_id
        };
        if left {
            let mode = match registration(home.cgroup_id, slot) {
                Some(w) => w.mode,
                None => registration(strict_key(home.workload_id), slot).map_or(0, |w| w.mode),
            };
            let who = WorkloadInfo {
                workload_id: home.workload_id,
                default: 0,
                mode,
                flags: 0,
                _pad: 0,
            };
            report::emit(
                &Flow {
                    verdict: if mode == MODE_AUDIT {
                        VERDICT_AUDITED
                    } else {
                        VERDICT_CONTAINED
                    },
                    ..Flow::refused_by(
                        HOOK_CGROUP_ATTACH,
                        &who,
                        u64::from(REASON_LEFT_WORKLOAD) << 32,
                        generation,
                        cfg.rate_limit_per_sec,
                    )
                },
                &Origin::task(0, [0; 16], 0),
            );
        }
        return Some(());
    }
    let home = if writer == pid {
        home_of_current()?
    } else {
        let w = registration(dst, slot)?;
        Home {
            cgroup_id: dst,
            level,
            workload_id: w.workload_id,
        }
    };
    let _ = HOMES_1.insert(&pid, &home, 0);
    Some(())
}
