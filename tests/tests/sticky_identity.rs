//! Sticky identity: a guarded process that leaves its workload's cgroup keeps its
//! workload's policy, and so do its children, until they exit. The attacker here is a
//! root process with every capability (no `exec` hardening), so it can write any
//! `cgroup.procs`; the kernel lets the move happen and then judges the process by the
//! workload it left (wherever it went, another workload too), reports the move as an
//! event (hook cgroup_attach, reason left-workload) and counts it.
//!
//! The daemon's programs are attached at the test's cgroup (never the host's root, which
//! would put every process of the machine under them): "the root" below is that attach
//! cgroup, where a process is judged by no workload. With the default
//! `attach_cgroup = "/"` the host's root cgroup is exactly that case. Every address is
//! on the test's own network namespace; nothing leaves the machine.

use std::time::Duration;

use mcp_guard_tests::{in_cgroup, wait_until, Daemon, NetNs, Probe, TestCgroup};

const PROBE: &str = env!("CARGO_BIN_EXE_mcpg-probe");

fn network() -> NetNs {
    let ns = NetNs::new();
    for a in ["169.254.169.254", "10.0.13.5", "93.184.216.34"] {
        ns.add_addr(a);
    }
    ns.listen_tcp("169.254.169.254:80");
    ns.listen_tcp("10.0.13.5:5432");
    ns.listen_tcp("93.184.216.34:443");
    ns
}

fn config(r: &str, extra: &str) -> String {
    format!(
        "[[workload]]\nname = \"w\"\ncgroup = \"{r}/w\"\ndefault = \"deny-internal\"\n{extra}[daemon]\nattach_cgroup = \"{r}\"\n[tc]\nenabled = false\n[events]\nrate_limit_per_sec = 0\n"
    )
}

/// The sticky-identity tracepoints run (a kernel that refuses one says why in the log).
fn tracepoints_attached(d: &Daemon) {
    let metrics = d.get("/metrics");
    for hook in ["task_newtask", "sched_process_exit", "cgroup_attach_task"] {
        assert!(
            metrics.contains(&format!("mcp_guard_programs_attached{{hook=\"{hook}\"}} 1")),
            "{hook} not attached; daemon log:\n{}",
            d.stderr.lock().unwrap()
        );
    }
}

fn left_counter(d: &Daemon, workload: &str) -> u64 {
    let want = format!("mcp_guard_processes_left_workload_total{{workload=\"{workload}\"}} ");
    d.get("/metrics")
        .lines()
        .find_map(|l| l.strip_prefix(want.as_str()))
        .map_or(0, |v| v.trim().parse().unwrap())
}

