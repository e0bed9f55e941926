//! The `exec --mcp` relay: stays between an MCP client and a stdio server, copies every
//! byte both ways unchanged, and tells the daemon about each `tools/call` before it
//! forwards it (the daemon answers once the kernel enforces the call's tools) and about
//! its end (result, error, cancellation or timeout) before the client sees the result.
//!
//! Lines are read up to [`MAX_MESSAGE`]; a longer one is passed through as it streams,
//! unread, and counted, like a line that is not JSON-RPC: the relay never blocks, drops
//! or rewrites a message, and never crashes on one.

use std::{
    collections::{HashMap, HashSet},
    io::{BufRead, BufReader, Read, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    sync::{atomic::Ordering, Arc, Mutex},
    time::{Duration, Instant},
};

pub use super::pump::{pump, Counts, Seen, MAX_MESSAGE};
use super::{
    gate,
    jsonrpc::{self, Message},
    wire::{Peer, RelayView, Reply, ToDaemon, MAX_LINE},
};

/// How long the daemon may take to answer one relay request.
const DAEMON_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a starting daemon may take to answer a relay's first request.
const STARTING_TIMEOUT: Duration = Duration::from_secs(60);

/// The connection to the daemon, re-established (with a fresh `start`) when it breaks.
pub struct Daemon {
    socket: PathBuf,
    start: ToDaemon,
    conn: Option<(UnixStream, BufReader<UnixStream>)>,
    /// Peers and tool names already reported, re-sent after a reconnect.
    peers: Option<ToDaemon>,
    tools: Option<ToDaemon>,
    /// Calls the daemon knows are in flight, re-sent after a reconnect.
    calls: Vec<ToDaemon>,
    warned: bool,
    /// Whether a connection was made before (a new one resumes the instance).
    connected_before: bool,
    /// The workload's policy at the relay, as the daemon last said it.
    view: RelayView,
}

impl Daemon {
    /// Connects and announces the instance.
    ///
    /// # Errors
    /// The daemon does not answer on `socket` or refuses the instance.
    pub fn connect(socket: &Path, start: ToDaemon) -> std::io::Result<Self> {
        let mut d = Self {
            socket: socket.to_path_buf(),
            start,
            conn: None,
            peers: None,
            tools: None,
            calls: Vec::new(),
            warned: false,
            connected_before: false,
            view: RelayView::default(),
        };
        d.reconnect()?;
        Ok(d)
    }

    fn reconnect(&mut self) -> std::io::Result<()> {
        self.conn = None;
        let s = UnixStream::connect(&self.socket).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!(
                    "the daemon's MCP socket {}: {e} (is `mcp-guard run` running with this config, and are you root?)",
                    self.socket.display()
                ),
            )
        })?;
        // A daemon that is starting accepts connections (its socket is bound first)
        // but serves them only once it enforces: the first answer may take as long as
        // its start does. Later requests get the usual bound.
        s.set_read_timeout(Some(STARTING_TIMEOUT))?;
        s.set_write_timeout(Some(DAEMON_TIMEOUT))?;
        let r = BufReader::new(s.try_clone()?);
        self.conn = Some((s, r));
        let mut start = self.start.clone();
        if let ToDaemon::Start { resumed, .. } | ToDaemon::StartPod { resumed, .. } = &mut start {
            // Every connection after the first announces an instance that ran on.
            *resumed = self.connected_before;
        }
        self.connected_before = true;
        let mut replay = vec![start];
        replay.extend(self.peers.clone());
        replay.extend(self.tools.clone());
        replay.extend(self.calls.clone());
        for (n, m) in replay.iter().enumerate() {
            let r = self.exchange(m)?;
            if let Some(v) = r.relay {
                self.view = v;
            }
            if n == 0 {
                if let Some((s, _)) = &self.conn {
                    s.set_read_timeout(Some(DAEMON_TIMEOUT))?;
                }
            }
        }
        Ok(())
    }

    fn exchange(&mut self, m: &ToDaemon) -> std::io::Result<Reply> {
        let (s, r) = self
            .conn
            .as_mut()
            .ok_or_else(|| std::io::Error::other("not connected"))?;
        let mut line = serde_json::to_vec(m).map_err(std::io::Error::other)?;
        line.push(b'\n');
        s.write_all(&line)?;
        let mut answer = String::new();
        if r.by_ref().take(MAX_LINE as u64).read_line(&mut answer)? == 0 {
            return Err(std::io::Error::other("the daemon closed the connection"));
        }
        let reply: Reply = serde_json::from_str(&answer).map_err(std::io::Error::other)?;
        if !reply.ok {
            return Err(std::io::Error::other(
                reply.error.unwrap_or_else(|| "refused".into()),
            ));
        }
        Ok(reply)
    }

    /// The workload's policy at the relay, as the daemon last said it.
    #[must_use]
    pub fn view(&self) -> RelayView {
        self.view
    }

    /// Sends one message, reconnecting once if the connection broke. Returns the daemon's
    /// answer (`None`: it did not acknowledge); failures are reported on stderr (once
    /// until it works).
    pub fn send(&mut self, m: ToDaemon) -> Option<Reply> {
        match &m {
            ToDaemon::Peers { .. } => self.peers = Some(m.clone()),
            ToDaemon::Tools { .. } => self.tools = Some(m.clone()),
            ToDaemon::Call {
                request_id,
                session,
                ..
            }
            | ToDaemon::End {
                request_id,
                session,
                ..
            } => {
                // A call replaces one with its key; an end forgets it.
                let key = (request_id.clone(), session.clone());
                self.calls.retain(|c| !same_call(c, &key));
                if matches!(m, ToDaemon::Call { .. }) {
                    self.calls.push(m.clone());
                }
            }
            _ => {}
        }
        let result = self
            .exchange(&m)
            .or_else(|_| self.reconnect().and_then(|()| self.exchange(&m)));
        match result {
            Ok(r) => {
                self.warned = false;
                if let Some(v) = r.relay {
                    self.view = v;
                }
                if r.refused.is_some() || r.pending.is_some() {
                    // Not forwarded (or not yet): not a call in flight to announce again.
                    if let ToDaemon::Call {
                        request_id,
                        session,
                        ..
                    } = &m
                    {
                        let key = (request_id.clone(), session.clone());
                        self.calls.retain(|c| !same_call(c, &key));
                    }
                }
                Some(r)
            }
            Err(e) => {
                self.conn = None;
                if !self.warned {
                    eprintln!(
                        "mcp-guard: the daemon did not acknowledge the relay ({e}): tool calls run with no tool-scoped rule active and are not named in events until it is back"
                    );
                    self.warned = true;
                }
                None
            }
        }
    }
}

