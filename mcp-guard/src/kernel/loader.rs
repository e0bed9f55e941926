//! Loading the embedded eBPF object and attaching its programs to a cgroup, through pins
//! on bpffs so that enforcement outlives the daemon (see [`crate::kernel::pins`]).

use std::{collections::HashMap, fs::File, path::Path};

use aya::{
    programs::{
        links::{FdLink, PinnedLink},
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock, CgroupSockAddr, Lsm, SockOps,
        TracePoint,
    },
    Ebpf, EbpfError, EbpfLoader,
};
use tracing::{info, warn};

use crate::kernel::{
    manifest::{self, pinned_maps, Attach, CgroupKind},
    pins::Pins,
};

/// The BPF LSM program and its hook (also its link's pin name).
fn lsm() -> (&'static str, &'static str) {
    manifest::program(Attach::Lsm)
}

/// The BPF LSM hook, as metrics name it.
pub const LSM_HOOK: &str = "socket_create";

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("loading the eBPF object: {0} (mcp-guard needs root or CAP_BPF + CAP_NET_ADMIN + CAP_SYS_ADMIN, and a kernel with BPF ring buffers (5.8+), BTF and cgroup v2)")]
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
    #[error("pinned map {map}: {detail}")]
    Layout { map: String, detail: String },
    #[error("pinning the {hook} link at {path}: {detail}")]
    Pin {
        hook: String,
        path: String,
        detail: String,
    },
    /// The kernel's BTF (/sys/kernel/btf/vmlinux) cannot be read, or lacks what a
    /// program needs.
    #[error("the {hook} program needs the kernel's BTF (/sys/kernel/btf/vmlinux): {detail}")]
    Btf { hook: &'static str, detail: String },
    /// A program loaded outside aya (the unix hooks) that the kernel refused.
    #[error("program {name}: {detail}")]
    Raw { name: &'static str, detail: String },
    /// An attachment whose link cannot be made (the kernel lacks the link type).
    #[error("attaching {hook}: {detail}")]
    Link { hook: &'static str, detail: String },
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

/// An error with its sources, for messages that must say what the kernel answered.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// The object compiled by build.rs.
pub(crate) static OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mcp-guard"));

/// Loads the object. Maps already pinned under `pins` are reused with their contents
/// (policy, counters, queued events); missing ones are created and pinned.
///
/// # Errors
/// The kernel refused the object.
pub fn open(pins: &Pins) -> Result<Ebpf, LoadError> {
    raise_memlock();
    check_pinned_layouts(pins)?;
    let mut loader = EbpfLoader::new();
    let paths: Vec<(&str, std::path::PathBuf)> = pinned_maps().map(|n| (n, pins.map(n))).collect();
    for (name, path) in &paths {
        loader.map_pin_path(name, path.as_path());
    }
    // Struct offsets the BPF LSM unix programs need, from the kernel's BTF (0: unknown,
    // and those programs are then not attached).
    let offsets = crate::kernel::unix_hooks::offsets();
    for (name, value) in &offsets {
        loader.override_global(name, value, true);
    }
    Ok(loader.load(OBJECT)?)
}

/// A pinned map is reused only if its layout is this object's: a map whose layout
/// changes gets a new versioned name (`_1` → `_2`), so a pinned map of the same name
/// with another layout means pins from an incompatible build. Refused before anything
/// is touched: the pinned programs keep enforcing with their maps.
fn check_pinned_layouts(pins: &Pins) -> Result<(), LoadError> {
    let obj = aya_obj::Object::parse(OBJECT).map_err(|e| LoadError::Layout {
        map: "(object)".into(),
        detail: e.to_string(),
    })?;
    for name in pinned_maps() {
        let path = pins.map(name);
        if !path.exists() {
            continue;
        }
        let Some(ours) = obj.maps.get(name) else {
            continue;
        };
        let theirs = aya::maps::MapInfo::from_pin(&path).map_err(|e| LoadError::Layout {
            map: name.into(),
            detail: format!(
                "reading the pinned map at {}: {}",
                path.display(),
                chain(&e)
            ),
        })?;
        // aya's map types carry the kernel's numbers.
        let their_type = theirs.map_type().map_or(u32::MAX, |t| t as u32);
        let want = (
            ours.map_type(),
            ours.key_size(),
            ours.value_size(),
            ours.max_entries(),
        );
        let have = (
            their_type,
            theirs.key_size(),
            theirs.value_size(),
            theirs.max_entries(),
        );
        if want != have {
            return Err(LoadError::Layout {
                map: name.into(),
                detail: format!(
                    "the map pinned at {} has type {}, key/value size {}/{} and {} entries; \
                     this binary's eBPF object type {}, {}/{} and {}: the pins come from a \
                     build this one cannot upgrade in place. Nothing was changed and the \
                     pinned programs keep enforcing. Start the binary that made the pins, or \
                     remove them (`mcp-guard uninstall`, a moment without enforcement) and \
                     start this one",
                    path.display(),
                    have.0,
                    have.1,
                    have.2,
                    have.3,
                    want.0,
                    want.1,
                    want.2,
                    want.3
                ),
            });
        }
    }
    Ok(())
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

/// Which program id enforces each hook, as this daemon expects it.
#[derive(Debug, Default, Clone)]
pub struct Attachments {
    pub expected: HashMap<&'static str, u32>,
    /// Hooks whose pinned link (left by an earlier daemon) was adopted as is.
    pub adopted: Vec<&'static str>,
}

/// FNV-1a of the embedded object: identifies the code a daemon runs without needing
/// CAP_SYS_ADMIN to look programs up by id.
#[must_use]
pub fn object_hash() -> u32 {
    // Computed once: hashing the whole object took about a millisecond, twice per
    // policy install (every learned DNS answer waited on it).
    static HASH: std::sync::LazyLock<u32> = std::sync::LazyLock::new(|| {
        OBJECT.iter().fold(0x811c_9dc5_u32, |h, b| {
            (h ^ u32::from(*b)).wrapping_mul(0x0100_0193)
        })
    });
    *HASH
}

/// Loads (verifies) every socket program and makes sure each hook is enforced by a
/// pinned link on `cgroup_dir`:
/// - a pinned link from an earlier daemon, still attached, from the same object
///   (`pinned_hash`, recorded in the pinned config by that daemon): it is
///   adopted as is (no window without enforcement, no second attachment);
/// - otherwise our program is attached first, then its link is renamed over the old pin,
///   which releases the old link: at every instant at least one program enforces.
///
/// # Errors
/// The verifier refused a program, or attaching or pinning failed.
pub fn attach_sock_addr(
    ebpf: &mut Ebpf,
    cgroup_dir: &Path,
    pins: &Pins,
    pinned_hash: u32,
    skip: &[&str],
) -> Result<Attachments, LoadError> {
    let cg = File::open(cgroup_dir).map_err(|source| LoadError::Cgroup {
        path: cgroup_dir.display().to_string(),
        source,
    })?;
    let mut out = Attachments::default();
    for (name, hook, kind, attach_type) in manifest::cgroup_programs() {
        if skip.contains(&hook) {
            // Turned off: a link an earlier daemon pinned goes with its pin.
            if std::fs::remove_file(pins.link(hook)).is_ok() {
                warn!(
                    hook,
                    "turned off: removed the pinned link an earlier daemon left"
                );
            }
            continue;
        }
        let ours_id = load_cgroup_prog(ebpf, name, kind)?;
        if let Ok(pinned) = PinnedLink::from_pin(pins.link(hook)) {
            let link = FdLink::from(pinned);
            let pinned_prog = link.info().ok().map(|i| i.program_id());
            let still_attached = pinned_prog.is_some_and(|id| {
                attached_ids(&cg, attach_type).is_ok_and(|ids| ids.contains(&id))
            });
            if still_attached && pinned_hash == object_hash() {
                info!(
                    hook,
                    prog_id = pinned_prog,
                    "adopted the pinned link: enforcement never stopped"
                );
                out.expected.insert(hook, pinned_prog.unwrap_or_default());
                out.adopted.push(hook);
                continue;
            }
            warn!(
                hook,
                still_attached,
                "pinned link is detached or runs other code (upgrade): replacing it without a gap"
            );
        }
        attach_and_pin(ebpf, name, kind, hook, &cg, pins)?;
        out.expected.insert(hook, ours_id);
    }
    Ok(out)
}

fn load_cgroup_prog(
    ebpf: &mut Ebpf,
    name: &'static str,
    kind: CgroupKind,
) -> Result<u32, LoadError> {
    let err = |source| LoadError::Program { name, source };
    let program = ebpf.program_mut(name).ok_or(LoadError::Missing(name))?;
    macro_rules! load {
        ($ty:ty) => {{
            let p: &mut $ty = program.try_into().map_err(err)?;
            super::retry::load(|| p.load()).map_err(err)?;
            Ok(p.info().map_err(err)?.id())
        }};
    }
    match kind {
        CgroupKind::SockAddr => load!(CgroupSockAddr),
        CgroupKind::Sock => load!(CgroupSock),
        CgroupKind::SkbEgress => load!(CgroupSkb),
        CgroupKind::SockOps => load!(SockOps),
    }
}

/// Attaches a loaded cgroup program and hands back its link.
fn attach_cgroup_prog(
    ebpf: &mut Ebpf,
    name: &'static str,
    kind: CgroupKind,
    cg: &File,
) -> Result<FdLink, LoadError> {
    let err = |source| LoadError::Program { name, source };
    let program = ebpf.program_mut(name).ok_or(LoadError::Missing(name))?;
    // On 5.7+ aya attaches through a bpf_link, which the kernel always adds in multi mode
    // (and refuses attach flags for): our programs coexist with systemd's and other
    // agents', every one runs and any refusal wins.
    macro_rules! attach {
        ($ty:ty $(, $arg:expr)?) => {{
            let p: &mut $ty = program.try_into().map_err(err)?;
            let id = p.attach(cg, $($arg,)? CgroupAttachMode::Single).map_err(err)?;
            FdLink::try_from(p.take_link(id).map_err(err)?)
        }};
    }
    let fd_link = match kind {
        CgroupKind::SockAddr => attach!(CgroupSockAddr),
        CgroupKind::Sock => attach!(CgroupSock),
        CgroupKind::SkbEgress => attach!(CgroupSkb, CgroupSkbAttachType::Egress),
        CgroupKind::SockOps => attach!(SockOps),
    };
    fd_link.map_err(|e| LoadError::Pin {
        hook: name.to_string(),
        path: String::new(),
        detail: chain(&e),
    })
}

/// Pins `link` as the hook's link: pinned under a temporary name, then renamed over the
/// old pin (rename(2) on bpffs is atomic), which releases the old link only after the
/// new one is attached.
/// Pins a link at `links/<hook>`, replacing an older pin in one rename: the new link is
/// attached before the old one's last reference goes, so there is no gap. The socket
/// hooks and the TC classifier's links all go through here.
pub(crate) fn pin_over(link: FdLink, hook: &str, pins: &Pins) -> Result<(), LoadError> {
    let final_path = pins.link(hook);
    // bpffs refuses names with a dot.
    let tmp = final_path.with_file_name(format!("{hook}-new"));
    let _ = std::fs::remove_file(&tmp);
    let pinned = link.pin(&tmp).map_err(|e| LoadError::Pin {
        hook: hook.to_string(),
        path: tmp.display().to_string(),
        detail: chain(&e),
    })?;
    std::fs::rename(&tmp, &final_path).map_err(|e| LoadError::Pin {
        hook: hook.to_string(),
        path: final_path.display().to_string(),
        detail: e.to_string(),
    })?;
    drop(pinned);
    Ok(())
}

/// Loads and attaches the BPF LSM program that refuses AF_PACKET sockets, adopting a
/// pinned link from the same object. Returns its program id, or an error saying why the
/// kernel cannot run it (BPF LSM inactive, no BTF): the caller reports that packet
/// sockets stay open.
///
/// # Errors
/// BTF, load, attach or pin failed.
pub fn attach_lsm(ebpf: &mut Ebpf, pins: &Pins, pinned_hash: u32) -> Result<u32, LoadError> {
    let (name, _) = lsm();
    let err = |source| LoadError::Program { name, source };
    let btf = aya::Btf::from_sys_fs().map_err(|e| LoadError::Btf {
        hook: LSM_HOOK,
        detail: chain(&e),
    })?;
    let p: &mut Lsm = ebpf
        .program_mut(name)
        .ok_or(LoadError::Missing(name))?
        .try_into()
        .map_err(err)?;
    super::retry::load(|| p.load(LSM_HOOK, &btf)).map_err(err)?;
    let ours = p.info().map_err(err)?.id();
    if let Ok(pinned) = PinnedLink::from_pin(pins.link(LSM_HOOK)) {
        let link = FdLink::from(pinned);
        if let (Ok(info), true) = (link.info(), pinned_hash == object_hash()) {
            info!(hook = LSM_HOOK, "adopted the pinned LSM link");
            return Ok(info.program_id());
        }
    }
    let id = p.attach().map_err(err)?;
    // An LSM link is always an fd link: the conversion cannot fail.
    let link = FdLink::from(p.take_link(id).map_err(err)?);
    pin_over(link, LSM_HOOK, pins)?;
    Ok(ours)
}

/// The tracepoint programs: those that register workload cgroups at creation and drop
/// the registrations of removed ones, and those that keep tasks' homes (sticky
/// identity): (program, event, also the link's pin name, category).
pub fn tracepoints() -> impl Iterator<Item = (&'static str, &'static str, &'static str)> {
    manifest::tracepoints()
}

/// Makes sure tracefs is mounted where aya looks for tracepoint ids (a container may not
/// have it): mounts it at /sys/kernel/tracing if nothing is there.
fn ensure_tracefs() {
    let p = Path::new("/sys/kernel/tracing");
    if p.join("events").exists() || Path::new("/sys/kernel/debug/tracing/events").exists() {
        return;
    }
    if crate::kernel::pins::mount_fs(c"tracefs", c"/sys/kernel/tracing") {
        info!("mounted tracefs on /sys/kernel/tracing");
    }
}

/// Loads the cgroup tracepoint programs and makes sure each runs through a pinned link:
/// a pinned link of the same object is adopted as is (the kernel refuses the same
/// program twice on one tracepoint), otherwise ours is attached and pinned over it (no
/// gap). Returns the hooks adopted.
///
/// # Errors
/// Loading, attaching (no tracefs, tracepoints refused) or pinning failed: the daemon
/// reports that new workload cgroups wait for the scan.
pub fn attach_tracepoints(
    ebpf: &mut Ebpf,
    pins: &Pins,
    pinned_hash: u32,
) -> Result<Vec<&'static str>, LoadError> {
    ensure_tracefs();
    let mut adopted = Vec::new();
    for (name, event, category) in tracepoints() {
        let err = |source| LoadError::Program { name, source };
        let p: &mut TracePoint = ebpf
            .program_mut(name)
            .ok_or(LoadError::Missing(name))?
            .try_into()
            .map_err(err)?;
        if p.fd().is_err() {
            super::retry::load(|| p.load()).map_err(err)?;
        }
        if pinned_hash == object_hash() {
            if let Ok(pinned) = PinnedLink::from_pin(pins.link(event)) {
                if FdLink::from(pinned).info().is_ok() {
                    adopted.push(event);
                    continue;
                }
            }
        }
        let id = p.attach(category, event).map_err(err)?;
        let link =
            FdLink::try_from(p.take_link(id).map_err(err)?).map_err(|e| LoadError::Link {
                hook: event,
                detail: format!(
                    "{} (the kernel has no BPF perf links: 5.15 or newer needed)",
                    chain(&e)
                ),
            })?;
        pin_over(link, event, pins)?;
        info!(program = name, hook = event, "attached and pinned");
    }
    Ok(adopted)
}

/// The tracepoint hooks whose link pin is missing (removed behind the daemon's back).
#[must_use]
pub fn tracepoints_missing(pins: &Pins) -> Vec<&'static str> {
    tracepoints()
        .filter(|(_, event, _)| PinnedLink::from_pin(pins.link(event)).is_err())
        .map(|(_, event, _)| event)
        .collect()
}

fn attach_and_pin(
    ebpf: &mut Ebpf,
    name: &'static str,
    kind: CgroupKind,
    hook: &'static str,
    cg: &File,
    pins: &Pins,
) -> Result<(), LoadError> {
    let link = attach_cgroup_prog(ebpf, name, kind, cg)?;
    pin_over(link, hook, pins)?;
    info!(program = name, hook, "attached and pinned");
    Ok(())
}

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
pub(crate) fn attached_ids(cgroup: &File, attach_type: u32) -> std::io::Result<Vec<u32>> {
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

/// For each hook, whether the kernel lists the expected program as attached to
/// `cgroup_dir`. Someone with CAP_SYS_ADMIN can detach it (`bpftool link detach`); the
/// daemon checks every second, reports it, and attaches again.
#[must_use]
pub fn attachment_state(expected: &Attachments, cgroup_dir: &Path) -> Vec<(&'static str, bool)> {
    let cg = File::open(cgroup_dir).ok();
    manifest::cgroup_programs()
        .map(|(_, hook, _, at)| (hook, at))
        .chain(manifest::unix_programs().map(|(_, hook, at)| (hook, at)))
        .filter(|(hook, _)| expected.expected.contains_key(hook))
        .map(|(hook, at)| {
            let attached = match (&cg, expected.expected.get(hook)) {
                (Some(cg), Some(id)) => attached_ids(cg, at).is_ok_and(|ids| ids.contains(id)),
                _ => false,
            };
            (hook, attached)
        })
        .collect()
}

/// Attaches our (loaded) program for one hook again and pins it over the stale pin.
///
/// # Errors
/// Attaching or pinning failed.
pub fn reattach(
    ebpf: &mut Ebpf,
    hook: &str,
    cgroup_dir: &Path,
    pins: &Pins,
    expected: &mut Attachments,
) -> Result<(), LoadError> {
    if let Some((_, unix_hook, _)) = manifest::unix_programs().find(|(_, h, _)| *h == hook) {
        let id = crate::kernel::unix_hooks::reattach(ebpf, hook, cgroup_dir, pins)?;
        expected.expected.insert(unix_hook, id);
        expected.adopted.retain(|h| *h != unix_hook);
        return Ok(());
    }
    let Some((name, hook, kind, _)) = manifest::cgroup_programs().find(|(_, h, _, _)| *h == hook)
    else {
        return Err(LoadError::Missing("unknown hook"));
    };
    let cg = File::open(cgroup_dir).map_err(|source| LoadError::Cgroup {
        path: cgroup_dir.display().to_string(),
        source,
    })?;
    attach_and_pin(ebpf, name, kind, hook, &cg, pins)?;
    let id = ebpf
        .program(name)
        .ok_or(LoadError::Missing(name))?
        .info()
        .map_err(|source| LoadError::Program { name, source })?
        .id();
    expected.expected.insert(hook, id);
    expected.adopted.retain(|h| *h != hook);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::manifest::{MAPS, PROGRAMS};

    /// Every map and program of the embedded object is classified: a map as pinned or
    /// ephemeral (with its reason), a program by the table that loads and attaches it;
    /// and every name those tables give is in the object.
    #[test]
    fn every_map_and_program_is_classified() {
        let obj = aya_obj::Object::parse(OBJECT).expect("the embedded object parses");
        let mut in_object: Vec<&str> = obj.maps.keys().map(String::as_str).collect();
        in_object.sort_unstable();
        let mut classified: Vec<&str> = MAPS.iter().map(|(n, _)| *n).collect();
        classified.sort_unstable();
        // A section map (.rodata, .bss, .data) exists only when the compiler emits it.
        let unclassified: Vec<_> = in_object
            .iter()
            .filter(|n| !classified.contains(n))
            .collect();
        assert!(
            unclassified.is_empty(),
            "maps nobody classified as pinned or ephemeral (kernel/manifest.rs MAPS): {unclassified:?}"
        );
        let missing: Vec<_> = classified
            .iter()
            .filter(|n| !n.starts_with('.') && !in_object.contains(n))
            .collect();
        assert!(
            missing.is_empty(),
            "classified maps not in the object: {missing:?}"
        );

        let known: Vec<&str> = PROGRAMS.iter().map(|p| p.name).collect();
        let mut programs: Vec<&str> = obj.programs.keys().map(String::as_str).collect();
        programs.sort_unstable();
        let unknown: Vec<_> = programs.iter().filter(|p| !known.contains(p)).collect();
        assert!(
            unknown.is_empty(),
            "programs the manifest does not classify (kernel/manifest.rs PROGRAMS): {unknown:?}"
        );
        // Names the code uses as constants are the manifest's.
        assert_eq!(manifest::program(Attach::Tc).0, crate::kernel::tc::PROGRAM);
        assert_eq!(lsm().1, LSM_HOOK);
        let absent: Vec<_> = known.iter().filter(|p| !programs.contains(p)).collect();
        assert!(
            absent.is_empty(),
            "the manifest names programs not in the object: {absent:?}"
        );
    }
}
