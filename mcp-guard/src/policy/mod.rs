//! The policy compiler: a pure function from a validated [`Config`] to the exact map
//! entries the kernel gets, and an evaluator that decides over those same entries the
//! way the kernel programs do. `explain` and the differential test use the evaluator.

use std::{
    collections::HashMap,
    fmt,
    net::{IpAddr, Ipv6Addr},
};

use ipnet::IpNet;
use mcp_guard_common::{
    PolicyEntry, PortRange, DEFAULT_ALLOW, DEFAULT_DENY, DEFAULT_DENY_INTERNAL, ENTRY_ALLOW,
    ENTRY_BASELINE_DENY, ENTRY_BASELINE_METADATA, ENTRY_HOLE, ENTRY_INTERNAL, ENTRY_METADATA_CLASS,
    MAX_RANGES, MODE_AUDIT, MODE_ENFORCE, PROTO_ANY, PROTO_OTHER, PROTO_TCP, PROTO_UDP,
    REASON_BASELINE_DENY, REASON_BASELINE_METADATA, REASON_DEFAULT_DENY, REASON_DENY_INTERNAL,
    REASON_NOT_ALLOWED, SCOPE_BASELINE, SCOPE_INTERNAL, SCOPE_METADATA,
};

use crate::{
    config::sets,
    config::{BaselineItem, Config, DefaultAction, HostRule, Mode, PortSpan, Proto},
};

