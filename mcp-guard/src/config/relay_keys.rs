//! `[workload.mcp]`: policy at the relay. What an `exec --mcp` relay (or the HTTP proxy,
//! or a pod's `mcp-proxy` sidecar) decides before a message reaches the server or the
//! client: which tools may be listed and called (`allow_tools`, `deny_tools`), whether a
//! tool whose definition changes mid-session is refused (`pin_tools`), whether a call
//! whose arguments name a destination the workload's policy refuses is answered by the
//! relay (`check_arguments`), and whether credentials in tool results and arguments are
//! masked (`mask`).

use globset::{Glob, GlobMatcher};
use serde::{Deserialize, Serialize};
use toml::Spanned;

use super::{Ctx, Loc};

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMcp {
    #[serde(default)]
    pub(super) allow_tools: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    pub(super) deny_tools: Vec<Spanned<String>>,
    #[serde(default)]
    pub(super) pin_tools: Option<bool>,
    #[serde(default)]
    pub(super) check_arguments: Option<bool>,
    #[serde(default)]
    pub(super) mask: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) approval_tools: Vec<Spanned<String>>,
    #[serde(default)]
    pub(super) approvers: Vec<Spanned<String>>,
    #[serde(default)]
    pub(super) approval_timeout: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) max_duration: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) approval_webhook: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) approval_webhook_secret_file: Option<Spanned<String>>,
}

/// What the relay does with credentials it finds in tool results and arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mask {
    /// Nothing is looked for.
    #[default]
    Off,
    /// Found credentials are counted and reported; the bytes pass unchanged.
    Report,
    /// Found credentials are replaced by `[REDACTED:<kind>]` inside their JSON strings.
    Secrets,
}

/// One tool name pattern (`fetch`, `query_*`, `*_admin`): `*` any run of characters,
/// `?` one, `[...]` a class.
#[derive(Debug, Clone)]
pub struct ToolGlob {
    pub text: String,
    pub loc: Loc,
    matcher: GlobMatcher,
}

impl PartialEq for ToolGlob {
    fn eq(&self, o: &Self) -> bool {
        self.text == o.text && self.loc == o.loc
    }
}
impl Eq for ToolGlob {}

impl ToolGlob {
    /// A pattern as the config writes it; `Err` says what is wrong with it.
    ///
    /// # Errors
    /// Empty, longer than 128 characters, or not a glob.
    pub fn new(text: &str, loc: Loc) -> Result<Self, String> {
        if text.is_empty() || text.chars().count() > 128 {
            return Err(format!(
                "tool pattern {text:?}: give a tool name or a glob of 1 to 128 characters"
            ));
        }
        let glob = Glob::new(text).map_err(|e| format!("tool pattern {text:?}: {e}"))?;
        Ok(Self {
            text: text.to_string(),
            loc,
            matcher: glob.compile_matcher(),
        })
    }

    #[must_use]
    pub fn matches(&self, tool: &str) -> bool {
        self.matcher.is_match(tool)
    }
}

/// A workload's policy at the relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayPolicy {
    /// `None`: every tool not denied. `Some([])`: no tool at all.
    pub allow_tools: Option<Vec<ToolGlob>>,
    pub deny_tools: Vec<ToolGlob>,
    /// A tool whose name, description or input schema changed since the session's first
    /// `tools/list` is refused (always reported).
    pub pin_tools: bool,
    /// Destinations named in a call's arguments are judged by the workload's policy.
    pub check_arguments: bool,
    pub mask: Mask,
    /// Calls of these tools are held until a person approves them.
    pub approval: Option<ApprovalPolicy>,
    /// Where `[workload.mcp]` was written (0: not written, the defaults).
    pub loc: Loc,
}

/// Just-in-time approval of tool calls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApprovalPolicy {
    pub tools: Vec<ToolGlob>,
    /// Unix groups whose members may approve or deny (root always may).
    pub approvers: Vec<String>,
    /// A request nobody answered within this is refused.
    pub timeout: std::time::Duration,
    /// The longest grant `approve --for` may give.
    pub max_duration: std::time::Duration,
    /// `http://host:port/path`: each request is POSTed there, signed.
    pub webhook: Option<String>,
    /// The HMAC-SHA256 key for the webhook's signature (read when a request is made).
    pub webhook_secret_file: Option<std::path::PathBuf>,
}

