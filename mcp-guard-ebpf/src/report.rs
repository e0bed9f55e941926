//! Counting and reporting refused flows: per-CPU counters always, a ring-buffer event
//! subject to the per-destination rate limit. Every refusal lands in exactly one of
//! "submitted", "suppressed" or "lost", so user space can check
//! reported = delivered + suppressed + lost.

use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        generated::{bpf_get_current_cgroup_id, bpf_get_socket_cookie, bpf_ktime_get_ns},
    },
    programs::SockAddrContext,
    EbpfContext,
};
use mcp_guard_common::{
    Event, FlowCounterKey, RateKey, RateState, WorkloadInfo, CLASS_NONE, MODE_AUDIT,
    STAT_COUNTER_OVERFLOW, STAT_EVENTS_LOST, STAT_EVENTS_SUBMITTED, STAT_EVENTS_SUPPRESSED,
    STAT_REPORTED, STAT_UNSTABLE, VERDICT_AUDITED, VERDICT_DENIED,
};

use crate::maps::{EVENTS_1, FLOWS_1, MCP_INSTANCES_1, RATE_1, STATS_1};

const BPF_NOEXIST: u64 = 1;
const NS_PER_SEC: u64 = 1_000_000_000;

pub struct Flow {
    pub hook: u8,
    pub verdict: u8,
    pub workload_id: u32,
    pub reason: u8,
    pub rule_id: u32,
    pub dest_class: u8,
    pub addr: [u8; 16],
    pub port: u16,
    pub proto: u8,
    pub sock_family: u8,
    pub generation: u32,
    pub rate_limit: u32,
}

impl Flow {
    /// A refusal by workload `wl` (audited or denied by its mode) for a decision
    /// `result` (reason << 32 | rule id), with no destination yet: the caller fills in
    /// what it knows of the flow.
    #[inline(always)]
    pub fn refused_by(
        hook: u8,
        wl: &WorkloadInfo,
        result: u64,
        generation: u32,
        rate_limit: u32,
    ) -> Self {
        Self {
            hook,
            verdict: if wl.mode == MODE_AUDIT {
                VERDICT_AUDITED
            } else {
                VERDICT_DENIED
            },
            workload_id: wl.workload_id,
            reason: (result >> 32) as u8,
            rule_id: result as u32,
            dest_class: CLASS_NONE,
            addr: [0; 16],
            port: 0,
            proto: 0,
            sock_family: 0,
            generation,
            rate_limit,
        }
    }
}

#[inline(always)]
pub(crate) fn bump(index: u32) {
    if let Some(p) = STATS_1.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *p += 1 };
    }
}

fn is_v4_mapped(a: &[u8; 16]) -> bool {
    a[0] == 0
        && a[1] == 0
        && a[2] == 0
        && a[3] == 0
        && a[4] == 0
        && a[5] == 0
        && a[6] == 0
        && a[7] == 0
        && a[8] == 0
        && a[9] == 0
        && a[10] == 0xff
        && a[11] == 0xff
}

#[inline(always)]
fn count_flow(f: &Flow) {
    let key = FlowCounterKey {
        workload_id: f.workload_id,
        hook: f.hook,
        verdict: f.verdict,
        reason: f.reason,
        dest_class: f.dest_class,
        family: if f.sock_family == 1 {
            1
        } else if is_v4_mapped(&f.addr) {
            4
        } else {
            6
        },
        proto: f.proto,
        _pad: [0; 2],
    };
    if let Some(p) = FLOWS_1.get_ptr_mut(&key) {
        // SAFETY: per-CPU value.
        unsafe { *p += 1 };
        return;
    }
    if FLOWS_1.insert(&key, &1, BPF_NOEXIST).is_ok() {
        return;
    }
    // Raced with another CPU creating the key: it exists now.
    if let Some(p) = FLOWS_1.get_ptr_mut(&key) {
        // SAFETY: per-CPU value.
        unsafe { *p += 1 };
    } else {
        bump(STAT_COUNTER_OVERFLOW);
    }
}

/// Returns how many earlier events for this key were suppressed, or `None` if this one
/// must be suppressed too.
#[inline(always)]
fn rate_limit(f: &Flow, now: u64) -> Option<u32> {
    if f.rate_limit == 0 {
        return Some(0);
    }
    let key = RateKey {
        workload_id: f.workload_id,
        dport: f.port,
        proto: f.proto,
        _pad: 0,
        daddr_be: f.addr,
    };
    let Some(p) = RATE_1.get_ptr_mut(&key) else {
        let fresh = RateState {
            window_start_ns: now,
            emitted: 1,
            suppressed: 0,
        };
        // If the insert fails the event is still emitted: better one event too many.
        let _ = RATE_1.insert(&key, &fresh, 0);
        return Some(0);
    };
    // SAFETY: a live LRU entry; concurrent CPUs can only blur the carried count, never
    // the per-CPU STATS counters the invariant is checked on.
    let s = unsafe { &mut *p };
    if now.wrapping_sub(s.window_start_ns) >= NS_PER_SEC {
        let carried = s.suppressed;
        s.window_start_ns = now;
        s.emitted = 1;
        s.suppressed = 0;
        return Some(carried);
    }
    if s.emitted < f.rate_limit {
        s.emitted += 1;
        let carried = s.suppressed;
        s.suppressed = 0;
        return Some(carried);
    }
    s.suppressed += 1;
    None
}

