//! The per-packet backstop on the cgroup: `cgroup_skb/egress`, attached where the socket
//! hooks are, judges every IP packet leaving a socket of a guarded cgroup, in every
//! network namespace (a pod without host networking included), with the same compiled
//! policy. It sees what the socket hooks never run for: ping and raw sockets a workload
//! is allowed, protocols without connect hooks, and established flows after the policy
//! changed (a flow to an address no longer allowed, a learned address expired, is cut).
//!
//! Cheap for what the socket hooks already decided: the decision for a socket's last
//! destination is cached by socket cookie (`SKB_CACHE_2`) with the policy generation
//! and registration epoch it was made under, so an allowed bulk flow pays one lookup a
//! packet, and a socket of no workload skips parsing.

use aya_ebpf::{
    helpers::generated::{bpf_get_socket_cookie, bpf_skb_cgroup_id},
    macros::{cgroup_skb, map},
    maps::PerCpuArray,
    programs::SkBuffContext,
    EbpfContext,
};
use mcp_guard_common::{
    SkbVerdict, WorkloadInfo, CLASS_NONE, HOOK_CGROUP_SKB, MODE_AUDIT, PROTO_OTHER, PROTO_TCP,
    PROTO_UDP, REASON_MALFORMED, SKB_ALLOWED, SKB_AUDITED, SKB_DROPPED, SKB_STREAM, SKB_UNTOUCHED,
};

use crate::{
    decide::{allowed_until, boot_seconds, classify, decide, port_proto, stable, REFUSED},
    maps::{CONFIG_1, EPOCH_1, SKB_CACHE_2},
    packet::{
        link_scoped_icmpv6, parse_ip, workload_of_socket, Packet, Parsed, ETH_P_IP, ETH_P_IPV6,
    },
    report::{self, Flow, Origin},
};

/// cgroup_skb: 1 lets the packet go, 0 drops it.
const PASS: i32 = 1;
const DROP: i32 = 0;

/// The packet being judged lives here, not on the program's stack: the verifier bounds
/// the stack of the whole call chain (512 bytes; older kernels count it more strictly).
#[map]
static SKB_SCRATCH_1: PerCpuArray<Packet> = PerCpuArray::with_max_entries(1, 0);

/// Parses the packet into `out` (out of line, so its temporaries stay off the chain that
/// reports). Returns 0 for an IP packet, 1 for anything else that is not IP, 2 for an IP
/// packet cut short or malformed.
#[inline(never)]
fn parse_skb(ctx: &SkBuffContext, out: &mut Packet) -> u8 {
    // Data starts at the IP header; its version says which.
    let eth_proto = match ctx.load::<u8>(0).map_or(0, |b| b >> 4) {
        4 => ETH_P_IP,
        6 => ETH_P_IPV6,
        _ => return 1,
    };
    match parse_ip(ctx, 0, eth_proto) {
        Ok(p) => {
            *out = p;
            // NAT64 destinations are judged by the IPv4 address they carry; from here
            // on the packet's destination is the judged one.
            mcp_guard_common::nat64_to_mapped(&mut out.daddr);
            0
        }
        Err(Parsed::NotIp) => 1,
        Err(Parsed::Broken(_)) => 2,
    }
}

