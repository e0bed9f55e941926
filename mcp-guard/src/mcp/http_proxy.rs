//! The Streamable HTTP proxy (`exec --mcp-http`): stands in front of an MCP server on
//! the Streamable HTTP transport, outside its guard, and does what the stdio relay does:
//! every `tools/call` is told to the daemon (which answers once the kernel enforces the
//! call's tools) before it is forwarded, and its end (the result or error passing back in
//! a JSON body or an SSE event, a cancellation, `DELETE` of the session, the response
//! stream ending without it, the call timeout) is told before the client can read the
//! result. Bytes pass through unchanged; a body that is not JSON-RPC, or larger than
//! [`MAX_MESSAGE`], is passed on unread and counted.
//!
//! Request ids are only unique within a session: calls are reported to the daemon with
//! their session (the `Mcp-Session-Id` header; none before the server gave one), which
//! events carry as `mcp.session`.
//! An `Mcp-Method` or `Mcp-Name` header that disagrees with its body (revision
//! 2026-07-28) is refused with 400 and a JSON-RPC error, as the spec requires of
//! intermediaries.

use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures_util::StreamExt as _;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::{
    body::{Frame, Incoming},
    header::{CONTENT_LENGTH, CONTENT_TYPE, HOST},
    Method, Request, Response, StatusCode,
};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::{TokioExecutor, TokioIo},
};
use serde_json::Value;
use tokio::sync::mpsc;

use super::{
    gate,
    http_headers::{headers_agree, mismatch},
    jsonrpc::{self, Message},
    relay::{Counts, Daemon, MAX_MESSAGE},
    wire::{Peer, RelayView, Reply, ToDaemon},
};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub(super) type Body = BoxBody<Bytes, BoxError>;

/// What becomes of a client's body.
enum Upward {
    /// Forwarded (as these bytes); the calls it announced.
    Forward(Vec<String>, Bytes),
    /// Answered by the proxy with this JSON body (a call was refused).
    Answer(Vec<u8>),
}

/// A call in flight: its session, request id and when it started.
struct Call {
    session: String,
    id: String,
    started: Instant,
}

/// The session as reported to the daemon (`-`: the server has not named it yet).
fn reported(session: &str) -> Option<String> {
    (session != "-").then(|| session.to_string())
}

/// The proxy's state, shared by every connection.
pub struct Proxy {
    upstream: SocketAddr,
    client: Client<HttpConnector, Full<Bytes>>,
    daemon: Arc<Mutex<Option<Daemon>>>,
    calls: Mutex<HashMap<String, Call>>,
    /// Per session: the client that initialized it (sent with the server's answer).
    clients: Mutex<HashMap<String, Option<Peer>>>,
    /// Per session: the tool definitions it first listed.
    pins: Mutex<HashMap<String, gate::Pins>>,
    pub counts: Counts,
    /// Requests refused because a header disagreed with the body.
    pub mismatched: AtomicU64,
    call_timeout: Duration,
}

pub(super) fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|e| match e {}).boxed()
}

impl Proxy {
    /// `daemon`: `None` runs unguarded (nothing is told; no tool is ever active).
    #[must_use]
    pub fn new(upstream: SocketAddr, daemon: Option<Daemon>, call_timeout: Duration) -> Arc<Self> {
        Arc::new(Self {
            upstream,
            client: Client::builder(TokioExecutor::new()).build({
                // Small writes (an SSE event, then the body's last chunk) go out at once:
                // with Nagle's algorithm the second waits for the peer's delayed ACK.
                let mut c = HttpConnector::new();
                c.set_nodelay(true);
                c
            }),
            daemon: Arc::new(Mutex::new(daemon)),
            calls: Mutex::new(HashMap::new()),
            clients: Mutex::new(HashMap::new()),
            pins: Mutex::new(HashMap::new()),
            counts: Counts::default(),
            mismatched: AtomicU64::new(0),
            call_timeout,
        })
    }

