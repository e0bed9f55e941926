//! After boot: the state owner and the tasks start ([`Running::start`]), the daemon says
//! ready and serves signals, config changes and its timers ([`Running::serve`]), and on
//! SIGTERM/SIGINT stops, keeping or detaching enforcement ([`Running::stop`]).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{atomic::Ordering, Arc, Mutex},
};

use anyhow::{Context as _, Result};
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::{broadcast, mpsc, watch},
    task::{AbortHandle, JoinHandle},
};
use tracing::{error, info, warn};

use super::{
    boot, config_fingerprint, mcp, ops, pods,
    state::{self, Command, Handle, Outputs, Owner},
    CONFIG_CHECK, HOMES_PASS, POSTURE_CHECK,
};
use crate::{
    api::http::{self, Shared},
    config::{self, OnExit},
    dns,
    kernel::{maps::Homes, pins::Pins},
    policy::{self, Compiled},
    telemetry::{
        events::{self, Delivered},
        metrics::Metrics,
        sink::{Sink, SinkWriter},
    },
};

/// A daemon past boot: the owner thread, the tasks and what the signal loop needs.
pub(super) struct Running {
    state: Handle,
    owner_thread: std::thread::JoinHandle<()>,
    tasks: Vec<AbortHandle>,
    shared: Arc<Shared>,
    metrics: Arc<Metrics>,
    pins: Pins,
    cfg: Arc<config::Config>,
    attach_dir: PathBuf,
    /// Taken by the pass running on a blocking thread, given back when it ends.
    homes: Option<Homes>,
    homes_task: Option<JoinHandle<(Homes, crate::kernel::maps::HomesPass)>>,
    posture_seen: std::collections::BTreeMap<String, usize>,
    posture_task: Option<JoinHandle<crate::host::posture::Scan>>,
}

/// The channels between the owner, the DNS side, the event reader and the HTTP side.
struct Wiring {
    stream: broadcast::Sender<Arc<events::JsonEvent>>,
    daemon_events: mpsc::UnboundedReceiver<events::JsonEvent>,
    names: watch::Receiver<Arc<events::Names>>,
    view: watch::Receiver<Arc<state::View>>,
    delivered: Arc<Delivered>,
    history: Arc<events::History>,
}

/// The owner's ends of the channels, and the DNS side's.
struct OwnerEnds {
    view: watch::Sender<Arc<state::View>>,
    names: watch::Sender<Arc<events::Names>>,
    status: watch::Sender<Arc<String>>,
    status_rx: watch::Receiver<Arc<String>>,
}

impl Wiring {
    /// The channels, with placeholders until the owner's first publish.
    fn new(
        cfg: &Arc<config::Config>,
        installed: &Arc<Vec<policy::Learned>>,
    ) -> (Self, OwnerEnds, mpsc::UnboundedSender<events::JsonEvent>) {
        let (stream, _) = broadcast::channel(4096);
        let (events_tx, daemon_events) = mpsc::unbounded_channel();
        let (names_tx, names) = watch::channel(Arc::default());
        let (status_tx, status_rx) = watch::channel(Arc::new(String::from("{}")));
        let (view_tx, view) = watch::channel(Arc::new(state::View {
            cfg: cfg.clone(),
            compiled: Arc::default(),
            pod_workloads: Arc::default(),
            pending: Vec::new(),
            installed: installed.clone(),
            registered: Arc::default(),
        }));
        let wiring = Self {
            stream,
            daemon_events,
            names,
            view,
            delivered: Arc::new(Delivered::default()),
            history: Arc::new(events::History::default()),
        };
        let ends = OwnerEnds {
            view: view_tx,
            names: names_tx,
            status: status_tx,
            status_rx,
        };
        (wiring, ends, events_tx)
    }
}

