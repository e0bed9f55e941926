//! Software nobody in this project wrote, run under the guard in test namespaces: each
//! test asserts what the software itself observed (an HTTP status and body, a tool
//! result, a query result), not only an errno. The official MCP Python SDK serving a
//! tool over Streamable HTTP to its own client, curl, PostgreSQL and Redis from Debian.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use mcp_guard_tests::{
    in_cgroup, in_netns, mcp_venv, wait_until, Daemon, NetNs, Running, TempDir, TestCgroup,
};

/// A server namespace (the guarded server's, like a pod's) and a client namespace joined
/// by a veth pair: the server at 10.0.20.5 / fd00:20::5, clients at 10.0.20.7 (an agent
/// or gateway), 10.0.20.1 (the node, for kubelet probes) and fd00:20::7. The metadata
/// service and an internal database live on the server namespace's `lo`.
struct Lab {
    srv: NetNs,
    cli: NetNs,
}

fn lab() -> Lab {
    let srv = NetNs::new();
    let cli = NetNs::new();
    srv.veth("s0", &cli, "c0");
    srv.ip("addr add 10.0.20.5/24 dev s0");
    srv.ip("addr add fd00:20::5/64 dev s0 nodad");
    cli.ip("addr add 10.0.20.7/24 dev c0");
    cli.ip("addr add 10.0.20.1/24 dev c0");
    cli.ip("addr add fd00:20::7/64 dev c0 nodad");
    for a in ["169.254.169.254", "10.0.40.9", "93.184.216.34", "2606:4700::10"] {
        srv.add_addr(a);
    }
    srv.serve_tcp("169.254.169.254:80", "HTTP/1.0 200 OK\r\n\r\nAKIAFAKECREDENTIALS");
    srv.serve_tcp("10.0.40.9:5432", "internal-db");
    Lab { srv, cli }
}

fn config(cg: &TestCgroup, extra: &str) -> String {
    format!(
        "[baseline]\ndeny = [\"metadata\"]\n[[workload]]\nname = \"http-mcp\"\ncgroup = \"{r}/http-mcp\"\ndefault = \"deny-internal\"\n{extra}[daemon]\nattach_cgroup = \"{r}\"\n[events]\nrate_limit_per_sec = 0\n",
        r = cg.rel
    )
}

fn python() -> std::path::PathBuf {
    mcp_venv().join("bin/python")
}

fn helper(name: &str) -> std::path::PathBuf {
    mcp_guard_tests::mcp_helper(name)
}

/// curl in the client namespace from `src`; returns (exit status, stdout).
fn curl_from(ns: &NetNs, src: &str, url: &str) -> (i32, String) {
    let out = in_netns(ns, None)
        .args(["curl", "-sS", "-m", "5", "--interface", src, url])
        .output()
        .expect("curl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
    )
}

/// The official MCP SDK's server on Streamable HTTP, in a guarded `deny-internal`
/// workload, answers the SDK's client at an internal address and a kubelet-style probe
/// from the node's address, over IPv4 and IPv6, while its own fetch of the metadata
/// service and of an internal database is refused in the kernel.
#[test]
fn mcp_server_over_streamable_http_answers_its_clients() {
    let lab = lab();
    let cg = TestCgroup::new();
    let (_, dir) = cg.child("http-mcp");
    let d = Daemon::start(&config(&cg, ""));
    let logs = TempDir::new();
    let _server = Running::spawn(
        in_cgroup(&dir, &lab.srv)
            .arg(python())
            .arg(helper("http_server.py"))
            .args(["0.0.0.0", "8000"]),
        &logs.0.join("server.log"),
    );
    // The same server on IPv6 (uvicorn binds "::" for IPv6 only).
    let _server6 = Running::spawn(
        in_cgroup(&dir, &lab.srv)
            .arg(python())
            .arg(helper("http_server.py"))
            .args(["fd00:20::5", "8001"]),
        &logs.0.join("server6.log"),
    );
    // A kubelet-style probe from the node's address.
    assert!(
        wait_until(Duration::from_secs(30), || curl_from(
            &lab.cli,
            "10.0.20.1",
            "http://10.0.20.5:8000/healthz"
        ) == (0, "ok".into())),
        "the guarded server answers GET /healthz: {}",
        std::fs::read_to_string(logs.0.join("server.log")).unwrap_or_default()
    );
    assert!(
        wait_until(Duration::from_secs(30), || curl_from(
            &lab.cli,
            "fd00:20::7",
            "http://[fd00:20::5]:8001/healthz"
        ) == (0, "ok".into())),
        "over IPv6"
    );
    // The SDK's client, from an internal address, calls the tool three times.
    let out = in_netns(&lab.cli, None)
        .arg(python())
        .arg(helper("http_client.py"))
        .arg("http://10.0.20.5:8000/mcp")
        .args([
            "--calls",
            r#"[["fetch", {"url": "http://169.254.169.254/latest/meta-data/"}],
                ["fetch", {"url": "http://10.0.40.9:5432/"}],
                ["fetch", {"url": "http://10.0.20.7:9/"}]]"#,
        ])
        .output()
        .expect("client");
    assert!(
        out.status.success(),
        "the SDK client completed its session: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).expect("client JSON");
    assert_eq!(got["server"], "test-http");
    assert_eq!(got["tools"], serde_json::json!(["fetch"]));
    for (i, what) in ["metadata", "internal database", "its own client"]
        .iter()
        .enumerate()
    {
        let text = got["results"][i]["text"].as_str().unwrap_or_default();
        assert!(
            text.starts_with("refused: ") && text.contains("Operation not permitted"),
            "the server's fetch of {what} was refused in the kernel: {text}"
        );
        assert!(!text.contains("AKIA"), "no credentials: {text}");
    }
    let events = d.events(Duration::from_millis(500));
    assert!(
        events.iter().any(|e| e["dst"] == "169.254.169.254"
            && e["reason"] == "baseline-metadata"
            && e["workload"] == "http-mcp"),
        "the metadata fetch is reported: {events:?}"
    );
    // Nothing the server sent back to its clients was refused.
    let replies: Vec<_> = events
        .iter()
        .filter(|e| e["hook"] == "cgroup_skb")
        .collect();
    assert!(replies.is_empty(), "replies refused: {replies:?}");
    let metrics = d.get("/metrics");
    assert!(
        metrics
            .lines()
            .filter(|l| l
                .starts_with("mcp_guard_accepted_connections_total{workload=\"http-mcp\"}"))
            .any(|l| l.split_whitespace().last().and_then(|v| v.parse::<u64>().ok())
                >= Some(3)),
        "accepted connections counted: {metrics}"
    );
}
