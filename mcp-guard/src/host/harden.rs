//! What `mcp-guard exec` does to the process it starts, before it runs the command, so
//! that the cgroup hooks cannot be gone around from inside: capabilities that bypass
//! them (raw and packet sockets, network and cgroup administration, BPF) leave the
//! bounding, inheritable and ambient sets, and a seccomp filter (seccompiler) refuses
//! sockets no cgroup hook sees (AF_PACKET, AF_XDP, AF_VSOCK) and io_uring, whose socket
//! operations a seccomp filter cannot see. Where the kernel runs BPF LSM programs the
//! daemon refuses those families as well; this is the layer that holds where it does not.
//!
//! The command also runs in a mount namespace of its own in which every cgroup
//! hierarchy and bpffs are read-only (a root command can no longer write its pid into
//! another cgroup's `cgroup.procs` to leave its workload, nor remove pins), and the
//! sockets of local deputies that would connect for it (container runtimes, the D-Bus
//! system bus, systemd, the kubelet, mcp-guard's own) are covered by /dev/null: what
//! systemd's `ProtectControlGroups=` and `InaccessiblePaths=` do for a unit.

use thiserror::Error;

/// Capabilities that let a guarded process go around the guard, which the posture check
/// reports a workload's processes for (`mcp_guard_workload_privileged_processes`):
/// CAP_NET_RAW (raw and packet sockets), CAP_NET_ADMIN (qdiscs, XDP, interfaces),
/// CAP_SYS_ADMIN (cgroups, namespaces, mounts), CAP_BPF (detaching or rewriting
/// programs), CAP_SYS_PTRACE (borrowing an unguarded process), CAP_SYS_MODULE (kernel
/// code), CAP_SYS_RAWIO (raw device and memory access), CAP_DAC_OVERRIDE (writing the
/// cgroup tree or pins of other owners), CAP_PERFMON (kernel pointers for BPF).
/// `mcp-guard exec` drops every capability, these and all others, unless `--keep-cap`.
pub const DROPPED: [(u32, &str); 9] = [
    (13, "CAP_NET_RAW"),
    (12, "CAP_NET_ADMIN"),
    (21, "CAP_SYS_ADMIN"),
    (39, "CAP_BPF"),
    (19, "CAP_SYS_PTRACE"),
    (16, "CAP_SYS_MODULE"),
    (17, "CAP_SYS_RAWIO"),
    (1, "CAP_DAC_OVERRIDE"),
    (38, "CAP_PERFMON"),
];

/// Every capability the kernel defines, by number (capability.h).
pub const CAPABILITIES: [&str; 41] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// The capabilities a command may keep (`--keep-cap`), by name (`CAP_NET_BIND_SERVICE`
/// or `net_bind_service`). Those that go around the guard are refused.
///
/// # Errors
/// An unknown name, or one of [`DROPPED`].
pub fn keep_caps(names: &[String]) -> Result<Vec<u32>, String> {
    names
        .iter()
        .map(|n| {
            let upper = n.trim().to_ascii_uppercase();
            let full = if upper.starts_with("CAP_") {
                upper
            } else {
                format!("CAP_{upper}")
            };
            let Some(cap) = CAPABILITIES.iter().position(|c| *c == full) else {
                return Err(format!(
                    "--keep-cap {n}: no such capability; one of {}",
                    CAPABILITIES.join(", ")
                ));
            };
            if DROPPED.iter().any(|(c, _)| *c as usize == cap) {
                return Err(format!(
                    "--keep-cap {n}: {full} lets the command go around the guard; it cannot be kept (use --no-hardening to run unhardened, which the posture metric reports)"
                ));
            }
            Ok(cap as u32)
        })
        .collect()
}

/// Address families no cgroup hook sees.
pub const REFUSED_FAMILIES: [(i32, &str); 3] = [
    (libc::AF_PACKET, "AF_PACKET"),
    (libc::AF_XDP, "AF_XDP"),
    (libc::AF_VSOCK, "AF_VSOCK"),
];

#[derive(Debug, Error)]
pub enum HardenError {
    #[error("dropping {name} from the capability bounding set: {source}")]
    Bounding {
        name: &'static str,
        source: std::io::Error,
    },
    #[error("clearing inheritable and ambient capabilities: {0}")]
    Inheritable(std::io::Error),
    #[error("building the seccomp filter: {0}")]
    Filter(String),
    #[error("installing the seccomp filter: {0}")]
    Install(String),
    #[error("switching to the user and groups of --user/--group: {0}")]
    Identity(std::io::Error),
    #[error("isolating the command's mounts ({what}): {source}")]
    Mounts {
        what: String,
        source: std::io::Error,
    },
}