impl Running {
    /// Starts the state owner on the booted kernel side, then the tasks.
    pub fn start(
        cfg: config::Config,
        compiled: Compiled,
        learned: Vec<policy::Learned>,
        k: boot::Kernel,
        listeners: boot::Listeners,
    ) -> Result<Self> {
        let cfg = Arc::new(cfg);
        let (metrics, mount) = (k.owned.metrics.clone(), k.owned.mount.clone());
        let (attach_dir, pins) = (k.owned.attach_dir.clone(), k.owned.pins.clone());
        let learned = dns::learned::LearnedSet::seeded(&learned, &cfg);
        let installed = Arc::new(learned.snapshot());
        let (wiring, out, dns_events) = Wiring::new(&cfg, &installed);
        let approval_events = dns_events.clone();
        // Learned answers go straight onto the owner's channel.
        let (commands, commands_rx) = std::sync::mpsc::channel();
        let to_owner = commands.clone();
        let dns_wiring = dns::Wiring {
            updates: Arc::new(move |u: dns::Update| {
                let _ = to_owner.send(Command::Learned(u.answers, u.done.into_iter().collect()));
            }),
            events: dns_events,
            metrics: metrics.clone(),
        };
        let approvals = crate::mcp::approvals::Approvals::new(
            Some(pins.approvals_file()),
            super::approvals::approval_notifier(approval_events, metrics.clone(), {
                // Approved rules: their addresses go in like learned answers (expiring
                // in the kernel, kept across restarts).
                let to_owner = commands.clone();
                Box::new(move |grants| {
                    let _ = to_owner.send(Command::Learned(grants, Vec::new()));
                })
            }),
        );
        tokio::spawn(super::approvals::rule_requests(
            wiring.stream.subscribe(),
            wiring.view.clone(),
            approvals.clone(),
        ));
        let shared = shared(&wiring, out.status_rx, &metrics, k.counters, approvals);
        let sink = sink(&cfg, &metrics)?;
        ops::set_policy_gauges(&metrics, &compiled);
        metrics.reloads.with_label_values(&["success"]).inc();
        metrics.last_reload_success.set(ops::unix_now());
        metrics
            .policy_generation
            .set(i64::from(k.owned.maps.generation()));
        let outputs = Outputs {
            view: out.view,
            names: out.names,
            status: out.status,
            shared: shared.clone(),
        };
        let mut owner = Owner::new(k.owned, cfg.clone(), compiled, learned, dns_wiring, outputs);
        owner.sync_dns();
        owner.publish();
        anyhow::ensure!(
            owner.check_attachment(),
            "the kernel does not list every program as attached to {}",
            attach_dir.display()
        );
        let owner_thread = std::thread::Builder::new()
            .name("mcpg-state".into())
            .spawn(move || owner.run(&commands_rx))
            .context("starting the state owner thread")?;
        let state = Handle {
            tx: commands,
            view: wiring.view.clone(),
        };
        let tasks = Tasks {
            ring: k.ring,
            sink,
            listeners,
            pod_watch: k.pod_watch,
        }
        .spawn(wiring, &shared, &state, &metrics, &mount);
        Ok(Self {
            state,
            owner_thread,
            tasks,
            shared,
            metrics,
            pins,
            cfg,
            attach_dir,
            homes: Some(k.homes),
            homes_task: None,
            posture_seen: std::collections::BTreeMap::new(),
            posture_task: None,
        })
    }

    /// Says ready, then serves signals, config changes, learned answers and the timers
    /// until SIGTERM or SIGINT (Ok) or the owner stops (Err).
    pub async fn serve(&mut self, config_path: &Path, fingerprint: Option<Vec<u8>>) -> Result<()> {
        // Before "ready": a reload asked for the moment the daemon is ready is served.
        let mut hup = signal(SignalKind::hangup())?;
        self.ready(config_path);
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut config_check = tokio::time::interval(CONFIG_CHECK);
        let mut posture_check = tokio::time::interval(POSTURE_CHECK);
        // The first homes pass ran before ready: the next one a period later.
        let mut homes_check =
            tokio::time::interval_at(tokio::time::Instant::now() + HOMES_PASS, HOMES_PASS);
        let mut file = ConfigFile {
            path: config_path.to_path_buf(),
            fingerprint,
            reported_missing: false,
        };
        let mut owner_gone = self.state.view.clone();
        loop {
            tokio::select! {
                _ = term.recv() => { info!("SIGTERM"); return Ok(()); }
                _ = int.recv() => { info!("SIGINT"); return Ok(()); }
                r = owner_gone.changed() => if r.is_err() {
                    // Its thread ended (it panicked): the pinned state stays enforced.
                    anyhow::bail!("the state owner stopped; exiting (the pinned policy stays in force)");
                },
                _ = hup.recv() => {
                    info!("SIGHUP: reloading {} (and reopening the events file)", config_path.display());
                    crate::telemetry::sink::request_reopen();
                    file.fingerprint = config_fingerprint(config_path);
                    self.state.send(Command::Reload(config_path.to_path_buf()));
                }
                _ = config_check.tick() => file.check(&self.state, &self.metrics),
                _ = homes_check.tick() => self.homes_pass().await,
                _ = posture_check.tick() => self.posture_pass().await,
            }
        }
    }

