//! The addresses host rules learned, as the state owner holds them next to the policy:
//! what DNS answered for which workload and name, until when. The DNS side reads a
//! published copy to tell whether an answer teaches the policy anything
//! ([`LearnedSet::need`]) and sends only answers that do; the owner merges them
//! ([`LearnedSet::merge`]), expires them and installs the policy with them.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    time::{SystemTime, UNIX_EPOCH},
};

use tracing::{debug, warn};

use crate::{
    config::Config,
    policy::{self, Learned},
    telemetry::metrics::Metrics,
};

/// Unix seconds now.
#[must_use]
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

type Key = (String, String, IpAddr);

/// What an answer would change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Nothing: every address is learned, and none would live much longer.
    Nothing,
    /// Only expiries would move later: installed meanwhile, the answer need not wait
    /// (the address stays allowed under its earlier expiry until then).
    Renewal,
    /// A new address: the answer waits until the kernel enforces it.
    New,
}

/// The learned addresses, by (workload, name, address).
#[derive(Debug, Clone, Default)]
pub struct LearnedSet {
    map: BTreeMap<Key, Learned>,
}

fn key(l: &Learned) -> Key {
    (l.workload.clone(), l.name.clone(), l.addr)
}

/// Whether a rule of the workload still covers the entry and the guard admits it.
fn covered(cfg: &Config, l: &Learned) -> bool {
    cfg.workloads.iter().any(|w| {
        w.name == l.workload
            && (w
                .hosts
                .iter()
                .any(|h| h.pattern.matches(&l.name) && policy::refusal(cfg, h, l.addr).is_none())
                || w.allow.iter().any(|a| policy::granted_by(a, l)))
    })
}

/// An expiry this much later than the one installed is worth installing: a client
/// caches an answer for its TTL, and the installed expiry already holds `grace` past
/// the earlier answer's TTL, so a renewal by less than half the grace changes nothing a
/// client can notice (and repeated answers do not rewrite the policy each time).
fn renew_after(cfg: &Config) -> u64 {
    u64::from(cfg.dns.grace / 2)
}

impl LearnedSet {
    /// What a previous daemon learned (as installed), kept where the rules still cover it.
    #[must_use]
    pub fn seeded(learned: &[Learned], cfg: &Config) -> Self {
        let mut s = Self {
            map: learned.iter().map(|l| (key(l), l.clone())).collect(),
        };
        s.retain_for(cfg);
        s
    }

    #[must_use]
    pub fn snapshot(&self) -> Vec<Learned> {
        self.map.values().cloned().collect()
    }

