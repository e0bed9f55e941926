//! No window in time: a workload cgroup that is removed and created again is guarded
//! before any process can join it (the `cgroup:cgroup_mkdir` program), and state changed
//! behind the daemon's back (a deleted registration, a removed link pin) is repaired
//! within two seconds and counted.

use std::{
    io::Write as _,
    process::Command,
    time::{Duration, Instant},
};

use mcp_guard_tests::{wait_until, Daemon, NetNs, Probe, TestCgroup};

const PROBE: &str = env!("CARGO_BIN_EXE_mcpg-probe");

fn lab() -> NetNs {
    let ns = NetNs::new();
    ns.add_addr("169.254.169.254");
    ns.listen_tcp("169.254.169.254:80");
    ns
}

/// An exact workload and a pattern workload (`parent/prefix*`), both default
/// deny-internal under the metadata baseline.
fn config(cg: &TestCgroup, extra: &str) -> String {
    format!(
        "[baseline]\ndeny = [\"metadata\"]\n[[workload]]\nname = \"exact\"\ncgroup = \"{r}/exact-mcp\"\n[[workload]]\nname = \"pattern\"\ncgroup = \"{r}/pods/mcp-*\"\n[daemon]\nattach_cgroup = \"{r}\"\n{extra}",
        r = cg.rel
    )
}

