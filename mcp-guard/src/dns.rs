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

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result};
use hickory_resolver::{
    config::{ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig},
    net::runtime::TokioRuntimeProvider,
    proto::{
        op::Message,
        rr::{RData, RecordType},
    },
    TokioResolver,
};
use tokio::{
    net::UdpSocket,
    sync::{mpsc, oneshot, watch},
};
use tracing::{debug, info, warn};

use crate::{
    cgroup,
    config::{normalise_name, Config, HostPattern},
    events::{self, JsonEvent},
    metrics::Metrics,
    policy::{self, Learned},
    sockdiag::SockDiag,
};

/// A new learned set for the daemon to enforce; `done` is answered once it is.
pub struct Update {
    pub learned: Vec<Learned>,
    pub done: Option<oneshot::Sender<()>>,
}

/// How long the proxy waits for the policy with a new answer before answering anyway
/// (the workload's connections then fail closed until the policy is in).
const INSTALL_WAIT: Duration = Duration::from_secs(2);
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a cgroup's workload is remembered by the proxy.
const OWNER_TTL: Duration = Duration::from_secs(5);
/// Queries the proxy works on at once; more are dropped.
const MAX_IN_FLIGHT: usize = 256;
/// A TCP client's connection: at most this many queries, closed after this long idle.
const TCP_QUERIES_PER_CONNECTION: usize = 64;
const TCP_IDLE: Duration = Duration::from_secs(10);
/// How often, at most, the proxy reads which source address is whose.
const SOURCES_RESCAN: Duration = Duration::from_secs(1);

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The learned addresses and what they are for. Shared by the resolver, the proxy and
/// the daemon (which shows it on /dns and hands it to `explain`).
pub struct Engine {
    cfg: Arc<Config>,
    mount: PathBuf,
    /// (workload, name, address) -> what was learned.
    learned: BTreeMap<(String, String, IpAddr), Learned>,
    owners: HashMap<u64, (Instant, Option<String>)>,
    /// Source address -> cgroup id of the workload whose own network namespace has it
    /// (clients in another namespace than the proxy, such as pods), and when it was read.
    sources: (Option<Instant>, BTreeMap<[u8; 16], u64>),
    /// When a refusal was last reported, and how many since were not.
    reported: HashMap<(String, String, IpAddr, &'static str), (Instant, u32)>,
    updates: mpsc::UnboundedSender<Update>,
    events: mpsc::UnboundedSender<JsonEvent>,
    metrics: Arc<Metrics>,
    /// Policy generation, for events.
    pub generation: u32,
}

impl Engine {
    #[must_use]
    pub fn new(
        cfg: Arc<Config>,
        mount: PathBuf,
        updates: mpsc::UnboundedSender<Update>,
        events: mpsc::UnboundedSender<JsonEvent>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let e = Self {
            cfg,
            mount,
            learned: BTreeMap::new(),
            owners: HashMap::new(),
            sources: (None, BTreeMap::new()),
            reported: HashMap::new(),
            updates,
            events,
            metrics,
            generation: 0,
        };
        e.init_series();
        e
    }

    /// Refusal counters exist at 0 for every workload with host rules, so an alert on
    /// their increase() sees the first refusal.
    fn init_series(&self) {
        for w in self.cfg.workloads.iter().filter(|w| !w.hosts.is_empty()) {
            for reason in ["rebound-metadata", "rebound-baseline", "rebound-internal"] {
                self.metrics
                    .dns_refused
                    .with_label_values(&[&w.name, reason]);
            }
        }
    }

    /// Everything learned and still alive, for the compiler.
    #[must_use]
    pub fn snapshot(&self) -> Vec<Learned> {
        self.learned.values().cloned().collect()
    }

    /// Takes over what a previous daemon learned (as installed), keeping only what the
    /// rules still match and the guard admits.
    pub fn seed(&mut self, learned: &[Learned]) {
        for l in learned {
            self.learned
                .insert((l.workload.clone(), l.name.clone(), l.addr), l.clone());
        }
        let cfg = self.cfg.clone();
        self.set_config(cfg);
    }

    /// Updates entries to the TTL and expiry of the latest answer for the same workload,
    /// name and address.
    pub fn refresh(&self, entries: &mut [Learned]) {
        for l in entries {
            let key = (l.workload.clone(), l.name.clone(), l.addr);
            if let Some(now) = self.learned.get(&key) {
                l.ttl = now.ttl;
                l.expires_unix = now.expires_unix;
            }
        }
    }

