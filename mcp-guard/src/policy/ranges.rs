//! Port ranges: how rules become the ranges of a policy entry, and how rules print.

use super::*;

pub(super) fn proto_bits(p: Proto) -> u8 {
    match p {
        Proto::Tcp => PROTO_TCP,
        Proto::Udp => PROTO_UDP,
        Proto::Any => PROTO_ANY,
    }
}

#[must_use]
pub fn proto_text(p: Proto) -> &'static str {
    match p {
        Proto::Tcp => "tcp",
        Proto::Udp => "udp",
        Proto::Any => "any",
    }
}

/// Drops ranges that an earlier range already covers (same or wider protocols): the
/// kernel takes the first matching range, so they could never decide.
pub(super) fn dedupe(ranges: &mut Vec<PortRange>) {
    let mut out: Vec<PortRange> = Vec::with_capacity(ranges.len());
    for r in ranges.drain(..) {
        // A range scoped to tools is covered by an unscoped one or one of the same tools.
        let covered = out.iter().any(|e| {
            e.lo <= r.lo
                && r.hi <= e.hi
                && e.protos & r.protos == r.protos
                && (e.toolset == 0 || e.toolset == r.toolset)
        });
        if !covered {
            out.push(r);
        }
    }
    *ranges = out;
}

/// Merges overlapping or adjacent ranges with the same protocols and tools; the merged range keeps
/// the first rule's id. Only used when a prefix carries more than [`MAX_RANGES`].
pub(super) fn coalesce(ranges: &mut Vec<PortRange>) {
    let mut by_proto: Vec<PortRange> = Vec::new();
    let mut sorted = ranges.clone();
    sorted.sort_by_key(|r| (r.toolset, r.protos, r.lo, r.hi));
    for r in sorted {
        if let Some(last) = by_proto.last_mut() {
            if last.protos == r.protos
                && last.toolset == r.toolset
                && u32::from(r.lo) <= u32::from(last.hi) + 1
            {
                last.hi = last.hi.max(r.hi);
                continue;
            }
        }
        by_proto.push(r);
    }
    *ranges = by_proto;
}

/// Ports as rules and `check` print them: "all ports" or "ports 443,8000-8100".
#[must_use]
pub fn ports_text(ports: &[PortSpan]) -> String {
    if ports.is_empty() {
        return "all ports".to_string();
    }
    let p: Vec<String> = ports
        .iter()
        .map(|p| {
            if p.lo == p.hi {
                p.lo.to_string()
            } else {
                format!("{}-{}", p.lo, p.hi)
            }
        })
        .collect();
    format!("ports {}", p.join(","))
}

/// " for tools [a, b]" for a rule scoped to MCP tools, "" otherwise.
#[must_use]
pub fn tools_text(tools: &[String]) -> String {
    if tools.is_empty() {
        String::new()
    } else {
        format!(" while MCP tools [{}] run", tools.join(", "))
    }
}

pub(super) fn push_ranges(
    ranges: &mut Vec<PortRange>,
    ports: &[PortSpan],
    proto: Proto,
    toolset: u8,
    rule_id: u32,
) {
    let protos = proto_bits(proto);
    if ports.is_empty() {
        ranges.push(PortRange {
            lo: 0,
            hi: u16::MAX,
            protos,
            toolset,
            _pad: [0; 2],
            rule_id,
        });
    }
    for p in ports {
        ranges.push(PortRange {
            lo: p.lo,
            hi: p.hi,
            protos,
            toolset,
            _pad: [0; 2],
            rule_id,
        });
    }
}