fn metric(d: &Daemon, series: &str) -> f64 {
    d.get("/metrics")
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Runs the recreate race in the probe (which sits in a cgroup of no workload) and
/// returns its tally line.
fn race(driver: &mut Probe, dir: &std::path::Path, n: u32) -> String {
    driver.op(&format!(
        "recreate-race {} {n} 169.254.169.254:80",
        dir.display()
    ))
}

#[test]
fn recreated_workload_cgroups_are_guarded_before_anyone_joins() {
    let ns = lab();
    let cg = TestCgroup::new();
    let (_, driver_dir) = cg.child("driver");
    cg.child("pods");
    let d = Daemon::start(&config(&cg, ""));
    let mut driver = Probe::new(PROBE, &driver_dir, &ns);
    // The probe is in no workload: it reaches the address itself (the race can fail).
    assert_eq!(driver.op("tcp 169.254.169.254 80"), "OK");
    for dir in [cg.dir.join("exact-mcp"), cg.dir.join("pods/mcp-a1b2")] {
        let t = Instant::now();
        let tally = race(&mut driver, &dir, 1000);
        println!("{}: {tally} in {:?}", dir.display(), t.elapsed());
        assert_eq!(
            tally, "reached=0 refused=1000 other=0",
            "a process joined a re-created workload cgroup before its policy"
        );
    }
    // A sibling the pattern does not name stays untouched (the race reaches).
    let tally = race(&mut driver, &cg.dir.join("pods/other"), 5);
    assert_eq!(
        tally, "reached=5 refused=0 other=0",
        "not a workload cgroup"
    );
    assert_eq!(
        metric(&d, "mcp_guard_programs_attached{hook=\"cgroup_mkdir\"}"),
        1.0
    );
    assert!(d.stop());
}

/// The TCP listener and the control socket flooded with idle connections: a pattern
/// workload's cgroup re-created meanwhile is still guarded (registration needs no daemon
/// round trip), and both serve again afterwards.
#[test]
fn an_idle_connection_flood_changes_nothing() {
    let ns = lab();
    let cg = TestCgroup::new();
    let (_, driver_dir) = cg.child("driver");
    cg.child("pods");
    let d = Daemon::start(&config(&cg, ""));
    let idle: Vec<std::net::TcpStream> = (0..300)
        .filter_map(|_| std::net::TcpStream::connect(d.listen).ok())
        .collect();
    assert!(idle.len() >= 64, "flood: {} connections", idle.len());
    let idle_control: Vec<std::os::unix::net::UnixStream> = (0..300)
        .filter_map(|_| std::os::unix::net::UnixStream::connect(&d.control).ok())
        .collect();
    assert!(
        idle_control.len() >= 64,
        "control flood: {}",
        idle_control.len()
    );
    let mut driver = Probe::new(PROBE, &driver_dir, &ns);
    assert_eq!(
        race(&mut driver, &cg.dir.join("pods/mcp-flood"), 300),
        "reached=0 refused=300 other=0"
    );
    drop((idle, idle_control));
    // Once the idle clients are gone (or timed out), both answer again.
    assert!(d.get("/status").contains("\"workloads\""));
    assert!(d.stop());
}

fn bpftool(args: &[&str]) -> String {
    let out = Command::new("bpftool")
        .args(args)
        .output()
        .expect("bpftool");
    assert!(
        out.status.success(),
        "bpftool {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// CGROUPS_1 keys (as bpftool hex byte strings) registering `cgroup_id`.
fn registrations(d: &Daemon, cgroup_id: u64) -> Vec<Vec<String>> {
    let map = d.pin_dir.join("maps/CGROUPS_1");
    let v: serde_json::Value = serde_json::from_str(&bpftool(&[
        "-j",
        "map",
        "dump",
        "pinned",
        map.to_str().unwrap(),
    ]))
    .expect("bpftool JSON");
    let id = cgroup_id.to_le_bytes();
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let key: Vec<String> = e["key"]
                .as_array()?
                .iter()
                .filter_map(|b| b.as_str().map(str::to_string))
                .collect();
            let bytes: Vec<u8> = key
                .iter()
                .filter_map(|b| u8::from_str_radix(b.trim_start_matches("0x"), 16).ok())
                .collect();
            (bytes.len() == 16 && bytes[..8] == id).then_some(key)
        })
        .collect()
}

#[test]
fn tampering_is_repaired_within_two_seconds() {
    let ns = lab();
    let cg = TestCgroup::new();
    let (_, dir) = cg.child("exact-mcp");
    cg.child("pods");
    let id = mcp_guard::host::cgroup::id(
        &mcp_guard_tests::cgroup_mount(),
        &format!("{}/exact-mcp", cg.rel),
    )
    .expect("cgroup id");
    let d = Daemon::start(&config(&cg, ""));
    let mut p = Probe::new(PROBE, &dir, &ns);
    assert_eq!(p.op("tcp 169.254.169.254 80"), "EPERM");

    // A workload registration deleted from the pinned map.
    let keys = registrations(&d, id);
    assert!(!keys.is_empty(), "the workload cgroup is registered");
    let map = d.pin_dir.join("maps/CGROUPS_1");
    for k in &keys {
        let mut args = vec![
            "map",
            "delete",
            "pinned",
            map.to_str().unwrap(),
            "key",
            "hex",
        ];
        args.extend(k.iter().map(|b| b.trim_start_matches("0x")));
        bpftool(&args);
    }
    let t = Instant::now();
    assert!(
        wait_until(Duration::from_secs(2), || !registrations(&d, id).is_empty()),
        "the deleted registration was not restored within 2 s"
    );
    println!("registration restored after {:?}", t.elapsed());
    assert_eq!(p.op("tcp 169.254.169.254 80"), "EPERM");
    assert!(wait_until(Duration::from_secs(2), || metric(
        &d,
        "mcp_guard_state_repaired_total{what=\"cgroup\"}"
    ) >= 1.0));

    // The registration program's link pin removed (which detaches it).
    std::fs::remove_file(d.pin_dir.join("links/cgroup_mkdir")).expect("remove pin");
    assert!(
        wait_until(Duration::from_secs(2), || d
            .pin_dir
            .join("links/cgroup_mkdir")
            .exists()),
        "the registration link was not attached again within 2 s"
    );
    assert!(
        wait_until(Duration::from_secs(2), || metric(
            &d,
            "mcp_guard_state_repaired_total{what=\"link\"}"
        ) >= 1.0),
        "{}",
        d.stderr.lock().unwrap()
    );
    let mut driver = Probe::new(PROBE, &cg.child("driver").1, &ns);
    assert_eq!(
        race(&mut driver, &cg.dir.join("pods/mcp-after"), 50),
        "reached=0 refused=50 other=0",
        "registration at creation works again"
    );
    assert!(d.stop());
}

/// A TC link pin removed behind the daemon's back is attached again and counted.
#[test]
fn a_removed_tc_link_pin_is_reattached() {
    if !mcp_guard_tests::needs(
        "a_removed_tc_link_pin_is_reattached",
        mcp_guard_tests::Feature::Tcx,
        None,
    ) {
        return;
    }
    let vm = NetNs::new();
    let net = NetNs::new();
    vm.veth("vm0", &net, "net0");
    let cg = TestCgroup::new();
    cg.child("w");
    let d = Daemon::start(&format!(
        "[[workload]]\nname = \"w\"\ncgroup = \"{r}/w\"\n[daemon]\nattach_cgroup = \"{r}\"\n[tc]\nnetns = \"{ns}\"\ninterfaces = [\"vm*\"]\n",
        r = cg.rel,
        ns = vm.path().display()
    ));
    let pin = || {
        std::fs::read_dir(d.pin_dir.join("links"))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("tc-"))
    };
    assert!(wait_until(Duration::from_secs(3), || pin().is_some()));
    std::fs::remove_file(pin().unwrap()).expect("remove the TC pin");
    assert!(
        wait_until(Duration::from_secs(2), || pin().is_some()),
        "the TC link was not attached again within 2 s"
    );
    assert!(wait_until(Duration::from_secs(2), || metric(
        &d,
        "mcp_guard_state_repaired_total{what=\"tc_link\"}"
    ) >= 1.0));
    let _ = std::io::stdout().flush();
    assert!(d.stop());
}

