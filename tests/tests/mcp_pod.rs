//! A Streamable HTTP MCP server in a containerd pod with the proxy as a sidecar
//! container (#32): the official MCP SDK's server in container `server` (guarded by the
//! pod's workload), `mcp-guard mcp-proxy --container server` in container `mcp-proxy`
//! (held by the built-in `mcp-proxy` workload: loopback and the MCP socket only), the
//! daemon's MCP socket mounted into the sidecar as a hostPath would be. The SDK's client
//! calls from the node's namespace; the kernel refuses what the call's policy refuses and
//! events name the tool call, its session and the pod. A process in another pod speaking
//! the daemon's protocol by hand cannot report calls for this pod's server. The daemon
//! killed with kill -9 and restarted under the running sidecar gets the instance back.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use mcp_guard_tests::{
    cri::{link_to, pod, Containerd, PodSpec, INTERNAL, METADATA},
    guard_bin, mcp_helper, mcp_http_session, mcp_venv, wait_until, Daemon, NetNs, TempDir,
    TestCgroup,
};
use serde_json::Value;

const LABELS: &[(&str, &str)] = &[("mcp-guard.dev/role", "mcp-server")];

fn config(cg: &TestCgroup, c: &Containerd) -> String {
    format!(
        r#"[baseline]
deny = ["metadata"]
[[workload]]
name = "node"
cgroup = "{r}"
default = "allow"
[[workload]]
name = "mcp-servers"
default = "deny-internal"
[workload.pods]
labels = {{ "mcp-guard.dev/role" = "mcp-server" }}
mcp_proxy = "mcp-proxy"
[[workload.allow]]
cidr = "{INTERNAL}/32"
ports = [80]
tools = ["fetch"]
[[workload.allow]]
cidr = "{INTERNAL}/32"
ports = [5432]
tools = ["query_db"]
# The kernel layer is what is checked: the relay's argument check is off.
[workload.mcp]
check_arguments = false
[daemon]
attach_cgroup = "{r}"
cri_socket = "{sock}"
pod_cgroups = ["{r}/pod*"]
cri_poll_ms = 100
[events]
rate_limit_per_sec = 0
"#,
        r = cg.rel,
        sock = c.socket.display(),
    )
}

/// The host directories a program of this machine needs inside a container of the
/// test image (which holds only `/pause`), and the test's own files.
fn host_mounts(extra: &[PathBuf]) -> Vec<PathBuf> {
    let mut m: Vec<PathBuf> = ["/usr", "/lib", "/lib64", "/etc"]
        .iter()
        .map(PathBuf::from)
        .filter(|p| p.exists())
        .collect();
    m.extend(
        extra
            .iter()
            .map(|p| p.canonicalize().expect("canonical path")),
    );
    m
}

/// `dirs` read-only (the daemon's socket directory too, as the example mounts it) and
/// `rw` writable (where a container of the test writes what it saw).
fn mounts(dirs: &[PathBuf], rw: &Path) -> Vec<(PathBuf, bool)> {
    let mut out: Vec<(PathBuf, bool)> = dirs.iter().map(|d| (d.clone(), false)).collect();
    out.push((rw.canonicalize().expect("dir"), true));
    out
}

fn start(
    c: &mut Containerd,
    sandbox: &str,
    spec: &PodSpec<'_>,
    name: &str,
    argv: &[String],
    mounts: &[(PathBuf, bool)],
) -> String {
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let m: Vec<(&Path, bool)> = mounts.iter().map(|(p, rw)| (p.as_path(), *rw)).collect();
    c.start_container(sandbox, spec, name, &argv[..1], &argv[1..], &m)
}

