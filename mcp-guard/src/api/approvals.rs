//! `POST /approvals/ID/approve|deny?reason=TEXT[&for=SECONDS]` on the control socket:
//! a person's decision on a held tool call. The decider is who the kernel says connected
//! (`SO_PEERCRED`): their uid, the groups their process holds, and their cgroup (a
//! process of the instance that asked may not decide).

use percent_encoding::percent_decode_str;

use super::http::{query_param, Peer};
use crate::mcp::approvals::{Approvals, DecideError, Decider};

/// The gids a process holds (its supplementary groups and its gid).
fn groups_of(pid: u32) -> Vec<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .filter_map(|l| {
            l.strip_prefix("Groups:").or_else(|| {
                l.strip_prefix("Gid:")
                    .map(|g| g.split_whitespace().next().unwrap_or(""))
            })
        })
        .flat_map(str::split_whitespace)
        .filter_map(|g| g.parse().ok())
        .collect()
}

/// The process's cgroup v2 path (as its cgroup namespace shows it).
fn cgroup_of(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("0::").map(str::to_string))
}

fn text(query: &str, key: &str) -> String {
    query_param(query, key)
        .map(|v| {
            percent_decode_str(&v.replace('+', " "))
                .decode_utf8_lossy()
                .into_owned()
        })
        .unwrap_or_default()
}

/// Answers one decision: the HTTP status and a JSON body.
pub fn decide(
    store: &Approvals,
    rest: &str,
    query: &str,
    peer: Option<Peer>,
) -> (&'static str, String) {
    let err = |status, e: &dyn std::fmt::Display| {
        (
            status,
            serde_json::json!({ "error": e.to_string() }).to_string(),
        )
    };
    let Some(peer) = peer.filter(|p| p.pid != 0) else {
        return err("403 Forbidden", &"the peer's credentials could not be read");
    };
    let (id, verb) = rest.split_once('/').unwrap_or((rest, ""));
    let id = percent_decode_str(id).decode_utf8_lossy();
    let approve = match verb {
        "approve" => true,
        "deny" => false,
        _ => {
            return err(
                "404 Not Found",
                &"POST /approvals/ID/approve or /approvals/ID/deny",
            )
        }
    };
    let grant = match query_param(query, "for") {
        None => None,
        Some(s) => match s.parse::<u64>() {
            Ok(n) if n > 0 => Some(std::time::Duration::from_secs(n)),
            _ => {
                return err(
                    "400 Bad Request",
                    &format!("for={s}: give seconds, more than 0"),
                )
            }
        },
    };
    let who = Decider {
        uid: peer.uid,
        user: nix::unistd::User::from_uid(peer.uid.into())
            .ok()
            .flatten()
            .map(|u| u.name),
        pid: peer.pid,
        groups: groups_of(peer.pid),
        cgroup: cgroup_of(peer.pid),
    };
    match store.decide(&id, approve, &text(query, "reason"), grant, who) {
        Ok(r) => ("200 OK", serde_json::to_string(&r).unwrap_or_default()),
        Err(e @ (DecideError::NotAnApprover { .. } | DecideError::TheAsker(_))) => {
            err("403 Forbidden", &e)
        }
        Err(e @ DecideError::Unknown(_)) => err("404 Not Found", &e),
        Err(e @ DecideError::Decided { .. }) => err("409 Conflict", &e),
        Err(e) => err("400 Bad Request", &e),
    }
}
