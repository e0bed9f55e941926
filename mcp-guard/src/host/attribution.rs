//! Whose is a process, a cgroup or a network namespace: the nearest registered cgroup at
//! or above it, as the kernel decides (`nearest_workload` in the eBPF crate walks a
//! socket's cgroup ancestors the same way). One answer for everyone who asks in user
//! space: the DNS proxy (which workload asked), TC pod mode (which pod is behind an
//! interface, which source address is whose), event enrichment (where an event's cgroup
//! is), the capability posture scan and the homes pass. The state owner builds
//! [`Registered`] from its registrations whenever they change and publishes it.

use std::{
    collections::{BTreeMap, HashSet},
    fs,
    net::{Ipv4Addr, Ipv6Addr},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

/// A registered cgroup: its id, directory, depth below the mount and workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dir {
    pub id: u64,
    pub path: PathBuf,
    /// Components below the cgroup mount (the kernel's cgroup level).
    pub level: u32,
    pub workload_id: u32,
    pub workload: String,
}

/// The registered cgroups of this moment, deepest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Registered {
    mount: PathBuf,
    dirs: Vec<Dir>,
}

impl Registered {
    /// `dirs`: (cgroup id, directory, workload id, workload name) of every registered
    /// cgroup; a directory outside `mount` is left out.
    #[must_use]
    pub fn new(mount: &Path, dirs: impl IntoIterator<Item = (u64, PathBuf, u32, String)>) -> Self {
        let mut seen = HashSet::new();
        let mut dirs: Vec<Dir> = dirs
            .into_iter()
            .filter(|(id, ..)| seen.insert(*id))
            .filter_map(|(id, path, workload_id, workload)| {
                let level = path.strip_prefix(mount).ok()?.components().count();
                Some(Dir {
                    id,
                    level: u32::try_from(level).ok()?,
                    path,
                    workload_id,
                    workload,
                })
            })
            .collect();
        dirs.sort_by(|a, b| b.level.cmp(&a.level).then(a.path.cmp(&b.path)));
        Self {
            mount: mount.to_path_buf(),
            dirs,
        }
    }

    /// Deepest first.
    #[must_use]
    pub fn dirs(&self) -> &[Dir] {
        &self.dirs
    }

    #[must_use]
    pub fn mount(&self) -> &Path {
        &self.mount
    }

    /// The registered cgroup nearest at or above the cgroup directory `path` (no
    /// filesystem access).
    #[must_use]
    pub fn nearest(&self, path: &Path) -> Option<&Dir> {
        self.dirs.iter().find(|d| path.starts_with(&d.path))
    }

    /// Where the cgroup with id `id` is (its directory) and the registered cgroup
    /// nearest at or above it; `None` when no registered cgroup holds it. Walks the
    /// registered subtrees (cgroup ids are inode numbers), so the caller caches.
    #[must_use]
    pub fn locate(&self, id: u64) -> Option<(PathBuf, &Dir)> {
        if let Some(d) = self.dirs.iter().find(|d| d.id == id) {
            return Some((d.path.clone(), d));
        }
        // Deepest first: the first registered subtree holding it is the nearest (a
        // registered cgroup between would be deeper and was searched before).
        self.dirs.iter().find_map(|d| {
            let path = crate::host::cgroup::find_below(&d.path, id, crate::MAX_DEPTH)?;
            Some((path, d))
        })
    }

    /// Every process below the registered cgroups, each with its nearest registered
    /// cgroup, at most `max` of them.
    #[must_use]
    pub fn processes(&self, max: usize) -> Vec<(u32, &Dir)> {
        let mut out = Vec::new();
        let registered: HashSet<&Path> = self.dirs.iter().map(|d| d.path.as_path()).collect();
        // Shallowest first, not descending into registered cgroups (they come in turn).
        for d in self.dirs.iter().rev() {
            let mut stack = vec![d.path.clone()];
            while let Some(dir) = stack.pop() {
                for pid in crate::host::cgroup::procs(&dir) {
                    if out.len() >= max {
                        return out;
                    }
                    out.push((pid, d));
                }
                let Ok(rd) = fs::read_dir(&dir) else {
                    continue;
                };
                for e in rd.flatten() {
                    let p = e.path();
                    if e.file_type().is_ok_and(|t| t.is_dir()) && !registered.contains(p.as_path())
                    {
                        stack.push(p);
                    }
                }
            }
        }
        out
    }

