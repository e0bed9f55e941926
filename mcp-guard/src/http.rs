//! The daemon's local HTTP listener: /metrics, /healthz, /readyz, /status and the
//! /events NDJSON stream that `mcp-guard events` follows.
//!
//! A deliberately small HTTP/1.1 server (GET only, one request per connection): the
//! agent's attack surface stays tiny and it has no web framework to keep patched.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, RwLock,
    },
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::broadcast,
};
use tracing::debug;

use crate::events::{enrich_cached, Cache, History, JsonEvent, Names, Recorded};

pub struct Shared {
    pub ready: AtomicBool,
    /// JSON document served on /status.
    pub status: RwLock<String>,
    pub events: broadcast::Sender<Arc<JsonEvent>>,
    /// Recent events, replayed to `/events?since=UNIX_SECONDS`.
    pub history: Arc<History>,
    /// For enriching replayed events.
    pub names: Arc<RwLock<Names>>,
    pub metrics: Box<dyn Fn() -> String + Send + Sync>,
    /// JSON of the addresses host rules allow now (served on /dns).
    pub dns: Box<dyn Fn() -> String + Send + Sync>,
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

pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        // Wait for a free slot before accepting: a flood stays in the accept queue.
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(stream, &shared).await {
                debug!(error = %e, "http connection");
            }
            drop(permit);
        });
    }
}

async fn respond(
    stream: &mut TcpStream,
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

fn query_param<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

async fn handle(mut stream: TcpStream, shared: &Shared) -> std::io::Result<()> {
    let mut buf = vec![0u8; 4096];
    let mut n = 0;
    while !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
        if n == buf.len() {
            return respond(
                &mut stream,
                "431 Request Header Fields Too Large",
                "text/plain",
                "",
            )
            .await;
        }
        let Ok(r) = tokio::time::timeout(REQUEST_TIMEOUT, stream.read(&mut buf[n..])).await else {
            // Idle or slow: the slot goes to someone else.
            return Ok(());
        };
        let r = r?;
        if r == 0 {
            return Ok(());
        }
        n += r;
    }
    let req = String::from_utf8_lossy(&buf[..n]);
    let mut parts = req.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if method != "GET" {
        return respond(
            &mut stream,
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n",
        )
        .await;
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    match path {
        "/healthz" => respond(&mut stream, "200 OK", "text/plain", "ok\n").await,
        "/readyz" => {
            if shared.ready.load(Ordering::SeqCst) {
                respond(&mut stream, "200 OK", "text/plain", "ready\n").await
            } else {
                respond(
                    &mut stream,
                    "503 Service Unavailable",
                    "text/plain",
                    "not ready\n",
                )
                .await
            }
        }
        "/status" => {
            let body = shared.status.read().expect("status lock").clone();
            respond(&mut stream, "200 OK", "application/json", &body).await
        }
        "/dns" => {
            let body = (shared.dns)();
            respond(&mut stream, "200 OK", "application/json", &body).await
        }
        "/metrics" => {
            let body = (shared.metrics)();
            respond(
                &mut stream,
                "200 OK",
                "text/plain; version=0.0.4; charset=utf-8",
                &body,
            )
            .await
        }
        "/events" => {
            let workload = query_param(query, "workload").map(str::to_string);
            let reason = query_param(query, "reason").map(str::to_string);
            let since: Option<f64> = query_param(query, "since").and_then(|s| s.parse().ok());
            let keep = |e: &JsonEvent| {
                workload
                    .as_deref()
                    .is_none_or(|w| e.workload.as_deref() == Some(w))
                    && reason.as_deref().is_none_or(|r| e.reason == r)
            };
            // Subscribe before replaying so nothing falls between history and live.
            let mut rx = shared.events.subscribe();
            stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nConnection: close\r\n\r\n")
                .await?;
            let mut last_replayed = 0u64;
            if let Some(since) = since {
                let cutoff = (since.max(0.0) * 1e9) as u128;
                let raw: Vec<_> = shared
                    .history
                    .lock()
                    .expect("history lock")
                    .iter()
                    .filter(|(t, _)| *t >= cutoff)
                    .map(|(_, e)| e.clone())
                    .collect();
                let names = shared.names.read().expect("names lock").clone();
                let mut cache = Cache::default();
                let replay: Vec<JsonEvent> = raw
                    .iter()
                    .map(|r| match r {
                        Recorded::Kernel(e) => enrich_cached(e, &names, &mut cache),
                        Recorded::Daemon(j) => (**j).clone(),
                    })
                    .filter(|e| keep(e))
                    .collect();
                for e in replay {
                    last_replayed = last_replayed.max(e.monotonic_ns);
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
                if workload
                    .as_deref()
                    .is_some_and(|w| e.workload.as_deref() != Some(w))
                {
                    continue;
                }
                if reason.as_deref().is_some_and(|r| e.reason != r) {
                    continue;
                }
                let mut line = serde_json::to_vec(&*e).expect("serialisable");
                line.push(b'\n');
                stream.write_all(&line).await?;
            }
        }
        _ => {
            respond(
                &mut stream,
                "404 Not Found",
                "text/plain",
                "not found: try /metrics, /healthz, /readyz, /status, /events, /dns\n",
            )
            .await
        }
    }
}
