use std::path::Path;

use proptest::prelude::*;

/// IPv6 prefixes never cover IPv4 destinations (stored mapped) unless they lie in
/// ::ffff:0:0/96; NAT64 destinations are judged by the IPv4 address they carry,
/// everywhere: workload rules, internal ranges, baseline, rebinding guard.
#[test]
fn ipv6_prefixes_and_nat64_are_judged_by_family() {
    use crate::config::parse;
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    let cfg = parse(
        Path::new("t.toml"),
        "[baseline]\ndeny=['metadata','::/8']\n\
         [[workload]]\nname='v6'\ncgroup='/v6'\ndefault='deny'\n[[workload.allow]]\ncidr='::/0'\n[[workload.allow]]\ncidr='10.0.12.0/24'\nports=[5432]\n\
         [[workload]]\nname='v4all'\ncgroup='/v4all'\ndefault='deny'\n[[workload.allow]]\ncidr='::ffff:0:0/96'\nports=[443]\n\
         [[workload]]\nname='di'\ncgroup='/di'\ndefault='deny-internal'\n[[workload.allow]]\ncidr='64:ff9b::a00:d00/120'\nports=[5432]\n\
         [[workload]]\nname='open'\ncgroup='/open'\ndefault='allow'\n[[workload.allow]]\nhost='db.example.com'\n",
    )
    .unwrap();
    let c = compile(&cfg).unwrap();
    let ev = Evaluator::new(&c);
    let v = |w: &str, a: &str, port: u16| {
        ev.decide(ev.workload(w).unwrap(), ip(a), port, FlowProto::Tcp)
    };
    // allow ::/0 allows IPv6 only; the IPv4 rule keeps working below the hole.
    assert_eq!(v("v6", "2606:4700::1", 443).verdict, Verdict::Allow);
    let d = v("v6", "10.1.2.3", 443);
    assert_eq!(
        (d.verdict, d.reason),
        (Verdict::Deny, Some(REASON_DEFAULT_DENY))
    );
    assert_eq!(v("v6", "93.184.216.34", 443).verdict, Verdict::Deny);
    assert_eq!(
        v("v6", "::ffff:10.1.2.3", 443).verdict,
        Verdict::Deny,
        "mapped is IPv4"
    );
    assert_eq!(v("v6", "10.0.12.7", 5432).verdict, Verdict::Allow);
    assert_eq!(v("v6", "10.0.12.7", 80).verdict, Verdict::Deny);
    // The baseline's ::/8 denies IPv6 in it, never IPv4.
    assert_eq!(v("open", "93.184.216.34", 443).verdict, Verdict::Allow);
    assert_eq!(v("open", "::1", 443).reason, Some(REASON_BASELINE_DENY));
    assert_eq!(
        v("open", "169.254.169.254", 80).reason,
        Some(REASON_BASELINE_METADATA)
    );
    // The mapped range itself is every IPv4 address.
    assert_eq!(v("v4all", "93.184.216.34", 443).verdict, Verdict::Allow);
    assert_eq!(v("v4all", "2606:4700::1", 443).verdict, Verdict::Deny);
    // NAT64: internal, metadata and allowed exactly as the IPv4 address inside.
    assert_eq!(
        v("di", "64:ff9b::a00:e05", 443).reason,
        Some(REASON_DENY_INTERNAL)
    );
    assert_eq!(
        v("di", "64:ff9b::a00:d05", 443).reason,
        Some(REASON_NOT_ALLOWED)
    );
    assert_eq!(v("di", "64:ff9b::a00:d05", 5432).verdict, Verdict::Allow);
    assert_eq!(
        v("di", "10.0.13.5", 5432).verdict,
        Verdict::Allow,
        "the NAT64 rule is the IPv4 rule"
    );
    assert_eq!(
        v("di", "64:ff9b::5db8:d822", 443).verdict,
        Verdict::Allow,
        "public inside"
    );
    assert_eq!(
        v("open", "64:ff9b::a9fe:a9fe", 80).reason,
        Some(REASON_BASELINE_METADATA)
    );
    let db = &cfg.workloads[3].hosts[0];
    assert_eq!(
        refusal(&cfg, db, ip("64:ff9b::a00:d05")),
        Some("rebound-internal")
    );
    assert_eq!(refusal(&cfg, db, ip("64:ff9b::5db8:d822")), None);
    // A baseline ::/8 does not make IPv4 answers "baseline".
    assert_eq!(refusal(&cfg, db, ip("93.184.216.34")), None);
    assert_eq!(refusal(&cfg, db, ip("::2")), Some("rebound-baseline"));
    // A learned NAT64 answer allows the IPv4 address it carries, and its NAT64 form.
    let learned = Learned {
        workload: "open".into(),
        name: "db.example.com".into(),
        addr: ip("64:ff9b::5db8:d822"),
        ttl: 60,
        expires_unix: u64::MAX,
        source: "proxy".into(),
    };
    let c = compile_with(&cfg, &[learned]).unwrap();
    assert!(c
        .exact
        .iter()
        .any(|e| display_addr(e.addr) == ip("93.184.216.34")));
}

