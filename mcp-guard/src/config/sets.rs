//! Named address sets: the cloud metadata endpoints and the non-global ranges that
//! `default = "deny-internal"` refuses. docs/src/configuration.md (Named sets) documents each entry and its source.

use std::sync::LazyLock;

use ipnet::IpNet;

/// Cloud instance-metadata and credential endpoints.
const METADATA: &[&str] = &[
    // AWS IMDS, GCP, Azure IMDS, OpenStack, Oracle Cloud, DigitalOcean, Hetzner, ...
    "169.254.169.254/32",
    // AWS IMDS over IPv6 (Nitro instances).
    "fd00:ec2::254/128",
    // AWS ECS task metadata and credentials endpoint.
    "169.254.170.2/32",
    // AWS EKS Pod Identity agent.
    "169.254.170.23/32",
    "fd00:ec2::23/128",
    // Alibaba Cloud ECS metadata.
    "100.100.100.200/32",
    // Azure WireServer (host agent, certificate and extension channel).
    "168.63.129.16/32",
    // The same v4 endpoints through the NAT64 well-known prefix (RFC 6052): on an
    // IPv6-only node with NAT64, 64:ff9b::a9fe:a9fe reaches 169.254.169.254.
    "64:ff9b::a9fe:a9fe/128",
    "64:ff9b::a9fe:aa02/128",
    "64:ff9b::a9fe:aa17/128",
    "64:ff9b::6464:64c8/128",
    "64:ff9b::a83f:8110/128",
];

/// Loopback, RFC 1918, CGNAT, link-local, unique-local and the other non-global special
/// ranges of the IANA special-purpose registries (RFC 6890 and updates).
const INTERNAL: &[&str] = &[
    "0.0.0.0/8",       // "this network": connect() to 0.0.0.0 reaches the local host
    "10.0.0.0/8",      // RFC 1918
    "100.64.0.0/10",   // CGNAT, RFC 6598
    "127.0.0.0/8",     // loopback
    "169.254.0.0/16",  // link-local, RFC 3927
    "172.16.0.0/12",   // RFC 1918
    "192.0.0.0/24",    // IETF protocol assignments
    "192.0.2.0/24",    // TEST-NET-1
    "192.168.0.0/16",  // RFC 1918
    "198.18.0.0/15",   // benchmarking, RFC 2544
    "198.51.100.0/24", // TEST-NET-2
    "203.0.113.0/24",  // TEST-NET-3
    "224.0.0.0/4",     // multicast
    "240.0.0.0/4",     // reserved, and 255.255.255.255 broadcast
    "::/128",          // unspecified: connect() to :: reaches the local host
    "::1/128",         // loopback
    "64:ff9b:1::/48",  // local-use NAT64, RFC 8215
    "100::/64",        // discard-only, RFC 6666
    "2001:db8::/32",   // documentation
    "fc00::/7",        // unique-local, RFC 4193 (covers AWS fd00:ec2::/32)
    "fe80::/10",       // link-local
    "fec0::/10",       // deprecated site-local
    "ff00::/8",        // multicast
];

const LOOPBACK: &[&str] = &["127.0.0.0/8", "::1/128", "0.0.0.0/8", "::/128"];
const PRIVATE: &[&str] = &["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"];
const LINK_LOCAL: &[&str] = &["169.254.0.0/16", "fe80::/10"];
const CGNAT: &[&str] = &["100.64.0.0/10"];

pub const NAMES: &[&str] = &[
    "metadata",
    "internal",
    "loopback",
    "private",
    "link-local",
    "cgnat",
];

fn parse(list: &[&str]) -> Vec<IpNet> {
    list.iter()
        .map(|s| s.parse().expect("built-in set entries are valid"))
        .collect()
}

static SETS: LazyLock<Vec<(&'static str, Vec<IpNet>)>> = LazyLock::new(|| {
    vec![
        ("metadata", parse(METADATA)),
        ("internal", parse(INTERNAL)),
        ("loopback", parse(LOOPBACK)),
        ("private", parse(PRIVATE)),
        ("link-local", parse(LINK_LOCAL)),
        ("cgnat", parse(CGNAT)),
    ]
});

/// The networks of a named set, or `None` if there is no set of that name.
#[must_use]
pub fn named(name: &str) -> Option<&'static [IpNet]> {
    SETS.iter()
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v.as_slice())
}

#[must_use]
pub fn metadata() -> &'static [IpNet] {
    named("metadata").expect("built-in")
}

#[must_use]
pub fn internal() -> &'static [IpNet] {
    named("internal").expect("built-in")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_resolves_and_parses() {
        for n in NAMES {
            assert!(!named(n).unwrap().is_empty(), "{n}");
        }
    }

    #[test]
    fn metadata_is_inside_internal_or_nat64() {
        // Every v4 metadata endpoint is internal too, so deny-internal alone would also
        // stop it; the baseline exists so no workload allow can reopen it.
        for m in metadata().iter().filter(|n| matches!(n, IpNet::V4(_))) {
            assert!(
                internal().iter().any(|i| i.contains(m)) || m.to_string() == "168.63.129.16/32",
                "{m}"
            );
        }
    }
}
