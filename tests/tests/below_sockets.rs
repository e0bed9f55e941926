//! Below the socket hooks: raw and packet sockets refused at creation, and the TC
//! classifier dropping what a guarded workload sends on a raw socket, in VM mode (the
//! packet's socket cgroup) and pod mode (the source address, at the node-side veth).
//! Every namespace here is the test's own; nothing leaves the machine.

use std::{sync::atomic::Ordering, time::Duration};

use mcp_guard_tests::{wait_until, Daemon, NetNs, Probe, TestCgroup};

const PROBE: &str = env!("CARGO_BIN_EXE_mcpg-probe");

/// Events of these hooks follow the same versioned schema.
fn schema_check(events: &[serde_json::Value]) {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../mcp-guard/schema/event-v1.schema.json"
    ))
    .unwrap();
    let v = jsonschema::validator_for(&serde_json::from_str(&text).unwrap()).unwrap();
    for e in events {
        let errors: Vec<String> = v
            .iter_errors(e)
            .map(|err| format!("{err} at {}", err.instance_path))
            .collect();
        assert!(errors.is_empty(), "{errors:#?}\n{e:#}");
    }
}

#[test]
fn raw_and_packet_sockets_are_refused_where_configured() {
    let ns = NetNs::new();
    // As container runtimes do for pods: ICMP datagram sockets open to every group.
    ns.sysctl("net.ipv4.ping_group_range", "0 2147483647");
    let cg = TestCgroup::new();
    let (_, guarded) = cg.child("w");
    let (_, lenient) = cg.child("lenient");
    let (_, outside) = cg.child("outside");
    let d = Daemon::start(&format!(
        "[[workload]]\nname = \"w\"\ncgroup = \"{r}/w\"\n[[workload]]\nname = \"lenient\"\ncgroup = \"{r}/lenient\"\ndeny_raw_sockets = false\ndeny_packet_sockets = false\nallow_ping = true\n[daemon]\nattach_cgroup = \"{r}\"\n",
        r = cg.rel
    ));
    // Some kernels refuse every BPF LSM program (this machine's returns EPERM before the
    // verifier even for a two-instruction one). Then AF_PACKET cannot be closed, and the
    // daemon must say so loudly instead of pretending.
    let lsm = d
        .get("/metrics")
        .contains("mcp_guard_programs_attached{hook=\"socket_create\"} 1");
    assert_eq!(
        d.get("/metrics").contains("\nmcp_guard_lsm_available 1\n"),
        lsm
    );
    if !lsm {
        assert!(d.get("/metrics").contains("\nmcp_guard_lsm_available 0\n"));
        assert!(
            !d.get("/metrics")
                .contains("mcp_guard_programs_attached{hook=\"socket_create\"}"),
            "a program the kernel never ran is not reported as detached"
        );
        assert!(
            d.stderr
                .lock()
                .unwrap()
                .contains("AF_PACKET sockets stay open"),
            "the daemon reports it"
        );
    }
    let mut p = Probe::new(PROBE, &guarded, &ns);
    assert_eq!(p.op("socket raw4"), "EPERM", "raw IPv4 socket");
    assert_eq!(p.op("socket raw6"), "EPERM", "raw IPv6 socket");
    assert_eq!(
        p.op("socket packet"),
        if lsm { "EPERM" } else { "OK" },
        "AF_PACKET socket (BPF LSM)"
    );
    // The socket-creation defaults: TCP, MPTCP and UDP only. Each other kind is refused
    // where the kernel would create it (the unguarded process shows what it offers).
    let mut o = Probe::new(PROBE, &outside, &ns);
    let mut refused_other = 0;
    let mut table = Vec::new();
    for kind in [
        "ping4", "ping6", "udplite4", "sctp4", "tcp4", "udp6", "mptcp4", "xdp", "vsock",
    ] {
        let offered = o.op(&format!("socket {kind}"));
        let guarded_result = p.op(&format!("socket {kind}"));
        // AF_XDP and AF_VSOCK need BPF LSM; without it they stay open (docs/src/attack-paths.md).
        let want = match kind {
            "tcp4" | "udp6" | "mptcp4" => offered.clone(),
            "xdp" | "vsock" if !lsm => offered.clone(),
            _ if offered == "OK" => "EPERM".to_string(),
            _ => offered.clone(),
        };
        table.push(format!(
            "{kind}: kernel offers {offered}, guarded gets {guarded_result}"
        ));
        assert_eq!(
            guarded_result, want,
            "{kind} (unguarded: {offered}; BPF LSM: {lsm})"
        );
        if want == "EPERM" {
            refused_other += 1;
        }
    }
    eprintln!(
        "socket creation from a guarded workload:\n  {}",
        table.join("\n  ")
    );
    assert!(
        refused_other >= 2,
        "ping sockets at least must be offered and refused: {table:#?}"
    );
    let mut l = Probe::new(PROBE, &lenient, &ns);
    assert_eq!(l.op("socket raw4"), "OK");
    assert_eq!(l.op("socket packet"), "OK");
    assert_eq!(l.op("socket ping4"), "OK", "allow_ping");
    assert_eq!(o.op("socket raw4"), "OK", "unguarded process untouched");
    assert_eq!(o.op("socket packet"), "OK", "unguarded process untouched");

    let mut events = Vec::new();
    let want_events = 2 + usize::from(lsm) + refused_other;
    assert!(wait_until(Duration::from_secs(5), || {
        events.extend(d.events(Duration::from_millis(100)));
        events.len() >= want_events
    }));
    assert_eq!(events.len(), want_events, "{events:#?}");
    let reasons: Vec<(&str, &str)> = events
        .iter()
        .map(|e| (e["hook"].as_str().unwrap(), e["reason"].as_str().unwrap()))
        .collect();
    assert_eq!(
        &reasons[..2],
        [("sock_create", "raw-socket"), ("sock_create", "raw-socket")]
    );
    if lsm {
        assert_eq!(reasons[2], ("socket_create", "packet-socket"));
        // Counted exactly, like every refusal.
        let metrics = d.get("/metrics");
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with("mcp_guard_denied_flows_total{")
                    && l.contains("hook=\"socket_create\"")
                    && l.contains("reason=\"packet-socket\"")
                    && l.ends_with(" 1")),
            "{metrics}"
        );
    }
    assert!(events
        .iter()
        .all(|e| e["workload"] == "w" && e["comm"] == "mcpg-probe" && e["dest_class"] == "none"));
    assert!(events
        .iter()
        .all(|e| e["family"] == "none" && e["dst"] == ""));
    schema_check(&events);
}

