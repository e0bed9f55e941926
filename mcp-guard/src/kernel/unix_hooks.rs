//! The AF_UNIX hooks (`cgroup/connect_unix`, `cgroup/sendmsg_unix`, Linux 6.7). aya 0.14
//! has no attach type for them, so their programs are built as `cgroup/connect4`
//! programs and loaded here: aya-obj parses and relocates the embedded object against
//! the maps this daemon uses (the pinned ones by their pins, the rest from its `Ebpf`),
//! and three bpf(2) commands load the program with the unix attach type, attach it to
//! the attach cgroup through a bpf_link and pin that link. Everything else (adoption of
//! a pinned link, replacing it without a gap, self-repair) works as for the other hooks.
//! Here too: the BPF LSM unix programs, which aya loads, and the struct offsets from the
//! kernel's BTF they need.

use std::{
    collections::{HashMap, HashSet},
    ffi::CString,
    fs::File,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd},
    path::Path,
};

use aya::{
    maps::{Map, MapData},
    programs::{
        links::{FdLink, PinnedLink},
        Lsm,
    },
    Ebpf,
};
use tracing::info;

use crate::kernel::{
    loader::{attached_ids, chain, object_hash, pin_over, LoadError, OBJECT},
    manifest::{self, pinned_maps, Attach},
    pins::Pins,
};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;

/// The head of `union bpf_attr` for BPF_PROG_LOAD (include/uapi/linux/bpf.h).
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// BPF_LINK_CREATE.
#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
    _rest: [u64; 4],
}

/// BPF_OBJ_GET_INFO_BY_FD.
#[repr(C)]
#[derive(Default)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