    fn ready(&self, config_path: &Path) {
        // A rotation of the events file during boot went unseen.
        crate::telemetry::sink::request_reopen();
        self.shared.ready.store(true, Ordering::SeqCst);
        self.metrics.ready.set(1);
        let listen: SocketAddr = self.cfg.metrics_listen;
        info!(
            config = %config_path.display(),
            attach = %self.attach_dir.display(),
            pin_dir = %self.pins.dir.display(),
            listen = %listen,
            "ready: enforcing on connect4, connect6, sendmsg4, sendmsg6"
        );
        // systemd (Type=notify): ready once enforcement is attached. Outside systemd
        // (no NOTIFY_SOCKET) this does nothing.
        if let Err(e) = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]) {
            warn!("telling systemd we are ready: {e}");
        }
    }

    /// Tasks of guarded workloads without a home, on a blocking thread; the result of
    /// the previous pass is published when it ended.
    async fn homes_pass(&mut self) {
        if let Some(t) = self.homes_task.take_if(|t| t.is_finished()) {
            if let Ok((h, pass)) = t.await {
                ops::publish_homes(&self.metrics, &pass);
                self.homes = Some(h);
            }
        }
        if let Some(mut h) = self.homes.take() {
            let registered = self.state.view().registered.clone();
            self.homes_task = Some(tokio::task::spawn_blocking(move || {
                let pass = h.pass(&registered);
                (h, pass)
            }));
        }
    }

    /// The capability posture of the guarded processes, read from /proc off the runtime.
    async fn posture_pass(&mut self) {
        if let Some(t) = self.posture_task.take_if(|t| t.is_finished()) {
            if let Ok(found) = t.await {
                crate::host::posture::publish(&self.metrics, &found, &mut self.posture_seen);
            }
        }
        if self.posture_task.is_none() {
            let view = self.state.view();
            let (compiled, registered) = (view.compiled.clone(), view.registered.clone());
            self.posture_task = Some(tokio::task::spawn_blocking(move || {
                crate::host::posture::scan(&compiled, &registered)
            }));
        }
    }

    /// Stops the tasks and the owner (links stay pinned), then keeps or detaches
    /// enforcement as `on_exit` says; `outcome` is what ended the loop.
    pub async fn stop(self, outcome: Result<()>) -> Result<()> {
        self.shared.ready.store(false, Ordering::SeqCst);
        self.metrics.ready.set(0);
        for t in &self.tasks {
            t.abort();
        }
        // The owner stops the DNS side and drops the programs (links stay pinned).
        self.state.send(Command::Stop);
        drop(self.state);
        let owner_thread = self.owner_thread;
        let joined = tokio::time::timeout(
            state::STOP_WAIT,
            tokio::task::spawn_blocking(move || owner_thread.join()),
        )
        .await;
        if !matches!(joined, Ok(Ok(Ok(())))) {
            warn!("the state owner did not stop cleanly");
        }
        let _ = std::fs::remove_file(&self.cfg.control_socket);
        let _ = std::fs::remove_file(&self.cfg.mcp_socket);
        outcome?;
        match self.cfg.on_exit {
            OnExit::Keep => info!(
                pin_dir = %self.pins.dir.display(),
                "exiting; enforcement stays attached through the pins (on_exit = \"keep\"); `mcp-guard uninstall` removes it"
            ),
            OnExit::Detach => {
                let removed = self
                    .pins
                    .uninstall()
                    .with_context(|| format!("removing pins under {}", self.pins.dir.display()))?;
                info!(
                    removed = removed.len(),
                    "detached and removed every pin (on_exit = \"detach\")"
                );
            }
        }
        Ok(())
    }
}