/// An allow rule that waits for approval (`approval = "required"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleApproval {
    /// Unix groups whose members may approve (root always may).
    pub approvers: Vec<String>,
    /// How long an approval opens the rule (also the longest `--for`).
    pub max_duration: std::time::Duration,
}

/// Addresses at most in a rule that waits for approval: a grant installs each.
pub const MAX_APPROVAL_ADDRESSES: u128 = 256;

/// The approval keys of an allow rule. `Err`: reported.
pub(super) fn rule_approval(
    cx: &mut Ctx<'_>,
    a: &super::raw::RawAllow,
    target: &Result<Vec<ipnet::IpNet>, super::HostPattern>,
) -> Result<Option<RuleApproval>, ()> {
    let Some(v) = &a.approval else {
        let stray = a
            .approvers
            .first()
            .map(|g| (g.span(), "approvers"))
            .or_else(|| a.max_duration.as_ref().map(|d| (d.span(), "max_duration")));
        if let Some((span, key)) = stray {
            cx.err(&span, format!("allow.{key} is set but the rule has no approval = \"required\": add it, or remove the key"));
            return Err(());
        }
        return Ok(None);
    };
    if v.get_ref() != "required" {
        cx.err(&v.span(), format!("allow.approval = {:?}: the only value is \"required\" (the rule opens only when a person approves a request for it)", v.get_ref()));
        return Err(());
    }
    match target {
        Err(_) => {
            cx.err(&v.span(), "allow.approval on a host rule is not supported yet: give the destination as cidr (at most 256 addresses)");
            return Err(());
        }
        Ok(nets) => {
            for n in nets {
                let bits = u32::from(n.max_prefix_len() - n.prefix_len());
                if bits >= 128 || (1u128 << bits) > MAX_APPROVAL_ADDRESSES {
                    cx.err(&v.span(), format!("allow.approval: {n} holds more than {MAX_APPROVAL_ADDRESSES} addresses; an approval opens each address of the rule in the kernel: narrow the cidr (IPv4 /24 or longer)"));
                    return Err(());
                }
            }
        }
    }
    for g in &a.approvers {
        if nix::unistd::Group::from_name(g.get_ref())
            .ok()
            .flatten()
            .is_none()
        {
            cx.err(&g.span(), format!("allow.approvers: {:?} is not a group on this machine (getent group): name the Unix group whose members may approve", g.get_ref()));
            return Err(());
        }
    }
    let max_duration = dur(cx, a.max_duration.as_ref(), "allow.max_duration", 900);
    Ok(Some(RuleApproval {
        approvers: a.approvers.iter().map(|g| g.get_ref().clone()).collect(),
        max_duration,
    }))
}

/// `30s`, `5m`, `1h` or a number of seconds.
///
/// # Errors
/// Not one of those, or zero.
pub fn duration(text: &str) -> Result<std::time::Duration, String> {
    let t = text.trim();
    let (num, unit) = match t.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => t.split_at(i),
        None => (t, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{text:?} is not a duration: write 30s, 5m or 1h"))?;
    let secs = match unit {
        "s" => n,
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3600),
        _ => {
            return Err(format!(
                "{text:?}: the unit must be s, m or h (30s, 5m, 1h)"
            ))
        }
    };
    if secs == 0 {
        return Err(format!("{text:?}: a duration must be more than zero"));
    }
    Ok(std::time::Duration::from_secs(secs))
}

impl Default for RelayPolicy {
    fn default() -> Self {
        Self {
            allow_tools: None,
            deny_tools: Vec::new(),
            pin_tools: false,
            check_arguments: true,
            mask: Mask::Off,
            approval: None,
            loc: Loc::default(),
        }
    }
}

/// Why the relay refuses a tool: the reason (an event's `reason`) and the rule as text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolRefusal {
    pub reason: &'static str,
    pub rule: String,
}

impl RelayPolicy {
    /// Whether a tool may be listed and called, and if not which key refuses it.
    #[must_use]
    pub fn tool_refusal(&self, tool: &str, file: &std::path::Path) -> Option<ToolRefusal> {
        let at = |g: &ToolGlob| format!("{}:{}", file.display(), g.loc.line);
        if let Some(g) = self.deny_tools.iter().find(|g| g.matches(tool)) {
            return Some(ToolRefusal {
                reason: "tool-denied",
                rule: format!("deny_tools {:?} ({})", g.text, at(g)),
            });
        }
        match &self.allow_tools {
            Some(allow) if !allow.iter().any(|g| g.matches(tool)) => Some(ToolRefusal {
                reason: "tool-not-allowed",
                rule: format!(
                    "allow_tools [{}] ({}:{}) does not name it",
                    allow
                        .iter()
                        .map(|g| format!("{:?}", g.text))
                        .collect::<Vec<_>>()
                        .join(", "),
                    file.display(),
                    self.loc.line
                ),
            }),
            _ => None,
        }
    }

