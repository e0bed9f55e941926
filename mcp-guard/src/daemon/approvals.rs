//! Approval requests in the daemon: events, metrics, the webhook and grants for each
//! request and decision (the store is `crate::mcp::approvals`), and the requests an
//! allow rule with `approval = "required"` gets from refused connections and from
//! calls naming its destination.

use std::net::IpAddr;

use crate::{
    config,
    mcp::registry::Attribution,
    telemetry::events::{self, RelayDecision},
};

/// The pending request for approval rule `a` of workload `w` (raised if none is), for a
/// connection to `ip`:`port`.
pub(super) fn ask_for_rule(
    approvals: &crate::mcp::approvals::Approvals,
    cfg: &config::Config,
    w: &config::Workload,
    a: &config::AllowRule,
    ip: IpAddr,
    port: u16,
) -> Option<String> {
    let ap = a.approval.as_ref()?;
    approvals.ask_rule(&crate::mcp::approvals::AskRule {
        workload: &w.name,
        rule_line: a.loc.line,
        rule: &format!(
            "workload {} allow {} (approval = \"required\", {}:{})",
            w.name,
            a.net,
            cfg.path.display(),
            a.loc.line
        ),
        destination: &format!("{ip}:{port}"),
        addrs: a
            .net
            .subnets(a.net.max_prefix_len())
            .map(|s| s.map(|n| n.addr()).collect())
            .unwrap_or_default(),
        approvers: &ap.approvers,
        max_duration: ap.max_duration,
    })
}

/// Events, metrics and the webhook for every approval request, decision and expiry.
pub(super) fn approval_notifier(
    events: tokio::sync::mpsc::UnboundedSender<events::JsonEvent>,
    metrics: std::sync::Arc<crate::telemetry::metrics::Metrics>,
    grant: Box<dyn Fn(Vec<crate::policy::Learned>) + Send + Sync>,
) -> Box<dyn Fn(&crate::mcp::approvals::Happened) + Send + Sync> {
    let runtime = tokio::runtime::Handle::try_current().ok();
    Box::new(move |h| {
        let r = &h.record;
        if let ("approved", "rule", Some(until)) = (h.what, r.kind.as_str(), r.grant_until_unix) {
            // The rule's addresses, opened in the kernel until the grant ends.
            let now = crate::dns::learned::unix_now();
            grant(
                r.grant_addrs
                    .iter()
                    .map(|&addr| crate::policy::Learned {
                        workload: r.workload.clone(),
                        name: format!("approval:{}", r.rule_line),
                        addr,
                        ttl: u32::try_from(until.saturating_sub(now)).unwrap_or(u32::MAX),
                        expires_unix: until,
                        source: crate::policy::APPROVAL_SOURCE.into(),
                    })
                    .collect(),
            );
        }
        metrics
            .mcp_approvals
            .with_label_values(&[&r.workload, h.what])
            .inc();
        let who = r.decided_by.as_ref().map_or_else(String::new, |d| {
            format!(
                " by uid {}{} (pid {})",
                d.uid,
                d.user
                    .as_ref()
                    .map(|u| format!(" ({u})"))
                    .unwrap_or_default(),
                d.pid
            )
        });
        let what_for = match &r.rule {
            Some(rule) => format!(
                "{rule} (asked for by a refused connection to {})",
                r.destination.as_deref().unwrap_or("?")
            ),
            None => format!("tools/call {:?}", r.tool),
        };
        let rule = format!(
            "approval request {} for {what_for}: {}{who}{}{}",
            r.id,
            h.what,
            r.reason
                .as_ref()
                .map(|x| format!(": {x}"))
                .unwrap_or_default(),
            r.grant_until
                .as_ref()
                .map(|g| if r.kind == "rule" {
                    format!("; the rule is open until {g}")
                } else {
                    format!("; calls of {:?} approved until {g}", r.tool)
                })
                .unwrap_or_default()
        );
        let (verdict, reason) = match h.what {
            "requested" => ("held", "approval-requested"),
            "approved" => ("approved", "approval-approved"),
            "denied" => ("refused", "approval-denied"),
            _ => ("refused", "approval-expired"),
        };
        let _ = events.send(events::relay_event(&RelayDecision {
            workload: &r.workload,
            workload_id: 0,
            cgroup_id: r.instance,
            verdict,
            reason,
            rule,
            dst: r.destination.as_deref(),
            dest_class: "none",
            kind: None,
            mcp: (r.kind == "tool").then(|| Attribution {
                tool: Some(r.tool.clone()),
                request_id: Some(r.request_id.clone()),
                session: r.session.clone(),
                arguments: Some(r.arguments.clone()),
                in_flight: Vec::new(),
                client: None,
                server: None,
                instance: r.instance,
                seq: 0,
            }),
            generation: 0,
        }));
        if let (Some((url, key_file)), Some(rt)) = (r.webhook().cloned(), runtime.as_ref()) {
            let body = crate::mcp::approvals::webhook_body(h);
            let (metrics, workload) = (metrics.clone(), r.workload.clone());
            rt.spawn(async move {
                if let Err(e) = post_webhook(&url, key_file.as_deref(), body).await {
                    tracing::warn!(error = %e, url, "approval webhook failed");
                    metrics
                        .mcp_approvals
                        .with_label_values(&[&workload, "webhook-failed"])
                        .inc();
                }
            });
        }
    })
}