    /// A new config: forget what no host rule matches any more, and what the new
    /// baseline or rules refuse.
    pub fn set_config(&mut self, cfg: Arc<Config>) -> bool {
        self.cfg = cfg;
        self.owners.clear();
        self.sources = (None, BTreeMap::new());
        self.init_series();
        let before = self.learned.len();
        let cfg = self.cfg.clone();
        self.learned.retain(|(wl, name, addr), _| {
            cfg.workloads.iter().any(|w| {
                &w.name == wl
                    && w.hosts.iter().any(|h| {
                        h.pattern.matches(name) && policy::refusal(&cfg, h, *addr).is_none()
                    })
            })
        });
        before != self.learned.len()
    }

    /// Exact names to resolve, with the workloads that have rules for them.
    fn exact_names(&self) -> BTreeMap<String, BTreeSet<String>> {
        let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for w in &self.cfg.workloads {
            for h in &w.hosts {
                if let HostPattern::Exact(n) = &h.pattern {
                    out.entry(n.clone()).or_default().insert(w.name.clone());
                }
            }
        }
        out
    }

    fn ttl_bounds(&self, ttl: u32) -> u32 {
        ttl.clamp(self.cfg.dns.min_ttl, self.cfg.dns.max_ttl)
    }

    /// Takes one answer for `name` as received by `workload`: admitted addresses are
    /// learned (or kept longer), refused ones reported. Returns whether the set of
    /// learned addresses grew (the policy must change before anyone uses them).
    pub fn learn(
        &mut self,
        workload: &str,
        name: &str,
        records: &[(IpAddr, u32)],
        source: &'static str,
        cgroup_id: u64,
    ) -> bool {
        let cfg = self.cfg.clone();
        let Some((wid, w)) = cfg
            .workloads
            .iter()
            .enumerate()
            .find(|(_, w)| w.name == workload)
        else {
            return false;
        };
        let rules: Vec<_> = w.hosts.iter().filter(|h| h.pattern.matches(name)).collect();
        if rules.is_empty() {
            return false;
        }
        let now = unix_now();
        let mut grew = false;
        for &(addr, ttl) in records {
            let addr = addr.to_canonical();
            let mut admitted = false;
            for h in &rules {
                match policy::refusal(&cfg, h, addr) {
                    None => admitted = true,
                    Some(reason) => {
                        self.metrics
                            .dns_refused
                            .with_label_values(&[workload, reason])
                            .inc();
                        let Some(suppressed) = self.report_now(workload, name, addr, reason) else {
                            continue;
                        };
                        warn!(workload, name, %addr, reason, rule = %h.pattern, "DNS answer refused by the rebinding guard");
                        let _ = self.events.send(events::dns_refusal(&events::Refusal {
                            workload,
                            workload_id: mcp_guard_common::FIRST_WORKLOAD_ID + wid as u32,
                            cgroup_id,
                            name,
                            addr,
                            reason,
                            rule: format!(
                                "workload {} allow host {} ({}:{})",
                                w.name,
                                h.pattern,
                                cfg.path.display(),
                                h.loc.line
                            ),
                            source,
                            generation: self.generation,
                            suppressed,
                        }));
                    }
                }
            }
            if !admitted {
                continue;
            }
            let expires_unix = now + u64::from(self.ttl_bounds(ttl)) + u64::from(cfg.dns.grace);
            let key = (workload.to_string(), name.to_string(), addr);
            let full = self.learned_by(workload) >= cfg.dns.max_addresses as usize;
            match self.learned.get_mut(&key) {
                Some(l) => {
                    l.expires_unix = l.expires_unix.max(expires_unix);
                    l.ttl = ttl;
                }
                None if full => {
                    self.metrics
                        .dns_limited
                        .with_label_values(&[workload])
                        .inc();
                    warn!(workload, name, %addr, limit = cfg.dns.max_addresses, "not learned: the workload has [dns] max_addresses learned addresses already (connections to it stay denied)");
                }
                None => {
                    debug!(workload, name, %addr, ttl, source, "learned");
                    self.learned.insert(
                        key,
                        Learned {
                            workload: workload.to_string(),
                            name: name.to_string(),
                            addr,
                            ttl,
                            expires_unix,
                            source: source.to_string(),
                        },
                    );
                    grew = true;
                }
            }
        }
        grew
    }

