//! `mcp-guard explain`: the verdict for one destination and the rule that decided, from
//! the same compiled entries the kernel gets.

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
};

use anyhow::{bail, Context as _, Result};
use mcp_guard::{
    daemon,
    policy::{display_addr, reason_name, Evaluator, FlowProto, Verdict},
};
use mcp_guard_common::{DEFAULT_ALLOW, DEFAULT_DENY, MODE_AUDIT};
use serde_json::{json, Value};

/// What explain says: printed as it goes for people, or gathered into one document.
struct Out {
    json: bool,
    notes: Vec<String>,
    results: Vec<Value>,
}

impl Out {
    fn say(&mut self, line: String) {
        if self.json {
            self.notes.push(line);
        } else {
            println!("{line}");
        }
    }
}

fn parse_dest(s: &str) -> Result<(IpAddr, u16, FlowProto)> {
    let (hostport, proto) = match s.rsplit_once('/') {
        Some((hp, "tcp")) => (hp, FlowProto::Tcp),
        Some((hp, "udp")) => (hp, FlowProto::Udp),
        Some((_, other)) => bail!("{s:?}: unknown protocol {other:?}, use /tcp or /udp"),
        None => (s, FlowProto::Tcp),
    };
    let sa: SocketAddr = hostport
        .parse()
        .with_context(|| format!("{s:?} is not ADDR:PORT (IPv6 as [ADDR]:PORT)"))?;
    Ok((sa.ip(), sa.port(), proto))
}

/// The addresses a running daemon learned for host rules, from its /dns endpoint.
fn learned_from_daemon(cfg: &mcp_guard::config::Config) -> Result<Vec<mcp_guard::policy::Learned>> {
    #[derive(serde::Deserialize)]
    struct Body {
        learned: Vec<mcp_guard::policy::Learned>,
    }
    let body =
        mcp_guard::api::client::control_body(&cfg.control_socket, "/dns").with_context(|| {
            format!(
                "asking the daemon on {} (daemon.control_socket) what DNS answered",
                cfg.control_socket.display()
            )
        })?;
    Ok(serde_json::from_str::<Body>(&body)?.learned)
}

/// Explains `dest`; the verdict decides the exit code (0 ALLOW, 1 DENY).
pub(crate) fn explain(path: &Path, workload: &str, dest: &str, json: bool) -> Result<Verdict> {
    let mut out = Out {
        json,
        notes: Vec::new(),
        results: Vec::new(),
    };
    let verdict = explain_to(&mut out, path, workload, dest)?;
    if json {
        println!(
            "{}",
            json!({
                "workload": workload,
                "destination": dest,
                "verdict": if verdict == Verdict::Deny { "deny" } else { "allow" },
                "results": out.results,
                "notes": out.notes,
            })
        );
    }
    Ok(verdict)
}