    /// Whether anything here can refuse a call (the relay then refuses calls while the
    /// daemon cannot be asked: fail closed).
    #[must_use]
    pub fn refuses_calls(&self) -> bool {
        self.allow_tools.is_some()
            || !self.deny_tools.is_empty()
            || self.pin_tools
            || self.approval.is_some()
    }

    /// Whether a call of `tool` waits for a person's approval.
    #[must_use]
    pub fn needs_approval(&self, tool: &str) -> Option<&ApprovalPolicy> {
        self.approval
            .as_ref()
            .filter(|a| a.tools.iter().any(|g| g.matches(tool)))
    }
}

pub(super) fn relay_keys(cx: &mut Ctx<'_>, raw: Option<&Spanned<RawMcp>>) -> RelayPolicy {
    let Some(raw) = raw else {
        return RelayPolicy::default();
    };
    let loc = cx.loc(&raw.span());
    let raw = raw.get_ref();
    let allow_tools = raw
        .allow_tools
        .as_deref()
        .map(|l| globs_of(cx, l, "allow_tools"));
    let deny_tools = globs_of(cx, &raw.deny_tools, "deny_tools");
    let mask = match &raw.mask {
        None => Mask::Off,
        Some(m) => match m.get_ref().as_str() {
            "off" => Mask::Off,
            "report" => Mask::Report,
            "secrets" => Mask::Secrets,
            other => {
                cx.err(
                    &m.span(),
                    format!("mask = {other:?}: use \"off\" (default), \"report\" (count and report credentials in tool results and arguments) or \"secrets\" (replace them with [REDACTED:<kind>])"),
                );
                Mask::Off
            }
        },
    };
    let approval = approval_keys(cx, raw);
    RelayPolicy {
        allow_tools,
        deny_tools,
        pin_tools: raw.pin_tools.unwrap_or(false),
        check_arguments: raw.check_arguments.unwrap_or(true),
        mask,
        approval,
        loc,
    }
}

fn globs_of(cx: &mut Ctx<'_>, list: &[Spanned<String>], key: &str) -> Vec<ToolGlob> {
    list.iter()
        .filter_map(|s| {
            let loc = cx.loc(&s.span());
            ToolGlob::new(s.get_ref().trim(), loc)
                .map_err(|e| cx.err(&s.span(), format!("{key}: {e}")))
                .ok()
        })
        .collect()
}

/// A duration key, or its default (an error reported when it does not parse).
fn dur(
    cx: &mut Ctx<'_>,
    v: Option<&Spanned<String>>,
    key: &str,
    default: u64,
) -> std::time::Duration {
    let default = std::time::Duration::from_secs(default);
    match v {
        None => default,
        Some(v) => duration(v.get_ref()).unwrap_or_else(|e| {
            cx.err(&v.span(), format!("{key}: {e}"));
            default
        }),
    }
}

