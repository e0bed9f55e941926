//! The packet-level backstop: a TC classifier that drops packets from guarded workloads
//! to denied destinations, with the same compiled policy as the socket hooks. It sees
//! what they cannot: raw and packet sockets, ICMP, hand-built packets.
//!
//! Workload attribution:
//! - VM mode (egress of the host's interfaces): the packet's socket cgroup and its
//!   ancestors, exactly like the socket hooks.
//! - Pod mode (ingress of a pod's node-side veth, where the socket is gone): the source
//!   interface the packet came in on, through `IFACES_1`, which the daemon fills from the workload's network
//!   namespaces.

use aya_ebpf::{
    helpers::generated::{bpf_get_socket_cookie, bpf_skb_ancestor_cgroup_id, bpf_skb_cgroup_id},
    macros::classifier,
    programs::TcContext,
    EbpfContext,
};
use mcp_guard_common::{
    CgroupKey, WorkloadInfo, HOOK_TC, MODE_AUDIT, PROTO_OTHER, PROTO_TCP, PROTO_UDP,
};

use crate::{
    decide::{classify, decide, port_proto, stable, ANY_TOOL, REFUSED},
    maps::{CGROUPS_1, CONFIG_1, IFACES_1},
    report::{self, Flow, Origin},
};

/// TCX_NEXT / TC_ACT_UNSPEC: no opinion, let the next program and the stack decide.
const PASS: i32 = -1;
const DROP: i32 = 2;

pub(crate) const ETH_P_IP: u16 = 0x0800;
pub(crate) const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;

/// What the classifier needs from a packet.
pub(crate) struct Packet {
    pub daddr: [u8; 16],
    pub saddr: [u8; 16],
    pub proto: u8,
    pub dport: u16,
    pub sport: u16,
    pub family: u8,
    /// The cgroup_skb program's socket cgroup (0 where unknown).
    pub cgroup_id: u64,
}

/// Bytes of a packet at an offset: the TC classifier (from the Ethernet header) and the
/// cgroup_skb program (from the IP header) parse with the same code.
pub(crate) trait Bytes {
    fn get<T>(&self, off: usize) -> Result<T, ()>;
}

impl Bytes for TcContext {
    #[inline(always)]
    fn get<T>(&self, off: usize) -> Result<T, ()> {
        self.load::<T>(off).map_err(|_| ())
    }
}

impl Bytes for aya_ebpf::programs::SkBuffContext {
    #[inline(always)]
    fn get<T>(&self, off: usize) -> Result<T, ()> {
        self.load::<T>(off).map_err(|_| ())
    }
}

#[derive(Clone, Copy)]
pub(crate) enum Parsed {
    /// Not IP (ARP, LLDP...): not ours to judge.
    NotIp,
    /// IP, but cut short or malformed; carries the source address when it was read
    /// before the cut (pod mode attributes by it), zero otherwise.
    #[allow(dead_code)] // the source address read before the cut, for a debugger
    Broken([u8; 16]),
}

#[inline(always)]
fn load<T, B: Bytes>(ctx: &B, off: usize) -> Result<T, Parsed> {
    ctx.get::<T>(off).map_err(|()| Parsed::Broken([0; 16]))
}

#[inline(always)]
fn ports<B: Bytes>(
    ctx: &B,
    l4: usize,
    proto: u8,
    first_fragment: bool,
) -> Result<(u16, u16), Parsed> {
    // Only the first fragment carries the ports; later fragments are judged as "port
    // unknown" (0): only rules for every port can allow them, so a fragment never
    // slips past a port rule.
    if first_fragment && (proto == 6 || proto == 17 || proto == 136) {
        let sport: u16 = load(ctx, l4)?;
        let dport: u16 = load(ctx, l4 + 2)?;
        return Ok((u16::from_be(sport), u16::from_be(dport)));
    }
    Ok((0, 0))
}

#[inline(never)]
fn parse(ctx: &TcContext) -> Result<Packet, Parsed> {
    let mut eth_proto = u16::from_be(ctx.load::<u16>(12).map_err(|_| Parsed::NotIp)?);
    let mut off = 14;
    if eth_proto == ETH_P_8021Q || eth_proto == ETH_P_8021AD {
        eth_proto = u16::from_be(load(ctx, 16)?);
        off = 18;
    }
    parse_ip(ctx, off, eth_proto)
}

