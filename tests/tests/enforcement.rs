//! Socket-level enforcement, for real: the programs attached to a fresh cgroup, probes in
//! a fresh network namespace, and assertions on what the kernel answered.

use std::time::Duration;

use mcp_guard_tests::{wait_until, Daemon, NetNs, Probe, TestCgroup};

const PROBE: &str = env!("CARGO_BIN_EXE_mcpg-probe");

/// A namespace where the metadata service, an internal database, an internal cache, a
/// "public" API and a guarded internal subnet all live on `lo`, with listeners.
fn lab() -> NetNs {
    let ns = NetNs::new();
    for a in [
        "169.254.169.254",
        "10.0.12.5",
        "192.168.1.10",
        "93.184.216.34",
        "fd00:ec2::254",
        "2606:4700::10",
    ] {
        ns.add_addr(a);
    }
    for l in [
        "169.254.169.254:80",
        "10.0.12.5:5432",
        "10.0.12.5:5433",
        "192.168.1.10:6379",
        "93.184.216.34:443",
        "[fd00:ec2::254]:80",
        "[2606:4700::10]:443",
    ] {
        ns.listen_tcp(l);
    }
    ns
}

fn config(cg: &TestCgroup) -> String {
    format!(
        r#"
mode = "enforce"
[baseline]
deny = ["metadata"]
[[workload]]
name = "github-mcp"
cgroup = "{root}/github-mcp"
default = "deny-internal"
[[workload.allow]]
cidr = "10.0.12.0/24"
ports = [5432]
proto = "tcp"
[[workload]]
name = "dry-run-mcp"
cgroup = "{root}/dry-run-mcp"
mode = "audit"
[daemon]
attach_cgroup = "{root}"
[events]
rate_limit_per_sec = 0
"#,
        root = cg.rel
    )
}

