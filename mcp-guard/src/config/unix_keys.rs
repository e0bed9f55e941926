//! The per-workload AF_UNIX keys: `unix = "deny-listed" | "allow-listed"`, `allow_unix`
//! and `deny_unix`, and the built-in list of local deputies every workload is refused.

use toml::Spanned;

use super::{Ctx, Loc};

/// Longest path a rule may name (sun_path holds 108 bytes; a path's NUL is compared).
const MAX_PATH: usize = 107;

/// Sockets through which a guarded process could have an unguarded one act for it:
/// container runtimes (start an unguarded container), the D-Bus system bus and
/// systemd's private socket (`systemd-run` starts a unit outside the workload), the
/// kubelet's, and containerd-shim's abstract sockets of older releases (the daemon's own
/// sockets are added from the config). Refused in every workload unless its
/// `allow_unix` names the same pattern.
pub const BUILT_IN_DENY: &[&str] = &[
    "/run/containerd/containerd.sock",
    "/run/containerd/containerd.sock.ttrpc",
    "/var/run/containerd/containerd.sock",
    "/run/k3s/containerd/containerd.sock",
    "/run/docker.sock",
    "/var/run/docker.sock",
    "/run/crio/crio.sock",
    "/var/run/crio/crio.sock",
    "/run/podman/podman.sock",
    "/run/dbus/system_bus_socket",
    "/var/run/dbus/system_bus_socket",
    "/run/systemd/private",
    "/var/lib/kubelet/pod-resources/kubelet.sock",
    "/var/lib/kubelet/device-plugins/kubelet.sock",
    "/var/lib/kubelet/plugins_registry/*",
    "@/containerd-shim/*",
];

/// One AF_UNIX pattern: an exact path or abstract name, or a prefix (`dir/*`, `@name*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnixPattern {
    /// As written (`/run/app.sock`, `@name`, `/run/app/*`).
    pub text: String,
    /// The bytes the kernel compares: an exact pattern ends with the NUL after the name,
    /// an abstract one starts with a NUL; a prefix pattern stops before its `*`.
    pub bytes: Vec<u8>,
    pub loc: Loc,
}

/// A workload's AF_UNIX policy.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UnixPolicy {
    /// `unix = "allow-listed"`: every destination `allow` does not name is refused.
    pub allow_listed: bool,
    pub allow: Vec<UnixPattern>,
    pub deny: Vec<UnixPattern>,
}

/// Parses one pattern; `Err` says what to write instead.
pub fn pattern(text: &str) -> Result<Vec<u8>, String> {
    let (abstract_, name) = match text.strip_prefix('@') {
        Some(rest) => (true, rest),
        None if text.starts_with('/') => (false, text),
        None => {
            return Err(format!("{text:?} is neither an absolute path (\"/run/app.sock\") nor an abstract name (\"@name\"): the hooks see the address as the process wrote it, so a relative path cannot be matched"));
        }
    };
    let (stem, prefix) = match name.strip_suffix('*') {
        Some(s) => (s, true),
        None => (name, false),
    };
    if stem.contains('*') || stem.contains('?') || stem.contains('[') {
        return Err(format!("{text:?}: only a trailing * is supported (\"/run/app/*\" covers every socket below /run/app, \"@name*\" every abstract name starting with name)"));
    }
    if name.is_empty() || (abstract_ && stem.is_empty() && !prefix) {
        return Err(format!("{text:?} names no socket"));
    }
    if stem.contains('\0') {
        return Err(format!("{text:?} holds a NUL byte"));
    }
    if !abstract_
        && (stem.contains("//")
            || stem.contains("/./")
            || stem.contains("/../")
            || stem.ends_with("/.")
            || stem.ends_with("/..")
            || (!prefix && stem.ends_with('/')))
    {
        return Err(format!("{text:?} is not a canonical path (no //, /./, /../ or trailing /): write it as the socket's path"));
    }
    let mut bytes = Vec::with_capacity(stem.len() + 2);
    if abstract_ {
        bytes.push(0);
    }
    bytes.extend_from_slice(stem.as_bytes());
    if !prefix {
        bytes.push(0);
    }
    if bytes.len() > MAX_PATH + 1 {
        return Err(format!(
            "{text:?} is longer than an AF_UNIX address holds ({MAX_PATH} bytes)"
        ));
    }
    Ok(bytes)
}

fn patterns(cx: &mut Ctx<'_>, list: &[Spanned<String>], key: &str) -> Vec<UnixPattern> {
    let mut out: Vec<UnixPattern> = Vec::new();
    for p in list {
        match pattern(p.get_ref()) {
            Ok(bytes) => {
                if out.iter().any(|o| o.bytes == bytes) {
                    cx.err(
                        &p.span(),
                        format!("{key}: {:?} is listed twice", p.get_ref()),
                    );
                    continue;
                }
                out.push(UnixPattern {
                    text: p.get_ref().clone(),
                    bytes,
                    loc: cx.loc(&p.span()),
                });
            }
            Err(e) => cx.err(&p.span(), format!("{key}: {e}")),
        }
    }
    out
}

/// Reads a workload's `unix`, `allow_unix` and `deny_unix`.
pub(super) fn unix_keys(
    cx: &mut Ctx<'_>,
    mode: Option<&Spanned<String>>,
    allow: &[Spanned<String>],
    deny: &[Spanned<String>],
) -> UnixPolicy {
    let allow_listed = match mode.map(|m| (m.get_ref().as_str(), m.span())) {
        None | Some(("deny-listed", _)) => false,
        Some(("allow-listed", _)) => true,
        Some((other, span)) => {
            cx.err(&span, format!("unix = {other:?}: use \"deny-listed\" (default: the built-in local deputies and deny_unix are refused) or \"allow-listed\" (only allow_unix is reachable)"));
            false
        }
    };
    let allow = patterns(cx, allow, "allow_unix");
    let deny = patterns(cx, deny, "deny_unix");
    for d in &deny {
        if let Some(a) = allow.iter().find(|a| a.bytes == d.bytes) {
            cx.errors.push(super::ConfigError {
                file: cx.file.to_path_buf(),
                line: d.loc.line,
                column: 1,
                message: format!(
                    "deny_unix {:?} is also in allow_unix (line {}): keep one",
                    d.text, a.loc.line
                ),
            });
        }
    }
    UnixPolicy {
        allow_listed,
        allow,
        deny,
    }
}

#[cfg(test)]
mod tests {
    use super::pattern;

    #[test]
    fn patterns_become_the_bytes_the_kernel_compares() {
        assert_eq!(pattern("/run/a.sock").unwrap(), b"/run/a.sock\0");
        assert_eq!(pattern("/run/app/*").unwrap(), b"/run/app/");
        assert_eq!(pattern("@name").unwrap(), b"\0name\0");
        assert_eq!(
            pattern("@/containerd-shim/*").unwrap(),
            b"\0/containerd-shim/"
        );
        for bad in [
            "run/a.sock",
            "/run/*.sock",
            "/run//a",
            "/run/../a",
            "/run/a/",
            "@",
            "",
        ] {
            assert!(pattern(bad).is_err(), "{bad:?} accepted");
        }
        assert!(pattern(&format!("/{}", "a".repeat(106))).is_ok());
        assert!(pattern(&format!("/{}", "a".repeat(107))).is_err());
        for p in super::BUILT_IN_DENY {
            assert!(pattern(p).is_ok(), "{p}");
        }
    }
}
