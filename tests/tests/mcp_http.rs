//! Streamable HTTP MCP servers under `exec --mcp-http`: the official MCP Python SDK's
//! server (`MCPServer`, streamable-http) behind the proxy, called by the SDK's own
//! client from another namespace. The kernel refuses what the tool call's policy
//! refuses, tool-scoped rules apply during the calls of their tools, events name the
//! tool call and its session, in SSE and JSON response modes; the proxy killed
//! mid-call leaves no tool active.

use std::time::Duration;

use mcp_guard_tests::{
    guard_bin, in_netns, mcp_helper, mcp_http_session, mcp_venv, wait_until, Daemon, NetNs, Probe,
    Running, TempDir, TestCgroup,
};
use serde_json::Value;

const PROBE: &str = env!("CARGO_BIN_EXE_mcpg-probe");

/// The server's namespace (metadata service, two internal databases on `lo`, the
/// proxy's address on a veth) and the client's.
fn lab() -> (NetNs, NetNs) {
    let srv = NetNs::new();
    let cli = NetNs::new();
    srv.veth("s0", &cli, "c0");
    srv.ip("addr add 10.0.20.5/24 dev s0");
    cli.ip("addr add 10.0.20.7/24 dev c0");
    for a in ["169.254.169.254", "10.0.40.9", "10.0.40.10"] {
        srv.add_addr(a);
    }
    srv.serve_tcp("169.254.169.254:80", "HTTP/1.0 200 OK\r\n\r\nAKIAFAKE");
    srv.serve_tcp("10.0.40.9:5432", "HTTP/1.0 200 OK\r\n\r\ndb-for-fetch");
    srv.serve_tcp("10.0.40.10:5432", "HTTP/1.0 200 OK\r\n\r\ndb-for-query");
    // Accepts and never answers: a fetch call that stays in flight (its 5 s timeout).
    let l = srv.in_ns(|| std::net::TcpListener::bind("10.0.40.9:80").expect("bind"));
    std::thread::spawn(move || {
        let held: Vec<_> = l.incoming().collect();
        drop(held);
    });
    (srv, cli)
}

/// The kernel layer is what most tests here check: the relay's argument check is off
/// unless a test gives its own `[workload.mcp]` keys ([`config_with`]).
fn config(cg: &TestCgroup) -> String {
    config_with(cg, "check_arguments = false\n")
}

fn config_with(cg: &TestCgroup, relay: &str) -> String {
    format!(
        r#"[baseline]
deny = ["metadata"]
[[workload]]
name = "http-mcp"
cgroup = "{r}/http-mcp"
default = "deny-internal"
[[workload.allow]]
cidr = "10.0.40.9/32"
ports = [80, 5432]
tools = ["fetch"]
[[workload.allow]]
cidr = "10.0.40.10/32"
ports = [5432]
tools = ["query_db"]
[workload.mcp]
{relay}[daemon]
attach_cgroup = "{r}"
[events]
rate_limit_per_sec = 0
"#,
        r = cg.rel
    )
}

/// `exec --mcp-http` in the server namespace: the SDK's server on 127.0.0.1:8001, the
/// proxy on 10.0.20.5:8000.
fn serve(srv: &NetNs, d: &Daemon, json: bool, log: &std::path::Path) -> Running {
    let mut c = in_netns(srv, None);
    c.arg(guard_bin())
        .args(["exec", "--config"])
        .arg(&d.config)
        .args([
            "--workload",
            "http-mcp",
            "--mcp-http",
            "10.0.20.5:8000",
            "--upstream",
            "127.0.0.1:8001",
            "--",
        ])
        .arg(mcp_venv().join("bin/python"))
        .arg(mcp_helper("http_server.py"))
        .args(["127.0.0.1", "8001"]);
    if json {
        c.arg("json");
    }
    Running::spawn(&mut c, log)
}