/// Unix sockets of local deputies (the config's built-in list, whose exact paths are
/// files to cover; the daemon's own sockets come in `hide`): a process that reaches one
/// can have an unguarded process connect, or start an unguarded container or unit, for
/// it. Each that exists is covered by /dev/null in the command's mount namespace (a
/// connect then fails).
fn hidden_sockets() -> impl Iterator<Item = std::path::PathBuf> {
    crate::config::unix_keys::BUILT_IN_DENY
        .iter()
        .filter(|p| p.starts_with('/') && !p.ends_with('*'))
        .map(std::path::PathBuf::from)
}

/// Hardens the calling process (call it last, right before exec).
///
/// # Errors
/// Any step failing: the caller must not run the command then (fail closed).
/// `hide`: more sockets to cover (the daemon's configured sockets).
/// `keep`: capabilities (numbers) the command keeps; every other one is dropped.
/// `id`: the user and groups to switch to (`exec --user` / `--group`), after the mounts
/// (which need CAP_SYS_ADMIN) and the bounding set (CAP_SETPCAP), before the other sets.
pub fn apply(
    hide: &[std::path::PathBuf],
    keep: &[u32],
    id: Option<&super::identity::Identity>,
) -> Result<(), HardenError> {
    isolate_mounts(hide)?;
    drop_capabilities(keep, id)?;
    install_filter()
}

/// A mount point path as /proc/self/mountinfo writes it (space, tab, newline and
/// backslash as octal escapes).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        if let (b'\\', Some(d)) = (b[i], octal) {
            out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn mount(source: Option<&str>, target: &str, flags: libc::c_ulong) -> Result<(), HardenError> {
    let c = |s: &str| std::ffi::CString::new(s).unwrap_or_default();
    let (src, tgt) = (source.map(c), c(target));
    // SAFETY: mount(2) with valid C strings (or null) and no data.
    let rc = unsafe {
        libc::mount(
            src.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            tgt.as_ptr(),
            std::ptr::null(),
            flags,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(HardenError::Mounts {
            what: target.to_string(),
            source: std::io::Error::last_os_error(),
        })
    }
}

/// A mount namespace of the command's own: cgroup hierarchies and bpffs read-only,
/// deputies' sockets covered.
fn isolate_mounts(hide: &[std::path::PathBuf]) -> Result<(), HardenError> {
    // SAFETY: plain syscall; affects this process only.
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        return Err(HardenError::Mounts {
            what: "unshare".into(),
            source: std::io::Error::last_os_error(),
        });
    }
    // Nothing done here propagates back to the host's mounts.
    mount(None, "/", libc::MS_REC | libc::MS_PRIVATE)?;
    let info =
        std::fs::read_to_string("/proc/self/mountinfo").map_err(|source| HardenError::Mounts {
            what: "/proc/self/mountinfo".into(),
            source,
        })?;
    for line in info.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let fields: Vec<&str> = left.split(' ').collect();
        let fstype = right.split(' ').next().unwrap_or_default();
        if !matches!(fstype, "cgroup2" | "cgroup" | "bpf") || fields.len() < 6 {
            continue;
        }
        let target = unescape(fields[4]);
        let mut flags = libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY;
        for o in fields[5].split(',') {
            flags |= match o {
                "nosuid" => libc::MS_NOSUID,
                "nodev" => libc::MS_NODEV,
                "noexec" => libc::MS_NOEXEC,
                "noatime" => libc::MS_NOATIME,
                "nodiratime" => libc::MS_NODIRATIME,
                "relatime" => libc::MS_RELATIME,
                _ => 0,
            };
        }
        mount(None, &target, flags)?;
    }
    for path in hidden_sockets().chain(hide.iter().cloned()) {
        let is_socket = std::fs::symlink_metadata(&path)
            .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()));
        if is_socket {
            mount(Some("/dev/null"), &path.to_string_lossy(), libc::MS_BIND)?;
        }
    }
    Ok(())
}

/// The highest capability number this kernel knows.
fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(63)
}

