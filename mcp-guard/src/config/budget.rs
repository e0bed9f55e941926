//! The memory a policy needs, from measurement (`cargo xtask bench`, row "memory
//! budget"): the daemon's peak resident set (parsing the config is the peak) plus the
//! kernel memory of its maps, which cgroup v2 charges to the memory cgroup of the
//! process that created them (the first daemon pod). The bench checks the measured
//! figures against [`estimate_mib`]; the DaemonSet's memory limit is
//! [`DAEMONSET_LIMIT_MIB`] (a deploy test compares), and `check` warns when a config
//! needs more than that.

use super::Workload;

/// A daemon with an empty policy: about 32 MiB peak resident, and about 40 MiB of maps
/// (hash bucket arrays, LRU maps, the event ring), with room.
pub const BASE_MIB: u64 = 80;

/// Each rule (an allow table, cidr or host; an allow_unix or deny_unix entry): about
/// 3.3 KiB at the peak of a reload (the new config parsed while the old one still
/// runs) and 0.4 KiB of map entries, with room.
pub const PER_RULE_BYTES: u64 = 4096;

/// `resources.limits.memory` of deploy/kubernetes/daemonset.yaml.
pub const DAEMONSET_LIMIT_MIB: u64 = 192;

/// The rules of a config, as the budget counts them.
#[must_use]
pub fn rules(workloads: &[Workload]) -> usize {
    workloads
        .iter()
        .map(|w| w.allow.len() + w.hosts.len() + w.unix.allow.len() + w.unix.deny.len())
        .sum()
}

/// The memory (MiB) a config of `rules` rules needs, rounded up.
#[must_use]
pub fn estimate_mib(rules: usize) -> u64 {
    BASE_MIB + (rules as u64 * PER_RULE_BYTES).div_ceil(1 << 20)
}

/// The most rules a memory limit of `mib` holds.
#[must_use]
pub fn rules_within(mib: u64) -> usize {
    (mib.saturating_sub(BASE_MIB) * (1 << 20) / PER_RULE_BYTES) as usize
}

/// A warning when the config needs more memory than the shipped DaemonSet allows.
pub(super) fn warning(file: &std::path::Path, workloads: &[Workload]) -> Option<String> {
    let n = rules(workloads);
    (estimate_mib(n) > DAEMONSET_LIMIT_MIB).then(|| {
        format!(
            "{}: {n} rules need about {} MiB in the daemon (with its kernel maps), more than the shipped DaemonSet's memory limit of {DAEMONSET_LIMIT_MIB} MiB (about {} rules): raise resources.limits.memory to {}Mi (and MemoryMax= of a systemd unit that sets one), or use fewer, wider rules",
            file.display(),
            estimate_mib(n),
            rules_within(DAEMONSET_LIMIT_MIB),
            estimate_mib(n).div_ceil(32) * 32
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_estimate_and_its_inverse_agree() {
        assert_eq!(estimate_mib(0), BASE_MIB);
        let n = rules_within(DAEMONSET_LIMIT_MIB);
        assert!(
            estimate_mib(n) <= DAEMONSET_LIMIT_MIB && estimate_mib(n + 1000) > DAEMONSET_LIMIT_MIB
        );
        assert!(n >= 25_000, "the shipped limit holds {n} rules");
    }
}
