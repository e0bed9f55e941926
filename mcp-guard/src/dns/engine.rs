//! The DNS side's own state: the rebinding guard on answers, which names a workload may
//! ask for (and the CNAME chains its answers reached), rate-limited refusal reports and
//! the attribution caches. It lives on the DNS thread alone; what it works from (config,
//! registrations, MCP instances, generation, the learned set) is the state owner's
//! published [`View`], and what it learns goes to the owner as an [`Update`].

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use super::{
    filter::Refusal,
    learned::{unix_now, Need},
    Update, View,
};
use crate::{
    config::{Config, HostPattern},
    policy::{self, Learned},
    telemetry::events::{self, JsonEvent},
    telemetry::metrics::Metrics,
};

/// The DNS side's state (see the module documentation).
pub struct Engine {
    pub(super) view: Arc<View>,
    pub(super) owners: HashMap<u64, (Instant, Option<String>)>,
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
    updates: super::Deliver,
    events: mpsc::UnboundedSender<JsonEvent>,
    pub(super) metrics: Arc<Metrics>,
}

impl Engine {
    #[must_use]
    pub fn new(
        view: Arc<View>,
        updates: super::Deliver,
        events: mpsc::UnboundedSender<JsonEvent>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let e = Self {
            view,
            owners: HashMap::new(),
            sources: (None, BTreeMap::new()),
            reported: HashMap::new(),
            query_reported: HashMap::new(),
            aliases: HashMap::new(),
            updates,
            events,
            metrics,
        };
        e.init_series();
        e
    }

    pub(super) fn cfg(&self) -> &Config {
        &self.view.cfg
    }

    /// Takes the owner's newest view. Another config forgets the caches that depend on
    /// it; other registrations forget the attribution caches.
    pub fn set_view(&mut self, v: Arc<View>) {
        if !Arc::ptr_eq(&v.cfg, &self.view.cfg) {
            self.owners.clear();
            self.sources = (None, BTreeMap::new());
            self.aliases.clear();
            self.view = v;
            self.init_series();
            return;
        }
        // The owner replaces the Arc only when the registrations changed.
        if !Arc::ptr_eq(&v.registered, &self.view.registered) {
            self.owners.clear();
            self.sources.0 = None;
        }
        self.view = v;
    }

