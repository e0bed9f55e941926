//! One attribution: the table in `mcp_guard::host::attribution::CASES` (which registered
//! cgroup owns a process) checked against the kernel's `nearest_workload` (a probe in
//! each case's cgroup connects, the event names the workload that decided) and against
//! the user-space [`Registered`] every other part of the daemon asks (the DNS proxy, pod
//! mode, enrichment, the posture scan and the homes pass), on the same cgroups.

use std::time::Duration;

use mcp_guard::host::{
    attribution::{Registered, CASES},
    cgroup,
};
use mcp_guard_tests::{cgroup_mount, wait_until, Daemon, NetNs, Probe, TestCgroup};

const PROBE: &str = env!("CARGO_BIN_EXE_mcpg-probe");

/// A workload's name for a registered path of case `n`.
fn name(n: usize, path: &str) -> String {
    format!("c{n}-{}", path.replace('/', "-"))
}

#[test]
fn the_kernel_and_user_space_attribute_every_case_alike() {
    let ns = NetNs::new();
    ns.add_addr("169.254.169.254");
    ns.listen_tcp("169.254.169.254:80");
    let cg = TestCgroup::new();
    let mut config = String::from("mode = \"enforce\"\n[baseline]\ndeny = [\"metadata\"]\n");
    let mut registered = 0;
    for (n, case) in CASES.iter().enumerate() {
        for p in case.registered {
            cg.child(&format!("c{n}/{p}"));
            config.push_str(&format!(
                "[[workload]]\nname = \"{}\"\ncgroup = \"{}/c{n}/{p}\"\ndefault = \"allow\"\n",
                name(n, p),
                cg.rel
            ));
            registered += 1;
        }
        cg.child(&format!("c{n}/{}", case.process));
    }
    config.push_str(&format!(
        "[daemon]\nattach_cgroup = \"{}\"\n[events]\nrate_limit_per_sec = 0\n",
        cg.rel
    ));
    let d = Daemon::start(&config);
    let count = || {
        d.status()["workloads"].as_array().map_or(0, |w| {
            w.iter()
                .filter(|w| !w["cgroup_ids"].as_array().is_none_or(Vec::is_empty))
                .count()
        })
    };
    assert!(
        wait_until(Duration::from_secs(3), || count() == registered),
        "every registered path is registered: {}",
        d.status()
    );

    // What user space decides, from the same directories.
    let mount = cgroup_mount();
    let user = Registered::new(
        &mount,
        CASES.iter().enumerate().flat_map(|(n, case)| {
            let (cg, mount) = (&cg, &mount);
            case.registered.iter().enumerate().map(move |(i, p)| {
                let rel = format!("{}/c{n}/{p}", cg.rel);
                let id = cgroup::id(mount, &rel).expect("cgroup id");
                (id, cgroup::fs_path(mount, &rel), i as u32, name(n, p))
            })
        }),
    );

    let _ = d.events(Duration::from_millis(300));
    for (n, case) in CASES.iter().enumerate() {
        let want = case.owner.map(|o| name(n, o));
        let dir = cg.dir.join(format!("c{n}/{}", case.process));
        // The kernel: refused (the baseline) and named, or not guarded at all.
        let mut p = Probe::new(PROBE, &dir, &ns);
        let got = p.op("tcp 169.254.169.254 80");
        let kernel = if got == "EPERM" {
            let mut found = None;
            wait_until(Duration::from_secs(3), || {
                found = d
                    .events(Duration::from_millis(100))
                    .into_iter()
                    .find(|e| e["dport"] == 80 && e["dst"] == "169.254.169.254");
                found.is_some()
            });
            let e = found.unwrap_or_else(|| panic!("case {n}: a refusal with no event"));
            e["workload"].as_str().map(str::to_string)
        } else {
            assert_eq!(got, "OK", "case {n}");
            None
        };
        assert_eq!(
            kernel, want,
            "case {n}: the kernel attributes {} (registered {:?})",
            case.process, case.registered
        );
        // User space, by cgroup id (what the DNS proxy and enrichment ask).
        let id = cgroup::id(&mount, &format!("{}/c{n}/{}", cg.rel, case.process)).unwrap();
        let located = user.locate(id).map(|(_, d)| d.workload.clone());
        assert_eq!(located, want, "case {n}: user space, by id");
        // And by path (pure).
        let nearest = user.nearest(&dir).map(|d| d.workload.clone());
        assert_eq!(nearest, want, "case {n}: user space, by path");
        drop(p);
    }
}
