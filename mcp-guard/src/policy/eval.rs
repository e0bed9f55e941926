//! The evaluator: decides a flow from the compiled entries the way the kernel programs
//! do, for `explain` and the differential test.

use super::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Deny,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub verdict: Verdict,
    /// Set when denied.
    pub reason: Option<u8>,
    /// The rule that decided; 0 when the workload's default decided.
    pub rule_id: u32,
}

/// Socket protocol as the kernel programs classify it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowProto {
    Tcp,
    Udp,
    Other,
}

impl FlowProto {
    fn bit(self) -> u8 {
        match self {
            Self::Tcp => PROTO_TCP,
            Self::Udp => PROTO_UDP,
            Self::Other => PROTO_OTHER,
        }
    }
}

/// Decides over the compiled entries exactly as `mcp-guard-ebpf/src/decide.rs` does.
pub struct Evaluator<'a> {
    compiled: &'a Compiled,
    lpm: HashMap<(u32, u8, [u8; 16]), usize>,
    /// Prefix lengths present per scope, longest first.
    plens: HashMap<u32, Vec<u8>>,
    exact: HashMap<(u32, [u8; 16]), usize>,
}

impl<'a> Evaluator<'a> {
    #[must_use]
    pub fn new(compiled: &'a Compiled) -> Self {
        let mut lpm = HashMap::new();
        let mut plens: HashMap<u32, Vec<u8>> = HashMap::new();
        for (i, e) in compiled.lpm.iter().enumerate() {
            lpm.insert((e.scope, e.plen, e.addr), i);
            plens.entry(e.scope).or_default().push(e.plen);
        }
        for v in plens.values_mut() {
            v.sort_unstable_by(|a, b| b.cmp(a));
            v.dedup();
        }
        let exact = compiled
            .exact
            .iter()
            .enumerate()
            .map(|(i, e)| ((e.scope, e.addr), i))
            .collect();
        Self {
            compiled,
            lpm,
            plens,
            exact,
        }
    }

    fn lookup_lpm(&self, scope: u32, addr: &[u8; 16]) -> Option<&'a PolicyEntry> {
        let plens = self.plens.get(&scope)?;
        plens.iter().find_map(|&p| {
            self.lpm
                .get(&(scope, p, mask(addr, p)))
                .map(|&i| &self.compiled.lpm[i].entry)
        })
    }

    #[must_use]
    pub fn workload(&self, name: &str) -> Option<&'a CompiledWorkload> {
        self.compiled.workloads.iter().find(|w| w.name == name)
    }

    /// The verdict for one destination of one workload (mode aside: audit mode reports
    /// the same decision and lets the flow through), from a process outside any MCP
    /// instance (no tool call in flight).
    #[must_use]
    pub fn decide(
        &self,
        wl: &CompiledWorkload,
        ip: IpAddr,
        port: u16,
        proto: FlowProto,
    ) -> Decision {
        self.decide_active(wl, ip, port, proto, 0)
    }

    /// [`Self::decide`] for a process of an MCP instance whose active mask is `active`
    /// ([`CompiledWorkload::mcp_mask`]).
    #[must_use]
    pub fn decide_active(
        &self,
        wl: &CompiledWorkload,
        ip: IpAddr,
        port: u16,
        proto: FlowProto,
        active: u64,
    ) -> Decision {
        let addr = judged16(ip);
        if let Some(e) = self
            .lookup_lpm(SCOPE_BASELINE, &addr)
            .filter(|e| e.kind != ENTRY_HOLE)
        {
            let reason = if e.kind == ENTRY_BASELINE_METADATA {
                REASON_BASELINE_METADATA
            } else {
                REASON_BASELINE_DENY
            };
            return Decision {
                verdict: Verdict::Deny,
                reason: Some(reason),
                rule_id: e.rule_id,
            };
        }
        if wl.flags & mcp_guard_common::WL_DENY_BETWEEN_CALLS != 0
            && active & mcp_guard_common::MCP_IN_CALL == 0
        {
            return Decision {
                verdict: Verdict::Deny,
                reason: Some(mcp_guard_common::REASON_BETWEEN_CALLS),
                rule_id: 0,
            };
        }
        let entry = self
            .exact
            .get(&(wl.id, addr))
            .map(|&i| &self.compiled.exact[i].entry)
            .or_else(|| self.lookup_lpm(wl.id, &addr))
            .filter(|e| e.kind != ENTRY_HOLE);
        let mut inactive_rule = 0;
        if let Some(e) = entry {
            for r in e.ranges[..usize::from(e.n_ranges)]
                .iter()
                .filter(|r| r.protos & proto.bit() != 0 && (r.lo..=r.hi).contains(&port))
            {
                let ts = u32::from(r.toolset);
                if ts == 0 || (ts <= 63 && (active >> (ts - 1)) & 1 != 0) {
                    return Decision {
                        verdict: Verdict::Allow,
                        reason: None,
                        rule_id: r.rule_id,
                    };
                }
                inactive_rule = r.rule_id;
            }
        }
        if wl.flags & mcp_guard_common::WL_DENY_DIRECT_DNS != 0
            && proto != FlowProto::Other
            && mcp_guard_common::is_dns_port(port)
        {
            return Decision {
                verdict: Verdict::Deny,
                reason: Some(REASON_NOT_ALLOWED),
                rule_id: 0,
            };
        }
        let refused = match wl.default {
            DEFAULT_ALLOW => {
                return Decision {
                    verdict: Verdict::Allow,
                    reason: None,
                    rule_id: 0,
                }
            }
            DEFAULT_DENY => REASON_DEFAULT_DENY,
            _ => {
                if self.lookup_lpm(SCOPE_INTERNAL, &addr).is_none() {
                    return Decision {
                        verdict: Verdict::Allow,
                        reason: None,
                        rule_id: 0,
                    };
                }
                REASON_DENY_INTERNAL
            }
        };
        if inactive_rule != 0 {
            return Decision {
                verdict: Verdict::Deny,
                reason: Some(mcp_guard_common::REASON_TOOL_NOT_ACTIVE),
                rule_id: inactive_rule,
            };
        }
        let reason = if entry.is_some() {
            REASON_NOT_ALLOWED
        } else {
            refused
        };
        Decision {
            verdict: Verdict::Deny,
            reason: Some(reason),
            rule_id: 0,
        }
    }

    #[must_use]
    pub fn rule_text(&self, id: u32) -> Option<&'a str> {
        id.checked_sub(1)
            .and_then(|i| self.compiled.rules.get(i as usize))
            .map(|r| r.text.as_str())
    }
}