fn drop_capabilities(
    keep: &[u32],
    id: Option<&super::identity::Identity>,
) -> Result<(), HardenError> {
    for cap in (0..=last_cap()).filter(|c| !keep.contains(c)) {
        // SAFETY: plain prctl; EINVAL for a capability this kernel does not know is
        // harmless (it cannot be held either).
        let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINVAL) {
                return Err(HardenError::Bounding {
                    name: CAPABILITIES.get(cap as usize).copied().unwrap_or("CAP_?"),
                    source: e,
                });
            }
        }
    }
    // Ambient capabilities survive exec; inheritable ones come back for root at exec
    // (P'(permitted) includes P(inheritable) & F(inheritable)).
    // SAFETY: plain prctl.
    if unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    } != 0
    {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINVAL) {
            return Err(HardenError::Inheritable(e));
        }
    }
    // Another user: kept capabilities stay permitted across the switch (KEEPCAPS) and
    // are raised as ambient below, so they survive exec for a non-root command.
    let other_user = id.is_some_and(|id| id.uid != 0);
    if let Some(id) = id {
        if other_user && !keep.is_empty() {
            // SAFETY: plain prctl.
            if unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) } != 0 {
                return Err(HardenError::Identity(std::io::Error::last_os_error()));
            }
        }
        super::identity::switch(id).map_err(HardenError::Identity)?;
    }
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    let mut head = Header {
        version: VERSION_3,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: valid pointers to a v3 header and two data words.
    if unsafe { libc::syscall(libc::SYS_capget, &raw mut head, data.as_mut_ptr()) } != 0 {
        return Err(HardenError::Inheritable(std::io::Error::last_os_error()));
    }
    let mut mask = [0u32; 2];
    for &cap in keep {
        mask[(cap / 32) as usize] |= 1 << (cap % 32);
    }
    for (word, m) in data.iter_mut().zip(mask) {
        word.inheritable = if other_user {
            word.permitted & m
        } else {
            word.inheritable & m
        };
        word.permitted &= m;
        word.effective = word.permitted;
    }
    // SAFETY: as above.
    if unsafe { libc::syscall(libc::SYS_capset, &raw mut head, data.as_ptr()) } != 0 {
        return Err(HardenError::Inheritable(std::io::Error::last_os_error()));
    }
    if other_user {
        for &cap in keep {
            // SAFETY: plain prctl; the capability is permitted and inheritable.
            let rc = unsafe {
                libc::prctl(
                    libc::PR_CAP_AMBIENT,
                    libc::PR_CAP_AMBIENT_RAISE,
                    libc::c_ulong::from(cap),
                    0,
                    0,
                )
            };
            if rc != 0 {
                return Err(HardenError::Identity(std::io::Error::last_os_error()));
            }
        }
    }
    Ok(())
}

fn install_filter() -> Result<(), HardenError> {
    use std::collections::BTreeMap;

    use seccompiler::{
        BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
        SeccompRule,
    };
    let filter_err = |e: &dyn std::fmt::Display| HardenError::Filter(e.to_string());
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let mut socket_rules = Vec::new();
    for (family, _) in REFUSED_FAMILIES {
        let cond =
            SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, family as u64)
                .map_err(|e| filter_err(&e))?;
        socket_rules.push(SeccompRule::new(vec![cond]).map_err(|e| filter_err(&e))?);
    }
    rules.insert(libc::SYS_socket, socket_rules.clone());
    rules.insert(libc::SYS_socketpair, socket_rules);
    // io_uring can create sockets (IORING_OP_SOCKET) where seccomp never looks.
    rules.insert(libc::SYS_io_uring_setup, vec![]);
    let arch = std::env::consts::ARCH
        .try_into()
        .map_err(|e: seccompiler::BackendError| filter_err(&e))?;
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .map_err(|e| filter_err(&e))?;
    let prog: BpfProgram = filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| filter_err(&e))?;
    seccompiler::apply_filter(&prog).map_err(|e| HardenError::Install(e.to_string()))
}

/// The capabilities of `DROPPED` a process holds (effective or permitted), from the
/// `CapEff` and `CapPrm` lines of /proc/PID/status.
#[must_use]
pub fn held(status: &str) -> Vec<&'static str> {
    let mask = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .unwrap_or(0)
    };
    let caps = mask("CapEff:") | mask("CapPrm:");
    DROPPED
        .iter()
        .filter(|(c, _)| caps & (1u64 << c) != 0)
        .map(|(_, n)| *n)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_paths_are_unescaped() {
        assert_eq!(unescape("/sys/fs/cgroup"), "/sys/fs/cgroup");
        assert_eq!(unescape("/mnt/a\\040b"), "/mnt/a b");
        assert_eq!(unescape("/x\\"), "/x\\");
    }

    #[test]
    fn keep_caps_takes_names_and_refuses_what_goes_around_the_guard() {
        assert_eq!(keep_caps(&["net_bind_service".into()]), Ok(vec![10]));
        assert_eq!(keep_caps(&["CAP_CHOWN".into()]), Ok(vec![0]));
        assert!(keep_caps(&["CAP_NET_RAW".into()])
            .unwrap_err()
            .contains("lets the command go around the guard"));
        assert!(keep_caps(&["CAP_FLY".into()])
            .unwrap_err()
            .contains("no such capability"));
        assert_eq!(CAPABILITIES[39], "CAP_BPF");
        for (cap, name) in DROPPED {
            assert_eq!(CAPABILITIES[cap as usize], name);
        }
    }

    #[test]
    fn held_reads_effective_and_permitted() {
        let status = "Name:\tx\nCapInh:\t0000000000000000\nCapPrm:\t0000000000002000\nCapEff:\t0000008000000000\nCapBnd:\t000001ffffffffff\n";
        assert_eq!(held(status), ["CAP_NET_RAW", "CAP_BPF"]);
        assert!(held("CapPrm:\t0\nCapEff:\t0\n").is_empty());
    }
}
