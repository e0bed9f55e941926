//! What the daemon's loop does: reloads, learned answers, DNS settings, the attachment
//! and registration checks, pod interfaces, gauges.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use tracing::{debug, error, info, warn};

use super::{prepare_reload, state::Owner};
use crate::{
    config, dns,
    host::cgroup,
    kernel::{loader, pins::Pins},
    policy::{self, Compiled},
    telemetry::metrics::Metrics,
};

/// Pod mode: node-side interface -> pod workload cgroup, read in the TC namespace (a
/// thread enters `[tc] netns` if set). `None` when it cannot be read: the map stays.
pub(super) fn pod_interfaces(
    registered: &crate::host::attribution::Registered,
    netns: Option<&Path>,
) -> Option<std::collections::BTreeMap<u32, u64>> {
    std::thread::scope(|s| {
        s.spawn(|| {
            if let Some(ns) = netns {
                let f = std::fs::File::open(ns).ok()?;
                // SAFETY: valid netns fd; only this thread changes namespace.
                if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) }
                    != 0
                {
                    return None;
                }
            }
            crate::host::podlinks::scan(registered)
                .map_err(|e| warn!("pod mode: cannot read which interface leads to which pod: {e}"))
                .ok()
        })
        .join()
        .ok()
        .flatten()
    })
}

pub(super) fn map_id(m: &aya::maps::Map) -> Option<u32> {
    let data = crate::kernel::unix_hooks::map_data(m)?;
    data.info().ok().map(|i| i.id())
}

pub(super) fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl Owner {
    /// Asks the kernel which programs are attached, re-attaches any that someone
    /// detached (fail closed), and sets `programs_attached`. Returns whether all are.
    pub(super) fn check_attachment(&mut self) -> bool {
        let mut all = true;
        let mut changed = false;
        for (hook, attached) in loader::attachment_state(&self.attachments, &self.attach_dir) {
            let mut now_attached = attached;
            if !attached {
                error!(hook, cgroup = %self.attach_dir.display(), "program is no longer attached (detached by someone else?): attaching it again");
                match loader::reattach(
                    &mut self.ebpf,
                    hook,
                    &self.attach_dir,
                    &self.pins,
                    &mut self.attachments,
                ) {
                    Ok(()) => {
                        self.metrics.reattached.inc();
                        changed = true;
                        now_attached =
                            loader::attachment_state(&self.attachments, &self.attach_dir)
                                .iter()
                                .any(|(h, a)| *h == hook && *a);
                    }
                    Err(e) => error!(hook, "re-attaching failed: {e}"),
                }
            }
            self.metrics
                .programs_attached
                .with_label_values(&[hook])
                .set(i64::from(now_attached));
            all &= now_attached;
        }
        if changed {
            self.publish_status();
        }
        all
    }

    /// The periodic check: TC links and pod interfaces, program attachment, the
    /// registration links, and the maps against what was installed. Returns readiness.
    pub(super) fn check(&mut self) -> bool {
        if let Some(tc) = self.tc.as_mut() {
            let n = tc.sync(&mut self.ebpf);
            self.metrics
                .programs_attached
                .with_label_values(&["tc"])
                .set(i64::from(n > 0));
            let wanted = self
                .pod_mode
                .then(|| pod_interfaces(&self.registered, self.cfg.tc.netns.as_deref()))
                .flatten();
            if let Some(wanted) = wanted {
                if self.maps.set_sources(&wanted) > 0 {
                    self.publish_status();
                }
            }
        }
        let ok = self.check_attachment();
        if let Some(tc) = self.tc.as_ref() {
            let before = self.tc_repaired;
            self.tc_repaired = tc.repaired;
            if self.tc_repaired > before {
                repaired(&self.metrics, "tc_link", self.tc_repaired - before);
            }
        }
        let missing = if self.registration_on {
            loader::tracepoints_missing(&self.pins)
        } else {
            Vec::new()
        };
        if !missing.is_empty() {
            error!(hooks = ?missing, "a registration link pin was removed behind the daemon's back: attaching again");
            if attach_registration(
                &mut self.ebpf,
                &self.pins,
                loader::object_hash(),
                &self.metrics,
            ) {
                repaired(&self.metrics, "link", missing.len() as u64);
            }
        }
        let t_repair = std::time::Instant::now();
        let fixed = self.maps.repair(&self.mount);
        debug!(
            elapsed_us = t_repair.elapsed().as_micros() as u64,
            "state check"
        );
        for (what, n) in fixed {
            error!(
                what,
                count = n,
                "the kernel's state differed from what the daemon installed (tampering?): repaired"
            );
            repaired(&self.metrics, what, n);
        }
        ok
    }
}