/// VM mode: the workload lives in the "vm" namespace, reaching the "net" namespace (where
/// the metadata service and a public API live) over a veth; TC sits on the vm side's egress.
#[test]
fn vm_mode_tc_drops_raw_packets_to_denied_destinations() {
    let vm = NetNs::new();
    let net = NetNs::new();
    vm.veth("vm0", &net, "net0");
    vm.ip("addr add 198.18.0.1/24 dev vm0");
    net.ip("addr add 198.18.0.2/24 dev net0");
    net.add_addr("169.254.169.254");
    net.add_addr("93.184.216.34");
    vm.ip("route add 169.254.169.254/32 via 198.18.0.2");
    vm.ip("route add 93.184.216.34/32 via 198.18.0.2");
    let metadata_udp = net.udp_counter("169.254.169.254:53");
    let public_udp = net.udp_counter("93.184.216.34:53");
    // An L3 device the "vm*" glob also matches: the classifier reads Ethernet frames, so
    // it must not attach there.
    vm.ip("tuntap add dev vmtun0 mode tun");

    let cg = TestCgroup::new();
    let (_, guarded) = cg.child("w");
    let (_, outside) = cg.child("outside");
    let d = Daemon::start(&format!(
        "[[workload]]\nname = \"w\"\ncgroup = \"{r}/w\"\ndeny_raw_sockets = false\n[daemon]\nattach_cgroup = \"{r}\"\ncgroup_skb = false\n[tc]\nnetns = \"{ns}\"\ninterfaces = [\"vm*\"]\n",
        r = cg.rel,
        ns = vm.path().display()
    ));
    assert!(
        wait_until(Duration::from_secs(3), || d
            .stderr
            .lock()
            .unwrap()
            .contains("tc classifier attached")),
        "{}",
        d.stderr.lock().unwrap()
    );
    assert!(
        wait_until(Duration::from_secs(3), || {
            let log = d.stderr.lock().unwrap();
            log.lines()
                .any(|l| l.contains("not an Ethernet interface") && l.contains("vmtun0"))
        }),
        "the tun device was not skipped: {}",
        d.stderr.lock().unwrap()
    );
    assert!(
        !d.stderr
            .lock()
            .unwrap()
            .lines()
            .any(|l| l.contains("tc classifier attached") && l.contains("vmtun0")),
        "attached to a tun device"
    );

    let mut p = Probe::new(PROBE, &guarded, &vm);
    assert_eq!(
        p.op("raw-icmp 169.254.169.254"),
        "NOREPLY",
        "raw ICMP echo to metadata dropped"
    );
    assert_eq!(
        p.op("raw-icmp 93.184.216.34"),
        "REPLY",
        "allowed flow passes"
    );
    assert_eq!(p.op("raw-udp 198.18.0.1 169.254.169.254 53"), "SENT");
    assert_eq!(p.op("raw-udp 198.18.0.1 93.184.216.34 53"), "SENT");
    let mut o = Probe::new(PROBE, &outside, &vm);
    assert_eq!(
        o.op("raw-icmp 169.254.169.254"),
        "REPLY",
        "unguarded process untouched"
    );
    assert!(
        wait_until(Duration::from_secs(2), || public_udp.load(Ordering::SeqCst)
            == 1),
        "the allowed hand-built UDP packet arrived"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        metadata_udp.load(Ordering::SeqCst),
        0,
        "the hand-built UDP packet to metadata never arrived"
    );
    // The guarded workload serves a client on an internal address its policy refuses:
    // the SYN-ACK (request socket) and the replies (accepted socket) pass the classifier.
    net.add_addr("10.0.30.7");
    vm.ip("route add 10.0.30.7/32 via 198.18.0.2");
    assert_eq!(p.op("serve 198.18.0.1 8080"), "OK");
    for _ in 0..2 {
        assert_eq!(
            mcp_guard_tests::exchange_from(
                &net,
                "10.0.30.7".parse().unwrap(),
                "198.18.0.1:8080".parse().unwrap()
            )
            .unwrap(),
            "pong\n",
            "a client of the guarded server is answered through the classifier"
        );
    }
    // Interfaces that appear later are covered too (the daemon looks every second).
    vm.ip("link add vm1 type veth peer name xpeer");
    assert!(
        wait_until(Duration::from_secs(5), || d
            .stderr
            .lock()
            .unwrap()
            .lines()
            .any(|l| l.contains("tc classifier attached") && l.contains("vm1"))),
        "the new interface was not followed:\n{}",
        d.stderr.lock().unwrap()
    );

    let mut events = Vec::new();
    assert!(wait_until(Duration::from_secs(5), || {
        events.extend(d.events(Duration::from_millis(100)));
        events.len() >= 2
    }));
    let tc: Vec<&serde_json::Value> = events.iter().filter(|e| e["hook"] == "tc").collect();
    assert_eq!(tc.len(), 2, "{events:#?}");
    assert!(tc.iter().all(|e| e["workload"] == "w"
        && e["reason"] == "baseline-metadata"
        && e["dst"] == "169.254.169.254"
        && e["dest_class"] == "metadata"));
    assert!(
        tc.iter().any(|e| e["proto"] == "icmp")
            && tc
                .iter()
                .any(|e| e["proto"] == "udp" && e["dport"] == 53 && e["src"] == "198.18.0.1")
    );
    assert!(
        d.get("/metrics").contains("hook=\"tc\""),
        "counted in the same counters"
    );
    schema_check(&events);
}