/// One rule as the user wrote it, for `explain`, events and `check`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleInfo {
    pub id: u32,
    pub text: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompiledWorkload {
    pub id: u32,
    pub name: String,
    pub cgroup: String,
    pub default: u8,
    pub mode: u8,
    pub rules: usize,
    /// `WL_DENY_RAW` | `WL_DENY_PACKET` | `WL_DENY_DIRECT_DNS`.
    pub flags: u8,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LpmEntry {
    pub scope: u32,
    pub addr: [u8; 16],
    /// Address bits, 0 to 128 (the kernel key adds the 32 scope bits).
    pub plen: u8,
    pub entry: PolicyEntry,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExactEntry {
    pub scope: u32,
    pub addr: [u8; 16],
    pub entry: PolicyEntry,
    /// An entry that exists only because of learned DNS answers (flag
    /// `ENTRY_F_EXPIRES`): Unix second its last answer expires. The kernel ignores the
    /// entry from then on, whether or not the daemon runs.
    pub expires_unix: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Compiled {
    pub lpm: Vec<LpmEntry>,
    pub exact: Vec<ExactEntry>,
    pub workloads: Vec<CompiledWorkload>,
    /// Index `id - 1`.
    pub rules: Vec<RuleInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompileError(pub String);

impl fmt::Display for CompileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CompileError {}

/// An address as the maps store it: IPv6, or IPv4 in its mapped form.
#[must_use]
pub fn addr16(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The reverse of [`addr16`]: mapped addresses are shown as IPv4.
#[must_use]
pub fn display_addr(a: [u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(a);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// An address as the kernel judges it: [`addr16`], with NAT64 (64:ff9b::/96)
/// destinations judged as the IPv4 address they carry.
#[must_use]
pub fn judged16(ip: IpAddr) -> [u8; 16] {
    let mut a = addr16(ip.to_canonical());
    mcp_guard_common::nat64_to_mapped(&mut a);
    a
}

/// A prefix as the maps store it: IPv4 mapped; an IPv6 prefix inside 64:ff9b::/96
/// (NAT64) as the IPv4-mapped prefix it carries, since the kernel judges such
/// destinations by their IPv4 address; any other IPv6 prefix as written.
fn net16(net: &IpNet) -> ([u8; 16], u8) {
    match net {
        IpNet::V4(n) => (addr16(IpAddr::V4(n.network())), n.prefix_len() + 96),
        IpNet::V6(n) => {
            let mut a = n.network().octets();
            if n.prefix_len() >= 96 && mcp_guard_common::nat64_to_mapped(&mut a) {
                return (a, n.prefix_len());
            }
            (a, n.prefix_len())
        }
    }
}

/// `::ffff:0:0/96`, where IPv4 destinations live in the maps.
const MAPPED: Prefix = ([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0, 0, 0, 0], 96);

/// Whether an IPv6 prefix would cover IPv4 destinations if nothing stopped it: it
/// strictly contains `::ffff:0:0/96`. Such a prefix gets a hole there.
fn covers_mapped(p: &Prefix) -> bool {
    p.1 < MAPPED.1 && contains(p, &MAPPED)
}

fn mask(addr: &[u8; 16], plen: u8) -> [u8; 16] {
    let bits = u128::from_be_bytes(*addr);
    let m = if plen == 0 {
        0
    } else {
        u128::MAX << (128 - u32::from(plen))
    };
    (bits & m).to_be_bytes()
}

/// An address (IPv6 or IPv4-mapped) and a prefix length in bits (0 to 128).
type Prefix = ([u8; 16], u8);

fn contains(outer: &Prefix, inner: &Prefix) -> bool {
    outer.1 <= inner.1 && mask(&inner.0, outer.1) == outer.0
}

fn deny_entry(kind: u8, rule_id: u32) -> PolicyEntry {
    PolicyEntry {
        kind,
        n_ranges: 0,
        flags: 0,
        _pad: 0,
        rule_id,
        ranges: [PortRange::default(); MAX_RANGES],
    }
}

fn proto_bits(p: Proto) -> u8 {
    match p {
        Proto::Tcp => PROTO_TCP,
        Proto::Udp => PROTO_UDP,
        Proto::Any => PROTO_ANY,
    }
}

#[must_use]
pub fn proto_text(p: Proto) -> &'static str {
    match p {
        Proto::Tcp => "tcp",
        Proto::Udp => "udp",
        Proto::Any => "any",
    }
}

/// Drops ranges that an earlier range already covers (same or wider protocols): the
/// kernel takes the first matching range, so they could never decide.
fn dedupe(ranges: &mut Vec<PortRange>) {
    let mut out: Vec<PortRange> = Vec::with_capacity(ranges.len());
    for r in ranges.drain(..) {
        let covered = out
            .iter()
            .any(|e| e.lo <= r.lo && r.hi <= e.hi && e.protos & r.protos == r.protos);
        if !covered {
            out.push(r);
        }
    }
    *ranges = out;
}

/// Merges overlapping or adjacent ranges with the same protocols; the merged range keeps
/// the first rule's id. Only used when a prefix carries more than [`MAX_RANGES`].
fn coalesce(ranges: &mut Vec<PortRange>) {
    let mut by_proto: Vec<PortRange> = Vec::new();
    let mut sorted = ranges.clone();
    sorted.sort_by_key(|r| (r.protos, r.lo, r.hi));
    for r in sorted {
        if let Some(last) = by_proto.last_mut() {
            if last.protos == r.protos && u32::from(r.lo) <= u32::from(last.hi) + 1 {
                last.hi = last.hi.max(r.hi);
                continue;
            }
        }
        by_proto.push(r);
    }
    *ranges = by_proto;
}

/// An address that a DNS answer gave for a name a workload's host rule matches. The DNS
/// side keeps these while their records live; the compiler turns them into allows.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Learned {
    pub workload: String,
    /// The name that was answered (normalised).
    pub name: String,
    pub addr: IpAddr,
    /// The record's TTL, as the server gave it (seconds).
    pub ttl: u32,
    /// Unix seconds after which the address is no longer allowed (TTL, clamped, plus
    /// the grace period).
    pub expires_unix: u64,
    /// "resolver" (the daemon asked) or "proxy" (the workload asked through the proxy).
    pub source: String,
}

/// Why a DNS answer may never become an allow (the rebinding guard), or `None` if the
/// rule may have it. Baseline and metadata are refused always; internal ranges unless
/// the rule says `allow_internal = true`.
#[must_use]
pub fn refusal(cfg: &Config, rule: &HostRule, addr: IpAddr) -> Option<&'static str> {
    let a16 = judged16(addr);
    let hit = |nets: &[IpNet]| {
        nets.iter().any(|n| {
            let p = net16(n);
            contains(&p, &(a16, 128)) && !(covers_mapped(&p) && contains(&MAPPED, &(a16, 128)))
        })
    };
    if hit(sets::metadata()) {
        return Some("rebound-metadata");
    }
    let in_baseline = cfg.baseline.iter().any(|b| match &b.item {
        BaselineItem::Set { nets, .. } => hit(nets),
        BaselineItem::Cidr(n) => hit(std::slice::from_ref(n)),
    });
    if in_baseline {
        return Some("rebound-baseline");
    }
    if !rule.allow_internal && hit(sets::internal()) {
        return Some("rebound-internal");
    }
    None
}

/// Ports as rules and `check` print them: "all ports" or "ports 443,8000-8100".
#[must_use]
pub fn ports_text(ports: &[PortSpan]) -> String {
    if ports.is_empty() {
        return "all ports".to_string();
    }
    let p: Vec<String> = ports
        .iter()
        .map(|p| {
            if p.lo == p.hi {
                p.lo.to_string()
            } else {
                format!("{}-{}", p.lo, p.hi)
            }
        })
        .collect();
    format!("ports {}", p.join(","))
}

fn push_ranges(ranges: &mut Vec<PortRange>, ports: &[PortSpan], proto: Proto, rule_id: u32) {
    let protos = proto_bits(proto);
    if ports.is_empty() {
        ranges.push(PortRange {
            lo: 0,
            hi: u16::MAX,
            protos,
            _pad: [0; 3],
            rule_id,
        });
    }
    for p in ports {
        ranges.push(PortRange {
            lo: p.lo,
            hi: p.hi,
            protos,
            _pad: [0; 3],
            rule_id,
        });
    }
}

/// Compiles a validated config into map entries.
///
/// # Errors
/// A prefix whose rules (its own and those of every shorter prefix covering it) need more
/// than [`MAX_RANGES`] distinct port ranges.
pub fn compile(cfg: &Config) -> Result<Compiled, CompileError> {
    compile_with(cfg, &[])
}

/// [`compile`], with the addresses DNS answers gave for host rules. An answer the
/// rebinding guard refuses is left out.
///
/// # Errors
/// As [`compile`].
pub fn compile_with(cfg: &Config, learned: &[Learned]) -> Result<Compiled, CompileError> {
    let mut out = Compiled::default();
    let file = cfg.path.display().to_string();
    let add_rule = |rules: &mut Vec<RuleInfo>, text: String| -> u32 {
        let id = u32::try_from(rules.len() + 1).expect("fewer than 2^32 rules");
        rules.push(RuleInfo { id, text });
        id
    };

    // Baseline: the first entry to name a prefix keeps it.
    let mut seen: HashMap<([u8; 16], u8), ()> = HashMap::new();
    for b in &cfg.baseline {
        let where_ = if b.loc.line == 0 {
            "built-in default".to_string()
        } else {
            format!("{file}:{}", b.loc.line)
        };
        let id = add_rule(
            &mut out.rules,
            format!("baseline deny {} ({where_})", b.text),
        );
        let (kind, nets): (u8, &[IpNet]) = match &b.item {
            BaselineItem::Set { name, nets } if name == "metadata" => {
                (ENTRY_BASELINE_METADATA, nets)
            }
            BaselineItem::Set { nets, .. } => (ENTRY_BASELINE_DENY, nets),
            BaselineItem::Cidr(n) => (ENTRY_BASELINE_DENY, std::slice::from_ref(n)),
        };
        for n in nets {
            let (addr, plen) = net16(n);
            if seen.insert((addr, plen), ()).is_none() {
                out.lpm.push(LpmEntry {
                    scope: SCOPE_BASELINE,
                    addr,
                    plen,
                    entry: deny_entry(kind, id),
                });
            }
        }
    }
    // An IPv6 baseline prefix such as ::/0 denies IPv6, not IPv4: a hole at the mapped
    // range (unless the baseline names that range itself).
    if seen.keys().any(covers_mapped) && seen.insert(MAPPED, ()).is_none() {
        out.lpm.push(LpmEntry {
            scope: SCOPE_BASELINE,
            addr: MAPPED.0,
            plen: MAPPED.1,
            entry: deny_entry(ENTRY_HOLE, 0),
        });
    }
    for (scope, kind, nets) in [
        (SCOPE_INTERNAL, ENTRY_INTERNAL, sets::internal()),
        (SCOPE_METADATA, ENTRY_METADATA_CLASS, sets::metadata()),
    ] {
        let mut seen: HashMap<Prefix, ()> = HashMap::new();
        for n in nets {
            let (addr, plen) = net16(n);
            if seen.insert((addr, plen), ()).is_some() {
                continue;
            }
            out.lpm.push(LpmEntry {
                scope,
                addr,
                plen,
                entry: deny_entry(kind, 0),
            });
        }
    }

    for w in &cfg.workloads {
        let wid = w.id;
        // Own ranges per prefix, in rule order.
        let mut own: HashMap<([u8; 16], u8), Vec<PortRange>> = HashMap::new();
        for a in &w.allow {
            let id = add_rule(
                &mut out.rules,
                format!(
                    "workload {} allow {} {} {} ({file}:{})",
                    w.name,
                    a.net,
                    ports_text(&a.ports),
                    proto_text(a.proto),
                    a.loc.line
                ),
            );
            push_ranges(own.entry(net16(&a.net)).or_default(), &a.ports, a.proto, id);
        }
        if let Some(proxy) = cfg.dns.proxy {
            let id = add_rule(
                &mut out.rules,
                format!(
                    "workload {} allow the DNS proxy {proxy} ([dns] proxy)",
                    w.name
                ),
            );
            let span = [PortSpan {
                lo: proxy.port(),
                hi: proxy.port(),
            }];
            let net = IpNet::from(proxy.ip().to_canonical());
            push_ranges(own.entry(net16(&net)).or_default(), &span, Proto::Any, id);
        }
        // Exact keys a static rule makes: a learned answer for one of them never expires it.
        let static_exact: std::collections::HashSet<([u8; 16], u8)> =
            own.keys().filter(|k| k.1 == 128).copied().collect();
        let mut learned_until: HashMap<([u8; 16], u8), u64> = HashMap::new();
        for l in learned.iter().filter(|l| l.workload == w.name) {
            for h in w.hosts.iter().filter(|h| h.pattern.matches(&l.name)) {
                if refusal(cfg, h, l.addr).is_some() {
                    continue;
                }
                let net = IpNet::from(l.addr.to_canonical());
                let until = learned_until.entry(net16(&net)).or_default();
                *until = (*until).max(l.expires_unix);
                let id = add_rule(
                    &mut out.rules,
                    format!(
                        "workload {} allow host {}: {} = {} (DNS answer via the {}) {} {} ({file}:{})",
                        w.name,
                        h.pattern,
                        l.name,
                        net.addr(),
                        l.source,
                        ports_text(&h.ports),
                        proto_text(h.proto),
                        h.loc.line
                    ),
                );
                push_ranges(own.entry(net16(&net)).or_default(), &h.ports, h.proto, id);
            }
        }
        // IPv6 prefixes never cover IPv4 destinations: below one that would, a hole.
        if own.keys().any(covers_mapped) {
            own.entry(MAPPED).or_default();
        }
        // Flatten: a longest-prefix match must carry every covering prefix's ranges
        // (inside the mapped range, only those of prefixes inside it too).
        // Sorted by (address, length), each prefix follows all prefixes that contain it.
        let mut keys: Vec<([u8; 16], u8)> = own.keys().copied().collect();
        keys.sort_unstable();
        let mut stack: Vec<(Prefix, Vec<PortRange>)> = Vec::new();
        for k in keys {
            while stack.last().is_some_and(|(top, _)| !contains(top, &k)) {
                stack.pop();
            }
            let mut ranges = own[&k].clone();
            if let Some((top, inherited)) = stack.last() {
                if !(contains(&MAPPED, &k) && covers_mapped(top)) {
                    ranges.extend_from_slice(inherited);
                }
            }
            dedupe(&mut ranges);
            if ranges.len() > MAX_RANGES {
                coalesce(&mut ranges);
                dedupe(&mut ranges);
            }
            if ranges.len() > MAX_RANGES {
                let net = IpNet::new(
                    display_addr(k.0),
                    if display_addr(k.0).is_ipv4() {
                        k.1 - 96
                    } else {
                        k.1
                    },
                )
                .map_or_else(|_| "?".into(), |n| n.to_string());
                return Err(CompileError(format!(
                    "{file}: workload {:?}: destination {net} is covered by {} distinct port ranges (its own rules and those of wider CIDRs); at most {MAX_RANGES} fit: merge ports into ranges such as \"8000-8100\"",
                    w.name,
                    ranges.len()
                )));
            }
            let mut entry = deny_entry(
                if ranges.is_empty() {
                    ENTRY_HOLE
                } else {
                    ENTRY_ALLOW
                },
                0,
            );
            entry.n_ranges = ranges.len() as u8;
            entry.ranges[..ranges.len()].copy_from_slice(&ranges);
            if k.1 == 128 {
                let expires_unix = (!static_exact.contains(&k))
                    .then(|| learned_until.get(&k).copied())
                    .flatten();
                if expires_unix.is_some() {
                    entry.flags |= mcp_guard_common::ENTRY_F_EXPIRES;
                }
                out.exact.push(ExactEntry {
                    scope: wid,
                    addr: k.0,
                    entry,
                    expires_unix,
                });
            } else {
                out.lpm.push(LpmEntry {
                    scope: wid,
                    addr: k.0,
                    plen: k.1,
                    entry,
                });
            }
            stack.push((k, ranges));
        }
        out.workloads.push(CompiledWorkload {
            id: wid,
            name: w.name.clone(),
            cgroup: w.cgroup.clone(),
            default: match w.default {
                DefaultAction::DenyInternal => DEFAULT_DENY_INTERNAL,
                DefaultAction::Deny => DEFAULT_DENY,
                DefaultAction::Allow => DEFAULT_ALLOW,
            },
            mode: match w.mode {
                Mode::Enforce => MODE_ENFORCE,
                Mode::Audit => MODE_AUDIT,
            },
            rules: w.allow.len() + w.hosts.len(),
            flags: (if w.deny_raw_sockets {
                mcp_guard_common::WL_DENY_RAW
            } else {
                0
            }) | (if w.deny_packet_sockets {
                mcp_guard_common::WL_DENY_PACKET
            } else {
                0
            }) | (if w.deny_direct_dns {
                mcp_guard_common::WL_DENY_DIRECT_DNS
            } else {
                0
            }) | (if w.allow_ping {
                0
            } else {
                mcp_guard_common::WL_DENY_PING
            }) | (if w.allow_other_protocols {
                0
            } else {
                mcp_guard_common::WL_DENY_OTHER_PROTO
            }),
        });
    }
    Ok(out)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Deny,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub verdict: Verdict,
    /// Set when denied.
    pub reason: Option<u8>,
    /// The rule that decided; 0 when the workload's default decided.
    pub rule_id: u32,
}

/// Socket protocol as the kernel programs classify it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowProto {
    Tcp,
    Udp,
    Other,
}

impl FlowProto {
    fn bit(self) -> u8 {
        match self {
            Self::Tcp => PROTO_TCP,
            Self::Udp => PROTO_UDP,
            Self::Other => PROTO_OTHER,
        }
    }
}

/// Decides over the compiled entries exactly as `mcp-guard-ebpf/src/decide.rs` does.
pub struct Evaluator<'a> {
    compiled: &'a Compiled,
    lpm: HashMap<(u32, u8, [u8; 16]), usize>,
    /// Prefix lengths present per scope, longest first.
    plens: HashMap<u32, Vec<u8>>,
    exact: HashMap<(u32, [u8; 16]), usize>,
}

impl<'a> Evaluator<'a> {
    #[must_use]
    pub fn new(compiled: &'a Compiled) -> Self {
        let mut lpm = HashMap::new();
        let mut plens: HashMap<u32, Vec<u8>> = HashMap::new();
        for (i, e) in compiled.lpm.iter().enumerate() {
            lpm.insert((e.scope, e.plen, e.addr), i);
            plens.entry(e.scope).or_default().push(e.plen);
        }
        for v in plens.values_mut() {
            v.sort_unstable_by(|a, b| b.cmp(a));
            v.dedup();
        }
        let exact = compiled
            .exact
            .iter()
            .enumerate()
            .map(|(i, e)| ((e.scope, e.addr), i))
            .collect();
        Self {
            compiled,
            lpm,
            plens,
            exact,
        }
    }

    fn lookup_lpm(&self, scope: u32, addr: &[u8; 16]) -> Option<&'a PolicyEntry> {
        let plens = self.plens.get(&scope)?;
        plens.iter().find_map(|&p| {
            self.lpm
                .get(&(scope, p, mask(addr, p)))
                .map(|&i| &self.compiled.lpm[i].entry)
        })
    }

    #[must_use]
    pub fn workload(&self, name: &str) -> Option<&'a CompiledWorkload> {
        self.compiled.workloads.iter().find(|w| w.name == name)
    }

    /// The verdict for one destination of one workload (mode aside: audit mode reports
    /// the same decision and lets the flow through).
    #[must_use]
    pub fn decide(
        &self,
        wl: &CompiledWorkload,
        ip: IpAddr,
        port: u16,
        proto: FlowProto,
    ) -> Decision {
        let addr = judged16(ip);
        if let Some(e) = self
            .lookup_lpm(SCOPE_BASELINE, &addr)
            .filter(|e| e.kind != ENTRY_HOLE)
        {
            let reason = if e.kind == ENTRY_BASELINE_METADATA {
                REASON_BASELINE_METADATA
            } else {
                REASON_BASELINE_DENY
            };
            return Decision {
                verdict: Verdict::Deny,
                reason: Some(reason),
                rule_id: e.rule_id,
            };
        }
        let entry = self
            .exact
            .get(&(wl.id, addr))
            .map(|&i| &self.compiled.exact[i].entry)
            .or_else(|| self.lookup_lpm(wl.id, &addr))
            .filter(|e| e.kind != ENTRY_HOLE);
        if let Some(e) = entry {
            if let Some(r) = e.ranges[..usize::from(e.n_ranges)]
                .iter()
                .find(|r| r.protos & proto.bit() != 0 && (r.lo..=r.hi).contains(&port))
            {
                return Decision {
                    verdict: Verdict::Allow,
                    reason: None,
                    rule_id: r.rule_id,
                };
            }
        }
        if wl.flags & mcp_guard_common::WL_DENY_DIRECT_DNS != 0
            && proto != FlowProto::Other
            && mcp_guard_common::is_dns_port(port)
        {
            return Decision {
                verdict: Verdict::Deny,
                reason: Some(REASON_NOT_ALLOWED),
                rule_id: 0,
            };
        }
        let refused = match wl.default {
            DEFAULT_ALLOW => {
                return Decision {
                    verdict: Verdict::Allow,
                    reason: None,
                    rule_id: 0,
                }
            }
            DEFAULT_DENY => REASON_DEFAULT_DENY,
            _ => {
                if self.lookup_lpm(SCOPE_INTERNAL, &addr).is_none() {
                    return Decision {
                        verdict: Verdict::Allow,
                        reason: None,
                        rule_id: 0,
                    };
                }
                REASON_DENY_INTERNAL
            }
        };
        let reason = if entry.is_some() {
            REASON_NOT_ALLOWED
        } else {
            refused
        };
        Decision {
            verdict: Verdict::Deny,
            reason: Some(reason),
            rule_id: 0,
        }
    }

    #[must_use]
    pub fn rule_text(&self, id: u32) -> Option<&'a str> {
        id.checked_sub(1)
            .and_then(|i| self.compiled.rules.get(i as usize))
            .map(|r| r.text.as_str())
    }
}

