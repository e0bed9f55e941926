//! The lifecycle matrix: every transition an operator puts the daemon through
//! {SIGHUP reload, SIGTERM + restart, kill -9 + restart, upgrade from the oldest
//! supported binary (built from this repository's history)} against every piece of
//! state the kernel keeps for the workloads {a workload's policy, a cgroup registered at
//! mkdir, an address learned through the DNS proxy with its expiry, an MCP instance with
//! a call in flight and an idle one, TC links}, and pods placed through a real
//! containerd's CRI across all four transitions in one run (the runtime is slow to start).
//!
//! Throughout each transition a probe inside each workload connects in a loop: no
//! allowed connection may fail and no denied one succeed. After it: events still name
//! the right workload and tool, counters did not go back, what was learned is still
//! learned with the same expiry, and nothing that was inactive became active (an MCP
//! tool-scoped destination between calls stays refused).

use std::{
    process::{Child, Stdio},
    sync::atomic::Ordering,
    time::Duration,
};

use mcp_guard_tests::{
    cri::{Containerd, PodSpec},
    guard_bin, listen_tcp_at, mcp_helper, mcp_venv, output_text, upgrade, wait_until, Daemon,
    Dnsmasq, NetNs, Probe, TestCgroup,
};
use serde_json::Value;

const PROBE: &str = env!("CARGO_BIN_EXE_mcpg-probe");
const METADATA: &str = "169.254.169.254";
/// Allowed to workload "w" on 5432 by a CIDR rule; refused on 6379.
const DB: &str = "10.0.12.5";
/// Allowed to "w" only once learned through the DNS proxy (a name under *.cache.example.test, port 6379: a wildcard the daemon cannot resolve by itself).
const CACHE: &str = "10.0.14.7";
const PUBLIC: &str = "93.184.216.34";
/// Reachable from the MCP instance on 5432 only during a query_db call.
const MCP_DB: &str = "10.0.13.5";
/// How long each probe loop runs; the transition happens inside it.
const LOOP_MS: u64 = 6000;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Transition {
    Reload,
    Restart,
    Kill9,
    Upgrade,
}

struct Lab {
    ns: NetNs,
    vm: NetNs,
    _net: NetNs,
    cg: TestCgroup,
    metadata_udp: std::sync::Arc<std::sync::atomic::AtomicU64>,
    _dnsmasq: Dnsmasq,
}

fn lab() -> Lab {
    let ns = NetNs::new();
    for a in [METADATA, DB, CACHE, PUBLIC, MCP_DB] {
        ns.add_addr(a);
    }
    // Denied destinations listen too: a connection that got through would say OK.
    for l in [
        format!("{METADATA}:80"),
        format!("{DB}:5432"),
        format!("{DB}:6379"),
        format!("{CACHE}:6379"),
        format!("{PUBLIC}:443"),
        format!("{MCP_DB}:5432"),
    ] {
        ns.listen_tcp(&l);
    }
    let dnsmasq = Dnsmasq::start(
        &ns,
        &format!("{CACHE} redis.cache.example.test\n"),
        &[],
        300,
    );
    // TC (VM mode): a "vm" namespace whose vm0 leads to "net", where metadata answers.
    let vm = NetNs::new();
    let net = NetNs::new();
    vm.veth("vm0", &net, "net0");
    vm.ip("addr add 198.18.0.1/24 dev vm0");
    net.ip("addr add 198.18.0.2/24 dev net0");
    net.add_addr(METADATA);
    vm.ip("route add 169.254.169.254/32 via 198.18.0.2");
    let metadata_udp = net.udp_counter("169.254.169.254:53");
    Lab {
        ns,
        vm,
        _net: net,
        cg: TestCgroup::new(),
        metadata_udp,
        _dnsmasq: dnsmasq,
    }
}

/// The kernel's tool scoping is what is checked: the relay's argument check is off. The
/// oldest supported binary predates `[workload.mcp]`: the upgrade row starts it without
/// these lines, and its relay (which ignores the new daemon's refusals) runs on.
const RELAY_OFF: &str = "[workload.mcp]\ncheck_arguments = false\n";

