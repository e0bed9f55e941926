//! Byte layouts shared by the kernel programs and the daemon.
//!
//! Every type here is `#[repr(C)]` with explicit padding and a compile-time size
//! check, so both sides agree on every byte. Addresses are always 16 bytes: an IPv4
//! address is stored in its IPv4-mapped IPv6 form (`::ffff:a.b.c.d`). That single
//! representation is what makes a dual-stack socket connecting to `::ffff:169.254.169.254`
//! hit exactly the same map entries as an AF_INET socket connecting to `169.254.169.254`.
//!
//! Map names carry a version suffix (`_1`): a layout change gets a new name so a
//! daemon never reads a pinned map of another layout.
#![no_std]

use core::mem::size_of;

/// Scope used in policy keys for the node-wide baseline deny list.
pub const SCOPE_BASELINE: u32 = 0;
/// Scope of the built-in "internal" ranges that `default = "deny-internal"` refuses.
pub const SCOPE_INTERNAL: u32 = 1;
/// Scope of the metadata set, used only to classify a denied destination.
pub const SCOPE_METADATA: u32 = 2;
/// The built-in AF_UNIX entries (local deputies), shared by every workload in
/// `UNIX_RULES_1`.
pub const SCOPE_UNIX_BUILTIN: u32 = 3;
/// First workload id; ids below are reserved scopes.
pub const FIRST_WORKLOAD_ID: u32 = 16;

/// Policy lives in two slots; the daemon writes the inactive one and then flips
/// [`Config::slot`] with a single array update, so a decision never sees half a policy.
pub const SLOTS: u32 = 2;

/// Deepest cgroup level whose ancestors are searched for a workload. A workload's own
/// cgroup must be at this level or above; its descendants may be deeper.
pub const MAX_CGROUP_LEVEL: u32 = 32;

/// Port ranges a single policy entry can carry (after merging, see the compiler).
pub const MAX_RANGES: usize = 8;

/// Packs the workload (or reserved scope) and the policy slot into the key's scope word.
#[inline(always)]
#[must_use]
pub const fn scope(id: u32, slot: u32) -> u32 {
    (id << 1) | (slot & 1)
}

/// Data part of the LPM-trie key: `prefix_len` counts 32 scope bits plus address bits.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LpmData {
    pub scope: u32,
    /// IPv6 or IPv4-mapped address, network byte order.
    pub addr_be: [u8; 16],
}
const _: () = assert!(size_of::<LpmData>() == 20);

/// Key of the exact-host hash (/32 and /128 entries): a hash lookup costs the same with
/// 100 or 100,000 hosts, where an LPM trie walk grows with the entries.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ExactKey {
    pub scope: u32,
    pub addr_be: [u8; 16],
}
const _: () = assert!(size_of::<ExactKey>() == 20);

/// Protocol bits for [`PortRange::protos`].
pub const PROTO_TCP: u8 = 1;
pub const PROTO_UDP: u8 = 2;
/// A protocol that is neither TCP nor UDP (SCTP, ICMP ping sockets, ...).
pub const PROTO_OTHER: u8 = 4;
pub const PROTO_ANY: u8 = PROTO_TCP | PROTO_UDP | PROTO_OTHER;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PortRange {
    /// Inclusive, host byte order.
    pub lo: u16,
    pub hi: u16,
    pub protos: u8,
    /// 0: the range holds whenever it matches. 1 to [`MAX_TOOLSETS`]: it holds only
    /// while one of that tool set's MCP tools is being called in the caller's MCP
    /// instance (bit `toolset - 1` of [`McpInstance::active`]).
    pub toolset: u8,
    pub _pad: [u8; 2],
    /// The rule that allowed this range; reported by `explain` and in events.
    pub rule_id: u32,
}
const _: () = assert!(size_of::<PortRange>() == 12);

/// What a policy entry means.
pub const ENTRY_ALLOW: u8 = 0;
pub const ENTRY_BASELINE_METADATA: u8 = 1;
pub const ENTRY_BASELINE_DENY: u8 = 2;
pub const ENTRY_INTERNAL: u8 = 3;
pub const ENTRY_METADATA_CLASS: u8 = 4;
/// A hole at `::ffff:0:0/96` below a wider IPv6 prefix of the same scope: IPv6 prefixes
/// never cover IPv4 (mapped) destinations, so the longest match for an IPv4 address
/// stops here and finds nothing (no ranges, not a match).
pub const ENTRY_HOLE: u8 = 5;