/// The one decoder of reason bytes lives with the layouts.
pub use mcp_guard_common::reason_name;

#[cfg(test)]
mod tests {
    use std::path::Path;

    use proptest::prelude::*;

    /// IPv6 prefixes never cover IPv4 destinations (stored mapped) unless they lie in
    /// ::ffff:0:0/96; NAT64 destinations are judged by the IPv4 address they carry,
    /// everywhere: workload rules, internal ranges, baseline, rebinding guard.
    #[test]
    fn ipv6_prefixes_and_nat64_are_judged_by_family() {
        use crate::config::parse;
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let cfg = parse(
            Path::new("t.toml"),
            "[baseline]\ndeny=['metadata','::/8']\n\
             [[workload]]\nname='v6'\ncgroup='/v6'\ndefault='deny'\n[[workload.allow]]\ncidr='::/0'\n[[workload.allow]]\ncidr='10.0.12.0/24'\nports=[5432]\n\
             [[workload]]\nname='v4all'\ncgroup='/v4all'\ndefault='deny'\n[[workload.allow]]\ncidr='::ffff:0:0/96'\nports=[443]\n\
             [[workload]]\nname='di'\ncgroup='/di'\ndefault='deny-internal'\n[[workload.allow]]\ncidr='64:ff9b::a00:d00/120'\nports=[5432]\n\
             [[workload]]\nname='open'\ncgroup='/open'\ndefault='allow'\n[[workload.allow]]\nhost='db.example.com'\n",
        )
        .unwrap();
        let c = compile(&cfg).unwrap();
        let ev = Evaluator::new(&c);
        let v = |w: &str, a: &str, port: u16| {
            ev.decide(ev.workload(w).unwrap(), ip(a), port, FlowProto::Tcp)
        };
        // allow ::/0 allows IPv6 only; the IPv4 rule keeps working below the hole.
        assert_eq!(v("v6", "2606:4700::1", 443).verdict, Verdict::Allow);
        let d = v("v6", "10.1.2.3", 443);
        assert_eq!(
            (d.verdict, d.reason),
            (Verdict::Deny, Some(REASON_DEFAULT_DENY))
        );
        assert_eq!(v("v6", "93.184.216.34", 443).verdict, Verdict::Deny);
        assert_eq!(
            v("v6", "::ffff:10.1.2.3", 443).verdict,
            Verdict::Deny,
            "mapped is IPv4"
        );
        assert_eq!(v("v6", "10.0.12.7", 5432).verdict, Verdict::Allow);
        assert_eq!(v("v6", "10.0.12.7", 80).verdict, Verdict::Deny);
        // The baseline's ::/8 denies IPv6 in it, never IPv4.
        assert_eq!(v("open", "93.184.216.34", 443).verdict, Verdict::Allow);
        assert_eq!(v("open", "::1", 443).reason, Some(REASON_BASELINE_DENY));
        assert_eq!(
            v("open", "169.254.169.254", 80).reason,
            Some(REASON_BASELINE_METADATA)
        );
        // The mapped range itself is every IPv4 address.
        assert_eq!(v("v4all", "93.184.216.34", 443).verdict, Verdict::Allow);
        assert_eq!(v("v4all", "2606:4700::1", 443).verdict, Verdict::Deny);
        // NAT64: internal, metadata and allowed exactly as the IPv4 address inside.
        assert_eq!(
            v("di", "64:ff9b::a00:e05", 443).reason,
            Some(REASON_DENY_INTERNAL)
        );
        assert_eq!(
            v("di", "64:ff9b::a00:d05", 443).reason,
            Some(REASON_NOT_ALLOWED)
        );
        assert_eq!(v("di", "64:ff9b::a00:d05", 5432).verdict, Verdict::Allow);
        assert_eq!(
            v("di", "10.0.13.5", 5432).verdict,
            Verdict::Allow,
            "the NAT64 rule is the IPv4 rule"
        );
        assert_eq!(
            v("di", "64:ff9b::5db8:d822", 443).verdict,
            Verdict::Allow,
            "public inside"
        );
        assert_eq!(
            v("open", "64:ff9b::a9fe:a9fe", 80).reason,
            Some(REASON_BASELINE_METADATA)
        );
        let db = &cfg.workloads[3].hosts[0];
        assert_eq!(
            refusal(&cfg, db, ip("64:ff9b::a00:d05")),
            Some("rebound-internal")
        );
        assert_eq!(refusal(&cfg, db, ip("64:ff9b::5db8:d822")), None);
        // A baseline ::/8 does not make IPv4 answers "baseline".
        assert_eq!(refusal(&cfg, db, ip("93.184.216.34")), None);
        assert_eq!(refusal(&cfg, db, ip("::2")), Some("rebound-baseline"));
        // A learned NAT64 answer allows the IPv4 address it carries, and its NAT64 form.
        let learned = Learned {
            workload: "open".into(),
            name: "db.example.com".into(),
            addr: ip("64:ff9b::5db8:d822"),
            ttl: 60,
            expires_unix: u64::MAX,
            source: "proxy".into(),
        };
        let c = compile_with(&cfg, &[learned]).unwrap();
        assert!(c
            .exact
            .iter()
            .any(|e| display_addr(e.addr) == ip("93.184.216.34")));
    }