fn config(lab: &Lab, extra_rule: &str) -> String {
    format!(
        r#"
[[workload]]
name = "w"
cgroup = "{r}/w"
default = "deny-internal"
[[workload.allow]]
cidr = "{DB}/32"
ports = [5432]
proto = "tcp"
[[workload.allow]]
host = "*.cache.example.test"
ports = [6379]
allow_internal = true
{extra_rule}
[[workload]]
name = "pat"
cgroup = "{r}/pat-*"
default = "deny-internal"

[[workload]]
name = "raw"
cgroup = "{r}/raw"
deny_raw_sockets = false

[[workload]]
name = "mcp"
cgroup = "{r}/mcp"
default = "deny-internal"
[[workload.allow]]
cidr = "{MCP_DB}/32"
ports = [5432]
tools = ["query_db", "slow_query_db"]
{RELAY_OFF}
[dns]
nameservers = ["127.0.0.1:53"]
netns = "{ns}"
proxy = "127.0.0.1:5353"

[tc]
netns = "{vm}"
interfaces = ["vm*"]

[daemon]
attach_cgroup = "{r}"
on_exit = "keep"
[events]
rate_limit_per_sec = 0
"#,
        r = lab.cg.rel,
        ns = lab.ns.path().display(),
        vm = lab.vm.path().display(),
    )
}

/// One probe loop: (cgroup, namespace, destination, whether it must be allowed).
struct Loop {
    what: String,
    allowed: bool,
    handle: std::thread::JoinHandle<String>,
}

fn start_loop(
    dir: &std::path::Path,
    netns: &std::path::Path,
    dst: &str,
    port: u16,
    allowed: bool,
) -> Loop {
    let (dir, ns_path, cmd) = (
        dir.to_path_buf(),
        netns.to_path_buf(),
        format!("tcp-loop {dst} {port} {LOOP_MS} 3"),
    );
    Loop {
        what: format!("{} -> {dst}:{port}", dir.display()),
        allowed,
        handle: std::thread::spawn(move || Probe::at(PROBE, &dir, &ns_path).op(&cmd)),
    }
}

fn check_loop(l: Loop) {
    let out = l.handle.join().expect("probe loop");
    let f: Vec<u64> = out
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    assert_eq!(f.len(), 3, "{}: {out}", l.what);
    let (ok, denied, other) = (f[0], f[1], f[2]);
    if l.allowed {
        assert!(
            denied == 0 && other == 0 && ok > 50,
            "{}: an allowed connection failed during the transition: {out}",
            l.what
        );
    } else {
        assert!(
            ok == 0 && other == 0 && denied > 50,
            "{}: a denied connection got through (or failed otherwise) during the transition: {out}",
            l.what
        );
    }
}

