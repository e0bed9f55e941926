//! Differential test: for random policies and random destinations, the kernel's verdict
//! (EPERM or not) equals the verdict `mcp-guard explain` computes from the same compiled
//! policy. 12 policies x 1,000 destinations = 12,000 cases per run.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
};

use mcp_guard::{
    config,
    policy::{self, Evaluator, FlowProto, Verdict},
};
use mcp_guard_tests::{Daemon, NetNs, Probe, TestCgroup};

const PROBE: &str = env!("CARGO_BIN_EXE_mcpg-probe");
const ROUNDS: usize = 12;
const PROBES_PER_ROUND: usize = 1_000;

/// xorshift64*: deterministic from the seed printed on failure.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// Addresses come from a few small regions so rules and probes overlap often:
/// internal v4, metadata neighbourhood, public v4, ULA v6, public v6, and IPv4 addresses
/// in their NAT64 (64:ff9b::/96) and IPv4-mapped IPv6 forms.
fn random_addr(r: &mut Rng) -> IpAddr {
    match r.below(8) {
        0..=3 => IpAddr::V4(random_v4(r)),
        4 => IpAddr::V6(Ipv6Addr::new(
            0xfd00,
            0xec2,
            0,
            0,
            0,
            0,
            0,
            r.below(512) as u16,
        )),
        5 => IpAddr::V6(Ipv6Addr::new(
            0x2606,
            0x4700,
            r.below(2) as u16,
            0,
            0,
            0,
            0,
            r.below(512) as u16,
        )),
        6 => {
            let o = random_v4(r).octets();
            IpAddr::V6(Ipv6Addr::from([
                0, 0x64, 0xff, 0x9b, 0, 0, 0, 0, 0, 0, 0, 0, o[0], o[1], o[2], o[3],
            ]))
        }
        _ => IpAddr::V6(random_v4(r).to_ipv6_mapped()),
    }
}

fn random_v4(r: &mut Rng) -> Ipv4Addr {
    match r.below(4) {
        0 => Ipv4Addr::new(10, r.below(3) as u8, r.below(4) as u8, r.below(256) as u8),
        1 => Ipv4Addr::new(169, 254, 169 + r.below(2) as u8, r.below(256) as u8),
        2 => Ipv4Addr::new(93, 184, r.below(4) as u8, r.below(256) as u8),
        _ => Ipv4Addr::new(192, 168, r.below(2) as u8, r.below(256) as u8),
    }
}

/// Prefixes of those addresses; IPv6 ones also short enough to contain the whole
/// IPv4-mapped range (::/0, ::/8, ...) or the NAT64 prefix, which must never make an
/// IPv6 rule match IPv4 destinations.
fn random_cidr(r: &mut Rng) -> String {
    let a = random_addr(r);
    let plen = match a {
        IpAddr::V4(_) => *r.pick(&[8u8, 16, 20, 24, 26, 30, 32]),
        IpAddr::V6(v) if v.segments()[0] == 0x64 || v.to_ipv4_mapped().is_some() => {
            *r.pick(&[0u8, 8, 64, 95, 96, 104, 112, 120, 128])
        }
        IpAddr::V6(_) => *r.pick(&[0u8, 32, 64, 100, 120, 124, 128]),
    };
    ipnet_trunc(a, plen)
}

fn ipnet_trunc(a: IpAddr, plen: u8) -> String {
    match a {
        IpAddr::V4(v) => {
            let m = if plen == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(plen))
            };
            format!("{}/{plen}", Ipv4Addr::from(u32::from(v) & m))
        }
        IpAddr::V6(v) => {
            let m = if plen == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(plen))
            };
            format!("{}/{plen}", Ipv6Addr::from(u128::from(v) & m))
        }
    }
}

fn random_config(r: &mut Rng, root: &str) -> String {
    let mut t = String::from("[baseline]\ndeny = [\"metadata\"");
    if r.below(2) == 0 {
        t.push_str(&format!(", \"{}\"", random_cidr(r)));
    }
    t.push_str("]\n");
    let default = *r.pick(&["deny-internal", "deny", "allow"]);
    t.push_str(&format!(
        "[[workload]]\nname = \"w\"\ncgroup = \"{root}/w\"\ndefault = \"{default}\"\n"
    ));
    if r.below(3) == 0 {
        t.push_str("deny_direct_dns = true\n");
    }
    for _ in 0..r.below(10) {
        t.push_str(&format!(
            "[[workload.allow]]\ncidr = \"{}\"\nproto = \"{}\"\n",
            random_cidr(r),
            r.pick(&["tcp", "udp", "any"])
        ));
        match r.below(3) {
            0 => {}
            1 => t.push_str(&format!("ports = [{}]\n", 1 + r.below(100))),
            _ => {
                let lo = 1 + r.below(100);
                t.push_str(&format!(
                    "ports = [\"{lo}-{}\", {}]\n",
                    lo + r.below(50),
                    1 + r.below(100)
                ));
            }
        }
    }
    t.push_str(&format!(
        "[daemon]\nattach_cgroup = \"{root}\"\n[events]\nsink = \"none\"\n"
    ));
    t
}

#[test]
fn kernel_verdicts_equal_explain() {
    let seed = std::env::var("MCPG_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("differential seed: MCPG_SEED={seed}");
    let mut r = Rng(seed);
    let ns = NetNs::new();
    let mut cases = 0;
    let mut denied = 0;
    for round in 0..ROUNDS {
        let cg = TestCgroup::new();
        let (_, dir) = cg.child("w");
        let text = random_config(&mut r, &cg.rel);
        let cfg = config::parse(Path::new("differential.toml"), &text)
            .expect("generated config is valid");
        let Ok(compiled) = policy::compile(&cfg) else {
            continue;
        };
        let ev = Evaluator::new(&compiled);
        let wl = ev.workload("w").expect("workload");

        let d = Daemon::start(&text);
        let mut p = Probe::new(PROBE, &dir, &ns);
        let mut ops = Vec::new();
        let mut expected = Vec::new();
        for _ in 0..PROBES_PER_ROUND {
            let ip = random_addr(&mut r);
            // DNS ports often, for deny_direct_dns.
            let port = match r.below(10) {
                0 => 53,
                1 => 853,
                _ => 1 + r.below(120) as u16,
            };
            let (op, proto) = match (r.below(3), ip) {
                (0, _) => ("udp-connect", FlowProto::Udp),
                (1, IpAddr::V4(_)) => ("tcp6-mapped", FlowProto::Tcp),
                _ => ("tcp", FlowProto::Tcp),
            };
            ops.push(format!("{op} {ip} {port}"));
            expected.push(ev.decide(wl, ip, port, proto));
        }
        let got = p.ops(&ops);
        for ((op, want), got) in ops.iter().zip(&expected).zip(&got) {
            let kernel_denied = got == "EPERM";
            let explain_denied = want.verdict == Verdict::Deny;
            assert_eq!(
                kernel_denied, explain_denied,
                "round {round}, seed {seed}: `{op}` kernel said {got}, explain said {want:?}\nconfig:\n{text}"
            );
            cases += 1;
            denied += usize::from(kernel_denied);
        }
        drop(p);
        assert!(d.stop());
    }
    assert!(cases >= 10_000, "only {cases} cases ran");
    // Both verdicts must be well represented, or agreement would prove little.
    assert!(
        denied > cases / 5 && denied < cases * 4 / 5,
        "{denied} of {cases} denied: generator is lopsided"
    );
    eprintln!("{cases} cases agree ({denied} denied)");
}
