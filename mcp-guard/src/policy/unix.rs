//! AF_UNIX destinations compiled into `UNIX_RULES_1` entries, and the same longest-match
//! evaluation the kernel makes, for `explain` and the tests.

use mcp_guard_common::{UnixRule, UNIX_ALLOW, UNIX_DENY, UNIX_NOT_ALLOWED};

use super::RuleInfo;
use crate::config::{unix_keys, Config};

/// One entry of a workload: the bytes compared (see [`unix_keys::UnixPattern`]) and
/// what a longest match on them says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnixEntry {
    pub workload_id: u32,
    pub bytes: Vec<u8>,
    pub rule: UnixRule,
}

impl UnixEntry {
    /// The kernel key in a policy slot.
    #[must_use]
    pub fn key(&self, slot: u32) -> aya::maps::lpm_trie::Key<mcp_guard_common::UnixLpmData> {
        let mut path = [0u8; mcp_guard_common::UNIX_PATH_MAX];
        path[..self.bytes.len()].copy_from_slice(&self.bytes);
        aya::maps::lpm_trie::Key::new(
            32 + 8 * self.bytes.len() as u32,
            mcp_guard_common::UnixLpmData {
                scope: mcp_guard_common::scope(self.workload_id, slot),
                path,
            },
        )
    }
}

fn rule(action: u8, rule_id: u32) -> UnixRule {
    UnixRule {
        rule_id,
        action,
        _pad: [0; 3],
    }
}

/// The built-in deny patterns and the daemon's own sockets: (pattern, why).
fn built_in(cfg: &Config) -> Vec<(String, &'static str)> {
    let mut out: Vec<(String, &'static str)> = unix_keys::BUILT_IN_DENY
        .iter()
        .map(|p| ((*p).to_string(), "a local deputy"))
        .collect();
    out.push((
        cfg.control_socket.display().to_string(),
        "mcp-guard's control socket",
    ));
    out.push((
        cfg.mcp_socket.display().to_string(),
        "mcp-guard's MCP socket",
    ));
    if let Some(cri) = &cfg.pods.cri_socket {
        out.push((
            cri.display().to_string(),
            "the container runtime (daemon.cri_socket)",
        ));
    }
    out
}

/// Every workload's entries; rules are appended to `rules` (ids from its length + 1).
pub fn compile(cfg: &Config, rules: &mut Vec<RuleInfo>) -> Vec<UnixEntry> {
    let file = cfg.path.display().to_string();
    let mut add = |text: String| {
        let id = u32::try_from(rules.len() + 1).expect("fewer than 2^32 rules");
        rules.push(RuleInfo { id, text });
        id
    };
    let built: Vec<(Vec<u8>, u32)> = built_in(cfg)
        .into_iter()
        .filter_map(|(p, why)| {
            // The daemon's socket paths are checked as config keys; one that is no
            // AF_UNIX path (too long) cannot be connected to either.
            let bytes = unix_keys::pattern(&p).ok()?;
            let id = add(format!(
                "built-in deny unix {p} ({why}; allow_unix overrides)"
            ));
            Some((bytes, id))
        })
        .collect();
    let mut out = Vec::new();
    for w in &cfg.workloads {
        let mut mine: Vec<UnixEntry> = Vec::new();
        let mut put = |bytes: &[u8], r: UnixRule| {
            if let Some(e) = mine.iter_mut().find(|e| e.bytes == bytes) {
                e.rule = r;
            } else {
                mine.push(UnixEntry {
                    workload_id: w.id,
                    bytes: bytes.to_vec(),
                    rule: r,
                });
            }
        };
        if w.unix.allow_listed {
            let id = add(format!(
                "workload {} unix = \"allow-listed\": only allow_unix is reachable ({file}:{})",
                w.name, w.loc.line
            ));
            put(&[], rule(UNIX_NOT_ALLOWED, id));
        }
        for (bytes, id) in &built {
            put(bytes, rule(UNIX_DENY, *id));
        }
        // The workload's own rules name the same pattern as a built-in: theirs wins.
        for d in &w.unix.deny {
            let id = add(format!(
                "workload {} deny unix {} ({file}:{})",
                w.name, d.text, d.loc.line
            ));
            put(&d.bytes, rule(UNIX_DENY, id));
        }
        for a in &w.unix.allow {
            let id = add(format!(
                "workload {} allow unix {} ({file}:{})",
                w.name, a.text, a.loc.line
            ));
            put(&a.bytes, rule(UNIX_ALLOW, id));
        }
        out.extend(mine);
    }
    out
}

/// The bytes the kernel looks up for an address as a process writes it (`/path` or
/// `@abstract`): a path up to its end, an abstract name with its leading NUL.
#[must_use]
pub fn address_bytes(addr: &str) -> Vec<u8> {
    let mut v = match addr.strip_prefix('@') {
        Some(name) => {
            let mut v = vec![0];
            v.extend_from_slice(name.as_bytes());
            v
        }
        None => addr.as_bytes().to_vec(),
    };
    v.truncate(mcp_guard_common::UNIX_PATH_MAX);
    v
}

/// The kernel's decision for `addr` (from [`address_bytes`]) in a workload: the
/// longest entry whose bytes are a prefix of the address padded with NULs.
#[must_use]
pub fn evaluate(entries: &[UnixEntry], workload_id: u32, addr: &[u8]) -> UnixRule {
    let mut padded = [0u8; mcp_guard_common::UNIX_PATH_MAX];
    padded[..addr.len()].copy_from_slice(addr);
    entries
        .iter()
        .filter(|e| e.workload_id == workload_id && padded.starts_with(&e.bytes))
        .max_by_key(|e| e.bytes.len())
        .map_or(rule(UNIX_ALLOW, 0), |e| e.rule)
}
