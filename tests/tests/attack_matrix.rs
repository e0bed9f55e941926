//! The adversarial matrix: from guarded cgroups in a test namespace, every inet socket
//! the kernel accepts (AF_INET and AF_INET6 x stream, datagram, raw, seqpacket x every
//! protocol number, plus MPTCP), and AF_PACKET, AF_XDP and AF_VSOCK, and for each socket
//! every send path: connect+send, sendto (MSG_FASTOPEN on stream sockets), sendmsg with
//! and without a control message, sendmmsg, io_uring sendmsg and io_uring connect+send,
//! to a metadata address and a denied internal address (IPv4 and IPv6), each with a
//! receiver inside the namespace and a packet sniffer on its loopback. Nothing may arrive.
//! The test prints the table path -> layer that stopped it; the attack-path table (docs/src/attack-paths.md)
//! summarises it.
//!
//! Three guarded processes, as deployments run them:
//! - `w` (the defaults) started by `mcp-guard exec` (hardened);
//! - `lenient` (ping, raw, other protocols and packet sockets allowed by its config)
//!   started by `mcp-guard exec` (hardened): what it may create is judged per packet;
//! - `w` joined by a root process with every capability (no hardening): inet paths are
//!   closed by the kernel programs alone; AF_PACKET needs BPF LSM (or the hardening), and
//!   the test says which this kernel has.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use mcp_guard_tests::{wait_until, Daemon, NetNs, Probe, TestCgroup};

const PROBE: &str = env!("CARGO_BIN_EXE_mcpg-probe");

/// A socket kind: (family, type, protocol).
type SocketKind = (i32, i32, i32);

const TARGETS: [(&str, u16, &str); 4] = [
    ("169.254.169.254", 80, "metadata"),
    ("fd00:ec2::254", 80, "metadata"),
    ("10.0.12.5", 5432, "internal"),
    ("fd12::5", 5432, "internal"),
];

/// Every packet on the namespace's loopback whose destination is a target.
fn sniffer(ns: &NetNs) -> Arc<Mutex<Vec<String>>> {
    let fd = ns.in_ns(|| {
        // SAFETY: plain socket calls; the fd is moved to the reader thread.
        unsafe {
            let fd = libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW,
                i32::from((libc::ETH_P_ALL as u16).to_be()),
            );
            assert!(
                fd >= 0,
                "sniffer socket: {}",
                std::io::Error::last_os_error()
            );
            let mut ll: libc::sockaddr_ll = std::mem::zeroed();
            ll.sll_family = libc::AF_PACKET as u16;
            ll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
            ll.sll_ifindex = libc::if_nametoindex(c"lo".as_ptr()) as i32;
            assert_eq!(
                libc::bind(
                    fd,
                    (&raw const ll).cast(),
                    size_of::<libc::sockaddr_ll>() as u32
                ),
                0
            );
            fd
        }
    });
    let targets: Vec<IpAddr> = TARGETS.iter().map(|t| t.0.parse().unwrap()).collect();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        loop {
            // SAFETY: valid fd and buffer.
            let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n <= 0 {
                break;
            }
            let f = &buf[..n as usize];
            if f.len() < 14 {
                continue;
            }
            let (dst, proto) = match u16::from_be_bytes([f[12], f[13]]) {
                0x0800 if f.len() >= 34 => (
                    IpAddr::from(<[u8; 4]>::try_from(&f[30..34]).unwrap()),
                    f[23],
                ),
                0x86dd if f.len() >= 54 => (
                    IpAddr::from(<[u8; 16]>::try_from(&f[38..54]).unwrap()),
                    f[20],
                ),
                _ => continue,
            };
            if targets.contains(&dst) {
                s.lock().unwrap().push(format!("{dst} proto {proto}"));
            }
        }
    });
    seen
}

/// Socket kinds: (family, type, protocol), as the kernel numbers them.
fn kinds() -> Vec<(i32, i32, i32)> {
    let mut out = Vec::new();
    for family in [libc::AF_INET, libc::AF_INET6] {
        for ty in [
            libc::SOCK_STREAM,
            libc::SOCK_DGRAM,
            libc::SOCK_RAW,
            libc::SOCK_SEQPACKET,
        ] {
            for proto in (0..=255).chain([libc::IPPROTO_MPTCP]) {
                out.push((family, ty, proto));
            }
        }
    }
    out
}

fn kind_name((family, ty, proto): (i32, i32, i32)) -> String {
    let f = if family == libc::AF_INET {
        "inet"
    } else {
        "inet6"
    };
    let t = match ty {
        libc::SOCK_STREAM => "stream",
        libc::SOCK_DGRAM => "dgram",
        libc::SOCK_RAW => "raw",
        _ => "seqpacket",
    };
    format!("{f}/{t}/{proto}")
}