    /// Rate limit for refusal events: one per (workload, name, address, reason) per
    /// second; the next one carries how many were left out. The counter is always exact.
    fn report_now(
        &mut self,
        workload: &str,
        name: &str,
        addr: IpAddr,
        reason: &'static str,
    ) -> Option<u32> {
        if self.reported.len() > 10_000 {
            self.reported.clear();
        }
        let key = (workload.to_string(), name.to_string(), addr, reason);
        match self.reported.get_mut(&key) {
            Some((at, skipped)) if at.elapsed() < Duration::from_secs(1) => {
                *skipped += 1;
                None
            }
            Some((at, skipped)) => {
                *at = Instant::now();
                Some(std::mem::take(skipped))
            }
            None => {
                self.reported.insert(key, (Instant::now(), 0));
                Some(0)
            }
        }
    }

    fn learned_by(&self, workload: &str) -> usize {
        self.learned
            .range((workload.to_string(), String::new(), IpAddr::from([0u8; 4]))..)
            .take_while(|((w, _, _), _)| w == workload)
            .count()
    }

    /// Drops addresses whose TTL and grace ran out. Returns whether any did.
    pub fn expire(&mut self) -> bool {
        let now = unix_now();
        let before = self.learned.len();
        self.learned.retain(|_, l| l.expires_unix > now);
        before != self.learned.len()
    }

    /// Sends the learned set to the daemon.
    pub fn publish(&self, done: Option<oneshot::Sender<()>>) {
        self.metrics.dns_learned.reset();
        for w in &self.cfg.workloads {
            if !w.hosts.is_empty() {
                self.metrics
                    .dns_learned
                    .with_label_values(&[&w.name])
                    .set(0);
            }
        }
        for l in self.learned.values() {
            self.metrics
                .dns_learned
                .with_label_values(&[&l.workload])
                .inc();
        }
        let _ = self.updates.send(Update {
            learned: self.snapshot(),
            done,
        });
    }

    /// The cgroup of a client in another network namespace than the proxy, by its source
    /// address (a pod's address belongs to the pod's namespace). The address map is read
    /// again on a miss, at most every [`SOURCES_RESCAN`].
    fn cgroup_by_source(&mut self, ip: IpAddr) -> Option<u64> {
        let key = policy::addr16(ip.to_canonical());
        let stale = self.sources.0.is_none_or(|t| t.elapsed() >= SOURCES_RESCAN);
        if !self.sources.1.contains_key(&key) && stale {
            let patterns: Vec<String> = self
                .cfg
                .workloads
                .iter()
                .filter(|w| !w.hosts.is_empty())
                .map(|w| w.cgroup.clone())
                .collect();
            // The DNS thread's own namespace: /proc/thread-self is this thread.
            self.sources = (
                Some(Instant::now()),
                crate::sources::scan_cgroups(
                    patterns.iter().map(String::as_str),
                    &self.mount,
                    "/proc/thread-self/ns/net",
                ),
            );
        }
        self.sources.1.get(&key).copied()
    }

