//! Kubernetes pods through the container runtime (#18): a real containerd with its CRI
//! plugin and runc (Debian's packages), driven over CRI the way the kubelet drives it
//! (RunPodSandbox with a cgroup parent, labels and annotations; CreateContainer and
//! StartContainer). Each pod's network is a veth pair with both ends in the pod, and its loopback: the
//! "metadata", "internal" and "public" addresses are put on the pod's own loopback, so
//! nothing leaves the pod's network namespace. Probes join a pod's cgroup and network
//! namespace; a container of the pod runs a connect probe of its own.

use std::{path::Path, time::Duration};

use mcp_guard_tests::{
    assert_event_schema,
    cri::{self, in_pod, link_to, pod, Containerd, Pod, PodSpec, INTERNAL, METADATA, PUBLIC},
    wait_until, Daemon, NetNs, Probe, TestCgroup,
};
use serde_json::Value;

const PROBE: &str = env!("CARGO_BIN_EXE_mcpg-probe");
const GITHUB_LABEL: (&str, &str) = ("app.kubernetes.io/name", "github-mcp");

/// A node-wide workload on the test's cgroup (like `/kubepods`: every pod, baseline
/// only), a workload selecting pods by namespace and labels, one taking pods by
/// annotation, and the runtime's socket.
fn config(cg: &TestCgroup, c: &Containerd, pod_cgroups: &str) -> String {
    cri::node_config(&cg.rel, c, pod_cgroups, "", "")
}

fn default_pod_cgroups(cg: &TestCgroup) -> String {
    format!("[\"{}/pod*\"]", cg.rel)
}

/// (metadata, internal, public) as a probe in the pod's cgroup and netns sees them:
/// EPERM is a denial; "ERR 111" (connection refused by the pod's own stack) means the
/// policy let it through.
fn verdicts(p: &Pod) -> [String; 3] {
    let mut probe = Probe::at(PROBE, &p.dir, &p.netns);
    [METADATA, INTERNAL, PUBLIC].map(|a| probe.op(&format!("tcp {a} 80")))
}

fn status_pods(d: &Daemon, workload: &str) -> Vec<Value> {
    d.placed_pods(workload)
}

/// Whether the runtime's list placed pod `name` (in a workload or none).
fn listed(d: &Daemon, name: &str) -> bool {
    d.status()["pods"]
        .as_array()
        .is_some_and(|p| p.iter().any(|p| p["name"] == name))
}

fn registered(d: &Daemon, workload: &str, name: &str) -> bool {
    status_pods(d, workload).iter().any(|p| p["name"] == name)
}

