//! Denied-flow events: read from the kernel ring buffer, enriched, written as JSON lines.
//!
//! The reader never blocks the kernel: a full ring buffer makes the programs count the
//! event as lost and carry on deciding.

use std::{collections::HashMap, sync::Arc};

use mcp_guard_common::Event;
use serde::Serialize;

use crate::{
    host::cgroup,
    policy::{display_addr, reason_name},
};

pub const SCHEMA: &str = "mcp-guard.event/v1";

/// One event as written to sinks and streamed to `mcp-guard events`.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct JsonEvent {
    pub schema: String,
    /// RFC 3339, UTC.
    pub time: String,
    /// critical, high, medium or low (see [`super::siem::severity`]).
    #[serde(default)]
    pub severity: String,
    /// The node: `NODE_NAME`, else the host name.
    #[serde(default)]
    pub host: String,
    pub monotonic_ns: u64,
    pub hook: String,
    pub verdict: String,
    pub reason: String,
    pub rule_id: u32,
    pub rule: Option<String>,
    pub workload: Option<String>,
    pub workload_id: u32,
    pub cgroup_id: u64,
    pub cgroup: Option<String>,
    #[serde(flatten)]
    pub owner: cgroup::Owner,
    pub pid: u32,
    pub tgid: u32,
    pub uid: u32,
    pub gid: u32,
    pub comm: String,
    pub exe: Option<String>,
    pub cmdline: Option<String>,
    /// Family of the destination as judged: "ipv4" (also for IPv4-mapped) or "ipv6".
    pub family: String,
    /// Family of the socket: "inet" or "inet6".
    pub socket_family: String,
    pub proto: String,
    pub dst: String,
    /// Hooks connect_unix and sendmsg_unix: the AF_UNIX address (`@name`: abstract).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst_path: Option<String>,
    pub dport: u16,
    pub src: Option<String>,
    pub sport: u16,
    pub socket_cookie: u64,
    pub dest_class: String,
    pub suppressed: u32,
    pub policy_generation: u32,
    /// Hook "dns": the name whose answer held `dst`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Hook "dns": "resolver" or "proxy".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns_source: Option<String>,
    /// Hook "dns", a query the proxy refused: the type asked for ("A", "TXT", ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns_type: Option<String>,
    /// Hook "mcp", credentials found in a message: their kind ("aws-access-key-id", ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// The MCP tool call in flight when a process of an `exec --mcp` instance was refused
    /// (`tool: null`: none was, a background connection).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mcp: Option<crate::mcp::registry::Attribution>,
    /// The Kubernetes pod (and container) of the process, identified through the CRI.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodRef>,
}

/// An event's pod, as the container runtime names it.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// The container's name in the pod spec (`None`: the pod's own cgroup, or a
    /// container the runtime had not listed yet: its first `daemon.cri_poll_ms`).
    pub container: Option<String>,
    /// The container's id, from its cgroup's name.
    pub container_id: Option<String>,
}

/// A query the DNS proxy refused to forward, for [`dns_query_refusal`].
pub struct QueryRefusal<'a> {
    /// `None`: the client belongs to no workload.
    pub workload: Option<&'a str>,
    pub workload_id: u32,
    pub cgroup_id: u64,
    /// The name asked for, if the query could be read (at most 253 bytes).
    pub name: Option<&'a str>,
    pub qtype: Option<String>,
    pub reason: &'static str,
    pub client: std::net::SocketAddr,
    pub proto: &'static str,
    pub generation: u32,
    pub suppressed: u32,
}

/// The fields every DNS event (hook dns, verdict refused) shares; no task, no socket.
fn dns_event(reason: &str, rule: String, generation: u32, suppressed: u32) -> JsonEvent {
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    JsonEvent {
        schema: SCHEMA.into(),
        time: rfc3339(wall),
        severity: super::siem::severity(reason, "none").into(),
        host: super::siem::host().into(),
        monotonic_ns: monotonic_ns(),
        hook: "dns".into(),
        verdict: "refused".into(),
        reason: reason.into(),
        rule_id: 0,
        rule: Some(rule),
        workload: None,
        workload_id: 0,
        cgroup_id: 0,
        cgroup: None,
        owner: cgroup::Owner::default(),
        pid: 0,
        tgid: 0,
        uid: 0,
        gid: 0,
        comm: String::new(),
        exe: None,
        cmdline: None,
        family: "none".into(),
        socket_family: "unknown".into(),
        proto: "any".into(),
        dst: String::new(),
        dst_path: None,
        dport: 0,
        src: None,
        sport: 0,
        socket_cookie: 0,
        dest_class: "none".into(),
        suppressed,
        policy_generation: generation,
        name: None,
        dns_source: None,
        dns_type: None,
        secret: None,
        mcp: None,
        pod: None,
    }
}