/// The IP packet at `off` (IPv4 or IPv6 by `eth_proto`, an ethertype).
#[inline(always)]
pub(crate) fn parse_ip<B: Bytes>(ctx: &B, off: usize, eth_proto: u16) -> Result<Packet, Parsed> {
    match eth_proto {
        ETH_P_IP => {
            let vihl: u8 = load(ctx, off)?;
            let saddr = mcp_guard_common::mapped_v4(load(ctx, off + 12)?);
            let cut = |_| Parsed::Broken(saddr);
            let ihl = usize::from(vihl & 0x0f) * 4;
            if vihl >> 4 != 4 || ihl < 20 {
                return Err(Parsed::Broken(saddr));
            }
            let frag = u16::from_be(load(ctx, off + 6).map_err(cut)?);
            let proto: u8 = load(ctx, off + 9).map_err(cut)?;
            let daddr: [u8; 4] = load(ctx, off + 16).map_err(cut)?;
            let (sport, dport) = ports(ctx, off + ihl, proto, frag & 0x1fff == 0).map_err(cut)?;
            Ok(Packet {
                daddr: mcp_guard_common::mapped_v4(daddr),
                saddr,
                proto,
                dport,
                sport,
                family: 2,
                cgroup_id: 0,
            })
        }
        ETH_P_IPV6 => {
            let saddr: [u8; 16] = load(ctx, off + 8)?;
            let cut = |_| Parsed::Broken(saddr);
            let daddr: [u8; 16] = load(ctx, off + 24).map_err(cut)?;
            let mut next: u8 = load(ctx, off + 6).map_err(cut)?;
            let mut l4 = off + 40;
            let mut first_fragment = true;
            let mut i = 0;
            // Walk the extension headers to the transport header (bounded).
            while i < 8 {
                match next {
                    0 | 43 | 60 => {
                        // Hop-by-hop, routing, destination options: (len + 1) * 8 bytes.
                        let nh: u8 = load(ctx, l4).map_err(cut)?;
                        let len: u8 = load(ctx, l4 + 1).map_err(cut)?;
                        next = nh;
                        l4 += (usize::from(len) + 1) * 8;
                    }
                    44 => {
                        // Fragment header: 8 bytes; a non-zero offset means no ports.
                        let nh: u8 = load(ctx, l4).map_err(cut)?;
                        let offset = u16::from_be(load(ctx, l4 + 2).map_err(cut)?) & 0xfff8;
                        first_fragment = offset == 0;
                        next = nh;
                        l4 += 8;
                    }
                    51 => {
                        // Authentication header: (len + 2) * 4 bytes.
                        let nh: u8 = load(ctx, l4).map_err(cut)?;
                        let len: u8 = load(ctx, l4 + 1).map_err(cut)?;
                        next = nh;
                        l4 += (usize::from(len) + 2) * 4;
                    }
                    _ => break,
                }
                i += 1;
            }
            let (sport, dport) = ports(ctx, l4, next, first_fragment).map_err(cut)?;
            Ok(Packet {
                daddr,
                saddr,
                proto: next,
                dport,
                sport,
                family: 10,
                cgroup_id: 0,
            })
        }
        _ => Err(Parsed::NotIp),
    }
}

/// ICMPv6 to a link-local or link-scope multicast address (neighbour discovery, router
/// solicitation, MLD): the kernel's own link maintenance, which never leaves the link.
/// Dropping it would cut a pod's IPv6 off in pod mode, where every packet from its
/// address is the workload's.
#[inline(always)]
pub(crate) fn link_scoped_icmpv6(p: &Packet) -> bool {
    let d = &p.daddr;
    p.family == 10
        && p.proto == 58
        && ((d[0] == 0xff && d[1] & 0x0f == 0x02) || (d[0] == 0xfe && d[1] & 0xc0 == 0x80))
}

/// The workload of the packet's socket (nearest ancestor cgroup with a policy).
#[inline(never)]
pub(crate) fn workload_of_socket(
    skb: *mut aya_ebpf::bindings::__sk_buff,
    slot: u32,
) -> Option<&'static WorkloadInfo> {
    // SAFETY: helper on our own skb; returns 0 without a socket or above its level.
    crate::decide::nearest_workload(slot, |level| unsafe {
        bpf_skb_ancestor_cgroup_id(skb, level)
    })
}

/// Pod mode: the workload whose network namespace is on the other end of the interface
/// the packet came in on (a node-side veth belongs to one pod). Never the source
/// address: a pod can write any source address into a packet.
#[inline(always)]
fn workload_of_interface(ifindex: u32, slot: u32) -> Option<(&'static WorkloadInfo, u64)> {
    // SAFETY: plain data written whole by user space.
    let cgroup_id = *unsafe { IFACES_1.get(&ifindex) }?;
    // SAFETY: as above.
    unsafe {
        CGROUPS_1.get(&CgroupKey {
            cgroup_id,
            slot,
            _pad: 0,
        })
    }
    .map(|w| (w, cgroup_id))
}

