//! Closing the paths below connect()/sendmsg(): a guarded workload may create only TCP
//! (and MPTCP) and UDP inet sockets, whose every send path the socket hooks judge; raw,
//! ICMP datagram ("ping"), UDP-Lite, SCTP and every other inet protocol are refused at
//! cgroup/sock_create, and AF_PACKET, AF_XDP and AF_VSOCK at BPF LSM socket_create, each
//! configurable per workload and reported like any other refusal.

use aya_ebpf::{
    helpers::generated::bpf_get_socket_cookie,
    macros::{cgroup_sock, lsm},
    programs::{LsmContext, SockContext},
    EbpfContext,
};
use mcp_guard_common::{
    HOOK_LSM_SOCKET, HOOK_SOCK_CREATE, MODE_AUDIT, REASON_PACKET_SOCKET, REASON_PING_SOCKET,
    REASON_RAW_SOCKET, REASON_SOCKET_PROTOCOL, WL_DENY_OTHER_PROTO, WL_DENY_PACKET, WL_DENY_PING,
    WL_DENY_RAW,
};

use crate::{
    decide::stable,
    maps::CONFIG_1,
    report::{self, Flow, Origin},
};

const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
const SOCK_RAW: u32 = 3;
const AF_INET6: u32 = 10;
const AF_PACKET: i32 = 17;
const AF_VSOCK: i32 = 40;
const AF_XDP: i32 = 44;
const IPPROTO_IP: u32 = 0;
const IPPROTO_ICMP: u32 = 1;
const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;
const IPPROTO_ICMPV6: u32 = 58;
const IPPROTO_MPTCP: u32 = 262;
const EPERM: i32 = 1;

/// Whether the calling task's workload refuses this kind of socket; reports it if so.
/// Returns true when the creation must fail.
/// What is being created (BPF calls take at most five arguments, so one says all three:
/// the workload flag, the reason and the hook).
const RAW: u8 = 0;
const PACKET: u8 = 1;
const PING: u8 = 2;
const OTHER: u8 = 3;

#[inline(never)]
fn refuse_creation(kind: u8, family: u8, proto: u8, cookie: u64) -> bool {
    let (flag, reason, hook) = match kind {
        RAW => (WL_DENY_RAW, REASON_RAW_SOCKET, HOOK_SOCK_CREATE),
        PING => (WL_DENY_PING, REASON_PING_SOCKET, HOOK_SOCK_CREATE),
        OTHER => (
            WL_DENY_OTHER_PROTO,
            REASON_SOCKET_PROTOCOL,
            HOOK_SOCK_CREATE,
        ),
        _ => (WL_DENY_PACKET, REASON_PACKET_SOCKET, HOOK_LSM_SOCKET),
    };
    let Some(cfg) = CONFIG_1.get(0) else {
        return false;
    };
    // The task's workload, or the one it left (see `home.rs`).
    let Some((generation, wl)) = stable(cfg, crate::home::judge) else {
        report::unstable();
        return true;
    };
    let Some(wl) = wl else { return false };
    if wl.flags & flag == 0 {
        return false;
    }
    let audit = wl.mode == MODE_AUDIT;
    report::emit(
        &Flow {
            proto,
            sock_family: family,
            ..Flow::refused_by(
                hook,
                wl,
                u64::from(reason) << 32,
                generation,
                cfg.rate_limit_per_sec,
            )
        },
        &Origin::task(cookie, [0; 16], 0),
    );
    !audit
}

/// Only TCP (and MPTCP) and UDP sockets have every send path judged by the connect and
/// sendmsg hooks. Raw sockets send packets those hooks never see; ICMP datagram sockets
/// send echo requests with sendto; UDP-Lite has no connect hook (connect, then send);
/// SCTP and the rest have paths of their own. This hook fires for inet sockets only.
#[cgroup_sock(sock_create)]
pub fn mcpg_sock_create(ctx: SockContext) -> i32 {
    // SAFETY: single loads of the context's socket fields, as the verifier requires.
    let ty = unsafe { core::ptr::read_volatile(&raw const (*ctx.sock).type_) };
    let protocol = unsafe { core::ptr::read_volatile(&raw const (*ctx.sock).protocol) };
    let kind = match (ty, protocol) {
        (SOCK_RAW, _) => RAW,
        (SOCK_STREAM, IPPROTO_IP | IPPROTO_TCP | IPPROTO_MPTCP)
        | (SOCK_DGRAM, IPPROTO_IP | IPPROTO_UDP) => return 1,
        (SOCK_DGRAM, IPPROTO_ICMP | IPPROTO_ICMPV6) => PING,
        _ => OTHER,
    };
    let family = unsafe { core::ptr::read_volatile(&raw const (*ctx.sock).family) };
    // SAFETY: plain helper call on our context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let family = if family == AF_INET6 { 10 } else { 2 };
    if refuse_creation(kind, family, protocol as u8, cookie) {
        0
    } else {
        1
    }
}

/// AF_PACKET sockets see and send whole frames below IP, AF_XDP sockets hand frames to
/// the driver, AF_VSOCK sockets reach the hypervisor and other VMs. There is no cgroup
/// hook for them; the BPF LSM socket_create hook sees every socket creation.
#[lsm(hook = "socket_create")]
pub fn mcpg_lsm_socket(ctx: LsmContext) -> i32 {
    // socket_create(int family, int type, int protocol, int kern), then the verdict of
    // the LSM programs before us.
    let family: i32 = ctx.arg(0);
    let protocol: i32 = ctx.arg(2);
    let kern: i32 = ctx.arg(3);
    let previous: i32 = ctx.arg(4);
    // An earlier refusal stays one (returned as EPERM: the verifier bounds an LSM
    // program's return to -4095..0 over the whole register, which a value passed
    // through cannot show).
    let mut refuse = previous != 0;
    if !refuse && (family == AF_PACKET || family == AF_XDP || family == AF_VSOCK) && kern == 0 {
        // The protocol of a packet socket is an ethertype in network order.
        let proto = if family == AF_PACKET {
            u16::from_be(protocol as u16) as u8
        } else {
            protocol as u8
        };
        refuse = refuse_creation(PACKET, family as u8, proto, 0);
    }
    // Through the stack as a 64-bit constant on each path: computed as -(bool), the
    // verifier could not bound it (kernels that check LSM return ranges refuse that).
    let mut verdict = 0i64;
    if refuse {
        // SAFETY: a local.
        unsafe { core::ptr::write_volatile(&raw mut verdict, -i64::from(EPERM)) };
    }
    // SAFETY: a local.
    unsafe { core::ptr::read_volatile(&raw const verdict) as i32 }
}
