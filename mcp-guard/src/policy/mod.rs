//! The policy compiler: a pure function from a validated [`Config`] to the exact map
//! entries the kernel gets, and an evaluator that decides over those same entries the
//! way the kernel programs do. `explain` and the differential test use the evaluator.

use std::{
    collections::HashMap,
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
    /// The built-in pending workload (see [`crate::config::Workload::pending`]).
    pub pending: bool,
    /// `None` for a workload that selects pods: its cgroups come from the runtime.
    pub cgroup: Option<String>,
    pub pods: Option<crate::config::pods::PodSelector>,
    pub default: u8,
    pub mode: u8,
    pub rules: usize,
    /// `WL_DENY_RAW` | `WL_DENY_PACKET` | `WL_DENY_DIRECT_DNS` | ... | `WL_MCP`.
    pub flags: u8,
    /// The `tools` lists of its rules: tool set `i + 1` (the `toolset` of a port range,
    /// bit `i` of an MCP instance's active mask) is `toolsets[i]`.
    pub toolsets: Vec<Vec<String>>,
}

impl Compiled {
    /// Whether this policy fits the kernel maps (one policy slot: half of each map).
    ///
    /// # Errors
    /// Which map overflows, with the count and the limit.
    pub fn fits_the_maps(&self) -> Result<(), String> {
        let check = |what: &str, n: usize, max: u32| {
            let limit = (max / 2) as usize;
            if n > limit {
                Err(format!("the policy needs {n} {what} entries, the kernel map holds {limit} per policy (half of {max}: a reload writes the other half while this one decides): use fewer or wider prefixes, or split the workloads over several nodes' configs"))
            } else {
                Ok(())
            }
        };
        check("prefix", self.lpm.len(), mcp_guard_common::POLICY_LPM_MAX)?;
        check("AF_UNIX", self.unix.len(), mcp_guard_common::UNIX_RULES_MAX)?;
        check(
            "exact-address",
            self.exact.len(),
            mcp_guard_common::POLICY_EXACT_MAX,
        )
    }
}

impl CompiledWorkload {
    /// The active mask the kernel needs for an MCP instance of this workload while calls
    /// of `tools` are in flight (`in_call`: at least one call is): bit `i` for every tool
    /// set naming one of them, [`mcp_guard_common::MCP_IN_CALL`] for any call.
    #[must_use]
    pub fn mcp_mask<'t>(
        &self,
        tools: impl IntoIterator<Item = &'t str> + Clone,
        in_call: bool,
    ) -> u64 {
        let mut mask = if in_call {
            mcp_guard_common::MCP_IN_CALL
        } else {
            0
        };
        for (i, set) in self.toolsets.iter().enumerate() {
            if tools
                .clone()
                .into_iter()
                .any(|t| set.iter().any(|s| s == t))
            {
                mask |= 1 << i;
            }
        }
        mask
    }
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
    /// AF_UNIX destinations of every workload.
    pub unix: Vec<unix::UnixEntry>,
}

