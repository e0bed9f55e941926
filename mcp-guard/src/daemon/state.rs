//! The one owner of the daemon's policy state.
//!
//! The live config and compiled policy, the policy maps, the program attachments, the
//! learned addresses, the DNS side, the placed pods and the `exec --mcp` instances are
//! held by one [`Owner`] on its own thread: every change is a [`Command`] on its channel
//! (or one of its two timers: the cgroup rescan and the attachment check), applied in
//! order, after which the owner publishes what others read through `tokio::sync::watch`:
//! the [`View`] for the daemon's tasks, the event [`Names`] and the `/status` document.
//! Nobody else writes any of it, and nothing blocking runs on the async runtime.

use std::{
    path::PathBuf,
    sync::{atomic::Ordering, mpsc, Arc},
    time::{Duration, Instant},
};

use tokio::sync::{oneshot, watch};
use tracing::debug;

use super::{mcp::Instance, ATTACH_CHECK, CGROUP_RESCAN};
use crate::{
    api::http::Shared,
    config, dns,
    host::attribution::Registered,
    kernel::{loader::Attachments, maps::PolicyMaps, pins::Pins, tc::Tc},
    mcp::{registry::Registry, wire::ToDaemon},
    pods::Table,
    policy::{self, Compiled, CompiledWorkload},
    telemetry::{events::Names, metrics::Metrics},
};

/// What the owner publishes for the daemon's tasks after every change.
pub(super) struct View {
    pub cfg: Arc<config::Config>,
    pub compiled: Arc<Compiled>,
    /// The workloads pod placement needs (those selecting pods, and `pods-pending`).
    pub pod_workloads: Arc<Vec<CompiledWorkload>>,
    /// Cgroup ids registered for `pods-pending` (pod cgroups not placed yet).
    pub pending: Vec<u64>,
    /// The learned addresses compiled into the installed policy (served on /dns).
    pub installed: Arc<Vec<policy::Learned>>,
    /// The registered cgroups (the posture scan and the homes pass walk them).
    pub registered: Arc<Registered>,
}

/// A change to the state, asked of the owner.
pub(super) enum Command {
    /// Read, validate and install the config file (SIGHUP, or the file changed).
    Reload(PathBuf),
    /// DNS answers that teach the policy something, merged and installed; the senders
    /// are answered once they are.
    Learned(Vec<policy::Learned>, Vec<oneshot::Sender<()>>),
    /// Register a poll's placed pods.
    Pods {
        workloads: Arc<Vec<CompiledWorkload>>,
        entries: Vec<crate::kernel::maps::PodEntry>,
        table: Table,
        file: PathBuf,
        done: oneshot::Sender<()>,
    },
    /// A relay announced an instance (`start` or `start_pod`, from the connection's
    /// peer, by its pid as the kernel gave it).
    McpStart {
        peer_pid: Option<u32>,
        start: ToDaemon,
        reply:
            oneshot::Sender<Result<(Instance, crate::mcp::wire::RelayView), super::mcp::McpError>>,
    },
    /// A relay reported peers, tools, counts or a call; answered with the new sequence.
    McpUpdate {
        instance: Instance,
        message: ToDaemon,
        reply: oneshot::Sender<Result<crate::mcp::wire::Reply, super::mcp::McpError>>,
    },
    /// A relay's connection ended.
    McpEnd(Instance),
    Stop,
}

/// Where the owner publishes.
pub(super) struct Outputs {
    pub view: watch::Sender<Arc<View>>,
    pub names: watch::Sender<Arc<Names>>,
    pub status: watch::Sender<Arc<String>>,
    /// For the readiness flag.
    pub shared: Arc<Shared>,
}

