//! AF_UNIX destinations compiled into `UNIX_RULES_1` entries, and the same longest-match
//! evaluation the kernel makes, for `explain` and the tests.

use mcp_guard_common::{UnixRule, SCOPE_UNIX_BUILTIN, UNIX_ALLOW, UNIX_DENY, UNIX_NOT_ALLOWED};

use super::RuleInfo;
use crate::config::{unix_keys, Config};

/// One entry of a workload (or of the built-in list, `workload_id`
/// [`SCOPE_UNIX_BUILTIN`]): the bytes compared (see [`unix_keys::UnixPattern`]) and what
/// a longest match on them says.
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

fn rule(action: u8, rule_id: u32, bytes: &[u8]) -> UnixRule {
    UnixRule {
        rule_id,
        action,
        len: u8::try_from(bytes.len()).unwrap_or(u8::MAX),
        _pad: [0; 2],
    }
}

/// The built-in deny patterns and the daemon's own sockets: (pattern, why).
fn built_in(cfg: &Config) -> Vec<(String, &'static str)> {
    let mut out: Vec<(String, &'static str)> = unix_keys::BUILT_IN_DENY
        .iter()
        .map(|p| ((*p).to_string(), "a local deputy"))
        .collect();
    // The daemon binds its sockets under `<stem>.<pid>.new` and renames them into place:
    // BPF LSM knows them by that bound name, the cgroup hooks by the path written.
    for (path, what) in [
        (&cfg.control_socket, "mcp-guard's control socket"),
        (&cfg.mcp_socket, "mcp-guard's MCP socket"),
    ] {
        out.push((path.display().to_string(), what));
        out.push((format!("{}.*", path.with_extension("").display()), what));
    }
    if let Some(cri) = &cfg.pods.cri_socket {
        out.push((
            cri.display().to_string(),
            "the container runtime (daemon.cri_socket)",
        ));
    }
    out
}

/// The built-in entries (scope [`SCOPE_UNIX_BUILTIN`], shared by every workload) and
/// every workload's own; rules are appended to `rules` (ids from its length + 1).
pub fn compile(cfg: &Config, rules: &mut Vec<RuleInfo>) -> Vec<UnixEntry> {
    let file = cfg.path.display().to_string();
    let mut add = |text: String| {
        let id = u32::try_from(rules.len() + 1).expect("fewer than 2^32 rules");
        rules.push(RuleInfo { id, text });
        id
    };
    let mut out: Vec<UnixEntry> = Vec::new();
    for (p, why) in built_in(cfg) {
        // The daemon's socket paths are checked as config keys; one that is no AF_UNIX
        // path (too long) cannot be connected to either.
        let Ok(bytes) = unix_keys::pattern(&p) else {
            continue;
        };
        if out.iter().any(|e| e.bytes == bytes) {
            continue;
        }
        let id = add(format!(
            "built-in deny unix {p} ({why}; allow_unix overrides)"
        ));
        out.push(UnixEntry {
            workload_id: SCOPE_UNIX_BUILTIN,
            rule: rule(UNIX_DENY, id, &bytes),
            bytes,
        });
    }
    for w in &cfg.workloads {
        let mut put = |bytes: &[u8], action: u8, id: u32| {
            out.push(UnixEntry {
                workload_id: w.id,
                bytes: bytes.to_vec(),
                rule: rule(action, id, bytes),
            });
        };
        if w.unix.allow_listed {
            let id = add(format!(
                "workload {} unix = \"allow-listed\": only allow_unix is reachable ({file}:{})",
                w.name, w.loc.line
            ));
            put(&[], UNIX_NOT_ALLOWED, id);
        }
        // (The same pattern in both lists is a config error.)
        for d in &w.unix.deny {
            let id = add(format!(
                "workload {} deny unix {} ({file}:{})",
                w.name, d.text, d.loc.line
            ));
            put(&d.bytes, UNIX_DENY, id);
        }
        for a in &w.unix.allow {
            let id = add(format!(
                "workload {} allow unix {} ({file}:{})",
                w.name, a.text, a.loc.line
            ));
            put(&a.bytes, UNIX_ALLOW, id);
        }
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

/// The kernel's decision for `addr` (from [`address_bytes`]) in a workload: its longest
/// entry whose bytes are a prefix of the address padded with NULs, unless the longest
/// built-in one is longer.
#[must_use]
pub fn evaluate(entries: &[UnixEntry], workload_id: u32, addr: &[u8]) -> UnixRule {
    let mut padded = [0u8; mcp_guard_common::UNIX_PATH_MAX];
    padded[..addr.len()].copy_from_slice(addr);
    let best = |scope: u32| {
        entries
            .iter()
            .filter(|e| e.workload_id == scope && padded.starts_with(&e.bytes))
            .max_by_key(|e| e.bytes.len())
            .map(|e| e.rule)
    };
    match (best(workload_id), best(SCOPE_UNIX_BUILTIN)) {
        (Some(own), Some(b)) if b.len > own.len => b,
        (Some(own), _) => own,
        (None, Some(b)) => b,
        (None, None) => rule(UNIX_ALLOW, 0, &[]),
    }
}

#[cfg(test)]
mod tests {
    use mcp_guard_common::{UNIX_ALLOW, UNIX_DENY, UNIX_NOT_ALLOWED};

    use super::{address_bytes, evaluate};

    /// The most specific entry wins; at equal length the workload's own over the
    /// built-in one; built-in entries exist once, whatever the number of workloads.
    #[test]
    fn the_most_specific_entry_decides() {
        let text = r#"
[[workload]]
name = "a"
cgroup = "/a"
allow_unix = ["/run/*", "/run/podman/podman.sock"]
deny_unix = ["/run/app/x.sock"]
[[workload]]
name = "b"
cgroup = "/b"
unix = "allow-listed"
allow_unix = ["@ok"]
"#;
        let cfg = crate::config::parse(std::path::Path::new("t.toml"), text).unwrap();
        let c = crate::policy::compile(&cfg).unwrap();
        let id = |n: &str| cfg.workloads.iter().find(|w| w.name == n).unwrap().id;
        let act = |w: &str, addr: &str| evaluate(&c.unix, id(w), &address_bytes(addr)).action;
        assert_eq!(
            act("a", "/run/docker.sock"),
            UNIX_DENY,
            "built-in longer than /run/"
        );
        assert_eq!(
            act("a", "/run/podman/podman.sock"),
            UNIX_ALLOW,
            "same pattern: own"
        );
        assert_eq!(act("a", "/run/app/x.sock"), UNIX_DENY);
        assert_eq!(act("a", "/run/app/y.sock"), UNIX_ALLOW);
        assert_eq!(act("a", "/tmp/z"), UNIX_ALLOW, "no entry");
        assert_eq!(
            act("a", "/run/docker.sockX"),
            UNIX_ALLOW,
            "exact means exact"
        );
        assert_eq!(
            act("b", "/run/docker.sock"),
            UNIX_DENY,
            "built-in over catch-all"
        );
        assert_eq!(act("b", "/tmp/z"), UNIX_NOT_ALLOWED);
        assert_eq!(act("b", "@ok"), UNIX_ALLOW);
        assert_eq!(
            act("b", "@okay"),
            UNIX_NOT_ALLOWED,
            "abstract names are exact"
        );
        assert_eq!(act("b", "@/containerd-shim/x"), UNIX_DENY);
        let builtin = c
            .unix
            .iter()
            .filter(|e| e.workload_id == mcp_guard_common::SCOPE_UNIX_BUILTIN)
            .count();
        assert_eq!(c.unix.len(), builtin + 3 + 2, "{:?}", c.unix);
    }
}