fn as_nobody(args: &[&str]) -> std::process::Output {
    Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(mcp_guard_tests::guard_bin())
        .args(args)
        .output()
        .expect("setpriv")
}

/// The control plane (/status, /events, /dns) is a Unix socket only root can open; the
/// TCP listener serves metrics and health only. A configured group opens it too.
#[test]
fn the_control_plane_is_root_only() {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    let cg = TestCgroup::new();
    cg.child("exact-mcp");
    cg.child("pods");
    let d = Daemon::start(&config(&cg, ""));
    let meta = std::fs::metadata(&d.control).expect("control socket");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600, "mode");
    assert_eq!((meta.uid(), meta.gid()), (0, 0), "owner");
    assert!(
        d.get("/status").contains("\"workloads\""),
        "root reads /status"
    );
    for path in ["/status", "/events", "/dns"] {
        let e = d.get_tcp(path).expect_err("served on TCP");
        assert!(e.to_string().contains("404"), "{path} on TCP: {e}");
    }
    assert!(d
        .get_tcp("/metrics")
        .is_ok_and(|m| m.contains("mcp_guard_ready 1")));
    let out = as_nobody(&["events", "--socket", d.control.to_str().unwrap()]);
    assert!(!out.status.success(), "a non-root user followed /events");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(d.stop());

    // With control_group, members of that group may use it (mode 0660).
    let d = Daemon::start(&config(&cg, "control_group = \"65534\"\n"));
    let meta = std::fs::metadata(&d.control).expect("control socket");
    assert_eq!(
        meta.permissions().mode() & 0o777,
        0o660,
        "mode with a group"
    );
    assert_eq!(meta.gid(), 65534, "group");
    let mut child = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(mcp_guard_tests::guard_bin())
        .args([
            "events",
            "--since",
            "1h",
            "--socket",
            d.control.to_str().unwrap(),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("setpriv");
    // It follows the stream (runs until killed) instead of failing at once.
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        child.try_wait().expect("wait").is_none(),
        "a member of control_group could not follow /events"
    );
    let _ = child.kill();
    let _ = child.wait();
    assert!(d.stop());
}
