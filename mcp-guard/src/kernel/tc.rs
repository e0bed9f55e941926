//! The TC classifier's attachments: egress of the configured interfaces (VM mode) and
//! ingress of pods' node-side veths (pod mode), in the configured network namespace,
//! following interfaces as they come and go.
//!
//! On kernels with TCX (6.6+) every link is pinned under `links/tc-<netns>-<ifindex>-
//! <direction>`, like the socket hooks' links: the packet backstop keeps running while the
//! daemon is down, and a restarted daemon of the same build adopts the links instead of
//! attaching a second copy. A link whose interface went is unpinned. Older kernels attach
//! through netlink (clsact), which has no links to pin: there the backstop runs while the
//! daemon runs.

use std::{
    collections::HashSet,
    ffi::CStr,
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
};

use aya::{
    programs::{
        links::{FdLink, PinnedLink},
        tc::SchedClassifierLink,
        SchedClassifier, TcAttachType,
    },
    Ebpf,
};
use tracing::{info, warn};

use crate::{config::TcConfig, host::cgroup::glob_match, kernel::pins::Pins};

pub(crate) const PROGRAM: &str = "mcpg_tc";

pub struct Tc {
    config: TcConfig,
    /// (ifindex, ingress) already attached.
    attached: HashSet<(u32, bool)>,
    pins: Pins,
    /// The pinned links run this build's code (same object hash): adopt them.
    adopt: bool,
    /// Netlink attachments (kernels without TCX): owned here, detached on exit.
    unpinned: Vec<SchedClassifierLink>,
    /// Links adopted from a previous daemon, for the log.
    pub adopted: usize,
    /// Interfaces not attached because they are not Ethernet (reported once each).
    skipped: HashSet<u32>,
    /// (ifindex, ingress) attached through a pinned link (TCX).
    pinned: HashSet<(u32, bool)>,
    /// Pinned links found removed behind the daemon's back and attached again.
    pub repaired: u64,
}

fn pin_name(netns: u64, ifindex: u32, ingress: bool) -> String {
    format!(
        "tc-{netns}-{ifindex}-{}",
        if ingress { "ingress" } else { "egress" }
    )
}

/// Whether the pinned link at `name` is attached to this interface now: its program is
/// among those the kernel lists for the interface and direction.
fn pinned_live(pins: &Pins, name: &str, interface: &str, kind: TcAttachType) -> bool {
    let Ok(pinned) = PinnedLink::from_pin(pins.link(name)) else {
        return false;
    };
    let link = FdLink::from(pinned);
    let Ok(info) = link.info() else {
        return false;
    };
    SchedClassifier::query_tcx(interface, kind)
        .is_ok_and(|(_, progs)| progs.iter().any(|p| p.id() == info.program_id()))
}

/// The link type (ARPHRD_*) of an interface of the calling thread's network namespace,
/// from SIOCGIFHWADDR on a socket made there (sysfs would show the daemon's namespace).
fn link_type(name: &str) -> Option<u16> {
    // SAFETY: a plain socket, closed below; ifreq is zeroed and the name bounded.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return None;
        }
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (i, b) in name.bytes().take(libc::IFNAMSIZ - 1).enumerate() {
            ifr.ifr_name[i] = b as libc::c_char;
        }
        let rc = libc::ioctl(fd, libc::SIOCGIFHWADDR, &raw mut ifr);
        libc::close(fd);
        (rc == 0).then_some(ifr.ifr_ifru.ifru_hwaddr.sa_family)
    }
}