/// The policy kept changing during one decision: it failed closed. Counted, never silent.
pub fn unstable() {
    bump(STAT_UNSTABLE);
}

/// Who made a refused flow, as far as the hook can tell: a socket hook runs in the
/// caller's task; a TC classifier may run in softirq context and knows only the packet.
pub struct Origin {
    pub cgroup_id: u64,
    pub socket_cookie: u64,
    pub pid_tgid: u64,
    pub uid_gid: u64,
    pub comm: [u8; 16],
    pub saddr: [u8; 16],
    pub sport: u16,
}

impl Origin {
    /// The calling task (socket hooks, LSM).
    #[inline(always)]
    pub fn task(socket_cookie: u64, saddr: [u8; 16], sport: u16) -> Self {
        Self {
            // SAFETY: plain helper call.
            cgroup_id: unsafe { bpf_get_current_cgroup_id() },
            socket_cookie,
            pid_tgid: bpf_get_current_pid_tgid(),
            uid_gid: bpf_get_current_uid_gid(),
            comm: bpf_get_current_comm().unwrap_or([0; 16]),
            saddr,
            sport,
        }
    }
}

/// A refused connect()/sendmsg(): the socket and the calling task.
#[inline(always)]
pub fn refused<const IPV6: bool>(ctx: &SockAddrContext, f: &Flow) {
    // SAFETY: the source address/port are read through the socket the kernel passed.
    let (saddr, sport) = unsafe { source::<IPV6>(ctx) };
    // SAFETY: plain helper call on our context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    emit(f, &Origin::task(cookie, saddr, sport));
}

/// Counts a refusal and, within the rate limit, writes its event. Every refusal lands
/// in exactly one of submitted, suppressed or lost.
#[inline(never)]
pub fn emit(f: &Flow, o: &Origin) {
    bump(STAT_REPORTED);
    count_flow(f);

    // SAFETY: helper without side effects.
    let now = unsafe { bpf_ktime_get_ns() };
    let Some(suppressed) = rate_limit(f, now) else {
        bump(STAT_EVENTS_SUPPRESSED);
        return;
    };
    let Some(mut entry) = EVENTS_1.reserve::<Event>(0) else {
        bump(STAT_EVENTS_LOST);
        return;
    };
    // The MCP call state it happened under, for the daemon to name the tool call.
    // SAFETY: entries are replaced whole by user space; McpInstance is plain data.
    let (mcp, mcp_seq) = match unsafe { MCP_INSTANCES_1.get(&o.cgroup_id) } {
        Some(i) if i.workload_id == f.workload_id => (1, i.seq),
        _ => (0, 0),
    };
    let ev = Event {
        ts_ns: now,
        cgroup_id: o.cgroup_id,
        socket_cookie: o.socket_cookie,
        pid: o.pid_tgid as u32,
        tgid: (o.pid_tgid >> 32) as u32,
        uid: o.uid_gid as u32,
        gid: (o.uid_gid >> 32) as u32,
        workload_id: f.workload_id,
        rule_id: f.rule_id,
        suppressed,
        generation: f.generation,
        daddr_be: f.addr,
        saddr_be: o.saddr,
        dport: f.port,
        sport: o.sport,
        hook: f.hook,
        verdict: f.verdict,
        reason: f.reason,
        dest_class: f.dest_class,
        sock_family: f.sock_family,
        proto: f.proto,
        mcp,
        _pad: 0,
        mcp_seq,
        comm: o.comm,
    };
    entry.write(ev);
    entry.submit(0);
    bump(STAT_EVENTS_SUBMITTED);
}

/// Source address and port where the kernel already knows them: the socket is bound
/// (explicitly, or by an earlier send).
#[inline(always)]
unsafe fn source<const IPV6: bool>(ctx: &SockAddrContext) -> ([u8; 16], u16) {
    let mut a = [0u8; 16];
    // SAFETY: one 8-byte load of ctx->sk at its constant offset, as the verifier requires.
    let sk = unsafe {
        core::ptr::read_volatile(core::ptr::addr_of!((*ctx.sock_addr).__bindgen_anon_1.sk))
    };
    if sk.is_null() {
        return (a, 0);
    }
    // SAFETY: the verifier typed ctx->sk as a socket pointer, checked non-null above.
    let sport = unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*sk).src_port)) } as u16;
    if IPV6 {
        // SAFETY (these loads): as above.
        let w =
            |i: usize| unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*sk).src_ip6[i])) };
        a = mcp_guard_common::v6_from_words([w(0), w(1), w(2), w(3)]);
    } else {
        // SAFETY: as above.
        let src4 = unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*sk).src_ip4)) };
        if src4 != 0 {
            a = mcp_guard_common::mapped_v4(src4.to_ne_bytes());
        }
    }
    (a, sport)
}