/// A valid config the kernel's entry layout cannot hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompileError {
    #[error("{file}: workload {workload:?}: {count} distinct `tools` lists; at most {max} fit", max = mcp_guard_common::MAX_TOOLSETS)]
    TooManyToolsets {
        file: String,
        workload: String,
        count: usize,
    },
    #[error("{file}: workload {workload:?}: destination {net} is covered by {count} distinct port ranges (its own rules and those of wider CIDRs); at most {MAX_RANGES} fit: merge ports into ranges such as \"8000-8100\"")]
    TooManyRanges {
        file: String,
        workload: String,
        net: String,
        count: usize,
    },
}

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
        // Tool sets: each distinct `tools` list, in sorted order, numbered from 1 (the
        // config check keeps them within MAX_TOOLSETS).
        let toolsets: Vec<Vec<String>> = w
            .allow
            .iter()
            .map(|r| &r.tools)
            .chain(w.hosts.iter().map(|r| &r.tools))
            .filter(|t| !t.is_empty())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .cloned()
            .collect();
        if toolsets.len() > mcp_guard_common::MAX_TOOLSETS {
            return Err(CompileError::TooManyToolsets {
                file: file.to_string(),
                workload: w.name.clone(),
                count: toolsets.len(),
            });
        }
        let toolset_of = |tools: &Vec<String>| -> u8 {
            if tools.is_empty() {
                0
            } else {
                toolsets
                    .iter()
                    .position(|t| t == tools)
                    .map_or(0, |i| i as u8 + 1)
            }
        };
        // Own ranges per prefix, in rule order.
        let mut own: HashMap<([u8; 16], u8), Vec<PortRange>> = HashMap::new();
        // Rules that wait for approval are dormant: only their grants (below) open them.
        for a in w.allow.iter().filter(|a| a.approval.is_none()) {
            let id = add_rule(
                &mut out.rules,
                format!(
                    "workload {} allow {} {} {}{} ({file}:{})",
                    w.name,
                    a.net,
                    ports_text(&a.ports),
                    proto_text(a.proto),
                    tools_text(&a.tools),
                    a.loc.line
                ),
            );
            push_ranges(
                own.entry(net16(&a.net)).or_default(),
                &a.ports,
                a.proto,
                toolset_of(&a.tools),
                id,
            );
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
            push_ranges(
                own.entry(net16(&net)).or_default(),
                &span,
                Proto::Any,
                0,
                id,
            );
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
                        "workload {} allow host {}: {} = {} (DNS answer via the {}) {} {}{} ({file}:{})",
                        w.name,
                        h.pattern,
                        l.name,
                        net.addr(),
                        l.source,
                        ports_text(&h.ports),
                        proto_text(h.proto),
                        tools_text(&h.tools),
                        h.loc.line
                    ),
                );
                push_ranges(
                    own.entry(net16(&net)).or_default(),
                    &h.ports,
                    h.proto,
                    toolset_of(&h.tools),
                    id,
                );
            }
        }
        // Approved grants of rules that wait for approval: each address of the rule, on
        // its ports, until the grant ends (in the kernel, as learned answers expire).
        for l in learned
            .iter()
            .filter(|l| l.workload == w.name && l.source == APPROVAL_SOURCE)
        {
            for a in w.allow.iter().filter(|a| granted_by(a, l)) {
                let net = IpNet::from(l.addr.to_canonical());
                let until = learned_until.entry(net16(&net)).or_default();
                *until = (*until).max(l.expires_unix);
                let id = add_rule(
                    &mut out.rules,
                    format!(
                        "workload {} allow {} {} {}{} (approved: {} until unix {}) ({file}:{})",
                        w.name,
                        net.addr(),
                        ports_text(&a.ports),
                        proto_text(a.proto),
                        tools_text(&a.tools),
                        a.net,
                        l.expires_unix,
                        a.loc.line
                    ),
                );
                push_ranges(
                    own.entry(net16(&net)).or_default(),
                    &a.ports,
                    a.proto,
                    toolset_of(&a.tools),
                    id,
                );
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
                return Err(CompileError::TooManyRanges {
                    file: file.to_string(),
                    workload: w.name.clone(),
                    net,
                    count: ranges.len(),
                });
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
            pending: w.pending,
            cgroup: w.cgroup.clone(),
            pods: w.pods.clone(),
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
            }) | (if w.deny_between_calls {
                mcp_guard_common::WL_DENY_BETWEEN_CALLS
            } else {
                0
            }) | (if w.deny_between_calls || !toolsets.is_empty() {
                mcp_guard_common::WL_MCP
            } else {
                0
            }),
            toolsets,
        });
    }
    out.unix = unix::compile(cfg, &mut out.rules);
    Ok(out)
}

mod approval;
mod eval;
mod ranges;
pub mod unix;
pub use approval::{granted_by, APPROVAL_SOURCE};
pub use eval::{Decision, Evaluator, FlowProto, Verdict};
use ranges::{coalesce, dedupe, push_ranges};
pub use ranges::{ports_text, proto_text, tools_text};

/// The one decoder of reason bytes lives with the layouts.
pub use mcp_guard_common::reason_name;

#[cfg(test)]
mod tests;