/// POSTs one signed approval message.
async fn post_webhook(
    url: &str,
    key_file: Option<&std::path::Path>,
    body: Vec<u8>,
) -> Result<(), String> {
    use http_body_util::Full;
    let key = match key_file {
        Some(f) => std::fs::read(f).map_err(|e| format!("{}: {e}", f.display()))?,
        None => return Err("no approval_webhook_secret_file".into()),
    };
    let key: Vec<u8> = key.trim_ascii().to_vec();
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let sig = crate::mcp::approvals::signature(&key, ts, &body);
    let req = hyper::Request::post(url)
        .header("content-type", "application/json")
        .header("x-mcp-guard-timestamp", ts.to_string())
        .header("x-mcp-guard-signature", sig)
        .body(Full::new(bytes::Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let client: hyper_util::client::legacy::Client<_, Full<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let answer = tokio::time::timeout(std::time::Duration::from_secs(10), client.request(req))
        .await
        .map_err(|_| "no answer within 10 s".to_string())?
        .map_err(|e| e.to_string())?;
    if answer.status().is_success() {
        Ok(())
    } else {
        Err(format!("answered {}", answer.status()))
    }
}

/// Refused connections to a destination only an allow rule with `approval = "required"`
/// opens raise a request for the rule (one pending per rule).
pub(super) async fn rule_requests(
    mut events: tokio::sync::broadcast::Receiver<std::sync::Arc<events::JsonEvent>>,
    view: tokio::sync::watch::Receiver<std::sync::Arc<super::state::View>>,
    approvals: std::sync::Arc<crate::mcp::approvals::Approvals>,
) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        let e = match events.recv().await {
            Ok(e) => e,
            Err(RecvError::Lagged(_)) => continue,
            Err(RecvError::Closed) => return,
        };
        if e.verdict != "denied" || matches!(e.hook.as_str(), "mcp" | "dns") {
            continue;
        }
        let (Some(workload), Ok(ip)) = (&e.workload, e.dst.parse::<IpAddr>()) else {
            continue;
        };
        let cfg = view.borrow().cfg.clone();
        let Some(w) = cfg.workloads.iter().find(|w| &w.name == workload) else {
            continue;
        };
        for a in &w.allow {
            if a.approval.is_none() {
                continue;
            }
            let port_ok =
                a.ports.is_empty() || a.ports.iter().any(|p| (p.lo..=p.hi).contains(&e.dport));
            let proto_ok = match a.proto {
                config::Proto::Any => true,
                config::Proto::Tcp => e.proto == "tcp",
                config::Proto::Udp => e.proto == "udp",
            };
            if !a.net.contains(&ip.to_canonical()) || !port_ok || !proto_ok {
                continue;
            }
            ask_for_rule(&approvals, &cfg, w, a, ip, e.dport);
        }
    }
}
