//! The `[daemon]` keys that name paths and groups: where programs attach, pins, the
//! control and MCP sockets.

use std::path::PathBuf;

use super::{group_id, raw::RawDaemon, Ctx, DEFAULT_CONTROL_SOCKET, DEFAULT_PIN_DIR};

pub(super) struct DaemonPaths {
    pub(super) attach_cgroup: String,
    pub(super) pin_dir: PathBuf,
    pub(super) control_socket: PathBuf,
    pub(super) mcp_socket: PathBuf,
    pub(super) control_group: Option<u32>,
}

pub(super) fn daemon_paths(cx: &mut Ctx<'_>, daemon: &RawDaemon) -> DaemonPaths {
    let attach_cgroup = match &daemon.attach_cgroup {
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
    let pin_dir = abs_path(
        cx,
        daemon.pin_dir.as_ref(),
        "pin_dir",
        DEFAULT_PIN_DIR,
        "an absolute path on a bpffs, e.g. \"/sys/fs/bpf/mcp-guard\"",
    );
    let control_socket = abs_path(
        cx,
        daemon.control_socket.as_ref(),
        "control_socket",
        DEFAULT_CONTROL_SOCKET,
        "an absolute path, e.g. \"/run/mcp-guard/control.sock\"",
    );
    let mcp_socket = abs_path(
        cx,
        daemon.mcp_socket.as_ref(),
        "mcp_socket",
        crate::mcp::wire::DEFAULT_SOCKET,
        "an absolute path, e.g. \"/run/mcp-guard/mcp.sock\"",
    );
    if let Some(s) = &daemon.mcp_socket {
        if std::path::Path::new(s.get_ref()) == control_socket {
            cx.err(
                &s.span(),
                "daemon.mcp_socket is the same path as daemon.control_socket: give each its own",
            );
        }
    }
    let control_group = daemon.control_group.as_ref().and_then(|g| {
        let id = group_id(g.get_ref());
        if id.is_none() {
            cx.err(&g.span(), format!("daemon.control_group {:?} is not a group on this machine (getent group): name an existing group or give its number", g.get_ref()));
        }
        id
    });
    DaemonPaths {
        attach_cgroup,
        pin_dir,
        control_socket,
        mcp_socket,
        control_group,
    }
}

/// A `[daemon]` key that must be an absolute path with no `..`; the default if unset
/// (or, after the error, if invalid).
fn abs_path(
    cx: &mut Ctx<'_>,
    value: Option<&super::Spanned<String>>,
    key: &str,
    default: &str,
    must_be: &str,
) -> PathBuf {
    match value {
        None => PathBuf::from(default),
        Some(s) if s.get_ref().starts_with('/') && !s.get_ref().split('/').any(|c| c == "..") => {
            PathBuf::from(s.get_ref())
        }
        Some(s) => {
            cx.err(&s.span(), format!("daemon.{key} must be {must_be}"));
            PathBuf::from(default)
        }
    }
}
