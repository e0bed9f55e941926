//! `cargo xtask bench [--quick]`: what enforcement costs, measured as ratios in one run on
//! one machine. Everything runs inside a network namespace this benchmark creates.
//! Writes target/bench/results.md and results.json.

use std::{
    fmt::Write as _,
    io::Write as _,
    net::{SocketAddr, TcpStream},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use mcp_guard::{config, maps::PolicyMaps, pins::Pins, policy};
use mcp_guard_tests::{cgroup_mount, unique, wait_until, Daemon, NetNs, Probe, TestCgroup};

struct Row {
    name: String,
    value: String,
    target: String,
    met: Option<bool>,
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn join(cgroup_dir: &Path) {
    std::fs::write(cgroup_dir.join("cgroup.procs"), std::process::id().to_string()).expect("join cgroup");
}

/// Connect-and-close latencies (µs) to `addr` from a thread inside `ns`.
fn connect_loop(ns: &NetNs, addr: SocketAddr, n: usize) -> Vec<f64> {
    let path = ns.path();
    std::thread::spawn(move || {
        let f = std::fs::File::open(&path).unwrap();
        // SAFETY: valid netns fd; only this thread changes namespace.
        assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
        (0..n)
            .map(|_| {
                let t = Instant::now();
                let s = TcpStream::connect(addr).expect("connect");
                drop(s);
                t.elapsed().as_secs_f64() * 1e6
            })
            .collect()
    })
    .join()
    .unwrap()
}

fn prefixes_config(root: &str, n: usize, exact: bool) -> String {
    let mut t = format!("[[workload]]\nname = \"w\"\ncgroup = \"{root}/w\"\ndefault = \"deny\"\n");
    // The benchmark's own target is allowed; the rest fill the policy.
    t.push_str("[[workload.allow]]\ncidr = \"10.77.0.1/32\"\nports = [80]\n");
    for i in 0..n.saturating_sub(1) {
        let i = i as u32 + 1;
        let (a, b, c) = ((i >> 16) & 0xff, (i >> 8) & 0xff, i & 0xff);
        if exact {
            t.push_str(&format!("[[workload.allow]]\ncidr = \"11.{a}.{b}.{c}/32\"\n"));
        } else {
            t.push_str(&format!("[[workload.allow]]\ncidr = \"{}.{a}.{b}.0/24\"\n", 12 + (c % 8)));
        }
    }
    t.push_str(&format!("[daemon]\nattach_cgroup = \"{root}\"\n[events]\nsink = \"none\"\n"));
    t
}

fn prog_stats(id: u64) -> (u64, u64) {
    let out = Command::new("bpftool").args(["-j", "prog", "show", "id", &id.to_string()]).output().expect("bpftool");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    (v["run_time_ns"].as_u64().unwrap_or(0), v["run_cnt"].as_u64().unwrap_or(0))
}

fn reload_to(d: &Daemon, text: &str) {
    let before = d.status()["generation"].as_u64().unwrap();
    d.write_config(text);
    d.signal(libc::SIGHUP);
    assert!(wait_until(Duration::from_secs(120), || d.status()["generation"].as_u64().unwrap() > before), "reload");
}

fn pss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Pss:").map(|v| v.trim().trim_end_matches(" kB").parse().unwrap_or(0)))
        .unwrap_or(0)
}

fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0) + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    // SAFETY: plain sysconf.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines().find(|l| l.starts_with(&format!("{name} "))).and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse().ok()).unwrap_or(0.0)
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let scale = |full: usize, q: usize| if quick { q } else { full };
    let mut rows: Vec<Row> = Vec::new();
    let ns = NetNs::new();
    ns.add_addr("10.77.0.1");
    ns.listen_tcp("10.77.0.1:80");
    ns.add_addr("169.254.169.254");
    let target: SocketAddr = "10.77.0.1:80".parse().unwrap();

    // 1. connect() latency, guarded with a 10,000-prefix policy vs no program, interleaved.
    let cg = TestCgroup::new();
    let (_, guarded) = cg.child("w");
    let baseline = TestCgroup::new(); // outside the attach point: no program runs there
    let d = Daemon::start(&prefixes_config(&cg.rel, 10_000, false));
    let (rounds, per) = (scale(20, 3), scale(2_000, 300));
    let (mut ours, mut none) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        join(&guarded);
        ours.extend(connect_loop(&ns, target, per));
        join(&baseline.dir);
        none.extend(connect_loop(&ns, target, per));
    }
    join(&cgroup_mount());
    let (p50o, p99o, p50n, p99n) = (pct(&mut ours.clone(), 0.5), pct(&mut ours, 0.99), pct(&mut none.clone(), 0.5), pct(&mut none, 0.99));
    rows.push(Row { name: "connect() p50, no program / mcp-guard (10,000 prefixes)".into(), value: format!("{p50n:.1} µs / {p50o:.1} µs = {:.3}", p50o / p50n), target: "ratio ≤ 1.05".into(), met: Some(p50o / p50n <= 1.05) });
    rows.push(Row { name: "connect() p99, no program / mcp-guard".into(), value: format!("{p99n:.1} µs / {p99o:.1} µs = {:.3}", p99o / p99n), target: "ratio ≤ 1.10".into(), met: Some(p99o / p99n <= 1.10) });

    // 2. Lookup scaling: the program's own run time per decision.
    let prog_id = d.status()["programs"]["connect4"].as_u64().unwrap();
    let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "1");
    let mut per_decision = Vec::new();
    let sizes: Vec<usize> = if quick { vec![100, 1_000] } else { vec![100, 1_000, 10_000, 100_000] };
    for exact in [true, false] {
        for &n in &sizes {
            reload_to(&d, &prefixes_config(&cg.rel, n, exact));
            join(&guarded);
            let (t0, c0) = prog_stats(prog_id);
            let _ = connect_loop(&ns, target, scale(20_000, 2_000));
            let (t1, c1) = prog_stats(prog_id);
            join(&cgroup_mount());
            let ns_per = (t1 - t0) as f64 / (c1 - c0).max(1) as f64;
            per_decision.push((exact, n, ns_per));
        }
    }
    let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "0");
    for exact in [true, false] {
        let v: Vec<&(bool, usize, f64)> = per_decision.iter().filter(|r| r.0 == exact).collect();
        let first = v.first().unwrap().2;
        let last = v.last().unwrap();
        let cells: Vec<String> = v.iter().map(|(_, n, t)| format!("{n}: {t:.0} ns")).collect();
        rows.push(Row {
            name: format!("connect4 run time per decision, {} ({} / {})", if exact { "/32 hosts" } else { "/24 prefixes" }, last.1, v[0].1),
            value: format!("{} (×{:.2})", cells.join(", "), last.2 / first),
            target: "largest ≤ 3× smallest".into(),
            met: Some(last.2 / first <= 3.0),
        });
    }
    drop(d);

    // 3 + 4. Event pipeline and footprint: 1,000 workloads, rate limit off, flood.
    let mut text = String::new();
    for w in 0..1_000 {
        text.push_str(&format!("[[workload]]\nname = \"w{w}\"\ncgroup = \"{}/w{w}\"\n", cg.rel));
    }
    text.push_str(&format!("[daemon]\nattach_cgroup = \"{}\"\n[events]\nrate_limit_per_sec = 0\nsink = \"none\"\n", cg.rel));
    let (_, flood_dir) = cg.child("w0");
    let d = Daemon::start(&text);
    std::thread::sleep(Duration::from_millis(500));
    let idle = pss_kib(d.pid());
    let m0 = d.get("/metrics");
    let cpu0 = cpu_seconds(d.pid());
    let t = Instant::now();
    let per_thread = scale(500_000, 50_000);
    let probes: Vec<_> = (0..2)
        .map(|_| {
            let (dir, path) = (flood_dir.clone(), ns.path());
            std::thread::spawn(move || {
                let probe = std::env::current_exe().unwrap().with_file_name("mcpg-probe");
                let mut p = Probe::at(probe.to_str().unwrap(), &dir, &path);
                p.op(&format!("udp-flood 169.254.169.254 53 {per_thread}"))
            })
        })
        .collect();
    for p in probes {
        p.join().unwrap();
    }
    let busy = pss_kib(d.pid());
    let m1 = {
        let mut last = String::new();
        wait_until(Duration::from_secs(30), || {
            last = d.get("/metrics");
            metric(&last, "mcp_guard_events_delivered_total") + metric(&last, "mcp_guard_events_lost_total") + metric(&last, "mcp_guard_events_suppressed_total")
                >= metric(&last, "mcp_guard_events_reported_total")
        });
        last
    };
    let elapsed = t.elapsed().as_secs_f64();
    let cpu = cpu_seconds(d.pid()) - cpu0;
    let delta = |name: &str| metric(&m1, name) - metric(&m0, name);
    let (reported, delivered, lost) = (delta("mcp_guard_events_reported_total"), delta("mcp_guard_events_delivered_total"), delta("mcp_guard_events_lost_total"));
    let rate = delivered / elapsed;
    rows.push(Row {
        name: "events: denied UDP sendto from 2 threads (real programs), rate limit off".into(),
        value: format!("{reported:.0} denied, {delivered:.0} delivered, {lost:.0} lost (counted); {rate:.0} events/s delivered; invariant {}", if (delivered + lost - reported).abs() < 0.5 { "exact" } else { "BROKEN" }),
        target: "≥ 1,000,000 events/s".into(),
        met: Some(rate >= 1_000_000.0),
    });
    let per_million = cpu / (delivered.max(1.0) / 1e6);
    rows.push(Row { name: "daemon CPU per million events".into(), value: format!("{per_million:.2} s"), target: "≤ 1 s".into(), met: Some(per_million <= 1.0) });
    rows.push(Row { name: "daemon PSS with 1,000 workloads, idle / under load".into(), value: format!("{:.1} MiB / {:.1} MiB", idle as f64 / 1024.0, busy as f64 / 1024.0), target: "< 30 MiB".into(), met: Some(busy.max(idle) < 30 * 1024) });
    drop(d);

    // 5. Reload: replacing a 10,000-rule policy in the maps (the daemon's own code path).
    let pins = Pins::new(&PathBuf::from("/sys/fs/bpf").join(unique("mcpg-bench")));
    pins.prepare().unwrap();
    let mut ebpf = mcp_guard::loader::open(&pins).unwrap();
    let mut maps = PolicyMaps::take(&mut ebpf).unwrap();
    let a = policy::compile(&config::parse(Path::new("a.toml"), &prefixes_config(&cg.rel, 10_000, false)).unwrap()).unwrap();
    let b = policy::compile(&config::parse(Path::new("b.toml"), &prefixes_config(&cg.rel, 10_000, true)).unwrap()).unwrap();
    maps.install(&a, &cgroup_mount(), 0).unwrap();
    maps.install(&b, &cgroup_mount(), 0).unwrap();
    let mut times = Vec::new();
    for i in 0..scale(10, 3) {
        let t = Instant::now();
        maps.install(if i % 2 == 0 { &a } else { &b }, &cgroup_mount(), 0).unwrap();
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    drop(maps);
    drop(ebpf);
    let _ = pins.uninstall();
    let p50 = pct(&mut times, 0.5);
    rows.push(Row { name: "reload: replace a 10,000-rule policy atomically (map writes, p50)".into(), value: format!("{p50:.1} ms"), target: "< 50 ms".into(), met: Some(p50 < 50.0) });
    rows.push(Row { name: "iptables / nftables comparison".into(), value: "not measured yet".into(), target: "≥ 10× lower overhead than iptables; ≤ nftables".into(), met: None });

    // Report.
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mut md = format!("Machine: Linux {}, {cpus} CPUs{}.\n\n| Measurement | Result | Target | Met |\n|---|---|---|---|\n", kernel.trim(), if quick { " (--quick: small samples, not for conclusions)" } else { "" });
    for r in &rows {
        let _ = writeln!(md, "| {} | {} | {} | {} |", r.name, r.value, r.target, match r.met { Some(true) => "yes", Some(false) => "**no**", None => "n/a" });
    }
    println!("{md}");
    let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/bench"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::File::create(dir.join("results.md")).unwrap().write_all(md.as_bytes()).unwrap();
    let json: Vec<serde_json::Value> = rows.iter().map(|r| serde_json::json!({"name": r.name, "value": r.value, "target": r.target, "met": r.met})).collect();
    std::fs::write(dir.join("results.json"), serde_json::to_string_pretty(&serde_json::json!({"kernel": kernel.trim(), "cpus": cpus, "quick": quick, "rows": json})).unwrap()).unwrap();
    println!("written: {}", dir.join("results.md").display());
}