/// [`PolicyEntry::flags`]: an exact entry that exists only because of learned DNS
/// answers. It holds until the expiry stored for the same key in `EXPIRY_1`
/// (`CLOCK_BOOTTIME` nanoseconds, the clock `bpf_ktime_get_boot_ns` reads): past it, or
/// with no expiry stored, the programs ignore the entry, whether or not the daemon runs.
pub const ENTRY_F_EXPIRES: u8 = 1;

/// An IPv4 address (its four bytes in network order) in the IPv4-mapped form every
/// map key uses: `::ffff:a.b.c.d`.
#[inline(always)]
#[must_use]
pub const fn mapped_v4(b: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, b[0], b[1], b[2], b[3],
    ]
}

/// An IPv6 address as the kernel hands it to programs (four 32-bit words, each in
/// network byte order as stored) as 16 bytes.
#[inline(always)]
#[must_use]
pub const fn v6_from_words(w: [u32; 4]) -> [u8; 16] {
    let (a, b, c, d) = (
        w[0].to_ne_bytes(),
        w[1].to_ne_bytes(),
        w[2].to_ne_bytes(),
        w[3].to_ne_bytes(),
    );
    [
        a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2],
        d[3],
    ]
}

/// The NAT64 well-known prefix 64:ff9b::/96 (RFC 6052): destinations in it are judged
/// by the IPv4 address they carry, as `::ffff:a.b.c.d`. Returns whether it rewrote.
#[inline(always)]
pub fn nat64_to_mapped(addr: &mut [u8; 16]) -> bool {
    if addr[0] == 0x00
        && addr[1] == 0x64
        && addr[2] == 0xff
        && addr[3] == 0x9b
        && addr[4] == 0
        && addr[5] == 0
        && addr[6] == 0
        && addr[7] == 0
        && addr[8] == 0
        && addr[9] == 0
        && addr[10] == 0
        && addr[11] == 0
    {
        addr[0] = 0;
        addr[1] = 0;
        addr[2] = 0;
        addr[3] = 0;
        addr[10] = 0xff;
        addr[11] = 0xff;
        true
    } else {
        false
    }
}

/// Value of both policy maps. For allow entries the compiler has already merged the
/// ranges of every shorter covering prefix into it, so the longest match alone decides.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PolicyEntry {
    pub kind: u8,
    pub n_ranges: u8,
    /// `ENTRY_F_*` bits.
    pub flags: u8,
    pub _pad: u8,
    /// For deny entries: the rule (baseline CIDR or named set) that decided.
    pub rule_id: u32,
    pub ranges: [PortRange; MAX_RANGES],
}
const _: () = assert!(size_of::<PolicyEntry>() == 8 + 12 * MAX_RANGES);

/// Workload defaults (`default = ...`).
pub const DEFAULT_DENY_INTERNAL: u8 = 0;
pub const DEFAULT_DENY: u8 = 1;
pub const DEFAULT_ALLOW: u8 = 2;

pub const MODE_ENFORCE: u8 = 0;
pub const MODE_AUDIT: u8 = 1;

/// Key of the cgroup map: which workload owns a cgroup (in one policy slot).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CgroupKey {
    pub cgroup_id: u64,
    pub slot: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<CgroupKey>() == 16);

/// [`WorkloadInfo::flags`]: refuse raw inet sockets (`cgroup/sock_create`).
pub const WL_DENY_RAW: u8 = 1;
/// [`WorkloadInfo::flags`]: refuse AF_PACKET sockets (BPF LSM `socket_create`).
pub const WL_DENY_PACKET: u8 = 2;
/// [`WorkloadInfo::flags`]: DNS (port 53) and DNS over TLS/QUIC (port 853), TCP and
/// UDP, only where an allow rule allows it (the DNS proxy always is), whatever the
/// workload's default: DNS cannot go around the proxy's filter to a public resolver.
pub const WL_DENY_DIRECT_DNS: u8 = 4;
/// [`WorkloadInfo::flags`]: refuse ICMP datagram ("ping") sockets (`cgroup/sock_create`).
pub const WL_DENY_PING: u8 = 8;
/// [`WorkloadInfo::flags`]: refuse inet sockets other than TCP, MPTCP and UDP.
pub const WL_DENY_OTHER_PROTO: u8 = 16;
/// [`WorkloadInfo::flags`]: the workload has rules scoped to MCP tools or denies egress
/// between calls: decisions look up the caller's MCP instance (`MCP_INSTANCES_1`).
pub const WL_MCP: u8 = 32;
/// [`WorkloadInfo::flags`]: no egress while no MCP tool call is in flight in the
/// caller's instance (a process of the workload outside any instance never has one).
pub const WL_DENY_BETWEEN_CALLS: u8 = 64;