    /// Refusal counters exist at 0 for every workload with host rules, so an alert on
    /// their increase() sees the first refusal.
    fn init_series(&self) {
        for w in self.cfg().workloads.iter().filter(|w| !w.hosts.is_empty()) {
            for reason in ["rebound-metadata", "rebound-baseline", "rebound-internal"] {
                self.metrics
                    .dns_refused
                    .with_label_values(&[&w.name, reason]);
            }
        }
        if self.cfg().dns.proxy.is_some() {
            for w in &self.cfg().workloads {
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
        self.cfg()
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
                        + u64::from(self.cfg().dns.grace);
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
        let limit = self.cfg().rate_limit_per_sec;
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
                generation: self.view.generation,
                qtype: r.qtype.clone(),
                ..*r
            })
        });
    }

    /// Exact names to resolve, with the workloads that have rules for them.
    pub(super) fn exact_names(&self) -> BTreeMap<String, BTreeSet<String>> {
        let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for w in &self.cfg().workloads {
            for h in &w.hosts {
                if let HostPattern::Exact(n) = &h.pattern {
                    out.entry(n.clone()).or_default().insert(w.name.clone());
                }
            }
        }
        out
    }

    pub(super) fn ttl_bounds(&self, ttl: u32) -> u32 {
        ttl.clamp(self.cfg().dns.min_ttl, self.cfg().dns.max_ttl)
    }

    /// Takes one answer for `name` as received by `workload`: refused addresses are
    /// counted and reported, admitted ones come back as what the policy would learn.
    pub fn learn(
        &mut self,
        workload: &str,
        name: &str,
        records: &[(IpAddr, u32)],
        source: &'static str,
        cgroup_id: u64,
    ) -> Vec<Learned> {
        let view = self.view.clone();
        let cfg = &view.cfg;
        let Some(w) = cfg.workloads.iter().find(|w| w.name == workload) else {
            return Vec::new();
        };
        let rules: Vec<_> = w.hosts.iter().filter(|h| h.pattern.matches(name)).collect();
        if rules.is_empty() {
            return Vec::new();
        }
        let now = unix_now();
        let mut admitted = Vec::new();
        for &(addr, ttl) in records {
            let addr = addr.to_canonical();
            let mut ok = false;
            for h in &rules {
                match policy::refusal(cfg, h, addr) {
                    None => ok = true,
                    Some(reason) => self.refuse_answer(w, h, name, addr, reason, source, cgroup_id),
                }
            }
            if ok {
                admitted.push(Learned {
                    workload: workload.to_string(),
                    name: name.to_string(),
                    addr,
                    ttl,
                    expires_unix: now + u64::from(self.ttl_bounds(ttl)) + u64::from(cfg.dns.grace),
                    source: source.to_string(),
                });
            }
        }
        admitted
    }

    /// Counts an answer the rebinding guard refused and reports it (rate-limited).
    #[allow(clippy::too_many_arguments)]
    fn refuse_answer(
        &mut self,
        w: &crate::config::Workload,
        h: &crate::config::HostRule,
        name: &str,
        addr: IpAddr,
        reason: &'static str,
        source: &'static str,
        cgroup_id: u64,
    ) {
        let workload = w.name.as_str();
        self.metrics
            .dns_refused
            .with_label_values(&[workload, reason])
            .inc();
        let Some(suppressed) = self.report_now(workload, name, addr, reason) else {
            return;
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
                    self.cfg().path.display(),
                    h.loc.line
                ),
                source,
                generation: self.view.generation,
                suppressed,
            })
        });
    }

    /// Hands admitted answers to the state owner if they teach the policy anything:
    /// new addresses (with `wait`, the returned receiver is answered once the kernel
    /// enforces them), or expiries worth moving later (never waited for).
    pub fn offer(
        &self,
        answers: Vec<Learned>,
        wait: bool,
    ) -> (Need, Option<oneshot::Receiver<()>>) {
        let need = self.view.learned.need(&answers, self.cfg());
        let done = match need {
            Need::Nothing => return (need, None),
            Need::New if wait => {
                let (tx, rx) = oneshot::channel();
                (self.updates)(Update {
                    answers,
                    done: Some(tx),
                });
                return (need, Some(rx));
            }
            Need::New | Need::Renewal => None,
        };
        (self.updates)(Update { answers, done });
        (need, None)
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::learned::LearnedSet;

    fn engine(
        text: &str,
        learned: LearnedSet,
    ) -> (
        Engine,
        mpsc::UnboundedReceiver<Update>,
        mpsc::UnboundedReceiver<JsonEvent>,
    ) {
        let cfg = crate::config::parse(std::path::Path::new("t.toml"), text).unwrap();
        let (utx, urx) = mpsc::unbounded_channel();
        let (etx, erx) = mpsc::unbounded_channel();
        let view = View {
            cfg: Arc::new(cfg),
            registered: Arc::default(),
            mcp: Arc::default(),
            generation: 3,
            learned: Arc::new(learned),
        };
        let deliver: crate::dns::Deliver = Arc::new(move |u| {
            let _ = utx.send(u);
        });
        let e = Engine::new(Arc::new(view), deliver, etx, Arc::new(Metrics::new("test")));
        (e, urx, erx)
    }

    const CFG: &str = "[dns]\nproxy='127.0.0.1:5353'\nmax_addresses=2\nmin_ttl=10\nmax_ttl=100\ngrace=5\n[[workload]]\nname='w'\ncgroup='/w'\n[[workload.allow]]\nhost='*.cdn.test'\n[[workload.allow]]\nhost='api.test'\n";

    #[test]
    fn the_guard_admits_within_ttl_bounds_and_reports_refusals_once_a_second() {
        let (mut e, _u, mut ev) = engine(CFG, LearnedSet::default());
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let now = unix_now();
        // Not a name any rule of the workload matches, or an unknown workload.
        assert!(e
            .learn("w", "cdn.test", &[(ip("1.1.1.1"), 60)], "proxy", 7)
            .is_empty());
        assert!(e
            .learn("x", "a.cdn.test", &[(ip("1.1.1.1"), 60)], "proxy", 7)
            .is_empty());
        // Metadata and internal answers are refused, reported, and not admitted.
        let bad = [(ip("169.254.169.254"), 60), (ip("10.1.1.1"), 60)];
        assert!(e.learn("w", "a.cdn.test", &bad, "proxy", 7).is_empty());
        let r1 = ev.try_recv().unwrap();
        let r2 = ev.try_recv().unwrap();
        assert_eq!(
            (r1.reason.as_str(), r2.reason.as_str()),
            ("rebound-metadata", "rebound-internal")
        );
        assert_eq!(r1.name.as_deref(), Some("a.cdn.test"));
        assert_eq!((r1.cgroup_id, r1.policy_generation), (7, 3));
        // The same refusal again within a second: counted, not reported again.
        assert!(e.learn("w", "a.cdn.test", &bad[..1], "proxy", 7).is_empty());
        assert!(ev.try_recv().is_err());
        // TTLs clamped to 10..=100, plus 5 s grace.
        let a = e.learn("w", "a.cdn.test", &[(ip("1.1.1.1"), 0)], "proxy", 7);
        let b = e.learn("w", "api.test", &[(ip("2.2.2.2"), 1000)], "resolver", 0);
        assert!((15..=16).contains(&(a[0].expires_unix - now)), "{a:?}");
        assert!((105..=106).contains(&(b[0].expires_unix - now)), "{b:?}");
    }

    #[test]
    fn only_answers_that_teach_the_policy_go_to_the_owner_and_only_new_ones_wait() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let (e0, _, _) = engine(CFG, LearnedSet::default());
        let cfg = e0.view.cfg.clone();
        let m = Metrics::new("test");
        let mut known = LearnedSet::default();
        let (mut e, _, _) = engine(CFG, LearnedSet::default());
        let a = e.learn("w", "a.cdn.test", &[(ip("1.1.1.1"), 60)], "proxy", 7);
        known.merge(a.clone(), &cfg, &m);
        let (mut e, mut updates, _) = engine(CFG, known);
        // Already learned: nothing is sent, nothing waits.
        let again = e.learn("w", "a.cdn.test", &[(ip("1.1.1.1"), 60)], "proxy", 7);
        assert_eq!(e.offer(again, true).0, Need::Nothing);
        assert!(updates.try_recv().is_err());
        // A new address waits for the owner; the update carries it.
        let new = e.learn("w", "a.cdn.test", &[(ip("1.1.1.2"), 60)], "proxy", 7);
        let (need, rx) = e.offer(new, true);
        assert_eq!(need, Need::New);
        let u = updates.try_recv().unwrap();
        assert_eq!(u.answers[0].addr, ip("1.1.1.2"));
        u.done.unwrap().send(()).unwrap();
        assert!(rx.unwrap().try_recv().is_ok());
        // Without waiting (the resolver), no receiver.
        let new = e.learn("w", "api.test", &[(ip("2.2.2.2"), 60)], "resolver", 0);
        let (need, rx) = e.offer(new, false);
        assert!(need == Need::New && rx.is_none());
        assert!(updates.try_recv().unwrap().done.is_none());
    }
}
