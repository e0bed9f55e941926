//! The scan that finds workload cgroups again and again (every 100 ms): the catch-up
//! for what registration at creation cannot decide.

use super::*;

/// How often the [`Scanner`] looks up every workload cgroup, whatever the parents say.
const FULL_RESCAN: std::time::Duration = std::time::Duration::from_secs(1);

/// Finds workload cgroups again and again (every 100 ms) without a `stat` per workload:
/// a cgroup directory's link count changes whenever a child cgroup is created or removed,
/// so a plain path is looked up again only when its parent's (inode, link count) moved.
/// Every [`FULL_RESCAN`] everything is looked up (a cgroup removed and a sibling created
/// between two looks leave the count as it was). Patterns are walked every time.
#[derive(Default)]
pub struct Scanner {
    /// What the plan was made for (the policy generation): a new key, a new plan.
    key: Option<u64>,
    plan: Vec<Entry>,
    /// Parent directories and their (inode, link count) at the last look.
    parents: Vec<(PathBuf, Option<(u64, u64)>)>,
    last_full: Option<std::time::Instant>,
    /// The cgroups the patterns matched at the last scan, with their directories.
    pattern_dirs: Vec<(u64, PathBuf)>,
    /// The last scan met a filesystem error other than "not there": what it did not
    /// find may still exist.
    pub incomplete: bool,
}

enum Entry {
    Plain {
        wid: u32,
        path: PathBuf,
        parent: usize,
        found: Option<u64>,
    },
    Pattern {
        wid: u32,
        cgroup: String,
    },
}

impl Scanner {
    fn plan(&mut self, workloads: &[(u32, &str)], mount: &Path) {
        let mut parents: Vec<(PathBuf, Option<(u64, u64)>)> = Vec::new();
        let mut index: std::collections::HashMap<PathBuf, usize> = std::collections::HashMap::new();
        self.plan = workloads
            .iter()
            .map(|&(wid, cgroup)| {
                if is_pattern(cgroup) {
                    return Entry::Pattern {
                        wid,
                        cgroup: cgroup.to_string(),
                    };
                }
                let path = fs_path(mount, cgroup);
                let parent_dir = path.parent().unwrap_or(mount).to_path_buf();
                let parent = *index.entry(parent_dir.clone()).or_insert_with(|| {
                    parents.push((parent_dir, None));
                    parents.len() - 1
                });
                Entry::Plain {
                    wid,
                    path,
                    parent,
                    found: None,
                }
            })
            .collect();
        self.parents = parents;
        self.last_full = None;
    }

    /// Every existing cgroup the workloads name, mapped to the first workload naming it.
    /// `key` identifies the workload list (the policy generation); `workloads` gives it
    /// (workload id, cgroup path or pattern) and is called only when the key changed.
    pub fn resolve<'a>(
        &mut self,
        key: u64,
        workloads: impl FnOnce() -> Vec<(u32, &'a str)>,
        mount: &Path,
    ) -> BTreeMap<u64, u32> {
        let errors_before = scan_errors();
        if self.key != Some(key) {
            self.plan(&workloads(), mount);
            self.key = Some(key);
        }
        let full = self.last_full.is_none_or(|t| t.elapsed() >= FULL_RESCAN);
        if full {
            self.last_full = Some(std::time::Instant::now());
        }
        let moved: Vec<bool> = self
            .parents
            .iter_mut()
            .map(|(dir, seen)| {
                let now = fs::metadata(&*dir).ok().map(|m| (m.ino(), m.nlink()));
                let moved = now != *seen;
                *seen = now;
                moved
            })
            .collect();
        // Children are looked up relative to their opened parent: one path component
        // each, not the whole path from the root.
        let mut dirs: Vec<Option<fs::File>> = (0..self.parents.len()).map(|_| None).collect();
        let mut out = BTreeMap::new();
        self.pattern_dirs.clear();
        for e in &mut self.plan {
            match e {
                Entry::Plain {
                    wid,
                    path,
                    parent,
                    found,
                } => {
                    if full || moved[*parent] {
                        let dir = &mut dirs[*parent];
                        if dir.is_none() {
                            *dir = fs::File::open(&self.parents[*parent].0)
                                .map_err(|e| note(&e))
                                .ok();
                        }
                        *found = match (dir.as_ref(), path.file_name()) {
                            (Some(d), Some(name)) => ino_at(d, name),
                            _ => fs::metadata(&*path).ok().map(|m| m.ino()),
                        };
                    }
                    if let Some(id) = found {
                        out.entry(*id).or_insert(*wid);
                    }
                }
                Entry::Pattern { wid, cgroup } => {
                    for (id, dir) in resolve_dirs(mount, cgroup) {
                        out.entry(id).or_insert(*wid);
                        self.pattern_dirs.push((id, dir));
                    }
                }
            }
        }
        self.incomplete = scan_errors() != errors_before;
        out
    }

    /// Plans again at the next scan (the plan was made for a policy that did not
    /// become live).
    pub fn forget(&mut self) {
        self.key = None;
    }

    /// The cgroups the last scan found, with their directories (a cgroup two entries
    /// name comes twice).
    pub fn found(&self) -> impl Iterator<Item = (u64, &Path)> {
        self.plan
            .iter()
            .filter_map(|e| match e {
                Entry::Plain {
                    path,
                    found: Some(id),
                    ..
                } => Some((*id, path.as_path())),
                _ => None,
            })
            .chain(self.pattern_dirs.iter().map(|(id, d)| (*id, d.as_path())))
    }
}
