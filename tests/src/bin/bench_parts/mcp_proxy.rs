//! The MCP proxy row: what a `tools/call` gains through `mcp-guard mcp-proxy` (the call
//! told to the daemon, the kernel entry written, the answer read) against the same call
//! sent straight to the server, with JSON and SSE answers. The server is a minimal
//! upstream here (hyper), so the figures are the proxy's, not a Python server's noise;
//! every connection stays inside the bench's network namespace.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, Request, Response};
use hyper_util::rt::TokioIo;
use mcp_guard_tests::{
    guard_bin, in_netns, wait_until, Daemon, NetNs, Running, TempDir, TestCgroup,
};

use super::{pct, Row};

const UPSTREAM: &str = "10.77.0.1:8101";
const PROXY: &str = "10.77.0.1:8100";

/// Answers every POST with the result of the call it carries: `/sse` as one SSE event,
/// anything else as a JSON body.
async fn answer(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let sse = req.uri().path() == "/sse";
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let id = serde_json::from_slice::<serde_json::Value>(&body)
        .map(|v| v["id"].clone())
        .unwrap_or_default();
    let result = serde_json::json!({"jsonrpc": "2.0", "id": id, "result": {"content": [{"type": "text", "text": "ok"}], "isError": false}}).to_string();
    let (ctype, text) = if sse {
        (
            "text/event-stream",
            format!("event: message\ndata: {result}\n\n"),
        )
    } else {
        ("application/json", result)
    };
    Ok(Response::builder()
        .header("content-type", ctype)
        .body(Full::new(Bytes::from(text)))
        .expect("response"))
}

fn upstream(ns: &NetNs) {
    ns.in_ns(|| {
        std::thread::spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("rt");
            rt.block_on(async {
                let l = tokio::net::TcpListener::bind(UPSTREAM)
                    .await
                    .expect("bind upstream");
                loop {
                    let Ok((s, _)) = l.accept().await else {
                        continue;
                    };
                    tokio::spawn(async move {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(s), hyper::service::service_fn(answer))
                            .await;
                    });
                }
            });
        });
    });
}

/// `n` calls on one keep-alive connection to `addr` (`path`), in µs each.
fn calls(
    ns: &NetNs,
    addr: &'static str,
    path: &'static str,
    n: usize,
    first_id: usize,
) -> Vec<f64> {
    ns.in_ns(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
        rt.block_on(async move {
            let s = tokio::net::TcpStream::connect(addr).await.expect("connect");
            s.set_nodelay(true).expect("nodelay");
            let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await.expect("handshake");
            tokio::spawn(conn);
            let mut out = Vec::with_capacity(n);
            for i in 0..n {
                let body = serde_json::json!({"jsonrpc": "2.0", "id": first_id + i, "method": "tools/call", "params": {"name": "fetch", "arguments": {"url": "https://example.com/"}}}).to_string();
                let req = Request::post(path)
                    .header("host", addr)
                    .header("content-type", "application/json")
                    .header("accept", "application/json, text/event-stream")
                    .body(Full::new(Bytes::from(body)))
                    .expect("request");
                let t = Instant::now();
                let resp = tx.send_request(req).await.expect("call");
                let got = resp.into_body().collect().await.expect("body").to_bytes();
                out.push(t.elapsed().as_secs_f64() * 1e6);
                assert!(got.windows(4).any(|w| w == b"\"ok\""), "an answer: {got:?}");
            }
            out
        })
    })
}

pub fn row(ns: &NetNs, quick: bool) -> Row {
    let n = if quick { 200 } else { 2_000 };
    let cg = TestCgroup::new();
    let (rel, _) = cg.child("mcp/server");
    let d = Daemon::start(&format!(
        "[[workload]]\nname = \"mcp\"\ncgroup = \"{r}/mcp\"\ndefault = \"deny\"\n[daemon]\nattach_cgroup = \"{r}\"\n",
        r = cg.rel
    ));
    upstream(ns);
    let logs = TempDir::new();
    let _proxy = Running::spawn(
        in_netns(ns, None)
            .arg(guard_bin())
            .args(["mcp-proxy", "--config"])
            .arg(&d.config)
            .args([
                "--workload",
                "mcp",
                "--instance",
                &rel,
                "--listen",
                PROXY,
                "--upstream",
                UPSTREAM,
            ]),
        &logs.0.join("proxy.log"),
    );
    let serves = || {
        ns.in_ns(|| {
            std::net::TcpStream::connect_timeout(
                &PROXY.parse::<SocketAddr>().expect("addr"),
                Duration::from_secs(1),
            )
            .is_ok()
        })
    };
    assert!(
        wait_until(Duration::from_secs(10), serves),
        "the proxy serves: {}",
        std::fs::read_to_string(logs.0.join("proxy.log")).unwrap_or_default()
    );
    let mut parts = Vec::new();
    let mut met = true;
    for (path, mode) in [("/mcp", "JSON"), ("/sse", "SSE")] {
        let (mut direct, mut proxied) = (Vec::new(), Vec::new());
        // Interleaved rounds, so drift hits both alike.
        for round in 0..10 {
            direct.extend(calls(ns, UPSTREAM, path, n / 10, 2 * round * n));
            proxied.extend(calls(ns, PROXY, path, n / 10, 2 * round * n + n));
        }
        let p50 = pct(&mut proxied.clone(), 0.5) - pct(&mut direct.clone(), 0.5);
        let p99 = pct(&mut proxied, 0.99) - pct(&mut direct, 0.99);
        met &= p50 <= 500.0 && p99 <= 2_000.0;
        parts.push(format!(
            "{mode} +{:.2} ms p50, +{:.2} ms p99",
            p50 / 1e3,
            p99 / 1e3
        ));
    }
    Row {
        name: "MCP tools/call through mcp-proxy (daemon told, kernel entry written) vs straight to the server, added latency".into(),
        value: parts.join("; "),
        target: "≤ 0.5 ms p50, ≤ 2 ms p99 added".into(),
        met: Some(met),
    }
}
