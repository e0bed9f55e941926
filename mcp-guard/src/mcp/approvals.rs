//! Just-in-time approval of tool calls (`[workload.mcp] approval_tools`): a call that
//! needs one is held by its relay, an approval request is raised (an event, a metric, a
//! signed webhook, `mcp-guard approvals list`), and a person allowed to decide
//! (`approvers`: Unix groups; root) approves or denies it over the control socket.
//! Approval lets that call through, or with `--for` every call of the same tool of the
//! workload until the grant ends; no answer within `approval_timeout` refuses it. Every
//! request, decision, expiry and grant is an event and a line of the record file.
//!
//! The store is shared by the daemon's MCP socket (requests and the relays' polls) and
//! its control socket (decisions).

use std::{
    collections::{BTreeMap, VecDeque},
    io::Write as _,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use serde::Serialize;

use crate::config::relay_keys::ApprovalPolicy;

/// Decided requests kept for `approvals list --all`.
const KEEP_DECIDED: usize = 256;
/// Requests pending at once (past that, a new one is refused at once).
const MAX_PENDING: usize = 1024;

/// Who decided, as the control socket's peer credentials say.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Decider {
    pub uid: u32,
    pub user: Option<String>,
    pub pid: u32,
    /// The gids its process holds.
    #[serde(skip)]
    pub groups: Vec<u32>,
    /// Its cgroup (a process of the instance that asked may not decide).
    #[serde(skip)]
    pub cgroup: Option<String>,
}

/// One approval request and what became of it.
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    pub id: String,
    /// "tool" (a held tool call) or "rule" (an allow rule with approval = "required",
    /// asked for by a refused connection).
    pub kind: String,
    pub workload: String,
    /// A rule request: the rule, and the destination whose refusal asked for it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination: Option<String>,
    /// The instance's cgroup id.
    pub instance: u64,
    pub tool: String,
    pub request_id: String,
    pub session: Option<String>,
    /// The call's argument summary (secrets redacted, as in events).
    pub arguments: String,
    pub requested_at: String,
    pub expires_at: String,
    pub approvers: Vec<String>,
    /// pending, approved, denied or expired.
    pub state: String,
    pub decided_by: Option<Decider>,
    pub decided_at: Option<String>,
    pub reason: Option<String>,
    /// `approve --for`: calls of this tool of the workload go through until then.
    pub grant_until: Option<String>,
    #[serde(skip)]
    deadline: Option<Instant>,
    #[serde(skip)]
    max_duration: Duration,
    #[serde(skip)]
    relay_pid: u32,
    #[serde(skip)]
    cgroup: String,
    #[serde(skip)]
    webhook: Option<(String, Option<PathBuf>)>,
    /// A rule request: the rule's line and every address an approval opens.
    #[serde(skip)]
    pub rule_line: usize,
    #[serde(skip)]
    pub grant_addrs: Vec<std::net::IpAddr>,
    /// An approved grant's end (Unix seconds).
    #[serde(skip)]
    pub grant_until_unix: Option<u64>,
}

/// A call covered by an approval given with `--for`.
#[derive(Debug, Clone)]
struct Grant {
    workload: String,
    tool: String,
    until: Instant,
}

/// What the relay does with a call that needs approval.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Hold it and ask again (the request's id).
    Pending(String),
    /// Forward it.
    Approved,
    /// Answer it with this error.
    Refused(String),
}

/// A call to ask about.
pub struct Ask<'a> {
    pub workload: &'a str,
    pub instance: u64,
    pub relay_pid: u32,
    /// The instance's cgroup (relative to the cgroup mount), where deciders may not be.
    pub cgroup: &'a str,
    pub tool: &'a str,
    pub request_id: &'a str,
    pub session: Option<&'a str>,
    pub arguments: &'a str,
    pub policy: &'a ApprovalPolicy,
}

/// A refused connection to a destination only an allow rule with `approval =
/// "required"` opens.
pub struct AskRule<'a> {
    pub workload: &'a str,
    pub rule_line: usize,
    pub rule: &'a str,
    pub destination: &'a str,
    pub addrs: Vec<std::net::IpAddr>,
    pub approvers: &'a [String],
    pub max_duration: Duration,
}

/// How long a rule request waits for a decision.
pub const RULE_REQUEST_TIMEOUT: Duration = Duration::from_secs(900);

