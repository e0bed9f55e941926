//! The CRI v1 client: the same gRPC API the kubelet drives, over the runtime's Unix
//! socket (containerd, CRI-O). Read-only: it lists pod sandboxes and containers and
//! asks a new sandbox's status once for its cgroup parent.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result};
use k8s_cri::v1::{
    runtime_service_client::RuntimeServiceClient, ListContainersRequest, ListPodSandboxRequest,
    PodSandboxStatusRequest,
};
use tonic::transport::{Channel, Endpoint, Uri};

use super::Pod;

/// How long one CRI call may take before the poll gives up on it (the last known pods
/// stay in force; new pods stay pending).
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// The socket to use: the configured one, or the first default that exists.
#[must_use]
pub fn socket(configured: Option<&Path>) -> Option<PathBuf> {
    configured.map(Path::to_path_buf).or_else(|| {
        crate::config::pods::DEFAULT_CRI_SOCKETS
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
    })
}

/// A gRPC channel to the runtime's CRI socket (each call times out after 5 s).
///
/// # Errors
/// The socket cannot be reached.
pub async fn channel(path: &Path) -> Result<Channel> {
    let path = path.to_path_buf();
    let shown = path.display().to_string();
    // The URI is required by the API and ignored: every connection is the socket.
    Endpoint::try_from("http://[::1]:1")?
        .timeout(CALL_TIMEOUT)
        .connect_timeout(CALL_TIMEOUT)
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await
        .with_context(|| format!("connecting to the CRI socket {shown}"))
}

pub struct Client {
    rt: RuntimeServiceClient<Channel>,
    /// Sandbox id -> cgroup parent (asked once per sandbox).
    parents: HashMap<String, Option<String>>,
}

impl Client {
    /// Connects to the runtime's CRI socket.
    ///
    /// # Errors
    /// The socket cannot be reached.
    pub async fn connect(path: &Path) -> Result<Self> {
        Ok(Self {
            rt: RuntimeServiceClient::new(channel(path).await?),
            parents: HashMap::new(),
        })
    }

    /// Every pod sandbox on the node, with its containers and cgroup parent.
    ///
    /// # Errors
    /// A CRI call failed.
    pub async fn pods(&mut self) -> Result<Vec<Pod>> {
        let sandboxes = self
            .rt
            .list_pod_sandbox(ListPodSandboxRequest { filter: None })
            .await
            .context("CRI ListPodSandbox")?
            .into_inner()
            .items;
        let containers = self
            .rt
            .list_containers(ListContainersRequest { filter: None })
            .await
            .context("CRI ListContainers")?
            .into_inner()
            .containers;
        let mut by_pod: HashMap<String, Vec<(String, String)>> = HashMap::new();
        for c in containers {
            let name = c.metadata.map(|m| m.name).unwrap_or_default();
            by_pod
                .entry(c.pod_sandbox_id)
                .or_default()
                .push((c.id, name));
        }
        self.parents
            .retain(|id, _| sandboxes.iter().any(|s| &s.id == id));
        let mut out = Vec::with_capacity(sandboxes.len());
        for s in sandboxes {
            if !self.parents.contains_key(&s.id) {
                let parent = self.cgroup_parent(&s.id).await?;
                self.parents.insert(s.id.clone(), parent);
            }
            let meta = s.metadata.unwrap_or_default();
            out.push(Pod {
                containers: by_pod.remove(&s.id).unwrap_or_default(),
                cgroup_parent: self.parents.get(&s.id).cloned().flatten(),
                sandbox_id: s.id,
                namespace: meta.namespace,
                name: meta.name,
                uid: meta.uid,
                labels: s.labels,
                annotations: s.annotations,
            });
        }
        Ok(out)
    }

    /// The sandbox's cgroup parent from its verbose status: containerd reports the
    /// sandbox config (`config.linux.cgroup_parent`), CRI-O and others the runtime spec
    /// (`runtimeSpec.linux.cgroupsPath`, the pod's cgroup plus the sandbox's own).
    async fn cgroup_parent(&mut self, id: &str) -> Result<Option<String>> {
        let status = self
            .rt
            .pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: id.to_string(),
                verbose: true,
            })
            .await
            .context("CRI PodSandboxStatus")?
            .into_inner();
        let Some(info) = status.info.get("info") else {
            return Ok(None);
        };
        let v: serde_json::Value = serde_json::from_str(info).unwrap_or_default();
        let from_config = v
            .pointer("/config/linux/cgroup_parent")
            .and_then(|p| p.as_str())
            .filter(|p| !p.is_empty())
            .map(str::to_string);
        let from_spec = || {
            v.pointer("/runtimeSpec/linux/cgroupsPath")
                .and_then(|p| p.as_str())
                .and_then(super::parent_of_cgroups_path)
        };
        Ok(from_config.or_else(from_spec))
    }
}