/// Whether `c` is the call `(request id, session)`.
fn same_call(c: &ToDaemon, key: &(String, Option<String>)) -> bool {
    matches!(c, ToDaemon::Call { request_id, session, .. } if *request_id == key.0 && *session == key.1)
}

impl Daemon {
    /// Whether the connection to the daemon still stands (nothing is waiting on it
    /// between exchanges, so a readable socket means the daemon closed it).
    fn alive(&self) -> bool {
        let Some((s, _)) = &self.conn else {
            return false;
        };
        let mut fds = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(s),
            events: libc::POLLIN | libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: one valid pollfd, no wait.
        let n = unsafe { libc::poll(&raw mut fds, 1, 0) };
        n == 0
    }

    /// Reconnects (announcing the instance, its peers, tools and calls in flight again)
    /// if the daemon went away. Returns whether the relay is connected afterwards, and
    /// says on stderr when the connection comes back.
    pub fn keep_alive(&mut self) -> bool {
        if self.alive() {
            return true;
        }
        let was = self.conn.is_some();
        match self.reconnect() {
            Ok(()) => {
                eprintln!(
                    "mcp-guard: the relay is connected to the daemon again; {} call(s) in flight registered again",
                    self.calls.len()
                );
                self.warned = false;
                true
            }
            Err(e) => {
                self.conn = None;
                if was || !self.warned {
                    eprintln!(
                        "mcp-guard: the daemon went away ({e}): until it is back this instance has no tool active (tool-scoped rules refuse) and calls are not named in events; retrying"
                    );
                    self.warned = true;
                }
                false
            }
        }
    }
}

