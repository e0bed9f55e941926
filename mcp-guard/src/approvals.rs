//! `mcp-guard approvals list | approve ID | deny ID`: decisions on tool calls held for
//! approval, over the daemon's control socket.

use std::{path::Path, time::Duration};

use anyhow::{bail, Context as _, Result};
use mcp_guard::api::client;
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};

#[derive(clap::Subcommand)]
pub(crate) enum Action {
    /// Requests waiting for a decision (with --all, the decided ones the daemon keeps).
    List {
        #[arg(long)]
        all: bool,
        #[arg(long)]
        json: bool,
    },
    /// Lets the held call through (with --for, every call of that tool of the workload
    /// until then, at most the workload's max_duration).
    Approve {
        id: String,
        /// Why (recorded with the decision, your uid and the time).
        #[arg(long)]
        reason: String,
        /// A grant: 30s, 15m, 2h.
        #[arg(long = "for", value_parser = crate::parse_since)]
        duration: Option<Duration>,
    },
    /// Refuses the held call (the client gets a JSON-RPC error with your reason).
    Deny {
        id: String,
        #[arg(long)]
        reason: String,
    },
}

fn decide(
    socket: &Path,
    id: &str,
    verb: &str,
    reason: &str,
    grant: Option<Duration>,
) -> Result<()> {
    let mut path = format!(
        "/approvals/{}/{verb}?reason={}",
        utf8_percent_encode(id, NON_ALPHANUMERIC),
        utf8_percent_encode(reason, NON_ALPHANUMERIC)
    );
    if let Some(g) = grant {
        path.push_str(&format!("&for={}", g.as_secs()));
    }
    let (code, body) = client::control_post(socket, &path)?;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    if code != 200 {
        bail!(
            "the daemon refused: {}",
            v["error"].as_str().unwrap_or(body.trim())
        );
    }
    println!(
        "{} {} ({} of workload {}){}",
        v["state"].as_str().unwrap_or(verb),
        v["id"].as_str().unwrap_or(id),
        v["tool"].as_str().unwrap_or(""),
        v["workload"].as_str().unwrap_or(""),
        v["grant_until"]
            .as_str()
            .map(|g| format!("; calls of this tool approved until {g}"))
            .unwrap_or_default()
    );
    Ok(())
}

pub(crate) fn run(socket: &Path, action: Action) -> Result<()> {
    match action {
        Action::List { all, json } => {
            let body = client::control_body(
                socket,
                if all {
                    "/approvals?all=1"
                } else {
                    "/approvals"
                },
            )
            .with_context(|| format!("asking the daemon on {}", socket.display()))?;
            let v: serde_json::Value = serde_json::from_str(&body)?;
            let list = v["approvals"].as_array().cloned().unwrap_or_default();
            if json {
                println!("{}", serde_json::Value::Array(list));
                return Ok(());
            }
            if list.is_empty() {
                println!("no approval requests{}", if all { "" } else { " pending" });
            }
            for r in list {
                let s = |k: &str| r[k].as_str().unwrap_or("").to_string();
                let what = if s("kind") == "rule" {
                    format!("rule=[{}] destination={}", s("rule"), s("destination"))
                } else {
                    format!(
                        "tool={} request={} args=[{}]",
                        s("tool"),
                        s("request_id"),
                        s("arguments")
                    )
                };
                println!(
                    "{}  {}  {}  {what}  requested {}  expires {}{}",
                    s("id"),
                    s("state"),
                    s("workload"),
                    s("requested_at"),
                    s("expires_at"),
                    r["reason"]
                        .as_str()
                        .map(|x| format!("  reason: {x}"))
                        .unwrap_or_default()
                );
            }
            Ok(())
        }
        Action::Approve {
            id,
            reason,
            duration,
        } => decide(socket, &id, "approve", &reason, duration),
        Action::Deny { id, reason } => decide(socket, &id, "deny", &reason, None),
    }
}