    #[must_use]
    pub fn len(&self) -> usize {
        self.map.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// A new config: forget what no host rule matches any more, and what the new
    /// baseline or rules refuse. Returns whether anything went.
    pub fn retain_for(&mut self, cfg: &Config) -> bool {
        let before = self.map.len();
        self.map.retain(|_, l| covered(cfg, l));
        before != self.map.len()
    }

    /// Drops addresses whose TTL and grace ran out. Returns whether any did.
    pub fn expire(&mut self, now: u64) -> bool {
        let before = self.map.len();
        self.map.retain(|_, l| l.expires_unix > now);
        before != self.map.len()
    }

    /// What `answers` (admitted by the guard) would change.
    #[must_use]
    pub fn need(&self, answers: &[Learned], cfg: &Config) -> Need {
        let mut need = Need::Nothing;
        for a in answers {
            match self.map.get(&key(a)) {
                None => return Need::New,
                Some(l) if a.expires_unix > l.expires_unix + renew_after(cfg) => {
                    need = Need::Renewal;
                }
                Some(_) => {}
            }
        }
        need
    }

    /// Takes answers the DNS side sent: new addresses (up to `[dns] max_addresses` per
    /// workload) and expiries worth moving later. Answers the config no longer covers
    /// (a reload came in between) are dropped. Returns what changed.
    pub fn merge(&mut self, answers: Vec<Learned>, cfg: &Config, metrics: &Metrics) -> Need {
        let mut changed = Need::Nothing;
        for a in answers.into_iter().filter(|a| covered(cfg, a)) {
            let k = key(&a);
            if let Some(l) = self.map.get_mut(&k) {
                if a.expires_unix > l.expires_unix + renew_after(cfg) {
                    l.expires_unix = a.expires_unix;
                    l.ttl = a.ttl;
                    if changed == Need::Nothing {
                        changed = Need::Renewal;
                    }
                }
                continue;
            }
            if self.learned_by(&a.workload) >= cfg.dns.max_addresses as usize {
                metrics.dns_limited.with_label_values(&[&a.workload]).inc();
                warn!(workload = %a.workload, name = %a.name, addr = %a.addr, limit = cfg.dns.max_addresses, "not learned: the workload has [dns] max_addresses learned addresses already (connections to it stay denied)");
                continue;
            }
            debug!(workload = %a.workload, name = %a.name, addr = %a.addr, ttl = a.ttl, source = %a.source, "learned");
            self.map.insert(k, a);
            changed = Need::New;
        }
        changed
    }

    fn learned_by(&self, workload: &str) -> usize {
        self.map
            .range((workload.to_string(), String::new(), IpAddr::from([0u8; 4]))..)
            .take_while(|((w, _, _), _)| w == workload)
            .count()
    }

    /// The learned-addresses gauge, per workload with host rules.
    pub fn publish_metrics(&self, cfg: &Config, metrics: &Metrics) {
        metrics.dns_learned.reset();
        for w in cfg.workloads.iter().filter(|w| !w.hosts.is_empty()) {
            metrics.dns_learned.with_label_values(&[&w.name]).set(0);
        }
        for l in self.map.values() {
            metrics.dns_learned.with_label_values(&[&l.workload]).inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CFG: &str = "[dns]\nproxy='127.0.0.1:5353'\nmax_addresses=2\nmin_ttl=10\nmax_ttl=100\ngrace=10\n[[workload]]\nname='w'\ncgroup='/w'\n[[workload.allow]]\nhost='*.cdn.test'\n[[workload.allow]]\nhost='api.test'\n";

    fn cfg(text: &str) -> Config {
        crate::config::parse(std::path::Path::new("t.toml"), text).unwrap()
    }

    fn l(name: &str, addr: &str, expires_unix: u64) -> Learned {
        Learned {
            workload: "w".into(),
            name: name.into(),
            addr: addr.parse().unwrap(),
            ttl: 60,
            expires_unix,
            source: "proxy".into(),
        }
    }

    #[test]
    fn merges_new_addresses_renews_by_more_than_half_the_grace_and_keeps_the_limit() {
        let (c, m) = (cfg(CFG), Metrics::new("test"));
        let mut s = LearnedSet::default();
        let a = l("a.cdn.test", "1.1.1.1", 1000);
        assert_eq!(s.need(std::slice::from_ref(&a), &c), Need::New);
        assert_eq!(s.merge(vec![a.clone()], &c, &m), Need::New);
        assert_eq!(s.need(std::slice::from_ref(&a), &c), Need::Nothing);
        // Later by 5 s (half the grace): nothing; by 6 s: a renewal.
        let later = |by: u64| l("a.cdn.test", "1.1.1.1", 1000 + by);
        assert_eq!(s.need(&[later(5)], &c), Need::Nothing);
        assert_eq!(s.need(&[later(6)], &c), Need::Renewal);
        assert_eq!(s.merge(vec![later(6)], &c, &m), Need::Renewal);
        assert_eq!(s.snapshot()[0].expires_unix, 1006);
        // max_addresses = 2; a name no rule covers is never learned.
        assert_eq!(
            s.merge(vec![l("api.test", "2.2.2.2", 900)], &c, &m),
            Need::New
        );
        assert_eq!(
            s.merge(vec![l("b.cdn.test", "3.3.3.3", 900)], &c, &m),
            Need::Nothing
        );
        assert_eq!(
            s.merge(vec![l("cdn.test", "4.4.4.4", 900)], &c, &m),
            Need::Nothing
        );
        assert_eq!(s.len(), 2);
        assert_eq!(m.dns_limited.with_label_values(&["w"]).get(), 1);
        // The guard: an internal answer is never covered.
        let mut t = LearnedSet::default();
        assert_eq!(
            t.merge(vec![l("api.test", "10.0.0.1", 900)], &c, &m),
            Need::Nothing
        );
        // Expiry, and a narrower config.
        assert!(s.expire(950));
        assert_eq!(s.len(), 1);
        let narrower = cfg(&CFG.replace("host='*.cdn.test'", "host='other.test'"));
        assert!(s.retain_for(&narrower) && s.is_empty());
        let seeded = LearnedSet::seeded(&[l("a.cdn.test", "1.1.1.1", 2000)], &narrower);
        assert!(seeded.is_empty());
    }
}
