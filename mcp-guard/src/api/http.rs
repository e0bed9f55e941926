//! The daemon's two HTTP endpoints: the TCP listener serves /metrics, /healthz and
//! /readyz to whoever scrapes them; the control socket (a Unix socket, owner root, mode
//! 0600, or 0660 with a configured group) serves those and /status, /dns and the
//! /events NDJSON stream that `mcp-guard events` follows: command lines and resolved
//! names are for root only.
//!
//! A deliberately small HTTP/1.1 server (GET only, one request per connection): the
//! agent's attack surface stays tiny and it has no web framework to keep patched.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, UnixListener},
    sync::{broadcast, watch},
};
use tracing::debug;

use crate::telemetry::events::{enrich_cached, Cache, History, JsonEvent, Names, Recorded};

pub struct Shared {
    pub ready: AtomicBool,
    /// JSON document served on /status (the state owner's latest).
    pub status: watch::Receiver<Arc<String>>,
    pub events: broadcast::Sender<Arc<JsonEvent>>,
    /// Recent events, replayed to `/events?since=UNIX_SECONDS`.
    pub history: Arc<History>,
    /// For enriching replayed events (the state owner's latest).
    pub names: watch::Receiver<Arc<Names>>,
    pub metrics: Box<dyn Fn() -> String + Send + Sync>,
    /// JSON of the addresses host rules allow now (served on /dns).
    pub dns: Box<dyn Fn() -> String + Send + Sync>,
    /// Approval requests of tool calls (listed and decided on the control socket).
    pub approvals: Arc<crate::mcp::approvals::Approvals>,
}

/// Binds the listener; a taken port is an error the caller reports.
///
/// # Errors
/// The address cannot be bound.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Connections served at once; more wait in the kernel's accept queue (and beyond it are
/// refused by the kernel), so a flood of idle clients cannot take the daemon's file
/// descriptors, which its cgroup scans need.
const MAX_CONNECTIONS: usize = 64;
/// A client must send its whole request within this.
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Binds the control socket: a stale socket file is replaced, the directory is created
/// (mode 0755), and the socket is made root's with mode 0600, or 0660 for `group`,
/// before anyone can connect (it is bound under a private name, then renamed).
///
/// # Errors
/// The socket cannot be created or given its owner and mode.
pub fn bind_control(path: &std::path::Path, group: Option<u32>) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt as _;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            "another daemon answers on it",
        ));
    }
    let tmp = path.with_extension(format!("{}.new", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    // Bound where no one looks yet, made private, then renamed into place: there is no
    // moment at which the socket exists with looser permissions under its name.
    let old_umask = unsafe { libc::umask(0o177) };
    let bound = std::os::unix::net::UnixListener::bind(&tmp);
    // SAFETY: restoring the process umask.
    unsafe { libc::umask(old_umask) };
    let listener = bound?;
    let mode = if let Some(gid) = group {
        let c = std::ffi::CString::new(tmp.as_os_str().as_encoded_bytes())
            .map_err(std::io::Error::other)?;
        // SAFETY: chown on a valid C string; -1 keeps the owner.
        if unsafe { libc::chown(c.as_ptr(), u32::MAX, gid) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        0o660
    } else {
        0o600
    };
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
    std::fs::rename(&tmp, path)?;
    listener.set_nonblocking(true)?;
    UnixListener::from_std(listener)
}

/// What a listener serves.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// /metrics, /healthz, /readyz (TCP, anyone on the host or the pod network).
    Public,
    /// Everything (the control socket), with the peer's credentials.
    Control(Option<Peer>),
}

/// A control-socket client as `SO_PEERCRED` gives it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Peer {
    pub uid: u32,
    pub pid: u32,
}

/// The two listeners: TCP serves [`Scope::Public`], the control socket everything.
pub enum Listener {
    Tcp(TcpListener),
    Control(UnixListener),
}

/// Accepts connections while a slot is free; more wait in the kernel's accept queue.
pub async fn serve(listener: Listener, shared: Arc<Shared>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        // Wait for a free slot before accepting: a flood stays in the accept queue.
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let shared = shared.clone();
        match &listener {
            Listener::Tcp(l) => {
                if let Ok((s, _)) = l.accept().await {
                    tokio::spawn(connection(s, shared, Scope::Public, permit));
                }
            }
            Listener::Control(l) => {
                if let Ok((s, _)) = l.accept().await {
                    // Who is asking, as the kernel saw them connect (approvals).
                    let peer = s.peer_cred().ok().map(|c| Peer {
                        uid: c.uid(),
                        pid: c.pid().and_then(|p| u32::try_from(p).ok()).unwrap_or(0),
                    });
                    tokio::spawn(connection(s, shared, Scope::Control(peer), permit));
                }
            }
        }
    }
}

async fn connection<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    shared: Arc<Shared>,
    scope: Scope,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    if let Err(e) = handle(stream, &shared, scope).await {
        debug!(error = %e, "http connection");
    }
    drop(permit);
}

async fn respond<S: AsyncWrite + Unpin>(
    stream: &mut S,
    status: &str,
    ctype: &str,
    body: &str,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

pub(super) fn query_param<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

/// The request line's method and target, once the headers are in; `None` when the
/// client went away, idled or sent too much (answered here).
async fn read_request<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
) -> std::io::Result<Option<(String, String)>> {
    let mut buf = vec![0u8; 4096];
    let mut n = 0;
    while !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
        if n == buf.len() {
            respond(
                stream,
                "431 Request Header Fields Too Large",
                "text/plain",
                "",
            )
            .await?;
            return Ok(None);
        }
        let Ok(r) = tokio::time::timeout(REQUEST_TIMEOUT, stream.read(&mut buf[n..])).await else {
            // Idle or slow: the slot goes to someone else.
            return Ok(None);
        };
        let r = r?;
        if r == 0 {
            return Ok(None);
        }
        n += r;
    }
    let req = String::from_utf8_lossy(&buf[..n]);
    let mut parts = req.split_whitespace();
    Ok(Some((
        parts.next().unwrap_or("").to_string(),
        parts.next().unwrap_or("").to_string(),
    )))
}

