//! Host rules at run time: the daemon resolves exact names itself and, through a small
//! DNS proxy, learns the answers each workload receives (which wildcard rules need).
//! Every learned address passes the rebinding guard ([`policy::refusal`]) and lives for
//! its record's TTL (clamped to `[dns] min_ttl..=max_ttl`) plus `[dns] grace`. Each
//! change of the learned set is compiled into a whole new policy generation by the
//! daemon, the same atomic path a reload takes; the proxy hands an answer to the
//! workload only after the addresses in it are enforced.
//!
//! All of it runs on one thread that has entered `[dns] netns` (if set), so names are
//! resolved, and the proxy listens, where the workloads live. That thread owns its
//! [`Engine`] (no lock: its tasks share one single-threaded runtime); it reads the state
//! owner's [`View`] and sends what it learns as [`Update`]s. The learned set itself is
//! the owner's ([`learned::LearnedSet`]).

mod attribute;
mod engine;
pub mod filter;
pub mod learned;
mod proxy;

use std::{
    cell::RefCell,
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd,
    rc::Rc,
    sync::Arc,
    time::{Duration, Instant},
};

pub use engine::Engine;
use hickory_resolver::{
    config::{ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig},
    net::runtime::TokioRuntimeProvider,
    proto::rr::{RData, RecordType},
    TokioResolver,
};
use tokio::{
    net::UdpSocket,
    sync::{mpsc, oneshot, watch},
    task::spawn_local,
};
use tracing::{info, warn};

use crate::{
    config::Config, host::sockdiag::SockDiag, mcp::registry::Registry, policy::Learned,
    telemetry::events::JsonEvent, telemetry::metrics::Metrics,
};

/// Why the DNS side could not start. Host rules then allow nothing (fail closed) until a
/// reload fixes it.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("[dns] nameservers is not set and /etc/resolv.conf {0}: name the upstream servers")]
    NoNameservers(String),
    #[error("[dns] netns {path}: {detail}")]
    Netns { path: String, detail: String },
    #[error("[dns] proxy {addr} cannot be bound ({proto}, in the DNS namespace): {source}")]
    Bind {
        addr: SocketAddr,
        proto: &'static str,
        source: std::io::Error,
    },
    #[error("DNS resolver: {0}")]
    Resolver(String),
    #[error("DNS thread: {0}")]
    Io(#[from] std::io::Error),
    #[error("the DNS thread ended before it was ready")]
    ThreadEnded,
}

type Result<T> = std::result::Result<T, DnsError>;

/// Answers that teach the policy something, for the state owner to merge and install;
/// `done` is answered once the kernel enforces them.
pub struct Update {
    pub answers: Vec<Learned>,
    pub done: Option<oneshot::Sender<()>>,
}

/// What the DNS side works from, published by the state owner with every change.
#[derive(Debug)]
pub struct View {
    pub cfg: Arc<Config>,
    /// The registered cgroups: whose a client is.
    pub registered: Arc<crate::host::attribution::Registered>,
    /// `exec --mcp` instances, to name the tool call a refusal happens under.
    pub mcp: Arc<Registry>,
    /// The policy generation, for events.
    pub generation: u32,
    /// What the policy learned so far.
    pub learned: Arc<learned::LearnedSet>,
}

/// How the DNS side hands an [`Update`] to the state owner (straight onto its channel).
pub type Deliver = Arc<dyn Fn(Update) + Send + Sync>;

/// Where the DNS side sends what it learns and reports, and what it reads.
#[derive(Clone)]
pub struct Wiring {
    pub updates: Deliver,
    pub events: mpsc::UnboundedSender<JsonEvent>,
    pub metrics: Arc<Metrics>,
}

/// The upstream servers: `[dns] nameservers`, else those of resolv.conf.
fn upstreams(cfg: &Config) -> Result<Vec<SocketAddr>> {
    crate::config::nameservers(&cfg.dns).map_err(DnsError::NoNameservers)
}

fn resolver(servers: &[SocketAddr]) -> Result<TokioResolver> {
    let mut config = ResolverConfig::from_parts(None, vec![], vec![]);
    for s in servers {
        let mut udp = ConnectionConfig::udp();
        udp.port = s.port();
        let mut tcp = ConnectionConfig::tcp();
        tcp.port = s.port();
        config.add_name_server(NameServerConfig::new(s.ip(), true, vec![udp, tcp]));
    }
    let mut b = TokioResolver::builder_with_config(config, TokioRuntimeProvider::default());
    let o = b.options_mut();
    // Every lookup asks the server: the TTLs the policy follows are the server's.
    o.cache_size = 0;
    o.use_hosts_file = ResolveHosts::Never;
    o.timeout = Duration::from_secs(2);
    o.attempts = 2;
    o.ndots = 0;
    b.build().map_err(|e| DnsError::Resolver(e.to_string()))
}