pub(super) fn repaired(metrics: &Metrics, what: &str, n: u64) {
    metrics.state_repaired.with_label_values(&[what]).inc_by(n);
}

/// Attaches (or adopts) the cgroup tracepoint programs; says so where the kernel refuses
/// them. Returns whether they run.
pub(super) fn attach_registration(
    ebpf: &mut aya::Ebpf,
    pins: &Pins,
    pinned_hash: u32,
    metrics: &Metrics,
) -> bool {
    let ok = match loader::attach_tracepoints(ebpf, pins, pinned_hash) {
        Ok(adopted) => {
            if !adopted.is_empty() {
                info!(hooks = ?adopted, "adopted the pinned registration links");
            }
            true
        }
        Err(e) => {
            error!("new workload cgroups are registered by the scan only, up to 100 ms after they are created (a process that joins one at once is unguarded until then), and a guarded task that leaves its workload's cgroup keeps its policy only if it had a home before: the kernel refused a tracepoint program ({e})");
            false
        }
    };
    for (_, hook, _) in loader::tracepoints() {
        metrics
            .programs_attached
            .with_label_values(&[hook])
            .set(i64::from(ok));
    }
    ok
}

/// Attaches (or adopts) what judges AF_UNIX destinations: the cgroup unix hooks
/// (Linux 6.7+, by the address the caller wrote) and, where BPF LSM runs, the LSM unix
/// programs (by the address the peer was bound to). The cgroup hooks join
/// `attachments`, so self-repair watches them as the other socket hooks. Says so where
/// neither runs.
pub(super) fn attach_unix(
    ebpf: &mut aya::Ebpf,
    attach_dir: &Path,
    pins: &Pins,
    pinned_hash: u32,
    metrics: &Metrics,
    attachments: &mut loader::Attachments,
) {
    let cgroup = match crate::kernel::unix_hooks::attach(ebpf, attach_dir, pins, pinned_hash) {
        Ok(hooks) => {
            for (hook, id) in hooks {
                attachments.expected.insert(hook, id);
                metrics.programs_attached.with_label_values(&[hook]).set(1);
            }
            Ok(())
        }
        Err(e) => Err(e.to_string()),
    };
    let lsm = match crate::kernel::unix_hooks::attach_lsm(ebpf, pins, pinned_hash) {
        Ok(hooks) => {
            for (hook, _) in hooks {
                metrics.programs_attached.with_label_values(&[hook]).set(1);
            }
            Ok(())
        }
        Err(e) => Err(e.to_string()),
    };
    metrics
        .unix_hooks_available
        .set(i64::from(cgroup.is_ok() || lsm.is_ok()));
    match (cgroup, lsm) {
        (Ok(()), Ok(())) => info!("Unix-socket destinations are judged by the address written (connect_unix, sendmsg_unix) and by the peer's bound address (BPF LSM)"),
        (Ok(()), Err(e)) => info!("Unix-socket destinations are judged by the address the caller writes (connect_unix, sendmsg_unix); not by the peer's bound address, BPF LSM does not run here ({e}): a symlink or other name for a deny-listed socket is not refused"),
        (Err(e), Ok(())) => warn!("Unix-socket destinations are judged by the peer's bound address only (BPF LSM unix_stream_connect, unix_may_send): the kernel has no cgroup unix hooks ({e})"),
        (Err(c), Err(l)) => error!("Unix-socket destinations are not judged: the kernel has no cgroup AF_UNIX hooks (Linux 6.7+) or refused them ({c}), and BPF LSM does not run ({l}). A guarded process can reach local sockets (the container runtime's, D-Bus) unless its mount namespace hides them (`mcp-guard exec` does; for systemd units use InaccessiblePaths=)"),
    }
}

