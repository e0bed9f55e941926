//! The daemon's record of `exec --mcp` instances: who talks to whom, which calls are in
//! flight, and a history of call states by sequence number, so an event the kernel
//! stamped with an instance's `seq` is attributed to the calls in flight at that moment
//! even when the daemon reads it later.

use std::{
    collections::{BTreeSet, HashMap, VecDeque},
    sync::Arc,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use super::wire::Peer;

/// Call states kept per instance for attribution.
const HISTORY: usize = 4096;
/// How long an ended instance is kept, for events still in the ring buffer.
const KEEP_ENDED: Duration = Duration::from_secs(600);
/// Tool names kept from `tools/list`.
const MAX_TOOLS: usize = 1024;

/// One call in flight.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallRef {
    pub tool: String,
    pub request_id: String,
    pub arguments: String,
    /// The Streamable HTTP session (`Mcp-Session-Id`); `null` on stdio.
    #[serde(default)]
    pub session: Option<String>,
}

/// The `mcp` object of an event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attribution {
    /// The tool being called; `null` while no call was in flight (a background
    /// connection). With several calls in flight, the one that started last.
    pub tool: Option<String>,
    pub request_id: Option<String>,
    /// The Streamable HTTP session of that call (`Mcp-Session-Id`); `null` on stdio
    /// and before the server gave the session an id.
    pub session: Option<String>,
    /// A bounded summary of the call's arguments, secrets redacted.
    pub arguments: Option<String>,
    /// Every call in flight at the moment (more than one for concurrent calls).
    pub in_flight: Vec<CallRef>,
    pub client: Option<Peer>,
    pub server: Option<Peer>,
    /// The instance's cgroup id.
    pub instance: u64,
    /// The call-state sequence the kernel decided under.
    pub seq: u32,
}

#[derive(Debug, Clone)]
pub struct Instance {
    pub workload: String,
    pub workload_id: u32,
    pub relay_pid: u32,
    pub command: Vec<String>,
    pub client: Option<Peer>,
    pub server: Option<Peer>,
    /// In start order.
    pub calls: Vec<CallRef>,
    pub seq: u32,
    /// Shared slices: the owner's copy-on-write of the registry copies pointers, not
    /// calls (a busy instance's 4096 states were cloned on every call).
    history: VecDeque<(u32, Arc<[CallRef]>)>,
    /// From the server's `tools/list`.
    pub tools: BTreeSet<String>,
    pub ended: Option<Instant>,
}

impl Instance {
    /// The tool names of the calls in flight.
    #[must_use]
    pub fn active_tools(&self) -> Vec<String> {
        self.calls.iter().map(|c| c.tool.clone()).collect()
    }

    fn bump(&mut self) {
        self.seq = self.seq.wrapping_add(1);
        if self.history.len() == HISTORY {
            self.history.pop_front();
        }
        self.history
            .push_back((self.seq, self.calls.clone().into()));
    }
}

/// Every instance, by the cgroup id its server runs in.
#[derive(Debug, Default, Clone)]
pub struct Registry {
    /// Each instance behind its own `Arc`: a change copies only the instance it touches.
    instances: HashMap<u64, Arc<Instance>>,
}

impl Registry {
    pub fn start(
        &mut self,
        cgroup_id: u64,
        workload: String,
        workload_id: u32,
        relay_pid: u32,
        command: Vec<String>,
    ) {
        let mut i = Instance {
            workload,
            workload_id,
            relay_pid,
            command,
            client: None,
            server: None,
            calls: Vec::new(),
            seq: 0,
            history: VecDeque::new(),
            tools: BTreeSet::new(),
            ended: None,
        };
        i.history.push_back((0, Arc::from(Vec::new())));
        self.instances.insert(cgroup_id, Arc::new(i));
        self.prune();
    }

    #[must_use]
    pub fn get(&self, cgroup_id: u64) -> Option<&Instance> {
        self.instances.get(&cgroup_id).map(AsRef::as_ref)
    }

    pub fn get_mut(&mut self, cgroup_id: u64) -> Option<&mut Instance> {
        self.instances.get_mut(&cgroup_id).map(Arc::make_mut)
    }

    /// A call starts; returns the new sequence.
    pub fn call(&mut self, cgroup_id: u64, call: CallRef) -> Option<u32> {
        let i = self.instances.get_mut(&cgroup_id).map(Arc::make_mut)?;
        i.calls
            .retain(|c| c.request_id != call.request_id || c.session != call.session);
        i.calls.push(call);
        i.bump();
        Some(i.seq)
    }

