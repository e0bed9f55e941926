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
    let pin_dir = match &daemon.pin_dir {
        None => PathBuf::from(DEFAULT_PIN_DIR),
        Some(s) if s.get_ref().starts_with('/') && !s.get_ref().split('/').any(|c| c == "..") => {
            PathBuf::from(s.get_ref())
        }
        Some(s) => {
            cx.err(&s.span(), "daemon.pin_dir must be an absolute path on a bpffs, e.g. \"/sys/fs/bpf/mcp-guard\"");
            PathBuf::from(DEFAULT_PIN_DIR)
        }
    };
    let control_socket = match &daemon.control_socket {
        None => PathBuf::from(DEFAULT_CONTROL_SOCKET),
        Some(s) if s.get_ref().starts_with('/') && !s.get_ref().split('/').any(|c| c == "..") => {
            PathBuf::from(s.get_ref())
        }
        Some(s) => {
            cx.err(&s.span(), "daemon.control_socket must be an absolute path, e.g. \"/run/mcp-guard/control.sock\"");
            PathBuf::from(DEFAULT_CONTROL_SOCKET)
        }
    };
    let mcp_socket = match &daemon.mcp_socket {
        None => PathBuf::from(crate::mcp::wire::DEFAULT_SOCKET),
        Some(s) if s.get_ref().starts_with('/') && !s.get_ref().split('/').any(|c| c == "..") => {
            PathBuf::from(s.get_ref())
        }
        Some(s) => {
            cx.err(
                &s.span(),
                "daemon.mcp_socket must be an absolute path, e.g. \"/run/mcp-guard/mcp.sock\"",
            );
            PathBuf::from(crate::mcp::wire::DEFAULT_SOCKET)
        }
    };
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
