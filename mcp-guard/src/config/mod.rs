//! The TOML config: parsing and validation. Every error names the file, the line and
//! what to fix. Validation is complete before anything touches the kernel, so a bad
//! config never weakens running enforcement.

pub mod budget;
mod daemon_keys;
mod events_keys;
pub mod pods;
pub mod reference;
pub mod relay_keys;
pub mod sets;
pub mod unix_keys;

use std::{
    collections::HashMap,
    fmt,
    net::SocketAddr,
    ops::Range,
    path::{Path, PathBuf},
};

use ipnet::IpNet;
use serde::Deserialize;
use toml::Spanned;

/// A config problem, located in its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file.display(),
            self.line,
            self.column,
            self.message
        )
    }
}

impl std::error::Error for ConfigError {}

/// All the problems found in one config, reported together so a user fixes them in one go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    #[default]
    Enforce,
    Audit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum DefaultAction {
    #[default]
    DenyInternal,
    Deny,
    Allow,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Proto {
    Tcp,
    Udp,
    #[default]
    Any,
}

mod raw;
mod rules;

use raw::*;
pub use raw::{
    DnsConfig, OnExit, TcConfig, DEFAULT_GRACE, DEFAULT_MAX_ADDRESSES, DEFAULT_MAX_TTL,
    DEFAULT_MIN_TTL, DEFAULT_WORKLOAD_IN_FLIGHT, DEFAULT_WORKLOAD_QPS,
};
use rules::*;
pub use rules::{nameservers, parse_cidr, resolv_conf_nameservers, NAMESERVERS};

// ---- validated config -----------------------------------------------------------------

/// Where in the config file something was written, for messages and `explain`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Loc {
    pub line: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BaselineItem {
    Set { name: String, nets: Vec<IpNet> },
    Cidr(IpNet),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaselineEntry {
    pub item: BaselineItem,
    pub text: String,
    pub loc: Loc,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortSpan {
    pub lo: u16,
    pub hi: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowRule {
    pub net: IpNet,
    /// Empty means every port.
    pub ports: Vec<PortSpan>,
    pub proto: Proto,
    /// MCP tools the rule is scoped to (sorted, distinct): it applies only while a call
    /// of one of them is in flight in the caller's `exec --mcp` instance. Empty: always.
    pub tools: Vec<String>,
    pub comment: Option<String>,
    /// `approval = "required"`: the rule is dormant until a person approves a request
    /// for it; the grant opens its addresses until it ends, expiring in the kernel.
    pub approval: Option<relay_keys::RuleApproval>,
    pub loc: Loc,
}

/// A DNS name as a rule names it: one name, or every name below a suffix.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HostPattern {
    /// `api.github.com`
    Exact(String),
    /// `*.slack.com`, holding `slack.com`: any name with at
    /// least one more label, never the suffix itself.
    Wildcard(String),
}

impl HostPattern {
    /// Whether a (normalised: lower case, no trailing dot) name matches.
    #[must_use]
    pub fn matches(&self, name: &str) -> bool {
        match self {
            Self::Exact(n) => n == name,
            Self::Wildcard(suffix) => name
                .strip_suffix(suffix.as_str())
                .and_then(|head| head.strip_suffix('.'))
                .is_some_and(|head| !head.is_empty()),
        }
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exact(n) => f.write_str(n),
            Self::Wildcard(s) => write!(f, "*.{s}"),
        }
    }
}

/// Normalises a DNS name for comparison: lower case, without the root's trailing dot.
#[must_use]
pub fn normalise_name(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// An allow rule by name: the addresses its names resolve to are allowed while their
/// records live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRule {
    pub pattern: HostPattern,
    /// Empty means every port.
    pub ports: Vec<PortSpan>,
    pub proto: Proto,
    /// Answers in the internal ranges are refused unless this is set (rebinding guard).
    pub allow_internal: bool,
    /// As [`AllowRule::tools`].
    pub tools: Vec<String>,
    pub comment: Option<String>,
    pub loc: Loc,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub name: String,
    /// The built-in workload that holds new pod cgroups until the runtime names their
    /// pod ([`pods::PENDING`]); never one of the config's.
    pub pending: bool,
    /// Stable id, derived from the name (see [`workload_ids`]): kept across reloads,
    /// reorderings and restarts, so pinned counters and events follow the name.
    pub id: u32,
    /// Path below the cgroup v2 mount, normalised to start with '/' and have no trailing
    /// '/'; `None` for a workload that selects pods (`pods`).
    pub cgroup: Option<String>,
    /// The Kubernetes pods this workload holds (through the node's container runtime).
    pub pods: Option<pods::PodSelector>,
    pub default: DefaultAction,
    pub mode: Mode,
    pub allow: Vec<AllowRule>,
    /// Rules by DNS name, resolved or learned at run time.
    pub hosts: Vec<HostRule>,
    /// Refuse raw inet sockets (default true): crafted packets bypass connect/sendmsg.
    pub deny_raw_sockets: bool,
    /// Refuse AF_PACKET sockets (default true; needs BPF LSM).
    pub deny_packet_sockets: bool,
    /// The DNS proxy forwards any name this workload asks for (default false: only names
    /// its host rules cover, so DNS cannot carry data out).
    pub resolve_any: bool,
    /// DNS (ports 53 and 853) only where an allow rule allows it, whatever the default
    /// (the DNS proxy is always allowed): closes the way around the proxy's filter for
    /// `deny-internal` and `allow` workloads.
    pub deny_direct_dns: bool,
    /// May create ICMP datagram ("ping") sockets (default false).
    pub allow_ping: bool,
    /// May create inet sockets other than TCP, MPTCP, UDP and ping (UDP-Lite, SCTP, ...;
    /// default false).
    pub allow_other_protocols: bool,
    /// No egress at all while no MCP tool call is in flight in the caller's instance
    /// (`between_calls = "deny"`; default "allow").
    pub deny_between_calls: bool,
    /// AF_UNIX destinations (`unix`, `allow_unix`, `deny_unix`).
    pub unix: unix_keys::UnixPolicy,
    /// `[workload.mcp]`: what its relays decide before a message passes.
    pub relay: relay_keys::RelayPolicy,
    pub loc: Loc,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sink {
    Stdout,
    File,
    None,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub path: PathBuf,
    pub mode: Mode,
    pub baseline: Vec<BaselineEntry>,
    pub workloads: Vec<Workload>,
    pub rate_limit_per_sec: u32,
    pub sink: Sink,
    pub events_file: Option<PathBuf>,
    /// `[events] cmdline = "sink"`: command lines go to the sink too (default: only to
    /// the root-only control socket's stream).
    pub cmdline_in_sink: bool,
    pub metrics_listen: SocketAddr,
    /// cgroup (below the v2 mount) the programs attach to; "/" covers the whole machine.
    pub attach_cgroup: String,
    /// Where the host's cgroup v2 tree is mounted, if not found from mountinfo (in a
    /// container, whose own /sys/fs/cgroup is a namespaced view).
    pub cgroup_root: Option<PathBuf>,
    /// bpffs directory holding the pinned maps and links.
    pub pin_dir: PathBuf,
    pub on_exit: OnExit,
    /// The per-packet backstop on the cgroup (`cgroup_skb/egress`); default on.
    pub cgroup_skb: bool,
    /// The control plane's Unix socket (/status, /events, /dns): owner root, mode 0600,
    /// or 0660 with `control_group`.
    pub control_socket: PathBuf,
    /// Group (id) allowed to use the control socket too.
    pub control_group: Option<u32>,
    /// The Unix socket `exec --mcp` relays report tool calls on (owner root, mode 0600).
    pub mcp_socket: PathBuf,
    /// The container runtime and pod cgroups, for workloads that select pods.
    pub pods: pods::PodsConfig,
    pub tc: TcConfig,
    pub dns: DnsConfig,
    /// Problems that do not stop the config from loading.
    pub warnings: Vec<String>,
}

pub const DEFAULT_RATE_LIMIT: u32 = 100;
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9464";
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/mcp-guard";
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/mcp-guard/control.sock";

/// Workload ids from names: `FIRST_WORKLOAD_ID` plus a hash (FNV-1a) of the name in a
/// space of 2^24, so an id depends on the name and not on the workload's place in the
/// file. Names are taken in sorted order and a collision takes the next free id, so the
/// ids depend only on the set of names (a rare collision can move one id when a
/// colliding name is added).
#[must_use]
pub fn workload_ids<'a>(names: impl Iterator<Item = &'a str>) -> HashMap<String, u32> {
    const SPACE: u32 = 1 << 24;
    let mut sorted: Vec<&str> = names.collect();
    sorted.sort_unstable();
    sorted.dedup();
    let mut used = std::collections::HashSet::new();
    let mut out = HashMap::new();
    for name in sorted {
        let h = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        let mut slot = (h % u64::from(SPACE)) as u32;
        while !used.insert(slot) {
            slot = (slot + 1) % SPACE;
        }
        out.insert(name.to_string(), mcp_guard_common::FIRST_WORKLOAD_ID + slot);
    }
    out
}

/// A group's id, from the group database (getgrnam), or a number.
fn group_id(name: &str) -> Option<u32> {
    if let Ok(n) = name.parse() {
        return Some(n);
    }
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: getgrnam with a valid C string; the result is read at once.
    let g = unsafe { libc::getgrnam(c.as_ptr()) };
    // SAFETY: a non-null result points to a valid group entry.
    (!g.is_null()).then(|| unsafe { (*g).gr_gid })
}

struct Ctx<'a> {
    file: &'a Path,
    text: &'a str,
    /// Byte offset where each line starts: locating a span is a binary search, so a
    /// config with 100,000 rules is checked in linear time.
    line_starts: Vec<usize>,
    errors: Vec<ConfigError>,
}

impl Ctx<'_> {
    fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let line = self.line_starts.partition_point(|&start| start <= offset);
        let column = offset - self.line_starts[line - 1] + 1;
        (line, column)
    }

    fn loc(&self, span: &Range<usize>) -> Loc {
        Loc {
            line: self.line_col(span.start).0,
        }
    }

    fn err(&mut self, span: &Range<usize>, message: impl Into<String>) {
        let (line, column) = self.line_col(span.start);
        self.errors.push(ConfigError {
            file: self.file.to_path_buf(),
            line,
            column,
            message: message.into(),
        });
    }
}