#[test]
fn rebinding_guard_and_learned_allows() {
    use crate::config::parse;
    let cfg = parse(
        Path::new("t.toml"),
        "[baseline]\ndeny=['metadata','192.0.2.0/24']\n[[workload]]\nname='w'\ncgroup='/w'\ndefault='deny'\n[[workload.allow]]\nhost='api.example.com'\nports=[443]\nproto='tcp'\n[[workload.allow]]\nhost='db.example.com'\nallow_internal=true\n",
    )
    .unwrap();
    let (api, db) = (&cfg.workloads[0].hosts[0], &cfg.workloads[0].hosts[1]);
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    assert_eq!(refusal(&cfg, api, ip("93.184.216.34")), None);
    assert_eq!(
        refusal(&cfg, api, ip("169.254.169.254")),
        Some("rebound-metadata")
    );
    assert_eq!(
        refusal(&cfg, db, ip("::ffff:169.254.169.254")),
        Some("rebound-metadata")
    );
    assert_eq!(
        refusal(&cfg, db, ip("64:ff9b::a9fe:a9fe")),
        Some("rebound-metadata")
    );
    assert_eq!(refusal(&cfg, db, ip("192.0.2.9")), Some("rebound-baseline"));
    assert_eq!(refusal(&cfg, api, ip("10.1.2.3")), Some("rebound-internal"));
    assert_eq!(refusal(&cfg, api, ip("::1")), Some("rebound-internal"));
    assert_eq!(refusal(&cfg, db, ip("10.1.2.3")), None);
    let learned = |name: &str, addr: &str| Learned {
        workload: "w".into(),
        name: name.into(),
        addr: ip(addr),
        ttl: 60,
        expires_unix: u64::MAX,
        source: "resolver".into(),
    };
    let c = compile_with(
        &cfg,
        &[
            learned("api.example.com", "93.184.216.34"),
            learned("api.example.com", "10.9.9.9"),
            learned("api.example.com", "169.254.169.254"),
            learned("db.example.com", "10.0.12.5"),
            learned("other.example.com", "93.184.216.35"),
        ],
    )
    .unwrap();
    // Learned-only exact entries carry their expiry, for the kernel to compare.
    let exact_of = |a: &str| {
        c.exact
            .iter()
            .find(|e| e.addr == addr16(ip(a)))
            .expect("exact entry")
    };
    assert_eq!(exact_of("93.184.216.34").expires_unix, Some(u64::MAX));
    assert_ne!(
        exact_of("93.184.216.34").entry.flags & mcp_guard_common::ENTRY_F_EXPIRES,
        0
    );
    let ev = Evaluator::new(&c);
    let w = ev.workload("w").unwrap();
    let d = ev.decide(w, ip("93.184.216.34"), 443, FlowProto::Tcp);
    assert_eq!(d.verdict, Verdict::Allow);
    assert!(ev
        .rule_text(d.rule_id)
        .unwrap()
        .contains("api.example.com = 93.184.216.34"));
    assert_eq!(
        ev.decide(w, ip("93.184.216.34"), 80, FlowProto::Tcp)
            .verdict,
        Verdict::Deny
    );
    assert_eq!(
        ev.decide(w, ip("10.9.9.9"), 443, FlowProto::Tcp).verdict,
        Verdict::Deny
    );
    assert_eq!(
        ev.decide(w, ip("169.254.169.254"), 443, FlowProto::Tcp)
            .verdict,
        Verdict::Deny
    );
    assert_eq!(
        ev.decide(w, ip("10.0.12.5"), 5432, FlowProto::Tcp).verdict,
        Verdict::Allow
    );
    assert_eq!(
        ev.decide(w, ip("93.184.216.35"), 443, FlowProto::Tcp)
            .verdict,
        Verdict::Deny
    );
}

