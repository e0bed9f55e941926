//! The configuration reference: every key the parser accepts, its value, default and
//! meaning. The book's `reference/config.md` is rendered from this table, and a test
//! checks the table against the parser itself (the keys serde lists for each table), so
//! the reference cannot drift from the code.

use super::pods::{DEFAULT_CRI_SOCKETS, DEFAULT_POD_CGROUPS, DEFAULT_POLL_MS};
use super::raw::*;
use super::{DEFAULT_CONTROL_SOCKET, DEFAULT_LISTEN, DEFAULT_PIN_DIR, DEFAULT_RATE_LIMIT};

/// One key of one table.
pub struct Key {
    /// The TOML table ("" for the top level), e.g. `workload.allow`.
    pub table: &'static str,
    pub key: &'static str,
    /// What it takes.
    pub value: String,
    /// What holds when it is absent.
    pub default: String,
    pub doc: &'static str,
}

fn key(
    table: &'static str,
    key: &'static str,
    value: impl ToString,
    default: impl ToString,
    doc: &'static str,
) -> Key {
    Key {
        table,
        key,
        value: value.to_string(),
        default: default.to_string(),
        doc,
    }
}

/// The tables, in the order the reference lists them, with a line on each.
pub const TABLES: &[(&str, &str)] = &[
    ("", "Keys outside any table."),
    (
        "baseline",
        "Refusals for every workload; no workload rule can override them.",
    ),
    (
        "workload",
        "One guarded workload (`[[workload]]`, repeated). First match wins.",
    ),
    (
        "workload.allow",
        "An allow rule of the workload (`[[workload.allow]]`, repeated).",
    ),
    (
        "workload.pods",
        "Kubernetes: the pods that are this workload, instead of `cgroup`.",
    ),
    (
        "workload.mcp",
        "Policy at the relay: what the workload's MCP relays (`exec --mcp`, `exec --mcp-http`, a pod's `mcp-proxy` sidecar) decide before a message reaches the server or the client.",
    ),
    ("dns", "Resolving host rules and the filtering DNS proxy."),
    ("events", "Denial events."),
    ("metrics", "The Prometheus endpoint."),
    ("daemon", "Where the daemon attaches, pins and listens."),
    ("tc", "The packet-level backstop (TC classifier)."),
];