/// Why a decision was refused.
#[derive(Debug, thiserror::Error)]
pub enum DecideError {
    #[error("no pending approval request {0} (see `mcp-guard approvals list --all`)")]
    Unknown(String),
    #[error("approval request {id} was already {state}")]
    Decided { id: String, state: String },
    #[error("uid {uid} is in none of the approvers' groups ({groups}) and is not root")]
    NotAnApprover { uid: u32, groups: String },
    #[error("the process deciding (pid {0}) is the MCP instance that asked, or inside it: approvals come from outside the workload")]
    TheAsker(u32),
    #[error("--for {asked}s is longer than max_duration ({max}s) of this workload")]
    TooLong { asked: u64, max: u64 },
    #[error("give a reason (--reason TEXT): it is recorded with the decision")]
    NoReason,
}

/// What happened, for events, metrics and the record file.
#[derive(Debug, Clone)]
pub struct Happened {
    /// requested, approved, denied, expired.
    pub what: &'static str,
    pub record: Record,
}

#[derive(Default)]
struct Inner {
    pending: BTreeMap<String, Record>,
    decided: VecDeque<Record>,
    grants: Vec<Grant>,
    next: u64,
}

/// The daemon's approval requests.
pub struct Approvals {
    inner: Mutex<Inner>,
    record_file: Option<PathBuf>,
    /// Told of every request, decision and expiry (events, metrics, webhook).
    notify: Box<dyn Fn(&Happened) + Send + Sync>,
}

fn rfc3339(t: SystemTime) -> String {
    let ns = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    crate::telemetry::events::rfc3339(ns)
}

