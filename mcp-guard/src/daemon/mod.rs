//! `mcp-guard run`: load (or adopt) the pinned programs, enforce, report, reload on
//! SIGHUP and on config file changes, and on SIGTERM/SIGINT keep or detach.

use std::{
    path::{Path, PathBuf},
    sync::{atomic::Ordering, Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, Result};
use aya::maps::RingBuf;
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::{broadcast, watch},
};
use tracing::{debug, error, info, warn};

use crate::{
    api::http::{self, Shared},
    config::{self, OnExit},
    dns,
    host::cgroup,
    kernel::loader,
    kernel::maps::{CounterMaps, PolicyMaps},
    kernel::pins::Pins,
    policy::{self, Compiled},
    telemetry::metrics::Metrics,
    telemetry::{
        events::{self, Delivered},
        sink::SinkWriter,
    },
};

mod mcp;
mod ops;
mod pods;
mod state;
use ops::*;
use state::{Command, Handle, Outputs, Owner};

/// How often workload cgroups are re-resolved, so a cgroup created after start (a
/// systemd unit starting, a pod scheduled) is enforced without a reload.
const CGROUP_RESCAN: Duration = Duration::from_millis(100);
/// How often the daemon verifies with the kernel that its programs are still attached.
const ATTACH_CHECK: Duration = Duration::from_secs(1);
/// How often the config file is checked for changes (edits, ConfigMap symlink swaps).
const CONFIG_CHECK: Duration = Duration::from_secs(1);
/// How often the capabilities of guarded processes are read from /proc.
const POSTURE_CHECK: Duration = Duration::from_secs(2);
/// How often tasks of guarded workloads without a home are looked for (and exited
/// ones swept).
const HOMES_PASS: Duration = Duration::from_secs(2);

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "unknown".into(), |s| s.trim().to_string())
}

/// Loads and compiles a config, logging warnings. Nothing touches the kernel here.
///
/// # Errors
/// The config is invalid or cannot be compiled.
pub fn prepare(path: &Path) -> Result<(config::Config, Compiled)> {
    compile(config::load(path)?)
}

/// [`prepare`] for a config already loaded (its warnings logged, the policy compiled and
/// checked against the map sizes).
///
/// # Errors
/// The policy does not compile or does not fit the kernel maps.
pub fn compile(cfg: config::Config) -> Result<(config::Config, Compiled)> {
    compile_config(cfg, &[])
}

/// Compiles a validated config with the addresses learned for its host rules.
fn compile_config(
    cfg: config::Config,
    learned: &[policy::Learned],
) -> Result<(config::Config, Compiled)> {
    for w in &cfg.warnings {
        warn!("{w}");
    }
    let compiled = policy::compile_with(&cfg, learned)?;
    compiled
        .fits_the_maps()
        .map_err(|e| anyhow::anyhow!("{}: {e}", cfg.path.display()))?;
    Ok((cfg, compiled))
}

/// Reads a config for a reload, refusing a file caught mid-write: a truncated file can
/// be a valid config that guards less (an empty file has no workloads at all). The
/// content must read the same twice, 50 ms apart, and must not be empty.
fn read_settled(path: &Path) -> Result<String> {
    let read = || {
        std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read the config file", path.display()))
    };
    let mut text = read()?;
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(50));
        let again = read()?;
        if again == text {
            anyhow::ensure!(
                !text.trim().is_empty(),
                "{}: the config file is empty (being written?); an empty config would guard nothing",
                path.display()
            );
            return Ok(text);
        }
        text = again;
    }
    anyhow::bail!(
        "{}: the config file keeps changing; trying again at the next change",
        path.display()
    )
}

/// Like [`prepare`], for a reload: from settled content only.
fn prepare_reload(path: &Path, learned: &[policy::Learned]) -> Result<(config::Config, Compiled)> {
    compile_config(config::parse(path, &read_settled(path)?)?, learned)
}

/// The content of the config file, following symlinks (a Kubernetes ConfigMap volume
/// swaps a `..data` symlink), or `None` if it cannot be read.
fn config_fingerprint(path: &Path) -> Option<Vec<u8>> {
    std::fs::read(path).ok()
}