/// Reads and validates a config file.
///
/// # Errors
/// Every problem found, each with file, line and the fix.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            file: path.to_path_buf(),
            line: 0,
            column: 0,
            message: format!("cannot read the config file: {e}"),
        }])
    })?;
    parse(path, &text)
}

/// Parses and validates config text; `path` is only used in messages.
///
/// # Errors
/// Every problem found, each with file, line and the fix.
pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigErrors> {
    let line_starts = std::iter::once(0)
        .chain(text.match_indices('\n').map(|(i, _)| i + 1))
        .collect();
    let mut cx = Ctx {
        file: path,
        text,
        line_starts,
        errors: Vec::new(),
    };
    let raw: RawConfig = match toml::from_str(text) {
        Ok(raw) => raw,
        Err(e) => {
            let span = e.span().unwrap_or(0..0);
            let msg = e.message().trim().to_string();
            cx.err(&span, hint_for_toml_error(&msg));
            return Err(ConfigErrors(cx.errors));
        }
    };
    let mut warnings = Vec::new();

    let baseline = match raw.baseline {
        // Secure default: without a [baseline] table the metadata services are still denied.
        None => vec![BaselineEntry {
            item: BaselineItem::Set {
                name: "metadata".into(),
                nets: sets::named("metadata").expect("built-in set").to_vec(),
            },
            text: "metadata".into(),
            loc: Loc::default(),
        }],
        Some(b) => {
            if b.deny.is_empty() {
                warnings.push(format!(
                    "{}: [baseline] deny is empty: cloud metadata services are reachable from every workload; add deny = [\"metadata\"]",
                    path.display()
                ));
            }
            b.deny
                .iter()
                .filter_map(|s| baseline_entry(&mut cx, s))
                .collect()
        }
    };

    let dns = dns_config(&mut cx, &raw.dns);
    let mut workloads = Vec::new();
    let mut names: HashMap<String, usize> = HashMap::new();
    let mut cgroups: HashMap<String, usize> = HashMap::new();
    for w in &raw.workload {
        let loc = cx.loc(&w.name.span());
        let name = w.name.get_ref().trim().to_string();
        if name.is_empty() {
            cx.err(
                &w.name.span(),
                "workload name is empty: give each [[workload]] a unique name",
            );
        } else if let Some(first) = names.insert(name.clone(), loc.line) {
            cx.err(
                &w.name.span(),
                format!("duplicate workload name {name:?} (first defined on line {first}): names must be unique"),
            );
        }
        if name.chars().any(char::is_control) {
            cx.err(
                &w.name.span(),
                format!("workload name {name:?} holds a control character, which would garble logs and events: use letters, digits, '-', '_' and '.'"),
            );
        }
        if name == pods::PENDING {
            cx.err(&w.name.span(), format!("workload name {name:?} is reserved for pods not yet identified: choose another"));
        }
        if name == pods::PROXY {
            cx.err(&w.name.span(), format!("workload name {name:?} is reserved for the MCP proxy sidecars of pods (pods.mcp_proxy): choose another"));
        }
        let (cgroup, selector) = match (&w.cgroup, &w.pods) {
            (Some(c), None) => {
                let Some(cgroup) = normalise_cgroup(&mut cx, c) else {
                    continue;
                };
                if let Some(first) = cgroups.insert(cgroup.clone(), loc.line) {
                    cx.err(
                        &c.span(),
                        format!("duplicate workload cgroup {cgroup:?} (first used on line {first}): each cgroup belongs to one workload"),
                    );
                }
                (Some(cgroup), None)
            }
            (None, Some(p)) => {
                let Some(sel) = pods::selector(&mut cx, p) else {
                    continue;
                };
                if sel.annotation && sel.namespace.is_none() {
                    warnings.push(format!("{}:{}: workload {name:?} takes pods by annotation from every namespace: any pod can join it by annotating itself {}={name}, also a pod another workload selects by its labels (the annotation is looked at first); set pods.namespace, or admit the annotation by policy", path.display(), loc.line, pods::ANNOTATION));
                }
                (None, Some(sel))
            }
            (Some(c), Some(_)) => {
                cx.err(&c.span(), format!("workload {name:?} names both a cgroup and [workload.pods]: a workload holds either a cgroup (VMs, systemd units) or pods"));
                continue;
            }
            (None, None) => {
                cx.err(&w.name.span(), format!("workload {name:?} has neither cgroup = \"/...\" nor a [workload.pods] table: say which processes it guards"));
                continue;
            }
        };
        let mut allow = Vec::new();
        let mut hosts = Vec::new();
        for a in &w.allow {
            for rule in allow_rule(&mut cx, a, &dns) {
                match rule {
                    Rule::Cidr(r) => allow.push(r),
                    Rule::Host(r) => hosts.push(r),
                }
            }
        }
        let deny_between_calls = mcp_keys(&mut cx, w, &name, &allow, &hosts);
        let unix = unix_keys::unix_keys(&mut cx, w.unix.as_ref(), &w.allow_unix, &w.deny_unix);
        let relay = relay_keys::relay_keys(&mut cx, w.mcp.as_ref());
        workloads.push(Workload {
            name,
            pending: false,
            id: 0,
            cgroup,
            pods: selector,
            default: w.default,
            mode: w
                .mode
                .unwrap_or_else(|| raw.mode.as_ref().map_or(Mode::Enforce, |m| *m.get_ref())),
            allow,
            hosts,
            deny_raw_sockets: w.deny_raw_sockets.unwrap_or(true),
            deny_packet_sockets: w.deny_packet_sockets.unwrap_or(true),
            resolve_any: w.resolve_any.unwrap_or(false),
            deny_direct_dns: w.deny_direct_dns.unwrap_or(false),
            allow_ping: w.allow_ping.unwrap_or(false),
            allow_other_protocols: w.allow_other_protocols.unwrap_or(false),
            deny_between_calls,
            unix,
            relay,
            loc,
        });
    }

    let events_keys::EventKeys {
        rate_limit_per_sec,
        sink,
        cmdline_in_sink,
    } = events_keys::event_keys(&mut cx, &raw.events);
    let pods_cfg = pods::pods_config(
        &mut cx,
        raw.daemon.cri_socket.as_ref(),
        raw.daemon.pod_cgroups.as_ref(),
        raw.daemon.cri_poll_ms.as_ref(),
    );
    let daemon_keys::DaemonPaths {
        attach_cgroup,
        pin_dir,
        control_socket,
        mcp_socket,
        control_group,
    } = daemon_keys::daemon_paths(&mut cx, &raw.daemon);
    if let Some(first) = workloads.iter().find(|w| w.pods.is_some()) {
        // Every new pod is held (all egress denied) until the daemon knows whose it is.
        let mode = raw.mode.as_ref().map_or(Mode::Enforce, |m| *m.get_ref());
        let loc = first.loc;
        workloads.extend(pods::pending_workloads(&pods_cfg, mode, &loc));
        if let Some(w) = workloads
            .iter()
            .find(|w| w.pods.as_ref().is_some_and(|p| p.mcp_proxy.is_some()))
        {
            // The MCP proxy sidecars' containers: loopback and the MCP socket only.
            let loc = w.loc;
            workloads.push(pods::proxy_workload(&mcp_socket, mode, &loc));
        }
    }
    let ids = workload_ids(workloads.iter().map(|w| w.name.as_str()));
    for w in &mut workloads {
        w.id = ids[&w.name];
    }
    let metrics_listen = match &raw.metrics.listen {
        None => DEFAULT_LISTEN.parse().expect("valid default"),
        Some(s) => s.get_ref().parse().unwrap_or_else(|_| {
            cx.err(
                &s.span(),
                format!(
                    "metrics.listen {:?} is not ADDR:PORT, e.g. \"127.0.0.1:9464\"",
                    s.get_ref()
                ),
            );
            DEFAULT_LISTEN.parse().expect("valid default")
        }),
    };
    let global_mode = raw.mode.as_ref().map_or(Mode::Enforce, |m| *m.get_ref());
    // Enforcement outlives the daemon by default; a dry run (audit) cleans up after itself.
    let on_exit = raw
        .daemon
        .on_exit
        .unwrap_or(if global_mode == Mode::Enforce {
            OnExit::Keep
        } else {
            OnExit::Detach
        });
    if attach_cgroup != "/" {
        for w in &workloads {
            let Some(c) = &w.cgroup else { continue };
            if !(*c == attach_cgroup || c.starts_with(&format!("{attach_cgroup}/"))) {
                warnings.push(format!(
                    "{}:{}: workload {:?} cgroup {} is outside daemon.attach_cgroup {}: it will not be enforced",
                    path.display(), w.loc.line, w.name, c, attach_cgroup
                ));
            }
        }
    }

    let cgroup_skb = raw.daemon.cgroup_skb.unwrap_or(true);
    if !cgroup_skb {
        warnings.push(format!(
            "{}: [daemon] cgroup_skb = false: the per-packet backstop on the cgroup is off, so packets the socket hooks never judge (ping and raw sockets a workload is allowed, flows after a policy change) are judged only by TC where it runs; meant for testing the TC layer alone",
            path.display()
        ));
    }
    warnings.extend(lint::warnings(path, &baseline, &workloads, dns.proxy));
    warnings.extend(budget::warning(path, &workloads));
    if !cx.errors.is_empty() {
        return Err(ConfigErrors(cx.errors));
    }
    Ok(Config {
        path: path.to_path_buf(),
        mode: raw.mode.map_or(Mode::Enforce, |m| m.into_inner()),
        baseline,
        workloads,
        rate_limit_per_sec,
        sink,
        cmdline_in_sink,
        events_file: raw.events.file,
        metrics_listen,
        attach_cgroup,
        pin_dir,
        cgroup_root: raw.daemon.cgroup_root,
        control_socket,
        control_group,
        mcp_socket,
        pods: pods_cfg,
        tc: TcConfig {
            enabled: raw.tc.enabled.unwrap_or(true),
            interfaces: raw.tc.interfaces.unwrap_or_else(|| vec!["*".into()]),
            pod_interfaces: raw.tc.pod_interfaces,
            netns: raw.tc.netns,
        },
        on_exit,
        cgroup_skb,
        dns,
        warnings,
    })
}

mod lint;
#[cfg(test)]
mod tests;