    /// Serves `listener` until the task is dropped; calls past the timeout are ended
    /// every second.
    pub async fn serve(self: Arc<Self>, listener: tokio::net::TcpListener) {
        /// Stops the sweeper with the server.
        struct Abort(tokio::task::JoinHandle<()>);
        impl Drop for Abort {
            fn drop(&mut self) {
                self.0.abort();
            }
        }
        let _sweeper = Abort({
            let me = self.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                let mut reported = [0; 3];
                loop {
                    tick.tick().await;
                    me.end_expired().await;
                    reported = me.report_counts(reported).await;
                }
            })
        });
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors or memory: wait instead of spinning.
                    tracing::warn!(error = %e, "mcp-proxy: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let me = self.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let me = me.clone();
                    async move { Ok::<_, Infallible>(me.handle(req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    }

    /// The daemon connection (watched from a thread of its own, as the stdio relay's).
    #[must_use]
    pub fn daemon(&self) -> Arc<Mutex<Option<Daemon>>> {
        self.daemon.clone()
    }

    /// Tells the daemon (on a blocking thread: the relay's connection is synchronous);
    /// its answer (`None`: unguarded, or no answer).
    async fn tell(&self, m: ToDaemon) -> Option<Reply> {
        let daemon = self.daemon.clone();
        tokio::task::spawn_blocking(move || daemon.lock().expect("daemon").as_mut()?.send(m))
            .await
            .ok()
            .flatten()
    }

    /// A call in flight from now.
    fn track(&self, key: &str, session: &str, id: &str) {
        self.calls.lock().expect("calls").insert(
            key.to_string(),
            Call {
                session: session.to_string(),
                id: id.to_string(),
                started: Instant::now(),
            },
        );
    }

    /// Asks again about a call held for approval until someone decided; the last
    /// answer (`None`: the daemon did not answer for a minute).
    async fn await_approval(&self, call: ToDaemon, approval: String) -> Option<Reply> {
        let mut ask = call;
        if let ToDaemon::Call { approval: a, .. } = &mut ask {
            *a = Some(approval);
        }
        let mut last_answer = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(300)).await;
            match self.tell(ask.clone()).await {
                Some(Reply {
                    pending: Some(_), ..
                }) => last_answer = Instant::now(),
                Some(r) => return Some(r),
                None if last_answer.elapsed() > Duration::from_secs(60) => return None,
                None => {}
            }
        }
    }

    /// The workload's policy at the relay (`None`: unguarded).
    fn view(&self) -> Option<RelayView> {
        self.daemon
            .lock()
            .expect("daemon")
            .as_ref()
            .map(Daemon::view)
    }

    /// Ends a call still in flight (once: the first end wins).
    async fn end(&self, key: &str, outcome: &str) {
        self.end_masked(key, outcome, std::collections::BTreeMap::new())
            .await;
    }

    /// [`Self::end`], with the credentials found in its result.
    async fn end_masked(
        &self,
        key: &str,
        outcome: &str,
        masked: std::collections::BTreeMap<String, u32>,
    ) {
        let call = self.calls.lock().expect("calls").remove(key);
        if let Some(c) = call {
            self.tell(ToDaemon::End {
                request_id: c.id,
                outcome: outcome.into(),
                session: reported(&c.session),
                masked,
            })
            .await;
        }
    }

    /// Tells the daemon the bodies passed on unread and the requests refused since
    /// `before` (malformed, oversized, mismatched); returns the totals now.
    async fn report_counts(&self, before: [u64; 3]) -> [u64; 3] {
        let now = [
            self.counts.malformed.load(Ordering::Relaxed),
            self.counts.oversized.load(Ordering::Relaxed),
            self.mismatched.load(Ordering::Relaxed),
        ];
        if now != before {
            self.tell(ToDaemon::Counts {
                malformed: now[0] - before[0],
                oversized: now[1] - before[1],
                mismatched: now[2] - before[2],
            })
            .await;
        }
        now
    }

    async fn end_expired(&self) {
        let expired: Vec<String> = self
            .calls
            .lock()
            .expect("calls")
            .iter()
            .filter(|(_, c)| c.started.elapsed() >= self.call_timeout)
            .map(|(k, _)| k.clone())
            .collect();
        for k in expired {
            self.end(&k, "timeout").await;
        }
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let (parts, body) = req.into_parts();
        let session = parts
            .headers
            .get("mcp-session-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_string();
        let oversized = parts
            .headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
            .is_some_and(|n| n > MAX_MESSAGE);
        if parts.method != Method::POST || oversized {
            if oversized {
                self.counts.oversized.fetch_add(1, Ordering::Relaxed);
            }
            if parts.method == Method::DELETE {
                self.end_session(&session).await;
            }
            // GET (the server's stream), DELETE, or a body passed on unread.
            let up = Request::from_parts(parts, body.map_err(BoxError::from).boxed());
            return self.forward_streaming(up, &session, Vec::new()).await;
        }
        let bytes = match body.collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => return status(StatusCode::BAD_REQUEST, "unreadable body\n"),
        };
        if let Err(why) = headers_agree(&parts.headers, &bytes) {
            self.mismatched.fetch_add(1, Ordering::Relaxed);
            return mismatch(&bytes, &why);
        }
        let (announced, bytes) = match self.client_messages(&session, bytes).await {
            Upward::Forward(announced, bytes) => (announced, bytes),
            Upward::Answer(body) => {
                // Refused calls: answered here, never forwarded.
                let mut r = Response::new(full(body));
                r.headers_mut()
                    .insert(CONTENT_TYPE, "application/json".parse().expect("header"));
                return r;
            }
        };
        let mut parts = parts;
        parts.headers.remove(CONTENT_LENGTH);
        let up = Request::from_parts(parts, full(bytes));
        self.forward_streaming(up, &session, announced).await
    }

    /// What the client sent: calls judged and announced (their tools activated) before
    /// they are forwarded, cancellations ended, credentials in arguments masked. A body
    /// with a refused call is answered here: the refused call with the rule, the other
    /// requests of its batch with "not forwarded".
    async fn client_messages(&self, session: &str, body: Bytes) -> Upward {
        let parsed = serde_json::from_slice::<Value>(&body).ok();
        let Some((mut v, msgs)) = parsed.and_then(|v| {
            let m = jsonrpc::read_value(&v)?;
            Some((v, m))
        }) else {
            self.counts.malformed.fetch_add(1, Ordering::Relaxed);
            return Upward::Forward(Vec::new(), body);
        };
        let view = self.view();
        let (changed, mut masked) =
            gate::mask_message(&mut v, view.unwrap_or_default().mask, &|_| false);
        let mut announced = Vec::new();
        let mut refused: Vec<(String, String)> = Vec::new();
        for m in msgs {
            match m {
                Message::Initialize { client, .. } => {
                    self.clients
                        .lock()
                        .expect("clients")
                        .insert(session.to_string(), client);
                }
                Message::Call {
                    id,
                    tool,
                    arguments,
                    targets,
                } => {
                    let changed = self
                        .pins
                        .lock()
                        .expect("pins")
                        .get(session)
                        .is_some_and(|p| p.changed.contains(&tool));
                    let key = format!("{session}/{id}");
                    // In flight before it is told: its end may come back at once.
                    self.track(&key, session, &id);
                    let call = ToDaemon::Call {
                        request_id: id.to_string(),
                        tool,
                        arguments,
                        session: reported(session),
                        targets,
                        changed,
                        masked: masked.remove(&id).unwrap_or_default(),
                        approval: None,
                    };
                    let mut verdict = gate::verdict(self.tell(call.clone()).await, view);
                    if let gate::Verdict::Hold(approval) = verdict {
                        // Held for approval: the client's request waits for the answer.
                        self.calls.lock().expect("calls").remove(&key);
                        let reply = self.await_approval(call, approval).await;
                        verdict = gate::verdict(reply, view);
                        self.track(&key, session, &id);
                    }
                    let why = match verdict {
                        gate::Verdict::Refuse(why) => Some(why),
                        gate::Verdict::Forward | gate::Verdict::Hold(_) => None,
                    };
                    if let Some(why) = why {
                        self.calls.lock().expect("calls").remove(&key);
                        refused.push((id, why));
                    } else {
                        announced.push(key);
                    }
                }
                Message::Cancelled { id } => {
                    self.end(&format!("{session}/{id}"), "cancelled").await;
                }
                Message::ListTools { .. } | Message::Other | Message::Response { .. } => {}
            }
        }
        if !refused.is_empty() {
            for k in &announced {
                self.end(k, "error").await;
            }
            return Upward::Answer(gate::refusals_for(&v, &refused));
        }
        if changed {
            return Upward::Forward(announced, gate::bytes(&v).into());
        }
        Upward::Forward(announced, body)
    }

    /// What the server sent (in a JSON body or one SSE event): a call's end told before
    /// the client can read it; `initialize` and `tools/list` answers reported (refused or
    /// changed tools taken out), credentials in call results masked. Returns the body to
    /// pass on instead, when it changed.
    async fn server_messages(&self, session: &str, body: &[u8]) -> Option<Vec<u8>> {
        let parsed = serde_json::from_slice::<Value>(body).ok();
        let Some((mut v, msgs)) = parsed.and_then(|v| {
            let m = jsonrpc::read_value(&v)?;
            Some((v, m))
        }) else {
            self.counts.malformed.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        let mode = self.view().unwrap_or_default().mask;
        let (mut changed, mut masked) = {
            let calls = self.calls.lock().expect("calls");
            gate::mask_message(&mut v, mode, &|id| {
                calls.contains_key(&format!("{session}/{id}"))
            })
        };
        for m in msgs {
            let Message::Response { id, error, result } = m else {
                continue;
            };
            let key = format!("{session}/{id}");
            let outcome = if error { "error" } else { "result" };
            self.end_masked(&key, outcome, masked.remove(&id).unwrap_or_default())
                .await;
            if let Some(server) = result.as_ref().and_then(jsonrpc::peer) {
                let client = self
                    .clients
                    .lock()
                    .expect("clients")
                    .get(session)
                    .cloned()
                    .flatten();
                self.tell(ToDaemon::Peers {
                    client,
                    server: Some(server),
                })
                .await;
            } else if let Some(names) = result.as_ref().and_then(jsonrpc::tool_names) {
                let all_changed: Vec<String> = {
                    let mut pins = self.pins.lock().expect("pins");
                    let p = pins.entry(session.to_string()).or_default();
                    p.observe(result.as_ref().expect("a result"));
                    p.changed.iter().cloned().collect()
                };
                if let Some(reply) = self
                    .tell(ToDaemon::Tools {
                        names,
                        changed: all_changed,
                        session: reported(session),
                    })
                    .await
                {
                    changed |= gate::hide_in_response(&mut v, &id, &reply.hidden);
                }
            }
        }
        changed.then(|| gate::bytes(&v))
    }

    /// `DELETE` of a session: its calls end.
    async fn end_session(&self, session: &str) {
        let keys: Vec<String> = self
            .calls
            .lock()
            .expect("calls")
            .iter()
            .filter(|(_, c)| c.session == session)
            .map(|(k, _)| k.clone())
            .collect();
        for k in keys {
            self.end(&k, "cancelled").await;
        }
        self.clients.lock().expect("clients").remove(session);
        self.pins.lock().expect("pins").remove(session);
    }

    /// Sends `req` upstream and passes the answer back: a JSON body read whole, an SSE
    /// stream event by event, anything else as it comes. `announced` calls still open
    /// when the answer is over (or the client went away) are ended.
    async fn forward_streaming(
        self: Arc<Self>,
        req: Request<Body>,
        session: &str,
        announced: Vec<String>,
    ) -> Response<Body> {
        let (mut parts, body) = req.into_parts();
        let path = parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        let Ok(uri) = format!("http://{}{path}", self.upstream).parse() else {
            return status(StatusCode::BAD_REQUEST, "bad request target\n");
        };
        parts.uri = uri;
        if let Ok(h) = self.upstream.to_string().parse() {
            parts.headers.insert(HOST, h);
        }
        // The client is HTTP/1.1 with a Full body: collect what came (a streamed GET or
        // DELETE has none; an oversized POST is passed on in one piece, unread).
        let bytes = match body.collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => return status(StatusCode::BAD_REQUEST, "unreadable body\n"),
        };
        let answer = match self
            .client
            .request(Request::from_parts(parts, Full::new(bytes)))
            .await
        {
            Ok(a) => a,
            Err(e) => {
                for k in &announced {
                    self.end(k, "error").await;
                }
                return status(StatusCode::BAD_GATEWAY, &format!("upstream: {e}\n"));
            }
        };
        let (parts, body) = answer.into_parts();
        let kind = parts
            .headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_ascii_lowercase();
        if kind.starts_with("text/event-stream") {
            let body = self.clone().events(body, session.to_string(), announced);
            return Response::from_parts(parts, body);
        }
        let bytes = match body.collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                for k in &announced {
                    self.end(k, "error").await;
                }
                return status(StatusCode::BAD_GATEWAY, &format!("upstream: {e}\n"));
            }
        };
        let mut parts = parts;
        let mut bytes = bytes;
        if kind.starts_with("application/json") && bytes.len() <= MAX_MESSAGE {
            if let Some(new) = self.server_messages(session, &bytes).await {
                parts.headers.remove(CONTENT_LENGTH);
                bytes = new.into();
            }
        }
        // A JSON body holds every answer this request gets: a call it did not answer
        // (a 202, an error status, an error with a null id for a batch the server
        // refused) gets none later. Ended before the client reads the body.
        for k in &announced {
            self.end(k, "error").await;
        }
        Response::from_parts(parts, full(bytes))
    }

    /// An SSE response passed on chunk by chunk: each chunk is decoded first, and the
    /// ends of the calls it completes are told before the chunk goes on (a client acts on
    /// an event only once its last line is in).
    fn events(
        self: Arc<Self>,
        mut upstream: Incoming,
        session: String,
        announced: Vec<String>,
    ) -> Body {
        let (to_client, mut rx) = mpsc::channel::<Bytes>(16);
        tokio::spawn(async move {
            let mut split = super::sse::Splitter::default();
            while let Some(frame) = upstream.frame().await {
                let Ok(frame) = frame else { break };
                let Ok(chunk) = frame.into_data() else {
                    continue;
                };
                split.push(&chunk);
                let mut out = Vec::with_capacity(chunk.len());
                for event in split.events() {
                    let changed = match super::sse::data(&event) {
                        Some(data) => self.server_messages(&session, data.as_bytes()).await,
                        None => None,
                    };
                    match changed {
                        Some(new) => out.extend(super::sse::with_data(
                            &event,
                            &String::from_utf8_lossy(&new),
                        )),
                        None => out.extend(event),
                    }
                }
                if split.pending() > MAX_MESSAGE {
                    // An event too long to read: passed on as it comes, unread.
                    self.counts.oversized.fetch_add(1, Ordering::Relaxed);
                    out.extend(split.take_all());
                }
                if !out.is_empty() && to_client.send(out.into()).await.is_err() {
                    break; // the client went away
                }
            }
            for k in &announced {
                self.end(k, "cancelled").await;
            }
        });
        BodyExt::boxed(StreamBody::new(
            futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
                .map(|b| Ok::<_, BoxError>(Frame::data(b))),
        ))
    }
}

fn status(code: StatusCode, text: &str) -> Response<Body> {
    let mut r = Response::new(full(text.to_string()));
    *r.status_mut() = code;
    r
}
