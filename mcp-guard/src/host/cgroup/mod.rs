//! cgroup v2: where it is mounted, a workload's cgroup id, creating and joining cgroups.

use std::{
    collections::BTreeMap,
    fs, io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

/// The cgroup v2 mount point, read from /proc/self/mountinfo (never assumed: on hybrid
/// systems it is /sys/fs/cgroup/unified).
///
/// # Errors
/// No cgroup2 filesystem is mounted.
pub fn mount_point() -> io::Result<PathBuf> {
    let text = fs::read_to_string("/proc/self/mountinfo")?;
    text.lines()
        .find_map(|line| {
            // "ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS... - FSTYPE SOURCE SUPEROPTS"
            let (left, right) = line.split_once(" - ")?;
            (right.split_whitespace().next()? == "cgroup2").then(|| {
                PathBuf::from(unescape(left.split_whitespace().nth(4).unwrap_or("")))
            })
        })
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no cgroup2 filesystem in /proc/self/mountinfo: mcp-guard needs the unified cgroup hierarchy (cgroup v2) mounted"))
}

/// The host cgroup v2 tree: `configured` if given (it must be a cgroup2 mount),
/// otherwise found from mountinfo.
///
/// # Errors
/// Nothing suitable is mounted.
pub fn root(configured: Option<&Path>) -> io::Result<PathBuf> {
    const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
    let Some(p) = configured else {
        return mount_point();
    };
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    // SAFETY: statfs with a valid C string and an out struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &raw mut st) } != 0
        || st.f_type as i64 != CGROUP2_SUPER_MAGIC
    {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("daemon.cgroup_root {} is not a cgroup v2 mount: mount the host's /sys/fs/cgroup there", p.display()),
        ));
    }
    Ok(p.to_path_buf())
}

/// The path (below the mount) of the cgroup with id `id`, searched in the subtree of
/// `under`: cgroup ids are inode numbers, so this needs no /proc and works from inside a
/// container's cgroup namespace.
#[must_use]
pub fn find_by_id(mount: &Path, under: &str, id: u64) -> Option<String> {
    let found = find_below(&fs_path(mount, under), id, crate::MAX_DEPTH)?;
    let rel = found.strip_prefix(mount).ok()?;
    Some(format!("/{}", rel.display()))
}

/// The directory of the cgroup with id `id` at or below the directory `dir`, at most
/// `depth` levels down.
#[must_use]
pub fn find_below(dir: &Path, id: u64, depth: usize) -> Option<PathBuf> {
    if fs::metadata(dir).ok()?.ino() == id {
        return Some(dir.to_path_buf());
    }
    if depth == 0 {
        return None;
    }
    fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .find_map(|e| find_below(&e.path(), id, depth - 1))
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    let mut out = String::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(v as char);
                i += 4;
                continue;
            }
        }
        out.push(b[i] as char);
        i += 1;
    }
    out
}

/// Absolute filesystem path of a cgroup given as a path below the mount.
#[must_use]
pub fn fs_path(mount: &Path, cgroup: &str) -> PathBuf {
    mount.join(cgroup.trim_start_matches('/'))
}

/// The cgroup id the kernel programs see: on cgroup v2 it is the directory's inode number.
///
/// # Errors
/// The cgroup does not exist (yet).
pub fn id(mount: &Path, cgroup: &str) -> io::Result<u64> {
    Ok(fs::metadata(fs_path(mount, cgroup))?.ino())
}

