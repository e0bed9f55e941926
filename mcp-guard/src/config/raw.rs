//! The raw TOML shape, as serde reads it, and the validated `[dns]` and `[tc]` settings.

use super::*;

// ---- raw TOML shape -------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    pub(super) mode: Option<Spanned<Mode>>,
    #[serde(default)]
    pub(super) baseline: Option<RawBaseline>,
    #[serde(default)]
    pub(super) workload: Vec<RawWorkload>,
    #[serde(default)]
    pub(super) events: RawEvents,
    #[serde(default)]
    pub(super) metrics: RawMetrics,
    #[serde(default)]
    pub(super) daemon: RawDaemon,
    #[serde(default)]
    pub(super) tc: RawTc,
    #[serde(default)]
    pub(super) dns: RawDns,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDns {
    #[serde(default)]
    pub(super) nameservers: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    pub(super) netns: Option<PathBuf>,
    #[serde(default)]
    pub(super) proxy: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) min_ttl: Option<Spanned<i64>>,
    #[serde(default)]
    pub(super) max_ttl: Option<Spanned<i64>>,
    #[serde(default)]
    pub(super) grace: Option<Spanned<i64>>,
    #[serde(default)]
    pub(super) max_addresses: Option<Spanned<i64>>,
    #[serde(default)]
    pub(super) workload_queries_per_sec: Option<Spanned<i64>>,
    #[serde(default)]
    pub(super) workload_in_flight: Option<Spanned<i64>>,
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
pub(super) struct RawTc {
    #[serde(default)]
    pub(super) enabled: Option<bool>,
    #[serde(default)]
    pub(super) interfaces: Option<Vec<String>>,
    #[serde(default)]
    pub(super) pod_interfaces: Vec<String>,
    #[serde(default)]
    pub(super) netns: Option<PathBuf>,
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
pub(super) struct RawBaseline {
    #[serde(default)]
    pub(super) deny: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWorkload {
    pub(super) name: Spanned<String>,
    #[serde(default)]
    pub(super) cgroup: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) pods: Option<Spanned<super::pods::RawPods>>,
    #[serde(default)]
    pub(super) default: DefaultAction,
    #[serde(default)]
    pub(super) mode: Option<Mode>,
    #[serde(default)]
    pub(super) allow: Vec<Spanned<RawAllow>>,
    #[serde(default)]
    pub(super) deny_raw_sockets: Option<bool>,
    #[serde(default)]
    pub(super) deny_packet_sockets: Option<bool>,
    #[serde(default)]
    pub(super) resolve_any: Option<bool>,
    #[serde(default)]
    pub(super) deny_direct_dns: Option<bool>,
    #[serde(default)]
    pub(super) allow_ping: Option<bool>,
    #[serde(default)]
    pub(super) allow_other_protocols: Option<bool>,
    #[serde(default)]
    pub(super) between_calls: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) unix: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) allow_unix: Vec<Spanned<String>>,
    #[serde(default)]
    pub(super) deny_unix: Vec<Spanned<String>>,
    #[serde(default)]
    pub(super) mcp: Option<Spanned<super::relay_keys::RawMcp>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAllow {
    #[serde(default)]
    pub(super) cidr: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) host: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) allow_internal: Option<Spanned<bool>>,
    #[serde(default)]
    pub(super) ports: Vec<Spanned<toml::Value>>,
    #[serde(default)]
    pub(super) proto: Proto,
    #[serde(default)]
    pub(super) tools: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    pub(super) comment: Option<String>,
    #[serde(default)]
    pub(super) approval: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) approvers: Vec<Spanned<String>>,
    #[serde(default)]
    pub(super) max_duration: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEvents {
    #[serde(default)]
    pub(super) rate_limit_per_sec: Option<Spanned<i64>>,
    #[serde(default)]
    pub(super) sink: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) file: Option<PathBuf>,
    #[serde(default)]
    pub(super) cmdline: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMetrics {
    #[serde(default)]
    pub(super) listen: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDaemon {
    #[serde(default)]
    pub(super) attach_cgroup: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) pin_dir: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) cgroup_root: Option<PathBuf>,
    #[serde(default)]
    pub(super) on_exit: Option<OnExit>,
    #[serde(default)]
    pub(super) cgroup_skb: Option<bool>,
    #[serde(default)]
    pub(super) control_socket: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) control_group: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) mcp_socket: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) cri_socket: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) pod_cgroups: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    pub(super) cri_poll_ms: Option<Spanned<i64>>,
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
