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
    /// Where `[workload.mcp]` was written (0: not written, the defaults).
    pub loc: Loc,
}

impl Default for RelayPolicy {
    fn default() -> Self {
        Self {
            allow_tools: None,
            deny_tools: Vec::new(),
            pin_tools: false,
            check_arguments: true,
            mask: Mask::Off,
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
        self.allow_tools.is_some() || !self.deny_tools.is_empty() || self.pin_tools
    }
}

pub(super) fn relay_keys(cx: &mut Ctx<'_>, raw: Option<&Spanned<RawMcp>>) -> RelayPolicy {
    let Some(raw) = raw else {
        return RelayPolicy::default();
    };
    let loc = cx.loc(&raw.span());
    let raw = raw.get_ref();
    let mut globs = |list: &[Spanned<String>], key: &str| -> Vec<ToolGlob> {
        list.iter()
            .filter_map(|s| {
                let loc = cx.loc(&s.span());
                ToolGlob::new(s.get_ref().trim(), loc)
                    .map_err(|e| cx.err(&s.span(), format!("{key}: {e}")))
                    .ok()
            })
            .collect()
    };
    let allow_tools = raw.allow_tools.as_deref().map(|l| globs(l, "allow_tools"));
    let deny_tools = globs(&raw.deny_tools, "deny_tools");
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
    RelayPolicy {
        allow_tools,
        deny_tools,
        pin_tools: raw.pin_tools.unwrap_or(false),
        check_arguments: raw.check_arguments.unwrap_or(true),
        mask,
        loc,
    }
}