fn explain_to(out: &mut Out, path: &Path, workload: &str, dest: &str) -> Result<Verdict> {
    let (cfg, mut compiled) = daemon::prepare(path)?;
    let has_hosts = cfg.workloads.iter().any(|w| !w.hosts.is_empty());
    let mut learned = Vec::new();
    if has_hosts {
        match learned_from_daemon(&cfg) {
            Ok(l) => {
                compiled = mcp_guard::policy::compile_with(&cfg, &l)?;
                learned = l;
            }
            Err(e) => out.say(format!(
                "note: host rules are judged without DNS answers: {e:#}; run this next to the daemon"
            )),
        }
    }
    let ev = Evaluator::new(&compiled);
    let Some(wl) = ev.workload(workload) else {
        // (pods-pending is one workload over several patterns: named once.)
        let mut names: Vec<&str> = compiled.workloads.iter().map(|w| w.name.as_str()).collect();
        names.dedup();
        bail!(
            "{}: no workload named {workload:?}; workloads: {}",
            path.display(),
            names.join(", ")
        );
    };
    if dest.starts_with('/') || dest.starts_with('@') {
        return Ok(explain_unix(out, &compiled, wl, dest));
    }
    let targets = match parse_dest(dest) {
        Ok(t) => vec![t],
        Err(e) => {
            // A name: explain every address the daemon learned for it.
            let (name, rest) = dest.rsplit_once(':').ok_or(e)?;
            let port_ok = rest
                .split_once('/')
                .map_or(rest, |(p, _)| p)
                .parse::<u16>()
                .is_ok();
            if !port_ok || !is_dns_name(name) {
                bail!(
                    "{dest:?} is neither ADDR:PORT (IPv6 as [ADDR]:PORT, no zone) nor NAME:PORT, with PORT 0-65535 and an optional /tcp or /udp"
                );
            }
            let name = mcp_guard::config::normalise_name(name);
            let (_, port, proto) = parse_dest(&format!("0.0.0.0:{rest}"))?;
            let rules: Vec<String> = cfg
                .workloads
                .iter()
                .filter(|w| w.name == workload)
                .flat_map(|w| w.hosts.iter())
                .filter(|h| h.pattern.matches(&name))
                .map(|h| {
                    format!(
                        "allow host {} ({}:{})",
                        h.pattern,
                        path.display(),
                        h.loc.line
                    )
                })
                .collect();
            let addrs: Vec<IpAddr> = learned
                .iter()
                .filter(|l| l.workload == workload && l.name == name)
                .map(|l| l.addr)
                .collect();
            if addrs.is_empty() {
                if rules.is_empty() {
                    let resolve_any = cfg
                        .workloads
                        .iter()
                        .any(|w| w.name == workload && w.resolve_any);
                    let proxy = if cfg.dns.proxy.is_some() && !resolve_any {
                        "; the DNS proxy refuses to resolve it for this workload"
                    } else {
                        ""
                    };
                    if wl.default == DEFAULT_DENY {
                        out.say(format!("{workload} -> {name}: DENY: no host rule of this workload matches the name, and its default is deny (only an allow cidr covering the address could let it through){proxy}"));
                        return Ok(Verdict::Deny);
                    }
                    out.say(format!("{workload} -> {name}: no host rule of this workload matches the name: its addresses are judged like any address by the CIDR rules and the default (give ADDR:PORT for the verdict){proxy}"));
                    return Ok(if proxy.is_empty() {
                        Verdict::Allow
                    } else {
                        Verdict::Deny
                    });
                }
                out.say(format!(
                    "{workload} -> {name}: matches {}; no address learned yet: the addresses DNS answers are allowed on the rule's ports once learned (never metadata or internal ones unless allow_internal)",
                    rules.join(", ")
                ));
                return Ok(Verdict::Allow);
            }
            addrs.into_iter().map(|a| (a, port, proto)).collect()
        }
    };
    let mut verdict = Verdict::Allow;
    for (ip, port, proto) in targets {
        if explain_one(out, &ev, wl, workload, &learned, (ip, port, proto)) == Verdict::Deny {
            verdict = Verdict::Deny;
        }
    }
    Ok(verdict)
}

/// An AF_UNIX destination (`/path` or `@abstract`): the entry the kernel's longest
/// match finds for this workload.
fn explain_unix(
    out: &mut Out,
    compiled: &mcp_guard::policy::Compiled,
    wl: &mcp_guard::policy::CompiledWorkload,
    dest: &str,
) -> Verdict {
    use mcp_guard::policy::unix;
    use mcp_guard_common::{UNIX_ALLOW, UNIX_NOT_ALLOWED};
    let r = unix::evaluate(&compiled.unix, wl.id, &unix::address_bytes(dest));
    let rule = (r.rule_id > 0)
        .then(|| compiled.rules.get(r.rule_id as usize - 1))
        .flatten()
        .map(|i| i.text.clone());
    let (verdict, reason) = match r.action {
        UNIX_ALLOW => (Verdict::Allow, None),
        UNIX_NOT_ALLOWED => (Verdict::Deny, Some("unix-not-allowed")),
        _ => (Verdict::Deny, Some("unix-denied")),
    };
    let audit = wl.mode == MODE_AUDIT;
    let word = match (verdict, audit) {
        (Verdict::Allow, _) => "ALLOW",
        (Verdict::Deny, false) => "DENY",
        (Verdict::Deny, true) => "AUDIT (would be denied; the workload is in audit mode)",
    };
    out.say(format!(
        "{} -> unix {dest}: {word}{}",
        wl.name,
        rule.as_ref().map_or_else(
            || " (no entry names it; the workload's unix mode is deny-listed)".to_string(),
            |r| format!(" by {r}")
        )
    ));
    if verdict == Verdict::Allow {
        out.say("note: the hooks (Linux 6.7+) judge the address as the process writes it: the same socket reached by another name (a symlink, a relative path, a bind mount) is judged by that name; unix = \"allow-listed\" is not fooled by that".into());
    }
    out.results.push(json!({
        "unix": dest,
        "verdict": match (verdict, audit) {
            (Verdict::Allow, _) => "allow",
            (Verdict::Deny, false) => "deny",
            (Verdict::Deny, true) => "audit",
        },
        "reason": reason,
        "rule_id": rule.as_ref().map(|_| r.rule_id),
        "rule": rule,
    }));
    verdict
}

