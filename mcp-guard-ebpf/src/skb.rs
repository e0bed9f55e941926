//! The per-packet backstop on the cgroup: `cgroup_skb/egress`, attached where the socket
//! hooks are, judges every IP packet leaving a socket of a guarded cgroup, in every
//! network namespace (a pod without host networking included), with the same compiled
//! policy. It sees what the socket hooks never run for: ping and raw sockets a workload
//! is allowed, protocols without connect hooks, and established flows after the policy
//! changed (a flow to an address no longer allowed, a learned address expired, is cut).
//!
//! Cheap for what the socket hooks already decided: the decision for a socket's last
//! destination is cached by socket cookie (`SKB_CACHE_1`) with the policy generation
//! and registration epoch it was made under, so an allowed bulk flow pays one lookup a
//! packet, and a socket of no workload skips parsing.

use aya_ebpf::{
    helpers::generated::{bpf_get_socket_cookie, bpf_skb_cgroup_id},
    macros::cgroup_skb,
    programs::SkBuffContext,
    EbpfContext,
};
use mcp_guard_common::{
    SkbVerdict, CLASS_NONE, HOOK_CGROUP_SKB, MODE_AUDIT, PROTO_OTHER, PROTO_TCP, PROTO_UDP,
    REASON_MALFORMED, SKB_ALLOWED, SKB_AUDITED, SKB_DROPPED, SKB_UNTOUCHED, VERDICT_AUDITED,
    VERDICT_DENIED,
};

use crate::{
    decide::{classify, decide, stable, REFUSED},
    maps::{CONFIG_1, EPOCH_1, SKB_CACHE_1},
    packet::{link_scoped_icmpv6, parse_ip, workload_of_socket, Packet, ETH_P_IP, ETH_P_IPV6},
    report::{self, Flow, Origin},
};

/// cgroup_skb: 1 lets the packet go, 0 drops it.
const PASS: i32 = 1;
const DROP: i32 = 0;