pub(crate) fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<i64> {
    // SAFETY: attr is a bpf_attr prefix of the command, sized by its type.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, size_of::<T>()) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// The id of a loaded program (the second word of `struct bpf_prog_info`).
fn prog_id(fd: &OwnedFd) -> std::io::Result<u32> {
    let mut info = [0u32; 2];
    let mut attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: 8,
        info: info.as_mut_ptr() as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(info[1])
}

/// The data of a map of the kinds this object defines.
pub(crate) fn map_data(m: &Map) -> Option<&MapData> {
    Some(match m {
        Map::Array(d)
        | Map::HashMap(d)
        | Map::LpmTrie(d)
        | Map::LruHashMap(d)
        | Map::PerCpuArray(d)
        | Map::PerCpuHashMap(d)
        | Map::RingBuf(d) => d,
        _ => return None,
    })
}

fn program_error(name: &'static str, detail: String) -> LoadError {
    LoadError::Raw { name, detail }
}

/// Loads one unix program with its attach type. Errors carry the verifier's last lines.
fn load(
    ebpf: &Ebpf,
    pins: &Pins,
    name: &'static str,
    attach_type: u32,
) -> Result<OwnedFd, LoadError> {
    let err = |d: String| program_error(name, d);
    let mut obj = aya_obj::Object::parse(OBJECT).map_err(|e| err(e.to_string()))?;
    // The maps the programs use: pinned ones by their pins (the daemon took them out of
    // its Ebpf), the rest as this load created them.
    let mut opened: Vec<(String, MapData)> = Vec::new();
    for n in pinned_maps() {
        let d = MapData::from_pin(pins.map(n)).map_err(|e| err(format!("map {n}: {e}")))?;
        opened.push((n.to_string(), d));
    }
    let mut fds: HashMap<String, RawFd> = ebpf
        .maps()
        .filter_map(|(n, m)| map_data(m).map(|d| (n.to_string(), d.fd().as_fd().as_raw_fd())))
        .collect();
    for (n, d) in &opened {
        fds.insert(n.clone(), d.fd().as_fd().as_raw_fd());
    }
    let maps = obj.maps.clone();
    let missing: Vec<&String> = maps.keys().filter(|n| !fds.contains_key(*n)).collect();
    if !missing.is_empty() {
        return Err(err(format!("maps without a descriptor: {missing:?}")));
    }
    let text: HashSet<usize> = obj.functions.keys().map(|(s, _)| *s).collect();
    obj.relocate_maps(maps.iter().map(|(n, m)| (n.as_str(), fds[n], m)), &text)
        .map_err(|e| err(e.to_string()))?;
    obj.relocate_calls(&text).map_err(|e| err(e.to_string()))?;
    let program = obj.programs.get(name).ok_or(LoadError::Missing(name))?;
    let license = program.license.clone();
    let insns = &obj.functions[&program.function_key()].instructions;
    let mut log = vec![0u8; 64 << 20];
    let mut prog_name = [0u8; 16];
    for (d, s) in prog_name.iter_mut().zip(name.bytes().take(15)) {
        *d = s;
    }
    let license = CString::new(license.as_bytes()).unwrap_or_else(|_| c"GPL".into());
    let mut attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        prog_name,
        expected_attach_type: attach_type,
        ..Default::default()
    };
    let fd = match super::retry::load(|| bpf(BPF_PROG_LOAD, &mut attr)) {
        Ok(fd) => fd,
        Err(first) => {
            // Again with the verifier's log, to say why.
            attr.log_level = 1;
            attr.log_size = log.len() as u32;
            attr.log_buf = log.as_mut_ptr() as u64;
            match super::retry::load(|| bpf(BPF_PROG_LOAD, &mut attr)) {
                Ok(fd) => fd,
                Err(second) => {
                    let text = String::from_utf8_lossy(&log);
                    if let Ok(p) = std::env::var("MCPG_VERIFIER_LOG") {
                        let _ = std::fs::write(p, text.as_bytes());
                    }
                    let text = text.trim_end_matches('\0');
                    let lines: Vec<&str> = text.lines().collect();
                    let tail = lines[lines.len().saturating_sub(20)..].join("\n");
                    return Err(err(format!(
                        "the kernel refused it: {first} ({second} with the verifier's log)\n{tail}"
                    )));
                }
            }
        }
    };
    // SAFETY: a new descriptor the kernel just returned.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Loads one unix program, attaches it to `cg` and pins its link over the hook's pin.
fn attach_one(
    ebpf: &Ebpf,
    pins: &Pins,
    cg: &File,
    name: &'static str,
    hook: &'static str,
    attach_type: u32,
) -> Result<u32, LoadError> {
    let prog = load(ebpf, pins, name, attach_type)?;
    let id = prog_id(&prog).map_err(|e| program_error(name, e.to_string()))?;
    let mut attr = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target_fd: cg.as_raw_fd() as u32,
        attach_type,
        ..Default::default()
    };
    let link = bpf(BPF_LINK_CREATE, &mut attr)
        .map_err(|e| program_error(name, format!("attaching to the cgroup: {e}")))?;
    // SAFETY: a new descriptor the kernel just returned.
    let link = unsafe { OwnedFd::from_raw_fd(link as RawFd) };
    // Through a pin so that aya's link type carries it: pinned under a temporary name,
    // then renamed over the hook's pin (no gap), as every other hook's link.
    let tmp = pins.link(&format!("{hook}-raw"));
    let _ = std::fs::remove_file(&tmp);
    pin_raw(&link, &tmp).map_err(|e| program_error(name, format!("pinning: {e}")))?;
    let pinned = PinnedLink::from_pin(&tmp).map_err(|e| program_error(name, e.to_string()))?;
    let _ = std::fs::remove_file(&tmp);
    pin_over(FdLink::from(pinned), hook, pins)?;
    Ok(id)
}

const BPF_OBJ_PIN: libc::c_long = 6;

#[repr(C)]
#[derive(Default)]
struct PinAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

fn pin_raw(fd: &OwnedFd, path: &Path) -> std::io::Result<()> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let mut attr = PinAttr {
        pathname: c.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        file_flags: 0,
    };
    bpf(BPF_OBJ_PIN, &mut attr).map(|_| ())
}