#[cgroup_skb(egress)]
pub fn mcpg_cgroup_skb(ctx: SkBuffContext) -> i32 {
    let sk = crate::accept::socket_of(ctx.skb.skb);
    let Some(cfg) = CONFIG_1.get(0) else {
        return PASS;
    };
    // SAFETY: plain loads of map values the daemon replaces whole.
    let generation = unsafe { core::ptr::read_volatile(&raw const cfg.generation) };
    let epoch = EPOCH_1
        .get(0)
        .map_or(0, |e| unsafe { core::ptr::read_volatile(e) });
    // SAFETY: helper on our own skb.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: LRU values are replaced whole by this program.
    let entry = unsafe { SKB_CACHE_2.get(&cookie) };
    // A TCP stream socket stays one, whatever the policy did since.
    let stream = entry.map_or(0, |c| c.state & SKB_STREAM);
    // An allow learned from DNS holds until its expiry, also while the daemon is down.
    let cached = entry.filter(|c| {
        c.generation == generation
            && c.epoch == epoch
            && (c.expires_s == 0 || boot_seconds() < c.expires_s)
    });
    if let Some(c) = cached {
        let kind = c.state & !SKB_STREAM;
        if kind == SKB_UNTOUCHED {
            return PASS;
        }
        // A stream socket's packets all go to its peer: no need to read them.
        if c.state & SKB_STREAM != 0 {
            return if kind == SKB_DROPPED { DROP } else { PASS };
        }
    }
    // A reply on a connection made to the workload goes to the peer that connected
    // (socket state, see accept.rs); counted once per connection, at its first packet.
    let skb = ctx.as_ptr().cast();
    match crate::accept::answers_peer(sk, cookie) {
        crate::accept::REQUEST => return PASS,
        crate::accept::ACCEPTED => {
            if entry.is_none() {
                if let Some((_, Some(id))) = stable(cfg, |slot| {
                    workload_of_socket(skb, slot).map(|w| w.workload_id)
                }) {
                    crate::accept::count(id);
                }
            }
            remember(
                cookie,
                generation,
                epoch,
                None,
                u64::from(SKB_ALLOWED | SKB_STREAM),
            );
            return PASS;
        }
        _ => {}
    }
    let Some(p) = SKB_SCRATCH_1.get_ptr_mut(0) else {
        return DROP;
    };
    // SAFETY: this CPU's scratch slot; programs do not migrate while running.
    let p = unsafe { &mut *p };
    let status = parse_skb(&ctx, p);
    if status == 1 {
        return PASS;
    }
    let parsed = status == 0;
    // Kept with the packet (not in a register across the retry loop's calls, which the
    // verifier would refuse): the socket's cgroup, where an MCP instance is looked up.
    // SAFETY: helper on our own skb.
    p.cgroup_id = unsafe { bpf_skb_cgroup_id(ctx.as_ptr().cast()) };
    if parsed {
        if link_scoped_icmpv6(p) {
            return PASS;
        }
        if let Some(c) = cached {
            if c.daddr == p.daddr && c.dport == p.dport && c.proto == p.proto {
                return match c.state & !SKB_STREAM {
                    SKB_DROPPED => DROP,
                    _ => PASS,
                };
            }
        }
    }
    let outcome = stable(cfg, |slot| {
        workload_of_socket(skb, slot).map(|wl| {
            if !parsed {
                // A guarded socket's packet that cannot be parsed: fail closed.
                return (
                    wl,
                    REFUSED | (u64::from(REASON_MALFORMED) << 32),
                    CLASS_NONE,
                );
            }
            let proto_bit = match p.proto {
                6 => PROTO_TCP,
                17 | 136 => PROTO_UDP,
                _ => PROTO_OTHER,
            };
            let result = decide(
                slot,
                wl,
                &p.daddr,
                port_proto(p.dport, proto_bit),
                p.cgroup_id,
            );
            let class = if result & REFUSED != 0 {
                classify(slot, &p.daddr)
            } else {
                CLASS_NONE
            };
            (wl, result, class)
        })
    });
    let Some((generation, outcome)) = outcome else {
        report::unstable();
        return DROP;
    };
    let known = parsed.then_some(&*p);
    let Some((wl, result, class)) = outcome else {
        remember(
            cookie,
            generation,
            epoch,
            known,
            u64::from(SKB_UNTOUCHED | stream),
        );
        return PASS;
    };
    if result & REFUSED == 0 {
        remember(
            cookie,
            generation,
            epoch,
            known,
            u64::from(SKB_ALLOWED | stream) | (u64::from(allowed_until(result)) << 32),
        );
        return PASS;
    }
    let audit = wl.mode == MODE_AUDIT;
    // Audit mode: the socket hooks already reported (and let through) TCP and UDP flows;
    // report only what they never judge, so nothing is counted twice.
    if !(audit && parsed && (p.proto == 6 || p.proto == 17)) {
        refusal(
            skb,
            wl,
            result,
            (u64::from(generation) << 32) | u64::from(class),
            known,
        );
    }
    if parsed {
        remember(
            cookie,
            generation,
            epoch,
            known,
            u64::from(stream | if audit { SKB_AUDITED } else { SKB_DROPPED }),
        );
    }
    if audit {
        PASS
    } else {
        DROP
    }
}

