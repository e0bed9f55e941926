//! Prometheus metrics. Flow counters are read from the kernel's per-CPU maps at scrape
//! time, so they stay exact when events are rate-limited or lost.

use std::{collections::HashMap, sync::Mutex};

use mcp_guard_common::{
    FlowCounterKey, STAT_EVENTS_LOST, STAT_EVENTS_SUBMITTED, STAT_EVENTS_SUPPRESSED, STAT_REPORTED,
    VERDICT_AUDITED,
};
use prometheus::{
    Encoder, Gauge, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::{
    kernel::maps::Counters,
    policy::reason_name,
    telemetry::events::{class_name, hook_name, proto_name},
};

const FLOW_LABELS: [&str; 6] = [
    "workload",
    "reason",
    "dest_class",
    "family",
    "proto",
    "hook",
];

pub struct Metrics {
    registry: Registry,
    denied: IntCounterVec,
    audited: IntCounterVec,
    reported: IntCounter,
    suppressed: IntCounter,
    lost: IntCounter,
    submitted: IntCounter,
    pub delivered: IntCounter,
    pub programs_attached: IntGaugeVec,
    pub policy_rules: IntGaugeVec,
    pub workloads: IntGauge,
    pub reloads: IntCounterVec,
    pub last_reload_success: Gauge,
    pub policy_generation: IntGauge,
    pub ready: IntGauge,
    pub lsm_available: IntGauge,
    pub unix_hooks_available: IntGauge,
    unstable: IntCounter,
    accepted: IntCounterVec,
    accept_unmarked: IntCounter,
    pub reattached: IntCounter,
    /// Differences between the kernel's state and what the daemon installed, repaired.
    pub state_repaired: IntCounterVec,
    last_denied: prometheus::GaugeVec,
    /// DNS answers the rebinding guard refused, by workload and reason.
    pub dns_refused: IntCounterVec,
    /// Addresses host rules allow right now, by workload.
    pub dns_learned: IntGaugeVec,
    /// DNS lookups the daemon made, by result (answer, empty, error).
    pub dns_lookups: IntCounterVec,
    /// Addresses not learned because the workload had `[dns] max_addresses` already.
    pub dns_limited: IntCounterVec,
    /// Queries the DNS proxy answered, by result (forwarded, learned, upstream-error).
    pub dns_proxied: IntCounterVec,
    /// Queries the DNS proxy answered REFUSED itself, by workload ("" if none) and reason.
    pub dns_query_refused: IntCounterVec,
    /// Processes in a workload's cgroups holding a capability that goes around the
    /// cgroup hooks (CAP_NET_RAW, CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_BPF).
    pub privileged_processes: IntGaugeVec,
    /// `exec --mcp` instances whose relay is connected.
    pub mcp_instances: IntGauge,
    pub mcp_resumed: IntCounterVec,
    /// `tools/call` requests relays reported, by workload.
    pub mcp_tool_calls: IntCounterVec,
    /// Lines relays passed through unread, by workload and kind (malformed, oversized).
    pub mcp_relay_lines: IntCounterVec,
    /// Decisions of the relays' policy, by workload, reason and verdict.
    pub mcp_relay_decisions: IntCounterVec,
    /// Credentials relays found in tool results and arguments, by workload and kind.
    pub mcp_secrets: IntCounterVec,
    /// Approval requests of tool calls and what became of them, by workload and event.
    pub mcp_approvals: IntCounterVec,
    /// Pods on this node held by each workload (`pods-pending`: not identified yet).
    pub pods: IntGaugeVec,
    /// Whether the last CRI poll answered (1) or failed (0).
    pub cri_up: IntGauge,
    pub homes_tracked: IntGauge,
    pub events_sink_errors: IntCounter,
    pub homes_seeded: IntCounter,
    pub homes_failed: IntCounter,
    left_workload: IntCounterVec,
    /// Flow counter values at the previous render, to see which grew.
    previous: Mutex<HashMap<FlowCounterKey, u64>>,
}

fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> T {
    r.register(Box::new(c.clone()))
        .expect("metric names are unique");
    c
}

impl Metrics {
    #[must_use]
    pub fn new(kernel: &str) -> Self {
        let r = Registry::new();
        let flows = |name: &str, help: &str| {
            IntCounterVec::new(Opts::new(name, help), &FLOW_LABELS).expect("valid")
        };
        let m = Self {
            denied: reg(&r, flows("mcp_guard_denied_flows_total", "Flows refused by policy (the caller got EPERM or the packet was dropped).")),
            audited: reg(&r, flows("mcp_guard_audited_flows_total", "Flows that policy would refuse, let through because the workload is in audit mode.")),
            reported: reg(&r, IntCounter::new("mcp_guard_events_reported_total", "Denied or audited decisions that should produce an event.").expect("valid")),
            suppressed: reg(&r, IntCounter::new("mcp_guard_events_suppressed_total", "Events not emitted because of the per-destination rate limit.").expect("valid")),
            lost: reg(&r, IntCounter::new("mcp_guard_events_lost_total", "Events dropped because the kernel ring buffer was full.").expect("valid")),
            submitted: reg(&r, IntCounter::new("mcp_guard_events_submitted_total", "Events written to the kernel ring buffer.").expect("valid")),
            delivered: reg(&r, IntCounter::new("mcp_guard_events_delivered_total", "Events read from the ring buffer by the daemon.").expect("valid")),
            programs_attached: reg(&r, IntGaugeVec::new(Opts::new("mcp_guard_programs_attached", "Programs attached, by hook (1 attached, 0 not)."), &["hook"]).expect("valid")),
            policy_rules: reg(&r, IntGaugeVec::new(Opts::new("mcp_guard_policy_rules", "Allow rules in the loaded policy, by workload."), &["workload"]).expect("valid")),
            workloads: reg(&r, IntGauge::new("mcp_guard_workloads", "Workloads in the loaded policy.").expect("valid")),
            reloads: reg(&r, IntCounterVec::new(Opts::new("mcp_guard_policy_reloads_total", "Policy reloads, by result (success, failure)."), &["result"]).expect("valid")),
            last_reload_success: reg(&r, Gauge::new("mcp_guard_policy_last_reload_success_timestamp_seconds", "Unix time of the last successful policy load.").expect("valid")),
            policy_generation: reg(&r, IntGauge::new("mcp_guard_policy_generation", "Generation of the policy the kernel is deciding with.").expect("valid")),
            ready: reg(&r, IntGauge::new("mcp_guard_ready", "1 while every program is attached and the policy is loaded (what /readyz reports).").expect("valid")),
            reattached: reg(&r, IntCounter::new("mcp_guard_programs_reattached_total", "Times the daemon found a program detached by someone else and attached it again.").expect("valid")),
            state_repaired: reg(&r, IntCounterVec::new(Opts::new("mcp_guard_state_repaired_total", "Differences between the kernel's state and what the daemon installed, found by the check every second and repaired, by what (config, cgroup, policy, register, link, tc_link, mcp_instance): someone changed pinned maps or removed link pins."), &["what"]).expect("valid")),
            last_denied: reg(&r, prometheus::GaugeVec::new(Opts::new("mcp_guard_last_denied_timestamp_seconds", "Unix time the daemon last saw the flow counters grow, by workload, destination class and verdict. Alert on its age: a counter series born at its first denial has no increase() yet."), &["workload", "dest_class", "verdict"]).expect("valid")),
            previous: Mutex::new(HashMap::new()),
            dns_refused: reg(&r, IntCounterVec::new(Opts::new("mcp_guard_dns_refused_total", "Addresses in DNS answers for allowed names that the rebinding guard refused (metadata, baseline or internal), by workload and reason."), &["workload", "reason"]).expect("valid")),
            dns_learned: reg(&r, IntGaugeVec::new(Opts::new("mcp_guard_dns_learned_addresses", "Addresses that host rules allow right now (learned from DNS answers, until TTL plus grace), by workload."), &["workload"]).expect("valid")),
            dns_lookups: reg(&r, IntCounterVec::new(Opts::new("mcp_guard_dns_lookups_total", "DNS lookups the daemon made for exact host rules, by result (answer, empty, error)."), &["result"]).expect("valid")),
            dns_limited: reg(&r, IntCounterVec::new(Opts::new("mcp_guard_dns_learn_limited_total", "Answered addresses not learned (so not allowed) because the workload already had [dns] max_addresses learned addresses, by workload."), &["workload"]).expect("valid")),
            dns_proxied: reg(&r, IntCounterVec::new(Opts::new("mcp_guard_dns_proxy_queries_total", "Queries the DNS proxy handled, by result (forwarded, learned, refused, upstream-error, malformed, overloaded)."), &["result"]).expect("valid")),
            privileged_processes: reg(&r, IntGaugeVec::new(Opts::new("mcp_guard_workload_privileged_processes", "Processes of a workload holding CAP_NET_RAW, CAP_NET_ADMIN, CAP_SYS_ADMIN or CAP_BPF (effective or permitted), which can go around the cgroup hooks; read every few seconds from /proc."), &["workload"]).expect("valid")),
            dns_query_refused: reg(&r, IntCounterVec::new(Opts::new("mcp_guard_dns_query_refused_total", "Queries the DNS proxy answered REFUSED without asking upstream, by workload (empty: the client is no workload) and reason (name-not-allowed, type-not-allowed, rate-limited, in-flight-limited, unattributed, malformed-query)."), &["workload", "reason"]).expect("valid")),
            lsm_available: reg(&r, IntGauge::new("mcp_guard_lsm_available", "Whether the kernel runs the BPF LSM program that refuses AF_PACKET sockets (1) or refuses BPF LSM programs, leaving packet sockets open (0).").expect("valid")),
            unix_hooks_available: reg(&r, IntGauge::new("mcp_guard_unix_hooks_available", "Whether the kernel runs the cgroup AF_UNIX hooks (connect_unix, sendmsg_unix; Linux 6.7+) that judge Unix-socket destinations (1), or has none, leaving them to exec's mount namespace (0).").expect("valid")),
            unstable: reg(&r, IntCounter::new("mcp_guard_decisions_unstable_total", "Decisions that failed closed (denied) because the policy changed three times while they were made.").expect("valid")),
            accepted: reg(&r, IntCounterVec::new(Opts::new("mcp_guard_accepted_connections_total", "TCP connections made to a guarded workload (it accepted them), by workload: their replies go to the peer that connected, whatever the egress policy says of it (counted at the connection's first reply)."), &["workload"]).expect("valid")),
            accept_unmarked: reg(&r, IntCounter::new("mcp_guard_accepted_unmarked_total", "Accepted TCP connections the kernel could not mark (its map of accepted connections was full): their replies were judged by the egress policy instead (fail closed).").expect("valid")),
            mcp_instances: reg(&r, IntGauge::new("mcp_guard_mcp_instances", "MCP server instances (`exec --mcp`) whose relay is connected to the daemon.").expect("valid")),
            mcp_resumed: reg(&r, IntCounterVec::new(Opts::new("mcp_guard_mcp_instances_resumed_total", "MCP server instances whose relay registered them again (with their calls in flight) after the daemon restarted, by workload. Between the restart and this, the instance had no tool active."), &["workload"]).expect("valid")),
            mcp_tool_calls: reg(&r, IntCounterVec::new(Opts::new("mcp_guard_mcp_tool_calls_total", "MCP tools/call requests the relays reported (each activated its tools in the kernel before it was forwarded), by workload."), &["workload"]).expect("valid")),
            mcp_relay_decisions: reg(&r, IntCounterVec::new(Opts::new("mcp_guard_mcp_relay_decisions_total", "Decisions of the policy at the relay ([workload.mcp]), by workload, reason (tool-denied, tool-not-allowed, tool-changed, argument-refused) and verdict (refused: a call answered by the relay; hidden: a changed tool taken out of tools/list by pin_tools; reported: a changed tool left in because pin_tools is off; audited: would have been refused or hidden)."), &["workload", "reason", "verdict"]).expect("valid")),
            mcp_secrets: reg(&r, IntCounterVec::new(Opts::new("mcp_guard_mcp_secrets_total", "Credentials MCP relays found in tool results and call arguments (mask = report or secrets), by workload, kind and action (masked or reported)."), &["workload", "kind", "action"]).expect("valid")),
            mcp_approvals: reg(&r, IntCounterVec::new(Opts::new("mcp_guard_mcp_approvals_total", "Approval requests of tool calls (approval_tools), by workload and event: requested, approved, denied, expired; webhook-failed counts requests the webhook did not take."), &["workload", "event"]).expect("valid")),
            mcp_relay_lines: reg(&r, IntCounterVec::new(Opts::new("mcp_guard_mcp_relay_lines_total", "Lines (HTTP bodies) MCP relays passed through unchanged without reading them, by workload and kind (malformed: not JSON-RPC 2.0; oversized: longer than 16 MiB); mismatched: HTTP requests the proxy refused because an Mcp-Method or Mcp-Name header disagreed with the body."), &["workload", "kind"]).expect("valid")),
            pods: reg(&r, IntGaugeVec::new(Opts::new("mcp_guard_pods", "Pods on this node held by each pod-selecting workload, as identified through the container runtime (CRI); pods-pending counts pod cgroups not identified yet (all their egress is denied)."), &["workload"]).expect("valid")),
            cri_up: reg(&r, IntGauge::new("mcp_guard_cri_up", "Whether the last poll of the container runtime's CRI socket answered (1) or failed (0); while it fails, new pods stay pending (denied) and known pods keep their workload. 1 when no workload selects pods.").expect("valid")),
            events_sink_errors: reg(&r, IntCounter::new("mcp_guard_events_sink_errors_total", "Event writes to the configured sink (stdout or events.file) that failed (disk full, file unopenable); the live stream and /events still had them.").expect("valid")),
            homes_tracked: reg(&r, IntGauge::new("mcp_guard_homes_tracked", "Tasks (threads) of guarded workloads the kernel keeps a home for: wherever such a task moves, it is judged by its workload's policy until it exits.").expect("valid")),
            homes_seeded: reg(&r, IntCounter::new("mcp_guard_homes_seeded_total", "Tasks of guarded workloads given their home by the daemon's scan rather than by the kernel at their creation (they predate the tracepoints, or a runtime placed them in a nested cgroup).").expect("valid")),
            homes_failed: reg(&r, IntCounter::new("mcp_guard_homes_failed_total", "Tasks of guarded workloads the daemon could not record a home for (the map of homes was full): they are judged by the cgroup they run in only.").expect("valid")),
            left_workload: reg(&r, IntCounterVec::new(Opts::new("mcp_guard_processes_left_workload_total", "Processes of a workload that moved to a cgroup outside it (cgroup_attach_task), by workload. The kernel let the move happen; the process and its descendants keep being judged by the workload's policy. Nothing legitimate does this: investigate."), &["workload"]).expect("valid")),
            registry: r,
        };
        let build = reg(
            &m.registry,
            IntGaugeVec::new(
                Opts::new("mcp_guard_build_info", "Build and kernel of this agent."),
                &["version", "kernel"],
            )
            .expect("valid"),
        );
        build
            .with_label_values(&[env!("CARGO_PKG_VERSION"), kernel])
            .set(1);
        for r in ["success", "failure"] {
            m.reloads.with_label_values(&[r]);
        }
        // At 0 from the start, so `increase()` sees the first repair.
        for what in REPAIRED {
            m.state_repaired.with_label_values(&[what]);
        }
        m
    }

    /// Creates a workload's series of moves out of its cgroup at 0, so an alert's
    /// `increase()` sees the first move.
    pub fn workload_known(&self, workload: &str) {
        let _ = self.left_workload.with_label_values(&[workload]);
    }

    /// Remembers counter values that predate this daemon (adopted pinned maps), so they
    /// do not look like fresh denials.
    pub fn prime(&self, c: &Counters) {
        let mut prev = self.previous.lock().expect("previous");
        for (k, v) in &c.flows {
            prev.insert(*k, *v);
        }
    }

    /// Brings the kernel-backed counters up to the kernel's values and renders the text.
    #[must_use]
    pub fn render(&self, c: &Counters, workload_names: &HashMap<u32, String>) -> String {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let mut prev = self.previous.lock().expect("previous");
        for (k, v) in &c.flows {
            let workload = workload_names
                .get(&k.workload_id)
                .map_or_else(|| format!("id-{}", k.workload_id), Clone::clone);
            let labels = [
                workload.as_str(),
                reason_name(k.reason),
                class_name(k.dest_class),
                match k.family {
                    1 => "unix",
                    4 => "ipv4",
                    _ => "ipv6",
                },
                &proto_name(k.proto),
                hook_name(k.hook),
            ];
            if k.hook == mcp_guard_common::HOOK_CGROUP_ATTACH {
                catch_up(
                    &self.left_workload.with_label_values(&[workload.as_str()]),
                    *v,
                );
                prev.insert(*k, *v);
                continue;
            }
            let vec = if k.verdict == VERDICT_AUDITED {
                &self.audited
            } else {
                &self.denied
            };
            catch_up(&vec.with_label_values(&labels), *v);
            if prev.insert(*k, *v).is_none_or(|before| *v > before) {
                let verdict = mcp_guard_common::verdict_name(k.verdict);
                self.last_denied
                    .with_label_values(&[workload.as_str(), class_name(k.dest_class), verdict])
                    .set(now);
            }
        }
        drop(prev);
        for (id, v) in &c.accepted {
            let workload = workload_names
                .get(id)
                .map_or_else(|| format!("id-{id}"), Clone::clone);
            catch_up(&self.accepted.with_label_values(&[workload.as_str()]), *v);
        }
        catch_up(
            &self.accept_unmarked,
            c.stats[mcp_guard_common::STAT_ACCEPT_UNMARKED as usize],
        );
        catch_up(&self.reported, c.stats[STAT_REPORTED as usize]);
        catch_up(&self.suppressed, c.stats[STAT_EVENTS_SUPPRESSED as usize]);
        catch_up(&self.lost, c.stats[STAT_EVENTS_LOST as usize]);
        catch_up(
            &self.unstable,
            c.stats[mcp_guard_common::STAT_UNSTABLE as usize],
        );
        catch_up(&self.submitted, c.stats[STAT_EVENTS_SUBMITTED as usize]);
        self.text()
    }

    #[must_use]
    pub fn text(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding");
        String::from_utf8(out).expect("utf-8")
    }
}

/// Kernel counters only grow (per-CPU sums of monotonic values); a policy reload with a
/// fresh map would start lower, which a Prometheus counter must not do: then keep it.
fn catch_up(counter: &IntCounter, kernel: u64) {
    let cur = counter.get();
    if kernel > cur {
        counter.inc_by(kernel - cur);
    }
}

/// What the self-repair check counts, as `mcp_guard_state_repaired_total{what}`.
pub const REPAIRED: [&str; 7] = [
    "config",
    "cgroup",
    "policy",
    "register",
    "link",
    "tc_link",
    "mcp_instance",
];

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// Every series the shipped alert rules and dashboard query is one the daemon exports:
    /// a typo there would be an alert that never fires, a panel that stays empty.
    #[test]
    fn rules_and_dashboard_query_only_exported_metrics() {
        let m = Metrics::new("test");
        // Vectors export nothing until a label set exists: touch each once.
        let flow = ["w", "r", "c", "f", "p", "h"];
        m.denied.with_label_values(&flow).inc();
        m.audited.with_label_values(&flow).inc();
        m.programs_attached.with_label_values(&["h"]).set(1);
        m.policy_rules.with_label_values(&["w"]).set(1);
        m.last_denied.with_label_values(&["w", "c", "v"]).set(1.0);
        m.dns_refused.with_label_values(&["w", "r"]).inc();
        m.dns_learned.with_label_values(&["w"]).set(1);
        m.dns_lookups.with_label_values(&["r"]).inc();
        m.dns_proxied.with_label_values(&["r"]).inc();
        m.dns_query_refused.with_label_values(&["w", "r"]).inc();
        m.privileged_processes.with_label_values(&["w"]).set(1);
        m.dns_limited.with_label_values(&["w"]).inc();
        m.pods.with_label_values(&["w"]).set(1);
        m.mcp_tool_calls.with_label_values(&["w"]).inc();
        m.mcp_relay_decisions
            .with_label_values(&["w", "r", "v"])
            .inc();
        m.mcp_secrets.with_label_values(&["w", "k", "a"]).inc();
        m.mcp_approvals.with_label_values(&["w", "e"]).inc();
        m.workload_known("w");
        let exported: BTreeSet<String> = m
            .registry
            .gather()
            .iter()
            .map(|f| f.name().to_string())
            .collect();
        let shipped = [
            include_str!("../../../deploy/prometheus/mcp-guard-rules.yml"),
            include_str!("../../../deploy/grafana/mcp-guard-dashboard.json"),
        ];
        let mut queried = BTreeSet::new();
        for text in shipped {
            let mut rest = text;
            while let Some(i) = rest.find("mcp_guard_") {
                let name: String = rest[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                rest = &rest[i + name.len()..];
                queried.insert(name);
            }
        }
        assert!(queried.len() > 10, "{queried:?}");
        let missing: Vec<&String> = queried.difference(&exported).collect();
        assert!(
            missing.is_empty(),
            "queried but never exported: {missing:?}"
        );
    }
}