#[cgroup_skb(egress)]
pub fn mcpg_cgroup_skb(ctx: SkBuffContext) -> i32 {
    let Some(cfg) = CONFIG_1.get(0) else {
        return PASS;
    };
    // SAFETY: plain loads of map values the daemon replaces whole.
    let generation = unsafe { core::ptr::read_volatile(&raw const cfg.generation) };
    let epoch = EPOCH_1.get(0).map_or(0, |e| unsafe { core::ptr::read_volatile(e) });
    // SAFETY: helper on our own skb.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: LRU values are replaced whole by this program.
    let cached = unsafe { SKB_CACHE_1.get(&cookie) }
        .filter(|c| c.generation == generation && c.epoch == epoch);
    if cached.is_some_and(|c| c.state == SKB_UNTOUCHED) {
        return PASS;
    }
    // Data starts at the IP header; its version says which.
    let version = ctx.load::<u8>(0).map_or(0, |b| b >> 4);
    let eth_proto = match version {
        4 => ETH_P_IP,
        6 => ETH_P_IPV6,
        _ => 0,
    };
    let mut parsed = parse_ip(&ctx, 0, eth_proto);
    let mut judged = [0u8; 16];
    if let Ok(p) = &mut parsed {
        if link_scoped_icmpv6(p) {
            return PASS;
        }
        // NAT64 destinations are judged by the IPv4 address they carry; from here on
        // the packet's destination is the judged one.
        mcp_guard_common::nat64_to_mapped(&mut p.daddr);
        judged = p.daddr;
        if let Some(c) = cached {
            if c.daddr == judged && c.dport == p.dport && c.proto == p.proto {
                return match c.state {
                    SKB_DROPPED => DROP,
                    _ => PASS,
                };
            }
        }
    }
    let skb = ctx.as_ptr().cast();
    let outcome = stable(cfg, |slot| {
        workload_of_socket(skb, slot).map(|wl| match &parsed {
            Ok(p) => {
                let proto_bit = match p.proto {
                    6 => PROTO_TCP,
                    17 | 136 => PROTO_UDP,
                    _ => PROTO_OTHER,
                };
                let result = decide(slot, wl, &judged, p.dport, proto_bit);
                let class = if result & REFUSED != 0 {
                    classify(slot, &judged)
                } else {
                    CLASS_NONE
                };
                (wl, result, class)
            }
            // A guarded socket's packet that cannot be parsed: fail closed.
            Err(_) => (wl, REFUSED | (u64::from(REASON_MALFORMED) << 32), CLASS_NONE),
        })
    });
    let Some((generation, outcome)) = outcome else {
        report::unstable();
        return DROP;
    };
    let Some((wl, result, class)) = outcome else {
        remember(cookie, generation, epoch, parsed.as_ref().ok(), SKB_UNTOUCHED);
        return PASS;
    };
    if result & REFUSED == 0 {
        remember(cookie, generation, epoch, parsed.as_ref().ok(), SKB_ALLOWED);
        return PASS;
    }
    let audit = wl.mode == MODE_AUDIT;
    let (saddr, proto, dport, sport, family) = match &parsed {
        Ok(p) => (p.saddr, p.proto, p.dport, p.sport, p.family),
        Err(_) => ([0; 16], 0, 0, 0, 0),
    };
    // Audit mode: the socket hooks already reported (and let through) TCP and UDP flows;
    // report only what they never judge, so nothing is counted twice.
    if audit && (proto == 6 || proto == 17) {
        remember(cookie, generation, epoch, parsed.as_ref().ok(), SKB_AUDITED);
        return PASS;
    }
    report::emit(
        &Flow {
            hook: HOOK_CGROUP_SKB,
            verdict: if audit {
                VERDICT_AUDITED
            } else {
                VERDICT_DENIED
            },
            workload_id: wl.workload_id,
            reason: (result >> 32) as u8,
            rule_id: result as u32,
            dest_class: class,
            addr: judged,
            port: dport,
            proto,
            sock_family: family,
            generation,
            rate_limit: cfg.rate_limit_per_sec,
        },
        &Origin {
            // SAFETY: helper on our own skb (the socket's cgroup).
            cgroup_id: unsafe { bpf_skb_cgroup_id(skb) },
            socket_cookie: cookie,
            pid_tgid: 0,
            uid_gid: 0,
            comm: [0; 16],
            saddr,
            sport,
        },
    );
    if let Ok(p) = &parsed {
        remember(
            cookie,
            generation,
            epoch,
            Some(p),
            if audit { SKB_AUDITED } else { SKB_DROPPED },
        );
    }
    if audit {
        PASS
    } else {
        DROP
    }
}

/// Caches the decision for a socket (out of line: its value stays off the program's
/// stack, which the verifier bounds).
#[inline(never)]
fn remember(cookie: u64, generation: u32, epoch: u32, p: Option<&Packet>, state: u8) {
    let v = match p {
        Some(p) => SkbVerdict {
            generation,
            epoch,
            daddr: p.daddr,
            dport: p.dport,
            proto: p.proto,
            state,
        },
        None => SkbVerdict {
            generation,
            epoch,
            daddr: [0; 16],
            dport: 0,
            proto: 0,
            state,
        },
    };
    let _ = SKB_CACHE_1.insert(&cookie, &v, 0);
}

/// Called by the connect and sendmsg hooks on a decision that lets the call through:
/// caches it for the socket, so the packets that follow cost the backstop one lookup
/// instead of a second ancestor walk and decision. `addr` is the judged destination;
/// `port_proto_state` packs the port (high 16 bits), the IP protocol and the state.
#[inline(never)]
pub(crate) fn prime(cookie: u64, generation: u32, addr: &[u8; 16], port_proto_state: u32) {
    let epoch = EPOCH_1.get(0).map_or(0, |e| unsafe { core::ptr::read_volatile(e) });
    let v = SkbVerdict {
        generation,
        epoch,
        daddr: *addr,
        dport: (port_proto_state >> 16) as u16,
        proto: (port_proto_state >> 8) as u8,
        state: port_proto_state as u8,
    };
    let _ = SKB_CACHE_1.insert(&cookie, &v, 0);
}