    #[test]
    fn rebinding_guard_and_learned_allows() {
        use crate::config::parse;
        let cfg = parse(
            Path::new("t.toml"),
            "[baseline]\ndeny=['metadata','192.0.2.0/24']\n[[workload]]\nname='w'\ncgroup='/w'\ndefault='deny'\n[[workload.allow]]\nhost='api.example.com'\nports=[443]\nproto='tcp'\n[[workload.allow]]\nhost='db.example.com'\nallow_internal=true\n",
        )
        .unwrap();
        let (api, db) = (&cfg.workloads[0].hosts[0], &cfg.workloads[0].hosts[1]);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(refusal(&cfg, api, ip("93.184.216.34")), None);
        assert_eq!(
            refusal(&cfg, api, ip("169.254.169.254")),
            Some("rebound-metadata")
        );
        assert_eq!(
            refusal(&cfg, db, ip("::ffff:169.254.169.254")),
            Some("rebound-metadata")
        );
        assert_eq!(
            refusal(&cfg, db, ip("64:ff9b::a9fe:a9fe")),
            Some("rebound-metadata")
        );
        assert_eq!(refusal(&cfg, db, ip("192.0.2.9")), Some("rebound-baseline"));
        assert_eq!(refusal(&cfg, api, ip("10.1.2.3")), Some("rebound-internal"));
        assert_eq!(refusal(&cfg, api, ip("::1")), Some("rebound-internal"));
        assert_eq!(refusal(&cfg, db, ip("10.1.2.3")), None);
        let learned = |name: &str, addr: &str| Learned {
            workload: "w".into(),
            name: name.into(),
            addr: ip(addr),
            ttl: 60,
            expires_unix: u64::MAX,
            source: "resolver".into(),
        };
        let c = compile_with(
            &cfg,
            &[
                learned("api.example.com", "93.184.216.34"),
                learned("api.example.com", "10.9.9.9"),
                learned("api.example.com", "169.254.169.254"),
                learned("db.example.com", "10.0.12.5"),
                learned("other.example.com", "93.184.216.35"),
            ],
        )
        .unwrap();
        // Learned-only exact entries carry their expiry, for the kernel to compare.
        let exact_of = |a: &str| {
            c.exact
                .iter()
                .find(|e| e.addr == addr16(ip(a)))
                .expect("exact entry")
        };
        assert_eq!(exact_of("93.184.216.34").expires_unix, Some(u64::MAX));
        assert_ne!(
            exact_of("93.184.216.34").entry.flags & mcp_guard_common::ENTRY_F_EXPIRES,
            0
        );
        let ev = Evaluator::new(&c);
        let w = ev.workload("w").unwrap();
        let d = ev.decide(w, ip("93.184.216.34"), 443, FlowProto::Tcp);
        assert_eq!(d.verdict, Verdict::Allow);
        assert!(ev
            .rule_text(d.rule_id)
            .unwrap()
            .contains("api.example.com = 93.184.216.34"));
        assert_eq!(
            ev.decide(w, ip("93.184.216.34"), 80, FlowProto::Tcp)
                .verdict,
            Verdict::Deny
        );
        assert_eq!(
            ev.decide(w, ip("10.9.9.9"), 443, FlowProto::Tcp).verdict,
            Verdict::Deny
        );
        assert_eq!(
            ev.decide(w, ip("169.254.169.254"), 443, FlowProto::Tcp)
                .verdict,
            Verdict::Deny
        );
        assert_eq!(
            ev.decide(w, ip("10.0.12.5"), 5432, FlowProto::Tcp).verdict,
            Verdict::Allow
        );
        assert_eq!(
            ev.decide(w, ip("93.184.216.35"), 443, FlowProto::Tcp)
                .verdict,
            Verdict::Deny
        );
    }