use super::*;
use crate::config::parse;

fn compile_str(t: &str) -> Compiled {
    compile(&parse(Path::new("t.toml"), t).unwrap()).unwrap()
}

fn decide(c: &Compiled, wl: &str, ip: &str, port: u16, proto: FlowProto) -> Decision {
    let ev = Evaluator::new(c);
    ev.decide(ev.workload(wl).unwrap(), ip.parse().unwrap(), port, proto)
}

const CFG: &str = r#"
[baseline]
deny = ["metadata", "198.51.100.0/24"]
[[workload]]
name = "gh"
cgroup = "/gh"
default = "deny-internal"
[[workload.allow]]
cidr = "10.0.12.0/24"
ports = [5432]
proto = "tcp"
[[workload.allow]]
cidr = "10.0.0.0/8"
ports = ["8000-8100"]
[[workload.allow]]
cidr = "169.254.169.254/32"
[[workload]]
name = "strict"
cgroup = "/strict"
default = "deny"
[[workload.allow]]
cidr = "93.184.216.34"
ports = [443]
[[workload]]
name = "open"
cgroup = "/open"
default = "allow"
"#;

#[test]
fn golden_decisions() {
    let c = compile_str(CFG);
    use FlowProto::{Tcp, Udp};
    let d = |w, ip, port, p| decide(&c, w, ip, port, p);
    // Baseline beats a workload allow of the metadata address.
    assert_eq!(
        d("gh", "169.254.169.254", 80, Tcp).reason,
        Some(REASON_BASELINE_METADATA)
    );
    assert_eq!(
        d("gh", "::ffff:169.254.169.254", 80, Tcp).reason,
        Some(REASON_BASELINE_METADATA)
    );
    assert_eq!(
        d("gh", "fd00:ec2::254", 80, Tcp).reason,
        Some(REASON_BASELINE_METADATA)
    );
    assert_eq!(
        d("open", "169.254.170.2", 80, Tcp).reason,
        Some(REASON_BASELINE_METADATA)
    );
    assert_eq!(
        d("open", "198.51.100.7", 80, Tcp).reason,
        Some(REASON_BASELINE_DENY)
    );
    // Allowed CIDR and port; the /24 rule inherits the /8's port range.
    assert_eq!(d("gh", "10.0.12.5", 5432, Tcp).verdict, Verdict::Allow);
    assert_eq!(d("gh", "10.0.12.5", 8080, Udp).verdict, Verdict::Allow);
    assert_eq!(d("gh", "10.9.9.9", 8080, Tcp).verdict, Verdict::Allow);
    // Wrong port / proto on an allowed address, internal: refused.
    assert_eq!(
        d("gh", "10.0.12.5", 5433, Tcp).reason,
        Some(REASON_NOT_ALLOWED)
    );
    assert_eq!(
        d("gh", "10.0.12.5", 5432, Udp).reason,
        Some(REASON_NOT_ALLOWED)
    );
    // Internal, no rule.
    assert_eq!(
        d("gh", "192.168.1.1", 80, Tcp).reason,
        Some(REASON_DENY_INTERNAL)
    );
    assert_eq!(
        d("gh", "127.0.0.1", 80, Tcp).reason,
        Some(REASON_DENY_INTERNAL)
    );
    assert_eq!(d("gh", "::ffff:10.1.1.1", 80, Tcp).verdict, Verdict::Deny);
    assert_eq!(
        d("gh", "fe80::1", 80, Tcp).reason,
        Some(REASON_DENY_INTERNAL)
    );
    // Global: allowed under deny-internal.
    assert_eq!(d("gh", "93.184.216.34", 443, Tcp).verdict, Verdict::Allow);
    assert_eq!(d("gh", "2606:4700::1", 443, Tcp).verdict, Verdict::Allow);
    // deny: only the allowed host and port.
    assert_eq!(
        d("strict", "93.184.216.34", 443, Tcp).verdict,
        Verdict::Allow
    );
    assert_eq!(
        d("strict", "93.184.216.34", 80, Tcp).reason,
        Some(REASON_NOT_ALLOWED)
    );
    assert_eq!(
        d("strict", "1.1.1.1", 443, Tcp).reason,
        Some(REASON_DEFAULT_DENY)
    );
    assert_eq!(d("open", "10.0.0.1", 22, Tcp).verdict, Verdict::Allow);
}

