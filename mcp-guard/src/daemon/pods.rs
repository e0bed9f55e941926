//! Following the node's pods through the container runtime (CRI): a poll every
//! `daemon.cri_poll_ms` places each pod sandbox in its workload and registers its
//! cgroup. A pod cgroup the poll has not placed yet is held by `pods-pending` (all
//! egress denied), registered by the kernel when the cgroup was made.

use std::{collections::HashSet, path::Path, sync::Arc, time::Duration};

use tracing::{error, info, warn};

use super::state::{Command, Handle, Owner};
use crate::{
    config::pods::PENDING,
    pods::{self, cri, Table},
    policy::{Compiled, CompiledWorkload},
};

/// The CRI connection and what was last reported, across polls.
#[derive(Default)]
pub(super) struct Watch {
    client: Option<cri::Client>,
    /// Where the placed pods are kept for a restart (see [`first`]).
    file: std::path::PathBuf,
    /// Warnings already logged (an annotation naming the wrong workload, ...).
    warned: HashSet<String>,
    failing: bool,
}

fn selects_pods(c: &Compiled) -> bool {
    c.workloads.iter().any(|w| w.pods.is_some())
}

impl Watch {
    /// One poll: the pods placed as (entries for the maps, table), or `None` if the
    /// runtime did not answer (the caller keeps what it has: fail closed for new pods).
    async fn poll(
        &mut self,
        workloads: &[CompiledWorkload],
        cfg: &crate::config::Config,
        mount: &Path,
    ) -> Option<pods::Placement> {
        if self.client.is_none() {
            let Some(socket) = cri::socket(cfg.pods.cri_socket.as_deref()) else {
                self.fail(format!(
                    "no CRI socket: set daemon.cri_socket (none of {:?} exists); pods stay pending (all egress denied) until it answers",
                    crate::config::pods::DEFAULT_CRI_SOCKETS
                ));
                return None;
            };
            match cri::Client::connect(&socket).await {
                Ok(c) => self.client = Some(c),
                Err(e) => {
                    self.fail(format!(
                        "{e:#}; new pods stay pending (all egress denied) until it answers"
                    ));
                    return None;
                }
            }
        }
        let listed = self.client.as_mut().expect("connected").pods().await;
        let found = match listed {
            Ok(p) => p,
            Err(e) => {
                self.client = None;
                self.fail(format!("{e:#}; known pods keep their workload, new pods stay pending (all egress denied)"));
                return None;
            }
        };
        if self.failing {
            info!("the container runtime answers again");
            self.failing = false;
        }
        let mut placed = pods::place(workloads, &found, mount, &cfg.pods.pod_cgroups);
        if self.warned.len() > 4096 {
            // Pods come and go: forget old warnings rather than grow without bound.
            self.warned.clear();
        }
        for w in std::mem::take(&mut placed.warnings) {
            if self.warned.insert(w.clone()) {
                warn!("{w}");
            }
        }
        Some(placed)
    }

    fn fail(&mut self, why: String) {
        if !self.failing {
            error!("container runtime (CRI): {why}");
            self.failing = true;
        }
    }
}

/// Lists the pods once before the first policy install, so a restarted daemon
/// re-registers every known pod at once instead of holding them all pending. If the
/// runtime does not answer and the pinned state of a previous daemon is still there
/// (`was_pinned`), the pods it had placed are reused where their cgroup is still the same
/// cgroup; new pods stay pending until the runtime answers.
pub(super) async fn first(
    cfg: &crate::config::Config,
    compiled: &Compiled,
    mount: &Path,
    file: std::path::PathBuf,
    was_pinned: bool,
) -> (Watch, Option<pods::Placement>) {
    let mut w = Watch {
        file,
        ..Watch::default()
    };
    if !selects_pods(compiled) {
        return (w, None);
    }
    // Enforcement waits on this list, so it gets a budget shorter than the two calls'
    // own timeouts: a hung runtime delays the start by at most FIRST_BUDGET.
    let listed = tokio::time::timeout(FIRST_BUDGET, w.poll(&compiled.workloads, cfg, mount))
        .await
        .unwrap_or_else(|_| {
            w.client = None;
            w.fail(format!(
                "no answer within {} s at start; new pods stay pending (all egress denied) until it answers",
                FIRST_BUDGET.as_secs()
            ));
            None
        });
    if let Some(placed) = listed {
        info!(
            pods = placed.table.len(),
            "listed the node's pods through the container runtime"
        );
        return (w, Some(placed));
    }
    if !was_pinned {
        return (w, None);
    }
    let saved: Vec<pods::Placed> = std::fs::read(&w.file)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let placed = pods::reuse(&saved, &compiled.workloads, mount);
    warn!(
        reused = placed.table.len(),
        kept = saved.len(),
        "the container runtime does not answer: reusing the pods the previous daemon placed whose cgroups are unchanged; new pods stay pending"
    );
    (w, Some(placed))
}

