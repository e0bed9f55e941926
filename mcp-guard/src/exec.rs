//! `mcp-guard exec`: run a command in a workload's cgroup once the kernel enforces it,
//! hardened; with `--mcp`, run an MCP server in an instance cgroup of its own behind the
//! relay ([`crate::mcp::relay`]).
//!
//! # Errors
//! Every function returns why the command was not run.

use std::{
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::{config, host::cgroup};

/// The workload exec runs in, its cgroup created, once the kernel enforces it (unless
/// `unguarded`): the config and the workload's cgroup directory.
fn exec_target(path: &Path, workload: &str, unguarded: bool) -> Result<(config::Config, PathBuf)> {
    enforced_target(path, workload, unguarded, Duration::from_secs(5))
}

/// `mcp-guard enforced`: waits up to `wait` until the kernel enforces the workload's
/// cgroup (the check `exec` makes, from the pinned state). For a unit's `ExecStartPre=`,
/// so an MCP server never starts unguarded.
pub fn wait_enforced(path: &Path, workload: &str, wait: Duration) -> Result<()> {
    enforced_target(path, workload, false, wait).map(|_| ())
}

fn enforced_target(
    path: &Path,
    workload: &str,
    unguarded: bool,
    wait: Duration,
) -> Result<(config::Config, PathBuf)> {
    let cfg = config::load(path)?;
    let wl = cfg
        .workloads
        .iter()
        .find(|w| w.name == workload)
        .with_context(|| format!("{}: no workload named {workload:?}", path.display()))?;
    let Some(wl_cgroup) = wl.cgroup.clone() else {
        bail!(
            "{}: workload {workload:?} selects Kubernetes pods; exec needs a workload with a plain cgroup path",
            path.display()
        );
    };
    anyhow::ensure!(
        !cgroup::is_pattern(&wl_cgroup),
        "{}: workload {workload:?} selects cgroups by the pattern {wl_cgroup}; exec needs a workload with a plain cgroup path",
        path.display(),
    );
    let mount = cgroup::root(cfg.cgroup_root.as_deref())?;
    let dir = cgroup::create(&mount, &wl_cgroup)
        .with_context(|| format!("creating cgroup {wl_cgroup}"))?;
    let id = cgroup::id(&mount, &wl_cgroup)?;
    if !unguarded {
        // Wait until the kernel itself enforces this exact cgroup (read from the pinned
        // maps and the attached programs, not from a listener anyone could answer on):
        // only then is the command guarded.
        let compiled = crate::policy::compile(&cfg)?;
        let wid = compiled
            .workloads
            .iter()
            .find(|w| w.name == workload)
            .map(|w| w.id)
            .context("workload missing from the compiled policy")?;
        let attach_dir = cgroup::fs_path(&mount, &cfg.attach_cgroup);
        let deadline = Instant::now() + wait;
        loop {
            match crate::kernel::enforced::check(&cfg, wid, id, &attach_dir) {
                Ok(()) => break,
                Err(why) if Instant::now() > deadline => bail!(
                    "workload {workload:?} (cgroup {}) is not enforced: {why}; start `mcp-guard run --config {}` first, or pass --unguarded to run without protection",
                    wl_cgroup,
                    path.display()
                ),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
    Ok((cfg, dir))
}

/// How `exec` hardens the command besides the mounts and the seccomp filter: the
/// capabilities it keeps (`--keep-cap`) and the user and group it runs as
/// (`--user`, `--group`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Harden<'a> {
    pub keep_cap: &'a [String],
    pub user: Option<&'a str>,
    pub group: Option<&'a str>,
}

impl Harden<'_> {
    /// Checks every name before anything happens.
    fn check(&self) -> Result<(Vec<u32>, Option<crate::host::identity::Identity>)> {
        let keep = crate::host::harden::keep_caps(self.keep_cap).map_err(anyhow::Error::msg)?;
        let id =
            crate::host::identity::resolve(self.user, self.group).map_err(anyhow::Error::msg)?;
        Ok((keep, id))
    }
}

pub fn exec(
    path: &Path,
    workload: &str,
    unguarded: bool,
    harden: Option<&Harden<'_>>,
    cmd: &[String],
) -> Result<()> {
    if let Some(h) = harden {
        h.check()?;
    }
    let (cfg, dir) = exec_target(path, workload, unguarded)?;
    exec_in(&dir, harden, &daemon_sockets(&cfg), cmd)
}

/// The daemon's sockets, which a guarded command must not reach (a relay's socket
/// would let it report tool calls of its own).
fn daemon_sockets(cfg: &config::Config) -> Vec<PathBuf> {
    vec![cfg.control_socket.clone(), cfg.mcp_socket.clone()]
}

/// Joins `dir`, hardens (`harden`: the capabilities to keep, `None` for no hardening;
/// `hide`: more sockets to cover) and runs `cmd` in this process.
pub fn exec_in(
    dir: &Path,
    harden: Option<&Harden<'_>>,
    hide: &[PathBuf],
    cmd: &[String],
) -> Result<()> {
    // Checked before anything happens: a name that is not a capability, or one that goes
    // around the guard, an unknown user or group, is an error saying what to give.
    let checked = harden.map(Harden::check).transpose()?;
    cgroup::join(dir, std::process::id())
        .with_context(|| format!("joining cgroup {}", dir.display()))?;
    if let Some((keep, id)) = &checked {
        crate::host::harden::apply(hide, keep, id.as_ref())
            .context("hardening the command failed, so it was not run (pass --no-hardening to run it without)")?;
    }
    let err = std::process::Command::new(&cmd[0]).args(&cmd[1..]).exec();
    bail!("cannot run {:?}: {err}", cmd[0])
}

/// `exec --mcp`: the server runs in `<workload cgroup>/mcp-<relay pid>`, started through
/// `exec-instance` (join, harden, exec) with its stdio piped to the relay, which stays
/// in its own cgroup. Returns the server's exit code.
/// How an MCP server under `exec` talks to its clients.
pub enum Transport {
    /// Newline-delimited JSON-RPC on stdin/stdout (`--mcp`): the relay sits on the pipes.
    Stdio,
    /// Streamable HTTP (`--mcp-http`): the server listens on `upstream`, the proxy serves
    /// its clients on `listen`.
    Http {
        listen: std::net::SocketAddr,
        upstream: std::net::SocketAddr,
    },
}

pub fn exec_mcp(
    path: &Path,
    workload: &str,
    unguarded: bool,
    harden: Option<&Harden<'_>>,
    call_timeout: Duration,
    transport: &Transport,
    cmd: &[String],
) -> Result<u8> {
    use crate::mcp::{relay, wire::ToDaemon};
    if let Some(h) = harden {
        h.check()?;
    }
    let (cfg, dir) = exec_target(path, workload, unguarded)?;
    let instance_dir = dir.join(format!("mcp-{}", std::process::id()));
    std::fs::create_dir(&instance_dir)
        .with_context(|| format!("creating the instance cgroup {}", instance_dir.display()))?;
    let remove = |why: &str| {
        // Processes the server left behind keep the cgroup busy: it is left then.
        for _ in 0..50 {
            if std::fs::remove_dir(&instance_dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "mcp-guard: the instance cgroup {} is still in use ({why}); remove it once its processes are gone",
            instance_dir.display()
        );
    };
    let run = || -> Result<u8> {
        use std::os::unix::fs::MetadataExt as _;
        let cgroup_id = std::fs::metadata(&instance_dir)?.ino();
        let start = ToDaemon::Start {
            workload: workload.to_string(),
            cgroup_id,
            relay_pid: std::process::id(),
            command: cmd.to_vec(),
            resumed: false,
        };
        let daemon = match relay::Daemon::connect(&cfg.mcp_socket, start) {
            Ok(d) => Some(d),
            Err(e) if unguarded => {
                eprintln!("mcp-guard: running unguarded, tool calls are not reported: {e}");
                None
            }
            Err(e) => {
                bail!("{e}; start the daemon first, or pass --unguarded to run without protection")
            }
        };
        let exe = std::env::current_exe().context("finding the mcp-guard binary")?;
        let mut c = std::process::Command::new(exe);
        c.arg("exec-instance")
            .arg("--cgroup-dir")
            .arg(&instance_dir);
        match harden {
            None => {
                c.arg("--no-hardening");
            }
            Some(h) => {
                for k in h.keep_cap {
                    c.arg("--keep-cap").arg(k);
                }
                if let Some(u) = h.user {
                    c.arg("--user").arg(u);
                }
                if let Some(g) = h.group {
                    c.arg("--group").arg(g);
                }
            }
        }
        for p in daemon_sockets(&cfg) {
            c.arg("--hide").arg(p);
        }
        c.arg("--").args(cmd);
        let status = match transport {
            Transport::Stdio => {
                let child = c
                    .stdin(std::process::Stdio::piped())
                    .stdout(std::process::Stdio::piped())
                    .spawn()
                    .with_context(|| format!("starting {:?}", cmd[0]))?;
                relay::relay(daemon, child, call_timeout)?
            }
            Transport::Http { listen, upstream } => {
                let child = c
                    .spawn()
                    .with_context(|| format!("starting {:?}", cmd[0]))?;
                http_relay(daemon, child, *listen, *upstream, call_timeout)?
            }
        };
        Ok(status.code().map_or(1, |c| c as u8))
    };
    let result = run();
    remove("the server left processes behind");
    result
}

/// Serves the server's clients on `listen` through the Streamable HTTP proxy until the
/// server exits; returns its exit status.
fn http_relay(
    daemon: Option<crate::mcp::relay::Daemon>,
    mut child: std::process::Child,
    listen: std::net::SocketAddr,
    upstream: std::net::SocketAddr,
    call_timeout: Duration,
) -> Result<std::process::ExitStatus> {
    let pid = child.id();
    let exited = async move { tokio::task::spawn_blocking(move || child.wait()).await };
    match serve_proxy(daemon, listen, upstream, call_timeout, exited) {
        Ok(status) => Ok(status??),
        Err(e) => {
            // Nobody can reach a server whose proxy cannot listen.
            // SAFETY: signalling our own child.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            Err(e)
        }
    }
}

/// Serves `listen` through the proxy to `upstream` (the daemon connection watched and
/// renewed as the stdio relay's) until `until` completes; returns its output.
fn serve_proxy<T: Send + 'static>(
    daemon: Option<crate::mcp::relay::Daemon>,
    listen: std::net::SocketAddr,
    upstream: std::net::SocketAddr,
    call_timeout: Duration,
    until: impl std::future::Future<Output = T> + Send,
) -> Result<T> {
    use crate::mcp::http_proxy::Proxy;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let proxy = Proxy::new(upstream, daemon, call_timeout);
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let (d, stop) = (proxy.daemon(), done.clone());
        std::thread::spawn(move || crate::mcp::relay::watch(d, stop));
    }
    let out = rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("the MCP proxy cannot listen on {listen}"))?;
        Ok(tokio::select! {
            () = proxy.serve(listener) => unreachable!("the proxy serves until dropped"),
            out = until => out,
        })
    });
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    rt.shutdown_timeout(Duration::from_secs(1));
    out
}