/// The event for a query the DNS proxy answered REFUSED without asking upstream.
#[must_use]
pub fn dns_query_refusal(r: &QueryRefusal<'_>) -> JsonEvent {
    let rule = match r.reason {
        "name-not-allowed" => {
            "DNS proxy: no host rule of the workload covers this name (resolve_any is off)"
        }
        "type-not-allowed" => {
            "DNS proxy: only A, AAAA and CNAME questions of class IN are forwarded"
        }
        "rate-limited" => "DNS proxy: [dns] workload_queries_per_sec",
        "in-flight-limited" => "DNS proxy: [dns] workload_in_flight",
        "unattributed" => "DNS proxy: the asking socket belongs to no workload",
        _ => "DNS proxy: one well-formed question per query",
    };
    JsonEvent {
        workload: r.workload.map(str::to_string),
        workload_id: r.workload_id,
        cgroup_id: r.cgroup_id,
        proto: r.proto.into(),
        src: Some(r.client.ip().to_canonical().to_string()),
        sport: r.client.port(),
        name: r.name.map(|n| n.chars().take(253).collect()),
        dns_source: Some("proxy".into()),
        dns_type: r.qtype.clone(),
        mcp: None,
        pod: None,
        ..dns_event(r.reason, rule.into(), r.generation, r.suppressed)
    }
}

/// What the rebinding guard refused, for [`dns_refusal`].
pub struct Refusal<'a> {
    pub workload: &'a str,
    pub workload_id: u32,
    pub cgroup_id: u64,
    pub name: &'a str,
    pub addr: std::net::IpAddr,
    pub reason: &'static str,
    pub rule: String,
    pub source: &'static str,
    pub generation: u32,
    /// Refusals of the same answer left out by the rate limit since the last event.
    pub suppressed: u32,
}

/// The event for an address a DNS answer gave for an allowed name, refused by the
/// rebinding guard: the connection it would have allowed stays denied.
#[must_use]
pub fn dns_refusal(r: &Refusal<'_>) -> JsonEvent {
    let addr = r.addr.to_canonical();
    let class = |nets: &[ipnet::IpNet]| nets.iter().any(|n| n.contains(&addr));
    let dest_class = if class(crate::config::sets::metadata()) {
        "metadata"
    } else if class(crate::config::sets::internal()) {
        "internal"
    } else {
        "public"
    };
    JsonEvent {
        severity: super::siem::severity(r.reason, dest_class).into(),
        workload: Some(r.workload.to_string()),
        workload_id: r.workload_id,
        cgroup_id: r.cgroup_id,
        family: if addr.is_ipv4() { "ipv4" } else { "ipv6" }.into(),
        dst: addr.to_string(),
        dst_path: None,
        dest_class: dest_class.into(),
        name: Some(r.name.to_string()),
        dns_source: Some(r.source.into()),
        ..dns_event(r.reason, r.rule.clone(), r.generation, r.suppressed)
    }
}

/// What a relay decided about an MCP message, for [`relay_event`].
pub struct RelayDecision<'a> {
    pub workload: &'a str,
    pub workload_id: u32,
    /// The instance's cgroup.
    pub cgroup_id: u64,
    /// "refused" (a call the relay answered), "hidden" (a changed tool taken out of
    /// `tools/list`), "audit" (would have been; the workload is in audit mode), "masked"
    /// or "reported" (a changed tool left in, credentials found and left).
    pub verdict: &'static str,
    /// "tool-denied", "tool-not-allowed", "tool-changed", "argument-refused",
    /// or "secret".
    pub reason: &'static str,
    pub rule: String,
    /// An argument check: the destination the arguments named.
    pub dst: Option<&'a str>,
    pub dest_class: &'static str,
    /// Masking: the credential kind.
    pub kind: Option<&'a str>,
    pub mcp: Option<crate::mcp::registry::Attribution>,
    pub generation: u32,
}

/// The event for a decision an MCP relay took (hook `mcp`): a call refused before the
/// server saw it, a tool definition that changed, credentials found in a message.
#[must_use]
pub fn relay_event(d: &RelayDecision<'_>) -> JsonEvent {
    JsonEvent {
        severity: super::siem::severity(d.reason, d.dest_class).into(),
        hook: "mcp".into(),
        verdict: d.verdict.into(),
        workload: Some(d.workload.to_string()),
        workload_id: d.workload_id,
        cgroup_id: d.cgroup_id,
        dst: d.dst.unwrap_or_default().to_string(),
        dest_class: d.dest_class.into(),
        secret: d.kind.map(str::to_string),
        mcp: d.mcp.clone(),
        ..dns_event(d.reason, d.rule.clone(), d.generation, 0)
    }
}

