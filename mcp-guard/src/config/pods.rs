//! Pod workloads: `[workload.pods]` selects Kubernetes pods by namespace and labels (or
//! by their `mcp-guard.dev/workload` annotation) instead of naming a cgroup, and the
//! `[daemon]` keys that say where the node's container runtime and its pod cgroups are.

use std::{collections::BTreeMap, path::PathBuf};

use serde::Deserialize;
use toml::Spanned;

use super::{Ctx, DefaultAction, Mode, Workload};

/// The annotation a pod joins a workload by (when that workload allows it).
pub const ANNOTATION: &str = "mcp-guard.dev/workload";

/// The workload every new pod cgroup belongs to until the daemon has identified its pod
/// through the CRI: it denies all egress.
pub const PENDING: &str = "pods-pending";

/// The workload of the MCP proxy sidecar containers (`[workload.pods] mcp_proxy`): only
/// loopback (the server in its pod) and the daemon's MCP socket.
pub const PROXY: &str = "mcp-proxy";

/// Where the kubelet creates pod cgroups, for the cgroupfs and the systemd drivers and
/// each QoS class (guaranteed, burstable, best effort). Every one has the
/// `parent/prefix*` shape, so the kernel registers a new pod cgroup inside its `mkdir`.
pub const DEFAULT_POD_CGROUPS: &[&str] = &[
    "/kubepods/pod*",
    "/kubepods/burstable/pod*",
    "/kubepods/besteffort/pod*",
    "/kubepods.slice/kubepods-pod*",
    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod*",
    "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod*",
];

/// The runtime sockets tried when `daemon.cri_socket` is not set (containerd, CRI-O).
/// How often the runtime is asked for its pods (`[daemon] cri_poll_ms`).
pub const DEFAULT_POLL_MS: u64 = 200;

pub const DEFAULT_CRI_SOCKETS: &[&str] =
    &["/run/containerd/containerd.sock", "/run/crio/crio.sock"];

/// Which pods a workload holds.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PodSelector {
    /// Only pods of this namespace (any, if unset).
    pub namespace: Option<String>,
    /// Every label must match (key and value).
    pub labels: BTreeMap<String, String>,
    /// A pod annotated `mcp-guard.dev/workload: NAME` joins this workload (within
    /// `namespace`, if set), whatever its labels.
    pub annotation: bool,
    /// The name of the pods' MCP proxy sidecar container (`mcp-guard mcp-proxy
    /// --container`): it is held by [`PROXY`] instead of this workload, and the daemon
    /// takes tool-call reports from it for the other containers of its pod only.
    pub mcp_proxy: Option<String>,
}

impl PodSelector {
    /// Whether the selector's namespace and labels match (not the annotation).
    #[must_use]
    pub fn matches(
        &self,
        namespace: &str,
        labels: &std::collections::HashMap<String, String>,
    ) -> bool {
        self.namespace.as_deref().is_none_or(|n| n == namespace)
            && self.labels.iter().all(|(k, v)| labels.get(k) == Some(v))
    }

    /// One line for `check`, `/status` and logs.
    #[must_use]
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(n) = &self.namespace {
            parts.push(format!("namespace={n}"));
        }
        for (k, v) in &self.labels {
            parts.push(format!("{k}={v}"));
        }
        if self.annotation {
            parts.push(format!("or annotation {ANNOTATION}"));
        }
        if parts.is_empty() {
            "every pod".into()
        } else {
            parts.join(" ")
        }
    }
}

/// The node's container runtime and pod cgroups (only used when a workload selects pods).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodsConfig {
    /// The CRI socket; `None`: the first of [`DEFAULT_CRI_SOCKETS`] that exists.
    pub cri_socket: Option<PathBuf>,
    /// Patterns of the cgroups new pods get: each is held by [`PENDING`] until its pod is
    /// identified. Empty turns that off (a new pod runs under its parent's policy until
    /// identified).
    pub pod_cgroups: Vec<String>,
    /// How often the runtime is asked for its pods, in milliseconds.
    pub poll_ms: u64,
}