/// A DNS name as a destination may give it: labels of letters, digits and '-' (and '_'),
/// at most 63 bytes each, not all-numeric at the end (that would be a mistyped address).
fn is_dns_name(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    let labels: Vec<&str> = name.split('.').collect();
    !name.is_empty()
        && name.len() <= 253
        && labels.iter().all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
        && !labels
            .last()
            .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()))
}

fn explain_one(
    out: &mut Out,
    ev: &Evaluator<'_>,
    wl: &mcp_guard::policy::CompiledWorkload,
    workload: &str,
    learned: &[mcp_guard::policy::Learned],
    (ip, port, proto): (IpAddr, u16, FlowProto),
) -> Verdict {
    let d = ev.decide(wl, ip, port, proto);
    let judged = display_addr(mcp_guard::policy::addr16(ip));
    let what = match (d.verdict, wl.mode == MODE_AUDIT) {
        (Verdict::Allow, _) => "ALLOW".to_string(),
        (Verdict::Deny, false) => format!("DENY ({})", reason_name(d.reason.unwrap_or(0))),
        (Verdict::Deny, true) => format!(
            "AUDIT: would deny ({}), allowed because the workload is in audit mode",
            reason_name(d.reason.unwrap_or(0))
        ),
    };
    let proto_name = match proto {
        FlowProto::Tcp => "tcp",
        FlowProto::Udp => "udp",
        FlowProto::Other => "other",
    };
    out.say(format!(
        "{workload} -> {judged} port {port}/{proto_name}: {what}"
    ));
    let default = match wl.default {
        DEFAULT_DENY => "deny",
        DEFAULT_ALLOW => "allow",
        _ => "deny-internal",
    };
    let mut answers = Vec::new();
    let rule = ev.rule_text(d.rule_id);
    match &rule {
        Some(t) => {
            out.say(format!("decided by rule #{}: {t}", d.rule_id));
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            for l in learned
                .iter()
                .filter(|l| l.workload == workload && l.addr.to_canonical() == judged)
                .filter(|l| t.contains(&format!(": {} = {} ", l.name, judged)))
            {
                let left = l.expires_unix.saturating_sub(now);
                out.say(format!(
                    "answer: {} -> {} (record TTL {} s, from the {}), allowed for {left} s more",
                    l.name, l.addr, l.ttl, l.source
                ));
                answers.push(json!({"name": l.name, "address": l.addr, "ttl": l.ttl, "source": l.source, "allowed_for_s": left}));
            }
        }
        None => out.say(format!("decided by the workload default ({default})")),
    }
    out.results.push(json!({
        "address": judged,
        "port": port,
        "proto": proto_name,
        "verdict": match (d.verdict, wl.mode == MODE_AUDIT) {
            (Verdict::Allow, _) => "allow",
            (Verdict::Deny, false) => "deny",
            (Verdict::Deny, true) => "audit",
        },
        "reason": d.reason.map(reason_name),
        "rule_id": rule.as_ref().map(|_| d.rule_id),
        "rule": rule,
        "default": default,
        "answers": answers,
    }));
    // Audit mode lets it through: the command answers for what the kernel does.
    if d.verdict == Verdict::Deny && wl.mode == MODE_AUDIT {
        Verdict::Allow
    } else {
        d.verdict
    }
}
