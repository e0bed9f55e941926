//! The decision: workload lookup by cgroup ancestry, then baseline, allow rules and the
//! workload's default, in that order.

use aya_ebpf::{
    helpers::generated::{bpf_get_current_cgroup_id, bpf_get_socket_cookie, bpf_ktime_get_boot_ns},
    maps::lpm_trie::Key,
    programs::SockAddrContext,
    EbpfContext,
};
use mcp_guard_common::{
    is_dns_port, scope, CgroupKey, Config, ExactKey, LpmData, PolicyEntry, WorkloadInfo,
    CLASS_INTERNAL, CLASS_METADATA, CLASS_PUBLIC, DEFAULT_ALLOW, DEFAULT_DENY,
    ENTRY_BASELINE_METADATA, ENTRY_F_EXPIRES, ENTRY_HOLE, HOOK_SENDMSG4, HOOK_SENDMSG6,
    MAX_CGROUP_LEVEL, MAX_RANGES, MODE_AUDIT, PROTO_OTHER, PROTO_TCP, PROTO_UDP,
    REASON_BASELINE_DENY, REASON_BASELINE_METADATA, REASON_BETWEEN_CALLS, REASON_DEFAULT_DENY,
    REASON_DENY_INTERNAL, REASON_NOT_ALLOWED, REASON_TOOL_NOT_ACTIVE, SCOPE_BASELINE,
    SCOPE_INTERNAL, SCOPE_METADATA, WL_DENY_BETWEEN_CALLS, WL_DENY_DIRECT_DNS, WL_MCP,
};

use crate::{
    maps::{CGROUPS_1, CONFIG_1, EXPIRY_1, MCP_INSTANCES_1, POLICY_EXACT_1, POLICY_LPM_1},
    report::{self, Flow},
    ALLOW, DENY,
};

pub(crate) const IPPROTO_TCP: u32 = 6;
pub(crate) const IPPROTO_UDP: u32 = 17;
pub(crate) const IPPROTO_UDPLITE: u32 = 136;
pub(crate) const IPPROTO_MPTCP: u32 = 262;

/// `decide` returns one u64 (BPF calls return a single register): bit 63 set means
/// refused, with the reason in bits 32..40 and the rule id in the low 32 bits; otherwise
/// the low 32 bits are the allowing rule id and bits 32..63 the `CLOCK_BOOTTIME` second
/// at which the allow ends (an address learned from DNS; 0: no end).
pub(crate) const REFUSED: u64 = 1 << 63;

/// The second an allowed result stops being valid (see [`REFUSED`]); 0 for never.
#[inline(always)]
pub(crate) fn allowed_until(result: u64) -> u32 {
    ((result >> 32) as u32) & 0x7fff_ffff
}

/// `CLOCK_BOOTTIME` now, in seconds (the clock learned expiries are kept in).
#[inline(always)]
pub(crate) fn boot_seconds() -> u32 {
    // SAFETY: a plain helper call.
    (unsafe { bpf_ktime_get_boot_ns() } / 1_000_000_000) as u32
}

#[inline(always)]
fn refused(r: Refusal) -> u64 {
    REFUSED | (u64::from(r.reason) << 32) | u64::from(r.rule_id)
}

/// A refused flow: why, and which rule or set decided.
pub struct Refusal {
    pub reason: u8,
    pub rule_id: u32,
}

/// Reads one context field with a single load at a constant offset: the verifier refuses
/// context accesses through a pointer the compiler has moved (for example one shared by
/// the v4 and v6 paths).
macro_rules! ctx_field {
    ($sa:expr, $($field:tt)+) => {
        // SAFETY: the kernel hands every sock_addr program a valid bpf_sock_addr.
        unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*$sa).$($field)+)) }
    };
}

/// Decisions made while the policy changed under them are made again, at most this
/// many times in all; a decision still unstable then fails closed.
const ATTEMPTS: u32 = 3;

/// Runs `decide` on the live policy slot and checks that the policy did not move under
/// it. User space bumps the generation before it starts rewriting a slot and again when
/// it switches slots; a program preempted mid-decision may have read a slot that was
/// rewritten meanwhile (and a missing workload entry would mean "untouched"), so if the
/// generation moved, the decision is made again on the live slot. Returns the generation
/// decided under with the outcome, or `None` when the policy kept changing: the caller
/// fails closed.
#[inline(always)]
pub(crate) fn stable<T>(cfg: &Config, mut decide: impl FnMut(u32) -> T) -> Option<(u32, T)> {
    let mut attempt = 0;
    while attempt < ATTEMPTS {
        // SAFETY: the array element lives as long as the map; user space rewrites it in place.
        let generation = unsafe { core::ptr::read_volatile(&raw const cfg.generation) };
        let slot = unsafe { core::ptr::read_volatile(&raw const cfg.slot) } & 1;
        let out = decide(slot);
        // SAFETY: as above.
        if unsafe { core::ptr::read_volatile(&raw const cfg.generation) } == generation {
            return Some((generation, out));
        }
        attempt += 1;
    }
    None
}