#[test]
fn socket_hooks_enforce_the_policy() {
    let ns = lab();
    let cg = TestCgroup::new();
    let (_, guarded) = cg.child("github-mcp");
    let d = Daemon::start(&config(&cg));
    let mut p = Probe::new(PROBE, &guarded, &ns);

    // Metadata over IPv4, IPv6, IPv4-mapped IPv6, TCP Fast Open, connected and unconnected UDP.
    assert_eq!(
        p.op("tcp 169.254.169.254 80"),
        "EPERM",
        "metadata over IPv4"
    );
    assert_eq!(p.op("tcp fd00:ec2::254 80"), "EPERM", "metadata over IPv6");
    assert_eq!(
        p.op("tcp6-mapped 169.254.169.254 80"),
        "EPERM",
        "metadata over IPv4-mapped IPv6"
    );
    assert_eq!(
        p.op("tcp ::ffff:169.254.169.254 80"),
        "EPERM",
        "mapped address given directly"
    );
    assert_eq!(
        p.op("tcp-fastopen 169.254.169.254 80"),
        "EPERM",
        "TCP Fast Open"
    );
    assert_eq!(
        p.op("udp-connect 169.254.169.254 53"),
        "EPERM",
        "connected UDP"
    );
    assert_eq!(p.op("udp-sendto 169.254.169.254 53"), "EPERM", "UDP sendto");
    // Internal services: denied unless allowed.
    assert_eq!(p.op("tcp 192.168.1.10 6379"), "EPERM", "internal cache");
    assert_eq!(p.op("tcp 127.0.0.1 22"), "EPERM", "loopback is internal");
    // Allowed CIDR and port; wrong port and wrong protocol denied.
    assert_eq!(p.op("tcp 10.0.12.5 5432"), "OK", "allowed database");
    assert_eq!(p.op("tcp 10.0.12.5 5433"), "EPERM", "wrong port");
    assert_eq!(
        p.op("udp-sendto 10.0.12.5 5432"),
        "EPERM",
        "rule is tcp only"
    );
    // Global addresses are allowed under deny-internal.
    assert_eq!(p.op("tcp 93.184.216.34 443"), "OK", "public API");
    assert_eq!(p.op("tcp 2606:4700::10 443"), "OK", "public API over IPv6");
    // A forked child is enforced.
    assert_eq!(p.op("fork-tcp 169.254.169.254 80"), "EPERM", "forked child");

    // A child cgroup created after attach is enforced, with no reload.
    let (_, late) = cg.child("github-mcp/worker-started-later");
    let mut late_probe = Probe::new(PROBE, &late, &ns);
    assert_eq!(
        late_probe.op("tcp 169.254.169.254 80"),
        "EPERM",
        "child cgroup made after attach"
    );
    assert_eq!(
        late_probe.op("tcp 10.0.12.5 5432"),
        "OK",
        "child cgroup inherits allows"
    );

    // A process outside every workload is untouched.
    let (_, other) = cg.child("not-an-mcp-server");
    let mut outsider = Probe::new(PROBE, &other, &ns);
    assert_eq!(
        outsider.op("tcp 169.254.169.254 80"),
        "OK",
        "unguarded process"
    );
    assert_eq!(
        outsider.op("tcp 192.168.1.10 6379"),
        "OK",
        "unguarded process"
    );

    // Every denial is reported, with the workload, destination, port, protocol and reason.
    let mut events = Vec::new();
    assert!(
        wait_until(Duration::from_secs(5), || {
            events.extend(d.events(Duration::from_millis(100)));
            events.len() >= 13
        }),
        "expected 13 denial events, got {}: {events:#?}",
        events.len()
    );
    let find = |dst: &str, port: u64, hook: &str| {
        events
            .iter()
            .find(|e| e["dst"] == dst && e["dport"] == port && e["hook"] == hook)
            .unwrap_or_else(|| panic!("no event for {dst}:{port} on {hook} in {events:#?}"))
    };
    let e = find("169.254.169.254", 80, "connect4");
    assert_eq!(e["workload"], "github-mcp");
    assert_eq!(e["reason"], "baseline-metadata");
    assert_eq!(e["verdict"], "denied");
    assert_eq!(e["proto"], "tcp");
    assert_eq!(e["dest_class"], "metadata");
    assert_eq!(e["comm"], "mcpg-probe");
    let mapped = find("169.254.169.254", 80, "connect6");
    assert_eq!(
        mapped["family"], "ipv4",
        "a mapped destination is judged as IPv4"
    );
    assert_eq!(mapped["socket_family"], "inet6");
    assert_eq!(
        find("fd00:ec2::254", 80, "connect6")["reason"],
        "baseline-metadata"
    );
    assert_eq!(
        find("192.168.1.10", 6379, "connect4")["reason"],
        "deny-internal"
    );
    assert_eq!(find("10.0.12.5", 5433, "connect4")["reason"], "not-allowed");
    let udp = find("169.254.169.254", 53, "sendmsg4");
    assert_eq!(udp["proto"], "udp");
    assert!(
        events.iter().all(|e| e["workload"] == "github-mcp"),
        "the outsider made no events"
    );

    // Counters agree exactly with what was denied.
    let metrics = d.get("/metrics");
    let denied: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("mcp_guard_denied_flows_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert_eq!(denied, 13.0, "{metrics}");
    assert!(d.stop(), "daemon exits cleanly on SIGTERM");

    // After a clean stop the programs are detached: the same probe is no longer denied.
    assert_eq!(p.op("tcp 169.254.169.254 80"), "OK", "detached on SIGTERM");
}

#[test]
fn audit_mode_allows_but_reports() {
    let ns = lab();
    let cg = TestCgroup::new();
    let (_, dry) = cg.child("dry-run-mcp");
    let d = Daemon::start(&config(&cg));
    let mut p = Probe::new(PROBE, &dry, &ns);
    assert_eq!(
        p.op("tcp 169.254.169.254 80"),
        "OK",
        "audit mode never blocks"
    );
    assert_eq!(
        p.op("tcp 192.168.1.10 6379"),
        "OK",
        "audit mode never blocks"
    );
    assert_eq!(p.op("tcp 93.184.216.34 443"), "OK");
    let mut events = Vec::new();
    assert!(wait_until(Duration::from_secs(5), || {
        events.extend(d.events(Duration::from_millis(100)));
        events.len() >= 2
    }));
    assert_eq!(events.len(), 2, "{events:#?}");
    assert!(events
        .iter()
        .all(|e| e["verdict"] == "audited" && e["workload"] == "dry-run-mcp"));
    assert_eq!(events[0]["reason"], "baseline-metadata");
    assert_eq!(events[1]["reason"], "deny-internal");
    let metrics = d.get("/metrics");
    assert!(metrics.contains("mcp_guard_audited_flows_total{dest_class=\"metadata\",family=\"ipv4\",hook=\"connect4\",proto=\"tcp\",reason=\"baseline-metadata\",workload=\"dry-run-mcp\"} 1"), "{metrics}");
    assert!(
        !metrics.contains("mcp_guard_denied_flows_total{"),
        "{metrics}"
    );
}

#[test]
fn workload_cgroup_created_after_start_is_enforced() {
    let ns = lab();
    let cg = TestCgroup::new();
    let d = Daemon::start(&config(&cg));
    assert!(d.stderr.lock().unwrap().contains("does not exist yet"));
    // The systemd unit starts (its cgroup appears) only now.
    let (_, guarded) = cg.child("github-mcp");
    let status_has_id = || {
        let s: serde_json::Value = serde_json::from_str(&d.get("/status")).unwrap();
        s["workloads"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w["name"] == "github-mcp" && w["cgroup_id"].is_u64())
    };
    assert!(
        wait_until(Duration::from_secs(2), status_has_id),
        "daemon never registered the new cgroup"
    );
    let mut p = Probe::new(PROBE, &guarded, &ns);
    assert_eq!(p.op("tcp 169.254.169.254 80"), "EPERM");
}

/// Fail closed: if someone detaches a program (here `bpftool link detach`), the daemon
/// notices within a second, reports it and attaches it again.
#[test]
fn a_detached_program_is_reattached() {
    let ns = lab();
    let cg = TestCgroup::new();
    let (_, guarded) = cg.child("github-mcp");
    let d = Daemon::start(&config(&cg));
    let mut p = Probe::new(PROBE, &guarded, &ns);
    assert_eq!(p.op("tcp 169.254.169.254 80"), "EPERM");

    let cgroup_id = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&cg.dir).unwrap());
    let out = std::process::Command::new("bpftool")
        .args(["-j", "link", "list"])
        .output()
        .expect("bpftool (Debian package bpftool)");
    let links: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ours = links
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["cgroup_id"] == cgroup_id && l["attach_type"] == "cgroup_inet4_connect")
        .unwrap_or_else(|| panic!("no connect4 link on cgroup {cgroup_id}: {links:#}"));
    let id = ours["id"].to_string();
    let st = std::process::Command::new("bpftool")
        .args(["link", "detach", "id", &id])
        .status()
        .unwrap();
    assert!(st.success(), "bpftool link detach id {id}");

    let reattached = wait_until(Duration::from_secs(5), || {
        d.get("/metrics")
            .contains("mcp_guard_programs_reattached_total 1")
    });
    assert!(
        reattached,
        "daemon did not re-attach:\n{}",
        d.stderr.lock().unwrap()
    );
    assert!(
        d.stderr.lock().unwrap().contains("no longer attached"),
        "the detach is logged"
    );
    assert_eq!(p.op("tcp 169.254.169.254 80"), "EPERM", "enforced again");
    assert!(d
        .get("/metrics")
        .contains("mcp_guard_programs_attached{hook=\"connect4\"} 1"));
    assert_eq!(d.get("/readyz"), "ready\n");
}

