//! Unix sockets are egress: a guarded process that reaches a local deputy (a relay on a
//! Unix socket, the container runtime, the D-Bus system bus) gets an unguarded process
//! to connect for it. The cgroup AF_UNIX hooks (Linux 6.7+) judge every connect() and
//! every datagram sent to an AF_UNIX address, per workload: the built-in deputies and
//! `deny_unix` refused, or (`unix = "allow-listed"`) all but `allow_unix`. On an older
//! kernel the daemon says the hooks are missing (gauge 0, logged) and these tests check
//! exactly that.
//!
//! The sockets live in the test's temporary directory (and, for D-Bus, a private mount
//! namespace where the bus is at its real path); nothing here leaves the machine.

use std::{
    os::unix::net::{UnixDatagram, UnixListener},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use mcp_guard_tests::{
    kernel_at_least, needs, unique, wait_until, Daemon, Feature, NetNs, Probe, Running, TempDir,
    TestCgroup,
};

const PROBE: &str = env!("CARGO_BIN_EXE_mcpg-probe");

/// Whether the running kernel has the cgroup unix hooks.
fn hooks_expected() -> bool {
    kernel_at_least(6, 7)
}

fn gauge(d: &Daemon, name: &str) -> Option<String> {
    d.get("/metrics")
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")).map(str::to_string))
}

/// Local sockets a deputy would listen on: a stream path, an abstract name, a datagram
/// path and one more path the policy allows.
struct Sockets {
    dir: TempDir,
    abstract_name: String,
    _listeners: Vec<UnixListener>,
    _dgram: UnixDatagram,
}

impl Sockets {
    /// Abstract names belong to a network namespace: bound in `ns`, where the probes run.
    fn new(ns: &NetNs) -> Self {
        use std::os::{linux::net::SocketAddrExt as _, unix::net::SocketAddr};
        let dir = TempDir::new();
        let abstract_name = unique("mcpg-relay");
        let mut listeners = vec![
            UnixListener::bind(dir.0.join("relay.sock")).unwrap(),
            UnixListener::bind(dir.0.join("ok.sock")).unwrap(),
            UnixListener::bind(dir.0.join("other.sock")).unwrap(),
        ];
        let name = abstract_name.clone();
        listeners.push(ns.in_ns(move || {
            let a = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
            UnixListener::bind_addr(&a).unwrap()
        }));
        let dgram = UnixDatagram::bind(dir.0.join("dgram.sock")).unwrap();
        Self {
            dir,
            abstract_name,
            _listeners: listeners,
            _dgram: dgram,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.0.join(name)
    }
}

fn config(r: &str, s: &Sockets) -> String {
    format!(
        r#"[[workload]]
name = "w"
cgroup = "{r}/w"
default = "deny-internal"
deny_unix = ["{relay}", "@{abs}", "{dgram}"]

[[workload]]
name = "strict"
cgroup = "{r}/strict"
default = "deny-internal"
unix = "allow-listed"
allow_unix = ["{ok}"]

[daemon]
attach_cgroup = "{r}"
[tc]
enabled = false
[events]
rate_limit_per_sec = 0
"#,
        relay = s.path("relay.sock").display(),
        abs = s.abstract_name,
        dgram = s.path("dgram.sock").display(),
        ok = s.path("ok.sock").display(),
    )
}

const EPERM: &str = "ERR 1";

/// (hook, reason, workload, dst_path) of the AF_UNIX events among `ev`.
fn unix_tuples(ev: &[serde_json::Value]) -> Vec<(String, String, String, String)> {
    ev.iter()
        .filter(|e| e["family"] == "unix")
        .map(|e| {
            let f = |k: &str| e[k].as_str().unwrap_or("").to_string();
            (f("hook"), f("reason"), f("workload"), f("dst_path"))
        })
        .collect()
}

/// What judges AF_UNIX destinations here: the cgroup hooks (Linux 6.7+, by the
/// address written) and the BPF LSM programs (where BPF LSM runs, by the peer's bound
/// address). Read from the daemon, and checked against the kernel version.
struct Judges {
    cgroup: bool,
    lsm: bool,
}

impl Judges {
    fn of(d: &Daemon) -> Self {
        let m = d.get("/metrics");
        let attached =
            |h: &str| m.contains(&format!("mcp_guard_programs_attached{{hook=\"{h}\"}} 1"));
        let j = Self {
            cgroup: attached("connect_unix"),
            lsm: attached("unix_stream_connect") && attached("unix_may_send"),
        };
        assert_eq!(
            j.cgroup,
            hooks_expected(),
            "the cgroup unix hooks run exactly on 6.7+; log:\n{}",
            d.stderr.lock().unwrap()
        );
        // Where the kernel runs the BPF LSM program for packet sockets, it runs these too.
        assert_eq!(
            j.lsm,
            gauge(d, "mcp_guard_lsm_available").as_deref() == Some("1"),
            "the LSM unix programs run exactly where BPF LSM does; log:\n{}",
            d.stderr.lock().unwrap()
        );
        assert_eq!(
            gauge(d, "mcp_guard_unix_hooks_available").as_deref(),
            Some(if j.cgroup || j.lsm { "1" } else { "0" })
        );
        j
    }

    /// The hook that refuses a connect() (the cgroup hook comes first).
    fn connect(&self) -> &'static str {
        if self.cgroup {
            "connect_unix"
        } else {
            "unix_stream_connect"
        }
    }

    fn send(&self) -> &'static str {
        if self.cgroup {
            "sendmsg_unix"
        } else {
            "unix_may_send"
        }
    }
}