/// Watches the daemon connection from a thread of its own: after a daemon restart the
/// instance and its calls in flight are registered again within `backoff` (doubling
/// from 200 ms up to 1 s while the daemon stays away), without waiting for the next
/// message.
pub(crate) fn watch(daemon: Arc<Mutex<Option<Daemon>>>, done: Arc<std::sync::atomic::AtomicBool>) {
    let mut backoff = Duration::from_millis(200);
    while !done.load(Ordering::SeqCst) {
        std::thread::sleep(backoff);
        let ok = match daemon.lock().expect("daemon").as_mut() {
            Some(d) => d.keep_alive(),
            None => return,
        };
        backoff = if ok {
            Duration::from_millis(200)
        } else {
            (backoff * 2).min(Duration::from_secs(1))
        };
    }
}

/// What the relay knows about the session, shared by both directions.
#[derive(Default)]
pub(super) struct Session {
    /// Calls in flight: request id -> start.
    pub(super) calls: HashMap<String, Instant>,
    initialize: Option<String>,
    list: HashSet<String>,
    client: Option<Peer>,
    /// Tool definitions as the session first listed them.
    pins: gate::Pins,
    /// Calls held for approval (a cancellation takes one out: its waiter stops).
    pub(super) held: HashSet<String>,
}

/// Tells the daemon, and what it answered (`None`: unguarded, or no answer).
pub(super) type Tell = Arc<dyn Fn(ToDaemon) -> Option<Reply> + Send + Sync>;

/// Client -> server, one line: calls are judged and announced (their tools activated)
/// before they are forwarded; refused calls are answered here and never forwarded.
fn client_line(
    line: &[u8],
    session: &Mutex<Session>,
    tell: &Tell,
    view: &dyn Fn() -> Option<RelayView>,
    to_client: &Mutex<impl Write>,
    hold: &dyn Fn(super::held::Held),
) -> Seen {
    let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(line) else {
        return Seen::Malformed;
    };
    let Some(msgs) = jsonrpc::read_value(&v) else {
        return Seen::Malformed;
    };
    let view = view();
    let (changed, mut masked) =
        gate::mask_message(&mut v, view.unwrap_or_default().mask, &|_| false);
    let mut refused: Vec<(String, String)> = Vec::new();
    let mut held: Vec<String> = Vec::new();
    for m in msgs {
        match m {
            Message::Initialize { id, client } => {
                let mut s = session.lock().expect("session");
                s.initialize = Some(id);
                s.client = client;
            }
            Message::ListTools { id } => {
                session.lock().expect("session").list.insert(id);
            }
            Message::Call {
                id,
                tool,
                arguments,
                targets,
            } => {
                let was_changed = session
                    .lock()
                    .expect("session")
                    .pins
                    .changed
                    .contains(&tool);
                let call = ToDaemon::Call {
                    request_id: id.clone(),
                    tool,
                    arguments,
                    session: None,
                    targets,
                    changed: was_changed,
                    masked: masked.remove(&id).unwrap_or_default(),
                    approval: None,
                };
                match gate::verdict(tell(call.clone()), view) {
                    gate::Verdict::Refuse(why) => refused.push((id, why)),
                    gate::Verdict::Hold(approval) => {
                        // Held: forwarded (or refused) once someone decides.
                        session.lock().expect("session").held.insert(id.clone());
                        hold(super::held::Held {
                            approval,
                            call,
                            message: gate::request_bytes(&v, &id),
                        });
                        held.push(id);
                    }
                    gate::Verdict::Forward => {
                        session
                            .lock()
                            .expect("session")
                            .calls
                            .insert(id, Instant::now());
                    }
                }
            }
            Message::Cancelled { id } => {
                // A held call cancelled: its waiter stops (nothing was forwarded).
                session.lock().expect("session").held.remove(&id);
                if session.lock().expect("session").calls.remove(&id).is_some() {
                    tell(ToDaemon::End {
                        request_id: id,
                        outcome: "cancelled".into(),
                        session: None,
                        masked: std::collections::BTreeMap::new(),
                    });
                }
            }
            Message::Other | Message::Response { .. } => {}
        }
    }
    if !refused.is_empty() || !held.is_empty() {
        let mut out = to_client.lock().expect("client");
        for (id, why) in &refused {
            // The client's end may be gone; the server's side goes on.
            let _ = out
                .write_all(&gate::refusal(id, why))
                .and_then(|()| out.flush());
        }
        let ids: Vec<String> = refused.into_iter().map(|(id, _)| id).chain(held).collect();
        return match gate::without_requests(v, &ids) {
            Some(left) => Seen::Replace(gate::bytes(&left)),
            None => Seen::Replace(Vec::new()),
        };
    }
    if changed {
        return Seen::Replace(gate::bytes(&v));
    }
    Seen::Pass
}

