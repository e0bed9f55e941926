//! Kubernetes pods, node-locally: the container runtime's CRI socket ([`cri`]) says
//! which pod sandboxes run here, with their namespace, name, labels, annotations and
//! cgroup parent; this module decides which workload holds each pod ([`select`]) and
//! where its cgroup is ([`cgroup_path`], [`locate`]). No API server is asked.
//!
//! Until a new pod is identified its cgroup is held by the `pods-pending` workload
//! (all egress denied), which the kernel registers inside the cgroup's `mkdir`.

pub mod cri;

use std::{
    collections::{BTreeMap, HashMap},
    path::Path,
};

use crate::{
    config::pods::{ANNOTATION, PROXY},
    host::cgroup,
    kernel::maps::{PodEntry, PodOwner},
    policy::CompiledWorkload,
};

/// A pod sandbox as the runtime reports it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Pod {
    pub sandbox_id: String,
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub labels: HashMap<String, String>,
    pub annotations: HashMap<String, String>,
    /// The sandbox's cgroup parent as the kubelet gave it (a cgroupfs path or a systemd
    /// slice name), if the runtime says.
    pub cgroup_parent: Option<String>,
    /// (container id, container name) of the pod's containers.
    pub containers: Vec<(String, String)>,
}

/// How a pod came to its workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    Labels,
    Annotation,
}

/// The workload that holds a pod, or `None`; and a warning for an annotation that
/// names a workload that does not take pods by annotation.
#[must_use]
pub fn select<'a>(
    workloads: &'a [CompiledWorkload],
    pod: &Pod,
) -> (Option<(&'a CompiledWorkload, Via)>, Option<String>) {
    let mut warning = None;
    if let Some(name) = pod.annotations.get(ANNOTATION) {
        let target = workloads.iter().find(|w| &w.name == name);
        match target.and_then(|w| w.pods.as_ref().map(|p| (w, p))) {
            Some((w, p))
                if p.annotation && p.namespace.as_deref().is_none_or(|n| n == pod.namespace) =>
            {
                return (Some((w, Via::Annotation)), None);
            }
            Some((_, p)) if p.annotation => {
                warning = Some(format!(
                    "pod {}/{} is annotated {ANNOTATION}={name} but that workload takes pods of namespace {:?} only",
                    pod.namespace, pod.name, p.namespace.as_deref().unwrap_or_default()
                ));
            }
            Some(_) => {
                warning = Some(format!(
                    "pod {}/{} is annotated {ANNOTATION}={name} but that workload does not take pods by annotation (pods.annotation = true)",
                    pod.namespace, pod.name
                ));
            }
            None => {
                warning = Some(format!(
                    "pod {}/{} is annotated {ANNOTATION}={name} but no workload selecting pods has that name",
                    pod.namespace, pod.name
                ));
            }
        }
    }
    let by_labels = workloads.iter().find(|w| {
        w.pods.as_ref().is_some_and(|p| {
            (p.namespace.is_some() || !p.labels.is_empty())
                && p.matches(&pod.namespace, &pod.labels)
        })
    });
    (by_labels.map(|w| (w, Via::Labels)), warning)
}

/// The cgroup v2 path of a pod from its cgroup parent: a cgroupfs path as it is, a
/// systemd slice expanded to its parents (`kubepods-besteffort-pod1.slice` is
/// `/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1.slice`).
#[must_use]
pub fn cgroup_path(parent: &str) -> Option<String> {
    let parent = parent.trim();
    if parent.is_empty() || parent.split('/').any(|c| c == "..") {
        return None;
    }
    if parent.contains('/') {
        let p = parent.trim_end_matches('/');
        return Some(if p.starts_with('/') {
            p.to_string()
        } else {
            format!("/{p}")
        });
    }
    let unit = parent.strip_suffix(".slice")?;
    if unit.is_empty() || unit.starts_with('-') || unit.ends_with('-') || unit.contains("--") {
        return None;
    }
    let parts: Vec<&str> = unit.split('-').collect();
    let mut out = String::new();
    for i in 1..=parts.len() {
        out.push('/');
        out.push_str(&parts[..i].join("-"));
        out.push_str(".slice");
    }
    Some(out)
}

/// The cgroup parent of a container's `cgroupsPath` (runtime spec): cgroupfs
/// `/kubepods/besteffort/pod1/<id>` -> `/kubepods/besteffort/pod1`, systemd
/// `kubepods-besteffort-pod1.slice:cri-containerd:<id>` -> `kubepods-besteffort-pod1.slice`.
#[must_use]
pub fn parent_of_cgroups_path(p: &str) -> Option<String> {
    if let Some((slice, _)) = p.split_once(':') {
        return Some(slice.to_string());
    }
    let (parent, _) = p.trim_end_matches('/').rsplit_once('/')?;
    (!parent.is_empty()).then(|| parent.to_string())
}

/// Where the pod's cgroup is below `mount`: the path itself, or (a kubelet running in a
/// container of its own, whose cgroup paths are relative to its cgroup namespace) the
/// cgroup matching one of `pod_cgroups` that ends with it; failing both, the pod cgroup
/// named after its UID. `None` while it does not exist. The pod cgroups are walked at
/// most once per `candidates` (one poll), only when a pod is not at its own path.
#[must_use]
pub fn locate(
    mount: &Path,
    path: Option<&str>,
    uid: &str,
    pod_cgroups: &[String],
    candidates: &mut Option<Vec<(String, u64)>>,
) -> Option<(String, u64)> {
    if let Some(p) = path {
        if let Ok(id) = cgroup::id(mount, p) {
            return Some((p.to_string(), id));
        }
    }
    let candidates = candidates.get_or_insert_with(|| {
        pod_cgroups
            .iter()
            .flat_map(|pattern| cgroup::resolve_dirs(mount, pattern))
            .filter_map(|(id, dir)| {
                let rel = dir.strip_prefix(mount).ok()?;
                Some((format!("/{}", rel.display()), id))
            })
            .collect()
    });
    let uid_systemd = uid.replace('-', "_");
    candidates
        .iter()
        .find(|(rel, _)| {
            let by_path = path.is_some_and(|p| rel.ends_with(p));
            let last = rel.rsplit('/').next().unwrap_or_default();
            let by_uid = path.is_none()
                && !uid.is_empty()
                && (last.contains(uid) || last.contains(&uid_systemd));
            by_path || by_uid
        })
        .cloned()
}

/// A pod the daemon placed, for events, `/status` and metrics.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Placed {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// The workload holding it (`None`: no workload selects it).
    pub workload: Option<String>,
    #[serde(skip)]
    pub workload_id: Option<u32>,
    pub via: Option<Via>,
    /// Below the cgroup v2 mount.
    pub cgroup: String,
    /// Its id when placed (a file kept for a restart is trusted only for the same cgroup).
    #[serde(default)]
    pub cgroup_id: u64,
    #[serde(skip)]
    pub containers: Vec<(String, String)>,
}