pub async fn run(config_path: PathBuf) -> Result<()> {
    // SIGHUP is ignored while the daemon boots (main sets it: a caught signal would
    // interrupt the verifier) and caught from just before "ready". The file is
    // fingerprinted before it is read, so a change during boot is reloaded at once.
    let mut fingerprint = config_fingerprint(&config_path);
    let cfg = config::load(&config_path)?;
    // Addresses learned for host rules before a restart stay allowed until they expire,
    // so an upgrade does not cut workloads off names they resolved a moment ago. They
    // count only while the pinned state they were enforced with is still there.
    let learned = if Pins::new(&cfg.pin_dir).has_links() {
        read_learned(&Pins::new(&cfg.pin_dir).learned_file(), &cfg.dns)
    } else {
        Vec::new()
    };
    if !learned.is_empty() {
        info!(
            addresses = learned.len(),
            "kept the addresses learned for host rules before the restart (until they expire)"
        );
    }
    // The policy is compiled once, before anything touches the kernel.
    let (cfg, compiled) = compile_config(cfg, &learned)?;
    let mount = cgroup::root(cfg.cgroup_root.as_deref())?;
    for w in &compiled.workloads {
        let Some(c) = w.cgroup.as_deref() else {
            continue;
        };
        if w.name != crate::config::pods::PENDING && cgroup::id(&mount, c).is_err() {
            warn!(workload = %w.name, cgroup = %c, "workload cgroup does not exist yet; it will be enforced as soon as it appears");
        }
    }
    let listener = http::bind(cfg.metrics_listen).await.with_context(|| {
        format!(
            "{}: metrics.listen {} cannot be bound (is another mcp-guard running?)",
            config_path.display(),
            cfg.metrics_listen
        )
    })?;

    let control =
        http::bind_control(&cfg.control_socket, cfg.control_group).with_context(|| {
            format!(
                "{}: daemon.control_socket {} cannot be bound (is another mcp-guard running?)",
                config_path.display(),
                cfg.control_socket.display()
            )
        })?;
    let control_path = cfg.control_socket.clone();
    let mcp_listener = http::bind_control(&cfg.mcp_socket, None).with_context(|| {
        format!(
            "{}: daemon.mcp_socket {} cannot be bound (is another mcp-guard running?)",
            config_path.display(),
            cfg.mcp_socket.display()
        )
    })?;
    let mcp_path = cfg.mcp_socket.clone();
    crate::kernel::features::check_with(crate::kernel::features::present)
        .map_err(anyhow::Error::msg)?;
    let pins = Pins::new(&cfg.pin_dir);
    pins.prepare().with_context(|| {
        format!(
            "{}: daemon.pin_dir {}",
            config_path.display(),
            cfg.pin_dir.display()
        )
    })?;
    // Pods first: a restarted daemon registers every known pod with the policy instead
    // of holding them all pending until the first poll.
    let (pod_watch, first_pods) = {
        let pins = Pins::new(&cfg.pin_dir);
        pods::first(&cfg, &compiled, &mount, pins.pods_file(), pins.has_links()).await
    };
    let mut pods_table = crate::pods::Table::default();
    let was_pinned = pins.has_links();
    let mut ebpf = loader::open(&pins)?;
    let map_ids: Vec<u32> = ebpf.maps().filter_map(|(_, m)| map_id(m)).collect();
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
    // Policy first, then attach: the programs never run without a policy. With adopted
    // maps the old policy stays live until the new one is switched in whole.
    if let Some((entries, table)) = first_pods {
        maps.set_pods(entries);
        pods_table = table;
    }
    maps.install(&compiled, &mount, cfg.rate_limit_per_sec)?;
    let ring = RingBuf::try_from(ebpf.take_map("EVENTS_1").context("map EVENTS_1 missing")?)?;
    let attach_dir = cgroup::fs_path(&mount, &cfg.attach_cgroup);
    let skip: &[&str] = if cfg.cgroup_skb { &[] } else { &["cgroup_skb"] };
    let mut attachments =
        loader::attach_sock_addr(&mut ebpf, &attach_dir, &pins, pinned_hash, skip)?;
    ops::attach_unix(
        &mut ebpf,
        &attach_dir,
        &pins,
        pinned_hash,
        &metrics,
        &mut attachments,
    );
    match loader::attach_lsm(&mut ebpf, &pins, pinned_hash) {
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
    let registration_on = attach_registration(&mut ebpf, &pins, pinned_hash, &metrics);
    // Sticky identity: tasks that were running before the tracepoints get their home
    // now, after the tracepoints (a task created meanwhile has one from its creator).
    let mut homes = crate::kernel::maps::Homes::take(&mut ebpf, &pins)?;
    let pass = homes.pass(&mount);
    ops::publish_homes(&metrics, &pass);
    info!(
        seeded = pass.seeded,
        tracked = pass.tracked,
        swept = pass.swept,
        "homes of guarded tasks recorded: a task that leaves its workload's cgroup keeps its policy"
    );
    let mut homes = Some(homes);
    let mut homes_task: Option<tokio::task::JoinHandle<_>> = None;
    let tc = if cfg.tc.enabled {
        let mut tc = crate::kernel::tc::Tc::load(&mut ebpf, &cfg.tc, &pins, pinned_hash)
            .context("loading the TC classifier")?;
        let n = tc.sync(&mut ebpf);
        metrics
            .programs_attached
            .with_label_values(&["tc"])
            .set(i64::from(n > 0));
        Some(tc)
    } else {
        // Pinned TC links of an earlier config with the classifier on: detach them.
        crate::kernel::tc::unpin_all(&pins);
        None
    };
    if was_pinned {
        info!(
            generation = maps.generation(),
            adopted = ?attachments.adopted,
            pin_dir = %pins.dir.display(),
            "adopted pinned state from a previous daemon: enforcement never stopped"
        );
    }

    let (tx, _) = broadcast::channel(4096);
    let (daemon_events, daemon_events_rx) = tokio::sync::mpsc::unbounded_channel();
    let (dns_updates, mut dns_updates_rx) = tokio::sync::mpsc::unbounded_channel();
    let cfg = Arc::new(cfg);
    let engine = Arc::new(Mutex::new(dns::Engine::new(
        cfg.clone(),
        mount.clone(),
        dns_updates,
        daemon_events,
        metrics.clone(),
    )));
    {
        let mut e = engine.lock().expect("engine");
        e.seed(&learned);
        e.generation = maps.generation();
    }
    let delivered = Arc::new(Delivered::default());
    let history = Arc::new(events::History::default());
    // What the state owner publishes; placeholders until its first publish below.
    let (names_tx, names_rx) = watch::channel(Arc::default());
    let (status_tx, status_rx) = watch::channel(Arc::new(String::from("{}")));
    let installed = Arc::new(learned);
    // A placeholder: the owner's first publish replaces it (a different policy Arc).
    let (view_tx, view_rx) = watch::channel(Arc::new(state::View {
        cfg: cfg.clone(),
        compiled: Arc::default(),
        pod_workloads: Arc::default(),
        pending: Vec::new(),
        installed: installed.clone(),
    }));
    let counters = Mutex::new(counters);
    let shared = Arc::new(Shared {
        ready: false.into(),
        status: status_rx,
        events: tx.clone(),
        history: history.clone(),
        names: names_rx.clone(),
        dns: {
            let (view, engine) = (view_rx.clone(), engine.clone());
            Box::new(move || {
                // What the kernel enforces, with the TTL and expiry of the latest answer.
                let mut learned = (*view.borrow().installed).clone();
                engine.lock().expect("engine").refresh(&mut learned);
                serde_json::json!({ "learned": learned }).to_string()
            })
        },
        metrics: {
            let (metrics, names, delivered) =
                (metrics.clone(), names_rx.clone(), delivered.clone());
            Box::new(move || {
                // The counter maps are read-only here and apart from the policy state.
                let counters = counters.lock().expect("counters").read();
                let d = delivered.events.load(Ordering::Relaxed);
                if d > metrics.delivered.get() {
                    metrics.delivered.inc_by(d - metrics.delivered.get());
                }
                match counters {
                    Ok(c) => metrics.render(&c, &names.borrow().workloads),
                    Err(e) => {
                        error!(error = %e, "reading counters");
                        metrics.text()
                    }
                }
            })
        },
    });
    let sink = match cfg.sink {
        config::Sink::Stdout => SinkWriter::Stdout,
        config::Sink::None => SinkWriter::None,
        config::Sink::File => {
            let p = cfg.events_file.clone().expect("validated");
            SinkWriter::File(
                crate::telemetry::sink::FileSink::open(p.clone())
                    .with_context(|| format!("opening events.file {}", p.display()))?,
            )
        }
    };
    let sink = crate::telemetry::sink::Sink::new(
        sink,
        metrics.events_sink_errors.clone(),
        cfg.cmdline_in_sink,
    );
    let listen = cfg.metrics_listen;
    let on_exit = cfg.on_exit;
    set_policy_gauges(&metrics, &compiled);
    metrics.reloads.with_label_values(&["success"]).inc();
    metrics.last_reload_success.set(unix_now());
    metrics.policy_generation.set(i64::from(maps.generation()));
    let mut owner = Owner {
        pod_mode: cfg.tc.enabled && !cfg.tc.pod_interfaces.is_empty(),
        cfg: cfg.clone(),
        compiled: Arc::new(compiled),
        maps,
        ebpf,
        tc_repaired: tc.as_ref().map_or(0, |t| t.repaired),
        tc,
        attachments,
        attach_dir: attach_dir.clone(),
        pins: pins.clone(),
        registration_on,
        map_ids,
        mount: mount.clone(),
        metrics: metrics.clone(),
        engine,
        dns: None,
        installed,
        learned_file: pins.learned_file(),
        pods: Arc::new(pods_table),
        mcp: Arc::default(),
        out: Outputs {
            view: view_tx,
            names: names_tx,
            status: status_tx,
            shared: shared.clone(),
        },
    };
    owner.sync_dns();
    owner.publish();
    let attached = owner.check_attachment();
    anyhow::ensure!(
        attached,
        "the kernel does not list every program as attached to {}",
        attach_dir.display()
    );
    let (commands, commands_rx) = std::sync::mpsc::channel();
    let owner_thread = std::thread::Builder::new()
        .name("mcpg-state".into())
        .spawn(move || owner.run(&commands_rx))
        .context("starting the state owner thread")?;
    let state = Handle {
        tx: commands,
        view: view_rx,
    };

    let reader = tokio::spawn(events::read_loop(
        ring,
        names_rx,
        sink,
        tx,
        delivered,
        history,
        daemon_events_rx,
    ));
    let server = tokio::spawn(http::serve(http::Listener::Tcp(listener), shared.clone()));
    let control_server = tokio::spawn(http::serve(
        http::Listener::Control(control),
        shared.clone(),
    ));
    let mcp_server = tokio::spawn(mcp::serve(mcp_listener, state.clone()));
    let pod_watcher = tokio::spawn(pods::watch(
        state.clone(),
        metrics.clone(),
        mount.clone(),
        pod_watch,
    ));

    // Before "ready": a reload asked for the moment the daemon is ready is served.
    let mut hup = signal(SignalKind::hangup())?;
    // A rotation of the events file during boot went unseen.
    crate::telemetry::sink::request_reopen();
    shared.ready.store(true, Ordering::SeqCst);
    metrics.ready.set(1);
    info!(
        config = %config_path.display(),
        attach = %attach_dir.display(),
        pin_dir = %pins.dir.display(),
        listen = %listen,
        "ready: enforcing on connect4, connect6, sendmsg4, sendmsg6"
    );
    // systemd (Type=notify): ready once enforcement is attached. Outside systemd
    // (no NOTIFY_SOCKET) this does nothing.
    if let Err(e) = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]) {
        warn!("telling systemd we are ready: {e}");
    }

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut config_check = tokio::time::interval(CONFIG_CHECK);
    // Capability posture of the guarded processes, read from /proc off the runtime.
    let mut posture_check = tokio::time::interval(POSTURE_CHECK);
    // The first pass ran before ready: the next one a period later, not at once.
    let mut homes_check =
        tokio::time::interval_at(tokio::time::Instant::now() + HOMES_PASS, HOMES_PASS);
    let mut posture_seen = std::collections::BTreeMap::new();
    let mut posture_task: Option<tokio::task::JoinHandle<_>> = None;
    let mut reported_missing = false;
    let mut owner_gone = state.view.clone();
    let outcome = loop {
        tokio::select! {
            _ = term.recv() => { info!("SIGTERM"); break Ok(()); }
            _ = int.recv() => { info!("SIGINT"); break Ok(()); }
            r = owner_gone.changed() => {
                if r.is_err() {
                    // Its thread ended (it panicked): the pinned state stays enforced.
                    break Err(anyhow::anyhow!("the state owner stopped; exiting (the pinned policy stays in force)"));
                }
            }
            _ = hup.recv() => {
                info!("SIGHUP: reloading {} (and reopening the events file)", config_path.display());
                crate::telemetry::sink::request_reopen();
                fingerprint = config_fingerprint(&config_path);
                state.send(Command::Reload(config_path.clone()));
            }
            _ = config_check.tick() => {
                let now = config_fingerprint(&config_path);
                match (&now, now == fingerprint) {
                    (None, _) => {
                        if !reported_missing {
                            error!("config file {} is gone or unreadable: the running policy stays in force", config_path.display());
                            metrics.reloads.with_label_values(&["failure"]).inc();
                            reported_missing = true;
                        }
                    }
                    (Some(_), false) => {
                        info!("config file {} changed: reloading", config_path.display());
                        reported_missing = false;
                        fingerprint = now;
                        state.send(Command::Reload(config_path.clone()));
                    }
                    (Some(_), true) => reported_missing = false,
                }
            }
            Some(mut update) = dns_updates_rx.recv() => {
                // The owner installs the newest of queued sets once and answers everyone.
                state.send(Command::Learned(update.learned, update.done.take().into_iter().collect()));
            }
            _ = homes_check.tick() => {
                if let Some(t) = homes_task.take_if(|t| t.is_finished()) {
                    if let Ok((h, pass)) = t.await {
                        ops::publish_homes(&metrics, &pass);
                        homes = Some(h);
                    }
                }
                if let Some(mut h) = homes.take() {
                    let mount = mount.clone();
                    homes_task = Some(tokio::task::spawn_blocking(move || {
                        let pass = h.pass(&mount);
                        (h, pass)
                    }));
                }
            }
            _ = posture_check.tick() => {
                if let Some(t) = posture_task.take_if(|t| t.is_finished()) {
                    if let Ok(found) = t.await {
                        crate::host::posture::publish(&metrics, &found, &mut posture_seen);
                    }
                }
                if posture_task.is_none() {
                    let compiled = state.view().compiled.clone();
                    let mount = mount.clone();
                    posture_task = Some(tokio::task::spawn_blocking(move || {
                        crate::host::posture::scan(&compiled, &mount)
                    }));
                }
            }
        }
    };
    shared.ready.store(false, Ordering::SeqCst);
    metrics.ready.set(0);
    reader.abort();
    server.abort();
    control_server.abort();
    mcp_server.abort();
    pod_watcher.abort();
    // The owner stops the DNS side and drops the programs (links stay pinned).
    state.send(Command::Stop);
    drop(state);
    let joined = tokio::time::timeout(
        state::STOP_WAIT,
        tokio::task::spawn_blocking(move || owner_thread.join()),
    )
    .await;
    if !matches!(joined, Ok(Ok(Ok(())))) {
        warn!("the state owner did not stop cleanly");
    }
    let _ = std::fs::remove_file(&control_path);
    let _ = std::fs::remove_file(&mcp_path);
    outcome?;
    match on_exit {
        OnExit::Keep => info!(
            pin_dir = %pins.dir.display(),
            "exiting; enforcement stays attached through the pins (on_exit = \"keep\"); `mcp-guard uninstall` removes it"
        ),
        OnExit::Detach => {
            let removed = pins
                .uninstall()
                .with_context(|| format!("removing pins under {}", pins.dir.display()))?;
            info!(
                removed = removed.len(),
                "detached and removed every pin (on_exit = \"detach\")"
            );
        }
    }
    Ok(())
}