/// How long the start waits for the first pod list before installing the policy.
const FIRST_BUDGET: Duration = Duration::from_secs(3);
/// How long a new pending pod cgroup makes the poll run fast.
const FAST_WHILE: Duration = Duration::from_secs(10);
/// The poll interval while a pod cgroup is newly pending (its sandbox is being made).
const FAST_POLL: Duration = Duration::from_millis(50);

/// Polls the runtime for as long as the daemon runs: every `cri_poll_ms`, and every
/// 50 ms for ten seconds after a new pod cgroup became pending, so a new pod waits for
/// its policy as briefly as the runtime allows.
pub(super) async fn watch(
    state: Handle,
    metrics: Arc<crate::telemetry::metrics::Metrics>,
    mount: std::path::PathBuf,
    mut w: Watch,
) {
    // Pending cgroup id -> when it was first seen pending.
    let mut pending_since: std::collections::HashMap<u64, std::time::Instant> =
        std::collections::HashMap::new();
    loop {
        let view = state.view();
        // Only the workloads placing needs, as the owner keeps them per policy.
        let workloads = view.pod_workloads.clone();
        let cfg = view.cfg.clone();
        if !workloads.iter().any(|w| w.pods.is_some()) {
            // Nothing to ask the runtime: not an outage.
            metrics.cri_up.set(1);
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        let placed = w.poll(&workloads, &cfg, &mount).await;
        metrics.cri_up.set(i64::from(placed.is_some()));
        if let Some(placed) = placed {
            let file = w.file.clone();
            let asked = state
                .ask(|done| Command::Pods {
                    workloads,
                    entries: placed.entries,
                    table: placed.table,
                    file,
                    done,
                })
                .await;
            if asked.is_none() {
                return;
            }
        }
        let pending = state.view().pending.clone();
        let now = std::time::Instant::now();
        pending_since.retain(|id, _| pending.contains(id));
        for id in pending {
            pending_since.entry(id).or_insert(now);
        }
        let fast = pending_since
            .values()
            .any(|t| now.duration_since(*t) < FAST_WHILE);
        let pause = Duration::from_millis(cfg.pods.poll_ms);
        tokio::time::sleep(if fast { pause.min(FAST_POLL) } else { pause }).await;
    }
}

impl Owner {
    /// Registers a poll's placed pods and publishes the table (logs what changed).
    pub(super) fn apply_pods(
        &mut self,
        workloads: &[CompiledWorkload],
        entries: Vec<crate::kernel::maps::PodEntry>,
        table: Table,
        file: &Path,
    ) {
        // Registered against the live policy, not the one the poll started with: a
        // reload in between is honoured (the scan drops pods of workloads it removed).
        let changed = self.maps.set_pods(entries);
        if changed {
            self.maps.refresh_cgroups(&self.compiled, &self.mount);
        }
        let old = &self.pods;
        for (cg, p) in &table {
            if old.get(cg) != Some(p) {
                info!(
                    pod = %format!("{}/{}", p.namespace, p.name),
                    workload = p.workload.as_deref().unwrap_or("(none: the cgroup's parent workload applies)"),
                    cgroup = %cg,
                    "pod registered"
                );
            }
        }
        for (cg, p) in old.iter() {
            if !table.contains_key(cg) {
                info!(pod = %format!("{}/{}", p.namespace, p.name), cgroup = %cg, "pod gone");
            }
        }
        let table_changed = **old != table;
        if table_changed {
            let list: Vec<&pods::Placed> = table.values().collect();
            super::ops::write_state(file, &list, "placed pods");
            self.pods = Arc::new(table);
        }
        self.publish_pod_counts(workloads);
        if changed || table_changed {
            self.publish();
        }
    }

    /// `mcp_guard_pods{workload}`: pods per pod-selecting workload, and pending pod cgroups.
    fn publish_pod_counts(&self, workloads: &[CompiledWorkload]) {
        for w in workloads.iter().filter(|w| w.pods.is_some()) {
            let n = self
                .pods
                .values()
                .filter(|p| p.workload_id == Some(w.id))
                .count();
            self.metrics
                .pods
                .with_label_values(&[&w.name])
                .set(n as i64);
        }
        let pending = workloads
            .iter()
            .find(|w| w.pending)
            .map_or(0, |w| self.maps.cgroups_of(w.id).len());
        self.metrics
            .pods
            .with_label_values(&[PENDING])
            .set(pending as i64);
    }
}