    /// The workload a cgroup belongs to (the nearest workload cgroup above it with host
    /// rules), looked up in the cgroup tree and remembered for a few seconds.
    fn owner(&mut self, cgroup_id: u64) -> Option<String> {
        if let Some((at, w)) = self.owners.get(&cgroup_id) {
            if at.elapsed() < OWNER_TTL {
                return w.clone();
            }
        }
        if self.owners.len() > 4096 {
            self.owners.clear();
        }
        let mut best: Option<(usize, String)> = None;
        for w in self.cfg.workloads.iter().filter(|w| !w.hosts.is_empty()) {
            for (_, dir) in cgroup::resolve_dirs(&self.mount, &w.cgroup) {
                let Ok(rel) = dir.strip_prefix(&self.mount) else {
                    continue;
                };
                let under = format!("/{}", rel.display());
                if let Some(found) = cgroup::find_by_id(&self.mount, &under, cgroup_id) {
                    let depth = under.len();
                    if best.as_ref().is_none_or(|(d, _)| depth > *d) && found.starts_with(&under) {
                        best = Some((depth, w.name.clone()));
                    }
                }
            }
        }
        let w = best.map(|(_, n)| n);
        self.owners.insert(cgroup_id, (Instant::now(), w.clone()));
        w
    }
}

/// The upstream servers: `[dns] nameservers`, else those of resolv.conf.
fn upstreams(cfg: &Config) -> Result<Vec<SocketAddr>> {
    if !cfg.dns.nameservers.is_empty() {
        return Ok(cfg.dns.nameservers.clone());
    }
    let text = std::fs::read_to_string("/etc/resolv.conf")
        .context("[dns] nameservers is not set and /etc/resolv.conf cannot be read")?;
    let found: Vec<SocketAddr> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|a| a.trim().parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect();
    anyhow::ensure!(
        !found.is_empty(),
        "[dns] nameservers is not set and /etc/resolv.conf names no nameserver"
    );
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
    Ok(b.build()?)
}

/// The proxy's sockets: UDP, TCP, and the sock_diag socket, all in the DNS namespace.
type ProxySockets = (UdpSocket, tokio::net::TcpListener, SockDiag);

/// Runs on the DNS thread: enters `[dns] netns`, builds the thread's runtime and binds
/// the proxy, so every socket it and the resolver open lives in that namespace.
fn enter_and_bind(
    dns: &crate::config::DnsConfig,
) -> Result<(tokio::runtime::Runtime, Option<ProxySockets>)> {
    if let Some(ns) = &dns.netns {
        let f = std::fs::File::open(ns)
            .with_context(|| format!("[dns] netns {} cannot be opened", ns.display()))?;
        // SAFETY: valid netns fd; only this thread changes namespace.
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            anyhow::bail!(
                "[dns] netns {}: cannot enter it: {}",
                ns.display(),
                std::io::Error::last_os_error()
            );
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let Some(addr) = dns.proxy else {
        return Ok((rt, None));
    };
    let udp = std::net::UdpSocket::bind(addr).with_context(|| {
        format!("[dns] proxy {addr} cannot be bound (UDP, in the DNS namespace)")
    })?;
    udp.set_nonblocking(true)?;
    let tcp = std::net::TcpListener::bind(addr).with_context(|| {
        format!("[dns] proxy {addr} cannot be bound (TCP, in the DNS namespace)")
    })?;
    tcp.set_nonblocking(true)?;
    let sockets = {
        let _g = rt.enter();
        (
            UdpSocket::from_std(udp)?,
            tokio::net::TcpListener::from_std(tcp)?,
            SockDiag::open().context("opening NETLINK_SOCK_DIAG")?,
        )
    };
    Ok((rt, Some(sockets)))
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
                let (rt, proxy) = match enter_and_bind(&dns) {
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
                    let resolver = match resolver(&servers) {
                        Ok(r) => r,
                        Err(e) => {
                            warn!("DNS resolver: {e:#}");
                            return;
                        }
                    };
                    let resolving = tokio::spawn(resolve_loop(engine.clone(), resolver, config_rx));
                    let proxying = proxy.map(|(sock, tcp, diag)| {
                        tokio::spawn(proxy_loop(
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
            })
            .context("spawning the DNS thread")?;
        ready_rx
            .recv()
            .context("the DNS thread ended before it was ready")??;
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
            if grew {
                e.publish(None);
            }
        }
    }
}

async fn proxy_loop(
    sock: Arc<UdpSocket>,
    tcp: tokio::net::TcpListener,
    addr: SocketAddr,
    engine: Arc<Mutex<Engine>>,
    servers: Vec<SocketAddr>,
    diag: Arc<Mutex<SockDiag>>,
) {
    let mut buf = vec![0u8; 4096];
    let in_flight = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    let _tcp = AbortOnDrop(tokio::spawn(tcp_loop(
        tcp,
        addr,
        engine.clone(),
        servers.clone(),
        diag.clone(),
        in_flight.clone(),
    )));
    loop {
        let Ok((n, client)) = sock.recv_from(&mut buf).await else {
            continue;
        };
        let Ok(permit) = in_flight.clone().try_acquire_owned() else {
            // A flood: drop the query (the client asks again), never queue without bound.
            let metrics = engine.lock().expect("engine").metrics.clone();
            metrics.dns_proxied.with_label_values(&["overloaded"]).inc();
            continue;
        };
        let query = buf[..n].to_vec();
        // Who asked, while their socket certainly exists.
        let cgroup_id = diag.lock().expect("diag").udp_cgroup(addr, client);
        let (sock, engine, servers) = (sock.clone(), engine.clone(), servers.clone());
        tokio::spawn(async move {
            answer(sock, client, query, cgroup_id, engine, servers).await;
            drop(permit);
        });
    }
}

/// Stops a task when its owner goes.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// SERVFAIL for a query we could not answer, so the client does not wait.
fn servfail(query: &[u8]) -> Option<Vec<u8>> {
    let mut r = query.to_vec();
    if r.len() < 12 {
        return None;
    }
    r[2] |= 0x80; // QR
    r[3] = (r[3] & 0xf0) | 2; // RCODE SERVFAIL
    Some(r)
}

async fn forward(query: &[u8], servers: &[SocketAddr]) -> Option<Vec<u8>> {
    for s in servers {
        let bind: SocketAddr = if s.is_ipv4() {
            "0.0.0.0:0".parse().expect("addr")
        } else {
            "[::]:0".parse().expect("addr")
        };
        let Ok(sock) = UdpSocket::bind(bind).await else {
            continue;
        };
        if sock.connect(s).await.is_err() || sock.send(query).await.is_err() {
            continue;
        }
        let mut buf = vec![0u8; 65535];
        let deadline = tokio::time::Instant::now() + UPSTREAM_TIMEOUT;
        while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, sock.recv(&mut buf)).await {
            // Same id and question as asked: anything else is not this query's answer.
            if n >= 12 && buf[..2] == query[..2] && buf[12..n].starts_with(question(query)) {
                buf.truncate(n);
                return Some(buf);
            }
        }
    }
    None
}

/// The question section's bytes (from offset 12 up to the end of the first question).
fn question(msg: &[u8]) -> &[u8] {
    let mut at = 12;
    while at < msg.len() {
        let len = usize::from(msg[at]);
        if len == 0 {
            return &msg[12..(at + 5).min(msg.len())];
        }
        if len & 0xc0 != 0 {
            break;
        }
        at += len + 1;
    }
    &msg[12.min(msg.len())..]
}

/// Which cgroup asked: the asking socket's own (found in the proxy's namespace), else
/// the workload whose namespace holds the client's source address (a pod).
fn attribute(
    engine: &Mutex<Engine>,
    found: std::io::Result<Option<u64>>,
    client: SocketAddr,
) -> Option<u64> {
    match found {
        Ok(Some(c)) => Some(c),
        Ok(None) => engine.lock().expect("engine").cgroup_by_source(client.ip()),
        Err(e) => {
            warn!(%client, "DNS proxy: cannot tell which cgroup asked: {e}");
            None
        }
    }
}

/// Learns an upstream answer for the workload that asked and, if that taught the
/// policy anything new, waits until the kernel has it. Returns the metric's result.
async fn learn_response(
    engine: &Mutex<Engine>,
    cgroup_id: Option<u64>,
    response: &[u8],
    client: SocketAddr,
) -> &'static str {
    let Some(cg) = cgroup_id else {
        return "unattributed";
    };
    let Ok(msg) = Message::from_vec(response) else {
        return "forwarded";
    };
    let done = {
        let mut e = engine.lock().expect("engine");
        let Some(workload) = e.owner(cg) else {
            return "unattributed";
        };
        let records: Vec<(IpAddr, u32)> = msg
            .answers
            .iter()
            .filter_map(|rec| match &rec.data {
                RData::A(a) => Some((IpAddr::V4(a.0), rec.ttl)),
                RData::AAAA(a) => Some((IpAddr::V6(a.0), rec.ttl)),
                _ => None,
            })
            .collect();
        let mut grew = false;
        for q in &msg.queries {
            let name = normalise_name(&q.name().to_ascii());
            grew |= e.learn(&workload, &name, &records, "proxy", cg);
        }
        if !grew {
            return "forwarded";
        }
        let (tx, rx) = oneshot::channel();
        e.publish(Some(tx));
        rx
    };
    if tokio::time::timeout(INSTALL_WAIT, done).await.is_err() {
        warn!(%client, "DNS proxy: the policy with the new answer was not in place within {INSTALL_WAIT:?}; answering anyway (connections fail closed until it is)");
    }
    "learned"
}

async fn answer(
    sock: Arc<UdpSocket>,
    client: SocketAddr,
    query: Vec<u8>,
    found: std::io::Result<Option<u64>>,
    engine: Arc<Mutex<Engine>>,
    servers: Vec<SocketAddr>,
) {
    let metrics = engine.lock().expect("engine").metrics.clone();
    if query.len() < 12 {
        metrics.dns_proxied.with_label_values(&["malformed"]).inc();
        return;
    }
    let Some(response) = forward(&query, &servers).await else {
        metrics
            .dns_proxied
            .with_label_values(&["upstream-error"])
            .inc();
        if let Some(r) = servfail(&query) {
            let _ = sock.send_to(&r, client).await;
        }
        return;
    };
    let cgroup_id = attribute(&engine, found, client);
    let result = learn_response(&engine, cgroup_id, &response, client).await;
    metrics.dns_proxied.with_label_values(&[result]).inc();
    let _ = sock.send_to(&response, client).await;
}

/// DNS over TCP (RFC 1035 4.2.2: each message after a two-byte length), which clients
/// use when a UDP answer was truncated.
async fn tcp_loop(
    listener: tokio::net::TcpListener,
    addr: SocketAddr,
    engine: Arc<Mutex<Engine>>,
    servers: Vec<SocketAddr>,
    diag: Arc<Mutex<SockDiag>>,
    in_flight: Arc<tokio::sync::Semaphore>,
) {
    loop {
        let Ok((stream, client)) = listener.accept().await else {
            continue;
        };
        let Ok(permit) = in_flight.clone().try_acquire_owned() else {
            let metrics = engine.lock().expect("engine").metrics.clone();
            metrics.dns_proxied.with_label_values(&["overloaded"]).inc();
            continue;
        };
        let found = diag.lock().expect("diag").tcp_cgroup(addr, client);
        let (engine, servers) = (engine.clone(), servers.clone());
        tokio::spawn(async move {
            let cgroup_id = attribute(&engine, found, client);
            let _ = tcp_session(stream, client, cgroup_id, &engine, &servers).await;
            drop(permit);
        });
    }
}

async fn read_message(stream: &mut tokio::net::TcpStream) -> std::io::Result<Vec<u8>> {
    use tokio::io::AsyncReadExt as _;
    let len = usize::from(stream.read_u16().await?);
    let mut msg = vec![0u8; len];
    stream.read_exact(&mut msg).await?;
    Ok(msg)
}

async fn write_message(stream: &mut tokio::net::TcpStream, msg: &[u8]) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt as _;
    let len = u16::try_from(msg.len()).map_err(|_| std::io::Error::other("message too long"))?;
    let mut out = len.to_be_bytes().to_vec();
    out.extend_from_slice(msg);
    stream.write_all(&out).await
}

