//! Boot: what `run` does before the state owner takes over. Binds the listeners, then
//! loads or adopts the kernel side (maps, policy, programs, homes, TC) and hands back its
//! handles. Nothing here runs after ready.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{Context as _, Result};
use aya::maps::{MapData, RingBuf};
use tokio::net::{TcpListener, UnixListener};
use tracing::{error, info, warn};

use super::{ops, pods};
use crate::{
    api::http,
    config,
    host::{attribution::Registered, cgroup},
    kernel::{
        loader::{self, Attachments},
        maps::{CounterMaps, Homes, PolicyMaps},
        pins::Pins,
        tc::Tc,
    },
    policy::{self, Compiled},
    telemetry::metrics::Metrics,
};

/// The sockets the daemon serves, bound before anything touches the kernel so a second
/// daemon fails here.
pub(super) struct Listeners {
    pub tcp: TcpListener,
    pub control: UnixListener,
    pub mcp: UnixListener,
}

impl Listeners {
    pub async fn bind(cfg: &config::Config, path: &Path) -> Result<Self> {
        let taken = |key: &str, what: &dyn std::fmt::Display| {
            format!(
                "{}: {key} {what} cannot be bound (is another mcp-guard running?)",
                path.display()
            )
        };
        let tcp = http::bind(cfg.metrics_listen)
            .await
            .with_context(|| taken("metrics.listen", &cfg.metrics_listen))?;
        let control = http::bind_control(&cfg.control_socket, cfg.control_group)
            .with_context(|| taken("daemon.control_socket", &cfg.control_socket.display()))?;
        let mcp = http::bind_control(&cfg.mcp_socket, None)
            .with_context(|| taken("daemon.mcp_socket", &cfg.mcp_socket.display()))?;
        Ok(Self { tcp, control, mcp })
    }
}

/// Addresses learned for host rules before a restart stay allowed until they expire, so
/// an upgrade does not cut workloads off names they resolved a moment ago. They count
/// only while the pinned state they were enforced with is still there.
pub(super) fn learned_before(cfg: &config::Config) -> Vec<policy::Learned> {
    let pins = Pins::new(&cfg.pin_dir);
    if !pins.has_links() {
        return Vec::new();
    }
    let learned = ops::read_learned(&pins.learned_file(), &cfg.dns);
    if !learned.is_empty() {
        info!(
            addresses = learned.len(),
            "kept the addresses learned for host rules before the restart (until they expire)"
        );
    }
    learned
}

/// Warns about workload cgroups that do not exist yet (they are enforced once they do).
pub(super) fn warn_missing_cgroups(compiled: &Compiled, mount: &Path) {
    for w in &compiled.workloads {
        let Some(c) = w.cgroup.as_deref() else {
            continue;
        };
        if !w.pending && cgroup::id(mount, c).is_err() {
            warn!(workload = %w.name, cgroup = %c, "workload cgroup does not exist yet; it will be enforced as soon as it appears");
        }
    }
}

/// The kernel side, loaded or adopted, with the policy installed and the programs
/// attached: what the state owner, the event reader, `/metrics`, the homes pass and the
/// pod watcher take over.
pub(super) struct Kernel {
    pub owned: ForOwner,
    pub counters: CounterMaps,
    pub ring: RingBuf<MapData>,
    pub homes: Homes,
    pub pod_watch: pods::Watch,
}

/// What becomes the state owner's alone.
pub(super) struct ForOwner {
    pub ebpf: aya::Ebpf,
    pub maps: PolicyMaps,
    pub attachments: Attachments,
    pub attach_dir: PathBuf,
    pub pins: Pins,
    pub registration_on: bool,
    pub tc: Option<Tc>,
    pub map_ids: Vec<u32>,
    pub pods: crate::pods::Table,
    pub mount: PathBuf,
    pub metrics: Arc<Metrics>,
}

/// Loads or adopts the kernel side. Policy first, then attach: the programs never run
/// without a policy, and with adopted maps the old policy stays live until the new one
/// is switched in whole.
pub(super) async fn kernel(
    cfg: &config::Config,
    compiled: &Compiled,
    mount: &Path,
    path: &Path,
) -> Result<Kernel> {
    crate::kernel::features::check_with(crate::kernel::features::present)
        .map_err(anyhow::Error::msg)?;
    let pins = Pins::new(&cfg.pin_dir);
    pins.prepare().with_context(|| {
        format!(
            "{}: daemon.pin_dir {}",
            path.display(),
            cfg.pin_dir.display()
        )
    })?;
    // Pods first: a restarted daemon registers every known pod with the policy instead
    // of holding them all pending until the first poll.
    let was_pinned = pins.has_links();
    let (pod_watch, first_pods) =
        pods::first(cfg, compiled, mount, pins.pods_file(), was_pinned).await;
    let mut ebpf = loader::open(&pins)?;
    let map_ids: Vec<u32> = ebpf.maps().filter_map(|(_, m)| ops::map_id(m)).collect();
    let mut maps = PolicyMaps::take(&mut ebpf)?;
    let counters = CounterMaps::take(&mut ebpf)?;
    crate::telemetry::unix_paths::set_unix_paths(aya::maps::HashMap::try_from(
        ebpf.take_map("UNIX_PATHS_1")
            .context("map UNIX_PATHS_1 missing")?,
    )?);
    let pinned_hash = maps.adopt()?;
    let metrics = Arc::new(Metrics::new(&kernel_release()));
    if was_pinned {
        metrics.prime(&counters.read()?);
    }
    let mut pods_table = crate::pods::Table::default();
    if let Some(placed) = first_pods {
        maps.set_pods(placed.entries);
        pods_table = placed.table;
    }
    maps.install(compiled, mount, cfg.rate_limit_per_sec)?;
    let ring = RingBuf::try_from(ebpf.take_map("EVENTS_1").context("map EVENTS_1 missing")?)?;
    let attach_dir = cgroup::fs_path(mount, &cfg.attach_cgroup);
    let (attachments, registration_on) = attach(
        &mut ebpf,
        &maps,
        cfg,
        &attach_dir,
        &pins,
        pinned_hash,
        &metrics,
    )?;
    let homes = seed_homes(&mut ebpf, &mut maps, compiled, mount, &metrics)?;
    let tc = load_tc(&mut ebpf, cfg, &pins, pinned_hash, &metrics)?;
    if was_pinned {
        info!(
            generation = maps.generation(),
            adopted = ?attachments.adopted,
            pin_dir = %pins.dir.display(),
            "adopted pinned state from a previous daemon: enforcement never stopped"
        );
    }
    Ok(Kernel {
        owned: ForOwner {
            ebpf,
            maps,
            attachments,
            attach_dir,
            pins,
            registration_on,
            tc,
            map_ids,
            pods: pods_table,
            mount: mount.to_path_buf(),
            metrics,
        },
        counters,
        ring,
        homes,
        pod_watch,
    })
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "unknown".into(), |s| s.trim().to_string())
}

