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
            tokio::spawn(async move {
                relay(s, &state).await;
                drop(permit);
            });
        }
    }
}

/// The instance a connection announced.
#[derive(Clone)]
pub(super) struct Instance {
    cgroup_id: u64,
    workload: String,
    workload_id: u32,
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
    #[error("line too long")]
    LineTooLong,
    #[error("not a relay message: {0}")]
    NotAMessage(#[from] serde_json::Error),
    #[error("writing the instance into the kernel: {0}")]
    Map(#[from] crate::kernel::maps::MapsError),
}

fn reply(r: Result<u32, McpError>) -> Vec<u8> {
    let mut line = serde_json::to_vec(&match r {
        Ok(seq) => Reply {
            ok: true,
            error: None,
            seq,
        },
        Err(e) => Reply {
            ok: false,
            error: Some(e.to_string()),
            seq: 0,
        },
    })
    .expect("serialisable");
    line.push(b'\n');
    line
}

async fn relay(stream: UnixStream, state: &Handle) {
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
            Ok(m) => handle(state, &mut instance, m).await,
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

/// Applies one message through the state owner; returns the instance's sequence after it.
async fn handle(
    state: &Handle,
    instance: &mut Option<Instance>,
    m: ToDaemon,
) -> Result<u32, McpError> {
    let ToDaemon::Start {
        workload,
        cgroup_id,
        relay_pid,
        command,
        resumed,
    } = m
    else {
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
    };
    if instance.is_some() {
        return Err(McpError::AlreadyAnnounced);
    }
    let i = state
        .ask(|reply| Command::McpStart {
            workload,
            cgroup_id,
            relay_pid,
            command,
            resumed,
            reply,
        })
        .await
        .unwrap_or(Err(McpError::Gone))?;
    *instance = Some(i);
    Ok(0)
}

impl Owner {
    /// Registers an announced instance: its cgroup must be below its workload's.
    pub(super) fn mcp_start(
        &mut self,
        workload: String,
        cgroup_id: u64,
        relay_pid: u32,
        command: Vec<String>,
        resumed: bool,
    ) -> Result<Instance, McpError> {
        let (wid, wl_cgroup) = {
            let w = self
                .compiled
                .workloads
                .iter()
                .find(|w| w.name == workload)
                .ok_or_else(|| McpError::NoWorkload(workload.clone()))?;
            let c = w
                .cgroup
                .clone()
                .ok_or_else(|| McpError::PodWorkload(workload.clone()))?;
            (w.id, c)
        };
        // The instance must be a cgroup below the workload's: a relay cannot lend another
        // workload's processes its tools.
        let path = cgroup::find_by_id(&self.mount, &wl_cgroup, cgroup_id)
            .filter(|p| *p != wl_cgroup)
            .ok_or_else(|| McpError::NotBelow {
                cgroup_id,
                workload: workload.clone(),
                cgroup: wl_cgroup.clone(),
            })?;
        Arc::make_mut(&mut self.mcp).start(cgroup_id, workload.clone(), wid, relay_pid, command);
        self.maps.set_instance(cgroup_id, wid, 0, Vec::new())?;
        self.metrics
            .mcp_instances
            .set(self.maps.instance_count() as i64);
        self.publish_mcp();
        if resumed {
            // Its relay ran on while the daemon was away; until now the instance had no
            // tool active (the instance map is cleared at start).
            self.metrics
                .mcp_resumed
                .with_label_values(&[&workload])
                .inc();
            info!(workload = %workload, instance = cgroup_id, cgroup = %path, relay_pid, "MCP instance registered again by its relay after a daemon restart");
        } else {
            info!(workload = %workload, instance = cgroup_id, cgroup = %path, relay_pid, "MCP instance started");
        }
        Ok(Instance {
            cgroup_id,
            workload,
            workload_id: wid,
        })
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
    pub(super) fn mcp_update(&mut self, i: &Instance, m: ToDaemon) -> Result<u32, McpError> {
        let metrics = self.metrics.clone();
        if let ToDaemon::Counts {
            malformed,
            oversized,
        } = m
        {
            let lines = &metrics.mcp_relay_lines;
            lines
                .with_label_values(&[&i.workload, "malformed"])
                .inc_by(malformed);
            lines
                .with_label_values(&[&i.workload, "oversized"])
                .inc_by(oversized);
            return Ok(self.mcp.get(i.cgroup_id).map_or(0, |x| x.seq));
        }
        let reg = Arc::make_mut(&mut self.mcp);
        let seq = match m {
            ToDaemon::Start { .. } | ToDaemon::Counts { .. } => {
                return Err(McpError::AlreadyAnnounced)
            }
            ToDaemon::Peers { client, server } => {
                if let Some(inst) = reg.get_mut(i.cgroup_id) {
                    inst.client = client;
                    inst.server = server;
                }
                let seq = reg.get(i.cgroup_id).map_or(0, |x| x.seq);
                self.publish_mcp();
                return Ok(seq);
            }
            ToDaemon::Tools { names } => {
                reg.set_tools(i.cgroup_id, names);
                let seq = reg.get(i.cgroup_id).map_or(0, |x| x.seq);
                self.publish_mcp();
                return Ok(seq);
            }
            ToDaemon::Call {
                request_id,
                tool,
                arguments,
            } => {
                metrics
                    .mcp_tool_calls
                    .with_label_values(&[&i.workload])
                    .inc();
                reg.call(
                    i.cgroup_id,
                    CallRef {
                        tool,
                        request_id,
                        arguments,
                    },
                )
            }
            ToDaemon::End {
                request_id,
                outcome: _,
            } => reg.end(i.cgroup_id, &request_id),
        }
        .ok_or(McpError::InstanceGone)?;
        let tools = reg
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
        Ok(seq)
    }
}