/// Protocol numbers as ranges: "1-5,17,255".
fn ranges(v: &[i32]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < v.len() {
        let mut j = i;
        while j + 1 < v.len() && v[j + 1] == v[j] + 1 {
            j += 1;
        }
        out.push(if i == j {
            v[i].to_string()
        } else {
            format!("{}-{}", v[i], v[j])
        });
        i = j + 1;
    }
    out.join(",")
}

#[test]
fn every_socket_and_send_path_is_stopped() {
    let ns = NetNs::new();
    ns.sysctl("net.ipv4.ping_group_range", "0 2147483647");
    for (addr, port, _) in TARGETS {
        ns.add_addr(addr);
        let sa = if addr.contains(':') {
            format!("[{addr}]:{port}")
        } else {
            format!("{addr}:{port}")
        };
        ns.listen_tcp(&sa);
        let _ = ns.udp_counter(&sa);
    }
    let seen = sniffer(&ns);
    let cg = TestCgroup::new();
    let (_, w_dir) = cg.child("w");
    let (_, _lenient_dir) = cg.child("lenient");
    let (_, outside_dir) = cg.child("outside");
    let d = Daemon::start(&format!(
        "[[workload]]\nname = \"w\"\ncgroup = \"{r}/w\"\ndefault = \"deny-internal\"\n\
         [[workload]]\nname = \"lenient\"\ncgroup = \"{r}/lenient\"\ndefault = \"deny-internal\"\nallow_ping = true\nallow_other_protocols = true\ndeny_raw_sockets = false\ndeny_packet_sockets = false\n\
         [daemon]\nattach_cgroup = \"{r}\"\n[tc]\nenabled = false\n[events]\nrate_limit_per_sec = 0\n",
        r = cg.rel
    ));
    let lsm = d.get("/metrics").contains("\nmcp_guard_lsm_available 1\n");

    // What the kernel offers an unguarded root process here.
    let mut outside = Probe::new(PROBE, &outside_dir, &ns);
    let offered: Vec<(i32, i32, i32)> = kinds()
        .into_iter()
        .filter(|&(f, t, p)| outside.op(&format!("socket {f} {t} {p}")) == "OK")
        .collect();
    drop(outside);
    assert!(
        offered.len() > 100,
        "the kernel offers only {} inet socket kinds?",
        offered.len()
    );

    let mut probes: Vec<(&str, &str, Probe)> = vec![
        (
            "w (exec)",
            "w",
            Probe::exec_in(PROBE, &d.config, "w", &[], Some(&ns)),
        ),
        (
            "lenient (exec)",
            "lenient",
            Probe::exec_in(PROBE, &d.config, "lenient", &[], Some(&ns)),
        ),
        (
            "w (root, no hardening)",
            "w",
            Probe::new(PROBE, &w_dir, &ns),
        ),
    ];
    // (probe, outcome) -> kinds, and every send result with its socket cookie.
    let mut table: BTreeMap<(String, String), Vec<SocketKind>> = BTreeMap::new();
    let mut sends: Vec<(String, String, String, u64, String)> = Vec::new();
    for (label, _, probe) in &mut probes {
        for &kind in &offered {
            let (f, t, p) = kind;
            let mut outcome = String::new();
            for (addr, port, class) in TARGETS {
                if (f == libc::AF_INET) == addr.contains(':') {
                    continue;
                }
                let r = probe.op(&format!("matrix {f} {t} {p} {addr} {port}"));
                if let Some(err) = r.strip_prefix("SOCKET ") {
                    outcome = format!("refused at creation ({err})");
                    break;
                }
                let (results, cookies) = r.rsplit_once(" cookies=").expect("matrix output");
                let cookies: Vec<u64> = cookies.split(',').map(|c| c.parse().unwrap()).collect();
                for (m, c) in results.split(' ').zip(cookies) {
                    let (method, res) = m.split_once('=').unwrap();
                    sends.push((
                        label.to_string(),
                        format!("{} {class}", kind_name(kind)),
                        method.into(),
                        c,
                        res.into(),
                    ));
                }
                outcome = "created".into();
            }
            table
                .entry((label.to_string(), outcome))
                .or_default()
                .push(kind);
        }
    }
    // Nothing arrived over any inet path.
    std::thread::sleep(Duration::from_millis(500));
    let arrived = seen.lock().unwrap().clone();
    assert!(arrived.is_empty(), "packets reached a target: {arrived:#?}");

    // Which layer stopped each send: the hook of the event with the socket's cookie,
    // or the kernel's own error.
    let mut events = Vec::new();
    let want_refusals = sends.iter().filter(|s| s.4 == "EPERM").count();
    wait_until(Duration::from_secs(10), || {
        events.extend(d.events(Duration::from_millis(200)));
        events.len() >= want_refusals
    });
    let mut by_cookie: BTreeMap<u64, BTreeSet<String>> = BTreeMap::new();
    for e in &events {
        if let (Some(c), Some(h)) = (e["socket_cookie"].as_u64(), e["hook"].as_str()) {
            by_cookie.entry(c).or_default().insert(h.to_string());
        }
    }
    let mut layers: BTreeMap<(String, String, String), BTreeSet<String>> = BTreeMap::new();
    for (label, kind, method, cookie, res) in &sends {
        let hooks = by_cookie
            .get(cookie)
            .map(|h| h.iter().cloned().collect::<Vec<_>>().join("+"));
        let layer = match (res.as_str(), hooks) {
            (_, Some(h)) => h,
            ("OK", None) => panic!("{label} {kind} {method}: sent, and no layer reported it"),
            ("N/A", None) => "n/a".into(),
            // Refused before any hook ran: seccomp (io_uring) in a hardened process.
            ("EPERM", None) if method.starts_with("uring") && label.contains("exec") => {
                "hardening (seccomp refuses io_uring)".into()
            }
            // MPTCP connects through a TCP subflow: the event carries the subflow's cookie.
            ("EPERM", None) if kind.contains("/262 ") => "connect4/6 (on the MPTCP subflow)".into(),
            ("EPERM", None) => panic!("{label} {kind} {method}: EPERM, and no layer reported it"),
            (err, None) => format!("the kernel itself ({err})"),
        };
        let family_kind = kind.rsplit_once(' ').map_or(kind.as_str(), |(k, _)| k);
        layers
            .entry((
                label.clone(),
                family_kind.split('/').take(2).collect::<Vec<_>>().join("/"),
                method.clone(),
            ))
            .or_default()
            .insert(layer);
    }

    // Packet, XDP and vsock sockets: refused at creation by BPF LSM where the kernel runs
    // it, by the hardening everywhere; without both (root, this kernel) a packet socket
    // reaches the link: the documented gap.
    let mut family_rows = Vec::new();
    for (label, _, probe) in &mut probes {
        for kind in ["xdp", "vsock"] {
            family_rows.push(format!(
                "{label}: AF_{} -> {}",
                kind.to_uppercase(),
                probe.op(&format!("socket {kind}"))
            ));
        }
        let r = probe.op("packet-send 169.254.169.254 80");
        family_rows.push(format!(
            "{label}: AF_PACKET frame to 169.254.169.254 -> {r}"
        ));
        if label.contains("exec") || lsm {
            assert!(
                r.starts_with("SOCKET"),
                "{label}: AF_PACKET socket created ({r}); BPF LSM {lsm}"
            );
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    let arrived_after = seen.lock().unwrap().clone();

    eprintln!(
        "\nattack matrix (BPF LSM {}):",
        if lsm {
            "available"
        } else {
            "refused by this kernel"
        }
    );
    for ((label, outcome), kinds) in &table {
        let mut by_ft: BTreeMap<String, Vec<i32>> = BTreeMap::new();
        for &(f, t, p) in kinds {
            let name = kind_name((f, t, 0));
            by_ft
                .entry(name.trim_end_matches("/0").to_string())
                .or_default()
                .push(p);
        }
        for (ft, protos) in by_ft {
            eprintln!(
                "  {label:24} {ft:16} protocols {:<24} {outcome}",
                ranges(&protos)
            );
        }
    }
    for ((label, fam, method), l) in &layers {
        eprintln!(
            "  {label:24} {fam:16} {method:20} stopped by {}",
            l.iter().cloned().collect::<Vec<_>>().join(", ")
        );
    }
    for r in &family_rows {
        eprintln!("  {r}");
    }
    if !arrived_after.is_empty() {
        eprintln!("  NOT STOPPED on this kernel without BPF LSM and without hardening: {arrived_after:?} (docs/src/attack-paths.md: AF_PACKET without BPF LSM)");
        assert!(!lsm, "a packet socket frame arrived although BPF LSM runs");
    }
    // The guarded defaults refuse every inet kind but TCP, MPTCP and UDP at creation.
    for ((label, outcome), kinds) in &table {
        if label.starts_with("w ") && outcome == "created" {
            for &(_, t, p) in kinds {
                assert!(
                    matches!(
                        (t, p),
                        (libc::SOCK_STREAM, 0 | 6 | 262) | (libc::SOCK_DGRAM, 0 | 17)
                    ),
                    "{label}: {} created",
                    kind_name((0, t, p))
                );
            }
        }
    }
    assert!(d.stop());
}