/// Names the daemon knows for ids in events.
#[derive(Default, Clone)]
pub struct Names {
    /// `exec --mcp` instances, to name the tool call of an event.
    pub mcp: Arc<crate::mcp::registry::Registry>,
    /// Pods identified through the CRI, to name the pod and container of an event.
    pub pods: Arc<crate::pods::Table>,
    pub workloads: HashMap<u32, String>,
    /// Workload id -> its configured cgroup (where a cgroup no longer registered is
    /// said to have been).
    pub cgroups: HashMap<u32, String>,
    /// The registered cgroups, where events' cgroups are looked up.
    pub registered: Arc<crate::host::attribution::Registered>,
    /// Rule id -> its text (shared: a policy can hold many rules).
    pub rules: Arc<HashMap<u32, String>>,
}

/// The one decoder of hook and class bytes lives with the layouts.
pub use mcp_guard_common::{class_name, hook_name, verdict_name};

#[must_use]
pub fn proto_name(p: u8) -> String {
    match p {
        6 => "tcp".into(),
        17 => "udp".into(),
        136 => "udplite".into(),
        1 => "icmp".into(),
        58 => "icmpv6".into(),
        132 => "sctp".into(),
        other => other.to_string(),
    }
}

pub(super) fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// RFC 3339 UTC from Unix nanoseconds (civil-from-days, Howard Hinnant's algorithm).
#[must_use]
pub fn rfc3339(unix_ns: u128) -> String {
    let secs = (unix_ns / 1_000_000_000) as i64;
    let micros = (unix_ns % 1_000_000_000) / 1000;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{micros:06}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Decodes one ring-buffer record.
#[must_use]
pub fn decode(bytes: &[u8]) -> Option<Event> {
    (bytes.len() >= size_of::<Event>())
        // SAFETY: length checked; Event is plain data; read_unaligned tolerates alignment.
        .then(|| unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<Event>()) })
}

/// At most this many bytes of a command line or executable path go into an event: a
/// process can make its command line as long as the kernel allows (megabytes), and every
/// event, the history and each follower would copy it.
pub const MAX_PROC_TEXT: usize = 4096;

fn bounded(mut s: String) -> String {
    if s.len() > MAX_PROC_TEXT {
        let mut cut = MAX_PROC_TEXT;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push_str("...");
    }
    s
}

fn proc_text(pid: u32, what: &str) -> Option<String> {
    proc_text_unbounded(pid, what).map(bounded)
}

/// A process's command line, no more of it than an event keeps.
fn read_cmdline(pid: u32) -> Option<Vec<u8>> {
    use std::io::Read as _;
    let mut b = Vec::new();
    std::fs::File::open(format!("/proc/{pid}/cmdline"))
        .and_then(|f| f.take(MAX_PROC_TEXT as u64 + 1).read_to_end(&mut b))
        .ok()?;
    Some(b)
}

fn proc_text_unbounded(pid: u32, what: &str) -> Option<String> {
    match what {
        "exe" => std::fs::read_link(format!("/proc/{pid}/exe"))
            .ok()
            .map(|p| p.display().to_string()),
        _ => read_cmdline(pid).filter(|b| !b.is_empty()).map(|b| {
            let s: Vec<String> = b
                .split(|c| *c == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            s.join(" ")
        }),
    }
}

#[cfg(test)]
mod bounded_tests {
    #[test]
    fn long_process_text_is_cut_on_a_char_boundary() {
        let long = "é".repeat(5000);
        let b = super::bounded(long);
        assert!(b.len() <= super::MAX_PROC_TEXT + 3, "{}", b.len());
        assert!(b.ends_with("..."));
        assert_eq!(super::bounded("short".into()), "short");
    }
}

/// Turns a kernel event into its JSON form, enriched from /proc while the process lives.
#[must_use]
pub fn enrich(e: &Event, names: &Names) -> JsonEvent {
    enrich_cached(e, names, &mut Cache::default())
}

/// Where an event's process was: its cgroup path, what owns it, its pod.
type Place = (Option<String>, cgroup::Owner, Option<PodRef>);

/// What enrichment looked up, kept for one batch of events: a flood from one process
/// costs one /proc read, not one per event.
#[derive(Default)]
pub struct Cache {
    clock: Option<(u64, u128)>,
    procs: HashMap<u32, (Option<String>, Option<String>)>,
    cgroups: HashMap<(u32, u64), Place>,
}

/// Where an event's cgroup is: below the registered cgroups (the workload's own, its
/// pods'), as the kernel attributed it; a cgroup gone since is said by its workload's.
fn place(e: &Event, names: &Names) -> Place {
    let r = &names.registered;
    let path = r
        .locate(e.cgroup_id)
        .and_then(|(dir, _)| {
            let rel = dir.strip_prefix(r.mount()).ok()?;
            Some(format!("/{}", rel.display()))
        })
        .or_else(|| names.cgroups.get(&e.workload_id).cloned());
    let owner = path.as_deref().map(cgroup::owner).unwrap_or_default();
    let pod = path
        .as_deref()
        .and_then(|p| crate::pods::attribute(&names.pods, p))
        .map(|(p, container_id, container)| PodRef {
            namespace: p.namespace.clone(),
            name: p.name.clone(),
            uid: p.uid.clone(),
            container: container.map(str::to_string),
            container_id,
        });
    (path, owner, pod)
}

fn socket_family_name(family: u8) -> &'static str {
    match family {
        1 => "unix",
        2 => "inet",
        10 => "inet6",
        17 => "packet",
        40 => "vsock",
        44 => "xdp",
        _ => "unknown",
    }
}

