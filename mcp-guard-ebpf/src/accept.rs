//! Accepted connections answer their peer. A guarded workload that listens (an MCP
//! server on Streamable HTTP, a health endpoint, a metrics port) must be able to reply to
//! whoever connected to it, whatever its egress policy says about that peer: the peer
//! chose to connect, and who may connect in is ingress policy's job.
//!
//! Decided by socket state in the kernel, never by addresses or ports a workload can
//! choose:
//! - a SYN-ACK leaves from a request socket (`TCP_NEW_SYN_RECV`), which only the kernel
//!   creates, for a SYN that arrived on a listening socket, and which sends nothing but
//!   SYN-ACKs to that SYN's source. cgroup_skb runs it as the listening socket itself
//!   (`TCP_LISTEN`; the kernel hands egress programs the full socket), which sends
//!   nothing else (resets go out on the kernel's own control socket); TC sees the
//!   request socket;
//! - the child socket the handshake makes is marked by `cgroup/sock_ops` when the kernel
//!   reports it passively established (`ACCEPTED_1`, by socket cookie), and unmarked
//!   when it closes. A socket the workload connected is never marked: it is judged by
//!   its destination as before. A TCP socket's packets all go to its one peer.

use aya_ebpf::{
    bindings::{
        __sk_buff, bpf_sock, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB,
        BPF_SOCK_OPS_STATE_CB_FLAG, BPF_TCP_CLOSE, BPF_TCP_LISTEN, BPF_TCP_NEW_SYN_RECV,
    },
    helpers::generated::bpf_get_socket_cookie,
    macros::sock_ops,
    programs::SockOpsContext,
    EbpfContext,
};
use mcp_guard_common::STAT_ACCEPT_UNMARKED;

use crate::maps::{ACCEPTED_1, ACCEPTS_1};

/// Marks passively established TCP sockets (children of a listening socket) and asks
/// the kernel for their state changes, to unmark them when they close. Runs for every
/// TCP socket below the attachment cgroup; returns 1 (no opinion on the socket).
#[sock_ops]
pub fn mcpg_sock_ops(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    if op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        // SAFETY: helper on our own context.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        if ACCEPTED_1.insert(&cookie, &1, 0).is_err() {
            // The map is full: this connection's replies will be judged by the egress
            // policy (fail closed), and the operator sees it counted.
            crate::report::bump(STAT_ACCEPT_UNMARKED);
        }
        let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    } else if op == BPF_SOCK_OPS_STATE_CB && ctx.arg(1) == BPF_TCP_CLOSE {
        // SAFETY: helper on our own context.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        let _ = ACCEPTED_1.remove(&cookie);
    }
    1
}

/// What a packet's socket is, for the egress programs.
pub(crate) const NOT_ACCEPTED: u8 = 0;
/// A SYN-ACK of a connection made to a listener (its request socket, or the listener).
pub(crate) const REQUEST: u8 = 1;
/// A child of a listening socket (marked by [`mcpg_sock_ops`]).
pub(crate) const ACCEPTED: u8 = 2;

/// The packet's socket, read first thing in a program (a single load from the
/// unmodified context, as the verifier requires).
#[inline(always)]
pub(crate) fn socket_of(skb: *mut __sk_buff) -> *mut bpf_sock {
    // SAFETY: a single load of the context's socket pointer.
    unsafe { core::ptr::read_volatile(&raw const (*skb).__bindgen_anon_2.sk) }
}

/// Whether the packet's socket `sk` (from [`socket_of`]) answers a connection made to
/// the workload.
#[inline(always)]
pub(crate) fn answers_peer(sk: *mut bpf_sock, cookie: u64) -> u8 {
    if sk.is_null() {
        return NOT_ACCEPTED;
    }
    if is_request(sk) {
        return REQUEST;
    }
    if is_accepted(cookie) {
        ACCEPTED
    } else {
        NOT_ACCEPTED
    }
}

/// Whether a non-null `sk` is a listener or request socket: it sends nothing but
/// SYN-ACKs to the source of a SYN that arrived on it. One load, no map.
#[inline(always)]
pub(crate) fn is_request(sk: *mut bpf_sock) -> bool {
    // SAFETY: the caller checked for null; `state` lies in the part every socket
    // (request sockets too) has.
    let state = unsafe { core::ptr::read_volatile(&raw const (*sk).state) };
    state == BPF_TCP_NEW_SYN_RECV || state == BPF_TCP_LISTEN
}

/// Whether the socket with `cookie` was marked accepted by [`mcpg_sock_ops`].
#[inline(always)]
pub(crate) fn is_accepted(cookie: u64) -> bool {
    // SAFETY: a plain value written whole.
    unsafe { ACCEPTED_1.get(&cookie) }.is_some()
}

/// Counts one accepted connection of workload `workload_id`.
#[inline(never)]
pub(crate) fn count(workload_id: u32) {
    match ACCEPTS_1.get_ptr_mut(&workload_id) {
        // SAFETY: this CPU's value.
        Some(v) => unsafe { *v += 1 },
        None => {
            let _ = ACCEPTS_1.insert(&workload_id, &1, 0);
        }
    }
}
