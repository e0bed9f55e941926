//! Loading the embedded eBPF object and attaching its programs to a cgroup.

use std::{fs::File, path::Path};

use aya::{
    programs::{CgroupAttachMode, CgroupSockAddr},
    Ebpf, EbpfError,
};
use tracing::info;

/// The socket-level programs, by kernel program name.
pub const SOCK_ADDR_PROGRAMS: [&str; 4] = [
    "mcpg_connect4",
    "mcpg_connect6",
    "mcpg_sendmsg4",
    "mcpg_sendmsg6",
];

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("loading the eBPF object: {0} (mcp-guard needs root or CAP_BPF + CAP_NET_ADMIN, and a kernel with BPF and BTF)")]
    Object(#[from] EbpfError),
    #[error("program {0} is missing from the eBPF object")]
    Missing(&'static str),
    #[error("program {name}: {}", tail(source))]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("opening cgroup {path}: {source}")]
    Cgroup {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// The verifier's log can run to thousands of lines; its last lines say what failed.
fn tail(e: &aya::programs::ProgramError) -> String {
    let text = e.to_string();
    let lines: Vec<&str> = text.lines().collect();
    if lines.len() <= 25 {
        return text;
    }
    format!(
        "{}\n[... {} verifier lines omitted ...]\n{}",
        lines[0],
        lines.len() - 25,
        lines[lines.len() - 24..].join("\n")
    )
}

/// The object compiled by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mcp-guard"));

/// Loads the object; maps are created, programs not yet loaded.
///
/// # Errors
/// The kernel refused the object.
pub fn open() -> Result<Ebpf, LoadError> {
    raise_memlock();
    Ok(Ebpf::load(OBJECT)?)
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK.
fn raise_memlock() {
    let r = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid pointer.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &r) };
}

/// Loads (verifies) every socket program and attaches it to `cgroup_dir`. The links
/// stay owned by `ebpf`: dropping it detaches.
///
/// # Errors
/// The verifier refused a program, or attaching failed.
pub fn attach_sock_addr(ebpf: &mut Ebpf, cgroup_dir: &Path) -> Result<(), LoadError> {
    let cg = File::open(cgroup_dir).map_err(|source| LoadError::Cgroup {
        path: cgroup_dir.display().to_string(),
        source,
    })?;
    for name in SOCK_ADDR_PROGRAMS {
        let prog: &mut CgroupSockAddr = ebpf
            .program_mut(name)
            .ok_or(LoadError::Missing(name))?
            .try_into()
            .map_err(|source| LoadError::Program { name, source })?;
        prog.load()
            .map_err(|source| LoadError::Program { name, source })?;
        // On 5.7+ aya attaches through a bpf_link, which the kernel always adds in
        // multi mode (and refuses attach flags for): our programs coexist with systemd's
        // and other agents', every one runs and any refusal wins.
        prog.attach(&cg, CgroupAttachMode::Single)
            .map_err(|source| LoadError::Program { name, source })?;
        info!(program = name, cgroup = %cgroup_dir.display(), "attached");
    }
    Ok(())
}

/// Kernel attach types of the socket programs, in [`SOCK_ADDR_PROGRAMS`] order
/// (BPF_CGROUP_INET4_CONNECT, INET6_CONNECT, UDP4_SENDMSG, UDP6_SENDMSG).
const SOCK_ADDR_ATTACH_TYPES: [u32; 4] = [10, 11, 14, 15];

/// `union bpf_attr` as BPF_PROG_QUERY uses it.
#[repr(C)]
#[derive(Default)]
struct ProgQueryAttr {
    target_fd: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad: u32,
    prog_attach_flags: u64,
    link_ids: u64,
    link_attach_flags: u64,
    revision: u64,
    _rest: [u64; 8],
}

const BPF_PROG_QUERY: libc::c_long = 16;

/// Ids of the programs directly attached to a cgroup for one attach type.
fn attached_ids(cgroup: &File, attach_type: u32) -> std::io::Result<Vec<u32>> {
    use std::os::fd::AsRawFd as _;
    let mut ids = vec![0u32; 64];
    let mut attr = ProgQueryAttr {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_type,
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: ids.len() as u32,
        ..Default::default()
    };
    // SAFETY: attr is a valid, large-enough bpf_attr; prog_ids points to prog_cnt u32s.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_QUERY,
            &raw mut attr,
            size_of::<ProgQueryAttr>(),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    ids.truncate(attr.prog_cnt as usize);
    Ok(ids)
}

/// Which of our socket programs the kernel reports attached to `cgroup_dir`, by hook
/// name (connect4, ...). Someone with CAP_SYS_ADMIN can detach them (`bpftool cgroup
/// detach`); the daemon checks every second, reports it, and re-attaches.
pub fn attachment_state(ebpf: &Ebpf, cgroup_dir: &Path) -> Vec<(&'static str, bool)> {
    let Ok(cg) = File::open(cgroup_dir) else {
        return SOCK_ADDR_PROGRAMS
            .iter()
            .map(|n| (hook_of(n), false))
            .collect();
    };
    SOCK_ADDR_PROGRAMS
        .iter()
        .zip(SOCK_ADDR_ATTACH_TYPES)
        .map(|(name, at)| {
            let ours = ebpf
                .program(name)
                .and_then(|p| p.info().ok())
                .map(|i| i.id());
            let attached =
                ours.is_some_and(|id| attached_ids(&cg, at).is_ok_and(|ids| ids.contains(&id)));
            (hook_of(name), attached)
        })
        .collect()
}

/// "mcpg_connect4" -> "connect4".
#[must_use]
pub fn hook_of(program: &str) -> &'static str {
    match program {
        "mcpg_connect4" => "connect4",
        "mcpg_connect6" => "connect6",
        "mcpg_sendmsg4" => "sendmsg4",
        "mcpg_sendmsg6" => "sendmsg6",
        _ => "unknown",
    }
}

/// Re-attaches one already-loaded socket program.
///
/// # Errors
/// Attaching failed.
pub fn reattach(ebpf: &mut Ebpf, hook: &str, cgroup_dir: &Path) -> Result<(), LoadError> {
    let Some(name) = SOCK_ADDR_PROGRAMS
        .iter()
        .copied()
        .find(|n| hook_of(n) == hook)
    else {
        return Err(LoadError::Missing("unknown hook"));
    };
    let cg = File::open(cgroup_dir).map_err(|source| LoadError::Cgroup {
        path: cgroup_dir.display().to_string(),
        source,
    })?;
    let prog: &mut CgroupSockAddr = ebpf
        .program_mut(name)
        .ok_or(LoadError::Missing(name))?
        .try_into()
        .map_err(|source| LoadError::Program { name, source })?;
    prog.attach(&cg, CgroupAttachMode::Single)
        .map_err(|source| LoadError::Program { name, source })?;
    Ok(())
}