/// Publishes a pass over the homes of guarded tasks; says so when some could not be
/// recorded.
pub(super) fn publish_homes(metrics: &Metrics, pass: &crate::kernel::maps::HomesPass) {
    metrics
        .homes_tracked
        .set(i64::try_from(pass.tracked).unwrap_or(i64::MAX));
    metrics.homes_seeded.inc_by(pass.seeded as u64);
    if pass.failed > 0 {
        metrics.homes_failed.inc_by(pass.failed as u64);
        warn!(
            failed = pass.failed,
            tracked = pass.tracked,
            "the map of guarded tasks' homes is full: these tasks are judged by the cgroup they run in only (a root one that leaves it is no longer guarded)"
        );
    }
}

pub(super) fn set_policy_gauges(metrics: &Metrics, c: &Compiled) {
    metrics.policy_rules.reset();
    for w in &c.workloads {
        metrics
            .policy_rules
            .with_label_values(&[&w.name])
            .set(w.rules as i64);
        metrics.workload_known(&w.name);
    }
    metrics.workloads.set(c.workloads.len() as i64);
}

impl Owner {
    /// Validates first; an invalid config leaves the running policy untouched.
    pub(super) fn reload(&mut self, path: &Path) {
        let metrics = self.metrics.clone();
        let (cfg, compiled) = match prepare_reload(path, &self.installed) {
            Ok(v) => v,
            Err(e) => {
                error!("reload refused, the running policy stays in force: {e:#}");
                metrics.reloads.with_label_values(&["failure"]).inc();
                return;
            }
        };
        if let Err(e) = self
            .maps
            .install(&compiled, &self.mount, cfg.rate_limit_per_sec)
        {
            error!("reload failed writing maps, the running policy stays in force: {e}");
            metrics.reloads.with_label_values(&["failure"]).inc();
            return;
        }
        metrics
            .policy_generation
            .set(i64::from(self.maps.generation()));
        info!(generation = self.maps.generation(), "policy reloaded");
        set_policy_gauges(&metrics, &compiled);
        metrics.reloads.with_label_values(&["success"]).inc();
        metrics.last_reload_success.set(unix_now());
        for what in start_only_changes(&self.cfg, &cfg) {
            warn!("{}: {what} changed, which is read at start only: restart mcp-guard to apply it (the new policy is in force)", path.display());
        }
        self.pod_mode = cfg.tc.enabled && !cfg.tc.pod_interfaces.is_empty();
        // What the new rules no longer cover goes (the compiler already left it out).
        if Arc::make_mut(&mut self.learned).retain_for(&cfg) {
            self.installed = Arc::new(self.learned.snapshot());
            self.persist.send(self.installed.clone());
        }
        self.learned.publish_metrics(&cfg, &self.metrics);
        self.cfg = Arc::new(cfg);
        self.compiled = Arc::new(compiled);
        self.sync_dns();
        self.publish();
    }
}

/// The learned addresses a previous daemon left, minus those that expired since.
pub(super) fn read_learned(path: &Path, dns: &config::DnsConfig) -> Vec<policy::Learned> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    let now = dns::learned::unix_now();
    match serde_json::from_str::<Vec<policy::Learned>>(&text) {
        // No entry outlives what the current bounds would give a fresh answer.
        Ok(v) => v
            .into_iter()
            .filter(|l| l.expires_unix > now)
            .map(|mut l| {
                l.expires_unix = l
                    .expires_unix
                    .min(now + u64::from(dns.max_ttl) + u64::from(dns.grace));
                l
            })
            .collect(),
        Err(e) => {
            warn!(file = %path.display(), "ignoring unreadable learned-address state: {e}");
            Vec::new()
        }
    }
}

/// Keeps the installed learned addresses for the next daemon (write, then rename).
pub(super) fn write_learned(path: &Path, learned: &[policy::Learned]) {
    write_state(path, learned, "learned addresses");
}

