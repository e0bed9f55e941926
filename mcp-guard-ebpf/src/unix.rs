//! AF_UNIX sockets are egress too: a guarded process that reaches the container
//! runtime's socket, the D-Bus system bus or a local proxy asks an unguarded process to
//! connect for it. `cgroup/connect_unix` and `cgroup/sendmsg_unix` (Linux 6.7) run before
//! the kernel looks the address up; the path is judged per workload against
//! `UNIX_RULES_1`, the most specific entry winning (exact path over `dir/*` over the
//! workload's catch-all).
//!
//! The hooks see the address as the caller wrote it, not the socket it resolves to: a
//! deny entry for a path is as strong as the caller's inability to reach the same
//! socket by another name (a symlink, a relative path, a bind mount). The allow-listed
//! mode does not have that weakness (README: "Unix sockets").
//!
//! aya 0.14 has no attach type for these hooks: the programs are built as
//! `cgroup/connect4` programs and the daemon loads them with the unix attach types
//! (`mcp-guard/src/kernel/unix_hooks.rs`).

use aya_ebpf::{
    helpers::{
        bpf_probe_read_kernel,
        generated::{bpf_get_socket_cookie, bpf_probe_read_kernel as read_raw},
    },
    macros::lsm,
    maps::lpm_trie::Key,
    programs::{LsmContext, SockAddrContext},
    EbpfContext,
};
use mcp_guard_common::{
    scope, unix_path_hash, UnixLpmData, UnixPath, CLASS_LOCAL, HOOK_LSM_UNIX_CONNECT,
    HOOK_LSM_UNIX_SEND, MODE_AUDIT, REASON_UNIX_DENIED, REASON_UNIX_NOT_ALLOWED,
    SCOPE_UNIX_BUILTIN, UNIX_ALLOW, UNIX_NOT_ALLOWED, UNIX_PATH_MAX,
};

use crate::{
    decide::stable,
    maps::{CONFIG_1, UNIX_PATHS_1, UNIX_RULES_1, UNIX_SCRATCH_1},
    report::{self, Flow, Origin},
};

const ALLOW: i32 = 1;
const DENY: i32 = 0;
const AF_UNIX: u16 = 1;
/// `struct bpf_sock_addr_kern` (include/linux/filter.h, the same since 6.7, where the
/// unix hooks came): the kernel's copy of the address at 8, its length at 32.
const KERN_UADDR: usize = 8;
const KERN_UADDRLEN: usize = 32;
/// `offsetof(struct sockaddr_un, sun_path)`.
const SUN_PATH: u64 = 2;

/// Reads the address the caller passed into `path` (zeroed past its end, as the
/// kernel will use it: a path up to its first NUL, an abstract name up to its length).
/// `None` when it cannot be read or is not an AF_UNIX address (refused: fail closed).
#[inline(always)]
fn read_address(ctx: &SockAddrContext, path: &mut [u8; UNIX_PATH_MAX]) -> Option<()> {
    let base = ctx.sock_addr as *const u8;
    // SAFETY: bpf_probe_read_kernel checks the addresses; the context of a unix hook is
    // a struct bpf_sock_addr_kern.
    let uaddr: u64 = unsafe { bpf_probe_read_kernel(base.add(KERN_UADDR) as *const u64) }.ok()?;
    let len: u32 = unsafe { bpf_probe_read_kernel(base.add(KERN_UADDRLEN) as *const u32) }.ok()?;
    read_sockaddr(uaddr, len, path)
}

/// Reads a `struct sockaddr_un` of `len` bytes (with its family) at kernel address
/// `uaddr` into `path`, as [`read_address`] says.
#[inline(always)]
fn read_sockaddr(uaddr: u64, len: u32, path: &mut [u8; UNIX_PATH_MAX]) -> Option<()> {
    // SAFETY: bpf_probe_read_kernel checks the address.
    let family: u16 = unsafe { bpf_probe_read_kernel(uaddr as *const u16) }.ok()?;
    if family != AF_UNIX || (len as u64) <= SUN_PATH {
        return None;
    }
    let mut n = len as u64 - SUN_PATH;
    if n > UNIX_PATH_MAX as u64 {
        n = UNIX_PATH_MAX as u64;
    }
    // Bounded for the verifier: 1..=108.
    let n = (n as u32) & 0x7f;
    if n == 0 || n > UNIX_PATH_MAX as u32 {
        return None;
    }
    // SAFETY: `path` holds 108 bytes and n is at most 108.
    let rc = unsafe {
        read_raw(
            path.as_mut_ptr() as *mut _,
            n,
            (uaddr + SUN_PATH) as *const _,
        )
    };
    if rc != 0 {
        return None;
    }
    if path[0] != 0 {
        // A path: the kernel stops at the first NUL.
        let mut end = false;
        let mut i = 0;
        while i < UNIX_PATH_MAX {
            if end {
                path[i] = 0;
            } else if path[i] == 0 {
                end = true;
            }
            i += 1;
        }
    }
    Some(())
}