/// Counts and reports one refusal (out of line: the event's fields stay off the main
/// program's stack). `gen_class` packs the generation (high 32 bits) and the class.
#[inline(never)]
fn refusal(
    skb: *mut aya_ebpf::bindings::__sk_buff,
    wl: &WorkloadInfo,
    result: u64,
    gen_class: u64,
    p: Option<&Packet>,
) {
    let rate_limit = CONFIG_1.get(0).map_or(0, |c| c.rate_limit_per_sec);
    let (addr, saddr, proto, dport, sport, family) = match p {
        Some(p) => (p.daddr, p.saddr, p.proto, p.dport, p.sport, p.family),
        None => ([0; 16], [0; 16], 0, 0, 0, 0),
    };
    report::emit(
        &Flow {
            dest_class: gen_class as u8,
            addr,
            port: dport,
            proto,
            sock_family: family,
            ..Flow::refused_by(
                HOOK_CGROUP_SKB,
                wl,
                result,
                (gen_class >> 32) as u32,
                rate_limit,
            )
        },
        &Origin {
            // SAFETY: helpers on our own skb (the socket's cgroup and cookie).
            cgroup_id: unsafe { bpf_skb_cgroup_id(skb) },
            socket_cookie: unsafe { bpf_get_socket_cookie(skb.cast()) },
            pid_tgid: 0,
            uid_gid: 0,
            comm: [0; 16],
            saddr,
            sport,
        },
    );
}

/// Caches the decision for a socket (out of line: its value stays off the program's
/// stack, which the verifier bounds).
#[inline(never)]
/// `state_until` packs the state (low 8 bits) and the expiry second (high 32 bits): a
/// BPF call takes at most five arguments.
fn remember(cookie: u64, generation: u32, epoch: u32, p: Option<&Packet>, state_until: u64) {
    let state = state_until as u8;
    let expires_s = (state_until >> 32) as u32;
    let v = match p {
        Some(p) => SkbVerdict {
            generation,
            epoch,
            daddr: p.daddr,
            dport: p.dport,
            proto: p.proto,
            state,
            expires_s,
        },
        None => SkbVerdict {
            generation,
            epoch,
            daddr: [0; 16],
            dport: 0,
            proto: 0,
            state,
            expires_s,
        },
    };
    let _ = SKB_CACHE_2.insert(&cookie, &v, 0);
}

/// Called by the connect and sendmsg hooks on a decision that lets the call through:
/// caches it for the socket, so the packets that follow cost the backstop one lookup
/// instead of a second ancestor walk and decision. `addr` is the judged destination;
/// `port_proto_state` packs the port (high 16 bits), the IP protocol and the state.
#[inline(never)]
pub(crate) fn prime(
    cookie: u64,
    generation: u32,
    addr: &[u8; 16],
    port_proto_state: u32,
    expires_s: u32,
) {
    let epoch = EPOCH_1
        .get(0)
        .map_or(0, |e| unsafe { core::ptr::read_volatile(e) });
    let v = SkbVerdict {
        generation,
        epoch,
        daddr: *addr,
        dport: (port_proto_state >> 16) as u16,
        proto: (port_proto_state >> 8) as u8,
        state: port_proto_state as u8,
        expires_s,
    };
    let _ = SKB_CACHE_2.insert(&cookie, &v, 0);
}
