//! cgroup v2: where it is mounted, a workload's cgroup id, creating and joining cgroups.

use std::{
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

/// Creates the cgroup (and its parents) if needed.
///
/// # Errors
/// Creating the directory failed.
pub fn create(mount: &Path, cgroup: &str) -> io::Result<PathBuf> {
    let p = fs_path(mount, cgroup);
    fs::create_dir_all(&p)?;
    Ok(p)
}

/// Moves a process into a cgroup.
///
/// # Errors
/// Writing cgroup.procs failed (for example, the cgroup has child cgroups with
/// controllers enabled, or the process is gone).
pub fn join(cgroup_dir: &Path, pid: u32) -> io::Result<()> {
    fs::write(cgroup_dir.join("cgroup.procs"), pid.to_string())
}

/// The cgroup path (below the mount) of a live process, from /proc/PID/cgroup.
#[must_use]
pub fn of_pid(pid: u32) -> Option<String> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_string)
}