/// The most specific entry for the address in the scratch key, in one policy slot:
/// the workload's own, unless a built-in entry is more specific (longer);
/// `rule_id << 8 | action` (an unreadable address is refused, rule 0).
// A real BPF subprogram: the retry loop around it stays small for the verifier.
#[inline(never)]
fn lookup(slot: u32, workload_id: u32, readable: bool) -> u64 {
    if !readable {
        return u64::from(UNIX_NOT_ALLOWED + 1);
    }
    let Some(scratch) = UNIX_SCRATCH_1.get_ptr_mut(0) else {
        return u64::from(UNIX_NOT_ALLOWED + 1);
    };
    // SAFETY: the per-CPU scratch key, ours for the run.
    let k = unsafe { &mut *scratch };
    k.prefix_len = 32 + 8 * UNIX_PATH_MAX as u32;
    k.data.scope = scope(workload_id, slot);
    let own = UNIX_RULES_1.get(&*k).map(|r| (r.rule_id, r.action, r.len));
    k.data.scope = scope(SCOPE_UNIX_BUILTIN, slot);
    let builtin = UNIX_RULES_1.get(&*k).map(|r| (r.rule_id, r.action, r.len));
    let pick = match (own, builtin) {
        (Some(o), Some(b)) if b.2 > o.2 => Some(b),
        (Some(o), _) => Some(o),
        (None, b) => b,
    };
    match pick {
        Some((rule_id, action, _)) => (u64::from(rule_id) << 8) | u64::from(action),
        None => u64::from(UNIX_ALLOW),
    }
}

/// Judges one AF_UNIX destination, whose address is in the scratch key (`readable`:
/// it could be read); reports a refusal. Returns whether the call must fail.
// A real BPF subprogram shared by the cgroup and LSM programs.
#[inline(never)]
fn refuse(hook: u8, readable: bool, cookie: u64) -> bool {
    let Some(cfg) = CONFIG_1.get(0) else {
        return false;
    };
    let Some(scratch) = UNIX_SCRATCH_1.get_ptr_mut(0) else {
        return true;
    };
    let Some((generation, outcome)) = stable(cfg, |slot| {
        crate::home::judge(slot).map(|wl| (wl, lookup(slot, wl.workload_id, readable)))
    }) else {
        report::unstable();
        return true;
    };
    let Some((wl, verdict)) = outcome else {
        return false;
    };
    let (rule_id, action) = ((verdict >> 8) as u32, verdict as u8);
    if action == UNIX_ALLOW {
        return false;
    }
    // SAFETY: the per-CPU scratch key, ours for the run.
    let key: &Key<UnixLpmData> = unsafe { &*scratch };
    let reason = if action == UNIX_NOT_ALLOWED {
        REASON_UNIX_NOT_ALLOWED
    } else {
        REASON_UNIX_DENIED
    };
    // The path, for the daemon to name in the event (an LRU: the newest refusals).
    let hash = unix_path_hash(&key.data.path);
    let mut len = 0u32;
    let mut i = 0;
    while i < UNIX_PATH_MAX {
        if key.data.path[i] != 0 {
            len = i as u32 + 1;
        }
        i += 1;
    }
    let _ = UNIX_PATHS_1.insert(
        &hash,
        &UnixPath {
            len,
            path: key.data.path,
        },
        0,
    );
    let mut addr = [0u8; 16];
    addr[..8].copy_from_slice(&hash.to_ne_bytes());
    report::emit(
        &Flow {
            dest_class: CLASS_LOCAL,
            addr,
            sock_family: AF_UNIX as u8,
            ..Flow::refused_by(
                hook,
                wl,
                (u64::from(reason) << 32) | u64::from(rule_id),
                generation,
                cfg.rate_limit_per_sec,
            )
        },
        &Origin::task(cookie, [0; 16], 0),
    );
    wl.mode != MODE_AUDIT
}

/// The scratch key's path, cleared.
#[inline(always)]
fn scratch_path() -> Option<&'static mut [u8; UNIX_PATH_MAX]> {
    let scratch = UNIX_SCRATCH_1.get_ptr_mut(0)?;
    // SAFETY: per-CPU scratch space, ours for the run.
    let path = unsafe { &mut (*scratch).data.path };
    *path = [0; UNIX_PATH_MAX];
    Some(path)
}

