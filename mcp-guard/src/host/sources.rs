//! Pod mode: which source addresses belong to which workload. The daemon looks at the
//! processes in each workload cgroup, their network namespaces, and the addresses
//! configured there (from /proc/PID/net, which shows the namespace of PID).

use std::{
    collections::{BTreeMap, HashSet},
    fs,
    net::{Ipv4Addr, Ipv6Addr},
    os::unix::fs::MetadataExt as _,
    path::Path,
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
    if let Ok(text) = fs::read_to_string(dir.join("cgroup.procs")) {
        out.extend(text.lines().filter_map(|l| l.parse::<u32>().ok()));
    }
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

/// One process (pid) of each network namespace that holds a workload's processes, with
/// the workload cgroup it was found under, skipping `own_netns` (a /proc/.../ns/net
/// path). The first workload in the config wins a namespace.
#[must_use]
pub fn pod_namespaces<'a>(
    cgroups: impl IntoIterator<Item = &'a str>,
    mount: &Path,
    own_netns: &str,
) -> Vec<(u32, u64)> {
    let own_netns = fs::metadata(own_netns).map(|m| m.ino()).unwrap_or(0);
    let mut seen_netns = HashSet::new();
    let mut out = Vec::new();
    for cgroup in cgroups {
        for (id, dir) in cgroup::resolve_dirs(mount, cgroup) {
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
    }
    out
}

/// Source address -> the registered cgroup id of the workload whose network namespace
/// owns it (the DNS proxy's clients in pods), over workload cgroup patterns, skipping
/// `own_netns` (a /proc/.../ns/net path): addresses there are nobody's in particular.
#[must_use]
pub fn scan_cgroups<'a>(
    cgroups: impl IntoIterator<Item = &'a str>,
    mount: &Path,
    own_netns: &str,
) -> BTreeMap<[u8; 16], u64> {
    let mut out = BTreeMap::new();
    for (pid, id) in pod_namespaces(cgroups, mount, own_netns) {
        for a in addresses(pid) {
            out.entry(a).or_insert(id);
        }
    }
    out
}
