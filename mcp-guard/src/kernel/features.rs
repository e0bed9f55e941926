//! Preflight: does this kernel have what mcp-guard needs? Each missing piece gets an
//! error that names it and the kernel version that brought it, before anything loads.

use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{is_map_supported, is_program_supported},
    util::KernelVersion,
};

/// A kernel feature mcp-guard needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feature {
    CgroupSockAddr,
    RingBuf,
    LpmTrie,
    PerCpuHash,
    LruHash,
    /// bpf_link for cgroup programs (pinnable attachments).
    CgroupLink,
}

impl Feature {
    pub const ALL: [Self; 6] = [
        Self::CgroupSockAddr,
        Self::RingBuf,
        Self::LpmTrie,
        Self::PerCpuHash,
        Self::LruHash,
        Self::CgroupLink,
    ];

    #[must_use]
    pub fn describe(self) -> &'static str {
        match self {
            Self::CgroupSockAddr => "cgroup sock_addr programs (BPF_PROG_TYPE_CGROUP_SOCK_ADDR, Linux 4.17, CONFIG_CGROUP_BPF)",
            Self::RingBuf => "BPF ring buffer maps (BPF_MAP_TYPE_RINGBUF, Linux 5.8)",
            Self::LpmTrie => "LPM trie maps (BPF_MAP_TYPE_LPM_TRIE, Linux 4.11)",
            Self::PerCpuHash => "per-CPU hash maps (BPF_MAP_TYPE_PERCPU_HASH, Linux 4.6)",
            Self::LruHash => "LRU hash maps (BPF_MAP_TYPE_LRU_HASH, Linux 4.10)",
            Self::CgroupLink => "bpf_link for cgroup programs (BPF_LINK_CREATE, Linux 5.7)",
        }
    }
}

/// Probes the running kernel.
#[must_use]
pub fn present(f: Feature) -> bool {
    match f {
        Feature::CgroupSockAddr => {
            is_program_supported(ProgramType::CgroupSockAddr).unwrap_or(false)
        }
        Feature::RingBuf => is_map_supported(MapType::RingBuf).unwrap_or(false),
        Feature::LpmTrie => is_map_supported(MapType::LpmTrie).unwrap_or(false),
        Feature::PerCpuHash => is_map_supported(MapType::PerCpuHash).unwrap_or(false),
        Feature::LruHash => is_map_supported(MapType::LruHash).unwrap_or(false),
        Feature::CgroupLink => {
            KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(5, 7, 0))
        }
    }
}

/// The error for a kernel missing `missing` features, or `None` if nothing is missing.
#[must_use]
pub fn missing_message(missing: &[Feature]) -> Option<String> {
    if missing.is_empty() {
        return None;
    }
    let list: Vec<&str> = missing.iter().map(|f| f.describe()).collect();
    Some(format!(
        "this kernel lacks what mcp-guard needs: {}. Upgrade to Linux 5.8 or newer with CONFIG_BPF_SYSCALL and CONFIG_CGROUP_BPF (running as root or with CAP_BPF and CAP_SYS_ADMIN)",
        list.join("; ")
    ))
}

/// Checks every feature with `probe` (the kernel's, or a fake in tests).
///
/// # Errors
/// The message names each missing feature.
pub fn check_with(probe: impl Fn(Feature) -> bool) -> Result<(), String> {
    let missing: Vec<Feature> = Feature::ALL.into_iter().filter(|f| !probe(*f)).collect();
    missing_message(&missing).map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_feature_is_named() {
        let e = check_with(|f| f != Feature::RingBuf).unwrap_err();
        assert!(
            e.contains("BPF ring buffer maps") && e.contains("5.8"),
            "{e}"
        );
        assert!(!e.contains("LPM"), "{e}");
        assert!(check_with(|_| true).is_ok());
    }
}
