use super::*;

#[test]
fn workload_ids_follow_names_not_positions() {
    let w = |names: &[&str]| {
        let text: String = names
            .iter()
            .map(|n| format!("[[workload]]\nname='{n}'\ncgroup='/{n}'\n"))
            .collect();
        let cfg = parse(Path::new("t.toml"), &text).unwrap();
        cfg.workloads
            .iter()
            .map(|w| (w.name.clone(), w.id))
            .collect::<HashMap<_, _>>()
    };
    let abc = w(&["a", "b", "c"]);
    assert_eq!(abc, w(&["c", "a", "b"]), "reordered");
    assert_eq!(abc["b"], w(&["b", "c"])["b"], "another removed");
    assert!(abc
        .values()
        .all(|&id| id >= mcp_guard_common::FIRST_WORKLOAD_ID));
    let ids: std::collections::HashSet<u32> = abc.values().copied().collect();
    assert_eq!(ids.len(), 3, "distinct");
    // Collisions take the next free id: 100,000 names, all distinct.
    let many: Vec<String> = (0..100_000).map(|i| format!("w{i}")).collect();
    let ids = workload_ids(many.iter().map(String::as_str));
    let distinct: std::collections::HashSet<u32> = ids.values().copied().collect();
    assert_eq!(distinct.len(), 100_000);
}

fn p(text: &str) -> Result<Config, ConfigErrors> {
    parse(Path::new("test.toml"), text)
}

fn err(text: &str) -> ConfigError {
    p(text).expect_err("config must be rejected").0.remove(0)
}

const GOOD: &str = r#"
mode = "enforce"
[baseline]
deny = ["metadata", "192.0.2.0/24"]
[[workload]]
name = "github-mcp"
cgroup = "/mcp.slice/github-mcp.service"
default = "deny-internal"
[[workload.allow]]
cidr = "10.0.12.0/24"
ports = [5432, "8000-8100"]
proto = "tcp"
"#;

#[test]
fn parses_the_contract_example() {
    let c = p(GOOD).unwrap();
    assert_eq!(c.mode, Mode::Enforce);
    assert_eq!(c.baseline.len(), 2);
    let w = &c.workloads[0];
    assert_eq!(w.name, "github-mcp");
    assert_eq!(w.cgroup.as_deref(), Some("/mcp.slice/github-mcp.service"));
    assert_eq!(w.default, DefaultAction::DenyInternal);
    assert_eq!(
        w.allow[0].ports,
        vec![
            PortSpan { lo: 5432, hi: 5432 },
            PortSpan { lo: 8000, hi: 8100 }
        ]
    );
    assert_eq!(w.allow[0].proto, Proto::Tcp);
    assert_eq!(w.allow[0].loc.line, 10);
}

#[test]
fn missing_baseline_still_denies_metadata() {
    let c = p("[[workload]]\nname='a'\ncgroup='/a'\n").unwrap();
    assert!(matches!(&c.baseline[0].item, BaselineItem::Set { name, .. } if name == "metadata"));
}

#[test]
fn unknown_key_names_line_and_key() {
    let e = err("[[workload]]\nname='a'\ncgroup='/a'\ndefualt='deny'\n");
    assert_eq!(e.line, 4);
    assert!(e.message.contains("defualt"), "{e}");
}

#[test]
fn bad_cidr() {
    let e = err("[[workload]]\nname='a'\ncgroup='/a'\n[[workload.allow]]\ncidr='10.0.0.300/8'\n");
    assert_eq!(e.line, 5);
    assert!(e.message.contains("not a valid CIDR"), "{e}");
}

#[test]
fn host_bits_set() {
    let e = err("[[workload]]\nname='a'\ncgroup='/a'\n[[workload.allow]]\ncidr='10.0.12.7/16'\n");
    assert!(e.message.contains("10.0.0.0/16"), "{e}");
}

#[test]
fn port_zero_and_too_big() {
    let e = err(
        "[[workload]]\nname='a'\ncgroup='/a'\n[[workload.allow]]\ncidr='10.0.0.0/8'\nports=[0]\n",
    );
    assert_eq!(e.line, 6);
    assert!(e.message.contains("1 to 65535"), "{e}");
    let e = err("[[workload]]\nname='a'\ncgroup='/a'\n[[workload.allow]]\ncidr='10.0.0.0/8'\nports=[\"1-65536\"]\n");
    assert!(e.message.contains("65536"), "{e}");
}

#[test]
fn inverted_range() {
    let e = err("[[workload]]\nname='a'\ncgroup='/a'\n[[workload.allow]]\ncidr='10.0.0.0/8'\nports=[\"9000-8000\"]\n");
    assert!(e.message.contains("inverted"), "{e}");
}