/// The proxy's sockets: UDP, TCP, and the sock_diag socket, all in the DNS namespace.
type ProxySockets = (UdpSocket, tokio::net::TcpListener, SockDiag);

/// What the DNS thread runs with, all made inside its namespace.
struct Setup {
    rt: tokio::runtime::Runtime,
    resolver: TokioResolver,
    proxy: Option<ProxySockets>,
}

/// Runs on the DNS thread: enters `[dns] netns`, builds the thread's runtime and
/// resolver and binds the proxy, so every socket they open lives in that namespace.
fn enter_and_bind(dns: &crate::config::DnsConfig, servers: &[SocketAddr]) -> Result<Setup> {
    if let Some(ns) = &dns.netns {
        let netns = |detail: String| DnsError::Netns {
            path: ns.display().to_string(),
            detail,
        };
        let f = std::fs::File::open(ns).map_err(|e| netns(format!("cannot be opened: {e}")))?;
        // SAFETY: valid netns fd; only this thread changes namespace.
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(netns(format!(
                "cannot enter it: {}",
                std::io::Error::last_os_error()
            )));
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let _g = rt.enter();
    let resolver = resolver(servers)?;
    let proxy = match dns.proxy {
        None => None,
        Some(addr) => {
            let bind = |proto| {
                move |source| DnsError::Bind {
                    addr,
                    proto,
                    source,
                }
            };
            let udp = std::net::UdpSocket::bind(addr).map_err(bind("UDP"))?;
            udp.set_nonblocking(true)?;
            let tcp = std::net::TcpListener::bind(addr).map_err(bind("TCP"))?;
            tcp.set_nonblocking(true)?;
            Some((
                UdpSocket::from_std(udp)?,
                tokio::net::TcpListener::from_std(tcp)?,
                SockDiag::open()?,
            ))
        }
    };
    drop(_g);
    Ok(Setup {
        rt,
        resolver,
        proxy,
    })
}

/// A running DNS side: its thread, and how to stop it.
pub struct Dns {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// The `[dns]` table it was started with: another one needs a restart.
    started_with: crate::config::DnsConfig,
}

/// Whether a config has anything for the DNS side to do.
#[must_use]
pub fn wanted(cfg: &Config) -> bool {
    cfg.dns.proxy.is_some() || cfg.workloads.iter().any(|w| !w.hosts.is_empty())
}

impl Dns {
    /// Starts the resolver (and the proxy, if configured) on a thread of their own, which
    /// follows the owner's `view`.
    ///
    /// # Errors
    /// The namespace cannot be entered, there is no upstream server, or the proxy address
    /// cannot be bound: all reported before the thread runs.
    pub fn start(view: watch::Receiver<Arc<View>>, wiring: Wiring) -> Result<Self> {
        let cfg = view.borrow().cfg.clone();
        let servers = upstreams(&cfg)?;
        let (stop_tx, stop_rx) = oneshot::channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
        let dns = cfg.dns.clone();
        let thread = std::thread::Builder::new()
            .name("mcpg-dns".into())
            .spawn(move || {
                let setup = match enter_and_bind(&dns, &servers) {
                    Ok(v) => {
                        let _ = ready_tx.send(Ok(()));
                        v
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                run(setup, view, wiring, servers, stop_rx);
            })?;
        ready_rx.recv().map_err(|_| DnsError::ThreadEnded)??;
        info!(
            netns = ?cfg.dns.netns,
            proxy = ?cfg.dns.proxy,
            "DNS: resolving host rules{}",
            if cfg.dns.proxy.is_some() { " and learning answers through the proxy" } else { "" }
        );
        Ok(Self {
            stop: Some(stop_tx),
            thread: Some(thread),
            started_with: cfg.dns.clone(),
        })
    }

    /// Whether this config can be taken without a restart (same `[dns]` table).
    #[must_use]
    pub fn accepts(&self, cfg: &Config) -> bool {
        self.started_with == cfg.dns
    }
}

/// The DNS thread's life: its engine, the resolver, the proxy and the view follower on
/// one single-threaded runtime, until `stop`.
fn run(
    setup: Setup,
    view: watch::Receiver<Arc<View>>,
    wiring: Wiring,
    servers: Vec<SocketAddr>,
    stop: oneshot::Receiver<()>,
) {
    let Setup {
        rt,
        resolver,
        proxy,
    } = setup;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let first = view.borrow().clone();
        let proxy_addr = first.cfg.dns.proxy;
        let engine = Rc::new(RefCell::new(Engine::new(
            first,
            wiring.updates,
            wiring.events,
            wiring.metrics,
        )));
        let mut tasks = vec![
            spawn_local(follow(engine.clone(), view.clone())),
            spawn_local(resolve_loop(engine.clone(), resolver, view)),
        ];
        if let (Some((sock, tcp, diag)), Some(addr)) = (proxy, proxy_addr) {
            tasks.push(spawn_local(proxy::proxy_loop(
                Rc::new(sock),
                tcp,
                addr,
                engine,
                servers,
                Rc::new(RefCell::new(diag)),
            )));
        }
        let _ = stop.await;
        for t in tasks {
            t.abort();
        }
    });
}

/// Hands the engine every view the owner publishes.
async fn follow(engine: Rc<RefCell<Engine>>, mut view: watch::Receiver<Arc<View>>) {
    while view.changed().await.is_ok() {
        let v = view.borrow_and_update().clone();
        engine.borrow_mut().set_view(v);
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn lookup(resolver: &TokioResolver, name: &str) -> (Vec<(IpAddr, u32)>, Option<String>) {
    let fqdn = format!("{name}.");
    let (a, aaaa) = tokio::join!(
        resolver.lookup(fqdn.as_str(), RecordType::A),
        resolver.lookup(fqdn.as_str(), RecordType::AAAA)
    );
    let mut out = Vec::new();
    let mut error = None;
    for r in [a, aaaa] {
        match r {
            Ok(l) => out.extend(l.answers().iter().filter_map(|rec| match &rec.data {
                RData::A(a) => Some((IpAddr::V4(a.0), rec.ttl)),
                RData::AAAA(a) => Some((IpAddr::V6(a.0), rec.ttl)),
                _ => None,
            })),
            Err(e) if e.is_no_records_found() => {}
            Err(e) => error = Some(e.to_string()),
        }
    }
    (out, error)
}

/// Resolves every exact name when its shortest record TTL (clamped) runs out; what it
/// learns goes to the owner (never waited for). Expiry is the owner's.
async fn resolve_loop(
    engine: Rc<RefCell<Engine>>,
    resolver: TokioResolver,
    mut view: watch::Receiver<Arc<View>>,
) {
    let mut due: BTreeMap<String, Instant> = BTreeMap::new();
    loop {
        let names = engine.borrow().exact_names();
        due.retain(|n, _| names.contains_key(n));
        for n in names.keys() {
            due.entry(n.clone()).or_insert_with(Instant::now);
        }
        let next = due.values().min().copied();
        let sleep = async {
            match next {
                Some(t) => tokio::time::sleep_until(t.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = sleep => {}
            r = view.changed() => {
                if r.is_err() {
                    return;
                }
                let v = view.borrow_and_update().clone();
                engine.borrow_mut().set_view(v);
                continue;
            }
        }
        let now = Instant::now();
        let ready: Vec<String> = due
            .iter()
            .filter(|(_, t)| **t <= now)
            .map(|(n, _)| n.clone())
            .collect();
        for name in ready {
            let (records, error) = lookup(&resolver, &name).await;
            let mut e = engine.borrow_mut();
            let result = match (&error, records.is_empty()) {
                (Some(_), true) => "error",
                (None, true) => "empty",
                _ => "answer",
            };
            e.metrics.dns_lookups.with_label_values(&[result]).inc();
            if let Some(err) = &error {
                warn!(
                    name,
                    "DNS lookup failed (addresses learned before stay until they expire): {err}"
                );
            }
            let mut admitted = Vec::new();
            for w in names.get(&name).into_iter().flatten() {
                admitted.extend(e.learn(w, &name, &records, "resolver", 0));
            }
            let _ = e.offer(admitted, false);
            let next = records
                .iter()
                .map(|(_, ttl)| e.ttl_bounds(*ttl))
                .min()
                .unwrap_or(e.cfg().dns.min_ttl);
            due.insert(
                name.clone(),
                Instant::now() + Duration::from_secs(u64::from(next)),
            );
        }
    }
}
