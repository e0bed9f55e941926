//! Fail closed: enforcement survives kill -9 and restarts, reloads are atomic, bad input
//! never weakens what runs, and uninstall leaves nothing behind.

use std::{
    process::Command,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use mcp_guard_tests::{guard_bin, wait_until, Daemon, NetNs, Probe, TestCgroup};

const PROBE: &str = env!("CARGO_BIN_EXE_mcpg-probe");

fn lab() -> NetNs {
    let ns = NetNs::new();
    for a in ["169.254.169.254", "10.0.12.5"] {
        ns.add_addr(a);
    }
    ns.listen_tcp("169.254.169.254:80");
    ns.listen_tcp("10.0.12.5:5432");
    ns
}

fn config(cg: &TestCgroup, extra: &str) -> String {
    format!(
        "[baseline]\ndeny = [\"metadata\"]\n[[workload]]\nname = \"w\"\ncgroup = \"{r}/w\"\n[[workload.allow]]\ncidr = \"10.0.12.0/24\"\nports = [5432]\n[daemon]\nattach_cgroup = \"{r}\"\n{extra}",
        r = cg.rel
    )
}

fn attached_count(cgroup: &std::path::Path, attach_type: &str) -> usize {
    let out = Command::new("bpftool")
        .args(["-j", "cgroup", "show"])
        .arg(cgroup)
        .output()
        .expect("bpftool");
    // A bpftool that fails must fail the test, not read as "nothing attached".
    assert!(
        out.status.success(),
        "bpftool cgroup show: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Nothing attached: bpftool prints nothing at all.
    if out.stdout.iter().all(u8::is_ascii_whitespace) {
        return 0;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool JSON");
    v.as_array().map_or(0, |a| {
        a.iter().filter(|p| p["attach_type"] == attach_type).count()
    })
}

fn metric(text: &str, line_prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(line_prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(-1.0)
}

#[test]
fn kill_9_never_opens_a_window_and_restart_adopts() {
    let ns = lab();
    let cg = TestCgroup::new();
    let (_, dir) = cg.child("w");
    let mut d = Daemon::start(&config(&cg, "on_exit = \"keep\"\n"));
    let attacker = {
        let (dir, ns_path) = (dir.clone(), ns.path());
        std::thread::spawn(move || {
            let mut p = Probe::at(PROBE, &dir, &ns_path);
            p.op("tcp-loop 169.254.169.254 80 3000")
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    d.kill9();
    std::thread::sleep(Duration::from_millis(1000)); // the daemon is down
    d.restart();
    let result = attacker.join().unwrap();
    let f: Vec<&str> = result.split_whitespace().collect();
    let (allowed, denied): (u64, u64) = (f[1].parse().unwrap(), f[3].parse().unwrap());
    assert_eq!(
        allowed, 0,
        "an attempt got through while the daemon was down or restarting: {result}"
    );
    assert!(denied > 100, "the workload kept trying: {result}");

    let log = d.stderr.lock().unwrap().clone();
    assert!(
        log.contains("adopted pinned state from a previous daemon"),
        "{log}"
    );
    let status = d.status();
    assert_eq!(
        status["adopted"].as_array().unwrap().len(),
        7,
        "all seven cgroup links adopted (connect4/6, sendmsg4/6, sock_create, cgroup_skb, sock_ops): {status}"
    );
    for t in [
        "cgroup_inet4_connect",
        "cgroup_inet6_connect",
        "cgroup_udp4_sendmsg",
        "cgroup_udp6_sendmsg",
        "cgroup_inet_sock_create",
        "cgroup_inet_egress",
    ] {
        assert_eq!(
            attached_count(&cg.dir, t),
            1,
            "exactly one {t} program attached (no second attachment)"
        );
    }
    assert!(
        status["generation"].as_u64().unwrap() >= 2,
        "the restarted daemon switched in its policy: {status}"
    );
    let mut p = Probe::new(PROBE, &dir, &ns);
    assert_eq!(
        p.op("tcp 10.0.12.5 5432"),
        "OK",
        "allows still work after adoption"
    );
}

/// The ids of the programs and maps a daemon reports in /status.
fn kernel_objects(d: &Daemon) -> (Vec<u64>, Vec<u64>) {
    let status = d.status();
    let progs = status["programs"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .collect();
    let maps = status["maps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    (progs, maps)
}

/// Whether the kernel no longer knows any of these programs and maps (bpftool by id).
fn all_gone(progs: &[u64], maps: &[u64]) -> bool {
    let exists = |kind: &str, id: &u64| {
        Command::new("bpftool")
            .args([kind, "show", "id", &id.to_string()])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    !progs.iter().any(|id| exists("prog", id)) && !maps.iter().any(|id| exists("map", id))
}

#[test]
fn keep_on_exit_then_uninstall_leaves_nothing() {
    let ns = lab();
    let cg = TestCgroup::new();
    let (_, dir) = cg.child("w");
    let mut d = Daemon::start(&config(&cg, "on_exit = \"keep\"\n"));
    let (progs, maps) = kernel_objects(&d);
    // The cgroup unix hooks where the kernel has them (6.7+).
    let unix = if mcp_guard_tests::kernel_at_least(6, 7) {
        2
    } else {
        0
    };
    assert_eq!(
        progs.len(),
        7 + unix,
        "connect4/6, sendmsg4/6, sock_create, cgroup_skb, sock_ops (connect_unix, sendmsg_unix)"
    );
    assert!(maps.len() >= 8, "{maps:?}");
    assert!(d.terminate());
    assert!(d
        .stderr
        .lock()
        .unwrap()
        .contains("enforcement stays attached"));
    let mut p = Probe::new(PROBE, &dir, &ns);
    assert_eq!(
        p.op("tcp 169.254.169.254 80"),
        "EPERM",
        "still enforced with the daemon stopped"
    );

    let out = Command::new(guard_bin())
        .args(["uninstall", "--pin-dir"])
        .arg(&d.pin_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        p.op("tcp 169.254.169.254 80"),
        "OK",
        "uninstall detached the programs"
    );
    assert!(!d.pin_dir.exists());
    // No program or map of ours is left in the kernel.
    let gone = wait_until(Duration::from_secs(5), || all_gone(&progs, &maps));
    assert!(
        gone,
        "programs {progs:?} or maps {maps:?} still loaded after uninstall"
    );
}

#[test]
fn detach_on_exit_leaves_nothing() {
    let cg = TestCgroup::new();
    cg.child("w");
    let mut d = Daemon::start(&config(&cg, "on_exit = \"detach\"\n"));
    let (progs, maps) = kernel_objects(&d);
    assert!(d.terminate());
    assert!(!d.pin_dir.exists(), "pins removed");
    let gone = wait_until(Duration::from_secs(5), || all_gone(&progs, &maps));
    assert!(gone, "programs {progs:?} or maps {maps:?} still loaded");
}

/// 100 reloads rotating three policies while a guarded workload makes well over
/// a million decisions: none is inconsistent with both policies.
#[test]
fn reloads_are_atomic() {
    let ns = NetNs::new();
    let cg = TestCgroup::new();
    let (_, dir) = cg.child("w");
    // Three policies in rotation, so every reload rewrites a slot holding a different
    // policy (keys deleted, not only overwritten). X: allowed by A only; Y: by B only;
    // W: by all; Z: by none (C allows 10.0.5.0/24, probed by nobody).
    let policy = |allowed: &str| {
        format!(
            "[[workload]]\nname = \"w\"\ncgroup = \"{r}/w\"\ndefault = \"deny\"\n[[workload.allow]]\ncidr = \"{allowed}\"\n[[workload.allow]]\ncidr = \"10.0.4.0/24\"\n[daemon]\nattach_cgroup = \"{r}\"\n[events]\nsink = \"none\"\n",
            r = cg.rel
        )
    };
    let (a, b, c) = (
        policy("10.0.1.0/24"),
        policy("10.0.2.0/24"),
        policy("10.0.5.0/24"),
    );
    let d = Daemon::start(&a);
    let done = Arc::new(AtomicBool::new(false));
    let decisions = Arc::new(AtomicU64::new(0));
    let prober = {
        let (done, decisions, dir, ns_path) =
            (done.clone(), decisions.clone(), dir.clone(), ns.path());
        std::thread::spawn(move || {
            let mut p = Probe::at(PROBE, &dir, &ns_path);
            let mut totals = [(0u64, 0u64); 4];
            while !done.load(Ordering::SeqCst) {
                let r = p.op("sendto-cycle 2500 9 10.0.1.1,10.0.2.1,10.0.3.1,10.0.4.1");
                assert!(
                    !r.contains("OTHER"),
                    "sendto failed with errors that are neither a verdict nor routing: {r}"
                );
                for (i, part) in r.split_whitespace().enumerate() {
                    let (ok, no) = part.split_once('=').unwrap().1.split_once('/').unwrap();
                    totals[i].0 += ok.parse::<u64>().unwrap();
                    totals[i].1 += no.parse::<u64>().unwrap();
                }
                decisions.fetch_add(10_000, Ordering::SeqCst);
            }
            totals
        })
    };
    let mut generation = d.status()["generation"].as_u64().unwrap();
    for i in 0..100 {
        d.write_config([&b, &c, &a][i % 3]);
        d.signal(libc::SIGHUP);
        assert!(
            wait_until(Duration::from_secs(5), || d.status()["generation"]
                .as_u64()
                .unwrap()
                > generation),
            "reload {i} did not switch the policy"
        );
        generation = d.status()["generation"].as_u64().unwrap();
        // Let the workload make at least 10,000 decisions under this policy.
        let target = decisions.load(Ordering::SeqCst) + 10_000;
        assert!(wait_until(Duration::from_secs(10), || decisions
            .load(Ordering::SeqCst)
            >= target));
    }
    done.store(true, Ordering::SeqCst);
    let totals = prober.join().unwrap();
    let total: u64 = totals.iter().map(|(a, b)| a + b).sum();
    assert!(total >= 1_000_000, "only {total} decisions probed");
    let [x, y, z, w] = totals;
    assert_eq!(
        z.0,
        0,
        "Z is allowed by neither policy but got through {} times; daemon log:\n{}",
        z.0,
        d.stderr
            .lock()
            .unwrap()
            .lines()
            .filter(|l| !l.contains("policy installed")
                && !l.contains("policy reloaded")
                && !l.contains("SIGHUP"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(
        w.1, 0,
        "W is allowed by both policies but was denied {} times",
        w.1
    );
    assert!(
        x.0 > 0 && x.1 > 0 && y.0 > 0 && y.1 > 0,
        "both policies were live at some point: X {x:?} Y {y:?}"
    );
    eprintln!("{total} decisions over 100 reloads: X {x:?} Y {y:?} Z {z:?} W {w:?}");
}

#[test]
fn an_invalid_config_at_reload_changes_nothing() {
    let ns = lab();
    let cg = TestCgroup::new();
    let (_, dir) = cg.child("w");
    let d = Daemon::start(&config(&cg, ""));
    let generation = d.status()["generation"].as_u64().unwrap();
    let mut p = Probe::new(PROBE, &dir, &ns);
    d.write_config(&config(&cg, "").replace("ports = [5432]", "ports = [0]"));
    d.signal(libc::SIGHUP);
    assert!(wait_until(Duration::from_secs(5), || d
        .stderr
        .lock()
        .unwrap()
        .contains("reload refused")));
    let log = d.stderr.lock().unwrap().clone();
    assert!(
        log.contains("config.toml:8:") && log.contains("1 to 65535"),
        "the log names file, line and problem: {log}"
    );
    assert_eq!(
        d.status()["generation"].as_u64().unwrap(),
        generation,
        "the policy was not switched"
    );
    assert!(wait_until(Duration::from_secs(3), || metric(
        &d.get("/metrics"),
        "mcp_guard_policy_reloads_total{result=\"failure\"}"
    ) >= 1.0));
    assert_eq!(p.op("tcp 169.254.169.254 80"), "EPERM");
    assert_eq!(
        p.op("tcp 10.0.12.5 5432"),
        "OK",
        "the old allow rule still applies"
    );
    assert_eq!(d.get("/readyz"), "ready\n");

    // A valid reload that also changes a start-only setting applies the policy and says
    // which setting waits for a restart.
    d.write_config(&format!(
        "{}\n[tc]\nenabled = false\ninterfaces = [\"eth*\"]\n",
        config(&cg, "")
    ));
    assert!(
        wait_until(Duration::from_secs(5), || d
            .stderr
            .lock()
            .unwrap()
            .contains("[tc] changed, which is read at start only")),
        "{}",
        d.stderr.lock().unwrap()
    );
}

#[test]
fn configmap_symlink_swap_reloads_and_a_deleted_config_keeps_the_policy() {
    let ns = lab();
    let cg = TestCgroup::new();
    let (_, dir) = cg.child("w");
    let d = Daemon::start(&config(&cg, ""));
    let generation = d.status()["generation"].as_u64().unwrap();
    // Lay the config out the way a Kubernetes ConfigMap volume does:
    // config.toml -> ..data/config.toml, ..data -> ..v1
    let base = d.config.parent().unwrap().to_path_buf();
    let text = std::fs::read_to_string(&d.config).unwrap();
    std::fs::create_dir(base.join("..v1")).unwrap();
    std::fs::write(base.join("..v1/config.toml"), &text).unwrap();
    std::os::unix::fs::symlink("..v1", base.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/config.toml", base.join("config.toml.tmp")).unwrap();
    std::fs::rename(base.join("config.toml.tmp"), &d.config).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        d.status()["generation"].as_u64().unwrap(),
        generation,
        "same content: no reload"
    );
    // The new version: 10.0.12.0/24 no longer allowed.
    std::fs::create_dir(base.join("..v2")).unwrap();
    std::fs::write(
        base.join("..v2/config.toml"),
        text.replace("10.0.12.0/24", "10.0.99.0/24"),
    )
    .unwrap();
    std::os::unix::fs::symlink("..v2", base.join("..data_tmp")).unwrap();
    std::fs::rename(base.join("..data_tmp"), base.join("..data")).unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || d.status()["generation"]
            .as_u64()
            .unwrap()
            > generation),
        "the swap was not picked up"
    );
    let mut p = Probe::new(PROBE, &dir, &ns);
    assert_eq!(
        p.op("tcp 10.0.12.5 5432"),
        "EPERM",
        "the new policy is live"
    );

    // The config disappears: the running policy stays, and it is reported.
    std::fs::remove_file(&d.config).unwrap();
    assert!(wait_until(Duration::from_secs(5), || d
        .stderr
        .lock()
        .unwrap()
        .contains("is gone or unreadable")));
    assert_eq!(p.op("tcp 169.254.169.254 80"), "EPERM");
    assert_eq!(d.get("/readyz"), "ready\n");
}

#[test]
fn a_workload_cgroup_removed_and_recreated_is_enforced_again() {
    let ns = lab();
    let cg = TestCgroup::new();
    let (_, dir) = cg.child("w");
    let d = Daemon::start(&config(&cg, ""));
    let first = d.status()["workloads"][0]["cgroup_id"].as_u64().unwrap();
    std::fs::remove_dir(&dir).unwrap();
    std::fs::create_dir(&dir).unwrap();
    assert!(wait_until(Duration::from_secs(3), || d.status()
        ["workloads"][0]["cgroup_id"]
        .as_u64()
        .is_some_and(|id| id != first)));
    let mut p = Probe::new(PROBE, &dir, &ns);
    assert_eq!(p.op("tcp 169.254.169.254 80"), "EPERM");
}

#[test]
fn a_taken_metrics_port_is_a_clear_error_and_attaches_nothing() {
    let cg = TestCgroup::new();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = mcp_guard_tests::TempDir::new();
    let pin_dir =
        std::path::PathBuf::from("/sys/fs/bpf").join(mcp_guard_tests::unique("mcpg-test"));
    let path = dir.0.join("config.toml");
    std::fs::write(
        &path,
        format!(
            "{}pin_dir = \"{}\"\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n",
            config(&cg, ""),
            pin_dir.display()
        ),
    )
    .unwrap();
    let out = Command::new(guard_bin())
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&format!("metrics.listen 127.0.0.1:{port} cannot be bound")),
        "{err}"
    );
    assert!(!pin_dir.join("links").exists(), "nothing was attached");
    assert_eq!(attached_count(&cg.dir, "cgroup_inet4_connect"), 0);
}

/// 10,000 workloads and 100,000 rules load and enforce.
#[test]
fn ten_thousand_workloads_and_a_hundred_thousand_rules() {
    let ns = lab();
    let cg = TestCgroup::new();
    let mut text = String::from("[baseline]\ndeny = [\"metadata\"]\n[events]\nsink = \"none\"\n");
    for w in 0..10_000u32 {
        text.push_str(&format!(
            "[[workload]]\nname = \"w{w}\"\ncgroup = \"{}/w{w}\"\ndefault = \"deny\"\n",
            cg.rel
        ));
        for r in 0..10u32 {
            let n = w * 10 + r;
            text.push_str(&format!(
                "[[workload.allow]]\ncidr = \"10.{}.{}.{}/32\"\nports = [5432]\n",
                (n >> 16) & 0xff,
                (n >> 8) & 0xff,
                n & 0xff
            ));
        }
    }
    text.push_str(&format!("[daemon]\nattach_cgroup = \"{}\"\n", cg.rel));
    let (_, w0) = cg.child("w0");
    let (_, w9999) = cg.child("w9999");
    let d = Daemon::start(&text);
    assert!(d.get("/metrics").contains("mcp_guard_workloads 10000"));
    let mut p = Probe::new(PROBE, &w0, &ns);
    assert_eq!(p.op("tcp 169.254.169.254 80"), "EPERM");
    // Allowed destinations have no route in the namespace: the kernel lets connect()
    // through to routing (ENETUNREACH) instead of refusing it (EPERM).
    assert_eq!(
        p.op("udp-connect 10.0.0.5 5432"),
        "ERR 101",
        "rule 5 of w0 allows"
    );
    assert_eq!(
        p.op("udp-connect 10.0.0.15 5432"),
        "EPERM",
        "a rule of w1, not w0"
    );
    let mut q = Probe::new(PROBE, &w9999, &ns);
    let last = 99_999u32;
    assert_eq!(
        q.op(&format!(
            "udp-connect 10.{}.{}.{} 5432",
            (last >> 16) & 0xff,
            (last >> 8) & 0xff,
            last & 0xff
        )),
        "ERR 101"
    );
    assert_eq!(
        q.op("udp-connect 10.0.0.5 5432"),
        "EPERM",
        "w0's rule does not apply to w9999"
    );
}

/// A config caught mid-write (here: truncated to nothing) is a valid TOML document that
/// guards nothing. It must never replace the running policy.
#[test]
fn an_empty_or_half_written_config_never_weakens_enforcement() {
    let ns = lab();
    let cg = TestCgroup::new();
    let (_, dir) = cg.child("w");
    let d = Daemon::start(&config(&cg, ""));
    let generation = d.status()["generation"].as_u64().unwrap();
    std::fs::write(&d.config, "").unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || d
            .stderr
            .lock()
            .unwrap()
            .contains("the config file is empty")),
        "{}",
        d.stderr.lock().unwrap()
    );
    d.signal(libc::SIGHUP);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        d.status()["generation"].as_u64().unwrap(),
        generation,
        "the policy was not switched"
    );
    let mut p = Probe::new(PROBE, &dir, &ns);
    assert_eq!(p.op("tcp 169.254.169.254 80"), "EPERM");
    assert_eq!(
        p.op("tcp 10.0.12.5 5433"),
        "EPERM",
        "deny-internal still applies"
    );
}

/// Pressure never turns into fail-open: a flood of idle connections on the daemon's
/// listener does not stop it from registering a pattern workload's re-created cgroup, and
/// a cgroup scan that fails (here: out of file descriptors) removes no registration.
#[test]
fn pressure_never_unregisters_a_workload() {
    let ns = lab();
    let cg = TestCgroup::new();
    let (_, pods) = cg.child("pods");
    let pod = pods.join("p1");
    std::fs::create_dir_all(&pod).unwrap();
    let d = Daemon::start(&format!(
        "[[workload]]\nname = \"pods\"\ncgroup = \"{r}/pods/*\"\ndefault = \"deny-internal\"\n[daemon]\nattach_cgroup = \"{r}\"\n[tc]\nenabled = false\n",
        r = cg.rel
    ));
    let registered = |d: &Daemon, dir: &std::path::Path| {
        use std::os::unix::fs::MetadataExt as _;
        let id = std::fs::metadata(dir).map(|m| m.ino()).unwrap_or(0);
        d.status()["workloads"][0]["cgroup_ids"]
            .as_array()
            .is_some_and(|a| a.iter().any(|v| v.as_u64() == Some(id)))
    };
    assert!(wait_until(Duration::from_secs(3), || registered(&d, &pod)));

    // 1,000 idle connections that never send a request (those past the kernel's accept
    // queue time out at once: the flood stays as deep as the kernel lets it).
    let flood: Vec<std::net::TcpStream> = (0..1_000)
        .filter_map(|_| {
            std::net::TcpStream::connect_timeout(&d.listen, Duration::from_millis(50)).ok()
        })
        .collect();
    assert!(flood.len() > 100, "the flood did not connect");
    std::fs::remove_dir(&pod).unwrap();
    std::fs::create_dir(&pod).unwrap();
    assert!(
        wait_until(Duration::from_secs(3), || {
            let mut p = Probe::new(PROBE, &pod, &ns);
            p.op("tcp 169.254.169.254 80") == "EPERM"
        }),
        "the re-created pod cgroup was not enforced under the flood"
    );
    drop(flood);
    assert!(wait_until(Duration::from_secs(10), || d
        .get("/healthz")
        .contains("ok")));

    // Out of file descriptors: every scan fails; the registration stays.
    let pid = d.pid().to_string();
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    let hard = std::fs::read_to_string(format!("/proc/{pid}/limits"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(4).map(str::to_string))
        .unwrap();
    // The soft limit only (raising a hard limit back is not allowed).
    let limit = |n: &str| {
        let st = Command::new("prlimit")
            .args(["--pid", &pid, &format!("--nofile={n}:{hard}")])
            .status()
            .expect("prlimit (util-linux)");
        assert!(st.success(), "prlimit failed");
    };
    // Below every descriptor number in use: each new one fails with EMFILE.
    let _ = open;
    limit("1");
    std::thread::sleep(Duration::from_millis(1_500));
    let mut p = Probe::new(PROBE, &pod, &ns);
    assert_eq!(
        p.op("tcp 169.254.169.254 80"),
        "EPERM",
        "unregistered by a failed scan"
    );
    assert!(
        registered_raw(&d.pin_dir, &pod),
        "registration removed by a failed scan"
    );
    limit(&hard);
    assert!(
        d.stderr.lock().unwrap().contains("cgroup scan incomplete"),
        "{}",
        d.stderr.lock().unwrap()
    );
    assert!(d.stop());
}

/// Whether the pinned live policy registers `dir` (read from the kernel's map: the
/// daemon's HTTP side may be starved in this test).
fn registered_raw(pin_dir: &std::path::Path, dir: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let id = std::fs::metadata(dir).map(|m| m.ino()).unwrap_or(0);
    let out = Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(pin_dir.join("maps/CGROUPS_1"))
        .output()
        .expect("bpftool");
    assert!(
        out.status.success(),
        "bpftool map dump: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool JSON");
    v.as_array().is_some_and(|a| {
        a.iter().any(|e| {
            let key: Vec<u64> = e["key"]
                .as_array()
                .map(|k| {
                    k.iter()
                        .filter_map(|b| {
                            u64::from_str_radix(b.as_str()?.trim_start_matches("0x"), 16).ok()
                        })
                        .collect()
                })
                .unwrap_or_default();
            key.len() >= 8
                && key[..8]
                    .iter()
                    .enumerate()
                    .fold(0u64, |acc, (i, b)| acc | (b << (8 * i)))
                    == id
        })
    })
}
