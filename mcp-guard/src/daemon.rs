//! `mcp-guard run`: load, attach, enforce, report, reload; detach on SIGTERM/SIGINT.

use std::{
    path::{Path, PathBuf},
    sync::{atomic::Ordering, Arc, Mutex, RwLock},
    time::Duration,
};

use anyhow::{Context as _, Result};
use aya::maps::RingBuf;
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::broadcast,
};
use tracing::{error, info, warn};

use crate::{
    cgroup, config,
    events::{self, Delivered, Names, SinkWriter},
    http::{self, Shared},
    loader,
    maps::PolicyMaps,
    metrics::Metrics,
    policy::{self, Compiled},
};

/// How often workload cgroups are re-resolved, so a cgroup created after start (a
/// systemd unit starting, a pod scheduled) is enforced without a reload.
const CGROUP_RESCAN: Duration = Duration::from_millis(100);

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "unknown".into(), |s| s.trim().to_string())
}

fn names_of(c: &Compiled) -> Names {
    Names {
        workloads: c.workloads.iter().map(|w| (w.id, w.name.clone())).collect(),
        cgroups: c
            .workloads
            .iter()
            .map(|w| (w.id, w.cgroup.clone()))
            .collect(),
        rules: c.rules.iter().map(|r| (r.id, r.text.clone())).collect(),
    }
}

fn status_json(c: &Compiled, maps: &PolicyMaps, mount: &Path) -> String {
    let workloads: Vec<serde_json::Value> = c
        .workloads
        .iter()
        .map(|w| {
            serde_json::json!({
                "name": w.name,
                "cgroup": w.cgroup,
                "cgroup_path": cgroup::fs_path(mount, &w.cgroup),
                "cgroup_id": maps.registered().get(&w.id),
            })
        })
        .collect();
    serde_json::json!({ "generation": maps.generation(), "workloads": workloads }).to_string()
}

/// Loads and compiles a config, logging warnings. Nothing touches the kernel here.
///
/// # Errors
/// The config is invalid or cannot be compiled.
pub fn prepare(path: &Path) -> Result<(config::Config, Compiled)> {
    let cfg = config::load(path)?;
    for w in &cfg.warnings {
        warn!("{w}");
    }
    let compiled = policy::compile(&cfg)?;
    Ok((cfg, compiled))
}

struct Live {
    cfg: config::Config,
    compiled: Compiled,
}

pub async fn run(config_path: PathBuf) -> Result<()> {
    let (cfg, compiled) = prepare(&config_path)?;
    let mount = cgroup::mount_point()?;
    for w in &compiled.workloads {
        if cgroup::id(&mount, &w.cgroup).is_err() {
            warn!(workload = %w.name, cgroup = %w.cgroup, "workload cgroup does not exist yet; it will be enforced as soon as it appears");
        }
    }
    let listener = http::bind(cfg.metrics_listen).await.with_context(|| {
        format!(
            "{}: metrics.listen {} cannot be bound (is another mcp-guard running?)",
            config_path.display(),
            cfg.metrics_listen
        )
    })?;

    let mut ebpf = loader::open()?;
    let mut maps = PolicyMaps::take(&mut ebpf)?;
    // Policy first, then attach: the programs never run without a policy.
    maps.install(&compiled, &mount, cfg.rate_limit_per_sec)?;
    let ring = RingBuf::try_from(ebpf.take_map("EVENTS_1").context("map EVENTS_1 missing")?)?;
    let attach_dir = cgroup::fs_path(&mount, &cfg.attach_cgroup);
    loader::attach_sock_addr(&mut ebpf, &attach_dir)?;

    let metrics = Arc::new(Metrics::new(&kernel_release()));
    let attached = check_attachment(&mut ebpf, &attach_dir, &metrics);
    anyhow::ensure!(
        attached,
        "the kernel does not list every program as attached to {}",
        attach_dir.display()
    );
    let names = Arc::new(RwLock::new(names_of(&compiled)));
    let maps = Arc::new(Mutex::new(maps));
    let live = Arc::new(Mutex::new(Live { cfg, compiled }));
    set_policy_gauges(&metrics, &live.lock().expect("live").compiled);
    metrics.reloads.with_label_values(&["success"]).inc();
    metrics.last_reload_success.set(unix_now());

    let (tx, _) = broadcast::channel(4096);
    let delivered = Arc::new(Delivered::default());
    let history = Arc::new(events::History::default());
    let shared = Arc::new(Shared {
        ready: false.into(),
        status: RwLock::new(String::from("{}")),
        events: tx.clone(),
        history: history.clone(),
        metrics: {
            let (maps, metrics, names, delivered) = (
                maps.clone(),
                metrics.clone(),
                names.clone(),
                delivered.clone(),
            );
            Box::new(move || {
                let counters = maps.lock().expect("maps").counters();
                let d = delivered.events.load(Ordering::Relaxed);
                if d > metrics.delivered.get() {
                    metrics.delivered.inc_by(d - metrics.delivered.get());
                }
                match counters {
                    Ok(c) => metrics.render(&c, &names.read().expect("names").workloads),
                    Err(e) => {
                        error!(error = %e, "reading counters");
                        metrics.text()
                    }
                }
            })
        },
    });

    let sink = {
        let l = live.lock().expect("live");
        match l.cfg.sink {
            config::Sink::Stdout => SinkWriter::Stdout,
            config::Sink::None => SinkWriter::None,
            config::Sink::File => {
                let p = l.cfg.events_file.clone().expect("validated");
                SinkWriter::File(
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&p)
                        .with_context(|| format!("opening events.file {}", p.display()))?,
                )
            }
        }
    };
    let reader = tokio::spawn(events::read_loop(
        ring,
        names.clone(),
        sink,
        tx,
        delivered,
        history,
    ));
    let server = tokio::spawn(http::serve(listener, shared.clone()));

    *shared.status.write().expect("status") = status_json(
        &live.lock().expect("live").compiled,
        &maps.lock().expect("maps"),
        &mount,
    );
    shared.ready.store(attached, Ordering::SeqCst);
    metrics.ready.set(i64::from(attached));
    metrics
        .policy_generation
        .set(i64::from(maps.lock().expect("maps").generation()));
    info!(
        config = %config_path.display(),
        attach = %attach_dir.display(),
        listen = %live.lock().expect("live").cfg.metrics_listen,
        "ready: enforcing on connect4, connect6, sendmsg4, sendmsg6"
    );

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut tick = tokio::time::interval(CGROUP_RESCAN);
    let mut attach_check = tokio::time::interval(ATTACH_CHECK);
    loop {
        tokio::select! {
            _ = term.recv() => { info!("SIGTERM: detaching"); break; }
            _ = int.recv() => { info!("SIGINT: detaching"); break; }
            _ = hup.recv() => {
                reload(&config_path, &live, &maps, &mount, &names, &metrics);
                *shared.status.write().expect("status") = status_json(&live.lock().expect("live").compiled, &maps.lock().expect("maps"), &mount);
            }
            _ = attach_check.tick() => {
                let ok = check_attachment(&mut ebpf, &attach_dir, &metrics);
                shared.ready.store(ok, Ordering::SeqCst);
                metrics.ready.set(i64::from(ok));
            }
            _ = tick.tick() => {
                let l = live.lock().expect("live");
                let mut m = maps.lock().expect("maps");
                if m.refresh_cgroups(&l.compiled, &mount) > 0 {
                    *shared.status.write().expect("status") = status_json(&l.compiled, &m, &mount);
                }
            }
        }
    }
    shared.ready.store(false, Ordering::SeqCst);
    metrics.ready.set(0);
    reader.abort();
    server.abort();
    drop(ebpf);
    info!("detached; exiting");
    Ok(())
}