/// [`enrich`] with lookups shared across a batch.
#[must_use]
pub fn enrich_cached(e: &Event, names: &Names, cache: &mut Cache) -> JsonEvent {
    let (now_mono, now_wall) = *cache.clock.get_or_insert_with(|| {
        (
            monotonic_ns(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        )
    });
    let wall = now_wall.saturating_sub(u128::from(now_mono.saturating_sub(e.ts_ns)));
    let dst = display_addr(e.daddr_be);
    let is_unix = e.sock_family == 1;
    let dst_path = is_unix.then(|| super::unix_paths::unix_path(e));
    let src = (e.saddr_be != [0; 16]).then(|| display_addr(e.saddr_be).to_string());
    let comm_len = e.comm.iter().position(|&c| c == 0).unwrap_or(e.comm.len());
    let (cgroup_path, owner, pod) = cache
        .cgroups
        .entry((e.workload_id, e.cgroup_id))
        .or_insert_with(|| place(e, names))
        .clone();
    let (exe, cmdline) = cache
        .procs
        .entry(e.tgid)
        .or_insert_with(|| (proc_text(e.tgid, "exe"), proc_text(e.tgid, "cmdline")))
        .clone();
    let mcp = (e.mcp != 0)
        .then(|| names.mcp.attribute(e.cgroup_id, e.mcp_seq))
        .flatten();
    JsonEvent {
        schema: SCHEMA.into(),
        time: rfc3339(wall),
        severity: super::siem::severity(reason_name(e.reason), class_name(e.dest_class)).into(),
        host: super::siem::host().into(),
        monotonic_ns: e.ts_ns,
        hook: hook_name(e.hook).into(),
        verdict: verdict_name(e.verdict).into(),
        reason: reason_name(e.reason).into(),
        rule_id: e.rule_id,
        rule: names.rules.get(&e.rule_id).cloned(),
        workload: names.workloads.get(&e.workload_id).cloned(),
        workload_id: e.workload_id,
        cgroup_id: e.cgroup_id,
        cgroup: cgroup_path,
        owner,
        pid: e.pid,
        tgid: e.tgid,
        uid: e.uid,
        gid: e.gid,
        comm: String::from_utf8_lossy(&e.comm[..comm_len]).into_owned(),
        exe,
        cmdline,
        family: match (e.dest_class, dst.is_ipv4()) {
            _ if is_unix => "unix",
            (mcp_guard_common::CLASS_NONE, _) => "none",
            (_, true) => "ipv4",
            (_, false) => "ipv6",
        }
        .into(),
        socket_family: socket_family_name(e.sock_family).into(),
        proto: proto_name(e.proto),
        dst: if let Some(p) = &dst_path {
            p.clone()
        } else if e.dest_class == mcp_guard_common::CLASS_NONE {
            String::new()
        } else {
            dst.to_string()
        },
        dst_path,
        dport: e.dport,
        src,
        sport: e.sport,
        socket_cookie: e.socket_cookie,
        dest_class: class_name(e.dest_class).into(),
        suppressed: e.suppressed,
        policy_generation: e.generation,
        name: None,
        dns_source: None,
        dns_type: None,
        secret: None,
        mcp,
        pod,
    }
}

pub use super::reader::{read_loop, Delivered, History, Recorded, HISTORY};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(
            rfc3339(1_795_000_000_123_456_000),
            "2026-11-18T11:06:40.123456Z"
        );
        assert_eq!(
            rfc3339(951_782_400_000_000_000),
            "2000-02-29T00:00:00.000000Z"
        );
    }
}
