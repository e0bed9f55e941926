//! Configs that parse but do not protect what their author meant: each finding is a
//! warning with file:line and the fix (`check --strict` fails on them), except names
//! with control characters, which are errors.

use std::path::Path;

use ipnet::IpNet;

use super::{BaselineEntry, BaselineItem, DefaultAction, Workload};
use crate::host::cgroup;

/// Cgroups of the machine's own services: a workload holding one guards sshd, the
/// kubelet, the container runtime and mcp-guard itself.
const SYSTEM_CGROUPS: [&str; 4] = ["/", "/system.slice", "/init.scope", "/user.slice"];

/// Whether `cgroup` (a path or pattern) takes in one of [`SYSTEM_CGROUPS`] or a
/// service below `/system.slice`.
fn covers_the_system(cgroup: &str) -> bool {
    if SYSTEM_CGROUPS.contains(&cgroup) {
        return true;
    }
    cgroup::is_pattern(cgroup)
        && [
            "/system.slice",
            "/init.scope",
            "/user.slice",
            "/system.slice/sshd.service",
        ]
        .iter()
        .any(|p| cgroup::path_matches(cgroup, p))
}

fn baseline_covers(baseline: &[BaselineEntry], net: &IpNet) -> Option<String> {
    baseline.iter().find_map(|b| {
        let hit = match &b.item {
            BaselineItem::Set { nets, .. } => nets.iter().any(|n| n.contains(net)),
            BaselineItem::Cidr(n) => n.contains(net),
        };
        hit.then(|| b.text.clone())
    })
}

/// Warnings about `workloads` (in config order) and the DNS proxy address.
pub(super) fn warnings(
    path: &Path,
    baseline: &[BaselineEntry],
    workloads: &[Workload],
    proxy: Option<std::net::SocketAddr>,
) -> Vec<String> {
    let file = path.display();
    let mut out = Vec::new();
    if workloads.is_empty() {
        out.push(format!(
            "{file}: no [[workload]]: this config guards no process (only the baseline is compiled); add a workload with the cgroup or pods of your MCP servers"
        ));
    }
    // Workloads that select cgroups by pattern, in order (the shadowing check looks only
    // at these: a config of 10,000 plain workloads stays linear).
    let patterns: Vec<(usize, &Workload)> = workloads
        .iter()
        .enumerate()
        .filter(|(_, w)| w.cgroup.as_deref().is_some_and(cgroup::is_pattern))
        .collect();
    for (i, w) in workloads.iter().enumerate() {
        let line = w.loc.line;
        if let Some(c) = &w.cgroup {
            if covers_the_system(c) {
                out.push(format!(
                    "{file}:{line}: workload {:?} cgroup {c} takes in the machine's own services (sshd, the kubelet, the container runtime, mcp-guard itself): name the cgroup of your MCP servers, e.g. /mcp.slice or /mcp.slice/*.service",
                    w.name
                ));
            }
            if !cgroup::is_pattern(c) {
                if let Some((_, first)) =
                    patterns.iter().take_while(|(j, _)| *j < i).find(|(_, a)| {
                        a.cgroup
                            .as_deref()
                            .is_some_and(|p| cgroup::path_matches(p, c))
                    })
                {
                    out.push(format!(
                        "{file}:{line}: workload {:?} (cgroup {c}) never applies: workload {:?} on line {} takes that cgroup first with the pattern {} (the first match wins); move this workload above it",
                        w.name,
                        first.name,
                        first.loc.line,
                        first.cgroup.as_deref().unwrap_or_default()
                    ));
                }
            }
        }
        for a in &w.unix.allow {
            let deputy = super::unix_keys::BUILT_IN_DENY
                .iter()
                .filter_map(|p| super::unix_keys::pattern(p).ok())
                .any(|d| a.bytes.starts_with(&d) || d.starts_with(&a.bytes));
            if deputy {
                out.push(format!(
                    "{file}:{}: workload {:?} may reach {} through allow_unix, where a local deputy listens (a container runtime, D-Bus, systemd or the kubelet): a process of the workload can have it start something unguarded; allow it only to a workload that must manage them",
                    a.loc.line, w.name, a.text
                ));
            }
        }
        let mut seen: Vec<(&IpNet, &[super::PortSpan], super::Proto, &[String])> = Vec::new();
        for r in &w.allow {
            let rl = r.loc.line;
            if r.net.prefix_len() == 0 && w.default != DefaultAction::Allow {
                out.push(format!(
                    "{file}:{rl}: workload {:?} allows {} under default = {:?}: that allows loopback, private, link-local and every other internal address too (all but the baseline); to allow the internet but nothing internal, remove the rule and use default = \"deny-internal\"",
                    w.name,
                    r.net,
                    match w.default {
                        DefaultAction::Deny => "deny",
                        _ => "deny-internal",
                    }
                ));
            }
            if let Some(set) = baseline_covers(baseline, &r.net) {
                out.push(format!(
                    "{file}:{rl}: workload {:?} allows {}, which the baseline ({set}) denies before any allow rule: the rule never applies; remove it (the baseline holds for every workload)",
                    w.name, r.net
                ));
            }
            let key = (&r.net, r.ports.as_slice(), r.proto, r.tools.as_slice());
            if seen.contains(&key) {
                out.push(format!(
                    "{file}:{rl}: workload {:?} repeats the allow rule for {}: remove the duplicate",
                    w.name, r.net
                ));
            } else {
                seen.push(key);
            }
        }
    }
    if let Some(p) = proxy {
        if p.ip().is_unspecified() {
            out.push(format!(
                "{file}: [dns] proxy = \"{p}\" listens on every address of its namespace, so anything that reaches it can use it as a resolver: bind it to the one address the workloads use as their nameserver"
            ));
        }
    }
    out
}
