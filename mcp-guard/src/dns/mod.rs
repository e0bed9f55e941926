//! Host rules at run time: the daemon resolves exact names itself and, through a small
//! DNS proxy, learns the answers each workload receives (which wildcard rules need).
//! Every learned address passes the rebinding guard ([`policy::refusal`]) and lives for
//! its record's TTL (clamped to `[dns] min_ttl..=max_ttl`) plus `[dns] grace`. Each
//! change of the learned set is compiled into a whole new policy generation by the
//! daemon, the same atomic path a reload takes; the proxy hands an answer to the
//! workload only after the addresses in it are enforced.
//!
//! All of it runs on one thread that has entered `[dns] netns` (if set), so names are
//! resolved, and the proxy listens, where the workloads live.

mod attribute;
mod engine;
pub mod filter;
mod proxy;

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

pub use attribute::Registrations;
pub use engine::Engine;
use hickory_resolver::{
    config::{ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig},
    net::runtime::TokioRuntimeProvider,
    proto::rr::{RData, RecordType},
    TokioResolver,
};
use tokio::{
    net::UdpSocket,
    sync::{oneshot, watch},
};
use tracing::{info, warn};

use crate::{config::Config, host::sockdiag::SockDiag, policy::Learned};

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

/// A new learned set for the daemon to enforce; `done` is answered once it is.
pub struct Update {
    pub learned: Vec<Learned>,
    pub done: Option<oneshot::Sender<()>>,
}

/// The upstream servers: `[dns] nameservers`, else those of resolv.conf.
fn upstreams(cfg: &Config) -> Result<Vec<SocketAddr>> {
    if !cfg.dns.nameservers.is_empty() {
        return Ok(cfg.dns.nameservers.clone());
    }
    let text = std::fs::read_to_string("/etc/resolv.conf")
        .map_err(|e| DnsError::NoNameservers(format!("cannot be read ({e})")))?;
    let found: Vec<SocketAddr> = crate::config::resolv_conf_nameservers(&text)
        .into_iter()
        .map(|ip| SocketAddr::new(ip, 53))
        .collect();
    if found.is_empty() {
        return Err(DnsError::NoNameservers("names no nameserver".into()));
    }
    Ok(found)
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

/// A running DNS side: its thread, and how to hand it a new config or stop it.
pub struct Dns {
    config: watch::Sender<Arc<Config>>,
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
    /// Starts the resolver (and the proxy, if configured) on a thread of their own.
    ///
    /// # Errors
    /// The namespace cannot be entered, there is no upstream server, or the proxy address
    /// cannot be bound: all reported before the thread runs.
    pub fn start(cfg: Arc<Config>, engine: Arc<Mutex<Engine>>) -> Result<Self> {
        let servers = upstreams(&cfg)?;
        let (config_tx, config_rx) = watch::channel(cfg.clone());
        let (stop_tx, stop_rx) = oneshot::channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
        let dns = cfg.dns.clone();
        let thread = std::thread::Builder::new()
            .name("mcpg-dns".into())
            .spawn(move || {
                let Setup {
                    rt,
                    resolver,
                    proxy,
                } = match enter_and_bind(&dns, &servers) {
                    Ok(v) => {
                        let _ = ready_tx.send(Ok(()));
                        v
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                rt.block_on(async move {
                    let resolving = tokio::spawn(resolve_loop(engine.clone(), resolver, config_rx));
                    let proxying = proxy.map(|(sock, tcp, diag)| {
                        tokio::spawn(proxy::proxy_loop(
                            Arc::new(sock),
                            tcp,
                            dns.proxy.expect("bound"),
                            engine.clone(),
                            servers.clone(),
                            Arc::new(Mutex::new(diag)),
                        ))
                    });
                    let _ = stop_rx.await;
                    resolving.abort();
                    if let Some(p) = proxying {
                        p.abort();
                    }
                });
            })?;
        ready_rx.recv().map_err(|_| DnsError::ThreadEnded)??;
        info!(
            netns = ?cfg.dns.netns,
            proxy = ?cfg.dns.proxy,
            "DNS: resolving host rules{}",
            if cfg.dns.proxy.is_some() { " and learning answers through the proxy" } else { "" }
        );
        Ok(Self {
            config: config_tx,
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

    pub fn set_config(&self, cfg: Arc<Config>) {
        let _ = self.config.send(cfg);
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

/// Resolves every exact name when its shortest record TTL (clamped) runs out, and
/// expires what was learned.
async fn resolve_loop(
    engine: Arc<Mutex<Engine>>,
    resolver: TokioResolver,
    mut config: watch::Receiver<Arc<Config>>,
) {
    let mut due: BTreeMap<String, Instant> = BTreeMap::new();
    let mut expiry = tokio::time::interval(Duration::from_millis(500));
    loop {
        let names = engine.lock().expect("engine").exact_names();
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
            r = config.changed() => {
                if r.is_err() {
                    return;
                }
                let cfg = config.borrow_and_update().clone();
                let mut e = engine.lock().expect("engine");
                if e.set_config(cfg) {
                    e.publish(None);
                }
                continue;
            }
            _ = expiry.tick() => {
                let mut e = engine.lock().expect("engine");
                if e.expire() {
                    e.publish(None);
                }
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
            let mut e = engine.lock().expect("engine");
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
            let mut grew = false;
            for w in names.get(&name).into_iter().flatten() {
                grew |= e.learn(w, &name, &records, "resolver", 0);
            }
            let next = records
                .iter()
                .map(|(_, ttl)| e.ttl_bounds(*ttl))
                .min()
                .unwrap_or(e.cfg.dns.min_ttl);
            due.insert(
                name.clone(),
                Instant::now() + Duration::from_secs(u64::from(next)),
            );
            // A renewal is installed too: the kernel holds every expiry.
            if e.take_renewed() || grew {
                e.publish(None);
            }
        }
    }
}