#[classifier]
pub fn mcpg_tc(ctx: TcContext) -> i32 {
    let sk = crate::accept::socket_of(ctx.skb.skb);
    // SAFETY: a single load of a plain field of our own skb (made first: a load the
    // compiler moved behind a branch would go through a modified context pointer).
    let ifindex = unsafe { core::ptr::read_volatile(&raw const (*ctx.skb.skb).ifindex) };
    let Some(cfg) = CONFIG_1.get(0) else {
        return PASS;
    };
    let parsed = parse(&ctx);
    if parsed.as_ref().is_ok_and(link_scoped_icmpv6) {
        return PASS;
    }
    // SAFETY: helper on our own skb.
    let socket_cgroup = unsafe { bpf_skb_cgroup_id(ctx.as_ptr().cast()) };
    // A listener's or request socket's SYN-ACK (one load, no map; see accept.rs).
    if socket_cgroup != 0 && !sk.is_null() && crate::accept::is_request(sk) {
        return PASS;
    }
    let Some((generation, (owner, verdict))) = stable(cfg, |slot| {
        let by_socket = if socket_cgroup != 0 {
            workload_of_socket(ctx.as_ptr().cast(), slot).map(|w| (w, socket_cgroup))
        } else {
            None
        };
        let owner = match (&by_socket, &parsed) {
            (Some(_), _) => by_socket,
            (None, Err(Parsed::NotIp)) => None,
            (None, _) => workload_of_interface(ifindex, slot),
        };
        let verdict = match (owner, &parsed) {
            (None, _) | (Some(_), Err(Parsed::NotIp)) => None,
            // A guarded workload's IP packet that cannot be parsed: fail closed.
            (Some((wl, _)), Err(Parsed::Broken(_))) => Some((wl, 0u64, None)),
            (Some((wl, _)), Ok(p)) => {
                let proto_bit = match p.proto {
                    6 => PROTO_TCP,
                    17 | 136 => PROTO_UDP,
                    _ => PROTO_OTHER,
                };
                // NAT64 destinations are judged by the IPv4 address they carry.
                let mut judged = p.daddr;
                mcp_guard_common::nat64_to_mapped(&mut judged);
                // MCP tool scoping is left to the cgroup hooks and the cgroup_skb
                // backstop, which know the instance (a constant: the verifier keeps one
                // path through the tool checks).
                let result = decide(slot, wl, &judged, port_proto(p.dport, proto_bit), ANY_TOOL);
                (result & REFUSED != 0).then(|| (wl, result, Some(classify(slot, &judged))))
            }
        };
        (owner, verdict)
    }) else {
        report::unstable();
        return DROP;
    };
    let Some((wl, result, class)) = verdict else {
        return PASS;
    };
    // VM mode: a reply on a connection made to the workload goes to the peer that
    // connected (socket state, see accept.rs). Looked up only for a packet the policy
    // would refuse, so the host's other traffic never pays for it.
    if socket_cgroup != 0 {
        // SAFETY: helper on our own skb.
        if crate::accept::is_accepted(unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }) {
            return PASS;
        }
    }
    let cgroup_id = owner.map_or(0, |(_, id)| id);
    let (daddr, saddr, proto, dport, sport, family) = match &parsed {
        Ok(p) => (p.daddr, p.saddr, p.proto, p.dport, p.sport, p.family),
        Err(_) => ([0; 16], [0; 16], 0, 0, 0, 0),
    };
    let audit = wl.mode == MODE_AUDIT;
    report::emit(
        &Flow {
            dest_class: class.unwrap_or(mcp_guard_common::CLASS_NONE),
            addr: daddr,
            port: dport,
            proto,
            sock_family: family,
            ..Flow::refused_by(
                HOOK_TC,
                wl,
                // A packet that cannot be parsed is refused as malformed.
                if result & REFUSED != 0 {
                    result
                } else {
                    (u64::from(mcp_guard_common::REASON_MALFORMED) << 32) | u64::from(result as u32)
                },
                generation,
                cfg.rate_limit_per_sec,
            )
        },
        &Origin {
            cgroup_id,
            // SAFETY: helper on our own skb; 0 without a socket.
            socket_cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
            pid_tgid: 0,
            uid_gid: 0,
            comm: [0; 16],
            saddr,
            sport,
        },
    );
    if audit {
        PASS
    } else {
        DROP
    }
}