impl Approvals {
    #[must_use]
    pub fn new(
        record_file: Option<PathBuf>,
        notify: Box<dyn Fn(&Happened) + Send + Sync>,
    ) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(Inner::default()),
            record_file,
            notify,
        })
    }

    fn record(&self, h: &Happened) {
        (self.notify)(h);
        let Some(path) = &self.record_file else {
            return;
        };
        #[derive(Serialize)]
        struct Line<'a> {
            time: String,
            event: &'a str,
            #[serde(flatten)]
            record: &'a Record,
        }
        let line = Line {
            time: rfc3339(SystemTime::now()),
            event: h.what,
            record: &h.record,
        };
        let Ok(mut text) = serde_json::to_string(&line) else {
            return;
        };
        text.push('\n');
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|mut f| f.write_all(text.as_bytes()));
        if let Err(e) = written {
            tracing::warn!(error = %e, file = %path.display(), "approval record not written");
        }
    }

    /// Requests past their timeout become expired (recorded).
    fn expire(&self, inner: &mut Inner) {
        let now = Instant::now();
        inner.grants.retain(|g| g.until > now);
        let due: Vec<String> = inner
            .pending
            .iter()
            .filter(|(_, r)| r.deadline.is_some_and(|d| d <= now))
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            if let Some(mut r) = inner.pending.remove(&id) {
                r.state = "expired".into();
                r.decided_at = Some(rfc3339(SystemTime::now()));
                r.reason = Some("nobody answered within approval_timeout".into());
                self.record(&Happened {
                    what: "expired",
                    record: r.clone(),
                });
                keep(inner, r);
            }
        }
    }

    /// A call that needs approval, first asked: approved by a grant, or a new request.
    pub fn ask(&self, a: &Ask<'_>) -> Answer {
        let mut inner = self.inner.lock().expect("approvals");
        self.expire(&mut inner);
        let now = Instant::now();
        if inner
            .grants
            .iter()
            .any(|g| g.workload == a.workload && g.tool == a.tool && g.until > now)
        {
            return Answer::Approved;
        }
        if inner.pending.len() >= MAX_PENDING {
            return Answer::Refused(format!(
                "mcp-guard refused tools/call {:?} (approval-refused): {MAX_PENDING} approval requests are pending already",
                a.tool
            ));
        }
        let id = next_id(&mut inner);
        let wall = SystemTime::now();
        let r = Record {
            id: id.clone(),
            kind: "tool".into(),
            workload: a.workload.to_string(),
            rule: None,
            destination: None,
            instance: a.instance,
            tool: a.tool.to_string(),
            request_id: a.request_id.to_string(),
            session: a.session.map(str::to_string),
            arguments: a.arguments.to_string(),
            requested_at: rfc3339(wall),
            expires_at: rfc3339(wall + a.policy.timeout),
            approvers: a.policy.approvers.clone(),
            state: "pending".into(),
            decided_by: None,
            decided_at: None,
            reason: None,
            grant_until: None,
            deadline: Some(now + a.policy.timeout),
            max_duration: a.policy.max_duration,
            relay_pid: a.relay_pid,
            cgroup: a.cgroup.to_string(),
            webhook: a
                .policy
                .webhook
                .clone()
                .map(|w| (w, a.policy.webhook_secret_file.clone())),
            rule_line: 0,
            grant_addrs: Vec::new(),
            grant_until_unix: None,
        };
        Answer::Pending(self.raise(inner, r))
    }

    /// A connection refused (or a call naming a destination) that an approval rule would
    /// open: a request, unless one for the rule is pending already. Returns the pending
    /// request's id.
    pub fn ask_rule(&self, a: &AskRule<'_>) -> Option<String> {
        let mut inner = self.inner.lock().expect("approvals");
        self.expire(&mut inner);
        if let Some(r) = inner
            .pending
            .values()
            .find(|r| r.kind == "rule" && r.workload == a.workload && r.rule_line == a.rule_line)
        {
            return Some(r.id.clone());
        }
        if inner.pending.len() >= MAX_PENDING {
            return None;
        }
        let id = next_id(&mut inner);
        let wall = SystemTime::now();
        let r = Record {
            id: id.clone(),
            kind: "rule".into(),
            workload: a.workload.to_string(),
            rule: Some(a.rule.to_string()),
            destination: Some(a.destination.to_string()),
            instance: 0,
            tool: String::new(),
            request_id: String::new(),
            session: None,
            arguments: String::new(),
            requested_at: rfc3339(wall),
            expires_at: rfc3339(wall + RULE_REQUEST_TIMEOUT),
            approvers: a.approvers.to_vec(),
            state: "pending".into(),
            decided_by: None,
            decided_at: None,
            reason: None,
            grant_until: None,
            deadline: Some(Instant::now() + RULE_REQUEST_TIMEOUT),
            max_duration: a.max_duration,
            relay_pid: 0,
            cgroup: String::new(),
            webhook: None,
            rule_line: a.rule_line,
            grant_addrs: a.addrs.clone(),
            grant_until_unix: None,
        };
        Some(self.raise(inner, r))
    }

    /// A new pending request, recorded (after the store is unlocked).
    fn raise(&self, mut inner: std::sync::MutexGuard<'_, Inner>, r: Record) -> String {
        let id = r.id.clone();
        inner.pending.insert(id.clone(), r.clone());
        drop(inner);
        self.record(&Happened {
            what: "requested",
            record: r,
        });
        id
    }

    /// A relay asking again about request `id` for its call.
    pub fn check(&self, id: &str, instance: u64, request_id: &str) -> Answer {
        let mut inner = self.inner.lock().expect("approvals");
        self.expire(&mut inner);
        // A tool request answers its own call only; a rule request every call waiting on it.
        let mine = |r: &Record| {
            r.id == id
                && (r.kind == "rule" || (r.instance == instance && r.request_id == request_id))
        };
        if inner.pending.get(id).is_some_and(mine) {
            return Answer::Pending(id.to_string());
        }
        match inner.decided.iter().rev().find(|r| mine(r)) {
            Some(r) if r.state == "approved" => Answer::Approved,
            Some(r) => Answer::Refused(format!(
                "mcp-guard refused tools/call {:?} (approval-{}): {}",
                r.tool,
                r.state,
                r.reason.as_deref().unwrap_or("")
            )),
            None => Answer::Refused(format!(
                "mcp-guard refused the call: no approval request {id} for it (the daemon restarted?); call again to ask anew"
            )),
        }
    }

    /// A person's decision.
    ///
    /// # Errors
    /// See [`DecideError`].
    pub fn decide(
        &self,
        id: &str,
        approve: bool,
        reason: &str,
        grant: Option<Duration>,
        who: Decider,
    ) -> Result<Record, DecideError> {
        let reason = reason.trim();
        if reason.is_empty() {
            return Err(DecideError::NoReason);
        }
        let mut inner = self.inner.lock().expect("approvals");
        self.expire(&mut inner);
        let Some(r) = inner.pending.get(id) else {
            return Err(match inner.decided.iter().find(|r| r.id == id) {
                Some(r) => DecideError::Decided {
                    id: id.into(),
                    state: r.state.clone(),
                },
                None => DecideError::Unknown(id.into()),
            });
        };
        if who.uid != 0 {
            let allowed: Vec<u32> = r
                .approvers
                .iter()
                .filter_map(|g| nix::unistd::Group::from_name(g).ok().flatten())
                .map(|g| g.gid.as_raw())
                .collect();
            if !who.groups.iter().any(|g| allowed.contains(g)) {
                return Err(DecideError::NotAnApprover {
                    uid: who.uid,
                    groups: r.approvers.join(", "),
                });
            }
        }
        let inside = who.cgroup.as_deref().is_some_and(|c| {
            let inst = r.cgroup.trim_end_matches('/');
            !inst.is_empty() && (c == inst || c.starts_with(&format!("{inst}/")))
        });
        if who.pid == r.relay_pid || inside {
            return Err(DecideError::TheAsker(who.pid));
        }
        if let Some(g) = grant {
            if g > r.max_duration {
                return Err(DecideError::TooLong {
                    asked: g.as_secs(),
                    max: r.max_duration.as_secs(),
                });
            }
        }
        let mut r = inner.pending.remove(id).expect("pending");
        // A rule is opened for a time: the one asked for, or its max_duration.
        let grant = if r.kind == "rule" && approve {
            Some(grant.unwrap_or(r.max_duration))
        } else {
            grant
        };
        r.state = if approve { "approved" } else { "denied" }.into();
        r.decided_by = Some(who);
        r.decided_at = Some(rfc3339(SystemTime::now()));
        r.reason = Some(reason.chars().take(512).collect());
        if let (true, Some(g)) = (approve, grant) {
            r.grant_until = Some(rfc3339(SystemTime::now() + g));
            r.grant_until_unix = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .ok()
                .map(|d| (d + g).as_secs());
        }
        if let (true, Some(g), "tool") = (approve, grant, r.kind.as_str()) {
            inner.grants.push(Grant {
                workload: r.workload.clone(),
                tool: r.tool.clone(),
                until: Instant::now() + g,
            });
        }
        keep(&mut inner, r.clone());
        drop(inner);
        self.record(&Happened {
            what: if approve { "approved" } else { "denied" },
            record: r.clone(),
        });
        Ok(r)
    }

    /// Pending requests, and with `all` the decided ones kept.
    pub fn list(&self, all: bool) -> Vec<Record> {
        let mut inner = self.inner.lock().expect("approvals");
        self.expire(&mut inner);
        let mut out: Vec<Record> = inner.pending.values().cloned().collect();
        if all {
            out.extend(inner.decided.iter().cloned());
        }
        out
    }

    /// Requests pending now.
    pub fn pending(&self) -> usize {
        self.inner.lock().expect("approvals").pending.len()
    }
}