/// Writes the installed learned addresses for the next daemon on a thread of its own,
/// the newest set only, so installing a learned answer never waits on the disk. What
/// was sent is written before [`Persist::finish`] returns (the daemon stopping).
pub(super) struct Persist {
    tx: Option<std::sync::mpsc::Sender<Arc<Vec<policy::Learned>>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Persist {
    pub fn start(path: PathBuf) -> Self {
        let (tx, rx) = std::sync::mpsc::channel::<Arc<Vec<policy::Learned>>>();
        let thread = std::thread::Builder::new()
            .name("mcpg-persist".into())
            .spawn(move || {
                while let Ok(mut set) = rx.recv() {
                    set = rx.try_iter().last().unwrap_or(set);
                    write_learned(&path, &set);
                }
            })
            .ok();
        Self {
            tx: Some(tx),
            thread,
        }
    }

    pub fn send(&self, set: Arc<Vec<policy::Learned>>) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(set);
        }
    }

    /// Writes what is pending and stops the thread.
    pub fn finish(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Writes daemon state kept for the next daemon (learned addresses, placed pods): a
/// temporary file renamed over the old one, so a reader never sees half of it.
pub(super) fn write_state(path: &Path, value: &(impl serde::Serialize + ?Sized), what: &str) {
    let write = || -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension("json.tmp");
        std::fs::write(
            &tmp,
            serde_json::to_vec(value).map_err(std::io::Error::other)?,
        )?;
        std::fs::rename(&tmp, path)
    };
    if let Err(e) = write() {
        warn!(file = %path.display(), "cannot keep the {what} for a restart: {e}");
    }
}

/// Settings a reload does not apply (they shape the process, not the policy).
pub(super) fn start_only_changes(old: &config::Config, new: &config::Config) -> Vec<&'static str> {
    let mut out = Vec::new();
    if old.control_socket != new.control_socket || old.control_group != new.control_group {
        out.push("[daemon] control_socket and control_group");
    }
    if old.metrics_listen != new.metrics_listen {
        out.push("[metrics] listen");
    }
    if old.sink != new.sink || old.events_file != new.events_file {
        out.push("[events] sink / file");
    }
    if old.attach_cgroup != new.attach_cgroup || old.cgroup_root != new.cgroup_root {
        out.push("[daemon] attach_cgroup / cgroup_root");
    }
    if old.pin_dir != new.pin_dir || old.on_exit != new.on_exit {
        out.push("[daemon] pin_dir / on_exit");
    }
    if old.tc != new.tc {
        out.push("[tc]");
    }
    if old.cgroup_skb != new.cgroup_skb {
        out.push("[daemon] cgroup_skb");
    }
    out
}

impl Owner {
    /// Starts, restarts or stops the DNS side to match the config (it follows the
    /// published view for everything else).
    pub(super) fn sync_dns(&mut self) {
        let cfg = &self.cfg;
        if !dns::wanted(cfg) {
            if self.dns.take().is_some() {
                info!("DNS: no host rules and no proxy any more: stopped");
            }
            return;
        }
        if let Some(d) = self.dns.as_ref() {
            if d.accepts(cfg) {
                return;
            }
            info!("DNS: [dns] changed: restarting the resolver and the proxy");
        }
        drop(self.dns.take());
        self.publish_dns();
        match dns::Dns::start(self.dns_view.subscribe(), self.dns_wiring.clone()) {
            Ok(d) => self.dns = Some(d),
            Err(e) => error!(
                "DNS could not start, so host rules allow nothing until it can (fix and reload): {e:#}"
            ),
        }
    }

    /// Merges answers from the DNS side; installs the policy if they changed anything.
    /// `done` is answered as soon as the kernel enforces them (or nothing changed).
    pub(super) fn learned_answers(
        &mut self,
        answers: Vec<policy::Learned>,
        mut done: Vec<tokio::sync::oneshot::Sender<()>>,
    ) {
        let changed = Arc::make_mut(&mut self.learned).merge(answers, &self.cfg, &self.metrics);
        if changed != dns::learned::Need::Nothing {
            self.apply_learned(&mut done);
        }
        for d in done {
            let _ = d.send(());
        }
    }