#[test]
fn duplicate_name_and_cgroup() {
    let e = err("[[workload]]\nname='a'\ncgroup='/a'\n[[workload]]\nname='a'\ncgroup='/b'\n");
    assert_eq!(e.line, 5);
    assert!(e.message.contains("duplicate workload name"), "{e}");
    let e = err("[[workload]]\nname='a'\ncgroup='/a'\n[[workload]]\nname='b'\ncgroup='/a/'\n");
    assert_eq!(e.line, 6);
    assert!(e.message.contains("duplicate workload cgroup"), "{e}");
}

#[test]
fn bad_enum_value() {
    let e = err("[[workload]]\nname='a'\ncgroup='/a'\ndefault='deny-all'\n");
    assert_eq!(e.line, 4);
    assert!(e.message.contains("deny-internal"), "{e}");
}

#[test]
fn root_cgroup_rejected() {
    let e = err("[[workload]]\nname='a'\ncgroup='/'\n");
    assert!(e.message.contains("whole machine"), "{e}");
}

#[test]
fn unknown_named_set() {
    let e = err("[baseline]\ndeny=['metdata']\n");
    assert_eq!(e.line, 2);
    assert!(e.message.contains("metadata"), "{e}");
}

#[test]
fn host_rules_parse_and_match() {
    let c = p("[dns]\nproxy='127.0.0.1:5353'\n[[workload]]\nname='a'\ncgroup='/a'\n[[workload.allow]]\nhost='API.GitHub.com.'\nports=[443]\n[[workload.allow]]\nhost='*.slack.com'\nallow_internal=true\n").unwrap();
    let h = &c.workloads[0].hosts;
    assert_eq!(h[0].pattern, HostPattern::Exact("api.github.com".into()));
    assert_eq!(h[0].loc.line, 7);
    assert!(h[1].allow_internal);
    assert!(h[1].pattern.matches("files.slack.com"));
    assert!(h[1].pattern.matches("a.b.slack.com"));
    assert!(!h[1].pattern.matches("slack.com"));
    assert!(!h[1].pattern.matches("evilslack.com"));
    assert_eq!(h[1].pattern.to_string(), "*.slack.com");
}

#[test]
fn bad_host_rules_name_line_and_fix() {
    let e = err("[[workload]]\nname='a'\ncgroup='/a'\n[[workload.allow]]\nhost='*.slack.com'\n");
    assert_eq!(e.line, 5);
    assert!(e.message.contains("[dns] proxy"), "{e}");
    let e = err("[[workload]]\nname='a'\ncgroup='/a'\n[[workload.allow]]\nhost='10.0.0.1'\n");
    assert!(e.message.contains("cidr"), "{e}");
    let e = err("[dns]\nproxy='127.0.0.1:53'\n[[workload]]\nname='a'\ncgroup='/a'\n[[workload.allow]]\nhost='*.com'\n");
    assert!(e.message.contains("two labels"), "{e}");
    let e = err("[[workload]]\nname='a'\ncgroup='/a'\n[[workload.allow]]\nhost='a.*.com'\n");
    assert!(e.message.contains("first label"), "{e}");
    let e = err("[[workload]]\nname='a'\ncgroup='/a'\n[[workload.allow]]\nhost='a.com'\ncidr='10.0.0.0/8'\n");
    assert!(e.message.contains("both cidr and host"), "{e}");
    let e = err("[[workload]]\nname='a'\ncgroup='/a'\n[[workload.allow]]\nports=[443]\n");
    assert_eq!(e.line, 4, "the [[workload.allow]] header");
    assert!(e.message.contains("needs cidr"), "{e}");
    let e = err("[[workload]]\nname='a'\ncgroup='/a'\n[[workload.allow]]\ncidr='10.0.0.0/8'\nallow_internal=true\n");
    assert!(e.message.contains("only applies to host"), "{e}");
    let e = err("[dns]\nmin_ttl=60\nmax_ttl=10\n");
    assert!(e.message.contains("below dns.min_ttl"), "{e}");
    let e = err("[dns]\nnameservers=['dns.local']\n");
    assert_eq!(e.line, 2);
    let e = err("[dns]\nworkload_queries_per_sec=0\n");
    assert!(e.message.contains("between 1 and 100000"), "{e}");
}