fn approval_keys(cx: &mut Ctx<'_>, raw: &RawMcp) -> Option<ApprovalPolicy> {
    let timeout = dur(cx, raw.approval_timeout.as_ref(), "approval_timeout", 300);
    let max_duration = dur(cx, raw.max_duration.as_ref(), "max_duration", 3600);
    for g in &raw.approvers {
        if nix::unistd::Group::from_name(g.get_ref())
            .ok()
            .flatten()
            .is_none()
        {
            cx.err(&g.span(), format!("approvers: {:?} is not a group on this machine (getent group): name the Unix group whose members may approve", g.get_ref()));
        }
    }
    let webhook = raw.approval_webhook.as_ref().and_then(|w| {
        let u = w.get_ref();
        if u.starts_with("http://") && u.len() > 7 {
            Some(u.clone())
        } else {
            cx.err(&w.span(), format!("approval_webhook {u:?}: give an http:// URL (for Slack or Teams, a relay on this host or cluster that forwards to their https:// incoming webhook)"));
            None
        }
    });
    let secret = raw
        .approval_webhook_secret_file
        .as_ref()
        .map(|f| std::path::PathBuf::from(f.get_ref()));
    if let (Some(w), None) = (&raw.approval_webhook, &secret) {
        cx.err(&w.span(), "approval_webhook needs approval_webhook_secret_file: the key its requests are signed with (HMAC-SHA256)");
    }
    let tools = globs_of(cx, &raw.approval_tools, "approval_tools");
    if tools.is_empty() {
        let stray = raw
            .approvers
            .first()
            .map(|g| (g.span(), "approvers"))
            .or_else(|| {
                raw.approval_webhook
                    .as_ref()
                    .map(|w| (w.span(), "approval_webhook"))
            });
        if let Some((span, key)) = stray {
            cx.err(&span, format!("{key} is set but approval_tools names no tool: say which tools' calls wait for approval"));
        }
        return None;
    }
    Some(ApprovalPolicy {
        tools,
        approvers: raw.approvers.iter().map(|g| g.get_ref().clone()).collect(),
        timeout,
        max_duration,
        webhook,
        webhook_secret_file: secret,
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    fn parse(keys: &str) -> Result<super::RelayPolicy, String> {
        let text = format!("[[workload]]\nname = \"w\"\ncgroup = \"/w\"\n[workload.mcp]\n{keys}");
        super::super::parse(Path::new("t.toml"), &text)
            .map(|c| c.workloads[0].relay.clone())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn keys_parse_and_mistakes_name_their_line() {
        let p = parse("deny_tools = [\"drop_*\"]\nallow_tools = [\"q?\", \"fetch\"]\nmask = \"secrets\"\npin_tools = true\n").unwrap();
        assert!(p
            .tool_refusal("drop_table", Path::new("t.toml"))
            .is_some_and(|r| r.reason == "tool-denied" && r.rule.contains("t.toml:5")));
        assert!(p.tool_refusal("q1", Path::new("t.toml")).is_none());
        assert!(p
            .tool_refusal("other", Path::new("t.toml"))
            .is_some_and(|r| r.reason == "tool-not-allowed"));
        assert!(p.refuses_calls() && p.check_arguments);
        let d = parse("").unwrap();
        assert!(!d.refuses_calls() && d.check_arguments && d.approval.is_none());
        for (keys, want) in [
            ("mask = \"all\"\n", "t.toml:5:8: mask = \"all\""),
            (
                "deny_tools = [\"[a\"]\n",
                "t.toml:5:15: deny_tools: tool pattern \"[a\"",
            ),
            ("deny_tools = [\"\"]\n", "1 to 128 characters"),
            (
                "approval_tools = [\"x\"]\napproval_timeout = \"5 minutes\"\n",
                "t.toml:6:20: approval_timeout",
            ),
            (
                "approval_tools = [\"x\"]\napprovers = [\"no-such-group-here\"]\n",
                "not a group on this machine",
            ),
            (
                "approval_tools = [\"x\"]\napproval_webhook = \"https://hooks.slack.com/x\"\n",
                "give an http:// URL",
            ),
            (
                "approval_tools = [\"x\"]\napproval_webhook = \"http://127.0.0.1:9/h\"\n",
                "needs approval_webhook_secret_file",
            ),
            ("approvers = [\"root\"]\n", "approval_tools names no tool"),
            ("zz = 1\n", "unknown field `zz`"),
        ] {
            let e = parse(keys).unwrap_err();
            assert!(e.contains(want), "{keys}: {e}");
        }
        let a = parse(
            "approval_tools = [\"deploy*\"]\napprovers = [\"root\"]\nmax_duration = \"2h\"\n",
        )
        .unwrap();
        let ap = a.needs_approval("deploy_prod").expect("needs approval");
        assert_eq!(ap.timeout.as_secs(), 300);
        assert_eq!(ap.max_duration.as_secs(), 7200);
        assert!(a.needs_approval("fetch").is_none());
    }

    #[test]
    fn durations() {
        assert_eq!(super::duration("30s").unwrap().as_secs(), 30);
        assert_eq!(super::duration("5m").unwrap().as_secs(), 300);
        assert_eq!(super::duration("1h").unwrap().as_secs(), 3600);
        assert_eq!(super::duration("90").unwrap().as_secs(), 90);
        for bad in ["", "0s", "5d", "m", "-1s"] {
            assert!(super::duration(bad).is_err(), "{bad}");
        }
    }
}