#[inline(always)]
pub fn sock_addr<const IPV6: bool>(ctx: &SockAddrContext, hook: u8) -> i32 {
    let sa = ctx.sock_addr;
    let mut addr = if IPV6 {
        mcp_guard_common::v6_from_words([
            ctx_field!(sa, user_ip6[0]),
            ctx_field!(sa, user_ip6[1]),
            ctx_field!(sa, user_ip6[2]),
            ctx_field!(sa, user_ip6[3]),
        ])
    } else {
        mcp_guard_common::mapped_v4(ctx_field!(sa, user_ip4).to_ne_bytes())
    };
    // user_port holds the port in network order in its low 16 bits.
    let mut port = u16::from_be(ctx_field!(sa, user_port) as u16);
    // A send on a connected UDP socket that carries a control message (IP_TOS or
    // IPV6_TCLASS for ECN, UDP_SEGMENT for GSO: what QUIC stacks send) runs the sendmsg
    // hooks with no address at all (AF_UNSPEC, 0.0.0.0 or :: port 0): the datagram goes
    // to the socket's peer, so the peer is what is judged (as at connect, and by the
    // backstop after every policy change). An explicit address, 0.0.0.0 included,
    // is judged as given.
    if (hook == HOOK_SENDMSG4 || hook == HOOK_SENDMSG6) && ctx_field!(sa, user_family) == 0 {
        if let Some((peer, peer_port)) = connected_peer(ctx) {
            addr = peer;
            port = peer_port;
        }
    }
    // NAT64 (64:ff9b::/96): judged as the IPv4 address it carries, so 64:ff9b::a00:d05
    // is 10.0.13.5 to every rule, internal range and the baseline.
    mcp_guard_common::nat64_to_mapped(&mut addr);
    let protocol = ctx_field!(sa, protocol);
    let proto_bit = match protocol {
        IPPROTO_TCP | IPPROTO_MPTCP => PROTO_TCP,
        IPPROTO_UDP | IPPROTO_UDPLITE => PROTO_UDP,
        _ => PROTO_OTHER,
    };

    let Some(cfg) = CONFIG_1.get(0) else {
        // The config array always has its one element; unreachable in practice.
        return ALLOW;
    };
    // SAFETY: a plain helper call.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    // A cgroup that belongs to no workload is untouched.
    // A task that left its workload's cgroup is judged by the workload it left,
    // wherever it went (see `home.rs`).
    let Some((generation, outcome)) = stable(cfg, |slot| {
        crate::home::judge(slot).map(|wl| {
            let result = decide(slot, wl, &addr, port_proto(port, proto_bit), cgroup_id);
            let class = if result & REFUSED != 0 {
                classify(slot, &addr)
            } else {
                CLASS_PUBLIC
            };
            (wl, result, class)
        })
    }) else {
        report::unstable();
        return DENY;
    };
    // Let through here: the backstop's first packet to this destination is a cache hit
    // (MPTCP sends on subflows, other sockets: nothing to prime).
    // SAFETY: a single load of the context's socket type.
    let stream = ctx_field!(sa, type_) == 1 && protocol == IPPROTO_TCP;
    let prime = |state: u8, until: u32| {
        let state = if stream {
            state | mcp_guard_common::SKB_STREAM
        } else {
            state
        };
        if protocol != IPPROTO_MPTCP {
            // SAFETY: helper on our own context.
            let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
            let packed = (u32::from(port) << 16) | ((protocol & 0xff) << 8) | u32::from(state);
            crate::skb::prime(cookie, generation, &addr, packed, until);
        }
    };
    let Some((wl, result, dest_class)) = outcome else {
        prime(mcp_guard_common::SKB_UNTOUCHED, 0);
        return ALLOW;
    };
    if result & REFUSED == 0 {
        prime(mcp_guard_common::SKB_ALLOWED, allowed_until(result));
        return ALLOW;
    }
    let audit = wl.mode == MODE_AUDIT;
    report::refused::<IPV6>(
        ctx,
        &Flow {
            dest_class,
            addr,
            port,
            proto: protocol as u8,
            sock_family: if IPV6 { 10 } else { 2 },
            ..Flow::refused_by(hook, wl, result, generation, cfg.rate_limit_per_sec)
        },
    );
    if audit {
        ALLOW
    } else {
        DENY
    }
}

