//! Policy at the relay (`[workload.mcp]`), decided here for every relay: a call of a
//! tool the workload's `allow_tools` / `deny_tools` refuse, of a tool whose definition
//! changed mid-session (with `pin_tools`), or whose arguments name a destination the
//! workload's own policy refuses (`check_arguments`, judged by the evaluator `explain`
//! uses, with the addresses DNS answered) is answered by the relay with a JSON-RPC error
//! and never reaches the server. Audit mode reports the same decisions and refuses
//! nothing. Every decision is an event (hook `mcp`) and a counter.

use std::net::IpAddr;

use mcp_guard_common::MODE_AUDIT;

use super::{mcp::Instance, state::Owner};
use crate::{
    config::{self, relay_keys::RelayPolicy},
    mcp::{registry::Attribution, wire::RelayView},
    policy::{reason_name, Evaluator, FlowProto, Verdict},
    telemetry::events::{self, RelayDecision},
};

/// A call, as the relay reported it.
pub(super) struct CallAsked<'a> {
    pub tool: &'a str,
    pub request_id: &'a str,
    pub session: Option<&'a str>,
    pub arguments: &'a str,
    pub targets: &'a [String],
    pub changed: bool,
    /// Asked again about a call held for approval: the request's id.
    pub approval: Option<&'a str>,
}

/// What the relay does with a call.
pub(super) enum CallVerdict {
    Forward,
    /// Answer it with this error.
    Refuse(String),
    /// Hold it: it waits for approval request `id`.
    Hold(String),
}

/// One refusal: reason and the rule (as text, for the client and the event).
struct Refusal {
    reason: &'static str,
    rule: String,
    dst: Option<String>,
    dest_class: &'static str,
}

fn dest_class(ip: IpAddr) -> &'static str {
    let ip = ip.to_canonical();
    if config::sets::metadata().iter().any(|n| n.contains(&ip)) {
        "metadata"
    } else if config::sets::internal().iter().any(|n| n.contains(&ip)) {
        "internal"
    } else {
        "public"
    }
}

/// `host:port`, `[v6]:port` or `host` as the relay's gate writes targets.
fn split_target(t: &str) -> (String, Option<u16>) {
    if let Some(rest) = t.strip_prefix('[') {
        if let Some((h, p)) = rest.split_once("]:") {
            return (h.to_string(), p.parse().ok());
        }
    }
    match t.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => (h.to_string(), p.parse().ok()),
        _ => (t.to_string(), None),
    }
}

impl Owner {
    fn relay_policy(&self, workload: &str) -> Option<&RelayPolicy> {
        self.cfg
            .workloads
            .iter()
            .find(|w| w.name == workload)
            .map(|w| &w.relay)
    }

    fn audit(&self, workload: &str) -> bool {
        self.compiled
            .workloads
            .iter()
            .find(|w| w.name == workload)
            .is_some_and(|w| w.mode == MODE_AUDIT)
    }

    /// What the relay applies by itself.
    pub(super) fn relay_view(&self, workload: &str) -> RelayView {
        self.relay_policy(workload)
            .map_or_else(RelayView::default, |p| RelayView {
                mask: p.mask,
                fail_closed: p.refuses_calls() && !self.audit(workload),
            })
    }

    /// The event's `mcp` object for a call the relay asked about (it is not in flight).
    fn asked_attribution(&self, i: &Instance, c: &CallAsked<'_>) -> Option<Attribution> {
        let inst = self.mcp.get(i.cgroup_id)?;
        Some(Attribution {
            tool: Some(c.tool.to_string()),
            request_id: Some(c.request_id.to_string()),
            session: c.session.map(str::to_string),
            arguments: Some(c.arguments.to_string()),
            in_flight: inst.calls.clone(),
            client: inst.client.clone(),
            server: inst.server.clone(),
            instance: i.cgroup_id,
            seq: inst.seq,
        })
    }