/// Workloads selected by cgroup patterns, the way pods and containers are under kubepods:
/// cgroups that match later are enforced without a reload; the first workload to name a
/// cgroup owns it.
#[test]
fn cgroup_patterns_select_workloads() {
    let ns = lab();
    let cg = TestCgroup::new();
    let config = format!(
        "[[workload]]\nname = \"containers\"\ncgroup = \"{r}/kubepods/*/pod*/ctr-*\"\n[[workload]]\nname = \"pods\"\ncgroup = \"{r}/kubepods/**/pod*\"\ndefault = \"allow\"\n[[workload]]\nname = \"late\"\ncgroup = \"{r}/kubepods/burstable/*/ctr-?\"\ndefault = \"allow\"\n[daemon]\nattach_cgroup = \"{r}\"\n",
        r = cg.rel
    );
    let d = Daemon::start(&config);
    // Created after start, like a scheduled pod's containers.
    let (_, ctr) = cg.child("kubepods/burstable/podA/ctr-1");
    let (_, sidecar) = cg.child("kubepods/burstable/podA/sidecar");
    let registered = || {
        let s = d.status();
        s["workloads"][0]["cgroup_ids"].as_array().unwrap().len() == 1
            && s["workloads"][1]["cgroup_ids"].as_array().unwrap().len() == 1
    };
    assert!(
        wait_until(Duration::from_secs(3), registered),
        "{}",
        d.status()
    );
    let mut c = Probe::new(PROBE, &ctr, &ns);
    assert_eq!(
        c.op("tcp 192.168.1.10 6379"),
        "EPERM",
        "container pattern: deny-internal"
    );
    assert_eq!(c.op("tcp 169.254.169.254 80"), "EPERM");
    let mut s = Probe::new(PROBE, &sidecar, &ns);
    assert_eq!(
        s.op("tcp 192.168.1.10 6379"),
        "OK",
        "the pod pattern (allow) covers the sidecar"
    );
    assert_eq!(
        s.op("tcp 169.254.169.254 80"),
        "EPERM",
        "but the baseline still applies"
    );
    assert_eq!(
        d.status()["workloads"][2]["cgroup_ids"]
            .as_array()
            .unwrap()
            .len(),
        0,
        "the first workload owns a cgroup"
    );
}