    /// A call ends; returns the new sequence (unchanged for an unknown call).
    pub fn end(&mut self, cgroup_id: u64, request_id: &str, session: Option<&str>) -> Option<u32> {
        let i = self.instances.get_mut(&cgroup_id).map(Arc::make_mut)?;
        let before = i.calls.len();
        i.calls
            .retain(|c| c.request_id != request_id || c.session.as_deref() != session);
        if i.calls.len() != before {
            i.bump();
        }
        Some(i.seq)
    }

    pub fn set_tools(&mut self, cgroup_id: u64, names: Vec<String>) {
        if let Some(i) = self.instances.get_mut(&cgroup_id).map(Arc::make_mut) {
            i.tools = names.into_iter().take(MAX_TOOLS).collect();
        }
    }

    /// The relay went away: no call is in flight any more.
    pub fn finish(&mut self, cgroup_id: u64) {
        if let Some(i) = self.instances.get_mut(&cgroup_id).map(Arc::make_mut) {
            if !i.calls.is_empty() {
                i.calls.clear();
                i.bump();
            }
            i.ended = Some(Instant::now());
        }
    }

    /// Instances whose relay is still connected.
    pub fn live(&self) -> impl Iterator<Item = (u64, &Instance)> {
        self.instances
            .iter()
            .filter(|(_, i)| i.ended.is_none())
            .map(|(k, i)| (*k, i.as_ref()))
    }

    fn prune(&mut self) {
        self.instances
            .retain(|_, i| i.ended.is_none_or(|t| t.elapsed() < KEEP_ENDED));
    }

    /// The calls in flight in instance `cgroup_id` at sequence `seq`.
    #[must_use]
    pub fn attribute(&self, cgroup_id: u64, seq: u32) -> Option<Attribution> {
        let i = self.instances.get(&cgroup_id)?;
        let calls = i
            .history
            .iter()
            .rev()
            .find(|(s, _)| *s == seq)
            .map(|(_, c)| c.to_vec())?;
        let last = calls.last();
        Some(Attribution {
            tool: last.map(|c| c.tool.clone()),
            request_id: last.map(|c| c.request_id.clone()),
            session: last.and_then(|c| c.session.clone()),
            arguments: last.map(|c| c.arguments.clone()),
            in_flight: calls.clone(),
            client: i.client.clone(),
            server: i.server.clone(),
            instance: cgroup_id,
            seq,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(tool: &str, id: &str) -> CallRef {
        CallRef {
            tool: tool.into(),
            request_id: id.into(),
            arguments: String::new(),
            session: None,
        }
    }

    #[test]
    fn events_are_attributed_to_the_calls_in_flight_at_their_sequence() {
        let mut r = Registry::default();
        r.start(9, "w".into(), 1, 1, vec![]);
        let s1 = r.call(9, call("fetch", "1")).unwrap();
        let s2 = r.call(9, call("query_db", "2")).unwrap();
        let s3 = r.end(9, "1", None).unwrap();
        let s4 = r.end(9, "2", None).unwrap();
        assert_eq!(r.attribute(9, 0).unwrap().tool, None);
        assert_eq!(r.attribute(9, s1).unwrap().tool.as_deref(), Some("fetch"));
        let a = r.attribute(9, s2).unwrap();
        assert_eq!(a.tool.as_deref(), Some("query_db"));
        assert_eq!(a.in_flight.len(), 2);
        assert_eq!(
            r.attribute(9, s3).unwrap().tool.as_deref(),
            Some("query_db")
        );
        assert_eq!(r.attribute(9, s4).unwrap().tool, None);
        assert_eq!(r.end(9, "unknown", None), Some(s4));
        assert!(r.attribute(8, 0).is_none());
    }

    #[test]
    fn request_ids_are_unique_only_within_their_session() {
        let mut r = Registry::default();
        r.start(9, "w".into(), 1, 1, vec![]);
        let in_session = |tool: &str, s: &str| CallRef {
            session: Some(s.into()),
            ..call(tool, "1")
        };
        r.call(9, in_session("fetch", "a")).unwrap();
        let both = r.call(9, in_session("query_db", "b")).unwrap();
        assert_eq!(r.attribute(9, both).unwrap().in_flight.len(), 2);
        let s = r.end(9, "1", Some("a")).unwrap();
        let a = r.attribute(9, s).unwrap();
        assert_eq!(
            (a.tool.as_deref(), a.session.as_deref()),
            (Some("query_db"), Some("b"))
        );
        assert_eq!(r.end(9, "1", None), Some(s), "no such call on stdio");
    }
}
