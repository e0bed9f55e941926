//! Capability posture: which guarded processes hold a capability that goes around the
//! cgroup hooks (see [`crate::host::harden::DROPPED`]). Such a process can open raw or packet
//! sockets, change qdiscs, move itself out of its cgroup or detach programs; the daemon
//! cannot stop that, so it says so, per workload (a metric, an alert, a log line).

use std::collections::BTreeMap;

use tracing::warn;

use crate::{
    host::{attribution::Registered, harden},
    policy::Compiled,
};

/// Processes looked at per scan, at most (the scan runs every few seconds).
const MAX_PROCESSES: usize = 100_000;

/// One privileged process found, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub pid: u32,
    pub comm: String,
    pub caps: Vec<&'static str>,
}

/// Per workload: how many of its processes hold a dropped capability, and one of them.
pub type Scan = BTreeMap<String, (usize, Option<Finding>)>;

/// Reads the capabilities of every process of every guarded workload: the processes
/// below the registered cgroups, each counted for its nearest registered cgroup's
/// workload. Every workload of `compiled` has an entry (0 when none is privileged).
#[must_use]
pub fn scan(compiled: &Compiled, registered: &Registered) -> Scan {
    let mut out: Scan = compiled
        .workloads
        .iter()
        .map(|w| (w.name.clone(), (0, None)))
        .collect();
    for (pid, dir) in registered.processes(MAX_PROCESSES) {
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            continue;
        };
        let caps = harden::held(&status);
        if caps.is_empty() {
            continue;
        }
        let e = out.entry(dir.workload.clone()).or_default();
        e.0 += 1;
        if e.1.is_none() {
            let comm = status
                .lines()
                .find_map(|l| l.strip_prefix("Name:"))
                .unwrap_or("")
                .trim()
                .chars()
                .take(16)
                .collect();
            e.1 = Some(Finding { pid, comm, caps });
        }
    }
    out
}

/// Publishes a scan: the gauge per workload, a warning when a workload starts holding
/// privileged processes. `before` is what the previous scan found.
pub fn publish(
    metrics: &crate::telemetry::metrics::Metrics,
    found: &BTreeMap<String, (usize, Option<Finding>)>,
    before: &mut BTreeMap<String, usize>,
) {
    // Only what changed is written: with 10,000 workloads, rewriting every series every
    // scan cost more than the scan.
    for w in before.keys().filter(|w| !found.contains_key(*w)) {
        let _ = metrics.privileged_processes.remove_label_values(&[w]);
    }
    for (w, (n, first)) in found {
        if before.get(w) != Some(n) {
            metrics
                .privileged_processes
                .with_label_values(&[w])
                .set(i64::try_from(*n).unwrap_or(i64::MAX));
        }
        let was = before.get(w).copied().unwrap_or(0);
        if *n > 0 && was == 0 {
            if let Some(f) = first {
                warn!(workload = %w, processes = n, pid = f.pid, comm = %f.comm, caps = ?f.caps, "guarded processes hold capabilities that go around the cgroup hooks (raw/packet sockets, qdiscs, cgroup moves, BPF): drop them (mcp-guard exec does; see docs/src/attack-paths.md, Hardening)");
            }
        }
    }
    *before = found.iter().map(|(w, (n, _))| (w.clone(), *n)).collect();
}
