//! The TOML config: parsing and validation. Every error names the file, the line and
//! what to fix. Validation is complete before anything touches the kernel, so a bad
//! config never weakens running enforcement.

pub mod sets;

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

// ---- raw TOML shape -------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    mode: Option<Spanned<Mode>>,
    #[serde(default)]
    baseline: Option<RawBaseline>,
    #[serde(default)]
    workload: Vec<RawWorkload>,
    #[serde(default)]
    events: RawEvents,
    #[serde(default)]
    metrics: RawMetrics,
    #[serde(default)]
    daemon: RawDaemon,
    #[serde(default)]
    tc: RawTc,
    #[serde(default)]
    dns: RawDns,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDns {
    #[serde(default)]
    nameservers: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    netns: Option<PathBuf>,
    #[serde(default)]
    proxy: Option<Spanned<String>>,
    #[serde(default)]
    min_ttl: Option<Spanned<i64>>,
    #[serde(default)]
    max_ttl: Option<Spanned<i64>>,
    #[serde(default)]
    grace: Option<Spanned<i64>>,
    #[serde(default)]
    max_addresses: Option<Spanned<i64>>,
    #[serde(default)]
    workload_queries_per_sec: Option<Spanned<i64>>,
    #[serde(default)]
    workload_in_flight: Option<Spanned<i64>>,
}

/// How hostname rules are resolved and learned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsConfig {
    /// Upstream servers; empty means those of /etc/resolv.conf at start.
    pub nameservers: Vec<SocketAddr>,
    /// Network namespace (a /run/netns path) the resolver and the proxy live in: names
    /// are resolved as the workloads see them. Default: the daemon's own.
    pub netns: Option<PathBuf>,
    /// Where the DNS proxy listens (UDP). Workloads that resolve through it teach the
    /// daemon the addresses of their names, which wildcard rules need.
    pub proxy: Option<SocketAddr>,
    /// Record TTLs are clamped to `min_ttl..=max_ttl` seconds.
    pub min_ttl: u32,
    pub max_ttl: u32,
    /// Seconds a learned address stays allowed after its (clamped) TTL ran out.
    pub grace: u32,
    /// Learned addresses per workload at most: a workload asking for endless names under
    /// a wildcard cannot grow the policy without bound.
    pub max_addresses: u32,
    /// Queries per second one workload may send the proxy (a token bucket holding one
    /// second's worth): one workload cannot starve the others' DNS.
    pub workload_queries_per_sec: u32,
    /// Queries of one workload the proxy works on at once.
    pub workload_in_flight: u32,
}

pub const DEFAULT_MIN_TTL: u32 = 5;
pub const DEFAULT_MAX_TTL: u32 = 3600;
pub const DEFAULT_GRACE: u32 = 30;
pub const DEFAULT_MAX_ADDRESSES: u32 = 1024;
pub const DEFAULT_WORKLOAD_QPS: u32 = 100;
pub const DEFAULT_WORKLOAD_IN_FLIGHT: u32 = 32;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTc {
    #[serde(default)]
    enabled: Option<bool>,
    #[serde(default)]
    interfaces: Option<Vec<String>>,
    #[serde(default)]
    pod_interfaces: Vec<String>,
    #[serde(default)]
    netns: Option<PathBuf>,
}