    /// One process (pid) of each network namespace that holds processes of the
    /// registered cgroups, with its nearest registered cgroup's id, skipping
    /// `own_netns` (a /proc/.../ns/net path). A namespace with processes in several
    /// belongs to the deepest (a pod below a node-wide workload cgroup is the pod's).
    #[must_use]
    pub fn namespaces(&self, own_netns: &str) -> Vec<(u32, u64)> {
        let own_netns = fs::metadata(own_netns).map(|m| m.ino()).unwrap_or(0);
        let mut seen_netns = HashSet::new();
        let mut out = Vec::new();
        // An MCP proxy sidecar shares its pod's namespace: the pod's workload owns it.
        for d in self
            .dirs
            .iter()
            .filter(|d| d.workload != crate::config::pods::PROXY)
        {
            let mut pids = Vec::new();
            pids_under(&d.path, &mut pids, 8);
            for pid in pids {
                let Ok(ns) = fs::metadata(format!("/proc/{pid}/ns/net")).map(|m| m.ino()) else {
                    continue;
                };
                if ns != own_netns && seen_netns.insert(ns) {
                    out.push((pid, d.id));
                }
            }
        }
        out
    }

    /// Source address -> the registered cgroup whose network namespace owns it (the DNS
    /// proxy's clients in pods), skipping `own_netns`: addresses there are nobody's in
    /// particular.
    #[must_use]
    pub fn sources(&self, own_netns: &str) -> BTreeMap<[u8; 16], u64> {
        let mut out = BTreeMap::new();
        for (pid, id) in self.namespaces(own_netns) {
            for a in addresses(pid) {
                out.entry(a).or_insert(id);
            }
        }
        out
    }
}

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

/// One case of the attribution table: the registered cgroups (paths below a test root),
/// a cgroup a process runs in, and the registered cgroup that owns it (or none). The same
/// table is checked against [`Registered`] here and against the kernel's
/// `nearest_workload` by the `attribution` integration test.
pub struct Case {
    pub registered: &'static [&'static str],
    pub process: &'static str,
    pub owner: Option<&'static str>,
}

/// The attribution table (see [`Case`]).
pub const CASES: &[Case] = &[
    Case {
        registered: &["a"],
        process: "a",
        owner: Some("a"),
    },
    Case {
        registered: &["a"],
        process: "a/b/c",
        owner: Some("a"),
    },
    Case {
        registered: &["a", "a/b"],
        process: "a/b/c",
        owner: Some("a/b"),
    },
    Case {
        registered: &["a", "a/b/c"],
        process: "a/b",
        owner: Some("a"),
    },
    Case {
        registered: &["a/b"],
        process: "a",
        owner: None,
    },
    Case {
        registered: &["a/b"],
        process: "ab",
        owner: None,
    },
    Case {
        registered: &["a/b"],
        process: "a/bc",
        owner: None,
    },
    Case {
        registered: &["a", "a/b", "a/b/c/d"],
        process: "a/b/c/d/e",
        owner: Some("a/b/c/d"),
    },
    Case {
        registered: &["x/y"],
        process: "a/b",
        owner: None,
    },
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_nearest_registered_cgroup_owns_a_process() {
        let root = Path::new("/sys/fs/cgroup/t");
        for (n, case) in CASES.iter().enumerate() {
            let r = Registered::new(
                Path::new("/sys/fs/cgroup"),
                case.registered
                    .iter()
                    .enumerate()
                    .map(|(i, p)| (i as u64 + 1, root.join(p), i as u32, (*p).to_string())),
            );
            let got = r
                .nearest(&root.join(case.process))
                .map(|d| d.workload.as_str());
            assert_eq!(
                got, case.owner,
                "case {n}: {:?} runs in {}",
                case.registered, case.process
            );
        }
    }

    #[test]
    fn deepest_first_and_levels_below_the_mount() {
        let m = Path::new("/m");
        let r = Registered::new(
            m,
            [
                (1, m.join("a"), 0, "a".into()),
                (2, m.join("a/b/c"), 1, "c".into()),
                (3, PathBuf::from("/elsewhere"), 2, "x".into()),
                (1, m.join("dup"), 0, "dup".into()),
            ],
        );
        let got: Vec<(u64, u32)> = r.dirs().iter().map(|d| (d.id, d.level)).collect();
        assert_eq!(got, vec![(2, 3), (1, 1)]);
    }
}