/// A new request id, unique across daemon restarts too (a relay still asking about an
/// older id is told it is unknown, never given another call's answer).
fn next_id(inner: &mut Inner) -> String {
    inner.next += 1;
    let since = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!("ap-{since:x}-{}", inner.next)
}

fn keep(inner: &mut Inner, r: Record) {
    inner.decided.push_back(r);
    while inner.decided.len() > KEEP_DECIDED {
        inner.decided.pop_front();
    }
}

impl Record {
    /// The webhook this request goes to, and the file holding its key.
    #[must_use]
    pub fn webhook(&self) -> Option<&(String, Option<PathBuf>)> {
        self.webhook.as_ref()
    }
}

/// The webhook's body: JSON a Slack or Teams incoming webhook takes (`text`), with the
/// request in `approval`.
#[must_use]
pub fn webhook_body(h: &Happened) -> Vec<u8> {
    let r = &h.record;
    let text = match h.what {
        "requested" => format!(
            "mcp-guard: approval needed for tools/call {} ({}) of workload {} — `mcp-guard approvals approve {} --reason TEXT` or `deny` (expires {})",
            r.tool, r.arguments, r.workload, r.id, r.expires_at
        ),
        what => format!(
            "mcp-guard: approval request {} ({} of workload {}) {what}{}",
            r.id,
            r.tool,
            r.workload,
            r.reason.as_deref().map(|x| format!(": {x}")).unwrap_or_default()
        ),
    };
    serde_json::to_vec(&serde_json::json!({
        "text": text,
        "event": h.what,
        "approval": r,
    }))
    .expect("serialisable")
}

/// `sha256=<hex>` of HMAC-SHA256(key, "v1:" + timestamp + ":" + body): the
/// `X-Mcp-Guard-Signature` header, with the timestamp in `X-Mcp-Guard-Timestamp`.
#[must_use]
pub fn signature(key: &[u8], timestamp: u64, body: &[u8]) -> String {
    use hmac::{KeyInit as _, Mac as _};
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key).expect("any key length");
    mac.update(format!("v1:{timestamp}:").as_bytes());
    mac.update(body);
    let out = mac.finalize().into_bytes();
    let hex: String = out.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

#[cfg(test)]
#[path = "approvals_tests.rs"]
mod tests;
