//! Calls held for approval on the stdio relay: each waits on a thread of its own, asking
//! the daemon again until someone decided, while the rest of the session goes on. An
//! approved call is forwarded to the server then (its tools activated first, as any
//! call's); a denied or expired one is answered with the daemon's error. A cancellation
//! from the client stops the wait; the client going away too.

use std::{
    io::Write,
    sync::{Arc, Mutex, Weak},
    time::{Duration, Instant},
};

use super::{
    gate,
    relay::{Session, Tell},
    wire::{Reply, ToDaemon},
};

/// How often a held call is asked about again.
const POLL: Duration = Duration::from_millis(300);
/// How long a held call waits for a daemon that does not answer at all.
const DAEMON_AWAY: Duration = Duration::from_secs(60);
/// How often a client that asked for progress is told the call still waits.
const PROGRESS: Duration = Duration::from_secs(5);

/// One held call.
pub struct Held {
    /// The approval request's id.
    pub approval: String,
    /// The call as first told (asked again with `approval` set).
    pub call: ToDaemon,
    /// The request alone, as the server gets it once approved (with its newline).
    pub message: Vec<u8>,
}

/// The `progressToken` the client gave in the request's `_meta` (it asked for progress
/// notifications).
fn progress_token(message: &[u8]) -> Option<serde_json::Value> {
    let v: serde_json::Value = serde_json::from_slice(message).ok()?;
    v.get("params")?
        .get("_meta")?
        .get("progressToken")
        .filter(|t| t.is_string() || t.is_number())
        .cloned()
}

/// What the relay calls for each held call: starts its waiter.
pub(super) fn waiter<S, C>(
    to_server: Weak<Mutex<S>>,
    to_client: Arc<Mutex<C>>,
    tell: Tell,
    session: Arc<Mutex<Session>>,
) -> impl Fn(Held)
where
    S: Write + Send + 'static,
    C: Write + Send + 'static,
{
    move |h: Held| {
        let (to_server, to_client, tell, session) = (
            to_server.clone(),
            to_client.clone(),
            tell.clone(),
            session.clone(),
        );
        std::thread::spawn(move || wait(&h, &to_server, &to_client, &tell, &session));
    }
}

fn wait<S: Write, C: Write>(
    h: &Held,
    to_server: &Weak<Mutex<S>>,
    to_client: &Mutex<C>,
    tell: &Tell,
    session: &Mutex<Session>,
) {
    let ToDaemon::Call { request_id, .. } = &h.call else {
        return;
    };
    let mut ask = h.call.clone();
    if let ToDaemon::Call { approval, .. } = &mut ask {
        *approval = Some(h.approval.clone());
    }
    let mut last_answer = Instant::now();
    let token = progress_token(&h.message);
    let (mut told, mut n) = (Instant::now() - PROGRESS, 0u64);
    let answer = |why: &str| {
        let mut out = to_client.lock().expect("client");
        let _ = out
            .write_all(&gate::refusal(request_id, why))
            .and_then(|()| out.flush());
    };
    loop {
        std::thread::sleep(POLL);
        if !session.lock().expect("session").held.contains(request_id) {
            return; // cancelled by the client
        }
        if let Some(t) = token.as_ref().filter(|_| told.elapsed() >= PROGRESS) {
            // The client asked for progress: it hears that the call waits (and keeps its
            // request alive).
            told = Instant::now();
            n += 1;
            let note = serde_json::json!({
                "jsonrpc": "2.0",
                "method": "notifications/progress",
                "params": {
                    "progressToken": t,
                    "progress": n,
                    "message": format!("mcp-guard: waiting for approval {} (mcp-guard approvals list)", h.approval),
                }
            });
            let mut line = gate::bytes(&note);
            line.push(b'\n');
            let mut out = to_client.lock().expect("client");
            let _ = out.write_all(&line).and_then(|()| out.flush());
        }
        match tell(ask.clone()) {
            Some(Reply {
                pending: Some(_), ..
            }) => last_answer = Instant::now(),
            Some(Reply {
                refused: Some(why), ..
            }) => {
                session.lock().expect("session").held.remove(request_id);
                answer(&why);
                return;
            }
            Some(_) => {
                {
                    let mut s = session.lock().expect("session");
                    s.held.remove(request_id);
                    s.calls.insert(request_id.clone(), Instant::now());
                }
                let Some(server) = to_server.upgrade() else {
                    return; // the client went away
                };
                let mut w = server.lock().expect("server");
                let _ = w.write_all(&h.message).and_then(|()| w.flush());
                return;
            }
            None if last_answer.elapsed() > DAEMON_AWAY => {
                session.lock().expect("session").held.remove(request_id);
                answer(gate::UNCHECKED);
                return;
            }
            None => {}
        }
    }
}