/// Everything the owner holds. Fields are the owner's alone.
pub(super) struct Owner {
    pub cfg: Arc<config::Config>,
    pub compiled: Arc<Compiled>,
    /// TC pod mode is on: keep the source-address map filled.
    pub pod_mode: bool,
    pub maps: PolicyMaps,
    pub ebpf: aya::Ebpf,
    pub tc: Option<Tc>,
    pub tc_repaired: u64,
    pub attachments: Attachments,
    pub attach_dir: PathBuf,
    pub pins: Pins,
    /// The cgroup_mkdir registration programs run (repaired only if they did).
    pub registration_on: bool,
    pub map_ids: Vec<u32>,
    pub mount: PathBuf,
    pub metrics: Arc<Metrics>,
    /// The DNS side, while the config has host rules or a proxy.
    pub dns: Option<dns::Dns>,
    /// What the DNS side works from (it follows every publish), and where it sends.
    pub dns_view: watch::Sender<Arc<dns::View>>,
    pub dns_wiring: dns::Wiring,
    /// The registered cgroups as last published (recomputed when registrations change):
    /// the one attribution the DNS side, enrichment, pod mode and the scans follow.
    pub registered: Arc<Registered>,
    /// The addresses host rules learned: merged from the DNS side's answers, expired
    /// here, compiled into every policy.
    pub learned: Arc<dns::learned::LearnedSet>,
    /// The learned addresses compiled into the installed policy (served on /dns).
    pub installed: Arc<Vec<policy::Learned>>,
    /// Writes the installed learned addresses for the next daemon.
    pub persist: super::ops::Persist,
    /// Pods identified through the CRI.
    pub pods: Arc<Table>,
    /// `exec --mcp` instances and their calls.
    pub mcp: Arc<Registry>,
    pub out: Outputs,
}

impl Owner {
    /// The owner of a booted kernel side and its first policy.
    pub fn new(
        k: super::boot::ForOwner,
        cfg: Arc<config::Config>,
        compiled: Compiled,
        learned: dns::learned::LearnedSet,
        dns_wiring: dns::Wiring,
        out: Outputs,
    ) -> Self {
        let learned = Arc::new(learned);
        let (dns_view, _) = watch::channel(Arc::new(dns::View {
            cfg: cfg.clone(),
            registered: Arc::default(),
            mcp: Arc::default(),
            generation: k.maps.generation(),
            learned: learned.clone(),
        }));
        Self {
            pod_mode: cfg.tc.enabled && !cfg.tc.pod_interfaces.is_empty(),
            cfg,
            compiled: Arc::new(compiled),
            maps: k.maps,
            ebpf: k.ebpf,
            tc_repaired: k.tc.as_ref().map_or(0, |t| t.repaired),
            tc: k.tc,
            attachments: k.attachments,
            persist: super::ops::Persist::start(k.pins.learned_file()),
            attach_dir: k.attach_dir,
            pins: k.pins,
            registration_on: k.registration_on,
            map_ids: k.map_ids,
            mount: k.mount,
            metrics: k.metrics,
            dns: None,
            dns_view,
            dns_wiring,
            registered: Arc::default(),
            installed: Arc::new(learned.snapshot()),
            learned,
            pods: Arc::new(k.pods),
            mcp: Arc::default(),
            out,
        }
    }

    /// Publishes the view, the names and the status document.
    pub fn publish(&mut self) {
        self.publish_names();
        self.publish_status();
    }

    pub fn publish_view(&self) {
        let pending = self
            .compiled
            .workloads
            .iter()
            .find(|w| w.pending)
            .map(|w| self.maps.cgroups_of(w.id))
            .unwrap_or_default();
        let same_policy = Arc::ptr_eq(&self.out.view.borrow().compiled, &self.compiled);
        let pod_workloads = if same_policy {
            self.out.view.borrow().pod_workloads.clone()
        } else {
            Arc::new(
                self.compiled
                    .workloads
                    .iter()
                    .filter(|w| w.pods.is_some() || w.pending || w.name == config::pods::PROXY)
                    .cloned()
                    .collect(),
            )
        };
        self.out.view.send_replace(Arc::new(View {
            cfg: self.cfg.clone(),
            compiled: self.compiled.clone(),
            pod_workloads,
            pending,
            installed: self.installed.clone(),
            registered: self.registered.clone(),
        }));
    }