/// How often the daemon verifies with the kernel that its programs are still attached.
const ATTACH_CHECK: Duration = Duration::from_secs(1);

/// Asks the kernel which programs are attached, re-attaches any that someone detached
/// (fail closed), and sets `programs_attached`. Returns whether all are attached.
fn check_attachment(ebpf: &mut aya::Ebpf, attach_dir: &Path, metrics: &Metrics) -> bool {
    let mut all = true;
    for (hook, attached) in loader::attachment_state(ebpf, attach_dir) {
        let mut now_attached = attached;
        if !attached {
            error!(hook, cgroup = %attach_dir.display(), "program is no longer attached (detached by someone else?): attaching it again");
            match loader::reattach(ebpf, hook, attach_dir) {
                Ok(()) => {
                    metrics.reattached.inc();
                    now_attached = loader::attachment_state(ebpf, attach_dir)
                        .iter()
                        .any(|(h, a)| *h == hook && *a);
                }
                Err(e) => error!(hook, "re-attaching failed: {e}"),
            }
        }
        metrics
            .programs_attached
            .with_label_values(&[hook])
            .set(i64::from(now_attached));
        all &= now_attached;
    }
    all
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn set_policy_gauges(metrics: &Metrics, c: &Compiled) {
    metrics.policy_rules.reset();
    for w in &c.workloads {
        metrics
            .policy_rules
            .with_label_values(&[&w.name])
            .set(w.rules as i64);
    }
    metrics.workloads.set(c.workloads.len() as i64);
}

/// Validates first; an invalid config leaves the running policy untouched.
fn reload(
    path: &Path,
    live: &Mutex<Live>,
    maps: &Mutex<PolicyMaps>,
    mount: &Path,
    names: &RwLock<Names>,
    metrics: &Metrics,
) {
    let (cfg, compiled) = match prepare(path) {
        Ok(v) => v,
        Err(e) => {
            error!("reload refused, the running policy stays in force: {e:#}");
            metrics.reloads.with_label_values(&["failure"]).inc();
            return;
        }
    };
    let mut m = maps.lock().expect("maps");
    if let Err(e) = m.install(&compiled, mount, cfg.rate_limit_per_sec) {
        error!("reload failed writing maps, the running policy stays in force: {e}");
        metrics.reloads.with_label_values(&["failure"]).inc();
        return;
    }
    *names.write().expect("names") = names_of(&compiled);
    set_policy_gauges(metrics, &compiled);
    metrics.reloads.with_label_values(&["success"]).inc();
    metrics.last_reload_success.set(unix_now());
    metrics.policy_generation.set(i64::from(m.generation()));
    info!(generation = m.generation(), "policy reloaded");
    *live.lock().expect("live") = Live { cfg, compiled };
}
