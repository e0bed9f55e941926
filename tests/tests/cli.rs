//! The CLI contract as a user meets it: exit codes and messages.

use std::process::Command;

use mcp_guard_tests::{guard_bin, TempDir, TestCgroup};

fn run(args: &[&str], config: &str) -> (i32, String, String) {
    let dir = TempDir::new();
    let path = dir.0.join("config.toml");
    std::fs::write(&path, config).unwrap();
    let out = Command::new(guard_bin())
        .args(args.iter().map(|a| {
            if *a == "CFG" {
                path.to_str().unwrap()
            } else {
                a
            }
        }))
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn check_rejects_bad_input_with_file_and_line() {
    let cases = [
        ("[[workload]]\nname='a'\ncgroup='/a'\nportz=[1]\n", "config.toml:4:1", "unknown field `portz`"),
        ("[[workload]]\nname='a'\ncgroup='/a'\n[[workload.allow]]\ncidr='10.0.0.0/33'\n", "config.toml:5:", "not a valid CIDR"),
        ("[[workload]]\nname='a'\ncgroup='/a'\n[[workload.allow]]\ncidr='10.0.0.0/8'\nports=[0]\n", "config.toml:6:", "1 to 65535"),
        ("[[workload]]\nname='a'\ncgroup='/a'\n[[workload.allow]]\ncidr='10.0.0.0/8'\nports=[70000]\n", "config.toml:6:", "1 to 65535"),
        ("[[workload]]\nname='a'\ncgroup='/a'\n[[workload.allow]]\ncidr='10.0.0.0/8'\nports=['90-80']\n", "config.toml:6:", "inverted"),
        ("[[workload]]\nname='a'\ncgroup='/a'\n[[workload]]\nname='a'\ncgroup='/b'\n", "config.toml:5:", "duplicate workload name"),
        ("[[workload]]\nname='a'\ncgroup='/a'\n[[workload]]\nname='b'\ncgroup='/a'\n", "config.toml:6:", "duplicate workload cgroup"),
    ];
    for (config, place, what) in cases {
        let (code, _, err) = run(&["check", "--config", "CFG"], config);
        assert_eq!(code, 2, "{config}\n{err}");
        assert!(
            err.contains(place) && err.contains(what),
            "expected {place} {what}, got: {err}"
        );
    }
}

#[test]
fn check_warns_about_a_missing_cgroup_but_succeeds() {
    let (code, out, err) = run(
        &["check", "--config", "CFG"],
        "[[workload]]\nname='a'\ncgroup='/no-such-cgroup-mcpg'\n",
    );
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("does not exist yet"), "{err}");
    assert!(
        out.contains("baseline deny metadata (built-in default)"),
        "{out}"
    );
}

#[test]
fn explain_names_the_deciding_rule() {
    let cfg = "[baseline]\ndeny=['metadata']\n[[workload]]\nname='a'\ncgroup='/a'\n[[workload.allow]]\ncidr='10.0.12.0/24'\nports=[5432]\nproto='tcp'\n";
    let (code, out, _) = run(
        &[
            "explain",
            "--config",
            "CFG",
            "--workload",
            "a",
            "[::ffff:169.254.169.254]:80",
        ],
        cfg,
    );
    assert_eq!(code, 1, "DENY exits 1");
    assert!(
        out.contains("169.254.169.254 port 80/tcp: DENY (baseline-metadata)")
            && out.contains("rule #1"),
        "{out}"
    );
    let (_, out, _) = run(
        &[
            "explain",
            "--config",
            "CFG",
            "--workload",
            "a",
            "10.0.12.9:5432/udp",
        ],
        cfg,
    );
    assert!(out.contains("DENY (not-allowed)"), "{out}");
    let (_, out, _) = run(
        &[
            "explain",
            "--config",
            "CFG",
            "--workload",
            "a",
            "10.0.12.9:5432",
        ],
        cfg,
    );
    assert!(
        out.contains("ALLOW") && out.contains("config.toml:7"),
        "{out}"
    );
    let (code, _, err) = run(
        &[
            "explain",
            "--config",
            "CFG",
            "--workload",
            "nope",
            "1.1.1.1:1",
        ],
        cfg,
    );
    assert_eq!(code, 2);
    assert!(err.contains("no workload named \"nope\""), "{err}");
}