#[test]
fn decided_rule_is_reported() {
    let c = compile_str(CFG);
    let ev = Evaluator::new(&c);
    let d = decide(&c, "gh", "10.0.12.5", 5432, FlowProto::Tcp);
    assert!(ev
        .rule_text(d.rule_id)
        .unwrap()
        .contains("10.0.12.0/24 ports 5432 tcp (t.toml:9)"));
    let d = decide(&c, "gh", "169.254.169.254", 80, FlowProto::Tcp);
    assert!(ev
        .rule_text(d.rule_id)
        .unwrap()
        .contains("baseline deny metadata"));
}

#[test]
fn too_many_ranges_is_a_clear_error() {
    let mut t = String::from(
        "[[workload]]\nname='a'\ncgroup='/a'\n[[workload.allow]]\ncidr='10.0.0.0/8'\nports=[",
    );
    let ports: Vec<String> = (0..20).map(|i| (1000 + i * 10).to_string()).collect();
    t.push_str(&ports.join(","));
    t.push_str("]\n");
    let e = compile(&parse(Path::new("t.toml"), &t).unwrap()).unwrap_err();
    assert!(
        matches!(&e, super::CompileError::TooManyRanges { net, count: 20, .. } if net == "10.0.0.0/8"),
        "{e:?}"
    );
    assert!(e.to_string().contains("at most"), "{e}");
}

/// Reference semantics straight from the config, independent of the compiler.
fn reference(cfg: &Config, w: usize, ip: IpAddr, port: u16, proto: FlowProto) -> Verdict {
    let inb = |n: &IpNet| match (n, ip) {
        (IpNet::V4(n), IpAddr::V4(a)) => n.contains(&a),
        (IpNet::V6(n), IpAddr::V6(a)) => n.contains(&a),
        _ => false,
    };
    for b in &cfg.baseline {
        let nets: Vec<IpNet> = match &b.item {
            BaselineItem::Set { nets, .. } => nets.clone(),
            BaselineItem::Cidr(n) => vec![*n],
        };
        if nets.iter().any(inb) {
            return Verdict::Deny;
        }
    }
    let wl = &cfg.workloads[w];
    for a in &wl.allow {
        let proto_ok = match a.proto {
            Proto::Any => true,
            Proto::Tcp => proto == FlowProto::Tcp,
            Proto::Udp => proto == FlowProto::Udp,
        };
        let port_ok = a.ports.is_empty() || a.ports.iter().any(|p| (p.lo..=p.hi).contains(&port));
        if inb(&a.net) && proto_ok && port_ok {
            return Verdict::Allow;
        }
    }
    match wl.default {
        DefaultAction::Allow => Verdict::Allow,
        DefaultAction::Deny => Verdict::Deny,
        DefaultAction::DenyInternal => {
            if sets::internal().iter().any(inb) {
                Verdict::Deny
            } else {
                Verdict::Allow
            }
        }
    }
}

