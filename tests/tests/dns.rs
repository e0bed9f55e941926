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

/// DNS refusal events are ordinary events: they match the published schema.
fn assert_schema_valid(e: &Value) {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../mcp-guard/schema/event-v1.schema.json"
    ))
    .unwrap();
    let v = jsonschema::validator_for(&serde_json::from_str(&text).unwrap()).expect("schema");
    let errors: Vec<String> = v
        .iter_errors(e)
        .map(|err| format!("{err} at {}", err.instance_path))
        .collect();
    assert!(
        errors.is_empty(),
        "event does not match the schema: {errors:#?}\n{e:#}"
    );
}

/// The first line `mcp-guard events ARGS` prints (it follows forever: killed after).
fn first_event_line(d: &Daemon, args: &[&str]) -> String {
    use std::io::BufRead as _;
    let mut child = std::process::Command::new(guard_bin())
        .args(["events", "--listen", &d.listen.to_string()])
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
            assert_schema_valid(e);
            return e.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no {reason} event for {name} = {dst}; events: {seen:#?}"
        );
    }
}

#[test]
fn host_rules_follow_dns_and_refuse_rebinding() {
    let ns = lab();
    let mut dnsmasq = Dnsmasq::start(
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
    let mut web = Probe::new(PROBE, &web_dir, &ns);
    let mut other = Probe::new(PROBE, &other_dir, &ns);
    let mut seen = Vec::new();

    // An exact name, resolved by the daemon: its address on its port, nothing else.
    assert!(
        wait_until(Duration::from_secs(10), || has(
            &d,
            "web-mcp",
            "api.example.test",
            "93.184.216.34"
        )),
        "api.example.test never learned: {:?}",
        d.get("/dns")
    );
    assert_eq!(
        web.op("tcp 93.184.216.34 443"),
        "OK",
        "the allowed name's address"
    );
    assert_eq!(web.op("tcp 93.184.216.35 443"), "EPERM", "another address");
    // AAAA answers too; and the IPv4 answer through a dual-stack socket.
    assert!(wait_until(Duration::from_secs(10), || has(
        &d,
        "web-mcp",
        "api.example.test",
        "2606:4700::10"
    )));
    assert_eq!(web.op("tcp 2606:4700::10 443"), "OK", "the AAAA answer");
    assert_eq!(web.op("tcp6-mapped 93.184.216.34 443"), "OK", "IPv4-mapped");
    assert_eq!(web.op("tcp 93.184.216.34 80"), "EPERM", "another port");
    assert_eq!(
        other.op("tcp 93.184.216.34 443"),
        "EPERM",
        "another workload"
    );
    // Each name is its own lookup: wait for this one's answer too.
    assert!(wait_until(Duration::from_secs(10), || has(
        &d,
        "web-mcp",
        "rebind.example.test",
        "93.184.216.36"
    )));
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
    assert!(out.status.success(), "{text}");
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
        output_text(&out).contains("no address learned for this name"),
        "{}",
        output_text(&out)
    );

    // The address changes: the new one is allowed as soon as DNS says so, the old one
    // once its TTL (2 s) and grace (1 s) have run out.
    dnsmasq.set_hosts(&HOSTS.replace("93.184.216.34 api", "93.184.216.35 api"));
    assert!(
        wait_until(Duration::from_secs(10), || has(
            &d,
            "web-mcp",
            "api.example.test",
            "93.184.216.35"
        )),
        "the new address was never learned: {}",
        d.get("/dns")
    );
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
    // no new lookup, and is still listed.
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