async fn handle<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    shared: &Shared,
    scope: Scope,
) -> std::io::Result<()> {
    let Some((method, target)) = read_request(&mut stream).await? else {
        return Ok(());
    };
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    if let (Scope::Control(peer), "POST") = (scope, method.as_str()) {
        if let Some(rest) = path.strip_prefix("/approvals/") {
            let (status, body) = super::approvals::decide(&shared.approvals, rest, query, peer);
            return respond(&mut stream, status, "application/json", &body).await;
        }
    }
    if method != "GET" {
        return respond(
            &mut stream,
            "405 Method Not Allowed",
            "text/plain",
            "GET only (and POST /approvals/ID/approve|deny on the control socket)\n",
        )
        .await;
    }
    if scope == Scope::Public && matches!(path, "/status" | "/dns" | "/events" | "/approvals") {
        return respond(
            &mut stream,
            "404 Not Found",
            "text/plain",
            "not here: /status, /events and /dns are served on the control socket (daemon.control_socket), for root only\n",
        )
        .await;
    }
    let ok = "200 OK";
    match path {
        "/healthz" => respond(&mut stream, ok, "text/plain", "ok\n").await,
        "/readyz" if shared.ready.load(Ordering::SeqCst) => {
            respond(&mut stream, ok, "text/plain", "ready\n").await
        }
        "/readyz" => {
            respond(
                &mut stream,
                "503 Service Unavailable",
                "text/plain",
                "not ready\n",
            )
            .await
        }
        "/status" => {
            let body = shared.status.borrow().clone();
            respond(&mut stream, ok, "application/json", &body).await
        }
        "/dns" => respond(&mut stream, ok, "application/json", &(shared.dns)()).await,
        "/metrics" => {
            let body = (shared.metrics)();
            let kind = "text/plain; version=0.0.4; charset=utf-8";
            respond(&mut stream, ok, kind, &body).await
        }
        "/events" => stream_events(&mut stream, shared, query).await,
        "/approvals" if scope != Scope::Public => {
            let all = query_param(query, "all") == Some("1");
            let body = serde_json::json!({ "approvals": shared.approvals.list(all) }).to_string();
            respond(&mut stream, ok, "application/json", &body).await
        }
        _ => {
            let body = if scope == Scope::Public {
                "not found: try /metrics, /healthz, /readyz\n"
            } else {
                "not found: try /metrics, /healthz, /readyz, /status, /events, /dns\n"
            };
            respond(&mut stream, "404 Not Found", "text/plain", body).await
        }
    }
}

/// What `/events` keeps: `workload=` and `reason=` of the query.
struct EventFilter {
    workload: Option<String>,
    reason: Option<String>,
}

impl EventFilter {
    fn keep(&self, e: &JsonEvent) -> bool {
        self.workload
            .as_deref()
            .is_none_or(|w| e.workload.as_deref() == Some(w))
            && self.reason.as_deref().is_none_or(|r| e.reason == r)
    }
}

/// `/events`: the history since `since=` (enriched off the runtime), then live events.
async fn stream_events<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    shared: &Shared,
    query: &str,
) -> std::io::Result<()> {
    let filter = Arc::new(EventFilter {
        workload: query_param(query, "workload").map(str::to_string),
        reason: query_param(query, "reason").map(str::to_string),
    });
    let since: Option<f64> = query_param(query, "since").and_then(|s| s.parse().ok());
    // Subscribe before replaying so nothing falls between history and live.
    let mut rx = shared.events.subscribe();
    stream
        .write_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nConnection: close\r\n\r\n",
        )
        .await?;
    if let Some(since) = since {
        for e in replay(shared, since, filter.clone()).await {
            let mut line = serde_json::to_vec(&e).expect("serialisable");
            line.push(b'\n');
            stream.write_all(&line).await?;
        }
    }
    loop {
        let e = match rx.recv().await {
            Ok(e) => e,
            Err(broadcast::error::RecvError::Lagged(_)) => continue,
            Err(broadcast::error::RecvError::Closed) => return Ok(()),
        };
        if !filter.keep(&e) {
            continue;
        }
        let mut line = serde_json::to_vec(&*e).expect("serialisable");
        line.push(b'\n');
        stream.write_all(&line).await?;
    }
}

/// The kept history since `since` (unix seconds), enriched on a blocking thread (it
/// reads /proc and cgroupfs for up to the whole history).
async fn replay(shared: &Shared, since: f64, filter: Arc<EventFilter>) -> Vec<JsonEvent> {
    let cutoff = (since.max(0.0) * 1e9) as u128;
    let raw: Vec<_> = shared
        .history
        .lock()
        .expect("history lock")
        .iter()
        .filter(|(t, _)| *t >= cutoff)
        .map(|(_, e)| e.clone())
        .collect();
    let names = shared.names.borrow().clone();
    tokio::task::spawn_blocking(move || {
        let mut cache = Cache::default();
        raw.iter()
            .map(|r| match r {
                Recorded::Kernel(e) => enrich_cached(e, &names, &mut cache),
                Recorded::Daemon(j) => (**j).clone(),
            })
            .filter(|e| filter.keep(e))
            .collect()
    })
    .await
    .unwrap_or_default()
}
