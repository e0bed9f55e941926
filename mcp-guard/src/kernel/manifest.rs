//! The kernel manifest: every program and every map of the eBPF object, how each is
//! attached or kept, in one declarative table. The loader, the pins, the self-repair
//! check, `mcp-guard enforced` and the metrics walk these tables instead of lists of
//! their own; the unit test `every_map_and_program_is_classified` parses the embedded
//! object and fails when the object and the tables disagree (a program or map nobody
//! classified, or a table entry the object lacks).

/// How a map of the eBPF object lives across daemon restarts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// Pinned under `maps/<name>` and reused by the next daemon: the programs it adopts
    /// and the ones it loads read the same map.
    Pinned,
    /// Created with each load, never pinned, for the reason given: the programs that
    /// use it hold it themselves, and nothing in it outlives one program run or load.
    Ephemeral(&'static str),
}

/// Every map of the eBPF object and how it is kept. A map whose layout changes gets a
/// new versioned name (`_1` → `_2`): pins of the old layout are never reused (the loader
/// also compares layouts before it reuses a pin).
pub const MAPS: [(&str, Keep); 24] = [
    ("CONFIG_1", Keep::Pinned),
    ("CGROUPS_1", Keep::Pinned),
    ("POLICY_LPM_1", Keep::Pinned),
    ("POLICY_EXACT_1", Keep::Pinned),
    ("STATS_1", Keep::Pinned),
    ("FLOWS_1", Keep::Pinned),
    ("RATE_1", Keep::Pinned),
    ("EVENTS_1", Keep::Pinned),
    ("IFACES_1", Keep::Pinned),
    ("SKB_CACHE_2", Keep::Pinned),
    ("EPOCH_1", Keep::Pinned),
    ("EXPIRY_1", Keep::Pinned),
    ("REGISTER_1", Keep::Pinned),
    // Adopted programs read the pinned instance map: unpinned, a restarted daemon wrote a
    // fresh one nobody read (tool scoping lost, a call in flight at a kill -9 active
    // forever). The daemon clears it at start: instances register again (fail closed).
    ("MCP_INSTANCES_1", Keep::Pinned),
    ("ACCEPTED_1", Keep::Pinned),
    ("ACCEPTS_1", Keep::Pinned),
    // Sticky identity: tasks' homes must outlive the daemon (a task that left its
    // workload while the daemon was down is still judged by it).
    ("HOMES_1", Keep::Pinned),
    // AF_UNIX destinations per workload and slot, like the other policy maps; the paths
    // of refused ones, read back for events queued across a restart.
    ("UNIX_RULES_1", Keep::Pinned),
    ("UNIX_PATHS_1", Keep::Pinned),
    (
        "UNIX_SCRATCH_1",
        Keep::Ephemeral("per-CPU scratch space for the key one unix hook run looks up"),
    ),
    (
        "SKB_SCRATCH_1",
        Keep::Ephemeral("per-CPU scratch space for the packet one cgroup_skb run judges"),
    ),
    (
        "MKDIR_SCRATCH_1",
        Keep::Ephemeral("per-CPU scratch space for the path one cgroup_mkdir run reads"),
    ),
    (
        ".rodata",
        Keep::Ephemeral("the object's constants, the same in every load of one object"),
    ),
    (
        ".rodata.cst8",
        Keep::Ephemeral("the object's constants, the same in every load of one object"),
    ),
];

/// The maps pinned under the pin directory.
pub fn pinned_maps() -> impl Iterator<Item = &'static str> {
    MAPS.iter()
        .filter(|(_, k)| *k == Keep::Pinned)
        .map(|(n, _)| *n)
}

/// The aya program type of a cgroup program.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupKind {
    /// `cgroup/connect4` and friends (`CgroupSockAddr`).
    SockAddr,
    /// `cgroup/sock_create` (`CgroupSock`).
    Sock,
    /// `cgroup_skb/egress` (`CgroupSkb`).
    SkbEgress,
    /// `cgroup/sock_ops` (`SockOps`).
    SockOps,
}

/// Where and how a program runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attach {
    /// On the attach cgroup, with the kernel's attach type (`BPF_CGROUP_*`, for
    /// BPF_PROG_QUERY); its link pinned at `links/<hook>`.
    Cgroup { kind: CgroupKind, attach_type: u32 },
    /// On the attach cgroup with an AF_UNIX attach type (`BPF_CGROUP_UNIX_*`, Linux 6.7),
    /// loaded outside aya (which has no such attach type, see `kernel/unix_hooks.rs`);
    /// optional: a kernel without the hooks runs without them, reported.
    CgroupUnix { attach_type: u32 },
    /// BPF LSM on the hook of the same name; link at `links/<hook>`.
    Lsm,
    /// BPF LSM programs that judge AF_UNIX destinations by the peer's bound address;
    /// optional (BPF LSM and the kernel's BTF offsets needed); link at `links/<hook>`.
    LsmUnix,
    /// The tracepoint of the hook's name in the given category (`cgroup`, `task`,
    /// `sched`); link at `links/<hook>`.
    Tracepoint(&'static str),
    /// The TC classifier, on the configured interfaces; links at `links/tc-<interface>`.
    Tc,
}

/// One program of the object.
#[derive(Debug, Clone, Copy)]
pub struct Program {
    /// The program's name in the object (its function).
    pub name: &'static str,
    /// The hook: the name in metrics, events and `/status`, and of its link pin.
    pub hook: &'static str,
    pub attach: Attach,
}