/// Every key, table by table.
#[must_use]
pub fn keys() -> Vec<Key> {
    let mut k = vec![
        key("", "mode", "\"enforce\" | \"audit\"", "\"enforce\"", "`audit` decides and reports but never blocks."),
        key("", "baseline", "table", "`deny = [\"metadata\"]`", "See `[baseline]`. An explicitly empty baseline is a warning."),
        key("", "workload", "array of tables", "none", "See `[[workload]]`. A config with no workload is an error."),
        key("", "dns", "table", "", "See `[dns]`; needed only with host rules."),
        key("", "events", "table", "", "See `[events]`."),
        key("", "metrics", "table", "", "See `[metrics]`."),
        key("", "daemon", "table", "", "See `[daemon]`."),
        key("", "tc", "table", "", "See `[tc]`."),
        key("baseline", "deny", format!("list of CIDRs and named sets ({})", super::sets::NAMES.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ")), "[\"metadata\"]", "Destinations no workload may reach, whatever its rules."),
        key("workload", "name", "string", "required", "Unique; names the workload in events, metrics and the CLI. No control characters; `pods-pending` and `mcp-proxy` are reserved."),
        key("workload", "cgroup", "cgroup v2 path or glob (`/mcp.slice/*`)", "one of `cgroup`, `pods`", "The workload's processes: this cgroup and every cgroup below it. Not `/`. A cgroup that does not exist yet is registered when it appears."),
        key("workload", "pods", "table", "one of `cgroup`, `pods`", "See `[workload.pods]`."),
        key("workload", "default", "\"deny-internal\" | \"deny\" | \"allow\"", "\"deny-internal\"", "What a destination no allow rule names gets: `deny-internal` refuses the internal ranges and allows global unicast; `deny` refuses everything; `allow` applies only the baseline."),
        key("workload", "mode", "\"enforce\" | \"audit\"", "the top-level `mode`", "This workload's mode."),
        key("workload", "allow", "array of tables", "none", "See `[[workload.allow]]`."),
        key("workload", "deny_raw_sockets", "bool", "true", "Refuse raw inet sockets at `sock_create`."),
        key("workload", "deny_packet_sockets", "bool", "true", "Refuse AF_PACKET, AF_XDP and AF_VSOCK sockets (needs BPF LSM)."),
        key("workload", "resolve_any", "bool", "false", "The DNS proxy forwards any name this workload asks, not only names its host rules allow."),
        key("workload", "deny_direct_dns", "bool", "false", "DNS (53) and DoT/DoQ (853) only where an allow rule allows them, so names are resolved through the proxy."),
        key("workload", "allow_ping", "bool", "false", "Allow ICMP datagram (\"ping\") sockets."),
        key("workload", "allow_other_protocols", "bool", "false", "Allow UDP-Lite, SCTP and other inet protocols besides TCP and UDP."),
        key("workload", "between_calls", "\"allow\" | \"deny\"", "\"allow\"", "`deny`: no egress while no MCP tool call is in flight (`exec --mcp`)."),
        key("workload", "unix", "\"deny-listed\" | \"allow-listed\"", "\"deny-listed\"", "AF_UNIX destinations (Linux 6.7+, or BPF LSM): `deny-listed` refuses the built-in local deputies and `deny_unix`; `allow-listed` allows only `allow_unix`."),
        key("workload", "allow_unix", "list of socket paths, `dir/*` prefixes or `@abstract` names", "[]", "Unix sockets this workload may reach (a more specific entry wins)."),
        key("workload", "deny_unix", "list as `allow_unix`", "[]", "Unix sockets refused besides the built-in list."),
        key("workload.allow", "approval", "\"required\"", "none", "The rule is dormant: a connection it would allow is refused and raises an approval request (`mcp-guard approvals list`); once approved, the rule's addresses (cidr, at most 256) open on its ports until the grant ends, expiring in the kernel like learned DNS answers and kept across restarts."),
        key("workload.allow", "approvers", "list of Unix group names", "[] (root only)", "With `approval`: who may approve (root always may)."),
        key("workload.allow", "max_duration", "duration (30s, 5m, 1h)", "\"15m\"", "With `approval`: how long an approval opens the rule (also the longest `approve --for`)."),
        key("workload.allow", "cidr", "CIDR or address (IPv4 or IPv6), or \"nameservers\"", "one of `cidr`, `host`", "Destinations this rule allows. Host bits must be zero. `\"nameservers\"` is the DNS servers the daemon resolves with (`[dns] nameservers`, else its /etc/resolv.conf at every load: in a pod, the cluster DNS Service)."),
        key("workload.allow", "host", "DNS name or `*.name`", "one of `cidr`, `host`", "A name whose answers are allowed while their TTL (clamped) and `grace` last; wildcards need `[dns] proxy`."),
        key("workload.allow", "ports", "list of ports and \"A-B\" ranges (at most 8 ranges)", "every port", "An empty list is every port too (a warning says so)."),
        key("workload.allow", "proto", "\"tcp\" | \"udp\" | \"any\"", "\"any\"", "The protocol this rule allows."),
        key("workload.allow", "allow_internal", "bool", "false", "Host rules only: may an answer be an internal address?"),
        key("workload.allow", "tools", "list of MCP tool names", "always", "Only while a call of one of these tools is in flight (`exec --mcp`)."),
        key("workload.allow", "comment", "string", "none", "Free text, for people."),
        key("workload", "mcp", "table", "none", "Policy at the relay: see `[workload.mcp]`."),
        key("workload.mcp", "allow_tools", "list of tool names or globs (`*`, `?`, `[...]`)", "every tool", "Only these tools are listed (`tools/list`) and may be called; a call of another is answered by the relay with a JSON-RPC error (code -32001) naming the rule and never reaches the server."),
        key("workload.mcp", "deny_tools", "list of tool names or globs", "[]", "These tools are taken out of `tools/list` and their calls refused by the relay (checked before `allow_tools`)."),
        key("workload.mcp", "pin_tools", "bool", "false", "A tool whose name, description or input schema changes after the session's first `tools/list` is hidden and its calls refused (a change is always reported)."),
        key("workload.mcp", "check_arguments", "bool", "true", "A call whose arguments name a destination (a URL, `host:port`, an address) the workload's own policy refuses is answered by the relay with the rule that refuses it (the kernel still judges whatever the server does)."),
        key("workload.mcp", "mask", "\"off\" | \"report\" | \"secrets\"", "\"off\"", "Credentials in tool results and call arguments (cloud keys, GitHub and Slack tokens, private keys, JWTs): `secrets` replaces each with `[REDACTED:<kind>]` inside its JSON string, `report` only counts and reports them."),
        key("workload.mcp", "approval_tools", "list of tool names or globs", "[]", "Calls of these tools are held by the relay until a person approves them (`mcp-guard approvals approve ID --reason TEXT [--for 15m]`) or denies them; no answer within `approval_timeout` refuses the call."),
        key("workload.mcp", "approvers", "list of Unix group names", "[] (root only)", "Members of these groups may approve or deny (over the control socket, which they must be able to open: `daemon.control_group`); root always may; never a process of the instance that asked."),
        key("workload.mcp", "approval_timeout", "duration (30s, 5m, 1h)", "\"5m\"", "How long a held call waits for a decision."),
        key("workload.mcp", "max_duration", "duration", "\"1h\"", "The longest grant `approve --for` may give (every call of the tool of this workload goes through until it ends)."),
        key("workload.mcp", "approval_webhook", "http:// URL", "none", "Each request, decision and expiry is POSTed there as JSON (`text` for Slack or Teams incoming webhooks, through a relay), signed: `X-Mcp-Guard-Signature: sha256=HMAC-SHA256(key, \"v1:\" + X-Mcp-Guard-Timestamp + \":\" + body)`."),
        key("workload.mcp", "approval_webhook_secret_file", "path", "none (required with approval_webhook)", "The file holding the webhook's HMAC key (read at each request; surrounding whitespace ignored)."),
        key("workload.pods", "namespace", "Kubernetes namespace", "every namespace", "Only pods of this namespace."),
        key("workload.pods", "labels", "table of label = value", "{}", "Pods that carry all these labels."),
        key("workload.pods", "annotation", "bool", "false", "Pods annotated `mcp-guard.dev/workload: NAME` join too."),
        key("workload.pods", "mcp_proxy", "container name", "none", "The pods' MCP proxy sidecar container (`mcp-guard mcp-proxy --container`): held by the built-in `mcp-proxy` workload (loopback and the MCP socket only); the daemon takes tool-call reports from it, for the other containers of its pod only."),
        key("dns", "nameservers", "list of ADDR or ADDR:PORT", "those of /etc/resolv.conf at start", "Upstream servers of the resolver and the proxy."),
        key("dns", "netns", "a /run/netns path", "the daemon's own", "Resolve (and run the proxy) in this network namespace: names as the workloads see them."),
        key("dns", "proxy", "ADDR:PORT", "none", "Where the DNS proxy listens (UDP and TCP). Workloads that resolve through it teach the daemon their answers; wildcard rules need it. Not a wildcard address."),
        key("dns", "min_ttl", "seconds", DEFAULT_MIN_TTL, "Record TTLs are clamped to `min_ttl..=max_ttl`."),
        key("dns", "max_ttl", "seconds", DEFAULT_MAX_TTL, "See `min_ttl`."),
        key("dns", "grace", "seconds", DEFAULT_GRACE, "How long a learned address stays allowed after its clamped TTL ran out."),
        key("dns", "max_addresses", "count", DEFAULT_MAX_ADDRESSES, "Learned addresses per workload at most."),
        key("dns", "workload_queries_per_sec", "count", DEFAULT_WORKLOAD_QPS, "Queries per second one workload may send the proxy."),
        key("dns", "workload_in_flight", "count", DEFAULT_WORKLOAD_IN_FLIGHT, "Queries of one workload the proxy works on at once."),
        key("events", "rate_limit_per_sec", "count (0 = no limit)", DEFAULT_RATE_LIMIT, "Events per (workload, destination, port) per second; the rest are counted as suppressed."),
        key("events", "sink", "\"stdout\" | \"file\" | \"none\"", "\"stdout\"", "Where JSON events go (the control socket's stream always has them)."),
        key("events", "file", "path", "none", "The events file, for `sink = \"file\"`; reopened after rotation."),
        key("events", "cmdline", "\"control\" | \"sink\"", "\"control\"", "Command lines only on the root-only control socket's stream, or in the sink too."),
        key("metrics", "listen", "ADDR:PORT", format!("\"{DEFAULT_LISTEN}\""), "/metrics, /healthz and /readyz (nothing else on TCP)."),
        key("daemon", "attach_cgroup", "cgroup v2 path", "\"/\"", "Where the programs attach; `/` covers the whole machine."),
        key("daemon", "pin_dir", "bpffs path", format!("\"{DEFAULT_PIN_DIR}\""), "Pinned maps and links (bpffs is mounted if needed)."),
        key("daemon", "cgroup_root", "path", "/sys/fs/cgroup", "The host cgroup v2 mount, when the daemon runs in a container."),
        key("daemon", "on_exit", "\"keep\" | \"detach\"", "keep (enforce), detach (audit)", "Whether enforcement stays when the daemon stops."),
        key("daemon", "cgroup_skb", "bool", "true", "The per-packet backstop on the cgroup; `false` only to test TC alone."),
        key("daemon", "control_socket", "path", format!("\"{DEFAULT_CONTROL_SOCKET}\""), "/status, /events, /dns and the CLI: root only (0600)."),
        key("daemon", "control_group", "group name", "none", "This group may use the control socket too (0660)."),
        key("daemon", "mcp_socket", "path", format!("\"{}\"", crate::mcp::wire::DEFAULT_SOCKET), "Where `exec --mcp` relays report tool calls: root only (0600)."),
        key("daemon", "cri_socket", "path", DEFAULT_CRI_SOCKETS.join(", then "), "Pod workloads: the runtime's CRI socket."),
        key("daemon", "pod_cgroups", "list of cgroup globs", DEFAULT_POD_CGROUPS.len().to_string() + " kubelet layouts", "Where new pod cgroups appear (held as pending until the runtime names them); `[]` turns pending off."),
        key("daemon", "cri_poll_ms", "milliseconds (10..10000)", DEFAULT_POLL_MS, "How often the runtime is asked for its pods."),
        key("tc", "enabled", "bool", "true", "Attach the TC classifier."),
        key("tc", "interfaces", "list of interface globs", "[\"*\"] (every non-loopback interface)", "VM mode: egress of these interfaces; new ones are attached within a second."),
        key("tc", "pod_interfaces", "list of interface globs", "[]", "Pod mode: ingress of these node-side veths, judged by source address."),
        key("tc", "netns", "a /run/netns path", "the daemon's own", "The network namespace whose interfaces are meant."),
    ];
    k.sort_by_key(|k| TABLES.iter().position(|(t, _)| *t == k.table));
    k
}

/// The reference as Markdown (the book's `reference/config.md`).
#[must_use]
pub fn markdown() -> String {
    let keys = keys();
    let mut out = String::from(
        "# Configuration reference\n\n<!-- Generated from mcp-guard/src/config/reference.rs by `cargo xtask docs`; do not edit. -->\n\nEvery key `mcp-guard check` accepts. Anything else is an error naming the file, the line\nand the keys that table takes. See [Configuration](../configuration.md) for what the\nkeys mean together.\n",
    );
    for (table, about) in TABLES {
        let title = match *table {
            "" => "Top level".to_string(),
            "workload" | "workload.allow" => format!("`[[{table}]]`"),
            t => format!("`[{t}]`"),
        };
        out.push_str(&format!(
            "\n## {title}\n\n{about}\n\n| Key | Value | Default | Meaning |\n|---|---|---|---|\n"
        ));
        for k in keys.iter().filter(|k| k.table == *table) {
            let cell = |s: &str| s.replace('|', "\\|");
            out.push_str(&format!(
                "| `{}` | {} | {} | {} |\n",
                k.key,
                cell(&k.value),
                cell(&k.default),
                cell(k.doc)
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use std::path::Path;

    /// A config with an unknown key in `table`: the parser answers with the keys it takes.
    fn accepted(table: &str) -> BTreeSet<String> {
        let base = "[[workload]]\nname = \"w\"\ncgroup = \"/w\"\n";
        let text = match table {
            "" => format!("zz_unknown = 1\n{base}"),
            "workload" => format!("{base}zz_unknown = 1\n"),
            "workload.allow" => {
                format!("{base}[[workload.allow]]\ncidr = \"10.0.0.0/8\"\nzz_unknown = 1\n")
            }
            "workload.pods" => {
                "[[workload]]\nname = \"w\"\n[workload.pods]\nnamespace = \"n\"\nzz_unknown = 1\n"
                    .into()
            }
            "workload.mcp" => format!("{base}[workload.mcp]\nzz_unknown = 1\n"),
            "baseline" => format!("[baseline]\nzz_unknown = 1\n{base}"),
            t => format!("{base}[{t}]\nzz_unknown = 1\n"),
        };
        let err = super::super::parse(Path::new("t.toml"), &text)
            .expect_err(table)
            .to_string();
        let list = err
            .split("`zz_unknown`, expected ")
            .nth(1)
            .map(|l| l.trim_start_matches("one of "))
            .unwrap_or_else(|| panic!("{table}: {err}"));
        list.split(';')
            .next()
            .unwrap()
            .split(", ")
            .map(|k| k.trim().trim_matches('`').to_string())
            .collect()
    }

    #[test]
    fn the_reference_lists_exactly_the_keys_the_parser_takes() {
        let keys = keys();
        for (table, _) in TABLES {
            let listed: BTreeSet<String> = keys
                .iter()
                .filter(|k| k.table == *table)
                .map(|k| k.key.to_string())
                .collect();
            assert_eq!(listed, accepted(table), "table [{table}]");
        }
        assert!(keys
            .iter()
            .all(|k| TABLES.iter().any(|(t, _)| *t == k.table)));
    }

    /// The book's page is this table rendered (compiled in, so the test needs no access
    /// to the tree); `MCPG_BLESS=1` (what `cargo xtask docs` sets) writes it instead.
    #[test]
    fn the_books_config_reference_is_generated_from_this_table() {
        let want = markdown();
        if std::env::var_os("MCPG_BLESS").is_some() {
            let page =
                Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/src/reference/config.md");
            std::fs::write(&page, &want).unwrap();
            return;
        }
        let have = include_str!("../../../docs/src/reference/config.md");
        assert!(
            have == want,
            "docs/src/reference/config.md is stale: run `cargo xtask docs`"
        );
    }
}