    use super::*;
    use crate::config::parse;

    fn compile_str(t: &str) -> Compiled {
        compile(&parse(Path::new("t.toml"), t).unwrap()).unwrap()
    }

    fn decide(c: &Compiled, wl: &str, ip: &str, port: u16, proto: FlowProto) -> Decision {
        let ev = Evaluator::new(c);
        ev.decide(ev.workload(wl).unwrap(), ip.parse().unwrap(), port, proto)
    }

    const CFG: &str = r#"
[baseline]
deny = ["metadata", "198.51.100.0/24"]
[[workload]]
name = "gh"
cgroup = "/gh"
default = "deny-internal"
[[workload.allow]]
cidr = "10.0.12.0/24"
ports = [5432]
proto = "tcp"
[[workload.allow]]
cidr = "10.0.0.0/8"
ports = ["8000-8100"]
[[workload.allow]]
cidr = "169.254.169.254/32"
[[workload]]
name = "strict"
cgroup = "/strict"
default = "deny"
[[workload.allow]]
cidr = "93.184.216.34"
ports = [443]
[[workload]]
name = "open"
cgroup = "/open"
default = "allow"
"#;

    #[test]
    fn golden_decisions() {
        let c = compile_str(CFG);
        use FlowProto::{Tcp, Udp};
        let d = |w, ip, port, p| decide(&c, w, ip, port, p);
        // Baseline beats a workload allow of the metadata address.
        assert_eq!(
            d("gh", "169.254.169.254", 80, Tcp).reason,
            Some(REASON_BASELINE_METADATA)
        );
        assert_eq!(
            d("gh", "::ffff:169.254.169.254", 80, Tcp).reason,
            Some(REASON_BASELINE_METADATA)
        );
        assert_eq!(
            d("gh", "fd00:ec2::254", 80, Tcp).reason,
            Some(REASON_BASELINE_METADATA)
        );
        assert_eq!(
            d("open", "169.254.170.2", 80, Tcp).reason,
            Some(REASON_BASELINE_METADATA)
        );
        assert_eq!(
            d("open", "198.51.100.7", 80, Tcp).reason,
            Some(REASON_BASELINE_DENY)
        );
        // Allowed CIDR and port; the /24 rule inherits the /8's port range.
        assert_eq!(d("gh", "10.0.12.5", 5432, Tcp).verdict, Verdict::Allow);
        assert_eq!(d("gh", "10.0.12.5", 8080, Udp).verdict, Verdict::Allow);
        assert_eq!(d("gh", "10.9.9.9", 8080, Tcp).verdict, Verdict::Allow);
        // Wrong port / proto on an allowed address, internal: refused.
        assert_eq!(
            d("gh", "10.0.12.5", 5433, Tcp).reason,
            Some(REASON_NOT_ALLOWED)
        );
        assert_eq!(
            d("gh", "10.0.12.5", 5432, Udp).reason,
            Some(REASON_NOT_ALLOWED)
        );
        // Internal, no rule.
        assert_eq!(
            d("gh", "192.168.1.1", 80, Tcp).reason,
            Some(REASON_DENY_INTERNAL)
        );
        assert_eq!(
            d("gh", "127.0.0.1", 80, Tcp).reason,
            Some(REASON_DENY_INTERNAL)
        );
        assert_eq!(d("gh", "::ffff:10.1.1.1", 80, Tcp).verdict, Verdict::Deny);
        assert_eq!(
            d("gh", "fe80::1", 80, Tcp).reason,
            Some(REASON_DENY_INTERNAL)
        );
        // Global: allowed under deny-internal.
        assert_eq!(d("gh", "93.184.216.34", 443, Tcp).verdict, Verdict::Allow);
        assert_eq!(d("gh", "2606:4700::1", 443, Tcp).verdict, Verdict::Allow);
        // deny: only the allowed host and port.
        assert_eq!(
            d("strict", "93.184.216.34", 443, Tcp).verdict,
            Verdict::Allow
        );
        assert_eq!(
            d("strict", "93.184.216.34", 80, Tcp).reason,
            Some(REASON_NOT_ALLOWED)
        );
        assert_eq!(
            d("strict", "1.1.1.1", 443, Tcp).reason,
            Some(REASON_DEFAULT_DENY)
        );
        assert_eq!(d("open", "10.0.0.1", 22, Tcp).verdict, Verdict::Allow);
    }

