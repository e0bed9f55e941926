//! Denied-flow events from the real kernel: every field, the schema, the counting
//! invariant under 100,000 denials, and `mcp-guard events` following a live daemon.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use mcp_guard_tests::{guard_bin, wait_until, Daemon, NetNs, Probe, TestCgroup};

const PROBE: &str = env!("CARGO_BIN_EXE_mcpg-probe");
const POD_UID: &str = "0a1b2c3d-4e5f-6789-abcd-ef0123456789";
const CONTAINER: &str = "4f3c8d2e9a1b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d";

fn schema() -> jsonschema::Validator {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../mcp-guard/schema/event-v1.schema.json"
    ))
    .unwrap();
    jsonschema::validator_for(&serde_json::from_str(&text).unwrap()).expect("schema compiles")
}

fn assert_valid(v: &jsonschema::Validator, e: &serde_json::Value) {
    let errors: Vec<String> = v
        .iter_errors(e)
        .map(|err| format!("{err} at {}", err.instance_path))
        .collect();
    assert!(
        errors.is_empty(),
        "event does not match the schema: {errors:#?}\n{e:#}"
    );
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find(|l| l.split([' ', '{']).next() == Some(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("{name} missing:\n{text}")) as u64
}

fn lab() -> NetNs {
    let ns = NetNs::new();
    for a in ["169.254.169.254", "10.0.12.5"] {
        ns.add_addr(a);
    }
    ns
}

#[test]
fn every_field_appears_in_a_real_event() {
    let ns = lab();
    let cg = TestCgroup::new();
    let (_, svc) = cg.child("mcp.slice/github-mcp.service");
    let pod = format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{CONTAINER}.scope", POD_UID.replace('-', "_"));
    let (_, container) = cg.child(&pod);
    let config = format!(
        "[[workload]]\nname = \"github-mcp\"\ncgroup = \"{r}/mcp.slice/github-mcp.service\"\n[[workload]]\nname = \"pods\"\ncgroup = \"{r}/kubepods.slice\"\n[daemon]\nattach_cgroup = \"{r}\"\n[events]\ncmdline = \"sink\"\n",
        r = cg.rel
    );
    let d = Daemon::start(&config);
    let mut p = Probe::new(PROBE, &svc, &ns);
    assert_eq!(p.op("tcp-from 169.254.169.254 80 10.0.12.5"), "EPERM");
    let mut c = Probe::new(PROBE, &container, &ns);
    assert_eq!(c.op("udp-sendto 169.254.169.254 53"), "EPERM");

    let mut events = Vec::new();
    assert!(wait_until(Duration::from_secs(5), || {
        events.extend(d.events(Duration::from_millis(100)));
        events.len() >= 2
    }));
    let v = schema();
    for e in &events {
        assert_valid(&v, e);
    }
    let e = &events[0];
    // Every field carries a real value from the kernel or the enrichment.
    assert_eq!(e["schema"], "mcp-guard.event/v1");
    assert_eq!(e["hook"], "connect4");
    assert_eq!(e["verdict"], "denied");
    assert_eq!(e["reason"], "baseline-metadata");
    assert_eq!(e["severity"], "critical", "metadata is the worst");
    assert_eq!(
        e["host"].as_str(),
        Some(
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .unwrap()
                .trim()
        ),
        "no NODE_NAME: the host name"
    );
    assert_eq!(e["rule_id"], 1);
    assert!(e["rule"]
        .as_str()
        .unwrap()
        .contains("baseline deny metadata"));
    assert_eq!(e["workload"], "github-mcp");
    assert!(e["workload_id"].as_u64().unwrap() >= 16);
    assert_eq!(
        e["cgroup"],
        format!("{}/mcp.slice/github-mcp.service", cg.rel)
    );
    assert_eq!(
        e["cgroup_id"].as_u64().unwrap(),
        std::fs::metadata(&svc)
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .unwrap()
    );
    assert_eq!(e["systemd_unit"], "github-mcp.service");
    assert!(e["pid"].as_u64().unwrap() > 0 && e["tgid"] == e["pid"]);
    assert_eq!((e["uid"].as_u64(), e["gid"].as_u64()), (Some(0), Some(0)));
    assert_eq!(e["comm"], "mcpg-probe");
    assert!(e["exe"].as_str().unwrap().ends_with("mcpg-probe"));
    assert!(e["cmdline"].as_str().unwrap().contains("--netns"));
    assert_eq!(
        (
            e["family"].as_str(),
            e["socket_family"].as_str(),
            e["proto"].as_str()
        ),
        (Some("ipv4"), Some("inet"), Some("tcp"))
    );
    assert_eq!(
        (e["dst"].as_str(), e["dport"].as_u64()),
        (Some("169.254.169.254"), Some(80))
    );
    assert_eq!(e["src"], "10.0.12.5", "bound source address");
    assert!(e["sport"].as_u64().unwrap() > 0, "bound source port");
    assert!(e["socket_cookie"].as_u64().unwrap() > 0);
    assert_eq!(e["dest_class"], "metadata");
    assert_eq!(e["suppressed"], 0);
    // The first install: one bump to announce the slot rewrite, one for the switch.
    assert_eq!(e["policy_generation"], 2);
    assert!(e["time"].as_str().unwrap().starts_with("20"));
    assert!(e["monotonic_ns"].as_u64().unwrap() > 0);

    let k = &events[1];
    assert_eq!(k["workload"], "pods");
    assert_eq!(k["hook"], "sendmsg4");
    assert_eq!(k["proto"], "udp");
    assert_eq!(k["pod_uid"], POD_UID);
    assert_eq!(k["container_id"], CONTAINER);
    assert_eq!(k["container_runtime"], "containerd");
}

fn flood(rate_limit: u32, sink: &str) {
    let ns = lab();
    let cg = TestCgroup::new();
    let (_, dir) = cg.child("w");
    let config = format!(
        "[[workload]]\nname = \"w\"\ncgroup = \"{r}/w\"\n[daemon]\nattach_cgroup = \"{r}\"\n[events]\nrate_limit_per_sec = {rate_limit}\nsink = \"{sink}\"\n",
        r = cg.rel
    );
    let d = Daemon::start(&config);
    let mut p = Probe::new(PROBE, &dir, &ns);
    // 100,000 denied attempts: 50,000 to one destination, 50,000 spread over 500 ports.
    assert_eq!(p.op("udp-flood 169.254.169.254 53 50000"), "DENIED 50000");
    let ops: Vec<String> = (0..500)
        .map(|i| format!("udp-flood 10.0.12.5 {} 100", 1000 + i))
        .collect();
    assert!(p.ops(&ops).iter().all(|r| r == "DENIED 100"));
    assert_eq!(d.get("/healthz"), "ok\n", "daemon stays responsive");

    let mut last = String::new();
    let exact = wait_until(Duration::from_secs(20), || {
        last = d.get("/metrics");
        let reported = metric(&last, "mcp_guard_events_reported_total");
        let delivered = metric(&last, "mcp_guard_events_delivered_total");
        let suppressed = metric(&last, "mcp_guard_events_suppressed_total");
        let lost = metric(&last, "mcp_guard_events_lost_total");
        reported == 100_000 && delivered + suppressed + lost == reported
    });
    assert!(
        exact,
        "invariant reported = delivered + suppressed + lost does not hold:\n{}",
        last.lines()
            .filter(|l| l.starts_with("mcp_guard_events"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let denied: u64 = last
        .lines()
        .filter(|l| l.starts_with("mcp_guard_denied_flows_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap() as u64)
        .sum();
    assert_eq!(denied, 100_000, "flow counters are exact");
    if rate_limit > 0 {
        let delivered = metric(&last, "mcp_guard_events_delivered_total");
        assert!(
            delivered < 100_000 / 2,
            "the rate limit suppressed most events ({delivered} delivered)"
        );
        assert!(metric(&last, "mcp_guard_events_suppressed_total") > 0);
    }
    let rss_kib: u64 = std::fs::read_to_string(format!("/proc/{}/status", d.pid()))
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix("VmRSS:")
                .map(|v| v.trim().trim_end_matches(" kB").parse().unwrap())
        })
        .unwrap();
    assert!(
        rss_kib < 128 * 1024,
        "daemon memory stays bounded: {rss_kib} KiB"
    );
}

#[test]
fn invariant_holds_for_100k_denials_rate_limited() {
    flood(100, "stdout");
}

#[test]
fn invariant_holds_for_100k_denials_unlimited() {
    flood(0, "none");
}

#[test]
fn events_command_follows_a_running_daemon() {
    let ns = lab();
    let cg = TestCgroup::new();
    let (_, dir) = cg.child("w");
    let config = format!(
        "[[workload]]\nname = \"w\"\ncgroup = \"{r}/w\"\n[daemon]\nattach_cgroup = \"{r}\"\n",
        r = cg.rel
    );
    let d = Daemon::start(&config);
    let follow = |args: &[&str]| {
        let mut child = Command::new(guard_bin())
            .args(["events", "--socket", d.control.to_str().unwrap()])
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, rx) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send((Instant::now(), l));
            }
        });
        (child, rx)
    };
    let (mut human, human_rx) = follow(&[]);
    let (mut json, json_rx) =
        follow(&["--json", "--workload", "w", "--reason", "baseline-metadata"]);
    let (mut other, other_rx) = follow(&["--json", "--workload", "someone-else"]);
    std::thread::sleep(Duration::from_millis(300)); // let the followers connect
    let mut p = Probe::new(PROBE, &dir, &ns);
    let denied_at = Instant::now();
    assert_eq!(p.op("tcp 169.254.169.254 80"), "EPERM");

    let (at, line) = json_rx
        .recv_timeout(Duration::from_secs(1))
        .expect("a JSON event within one second");
    assert!(at.duration_since(denied_at) < Duration::from_secs(1));
    let e: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(
        (e["workload"].as_str(), e["dst"].as_str()),
        (Some("w"), Some("169.254.169.254"))
    );
    let (_, line) = human_rx
        .recv_timeout(Duration::from_secs(1))
        .expect("a human-readable line within one second");
    assert!(
        line.contains("DENIED w")
            && line.contains("169.254.169.254:80/tcp")
            && line.contains("reason=baseline-metadata"),
        "{line}"
    );
    assert!(
        other_rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "--workload filters"
    );

    // --since replays what happened before the follower connected.
    let (mut late, late_rx) = follow(&["--json", "--since", "1m"]);
    let (_, line) = late_rx
        .recv_timeout(Duration::from_secs(2))
        .expect("replayed event");
    assert!(line.contains("169.254.169.254"), "{line}");
    for c in [&mut human, &mut json, &mut other, &mut late] {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// The file sink follows log rotation (the file moved away: the next events go to a new
/// file at the path, checked at most once a second, or at once after SIGHUP) and counts writes that
/// fail (a full disk: /dev/full) instead of dropping them silently.
#[test]
fn the_file_sink_follows_rotation_and_counts_failed_writes() {
    let ns = lab();
    let cg = TestCgroup::new();
    let (_, dir) = cg.child("w");
    let files = mcp_guard_tests::TempDir::new();
    let path = files.0.join("events.jsonl");
    let config = |file: &std::path::Path| {
        format!(
            "[[workload]]\nname = \"w\"\ncgroup = \"{r}/w\"\n[daemon]\nattach_cgroup = \"{r}\"\n[events]\nrate_limit_per_sec = 0\nsink = \"file\"\nfile = \"{f}\"\n",
            r = cg.rel,
            f = file.display()
        )
    };
    let d = Daemon::start(&config(&path));
    let mut p = Probe::new(PROBE, &dir, &ns);
    let lines = |f: &std::path::Path| {
        std::fs::read_to_string(f)
            .map(|t| t.lines().count())
            .unwrap_or(0)
    };
    assert_eq!(p.op("tcp 169.254.169.254 80"), "EPERM");
    assert!(wait_until(Duration::from_secs(5), || lines(&path) == 1));
    // By default command lines stay on the root-only control socket.
    let first: serde_json::Value =
        serde_json::from_str(std::fs::read_to_string(&path).unwrap().trim()).unwrap();
    assert!(first["cmdline"].is_null(), "{first}");
    let mut followed = std::process::Command::new(guard_bin())
        .args(["events", "--json", "--since", "1m", "--socket"])
        .arg(&d.control)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut reader = std::io::BufReader::new(followed.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut reader, &mut line).unwrap();
    let _ = followed.kill();
    let _ = followed.wait();
    let streamed: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert!(
        streamed["cmdline"]
            .as_str()
            .is_some_and(|c| c.contains("mcpg-probe")),
        "{streamed}"
    );
    // logrotate's default: rename, then the writer must start a new file.
    let rotated = files.0.join("events.jsonl.1");
    std::fs::rename(&path, &rotated).unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(p.op("tcp 169.254.169.254 80"), "EPERM");
    assert!(
        wait_until(Duration::from_secs(5), || lines(&path) == 1),
        "no new file after rotation"
    );
    assert_eq!(lines(&rotated), 1, "nothing more in the rotated file");
    // logrotate's postrotate `kill -HUP`: the next event goes to a new file.
    std::fs::rename(&path, files.0.join("events.jsonl.2")).unwrap();
    d.signal(libc::SIGHUP);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(p.op("tcp 169.254.169.254 80"), "EPERM");
    assert!(wait_until(Duration::from_secs(5), || lines(&path) == 1));
    assert!(d.stop());

    // A sink that cannot take the events: each failed write is counted.
    let d = Daemon::start(&config(std::path::Path::new("/dev/full")));
    let mut p = Probe::new(PROBE, &dir, &ns);
    for _ in 0..3 {
        assert_eq!(p.op("tcp 169.254.169.254 80"), "EPERM");
    }
    assert!(
        wait_until(Duration::from_secs(5), || metric(
            &d.get("/metrics"),
            "mcp_guard_events_sink_errors_total"
        ) >= 1),
        "failed writes not counted"
    );
    assert!(d
        .stderr
        .lock()
        .unwrap()
        .contains("events not written to the sink"));
    assert!(d.stop());
}