const fn cgroup(name: &'static str, hook: &'static str, kind: CgroupKind, at: u32) -> Program {
    Program {
        name,
        hook,
        attach: Attach::Cgroup {
            kind,
            attach_type: at,
        },
    }
}

/// Every program of the eBPF object.
pub const PROGRAMS: [Program; 18] = [
    // BPF_CGROUP_INET4_CONNECT, INET6_CONNECT, UDP4_SENDMSG, UDP6_SENDMSG.
    cgroup("mcpg_connect4", "connect4", CgroupKind::SockAddr, 10),
    cgroup("mcpg_connect6", "connect6", CgroupKind::SockAddr, 11),
    cgroup("mcpg_sendmsg4", "sendmsg4", CgroupKind::SockAddr, 14),
    cgroup("mcpg_sendmsg6", "sendmsg6", CgroupKind::SockAddr, 15),
    // BPF_CGROUP_UNIX_CONNECT, UNIX_SENDMSG: AF_UNIX destinations (local deputies).
    Program {
        name: "mcpg_connect_unix",
        hook: "connect_unix",
        attach: Attach::CgroupUnix { attach_type: 49 },
    },
    Program {
        name: "mcpg_sendmsg_unix",
        hook: "sendmsg_unix",
        attach: Attach::CgroupUnix { attach_type: 50 },
    },
    // BPF_CGROUP_INET_SOCK_CREATE: raw inet sockets.
    cgroup("mcpg_sock_create", "sock_create", CgroupKind::Sock, 2),
    // BPF_CGROUP_INET_EGRESS: every packet of the workloads' sockets.
    cgroup("mcpg_cgroup_skb", "cgroup_skb", CgroupKind::SkbEgress, 1),
    // BPF_CGROUP_SOCK_OPS: marks accepted TCP connections, whose replies the backstop
    // and the TC classifier let go to the peer that connected.
    cgroup("mcpg_sock_ops", "sock_ops", CgroupKind::SockOps, 3),
    // AF_PACKET (and other families the cgroup hooks never see) refused at creation.
    Program {
        name: "mcpg_lsm_socket",
        hook: "socket_create",
        attach: Attach::Lsm,
    },
    // AF_UNIX destinations by the peer's bound address, where BPF LSM runs.
    Program {
        name: "mcpg_lsm_unix_connect",
        hook: "unix_stream_connect",
        attach: Attach::LsmUnix,
    },
    Program {
        name: "mcpg_lsm_unix_send",
        hook: "unix_may_send",
        attach: Attach::LsmUnix,
    },
    // Workload cgroups registered at creation, registrations dropped at removal.
    Program {
        name: "mcpg_cgroup_mkdir",
        hook: "cgroup_mkdir",
        attach: Attach::Tracepoint("cgroup"),
    },
    Program {
        name: "mcpg_cgroup_rmdir",
        hook: "cgroup_rmdir",
        attach: Attach::Tracepoint("cgroup"),
    },
    // Sticky identity (`home.rs`): homes given at task creation, dropped at exit,
    // given or reported at a move between cgroups.
    Program {
        name: "mcpg_task_newtask",
        hook: "task_newtask",
        attach: Attach::Tracepoint("task"),
    },
    Program {
        name: "mcpg_process_exit",
        hook: "sched_process_exit",
        attach: Attach::Tracepoint("sched"),
    },
    Program {
        name: "mcpg_cgroup_attach",
        hook: "cgroup_attach_task",
        attach: Attach::Tracepoint("cgroup"),
    },
    // Packets below the sockets (VM mode) and of pods (pod mode).
    Program {
        name: "mcpg_tc",
        hook: "tc",
        attach: Attach::Tc,
    },
];

/// A cgroup program: (program name, hook, kind, kernel attach type).
pub type CgroupProgram = (&'static str, &'static str, CgroupKind, u32);

/// The programs attached to the attach cgroup, in table order.
pub fn cgroup_programs() -> impl Iterator<Item = CgroupProgram> {
    PROGRAMS.iter().filter_map(|p| match p.attach {
        Attach::Cgroup { kind, attach_type } => Some((p.name, p.hook, kind, attach_type)),
        _ => None,
    })
}

/// The AF_UNIX cgroup programs: (program name, hook, kernel attach type).
pub fn unix_programs() -> impl Iterator<Item = (&'static str, &'static str, u32)> {
    PROGRAMS.iter().filter_map(|p| match p.attach {
        Attach::CgroupUnix { attach_type } => Some((p.name, p.hook, attach_type)),
        _ => None,
    })
}

/// The tracepoint programs: (program name, hook, category).
pub fn tracepoints() -> impl Iterator<Item = (&'static str, &'static str, &'static str)> {
    PROGRAMS.iter().filter_map(|p| match p.attach {
        Attach::Tracepoint(category) => Some((p.name, p.hook, category)),
        _ => None,
    })
}

/// The programs with a given kind of attachment: (program name, hook).
pub fn programs(attach: Attach) -> impl Iterator<Item = (&'static str, &'static str)> {
    PROGRAMS
        .iter()
        .filter(move |p| p.attach == attach)
        .map(|p| (p.name, p.hook))
}

/// The one program with a given kind of attachment (LSM, TC).
///
/// # Panics
/// The table has none: a bug the unit tests catch.
#[must_use]
pub fn program(attach: Attach) -> (&'static str, &'static str) {
    programs(attach).next().expect("the manifest names it")
}