fn metric(d: &Daemon, series: &str) -> Option<f64> {
    d.get("/metrics")
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

const DENIED: &str = "EPERM";
const REACHED: &str = "ERR 111";

#[test]
fn pods_are_selected_by_namespace_labels_and_annotation() {
    let cg = TestCgroup::new();
    let mut c = Containerd::start();
    let d = Daemon::start(&config(&cg, &c, &default_pod_cgroups(&cg)));
    let gh_parent = format!("{}/pod-github", cg.rel);
    let gh_spec = PodSpec {
        namespace: "mcp",
        name: "github-mcp-7f9c",
        labels: &[GITHUB_LABEL, ("pod-template-hash", "7f9c")],
        annotations: &[],
        cgroup_parent: &gh_parent,
    };
    let gh = pod(&mut c, &cg, &gh_spec);
    let other_ns_parent = format!("{}/pod-otherns", cg.rel);
    let other_ns = pod(
        &mut c,
        &cg,
        &PodSpec {
            namespace: "default",
            name: "github-mcp-lookalike",
            labels: &[GITHUB_LABEL],
            annotations: &[],
            cgroup_parent: &other_ns_parent,
        },
    );
    let other_labels_parent = format!("{}/pod-otherlabels", cg.rel);
    let other_labels = pod(
        &mut c,
        &cg,
        &PodSpec {
            namespace: "mcp",
            name: "slack-mcp",
            labels: &[("app.kubernetes.io/name", "slack-mcp")],
            annotations: &[],
            cgroup_parent: &other_labels_parent,
        },
    );
    let annotated_parent = format!("{}/pod-annotated", cg.rel);
    let annotated = pod(
        &mut c,
        &cg,
        &PodSpec {
            namespace: "tools",
            name: "sandboxed-mcp",
            labels: &[],
            annotations: &[("mcp-guard.dev/workload", "locked")],
            cgroup_parent: &annotated_parent,
        },
    );
    // An annotation naming a workload that does not take pods by annotation is ignored.
    let wrong_ann_parent = format!("{}/pod-wrongann", cg.rel);
    let wrong_ann = pod(
        &mut c,
        &cg,
        &PodSpec {
            namespace: "tools",
            name: "sneaky-mcp",
            labels: &[],
            annotations: &[("mcp-guard.dev/workload", "github-mcp")],
            cgroup_parent: &wrong_ann_parent,
        },
    );
    assert!(
        wait_until(Duration::from_secs(10), || d.status()["pods"]
            .as_array()
            .is_some_and(|p| p.len() == 5)),
        "not every pod was placed: {}\n{}",
        d.status(),
        d.stderr.lock().unwrap()
    );
    assert!(
        registered(&d, "github-mcp", "github-mcp-7f9c")
            && registered(&d, "locked", "sandboxed-mcp")
    );
    // Placed pods are no longer pending (the scan catches up within 100 ms).
    assert!(
        wait_until(Duration::from_secs(5), || metric(
            &d,
            "mcp_guard_pods{workload=\"pods-pending\"}"
        ) == Some(0.0)),
        "pods still pending: {}",
        d.get("/metrics")
    );
    assert_eq!(
        verdicts(&gh),
        [DENIED, DENIED, REACHED],
        "selected by namespace and labels: deny-internal"
    );
    for (what, p) in [
        ("same labels, another namespace", &other_ns),
        ("same namespace, other labels", &other_labels),
        (
            "annotation naming a workload that does not take it",
            &wrong_ann,
        ),
    ] {
        assert_eq!(
            verdicts(p),
            [DENIED, REACHED, REACHED],
            "{what}: not selected, the node workload applies (baseline only)"
        );
    }
    assert_eq!(
        verdicts(&annotated),
        [DENIED, DENIED, DENIED],
        "annotated into the deny workload"
    );
    assert_eq!(status_pods(&d, "github-mcp").len(), 1, "{}", d.status());
    assert_eq!(status_pods(&d, "locked").len(), 1, "{}", d.status());
    assert_eq!(
        metric(&d, "mcp_guard_pods{workload=\"github-mcp\"}"),
        Some(1.0)
    );
    assert_eq!(metric(&d, "mcp_guard_cri_up"), Some(1.0));
    assert!(
        d.stderr
            .lock()
            .unwrap()
            .contains("does not take pods by annotation"),
        "the wrong annotation is reported"
    );

    // A container of the selected pod, run by the runtime (runc, in the pod's cgroup
    // and network namespace), tries the internal address itself, once the runtime has
    // listed it (the name of a container in its first poll interval is not known yet;
    // its id is).
    let (container_id, code) = c.run_container(
        &gh.id,
        &gh_spec,
        "fetcher",
        &["connect", INTERNAL, "80", "1000"],
    );
    assert_eq!(
        code, 1,
        "the container's connect was not refused (EPERM exits 1)"
    );
    let events = d.events(Duration::from_secs(3));
    let from_container = events
        .iter()
        .find(|e| {
            e["dst"] == INTERNAL && e["pod"]["container"] == "fetcher" && e["verdict"] == "denied"
        })
        .unwrap_or_else(|| panic!("no event names the container: {events:#?}"));
    assert_eq!(from_container["workload"], "github-mcp");
    assert_eq!(from_container["pod"]["namespace"], "mcp");
    assert_eq!(from_container["pod"]["name"], "github-mcp-7f9c");
    assert_eq!(from_container["pod"]["container_id"], container_id.as_str());
    assert_event_schema(from_container);
    // Probe events (in the pod's own cgroup) name the pod, without a container.
    let probe_event = events
        .iter()
        .find(|e| e["workload"] == "locked" && e["dst"] == PUBLIC)
        .unwrap_or_else(|| panic!("no event from the annotated pod: {events:#?}"));
    assert_eq!(probe_event["pod"]["name"], "sandboxed-mcp");
    assert!(probe_event["pod"]["container"].is_null());
    assert_event_schema(probe_event);
    let _ = gh.cgroup_rel;
}

#[test]
fn removed_pods_are_deregistered_and_a_restarted_daemon_lists_again() {
    let cg = TestCgroup::new();
    let mut c = Containerd::start();
    let mut d = Daemon::start(&config(&cg, &c, &default_pod_cgroups(&cg)));
    let parent = format!("{}/pod-a", cg.rel);
    let a = pod(
        &mut c,
        &cg,
        &PodSpec {
            namespace: "mcp",
            name: "github-mcp-a",
            labels: &[GITHUB_LABEL],
            annotations: &[],
            cgroup_parent: &parent,
        },
    );
    assert!(wait_until(Duration::from_secs(10), || registered(
        &d,
        "github-mcp",
        "github-mcp-a"
    )));
    assert_eq!(verdicts(&a), [DENIED, DENIED, REACHED]);

    // Removed: no longer listed, and its left-over cgroup (the kubelet removes it
    // later) is held pending, never handed back to a broader policy.
    c.remove_pod(&a.id);
    assert!(
        wait_until(Duration::from_secs(10), || !registered(
            &d,
            "github-mcp",
            "github-mcp-a"
        )),
        "a removed pod stays listed: {}",
        d.status()
    );
    assert!(d.stderr.lock().unwrap().contains("pod gone"));
    let ns = NetNs::new();
    ns.add_addr(PUBLIC);
    ns.listen_tcp(&format!("{PUBLIC}:80"));
    let mut left = Probe::new(PROBE, &a.dir, &ns);
    assert_eq!(
        left.op(&format!("tcp {PUBLIC} 80")),
        DENIED,
        "left-over pod cgroup is pending"
    );
    drop(left);

    // A restarted daemon lists the pods again before it installs its policy.
    let parent_b = format!("{}/pod-b", cg.rel);
    let b = pod(
        &mut c,
        &cg,
        &PodSpec {
            namespace: "mcp",
            name: "github-mcp-b",
            labels: &[GITHUB_LABEL],
            annotations: &[],
            cgroup_parent: &parent_b,
        },
    );
    assert!(wait_until(Duration::from_secs(10), || registered(
        &d,
        "github-mcp",
        "github-mcp-b"
    )));
    d.kill9();
    assert_eq!(
        verdicts(&b),
        [DENIED, DENIED, REACHED],
        "enforced while the daemon is down"
    );
    d.restart();
    assert!(
        registered(&d, "github-mcp", "github-mcp-b"),
        "the restarted daemon was ready before it listed the pods: {}",
        d.status()
    );
    assert_eq!(verdicts(&b), [DENIED, DENIED, REACHED]);
    assert!(d.stderr.lock().unwrap().contains("listed the node's pods"));

    // A restart while the runtime hangs: the pods the previous daemon placed keep their
    // workload (their cgroups are unchanged); a pending one would refuse everything.
    c.freeze(true);
    d.kill9();
    d.restart();
    let (reused, budget) = {
        let log = d.stderr.lock().unwrap();
        (
            log.contains("reusing the pods the previous daemon placed"),
            log.contains("no answer within 3 s at start"),
        )
    };
    c.freeze(false);
    assert!(reused, "{}", d.stderr.lock().unwrap());
    assert!(
        budget,
        "the start waited for the hung runtime's own timeouts: {}",
        d.stderr.lock().unwrap()
    );
    assert!(
        registered(&d, "github-mcp", "github-mcp-b"),
        "{}",
        d.status()
    );
    assert_eq!(verdicts(&b), [DENIED, DENIED, REACHED]);
}

#[test]
fn a_new_pod_is_never_unguarded() {
    let cg = TestCgroup::new();
    let mut c = Containerd::start();
    let ns = NetNs::new();
    ns.add_addr(INTERNAL);
    ns.listen_tcp(&format!("{INTERNAL}:80"));
    let (_, driver_dir) = cg.child("driver");
    let mut driver = Probe::new(PROBE, &driver_dir, &ns);
    let race = |driver: &mut Probe, dir: &Path, n: u32| {
        driver.op(&format!(
            "recreate-race {} {n} {INTERNAL}:80",
            dir.display()
        ))
    };

    // Without pending pod cgroups, a process in a pod cgroup the daemon has not
    // identified yet gets the broader node policy: the internal address answers. (This
    // is what the test would see if the mechanism broke.)
    {
        let d = Daemon::start(&config(&cg, &c, "[]"));
        let tally = race(&mut driver, &cg.dir.join("pod-race0"), 20);
        assert_eq!(tally, "reached=20 refused=0 other=0", "control run");
        drop(d);
    }

    let d = Daemon::start(&config(&cg, &c, &default_pod_cgroups(&cg)));
    // Like the kubelet: the pod cgroup first, a process in it at once. The kernel
    // registers the cgroup as pending inside its mkdir.
    let tally = race(&mut driver, &cg.dir.join("pod-race1"), 500);
    assert_eq!(
        tally, "reached=0 refused=500 other=0",
        "a process in a new pod cgroup reached the internal address before its pod was identified"
    );
    // The same, then the sandbox is created in it and identified: still refused at
    // every step (pending, then deny-internal), and the refusal's reason moves from
    // pending to the pod's workload.
    // (The race's 500 refusals used up this second's event budget.)
    std::thread::sleep(Duration::from_millis(1500));
    let parent = format!("{}/pod-new", cg.rel);
    let pod_dir = mcp_guard_tests::cgroup_mount().join(parent.trim_start_matches('/'));
    std::fs::create_dir(&pod_dir).expect("pod cgroup");
    let mut early = Probe::new(PROBE, &pod_dir, &ns);
    assert_eq!(early.op(&format!("tcp {INTERNAL} 80")), DENIED);
    let p = pod(
        &mut c,
        &cg,
        &PodSpec {
            namespace: "mcp",
            name: "github-mcp-new",
            labels: &[GITHUB_LABEL],
            annotations: &[],
            cgroup_parent: &parent,
        },
    );
    for _ in 0..50 {
        assert_eq!(early.op(&format!("tcp {INTERNAL} 80")), DENIED);
    }
    assert!(wait_until(Duration::from_secs(10), || registered(
        &d,
        "github-mcp",
        "github-mcp-new"
    )));
    assert_eq!(early.op(&format!("tcp {INTERNAL} 80")), DENIED);
    assert_eq!(verdicts(&p), [DENIED, DENIED, REACHED]);
    let events = d.events(Duration::from_secs(2));
    let workloads: std::collections::BTreeSet<&str> = events
        .iter()
        .filter(|e| {
            e["dst"] == INTERNAL && e["cgroup"].as_str().is_some_and(|c| c.starts_with(&parent))
        })
        .filter_map(|e| e["workload"].as_str())
        .collect();
    assert!(
        workloads.contains("pods-pending") && workloads.contains("github-mcp"),
        "refused first as pending, then as the pod's workload: {workloads:?}"
    );
}

/// Wildcard host rules for pod workloads: the DNS proxy knows each pod by its source
/// address (the pod's own network namespace) and its placement, learns the answer for
/// that pod's workload only, and refuses a pod of another workload the name its rules
/// do not cover. Each pod reaches the proxy over a veth of its own into a lab namespace
/// that holds the proxy and a real dnsmasq.
#[test]
fn pods_learn_wildcard_names_through_the_proxy() {
    const CDN: &str = "151.101.1.10";
    let cg = TestCgroup::new();
    let mut c = Containerd::start();
    let node = NetNs::new();
    // The proxy's address, on the lab namespace's loopback; each pod routes to it over
    // its own veth.
    node.add_addr("10.200.1.1");
    let _dnsmasq = mcp_guard_tests::Dnsmasq::start(
        &node,
        "",
        &[
            "/cdn.example.test/151.101.1.10",
            "/node.example.test/151.101.1.20",
        ],
        60,
    );
    let d = Daemon::start(&format!(
        r#"[[workload]]
name = "node"
cgroup = "{r}"
default = "allow"
[[workload.allow]]
host = "*.node.example.test"
[[workload]]
name = "cdn-mcp"
default = "deny"
[workload.pods]
namespace = "mcp"
labels = {{ "app.kubernetes.io/name" = "cdn-mcp" }}
[[workload.allow]]
host = "*.cdn.example.test"
ports = [443]
[[workload]]
name = "other-mcp"
default = "deny"
[workload.pods]
namespace = "mcp"
labels = {{ "app.kubernetes.io/name" = "other-mcp" }}
[dns]
nameservers = ["127.0.0.1:53"]
netns = "{netns}"
proxy = "10.200.1.1:5353"
[daemon]
attach_cgroup = "{r}"
cri_socket = "{sock}"
pod_cgroups = {pending}
cri_poll_ms = 100
"#,
        r = cg.rel,
        sock = c.socket.display(),
        netns = node.path().display(),
        pending = default_pod_cgroups(&cg),
    ));
    let mut pods = Vec::new();
    for (i, app) in ["cdn-mcp", "other-mcp", "plain"].into_iter().enumerate() {
        let parent = format!("{}/pod-{app}", cg.rel);
        let p = pod(
            &mut c,
            &cg,
            &PodSpec {
                namespace: "mcp",
                name: app,
                labels: &[("app.kubernetes.io/name", app)],
                annotations: &[],
                cgroup_parent: &parent,
            },
        );
        link_to(&p, &node, i, &["10.200.1.1"]);
        in_pod(&p, &format!("addr add {CDN}/32 dev lo"));
        in_pod(&p, "addr add 151.101.1.20/32 dev lo");
        assert!(
            wait_until(Duration::from_secs(10), || listed(&d, app)),
            "{app} never listed: {}",
            d.status()
        );
        pods.push(p);
    }
    let mut cdn = Probe::at(PROBE, &pods[0].dir, &pods[0].netns);
    let mut other = Probe::at(PROBE, &pods[1].dir, &pods[1].netns);
    assert_eq!(
        cdn.op(&format!("tcp {CDN} 443")),
        DENIED,
        "nothing learned yet"
    );
    assert_eq!(
        cdn.op("resolve-tcp img.cdn.example.test 10.200.1.1 5353 443"),
        format!("{REACHED} {CDN}"),
        "learned for the asking pod's workload before the answer: {}",
        d.get("/metrics")
            .lines()
            .filter(|l| l.contains("dns"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let learned: Value = serde_json::from_str(&d.get("/dns")).expect("/dns json");
    let entries = learned["learned"].as_array().cloned().unwrap_or_default();
    assert!(
        entries.iter().any(|l| l["workload"] == "cdn-mcp"
            && l["name"] == "img.cdn.example.test"
            && l["addr"] == CDN),
        "{learned}"
    );
    // The other pod's workload has no host rule: its query never goes upstream, and
    // what cdn-mcp learned is not its to use.
    assert_eq!(
        other.op("resolve-tcp img.cdn.example.test 10.200.1.1 5353 443"),
        "NOANSWER"
    );
    assert_eq!(other.op(&format!("tcp {CDN} 443")), DENIED);
    let refused = d.get("/metrics").lines().any(|l| {
        l.starts_with("mcp_guard_dns_query_refused_total{")
            && l.contains("workload=\"other-mcp\"")
            && l.contains("name-not-allowed")
            && !l.ends_with(" 0")
    });
    assert!(refused, "{}", d.get("/metrics"));
    // A pod no workload selects is not pending any more: the workload cgroup above it
    // (the node's) decides, in the kernel and in the proxy.
    let mut plain = Probe::at(PROBE, &pods[2].dir, &pods[2].netns);
    assert_eq!(
        plain.op("resolve-tcp img.node.example.test 10.200.1.1 5353 443"),
        format!("{REACHED} 151.101.1.20")
    );
    let learned: Value = serde_json::from_str(&d.get("/dns")).expect("/dns json");
    assert!(
        learned["learned"].as_array().is_some_and(|l| l
            .iter()
            .any(|l| l["workload"] == "node" && l["name"] == "img.node.example.test")),
        "{learned}"
    );
    assert!(
        !d.get("/metrics")
            .lines()
            .any(|l| l.starts_with("mcp_guard_dns_query_refused_total{")
                && l.contains("pods-pending")
                && !l.ends_with(" 0")),
        "{}",
        d.get("/metrics")
    );
}

/// TC pod mode for pods the runtime listed: a raw datagram from a process in a pod's
/// network namespace but in no guarded cgroup (no socket hook sees it, and its socket
/// names no workload) to an internal address is dropped at the node-side veth and reported for
/// the pod's own workload if one selects it, else for the workload cgroup above it (as
/// the kernel decides for the pod's sockets); one to a public address arrives. Run with
/// and without pending patterns: without, only the placement finds the selected pod;
/// with, the unselected pod's cgroup is named by the pattern but no longer registered.
fn tc_pod_mode(pending: bool) {
    const NODE_INTERNAL: &str = "10.0.99.9";
    const NODE_PUBLIC: &str = "93.184.216.99";
    let cg = TestCgroup::new();
    let mut c = Containerd::start();
    let node = NetNs::new();
    node.add_addr(NODE_INTERNAL);
    node.add_addr(NODE_PUBLIC);
    let internal = node.udp_counter(&format!("{NODE_INTERNAL}:53"));
    let public = node.udp_counter(&format!("{NODE_PUBLIC}:53"));
    let d = Daemon::start(&format!(
        r#"[[workload]]
name = "node"
cgroup = "{r}"
default = "deny-internal"
deny_raw_sockets = false
[[workload]]
name = "github-mcp"
default = "deny-internal"
deny_raw_sockets = false
[workload.pods]
namespace = "mcp"
labels = {{ "app.kubernetes.io/name" = "github-mcp" }}
[daemon]
attach_cgroup = "{r}"
cri_socket = "{sock}"
pod_cgroups = {pending}
cri_poll_ms = 100
cgroup_skb = false
[tc]
netns = "{netns}"
interfaces = []
pod_interfaces = ["vnode*"]
"#,
        r = cg.rel,
        sock = c.socket.display(),
        netns = node.path().display(),
        pending = if pending {
            default_pod_cgroups(&cg)
        } else {
            "[]".into()
        },
    ));
    let mut pods = Vec::new();
    for (i, (name, app)) in [("github-mcp-0", "github-mcp"), ("plain", "plain")]
        .into_iter()
        .enumerate()
    {
        let parent = format!("{}/pod-{app}", cg.rel);
        let p = pod(
            &mut c,
            &cg,
            &PodSpec {
                namespace: "mcp",
                name,
                labels: &[("app.kubernetes.io/name", app)],
                annotations: &[],
                cgroup_parent: &parent,
            },
        );
        link_to(&p, &node, i, &[NODE_INTERNAL, NODE_PUBLIC]);
        assert!(
            wait_until(Duration::from_secs(10), || listed(&d, name)),
            "{name} never listed: {}",
            d.status()
        );
        pods.push(p);
    }
    assert!(
        registered(&d, "github-mcp", "github-mcp-0"),
        "{}",
        d.status()
    );
    assert!(
        wait_until(Duration::from_secs(5), || d.status()["pod_sources"]
            .as_u64()
            .unwrap_or(0)
            >= 2),
        "the daemon never mapped both pods' interfaces: {}",
        d.status()
    );
    for (i, p) in pods.iter().enumerate() {
        let src = format!("10.200.0.{}", 4 * i + 2);
        // Outside every guarded cgroup (the root), inside the pod's namespace: only the
        // interface can tell whose the packet is (a socket of the pod's cgroup would be
        // judged by its cgroup first).
        let root = mcp_guard_tests::cgroup_mount();
        let mut probe = Probe::at(PROBE, &root, &p.netns);
        assert_eq!(probe.op(&format!("raw-udp {src} {NODE_PUBLIC} 53")), "SENT");
        assert_eq!(
            probe.op(&format!("raw-udp {src} {NODE_INTERNAL} 53")),
            "SENT"
        );
    }
    assert!(
        wait_until(Duration::from_secs(2), || public
            .load(std::sync::atomic::Ordering::SeqCst)
            >= 2),
        "the allowed datagrams never arrived: the path is broken, not guarded"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        internal.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "an internal datagram left its pod"
    );
    let mut events = Vec::new();
    let dropped_for = |events: &[Value], src: &str, workload: &str| {
        events.iter().any(|e| {
            e["hook"] == "tc"
                && e["dst"] == NODE_INTERNAL
                && e["src"] == src
                && e["workload"] == workload
        })
    };
    assert!(
        wait_until(Duration::from_secs(5), || {
            events.extend(d.events(Duration::from_millis(100)));
            dropped_for(&events, "10.200.0.2", "github-mcp")
                && dropped_for(&events, "10.200.0.6", "node")
        }),
        "{events:#?}"
    );
}

#[test]
fn tc_pod_mode_follows_pods_placed_through_the_runtime() {
    tc_pod_mode(false);
}

#[test]
fn tc_pod_mode_takes_an_unselected_pod_as_the_workload_above_it() {
    tc_pod_mode(true);
}

/// An HTTP MCP server in a containerd pod selected by the shipped ConfigMap's label
/// (`mcp-guard.dev/role: mcp-server`, `deny-internal`): the official MCP SDK's server on
/// Streamable HTTP, run in the pod's cgroup and network namespace, answers the SDK's
/// client and a kubelet-style probe from another namespace (the node's, an internal
/// address), while its own fetches of the metadata service and an internal address are
/// refused in the kernel and reported for the pod.
#[test]
fn an_http_mcp_server_in_a_pod_answers_clients_from_another_namespace() {
    let cg = TestCgroup::new();
    let mut c = Containerd::start();
    let node = NetNs::new();
    let d = Daemon::start(&format!(
        r#"[baseline]
deny = ["metadata"]
[[workload]]
name = "node"
cgroup = "{r}"
default = "allow"
[[workload]]
name = "mcp-servers"
default = "deny-internal"
[workload.pods]
labels = {{ "mcp-guard.dev/role" = "mcp-server" }}
[daemon]
attach_cgroup = "{r}"
cri_socket = "{sock}"
pod_cgroups = {pending}
cri_poll_ms = 100
"#,
        r = cg.rel,
        sock = c.socket.display(),
        pending = default_pod_cgroups(&cg),
    ));
    let parent = format!("{}/pod-http-mcp", cg.rel);
    let p = pod(
        &mut c,
        &cg,
        &PodSpec {
            namespace: "tools",
            name: "http-mcp",
            labels: &[("mcp-guard.dev/role", "mcp-server")],
            annotations: &[],
            cgroup_parent: &parent,
        },
    );
    link_to(&p, &node, 0, &[]);
    assert!(
        wait_until(Duration::from_secs(10), || registered(
            &d,
            "mcp-servers",
            "http-mcp"
        )),
        "the pod is placed in mcp-servers: {}",
        d.get("/status")
    );
    let logs = mcp_guard_tests::TempDir::new();
    let python = mcp_guard_tests::mcp_venv().join("bin/python");
    let _server = mcp_guard_tests::Running::spawn(
        mcp_guard_tests::in_cgroup_at(&p.dir, &p.netns)
            .arg(&python)
            .arg(mcp_guard_tests::mcp_helper("http_server.py"))
            .args(["10.200.0.2", "8000"]),
        &logs.0.join("server.log"),
    );
    let curl = || mcp_guard_tests::curl_in(&node, None, "http://10.200.0.2:8000/healthz").1;
    assert!(
        wait_until(Duration::from_secs(30), || curl() == "ok"),
        "the pod's server answers a kubelet-style probe from the node: {}",
        std::fs::read_to_string(logs.0.join("server.log")).unwrap_or_default()
    );
    let got = mcp_guard_tests::mcp_http_session(
        &node,
        "http://10.200.0.2:8000/mcp",
        &format!(
            r#"[["fetch", {{"url": "http://{METADATA}/"}}], ["fetch", {{"url": "http://{INTERNAL}/"}}]]"#
        ),
    );
    for i in 0..2 {
        let text = got["results"][i]["text"].as_str().unwrap_or_default();
        assert!(
            text.contains("Operation not permitted"),
            "the pod's fetch was refused in the kernel: {text}"
        );
    }
    let events = d.events(Duration::from_millis(500));
    assert!(
        events.iter().any(|e| e["dst"] == METADATA
            && e["workload"] == "mcp-servers"
            && e["pod"]["name"] == "http-mcp"),
        "the metadata fetch is reported for the pod: {events:?}"
    );
    let replies: Vec<_> = events
        .iter()
        .filter(|e| e["hook"] == "cgroup_skb")
        .collect();
    assert!(replies.is_empty(), "replies refused: {replies:?}");
}
