//! The TC classifier's attachments: egress of the configured interfaces (VM mode) and
//! ingress of pods' node-side veths (pod mode), in the configured network namespace,
//! following interfaces as they come and go.
//!
//! These links are owned by the daemon, not pinned: the packet backstop runs while the
//! daemon runs; socket-level enforcement is what survives a daemon restart.

use std::{collections::HashSet, ffi::CStr, os::fd::AsRawFd as _};

use aya::{
    programs::{SchedClassifier, TcAttachType},
    Ebpf,
};
use tracing::{info, warn};

use crate::{cgroup::glob_match, config::TcConfig};

const PROGRAM: &str = "mcpg_tc";

pub struct Tc {
    config: TcConfig,
    /// (ifindex, ingress) already attached.
    attached: HashSet<(u32, bool)>,
}

/// Interfaces of the calling thread's network namespace.
fn interfaces() -> Vec<(u32, String)> {
    let mut out = Vec::new();
    // SAFETY: if_nameindex returns an array terminated by a zero entry, freed below.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return out;
        }
        let mut p = list;
        while (*p).if_index != 0 {
            out.push((
                (*p).if_index,
                CStr::from_ptr((*p).if_name).to_string_lossy().into_owned(),
            ));
            p = p.add(1);
        }
        libc::if_freenameindex(list);
    }
    out
}

impl Tc {
    /// Loads the classifier (verifier) once.
    ///
    /// # Errors
    /// The program is missing or the verifier refused it.
    pub fn load(ebpf: &mut Ebpf, config: &TcConfig) -> anyhow::Result<Self> {
        let p: &mut SchedClassifier = ebpf
            .program_mut(PROGRAM)
            .ok_or_else(|| anyhow::anyhow!("{PROGRAM} missing"))?
            .try_into()?;
        p.load()?;
        Ok(Self {
            config: config.clone(),
            attached: HashSet::new(),
        })
    }

    /// Attaches to interfaces that appeared; forgets those that went (the kernel drops
    /// their links). Returns how many interfaces are covered.
    pub fn sync(&mut self, ebpf: &mut Ebpf) -> usize {
        let Some(program) = ebpf.program_mut(PROGRAM) else {
            return 0;
        };
        let Ok(p): Result<&mut SchedClassifier, _> = program.try_into() else {
            return 0;
        };
        let config = &self.config;
        let attached = &mut self.attached;
        // Interface names and TCX links resolve in the calling thread's network namespace:
        // do the work on a thread that entered the configured one.
        std::thread::scope(|s| {
            s.spawn(|| {
                if let Some(ns) = &config.netns {
                    let Ok(f) = std::fs::File::open(ns) else {
                        warn!(netns = %ns.display(), "tc.netns cannot be opened");
                        return;
                    };
                    // SAFETY: valid netns fd; only this thread changes namespace.
                    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        warn!(netns = %ns.display(), "cannot enter tc.netns");
                        return;
                    }
                }
                let present = interfaces();
                attached.retain(|(idx, _)| present.iter().any(|(i, _)| i == idx));
                for (idx, name) in &present {
                    let egress = name != "lo" && config.interfaces.iter().any(|g| glob_match(g, name));
                    let ingress = config.pod_interfaces.iter().any(|g| glob_match(g, name));
                    for (want, is_ingress, kind) in [(egress, false, TcAttachType::Egress), (ingress, true, TcAttachType::Ingress)] {
                        if !want || attached.contains(&(*idx, is_ingress)) {
                            continue;
                        }
                        match p.attach(name, kind) {
                            Ok(_) => {
                                info!(interface = %name, direction = if is_ingress { "ingress (pod mode)" } else { "egress" }, "tc classifier attached");
                                attached.insert((*idx, is_ingress));
                            }
                            Err(e) => warn!(interface = %name, "tc classifier: {e}"),
                        }
                    }
                }
            });
        });
        self.attached.len()
    }
}