/// Attaches the cgroup programs, the unix hooks, BPF LSM and the registration
/// tracepoints; returns the attachments and whether registration runs.
fn attach(
    ebpf: &mut aya::Ebpf,
    maps: &PolicyMaps,
    cfg: &config::Config,
    attach_dir: &Path,
    pins: &Pins,
    pinned_hash: u32,
    metrics: &Metrics,
) -> Result<(Attachments, bool)> {
    let skip: &[&str] = if cfg.cgroup_skb { &[] } else { &["cgroup_skb"] };
    let mut attachments = loader::attach_sock_addr(ebpf, attach_dir, pins, pinned_hash, skip)?;
    ops::attach_unix(
        ebpf,
        attach_dir,
        pins,
        pinned_hash,
        metrics,
        &mut attachments,
    );
    match loader::attach_lsm(ebpf, pins, pinned_hash) {
        Ok(_) => {
            metrics
                .programs_attached
                .with_label_values(&[loader::LSM_HOOK])
                .set(1);
            metrics.lsm_available.set(1);
        }
        Err(e) => {
            // Not a detached program: the kernel never ran it. Reported on its own gauge.
            metrics.lsm_available.set(0);
            error!(
                "AF_PACKET sockets stay open: the kernel refused the BPF LSM program ({e}). Needs CONFIG_BPF_LSM, \"bpf\" in the lsm= boot list, and a kernel that permits BPF LSM programs (some locked-down kernels refuse them). Meanwhile drop CAP_NET_RAW from MCP servers"
            );
        }
    }
    // Registration at cgroup creation: no window between a workload cgroup's mkdir and
    // its policy. Workloads whose pattern the kernel cannot decide wait for the scan.
    for (workload, why) in maps.scan_only() {
        warn!(workload = %workload, "its cgroup is registered by the scan (up to 100 ms after it is created), not by the kernel at creation: {why}; use an exact path, \"parent/*\" or \"parent/prefix*\"");
    }
    // Repaired only if it ran: a kernel that refuses it is reported once, not every second.
    let registration_on = ops::attach_registration(ebpf, pins, pinned_hash, metrics);
    Ok((attachments, registration_on))
}

/// Sticky identity: tasks that were running before the tracepoints get their home now,
/// after the tracepoints (a task created meanwhile has one from its creator).
fn seed_homes(
    ebpf: &mut aya::Ebpf,
    maps: &mut PolicyMaps,
    compiled: &Compiled,
    mount: &Path,
    metrics: &Metrics,
) -> Result<Homes> {
    // Cgroups the kernel registered since the install are adopted first.
    maps.refresh_cgroups(compiled, mount);
    let registered = Registered::new(
        mount,
        maps.registered_dirs()
            .into_iter()
            .map(|(id, dir, wid)| (id, dir, wid, String::new())),
    );
    let mut homes = Homes::take(ebpf)?;
    let pass = homes.pass(&registered);
    ops::publish_homes(metrics, &pass);
    info!(
        seeded = pass.seeded,
        tracked = pass.tracked,
        swept = pass.swept,
        "homes of guarded tasks recorded: a task that leaves its workload's cgroup keeps its policy"
    );
    Ok(homes)
}

/// The TC classifier where the config turns it on; otherwise pinned TC links of an
/// earlier config are detached.
fn load_tc(
    ebpf: &mut aya::Ebpf,
    cfg: &config::Config,
    pins: &Pins,
    pinned_hash: u32,
    metrics: &Metrics,
) -> Result<Option<Tc>> {
    if !cfg.tc.enabled {
        crate::kernel::tc::unpin_all(pins);
        return Ok(None);
    }
    let mut tc = Tc::load(ebpf, &cfg.tc, pins, pinned_hash).context("loading the TC classifier")?;
    let n = tc.sync(ebpf);
    metrics
        .programs_attached
        .with_label_values(&["tc"])
        .set(i64::from(n > 0));
    Ok(Some(tc))
}