/// Pod mode: the workload runs in its own "pod" namespace joined to the "node" namespace
/// by a veth; its packets arrive at the node-side veth's ingress with no socket, and are
/// attributed by that interface (whose other end is the pod's namespace), never by the
/// source address, which the pod can write as it likes.
#[test]
fn pod_mode_tc_attributes_by_interface() {
    let pod = NetNs::new();
    let node = NetNs::new();
    pod.veth("eth0", &node, "vhpod0");
    pod.ip("addr add 10.244.0.5/24 dev eth0");
    node.ip("addr add 10.244.0.1/24 dev vhpod0");
    pod.ip("route add default via 10.244.0.1");
    node.add_addr("169.254.169.254");
    node.add_addr("93.184.216.34");
    let metadata_udp = node.udp_counter("169.254.169.254:53");

    let cg = TestCgroup::new();
    let (_, guarded) = cg.child("pod");
    let d = Daemon::start(&format!(
        "[[workload]]\nname = \"pod\"\ncgroup = \"{r}/pod\"\ndeny_raw_sockets = false\n[daemon]\nattach_cgroup = \"{r}\"\ncgroup_skb = false\n[tc]\nnetns = \"{ns}\"\ninterfaces = []\npod_interfaces = [\"vh*\"]\n",
        r = cg.rel,
        ns = node.path().display()
    ));
    let mut p = Probe::new(PROBE, &guarded, &pod);
    assert!(
        wait_until(Duration::from_secs(5), || d.status()["pod_sources"]
            .as_u64()
            .unwrap_or(0)
            >= 1),
        "the daemon never mapped the pod's interface: {}",
        d.status()
    );
    assert_eq!(
        p.op("raw-icmp 169.254.169.254"),
        "NOREPLY",
        "dropped at the node-side veth"
    );
    assert_eq!(
        p.op("raw-icmp 93.184.216.34"),
        "REPLY",
        "allowed flow passes"
    );
    assert_eq!(p.op("raw-udp 10.244.0.5 169.254.169.254 53"), "SENT");
    // A spoofed source address (no workload's) changes nothing: the interface decides.
    assert_eq!(p.op("raw-udp 10.9.9.9 169.254.169.254 53"), "SENT");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(metadata_udp.load(Ordering::SeqCst), 0);
    let mut events = Vec::new();
    assert!(wait_until(Duration::from_secs(5), || {
        events.extend(d.events(Duration::from_millis(100)));
        events.iter().filter(|e| e["hook"] == "tc").count() >= 3
    }));
    assert!(
        events
            .iter()
            .filter(|e| e["hook"] == "tc")
            .all(|e| e["workload"] == "pod"),
        "{events:#?}"
    );
    assert!(
        events
            .iter()
            .any(|e| e["hook"] == "tc" && e["src"] == "10.9.9.9"),
        "the spoofed datagram was not attributed to the pod: {events:#?}"
    );
}

