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
        ("[[workload]]\nname='a'\ncgroup='/a'\n[events]\ncmdline='stdout'\n", "config.toml:5:", "unknown events.cmdline \"stdout\": use \"control\""),
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

/// A config whose rules need more memory than the shipped DaemonSet allows: a warning
/// with the count, the estimate and the limit to set; `--strict` fails. Just under the
/// budget: no warning.
#[test]
fn check_warns_when_the_rules_outgrow_the_daemonsets_memory_limit() {
    use mcp_guard::config::budget;
    let config = |n: usize| {
        let mut t = String::from("[[workload]]\nname = 'a'\ncgroup = '/a'\ndefault = 'deny'\n");
        for i in 0..n {
            t.push_str(&format!(
                "[[workload.allow]]\ncidr = '10.{}.{}.0/24'\n",
                i / 256,
                i % 256
            ));
        }
        t
    };
    let within = budget::rules_within(budget::DAEMONSET_LIMIT_MIB);
    let (code, _, err) = run(&["check", "--strict", "--config", "CFG"], &config(within));
    assert_eq!(code, 0, "{within} rules: {err}");
    let (code, _, err) = run(&["check", "--config", "CFG"], &config(within + 2000));
    assert_eq!(code, 0, "{err}");
    let want = format!(
        "{} rules need about {} MiB in the daemon (with its kernel maps), more than the shipped DaemonSet's memory limit of {} MiB (about {within} rules): raise resources.limits.memory to",
        within + 2000,
        budget::estimate_mib(within + 2000),
        budget::DAEMONSET_LIMIT_MIB
    );
    assert!(err.contains(&want), "{err}");
    let (code, _, _) = run(
        &["check", "--strict", "--config", "CFG"],
        &config(within + 2000),
    );
    assert_eq!(code, 1);
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

/// The config comes from `--config`, else `MCP_GUARD_CONFIG`, else the default path,
/// which an error names.
#[test]
fn the_config_path_has_an_environment_variable_and_a_default() {
    let dir = TempDir::new();
    let path = dir.0.join("c.toml");
    std::fs::write(
        &path,
        "[[workload]]\nname = \"a\"\ncgroup = \"/mcpg-cli-a\"\n",
    )
    .unwrap();
    let out = Command::new(guard_bin())
        .arg("check")
        .env("MCP_GUARD_CONFIG", &path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("workload"));
    let out = Command::new(guard_bin())
        .arg("check")
        .env_remove("MCP_GUARD_CONFIG")
        .output()
        .unwrap();
    if !std::path::Path::new("/etc/mcp-guard/config.toml").exists() {
        assert_eq!(out.status.code(), Some(2));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("/etc/mcp-guard/config.toml"),
            "{out:?}"
        );
    }
    let help = Command::new(guard_bin()).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for documented in [
        "MCP_GUARD_LOG ",
        "MCP_GUARD_CONFIG",
        "MCP_GUARD_LOG_FORMAT",
        "--log-format",
    ] {
        assert!(help.contains(documented), "{documented} in --help:\n{help}");
    }
}

/// Logs: JSON objects with --log-format json; text without colour codes when stderr is
/// not a terminal (journald, kubectl logs, a file).
#[test]
fn log_lines_are_json_on_request_and_never_coloured_off_a_terminal() {
    // `run` logs that a workload's cgroup does not exist yet, then stops at a metrics port
    // that is taken, before it touches the kernel.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dir = TempDir::new();
    let path = dir.0.join("c.toml");
    std::fs::write(
        &path,
        format!(
            "[[workload]]\nname = \"a\"\ncgroup = \"/mcpg-cli-missing\"\n[metrics]\nlisten = \"{}\"\n",
            taken.local_addr().unwrap()
        ),
    )
    .unwrap();
    let out = Command::new(guard_bin())
        .args(["--log-format", "json", "run", "--config"])
        .arg(&path)
        .env_remove("NO_COLOR")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    let logged: Vec<serde_json::Value> = err
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(
        logged.iter().any(|v| v["level"] == "WARN"
            && v["timestamp"].is_string()
            && v["message"]
                .as_str()
                .is_some_and(|m| m.contains("does not exist yet"))
            && v["workload"] == "a"),
        "{err}"
    );
    let out = Command::new(guard_bin())
        .args(["run", "--config"])
        .arg(&path)
        .env_remove("NO_COLOR")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist yet"));
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains('\u{1b}'),
        "ANSI escape codes in logs that go to a pipe"
    );
    let bad = Command::new(guard_bin())
        .args(["--log-format", "xml", "check"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("possible values: text, json"));
}

