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
    for a in [
        "169.254.169.254",
        "10.0.40.9",
        "93.184.216.34",
        "2606:4700::10",
    ] {
        srv.add_addr(a);
    }
    srv.serve_tcp(
        "169.254.169.254:80",
        "HTTP/1.0 200 OK\r\n\r\nAKIAFAKECREDENTIALS",
    );
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
    mcp_guard_tests::curl_in(ns, Some(src), url)
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
    let got = mcp_guard_tests::mcp_http_session(
        &lab.cli,
        "http://10.0.20.5:8000/mcp",
        r#"[["fetch", {"url": "http://169.254.169.254/latest/meta-data/"}],
            ["fetch", {"url": "http://10.0.40.9:5432/"}],
            ["fetch", {"url": "http://10.0.20.7:9/"}]]"#,
    );
    assert_eq!(got["server"], "test-http");
    assert_eq!(got["tools"], serde_json::json!(["fetch", "echo"]));
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

/// Debian's PostgreSQL 15, its own cluster in a temporary directory, run as `postgres`
/// (unguarded) in `ns`, listening on `addrs` port 5432.
struct Postgres {
    _proc: Running,
    /// Also its Unix socket directory (`.s.PGSQL.5432`).
    dir: TempDir,
}

fn pg_bin(name: &str) -> std::path::PathBuf {
    let base = Path::new("/usr/lib/postgresql");
    let mut versions: Vec<_> = std::fs::read_dir(base)
        .expect("Debian's postgresql package (cargo xtask test installs it)")
        .flatten()
        .map(|e| e.path())
        .collect();
    versions.sort();
    versions
        .last()
        .expect("a PostgreSQL version")
        .join("bin")
        .join(name)
}

impl Postgres {
    fn start(ns: &NetNs, addrs: &str) -> Self {
        let dir = TempDir::new();
        let data = dir.0.join("data");
        std::fs::create_dir_all(&data).unwrap();
        let chown = |p: &Path| {
            assert!(Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(p)
                .status()
                .unwrap()
                .success());
        };
        chown(&dir.0);
        // The temp dir's parents must be traversable by postgres.
        let _ = Command::new("chmod").arg("755").arg(&dir.0).status();
        let as_pg = |bin: &str| {
            let mut c = Command::new("setpriv");
            c.args([
                "--reuid=postgres",
                "--regid=postgres",
                "--init-groups",
                "--",
            ])
            .arg(pg_bin(bin));
            c
        };
        let out = as_pg("initdb")
            .args(["-A", "trust", "-U", "postgres", "-D"])
            .arg(&data)
            .output()
            .expect("initdb");
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Clients at the test addresses may connect without a password.
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\nhost all all 0.0.0.0/0 trust\n",
        )
        .unwrap();
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", ns.path().display()))
            .args([
                "setpriv",
                "--reuid=postgres",
                "--regid=postgres",
                "--init-groups",
                "--",
            ])
            .arg(pg_bin("postgres"))
            .arg("-D")
            .arg(&data)
            .args(["-c", &format!("listen_addresses={addrs}"), "-c"])
            .arg(format!("unix_socket_directories={}", dir.0.display()));
        let proc = Running::spawn(&mut c, &dir.0.join("postgres.log"));
        let first = addrs.split(',').next().unwrap().to_string();
        assert!(
            wait_until(Duration::from_secs(30), || in_netns(ns, None)
                .arg(pg_bin("pg_isready"))
                .args(["-h", &first, "-p", "5432"])
                .status()
                .is_ok_and(|s| s.success())),
            "postgres started: {}",
            std::fs::read_to_string(dir.0.join("postgres.log")).unwrap_or_default()
        );
        Self { _proc: proc, dir }
    }
}