    fn decision(&self, i: &Instance, d: RelayDecision<'_>) {
        self.metrics
            .mcp_relay_decisions
            .with_label_values(&[&i.workload, d.reason, d.verdict])
            .inc();
        let _ = self.dns_wiring.events.send(events::relay_event(&d));
    }

    /// Judges a call before the relay forwards it: refused (the relay answers the
    /// client with the text), held for approval, or forwarded.
    pub(super) fn judge_call(&self, i: &Instance, c: &CallAsked<'_>) -> CallVerdict {
        let Some(policy) = self.relay_policy(&i.workload) else {
            return CallVerdict::Forward;
        };
        if c.approval.is_none() && policy.check_arguments && policy.needs_approval(c.tool).is_none()
        {
            if let Some(id) = self.rule_request(i, c) {
                // A destination only an approval rule opens: held until it is decided.
                return CallVerdict::Hold(id);
            }
        }
        if let Some(id) = c
            .approval
            .filter(|_| policy.needs_approval(c.tool).is_none())
        {
            // Waiting on a rule's request.
            return match self
                .out
                .shared
                .approvals
                .check(id, i.cgroup_id, c.request_id)
            {
                crate::mcp::approvals::Answer::Approved => CallVerdict::Forward,
                crate::mcp::approvals::Answer::Pending(id) => CallVerdict::Hold(id),
                crate::mcp::approvals::Answer::Refused(t) => CallVerdict::Refuse(t),
            };
        }
        if let Some(refused) = self.refusal(i, policy, c) {
            return CallVerdict::Refuse(refused);
        }
        let Some(approval) = policy.needs_approval(c.tool) else {
            return CallVerdict::Forward;
        };
        if self.audit(&i.workload) {
            // Audit mode holds nothing (the request is not raised).
            return CallVerdict::Forward;
        }
        let store = &self.out.shared.approvals;
        let answer = match c.approval {
            Some(id) => store.check(id, i.cgroup_id, c.request_id),
            None => store.ask(&crate::mcp::approvals::Ask {
                workload: &i.workload,
                instance: i.cgroup_id,
                relay_pid: i.relay_pid,
                cgroup: &i.path,
                tool: c.tool,
                request_id: c.request_id,
                session: c.session,
                arguments: c.arguments,
                policy: approval,
            }),
        };
        match answer {
            crate::mcp::approvals::Answer::Approved => CallVerdict::Forward,
            crate::mcp::approvals::Answer::Pending(id) => CallVerdict::Hold(id),
            crate::mcp::approvals::Answer::Refused(t) => CallVerdict::Refuse(t),
        }
    }

    /// A call whose arguments name an address and port the workload's policy refuses
    /// but one of its rules with `approval = "required"` would open: the rule's pending
    /// request (raised if needed).
    fn rule_request(&self, i: &Instance, c: &CallAsked<'_>) -> Option<String> {
        let w = self.cfg.workloads.iter().find(|w| w.name == i.workload)?;
        if !w.allow.iter().any(|a| a.approval.is_some()) {
            return None;
        }
        let ev = Evaluator::new(&self.compiled);
        let wl = ev.workload(&i.workload)?;
        let active = wl.mcp_mask([c.tool], true);
        for t in c.targets {
            let (host, Some(port)) = split_target(t) else {
                continue;
            };
            let Ok(ip) = host.parse::<IpAddr>() else {
                continue;
            };
            if ev
                .decide_active(wl, ip, port, FlowProto::Tcp, active)
                .verdict
                == Verdict::Allow
            {
                continue;
            }
            let covering = w.allow.iter().find(|a| {
                a.approval.is_some()
                    && a.net.contains(&ip.to_canonical())
                    && (a.ports.is_empty() || a.ports.iter().any(|p| (p.lo..=p.hi).contains(&port)))
                    && a.proto != config::Proto::Udp
            })?;
            return super::approvals::ask_for_rule(
                &self.out.shared.approvals,
                &self.cfg,
                w,
                covering,
                ip,
                port,
            );
        }
        None
    }