/// mcp-guard classifiers attached to an interface of a namespace, as the kernel lists them.
fn tc_programs(ns: &NetNs, interface: &'static str) -> usize {
    ns.tcx_programs(interface, "mcpg_tc")
}

/// The packet backstop outlives the daemon: TC links are pinned (TCX), a killed daemon
/// leaves them dropping, a restarted one adopts them instead of adding a second
/// classifier, and detaching removes them.
#[test]
fn tc_links_are_pinned_and_adopted_after_kill_9() {
    // Before TCX, TC links cannot be pinned; the netlink (clsact) attachment is exercised
    // by vm_mode_tc_drops_raw_packets_to_denied_destinations.
    if !mcp_guard_tests::needs(
        "tc_links_are_pinned_and_adopted_after_kill_9",
        mcp_guard_tests::Feature::Tcx,
        None,
    ) {
        return;
    }
    let vm = NetNs::new();
    let net = NetNs::new();
    vm.veth("vm0", &net, "net0");
    vm.ip("addr add 198.18.0.1/24 dev vm0");
    net.ip("addr add 198.18.0.2/24 dev net0");
    net.add_addr("169.254.169.254");
    vm.ip("route add 169.254.169.254/32 via 198.18.0.2");
    let metadata_udp = net.udp_counter("169.254.169.254:53");
    let cg = TestCgroup::new();
    let (_, guarded) = cg.child("w");
    let mut d = Daemon::start(&format!(
        "[[workload]]\nname = \"w\"\ncgroup = \"{r}/w\"\ndeny_raw_sockets = false\n[daemon]\nattach_cgroup = \"{r}\"\ncgroup_skb = false\n[tc]\nnetns = \"{ns}\"\ninterfaces = [\"vm*\"]\n",
        r = cg.rel,
        ns = vm.path().display()
    ));
    assert!(wait_until(Duration::from_secs(3), || tc_programs(
        &vm, "vm0"
    ) == 1));
    let pinned = std::fs::read_dir(d.pin_dir.join("links"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("tc-"))
        .count();
    assert_eq!(pinned, 1, "one pinned TC link");

    d.kill9();
    assert_eq!(
        tc_programs(&vm, "vm0"),
        1,
        "still attached with the daemon dead"
    );
    let mut p = Probe::new(PROBE, &guarded, &vm);
    assert_eq!(p.op("raw-udp 198.18.0.1 169.254.169.254 53"), "SENT");
    assert_eq!(
        p.op("raw-icmp 169.254.169.254"),
        "NOREPLY",
        "dropped with the daemon dead"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        metadata_udp.load(Ordering::SeqCst),
        0,
        "nothing reached metadata"
    );

    d.restart();
    assert!(
        wait_until(Duration::from_secs(3), || d
            .stderr
            .lock()
            .unwrap()
            .contains("adopted the pinned link")),
        "{}",
        d.stderr.lock().unwrap()
    );
    assert_eq!(tc_programs(&vm, "vm0"), 1, "adopted, not attached twice");
    assert_eq!(p.op("raw-icmp 169.254.169.254"), "NOREPLY");

    assert!(d.stop(), "daemon exits cleanly");
    assert_eq!(
        tc_programs(&vm, "vm0"),
        0,
        "on_exit = detach removes the TC link too"
    );
}

/// Where BPF LSM is refused, `mcp-guard exec` hardens what it starts: no capability that
/// goes around the cgroup hooks, and a seccomp filter refusing AF_PACKET, AF_XDP and
/// AF_VSOCK sockets and io_uring. `--no-hardening` opts out.
#[test]
fn exec_hardens_the_command() {
    let cg = TestCgroup::new();
    // The lenient workload allows raw and packet sockets: only the hardening refuses them.
    let d = Daemon::start(&format!(
        "[[workload]]\nname = \"w\"\ncgroup = \"{r}/w\"\ndeny_raw_sockets = false\ndeny_packet_sockets = false\n[daemon]\nattach_cgroup = \"{r}\"\n",
        r = cg.rel
    ));
    let mut hardened = Probe::exec(PROBE, &d.config, "w", &[]);
    let caps = hardened.op("caps");
    let field = |name: &str| -> u64 {
        let v = caps
            .split_whitespace()
            .find_map(|f| f.strip_prefix(name))
            .unwrap();
        u64::from_str_radix(v, 16).unwrap()
    };
    for (cap, name) in [
        (13, "CAP_NET_RAW"),
        (12, "CAP_NET_ADMIN"),
        (21, "CAP_SYS_ADMIN"),
        (39, "CAP_BPF"),
    ] {
        assert_eq!(
            field("bnd=") & (1 << cap),
            0,
            "{name} in the bounding set: {caps}"
        );
        assert_eq!(field("eff=") & (1 << cap), 0, "{name} effective: {caps}");
        assert_eq!(field("inh=") & (1 << cap), 0, "{name} inheritable: {caps}");
    }
    assert!(caps.ends_with("nnp=1"), "{caps}");
    // Every capability leaves, root's included, unless kept by name.
    assert!(
        caps.starts_with("bnd=0000000000000000 eff=0000000000000000 inh=0000000000000000"),
        "{caps}"
    );
    let mut kept = Probe::exec(PROBE, &d.config, "w", &["--keep-cap", "net_bind_service"]);
    assert!(
        kept.op("caps")
            .starts_with("bnd=0000000000000400 eff=0000000000000400"),
        "CAP_NET_BIND_SERVICE kept"
    );
    // Another user: every id switched, supplementary groups from NSS, the kept capability
    // raised as ambient so it survives the exec of a non-root command; still no way out
    // of the cgroup.
    let mut nobody = Probe::exec(
        PROBE,
        &d.config,
        "w",
        &["--user", "nobody", "--keep-cap", "net_bind_service"],
    );
    assert_eq!(
        nobody.op("ids"),
        "uid=65534,65534,65534,65534 gid=65534,65534,65534,65534 groups=65534"
    );
    assert!(
        nobody
            .op("caps")
            .starts_with("bnd=0000000000000400 eff=0000000000000400"),
        "CAP_NET_BIND_SERVICE kept for the other user"
    );
    let mut grouped = Probe::exec(PROBE, &d.config, "w", &["--user", "65534", "--group", "0"]);
    assert_eq!(
        grouped.op("ids"),
        "uid=65534,65534,65534,65534 gid=0,0,0,0 groups=0"
    );
    for (args, want) in [
        (&["--user", "no-such-user-mcpg"][..], "no-such-user-mcpg"),
        (&["--group", "no-such-group-mcpg"][..], "no-such-group-mcpg"),
        (
            &["--user", "nobody", "--no-hardening"][..],
            "--no-hardening",
        ),
    ] {
        let out = std::process::Command::new(mcp_guard_tests::guard_bin())
            .args(["exec", "--config"])
            .arg(&d.config)
            .args(["--workload", "w"])
            .args(args)
            .args(["--", "true"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(want),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let refused = std::process::Command::new(mcp_guard_tests::guard_bin())
        .args(["exec", "--config"])
        .arg(&d.config)
        .args(["--workload", "w", "--keep-cap", "CAP_NET_RAW", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("lets the command go around the guard")
    );
    for kind in ["packet", "xdp", "vsock", "raw4"] {
        assert_eq!(
            hardened.op(&format!("socket {kind}")),
            "EPERM",
            "{kind} from the hardened command"
        );
    }
    assert_eq!(hardened.op("io_uring"), "EPERM");
    assert_eq!(hardened.op("socket tcp4"), "OK");
    let privileged = |d: &Daemon| {
        d.get("/metrics")
            .lines()
            .find_map(|l| {
                l.strip_prefix("mcp_guard_workload_privileged_processes{workload=\"w\"} ")
            })
            .map(|v| v.trim().parse::<u32>().unwrap())
    };
    assert!(
        wait_until(Duration::from_secs(6), || privileged(&d) == Some(0)),
        "the hardened command holds no dropped capability: {:?}",
        privileged(&d)
    );

    let mut plain = Probe::exec(PROBE, &d.config, "w", &["--no-hardening"]);
    assert_eq!(
        plain.op("socket raw4"),
        "OK",
        "--no-hardening keeps CAP_NET_RAW"
    );
    assert_eq!(plain.op("io_uring"), "OK");
    // The daemon reports the unhardened one: it could go around the hooks.
    assert!(
        wait_until(Duration::from_secs(6), || privileged(&d) == Some(1)),
        "privileged process not reported: {:?}",
        privileged(&d)
    );
    // The log line follows the metric (same check, written after it).
    assert!(wait_until(Duration::from_secs(3), || d
        .stderr
        .lock()
        .unwrap()
        .contains("hold capabilities that go around the cgroup hooks")));
    assert!(d.stop());
}

/// Counts TCP bytes received on `addr` inside the namespace, over every connection.
fn tcp_byte_counter(ns: &NetNs, addr: &str) -> std::sync::Arc<std::sync::atomic::AtomicU64> {
    use std::io::Read as _;
    let sa: std::net::SocketAddr = addr.parse().unwrap();
    let listener = ns.in_ns(move || std::net::TcpListener::bind(sa).unwrap());
    let count = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let c = count.clone();
    std::thread::spawn(move || {
        for s in listener.incoming().flatten() {
            let c = c.clone();
            std::thread::spawn(move || {
                let mut s = s;
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    c.fetch_add(n as u64, Ordering::SeqCst);
                }
            });
        }
    });
    count
}

/// The per-packet backstop on the cgroup (cgroup_skb/egress), with no TC anywhere: the
/// ping and raw sockets a workload is allowed still cannot reach the metadata service
/// or an internal address, and an established flow is cut when the policy stops
/// allowing its destination. Each refusal is one event (hook cgroup_skb) and counted.
#[test]
fn cgroup_skb_backstop_judges_every_packet() {
    let ns = NetNs::new();
    ns.sysctl("net.ipv4.ping_group_range", "0 2147483647");
    for a in [
        "169.254.169.254",
        "10.0.12.5",
        "93.184.216.34",
        "93.184.216.35",
    ] {
        ns.add_addr(a);
    }
    let received = tcp_byte_counter(&ns, "93.184.216.35:443");
    let cg = TestCgroup::new();
    let (_, dir) = cg.child("w");
    let config = |allow_flow: bool| {
        format!(
            "[[workload]]\nname = \"w\"\ncgroup = \"{r}/w\"\ndefault = \"deny-internal\"\nallow_ping = true\ndeny_raw_sockets = false\n{extra}[daemon]\nattach_cgroup = \"{r}\"\n[tc]\nenabled = false\n[events]\nrate_limit_per_sec = 0\n",
            r = cg.rel,
            extra = if allow_flow {
                ""
            } else {
                "[[workload.allow]]\ncidr = \"10.0.0.0/8\"\n[[workload.allow]]\ncidr = \"192.0.2.0/24\"\n"
            }
        )
    };
    // First: default deny-internal, so public 93.184.216.35 is allowed.
    let d = Daemon::start(&config(true));
    assert!(d
        .get("/metrics")
        .contains("mcp_guard_programs_attached{hook=\"cgroup_skb\"} 1"));
    let mut p = Probe::new(PROBE, &dir, &ns);
    // Ping sockets (allowed to this workload): judged per packet.
    assert_eq!(p.op("ping 93.184.216.34"), "REPLY", "public");
    let r = p.op("ping 169.254.169.254");
    assert!(r == "EPERM" || r == "NOREPLY", "metadata: {r}");
    let r = p.op("ping 10.0.12.5");
    assert!(r == "EPERM" || r == "NOREPLY", "internal: {r}");
    // A raw socket (allowed to this workload): the same.
    assert_eq!(p.op("raw-icmp 93.184.216.34"), "REPLY");
    let r = p.op("raw-icmp 169.254.169.254");
    assert!(r == "EPERM" || r == "NOREPLY", "raw to metadata: {r}");
    // A hand-built UDP datagram on a raw socket to the metadata service.
    let udp = ns.udp_counter("169.254.169.254:53");
    let r = p.op("raw-udp 10.0.12.5 169.254.169.254 53");
    assert!(r == "EPERM" || r == "SENT", "{r}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        udp.load(Ordering::SeqCst),
        0,
        "a raw datagram reached the metadata address"
    );

    // An established flow, allowed now...
    assert_eq!(p.op("hold 93.184.216.35 443"), "OK 0");
    assert_eq!(p.op("hold-send 0 1000"), "OK");
    assert!(wait_until(Duration::from_secs(3), || received
        .load(Ordering::SeqCst)
        == 1000));
    // ...is cut once a reload stops allowing its destination (default deny now).
    let generation = d.status()["generation"].as_u64();
    d.write_config(&config(false).replace("default = \"deny-internal\"", "default = \"deny\""));
    assert!(
        wait_until(Duration::from_secs(10), || d.status()["generation"]
            .as_u64()
            > generation),
        "reload not applied: {}",
        d.status()
    );
    let before = received.load(Ordering::SeqCst);
    let _ = p.op("hold-send 0 1000");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        received.load(Ordering::SeqCst),
        before,
        "the established flow still delivers after the policy stopped allowing it"
    );

    let mut events = Vec::new();
    assert!(
        wait_until(Duration::from_secs(5), || {
            events.extend(d.events(Duration::from_millis(100)));
            events.iter().filter(|e| e["hook"] == "cgroup_skb").count() >= 5
        }),
        "{events:#?}"
    );
    let skb: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["hook"] == "cgroup_skb")
        .collect();
    let reasons: Vec<(&str, &str, &str)> = skb
        .iter()
        .map(|e| {
            (
                e["reason"].as_str().unwrap(),
                e["dst"].as_str().unwrap(),
                e["proto"].as_str().unwrap(),
            )
        })
        .collect();
    for want in [
        ("baseline-metadata", "169.254.169.254", "icmp"),
        ("deny-internal", "10.0.12.5", "icmp"),
        ("baseline-metadata", "169.254.169.254", "udp"),
        ("default-deny", "93.184.216.35", "tcp"),
    ] {
        assert!(
            reasons.contains(&want),
            "no cgroup_skb event {want:?}: {reasons:#?}"
        );
    }
    // Once per socket and destination, not per packet: the retransmissions of the cut
    // flow are dropped without new events.
    assert_eq!(
        reasons.iter().filter(|r| r.0 == "default-deny").count(),
        1,
        "{reasons:#?}"
    );
    schema_check(&events);
    assert!(d.stop());
}

/// A root command under `mcp-guard exec` runs in a mount namespace of its own: it cannot
/// write its pid into another cgroup's `cgroup.procs` (the cgroup tree is read-only
/// there), nor remove the daemon's pins (bpffs read-only), nor reach a local deputy's
/// Unix socket (the daemon's own control socket stands in for the container runtime's,
/// D-Bus's and the kubelet's, covered the same way). Control: the same command with
/// `--no-hardening` does all three (a root process with every capability); after leaving
/// its cgroup it is still judged by its workload (sticky identity in the kernel).
#[test]
fn an_exec_hardened_root_command_cannot_leave_its_cgroup_or_reach_deputies() {
    let ns = NetNs::new();
    ns.add_addr("169.254.169.254");
    ns.listen_tcp("169.254.169.254:80");
    let cg = TestCgroup::new();
    let _ = cg.child("w");
    let d = Daemon::start(&format!(
        "[[workload]]\nname = \"w\"\ncgroup = \"{r}/w\"\n[daemon]\nattach_cgroup = \"{r}\"\n",
        r = cg.rel
    ));
    let root = mcp_guard_tests::cgroup_mount();
    let control = d.control.display().to_string();
    let pin = d.pin_dir.join("links/connect4").display().to_string();
    let mut hardened = Probe::exec_in(PROBE, &d.config, "w", &[], Some(&ns));
    assert_eq!(
        hardened.op(&format!("join-cgroup {}", root.display())),
        "ERR 30",
        "the cgroup tree is read-only for the command"
    );
    assert_eq!(
        hardened.op(&format!("join-cgroup {}", cg.dir.display())),
        "ERR 30"
    );
    assert_eq!(
        hardened.op("tcp 169.254.169.254 80"),
        "EPERM",
        "still guarded"
    );
    // Two layers: with the cgroup unix hooks (6.7+) the kernel refuses the daemon's
    // socket by its path (a built-in deputy, EPERM) before the lookup; the mount
    // namespace covers it anyway (ECONNREFUSED where the hooks are missing).
    let unix_hooks = mcp_guard_tests::kernel_at_least(6, 7);
    assert_eq!(
        hardened.op(&format!("unix {control}")),
        if unix_hooks { "ERR 1" } else { "ERR 111" },
        "the daemon's socket is covered"
    );
    assert_eq!(
        hardened.op(&format!("unlink {pin}")),
        "ERR 30",
        "bpffs is read-only"
    );
    assert!(d.pin_dir.join("links/connect4").exists());
    // No module loading, no tracing of an unguarded process (root's, outside the guard).
    let mut outsider = std::process::Command::new("sleep")
        .arg("60")
        .spawn()
        .unwrap();
    let traced = format!("ptrace {}", outsider.id());
    let hardened_module = hardened.op("load-module");
    assert_eq!(hardened.op(&traced), "EPERM", "CAP_SYS_PTRACE is gone");
    let mut plain = Probe::exec_in(PROBE, &d.config, "w", &["--no-hardening"], Some(&ns));
    let module = plain.op("load-module");
    if module == "ERR 38" {
        // A kernel built without module support (this host's): nobody loads one.
        println!("NOTE: this kernel has no loadable modules (ENOSYS for root too)");
        assert_eq!(hardened_module, "ERR 38");
    } else {
        assert_eq!(hardened_module, "EPERM", "CAP_SYS_MODULE is gone");
        assert_ne!(module, "EPERM", "control: root may try to load a module");
    }
    assert_eq!(plain.op(&traced), "OK", "control: root may trace it");
    let _ = outsider.kill();
    let _ = outsider.wait();
    // Unhardened, only the kernel refuses it: the cgroup hook by its path, or BPF LSM by
    // the address the daemon bound it to.
    let lsm_unix = d
        .get("/metrics")
        .contains("mcp_guard_programs_attached{hook=\"unix_stream_connect\"} 1");
    assert_eq!(
        plain.op(&format!("unix {control}")),
        if unix_hooks || lsm_unix {
            "ERR 1"
        } else {
            "OK"
        },
        "unhardened: only the kernel's unix hooks refuse it"
    );
    assert_eq!(
        plain.op(&format!("join-cgroup {}", cg.dir.display())),
        "OK",
        "control: an unhardened root process leaves its cgroup"
    );
    assert_eq!(
        plain.op("tcp 169.254.169.254 80"),
        "EPERM",
        "and is still judged by its workload (sticky identity, tests/tests/sticky_identity.rs)"
    );
}