#[test]
fn exec_refuses_to_run_unguarded() {
    let cg = TestCgroup::new();
    // A stranger answers on the metrics port with a plausible /status naming this very
    // cgroup: exec decides from the kernel's pinned state, not from whoever answers.
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    let cfg = format!(
        "[[workload]]\nname='a'\ncgroup='{}/a'\n[metrics]\nlisten='127.0.0.1:{port}'\n",
        cg.rel
    );
    let id = std::fs::metadata(cg.child("a").1)
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .unwrap();
    std::thread::spawn(move || {
        use std::io::{Read as _, Write as _};
        for mut s in listener.incoming().flatten() {
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            let body = format!("{{\"workloads\":[{{\"name\":\"a\",\"cgroup_id\":{id}}}],\"programs\":{{\"connect4\":1}}}}");
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
        }
    });
    let (code, _, err) = run(
        &["exec", "--config", "CFG", "--workload", "a", "--", "true"],
        &cfg,
    );
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("is not enforced") && err.contains("--unguarded"),
        "{err}"
    );
}

/// `mcp-guard enforced` (a unit's `ExecStartPre=`): exit 1 with the reason while nothing
/// enforces the workload, 0 once the daemon does.
#[test]
fn enforced_waits_for_the_kernel() {
    let cg = TestCgroup::new();
    let cfg = format!(
        "[[workload]]\nname='a'\ncgroup='{r}/a'\n[daemon]\nattach_cgroup='{r}'\n",
        r = cg.rel
    );
    let (code, _, err) = run(
        &[
            "enforced",
            "--config",
            "CFG",
            "--workload",
            "a",
            "--wait",
            "1",
        ],
        &format!("{cfg}pin_dir='/sys/fs/bpf/mcpg-test-nothing-here'\n"),
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("not enforced"), "{err}");
    let d = mcp_guard_tests::Daemon::start(&cfg);
    let out = Command::new(guard_bin())
        .args(["enforced", "--config"])
        .arg(&d.config)
        .args(["--workload", "a", "--wait", "5"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("enforced by the kernel"));
}

/// `check` warns about a dangerous policy with file, line and the fix, and `--strict`
/// turns the warning into a failing exit.
#[test]
fn check_warns_about_dangerous_policies_and_strict_fails() {
    let cfg = "[[workload]]\nname = 'a'\ncgroup = '/mcp.slice/a.service'\ndefault = 'deny'\n[[workload.allow]]\ncidr = '0.0.0.0/0'\n";
    let (code, _, err) = run(&["check", "--config", "CFG"], cfg);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains(":6: workload \"a\" allows 0.0.0.0/0 under default = \"deny\""),
        "{err}"
    );
    let (code, _, err) = run(&["check", "--strict", "--config", "CFG"], cfg);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("1 warning(s) and --strict"), "{err}");
}

/// `explain` refuses malformed destinations (exit 2), matches names against the host
/// rules offline, and exits 0 on ALLOW, 1 on DENY.
#[test]
fn explain_refuses_malformed_destinations_and_matches_names_offline() {
    let cfg = "[[workload]]\nname='a'\ncgroup='/a'\ndefault='deny'\n[[workload.allow]]\nhost='*.slack.com'\nports=[443]\n[[workload.allow]]\ncidr='93.184.216.0/24'\nports=[443]\n[dns]\nproxy='127.0.0.153:53'\n";
    for bad in [
        "1.1.1.1:99999",
        "999.1.1.1:80",
        "[fe80::1%eth0]:80",
        "x.y:abc",
        "host-only",
    ] {
        let (code, _, err) = run(&["explain", "--config", "CFG", "--workload", "a", bad], cfg);
        assert_eq!(code, 2, "{bad}: {err}");
        assert!(
            err.contains("is neither ADDR:PORT") || err.contains("is not ADDR:PORT"),
            "{bad}: {err}"
        );
    }
    let (code, out, _) = run(
        &[
            "explain",
            "--config",
            "CFG",
            "--workload",
            "a",
            "files.slack.com:443",
        ],
        cfg,
    );
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("files.slack.com: matches allow host *.slack.com (") && out.contains(":6)"),
        "{out}"
    );
    let (code, out, _) = run(
        &[
            "explain",
            "--config",
            "CFG",
            "--workload",
            "a",
            "evil.example.com:443",
        ],
        cfg,
    );
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("evil.example.com: DENY: no host rule of this workload matches the name"),
        "{out}"
    );
    let (code, out, _) = run(
        &[
            "explain",
            "--config",
            "CFG",
            "--workload",
            "a",
            "93.184.216.34:443",
        ],
        cfg,
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("ALLOW"), "{out}");
}