/// A guarded process that listens answers whoever connected to it, whatever its egress
/// policy says of that peer (an internal client, a client on an allowed address but
/// another port, over IPv4 and IPv6), while it still cannot open a connection to them;
/// and a connected UDP socket's send with a control message (ECN, GSO: QUIC) is judged by
/// its peer, allowed or refused as the policy says (before the fix: the SYN-ACK was
/// dropped by the backstop, and the send was judged as 0.0.0.0 and refused).
#[test]
fn a_guarded_server_answers_its_clients_and_connected_sends_judge_the_peer() {
    let ns = NetNs::new();
    for a in [
        "10.0.20.5",
        "10.0.30.7",
        "10.0.12.5",
        "fd00:20::5",
        "fd00:30::7",
        "93.184.216.34",
        "2606:4700::10",
    ] {
        ns.add_addr(a);
    }
    let public4 = ns.udp_counter("93.184.216.34:443");
    let public6 = ns.udp_counter("[2606:4700::10]:443");
    let internal = ns.udp_counter("10.0.12.5:5353");
    let cg = TestCgroup::new();
    let (_, dir) = cg.child("srv");
    let config = |udp_internal: bool| {
        format!(
            "[[workload]]\nname = \"srv\"\ncgroup = \"{r}/srv\"\ndefault = \"deny-internal\"\n[[workload.allow]]\ncidr = \"10.0.12.0/24\"\nports = [5432]\nproto = \"tcp\"\n{extra}[daemon]\nattach_cgroup = \"{r}\"\n[events]\nrate_limit_per_sec = 0\n",
            r = cg.rel,
            extra = if udp_internal {
                "[[workload.allow]]\ncidr = \"10.0.12.5/32\"\nports = [5353]\nproto = \"udp\"\n"
            } else {
                ""
            }
        )
    };
    let d = Daemon::start(&config(true));
    let mut p = Probe::new(PROBE, &dir, &ns);
    assert_eq!(p.op("serve 10.0.20.5 8080"), "OK");
    assert_eq!(p.op("serve fd00:20::5 8080"), "OK");
    let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
    let sa = |s: &str| s.parse::<std::net::SocketAddr>().unwrap();
    // An internal client (deny-internal would refuse the server's own connect to it).
    assert_eq!(
        mcp_guard_tests::exchange_from(&ns, ip("10.0.30.7"), sa("10.0.20.5:8080")).unwrap(),
        "pong\n",
        "internal client over IPv4"
    );
    // A client on an allowed address, from a port the rule does not allow.
    assert_eq!(
        mcp_guard_tests::exchange_from(&ns, ip("10.0.12.5"), sa("10.0.20.5:8080")).unwrap(),
        "pong\n",
        "client on an allowed address, other port"
    );
    assert_eq!(
        mcp_guard_tests::exchange_from(&ns, ip("fd00:30::7"), sa("[fd00:20::5]:8080")).unwrap(),
        "pong\n",
        "internal client over IPv6"
    );
    // The server still cannot open a connection to its client.
    assert_eq!(p.op("tcp 10.0.30.7 8080"), "EPERM", "a new connection out");
    // Connected UDP with a control message goes to the socket's peer: allowed ones pass.
    assert_eq!(p.op("udp-cmsg 93.184.216.34 443"), "OK", "ECN on IPv4");
    assert_eq!(p.op("udp-cmsg 2606:4700::10 443"), "OK", "ECN on IPv6");
    assert_eq!(p.op("udp-gso 93.184.216.34 443"), "OK", "GSO on IPv4");
    assert!(
        wait_until(Duration::from_secs(10), || public4
            .load(std::sync::atomic::Ordering::SeqCst)
            >= 3
            && public6.load(std::sync::atomic::Ordering::SeqCst) >= 1),
        "the datagrams arrived"
    );
    // A peer the policy stops allowing after connect: the send is judged by the peer.
    assert_eq!(p.op("udp-connect-hold 10.0.12.5 5353"), "OK");
    assert_eq!(p.op("udp-cmsg-held 10.0.12.5 5353"), "OK", "allowed peer");
    assert!(
        wait_until(Duration::from_secs(10), || internal
            .load(std::sync::atomic::Ordering::SeqCst)
            == 1),
        "the allowed peer's datagram arrived"
    );
    d.write_config(&config(false));
    d.signal(libc::SIGHUP);
    assert!(
        wait_until(Duration::from_secs(15), || p
            .op("udp-cmsg-held 10.0.12.5 5353")
            == "EPERM"),
        "a peer no longer allowed is refused at sendmsg"
    );
    // Nothing the server sent to its clients was refused; the accepts are counted.
    // Events are collected until the refused send shows up (a slow, emulated VM can
    // take seconds), then a little longer.
    let mut events = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while std::time::Instant::now() < deadline
        && !events
            .iter()
            .any(|e: &serde_json::Value| e["hook"] == "sendmsg4")
    {
        events.extend(d.events(Duration::from_millis(500)));
    }
    events.extend(d.events(Duration::from_millis(500)));
    let to_clients: Vec<_> = events
        .iter()
        .filter(|e| {
            let dst = e["dst"].as_str().unwrap_or_default();
            dst.starts_with("10.0.30.7") || dst.contains("fd00:30::7")
        })
        .filter(|e| e["hook"] != "connect4")
        .collect();
    assert!(to_clients.is_empty(), "replies refused: {to_clients:?}");
    assert!(
        events.iter().any(|e| e["hook"] == "sendmsg4"
            && e["dst"]
                .as_str()
                .unwrap_or_default()
                .starts_with("10.0.12.5")),
        "the refused send names the peer: {events:?}"
    );
    let metrics = d.get("/metrics");
    let accepted = metrics
        .lines()
        .find(|l| l.starts_with("mcp_guard_accepted_connections_total{workload=\"srv\"}"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    assert_eq!(accepted, 3, "accepted connections counted exactly");
}