/// Wildcards right below a public suffix (Public Suffix List, both sections) cover
/// names anyone can register; one label deeper is one owner's.
#[test]
fn wildcards_on_public_suffixes_are_refused() {
    for (suffix, line) in [
        ("co.uk", 6),
        ("s3.amazonaws.com", 6),
        ("github.io", 6),
        ("githubusercontent.com", 6),
    ] {
        let e = err(&format!("[dns]\nproxy='127.0.0.1:53'\n[[workload]]\nname='a'\ncgroup='/a'\n[[workload.allow]]\nhost='*.{suffix}'\n"));
        assert_eq!(e.line, line + 1, "{e}");
        assert!(e.message.contains("public suffix"), "{suffix}: {e}");
        assert!(e.message.contains(&format!("*.myorg.{suffix}")), "{e}");
    }
    for ok in [
        "*.myorg.github.io",
        "*.bbc.co.uk",
        "*.slack.com",
        "*.cdn.example.test",
    ] {
        p(&format!("[dns]\nproxy='127.0.0.1:53'\n[[workload]]\nname='a'\ncgroup='/a'\n[[workload.allow]]\nhost='{ok}'\n")).unwrap_or_else(|e| panic!("{ok}: {e}"));
    }
    // Exact names on a suffix are one host: allowed.
    p("[[workload]]\nname='a'\ncgroup='/a'\n[[workload.allow]]\nhost='github.io'\n").unwrap();
}

#[test]
fn resolve_any_and_dns_budgets() {
    let c = p("[dns]\nproxy='127.0.0.1:53'\nworkload_queries_per_sec=7\nworkload_in_flight=3\n[[workload]]\nname='a'\ncgroup='/a'\nresolve_any=true\n[[workload]]\nname='b'\ncgroup='/b'\n").unwrap();
    assert!(c.workloads[0].resolve_any);
    assert!(!c.workloads[1].resolve_any, "off by default");
    assert_eq!(
        (c.dns.workload_queries_per_sec, c.dns.workload_in_flight),
        (7, 3)
    );
    let d = p("").unwrap();
    assert_eq!(
        (d.dns.workload_queries_per_sec, d.dns.workload_in_flight),
        (DEFAULT_WORKLOAD_QPS, DEFAULT_WORKLOAD_IN_FLIGHT)
    );
}

#[test]
fn workload_mode_overrides_global() {
    let c = p("mode='audit'\n[[workload]]\nname='a'\ncgroup='/a'\n[[workload]]\nname='b'\ncgroup='/b'\nmode='enforce'\n").unwrap();
    assert_eq!(c.workloads[0].mode, Mode::Audit);
    assert_eq!(c.workloads[1].mode, Mode::Enforce);
}

#[test]
fn pod_workloads_select_pods_and_bring_the_pending_workload() {
    let c = p("[[workload]]\nname='gh'\ndefault='deny'\n[workload.pods]\nnamespace='mcp'\nlabels={ 'app.kubernetes.io/name' = 'github-mcp' }\n[daemon]\ncri_socket='/run/k3s/containerd/containerd.sock'\npod_cgroups=['/kubepods/pod*']\n").unwrap();
    let gh = &c.workloads[0];
    assert_eq!(gh.cgroup, None);
    let sel = gh.pods.as_ref().unwrap();
    assert_eq!(sel.namespace.as_deref(), Some("mcp"));
    assert_eq!(sel.labels["app.kubernetes.io/name"], "github-mcp");
    assert_eq!(
        c.pods.cri_socket.as_deref(),
        Some(Path::new("/run/k3s/containerd/containerd.sock"))
    );
    let pending: Vec<_> = c
        .workloads
        .iter()
        .filter(|w| w.name == pods::PENDING)
        .collect();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].cgroup.as_deref(), Some("/kubepods/pod*"));
    assert_eq!(pending[0].default, DefaultAction::Deny);
    // Defaults: every kubelet layout, and no pending workload without a pod workload.
    let c = p("[[workload]]\nname='gh'\n[workload.pods]\nannotation=true\n").unwrap();
    assert!(
        c.warnings
            .iter()
            .any(|w| w.contains("t.toml:2") && w.contains("any pod can join it")),
        "{:?}",
        c.warnings
    );
    assert_eq!(
        c.workloads
            .iter()
            .filter(|w| w.name == pods::PENDING)
            .count(),
        pods::DEFAULT_POD_CGROUPS.len()
    );
    let c = p("[[workload]]\nname='a'\ncgroup='/a'\n").unwrap();
    assert!(c.workloads.iter().all(|w| w.name != pods::PENDING));
}