/// Tool sets one workload's rules can name (bits 0..63 of [`McpInstance::active`]).
pub const MAX_TOOLSETS: usize = 63;
/// [`McpInstance::active`]: a tool call is in flight in the instance.
pub const MCP_IN_CALL: u64 = 1 << 63;

/// One `mcp-guard exec --mcp` instance, by the id of the cgroup its server runs in
/// (the key of `MCP_INSTANCES_1`). Written whole by the daemon, which the instance's
/// relay tells about every tool call before it forwards the call.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct McpInstance {
    /// The workload the instance belongs to: ignored under any other.
    pub workload_id: u32,
    /// Bumped at every change of the calls in flight; events carry the value they were
    /// decided under, so the daemon names the calls in flight at that moment.
    pub seq: u32,
    /// Per policy slot: bit `n` set while a call of a tool in tool set `n + 1` is in
    /// flight, [`MCP_IN_CALL`] while any call is.
    pub active: [u64; 2],
}
const _: () = assert!(size_of::<McpInstance>() == 24);

/// Whether a destination port is DNS or DNS over TLS/QUIC, for [`WL_DENY_DIRECT_DNS`].
#[must_use]
#[inline(always)]
pub const fn is_dns_port(port: u16) -> bool {
    port == 53 || port == 853
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct WorkloadInfo {
    pub workload_id: u32,
    pub default: u8,
    pub mode: u8,
    pub flags: u8,
    pub _pad: u8,
}
const _: () = assert!(size_of::<WorkloadInfo>() == 8);

impl WorkloadInfo {
    /// The strict copy of a workload registered under [`strict_key`]: its own id and
    /// mode, default deny, every refusable socket kind refused, direct DNS refused.
    #[must_use]
    #[inline(always)]
    pub const fn strictest(self) -> Self {
        Self {
            workload_id: self.workload_id,
            default: DEFAULT_DENY,
            mode: self.mode,
            flags: self.flags
                | WL_DENY_RAW
                | WL_DENY_PACKET
                | WL_DENY_PING
                | WL_DENY_OTHER_PROTO
                | WL_DENY_DIRECT_DNS,
            _pad: 0,
        }
    }
}

/// Where a task belongs (`HOMES_1`, by thread id; a process moved whole is found by its
/// thread group id too): the registered cgroup of the workload it ran in when the
/// kernel (at its creation, at a move into a workload, or the daemon's seeding) first
/// saw it there. A task outside its home cgroup is judged by its home's workload as
/// long as it lives, wherever it went, and passes its home to every task it creates.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Home {
    pub cgroup_id: u64,
    /// The home cgroup's level (0: the root), as the cgroup tracepoints count it.
    pub level: u32,
    /// The workload: judged by its strict registration ([`strict_key`]) once the home
    /// cgroup lost its own (removed after the task left it).
    pub workload_id: u32,
}
const _: () = assert!(size_of::<Home>() == 16);

/// The `CGROUPS_1` key under which each workload's strict copy
/// ([`WorkloadInfo::strictest`]) is registered, per slot: what a task that left its
/// home is judged by when its home cgroup is gone. cgroup ids are inode numbers, which
/// never reach bit 63.
#[must_use]
#[inline(always)]
pub const fn strict_key(workload_id: u32) -> u64 {
    (1 << 63) | workload_id as u64
}

/// Entries of `HOMES_1`: tasks of guarded workloads tracked at once.
pub const HOMES_MAX: u32 = 262_144;

/// Longest cgroup path (below the hierarchy's root, NUL included) the kernel-side
/// registration compares; longer paths are left to the daemon's scan.
pub const CGROUP_PATH_LEN: usize = 256;
/// Longest literal prefix of a `prefix*` pattern the kernel-side registration checks.
pub const MKDIR_PREFIX_MAX: usize = 64;
/// [`MkdirKey::kind`]: the new cgroup's whole path is a workload's cgroup.
pub const MKDIR_EXACT: u32 = 0;
/// [`MkdirKey::kind`]: any child of this path is a workload's cgroup (`parent/*`).
pub const MKDIR_CHILD: u32 = 1;
/// [`MkdirKey::kind`]: a child of the parent whose name starts with the literal after the
/// last `/` (`parent/prefix*`).
pub const MKDIR_PREFIX: u32 = 2;