/// The sum of a counter's series that carry `label` (`workload="w"`).
fn sum(d: &Daemon, name: &str, label: &str) -> f64 {
    d.get("/metrics")
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn metric(d: &Daemon, series: &str) -> f64 {
    d.get("/metrics")
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

fn learned(d: &Daemon) -> Vec<Value> {
    let v: Value = serde_json::from_str(&d.get("/dns")).expect("/dns is JSON");
    v["learned"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|l| l["workload"] == "w" && l["addr"] == CACHE)
        .collect()
}

/// The SDK client driving the database server under `exec --mcp` (run by `bin`): a
/// quick call, then a slow one that is in flight during the transition (it connects 15 s
/// after it started: by then its relay has registered it again; until then the instance
/// has no tool active, by design); after it, a
/// quick call again, a background connection scheduled between calls, and what it got.
fn mcp_client(lab: &Lab, d: &Daemon, bin: &std::path::Path) -> Child {
    let db = serde_json::json!({"host": MCP_DB, "port": 5432});
    let calls = serde_json::json!([
        ["query_db", db],
        ["slow_query_db", {"host": MCP_DB, "port": 5432, "delay": 15.0}],
    ]);
    let then = serde_json::json!([
        ["query_db", db],
        ["later", {"host": MCP_DB, "port": 5432, "delay": 0.3}],
        ["pause", {"seconds": 1.5}],
        ["background", {}],
    ]);
    mcp_guard_tests::in_netns(&lab.ns, None)
        .arg(mcp_venv().join("bin/python"))
        .arg(mcp_helper("client.py"))
        .arg("--calls")
        .arg(calls.to_string())
        .args(["--then", &then.to_string(), "--"])
        .arg(bin)
        .args(["exec", "--mcp", "--config"])
        .arg(&d.config)
        .args(["--workload", "mcp", "--"])
        .arg(mcp_venv().join("bin/python"))
        .arg(mcp_helper("db_server.py"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("MCP client")
}

/// The matrix rows run one at a time: each keeps eight probe loops busy across a
/// restart, and two at once on two cores would measure the machine, not the daemon.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Puts the daemon through `t`; a reload rewrites the config to `reloaded` first and
/// waits until the new generation is applied.
fn transition(d: &mut Daemon, t: Transition, reloaded: &str) {
    match t {
        Transition::Reload => {
            let before = d.status()["generation"].as_u64().unwrap_or(0);
            d.write_config(reloaded);
            d.signal(libc::SIGHUP);
            assert!(
                wait_until(Duration::from_secs(5), || d.status()["generation"]
                    .as_u64()
                    .unwrap_or(0)
                    > before),
                "the reload was applied"
            );
        }
        Transition::Restart | Transition::Kill9 | Transition::Upgrade => {
            if t == Transition::Kill9 {
                d.kill9();
            } else {
                assert!(d.terminate(), "{t:?}: SIGTERM, clean exit");
            }
            std::thread::sleep(Duration::from_millis(700));
            if t == Transition::Upgrade {
                d.restart_with(&guard_bin());
            } else {
                d.restart();
            }
        }
    }
}

fn run(t: Transition) {
    let _one = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let lab = lab();
    let before_bin = if t == Transition::Upgrade {
        upgrade::old_binary()
    } else {
        guard_bin()
    };
    let (_, w) = lab.cg.child("w");
    let (_, raw) = lab.cg.child("raw");
    let text = config(&lab, "");
    let text = if t == Transition::Upgrade {
        text.replace(RELAY_OFF, "")
    } else {
        text
    };
    let mut d = Daemon::start_with(&before_bin, &text);
    // A cgroup made after the daemon started: registered by the kernel at mkdir.
    let (_, pat1) = lab.cg.child("pat-1");
    // Learned through the proxy before the transition.
    let mut wp = Probe::new(PROBE, &w, &lab.ns);
    assert_eq!(
        wp.op(&format!("tcp {CACHE} 6379")),
        "EPERM",
        "not learned yet"
    );
    assert_eq!(
        wp.op("resolve-tcp redis.cache.example.test 127.0.0.1 5353 6379"),
        format!("OK {CACHE}")
    );
    let learned_before = learned(&d);
    assert_eq!(learned_before.len(), 1, "{}", d.get("/dns"));
    // The MCP instance: the slow call is in flight when the transition comes.
    let client = mcp_client(&lab, &d, &before_bin);
    assert!(
        wait_until(Duration::from_secs(30), || metric(
            &d,
            "mcp_guard_mcp_tool_calls_total{workload=\"mcp\"}"
        ) >= 2.0),
        "the slow call was reported:\n{}",
        d.stderr.lock().unwrap()
    );
    let denied_before = sum(&d, "mcp_guard_denied_flows_total", "workload=\"w\"");
    let ns = lab.ns.path();
    let loops = vec![
        start_loop(&w, &ns, DB, 5432, true),
        start_loop(&w, &ns, CACHE, 6379, true),
        start_loop(&w, &ns, PUBLIC, 443, true),
        start_loop(&w, &ns, METADATA, 80, false),
        start_loop(&w, &ns, DB, 6379, false),
        start_loop(&pat1, &ns, PUBLIC, 443, true),
        start_loop(&pat1, &ns, METADATA, 80, false),
        start_loop(&pat1, &ns, DB, 5432, false),
    ];
    std::thread::sleep(Duration::from_millis(1000));
    transition(
        &mut d,
        t,
        &config(
            &lab,
            "[[workload.allow]]\ncidr = \"198.51.100.0/24\"\nports = [443]\n",
        ),
    );
    for l in loops {
        check_loop(l);
    }

    // After: a new cgroup is registered at mkdir by the programs now running.
    let (_, pat2) = lab.cg.child("pat-2");
    let mut p2 = Probe::new(PROBE, &pat2, &lab.ns);
    assert_eq!(
        p2.op(&format!("tcp {METADATA} 80")),
        "EPERM",
        "pat-2 guarded"
    );
    assert_eq!(p2.op(&format!("tcp {PUBLIC} 443")), "OK");
    // What was learned stays learned, with the same expiry; still allowed.
    let learned_after = learned(&d);
    assert_eq!(learned_after.len(), 1, "{}", d.get("/dns"));
    assert_eq!(
        learned_after[0]["expires_unix"], learned_before[0]["expires_unix"],
        "the expiry did not move"
    );
    assert_eq!(wp.op(&format!("tcp {CACHE} 6379")), "OK");
    // TC links: a raw packet to metadata is still dropped by the classifier.
    // (The cgroup_skb backstop refuses it first, with EPERM.) One classifier, not two.
    let mut rp = Probe::new(PROBE, &raw, &lab.vm);
    let sent = rp.op(&format!("raw-udp 198.18.0.1 {METADATA} 53"));
    assert!(sent == "SENT" || sent == "EPERM", "{sent}");
    if mcp_guard_tests::kernel_at_least(6, 6) {
        assert_eq!(
            lab.vm.tcx_programs("vm0", "mcpg_tc"),
            1,
            "one classifier on vm0"
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        lab.metadata_udp.load(Ordering::SeqCst),
        0,
        "a raw packet to metadata crossed the classifier"
    );
    // Events name the workload after the transition.
    assert_eq!(wp.op(&format!("tcp {DB} 6379")), "EPERM");
    let events = d.events(Duration::from_millis(800));
    assert!(
        events
            .iter()
            .any(|e| e["workload"] == "w" && e["dst"].as_str().unwrap_or_default().starts_with(DB)),
        "the refusal names workload w: {events:?}"
    );
    // Counters never go back (a restart reads them from the pinned maps).
    let denied_after = sum(&d, "mcp_guard_denied_flows_total", "workload=\"w\"");
    assert!(
        denied_after >= denied_before + 50.0,
        "denied flows of w went from {denied_before} to {denied_after}"
    );
    // The MCP instance: the call in flight completed with its destination reachable,
    // the next call is scoped again, and nothing stayed active between calls.
    let out = client.wait_with_output().expect("MCP client");
    assert!(out.status.success(), "{}", output_text(&out));
    let got: Value = serde_json::from_slice(&out.stdout).expect("client JSON");
    let r = &got["results"];
    assert_eq!(r[0]["text"], "connected", "before the transition: {got}");
    assert_eq!(
        r[1]["text"],
        "connected",
        "the call in flight: {got}\n{}\ndaemon:\n{}",
        output_text(&out),
        d.stderr.lock().unwrap()
    );
    assert_eq!(
        r[2]["text"], "connected",
        "scoped after the transition: {got}"
    );
    assert_eq!(
        r[5]["text"], "[\"refused: Operation not permitted\"]",
        "nothing stays active between calls: {got}"
    );
    // The relay's registration after a restart is counted (a relay of the old binary, in
    // the upgrade row, predates the flag: not counted; a reload keeps the connection).
    let resumed = metric(
        &d,
        "mcp_guard_mcp_instances_resumed_total{workload=\"mcp\"}",
    );
    let expected = match t {
        Transition::Restart | Transition::Kill9 => 1.0,
        Transition::Reload | Transition::Upgrade => 0.0,
    };
    assert!(
        (resumed - expected).abs() < f64::EPSILON,
        "instances resumed: {resumed}, expected {expected}\n{}\ndaemon:\n{}",
        output_text(&out),
        d.stderr.lock().unwrap()
    );
}

#[test]
fn sighup_reload_keeps_every_piece_of_state() {
    run(Transition::Reload);
}

#[test]
fn sigterm_and_restart_keep_every_piece_of_state() {
    run(Transition::Restart);
}

#[test]
fn kill_9_and_restart_keep_every_piece_of_state() {
    run(Transition::Kill9);
}

#[test]
fn upgrade_from_the_oldest_supported_binary_keeps_every_piece_of_state() {
    run(Transition::Upgrade);
}

/// `systemctl reload` (SIGHUP) while the daemon starts, or the instant it says ready,
/// reloads and never ends it (SIGHUP's default action would).
#[test]
fn sighup_while_starting_is_a_reload_never_an_exit() {
    let lab = lab();
    let _ = lab.cg.child("w");
    let mut d = Daemon::start(&config(&lab, ""));
    assert!(d.terminate(), "SIGTERM: clean exit, pins kept");
    let sent = d.restart_under_sighup();
    assert!(sent > 20, "SIGHUPs sent while starting: {sent}");
    std::thread::sleep(Duration::from_millis(500));
    assert!(d.alive(), "the daemon ended:\n{}", d.stderr.lock().unwrap());
    assert!(
        wait_until(Duration::from_secs(10), || d
            .stderr
            .lock()
            .unwrap()
            .contains("SIGHUP: reloading")),
        "a SIGHUP after ready reloads:\n{}",
        d.stderr.lock().unwrap()
    );
    assert!(d.get_tcp("/healthz").is_ok(), "healthz answers");
}

/// Creates a hash map (4-byte keys and values, one entry) and pins it at `path`.
fn pin_foreign_map(path: &std::path::Path) {
    #[repr(C)]
    #[derive(Default)]
    struct Create {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        _rest: [u64; 16],
    }
    #[repr(C)]
    #[derive(Default)]
    struct Pin {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        _rest: [u64; 4],
    }
    let create = Create {
        map_type: 1,
        key_size: 4,
        value_size: 4,
        max_entries: 1,
        ..Default::default()
    };
    // SAFETY: BPF_MAP_CREATE with a zeroed, large-enough attr.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, 0, &raw const create, size_of::<Create>()) };
    assert!(
        fd >= 0,
        "BPF_MAP_CREATE: {}",
        std::io::Error::last_os_error()
    );
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let pin = Pin {
        pathname: c.as_ptr() as u64,
        bpf_fd: fd as u32,
        ..Default::default()
    };
    // SAFETY: BPF_OBJ_PIN with a valid path and our fd.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, 6, &raw const pin, size_of::<Pin>()) };
    assert_eq!(rc, 0, "BPF_OBJ_PIN: {}", std::io::Error::last_os_error());
    // SAFETY: our own fd.
    unsafe { libc::close(fd as i32) };
}

/// Pins of a build with another map layout (a map of the same versioned name whose
/// layout differs): the new binary refuses to start, naming the map and what to do,
/// and touches nothing: the pinned programs keep enforcing.
#[test]
fn pins_with_another_map_layout_are_refused_and_enforcement_stays() {
    let lab = lab();
    let (_, w) = lab.cg.child("w");
    let mut d = Daemon::start(&config(&lab, ""));
    assert!(d.terminate(), "SIGTERM: clean exit, pins kept");
    let epoch = d.pin_dir.join("maps/EPOCH_1");
    std::fs::remove_file(&epoch).expect("the EPOCH_1 pin");
    pin_foreign_map(&epoch);
    let mut child = std::process::Command::new(guard_bin())
        .args(["run", "--config"])
        .arg(&d.config)
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mcp-guard run");
    let exited = wait_until(Duration::from_secs(30), || {
        child.try_wait().ok().flatten().is_some()
    });
    if !exited {
        let _ = child.kill();
    }
    let out = child.wait_with_output().expect("mcp-guard run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(exited && !out.status.success(), "it started anyway:\n{err}");
    assert!(
        err.contains("pinned map EPOCH_1") && err.contains("type 1, key/value size 4/4"),
        "the refusal names the map and its layout:\n{err}"
    );
    let mut p = Probe::new(PROBE, &w, &lab.ns);
    assert_eq!(
        p.op(&format!("tcp {METADATA} 80")),
        "EPERM",
        "still enforced"
    );
    assert_eq!(
        p.op(&format!("tcp {DB} 5432")),
        "OK",
        "its policy still allows"
    );
}

fn pods_config(cg: &TestCgroup, c: &Containerd, extra_rule: &str) -> String {
    mcp_guard_tests::cri::node_config(
        &cg.rel,
        c,
        &format!("[\"{}/pod*\"]", cg.rel),
        extra_rule,
        "on_exit = \"keep\"\n[events]\nrate_limit_per_sec = 0\n",
    )
}

/// A pod through the CRI with the three destinations on its own loopback, each listening
/// on port 80 (a denied connection that got through would say OK). (cgroup dir, netns)
fn placed_pod(
    c: &mut Containerd,
    cg: &TestCgroup,
    name: &str,
    spec: PodSpec<'_>,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let parent = format!("{}/{name}", cg.rel);
    let id = c.run_pod(&PodSpec {
        cgroup_parent: &parent,
        ..spec
    });
    let netns = c.netns(&id);
    for a in [METADATA, MCP_DB, PUBLIC] {
        let out = std::process::Command::new("nsenter")
            .arg(format!("--net={}", netns.display()))
            .args(["ip", "addr", "add", &format!("{a}/32"), "dev", "lo"])
            .output()
            .expect("nsenter");
        assert!(out.status.success(), "adding {a}: {out:?}");
        listen_tcp_at(&netns, &format!("{a}:80"));
    }
    let dir = mcp_guard_tests::cgroup_mount().join(parent.trim_start_matches('/'));
    assert!(dir.exists(), "runc made no v2 cgroup {}", dir.display());
    (dir, netns)
}

fn pod_registered(d: &Daemon, workload: &str, name: &str) -> bool {
    d.placed_pods(workload).iter().any(|p| p["name"] == name)
}

/// The pods row: pods placed through a real containerd keep their workloads across an
/// upgrade from the oldest supported binary, a reload, SIGTERM + restart and kill -9 +
/// restart, with probe loops inside the pods throughout; after each the pods are still
/// placed, refusals name the pod, counters did not go back, and the annotated pod's
/// `deny` never opened.
#[test]
fn pods_placed_through_the_runtime_keep_their_workload_across_every_transition() {
    let _one = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let cg = TestCgroup::new();
    let mut c = Containerd::start();
    let mut d = Daemon::start_with(&upgrade::old_binary(), &pods_config(&cg, &c, ""));
    let (gh, gh_ns) = placed_pod(
        &mut c,
        &cg,
        "pod-gh",
        PodSpec {
            namespace: "mcp",
            name: "github-mcp-a",
            labels: &[("app.kubernetes.io/name", "github-mcp")],
            annotations: &[],
            cgroup_parent: "",
        },
    );
    let (locked, locked_ns) = placed_pod(
        &mut c,
        &cg,
        "pod-locked",
        PodSpec {
            namespace: "tools",
            name: "sandboxed-mcp",
            labels: &[],
            annotations: &[("mcp-guard.dev/workload", "locked")],
            cgroup_parent: "",
        },
    );
    assert!(
        wait_until(Duration::from_secs(10), || pod_registered(
            &d,
            "github-mcp",
            "github-mcp-a"
        ) && pod_registered(
            &d,
            "locked",
            "sandboxed-mcp"
        )),
        "both pods placed: {}",
        d.status()
    );
    let mut generation = 0;
    for t in [
        Transition::Upgrade,
        Transition::Reload,
        Transition::Restart,
        Transition::Kill9,
    ] {
        let denied_before = sum(
            &d,
            "mcp_guard_denied_flows_total",
            "workload=\"github-mcp\"",
        );
        let loops = vec![
            start_loop(&gh, &gh_ns, PUBLIC, 80, true),
            start_loop(&gh, &gh_ns, METADATA, 80, false),
            start_loop(&gh, &gh_ns, MCP_DB, 80, false),
            start_loop(&locked, &locked_ns, PUBLIC, 80, false),
            start_loop(&locked, &locked_ns, METADATA, 80, false),
        ];
        std::thread::sleep(Duration::from_millis(1000));
        generation += 1;
        transition(
            &mut d,
            t,
            &pods_config(
                &cg,
                &c,
                &format!(
                    "[[workload.allow]]\ncidr = \"198.51.{generation}.0/24\"\nports = [443]\n"
                ),
            ),
        );
        for l in loops {
            check_loop(l);
        }
        // Listed again before the daemon said ready (a restart lists pods first).
        assert!(
            pod_registered(&d, "github-mcp", "github-mcp-a")
                && pod_registered(&d, "locked", "sandboxed-mcp"),
            "{t:?}: the pods lost their workloads: {}",
            d.status()
        );
        let mut p = Probe::at(PROBE, &gh, &gh_ns);
        assert_eq!(p.op(&format!("tcp {MCP_DB} 80")), "EPERM", "{t:?}");
        let events = d.events(Duration::from_millis(800));
        assert!(
            events.iter().any(|e| e["workload"] == "github-mcp"
                && e["pod"]["name"] == "github-mcp-a"
                && e["pod"]["namespace"] == "mcp"
                && e["dst"].as_str().unwrap_or_default().starts_with(MCP_DB)),
            "{t:?}: the refusal names the pod: {events:?}"
        );
        let denied_after = sum(
            &d,
            "mcp_guard_denied_flows_total",
            "workload=\"github-mcp\"",
        );
        assert!(
            denied_after >= denied_before + 50.0,
            "{t:?}: denied flows of github-mcp went from {denied_before} to {denied_after}"
        );
    }
}