/// (hook, reason, workload) of every event within `wait`.
fn events(d: &Daemon, wait: Duration) -> Vec<(String, String, String, String)> {
    d.events(wait)
        .iter()
        .map(|e| {
            (
                e["hook"].as_str().unwrap_or("").to_string(),
                e["reason"].as_str().unwrap_or("").to_string(),
                e["workload"].as_str().unwrap_or("").to_string(),
                e["verdict"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

/// Asserts the probe, wherever it is now, is still judged as workload `w`
/// (deny-internal): metadata and internal refused, public allowed; children too.
fn still_guarded(p: &mut Probe, how: &str) {
    assert_eq!(p.op("tcp 169.254.169.254 80"), "EPERM", "{how}: metadata");
    assert_eq!(p.op("tcp 10.0.13.5 5432"), "EPERM", "{how}: internal");
    assert_eq!(p.op("tcp 93.184.216.34 443"), "OK", "{how}: public allowed");
    assert_eq!(
        p.op("fork-tcp 10.0.13.5 5432"),
        "EPERM",
        "{how}: a child it forks"
    );
    assert_eq!(p.op("socket raw4"), "EPERM", "{how}: raw socket");
}

/// Every way out of the cgroup a root process has: to the root, to an unguarded
/// sibling, a cgroup namespace of its own, a child created directly in another cgroup
/// (clone3 CLONE_INTO_CGROUP). Refused and reported each time; a process that was never
/// in the workload is untouched (the control).
#[test]
fn a_root_process_that_leaves_its_cgroup_keeps_its_workloads_policy() {
    let ns = network();
    let cg = TestCgroup::new();
    let (_, w) = cg.child("w");
    let (_, sibling) = cg.child("sibling");
    let d = Daemon::start(&config(&cg.rel, ""));
    tracepoints_attached(&d);
    let _ = d.events(Duration::from_millis(300));

    // Control: a process of the unguarded sibling reaches everything.
    let mut free = Probe::new(PROBE, &sibling, &ns);
    assert_eq!(free.op("tcp 10.0.13.5 5432"), "OK", "control");
    assert_eq!(free.op("tcp 169.254.169.254 80"), "OK", "control");

    // To the attach cgroup (the root of what the guard sees).
    let mut p = Probe::new(PROBE, &w, &ns);
    still_guarded(&mut p, "at home");
    assert_eq!(p.op(&format!("join-cgroup {}", cg.dir.display())), "OK");
    still_guarded(&mut p, "moved to the root");
    // To the unguarded sibling: where a fresh process is free, this one is not.
    assert_eq!(p.op(&format!("join-cgroup {}", sibling.display())), "OK");
    still_guarded(&mut p, "moved to an unguarded sibling");
    assert_eq!(
        free.op("tcp 10.0.13.5 5432"),
        "OK",
        "the sibling stays free"
    );
    // A cgroup namespace of its own changes what it sees, not where it is.
    assert_eq!(p.op("unshare-cgroupns"), "OK");
    still_guarded(&mut p, "in a new cgroup namespace");
    // Back home and out again: still one workload, still refused.
    assert_eq!(p.op(&format!("join-cgroup {}", w.display())), "OK");
    still_guarded(&mut p, "back home");

    // A child created directly in the sibling (never in the workload's cgroup).
    let mut q = Probe::new(PROBE, &w, &ns);
    assert_eq!(
        q.op(&format!(
            "clone-into-tcp {} 10.0.13.5 5432",
            sibling.display()
        )),
        "EPERM",
        "clone3 CLONE_INTO_CGROUP"
    );
    assert_eq!(
        free.op(&format!(
            "clone-into-tcp {} 10.0.13.5 5432",
            sibling.display()
        )),
        "OK",
        "control: the same from a free process"
    );

    // The same escape by software nobody here wrote: a shell started in the workload
    // writes its own pid into the sibling's cgroup.procs and execs curl. The control is
    // the same command started in the sibling.
    ns.serve_tcp(
        "10.0.13.5:8080",
        "HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
    );
    let escape_then_curl = |start: &std::path::Path| {
        let out = in_cgroup(start, &ns)
            .args([
                "sh",
                "-c",
                &format!(
                    "echo $$ > {}/cgroup.procs && exec curl -s -o /dev/null -w '%{{http_code}}' -m 3 http://10.0.13.5:8080/",
                    sibling.display()
                ),
            ])
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    assert_eq!(
        escape_then_curl(&sibling),
        (Some(0), "200".to_string()),
        "control: curl from the sibling"
    );
    let (code, _) = escape_then_curl(&w);
    assert_eq!(
        code,
        Some(7),
        "curl after the shell left the workload: connection refused (EPERM)"
    );

    // Reported: each move out (three: the probe twice, the shell once), nothing for the
    // way back in.
    let ev = events(&d, Duration::from_secs(2));
    let moves: Vec<_> = ev.iter().filter(|e| e.0 == "cgroup_attach").collect();
    assert_eq!(moves.len(), 3, "{ev:#?}");
    for m in &moves {
        assert_eq!(
            (m.1.as_str(), m.2.as_str(), m.3.as_str()),
            ("left-workload", "w", "contained")
        );
    }
    assert!(
        ev.iter()
            .any(|e| e.0 == "connect4" && e.1 == "deny-internal" && e.2 == "w"),
        "refusals after the move name the workload: {ev:#?}"
    );
    assert!(wait_until(Duration::from_secs(3), || left_counter(&d, "w") == 3));
    // `mcp-guard status` says it too, for people and for scripts.
    let status = |json: bool| {
        let mut c = std::process::Command::new(mcp_guard_tests::guard_bin());
        c.args(["status", "--socket"]).arg(&d.control);
        if json {
            c.arg("--json");
        }
        let out = c.output().unwrap();
        assert_eq!(out.status.code(), Some(0), "ready: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let doc: serde_json::Value = serde_json::from_str(&status(true)).unwrap();
    assert_eq!(doc["ready"], true, "{doc:#}");
    assert_eq!(doc["programs"]["cgroup_attach_task"], true, "{doc:#}");
    let w = &doc["workloads"][0];
    assert_eq!(
        (w["name"].as_str(), w["left_workload"].as_u64()),
        (Some("w"), Some(3)),
        "{doc:#}"
    );
    assert!(w["denied_flows"].as_u64().unwrap() > 0, "{doc:#}");
    let text = status(false);
    assert!(
        text.contains("ready") && text.contains("3 process(es) left its cgroup"),
        "{text}"
    );
    assert!(d.stop());
}

/// Moving into another workload changes nothing: a process is judged by the workload
/// it left, for life. Home `w` denies internal addresses and allows the public one;
/// `open` (where it goes) allows the internal one and denies everything else. The moved
/// process keeps `w`'s answers on both, where a process started in `open` gets `open`'s.
#[test]
fn a_process_that_moves_into_another_workload_keeps_the_one_it_left() {
    let ns = network();
    let cg = TestCgroup::new();
    let (_, w) = cg.child("w");
    let (_, open) = cg.child("open");
    let d = Daemon::start(&config(
        &cg.rel,
        &format!(
            "[[workload]]\nname = \"open\"\ncgroup = \"{}/open\"\ndefault = \"deny\"\n[[workload.allow]]\ncidr = \"10.0.13.5/32\"\n",
            cg.rel
        ),
    ));
    tracepoints_attached(&d);
    let mut fresh = Probe::new(PROBE, &open, &ns);
    assert_eq!(fresh.op("tcp 10.0.13.5 5432"), "OK", "open allows internal");
    assert_eq!(
        fresh.op("tcp 93.184.216.34 443"),
        "EPERM",
        "open denies public"
    );
    let mut p = Probe::new(PROBE, &w, &ns);
    assert_eq!(p.op(&format!("join-cgroup {}", open.display())), "OK");
    assert_eq!(
        p.op("tcp 10.0.13.5 5432"),
        "EPERM",
        "its home refuses internal"
    );
    assert_eq!(
        p.op("tcp 93.184.216.34 443"),
        "OK",
        "its home allows public"
    );
    assert_eq!(p.op("tcp 169.254.169.254 80"), "EPERM");
    let ev = events(&d, Duration::from_secs(2));
    assert!(
        ev.iter().any(|e| e.0 == "cgroup_attach" && e.2 == "w"),
        "{ev:#?}"
    );
    assert!(
        ev.iter()
            .any(|e| e.0 == "connect4" && e.1 == "deny-internal" && e.2 == "w"),
        "the refusal names the workload it left: {ev:#?}"
    );
    assert!(d.stop());
}

/// Homes outlive the daemon and predate it: a process started in the workload before
/// the daemon ever ran is found by the daemon's scan; a process that left while the
/// daemon was killed with SIGKILL is still judged by the kernel, and after a restart.
#[test]
fn homes_predate_the_daemon_and_survive_kill_9_and_restart() {
    let ns = network();
    let cg = TestCgroup::new();
    let (_, w) = cg.child("w");
    let (_, sibling) = cg.child("sibling");
    // Started before any daemon: no tracepoint saw it arrive.
    let mut early = Probe::new(PROBE, &w, &ns);
    let mut d = Daemon::start(&config(&cg.rel, ""));
    tracepoints_attached(&d);
    let seeded = d
        .get("/metrics")
        .lines()
        .find_map(|l| l.strip_prefix("mcp_guard_homes_seeded_total "))
        .map_or(0, |v| v.trim().parse::<u64>().unwrap());
    assert!(seeded >= 1, "the early process was given its home");
    assert_eq!(
        early.op(&format!("join-cgroup {}", sibling.display())),
        "OK"
    );
    still_guarded(&mut early, "started before the daemon, then left");

    let mut late = Probe::new(PROBE, &w, &ns);
    d.kill9();
    // No daemon at all: the kernel alone.
    assert_eq!(late.op(&format!("join-cgroup {}", cg.dir.display())), "OK");
    still_guarded(&mut late, "left while the daemon was down");
    d.restart();
    still_guarded(&mut late, "after the restart");
    still_guarded(&mut early, "after the restart");
    // A reload changes the workload's policy: the moved processes follow it.
    d.write_config(&config(&cg.rel, "").replace("deny-internal", "deny"));
    assert!(wait_until(Duration::from_secs(10), || late
        .op("tcp 93.184.216.34 443")
        == "EPERM"));
    assert_eq!(early.op("tcp 93.184.216.34 443"), "EPERM");
    assert!(d.stop());
}