/// Key of `REGISTER_1`: what the `cgroup:cgroup_mkdir` tracepoint program looks up for a
/// new cgroup, so it registers the workload's cgroup before `mkdir` returns and no
/// process can ever run in it unregistered. `path` is NUL-padded.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MkdirKey {
    pub slot: u32,
    pub kind: u32,
    pub path: [u8; CGROUP_PATH_LEN],
}
const _: () = assert!(size_of::<MkdirKey>() == 8 + CGROUP_PATH_LEN);

/// Value of `REGISTER_1`: the registration to make, and the workload's position in the
/// config (a cgroup several workloads name belongs to the first, as in the scan).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MkdirMatch {
    pub info: WorkloadInfo,
    pub order: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<MkdirMatch>() == 16);

/// Single element of the `CONFIG_1` array: read once per decision.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Config {
    /// Active policy slot (0 or 1).
    pub slot: u32,
    /// Bumped when a slot starts being rewritten and again when the live slot switches:
    /// a program re-reads it after deciding and decides again if it moved. Carried in
    /// events, so tests can observe reloads.
    pub generation: u32,
    /// Events per second per (workload, destination, port); 0 disables the limit.
    pub rate_limit_per_sec: u32,
    /// Hash of the eBPF object of the daemon that wrote this config (and pinned the
    /// links): a restarted daemon adopts pinned links only when it runs the same code.
    /// Not read by the kernel programs.
    pub object_hash: u32,
}
const _: () = assert!(size_of::<Config>() == 16);

/// Defines a `#[repr(u8)]` enum of wire values with its names: the one place where a
/// hook, verdict, reason or class byte is given its meaning. The `u8` constants below
/// are these values, for the kernel programs' matches.
macro_rules! wire_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $v:ident = $n:literal => $s:literal,)+ }) => {
        $(#[$m])*
        #[repr(u8)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vm])* $v = $n,)+
        }

        impl $name {
            /// Every value, in wire order.
            pub const ALL: [Self; [$($n),+].len()] = [$(Self::$v),+];

            /// The value a byte from the kernel stands for.
            #[must_use]
            pub const fn from_u8(b: u8) -> Option<Self> {
                match b {
                    $($n => Some(Self::$v),)+
                    _ => None,
                }
            }

            /// Its name in events, metrics and the CLI.
            #[must_use]
            pub const fn name(self) -> &'static str {
                match self {
                    $(Self::$v => $s,)+
                }
            }
        }
    };
}

wire_enum! {
    /// The hook that decided.
    Hook {
        Connect4 = 0 => "connect4",
        Connect6 = 1 => "connect6",
        Sendmsg4 = 2 => "sendmsg4",
        Sendmsg6 = 3 => "sendmsg6",
        Tc = 4 => "tc",
        SockCreate = 5 => "sock_create",
        LsmSocket = 6 => "socket_create",
        /// cgroup_skb/egress: the per-packet backstop on the workload's own sockets.
        CgroupSkb = 7 => "cgroup_skb",
        /// `cgroup:cgroup_attach_task`: a guarded process moved out of its workload.
        CgroupAttach = 8 => "cgroup_attach",
        /// `cgroup/connect_unix` (Linux 6.7): connect() on an AF_UNIX socket.
        ConnectUnix = 9 => "connect_unix",
        /// `cgroup/sendmsg_unix` (Linux 6.7): a datagram sent to an AF_UNIX address.
        SendmsgUnix = 10 => "sendmsg_unix",
        /// BPF LSM `unix_stream_connect`: judged by the listener's bound address.
        LsmUnixConnect = 11 => "unix_stream_connect",
        /// BPF LSM `unix_may_send`: judged by the receiver's bound address.
        LsmUnixSend = 12 => "unix_may_send",
    }
}

wire_enum! {
    /// What happened to a refused flow.
    FlowVerdict {
        Denied = 0 => "denied",
        Audited = 1 => "audited",
        /// Not a flow: a process left its workload's cgroup, which the kernel let
        /// happen; it keeps its workload's policy (see [`Home`]).
        Contained = 2 => "contained",
    }
}