    pub fn publish_names(&self) {
        let c = &self.compiled;
        self.out.names.send_replace(Arc::new(Names {
            mcp: self.mcp.clone(),
            pods: self.pods.clone(),
            workloads: c.workloads.iter().map(|w| (w.id, w.name.clone())).collect(),
            cgroups: c
                .workloads
                .iter()
                .filter_map(|w| Some((w.id, w.cgroup.clone()?)))
                .collect(),
            registered: self.registered.clone(),
            rules: Arc::new(c.rules.iter().map(|r| (r.id, r.text.clone())).collect()),
        }));
    }

    /// The `/status` document, the view, the names and the DNS side's view (all follow
    /// registrations).
    pub fn publish_status(&mut self) {
        let r = self.registered_now();
        let changed = *self.registered != r;
        if changed {
            self.registered = Arc::new(r);
        }
        self.out
            .status
            .send_replace(Arc::new(super::ops::status_json(self)));
        self.publish_view();
        if changed {
            let registered = self.registered.clone();
            self.out.names.send_modify(|n| {
                let mut next = (**n).clone();
                next.registered = registered;
                *n = Arc::new(next);
            });
        }
        self.publish_dns();
    }

    /// What the DNS side works from: the config, attribution, MCP instances, generation
    /// and learned set of this moment.
    pub fn publish_dns(&self) {
        self.dns_view.send_replace(Arc::new(dns::View {
            cfg: self.cfg.clone(),
            registered: self.registered.clone(),
            mcp: self.mcp.clone(),
            generation: self.maps.generation(),
            learned: self.learned.clone(),
        }));
    }

    /// The registered cgroups of this moment, with their directories and workloads.
    fn registered_now(&self) -> Registered {
        let names: std::collections::HashMap<u32, &str> = self
            .compiled
            .workloads
            .iter()
            .map(|w| (w.id, w.name.as_str()))
            .collect();
        Registered::new(
            &self.mount,
            self.maps
                .registered_dirs()
                .into_iter()
                .filter_map(|(id, dir, wid)| Some((id, dir, wid, names.get(&wid)?.to_string()))),
        )
    }

    /// Publishes the MCP registry alone (a call started or ended).
    pub fn publish_mcp(&self) {
        // The DNS proxy names the tool call a refusal happens under.
        self.publish_dns();
        self.out.names.send_modify(|n| {
            let mut next = (**n).clone();
            next.mcp = self.mcp.clone();
            *n = Arc::new(next);
        });
    }

    fn set_ready(&self, ok: bool) {
        self.out.shared.ready.store(ok, Ordering::SeqCst);
        self.metrics.ready.set(i64::from(ok));
    }

