//! The daemon's MCP socket: each `exec --mcp` relay holds one connection for the life of
//! its instance and reports calls on it (see [`crate::mcp::wire`]). A call is
//! acknowledged once the kernel entry of the instance holds its tools; when the
//! connection ends, the instance's entry is removed (no tool active: fail closed).

use std::sync::Arc;

use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
};
use tracing::{info, warn};

use super::state::{Command, Handle, Owner};
use crate::{
    host::cgroup,
    mcp::{
        registry::CallRef,
        wire::{Reply, ToDaemon, MAX_LINE},
    },
};

/// Relays served at once.
const MAX_RELAYS: usize = 4096;

pub(super) async fn serve(listener: UnixListener, state: Handle) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_RELAYS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        if let Ok((s, _)) = listener.accept().await {
            let state = state.clone();
            // The peer as the kernel saw it at connect (in the daemon's pid namespace).
            let peer_pid = s
                .peer_cred()
                .ok()
                .and_then(|c| c.pid())
                .and_then(|p| u32::try_from(p).ok());
            tokio::spawn(async move {
                relay(s, &state, peer_pid).await;
                drop(permit);
            });
        }
    }
}

/// The instance a connection announced.
#[derive(Clone)]
pub(super) struct Instance {
    pub(super) cgroup_id: u64,
    pub(super) workload: String,
    pub(super) workload_id: u32,
    /// Its cgroup (relative to the mount) and its relay: where approvals may not come from.
    pub(super) path: String,
    pub(super) relay_pid: u32,
}