    #[test]
    fn decided_rule_is_reported() {
        let c = compile_str(CFG);
        let ev = Evaluator::new(&c);
        let d = decide(&c, "gh", "10.0.12.5", 5432, FlowProto::Tcp);
        assert!(ev
            .rule_text(d.rule_id)
            .unwrap()
            .contains("10.0.12.0/24 ports 5432 tcp (t.toml:9)"));
        let d = decide(&c, "gh", "169.254.169.254", 80, FlowProto::Tcp);
        assert!(ev
            .rule_text(d.rule_id)
            .unwrap()
            .contains("baseline deny metadata"));
    }

    #[test]
    fn too_many_ranges_is_a_clear_error() {
        let mut t = String::from(
            "[[workload]]\nname='a'\ncgroup='/a'\n[[workload.allow]]\ncidr='10.0.0.0/8'\nports=[",
        );
        let ports: Vec<String> = (0..20).map(|i| (1000 + i * 10).to_string()).collect();
        t.push_str(&ports.join(","));
        t.push_str("]\n");
        let e = compile(&parse(Path::new("t.toml"), &t).unwrap()).unwrap_err();
        assert!(e.0.contains("10.0.0.0/8") && e.0.contains("at most"), "{e}");
    }

    /// Reference semantics straight from the config, independent of the compiler.
    fn reference(cfg: &Config, w: usize, ip: IpAddr, port: u16, proto: FlowProto) -> Verdict {
        let inb = |n: &IpNet| match (n, ip) {
            (IpNet::V4(n), IpAddr::V4(a)) => n.contains(&a),
            (IpNet::V6(n), IpAddr::V6(a)) => n.contains(&a),
            _ => false,
        };
        for b in &cfg.baseline {
            let nets: Vec<IpNet> = match &b.item {
                BaselineItem::Set { nets, .. } => nets.clone(),
                BaselineItem::Cidr(n) => vec![*n],
            };
            if nets.iter().any(inb) {
                return Verdict::Deny;
            }
        }
        let wl = &cfg.workloads[w];
        for a in &wl.allow {
            let proto_ok = match a.proto {
                Proto::Any => true,
                Proto::Tcp => proto == FlowProto::Tcp,
                Proto::Udp => proto == FlowProto::Udp,
            };
            let port_ok =
                a.ports.is_empty() || a.ports.iter().any(|p| (p.lo..=p.hi).contains(&port));
            if inb(&a.net) && proto_ok && port_ok {
                return Verdict::Allow;
            }
        }
        match wl.default {
            DefaultAction::Allow => Verdict::Allow,
            DefaultAction::Deny => Verdict::Deny,
            DefaultAction::DenyInternal => {
                if sets::internal().iter().any(inb) {
                    Verdict::Deny
                } else {
                    Verdict::Allow
                }
            }
        }
    }