/// Every pod placed, by its cgroup path.
pub type Table = BTreeMap<String, Placed>;

/// Pods placed in workloads: what the maps register, and the table everyone else reads.
#[derive(Debug, Default)]
pub struct Placement {
    pub entries: Vec<PodEntry>,
    pub table: Table,
    /// Selection conflicts to log.
    pub warnings: Vec<String>,
}

/// What a restarted daemon may reuse of the pods it placed before, while the runtime does
/// not answer: each pod whose cgroup is still the same cgroup (same id) and whose
/// workload still selects pods.
#[must_use]
pub fn reuse(saved: &[Placed], workloads: &[CompiledWorkload], mount: &Path) -> Placement {
    let mut entries = Vec::new();
    let mut table = Table::new();
    for p in saved {
        if cgroup::id(mount, &p.cgroup).ok() != Some(p.cgroup_id) {
            continue;
        }
        let owner = match &p.workload {
            None => PodOwner::Unselected,
            Some(name) => match workloads
                .iter()
                .find(|w| &w.name == name && w.pods.is_some())
            {
                Some(w) => PodOwner::Workload(w.id),
                None => continue,
            },
        };
        let mut p = p.clone();
        p.workload_id = match owner {
            PodOwner::Workload(w) => Some(w),
            PodOwner::Unselected => None,
        };
        entries.push((owner, p.cgroup.clone()));
        table.insert(p.cgroup.clone(), p);
    }
    Placement {
        entries,
        table,
        warnings: Vec::new(),
    }
}

/// Places every pod in the workload that selects it (or none).
#[must_use]
pub fn place(
    workloads: &[CompiledWorkload],
    pods: &[Pod],
    mount: &Path,
    pod_cgroups: &[String],
) -> Placement {
    let mut entries = Vec::new();
    let mut table = Table::new();
    let mut warnings = Vec::new();
    let mut candidates = None;
    for pod in pods {
        let path = pod.cgroup_parent.as_deref().and_then(cgroup_path);
        let Some((cg, cgroup_id)) = locate(
            mount,
            path.as_deref(),
            &pod.uid,
            pod_cgroups,
            &mut candidates,
        ) else {
            // Its cgroup is not there yet: the next poll places it.
            continue;
        };
        let (chosen, warning) = select(workloads, pod);
        warnings.extend(warning);
        entries.push((
            chosen.map_or(PodOwner::Unselected, |(w, _)| PodOwner::Workload(w.id)),
            cg.clone(),
        ));
        if let Some((w, _)) = chosen {
            entries.extend(proxy_entries(workloads, w, pod, mount, &cg));
        }
        table.insert(
            cg.clone(),
            Placed {
                namespace: pod.namespace.clone(),
                name: pod.name.clone(),
                uid: pod.uid.clone(),
                workload: chosen.map(|(w, _)| w.name.clone()),
                workload_id: chosen.map(|(w, _)| w.id),
                via: chosen.map(|(_, v)| v),
                cgroup_id,
                cgroup: cg,
                containers: pod.containers.clone(),
            },
        );
    }
    Placement {
        entries,
        table,
        warnings,
    }
}