/// Why the daemon refused a relay's message (the text goes back on the wire).
#[derive(Debug, thiserror::Error)]
pub(super) enum McpError {
    #[error("the daemon is stopping")]
    Gone,
    #[error("announce the instance first (start)")]
    NotAnnounced,
    #[error("this connection already announced an instance")]
    AlreadyAnnounced,
    #[error("the instance is gone")]
    InstanceGone,
    #[error("no workload named {0:?} in the running policy")]
    NoWorkload(String),
    #[error("workload {0:?} selects pods: exec --mcp needs a workload with a cgroup path")]
    PodWorkload(String),
    #[error("cgroup {cgroup_id} is not a cgroup below workload {workload:?} ({cgroup})")]
    NotBelow {
        cgroup_id: u64,
        workload: String,
        cgroup: String,
    },
    #[error("the peer's credentials could not be read")]
    NoPeer,
    #[error("the peer is in pod {0}: a process in a pod may report calls only as its pod's MCP proxy sidecar (mcp-proxy --container)")]
    PodPeer(String),
    #[error("the peer (cgroup {0}) is in no pod this daemon placed")]
    NotInPod(String),
    #[error("pod {0} is held by no workload")]
    PodNotSelected(String),
    #[error("workload {0:?} names no MCP proxy container (pods.mcp_proxy)")]
    NoProxyContainer(String),
    #[error("container {container:?} of pod {pod} is not the pod's MCP proxy sidecar ({proxy:?}, pods.mcp_proxy)")]
    NotTheProxy {
        pod: String,
        container: String,
        proxy: String,
    },
    #[error("pod {pod} has no container {container:?} (other than its proxy) with a cgroup yet")]
    NoContainer { pod: String, container: String },
    #[error("line too long")]
    LineTooLong,
    #[error("not a relay message: {0}")]
    NotAMessage(#[from] serde_json::Error),
    #[error("writing the instance into the kernel: {0}")]
    Map(#[from] crate::kernel::maps::MapsError),
}

fn reply(r: Result<Reply, McpError>) -> Vec<u8> {
    let mut line = serde_json::to_vec(&match r {
        Ok(r) => r,
        Err(e) => Reply {
            ok: false,
            error: Some(e.to_string()),
            ..Reply::ok(0)
        },
    })
    .expect("serialisable");
    line.push(b'\n');
    line
}

async fn relay(stream: UnixStream, state: &Handle, peer_pid: Option<u32>) {
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    let mut instance: Option<Instance> = None;
    loop {
        let mut line = Vec::new();
        match AsyncReadExt::take(&mut r, MAX_LINE as u64)
            .read_until(b'\n', &mut line)
            .await
        {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        if line.last() != Some(&b'\n') {
            let _ = w.write_all(&reply(Err(McpError::LineTooLong))).await;
            break;
        }
        let answer = match serde_json::from_slice::<ToDaemon>(&line) {
            Err(e) => Err(McpError::NotAMessage(e)),
            Ok(m) => handle(state, &mut instance, m, peer_pid).await,
        };
        if w.write_all(&reply(answer)).await.is_err() {
            break;
        }
    }
    if let Some(i) = instance {
        info!(workload = %i.workload, instance = i.cgroup_id, "MCP instance ended");
        state.send(Command::McpEnd(i));
    }
}

/// Applies one message through the state owner; returns the answer.
async fn handle(
    state: &Handle,
    instance: &mut Option<Instance>,
    m: ToDaemon,
    peer_pid: Option<u32>,
) -> Result<Reply, McpError> {
    if !matches!(m, ToDaemon::Start { .. } | ToDaemon::StartPod { .. }) {
        let Some(i) = instance.clone() else {
            return Err(McpError::NotAnnounced);
        };
        return state
            .ask(|reply| Command::McpUpdate {
                instance: i,
                message: m,
                reply,
            })
            .await
            .unwrap_or(Err(McpError::Gone));
    }
    if instance.is_some() {
        return Err(McpError::AlreadyAnnounced);
    }
    let (i, view) = state
        .ask(|reply| Command::McpStart {
            peer_pid,
            start: m,
            reply,
        })
        .await
        .unwrap_or(Err(McpError::Gone))?;
    *instance = Some(i);
    Ok(Reply {
        relay: Some(view),
        ..Reply::ok(0)
    })
}

/// Where an instance is and whose it is, once the daemon checked it.
struct Admitted {
    workload: String,
    workload_id: u32,
    cgroup_id: u64,
    path: String,
}

impl Owner {
    /// Registers an announced instance: `start` names a cgroup below its workload's;
    /// `start_pod` a container of the peer's own pod, from the pod's proxy sidecar.
    pub(super) fn mcp_start(
        &mut self,
        peer_pid: Option<u32>,
        start: ToDaemon,
    ) -> Result<(Instance, crate::mcp::wire::RelayView), McpError> {
        let peer_path =
            peer_pid.and_then(|pid| crate::pods::cgroup_of_pid(&self.pods, &self.mount, pid));
        let (a, relay_pid, command, resumed) = match start {
            ToDaemon::Start {
                workload,
                cgroup_id,
                relay_pid,
                command,
                resumed,
            } => {
                if let Some((pod, _, _)) = peer_path
                    .as_deref()
                    .and_then(|p| crate::pods::attribute(&self.pods, p))
                {
                    // A process in a pod names no cgroup: only its sidecar may report,
                    // for its own pod's containers.
                    return Err(McpError::PodPeer(format!("{}/{}", pod.namespace, pod.name)));
                }
                (
                    self.admit_cgroup(workload, cgroup_id)?,
                    relay_pid,
                    command,
                    resumed,
                )
            }
            ToDaemon::StartPod {
                container,
                relay_pid,
                command,
                resumed,
            } => (
                self.admit_container(peer_path.as_deref(), &container)?,
                relay_pid,
                command,
                resumed,
            ),
            _ => return Err(McpError::NotAnnounced),
        };
        self.register_instance(&a, relay_pid, command, resumed)?;
        let view = self.relay_view(&a.workload);
        Ok((
            Instance {
                cgroup_id: a.cgroup_id,
                workload: a.workload,
                workload_id: a.workload_id,
                path: a.path,
                relay_pid,
            },
            view,
        ))
    }

    /// `start`: the instance must be a cgroup below the workload's (a relay cannot lend
    /// another workload's processes its tools).
    fn admit_cgroup(&self, workload: String, cgroup_id: u64) -> Result<Admitted, McpError> {
        let w = self
            .compiled
            .workloads
            .iter()
            .find(|w| w.name == workload)
            .ok_or_else(|| McpError::NoWorkload(workload.clone()))?;
        let wl_cgroup = w
            .cgroup
            .clone()
            .ok_or_else(|| McpError::PodWorkload(workload.clone()))?;
        let path = cgroup::find_by_id(&self.mount, &wl_cgroup, cgroup_id)
            .filter(|p| *p != wl_cgroup)
            .ok_or_else(|| McpError::NotBelow {
                cgroup_id,
                workload: workload.clone(),
                cgroup: wl_cgroup.clone(),
            })?;
        Ok(Admitted {
            workload_id: w.id,
            workload,
            cgroup_id,
            path,
        })
    }

    /// `start_pod`: the peer must be the proxy sidecar container its pod's workload
    /// names (`pods.mcp_proxy`); the instance is another container of the same pod.
    fn admit_container(&self, peer: Option<&str>, container: &str) -> Result<Admitted, McpError> {
        let peer = peer.ok_or(McpError::NoPeer)?;
        let (pod, _, peer_container) = crate::pods::attribute(&self.pods, peer)
            .ok_or_else(|| McpError::NotInPod(peer.to_string()))?;
        let pod_name = format!("{}/{}", pod.namespace, pod.name);
        let w = pod
            .workload
            .as_deref()
            .and_then(|n| self.compiled.workloads.iter().find(|w| w.name == n))
            .ok_or_else(|| McpError::PodNotSelected(pod_name.clone()))?;
        let proxy = w
            .pods
            .as_ref()
            .and_then(|p| p.mcp_proxy.clone())
            .ok_or_else(|| McpError::NoProxyContainer(w.name.clone()))?;
        if peer_container != Some(proxy.as_str()) {
            return Err(McpError::NotTheProxy {
                pod: pod_name,
                container: peer_container.unwrap_or("(not listed yet)").to_string(),
                proxy,
            });
        }
        let no_container = || McpError::NoContainer {
            pod: pod_name.clone(),
            container: container.to_string(),
        };
        if container == proxy {
            return Err(no_container());
        }
        let id = pod
            .containers
            .iter()
            .find(|(_, n)| n == container)
            .map(|(id, _)| id.clone())
            .ok_or_else(no_container)?;
        let path = crate::pods::container_cgroup(&self.mount, &pod.cgroup, &id)
            .ok_or_else(no_container)?;
        let cgroup_id = cgroup::id(&self.mount, &path).map_err(|_| no_container())?;
        Ok(Admitted {
            workload: w.name.clone(),
            workload_id: w.id,
            cgroup_id,
            path,
        })
    }

    fn register_instance(
        &mut self,
        a: &Admitted,
        relay_pid: u32,
        command: Vec<String>,
        resumed: bool,
    ) -> Result<(), McpError> {
        let (workload, cgroup_id, path) = (&a.workload, a.cgroup_id, &a.path);
        Arc::make_mut(&mut self.mcp).start(
            cgroup_id,
            workload.clone(),
            a.workload_id,
            relay_pid,
            command,
        );
        self.maps
            .set_instance(cgroup_id, a.workload_id, 0, Vec::new())?;
        self.metrics
            .mcp_instances
            .set(self.maps.instance_count() as i64);
        self.publish_mcp();
        if resumed {
            // Its relay ran on while the daemon was away; until now the instance had no
            // tool active (the instance map is cleared at start).
            self.metrics
                .mcp_resumed
                .with_label_values(&[workload])
                .inc();
            info!(workload = %workload, instance = cgroup_id, cgroup = %path, relay_pid, "MCP instance registered again by its relay after a daemon restart");
        } else {
            info!(workload = %workload, instance = cgroup_id, cgroup = %path, relay_pid, "MCP instance started");
        }
        Ok(())
    }

    /// An instance's connection ended: its kernel entry goes (no tool active).
    pub(super) fn mcp_end(&mut self, i: &Instance) {
        Arc::make_mut(&mut self.mcp).finish(i.cgroup_id);
        self.maps.remove_instance(i.cgroup_id);
        self.metrics
            .mcp_instances
            .set(self.maps.instance_count() as i64);
        self.publish_mcp();
    }

    /// Peers, tools, counts or a call of an announced instance.
    pub(super) fn mcp_update(&mut self, i: &Instance, m: ToDaemon) -> Result<Reply, McpError> {
        let metrics = self.metrics.clone();
        let seq_now = |o: &Self| o.mcp.get(i.cgroup_id).map_or(0, |x| x.seq);
        let seq = match m {
            ToDaemon::Start { .. } | ToDaemon::StartPod { .. } => {
                return Err(McpError::AlreadyAnnounced)
            }
            ToDaemon::Counts {
                malformed,
                oversized,
                mismatched,
            } => {
                let lines = &metrics.mcp_relay_lines;
                for (kind, n) in [
                    ("malformed", malformed),
                    ("oversized", oversized),
                    ("mismatched", mismatched),
                ] {
                    if n > 0 || kind != "mismatched" {
                        lines.with_label_values(&[&i.workload, kind]).inc_by(n);
                    }
                }
                return Ok(Reply::ok(seq_now(self)));
            }
            ToDaemon::Peers { client, server } => {
                if let Some(inst) = Arc::make_mut(&mut self.mcp).get_mut(i.cgroup_id) {
                    inst.client = client;
                    inst.server = server;
                }
                self.publish_mcp();
                return Ok(Reply::ok(seq_now(self)));
            }
            ToDaemon::Tools {
                names,
                changed,
                session,
            } => {
                let hidden = self.judge_tools(i, &names, &changed, session.as_deref());
                Arc::make_mut(&mut self.mcp).set_tools(i.cgroup_id, names);
                self.publish_mcp();
                return Ok(Reply {
                    hidden,
                    ..Reply::ok(seq_now(self))
                });
            }
            ToDaemon::Call {
                request_id,
                tool,
                arguments,
                session,
                targets,
                changed,
                masked,
                approval,
            } => {
                let asked = super::mcp_policy::CallAsked {
                    tool: &tool,
                    request_id: &request_id,
                    session: session.as_deref(),
                    arguments: &arguments,
                    targets: &targets,
                    changed,
                    approval: approval.as_deref(),
                };
                if !masked.is_empty() && approval.is_none() {
                    self.report_masked(i, &asked, &masked);
                }
                match self.judge_call(i, &asked) {
                    super::mcp_policy::CallVerdict::Forward => {}
                    // Never forwarded (or not yet): nothing to activate, nothing in flight.
                    super::mcp_policy::CallVerdict::Refuse(refused) => {
                        return Ok(Reply {
                            refused: Some(refused),
                            relay: Some(self.relay_view(&i.workload)),
                            ..Reply::ok(seq_now(self))
                        });
                    }
                    super::mcp_policy::CallVerdict::Hold(id) => {
                        return Ok(Reply {
                            pending: Some(id),
                            relay: Some(self.relay_view(&i.workload)),
                            ..Reply::ok(seq_now(self))
                        });
                    }
                }
                metrics
                    .mcp_tool_calls
                    .with_label_values(&[&i.workload])
                    .inc();
                Arc::make_mut(&mut self.mcp).call(
                    i.cgroup_id,
                    CallRef {
                        tool,
                        request_id,
                        arguments,
                        session,
                    },
                )
            }
            ToDaemon::End {
                request_id,
                outcome: _,
                session,
                masked,
            } => {
                if !masked.is_empty() {
                    let call = self.mcp.get(i.cgroup_id).and_then(|x| {
                        x.calls
                            .iter()
                            .find(|c| c.request_id == request_id && c.session == session)
                            .cloned()
                    });
                    if let Some(c) = call {
                        let asked = super::mcp_policy::CallAsked {
                            tool: &c.tool,
                            request_id: &c.request_id,
                            session: c.session.as_deref(),
                            arguments: &c.arguments,
                            targets: &[],
                            changed: false,
                            approval: None,
                        };
                        self.report_masked(i, &asked, &masked);
                    }
                }
                Arc::make_mut(&mut self.mcp).end(i.cgroup_id, &request_id, session.as_deref())
            }
        }
        .ok_or(McpError::InstanceGone)?;
        let tools = self
            .mcp
            .get(i.cgroup_id)
            .map(crate::mcp::registry::Instance::active_tools)
            .unwrap_or_default();
        self.publish_mcp();
        // Written before the answer: the relay forwards the call only after this.
        self.maps
            .set_instance(i.cgroup_id, i.workload_id, seq, tools)
            .inspect_err(|e| {
                warn!(error = %e, "MCP instance update failed: the call runs with no tool active");
            })?;
        Ok(Reply {
            relay: Some(self.relay_view(&i.workload)),
            ..Reply::ok(seq)
        })
    }
}