async fn tcp_session(
    mut stream: tokio::net::TcpStream,
    client: SocketAddr,
    cgroup_id: Option<u64>,
    engine: &Mutex<Engine>,
    servers: &[SocketAddr],
) -> std::io::Result<()> {
    let metrics = engine.lock().expect("engine").metrics.clone();
    for _ in 0..TCP_QUERIES_PER_CONNECTION {
        let Ok(query) = tokio::time::timeout(TCP_IDLE, read_message(&mut stream)).await else {
            return Ok(());
        };
        let query = query?;
        if query.len() < 12 {
            metrics.dns_proxied.with_label_values(&["malformed"]).inc();
            return Ok(());
        }
        let Some(response) = forward_tcp(&query, servers).await else {
            metrics
                .dns_proxied
                .with_label_values(&["upstream-error"])
                .inc();
            if let Some(r) = servfail(&query) {
                write_message(&mut stream, &r).await?;
            }
            continue;
        };
        let result = learn_response(engine, cgroup_id, &response, client).await;
        metrics.dns_proxied.with_label_values(&[result]).inc();
        write_message(&mut stream, &response).await?;
    }
    Ok(())
}

async fn forward_tcp(query: &[u8], servers: &[SocketAddr]) -> Option<Vec<u8>> {
    for s in servers {
        let attempt = async {
            let mut up = tokio::net::TcpStream::connect(s).await?;
            write_message(&mut up, query).await?;
            read_message(&mut up).await
        };
        if let Ok(Ok(r)) = tokio::time::timeout(UPSTREAM_TIMEOUT, attempt).await {
            if r.len() >= 12 && r[..2] == query[..2] && r[12..].starts_with(question(query)) {
                return Some(r);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engine(
        text: &str,
    ) -> (
        Engine,
        mpsc::UnboundedReceiver<Update>,
        mpsc::UnboundedReceiver<JsonEvent>,
    ) {
        let cfg = crate::config::parse(std::path::Path::new("t.toml"), text).unwrap();
        let (utx, urx) = mpsc::unbounded_channel();
        let (etx, erx) = mpsc::unbounded_channel();
        let e = Engine::new(
            Arc::new(cfg),
            PathBuf::from("/nonexistent"),
            utx,
            etx,
            Arc::new(Metrics::new("test")),
        );
        (e, urx, erx)
    }

    const CFG: &str = "[dns]\nproxy='127.0.0.1:5353'\nmax_addresses=2\nmin_ttl=10\nmax_ttl=100\ngrace=5\n[[workload]]\nname='w'\ncgroup='/w'\n[[workload.allow]]\nhost='*.cdn.test'\n[[workload.allow]]\nhost='api.test'\n";

    #[test]
    fn learns_within_guard_bounds_and_limit() {
        let (mut e, _u, mut ev) = engine(CFG);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let now = unix_now();
        // Not a name any rule of the workload matches, or an unknown workload.
        assert!(!e.learn("w", "cdn.test", &[(ip("1.1.1.1"), 60)], "proxy", 7));
        assert!(!e.learn("x", "a.cdn.test", &[(ip("1.1.1.1"), 60)], "proxy", 7));
        // Metadata and internal answers are refused, reported, and not learned.
        assert!(!e.learn(
            "w",
            "a.cdn.test",
            &[(ip("169.254.169.254"), 60), (ip("10.1.1.1"), 60)],
            "proxy",
            7
        ));
        let r1 = ev.try_recv().unwrap();
        let r2 = ev.try_recv().unwrap();
        assert_eq!(
            (r1.reason.as_str(), r2.reason.as_str()),
            ("rebound-metadata", "rebound-internal")
        );
        assert_eq!(r1.name.as_deref(), Some("a.cdn.test"));
        assert_eq!(r1.cgroup_id, 7);
        // The same refusal again within a second: counted, not reported again.
        assert!(!e.learn(
            "w",
            "a.cdn.test",
            &[(ip("169.254.169.254"), 60)],
            "proxy",
            7
        ));
        assert!(ev.try_recv().is_err());
        // TTLs clamped to 10..=100, plus 5 s grace.
        assert!(e.learn("w", "a.cdn.test", &[(ip("1.1.1.1"), 0)], "proxy", 7));
        assert!(e.learn("w", "api.test", &[(ip("2.2.2.2"), 1000)], "resolver", 0));
        let s = e.snapshot();
        let exp = |a: &str| s.iter().find(|l| l.addr == ip(a)).unwrap().expires_unix - now;
        assert!((15..=16).contains(&exp("1.1.1.1")), "{}", exp("1.1.1.1"));
        assert!((105..=106).contains(&exp("2.2.2.2")), "{}", exp("2.2.2.2"));
        // Seen again: not new; a third address is over max_addresses = 2.
        assert!(!e.learn("w", "a.cdn.test", &[(ip("1.1.1.1"), 50)], "proxy", 7));
        assert!(!e.learn("w", "b.cdn.test", &[(ip("3.3.3.3"), 50)], "proxy", 7));
        assert_eq!(e.snapshot().len(), 2);
        // Nothing expired yet; a config without the wildcard forgets its answers.
        assert!(!e.expire());
        let narrower = CFG.replace("host='*.cdn.test'", "host='other.test'");
        let cfg = crate::config::parse(std::path::Path::new("t.toml"), &narrower).unwrap();
        assert!(e.set_config(Arc::new(cfg)));
        let left: Vec<String> = e.snapshot().iter().map(|l| l.name.clone()).collect();
        assert_eq!(left, ["api.test"]);
    }

    #[test]
    fn question_bytes_end_after_type_and_class() {
        // id, flags, counts, then "a.io" A IN.
        let mut q = vec![0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        q.extend_from_slice(&[1, b'a', 2, b'i', b'o', 0, 0, 1, 0, 1]);
        assert_eq!(question(&q), &q[12..]);
        q.extend_from_slice(&[0, 0, 41]); // trailing OPT record start
        assert_eq!(question(&q).len(), 10);
    }

    #[test]
    fn servfail_sets_response_and_rcode() {
        let q = vec![0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        let r = servfail(&q).unwrap();
        assert_eq!(r[2] & 0x80, 0x80);
        assert_eq!(r[3] & 0x0f, 2);
        assert!(servfail(&q[..5]).is_none());
    }
}