    /// Applies commands and runs the timers until [`Command::Stop`] or every sender is
    /// gone. Learned answers queued behind each other are installed once, newest.
    pub fn run(mut self, rx: &mpsc::Receiver<Command>) {
        let mut next_scan = Instant::now() + CGROUP_RESCAN;
        let mut next_check = Instant::now() + ATTACH_CHECK;
        loop {
            let wait = next_scan
                .min(next_check)
                .saturating_duration_since(Instant::now());
            let mut batch = Vec::new();
            match rx.recv_timeout(wait) {
                Ok(c) => batch.push(c),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
            batch.extend(rx.try_iter());
            for c in coalesce(batch) {
                if matches!(c, Command::Stop) {
                    self.set_ready(false);
                    // The DNS side first (it sends answers here), then the rest; the
                    // programs stay attached through their pins.
                    drop(self.dns.take());
                    self.persist.finish();
                    return;
                }
                self.apply(c);
            }
            let now = Instant::now();
            if now >= next_scan {
                let t = Instant::now();
                if self.maps.refresh_cgroups(&self.compiled, &self.mount) > 0 {
                    self.publish_status();
                }
                debug!(elapsed_us = t.elapsed().as_micros() as u64, "cgroup scan");
                next_scan = now + CGROUP_RESCAN;
            }
            if now >= next_check {
                // Cleanup only: the kernel refuses an expired answer on its own.
                self.expire_learned();
                let ok = self.check();
                self.set_ready(ok);
                next_check = now + ATTACH_CHECK;
            }
        }
        self.set_ready(false);
        self.persist.finish();
    }

    fn apply(&mut self, c: Command) {
        match c {
            Command::Reload(path) => self.reload(&path),
            Command::Learned(answers, done) => self.learned_answers(answers, done),
            Command::Pods {
                workloads,
                entries,
                table,
                file,
                done,
            } => {
                self.apply_pods(&workloads, entries, table, &file);
                let _ = done.send(());
            }
            Command::McpStart {
                peer_pid,
                start,
                reply,
            } => {
                let r = self.mcp_start(peer_pid, start);
                let _ = reply.send(r);
            }
            Command::McpUpdate {
                instance,
                message,
                reply,
            } => {
                let r = self.mcp_update(&instance, message);
                let _ = reply.send(r);
            }
            Command::McpEnd(i) => self.mcp_end(&i),
            Command::Stop => {}
        }
    }
}

/// Learned answers queued behind each other are merged and installed once, where the
/// last of them stood, and everyone waiting on any of them is answered then.
fn coalesce(batch: Vec<Command>) -> Vec<Command> {
    let Some(last) = batch
        .iter()
        .rposition(|c| matches!(c, Command::Learned(..)))
    else {
        return batch;
    };
    let mut waiting = Vec::new();
    let mut answers = Vec::new();
    let mut out = Vec::with_capacity(batch.len());
    for (i, c) in batch.into_iter().enumerate() {
        match c {
            Command::Learned(a, done) => {
                answers.extend(a);
                waiting.extend(done);
                if i == last {
                    out.push(Command::Learned(
                        std::mem::take(&mut answers),
                        std::mem::take(&mut waiting),
                    ));
                }
            }
            other => out.push(other),
        }
    }
    out
}

/// The owner's channel, as the daemon's tasks hold it.
#[derive(Clone)]
pub(super) struct Handle {
    pub tx: mpsc::Sender<Command>,
    pub view: watch::Receiver<Arc<View>>,
}

impl Handle {
    /// Sends a command; false if the owner is gone.
    pub fn send(&self, c: Command) -> bool {
        self.tx.send(c).is_ok()
    }

    /// Sends a command built around a reply channel and waits for the answer; `None` if
    /// the owner is gone.
    pub async fn ask<T>(&self, c: impl FnOnce(oneshot::Sender<T>) -> Command) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        if !self.send(c(tx)) {
            return None;
        }
        rx.await.ok()
    }

    pub fn view(&self) -> Arc<View> {
        self.view.borrow().clone()
    }
}

/// How long the daemon waits for the owner to stop before it exits anyway.
pub(super) const STOP_WAIT: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queued_learned_answers_are_merged_installed_once_and_everyone_is_answered() {
        let learned = |n: usize| {
            (0..n)
                .map(|i| policy::Learned {
                    workload: "w".into(),
                    name: "a.example".into(),
                    addr: std::net::IpAddr::from([10, 0, 0, i as u8]),
                    ttl: 60,
                    expires_unix: 1,
                    source: "proxy".into(),
                })
                .collect::<Vec<_>>()
        };
        let (a, mut ra) = oneshot::channel();
        let (b, mut rb) = oneshot::channel();
        let out = coalesce(vec![
            Command::Learned(learned(1), vec![a]),
            Command::Reload("x.toml".into()),
            Command::Learned(learned(2), vec![b]),
            Command::Stop,
        ]);
        assert_eq!(out.len(), 3, "one Learned, the reload, the stop");
        assert!(matches!(out[0], Command::Reload(_)));
        let Command::Learned(l, done) = &out[1] else {
            panic!("the merged answers come after the reload");
        };
        assert_eq!(l.len(), 3, "every answer, in order");
        assert_eq!(done.len(), 2, "both waiters are answered");
        assert!(matches!(out[2], Command::Stop));
        for c in out {
            if let Command::Learned(_, done) = c {
                for d in done {
                    d.send(()).unwrap();
                }
            }
        }
        assert!(ra.try_recv().is_ok() && rb.try_recv().is_ok());
    }
}