/// The cgroups of a pod's MCP proxy sidecar containers (`pods.mcp_proxy` of its
/// workload `w`), held by the [`PROXY`] workload.
fn proxy_entries(
    workloads: &[CompiledWorkload],
    w: &CompiledWorkload,
    pod: &Pod,
    mount: &Path,
    pod_cgroup: &str,
) -> Vec<PodEntry> {
    let Some(name) = w.pods.as_ref().and_then(|p| p.mcp_proxy.as_deref()) else {
        return Vec::new();
    };
    let Some(proxy) = workloads.iter().find(|x| x.name == PROXY) else {
        return Vec::new();
    };
    pod.containers
        .iter()
        .filter(|(_, n)| n == name)
        .filter_map(|(id, _)| container_cgroup(mount, pod_cgroup, id))
        .map(|cg| (PodOwner::Workload(proxy.id), cg))
        .collect()
}

/// The cgroup (below the mount) of container `id` in the pod whose cgroup is
/// `pod_cgroup`, once the runtime made it.
#[must_use]
pub fn container_cgroup(mount: &Path, pod_cgroup: &str, id: &str) -> Option<String> {
    std::fs::read_dir(cgroup::fs_path(mount, pod_cgroup))
        .ok()?
        .flatten()
        .filter(|e| e.path().is_dir())
        .find_map(|e| {
            let n = e.file_name().to_string_lossy().to_string();
            let found = container_id(&n)?;
            (found.starts_with(id) || id.starts_with(found)).then(|| format!("{pod_cgroup}/{n}"))
        })
}

/// The cgroup (below the mount) of process `pid`, if it runs in a placed pod: found in
/// the pod cgroups' `cgroup.procs` (`/proc/PID/cgroup` would give a path relative to
/// the daemon's own cgroup namespace, which a containerised daemon has).
#[must_use]
pub fn cgroup_of_pid(table: &Table, mount: &Path, pid: u32) -> Option<String> {
    fn walk(dir: &Path, rel: &str, pid: u32, depth: usize) -> Option<String> {
        if cgroup::procs(dir).contains(&pid) {
            return Some(rel.to_string());
        }
        if depth == 0 {
            return None;
        }
        std::fs::read_dir(dir).ok()?.flatten().find_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            e.path()
                .is_dir()
                .then(|| walk(&e.path(), &format!("{rel}/{name}"), pid, depth - 1))
                .flatten()
        })
    }
    table
        .keys()
        .find_map(|pod| walk(&cgroup::fs_path(mount, pod), pod, pid, 2))
}

/// The container id in a container's cgroup name: `<id>` (cgroupfs driver),
/// `cri-containerd-<id>.scope`, `crio-<id>.scope`, `docker-<id>.scope` (systemd driver).
#[must_use]
pub fn container_id(name: &str) -> Option<&str> {
    let base = name.strip_suffix(".scope").unwrap_or(name);
    let id = base.rsplit('-').next().unwrap_or(base);
    (id.len() >= 12 && id.bytes().all(|b| b.is_ascii_hexdigit())).then_some(id)
}

