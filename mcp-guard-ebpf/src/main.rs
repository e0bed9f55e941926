//! mcp-guard's kernel programs: socket-level egress decisions per workload cgroup.
//!
//! Every program has the same shape: find the workload, decide, report, return the
//! verdict. Policy is compiled in user space; here there are only bounded lookups.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// Map keys are passed by reference on purpose: by value they would be copied onto the
// 512-byte BPF stack (a 264-byte registration key among them).
#![allow(clippy::needless_borrows_for_generic_args)]

mod accept;
mod decide;
mod home;
mod maps;
mod packet;
mod register;
mod report;
mod skb;
mod socket;
mod unix;

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use mcp_guard_common::{
    HOOK_CONNECT4, HOOK_CONNECT6, HOOK_CONNECT_UNIX, HOOK_SENDMSG4, HOOK_SENDMSG6,
    HOOK_SENDMSG_UNIX,
};

/// cgroup/sock_addr programs: 1 lets the call proceed, 0 makes it fail with EPERM.
const ALLOW: i32 = 1;
const DENY: i32 = 0;

#[cgroup_sock_addr(connect4)]
pub fn mcpg_connect4(ctx: SockAddrContext) -> i32 {
    decide::sock_addr::<false>(&ctx, HOOK_CONNECT4)
}

#[cgroup_sock_addr(connect6)]
pub fn mcpg_connect6(ctx: SockAddrContext) -> i32 {
    decide::sock_addr::<true>(&ctx, HOOK_CONNECT6)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn mcpg_sendmsg4(ctx: SockAddrContext) -> i32 {
    decide::sock_addr::<false>(&ctx, HOOK_SENDMSG4)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn mcpg_sendmsg6(ctx: SockAddrContext) -> i32 {
    decide::sock_addr::<true>(&ctx, HOOK_SENDMSG6)
}

/// connect() on an AF_UNIX socket. Built in the connect4 section (aya 0.14 knows no
/// unix attach type); the daemon loads it as BPF_CGROUP_UNIX_CONNECT.
#[cgroup_sock_addr(connect4)]
pub fn mcpg_connect_unix(ctx: SockAddrContext) -> i32 {
    unix::judge(&ctx, HOOK_CONNECT_UNIX)
}

/// sendto()/sendmsg() with an AF_UNIX address; loaded as BPF_CGROUP_UNIX_SENDMSG.
#[cgroup_sock_addr(connect4)]
pub fn mcpg_sendmsg_unix(ctx: SockAddrContext) -> i32 {
    unix::judge(&ctx, HOOK_SENDMSG_UNIX)
}

/// Built for the host only by `cargo clippy --workspace --all-targets` (lint gate).
#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