    fn arb_v4() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            any::<u32>().prop_map(|x| IpAddr::from(x.to_be_bytes())),
            (0u8..4, any::<u16>()).prop_map(|(b, x)| IpAddr::from([
                10,
                b,
                (x >> 8) as u8,
                x as u8
            ])),
            Just("169.254.169.254".parse().unwrap()),
        ]
    }

    proptest! {
        /// The compiled entries decide exactly as the rules read literally.
        #[test]
        fn compiled_matches_reference(
            rules in prop::collection::vec((0u8..4, any::<u16>(), 8u8..=32, prop::option::of((1u16..200, 0u16..50)), 0u8..3), 0..12),
            default in 0u8..3,
            probes in prop::collection::vec((arb_v4(), 1u16..260, any::<bool>()), 64),
        ) {
            let mut t = format!("[[workload]]\nname='w'\ncgroup='/w'\ndefault='{}'\n", ["deny-internal","deny","allow"][default as usize]);
            for (b, x, plen, ports, proto) in &rules {
                let net = IpNet::new(IpAddr::from([10, *b, (x >> 8) as u8, *x as u8]), *plen).unwrap().trunc();
                t.push_str(&format!("[[workload.allow]]\ncidr='{net}'\nproto='{}'\n", ["tcp","udp","any"][*proto as usize]));
                if let Some((lo, len)) = ports { t.push_str(&format!("ports=['{}-{}']\n", lo, lo + len)); }
            }
            let cfg = parse(Path::new("p.toml"), &t).unwrap();
            let Ok(c) = compile(&cfg) else { return Ok(()) };
            let ev = Evaluator::new(&c);
            for (ip, port, tcp) in probes {
                let p = if tcp { FlowProto::Tcp } else { FlowProto::Udp };
                let got = ev.decide(&c.workloads[0], ip, port, p).verdict;
                prop_assert_eq!(got, reference(&cfg, 0, ip, port, p), "{} {}:{} {:?}\n{}", t, ip, port, p, "");
            }
        }
    }

    #[test]
    fn a_static_exact_rule_never_expires_with_a_learned_answer() {
        let cfg = crate::config::parse(
            Path::new("t.toml"),
            "[[workload]]\nname='w'\ncgroup='/w'\ndefault='deny'\n[[workload.allow]]\nhost='api.example.com'\nports=[443]\n[[workload.allow]]\ncidr='93.184.216.34/32'\nports=[80]\n",
        )
        .unwrap();
        let learned = Learned {
            workload: "w".into(),
            name: "api.example.com".into(),
            addr: "93.184.216.34".parse().unwrap(),
            ttl: 60,
            expires_unix: 1000,
            source: "resolver".into(),
        };
        let c = compile_with(&cfg, &[learned]).unwrap();
        let e = c
            .exact
            .iter()
            .find(|e| e.addr == addr16("93.184.216.34".parse().unwrap()))
            .expect("exact entry");
        assert_eq!(e.expires_unix, None);
        assert_eq!(e.entry.flags & mcp_guard_common::ENTRY_F_EXPIRES, 0);
        assert_eq!(e.entry.n_ranges, 2, "both rules' ports");
    }
}