/// Refused paths and names, per workload, with events naming the path and the rule,
/// exact counters; a process that leaves the workload stays refused; a symlink to a
/// refused socket is refused where BPF LSM judges the bound address, and in the
/// allow-listed mode wherever the cgroup hook judges the name.
#[test]
fn unix_destinations_are_judged_per_workload() {
    let ns = NetNs::new();
    let cg = TestCgroup::new();
    let (_, w) = cg.child("w");
    let (_, strict) = cg.child("strict");
    let (_, free) = cg.child("free");
    let s = Sockets::new(&ns);
    let d = Daemon::start(&config(&cg.rel, &s));
    let j = Judges::of(&d);
    if !needs(
        "unix_destinations_are_judged_per_workload",
        Feature::UnixJudged,
        Some(&d),
    ) {
        assert!(d
            .stderr
            .lock()
            .unwrap()
            .contains("Unix-socket destinations are not judged"));
        let mut p = Probe::new(PROBE, &w, &ns);
        assert_eq!(
            p.op(&format!("unix {}", s.path("relay.sock").display())),
            "OK",
            "without the hooks the kernel judges nothing here (exec's mount namespace is what hides the deputies: below_sockets)"
        );
        return;
    }
    let _ = d.events(Duration::from_millis(300));
    let relay = s.path("relay.sock").display().to_string();
    let abs = format!("@{}", s.abstract_name);

    // Control: an unguarded process reaches everything.
    let mut f = Probe::new(PROBE, &free, &ns);
    for a in [&relay, &abs] {
        assert_eq!(f.op(&format!("unix {a}")), "OK", "control {a}");
    }
    assert_eq!(
        f.op(&format!("unix-dgram {}", s.path("dgram.sock").display())),
        "OK"
    );

    let mut p = Probe::new(PROBE, &w, &ns);
    assert_eq!(p.op(&format!("unix {relay}")), EPERM, "deny_unix path");
    assert_eq!(p.op(&format!("unix {abs}")), EPERM, "deny_unix abstract");
    assert_eq!(
        p.op(&format!("unix-dgram {}", s.path("dgram.sock").display())),
        EPERM,
        "sendto a denied datagram socket"
    );
    assert_eq!(
        p.op(&format!("unix {}", s.path("ok.sock").display())),
        "OK",
        "a path no rule names (deny-listed mode)"
    );

    let mut q = Probe::new(PROBE, &strict, &ns);
    assert_eq!(
        q.op(&format!("unix {}", s.path("ok.sock").display())),
        "OK",
        "allow_unix"
    );
    assert_eq!(
        q.op(&format!("unix {}", s.path("other.sock").display())),
        EPERM,
        "allow-listed: anything else"
    );
    // A symlink to the allowed socket is another name: the cgroup hook refuses the name
    // in the allow-listed mode; BPF LSM alone sees the socket it reaches, the allowed one.
    let link = s.path("link.sock");
    std::os::unix::fs::symlink(s.path("ok.sock"), &link).unwrap();
    assert_eq!(
        q.op(&format!("unix {}", link.display())),
        if j.cgroup { EPERM } else { "OK" },
        "symlink to the allowed socket"
    );
    assert_eq!(
        q.op(&format!("unix {abs}")),
        EPERM,
        "abstract, allow-listed"
    );

    // Leaving the workload's cgroup changes nothing (sticky identity).
    assert_eq!(p.op(&format!("join-cgroup {}", free.display())), "OK");
    assert_eq!(
        p.op(&format!("unix {relay}")),
        EPERM,
        "after leaving the cgroup"
    );

    let ev = d.events(Duration::from_secs(2));
    let unix = unix_tuples(&ev);
    let want = |hook: &str, reason: &str, wl: &str, path: &str| {
        (
            hook.to_string(),
            reason.to_string(),
            wl.to_string(),
            path.to_string(),
        )
    };
    let dgram = s.path("dgram.sock").display().to_string();
    let other = s.path("other.sock").display().to_string();
    let link = link.display().to_string();
    let (c, snd) = (j.connect(), j.send());
    let mut expected = vec![
        want(c, "unix-denied", "w", &relay),
        want(c, "unix-denied", "w", &abs),
        want(snd, "unix-denied", "w", &dgram),
        want(c, "unix-not-allowed", "strict", &other),
    ];
    if j.cgroup {
        expected.push(want(c, "unix-not-allowed", "strict", &link));
    }
    expected.push(want(c, "unix-not-allowed", "strict", &abs));
    expected.push(want(c, "unix-denied", "w", &relay));
    assert_eq!(unix, expected, "{ev:#?}");
    let first = ev.iter().find(|e| e["family"] == "unix").unwrap();
    assert_eq!(first["dest_class"], "local");
    assert_eq!(first["socket_family"], "unix");
    assert!(
        first["rule"]
            .as_str()
            .is_some_and(|r| r.contains("workload w deny unix") && r.contains(&relay)),
        "{first}"
    );
    let metrics = d.get("/metrics");
    let count = |hook: &str, reason: &str, wl: &str| -> u64 {
        metrics
            .lines()
            .filter(|l| {
                l.starts_with("mcp_guard_denied_flows_total{")
                    && l.contains(&format!("hook=\"{hook}\""))
                    && l.contains(&format!("reason=\"{reason}\""))
                    && l.contains(&format!("workload=\"{wl}\""))
                    && l.contains("family=\"unix\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    assert_eq!(count(c, "unix-denied", "w"), 3, "{metrics}");
    assert_eq!(count(snd, "unix-denied", "w"), 1);
    assert_eq!(
        count(c, "unix-not-allowed", "strict"),
        if j.cgroup { 3 } else { 2 }
    );

    // A symlink to a deny-listed socket: the cgroup hook sees a name no entry names;
    // BPF LSM sees the socket it resolves to (bound as relay.sock) and refuses it.
    let relay_link = s.path("relay-link.sock");
    std::os::unix::fs::symlink(&relay, &relay_link).unwrap();
    let mut r = Probe::new(PROBE, &w, &ns);
    let got = r.op(&format!("unix {}", relay_link.display()));
    if j.lsm {
        assert_eq!(got, EPERM, "symlink to a denied socket, BPF LSM");
        assert_eq!(
            unix_tuples(&d.events(Duration::from_secs(2))),
            vec![want("unix_stream_connect", "unix-denied", "w", &relay)]
        );
    } else {
        assert_eq!(
            got, "OK",
            "without BPF LSM a symlink is another name (docs/src/configuration.md: Unix sockets)"
        );
    }
}

/// The hooks and their rules outlive the daemon: killed (-9), nothing opens; restarted,
/// the pinned links are adopted; a reload that drops a rule opens exactly that path.
#[test]
fn unix_rules_survive_kill_and_restart_and_follow_reloads() {
    let ns = NetNs::new();
    let cg = TestCgroup::new();
    let (_, w) = cg.child("w");
    let s = Sockets::new(&ns);
    let mut d = Daemon::start(&config(&cg.rel, &s));
    let _ = Judges::of(&d);
    if !needs(
        "unix_rules_survive_kill_and_restart_and_follow_reloads",
        Feature::UnixJudged,
        Some(&d),
    ) {
        return;
    }
    let relay = s.path("relay.sock").display().to_string();
    let mut p = Probe::new(PROBE, &w, &ns);
    assert_eq!(p.op(&format!("unix {relay}")), EPERM);
    d.kill9();
    assert_eq!(p.op(&format!("unix {relay}")), EPERM, "daemon killed");
    let fresh = Probe::new(PROBE, &w, &ns).op(&format!("unix {relay}"));
    assert_eq!(fresh, EPERM, "a process started while the daemon is down");
    d.restart();
    assert!(
        d.stderr
            .lock()
            .unwrap()
            .matches("adopted the pinned link")
            .count()
            >= 2,
        "{}",
        d.stderr.lock().unwrap()
    );
    assert_eq!(p.op(&format!("unix {relay}")), EPERM, "after the restart");
    // Reload without the relay's rule: that path opens, the others stay refused.
    let cfg = config(&cg.rel, &s).replace(&format!("\"{relay}\", "), "");
    d.write_config(&cfg);
    d.signal(libc::SIGHUP);
    assert!(
        // Generous: under emulation (the kernel matrix without KVM) a reload is slow.
        wait_until(Duration::from_secs(60), || p.op(&format!("unix {relay}"))
            == "OK"),
        "reload opened the path; daemon log:\n{}",
        d.stderr.lock().unwrap()
    );
    assert_eq!(p.op(&format!("unix @{}", s.abstract_name)), EPERM);
}

/// The D-Bus system bus (Debian's dbus-daemon, at its real path in a private mount
/// namespace): what `systemd-run` talks to. A guarded dbus-send cannot reach it (the
/// built-in list); the same from an unguarded process, and from a workload whose
/// allow_unix names the bus, works.
#[test]
fn the_dbus_system_bus_is_a_refused_deputy() {
    let ns = NetNs::new();
    let cg = TestCgroup::new();
    let (_, w) = cg.child("w");
    let (_, bus_ok) = cg.child("bus-ok");
    let (_, free) = cg.child("free");
    let tmp = TempDir::new();
    // dbus-daemon in a mount namespace of its own with a tmpfs on /run.
    let ready = tmp.0.join("address");
    let mut c = Command::new("unshare");
    c.args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(
            "mount -t tmpfs mcpg-test /run && mkdir -p /run/dbus && \
             exec dbus-daemon --config-file=/usr/share/dbus-1/session.conf --nofork \
             --address=unix:path=/run/dbus/system_bus_socket --print-address=3 3>\"$0\"",
        )
        .arg(&ready);
    let bus = Running::spawn(&mut c, &tmp.0.join("dbus.log"));
    assert!(
        wait_until(Duration::from_secs(10), || std::fs::read_to_string(&ready)
            .is_ok_and(|a| a.contains("system_bus_socket"))),
        "dbus-daemon started: {}",
        std::fs::read_to_string(tmp.0.join("dbus.log")).unwrap_or_default()
    );
    // unshare execs sh, which execs dbus-daemon: one pid.
    let mnt = format!("--mount=/proc/{}/ns/mnt", bus.0.id());
    let d = Daemon::start(&format!(
        "[[workload]]\nname = \"w\"\ncgroup = \"{r}/w\"\n[[workload]]\nname = \"bus-ok\"\ncgroup = \"{r}/bus-ok\"\nallow_unix = [\"/run/dbus/system_bus_socket\"]\n[daemon]\nattach_cgroup = \"{r}\"\n[tc]\nenabled = false\n[events]\nrate_limit_per_sec = 0\n",
        r = cg.rel
    ));
    let _ = d.events(Duration::from_millis(300));
    let call = |dir: &Path| {
        let out = mcp_guard_tests::in_cgroup(dir, &ns)
            .args(["nsenter", &mnt, "dbus-send", "--system", "--print-reply"])
            .args([
                "--dest=org.freedesktop.DBus",
                "/org/freedesktop/DBus",
                "org.freedesktop.DBus.ListNames",
            ])
            .env(
                "DBUS_SYSTEM_BUS_ADDRESS",
                "unix:path=/run/dbus/system_bus_socket",
            )
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, text) = call(&free);
    assert!(
        ok && text.contains("org.freedesktop.DBus"),
        "control: {text}"
    );
    let (ok, text) = call(&bus_ok);
    assert!(ok, "allow_unix names the bus: {text}");
    let (ok, text) = call(&w);
    let j = Judges::of(&d);
    if !needs(
        "the_dbus_system_bus_is_a_refused_deputy",
        Feature::UnixJudged,
        Some(&d),
    ) {
        assert!(ok, "nothing judges Unix sockets on this kernel: {text}");
        return;
    }
    assert!(!ok, "guarded dbus-send reached the bus: {text}");
    assert!(text.contains("Operation not permitted"), "{text}");
    let ev = d.events(Duration::from_secs(2));
    assert!(
        ev.iter().any(|e| e["hook"] == j.connect()
            && e["workload"] == "w"
            && e["dst_path"] == "/run/dbus/system_bus_socket"
            && e["rule"]
                .as_str()
                .is_some_and(|r| r.starts_with("built-in deny unix /run/dbus/system_bus_socket"))
            && e["comm"] == "dbus-send"),
        "{ev:#?}"
    );
}

/// A relay a guarded process could use as its deputy: listens on a Unix socket (a path,
/// or `@name`) and pipes every connection to the metadata service. Python, unguarded,
/// in the test's network namespace.
const RELAY: &str = r#"
import socket, sys, threading
name = sys.argv[1]
s = socket.socket(socket.AF_UNIX)
s.bind("\0" + name[1:] if name.startswith("@") else name)
s.listen(8)
open(sys.argv[2], "w").close()
def pipe(a, b):
    while True:
        d = a.recv(65536)
        if not d:
            break
        b.sendall(d)
    b.shutdown(socket.SHUT_WR)
while True:
    c, _ = s.accept()
    u = socket.create_connection(("169.254.169.254", 80))
    threading.Thread(target=pipe, args=(c, u), daemon=True).start()
    threading.Thread(target=pipe, args=(u, c), daemon=True).start()
"#;

/// curl (software nobody here wrote) through a relay to the metadata service: an
/// unguarded curl gets the credentials page, a guarded one is refused at connect_unix
/// (the relay never hears from it), by path and by abstract name.
#[test]
fn a_relay_to_the_metadata_service_is_refused_at_connect_unix() {
    let ns = NetNs::new();
    ns.add_addr("169.254.169.254");
    ns.serve_tcp(
        "169.254.169.254:80",
        "HTTP/1.0 200 OK\r\nContent-Length: 11\r\n\r\ncredentials",
    );
    let cg = TestCgroup::new();
    let (_, w) = cg.child("w");
    let (_, free) = cg.child("free");
    let tmp = TempDir::new();
    let path = tmp.0.join("relay.sock").display().to_string();
    let abs = format!("@{}", unique("mcpg-md-relay"));
    let mut relays = Vec::new();
    for (i, name) in [&path, &abs].into_iter().enumerate() {
        let ready = tmp.0.join(format!("ready{i}"));
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", ns.path().display()))
            .args(["python3", "-c", RELAY, name])
            .arg(&ready);
        relays.push(Running::spawn(&mut c, &tmp.0.join(format!("relay{i}.log"))));
        assert!(
            wait_until(Duration::from_secs(10), || ready.exists()),
            "relay {name} started: {}",
            std::fs::read_to_string(tmp.0.join(format!("relay{i}.log"))).unwrap_or_default()
        );
    }
    let d = Daemon::start(&format!(
        "[[workload]]\nname = \"w\"\ncgroup = \"{r}/w\"\ndefault = \"deny-internal\"\ndeny_unix = [\"{path}\", \"{abs}\"]\n[daemon]\nattach_cgroup = \"{r}\"\n[tc]\nenabled = false\n[events]\nrate_limit_per_sec = 0\n",
        r = cg.rel
    ));
    let curl = |dir: &Path, via: &[&str]| {
        let out = mcp_guard_tests::in_cgroup(dir, &ns)
            .args(["curl", "-s", "-m", "5"])
            .args(via)
            .arg("http://169.254.169.254/latest/meta-data/")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let by_path = ["--unix-socket", path.as_str()];
    let by_name = ["--abstract-unix-socket", &abs[1..]];
    for via in [&by_path[..], &by_name[..]] {
        assert_eq!(
            curl(&free, via),
            (Some(0), "credentials".to_string()),
            "control: unguarded curl through the relay {via:?}"
        );
    }
    assert_eq!(curl(&w, &[]).0, Some(7), "guarded curl, directly");
    let j = Judges::of(&d);
    if !needs(
        "a_relay_to_the_metadata_service_is_refused_at_connect_unix",
        Feature::UnixJudged,
        Some(&d),
    ) {
        assert_eq!(
            curl(&w, &by_path),
            (Some(0), "credentials".to_string()),
            "with nothing judging Unix sockets the relay is a way out (docs/src/configuration.md: Unix sockets)"
        );
        return;
    }
    for via in [&by_path[..], &by_name[..]] {
        assert_eq!(
            curl(&w, via).0,
            Some(7),
            "guarded curl through the relay {via:?}: refused at connect_unix"
        );
    }
    let ev = d.events(Duration::from_secs(2));
    for p in [&path, &abs] {
        assert!(
            ev.iter().any(|e| e["hook"] == j.connect()
                && e["dst_path"] == p.as_str()
                && e["comm"] == "curl"),
            "{p}: {ev:#?}"
        );
    }
}