/// Server -> client, one line: a call's end is told before the client sees the result;
/// `initialize` and `tools/list` answers reported (refused or changed tools taken out of
/// the list), credentials in call results masked.
fn server_line(
    line: &[u8],
    session: &Mutex<Session>,
    tell: &Tell,
    view: &dyn Fn() -> Option<RelayView>,
) -> Seen {
    let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(line) else {
        return Seen::Malformed;
    };
    let Some(msgs) = jsonrpc::read_value(&v) else {
        return Seen::Malformed;
    };
    let mode = view().unwrap_or_default().mask;
    let (mut changed, mut masked) = {
        let s = session.lock().expect("session");
        gate::mask_message(&mut v, mode, &|id| s.calls.contains_key(id))
    };
    for m in msgs {
        let Message::Response { id, error, result } = m else {
            continue;
        };
        let (call, init, list, client) = {
            let mut s = session.lock().expect("session");
            let init = s.initialize.as_ref() == Some(&id);
            if init {
                s.initialize = None;
            }
            (
                s.calls.remove(&id).is_some(),
                init,
                s.list.remove(&id),
                s.client.clone(),
            )
        };
        if call {
            tell(ToDaemon::End {
                request_id: id.clone(),
                outcome: if error { "error" } else { "result" }.into(),
                session: None,
                masked: masked.remove(&id).unwrap_or_default(),
            });
        } else if init {
            let server = result
                .as_ref()
                .and_then(|r| r.get("serverInfo"))
                .and_then(jsonrpc::peer);
            tell(ToDaemon::Peers { client, server });
        } else if list {
            if let Some(r) = result.as_ref() {
                if let Some(names) = jsonrpc::tool_names(r) {
                    // Every tool changed so far: each list that still holds one is a
                    // decision (hidden with pin_tools, reported without).
                    let all_changed: Vec<String> = {
                        let mut s = session.lock().expect("session");
                        s.pins.observe(r);
                        s.pins.changed.iter().cloned().collect()
                    };
                    if let Some(reply) = tell(ToDaemon::Tools {
                        names,
                        changed: all_changed,
                        session: None,
                    }) {
                        changed |= gate::hide_in_response(&mut v, &id, &reply.hidden);
                    }
                }
            }
        }
    }
    if changed {
        Seen::Replace(gate::bytes(&v))
    } else {
        Seen::Pass
    }
}