/// Shell completions and man pages come from the CLI's own definition.
#[test]
fn completions_and_man_pages_are_generated() {
    for (shell, marker) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef mcp-guard"),
        ("fish", "complete -c mcp-guard"),
    ] {
        let out = Command::new(guard_bin())
            .args(["completions", shell])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains(marker),
            "{shell}: {}",
            &text[..text.len().min(300)]
        );
        for sub in ["status", "explain", "exec", "events"] {
            assert!(text.contains(sub), "{shell} completes {sub}");
        }
    }
    let dir = TempDir::new();
    let out = Command::new(guard_bin())
        .arg("man")
        .arg(dir.0.join("man1"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    for page in [
        "mcp-guard.1",
        "mcp-guard-status.1",
        "mcp-guard-exec.1",
        "mcp-guard-check.1",
    ] {
        let text = std::fs::read_to_string(dir.0.join("man1").join(page)).unwrap();
        assert!(text.starts_with(".ie") || text.contains(".TH"), "{page}");
    }
    assert!(
        !dir.0.join("man1/mcp-guard-exec-instance.1").exists(),
        "hidden subcommands get no page"
    );
}

/// `status` without a daemon: exit 2 and a message saying where it looked.
#[test]
fn status_without_a_daemon_says_where_it_looked() {
    let dir = TempDir::new();
    let sock = dir.0.join("none.sock");
    let out = Command::new(guard_bin())
        .args(["status", "--socket"])
        .arg(&sock)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&*sock.to_string_lossy()),
        "{out:?}"
    );
}

/// `check --json`: the same verdicts as the text form, for scripts and CI.
#[test]
fn check_json_has_errors_and_warnings_with_their_lines() {
    let (code, out, _) = run(
        &["check", "--json", "--config", "CFG"],
        "[[workload]]\nname = \"a\"\ncgroup = \"/system.slice\"\ndefault = \"deny\"\n[[workload.allow]]\ncidr = \"0.0.0.0/0\"\n",
    );
    assert_eq!(code, 0, "warnings alone pass without --strict");
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(doc["valid"], true);
    let lines: Vec<u64> = doc["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|w| w["line"].as_u64())
        .collect();
    assert!(lines.contains(&2) && lines.contains(&6), "{doc:#}");
    assert_eq!(doc["workloads"][0]["default"], "deny");
    assert!(doc["map_entries"]["prefix"].as_u64().unwrap() > 0);
    let (code, _, _) = run(
        &["check", "--json", "--strict", "--config", "CFG"],
        "[[workload]]\nname = \"a\"\ncgroup = \"/system.slice\"\n",
    );
    assert_eq!(code, 1, "--strict fails on warnings");
    let (code, out, _) = run(
        &["check", "--json", "--config", "CFG"],
        "[[workload]]\nname = \"a\"\ncgroup = \"/a\"\nportz = 1\n",
    );
    assert_eq!(code, 2);
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(doc["valid"], false);
    assert_eq!(
        (
            doc["errors"][0]["line"].as_u64(),
            doc["errors"][0]["column"].as_u64()
        ),
        (Some(4), Some(1))
    );
    assert!(doc["errors"][0]["message"]
        .as_str()
        .unwrap()
        .contains("unknown field `portz`"));
}

/// `explain --json`: the verdict and, per address judged, the reason and the rule.
#[test]
fn explain_json_names_the_reason_and_the_rule() {
    let config = "[[workload]]\nname = \"a\"\ncgroup = \"/a\"\ndefault = \"deny-internal\"\n[[workload.allow]]\ncidr = \"10.1.0.0/16\"\nports = [5432]\n";
    let (code, out, _) = run(
        &[
            "explain",
            "--json",
            "--config",
            "CFG",
            "-w",
            "a",
            "169.254.169.254:80",
        ],
        config,
    );
    assert_eq!(code, 1, "DENY exits 1");
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(doc["verdict"], "deny");
    assert_eq!(doc["results"][0]["reason"], "baseline-metadata");
    assert_eq!(doc["results"][0]["rule_id"], 1);
    let (code, out, _) = run(
        &[
            "explain",
            "--json",
            "--config",
            "CFG",
            "-w",
            "a",
            "10.1.2.3:5432/tcp",
        ],
        config,
    );
    assert_eq!(code, 0);
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(doc["verdict"], "allow");
    assert!(doc["results"][0]["rule"]
        .as_str()
        .unwrap()
        .contains("config.toml:6"));
    let (code, out, err) = run(
        &[
            "explain",
            "--json",
            "--config",
            "CFG",
            "-w",
            "a",
            "1.1.1.1:99999",
        ],
        config,
    );
    assert_eq!(
        (code, out.as_str()),
        (2, ""),
        "a bad destination: no document, exit 2"
    );
    assert!(err.contains("neither ADDR:PORT"));
}
