//! Hostile input: the config parser and the policy compiler never panic. Every rejected
//! config gets an error located in the file (line >= 1) with a non-empty message.
//! Bounded: a few thousand cases per run, in CI through `cargo xtask test`.

use std::path::Path;

use mcp_guard::{config, policy};
use proptest::prelude::*;

const VALID: &str = r#"mode = "enforce"
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
[[workload]]
name = "other"
cgroup = "/mcp.slice/other.service"
mode = "audit"
[events]
rate_limit_per_sec = 10
[metrics]
listen = "127.0.0.1:9464"
"#;

/// Pieces an attacker or a tired operator might type.
const TOKENS: &[&str] = &[
    "0",
    "-1",
    "65536",
    "99999999999999999999",
    "\"",
    "'",
    "[[workload]]",
    "[[workload.allow]]",
    "[baseline]",
    "::",
    "/129",
    "/-1",
    "ports",
    "=",
    "\n",
    "cidr",
    "\"::ffff:169.254.169.254/128\"",
    "\"10.0.0.0/8\"",
    "[\"1-65535\"]",
    "[\"9-1\"]",
    "name",
    "cgroup",
    "\"/\"",
    "\"/../etc\"",
    "{",
    "}",
    "true",
    "1e400",
    "\"\\u0000\"",
    "mode = \"audit\"",
    "default = \"allow\"",
    "proto = \"icmp\"",
    "#",
    "ü",
    "\t",
    "[daemon]",
    "pin_dir = \"relative\"",
    "on_exit = \"maybe\"",
    "deny = []",
    "\"64:ff9b::/96\"",
];

fn check(text: &str) {
    match config::parse(Path::new("fuzz.toml"), text) {
        Ok(cfg) => {
            // Whatever parses must compile or fail with a message: never panic.
            if let Err(e) = policy::compile(&cfg) {
                assert!(!e.to_string().is_empty());
            }
        }
        Err(errs) => {
            assert!(!errs.0.is_empty());
            for e in errs.0 {
                assert!(e.line >= 1, "error without a line: {e}");
                assert!(!e.message.is_empty());
                assert!(e.to_string().starts_with("fuzz.toml:"), "{e}");
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_text_never_panics(text in "\\PC{0,400}") {
        check(&text);
    }

    #[test]
    fn mutated_valid_configs_never_panic(
        edits in prop::collection::vec((0usize..VALID.len(), 0usize..12, prop::sample::select(TOKENS)), 1..6)
    ) {
        let mut text = VALID.to_string();
        for (at, cut, token) in edits {
            let mut at = at.min(text.len());
            while !text.is_char_boundary(at) { at -= 1; }
            let mut end = (at + cut).min(text.len());
            while !text.is_char_boundary(end) { end -= 1; }
            text.replace_range(at..end, token);
        }
        check(&text);
    }

    #[test]
    fn random_rule_sets_compile_or_explain_why(
        rules in prop::collection::vec((any::<[u8; 4]>(), 0u8..=32, prop::collection::vec((1u16..=65535, 0u16..100), 0..6)), 0..40)
    ) {
        let mut text = String::from("[[workload]]\nname = \"w\"\ncgroup = \"/w\"\n");
        for (a, plen, ports) in rules {
            let net = ipnet::Ipv4Net::new(a.into(), plen).unwrap().trunc();
            let ports: Vec<String> = ports.iter().map(|(lo, len)| format!("\"{lo}-{}\"", lo.saturating_add(*len))).collect();
            text.push_str(&format!("[[workload.allow]]\ncidr = \"{net}\"\nports = [{}]\n", ports.join(",")));
        }
        check(&text);
    }
}