wire_enum! {
    /// Why a flow was refused.
    Reason {
        BaselineMetadata = 0 => "baseline-metadata",
        BaselineDeny = 1 => "baseline-deny",
        DenyInternal = 2 => "deny-internal",
        DefaultDeny = 3 => "default-deny",
        NotAllowed = 4 => "not-allowed",
        RawSocket = 5 => "raw-socket",
        PacketSocket = 6 => "packet-socket",
        Malformed = 7 => "malformed-packet",
        PingSocket = 8 => "ping-socket",
        SocketProtocol = 9 => "socket-protocol",
        /// Only an allow rule scoped to MCP tools matched, and none of its tools was
        /// being called.
        ToolNotActive = 10 => "tool-not-active",
        /// The workload denies egress while no MCP tool call is in flight.
        BetweenCalls = 11 => "between-calls",
        /// A process of the workload moved to a cgroup outside it (hook cgroup_attach).
        LeftWorkload = 12 => "left-workload",
        /// An AF_UNIX destination a rule refuses (built-in or `deny_unix`).
        UnixDenied = 13 => "unix-denied",
        /// An AF_UNIX destination no `allow_unix` entry names, in a workload with
        /// `unix = "allow-listed"`.
        UnixNotAllowed = 14 => "unix-not-allowed",
    }
}

wire_enum! {
    /// The class of a refused destination.
    DestClass {
        Metadata = 0 => "metadata",
        Internal = 1 => "internal",
        Public = 2 => "public",
        /// No destination (a refused socket creation).
        None = 3 => "none",
        /// An AF_UNIX socket on this machine (a local deputy).
        Local = 4 => "local",
    }
}

/// The name of a hook byte ("unknown" for a value this build does not know).
#[must_use]
pub const fn hook_name(b: u8) -> &'static str {
    match Hook::from_u8(b) {
        Some(h) => h.name(),
        None => "unknown",
    }
}

/// The name of a reason byte ("unknown" for a value this build does not know).
#[must_use]
pub const fn reason_name(b: u8) -> &'static str {
    match Reason::from_u8(b) {
        Some(r) => r.name(),
        None => "unknown",
    }
}

/// The name of a verdict byte (anything but audited is a denial).
#[must_use]
pub const fn verdict_name(b: u8) -> &'static str {
    match FlowVerdict::from_u8(b) {
        Some(v) => v.name(),
        None => "denied",
    }
}

/// The name of a destination class byte (an unknown one counts as public).
#[must_use]
pub const fn class_name(b: u8) -> &'static str {
    match DestClass::from_u8(b) {
        Some(c) => c.name(),
        None => "public",
    }
}

/// Hooks, as reported in events and counters.
pub const HOOK_CONNECT4: u8 = Hook::Connect4 as u8;
pub const HOOK_CONNECT6: u8 = Hook::Connect6 as u8;
pub const HOOK_SENDMSG4: u8 = Hook::Sendmsg4 as u8;
pub const HOOK_SENDMSG6: u8 = Hook::Sendmsg6 as u8;
pub const HOOK_TC: u8 = Hook::Tc as u8;
pub const HOOK_SOCK_CREATE: u8 = Hook::SockCreate as u8;
pub const HOOK_LSM_SOCKET: u8 = Hook::LsmSocket as u8;
/// cgroup_skb/egress: the per-packet backstop on the workload's own sockets.
pub const HOOK_CGROUP_SKB: u8 = Hook::CgroupSkb as u8;
pub const HOOK_CGROUP_ATTACH: u8 = Hook::CgroupAttach as u8;
pub const HOOK_CONNECT_UNIX: u8 = Hook::ConnectUnix as u8;
pub const HOOK_SENDMSG_UNIX: u8 = Hook::SendmsgUnix as u8;
pub const HOOK_LSM_UNIX_CONNECT: u8 = Hook::LsmUnixConnect as u8;
pub const HOOK_LSM_UNIX_SEND: u8 = Hook::LsmUnixSend as u8;
pub const HOOK_COUNT: usize = Hook::ALL.len();