fn ready(cli: &NetNs, log: &std::path::Path) {
    assert!(
        wait_until(Duration::from_secs(30), || {
            mcp_guard_tests::curl_in(cli, None, "http://10.0.20.5:8000/healthz") == (0, "ok".into())
        }),
        "the server answers through the proxy: {}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

/// A daemon with the test config, the SDK's server behind `exec --mcp-http` answering
/// (JSON bodies with `json`), and the directory of its instance cgroup.
struct Served {
    srv: NetNs,
    cli: NetNs,
    _cg: TestCgroup,
    d: Daemon,
    logs: TempDir,
    server: Running,
    instance: std::path::PathBuf,
}

fn served(json: bool) -> Served {
    served_with(json, "check_arguments = false\n")
}

/// [`served`], with `relay` (keys of `[workload.mcp]`) in the workload.
fn served_with(json: bool, relay: &str) -> Served {
    let (srv, cli) = lab();
    let cg = TestCgroup::new();
    cg.child("http-mcp");
    let d = Daemon::start(&config_with(&cg, relay));
    let logs = TempDir::new();
    let log = logs.0.join("server.log");
    let server = serve(&srv, &d, json, &log);
    ready(&cli, &log);
    let instance = cg
        .dir
        .join("http-mcp")
        .join(format!("mcp-{}", server.0.id()));
    Served {
        srv,
        cli,
        _cg: cg,
        d,
        logs,
        server,
        instance,
    }
}

/// A session whose fetch hangs (the address accepts and never answers): its call stays
/// in flight for the fetch's 5 s timeout.
fn hanging_fetch(cli: &NetNs, log: &std::path::Path) -> Running {
    Running::spawn(
        in_netns(cli, None)
            .arg(mcp_venv().join("bin/python"))
            .arg(mcp_helper("http_client.py"))
            .arg("http://10.0.20.5:8000/mcp")
            .args(["--calls", r#"[["fetch", {"url": "http://10.0.40.9/"}]]"#]),
        log,
    )
}

fn text(got: &Value, i: usize) -> String {
    got["results"][i]["text"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn check_session(d: &Daemon, cli: &NetNs, mode: &str) {
    let got = mcp_http_session(
        cli,
        "http://10.0.20.5:8000/mcp",
        r#"[["fetch", {"url": "http://169.254.169.254/latest/meta-data/"}],
            ["fetch", {"url": "http://10.0.40.9:5432/"}],
            ["fetch", {"url": "http://10.0.40.10:5432/"}]]"#,
    );
    assert_eq!(got["server"], "test-http", "{mode}");
    assert_eq!(got["tools"], serde_json::json!(["fetch", "echo"]), "{mode}");
    let t = text(&got, 0);
    assert!(
        t.starts_with("refused: ") && t.contains("Operation not permitted"),
        "{mode}: the metadata fetch refused in the kernel: {t}"
    );
    assert!(
        text(&got, 1).contains("db-for-fetch"),
        "{mode}: a tools = [\"fetch\"] rule lets fetch through: {}",
        text(&got, 1)
    );
    let t = text(&got, 2);
    assert!(
        t.contains("Operation not permitted"),
        "{mode}: a tools = [\"query_db\"] rule does not let fetch through: {t}"
    );
    // The refusal of the metadata service names the call, its request id and session.
    let mut named: Option<Value> = None;
    wait_until(Duration::from_secs(5), || {
        named = d
            .events(Duration::from_millis(200))
            .into_iter()
            .find(|e| e["dst"] == "169.254.169.254" && !e["mcp"].is_null());
        named.is_some()
    });
    let e = named.unwrap_or_else(|| panic!("{mode}: no event naming the tool call"));
    assert_eq!(e["workload"], "http-mcp");
    assert_eq!(e["mcp"]["tool"], "fetch", "{mode}: {e}");
    let session = e["mcp"]["session"].as_str().unwrap_or_default();
    let id = e["mcp"]["request_id"].as_str().unwrap_or_default();
    assert!(
        session.len() >= 8 && !id.is_empty() && !id.contains('/'),
        "{mode}: the event names the request id and its session: {e}"
    );
    assert_eq!(e["mcp"]["in_flight"][0]["session"], session, "{e}");
    mcp_guard_tests::assert_event_schema(&e);
}

#[test]
fn streamable_http_calls_are_scoped_and_named_in_sse_and_json_modes() {
    let (srv, cli) = lab();
    let cg = TestCgroup::new();
    cg.child("http-mcp");
    let d = Daemon::start(&config(&cg));
    let logs = TempDir::new();
    for (json, mode) in [(false, "SSE"), (true, "JSON")] {
        let log = logs.0.join(format!("{mode}.log"));
        let server = serve(&srv, &d, json, &log);
        ready(&cli, &log);
        check_session(&d, &cli, mode);
        let exec_pid = server.0.id();
        drop(server);
        // The server outlives its killed proxy: its cgroup goes, and the port is free
        // for the next mode.
        mcp_guard_tests::remove_cgroup_tree(&cg.dir.join(format!("http-mcp/mcp-{exec_pid}")));
    }
}

/// A call in flight activates its tools; killing the proxy (kill -9) mid-call ends the
/// daemon's connection and nothing stays active.
#[test]
fn the_proxy_killed_mid_call_leaves_no_tool_active() {
    let Served {
        srv,
        cli,
        d: _d,
        logs,
        mut server,
        instance,
        _cg,
    } = served(false);
    // A fetch that hangs: the call stays in flight.
    let mut client = hanging_fetch(&cli, &logs.0.join("client.log"));
    let mut p = Probe::new(PROBE, &instance, &srv);
    assert!(
        wait_until(Duration::from_secs(15), || p.op("tcp 10.0.40.9 5432")
            == "OK"),
        "during the fetch call, the fetch rule applies to the instance: {}\nclient: {}",
        std::fs::read_to_string(logs.0.join("server.log")).unwrap_or_default(),
        std::fs::read_to_string(logs.0.join("client.log")).unwrap_or_default()
    );
    let _ = server.0.kill();
    let _ = server.0.wait();
    assert!(
        wait_until(Duration::from_secs(5), || p.op("tcp 10.0.40.9 5432")
            == "EPERM"),
        "after the proxy died, no tool of the instance is active"
    );
    let _ = client.0.kill();
}

/// `mcp-guard mcp-proxy` in front of a server started elsewhere (here in a cgroup below
/// the workload's, as a systemd unit's would be): the same scoping and naming; an
/// instance that is not below the workload's cgroup is refused by the daemon.
#[test]
fn mcp_proxy_serves_a_server_started_elsewhere() {
    let (srv, cli) = lab();
    let cg = TestCgroup::new();
    let (rel, dir) = cg.child("http-mcp/server");
    let d = Daemon::start(&config(&cg));
    let logs = TempDir::new();
    let log = logs.0.join("server.log");
    let _server = Running::spawn(
        mcp_guard_tests::in_cgroup(&dir, &srv)
            .arg(mcp_venv().join("bin/python"))
            .arg(mcp_helper("http_server.py"))
            .args(["127.0.0.1", "8001"]),
        &log,
    );
    let proxy = |instance: &str| {
        let mut c = in_netns(&srv, None);
        c.arg(guard_bin())
            .args(["mcp-proxy", "--config"])
            .arg(&d.config)
            .args(["--workload", "http-mcp", "--instance", instance])
            .args(["--listen", "10.0.20.5:8000", "--upstream", "127.0.0.1:8001"]);
        c
    };
    let out = proxy(&cg.rel).output().expect("mcp-proxy");
    assert_eq!(
        out.status.code(),
        Some(2),
        "an instance above the workload is refused"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not a cgroup below workload"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _proxy = Running::spawn(&mut proxy(&rel), &logs.0.join("proxy.log"));
    ready(&cli, &log);
    check_session(&d, &cli, "mcp-proxy");
}

/// The daemon killed with kill -9 and started again under a running proxy: the proxy
/// announces its instance again, and new calls are scoped and named as before.
#[test]
fn the_proxy_reconnects_after_the_daemon_is_killed_and_restarted() {
    let (srv, cli) = lab();
    let cg = TestCgroup::new();
    cg.child("http-mcp");
    let mut d = Daemon::start(&config(&cg));
    let logs = TempDir::new();
    let log = logs.0.join("server.log");
    let _server = serve(&srv, &d, false, &log);
    ready(&cli, &log);
    check_session(&d, &cli, "before the restart");
    d.kill9();
    d.restart();
    // The instance is registered again within the relay's backoff (at most 1 s).
    assert!(
        wait_until(Duration::from_secs(10), || d.get("/metrics").lines().any(
            |l| l.starts_with("mcp_guard_mcp_instances ") && !l.ends_with(" 0")
        )),
        "the proxy registered its instance again"
    );
    check_session(&d, &cli, "after kill -9 and restart");
}

/// Two sessions at once through one proxy: each session's client numbers its requests
/// from 0, so both `fetch` calls have the same request id. While session A's fetch hangs,
/// session B's call (tools/call id 2 too) starts and ends: the instance has the union of
/// the calls' tools, B's refusal names both calls with their sessions, and B's end does
/// not end A's call.
#[test]
fn two_sessions_at_once_keep_their_calls_apart() {
    let Served {
        srv,
        cli,
        d,
        logs,
        server: _server,
        instance,
        _cg,
    } = served(false);
    let _a = hanging_fetch(&cli, &logs.0.join("a.log"));
    let mut p = Probe::new(PROBE, &instance, &srv);
    assert!(
        wait_until(Duration::from_secs(15), || p.op("tcp 10.0.40.9 5432")
            == "OK"),
        "session A's fetch is in flight"
    );
    let b = mcp_http_session(
        &cli,
        "http://10.0.20.5:8000/mcp",
        r#"[["fetch", {"url": "http://10.0.40.10:5432/"}]]"#,
    );
    assert!(
        text(&b, 0).contains("Operation not permitted"),
        "session B's fetch of query_db's database is refused: {b}"
    );
    assert_eq!(
        p.op("tcp 10.0.40.9 5432"),
        "OK",
        "B's call (same request id, other session) ending did not end A's"
    );
    let mut named: Option<Value> = None;
    wait_until(Duration::from_secs(5), || {
        named = d
            .events(Duration::from_millis(200))
            .into_iter()
            .find(|e| e["dst"] == "10.0.40.10" && !e["mcp"].is_null());
        named.is_some()
    });
    let e = named.expect("B's refusal is reported");
    let sessions: std::collections::BTreeSet<_> = e["mcp"]["in_flight"]
        .as_array()
        .expect("in_flight")
        .iter()
        .map(|c| (c["session"].to_string(), c["request_id"].to_string()))
        .collect();
    let ids: std::collections::BTreeSet<_> = sessions.iter().map(|(_, id)| id).collect();
    assert!(
        sessions.len() == 2 && ids.len() == 1,
        "both calls in flight, same request id, two sessions: {e}"
    );
    mcp_guard_tests::assert_event_schema(&e);
    // A's fetch gives up after its 5 s timeout: then nothing is active.
    assert!(
        wait_until(Duration::from_secs(15), || p.op("tcp 10.0.40.9 5432")
            == "EPERM"),
        "A's call ended"
    );
}

/// What the proxy does with requests no SDK client sends: an `Mcp-Method` header that
/// disagrees with its body is refused with 400 and a JSON-RPC error (and never reaches
/// the server), a body that is not JSON-RPC is passed on unread and counted, and a
/// batch holding a `tools/call` (revision 2025-03-26) has its call announced and ended.
#[test]
fn the_proxy_refuses_disagreeing_headers_and_reads_batches() {
    let Served {
        srv,
        cli,
        d,
        logs: _logs,
        server: _server,
        instance,
        _cg,
    } = served(true);
    let post = |headers: &[&str], body: &str| {
        let mut c = in_netns(&cli, None);
        c.args(["curl", "-sS", "-m", "10", "-o", "-", "-w", "\n%{http_code}"]);
        c.args(["-H", "Content-Type: application/json"]);
        c.args(["-H", "Accept: application/json, text/event-stream"]);
        for h in headers {
            c.args(["-H", h]);
        }
        let out = c
            .args(["--data-binary", body, "http://10.0.20.5:8000/mcp"])
            .output()
            .expect("curl");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", ""));
        (code.to_string(), body.to_string())
    };
    let call = r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"fetch","arguments":{"url":"http://169.254.169.254/"}}}"#;
    let (code, body) = post(&["Mcp-Method: tools/list"], call);
    assert_eq!(code, "400", "{body}");
    let err: Value = serde_json::from_str(&body).expect("a JSON-RPC error");
    assert_eq!(err["id"], 7, "{err}");
    assert!(err["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .contains("Mcp-Method"));
    let (code, body) = post(&["Mcp-Name: query_db"], call);
    assert_eq!(code, "400", "Mcp-Name disagreeing: {body}");
    assert!(
        !d.events(Duration::from_millis(300))
            .iter()
            .any(|e| e["dst"] == "169.254.169.254"),
        "the refused requests never reached the server"
    );
    // A batch holding a call (revision 2025-03-26; this server, of a later revision,
    // refuses it, as it refuses a request outside a session): the call is announced
    // before the batch is forwarded, and the server's answer ends it.
    let mut p = Probe::new(PROBE, &instance, &srv);
    let (code, body) = post(&[], &format!("[{call}]"));
    assert!(!code.is_empty(), "the batch got an answer: {code} {body}");
    assert_eq!(
        p.op("tcp 10.0.40.9 5432"),
        "EPERM",
        "no call stays active after the batch's answer ({code} {body})"
    );
    assert!(
        wait_until(Duration::from_secs(5), || d.get("/metrics").lines().any(
            |l| l.starts_with("mcp_guard_mcp_tool_calls_total{") && !l.ends_with(" 0")
        )),
        "the batch's call was announced to the daemon"
    );
    let (code, _) = post(&[], "{not json");
    assert!(!code.is_empty());
    for kind in ["malformed", "mismatched"] {
        assert!(
            wait_until(Duration::from_secs(5), || d.get("/metrics").lines().any(
                |l| l.starts_with("mcp_guard_mcp_relay_lines_total{")
                    && l.contains(&format!("kind=\"{kind}\""))
                    && !l.ends_with(" 0")
            )),
            "{kind} requests are counted: {}",
            d.get("/metrics")
        );
    }
}

#[test]
fn policy_at_the_relay_applies_to_streamable_http_in_sse_and_json_modes() {
    for json in [false, true] {
        let s = served_with(json, "deny_tools = [\"echo\"]\nmask = \"secrets\"\n");
        s.srv.add_addr("93.184.216.34");
        s.srv.serve_tcp(
            "93.184.216.34:80",
            "HTTP/1.0 200 OK\r\n\r\nkey=AKIAIOSFODNN7EXAMPLE",
        );
        let got = mcp_http_session(
            &s.cli,
            "http://10.0.20.5:8000/mcp",
            r#"[["fetch", {"url": "http://169.254.169.254/latest/meta-data/"}],
                ["fetch", {"url": "http://93.184.216.34/"}],
                ["echo", {"text": "x"}]]"#,
        );
        let mode = if json { "json" } else { "sse" };
        assert_eq!(
            got["tools"],
            serde_json::json!(["fetch"]),
            "{mode}: echo is hidden: {got}"
        );
        let r = &got["results"];
        assert_eq!(r[0]["code"], -32001, "{mode}: refused at the proxy: {got}");
        assert!(
            r[0]["error"].as_str().unwrap().contains("argument-refused"),
            "{got}"
        );
        let t = text(&got, 1);
        assert!(
            t.contains("key=[REDACTED:aws-access-key-id]") && !t.contains("AKIAIOSFODNN7EXAMPLE"),
            "{mode}: masked in the result: {got}"
        );
        assert_eq!(r[2]["code"], -32001, "{mode}: {got}");
        assert!(
            r[2]["error"].as_str().unwrap().contains("deny_tools"),
            "{got}"
        );
        let events = s.d.events(Duration::from_secs(2));
        let e = events
            .iter()
            .find(|e| e["hook"] == "mcp" && e["reason"] == "argument-refused")
            .unwrap_or_else(|| panic!("{mode}: no relay event: {events:#?}"));
        mcp_guard_tests::assert_event_schema(e);
        assert_eq!(e["mcp"]["tool"], "fetch", "{e:#}");
        assert!(
            e["mcp"]["session"].is_string(),
            "{mode}: the session is named: {e:#}"
        );
        assert!(
            events
                .iter()
                .any(|e| e["hook"] == "mcp" && e["secret"] == "aws-access-key-id"),
            "{mode}: {events:#?}"
        );
        // The server never saw the refused fetch: the kernel refused nothing.
        assert!(
            !events.iter().any(|e| e["dst"] == "169.254.169.254"),
            "{mode}: {events:#?}"
        );
    }
}

#[test]
fn approval_holds_a_streamable_http_call_until_someone_decides() {
    let s = served_with(
        false,
        "check_arguments = false\napproval_tools = [\"echo\"]\napprovers = [\"root\"]\napproval_timeout = \"30s\"\n",
    );
    let log = s.logs.0.join("client.log");
    let mut client = Running::spawn(
        in_netns(&s.cli, None)
            .arg(mcp_venv().join("bin/python"))
            .arg(mcp_helper("http_client.py"))
            .arg("http://10.0.20.5:8000/mcp")
            .args([
                "--calls",
                r#"[["echo", {"text": "first"}], ["echo", {"text": "second"}]]"#,
            ]),
        &log,
    );
    let id = mcp_guard_tests::next_pending(&s.d);
    let out = mcp_guard_tests::approvals_cli(&s.d, None, &["approve", &id, "--reason", "ok"]);
    assert!(
        out.status.success(),
        "{}",
        mcp_guard_tests::output_text(&out)
    );
    let id2 = loop {
        let i = mcp_guard_tests::next_pending(&s.d);
        if i != id {
            break i;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = mcp_guard_tests::approvals_cli(&s.d, None, &["deny", &id2, "--reason", "no"]);
    assert!(
        out.status.success(),
        "{}",
        mcp_guard_tests::output_text(&out)
    );
    assert!(
        wait_until(Duration::from_secs(20), || !client.alive()),
        "the client finished: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let output = std::fs::read_to_string(&log).unwrap_or_default();
    let got: Value = output
        .lines()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("client output: {output}"));
    assert_eq!(text(&got, 0), "first", "approved: {got}");
    assert_eq!(got["results"][1]["code"], -32001, "{got}");
    assert!(
        got["results"][1]["error"]
            .as_str()
            .unwrap()
            .contains("approval-denied"),
        "{got}"
    );
}