/// Makes sure each unix hook runs through a pinned link on `cgroup_dir`: a pinned link
/// of the same object still attached is adopted, otherwise ours is attached and pinned
/// over it. Returns (hook, program id) of each.
///
/// # Errors
/// The kernel has no unix hooks (before 6.7: the load is refused as an unknown attach
/// type), or loading, attaching or pinning failed. The caller reports that AF_UNIX
/// destinations are not judged.
pub fn attach(
    ebpf: &Ebpf,
    cgroup_dir: &Path,
    pins: &Pins,
    pinned_hash: u32,
) -> Result<Vec<(&'static str, u32)>, LoadError> {
    let cg = File::open(cgroup_dir).map_err(|source| LoadError::Cgroup {
        path: cgroup_dir.display().to_string(),
        source,
    })?;
    let mut out = Vec::new();
    for (name, hook, attach_type) in manifest::unix_programs() {
        if pinned_hash == object_hash() {
            if let Ok(pinned) = PinnedLink::from_pin(pins.link(hook)) {
                let id = FdLink::from(pinned).info().ok().map(|i| i.program_id());
                if let Some(id) = id {
                    if attached_ids(&cg, attach_type).is_ok_and(|ids| ids.contains(&id)) {
                        info!(
                            hook,
                            prog_id = id,
                            "adopted the pinned link: enforcement never stopped"
                        );
                        out.push((hook, id));
                        continue;
                    }
                }
            }
        }
        out.push((hook, attach_one(ebpf, pins, &cg, name, hook, attach_type)?));
    }
    Ok(out)
}

/// Attaches one unix hook again (self-repair) and pins it over the stale pin.
///
/// # Errors
/// As [`attach`].
pub fn reattach(ebpf: &Ebpf, hook: &str, cgroup_dir: &Path, pins: &Pins) -> Result<u32, LoadError> {
    let Some((name, hook, attach_type)) = manifest::unix_programs().find(|(_, h, _)| *h == hook)
    else {
        return Err(LoadError::Missing("unknown hook"));
    };
    let cg = File::open(cgroup_dir).map_err(|source| LoadError::Cgroup {
        path: cgroup_dir.display().to_string(),
        source,
    })?;
    attach_one(ebpf, pins, &cg, name, hook, attach_type)
}

/// The offsets `mcp-guard-ebpf/src/unix.rs` reads through, by its global's name.
#[must_use]
pub fn offsets() -> [(&'static str, u32); 4] {
    let off = |s: &str, m: &str| {
        crate::kernel::btf::kernel_member_offset(s, m)
            .and_then(|o| u32::try_from(o).ok())
            .unwrap_or(0)
    };
    [
        ("UNIX_SOCK_ADDR_OFF", off("unix_sock", "addr")),
        ("SOCKET_SK_OFF", off("socket", "sk")),
        ("UNIX_ADDRESS_LEN_OFF", off("unix_address", "len")),
        ("UNIX_ADDRESS_NAME_OFF", off("unix_address", "name")),
    ]
}

/// Loads and attaches the BPF LSM unix programs (`unix_stream_connect`, `unix_may_send`),
/// adopting pinned links of the same object. Returns (hook, program id) of each.
///
/// # Errors
/// BPF LSM does not run, the kernel's BTF lacks an offset they need, or loading,
/// attaching or pinning failed: the caller reports it.
pub fn attach_lsm(
    ebpf: &mut Ebpf,
    pins: &Pins,
    pinned_hash: u32,
) -> Result<Vec<(&'static str, u32)>, LoadError> {
    if let Some((name, _)) = offsets().iter().find(|(_, v)| *v == 0) {
        return Err(LoadError::Btf {
            hook: "unix_stream_connect",
            detail: format!("it does not give {name}"),
        });
    }
    let btf = aya::Btf::from_sys_fs().map_err(|e| LoadError::Btf {
        hook: "unix_stream_connect",
        detail: chain(&e),
    })?;
    let mut out = Vec::new();
    for (name, hook) in manifest::programs(Attach::LsmUnix) {
        let err = |source| LoadError::Program { name, source };
        let p: &mut Lsm = ebpf
            .program_mut(name)
            .ok_or(LoadError::Missing(name))?
            .try_into()
            .map_err(err)?;
        super::retry::load(|| p.load(hook, &btf)).map_err(err)?;
        let ours = p.info().map_err(err)?.id();
        if pinned_hash == object_hash() {
            if let Ok(pinned) = PinnedLink::from_pin(pins.link(hook)) {
                if let Ok(info) = FdLink::from(pinned).info() {
                    info!(hook, "adopted the pinned LSM link");
                    out.push((hook, info.program_id()));
                    continue;
                }
            }
        }
        let id = p.attach().map_err(err)?;
        let link = FdLink::from(p.take_link(id).map_err(err)?);
        pin_over(link, hook, pins)?;
        out.push((hook, ours));
    }
    Ok(out)
}
