//! Metrics as operators consume them: promtool lints the daemon's /metrics, and a real
//! Prometheus server (Debian's package) scrapes the daemon with the shipped alert rules
//! and fires the metadata alert after one denied connection from a test namespace.

use std::{
    io::Write,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use mcp_guard_tests::{free_port, wait_until, Daemon, NetNs, Probe, TempDir, TestCgroup};

const PROBE: &str = env!("CARGO_BIN_EXE_mcpg-probe");

fn rules() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/prometheus/mcp-guard-rules.yml"
    ))
    .canonicalize()
    .unwrap()
}

struct Prometheus {
    child: Child,
    addr: String,
    _dir: TempDir,
}

impl Prometheus {
    fn start(target: &str) -> Self {
        let dir = TempDir::new();
        let port = free_port();
        let config = dir.0.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: mcp-guard\n    static_configs:\n      - targets: ['{target}']\n",
                rules().display()
            ),
        )
        .unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.0.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus (Debian package `prometheus`) must be installed: cargo xtask test installs it");
        let p = Self {
            child,
            addr: format!("127.0.0.1:{port}"),
            _dir: dir,
        };
        assert!(
            wait_until(Duration::from_secs(30), || p.get("/-/ready").is_some()),
            "prometheus never became ready"
        );
        p
    }

    fn get(&self, path: &str) -> Option<String> {
        mcp_guard::api::client::get_body(
            &mcp_guard::api::client::Endpoint::Tcp(self.addr.parse().unwrap()),
            path,
        )
        .ok()
    }

    /// The alerts Prometheus holds. An unreachable or failing API fails the test: an
    /// empty list would pass "no alert" checks vacuously.
    fn alerts(&self) -> Vec<serde_json::Value> {
        let body = self
            .get("/api/v1/alerts")
            .expect("Prometheus /api/v1/alerts answers");
        let v: serde_json::Value = serde_json::from_str(&body).expect("Prometheus answers JSON");
        assert_eq!(v["status"], "success", "Prometheus /api/v1/alerts: {v}");
        v["data"]["alerts"]
            .as_array()
            .cloned()
            .unwrap_or_else(|| panic!("no alert list in {v}"))
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn lab() -> (NetNs, TestCgroup, Daemon) {
    let ns = NetNs::new();
    ns.add_addr("169.254.169.254");
    let cg = TestCgroup::new();
    cg.child("github-mcp");
    let d = Daemon::start(&format!(
        "[baseline]\ndeny = [\"metadata\"]\n[[workload]]\nname = \"github-mcp\"\ncgroup = \"{r}/github-mcp\"\n[daemon]\nattach_cgroup = \"{r}\"\n",
        r = cg.rel
    ));
    (ns, cg, d)
}

#[test]
fn promtool_finds_no_problem_in_metrics() {
    let (ns, cg, d) = lab();
    // Some traffic first, so labelled series exist too.
    let mut p = Probe::new(PROBE, &cg.dir.join("github-mcp"), &ns);
    assert_eq!(p.op("tcp 169.254.169.254 80"), "EPERM");
    let metrics = d.get("/metrics");
    assert!(
        metrics.contains("mcp_guard_denied_flows_total{"),
        "{metrics}"
    );
    let mut lint = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool");
    lint.stdin
        .take()
        .unwrap()
        .write_all(metrics.as_bytes())
        .unwrap();
    let out = lint.wait_with_output().unwrap();
    let report = mcp_guard_tests::output_text(&out);
    assert!(
        out.status.success() && report.trim().is_empty(),
        "promtool check metrics:\n{report}"
    );
}

#[test]
fn shipped_rules_pass_promtool() {
    let dir = rules().parent().unwrap().to_path_buf();
    for args in [
        vec!["check", "rules", "mcp-guard-rules.yml"],
        vec!["test", "rules", "mcp-guard-rules.test.yml"],
    ] {
        let out = Command::new("promtool")
            .args(&args)
            .current_dir(&dir)
            .output()
            .expect("promtool");
        assert!(
            out.status.success(),
            "promtool {args:?}:\n{}",
            mcp_guard_tests::output_text(&out)
        );
    }
}

#[test]
fn real_prometheus_fires_the_metadata_alert() {
    let (ns, cg, d) = lab();
    let prom = Prometheus::start(&d.listen.to_string());
    let up = || {
        prom.get("/api/v1/query?query=up%7Bjob%3D%22mcp-guard%22%7D%3D%3D1")
            .is_some_and(|b| b.contains("\"value\""))
    };
    assert!(
        wait_until(Duration::from_secs(20), up),
        "prometheus never scraped the daemon"
    );
    // On a kernel that refuses BPF LSM programs (this machine's), the packet-socket
    // warning is pending from the start, and rightly so; it is the only other alert allowed.
    let lsm_missing = d.get("/metrics").contains("\nmcp_guard_lsm_available 0\n");
    // McpGuardAbsent may be pending from an evaluation before the first scrape (it
    // needs five minutes of absence to fire).
    let expected_other = |a: &serde_json::Value| {
        (lsm_missing && a["labels"]["alertname"] == "McpGuardPacketSocketsOpen")
            || (a["labels"]["alertname"] == "McpGuardAbsent" && a["state"] == "pending")
    };
    assert!(
        prom.alerts().iter().all(expected_other),
        "no alert before the attack: {:#?}",
        prom.alerts()
    );

    let mut p = Probe::new(PROBE, &cg.dir.join("github-mcp"), &ns);
    assert_eq!(p.op("tcp 169.254.169.254 80"), "EPERM");

    let mut alerts = Vec::new();
    let fired = wait_until(Duration::from_secs(30), || {
        alerts = prom.alerts();
        alerts.iter().any(|a| {
            a["labels"]["alertname"] == "McpGuardMetadataAccessDenied" && a["state"] == "firing"
        })
    });
    assert!(fired, "metadata alert did not fire: {alerts:#?}");
    let a = alerts
        .iter()
        .find(|a| a["labels"]["alertname"] == "McpGuardMetadataAccessDenied")
        .unwrap();
    assert_eq!(a["labels"]["workload"], "github-mcp");
    assert_eq!(a["labels"]["severity"], "critical");
    assert!(a["annotations"]["summary"]
        .as_str()
        .unwrap()
        .contains("github-mcp"));
    assert!(
        alerts.iter().all(
            |a| a["labels"]["alertname"] == "McpGuardMetadataAccessDenied" || expected_other(a)
        ),
        "only the metadata alert fires: {alerts:#?}"
    );

    // Every dashboard query evaluates against this Prometheus and the live daemon's
    // series (Grafana's variables replaced as Grafana would); the metadata stat counts
    // the workload that just tried.
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/grafana/mcp-guard-dashboard.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let encode = |q: &str| -> String {
        q.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect()
    };
    let panels = dashboard["panels"].as_array().unwrap();
    assert!(panels.len() >= 20, "{} panels", panels.len());
    for panel in panels {
        for t in panel["targets"].as_array().unwrap() {
            let expr = t["expr"]
                .as_str()
                .unwrap()
                .replace("$instance", ".*")
                .replace("$__range_s", "3600")
                .replace("$__range", "1h");
            let body = prom
                .get(&format!("/api/v1/query?query={}", encode(&expr)))
                .unwrap_or_else(|| panic!("{}: {expr} did not evaluate", panel["title"]));
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(v["status"], "success", "{}: {expr}: {body}", panel["title"]);
        }
    }
    let stat = panels[0]["targets"][0]["expr"]
        .as_str()
        .unwrap()
        .replace("$instance", ".*")
        .replace("$__range_s", "3600");
    let body = prom
        .get(&format!("/api/v1/query?query={}", encode(&stat)))
        .unwrap();
    assert!(
        body.contains("\"1\"]"),
        "one workload tried metadata: {body}"
    );
}