impl Default for PodsConfig {
    fn default() -> Self {
        Self {
            cri_socket: None,
            pod_cgroups: DEFAULT_POD_CGROUPS
                .iter()
                .map(|s| (*s).to_string())
                .collect(),
            poll_ms: DEFAULT_POLL_MS,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPods {
    #[serde(default)]
    pub(super) namespace: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) labels: BTreeMap<String, Spanned<String>>,
    #[serde(default)]
    pub(super) annotation: Option<bool>,
    #[serde(default)]
    pub(super) mcp_proxy: Option<Spanned<String>>,
}

/// A DNS-1123 label or a label key/value as Kubernetes allows them (checked loosely:
/// characters only), so a typo is not silently a selector that matches nothing.
fn label_ok(s: &str, key: bool) -> bool {
    let allowed = |c: char| c.is_ascii_alphanumeric() || "-_.".contains(c) || (key && c == '/');
    !s.is_empty() && s.len() <= 316 && s.chars().all(allowed)
}

pub(super) fn selector(cx: &mut Ctx<'_>, raw: &Spanned<RawPods>) -> Option<PodSelector> {
    let r = raw.get_ref();
    let mut ok = true;
    let namespace = r.namespace.as_ref().map(|n| {
        let v = n.get_ref().trim().to_string();
        if !label_ok(&v, false) || v.contains('_') || v.contains('.') {
            cx.err(&n.span(), format!("pods.namespace {v:?} is not a Kubernetes namespace name (lower-case letters, digits and '-')"));
            ok = false;
        }
        v
    });
    let mut labels = BTreeMap::new();
    for (k, v) in &r.labels {
        if !label_ok(k, true) {
            cx.err(&raw.span(), format!("pods.labels key {k:?} is not a Kubernetes label key (letters, digits, '-', '_', '.', one '/' after a prefix)"));
            ok = false;
        }
        if !v.get_ref().is_empty() && !label_ok(v.get_ref(), false) {
            cx.err(&v.span(), format!("pods.labels value {:?} for {k:?} is not a Kubernetes label value (letters, digits, '-', '_', '.')", v.get_ref()));
            ok = false;
        }
        labels.insert(k.clone(), v.get_ref().clone());
    }
    let annotation = r.annotation.unwrap_or(false);
    if namespace.is_none() && labels.is_empty() && !annotation {
        cx.err(&raw.span(), "[workload.pods] selects every pod on the node: give a namespace, labels, or annotation = true (every pod already gets [baseline] and the workload naming /kubepods)");
        ok = false;
    }
    let mcp_proxy = r.mcp_proxy.as_ref().map(|n| {
        let v = n.get_ref();
        let dns_label = !v.is_empty()
            && v.len() <= 63
            && v.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !v.starts_with('-')
            && !v.ends_with('-');
        if !dns_label {
            cx.err(&n.span(), format!("pods.mcp_proxy {v:?} is not a container name (lower-case letters, digits and '-', at most 63): name the pod's MCP proxy sidecar container, e.g. \"mcp-proxy\""));
            ok = false;
        }
        v.clone()
    });
    ok.then_some(PodSelector {
        namespace,
        labels,
        annotation,
        mcp_proxy,
    })
}

pub(super) fn pods_config(
    cx: &mut Ctx<'_>,
    cri_socket: Option<&Spanned<String>>,
    pod_cgroups: Option<&Vec<Spanned<String>>>,
    poll_ms: Option<&Spanned<i64>>,
) -> PodsConfig {
    let mut out = PodsConfig::default();
    if let Some(s) = cri_socket {
        if s.get_ref().starts_with('/') && !s.get_ref().split('/').any(|c| c == "..") {
            out.cri_socket = Some(PathBuf::from(s.get_ref()));
        } else {
            cx.err(&s.span(), "daemon.cri_socket must be an absolute path, e.g. \"/run/containerd/containerd.sock\"");
        }
    }
    if let Some(list) = pod_cgroups {
        out.pod_cgroups = list
            .iter()
            .filter_map(|p| super::rules::normalise_cgroup(cx, p))
            .collect();
    }
    if let Some(ms) = poll_ms {
        match u64::try_from(*ms.get_ref()) {
            Ok(v) if (10..=10_000).contains(&v) => out.poll_ms = v,
            _ => cx.err(
                &ms.span(),
                "daemon.cri_poll_ms must be between 10 and 10000",
            ),
        }
    }
    out
}

/// The [`PROXY`] workload: TCP to loopback (the MCP server in the sidecar's pod) and
/// the daemon's MCP socket (`socket`, where the sidecar mounts it), nothing else.
pub(super) fn proxy_workload(socket: &std::path::Path, mode: Mode, loc: &super::Loc) -> Workload {
    let loopback = |net: &str| super::AllowRule {
        net: net.parse().expect("valid"),
        ports: Vec::new(),
        proto: super::Proto::Tcp,
        tools: Vec::new(),
        comment: Some("the MCP server in the proxy's pod".into()),
        approval: None,
        loc: *loc,
    };
    let text = socket.display().to_string();
    let allow = super::unix_keys::pattern(&text)
        .ok()
        .map(|bytes| super::unix_keys::UnixPattern {
            text,
            bytes,
            loc: *loc,
        });
    Workload {
        allow: vec![loopback("127.0.0.0/8"), loopback("::1/128")],
        unix: super::unix_keys::UnixPolicy {
            allow_listed: true,
            allow: allow.into_iter().collect(),
            deny: Vec::new(),
        },
        ..closed(PROXY, None, mode, loc)
    }
}

/// A built-in workload denying all egress, raw and packet sockets, and DNS but the proxy.
fn closed(name: &str, cgroup: Option<String>, mode: Mode, loc: &super::Loc) -> Workload {
    Workload {
        name: name.into(),
        id: 0,
        cgroup,
        pods: None,
        pending: false,
        default: DefaultAction::Deny,
        mode,
        allow: Vec::new(),
        hosts: Vec::new(),
        deny_raw_sockets: true,
        deny_packet_sockets: true,
        resolve_any: false,
        deny_direct_dns: true,
        allow_ping: false,
        allow_other_protocols: false,
        deny_between_calls: false,
        relay: super::relay_keys::RelayPolicy::default(),
        unix: super::unix_keys::UnixPolicy::default(),
        loc: *loc,
    }
}

/// The [`PENDING`] workloads: one per pod cgroup pattern, all denying every egress.
pub(super) fn pending_workloads(cfg: &PodsConfig, mode: Mode, loc: &super::Loc) -> Vec<Workload> {
    cfg.pod_cgroups
        .iter()
        .map(|p| Workload {
            pending: true,
            ..closed(PENDING, Some(p.clone()), mode, loc)
        })
        .collect()
}