/// The classifier parses frames from an Ethernet header: it attaches only to Ethernet
/// interfaces (veths included). L3 devices (tun, WireGuard, GRE, IPIP) carry no such
/// header; guarded sockets' packets on them are judged by the cgroup_skb backstop.
const ARPHRD_ETHER: u16 = 1;

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
    pub fn load(
        ebpf: &mut Ebpf,
        config: &TcConfig,
        pins: &Pins,
        pinned_hash: u32,
    ) -> anyhow::Result<Self> {
        let p: &mut SchedClassifier = ebpf
            .program_mut(PROGRAM)
            .ok_or_else(|| anyhow::anyhow!("{PROGRAM} missing"))?
            .try_into()?;
        super::retry::load(|| p.load())?;
        Ok(Self {
            config: config.clone(),
            attached: HashSet::new(),
            pins: pins.clone(),
            adopt: pinned_hash == crate::kernel::loader::object_hash(),
            unpinned: Vec::new(),
            adopted: 0,
            skipped: HashSet::new(),
            pinned: HashSet::new(),
            repaired: 0,
        })
    }

    /// Attaches to interfaces that appeared (adopting pinned links of this build);
    /// forgets, and unpins, those that went. Returns how many interfaces are covered.
    pub fn sync(&mut self, ebpf: &mut Ebpf) -> usize {
        let Some(program) = ebpf.program_mut(PROGRAM) else {
            return 0;
        };
        let Ok(p): Result<&mut SchedClassifier, _> = program.try_into() else {
            return 0;
        };
        let (config, pins, adopt) = (&self.config, &self.pins, self.adopt);
        let (attached, unpinned, adopted, skipped, pinned, repaired) = (
            &mut self.attached,
            &mut self.unpinned,
            &mut self.adopted,
            &mut self.skipped,
            &mut self.pinned,
            &mut self.repaired,
        );
        // Interface names and TCX links resolve in the calling thread's network namespace:
        // do the work on a thread that entered the configured one.
        std::thread::scope(|s| {
            s.spawn(|| {
                if !enter_netns(config) {
                    return;
                }
                let netns = std::fs::metadata("/proc/thread-self/ns/net").map_or(0, |m| m.ino());
                let present = interfaces();
                attached.retain(|(idx, _)| present.iter().any(|(i, _)| i == idx));
                pinned.retain(|(idx, _)| present.iter().any(|(i, _)| i == idx));
                *repaired += forget_removed_pins(pins, netns, pinned, attached);
                let wanted = wanted(&present, config, skipped);
                unpin_unwanted(pins, Some(netns), |idx, ingress| {
                    wanted.iter().any(|&(i, _, e, g)| i == idx && if ingress { g } else { e })
                });
                for &(idx, name, egress, ingress) in &wanted {
                    let idx = &idx;
                    for (want, is_ingress, kind) in [(egress, false, TcAttachType::Egress), (ingress, true, TcAttachType::Ingress)] {
                        if !want || attached.contains(&(*idx, is_ingress)) {
                            continue;
                        }
                        let pin = pin_name(netns, *idx, is_ingress);
                        if adopt && pinned_live(pins, &pin, name, kind) {
                            info!(interface = %name, direction = if is_ingress { "ingress (pod mode)" } else { "egress" }, "tc classifier: adopted the pinned link");
                            attached.insert((*idx, is_ingress));
                            pinned.insert((*idx, is_ingress));
                            *adopted += 1;
                            continue;
                        }
                        if let Some(is_pinned) = attach_new(p, pins, name, kind, &pin, unpinned) {
                            if is_pinned {
                                pinned.insert((*idx, is_ingress));
                            }
                            attached.insert((*idx, is_ingress));
                        }
                    }
                }
            });
        });
        self.attached.len()
    }
}

/// Enters `[tc] netns` on this thread, if set; false (said) when it cannot.
fn enter_netns(config: &TcConfig) -> bool {
    let Some(ns) = &config.netns else {
        return true;
    };
    let Ok(f) = std::fs::File::open(ns) else {
        warn!(netns = %ns.display(), "tc.netns cannot be opened");
        return false;
    };
    // SAFETY: valid netns fd; only this thread changes namespace.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        warn!(netns = %ns.display(), "cannot enter tc.netns");
        return false;
    }
    true
}

/// A pin removed behind the daemon's back released its link: forgotten here, so it is
/// attached again. Returns how many.
fn forget_removed_pins(
    pins: &Pins,
    netns: u64,
    pinned: &mut HashSet<(u32, bool)>,
    attached: &mut HashSet<(u32, bool)>,
) -> u64 {
    let removed: Vec<(u32, bool)> = pinned
        .iter()
        .filter(|(idx, ingress)| !pins.link(&pin_name(netns, *idx, *ingress)).exists())
        .copied()
        .collect();
    for k in &removed {
        warn!(
            ifindex = k.0,
            ingress = k.1,
            "tc classifier link pin was removed behind the daemon's back: attaching again"
        );
        pinned.remove(k);
        attached.remove(k);
    }
    removed.len() as u64
}