/// The packet-level backstop (TC classifier).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcConfig {
    pub enabled: bool,
    /// VM mode: egress of these interfaces (globs); default every non-loopback one.
    pub interfaces: Vec<String>,
    /// Pod mode: ingress of these (node-side veth) interfaces, by source address.
    pub pod_interfaces: Vec<String>,
    /// Network namespace whose interfaces are meant (a /run/netns path); default the
    /// daemon's own.
    pub netns: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBaseline {
    #[serde(default)]
    deny: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWorkload {
    name: Spanned<String>,
    cgroup: Spanned<String>,
    #[serde(default)]
    default: DefaultAction,
    #[serde(default)]
    mode: Option<Mode>,
    #[serde(default)]
    allow: Vec<Spanned<RawAllow>>,
    #[serde(default)]
    deny_raw_sockets: Option<bool>,
    #[serde(default)]
    deny_packet_sockets: Option<bool>,
    #[serde(default)]
    resolve_any: Option<bool>,
    #[serde(default)]
    deny_direct_dns: Option<bool>,
    #[serde(default)]
    allow_ping: Option<bool>,
    #[serde(default)]
    allow_other_protocols: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAllow {
    #[serde(default)]
    cidr: Option<Spanned<String>>,
    #[serde(default)]
    host: Option<Spanned<String>>,
    #[serde(default)]
    allow_internal: Option<Spanned<bool>>,
    #[serde(default)]
    ports: Vec<Spanned<toml::Value>>,
    #[serde(default)]
    proto: Proto,
    #[serde(default)]
    comment: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawEvents {
    #[serde(default)]
    rate_limit_per_sec: Option<Spanned<i64>>,
    #[serde(default)]
    sink: Option<Spanned<String>>,
    #[serde(default)]
    file: Option<PathBuf>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    #[serde(default)]
    listen: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDaemon {
    #[serde(default)]
    attach_cgroup: Option<Spanned<String>>,
    #[serde(default)]
    pin_dir: Option<Spanned<String>>,
    #[serde(default)]
    cgroup_root: Option<PathBuf>,
    #[serde(default)]
    on_exit: Option<OnExit>,
    #[serde(default)]
    cgroup_skb: Option<bool>,
    #[serde(default)]
    control_socket: Option<Spanned<String>>,
    #[serde(default)]
    control_group: Option<Spanned<String>>,
}

/// What `run` does with the kernel programs when it exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnExit {
    /// Leave programs, links and maps pinned: enforcement continues without the daemon.
    Keep,
    /// Detach everything and remove the pins.
    Detach,
}

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
    pub comment: Option<String>,
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
    pub comment: Option<String>,
    pub loc: Loc,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub name: String,
    /// Stable id, derived from the name (see [`workload_ids`]): kept across reloads,
    /// reorderings and restarts, so pinned counters and events follow the name.
    pub id: u32,
    /// Path below the cgroup v2 mount, normalised to start with '/' and have no trailing '/'.
    pub cgroup: String,
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
        let Some(cgroup) = normalise_cgroup(&mut cx, &w.cgroup) else {
            continue;
        };
        if let Some(first) = cgroups.insert(cgroup.clone(), loc.line) {
            cx.err(
                &w.cgroup.span(),
                format!("duplicate workload cgroup {cgroup:?} (first used on line {first}): each cgroup belongs to one workload"),
            );
        }
        let mut allow = Vec::new();
        let mut hosts = Vec::new();
        for a in &w.allow {
            match allow_rule(&mut cx, a, dns.proxy.is_some()) {
                Some(Rule::Cidr(r)) => allow.push(r),
                Some(Rule::Host(r)) => hosts.push(r),
                None => {}
            }
        }
        workloads.push(Workload {
            name,
            id: 0,
            cgroup,
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
            loc,
        });
    }

    let rate_limit_per_sec = match &raw.events.rate_limit_per_sec {
        None => DEFAULT_RATE_LIMIT,
        Some(v) => match u32::try_from(*v.get_ref()) {
            Ok(n) => n,
            Err(_) => {
                cx.err(
                    &v.span(),
                    "events.rate_limit_per_sec must be between 0 (no limit) and 4294967295",
                );
                DEFAULT_RATE_LIMIT
            }
        },
    };
    let sink = match raw
        .events
        .sink
        .as_ref()
        .map(|s| (s.get_ref().as_str(), s.span()))
    {
        None | Some(("stdout", _)) => Sink::Stdout,
        Some(("file", span)) => {
            if raw.events.file.is_none() {
                cx.err(
                    &span,
                    "events.sink = \"file\" needs events.file = \"/path/to/events.jsonl\"",
                );
            }
            Sink::File
        }
        Some(("none", _)) => Sink::None,
        Some((other, span)) => {
            cx.err(
                &span,
                format!("unknown events.sink {other:?}: use \"stdout\", \"file\" or \"none\""),
            );
            Sink::Stdout
        }
    };
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
    let attach_cgroup = match &raw.daemon.attach_cgroup {
        None => "/".to_string(),
        Some(s) => {
            let p = s.get_ref().trim_end_matches('/');
            if s.get_ref().starts_with('/') && !s.get_ref().contains("..") {
                if p.is_empty() {
                    "/".into()
                } else {
                    p.to_string()
                }
            } else {
                cx.err(&s.span(), "daemon.attach_cgroup must be an absolute path below the cgroup v2 mount, e.g. \"/\"");
                "/".into()
            }
        }
    };
    let pin_dir = match &raw.daemon.pin_dir {
        None => PathBuf::from(DEFAULT_PIN_DIR),
        Some(s) if s.get_ref().starts_with('/') && !s.get_ref().split('/').any(|c| c == "..") => {
            PathBuf::from(s.get_ref())
        }
        Some(s) => {
            cx.err(&s.span(), "daemon.pin_dir must be an absolute path on a bpffs, e.g. \"/sys/fs/bpf/mcp-guard\"");
            PathBuf::from(DEFAULT_PIN_DIR)
        }
    };
    let control_socket = match &raw.daemon.control_socket {
        None => PathBuf::from(DEFAULT_CONTROL_SOCKET),
        Some(s) if s.get_ref().starts_with('/') && !s.get_ref().split('/').any(|c| c == "..") => {
            PathBuf::from(s.get_ref())
        }
        Some(s) => {
            cx.err(&s.span(), "daemon.control_socket must be an absolute path, e.g. \"/run/mcp-guard/control.sock\"");
            PathBuf::from(DEFAULT_CONTROL_SOCKET)
        }
    };
    let control_group = raw.daemon.control_group.as_ref().and_then(|g| {
        let id = group_id(g.get_ref());
        if id.is_none() {
            cx.err(&g.span(), format!("daemon.control_group {:?} is not a group on this machine (getent group): name an existing group or give its number", g.get_ref()));
        }
        id
    });
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
            if !(w.cgroup == attach_cgroup || w.cgroup.starts_with(&format!("{attach_cgroup}/"))) {
                warnings.push(format!(
                    "{}:{}: workload {:?} cgroup {} is outside daemon.attach_cgroup {}: it will not be enforced",
                    path.display(), w.loc.line, w.name, w.cgroup, attach_cgroup
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
        events_file: raw.events.file,
        metrics_listen,
        attach_cgroup,
        pin_dir,
        cgroup_root: raw.daemon.cgroup_root,
        control_socket,
        control_group,
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

fn dns_config(cx: &mut Ctx<'_>, raw: &RawDns) -> DnsConfig {
    let mut nameservers = Vec::new();
    for s in raw.nameservers.iter().flatten() {
        let text = s.get_ref().trim();
        let parsed = text.parse::<SocketAddr>().or_else(|_| {
            text.parse::<std::net::IpAddr>()
                .map(|ip| SocketAddr::new(ip, 53))
        });
        match parsed {
            Ok(a) => nameservers.push(a),
            Err(_) => cx.err(
                &s.span(),
                format!("dns.nameservers: {text:?} is not an address or ADDR:PORT, e.g. \"10.96.0.10\" or \"127.0.0.1:5300\""),
            ),
        }
    }
    let proxy = raw
        .proxy
        .as_ref()
        .and_then(|s| match s.get_ref().trim().parse::<SocketAddr>() {
            Ok(a) if a.port() != 0 => Some(a),
            _ => {
                cx.err(
                    &s.span(),
                    format!(
                        "dns.proxy {:?} is not ADDR:PORT, e.g. \"127.0.0.153:53\"",
                        s.get_ref()
                    ),
                );
                None
            }
        });
    let mut secs = |v: &Option<Spanned<i64>>, key: &str, default: u32| -> u32 {
        match v {
            None => default,
            Some(v) => match u32::try_from(*v.get_ref()) {
                Ok(n) if n <= 86_400 => n,
                _ => {
                    cx.err(
                        &v.span(),
                        format!("dns.{key} must be a number of seconds from 0 to 86400"),
                    );
                    default
                }
            },
        }
    };
    let min_ttl = secs(&raw.min_ttl, "min_ttl", DEFAULT_MIN_TTL);
    let max_ttl = secs(&raw.max_ttl, "max_ttl", DEFAULT_MAX_TTL);
    let grace = secs(&raw.grace, "grace", DEFAULT_GRACE);
    let max_addresses = match &raw.max_addresses {
        None => DEFAULT_MAX_ADDRESSES,
        Some(v) => match u32::try_from(*v.get_ref()) {
            Ok(n) if (1..=65_536).contains(&n) => n,
            _ => {
                cx.err(
                    &v.span(),
                    "dns.max_addresses must be between 1 and 65536 (learned addresses per workload)",
                );
                DEFAULT_MAX_ADDRESSES
            }
        },
    };
    let mut count = |v: &Option<Spanned<i64>>, key: &str, default: u32, what: &str| -> u32 {
        match v {
            None => default,
            Some(v) => match u32::try_from(*v.get_ref()) {
                Ok(n) if (1..=100_000).contains(&n) => n,
                _ => {
                    cx.err(
                        &v.span(),
                        format!("dns.{key} must be between 1 and 100000 ({what})"),
                    );
                    default
                }
            },
        }
    };
    let workload_queries_per_sec = count(
        &raw.workload_queries_per_sec,
        "workload_queries_per_sec",
        DEFAULT_WORKLOAD_QPS,
        "queries per second one workload may send the proxy",
    );
    let workload_in_flight = count(
        &raw.workload_in_flight,
        "workload_in_flight",
        DEFAULT_WORKLOAD_IN_FLIGHT,
        "queries of one workload the proxy works on at once",
    );
    if min_ttl == 0 {
        if let Some(v) = &raw.min_ttl {
            cx.err(
                &v.span(),
                "dns.min_ttl must be at least 1 second: a zero TTL would re-resolve without pause",
            );
        }
    }
    if max_ttl < min_ttl {
        if let Some(v) = raw.max_ttl.as_ref().or(raw.min_ttl.as_ref()) {
            cx.err(&v.span(), format!("dns.max_ttl ({max_ttl}) is below dns.min_ttl ({min_ttl}): raise max_ttl or lower min_ttl"));
        }
    }
    DnsConfig {
        nameservers,
        netns: raw.netns.clone(),
        proxy,
        min_ttl: min_ttl.max(1),
        max_ttl: max_ttl.max(min_ttl.max(1)),
        grace,
        max_addresses,
        workload_queries_per_sec,
        workload_in_flight,
    }
}

/// Checks a hostname written in a rule and returns its pattern.
fn host_pattern(text: &str) -> Result<HostPattern, String> {
    let name = normalise_name(text.trim());
    if name.parse::<std::net::IpAddr>().is_ok() || parse_cidr(&name).is_ok() {
        return Err(format!(
            "{text:?} is an address: write it as cidr = {text:?}"
        ));
    }
    let (wild, rest) = match name.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, name.as_str()),
    };
    if rest.is_empty() || rest.len() > 253 {
        return Err(format!("{text:?} is not a DNS name"));
    }
    for label in rest.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            let hint = if label.contains('*') {
                "a wildcard is only allowed as the whole first label, as in \"*.slack.com\""
            } else {
                "labels are 1 to 63 letters, digits, '-' or '_', not starting or ending with '-'"
            };
            return Err(format!("{text:?} is not a DNS name: {hint}"));
        }
    }
    if wild {
        if !rest.contains('.') {
            return Err(format!(
                "{text:?} would match every name in a top-level domain: name at least two labels after \"*.\", as in \"*.api.example.com\""
            ));
        }
        // A public suffix (the Public Suffix List, ICANN and private sections: co.uk,
        // github.io, s3.amazonaws.com) is shared by unrelated owners: a wildcard below
        // it would let an attacker register a name that the rule allows.
        if psl::suffix(rest.as_bytes())
            .is_some_and(|s| s.is_known() && s.as_bytes() == rest.as_bytes())
        {
            return Err(format!(
                "{text:?} covers names of unrelated owners: {rest:?} is a public suffix (Public Suffix List), where anyone can register a name; name the hosts exactly, or a wildcard below a name one owner holds, as in \"*.myorg.{rest}\""
            ));
        }
        Ok(HostPattern::Wildcard(rest.to_string()))
    } else {
        Ok(HostPattern::Exact(rest.to_string()))
    }
}

/// Adds the fix to toml's own messages where it does not say it.
fn hint_for_toml_error(msg: &str) -> String {
    if msg.starts_with("unknown field") {
        format!("{msg}; remove or rename the key")
    } else if msg.starts_with("unknown variant") {
        format!("{msg}; use one of the listed values")
    } else {
        msg.to_string()
    }
}

fn baseline_entry(cx: &mut Ctx<'_>, s: &Spanned<String>) -> Option<BaselineEntry> {
    let text = s.get_ref().trim();
    let loc = cx.loc(&s.span());
    if let Some(nets) = sets::named(text) {
        return Some(BaselineEntry {
            item: BaselineItem::Set {
                name: text.to_string(),
                nets: nets.to_vec(),
            },
            text: text.to_string(),
            loc,
        });
    }
    match parse_cidr(text) {
        Ok(net) => Some(BaselineEntry {
            item: BaselineItem::Cidr(net),
            text: text.to_string(),
            loc,
        }),
        Err(e) => {
            cx.err(
                &s.span(),
                format!(
                    "baseline.deny: {e}; use a CIDR or one of the named sets: {}",
                    sets::NAMES.join(", ")
                ),
            );
            None
        }
    }
}

/// Parses "a.b.c.d/n", "v6/n" or a bare address (a host). Host bits must be zero, so a
/// typo such as "10.0.12.7/16" does not silently widen a rule.
pub fn parse_cidr(text: &str) -> Result<IpNet, String> {
    let net: IpNet = if text.contains('/') {
        text.parse()
            .map_err(|_| format!("{text:?} is not a valid CIDR"))?
    } else {
        let ip: std::net::IpAddr = text
            .parse()
            .map_err(|_| format!("{text:?} is not a valid CIDR or address"))?;
        IpNet::from(ip)
    };
    if net.trunc() != net {
        return Err(format!(
            "{text:?} has host bits set: write {} (or a /{} host route)",
            net.trunc(),
            net.max_prefix_len()
        ));
    }
    Ok(net)
}

fn normalise_cgroup(cx: &mut Ctx<'_>, s: &Spanned<String>) -> Option<String> {
    let raw = s.get_ref().trim();
    if !raw.starts_with('/') {
        cx.err(&s.span(), format!("cgroup {raw:?} must be an absolute path below the cgroup v2 mount, e.g. \"/mcp.slice/github-mcp.service\""));
        return None;
    }
    if raw.split('/').any(|c| c == ".." || c == ".") {
        cx.err(
            &s.span(),
            format!("cgroup {raw:?} must not contain '.' or '..' components"),
        );
        return None;
    }
    let p = raw.trim_end_matches('/');
    if p.is_empty() {
        cx.err(&s.span(), "cgroup \"/\" is the whole machine, including mcp-guard itself: use the MCP server's own cgroup, or [baseline] for node-wide rules");
        return None;
    }
    if p.split('/').any(|c| c.contains("**") && c != "**") {
        cx.err(
            &s.span(),
            format!(
                "cgroup {raw:?}: `**` must be a whole path component, as in \"/kubepods/**/pod*\""
            ),
        );
        return None;
    }
    let depth = p.split('/').filter(|c| !c.is_empty()).count();
    if depth > mcp_guard_common::MAX_CGROUP_LEVEL as usize - 1 {
        cx.err(
            &s.span(),
            format!(
                "cgroup {raw:?} is {depth} levels deep; the kernel programs search {} levels",
                mcp_guard_common::MAX_CGROUP_LEVEL - 1
            ),
        );
        return None;
    }
    // Collapse "//" so two spellings of one cgroup are caught as duplicates.
    let mut out = String::new();
    for c in p.split('/').filter(|c| !c.is_empty()) {
        out.push('/');
        out.push_str(c);
    }
    Some(out)
}

enum Rule {
    Cidr(AllowRule),
    Host(HostRule),
}

fn allow_rule(cx: &mut Ctx<'_>, spanned: &Spanned<RawAllow>, proxy: bool) -> Option<Rule> {
    let a = spanned.get_ref();
    let target = match (&a.cidr, &a.host) {
        (Some(c), None) => {
            if let Some(ai) = &a.allow_internal {
                cx.err(&ai.span(), "allow.allow_internal only applies to host rules: a cidr rule allows exactly its addresses; remove the key");
                return None;
            }
            match parse_cidr(c.get_ref().trim()) {
                Ok(n) => Ok(n),
                Err(e) => {
                    cx.err(&c.span(), format!("allow.cidr: {e}"));
                    return None;
                }
            }
        }
        (None, Some(h)) => match host_pattern(h.get_ref()) {
            Ok(p @ HostPattern::Wildcard(_)) if !proxy => {
                cx.err(&h.span(), format!("allow.host {:?}: wildcard names are learned from the DNS answers the workload receives through the daemon's DNS proxy: set [dns] proxy = \"127.0.0.153:53\" (and point the workload's resolver at it), or name the hosts exactly", p.to_string()));
                return None;
            }
            Ok(p) => Err(p),
            Err(e) => {
                cx.err(&h.span(), format!("allow.host: {e}"));
                return None;
            }
        },
        (Some(c), Some(_)) => {
            cx.err(
                &c.span(),
                "an allow rule has both cidr and host: write two [[workload.allow]] rules",
            );
            return None;
        }
        (None, None) => {
            cx.err(
                &spanned.span(),
                "an allow rule needs cidr = \"10.0.12.0/24\" or host = \"api.github.com\"",
            );
            return None;
        }
    };
    let loc = cx.loc(
        &a.cidr
            .as_ref()
            .or(a.host.as_ref())
            .expect("one of them")
            .span(),
    );
    let mut ports = Vec::new();
    let mut ok = true;
    for p in &a.ports {
        match parse_port(p.get_ref()) {
            Ok(span) => ports.push(span),
            Err(e) => {
                cx.err(&p.span(), format!("allow.ports: {e}"));
                ok = false;
            }
        }
    }
    if !ok {
        return None;
    }
    Some(match target {
        Ok(net) => Rule::Cidr(AllowRule {
            net,
            ports,
            proto: a.proto,
            comment: a.comment.clone(),
            loc,
        }),
        Err(pattern) => Rule::Host(HostRule {
            pattern,
            ports,
            proto: a.proto,
            allow_internal: a.allow_internal.as_ref().is_some_and(|b| *b.get_ref()),
            comment: a.comment.clone(),
            loc,
        }),
    })
}

fn port_number(n: i64) -> Result<u16, String> {
    if (1..=65535).contains(&n) {
        Ok(n as u16)
    } else {
        Err(format!("port {n} is out of range: ports are 1 to 65535"))
    }
}

fn parse_port(v: &toml::Value) -> Result<PortSpan, String> {
    match v {
        toml::Value::Integer(n) => port_number(*n).map(|p| PortSpan { lo: p, hi: p }),
        toml::Value::String(s) => {
            let s = s.trim();
            let (lo, hi) = match s.split_once('-') {
                Some((lo, hi)) => (lo.trim(), hi.trim()),
                None => (s, s),
            };
            let num = |x: &str| -> Result<u16, String> {
                let n: i64 = x
                    .parse()
                    .map_err(|_| format!("{s:?} is not a port or a range like \"8000-8100\""))?;
                port_number(n)
            };
            let (lo, hi) = (num(lo)?, num(hi)?);
            if lo > hi {
                return Err(format!("range {s:?} is inverted: write \"{hi}-{lo}\""));
            }
            Ok(PortSpan { lo, hi })
        }
        other => Err(format!(
            "{other} is not a port: use a number (443) or a range string (\"8000-8100\")"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_ids_follow_names_not_positions() {
        let w = |names: &[&str]| {
            let text: String = names
                .iter()
                .map(|n| format!("[[workload]]\nname='{n}'\ncgroup='/{n}'\n"))
                .collect();
            let cfg = parse(Path::new("t.toml"), &text).unwrap();
            cfg.workloads
                .iter()
                .map(|w| (w.name.clone(), w.id))
                .collect::<HashMap<_, _>>()
        };
        let abc = w(&["a", "b", "c"]);
        assert_eq!(abc, w(&["c", "a", "b"]), "reordered");
        assert_eq!(abc["b"], w(&["b", "c"])["b"], "another removed");
        assert!(abc
            .values()
            .all(|&id| id >= mcp_guard_common::FIRST_WORKLOAD_ID));
        let ids: std::collections::HashSet<u32> = abc.values().copied().collect();
        assert_eq!(ids.len(), 3, "distinct");
        // Collisions take the next free id: 100,000 names, all distinct.
        let many: Vec<String> = (0..100_000).map(|i| format!("w{i}")).collect();
        let ids = workload_ids(many.iter().map(String::as_str));
        let distinct: std::collections::HashSet<u32> = ids.values().copied().collect();
        assert_eq!(distinct.len(), 100_000);
    }

    fn p(text: &str) -> Result<Config, ConfigErrors> {
        parse(Path::new("test.toml"), text)
    }

    fn err(text: &str) -> ConfigError {
        p(text).expect_err("config must be rejected").0.remove(0)
    }

    const GOOD: &str = r#"
mode = "enforce"
[baseline]
deny = ["metadata", "192.0.2.0/24"]
[[workload]]
name = "github-mcp"
cgroup = "/mcp.slice/github-mcp.service"
default = "deny-internal"
[[workload.allow]]
cidr = "10.0.12.0/24"
ports = [5432, "8000-8100"]
proto = "tcp"
"#;

    #[test]
    fn parses_the_contract_example() {
        let c = p(GOOD).unwrap();
        assert_eq!(c.mode, Mode::Enforce);
        assert_eq!(c.baseline.len(), 2);
        let w = &c.workloads[0];
        assert_eq!(w.name, "github-mcp");
        assert_eq!(w.cgroup, "/mcp.slice/github-mcp.service");
        assert_eq!(w.default, DefaultAction::DenyInternal);
        assert_eq!(
            w.allow[0].ports,
            vec![
                PortSpan { lo: 5432, hi: 5432 },
                PortSpan { lo: 8000, hi: 8100 }
            ]
        );
        assert_eq!(w.allow[0].proto, Proto::Tcp);
        assert_eq!(w.allow[0].loc.line, 10);
    }

    #[test]
    fn missing_baseline_still_denies_metadata() {
        let c = p("[[workload]]\nname='a'\ncgroup='/a'\n").unwrap();
        assert!(
            matches!(&c.baseline[0].item, BaselineItem::Set { name, .. } if name == "metadata")
        );
    }

    #[test]
    fn unknown_key_names_line_and_key() {
        let e = err("[[workload]]\nname='a'\ncgroup='/a'\ndefualt='deny'\n");
        assert_eq!(e.line, 4);
        assert!(e.message.contains("defualt"), "{e}");
    }

    #[test]
    fn bad_cidr() {
        let e =
            err("[[workload]]\nname='a'\ncgroup='/a'\n[[workload.allow]]\ncidr='10.0.0.300/8'\n");
        assert_eq!(e.line, 5);
        assert!(e.message.contains("not a valid CIDR"), "{e}");
    }

    #[test]
    fn host_bits_set() {
        let e =
            err("[[workload]]\nname='a'\ncgroup='/a'\n[[workload.allow]]\ncidr='10.0.12.7/16'\n");
        assert!(e.message.contains("10.0.0.0/16"), "{e}");
    }

    #[test]
    fn port_zero_and_too_big() {
        let e = err("[[workload]]\nname='a'\ncgroup='/a'\n[[workload.allow]]\ncidr='10.0.0.0/8'\nports=[0]\n");
        assert_eq!(e.line, 6);
        assert!(e.message.contains("1 to 65535"), "{e}");
        let e = err("[[workload]]\nname='a'\ncgroup='/a'\n[[workload.allow]]\ncidr='10.0.0.0/8'\nports=[\"1-65536\"]\n");
        assert!(e.message.contains("65536"), "{e}");
    }

    #[test]
    fn inverted_range() {
        let e = err("[[workload]]\nname='a'\ncgroup='/a'\n[[workload.allow]]\ncidr='10.0.0.0/8'\nports=[\"9000-8000\"]\n");
        assert!(e.message.contains("inverted"), "{e}");
    }

    #[test]
    fn duplicate_name_and_cgroup() {
        let e = err("[[workload]]\nname='a'\ncgroup='/a'\n[[workload]]\nname='a'\ncgroup='/b'\n");
        assert_eq!(e.line, 5);
        assert!(e.message.contains("duplicate workload name"), "{e}");
        let e = err("[[workload]]\nname='a'\ncgroup='/a'\n[[workload]]\nname='b'\ncgroup='/a/'\n");
        assert_eq!(e.line, 6);
        assert!(e.message.contains("duplicate workload cgroup"), "{e}");
    }

    #[test]
    fn bad_enum_value() {
        let e = err("[[workload]]\nname='a'\ncgroup='/a'\ndefault='deny-all'\n");
        assert_eq!(e.line, 4);
        assert!(e.message.contains("deny-internal"), "{e}");
    }

    #[test]
    fn root_cgroup_rejected() {
        let e = err("[[workload]]\nname='a'\ncgroup='/'\n");
        assert!(e.message.contains("whole machine"), "{e}");
    }

    #[test]
    fn unknown_named_set() {
        let e = err("[baseline]\ndeny=['metdata']\n");
        assert_eq!(e.line, 2);
        assert!(e.message.contains("metadata"), "{e}");
    }

    #[test]
    fn host_rules_parse_and_match() {
        let c = p("[dns]\nproxy='127.0.0.1:5353'\n[[workload]]\nname='a'\ncgroup='/a'\n[[workload.allow]]\nhost='API.GitHub.com.'\nports=[443]\n[[workload.allow]]\nhost='*.slack.com'\nallow_internal=true\n").unwrap();
        let h = &c.workloads[0].hosts;
        assert_eq!(h[0].pattern, HostPattern::Exact("api.github.com".into()));
        assert_eq!(h[0].loc.line, 7);
        assert!(h[1].allow_internal);
        assert!(h[1].pattern.matches("files.slack.com"));
        assert!(h[1].pattern.matches("a.b.slack.com"));
        assert!(!h[1].pattern.matches("slack.com"));
        assert!(!h[1].pattern.matches("evilslack.com"));
        assert_eq!(h[1].pattern.to_string(), "*.slack.com");
    }

    #[test]
    fn bad_host_rules_name_line_and_fix() {
        let e =
            err("[[workload]]\nname='a'\ncgroup='/a'\n[[workload.allow]]\nhost='*.slack.com'\n");
        assert_eq!(e.line, 5);
        assert!(e.message.contains("[dns] proxy"), "{e}");
        let e = err("[[workload]]\nname='a'\ncgroup='/a'\n[[workload.allow]]\nhost='10.0.0.1'\n");
        assert!(e.message.contains("cidr"), "{e}");
        let e = err("[dns]\nproxy='127.0.0.1:53'\n[[workload]]\nname='a'\ncgroup='/a'\n[[workload.allow]]\nhost='*.com'\n");
        assert!(e.message.contains("two labels"), "{e}");
        let e = err("[[workload]]\nname='a'\ncgroup='/a'\n[[workload.allow]]\nhost='a.*.com'\n");
        assert!(e.message.contains("first label"), "{e}");
        let e = err("[[workload]]\nname='a'\ncgroup='/a'\n[[workload.allow]]\nhost='a.com'\ncidr='10.0.0.0/8'\n");
        assert!(e.message.contains("both cidr and host"), "{e}");
        let e = err("[[workload]]\nname='a'\ncgroup='/a'\n[[workload.allow]]\nports=[443]\n");
        assert_eq!(e.line, 4, "the [[workload.allow]] header");
        assert!(e.message.contains("needs cidr"), "{e}");
        let e = err("[[workload]]\nname='a'\ncgroup='/a'\n[[workload.allow]]\ncidr='10.0.0.0/8'\nallow_internal=true\n");
        assert!(e.message.contains("only applies to host"), "{e}");
        let e = err("[dns]\nmin_ttl=60\nmax_ttl=10\n");
        assert!(e.message.contains("below dns.min_ttl"), "{e}");
        let e = err("[dns]\nnameservers=['dns.local']\n");
        assert_eq!(e.line, 2);
        let e = err("[dns]\nworkload_queries_per_sec=0\n");
        assert!(e.message.contains("between 1 and 100000"), "{e}");
    }

    /// Wildcards right below a public suffix (Public Suffix List, both sections) cover
    /// names anyone can register; one label deeper is one owner's.
    #[test]
    fn wildcards_on_public_suffixes_are_refused() {
        for (suffix, line) in [
            ("co.uk", 6),
            ("s3.amazonaws.com", 6),
            ("github.io", 6),
            ("githubusercontent.com", 6),
        ] {
            let e = err(&format!("[dns]\nproxy='127.0.0.1:53'\n[[workload]]\nname='a'\ncgroup='/a'\n[[workload.allow]]\nhost='*.{suffix}'\n"));
            assert_eq!(e.line, line + 1, "{e}");
            assert!(e.message.contains("public suffix"), "{suffix}: {e}");
            assert!(e.message.contains(&format!("*.myorg.{suffix}")), "{e}");
        }
        for ok in [
            "*.myorg.github.io",
            "*.bbc.co.uk",
            "*.slack.com",
            "*.cdn.example.test",
        ] {
            p(&format!("[dns]\nproxy='127.0.0.1:53'\n[[workload]]\nname='a'\ncgroup='/a'\n[[workload.allow]]\nhost='{ok}'\n")).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        // Exact names on a suffix are one host: allowed.
        p("[[workload]]\nname='a'\ncgroup='/a'\n[[workload.allow]]\nhost='github.io'\n").unwrap();
    }

    #[test]
    fn resolve_any_and_dns_budgets() {
        let c = p("[dns]\nproxy='127.0.0.1:53'\nworkload_queries_per_sec=7\nworkload_in_flight=3\n[[workload]]\nname='a'\ncgroup='/a'\nresolve_any=true\n[[workload]]\nname='b'\ncgroup='/b'\n").unwrap();
        assert!(c.workloads[0].resolve_any);
        assert!(!c.workloads[1].resolve_any, "off by default");
        assert_eq!(
            (c.dns.workload_queries_per_sec, c.dns.workload_in_flight),
            (7, 3)
        );
        let d = p("").unwrap();
        assert_eq!(
            (d.dns.workload_queries_per_sec, d.dns.workload_in_flight),
            (DEFAULT_WORKLOAD_QPS, DEFAULT_WORKLOAD_IN_FLIGHT)
        );
    }

    #[test]
    fn workload_mode_overrides_global() {
        let c = p("mode='audit'\n[[workload]]\nname='a'\ncgroup='/a'\n[[workload]]\nname='b'\ncgroup='/b'\nmode='enforce'\n").unwrap();
        assert_eq!(c.workloads[0].mode, Mode::Audit);
        assert_eq!(c.workloads[1].mode, Mode::Enforce);
    }
}