/// What the cgroup_skb backstop remembers of a socket (`SKB_CACHE_2`, keyed by socket
/// cookie): the decision for its last destination, valid while the policy generation
/// and the registration epoch are those it was made under. An allowed flow then costs
/// one lookup per packet instead of an ancestor walk and a policy decision.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SkbVerdict {
    pub generation: u32,
    pub epoch: u32,
    pub daddr: [u8; 16],
    pub dport: u16,
    pub proto: u8,
    /// One of the `SKB_*` states.
    pub state: u8,
    /// For an allowed destination learned from DNS: `CLOCK_BOOTTIME` second from which
    /// the entry is no longer valid (decided again); 0 for no expiry.
    pub expires_s: u32,
}
const _: () = assert!(size_of::<SkbVerdict>() == 32);

/// [`SkbVerdict::state`]: the socket belongs to no workload (any destination).
pub const SKB_UNTOUCHED: u8 = 0;
/// [`SkbVerdict::state`]: the destination is allowed.
pub const SKB_ALLOWED: u8 = 1;
/// [`SkbVerdict::state`]: refused and dropped (reported once).
pub const SKB_DROPPED: u8 = 2;
/// [`SkbVerdict::state`]: refused in audit mode, let through (reported once).
pub const SKB_AUDITED: u8 = 3;
/// [`SkbVerdict::state`] flag: a TCP stream socket, whose every packet goes to the peer
/// it connected to: a valid entry decides without reading the packet.
pub const SKB_STREAM: u8 = 0x80;

pub const VERDICT_DENIED: u8 = FlowVerdict::Denied as u8;
pub const VERDICT_AUDITED: u8 = FlowVerdict::Audited as u8;
pub const VERDICT_CONTAINED: u8 = FlowVerdict::Contained as u8;

/// Why a flow was refused.
pub const REASON_BASELINE_METADATA: u8 = Reason::BaselineMetadata as u8;
pub const REASON_BASELINE_DENY: u8 = Reason::BaselineDeny as u8;
/// `default = "deny-internal"` and the destination is internal.
pub const REASON_DENY_INTERNAL: u8 = Reason::DenyInternal as u8;
/// `default = "deny"` and no allow rule matched the address.
pub const REASON_DEFAULT_DENY: u8 = Reason::DefaultDeny as u8;
/// An allow rule matched the address, but not the port or protocol, and the default denies.
pub const REASON_NOT_ALLOWED: u8 = Reason::NotAllowed as u8;
/// A raw inet socket (SOCK_RAW): crafted packets bypass the connect/sendmsg hooks.
pub const REASON_RAW_SOCKET: u8 = Reason::RawSocket as u8;
/// An AF_PACKET socket: whole frames below IP.
pub const REASON_PACKET_SOCKET: u8 = Reason::PacketSocket as u8;
/// An IP packet from a guarded workload that could not be parsed (TC): dropped.
pub const REASON_MALFORMED: u8 = Reason::Malformed as u8;
/// An ICMP datagram ("ping") socket: it sends ICMP echo with `sendto`, which no
/// connect/sendmsg hook judges.
pub const REASON_PING_SOCKET: u8 = Reason::PingSocket as u8;
/// An inet socket of a protocol other than TCP, MPTCP or UDP (UDP-Lite, SCTP, ...):
/// their send paths are not all judged by the socket hooks.
pub const REASON_SOCKET_PROTOCOL: u8 = Reason::SocketProtocol as u8;
pub const REASON_TOOL_NOT_ACTIVE: u8 = Reason::ToolNotActive as u8;
pub const REASON_BETWEEN_CALLS: u8 = Reason::BetweenCalls as u8;
pub const REASON_LEFT_WORKLOAD: u8 = Reason::LeftWorkload as u8;
pub const REASON_UNIX_DENIED: u8 = Reason::UnixDenied as u8;
pub const REASON_UNIX_NOT_ALLOWED: u8 = Reason::UnixNotAllowed as u8;
pub const REASON_COUNT: usize = Reason::ALL.len();

pub const CLASS_METADATA: u8 = DestClass::Metadata as u8;
pub const CLASS_INTERNAL: u8 = DestClass::Internal as u8;
pub const CLASS_PUBLIC: u8 = DestClass::Public as u8;
/// No destination (a refused socket creation).
pub const CLASS_NONE: u8 = DestClass::None as u8;
/// An AF_UNIX destination.
pub const CLASS_LOCAL: u8 = DestClass::Local as u8;

/// `sun_path` of an AF_UNIX address.
pub const UNIX_PATH_MAX: usize = 108;