fn text(got: &Value, i: usize) -> String {
    got["results"][i]["text"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn an_http_mcp_server_in_a_pod_is_scoped_through_its_sidecar() {
    let cg = TestCgroup::new();
    let mut c = Containerd::start();
    let node = NetNs::new();
    let mut d = Daemon::start(&config(&cg, &c));
    let socket = d.control.with_file_name("mcp.sock");
    let socket_dir = socket.parent().expect("dir").canonicalize().expect("dir");
    let spec = PodSpec {
        namespace: "tools",
        name: "http-mcp",
        labels: LABELS,
        annotations: &[],
        cgroup_parent: &format!("{}/pod-http-mcp", cg.rel),
    };
    let p = pod(&mut c, &cg, &spec);
    link_to(&p, &node, 0, &[]);
    let venv = mcp_venv().canonicalize().expect("venv");
    let python = venv.join("bin/python").display().to_string();
    let bin = guard_bin().canonicalize().expect("mcp-guard");
    // The venv's python is a link to an interpreter installed elsewhere (pyenv, /usr).
    let interpreter = venv.join("bin/python").canonicalize().expect("python");
    let prefix = interpreter
        .parent()
        .and_then(Path::parent)
        .expect("interpreter prefix")
        .to_path_buf();
    let dirs = host_mounts(&[
        prefix,
        venv.clone(),
        mcp_helper("").parent().expect("dir").to_path_buf(),
        bin.parent().expect("dir").to_path_buf(),
        socket_dir.clone(),
    ]);
    let outdir = TempDir::new();
    let m = mounts(&dirs, &outdir.0);
    start(
        &mut c,
        &p.id,
        &spec,
        "server",
        &[
            python.clone(),
            mcp_helper("http_server.py").display().to_string(),
            "127.0.0.1".into(),
            "8001".into(),
        ],
        &m,
    );
    start(
        &mut c,
        &p.id,
        &spec,
        "mcp-proxy",
        &[
            bin.display().to_string(),
            "mcp-proxy".into(),
            "--container".into(),
            "server".into(),
            "--socket".into(),
            socket_dir.join("mcp.sock").display().to_string(),
            "--listen".into(),
            "10.200.0.2:8000".into(),
            "--upstream".into(),
            "127.0.0.1:8001".into(),
        ],
        &m,
    );
    let instances = || {
        d.get("/metrics")
            .lines()
            .any(|l| l.starts_with("mcp_guard_mcp_instances ") && !l.ends_with(" 0"))
    };
    assert!(
        wait_until(Duration::from_secs(60), instances),
        "the sidecar registered the server container as an MCP instance: {}",
        d.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    );
    let healthz = || mcp_guard_tests::curl_in(&node, None, "http://10.200.0.2:8000/healthz").1;
    assert!(
        wait_until(Duration::from_secs(30), || healthz() == "ok"),
        "the server answers through its sidecar"
    );
    let got = mcp_http_session(
        &node,
        "http://10.200.0.2:8000/mcp",
        &format!(
            r#"[["fetch", {{"url": "http://{METADATA}/"}}], ["fetch", {{"url": "http://{INTERNAL}/"}}], ["fetch", {{"url": "http://{INTERNAL}:5432/"}}]]"#
        ),
    );
    assert!(
        text(&got, 0).contains("Operation not permitted"),
        "metadata refused: {got}"
    );
    assert!(
        !text(&got, 1).contains("Operation not permitted"),
        "the fetch rule applies during the fetch call (nothing listens there): {got}"
    );
    assert!(
        text(&got, 2).contains("Operation not permitted"),
        "query_db's rule does not apply to a fetch call: {got}"
    );
    let mut named: Option<Value> = None;
    wait_until(Duration::from_secs(5), || {
        named = d
            .events(Duration::from_millis(200))
            .into_iter()
            .find(|e| e["dst"] == METADATA && !e["mcp"].is_null());
        named.is_some()
    });
    let e = named.expect("the metadata refusal names the tool call");
    assert_eq!(e["workload"], "mcp-servers", "{e}");
    assert_eq!(e["pod"]["name"], "http-mcp", "{e}");
    assert_eq!(e["mcp"]["tool"], "fetch", "{e}");
    assert!(
        e["mcp"]["session"].as_str().is_some_and(|s| s.len() >= 8),
        "{e}"
    );
    mcp_guard_tests::assert_event_schema(&e);

    // kill -9 and a new daemon under the running sidecar: it announces the server
    // container again (peer credentials checked again) and calls are scoped as before.
    d.kill9();
    d.restart();
    let resumed = || {
        d.get("/metrics")
            .lines()
            .any(|l| l.starts_with("mcp_guard_mcp_instances_resumed_total{") && !l.ends_with(" 0"))
    };
    assert!(
        wait_until(Duration::from_secs(30), resumed),
        "the sidecar registered its instance again: {}",
        d.get("/metrics")
    );
    let got = mcp_http_session(
        &node,
        "http://10.200.0.2:8000/mcp",
        &format!(
            r#"[["fetch", {{"url": "http://{INTERNAL}/"}}], ["fetch", {{"url": "http://{INTERNAL}:5432/"}}]]"#
        ),
    );
    assert!(
        !text(&got, 0).contains("Operation not permitted")
            && text(&got, 1).contains("Operation not permitted"),
        "after the restart, the fetch rule applies during fetch calls and query_db's not: {got}"
    );

    // Another pod of the same workload: its sidecar container can reach the MCP socket,
    // but the daemon takes reports from it only for containers of its own pod.
    let other = PodSpec {
        name: "other-mcp",
        cgroup_parent: &format!("{}/pod-other-mcp", cg.rel),
        ..spec
    };
    let q = pod(&mut c, &cg, &other);
    let server_cgroup_id = std::fs::read_dir(&p.dir)
        .expect("pod cgroup")
        .flatten()
        .filter(|e| e.path().join("cgroup.procs").exists())
        .find(|e| {
            std::fs::read_to_string(e.path().join("cgroup.procs"))
                .unwrap_or_default()
                .lines()
                .filter_map(|pid| std::fs::read_link(format!("/proc/{pid}/exe")).ok())
                .any(|exe| exe.display().to_string().contains("python"))
        })
        .map(|e| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(e.path()).expect("cgroup")))
        .expect("the server container's cgroup");
    let out = outdir.0.canonicalize().expect("dir").join("intruder.out");
    let tries = [
        format!(
            r#"{{"op":"start","workload":"mcp-servers","cgroup_id":{server_cgroup_id},"relay_pid":1,"command":[]}}"#
        ),
        r#"{"op":"start_pod","container":"server","relay_pid":1,"command":[]}"#.to_string(),
    ];
    for (i, line) in tries.iter().enumerate() {
        assert!(
            wait_until(Duration::from_secs(10), || d
                .placed_pods("mcp-servers")
                .iter()
                .any(|x| x["name"] == "other-mcp")),
            "the other pod is placed"
        );
        let id = start(
            &mut c,
            &q.id,
            &other,
            "mcp-proxy",
            &[
                python.clone(),
                mcp_helper("raw_report.py").display().to_string(),
                socket_dir.join("mcp.sock").display().to_string(),
                out.display().to_string(),
                line.clone(),
            ],
            &m,
        );
        let _ = c.wait_container(&id);
        let reply = std::fs::read_to_string(&out).unwrap_or_default();
        let v: Value = serde_json::from_str(reply.trim()).unwrap_or(Value::Null);
        assert_eq!(v["ok"], false, "try {i} refused by the daemon: {reply}");
        let why = v["error"].as_str().unwrap_or_default();
        assert!(
            if i == 0 {
                why.contains("is in pod tools/other-mcp")
            } else {
                why.contains("has no container \"server\"")
            },
            "try {i}: {why}"
        );
        c.remove_container(&id);
    }
}
