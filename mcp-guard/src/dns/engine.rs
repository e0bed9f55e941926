//! The learned addresses of host rules: what DNS answered for which workload, behind
//! the rebinding guard, for how long, and which workload a DNS client belongs to.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use super::{filter::Refusal, Update};
use crate::{
    config::{Config, HostPattern},
    policy::{self, Learned},
    telemetry::events::{self, JsonEvent},
    telemetry::metrics::Metrics,
};

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The learned addresses and what they are for. Shared by the resolver, the proxy and
/// the daemon (which shows it on /dns and hands it to `explain`).
pub struct Engine {
    pub(super) cfg: Arc<Config>,
    pub(super) mount: PathBuf,
    /// (workload, name, address) -> what was learned.
    learned: BTreeMap<(String, String, IpAddr), Learned>,
    pub(super) owners: HashMap<u64, (Instant, Option<String>)>,
    /// `exec --mcp` instances, to name the tool call a refusal happened under.
    pub mcp: Arc<crate::mcp::registry::Registry>,
    /// What the kernel attributes by (from the state owner).
    pub(super) registrations: super::Registrations,
    /// Source address -> cgroup id of the workload whose own network namespace has it
    /// (clients in another namespace than the proxy, such as pods), and when it was read.
    pub(super) sources: (Option<Instant>, BTreeMap<[u8; 16], u64>),
    /// When a refusal was last reported, and how many since were not.
    reported: HashMap<(String, String, IpAddr, &'static str), (Instant, u32)>,
    /// Query refusals: (workload, reason) -> the current second, events in it, and events
    /// left out since the last one reported.
    query_reported: HashMap<(String, &'static str), (Instant, u32, u32)>,
    /// (workload, name) -> (the allowed name whose answer's CNAME chain reached it, unix
    /// second it stops being allowed): a resolver following the chain may ask for it.
    aliases: HashMap<(String, String), (String, u64)>,
    updates: mpsc::UnboundedSender<Update>,
    events: mpsc::UnboundedSender<JsonEvent>,
    pub(super) metrics: Arc<Metrics>,
    /// Policy generation, for events.
    pub generation: u32,
    /// A learned address's expiry moved later since the last [`Engine::take_renewed`]:
    /// the kernel holds each expiry too (it refuses an expired answer with no daemon),
    /// so a renewal must be installed like a new address.
    renewed: bool,
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
            registrations: super::Registrations::default(),
            mcp: Arc::default(),
            sources: (None, BTreeMap::new()),
            reported: HashMap::new(),
            query_reported: HashMap::new(),
            aliases: HashMap::new(),
            updates,
            events,
            metrics,
            generation: 0,
            renewed: false,
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
        if self.cfg.dns.proxy.is_some() {
            for w in &self.cfg.workloads {
                for r in Refusal::ALL.iter().filter(|r| **r != Refusal::Unattributed) {
                    self.metrics
                        .dns_query_refused
                        .with_label_values(&[&w.name, r.reason()]);
                }
            }
            self.metrics
                .dns_query_refused
                .with_label_values(&["", Refusal::Unattributed.reason()]);
        }
    }

    /// The id and config of a workload by name.
    pub(super) fn workload(&self, name: &str) -> Option<(u32, &crate::config::Workload)> {
        self.cfg
            .workloads
            .iter()
            .find(|w| w.name == name)
            .map(|w| (w.id, w))
    }

    /// The name under which the proxy may forward (and learn) a question of `workload`
    /// for `name`: the name itself if a host rule covers it, the allowed name whose
    /// answer's CNAME chain led to it (while that answer lives), else `None`.
    pub(super) fn allowed_name(&mut self, workload: &str, name: &str) -> Option<String> {
        let (_, w) = self.workload(workload)?;
        if w.hosts.iter().any(|h| h.pattern.matches(name)) {
            return Some(name.to_string());
        }
        let key = (workload.to_string(), name.to_string());
        match self.aliases.get(&key) {
            Some((origin, until)) if *until > unix_now() => Some(origin.clone()),
            Some(_) => {
                self.aliases.remove(&key);
                None
            }
            None => None,
        }
    }

    /// Remembers the names an answer for the allowed `origin` reached through CNAME
    /// records, for as long as the policy would keep the answer's addresses.
    pub(super) fn note_cnames(
        &mut self,
        workload: &str,
        origin: &str,
        asked: &str,
        msg: &hickory_resolver::proto::op::Message,
    ) {
        use hickory_resolver::proto::rr::RData;
        let mut chain = vec![asked.to_string()];
        // Records may come in any order: follow the chain until it stops growing.
        for _ in 0..msg.answers.len() {
            let mut grew = false;
            for rec in &msg.answers {
                let RData::CNAME(target) = &rec.data else {
                    continue;
                };
                let owner = crate::config::normalise_name(&rec.name.to_ascii());
                let target = crate::config::normalise_name(&target.0.to_ascii());
                if chain.contains(&owner) && !chain.contains(&target) && chain.len() < 16 {
                    let until = unix_now()
                        + u64::from(self.ttl_bounds(rec.ttl))
                        + u64::from(self.cfg.dns.grace);
                    if self.aliases.len() >= 65_536 {
                        let now = unix_now();
                        self.aliases.retain(|_, (_, u)| *u > now);
                    }
                    if self.aliases.len() < 65_536 {
                        let e = self
                            .aliases
                            .entry((workload.to_string(), target.clone()))
                            .or_insert((origin.to_string(), until));
                        e.1 = e.1.max(until);
                    }
                    chain.push(target);
                    grew = true;
                }
            }
            if !grew {
                break;
            }
        }
    }

    /// Counts a query the proxy refused and reports it, at most `[events]
    /// rate_limit_per_sec` events per workload and reason a second (0: every one); the
    /// next event carries how many were left out. The counter is always exact.
    pub(super) fn refuse_query(&mut self, r: &crate::telemetry::events::QueryRefusal<'_>) {
        let workload = r.workload.unwrap_or("");
        self.metrics
            .dns_query_refused
            .with_label_values(&[workload, r.reason])
            .inc();
        let limit = self.cfg.rate_limit_per_sec;
        if self.query_reported.len() > 10_000 {
            self.query_reported.clear();
        }
        let slot = self
            .query_reported
            .entry((workload.to_string(), r.reason))
            .or_insert((Instant::now(), 0, 0));
        if slot.0.elapsed() >= Duration::from_secs(1) {
            slot.0 = Instant::now();
            slot.1 = 0;
        }
        if limit != 0 && slot.1 >= limit {
            slot.2 += 1;
            return;
        }
        slot.1 += 1;
        let suppressed = std::mem::take(&mut slot.2);
        debug!(workload, name = ?r.name, reason = r.reason, "DNS query refused");
        let _ = self.events.send(events::JsonEvent {
            mcp: self.tool_call(r.cgroup_id),
            ..events::dns_query_refusal(&events::QueryRefusal {
                suppressed,
                generation: self.generation,
                qtype: r.qtype.clone(),
                ..*r
            })
        });
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
        self.aliases.clear();
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
    pub(super) fn exact_names(&self) -> BTreeMap<String, BTreeSet<String>> {
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

    pub(super) fn ttl_bounds(&self, ttl: u32) -> u32 {
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
        let Some(w) = cfg.workloads.iter().find(|w| w.name == workload) else {
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
                        let mcp = self.tool_call(cgroup_id);
                        let _ = self.events.send(events::JsonEvent {
                            mcp,
                            ..events::dns_refusal(&events::Refusal {
                                workload,
                                workload_id: w.id,
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
                            })
                        });
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
                    if expires_unix > l.expires_unix {
                        l.expires_unix = expires_unix;
                        self.renewed = true;
                    }
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
    /// Whether an expiry moved later since the last call (see `renewed`).
    pub fn take_renewed(&mut self) -> bool {
        std::mem::take(&mut self.renewed)
    }

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
}