/// Data part of the `UNIX_RULES_1` LPM key: `prefix_len` counts the 32 scope bits
/// ([`scope`]: workload and policy slot) plus 8 per path byte. A path rule names its
/// path and the NUL after it (an exact match); a `dir/*` rule names `dir/` (a prefix);
/// the workload's catch-all (`unix = "allow-listed"`) names no byte. An abstract name
/// is its leading NUL and its bytes, then a NUL.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct UnixLpmData {
    pub scope: u32,
    pub path: [u8; UNIX_PATH_MAX],
}
const _: () = assert!(size_of::<UnixLpmData>() == 112);

/// What the most specific AF_UNIX entry of a workload (or of the built-in list) says.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct UnixRule {
    pub rule_id: u32,
    /// [`UNIX_ALLOW`], [`UNIX_DENY`] or [`UNIX_NOT_ALLOWED`].
    pub action: u8,
    /// Bytes of the entry's pattern: a workload's entry at least as long as the built-in
    /// one that matches wins over it.
    pub len: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<UnixRule>() == 8);

pub const UNIX_ALLOW: u8 = 1;
/// A rule refuses the path (reason `unix-denied`).
pub const UNIX_DENY: u8 = 2;
/// The workload's catch-all refuses it (reason `unix-not-allowed`).
pub const UNIX_NOT_ALLOWED: u8 = 3;

/// Entries of `UNIX_RULES_1` (both policy slots).
pub const UNIX_RULES_MAX: u32 = 65_536;

/// A refused AF_UNIX destination as the daemon reads it back (`UNIX_PATHS_1`, by the
/// 64-bit hash an event carries in the first 8 bytes of `daddr_be`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnixPath {
    /// Bytes of `path` that count.
    pub len: u32,
    pub path: [u8; UNIX_PATH_MAX],
}
const _: () = assert!(size_of::<UnixPath>() == 112);

/// FNV-1a (64-bit) of an AF_UNIX path as the kernel hashes it for events.
#[must_use]
#[inline(always)]
pub fn unix_path_hash(path: &[u8; UNIX_PATH_MAX]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < UNIX_PATH_MAX {
        h = (h ^ u64::from(path[i])).wrapping_mul(0x0100_0000_01b3);
        i += 1;
    }
    h
}

/// Per-CPU counter key: one per label combination the metrics export.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowCounterKey {
    pub workload_id: u32,
    pub hook: u8,
    pub verdict: u8,
    pub reason: u8,
    pub dest_class: u8,
    /// Address family as judged: 4 or 6 (an IPv4-mapped destination counts as 4).
    pub family: u8,
    pub proto: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<FlowCounterKey>() == 12);

/// Entries of `POLICY_LPM_1` and of `POLICY_EXACT_1`. Both policy slots live in them
/// (a reload writes the inactive slot while the live one decides), so one policy may
/// use at most half.
pub const POLICY_LPM_MAX: u32 = 524_288;
pub const POLICY_EXACT_MAX: u32 = 524_288;

/// Indexes of the per-CPU `STATS_1` array.
pub const STAT_DECISIONS: u32 = 0;
/// Denied or audited decisions (the left side of the event invariant).
pub const STAT_REPORTED: u32 = 1;
pub const STAT_EVENTS_SUBMITTED: u32 = 2;
pub const STAT_EVENTS_SUPPRESSED: u32 = 3;
pub const STAT_EVENTS_LOST: u32 = 4;
/// Flow counter hash full: the decision was still counted in `STAT_REPORTED`.
pub const STAT_COUNTER_OVERFLOW: u32 = 5;
/// Decisions that failed closed because the policy kept changing while they were made.
pub const STAT_UNSTABLE: u32 = 6;
/// An accepted TCP connection the kernel could not mark (`ACCEPTED_1` full): its replies
/// are judged by the egress policy (fail closed).
pub const STAT_ACCEPT_UNMARKED: u32 = 7;
pub const STAT_COUNT: u32 = 8;

/// Pod mode of the TC classifier: a packet with no socket (it arrived from a pod's
/// veth) is attributed by its source address. Value: the registered workload cgroup id
/// of the network namespace that owns the address. Key: the address as in [`LpmData`].
pub type SourceKey = [u8; 16];