    /// Drops learned addresses whose TTL and grace ran out, and installs without them.
    pub(super) fn expire_learned(&mut self) {
        let now = dns::learned::unix_now();
        if self.installed.iter().any(|l| l.expires_unix <= now)
            && Arc::make_mut(&mut self.learned).expire(now)
        {
            self.apply_learned(&mut Vec::new());
        }
    }

    /// The learned set back to what the kernel enforces (an install failed), so the DNS
    /// side offers those answers again.
    fn keep_installed(&mut self) {
        self.learned = Arc::new(dns::learned::LearnedSet::seeded(&self.installed, &self.cfg));
        self.publish_dns();
    }

    /// Compiles the config with the learned set and switches to it whole; answers `done`
    /// once the kernel enforces it.
    pub(super) fn apply_learned(&mut self, done: &mut Vec<tokio::sync::oneshot::Sender<()>>) {
        let learned = self.learned.snapshot();
        self.learned.publish_metrics(&self.cfg, &self.metrics);
        let compiled = match policy::compile_with(&self.cfg, &learned) {
            Ok(c) => c,
            Err(e) => {
                error!(
                    "learned DNS answers do not fit the policy, keeping the previous addresses: {e}"
                );
                return self.keep_installed();
            }
        };
        if let Err(e) = self
            .maps
            .install(&compiled, &self.mount, self.cfg.rate_limit_per_sec)
        {
            error!("writing learned DNS answers failed, the previous policy stays in force: {e}");
            return self.keep_installed();
        }
        let generation = self.maps.generation();
        self.metrics.policy_generation.set(i64::from(generation));
        debug!(
            generation,
            learned = learned.len(),
            "policy updated from DNS answers"
        );
        self.compiled = Arc::new(compiled);
        self.installed = Arc::new(learned);
        // What /dns, /status and the DNS side see is the new policy before anyone who
        // waits for these answers has them (the kernel already enforces it).
        self.publish();
        for d in done.drain(..) {
            let _ = d.send(());
        }
        self.persist.send(self.installed.clone());
    }
}

/// The `/status` document.
pub(super) fn status_json(o: &Owner) -> String {
    let (c, maps, pods) = (&o.compiled, &o.maps, &o.pods);
    let workloads: Vec<serde_json::Value> = c
        .workloads
        .iter()
        .map(|w| {
            serde_json::json!({
                "name": w.name,
                "cgroup": w.cgroup,
                "cgroup_path": w.cgroup.as_deref().map(|c| cgroup::fs_path(&o.mount, c)),
                "pods": w.pods.as_ref().map(|p| p.describe()),
                "pod_list": w.pods.as_ref().map(|_| pods.values().filter(|p| p.workload_id == Some(w.id)).collect::<Vec<_>>()),
                "cgroup_id": maps.cgroups_of(w.id).first(),
                "cgroup_ids": maps.cgroups_of(w.id),
            })
        })
        .collect();
    serde_json::json!({
        "generation": maps.generation(),
        "workloads": workloads,
        "programs": o.attachments.expected,
        "adopted": o.attachments.adopted,
        "maps": o.map_ids,
        "pod_sources": maps.source_count(),
        "pods": pods.values().collect::<Vec<_>>(),
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_learned_addresses_are_read_back_within_the_current_bounds() {
        let file = std::env::temp_dir().join(format!("mcpg-learned-{}.json", std::process::id()));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let entry = |addr: &str, expires_unix| policy::Learned {
            workload: "w".into(),
            name: "a.example".into(),
            addr: addr.parse().unwrap(),
            ttl: 60,
            expires_unix,
            source: "proxy".into(),
        };
        write_learned(
            &file,
            &[
                entry("93.184.216.34", now + 100_000),
                entry("93.184.216.35", now - 1),
            ],
        );
        let cfg = config::parse(Path::new("t.toml"), "[dns]\nmax_ttl = 10\ngrace = 5\n").unwrap();
        let back = read_learned(&file, &cfg.dns);
        std::fs::remove_file(&file).unwrap();
        assert_eq!(back.len(), 1, "the expired entry is dropped");
        assert!(
            back[0].expires_unix <= now + 16,
            "cut back to max_ttl + grace"
        );
        assert!(
            read_learned(&file, &cfg.dns).is_empty(),
            "no file, nothing kept"
        );
    }
}