    /// A refusal by the tool rules, pins or argument check (reported).
    fn refusal(&self, i: &Instance, policy: &RelayPolicy, c: &CallAsked<'_>) -> Option<String> {
        if c.approval.is_some() {
            // Judged when first asked; now only the approval is awaited.
            return None;
        }
        let path = &self.cfg.path;
        let refusal = if let Some(r) = policy.tool_refusal(c.tool, path) {
            Some(Refusal {
                reason: r.reason,
                rule: r.rule,
                dst: None,
                dest_class: "none",
            })
        } else if c.changed && policy.pin_tools {
            Some(Refusal {
                reason: "tool-changed",
                rule: format!(
                    "pin_tools ({}:{}): the tool's definition changed since the session's first tools/list",
                    path.display(),
                    policy.loc.line
                ),
                dst: None,
                dest_class: "none",
            })
        } else if policy.check_arguments {
            self.judge_targets(&i.workload, c.tool, c.targets)
        } else {
            None
        }?;
        let audit = self.audit(&i.workload);
        self.decision(
            i,
            RelayDecision {
                workload: &i.workload,
                workload_id: i.workload_id,
                cgroup_id: i.cgroup_id,
                verdict: if audit { "audited" } else { "refused" },
                reason: refusal.reason,
                rule: refusal.rule.clone(),
                dst: refusal.dst.as_deref(),
                dest_class: refusal.dest_class,
                kind: None,
                mcp: self.asked_attribution(i, c),
                generation: self.maps.generation(),
            },
        );
        (!audit).then(|| {
            format!(
                "mcp-guard refused tools/call {:?} ({}): {}",
                c.tool, refusal.reason, refusal.rule
            )
        })
    }

    /// The first destination in a call's arguments the workload's policy refuses.
    fn judge_targets(&self, workload: &str, tool: &str, targets: &[String]) -> Option<Refusal> {
        let address = |t: &String| {
            let (h, _) = split_target(t);
            h == "localhost" || h.parse::<IpAddr>().is_ok()
        };
        // Names alone are judged only against the DNS proxy's filter: the evaluator (a
        // copy of the policy's lookup tables) is built only when an address needs it.
        if targets.is_empty() || (self.cfg.dns.proxy.is_none() && !targets.iter().any(address)) {
            return None;
        }
        let ev = Evaluator::new(&self.compiled);
        let wl = ev.workload(workload)?;
        let active = wl.mcp_mask([tool], true);
        let w = self.cfg.workloads.iter().find(|w| w.name == workload)?;
        for t in targets {
            let (host, port) = split_target(t);
            let ip = if host == "localhost" {
                Some(IpAddr::from([127, 0, 0, 1]))
            } else {
                host.parse::<IpAddr>().ok()
            };
            let Some(ip) = ip else {
                // A name: refused here only when the DNS proxy would not resolve it for
                // this workload; otherwise its addresses are the kernel's to judge.
                let name = config::normalise_name(&host);
                if self.cfg.dns.proxy.is_some()
                    && !w.resolve_any
                    && !w.hosts.iter().any(|h| h.pattern.matches(&name))
                {
                    return Some(Refusal {
                        reason: "argument-refused",
                        rule: format!(
                            "the arguments name {t}: no host rule of workload {workload:?} covers {name:?}, and the DNS proxy resolves only names host rules cover (resolve_any is off)"
                        ),
                        dst: Some(t.clone()),
                        dest_class: "none",
                    });
                }
                continue;
            };
            // No port given: refused only if refused on every port a rule of the
            // workload names (and the web ports).
            let ports: Vec<u16> = match port {
                Some(p) => vec![p],
                None => {
                    let mut v: Vec<u16> = w
                        .allow
                        .iter()
                        .flat_map(|r| r.ports.iter())
                        .chain(w.hosts.iter().flat_map(|h| h.ports.iter()))
                        .map(|p| p.lo)
                        .chain([80, 443])
                        .collect();
                    v.sort_unstable();
                    v.dedup();
                    v.truncate(64);
                    v
                }
            };
            let mut denied = None;
            for &p in &ports {
                let d = ev.decide_active(wl, ip, p, FlowProto::Tcp, active);
                if d.verdict == Verdict::Allow {
                    denied = None;
                    break;
                }
                denied.get_or_insert(d);
            }
            if let Some(d) = denied {
                let by = ev.rule_text(d.rule_id).map_or_else(
                    || format!("the default of workload {workload:?}"),
                    str::to_string,
                );
                return Some(Refusal {
                    reason: "argument-refused",
                    rule: format!(
                        "the arguments name {t}, which workload {workload:?} may not reach ({}, {by})",
                        reason_name(d.reason.unwrap_or(0))
                    ),
                    dst: Some(t.clone()),
                    dest_class: dest_class(ip),
                });
            }
        }
        None
    }