/// The config file as the loop last saw it.
struct ConfigFile {
    path: PathBuf,
    fingerprint: Option<Vec<u8>>,
    reported_missing: bool,
}

impl ConfigFile {
    /// Reloads when the file changed; a file that is gone is reported once and the
    /// running policy stays.
    fn check(&mut self, state: &Handle, metrics: &Metrics) {
        let now = config_fingerprint(&self.path);
        if now.is_none() {
            if !self.reported_missing {
                error!(
                    "config file {} is gone or unreadable: the running policy stays in force",
                    self.path.display()
                );
                metrics.reloads.with_label_values(&["failure"]).inc();
                self.reported_missing = true;
            }
            return;
        }
        self.reported_missing = false;
        if now != self.fingerprint {
            info!("config file {} changed: reloading", self.path.display());
            self.fingerprint = now;
            state.send(Command::Reload(self.path.clone()));
        }
    }
}

/// What the HTTP side serves: readiness, the owner's snapshots, the event stream and
/// history, `/dns` and `/metrics`.
fn shared(
    w: &Wiring,
    status: watch::Receiver<Arc<String>>,
    metrics: &Arc<Metrics>,
    counters: crate::kernel::maps::CounterMaps,
    approvals: Arc<crate::mcp::approvals::Approvals>,
) -> Arc<Shared> {
    let counters = Mutex::new(counters);
    let view = w.view.clone();
    let (m, names, delivered) = (metrics.clone(), w.names.clone(), w.delivered.clone());
    Arc::new(Shared {
        ready: false.into(),
        status,
        events: w.stream.clone(),
        history: w.history.clone(),
        names: w.names.clone(),
        approvals,
        dns: Box::new(move || {
            // What the kernel enforces.
            let learned = view.borrow().installed.clone();
            serde_json::json!({ "learned": *learned }).to_string()
        }),
        metrics: Box::new(move || {
            // The counter maps are read-only here and apart from the policy state.
            let counters = counters.lock().expect("counters").read();
            let d = delivered.events.load(Ordering::Relaxed);
            if d > m.delivered.get() {
                m.delivered.inc_by(d - m.delivered.get());
            }
            match counters {
                Ok(c) => m.render(&c, &names.borrow().workloads),
                Err(e) => {
                    error!(error = %e, "reading counters");
                    m.text()
                }
            }
        }),
    })
}

/// The configured event sink.
fn sink(cfg: &config::Config, metrics: &Metrics) -> Result<Sink> {
    let writer = match cfg.sink {
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
    Ok(Sink::new(
        writer,
        metrics.events_sink_errors.clone(),
        cfg.cmdline_in_sink,
    ))
}

/// What the tasks take over.
struct Tasks {
    ring: aya::maps::RingBuf<aya::maps::MapData>,
    sink: Sink,
    listeners: boot::Listeners,
    pod_watch: pods::Watch,
}

impl Tasks {
    /// The event reader, the three servers and the pod watcher.
    fn spawn(
        self,
        w: Wiring,
        shared: &Arc<Shared>,
        state: &Handle,
        metrics: &Arc<Metrics>,
        mount: &Path,
    ) -> Vec<AbortHandle> {
        let l = self.listeners;
        vec![
            tokio::spawn(events::read_loop(
                self.ring,
                w.names,
                self.sink,
                w.stream,
                w.delivered,
                w.history,
                w.daemon_events,
            ))
            .abort_handle(),
            tokio::spawn(http::serve(http::Listener::Tcp(l.tcp), shared.clone())).abort_handle(),
            tokio::spawn(http::serve(
                http::Listener::Control(l.control),
                shared.clone(),
            ))
            .abort_handle(),
            tokio::spawn(mcp::serve(l.mcp, state.clone())).abort_handle(),
            tokio::spawn(pods::watch(
                state.clone(),
                metrics.clone(),
                mount.to_path_buf(),
                self.pod_watch,
            ))
            .abort_handle(),
        ]
    }
}