/// What `mcp-guard mcp-proxy` stands in front of.
pub enum ProxyTarget {
    /// A server whose processes run in `instance`, a cgroup below the workload's.
    Cgroup {
        config: PathBuf,
        workload: String,
        instance: String,
    },
    /// In a pod: container `name` of the sidecar's own pod, the daemon reached on
    /// `socket` (mounted from the node).
    Container { name: String, socket: PathBuf },
}

/// `mcp-guard mcp-proxy`: the Streamable HTTP proxy for a server started elsewhere.
/// Serves until killed; the daemon connection is kept (and renewed after a daemon
/// restart) as the stdio relay keeps it.
///
/// # Errors
/// The config, the workload or the instance cgroup is wrong, the daemon refuses the
/// instance, or the address cannot be listened on.
pub fn mcp_proxy(
    target: ProxyTarget,
    listen: std::net::SocketAddr,
    upstream: std::net::SocketAddr,
    call_timeout: Duration,
) -> Result<()> {
    use crate::mcp::wire::ToDaemon;
    let command = vec![format!("mcp-proxy {listen} -> {upstream}")];
    let relay_pid = std::process::id();
    let (socket, start, what) = match target {
        ProxyTarget::Cgroup {
            config,
            workload,
            instance,
        } => {
            let (cfg, _) = exec_target(&config, &workload, false)?;
            let mount = cgroup::root(cfg.cgroup_root.as_deref())?;
            let cgroup_id = cgroup::id(&mount, &instance).with_context(|| {
                format!(
                    "--instance {instance}: no such cgroup below {}",
                    mount.display()
                )
            })?;
            let start = ToDaemon::Start {
                workload,
                cgroup_id,
                relay_pid,
                command,
                resumed: false,
            };
            (cfg.mcp_socket, start, format!("the instance {instance}"))
        }
        ProxyTarget::Container { name, socket } => {
            let start = ToDaemon::StartPod {
                container: name.clone(),
                relay_pid,
                command,
                resumed: false,
            };
            (socket, start, format!("container {name:?} of this pod"))
        }
    };
    let daemon = connect_until_placed(&socket, start)
        .with_context(|| format!("the daemon refused {what}"))?;
    serve_proxy(
        Some(daemon),
        listen,
        upstream,
        call_timeout,
        std::future::pending::<()>(),
    )
}

/// Connects; a sidecar that starts with its pod may be refused until the daemon's
/// runtime poll has placed the pod and its containers (and the kernel lets the sidecar
/// reach the socket): retried for up to a minute, then the last refusal is returned.
fn connect_until_placed(
    socket: &Path,
    start: crate::mcp::wire::ToDaemon,
) -> std::io::Result<crate::mcp::relay::Daemon> {
    let pod = matches!(start, crate::mcp::wire::ToDaemon::StartPod { .. });
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        match crate::mcp::relay::Daemon::connect(socket, start.clone()) {
            Err(e) if pod && std::time::Instant::now() < deadline => {
                use std::io::ErrorKind as K;
                let transient = matches!(
                    e.kind(),
                    K::PermissionDenied | K::NotFound | K::ConnectionRefused
                ) || e.to_string().contains("with a cgroup yet")
                    || e.to_string().contains("not listed yet")
                    || e.to_string().contains("in no pod this daemon placed");
                if !transient {
                    return Err(e);
                }
                std::thread::sleep(Duration::from_millis(500));
            }
            other => return other,
        }
    }
}
