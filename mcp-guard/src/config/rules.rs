//! Validation of the parts of a config: DNS settings, host patterns, baseline entries,
//! CIDRs, cgroup paths, allow rules and ports.

use super::*;

pub(super) fn dns_config(cx: &mut Ctx<'_>, raw: &RawDns) -> DnsConfig {
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
pub(super) fn host_pattern(text: &str) -> Result<HostPattern, String> {
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
pub(super) fn hint_for_toml_error(msg: &str) -> String {
    if msg.starts_with("unknown field") {
        format!("{msg}; remove or rename the key")
    } else if msg.starts_with("unknown variant") {
        format!("{msg}; use one of the listed values")
    } else {
        msg.to_string()
    }
}

pub(super) fn baseline_entry(cx: &mut Ctx<'_>, s: &Spanned<String>) -> Option<BaselineEntry> {
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

pub(super) fn normalise_cgroup(cx: &mut Ctx<'_>, s: &Spanned<String>) -> Option<String> {
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

pub(super) enum Rule {
    Cidr(AllowRule),
    Host(HostRule),
}

/// `cidr = "nameservers"`: the DNS servers the daemon itself resolves with.
pub const NAMESERVERS: &str = "nameservers";

/// The `nameserver` addresses of a resolv.conf text.
pub fn resolv_conf_nameservers(text: &str) -> Vec<std::net::IpAddr> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|a| a.trim().parse().ok())
        .collect()
}

/// The DNS servers the daemon resolves with: `[dns] nameservers`, else the `nameserver`
/// lines of /etc/resolv.conf (port 53; in a pod: the cluster DNS Service), read when
/// called. The DNS side's upstreams and `cidr = "nameservers"` both come from here.
///
/// # Errors
/// Neither names a server; the text says why (it completes "/etc/resolv.conf ...").
pub fn nameservers(dns: &DnsConfig) -> Result<Vec<SocketAddr>, String> {
    if !dns.nameservers.is_empty() {
        return Ok(dns.nameservers.clone());
    }
    let text =
        std::fs::read_to_string("/etc/resolv.conf").map_err(|e| format!("cannot be read ({e})"))?;
    let found: Vec<SocketAddr> = resolv_conf_nameservers(&text)
        .into_iter()
        .map(|ip| SocketAddr::new(ip, 53))
        .collect();
    if found.is_empty() {
        return Err("names no nameserver".into());
    }
    Ok(found)
}

/// The addresses `cidr = "nameservers"` stands for (see [`nameservers`]), read at every
/// (re)load.
fn nameserver_nets(dns: &DnsConfig) -> Result<Vec<IpNet>, String> {
    let servers = nameservers(dns)
        .map_err(|why| format!("[dns] nameservers is not set and /etc/resolv.conf {why}"))?;
    let mut nets: Vec<IpNet> = servers.iter().map(|s| IpNet::from(s.ip())).collect();
    nets.sort();
    nets.dedup();
    Ok(nets)
}

/// One `[[workload.allow]]` table: one rule, or one per address for `cidr = "nameservers"`;
/// none after an error (reported through `cx`).
pub(super) fn allow_rule(
    cx: &mut Ctx<'_>,
    spanned: &Spanned<RawAllow>,
    dns: &DnsConfig,
) -> Vec<Rule> {
    let proxy = dns.proxy.is_some();
    let a = spanned.get_ref();
    let target = match (&a.cidr, &a.host) {
        (Some(c), None) => {
            if let Some(ai) = &a.allow_internal {
                cx.err(&ai.span(), "allow.allow_internal only applies to host rules: a cidr rule allows exactly its addresses; remove the key");
                return Vec::new();
            }
            let text = c.get_ref().trim();
            let nets = if text == NAMESERVERS {
                nameserver_nets(dns)
            } else {
                parse_cidr(text).map(|n| vec![n])
            };
            match nets {
                Ok(n) => Ok(n),
                Err(e) => {
                    let hint = if text.chars().all(|c| c.is_ascii_alphabetic()) {
                        format!(" (a name: host = {text:?}; the daemon's DNS servers: cidr = \"{NAMESERVERS}\")")
                    } else {
                        String::new()
                    };
                    cx.err(&c.span(), format!("allow.cidr: {e}{hint}"));
                    return Vec::new();
                }
            }
        }
        (None, Some(h)) => match host_pattern(h.get_ref()) {
            Ok(p @ HostPattern::Wildcard(_)) if !proxy => {
                cx.err(&h.span(), format!("allow.host {:?}: wildcard names are learned from the DNS answers the workload receives through the daemon's DNS proxy: set [dns] proxy = \"127.0.0.153:53\" (and point the workload's resolver at it), or name the hosts exactly", p.to_string()));
                return Vec::new();
            }
            Ok(p) => Err(p),
            Err(e) => {
                cx.err(&h.span(), format!("allow.host: {e}"));
                return Vec::new();
            }
        },
        (Some(c), Some(_)) => {
            cx.err(
                &c.span(),
                "an allow rule has both cidr and host: write two [[workload.allow]] rules",
            );
            return Vec::new();
        }
        (None, None) => {
            cx.err(
                &spanned.span(),
                "an allow rule needs cidr = \"10.0.12.0/24\" or host = \"api.github.com\"",
            );
            return Vec::new();
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
    let mut tools = Vec::new();
    if let Some(list) = &a.tools {
        if list.get_ref().is_empty() {
            cx.err(&list.span(), "allow.tools is empty: name the MCP tools the rule is for (tools = [\"query_db\"]), or remove the key so the rule always applies");
            ok = false;
        }
        for t in list.get_ref() {
            let name = t.get_ref().trim();
            if name.is_empty() || name.len() > 128 || name.chars().any(char::is_control) {
                cx.err(
                    &t.span(),
                    format!("allow.tools: {name:?} is not a tool name (1 to 128 printable characters, as the server's tools/list gives them)"),
                );
                ok = false;
            } else {
                tools.push(name.to_string());
            }
        }
        tools.sort();
        tools.dedup();
    }
    let approval = super::relay_keys::rule_approval(cx, a, &target);
    if !ok || approval.is_err() {
        return Vec::new();
    }
    let approval = approval.unwrap_or(None);
    match target {
        Ok(nets) => nets
            .into_iter()
            .map(|net| {
                Rule::Cidr(AllowRule {
                    net,
                    ports: ports.clone(),
                    proto: a.proto,
                    tools: tools.clone(),
                    comment: a.comment.clone(),
                    approval: approval.clone(),
                    loc,
                })
            })
            .collect(),
        Err(pattern) => vec![Rule::Host(HostRule {
            pattern,
            ports,
            proto: a.proto,
            allow_internal: a.allow_internal.as_ref().is_some_and(|b| *b.get_ref()),
            tools,
            comment: a.comment.clone(),
            loc,
        })],
    }
}

pub(super) fn port_number(n: i64) -> Result<u16, String> {
    if (1..=65535).contains(&n) {
        Ok(n as u16)
    } else {
        Err(format!("port {n} is out of range: ports are 1 to 65535"))
    }
}

pub(super) fn parse_port(v: &toml::Value) -> Result<PortSpan, String> {
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

/// The MCP keys of a workload: at most `MAX_TOOLSETS` distinct `tools` lists among its
/// rules, and `between_calls` ("allow" or "deny"); returns whether egress is denied
/// between calls.
pub(super) fn mcp_keys(
    cx: &mut Ctx<'_>,
    w: &RawWorkload,
    name: &str,
    allow: &[AllowRule],
    hosts: &[HostRule],
) -> bool {
    let toolsets: std::collections::BTreeSet<&Vec<String>> = allow
        .iter()
        .map(|r: &AllowRule| &r.tools)
        .chain(hosts.iter().map(|r: &HostRule| &r.tools))
        .filter(|t| !t.is_empty())
        .collect();
    if toolsets.len() > mcp_guard_common::MAX_TOOLSETS {
        cx.err(
            &w.name.span(),
            format!(
                "workload {name:?}: its allow rules name {} distinct `tools` lists; at most {} fit: give rules for the same tools the same list",
                toolsets.len(),
                mcp_guard_common::MAX_TOOLSETS
            ),
        );
    }
    match &w.between_calls {
        None => false,
        Some(v) => match v.get_ref().as_str() {
            "allow" => false,
            "deny" => true,
            other => {
                cx.err(
                    &v.span(),
                    format!("between_calls = {other:?}: use \"allow\" (default) or \"deny\" (no egress while no MCP tool call is in flight)"),
                );
                false
            }
        },
    }
}