/// Per present interface: (index, name, egress wanted, ingress wanted). Interfaces that
/// are not Ethernet are skipped (said once each).
fn wanted<'a>(
    present: &'a [(u32, String)],
    config: &TcConfig,
    skipped: &mut HashSet<u32>,
) -> Vec<(u32, &'a String, bool, bool)> {
    present
        .iter()
        .map(|(idx, name)| {
            let mut egress = name != "lo" && config.interfaces.iter().any(|g| glob_match(g, name));
            let mut ingress = config.pod_interfaces.iter().any(|g| glob_match(g, name));
            if egress || ingress {
                let ty = link_type(name);
                if ty != Some(ARPHRD_ETHER) {
                    if skipped.insert(*idx) {
                        warn!(interface = %name, link_type = ?ty, "tc classifier not attached: not an Ethernet interface (its parser reads Ethernet frames); the cgroup_skb backstop judges guarded sockets' packets on it");
                    }
                    egress = false;
                    ingress = false;
                }
            }
            (*idx, name, egress, ingress)
        })
        .collect()
}

/// Attaches the classifier to `name` in direction `kind`: `Some(true)` a TCX link
/// pinned as `pin`, `Some(false)` attached but not pinned (a netlink attachment is kept
/// in `unpinned`), `None` not attached (said; tried again at the next sync).
fn attach_new(
    p: &mut SchedClassifier,
    pins: &Pins,
    name: &str,
    kind: TcAttachType,
    pin: &str,
    unpinned: &mut Vec<SchedClassifierLink>,
) -> Option<bool> {
    let mut link = p.attach(name, kind).and_then(|id| p.take_link(id));
    if link.is_err() {
        // Before TCX (kernels older than 6.6) the classifier goes into a clsact qdisc
        // through netlink: add it (if missing), retry.
        let _ = aya::programs::tc::qdisc_add_clsact(name);
        link = p.attach(name, kind).and_then(|id| p.take_link(id));
    }
    let link = match link {
        Ok(link) => link,
        Err(e) => {
            warn!(interface = %name, "tc classifier: {e}");
            return None;
        }
    };
    let ingress = matches!(kind, TcAttachType::Ingress);
    info!(interface = %name, direction = if ingress { "ingress (pod mode)" } else { "egress" }, "tc classifier attached");
    if <&FdLink>::try_from(&link).is_err() {
        warn!(interface = %name, "tc classifier attached through netlink (no TCX): it stops with the daemon");
        unpinned.push(link);
        return Some(false);
    }
    // TCX: pin over any older link (which then detaches), after this one is attached:
    // no gap.
    let fd = FdLink::try_from(link).expect("a TCX link");
    match crate::kernel::loader::pin_over(fd, pin, pins) {
        Ok(()) => Some(true),
        Err(e) => {
            warn!(interface = %name, "tc classifier attached but not pinned ({e}): it stops with the daemon");
            Some(false)
        }
    }
}

/// Removes the pins of TC links (in `netns`, or in every namespace) that `keep` does not
/// want: their interface went (the kernel already detached them) or the config no longer
/// names it (removing the pin detaches the link).
fn unpin_unwanted(pins: &Pins, netns: Option<u64>, keep: impl Fn(u32, bool) -> bool) {
    let Ok(entries) = std::fs::read_dir(pins.dir.join("links")) else {
        return;
    };
    for e in entries.flatten() {
        let file = e.file_name().to_string_lossy().into_owned();
        let parts: Vec<&str> = file.split('-').collect();
        let [tc, ns, idx, dir] = parts[..] else {
            continue;
        };
        if tc != "tc" || netns.is_some_and(|n| ns != n.to_string()) {
            continue;
        }
        let Ok(idx) = idx.parse::<u32>() else {
            continue;
        };
        if !keep(idx, dir == "ingress") {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Detaches every pinned TC link (the config turned the classifier off).
pub fn unpin_all(pins: &Pins) {
    unpin_unwanted(pins, None, |_, _| false);
}