/// The peer of the hook's (connected) socket, as judged: an IPv4 peer IPv4-mapped, an
/// IPv6 one (IPv4-mapped already for a dual-stack socket connected to IPv4) as is.
#[inline(always)]
fn connected_peer(ctx: &SockAddrContext) -> Option<([u8; 16], u16)> {
    let sa = ctx.sock_addr;
    let sk = ctx_field!(sa, __bindgen_anon_1.sk);
    if sk.is_null() {
        return None;
    }
    // SAFETY: single loads of the socket's fields at constant offsets, all made before
    // any branch (the verifier refuses arithmetic on a socket pointer, which the
    // compiler would emit for a load it moved behind one).
    let (family, port, v4, w0, w1, w2, w3) = unsafe {
        (
            core::ptr::read_volatile(&raw const (*sk).family),
            core::ptr::read_volatile(&raw const (*sk).dst_port),
            core::ptr::read_volatile(&raw const (*sk).dst_ip4),
            core::ptr::read_volatile(&raw const (*sk).dst_ip6[0]),
            core::ptr::read_volatile(&raw const (*sk).dst_ip6[1]),
            core::ptr::read_volatile(&raw const (*sk).dst_ip6[2]),
            core::ptr::read_volatile(&raw const (*sk).dst_ip6[3]),
        )
    };
    let port = u16::from_be(port);
    let addr = if family == 2 {
        mcp_guard_common::mapped_v4(v4.to_ne_bytes())
    } else {
        mcp_guard_common::v6_from_words([w0, w1, w2, w3])
    };
    Some((addr, port))
}

/// The deepest of the cgroups `ancestor(0..)` gives (0 ends the walk) that has a
/// workload: the one ancestor walk of the socket hooks and the packet programs.
#[inline(always)]
pub(crate) fn nearest_workload(
    slot: u32,
    ancestor: impl Fn(i32) -> u64,
) -> Option<&'static WorkloadInfo> {
    let mut found = None;
    let mut level = 0;
    while level < MAX_CGROUP_LEVEL {
        let id = ancestor(level as i32);
        if id == 0 {
            break;
        }
        let key = CgroupKey {
            cgroup_id: id,
            slot,
            _pad: 0,
        };
        // SAFETY: entries are replaced whole by user space; WorkloadInfo is plain data.
        if let Some(w) = unsafe { CGROUPS_1.get(&key) } {
            found = Some(w);
        }
        level += 1;
    }
    found
}

/// `decide`'s cgroup for a program that leaves MCP tool scoping to others (the TC
/// classifier): every tool set counts as active and a call as in flight there; the
/// cgroup hooks and the cgroup_skb backstop, which know the instance, judge it.
pub(crate) const ANY_TOOL: u64 = u64::MAX;

/// Port and protocol bit in one argument (a BPF call takes five at most).
#[inline(always)]
pub(crate) fn port_proto(port: u16, proto_bit: u8) -> u32 {
    u32::from(port) | (u32::from(proto_bit) << 16)
}

/// The MCP tool sets active for a caller in cgroup `cgroup_id` under `wl` (see
/// `McpInstance`): 0 unless the workload has tool-scoped rules or denies egress between
/// calls, and 0 for a cgroup that is no instance of this workload.
#[inline(always)]
pub(crate) fn mcp_active(slot: u32, wl: &WorkloadInfo, cgroup_id: u64) -> u64 {
    if cgroup_id == ANY_TOOL {
        return u64::MAX;
    }
    if cgroup_id == 0 || wl.flags & WL_MCP == 0 {
        return 0;
    }
    // SAFETY: entries are replaced whole by user space; McpInstance is plain data.
    match unsafe { MCP_INSTANCES_1.get(&cgroup_id) } {
        Some(i) if i.workload_id == wl.workload_id => {
            if slot & 1 == 0 {
                i.active[0]
            } else {
                i.active[1]
            }
        }
        _ => 0,
    }
}

#[inline(always)]
fn lpm(scope_id: u32, slot: u32, addr: &[u8; 16]) -> Option<&'static PolicyEntry> {
    let key = Key::new(
        32 + 128,
        LpmData {
            scope: scope(scope_id, slot),
            addr_be: *addr,
        },
    );
    POLICY_LPM_1.get(&key)
}