#[test]
fn a_pod_workload_naming_its_mcp_proxy_brings_the_proxy_workload() {
    let c = p("[[workload]]\nname='gh'\n[workload.pods]\nnamespace='mcp'\nmcp_proxy='mcp-proxy'\n[daemon]\nmcp_socket='/run/mcpg/mcp.sock'\n").unwrap();
    let gh = c.workloads.iter().find(|w| w.name == "gh").unwrap();
    assert_eq!(
        gh.pods.as_ref().unwrap().mcp_proxy.as_deref(),
        Some("mcp-proxy")
    );
    let proxy = c.workloads.iter().find(|w| w.name == pods::PROXY).unwrap();
    assert_eq!(proxy.default, DefaultAction::Deny);
    assert!(proxy.cgroup.is_none() && proxy.pods.is_none() && !proxy.pending);
    let nets: Vec<String> = proxy.allow.iter().map(|r| r.net.to_string()).collect();
    assert_eq!(nets, ["127.0.0.0/8", "::1/128"]);
    assert!(proxy.unix.allow_listed);
    assert_eq!(proxy.unix.allow[0].text, "/run/mcpg/mcp.sock");
    // Without mcp_proxy, no proxy workload.
    let c = p("[[workload]]\nname='gh'\n[workload.pods]\nnamespace='mcp'\n").unwrap();
    assert!(c.workloads.iter().all(|w| w.name != pods::PROXY));
}

#[test]
fn pod_workload_errors_name_the_line() {
    let cases = [
        (
            "[[workload]]\nname='a'\ncgroup='/a'\n[workload.pods]\nnamespace='mcp'\n",
            3,
            "both a cgroup and [workload.pods]",
        ),
        (
            "[[workload]]\nname='a'\ndefault='deny'\n",
            2,
            "neither cgroup",
        ),
        (
            "[[workload]]\nname='a'\n[workload.pods]\nannotation=false\n",
            3,
            "selects every pod",
        ),
        (
            "[[workload]]\nname='a'\n[workload.pods]\nnamespace='MCP_x'\n",
            4,
            "not a Kubernetes namespace",
        ),
        (
            "[[workload]]\nname='a'\n[workload.pods]\nnamespace='mcp'\nmcp_proxy='MCP Proxy'\n",
            5,
            "is not a container name",
        ),
        (
            "[[workload]]\nname='mcp-proxy'\ncgroup='/a'\n",
            2,
            "reserved for the MCP proxy sidecars",
        ),
        (
            "[[workload]]\nname='a'\n[workload.pods]\nlabels={ app = 'a b' }\n",
            4,
            "not a Kubernetes label value",
        ),
        (
            "[[workload]]\nname='pods-pending'\ncgroup='/a'\n",
            2,
            "reserved",
        ),
        (
            "[[workload]]\nname='a'\ncgroup='/a'\n[daemon]\ncri_poll_ms=1\n",
            5,
            "cri_poll_ms",
        ),
        (
            "[[workload]]\nname='a'\ncgroup='/a'\n[daemon]\ncri_socket='run/x.sock'\n",
            5,
            "cri_socket",
        ),
        (
            "[[workload]]\nname='a'\ncgroup='/a'\n[daemon]\npod_cgroups=['kubepods']\n",
            5,
            "absolute path",
        ),
        (
            "[[workload]]\nname='a'\n[workload.pods]\nnamespace='mcp'\nlables={}\n",
            5,
            "lables",
        ),
    ];
    for (text, line, what) in cases {
        let e = err(text);
        assert_eq!(e.line, line, "{text}: {e}");
        assert!(e.message.contains(what), "{text}: {e}");
    }
}

/// The warnings of `text` (which must parse).
fn warned(text: &str) -> Vec<String> {
    p(text).expect("config must parse").warnings
}