fn arb_v4() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        any::<u32>().prop_map(|x| IpAddr::from(x.to_be_bytes())),
        (0u8..4, any::<u16>()).prop_map(|(b, x)| IpAddr::from([10, b, (x >> 8) as u8, x as u8])),
        Just("169.254.169.254".parse().unwrap()),
    ]
}

proptest! {
    /// The compiled entries decide exactly as the rules read literally.
    #[test]
    fn compiled_matches_reference(
        rules in prop::collection::vec((0u8..4, any::<u16>(), 8u8..=32, prop::option::of((1u16..200, 0u16..50)), 0u8..3), 0..12),
        default in 0u8..3,
        probes in prop::collection::vec((arb_v4(), 1u16..260, any::<bool>()), 64),
    ) {
        let mut t = format!("[[workload]]\nname='w'\ncgroup='/w'\ndefault='{}'\n", ["deny-internal","deny","allow"][default as usize]);
        for (b, x, plen, ports, proto) in &rules {
            let net = IpNet::new(IpAddr::from([10, *b, (x >> 8) as u8, *x as u8]), *plen).unwrap().trunc();
            t.push_str(&format!("[[workload.allow]]\ncidr='{net}'\nproto='{}'\n", ["tcp","udp","any"][*proto as usize]));
            if let Some((lo, len)) = ports { t.push_str(&format!("ports=['{}-{}']\n", lo, lo + len)); }
        }
        let cfg = parse(Path::new("p.toml"), &t).unwrap();
        let Ok(c) = compile(&cfg) else { return Ok(()) };
        let ev = Evaluator::new(&c);
        for (ip, port, tcp) in probes {
            let p = if tcp { FlowProto::Tcp } else { FlowProto::Udp };
            let got = ev.decide(&c.workloads[0], ip, port, p).verdict;
            prop_assert_eq!(got, reference(&cfg, 0, ip, port, p), "{} {}:{} {:?}\n{}", t, ip, port, p, "");
        }
    }
}

#[test]
fn a_static_exact_rule_never_expires_with_a_learned_answer() {
    let cfg = crate::config::parse(
        Path::new("t.toml"),
        "[[workload]]\nname='w'\ncgroup='/w'\ndefault='deny'\n[[workload.allow]]\nhost='api.example.com'\nports=[443]\n[[workload.allow]]\ncidr='93.184.216.34/32'\nports=[80]\n",
    )
    .unwrap();
    let learned = Learned {
        workload: "w".into(),
        name: "api.example.com".into(),
        addr: "93.184.216.34".parse().unwrap(),
        ttl: 60,
        expires_unix: 1000,
        source: "resolver".into(),
    };
    let c = compile_with(&cfg, &[learned]).unwrap();
    let e = c
        .exact
        .iter()
        .find(|e| e.addr == addr16("93.184.216.34".parse().unwrap()))
        .expect("exact entry");
    assert_eq!(e.expires_unix, None);
    assert_eq!(e.entry.flags & mcp_guard_common::ENTRY_F_EXPIRES, 0);
    assert_eq!(e.entry.n_ranges, 2, "both rules' ports");
}

#[test]
fn a_policy_that_cannot_fit_the_kernel_maps_is_refused_with_the_count() {
    let mut c = compile_str("[[workload]]\nname = \"a\"\ncgroup = \"/a\"\n");
    assert!(c.fits_the_maps().is_ok());
    let one = c.lpm[0].clone();
    c.lpm = vec![one; 262_145];
    let e = c.fits_the_maps().unwrap_err();
    assert!(
        e.starts_with(
            "the policy needs 262145 prefix entries, the kernel map holds 262144 per policy"
        ),
        "{e}"
    );
}