/// Precedence: baseline deny, then no egress between MCP calls (where the workload
/// says so), then workload allow (a range scoped to MCP tools only while one of them is
/// being called by the MCP instance whose server runs in `cgroup_id`, see
/// [`mcp_active`]), then workload default.
// A real BPF subprogram: inlined three times into the retry loop it would blow the
// verifier's 512-byte stack limit.
#[inline(never)]
pub(crate) fn decide(
    slot: u32,
    wl: &WorkloadInfo,
    addr: &[u8; 16],
    port_proto: u32,
    cgroup_id: u64,
) -> u64 {
    let active = mcp_active(slot, wl, cgroup_id);
    let port = port_proto as u16;
    let proto_bit = (port_proto >> 16) as u8;
    if let Some(e) = lpm(SCOPE_BASELINE, slot, addr).filter(|e| e.kind != ENTRY_HOLE) {
        let reason = if e.kind == ENTRY_BASELINE_METADATA {
            REASON_BASELINE_METADATA
        } else {
            REASON_BASELINE_DENY
        };
        return refused(Refusal {
            reason,
            rule_id: e.rule_id,
        });
    }
    if wl.flags & WL_DENY_BETWEEN_CALLS != 0 && active & mcp_guard_common::MCP_IN_CALL == 0 {
        return refused(Refusal {
            reason: REASON_BETWEEN_CALLS,
            rule_id: 0,
        });
    }

    let exact = ExactKey {
        scope: scope(wl.workload_id, slot),
        addr_be: *addr,
    };
    // SAFETY: entries are replaced whole by user space; PolicyEntry is plain data.
    // An entry learned from DNS counts only until its expiry (kernel clock), so an
    // expired answer is refused even while the daemon is down: then the prefixes decide.
    let mut until = 0u32;
    let exact_entry = match unsafe { POLICY_EXACT_1.get(&exact) } {
        Some(e) if e.flags & ENTRY_F_EXPIRES != 0 => {
            // SAFETY: a plain u64 value.
            match unsafe { EXPIRY_1.get(&exact) } {
                Some(&exp) if unsafe { bpf_ktime_get_boot_ns() } < exp => {
                    until = (exp / 1_000_000_000) as u32 & 0x7fff_ffff;
                    Some(e)
                }
                _ => None,
            }
        }
        other => other,
    };
    // A hole (an IPv4 destination below an IPv6-only prefix) is no match.
    let entry = match exact_entry {
        Some(e) => Some(e),
        None => lpm(wl.workload_id, slot, addr),
    }
    .filter(|e| e.kind != ENTRY_HOLE);
    let address_matched = entry.is_some();
    // A matching range scoped to tools none of which is being called: the refusal, if
    // nothing else allows, names it (the last such range: one branch less for the
    // verifier than keeping the first).
    let mut inactive_rule = 0u32;
    if let Some(e) = entry {
        let mut i = 0;
        while i < MAX_RANGES {
            if i >= e.n_ranges as usize {
                break;
            }
            let r = &e.ranges[i];
            if r.protos & proto_bit != 0 && port >= r.lo && port <= r.hi {
                let ts = u32::from(r.toolset);
                if ts == 0 || (ts <= 63 && (active >> (ts - 1)) & 1 != 0) {
                    return (u64::from(until) << 32) | u64::from(r.rule_id);
                }
                inactive_rule = r.rule_id;
            }
            i += 1;
        }
    }

    // Direct DNS: only to what an allow rule allows (checked above), whatever the default.
    if wl.flags & WL_DENY_DIRECT_DNS != 0 && proto_bit != PROTO_OTHER && is_dns_port(port) {
        return refused(Refusal {
            reason: REASON_NOT_ALLOWED,
            rule_id: 0,
        });
    }
    let refused_reason = match wl.default {
        DEFAULT_ALLOW => return 0,
        DEFAULT_DENY => REASON_DEFAULT_DENY,
        _ => {
            if lpm(SCOPE_INTERNAL, slot, addr).is_none() {
                return 0;
            }
            REASON_DENY_INTERNAL
        }
    };
    if inactive_rule != 0 {
        return refused(Refusal {
            reason: REASON_TOOL_NOT_ACTIVE,
            rule_id: inactive_rule,
        });
    }
    let reason = if address_matched {
        REASON_NOT_ALLOWED
    } else {
        refused_reason
    };
    refused(Refusal { reason, rule_id: 0 })
}

/// Destination class for metrics; only computed for refused flows.
// A real BPF subprogram: inlined three times into the retry loop it would blow the
// verifier's 512-byte stack limit.
#[inline(never)]
pub(crate) fn classify(slot: u32, addr: &[u8; 16]) -> u8 {
    if lpm(SCOPE_METADATA, slot, addr).is_some() {
        CLASS_METADATA
    } else if lpm(SCOPE_INTERNAL, slot, addr).is_some() {
        CLASS_INTERNAL
    } else {
        CLASS_PUBLIC
    }
}
