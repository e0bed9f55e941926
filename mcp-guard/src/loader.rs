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
