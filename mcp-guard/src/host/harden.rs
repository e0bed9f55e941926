//! What `mcp-guard exec` does to the process it starts, before it runs the command, so
//! that the cgroup hooks cannot be gone around from inside: capabilities that bypass
//! them (raw and packet sockets, network and cgroup administration, BPF) leave the
//! bounding, inheritable and ambient sets, and a seccomp filter (seccompiler) refuses
//! sockets no cgroup hook sees (AF_PACKET, AF_XDP, AF_VSOCK) and io_uring, whose socket
//! operations a seccomp filter cannot see. Where the kernel runs BPF LSM programs the
//! daemon refuses those families as well; this is the layer that holds where it does not.

use thiserror::Error;

/// Capabilities a guarded process must not hold: each one can go around the cgroup
/// hooks (CAP_NET_RAW: raw and packet sockets; CAP_NET_ADMIN: qdiscs, XDP, interfaces;
/// CAP_SYS_ADMIN: cgroups, namespaces, mounts; CAP_BPF: detaching or rewriting programs).
pub const DROPPED: [(u32, &str); 4] = [
    (13, "CAP_NET_RAW"),
    (12, "CAP_NET_ADMIN"),
    (21, "CAP_SYS_ADMIN"),
    (39, "CAP_BPF"),
];

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
}

/// Hardens the calling process (call it last, right before exec).
///
/// # Errors
/// Any step failing: the caller must not run the command then (fail closed).
pub fn apply() -> Result<(), HardenError> {
    drop_capabilities()?;
    install_filter()
}

fn drop_capabilities() -> Result<(), HardenError> {
    for (cap, name) in DROPPED {
        // SAFETY: plain prctl; EINVAL for a capability this kernel does not know is
        // harmless (it cannot be held either).
        let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINVAL) {
                return Err(HardenError::Bounding { name, source: e });
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
    for (cap, _) in DROPPED {
        let (word, bit) = ((cap / 32) as usize, 1u32 << (cap % 32));
        data[word].inheritable &= !bit;
        data[word].effective &= !bit;
        data[word].permitted &= !bit;
    }
    // SAFETY: as above.
    if unsafe { libc::syscall(libc::SYS_capset, &raw mut head, data.as_ptr()) } != 0 {
        return Err(HardenError::Inheritable(std::io::Error::last_os_error()));
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
    fn held_reads_effective_and_permitted() {
        let status = "Name:\tx\nCapInh:\t0000000000000000\nCapPrm:\t0000000000002000\nCapEff:\t0000008000000000\nCapBnd:\t000001ffffffffff\n";
        assert_eq!(held(status), ["CAP_NET_RAW", "CAP_BPF"]);
        assert!(held("CapPrm:\t0\nCapEff:\t0\n").is_empty());
    }
}