/// Judges one connect()/sendmsg() on an AF_UNIX socket (cgroup hooks).
#[inline(always)]
pub fn judge(ctx: &SockAddrContext, hook: u8) -> i32 {
    let Some(path) = scratch_path() else {
        return DENY;
    };
    let readable = read_address(ctx, path).is_some();
    // SAFETY: plain helper call on our context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if refuse(hook, readable, cookie) {
        DENY
    } else {
        ALLOW
    }
}

/// Offsets the daemon reads from the kernel's BTF and sets before loading (aya-ebpf has
/// no CO-RE): `unix_sock.addr`, `socket.sk`, `unix_address.len`, `unix_address.name`.
/// 0: unknown, and then the daemon does not attach the LSM programs.
#[unsafe(no_mangle)]
static UNIX_SOCK_ADDR_OFF: u32 = 0;
#[unsafe(no_mangle)]
static SOCKET_SK_OFF: u32 = 0;
#[unsafe(no_mangle)]
static UNIX_ADDRESS_LEN_OFF: u32 = 0;
#[unsafe(no_mangle)]
static UNIX_ADDRESS_NAME_OFF: u32 = 0;

fn global(v: &'static u32) -> u64 {
    // SAFETY: a constant of the object, patched by the loader; read as memory, not folded.
    u64::from(unsafe { core::ptr::read_volatile(v) })
}

/// Judges the socket a connect() or send resolved to (BPF LSM), by the address it was
/// bound to: another name for it (a symlink, a relative path) changes nothing here.
/// Returns whether the call must fail.
#[inline(always)]
fn refuse_bound(sk: u64, hook: u8) -> bool {
    let Some(path) = scratch_path() else {
        return true;
    };
    let addr_off = global(&UNIX_SOCK_ADDR_OFF);
    if sk == 0 || addr_off == 0 {
        return false;
    }
    // SAFETY (these reads): bpf_probe_read_kernel checks the addresses.
    let Ok(addr) = (unsafe { bpf_probe_read_kernel((sk + addr_off) as *const u64) }) else {
        return refuse(hook, false, 0);
    };
    if addr == 0 {
        // An unbound peer (a socketpair's): it has no name to judge.
        return false;
    }
    let len: i32 =
        unsafe { bpf_probe_read_kernel((addr + global(&UNIX_ADDRESS_LEN_OFF)) as *const i32) }
            .unwrap_or(0);
    let readable =
        len > 0 && read_sockaddr(addr + global(&UNIX_ADDRESS_NAME_OFF), len as u32, path).is_some();
    refuse(hook, readable, 0)
}

/// The LSM verdict: an earlier refusal stays one; ours is -EPERM (through the stack as
/// a 64-bit constant on each path, as `mcpg_lsm_socket` explains).
#[inline(always)]
fn lsm_verdict(previous: i32, refused: bool) -> i32 {
    let mut verdict = 0i64;
    if previous != 0 || refused {
        // SAFETY: a local.
        unsafe { core::ptr::write_volatile(&raw mut verdict, -1) };
    }
    // SAFETY: a local.
    unsafe { core::ptr::read_volatile(&raw const verdict) as i32 }
}

/// connect() of a stream or seqpacket Unix socket, after the kernel found the listener
/// (`security_unix_stream_connect(sock, other, newsk)`): where BPF LSM runs, also on
/// kernels without the cgroup unix hooks.
#[lsm(hook = "unix_stream_connect")]
pub fn mcpg_lsm_unix_connect(ctx: LsmContext) -> i32 {
    let other: u64 = ctx.arg(1);
    let previous: i32 = ctx.arg(3);
    let refused = previous == 0 && refuse_bound(other, HOOK_LSM_UNIX_CONNECT);
    lsm_verdict(previous, refused)
}

/// A datagram to (or a connect() of) a datagram Unix socket, after the kernel found the
/// receiver (`security_unix_may_send(sock, other)`, both `struct socket`).
#[lsm(hook = "unix_may_send")]
pub fn mcpg_lsm_unix_send(ctx: LsmContext) -> i32 {
    let other: u64 = ctx.arg(1);
    let previous: i32 = ctx.arg(2);
    let mut refused = false;
    if previous == 0 && other != 0 {
        let sk_off = global(&SOCKET_SK_OFF);
        // SAFETY: bpf_probe_read_kernel checks the address.
        let sk = unsafe { bpf_probe_read_kernel((other + sk_off) as *const u64) }.unwrap_or(0);
        refused = sk_off != 0 && refuse_bound(sk, HOOK_LSM_UNIX_SEND);
    }
    lsm_verdict(previous, refused)
}