/// The pod a cgroup path belongs to, the container's id (from the cgroup's name) and,
/// once the runtime has listed it, its name.
#[must_use]
pub fn attribute<'a>(
    table: &'a Table,
    path: &str,
) -> Option<(&'a Placed, Option<String>, Option<&'a str>)> {
    let (pod_path, placed) = table
        .range(..=path.to_string())
        .next_back()
        .filter(|(p, _)| path == p.as_str() || path.starts_with(&format!("{p}/")))?;
    let rest = path[pod_path.len()..].trim_start_matches('/');
    let first = rest.split('/').next().unwrap_or_default();
    let id = container_id(first);
    let name = id.and_then(|id| {
        placed
            .containers
            .iter()
            .find(|(c, _)| c == id)
            .map(|(_, name)| name.as_str())
    });
    Some((placed, id.map(str::to_string), name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn systemd_slices_expand_to_their_parents() {
        assert_eq!(
            cgroup_path("kubepods-besteffort-pod1_2.slice").as_deref(),
            Some("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1_2.slice")
        );
        assert_eq!(
            cgroup_path("kubepods-pod9.slice").as_deref(),
            Some("/kubepods.slice/kubepods-pod9.slice")
        );
        assert_eq!(
            cgroup_path("/kubepods/burstable/pod1/").as_deref(),
            Some("/kubepods/burstable/pod1")
        );
        assert_eq!(
            cgroup_path("kubepods/pod1").as_deref(),
            Some("/kubepods/pod1")
        );
        assert_eq!(cgroup_path("/a/../b"), None);
        assert_eq!(cgroup_path("bad--name.slice"), None);
        assert_eq!(cgroup_path("noslice"), None);
    }

    #[test]
    fn cgroups_paths_name_their_pod() {
        assert_eq!(
            parent_of_cgroups_path("kubepods-besteffort-pod1.slice:cri-containerd:abc").as_deref(),
            Some("kubepods-besteffort-pod1.slice")
        );
        assert_eq!(
            parent_of_cgroups_path("/kubepods/besteffort/pod1/abc").as_deref(),
            Some("/kubepods/besteffort/pod1")
        );
    }

    fn wl(name: &str, id: u32, sel: crate::config::pods::PodSelector) -> CompiledWorkload {
        let cfg = crate::config::parse(
            Path::new("t.toml"),
            &format!("[[workload]]\nname='{name}'\ncgroup='/x{id}'\n"),
        )
        .unwrap();
        let mut w = crate::policy::compile(&cfg).unwrap().workloads.remove(0);
        w.id = id;
        w.cgroup = None;
        w.pods = Some(sel);
        w
    }

    #[test]
    fn selection_by_labels_namespace_and_annotation() {
        use crate::config::pods::PodSelector;
        let gh = wl(
            "github",
            1,
            PodSelector {
                namespace: Some("mcp".into()),
                labels: [("app".to_string(), "github".to_string())].into(),
                annotation: false,
                mcp_proxy: None,
            },
        );
        let any = wl(
            "any-mcp",
            2,
            PodSelector {
                namespace: Some("mcp".into()),
                labels: BTreeMap::new(),
                annotation: true,
                mcp_proxy: None,
            },
        );
        let ws = [gh, any];
        let pod = |ns: &str, labels: &[(&str, &str)], ann: Option<&str>| Pod {
            namespace: ns.into(),
            name: "p".into(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
            annotations: ann
                .map(|a| (ANNOTATION.to_string(), a.to_string()))
                .into_iter()
                .collect(),
            ..Pod::default()
        };
        let name = |p: &Pod| select(&ws, p).0.map(|(w, v)| (w.name.clone(), v));
        assert_eq!(
            name(&pod("mcp", &[("app", "github")], None)),
            Some(("github".into(), Via::Labels))
        );
        // The second workload selects the whole namespace.
        assert_eq!(
            name(&pod("mcp", &[("app", "other")], None)),
            Some(("any-mcp".into(), Via::Labels))
        );
        assert_eq!(name(&pod("default", &[("app", "github")], None)), None);
        assert_eq!(
            name(&pod("mcp", &[("app", "github")], Some("any-mcp"))),
            Some(("any-mcp".into(), Via::Annotation))
        );
        // github does not take pods by annotation; another namespace may not join any-mcp.
        let (c, warn) = select(&ws, &pod("default", &[], Some("github")));
        assert!(c.is_none() && warn.unwrap().contains("does not take pods by annotation"));
        let (c, warn) = select(&ws, &pod("default", &[], Some("any-mcp")));
        assert!(c.is_none() && warn.unwrap().contains("namespace"));
    }

    #[test]
    fn events_find_the_pod_and_container_of_a_cgroup() {
        let mut t = Table::new();
        let placed = |cg: &str| Placed {
            namespace: "mcp".into(),
            name: cg.into(),
            uid: String::new(),
            workload: None,
            workload_id: None,
            via: None,
            cgroup: cg.into(),
            cgroup_id: 0,
            containers: vec![("abc123def456".into(), "fetch".into())],
        };
        t.insert("/k/pod1".into(), placed("/k/pod1"));
        t.insert("/k/pod10".into(), placed("/k/pod10"));
        let (p, id, c) = attribute(&t, "/k/pod1/cri-containerd-abc123def456.scope").unwrap();
        assert_eq!(
            (p.name.as_str(), id.as_deref(), c),
            ("/k/pod1", Some("abc123def456"), Some("fetch"))
        );
        let (_, id, c) = attribute(&t, "/k/pod1/fedcba987654").unwrap();
        assert_eq!(
            (id.as_deref(), c),
            (Some("fedcba987654"), None),
            "not listed yet"
        );
        let (p, id, c) = attribute(&t, "/k/pod10").unwrap();
        assert_eq!((p.name.as_str(), id, c), ("/k/pod10", None, None));
        assert!(attribute(&t, "/k/pod2/x").is_none());
    }
}