#[test]
fn dangerous_configs_are_warned_with_line_and_fix() {
    // The contract example is clean.
    assert!(warned(GOOD).is_empty(), "{:?}", warned(GOOD));
    // 0.0.0.0/0 under default = "deny".
    let w = warned("[[workload]]\nname = \"a\"\ncgroup = \"/mcp.slice/a.service\"\ndefault = \"deny\"\n[[workload.allow]]\ncidr = \"0.0.0.0/0\"\n");
    assert_eq!(w, ["test.toml:6: workload \"a\" allows 0.0.0.0/0 under default = \"deny\": that allows loopback, private, link-local and every other internal address too (all but the baseline); to allow the internet but nothing internal, remove the rule and use default = \"deny-internal\""]);
    // ::/0 under deny-internal.
    let w = warned("[[workload]]\nname = \"a\"\ncgroup = \"/mcp.slice/a.service\"\n[[workload.allow]]\ncidr = \"::/0\"\n");
    assert!(
        w[0].starts_with(
            "test.toml:5: workload \"a\" allows ::/0 under default = \"deny-internal\""
        ),
        "{w:?}"
    );
    // The machine's own services.
    for c in ["/system.slice", "/*", "/**", "/system.slice/*"] {
        let w = warned(&format!("[[workload]]\nname = \"a\"\ncgroup = \"{c}\"\n"));
        assert_eq!(w, [format!("test.toml:2: workload \"a\" cgroup {c} takes in the machine's own services (sshd, the kubelet, the container runtime, mcp-guard itself): name the cgroup of your MCP servers, e.g. /mcp.slice or /mcp.slice/*.service")], "{c}");
    }
    // A workload shadowed by an earlier pattern.
    let w = warned("[[workload]]\nname = \"all\"\ncgroup = \"/mcp.slice/*\"\n[[workload]]\nname = \"gh\"\ncgroup = \"/mcp.slice/gh.service\"\n");
    assert_eq!(w, ["test.toml:5: workload \"gh\" (cgroup /mcp.slice/gh.service) never applies: workload \"all\" on line 2 takes that cgroup first with the pattern /mcp.slice/* (the first match wins); move this workload above it"]);
    // An allow rule the baseline shadows, and a duplicate.
    let w = warned("[[workload]]\nname = \"a\"\ncgroup = \"/mcp.slice/a.service\"\n[[workload.allow]]\ncidr = \"169.254.169.254/32\"\n[[workload.allow]]\ncidr = \"10.0.0.0/8\"\n[[workload.allow]]\ncidr = \"10.0.0.0/8\"\n");
    assert_eq!(w, [
        "test.toml:5: workload \"a\" allows 169.254.169.254/32, which the baseline (metadata) denies before any allow rule: the rule never applies; remove it (the baseline holds for every workload)".to_string(),
        "test.toml:9: workload \"a\" repeats the allow rule for 10.0.0.0/8: remove the duplicate".to_string(),
    ]);
    // A config that guards nothing.
    assert_eq!(warned("[baseline]\ndeny = [\"metadata\"]\n"), ["test.toml: no [[workload]]: this config guards no process (only the baseline is compiled); add a workload with the cgroup or pods of your MCP servers"]);
    // The DNS proxy on every address.
    let w = warned("[[workload]]\nname = \"a\"\ncgroup = \"/mcp.slice/a.service\"\n[dns]\nproxy = \"0.0.0.0:53\"\n");
    assert!(
        w.iter()
            .any(|m| m
                .starts_with("test.toml: [dns] proxy = \"0.0.0.0:53\" listens on every address")),
        "{w:?}"
    );
}

#[test]
fn control_characters_in_names_are_errors() {
    let e = err("[[workload]]\nname = \"a\\u001b[31mb\"\ncgroup = \"/mcp.slice/a.service\"\n");
    assert_eq!(e.line, 2);
    assert!(
        e.message.contains("holds a control character"),
        "{}",
        e.message
    );
}

/// `cidr = "nameservers"`: one rule per DNS server the daemon resolves with, with the
/// rule's ports, protocol and line; a resolv.conf text is read for its nameserver lines.
#[test]
fn nameservers_stand_for_the_daemons_dns_servers() {
    let cfg = p("[[workload]]\nname = \"w\"\ncgroup = \"/w\"\ndefault = \"deny\"\n[[workload.allow]]\ncidr = \"nameservers\"\nports = [53]\n[dns]\nnameservers = [\"10.43.0.10\", \"fd00::a:53\", \"10.43.0.10:5353\"]\n").unwrap();
    let rules = &cfg.workloads[0].allow;
    let nets: Vec<String> = rules.iter().map(|r| r.net.to_string()).collect();
    assert_eq!(nets, ["10.43.0.10/32", "fd00::a:53/128"]);
    assert!(rules.iter().all(|r| r.loc.line == 6 && r.ports.len() == 1));
    assert_eq!(
        resolv_conf_nameservers("# k8s\nsearch svc.cluster.local\nnameserver 10.96.0.10\n nameserver fd00::10\nnameserver bogus\noptions ndots:5\n"),
        ["10.96.0.10".parse::<std::net::IpAddr>().unwrap(), "fd00::10".parse().unwrap()]
    );
    // A typo is still a CIDR error, not a set.
    let e = err(
        "[[workload]]\nname = \"w\"\ncgroup = \"/w\"\n[[workload.allow]]\ncidr = \"nameserver\"\n",
    );
    assert!(e.to_string().contains("allow.cidr"), "{e}");
}