/// Runs the relay until the server exits; returns its exit status.
///
/// `daemon`: `None` runs unguarded (no daemon to tell; nothing is activated).
/// `child` is the spawned server with piped stdin and stdout.
///
/// # Errors
/// The server could not be waited for.
pub fn relay(
    daemon: Option<Daemon>,
    mut child: std::process::Child,
    call_timeout: Duration,
) -> std::io::Result<std::process::ExitStatus> {
    let daemon = Arc::new(Mutex::new(daemon));
    let watching = Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let (daemon, stop) = (daemon.clone(), watching.clone());
        std::thread::spawn(move || watch(daemon, stop));
    }
    let session = Arc::new(Mutex::new(Session::default()));
    let counts = Arc::new(Counts::default());
    let to_server = Arc::new(Mutex::new(child.stdin.take().expect("piped stdin")));
    let from_server = child.stdout.take().expect("piped stdout");
    let to_client = Arc::new(Mutex::new(std::io::stdout()));
    let tell: Tell = {
        let daemon = daemon.clone();
        Arc::new(move |m: ToDaemon| daemon.lock().expect("daemon").as_mut()?.send(m))
    };
    let view = {
        let daemon = daemon.clone();
        move || daemon.lock().expect("daemon").as_ref().map(Daemon::view)
    };

    let up = {
        let (session, counts, tell, view, to_client) = (
            session.clone(),
            counts.clone(),
            tell.clone(),
            view.clone(),
            to_client.clone(),
        );
        std::thread::spawn(move || {
            let stdin = std::io::stdin().lock();
            // Held calls wait on threads of their own; they hold the server's stdin
            // weakly, so that the client going away still closes it.
            let hold = super::held::waiter(
                Arc::downgrade(&to_server),
                to_client.clone(),
                tell.clone(),
                session.clone(),
            );
            // The client went away: the server sees EOF on its stdin (to_server dropped).
            pump(stdin, &*to_server, &counts, |line| {
                client_line(line, &session, &tell, &view, &to_client, &hold)
            })
        })
    };

    let down = {
        let (session, counts, tell, view, to_client) = (
            session.clone(),
            counts.clone(),
            tell.clone(),
            view.clone(),
            to_client.clone(),
        );
        std::thread::spawn(move || {
            pump(from_server, &to_client, &counts, |line| {
                server_line(line, &session, &tell, &view)
            })
        })
    };

    // Timeouts and counts, once a second, until the server exits.
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ticker = {
        let (session, counts, tell, done) =
            (session.clone(), counts.clone(), tell.clone(), done.clone());
        std::thread::spawn(move || {
            let mut reported = (0, 0);
            loop {
                let last = done.load(Ordering::SeqCst);
                let expired: Vec<String> = {
                    let mut s = session.lock().expect("session");
                    let ids: Vec<String> = s
                        .calls
                        .iter()
                        .filter(|(_, t)| t.elapsed() >= call_timeout)
                        .map(|(id, _)| id.clone())
                        .collect();
                    for id in &ids {
                        s.calls.remove(id);
                    }
                    ids
                };
                for id in expired {
                    tell(ToDaemon::End {
                        request_id: id,
                        outcome: "timeout".into(),
                        session: None,
                        masked: std::collections::BTreeMap::new(),
                    });
                }
                let now = (
                    counts.malformed.load(Ordering::Relaxed),
                    counts.oversized.load(Ordering::Relaxed),
                );
                if now != reported {
                    tell(ToDaemon::Counts {
                        malformed: now.0 - reported.0,
                        oversized: now.1 - reported.1,
                        mismatched: 0,
                    });
                    reported = now;
                }
                if last {
                    return;
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        })
    };

    let status = child.wait();
    // The server is gone: whatever it wrote is copied out before the relay ends; the
    // client side is not waited for (the client may keep its end open).
    let _ = down.join();
    drop(up);
    done.store(true, Ordering::SeqCst);
    watching.store(true, Ordering::SeqCst);
    let _ = ticker.join();
    status
}