    /// A `tools/list` answer: the tools to hide (refused by the tool rules, or changed
    /// with `pin_tools`); changed tools are reported.
    pub(super) fn judge_tools(
        &self,
        i: &Instance,
        names: &[String],
        changed: &[String],
        session: Option<&str>,
    ) -> Vec<String> {
        let Some(policy) = self.relay_policy(&i.workload) else {
            return Vec::new();
        };
        let audit = self.audit(&i.workload);
        for tool in changed {
            let verdict = match (policy.pin_tools, audit) {
                (true, false) => "hidden",
                (true, true) => "audited",
                (false, _) => "reported",
            };
            self.decision(
                i,
                RelayDecision {
                    workload: &i.workload,
                    workload_id: i.workload_id,
                    cgroup_id: i.cgroup_id,
                    verdict,
                    reason: "tool-changed",
                    rule: format!(
                        "tool {tool:?} changed its definition (name, description or input schema) since the session's first tools/list{}",
                        if policy.pin_tools { "; pin_tools refuses it" } else { "; pin_tools is off: reported only" }
                    ),
                    dst: None,
                    dest_class: "none",
                    kind: None,
                    mcp: self.asked_attribution(
                        i,
                        &CallAsked {
                            tool,
                            request_id: "",
                            session,
                            arguments: "",
                            targets: &[],
                            changed: true,
                            approval: None,
                        },
                    ),
                    generation: self.maps.generation(),
                },
            );
        }
        if audit {
            return Vec::new();
        }
        names
            .iter()
            .filter(|n| {
                policy.tool_refusal(n, &self.cfg.path).is_some()
                    || (policy.pin_tools && changed.contains(n))
            })
            .cloned()
            .collect()
    }

    /// Credentials a relay found in a call's arguments or result.
    pub(super) fn report_masked(
        &self,
        i: &Instance,
        c: &CallAsked<'_>,
        masked: &std::collections::BTreeMap<String, u32>,
    ) {
        let Some(policy) = self.relay_policy(&i.workload) else {
            return;
        };
        let action = if policy.mask == config::relay_keys::Mask::Secrets {
            "masked"
        } else {
            "reported"
        };
        for (kind, n) in masked {
            self.metrics
                .mcp_secrets
                .with_label_values(&[&i.workload, kind, action])
                .inc_by(u64::from(*n));
            let _ =
                self.dns_wiring
                    .events
                    .send(events::relay_event(&RelayDecision {
                        workload: &i.workload,
                        workload_id: i.workload_id,
                        cgroup_id: i.cgroup_id,
                        verdict: action,
                        reason: "secret",
                        rule: format!(
                        "mask = {:?} ({}:{}): {n} credential(s) of kind {kind} in tools/call {:?}",
                        if action == "masked" { "secrets" } else { "report" },
                        self.cfg.path.display(),
                        policy.loc.line,
                        c.tool
                    ),
                        dst: None,
                        dest_class: "none",
                        kind: Some(kind),
                        mcp: self.asked_attribution(i, c),
                        generation: self.maps.generation(),
                    }));
        }
    }
}
