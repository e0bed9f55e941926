//! The TC classifier on crafted packets, run in the kernel with BPF_PROG_TEST_RUN (aya's `TestRun`):
//! IPv4, IPv6, IPv4-mapped, VLAN, fragments, extension headers, truncated packets.
//! A test-run skb has no socket, so attribution goes through the source-address map
//! (pod mode), filled here as the daemon would.

use std::{collections::BTreeMap, net::IpAddr, path::Path};

use aya::programs::{SchedClassifier, TestRun as _, TestRunOptions};
use mcp_guard::{
    config,
    kernel::maps::{CounterMaps, PolicyMaps},
    kernel::pins::Pins,
    policy,
};
use mcp_guard_common::HOOK_TC;
use mcp_guard_tests::{cgroup_mount, unique, TestCgroup};

const PASS: u32 = u32::MAX; // -1: TCX_NEXT
const DROP: u32 = 2;

const GUARDED_V4: [u8; 4] = [10, 1, 0, 2];
const GUARDED_V6: [u8; 16] = [0xfd, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
const STRANGER_V4: [u8; 4] = [10, 9, 9, 9];
const METADATA: [u8; 4] = [169, 254, 169, 254];
const PUBLIC: [u8; 4] = [93, 184, 216, 34];
const DB: [u8; 4] = [10, 0, 12, 5];
const METADATA_V6: [u8; 16] = [
    0xfd, 0, 0x0e, 0xc2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x02, 0x54,
];

fn eth(ethertype: u16) -> Vec<u8> {
    let mut p = vec![0u8; 12];
    p.extend_from_slice(&ethertype.to_be_bytes());
    p
}

/// IPv4 header (+ 8 bytes of L4 with the ports) after an Ethernet header.
fn v4(src: [u8; 4], dst: [u8; 4], proto: u8, frag_offset: u16, dport: u16) -> Vec<u8> {
    let mut p = eth(0x0800);
    p.extend_from_slice(&[0x45, 0, 0, 28, 0, 0]);
    p.extend_from_slice(&frag_offset.to_be_bytes());
    p.extend_from_slice(&[64, proto, 0, 0]);
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    p.extend_from_slice(&40000u16.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&[0, 8, 0, 0]);
    p
}

/// IPv6 header, optional extension headers (already encoded), then 8 bytes of L4.
fn v6(src: [u8; 16], dst: [u8; 16], first_next: u8, ext: &[u8], dport: u16) -> Vec<u8> {
    let mut p = eth(0x86dd);
    p.extend_from_slice(&[0x60, 0, 0, 0, 0, (ext.len() + 8) as u8, first_next, 64]);
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    p.extend_from_slice(ext);
    p.extend_from_slice(&40000u16.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&[0, 8, 0, 0]);
    p
}

fn mapped(a: [u8; 4]) -> [u8; 16] {
    std::net::Ipv4Addr::from(a).to_ipv6_mapped().octets()
}

/// Runs the classifier on one packet in the kernel (BPF_PROG_TEST_RUN, through aya).
fn run(prog: &SchedClassifier, packet: &[u8]) -> u32 {
    let mut data = packet.to_vec();
    // The kernel wants at least an Ethernet header's worth of data.
    data.resize(data.len().max(14), 0);
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(&data);
    prog.test_run(opts)
        .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN on {} bytes: {e}", data.len()))
        .return_value
}

#[test]
fn classifier_verdicts_on_crafted_packets() {
    let cg = TestCgroup::new();
    let (_, dir) = cg.child("w");
    let cgroup_id = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&dir).unwrap());
    let pins = Pins::new(&Path::new("/sys/fs/bpf").join(unique("mcpg-test")));
    pins.prepare().unwrap();
    let result = std::panic::catch_unwind(|| {
        let text = format!(
            "[[workload]]\nname = \"w\"\ncgroup = \"{}/w\"\ndefault = \"deny-internal\"\n[[workload.allow]]\ncidr = \"10.0.12.0/24\"\nports = [5432]\nproto = \"tcp\"\n",
            cg.rel
        );
        let compiled =
            policy::compile(&config::parse(Path::new("t.toml"), &text).unwrap()).unwrap();
        let mut ebpf = mcp_guard::kernel::loader::open(&pins).unwrap();
        let mut maps = PolicyMaps::take(&mut ebpf).unwrap();
        let counters = CounterMaps::take(&mut ebpf).unwrap();
        maps.install(&compiled, &cgroup_mount(), 0).unwrap();
        // Pod mode attributes by the interface a packet came in on: BPF_PROG_TEST_RUN
        // hands the program packets from `lo` (ifindex 1), here the pod's interface.
        let interfaces: BTreeMap<u32, u64> = [(1, cgroup_id)].into_iter().collect();
        assert_eq!(maps.set_sources(&interfaces), 1);
        let prog: &mut SchedClassifier = ebpf.program_mut("mcpg_tc").unwrap().try_into().unwrap();
        prog.load().unwrap();
        let prog = &*prog;

        let cases: Vec<(&str, Vec<u8>, u32)> = vec![
            (
                "v4 TCP to metadata",
                v4(GUARDED_V4, METADATA, 6, 0, 80),
                DROP,
            ),
            (
                "v4 UDP to metadata",
                v4(GUARDED_V4, METADATA, 17, 0, 53),
                DROP,
            ),
            (
                "v4 ICMP to metadata",
                v4(GUARDED_V4, METADATA, 1, 0, 0),
                DROP,
            ),
            (
                "v4 to a public API",
                v4(GUARDED_V4, PUBLIC, 6, 0, 443),
                PASS,
            ),
            (
                "v4 ICMP to a public address",
                v4(GUARDED_V4, PUBLIC, 1, 0, 0),
                PASS,
            ),
            (
                "allowed database port",
                v4(GUARDED_V4, DB, 6, 0, 5432),
                PASS,
            ),
            ("wrong database port", v4(GUARDED_V4, DB, 6, 0, 5433), DROP),
            (
                "database port, but UDP",
                v4(GUARDED_V4, DB, 17, 0, 5432),
                DROP,
            ),
            (
                "a spoofed source address to metadata (the interface decides)",
                v4(STRANGER_V4, METADATA, 6, 0, 80),
                DROP,
            ),
            (
                "non-first v4 fragment to metadata",
                v4(GUARDED_V4, METADATA, 17, 100, 0),
                DROP,
            ),
            (
                "non-first v4 fragment to the database (port unknown)",
                v4(GUARDED_V4, DB, 6, 100, 0),
                DROP,
            ),
            (
                "non-first v4 fragment to a public address",
                v4(GUARDED_V4, PUBLIC, 17, 100, 0),
                PASS,
            ),
            (
                "first v4 fragment (MF set) to the allowed port",
                v4(GUARDED_V4, DB, 6, 0x2000, 5432),
                PASS,
            ),
            (
                "VLAN-tagged v4 to metadata",
                {
                    let mut p = eth(0x8100);
                    p.extend_from_slice(&[0, 5]);
                    p.extend_from_slice(&v4(GUARDED_V4, METADATA, 6, 0, 80)[12..]);
                    p
                },
                DROP,
            ),
            (
                "v6 to AWS IMDS",
                v6(GUARDED_V6, METADATA_V6, 6, &[], 80),
                DROP,
            ),
            (
                "v6 to IPv4-mapped metadata",
                v6(GUARDED_V6, mapped(METADATA), 6, &[], 80),
                DROP,
            ),
            (
                "v6 to a public address",
                v6(
                    GUARDED_V6,
                    "2606:4700::10"
                        .parse::<std::net::Ipv6Addr>()
                        .unwrap()
                        .octets(),
                    6,
                    &[],
                    443,
                ),
                PASS,
            ),
            (
                "v6 hop-by-hop + destination options to metadata",
                v6(
                    GUARDED_V6,
                    METADATA_V6,
                    0,
                    &[60, 0, 1, 4, 0, 0, 0, 0, 6, 0, 1, 4, 0, 0, 0, 0],
                    80,
                ),
                DROP,
            ),
            (
                "v6 first fragment to the database's mapped address, allowed port",
                v6(GUARDED_V6, mapped(DB), 44, &[6, 0, 0, 1, 0, 0, 0, 1], 5432),
                PASS,
            ),
            (
                "v6 non-first fragment to the database's mapped address",
                v6(
                    GUARDED_V6,
                    mapped(DB),
                    44,
                    &[6, 0, 0, 0x10, 0, 0, 0, 1],
                    5432,
                ),
                DROP,
            ),
            (
                "v6 non-first fragment to metadata",
                v6(
                    GUARDED_V6,
                    METADATA_V6,
                    44,
                    &[17, 0, 0, 0x10, 0, 0, 0, 1],
                    0,
                ),
                DROP,
            ),
            (
                "v6 neighbour solicitation (link scope)",
                v6(
                    GUARDED_V6,
                    "ff02::1:ff00:1"
                        .parse::<std::net::Ipv6Addr>()
                        .unwrap()
                        .octets(),
                    58,
                    &[],
                    0,
                ),
                PASS,
            ),
            (
                "truncated: guarded v4 TCP without its ports",
                v4(GUARDED_V4, METADATA, 6, 0, 80)[..34].to_vec(),
                DROP,
            ),
            // (BPF_PROG_TEST_RUN itself refuses IPv6 frames shorter than an IPv6 header.)
            (
                "truncated: guarded v6 TCP without its ports",
                v6(GUARDED_V6, METADATA_V6, 6, &[], 80)[..54].to_vec(),
                DROP,
            ),
            (
                "truncated: guarded v6, extension header cut off",
                v6(GUARDED_V6, METADATA_V6, 0, &[6, 0, 1, 4, 0, 0, 0, 0], 80)[..56].to_vec(),
                DROP,
            ),
            (
                "ARP",
                {
                    let mut p = eth(0x0806);
                    p.extend_from_slice(&[0; 28]);
                    p
                },
                PASS,
            ),
        ];
        let mut drops = 0u64;
        let mut failures = Vec::new();
        for (name, packet, want) in &cases {
            let got = run(prog, packet);
            if got != *want {
                failures.push(format!("{name}: got {}, want {}", got as i32, *want as i32));
            }
            drops += u64::from(*want == DROP);
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
        // Every drop is counted with hook tc, in the counters the metrics export.
        let counted: u64 = counters
            .read()
            .unwrap()
            .flows
            .iter()
            .filter(|(k, _)| k.hook == HOOK_TC)
            .map(|(_, v)| v)
            .sum();
        assert_eq!(counted, drops, "tc drops counted");
        let _ = IpAddr::from([0u8; 4]);
    });
    let _ = pins.uninstall();
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}