/// Filesystem errors other than "not there" met while looking for cgroups (out of file
/// descriptors, memory, permission): a scan that met one is incomplete, and what it did
/// not find may still exist. Registrations are never removed on such a scan.
static SCAN_ERRORS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn note(e: &io::Error) {
    if e.kind() != io::ErrorKind::NotFound {
        SCAN_ERRORS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// How many incomplete lookups there were so far (compare before and after a scan).
#[must_use]
pub fn scan_errors() -> u64 {
    SCAN_ERRORS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Creates the cgroup (and its parents) if needed.
///
/// # Errors
/// Creating the directory failed.
pub fn create(mount: &Path, cgroup: &str) -> io::Result<PathBuf> {
    let p = fs_path(mount, cgroup);
    fs::create_dir_all(&p)?;
    Ok(p)
}

/// The processes (thread group ids) in one cgroup, not its children; none if it cannot
/// be read (gone, or not a cgroup).
#[must_use]
pub fn procs(cgroup_dir: &Path) -> Vec<u32> {
    fs::read_to_string(cgroup_dir.join("cgroup.procs"))
        .map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// Moves a process into a cgroup.
///
/// # Errors
/// Writing cgroup.procs failed (for example, the cgroup has child cgroups with
/// controllers enabled, or the process is gone).
pub fn join(cgroup_dir: &Path, pid: u32) -> io::Result<()> {
    fs::write(cgroup_dir.join("cgroup.procs"), pid.to_string())
}

/// What a cgroup path says about its owner: the systemd unit, and for containers the
/// Kubernetes pod UID, the container id and the runtime.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Owner {
    pub systemd_unit: Option<String>,
    pub pod_uid: Option<String>,
    pub container_id: Option<String>,
    pub container_runtime: Option<String>,
}

fn is_container_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Parses the shapes kubelet, containerd, CRI-O and Docker give cgroups, with the
/// systemd and cgroupfs drivers:
/// `/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice/cri-containerd-<id>.scope`,
/// `/kubepods/burstable/pod<uid>/<id>`, `/kubepods/pod<uid>/crio-<id>`,
/// `/system.slice/docker-<id>.scope`, `/docker/<id>`.
#[must_use]
pub fn owner(path: &str) -> Owner {
    let mut o = Owner::default();
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    for p in &parts {
        let base = p
            .strip_suffix(".slice")
            .or_else(|| p.strip_suffix(".scope"))
            .unwrap_or(p);
        // Pod: "pod<uid>" (cgroupfs) or "...-pod<uid_with_underscores>.slice" (systemd).
        if let Some(i) = base.rfind("pod") {
            let uid = &base[i + 3..];
            if (i == 0 || base[..i].ends_with('-'))
                && uid.len() == 36
                && uid
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() || b == b'-' || b == b'_')
            {
                o.pod_uid = Some(uid.replace('_', "-"));
            }
        }
        for (prefix, runtime) in [
            ("cri-containerd-", "containerd"),
            ("crio-", "cri-o"),
            ("docker-", "docker"),
            ("", ""),
        ] {
            if let Some(id) = base.strip_prefix(prefix) {
                if is_container_id(id) {
                    let runtime = if runtime.is_empty() {
                        if parts.first() == Some(&"docker") {
                            "docker"
                        } else {
                            "containerd"
                        }
                    } else {
                        runtime
                    };
                    o.container_id = Some(id.to_string());
                    o.container_runtime = Some(runtime.to_string());
                    break;
                }
            }
        }
        if p.ends_with(".service") || (p.ends_with(".scope") && o.container_id.is_none()) {
            o.systemd_unit = Some((*p).to_string());
        }
    }
    if o.container_id.is_some() {
        // A container scope is a unit too, but the container fields say it better.
        if let Some(last) = parts.last() {
            if last.ends_with(".scope") {
                o.systemd_unit = Some((*last).to_string());
            }
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "4f3c8d2e9a1b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d";

    #[test]
    fn systemd_service() {
        let o = owner("/mcp.slice/github-mcp.service");
        assert_eq!(o.systemd_unit.as_deref(), Some("github-mcp.service"));
        assert_eq!(o.pod_uid, None);
        assert_eq!(
            owner("/mcp.slice/github-mcp.service/worker")
                .systemd_unit
                .as_deref(),
            Some("github-mcp.service")
        );
    }

    #[test]
    fn kubernetes_systemd_driver_containerd() {
        let p = format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0a1b2c3d_4e5f_6789_abcd_ef0123456789.slice/cri-containerd-{ID}.scope");
        let o = owner(&p);
        assert_eq!(
            o.pod_uid.as_deref(),
            Some("0a1b2c3d-4e5f-6789-abcd-ef0123456789")
        );
        assert_eq!(o.container_id.as_deref(), Some(ID));
        assert_eq!(o.container_runtime.as_deref(), Some("containerd"));
    }

    #[test]
    fn kubernetes_systemd_driver_crio_guaranteed() {
        let p = format!("/kubepods.slice/kubepods-pod0a1b2c3d_4e5f_6789_abcd_ef0123456789.slice/crio-{ID}.scope");
        let o = owner(&p);
        assert_eq!(
            o.pod_uid.as_deref(),
            Some("0a1b2c3d-4e5f-6789-abcd-ef0123456789")
        );
        assert_eq!(o.container_runtime.as_deref(), Some("cri-o"));
    }

    #[test]
    fn kubernetes_cgroupfs_driver() {
        let o = owner(&format!(
            "/kubepods/besteffort/pod0a1b2c3d-4e5f-6789-abcd-ef0123456789/{ID}"
        ));
        assert_eq!(
            o.pod_uid.as_deref(),
            Some("0a1b2c3d-4e5f-6789-abcd-ef0123456789")
        );
        assert_eq!(o.container_id.as_deref(), Some(ID));
        let o = owner(&format!(
            "/kubepods/pod0a1b2c3d-4e5f-6789-abcd-ef0123456789/crio-{ID}"
        ));
        assert_eq!(o.container_runtime.as_deref(), Some("cri-o"));
    }

    #[test]
    fn mkdir_keys_for_paths_and_patterns() {
        use mcp_guard_common::{MKDIR_CHILD, MKDIR_EXACT, MKDIR_PREFIX};
        assert_eq!(
            mkdir_key("", "/mcp.slice/github-mcp.service"),
            Ok((MKDIR_EXACT, "/mcp.slice/github-mcp.service".into()))
        );
        assert_eq!(
            mkdir_key("/sub", "/a/*"),
            Ok((MKDIR_CHILD, "/sub/a".into()))
        );
        assert_eq!(
            mkdir_key("", "/kubepods.slice/mcp-*"),
            Ok((MKDIR_PREFIX, "/kubepods.slice/mcp-".into()))
        );
        assert!(mkdir_key("", "/a/*/b").is_err());
        assert!(mkdir_key("", "/a/**").is_err());
        assert!(mkdir_key("", "/a/*.scope").is_err());
        assert!(mkdir_key("", "/").is_err());
    }

    #[test]
    fn docker() {
        let o = owner(&format!("/system.slice/docker-{ID}.scope"));
        assert_eq!(
            (o.container_id.as_deref(), o.container_runtime.as_deref()),
            (Some(ID), Some("docker"))
        );
        let o = owner(&format!("/docker/{ID}"));
        assert_eq!(o.container_runtime.as_deref(), Some("docker"));
        assert_eq!(o.pod_uid, None);
    }
}

/// Whether a workload's cgroup is a pattern: `*` and `?` match within one path
/// component, `**` matches any number of components.
#[must_use]
pub fn is_pattern(cgroup: &str) -> bool {
    cgroup.contains(['*', '?'])
}

/// Shell-style match (`*`, `?`) of a name, e.g. an interface name against "veth*".
#[must_use]
pub fn glob_match(pattern: &str, name: &str) -> bool {
    component_matches(pattern.as_bytes(), name.as_bytes())
}

/// Shell-style match of one path component.
fn component_matches(pattern: &[u8], name: &[u8]) -> bool {
    match (pattern.first(), name.first()) {
        (None, None) => true,
        (Some(b'*'), _) => {
            component_matches(&pattern[1..], name)
                || (!name.is_empty() && component_matches(pattern, &name[1..]))
        }
        (Some(b'?'), Some(_)) => component_matches(&pattern[1..], &name[1..]),
        (Some(p), Some(n)) if p == n => component_matches(&pattern[1..], &name[1..]),
        _ => false,
    }
}

/// Whether a cgroup path (below the mount) matches a pattern.
#[must_use]
pub fn path_matches(pattern: &str, path: &str) -> bool {
    fn go(p: &[&str], c: &[&str]) -> bool {
        match p.first() {
            None => c.is_empty(),
            Some(&"**") => (0..=c.len()).any(|skip| go(&p[1..], &c[skip..])),
            Some(pc) => {
                !c.is_empty()
                    && component_matches(pc.as_bytes(), c[0].as_bytes())
                    && go(&p[1..], &c[1..])
            }
        }
    }
    let p: Vec<&str> = pattern.split('/').filter(|s| !s.is_empty()).collect();
    let c: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    go(&p, &c)
}

/// How the kernel registers a workload's cgroup at creation (the `cgroup:cgroup_mkdir`
/// program): the `REGISTER_1` key kind and path, with `root` (the kernel's path of the
/// mount's root, see [`kernel_root`]) in front. `Err` says why only the scan can
/// register it.
///
/// # Errors
/// The pattern has another shape than `parent/*` or `parent/prefix*`, or the path is
/// too long.
pub fn mkdir_key(root: &str, cgroup: &str) -> Result<(u32, String), String> {
    use mcp_guard_common::{
        CGROUP_PATH_LEN, MKDIR_CHILD, MKDIR_EXACT, MKDIR_PREFIX, MKDIR_PREFIX_MAX,
    };
    let parts: Vec<&str> = cgroup.split('/').filter(|p| !p.is_empty()).collect();
    let Some((last, parent)) = parts.split_last() else {
        return Err("the root cgroup".into());
    };
    let parent = format!("{root}/{}", parent.join("/"));
    let parent = parent.trim_end_matches('/');
    if parent.contains(['*', '?']) {
        return Err("a pattern before the last path component".into());
    }
    let (kind, path) = if !is_pattern(last) {
        (MKDIR_EXACT, format!("{parent}/{last}"))
    } else if *last == "*" {
        (MKDIR_CHILD, parent.to_string())
    } else if let Some(prefix) = last
        .strip_suffix('*')
        .filter(|p| !p.is_empty() && !p.contains(['*', '?']))
    {
        if prefix.len() > MKDIR_PREFIX_MAX {
            return Err(format!(
                "a name prefix longer than {MKDIR_PREFIX_MAX} bytes"
            ));
        }
        (MKDIR_PREFIX, format!("{parent}/{prefix}"))
    } else {
        return Err(format!(
            "the last component {last:?} is neither \"*\" nor \"prefix*\""
        ));
    };
    if path.len() >= CGROUP_PATH_LEN {
        return Err(format!("a path of {CGROUP_PATH_LEN} bytes or more"));
    }
    Ok((kind, path))
}

/// The kernel's path (from the cgroup v2 hierarchy's root, as the cgroup tracepoints
/// report it) of the mount's root: "" when the mount is the whole hierarchy, as on a
/// host, or the host's tree mounted into the daemon's pod (shown as "/.." from inside a
/// cgroup namespace); the mount's root otherwise (a subtree bind-mounted).
#[must_use]
pub fn kernel_root(mount: &Path) -> String {
    let Ok(text) = fs::read_to_string("/proc/self/mountinfo") else {
        return String::new();
    };
    text.lines()
        .find_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let f: Vec<&str> = left.split_whitespace().collect();
            let root = unescape(f.get(3)?);
            (right.split_whitespace().next()? == "cgroup2"
                && Path::new(&unescape(f.get(4)?)) == mount)
                .then_some(root)
        })
        .filter(|r| !r.contains(".."))
        .map(|r| r.trim_end_matches('/').to_string())
        .unwrap_or_default()
}

fn literal_len(parts: &[&str]) -> usize {
    parts.iter().take_while(|p| !is_pattern(p)).count()
}

/// The part of a path or pattern before its first pattern component: every cgroup it
/// names is at or below it (`/kubepods/*/pod*` -> `/kubepods`).
#[must_use]
pub fn literal_prefix(cgroup: &str) -> String {
    let parts: Vec<&str> = cgroup.split('/').filter(|s| !s.is_empty()).collect();
    format!("/{}", parts[..literal_len(&parts)].join("/"))
}

/// The ids of the cgroups a workload's cgroup (a path or a pattern) names now.
#[must_use]
pub fn resolve(mount: &Path, cgroup: &str) -> Vec<u64> {
    resolve_dirs(mount, cgroup)
        .into_iter()
        .map(|(id, _)| id)
        .collect()
}

/// Like [`resolve`], with each cgroup's directory.
#[must_use]
pub fn resolve_dirs(mount: &Path, cgroup: &str) -> Vec<(u64, PathBuf)> {
    if !is_pattern(cgroup) {
        return id(mount, cgroup)
            .map_err(|e| note(&e))
            .ok()
            .map(|i| (i, fs_path(mount, cgroup)))
            .into_iter()
            .collect();
    }
    let parts: Vec<&str> = cgroup.split('/').filter(|s| !s.is_empty()).collect();
    // Walk only below the literal prefix of the pattern, and no deeper than it can reach.
    let literal = literal_len(&parts);
    let max_depth = if parts.contains(&"**") {
        crate::MAX_DEPTH
    } else {
        parts.len()
    };
    let start = format!("/{}", parts[..literal].join("/"));
    let mut out = Vec::new();
    let mut stack = vec![(fs_path(mount, &start), literal)];
    while let Some((dir, depth)) = stack.pop() {
        let Ok(rel) = dir.strip_prefix(mount) else {
            continue;
        };
        let rel = format!("/{}", rel.display());
        if path_matches(cgroup, &rel) {
            match fs::metadata(&dir) {
                Ok(m) => out.push((m.ino(), dir.clone())),
                Err(e) => note(&e),
            }
        }
        if depth >= max_depth {
            continue;
        }
        if let Ok(entries) = fs::read_dir(&dir).map_err(|e| note(&e)) {
            for e in entries
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            {
                stack.push((e.path(), depth + 1));
            }
        }
    }
    out
}

/// The inode (cgroup id) of `name` in the directory `dir`, if it is there.
fn ino_at(dir: &fs::File, name: &std::ffi::OsStr) -> Option<u64> {
    use std::os::{fd::AsRawFd as _, unix::ffi::OsStrExt as _};
    let name = std::ffi::CString::new(name.as_bytes()).ok()?;
    // SAFETY: an all-zero stat is a valid out buffer for fstatat.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid directory fd, NUL-terminated name, a stat to write into.
    let rc = unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            &raw mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc != 0 {
        note(&io::Error::last_os_error());
    }
    (rc == 0).then_some(st.st_ino)
}

mod scan;
pub use scan::Scanner;

#[cfg(test)]
mod pattern_tests {
    use super::*;

    #[test]
    fn scanner_follows_children_through_parent_link_counts() {
        let root = std::env::temp_dir().join(format!("mcpg-scan-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(root.join("p/a")).unwrap();
        let ino = |p: &str| fs::metadata(root.join(p)).unwrap().ino();
        let list = || vec![(1, "/p/a"), (2, "/p/b"), (3, "/p/*")];
        let mut s = Scanner::default();
        let first = s.resolve(7, list, &root);
        assert_eq!(
            first.get(&ino("p/a")),
            Some(&1),
            "the first workload naming it wins"
        );
        assert_eq!(first.len(), 1);
        // A new child changes the parent's link count: found at the next look.
        fs::create_dir(root.join("p/b")).unwrap();
        let second = s.resolve(7, list, &root);
        assert_eq!(second.get(&ino("p/b")), Some(&2));
        // A new key (policy generation) makes a new plan.
        let third = s.resolve(8, || vec![(5, "/p/b")], &root);
        assert_eq!(third.len(), 1);
        assert_eq!(third.get(&ino("p/b")), Some(&5));
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn globs() {
        assert!(path_matches("/kubepods*", "/kubepods.slice"));
        assert!(path_matches("/kubepods*", "/kubepods"));
        assert!(!path_matches("/kubepods*", "/kubepods.slice/x"));
        assert!(path_matches(
            "/kubepods.slice/*/kubepods-*-pod*.slice",
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0a_1b.slice"
        ));
        assert!(path_matches(
            "/kubepods/**/pod*",
            "/kubepods/besteffort/pod123"
        ));
        assert!(path_matches("/kubepods/**/pod*", "/kubepods/pod123"));
        assert!(path_matches(
            "/mcp.slice/mcp-?.service",
            "/mcp.slice/mcp-a.service"
        ));
        assert!(!path_matches(
            "/mcp.slice/mcp-?.service",
            "/mcp.slice/mcp-ab.service"
        ));
    }
}