/// `psql -At -c SQL` at `host` from a guarded process; (success, stdout, stderr).
fn psql(dir: &Path, ns: &NetNs, host: &str, sql: &str) -> (bool, String, String) {
    let out = in_cgroup(dir, ns)
        .arg("psql")
        .args(["-h", host, "-U", "postgres", "-At", "-c", sql])
        .env("PGCONNECT_TIMEOUT", "5")
        .output()
        .expect("psql");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// A psql session held open in a guarded process: one query at a time, each answer read
/// within a timeout (a cut connection answers nothing).
struct Session {
    proc: Running,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Session {
    fn open(dir: &Path, ns: &NetNs, host: &str) -> Self {
        let mut child = in_cgroup(dir, ns)
            .arg("psql")
            .args(["-h", host, "-U", "postgres", "-At"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("psql session");
        let out = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        Self {
            proc: Running(child),
            lines,
        }
    }

    /// Sends `select N` and returns the answer, or None within 5 s.
    fn query(&mut self, n: u32) -> Option<String> {
        let stdin = self.proc.0.stdin.as_mut()?;
        writeln!(stdin, "select {n};").ok()?;
        stdin.flush().ok()?;
        self.lines.recv_timeout(Duration::from_secs(5)).ok()
    }
}

/// A real PostgreSQL reached with psql from a guarded workload: allowed at its address,
/// refused at another; a session held open keeps working across a reload that keeps
/// allowing it, a SIGTERM and restart, and a kill -9 and restart, and is cut by a reload
/// that stops allowing it.
#[test]
fn postgresql_allowed_refused_and_a_session_across_restarts() {
    let lab = lab();
    lab.srv.add_addr("10.0.50.9");
    lab.srv.add_addr("10.0.51.9");
    let _pg = Postgres::start(&lab.srv, "10.0.50.9,10.0.51.9");
    let cg = TestCgroup::new();
    let (_, dir) = cg.child("http-mcp");
    let allow = "[[workload.allow]]\ncidr = \"10.0.50.9/32\"\nports = [5432]\nproto = \"tcp\"\n";
    let keep = "[daemon]\non_exit = \"keep\"\n";
    let with = |extra: &str| config(&cg, extra).replacen("[daemon]\n", keep, 1);
    let mut d = Daemon::start(&with(allow));
    let (ok, out, err) = psql(&dir, &lab.srv, "10.0.50.9", "select 40 + 2");
    assert!(ok && out == "42", "allowed database answers: {out} {err}");
    let (ok, out, err) = psql(&dir, &lab.srv, "10.0.51.9", "select 40 + 2");
    assert!(
        !ok && out.is_empty() && err.contains("Operation not permitted"),
        "refused database: {out} {err}"
    );

    let mut s = Session::open(&dir, &lab.srv, "10.0.50.9");
    assert_eq!(s.query(1).as_deref(), Some("1"), "session open");
    // A reload that keeps allowing the session (another rule added).
    d.write_config(&with(&format!(
        "{allow}[[workload.allow]]\ncidr = \"10.0.51.9/32\"\nports = [6379]\n"
    )));
    d.signal(libc::SIGHUP);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(s.query(2).as_deref(), Some("2"), "after a reload");
    // SIGTERM with on_exit = "keep", then a restart.
    assert!(d.terminate(), "daemon stopped");
    assert_eq!(s.query(3).as_deref(), Some("3"), "while the daemon is down");
    d.restart();
    assert_eq!(
        s.query(4).as_deref(),
        Some("4"),
        "after SIGTERM and restart"
    );
    d.kill9();
    assert_eq!(s.query(5).as_deref(), Some("5"), "after kill -9");
    d.restart();
    assert_eq!(
        s.query(6).as_deref(),
        Some("6"),
        "after kill -9 and restart"
    );
    // A reload that stops allowing it cuts it.
    let before = d.status()["generation"].as_u64().unwrap_or(0);
    d.write_config(&with(""));
    d.signal(libc::SIGHUP);
    assert!(
        wait_until(Duration::from_secs(5), || d.status()["generation"]
            .as_u64()
            .is_some_and(|g| g > before)),
        "reloaded"
    );
    assert_eq!(s.query(7), None, "a session no longer allowed is cut");
    let (ok, _, err) = psql(&dir, &lab.srv, "10.0.50.9", "select 1");
    assert!(!ok && err.contains("Operation not permitted"), "{err}");
}

/// Debian's redis-server (unguarded) and redis-cli from a guarded workload: allowed at
/// its address, refused at another.
#[test]
fn redis_allowed_and_refused() {
    let lab = lab();
    lab.srv.add_addr("10.0.41.9");
    let dir_tmp = TempDir::new();
    let _redis = Running::spawn(
        in_netns(&lab.srv, None).args([
            "redis-server",
            "--bind",
            "10.0.40.9 10.0.41.9",
            "--port",
            "6379",
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "no",
            "--dir",
            &dir_tmp.0.display().to_string(),
        ]),
        &dir_tmp.0.join("redis.log"),
    );
    let cg = TestCgroup::new();
    let (_, dir) = cg.child("http-mcp");
    let _d = Daemon::start(&config(
        &cg,
        "[[workload.allow]]\ncidr = \"10.0.40.9/32\"\nports = [6379]\nproto = \"tcp\"\n",
    ));
    let cli = |host: &str| {
        in_cgroup(&dir, &lab.srv)
            .args(["redis-cli", "-h", host, "-p", "6379", "PING"])
            .output()
            .expect("redis-cli")
    };
    assert!(
        wait_until(Duration::from_secs(10), || String::from_utf8_lossy(
            &cli("10.0.40.9").stdout
        )
        .trim()
            == "PONG"),
        "allowed redis answers PONG"
    );
    let out = cli("10.0.41.9");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !text.contains("PONG") && text.contains("Operation not permitted"),
        "refused redis: {text}"
    );
}

/// curl with HTTP/1.1 keep-alive from a guarded workload to an allowed ("public")
/// address over IPv4 and IPv6: two requests on one connection, both answered.
#[test]
fn curl_keep_alive_to_an_allowed_address() {
    let lab = lab();
    let dir_tmp = TempDir::new();
    std::fs::write(dir_tmp.0.join("index.html"), "hello").unwrap();
    let _http4 = Running::spawn(
        in_netns(&lab.srv, None)
            .args([
                "python3",
                "-m",
                "http.server",
                "--protocol",
                "HTTP/1.1",
                "-b",
            ])
            .args(["93.184.216.34", "80", "-d"])
            .arg(&dir_tmp.0),
        &dir_tmp.0.join("http4.log"),
    );
    let _http6 = Running::spawn(
        in_netns(&lab.srv, None)
            .args([
                "python3",
                "-m",
                "http.server",
                "--protocol",
                "HTTP/1.1",
                "-b",
            ])
            .args(["2606:4700::10", "80", "-d"])
            .arg(&dir_tmp.0),
        &dir_tmp.0.join("http6.log"),
    );
    let cg = TestCgroup::new();
    let (_, dir) = cg.child("http-mcp");
    let _d = Daemon::start(&config(&cg, ""));
    for base in ["http://93.184.216.34", "http://[2606:4700::10]"] {
        let url = format!("{base}/index.html");
        let run = || {
            in_cgroup(&dir, &lab.srv)
                .args([
                    "curl",
                    "-sS",
                    "-m",
                    "5",
                    "-w",
                    " %{num_connects}",
                    &url,
                    &url,
                ])
                .output()
                .expect("curl")
        };
        assert!(
            wait_until(Duration::from_secs(10), || {
                let o = run();
                String::from_utf8_lossy(&o.stdout) == "hello 1hello 0"
            }),
            "two answers on one connection from {base}: {:?}",
            run()
        );
    }
}

/// HTTP/3 over QUIC (aioquic from PyPI) from a guarded client: a GET to an allowed
/// ("public") address is answered, one to an internal address is refused in the kernel
/// (aioquic ignores the EPERM of each send and times out; the event says why).
#[test]
fn http3_over_quic_to_allowed_and_refused_addresses() {
    let lab = lab();
    let public = TempDir::new();
    let internal = TempDir::new();
    let start = |host: &str, dir: &TempDir| {
        Running::spawn(
            in_netns(&lab.srv, None)
                .arg(python())
                .arg(helper("h3.py"))
                .args(["server", host, "443"])
                .arg(&dir.0),
            &dir.0.join("server.log"),
        )
    };
    let _s1 = start("93.184.216.34", &public);
    let _s2 = start("10.0.40.9", &internal);
    for dir in [&public, &internal] {
        assert!(
            wait_until(Duration::from_secs(30), || dir.0.join("ready").exists()),
            "the HTTP/3 server started: {}",
            std::fs::read_to_string(dir.0.join("server.log")).unwrap_or_default()
        );
    }
    let cg = TestCgroup::new();
    let (_, dir) = cg.child("http-mcp");
    let d = Daemon::start(&config(&cg, ""));
    let get = |host: &str, certs: &TempDir| {
        let out = in_cgroup(&dir, &lab.srv)
            .arg(python())
            .arg(helper("h3.py"))
            .args(["client", host, "443"])
            .arg(&certs.0)
            .output()
            .expect("h3 client");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
        )
    };
    assert_eq!(
        get("93.184.216.34", &public),
        (true, "200 hello over h3".to_string()),
        "HTTP/3 to an allowed address"
    );
    let (ok, text) = get("10.0.40.9", &internal);
    assert!(
        !ok && text.starts_with("error: "),
        "HTTP/3 to an internal address gets no answer: {text}"
    );
    let events = d.events(Duration::from_millis(500));
    assert!(
        events.iter().any(|e| e["dst"] == "10.0.40.9"
            && e["proto"] == "udp"
            && e["reason"] == "deny-internal"
            && e["workload"] == "http-mcp"),
        "the refused QUIC flow is reported: {events:?}"
    );
}

/// PostgreSQL over its Unix socket (what most local clients use): a workload whose
/// `unix = "allow-listed"` names the socket queries it; one whose deny_unix names it is
/// refused by the kernel, and psql itself says so; an allow-listed workload reaches no
/// other local socket. Needs the cgroup unix hooks (Linux 6.7+); without them the
/// daemon says it does not judge Unix sockets (checked in unix_sockets.rs).
#[test]
fn postgresql_over_its_unix_socket_where_allowed() {
    let ns = NetNs::new();
    ns.add_addr("10.0.50.9");
    let pg = Postgres::start(&ns, "10.0.50.9");
    let socket = pg.dir.0.join(".s.PGSQL.5432");
    let cg = TestCgroup::new();
    let (_, db) = cg.child("db");
    let (_, nodb) = cg.child("nodb");
    let other = TempDir::new();
    let _listener = std::os::unix::net::UnixListener::bind(other.0.join("x.sock")).unwrap();
    let d = Daemon::start(&format!(
        "[[workload]]\nname = \"db\"\ncgroup = \"{r}/db\"\nunix = \"allow-listed\"\nallow_unix = [\"{s}\"]\n[[workload]]\nname = \"nodb\"\ncgroup = \"{r}/nodb\"\ndeny_unix = [\"{s}\"]\n[daemon]\nattach_cgroup = \"{r}\"\n[events]\nrate_limit_per_sec = 0\n",
        r = cg.rel,
        s = socket.display()
    ));
    let host = pg.dir.0.display().to_string();
    let (ok, out, err) = psql(&db, &ns, &host, "select 40 + 2");
    assert!(ok && out == "42", "over the allowed socket: {out} {err}");
    if !mcp_guard_tests::needs(
        "postgresql_over_its_unix_socket_where_allowed",
        mcp_guard_tests::Feature::UnixJudged,
        Some(&d),
    ) {
        return;
    }
    let (ok, out, err) = psql(&nodb, &ns, &host, "select 40 + 2");
    assert!(
        !ok && out.is_empty() && err.contains("Operation not permitted"),
        "denied socket: {out} {err}"
    );
    let refused = in_cgroup(&db, &ns)
        .args([
            "python3",
            "-c",
            "import socket,sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])",
        ])
        .arg(other.0.join("x.sock"))
        .output()
        .unwrap();
    assert!(
        !refused.status.success()
            && String::from_utf8_lossy(&refused.stderr).contains("PermissionError"),
        "allow-listed: another socket: {}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let ev = d.events(Duration::from_secs(2));
    let sock = socket.display().to_string();
    assert!(
        ev.iter().any(|e| e["workload"] == "nodb"
            && e["hook"] == "connect_unix"
            && e["reason"] == "unix-denied"
            && e["dst_path"] == sock.as_str()
            && e["comm"] == "psql"),
        "{ev:#?}"
    );
}
