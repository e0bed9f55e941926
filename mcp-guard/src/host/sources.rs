//! Pod mode: which source addresses belong to which workload. The daemon looks at the
//! processes in each workload cgroup, their network namespaces, and the addresses
//! configured there (from /proc/PID/net, which shows the namespace of PID).

use std::{
    collections::{BTreeMap, HashSet},
    fs,
    net::{Ipv4Addr, Ipv6Addr},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use crate::host::cgroup;

/// Addresses of a network namespace, seen through one of its processes.
fn addresses(pid: u32) -> Vec<[u8; 16]> {
    let mut out = Vec::new();
    // fib_trie lists each local address as "|-- A.B.C.D" followed by "/32 host LOCAL".
    if let Ok(text) = fs::read_to_string(format!("/proc/{pid}/net/fib_trie")) {
        let mut last: Option<Ipv4Addr> = None;
        for line in text.lines() {
            let t = line.trim();
            if let Some(a) = t.strip_prefix("|-- ") {
                last = a.parse().ok();
            } else if t.contains("/32 host LOCAL") {
                if let Some(a) = last.filter(|a| !a.is_loopback()) {
                    let v = a.to_ipv6_mapped().octets();
                    if !out.contains(&v) {
                        out.push(v);
                    }
                }
            }
        }
    }
    if let Ok(text) = fs::read_to_string(format!("/proc/{pid}/net/if_inet6")) {
        for line in text.lines() {
            let Some(hex) = line.split_whitespace().next() else {
                continue;
            };
            let Ok(n) = u128::from_str_radix(hex, 16) else {
                continue;
            };
            let a = Ipv6Addr::from(n);
            if !a.is_loopback() {
                out.push(a.octets());
            }
        }
    }
    out
}

fn pids_under(dir: &Path, out: &mut Vec<u32>, depth: u32) {
    out.extend(crate::host::cgroup::procs(dir));
    if depth == 0 {
        return;
    }
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        {
            pids_under(&e.path(), out, depth - 1);
        }
    }
}

/// The cgroups that decide whose a process is, as the kernel decides (the nearest
/// registered cgroup above it), with their directories: the workload cgroups
/// (`cgroups`, patterns resolved) and the pods placed through the runtime (`placed`:
/// cgroup id, path below the mount; pod workloads name no cgroup of their own), only
/// those `registered` now. A pod no workload selects is no longer registered, so the
/// workload cgroup above it decides.
#[must_use]
pub fn registered_dirs<'a>(
    cgroups: impl IntoIterator<Item = &'a str>,
    placed: &[(u64, String)],
    registered: impl Fn(u64) -> bool,
    mount: &Path,
) -> Vec<(u64, PathBuf)> {
    cgroups
        .into_iter()
        .flat_map(|c| cgroup::resolve_dirs(mount, c))
        .chain(
            placed
                .iter()
                .map(|(id, path)| (*id, cgroup::fs_path(mount, path))),
        )
        .filter(|(id, _)| registered(*id))
        .collect()
}

/// One process (pid) of each network namespace that holds processes of the given
/// cgroups (id, directory; each with the cgroups below it), with the cgroup id it was
/// found under, skipping `own_netns` (a /proc/.../ns/net path). The deepest cgroup
/// given wins a namespace: a pod below a node-wide workload cgroup is the pod's, as the
/// kernel decides (the nearest registered cgroup above a process).
#[must_use]
pub fn pod_namespaces(
    dirs: impl IntoIterator<Item = (u64, PathBuf)>,
    own_netns: &str,
) -> Vec<(u32, u64)> {
    let own_netns = fs::metadata(own_netns).map(|m| m.ino()).unwrap_or(0);
    let mut seen_netns = HashSet::new();
    let mut out = Vec::new();
    let mut dirs: Vec<(u64, PathBuf)> = dirs.into_iter().collect();
    dirs.sort_by_key(|(_, d)| std::cmp::Reverse(d.components().count()));
    for (id, dir) in dirs {
        let mut pids = Vec::new();
        pids_under(&dir, &mut pids, 8);
        for pid in pids {
            let Ok(ns) = fs::metadata(format!("/proc/{pid}/ns/net")).map(|m| m.ino()) else {
                continue;
            };
            if ns != own_netns && seen_netns.insert(ns) {
                out.push((pid, id));
            }
        }
    }
    out
}

/// Source address -> the id of the cgroup (workload cgroup or placed pod) whose network
/// namespace owns it (the DNS proxy's clients in pods), skipping `own_netns` (a
/// /proc/.../ns/net path): addresses there are nobody's in particular.
#[must_use]
pub fn scan_cgroups(
    dirs: impl IntoIterator<Item = (u64, PathBuf)>,
    own_netns: &str,
) -> BTreeMap<[u8; 16], u64> {
    let mut out = BTreeMap::new();
    for (pid, id) in pod_namespaces(dirs, own_netns) {
        for a in addresses(pid) {
            out.entry(a).or_insert(id);
        }
    }
    out
}