/// Rate-limit state per (workload, destination, port).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RateKey {
    pub workload_id: u32,
    pub dport: u16,
    pub proto: u8,
    pub _pad: u8,
    pub daddr_be: [u8; 16],
}
const _: () = assert!(size_of::<RateKey>() == 24);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RateState {
    pub window_start_ns: u64,
    pub emitted: u32,
    pub suppressed: u32,
}
const _: () = assert!(size_of::<RateState>() == 16);

pub const COMM_LEN: usize = 16;

/// One denied (or audited) decision, written to the `EVENTS_1` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
    pub cgroup_id: u64,
    pub socket_cookie: u64,
    pub pid: u32,
    pub tgid: u32,
    pub uid: u32,
    pub gid: u32,
    pub workload_id: u32,
    pub rule_id: u32,
    /// Events for the same (workload, destination, port) suppressed since the last one.
    pub suppressed: u32,
    pub generation: u32,
    pub daddr_be: [u8; 16],
    pub saddr_be: [u8; 16],
    /// Host byte order.
    pub dport: u16,
    pub sport: u16,
    pub hook: u8,
    pub verdict: u8,
    pub reason: u8,
    pub dest_class: u8,
    /// Socket family: 2 (AF_INET) or 10 (AF_INET6).
    pub sock_family: u8,
    /// IPPROTO_* of the socket.
    pub proto: u8,
    /// 1 when the caller ran in an MCP instance (`mcp-guard exec --mcp`); then
    /// `mcp_seq` is the instance's [`McpInstance::seq`] at the refusal.
    pub mcp: u8,
    pub _pad: u8,
    pub mcp_seq: u32,
    pub comm: [u8; COMM_LEN],
}
const _: () = assert!(size_of::<Event>() == 24 + 32 + 32 + 16 + 16);

/// Ring buffer size: 1 MiB holds about 8,000 events.
pub const EVENTS_RING_BYTES: u32 = 1 << 20;

#[cfg(feature = "user")]
mod pod {
    use super::{
        CgroupKey, Config, Event, ExactKey, FlowCounterKey, Home, LpmData, McpInstance, MkdirKey,
        MkdirMatch, PolicyEntry, RateKey, RateState, SkbVerdict, UnixLpmData, UnixPath, UnixRule,
        WorkloadInfo,
    };
    unsafe impl aya::Pod for UnixLpmData {}
    unsafe impl aya::Pod for UnixRule {}
    unsafe impl aya::Pod for UnixPath {}
    unsafe impl aya::Pod for McpInstance {}
    unsafe impl aya::Pod for MkdirKey {}
    unsafe impl aya::Pod for MkdirMatch {}
    // SAFETY: all of these are repr(C), Copy, with explicit padding and no pointers.
    unsafe impl aya::Pod for LpmData {}
    unsafe impl aya::Pod for ExactKey {}
    unsafe impl aya::Pod for PolicyEntry {}
    unsafe impl aya::Pod for SkbVerdict {}
    unsafe impl aya::Pod for CgroupKey {}
    unsafe impl aya::Pod for WorkloadInfo {}
    unsafe impl aya::Pod for Home {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for FlowCounterKey {}
    unsafe impl aya::Pod for RateKey {}
    unsafe impl aya::Pod for RateState {}
    unsafe impl aya::Pod for Event {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_values_round_trip_with_distinct_names() {
        fn check<T: Copy + PartialEq + core::fmt::Debug>(
            all: &[T],
            byte: impl Fn(T) -> u8,
            from: impl Fn(u8) -> Option<T>,
            name: impl Fn(T) -> &'static str,
        ) {
            for (i, v) in all.iter().enumerate() {
                assert_eq!(usize::from(byte(*v)), i, "{v:?}: values are dense from 0");
                assert_eq!(from(byte(*v)), Some(*v));
                for w in &all[..i] {
                    assert_ne!(name(*v), name(*w));
                }
            }
            assert_eq!(from(all.len() as u8), None);
        }
        check(&Hook::ALL, |v| v as u8, Hook::from_u8, Hook::name);
        check(
            &FlowVerdict::ALL,
            |v| v as u8,
            FlowVerdict::from_u8,
            FlowVerdict::name,
        );
        check(&Reason::ALL, |v| v as u8, Reason::from_u8, Reason::name);
        check(
            &DestClass::ALL,
            |v| v as u8,
            DestClass::from_u8,
            DestClass::name,
        );
        assert_eq!(hook_name(200), "unknown");
        assert_eq!(reason_name(REASON_MALFORMED), "malformed-packet");
    }
}
