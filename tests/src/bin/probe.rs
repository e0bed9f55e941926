//! Test helper: joins a cgroup and a network namespace, then performs socket operations
//! read from stdin (one per line) and prints what the kernel answered, one line each:
//! `OK`, `EPERM`, or `ERR <errno>`.
//!
//! Operations: `tcp ADDR PORT`, `udp-connect ADDR PORT`, `udp-sendto ADDR PORT`,
//! `tcp-fastopen ADDR PORT`, `fork-tcp ADDR PORT` (a forked child connects),
//! `tcp6-mapped A.B.C.D PORT` (AF_INET6 socket to ::ffff:A.B.C.D), `udp-flood ADDR PORT N`,
//! `tcp-from ADDR PORT SRC` (bound to SRC first), `udp-cmsg ADDR PORT` / `udp-gso ADDR PORT`
//! (connect, then sendmsg with no address and an ECN or GSO control message), `serve ADDR
//! PORT` (listens in the probe's cgroup and answers every connection with `pong`),
//! `join-cgroup DIR` (writes its own pid into DIR/cgroup.procs), `unix PATH` (connects a
//! stream Unix socket), `unlink PATH`,
//! `resolve-tcp NAME SERVER SERVER_PORT PORT`: asks SERVER for NAME's A record over UDP and
//! connects at once to the first address answered; prints `OK ADDR`, `EPERM ADDR`,
//! `ERR <errno> ADDR`, `QUERY <result>` (the query itself failed) or `NOANSWER`;
//! `tcp-resolve-tcp ...` does the same with the query over TCP (RFC 1035 framing).
//! ADDR may be IPv4 or IPv6.

#[path = "probe_parts/matrix.rs"]
mod matrix;

use std::{
    io::{BufRead, Write},
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd,
};

use mcp_guard_tests::sockaddr;

fn result(rc: isize) -> String {
    if rc >= 0 {
        return "OK".into();
    }
    let e = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
    if e == libc::EPERM {
        "EPERM".into()
    } else {
        format!("ERR {e}")
    }
}

fn socket(family: i32, ty: i32) -> i32 {
    // SAFETY: plain syscall.
    let fd = unsafe { libc::socket(family, ty | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    // A connect whose SYN a backstop drops (an address expiring between the connect
    // hook and the first packet) gives up after 10 s ("ERR 115") instead of the kernel's
    // two minutes of retransmissions; every peer here is local and answers at once.
    let t = libc::timeval {
        tv_sec: 10,
        tv_usec: 0,
    };
    // SAFETY: setsockopt with a valid timeval.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            (&raw const t).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    fd
}

/// The socket `udp-connect-hold` keeps.
static HELD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

/// sendmsg() with no address on connected socket `fd`, carrying one control message:
/// IP_TOS / IPV6_TCLASS (ECN), or UDP_SEGMENT (GSO, a 1200-byte payload in 600-byte
/// segments).
fn send_with_cmsg(fd: i32, v4: bool, gso: bool) -> String {
    let payload = [b'q'; 1200];
    let (level, ty, value): (i32, i32, Vec<u8>) = if gso {
        (
            libc::SOL_UDP,
            libc::UDP_SEGMENT,
            600u16.to_ne_bytes().to_vec(),
        )
    } else if v4 {
        (libc::IPPROTO_IP, libc::IP_TOS, 2i32.to_ne_bytes().to_vec())
    } else {
        (
            libc::IPPROTO_IPV6,
            libc::IPV6_TCLASS,
            2i32.to_ne_bytes().to_vec(),
        )
    };
    // SAFETY: CMSG_SPACE/CMSG_LEN are pure arithmetic.
    let space = unsafe { libc::CMSG_SPACE(value.len() as u32) } as usize;
    let mut control = vec![0u8; space];
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr() as *mut libc::c_void,
        iov_len: if gso { payload.len() } else { 100 },
    };
    // SAFETY: a zeroed msghdr is valid; every pointer set below outlives the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space;
    // SAFETY: the control buffer holds one header of this size.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&raw const msg);
        (*c).cmsg_level = level;
        (*c).cmsg_type = ty;
        (*c).cmsg_len = libc::CMSG_LEN(value.len() as u32) as usize;
        std::ptr::copy_nonoverlapping(value.as_ptr(), libc::CMSG_DATA(c), value.len());
    }
    // SAFETY: a valid fd and msghdr.
    result(unsafe { libc::sendmsg(fd, &raw const msg, 0) })
}

fn family(sa: &SocketAddr) -> i32 {
    if sa.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    }
}

fn op(kind: &str, sa: SocketAddr, count: u64, from: Option<IpAddr>) -> String {
    let (st, len) = sockaddr(sa);
    let p = (&raw const st).cast::<libc::sockaddr>();
    // SAFETY (all blocks below): syscalls with valid fds and a valid sockaddr.
    match kind {
        "tcp" | "udp-connect" => {
            let fd = socket(
                family(&sa),
                if kind == "tcp" {
                    libc::SOCK_STREAM
                } else {
                    libc::SOCK_DGRAM
                },
            );
            let r = result(unsafe { libc::connect(fd, p, len) } as isize);
            unsafe { libc::close(fd) };
            r
        }
        "tcp-from" => {
            // Bind first, so the kernel knows the source address and port at connect().
            let Some(src) = from else {
                return "ERR tcp-from needs a source address".into();
            };
            let fd = socket(family(&sa), libc::SOCK_STREAM);
            let (bst, blen) = sockaddr(SocketAddr::new(src, 0));
            assert_eq!(
                unsafe { libc::bind(fd, (&raw const bst).cast(), blen) },
                0,
                "bind {src}"
            );
            let r = result(unsafe { libc::connect(fd, p, len) } as isize);
            unsafe { libc::close(fd) };
            r
        }
        "udp-cmsg" | "udp-gso" => {
            // A connected UDP socket's send with no address and a control message (ECN
            // marking, or GSO segmentation): what QUIC stacks send.
            let fd = socket(family(&sa), libc::SOCK_DGRAM);
            if unsafe { libc::connect(fd, p, len) } != 0 {
                let r = result(-1);
                unsafe { libc::close(fd) };
                return format!("CONNECT {r}");
            }
            let r = send_with_cmsg(fd, sa.is_ipv4(), kind == "udp-gso");
            unsafe { libc::close(fd) };
            r
        }
        "udp-connect-hold" => {
            // Connects a UDP socket and keeps it for `udp-cmsg-held` (across a reload).
            let fd = socket(family(&sa), libc::SOCK_DGRAM);
            let r = result(unsafe { libc::connect(fd, p, len) } as isize);
            HELD.store(fd, std::sync::atomic::Ordering::SeqCst);
            r
        }
        "udp-cmsg-held" => send_with_cmsg(
            HELD.load(std::sync::atomic::Ordering::SeqCst),
            sa.is_ipv4(),
            false,
        ),
        "serve" => {
            // Listens (in the probe's cgroup) and answers every connection with "pong",
            // after reading what the client sent first.
            let listener = match std::net::TcpListener::bind(sa) {
                Ok(l) => l,
                Err(e) => return format!("ERR {}", e.raw_os_error().unwrap_or(0)),
            };
            std::thread::spawn(move || {
                for mut s in listener.incoming().map_while(Result::ok) {
                    let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(2)));
                    let mut buf = [0u8; 64];
                    let _ = std::io::Read::read(&mut s, &mut buf);
                    let _ = s.write_all(b"pong\n");
                }
            });
            "OK".into()
        }
        "udp-sendto" => {
            let fd = socket(family(&sa), libc::SOCK_DGRAM);
            let r = result(unsafe { libc::sendto(fd, b"x".as_ptr().cast(), 1, 0, p, len) });
            unsafe { libc::close(fd) };
            r
        }
        "udp-flood" => {
            let fd = socket(family(&sa), libc::SOCK_DGRAM);
            let mut denied = 0u64;
            for _ in 0..count {
                if unsafe { libc::sendto(fd, b"x".as_ptr().cast(), 1, 0, p, len) } < 0 {
                    denied += 1;
                }
            }
            unsafe { libc::close(fd) };
            format!("DENIED {denied}")
        }
        "tcp-fastopen" => {
            let fd = socket(family(&sa), libc::SOCK_STREAM);
            let r = result(unsafe {
                libc::sendto(fd, b"x".as_ptr().cast(), 1, libc::MSG_FASTOPEN, p, len)
            });
            unsafe { libc::close(fd) };
            r
        }
        "tcp6-mapped" => {
            let IpAddr::V4(v4) = sa.ip() else {
                return "ERR bad-arg".into();
            };
            let mapped = SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), sa.port());
            let (st6, len6) = sockaddr(mapped);
            let fd = socket(libc::AF_INET6, libc::SOCK_STREAM);
            let r = result(unsafe { libc::connect(fd, (&raw const st6).cast(), len6) } as isize);
            unsafe { libc::close(fd) };
            r
        }
        "fork-tcp" => {
            let mut fds = [0i32; 2];
            assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                let r = op("tcp", sa, 0, None);
                unsafe {
                    libc::write(fds[1], r.as_ptr().cast(), r.len());
                    libc::_exit(0);
                }
            }
            unsafe { libc::close(fds[1]) };
            let mut buf = [0u8; 64];
            let n = unsafe { libc::read(fds[0], buf.as_mut_ptr().cast(), buf.len()) };
            unsafe {
                libc::waitpid(pid, std::ptr::null_mut(), 0);
                libc::close(fds[0]);
            }
            String::from_utf8_lossy(&buf[..n.max(0) as usize]).into_owned()
        }
        other => format!("ERR unknown-op {other}"),
    }
}

/// `sendto-cycle N PORT A,B,C...`: N rounds of one UDP sendto to each address; prints
/// `A=allowed/denied B=...` (denied = EPERM).
fn sendto_cycle(f: &[&str]) -> String {
    let rounds: u64 = f[1].parse().expect("rounds");
    let port: u16 = f[2].parse().expect("port");
    let addrs: Vec<SocketAddr> = f[3]
        .split(',')
        .map(|a| SocketAddr::new(a.parse().expect("address"), port))
        .collect();
    let fd = socket(libc::AF_INET6, libc::SOCK_DGRAM);
    let targets: Vec<_> = addrs
        .iter()
        .map(|a| match a {
            SocketAddr::V4(v4) => sockaddr(SocketAddr::new(
                IpAddr::V6(v4.ip().to_ipv6_mapped()),
                a.port(),
            )),
            SocketAddr::V6(_) => sockaddr(*a),
        })
        .collect();
    let mut counts = vec![(0u64, 0u64); addrs.len()];
    // Errors other than EPERM (denied) and ENETUNREACH (allowed: routing, not policy,
    // refused it) are reported apart, never mistaken for a verdict.
    let mut other: Vec<String> = Vec::new();
    for _ in 0..rounds {
        for (i, (st, len)) in targets.iter().enumerate() {
            // SAFETY: valid fd and sockaddr.
            let rc = unsafe {
                libc::sendto(
                    fd,
                    b"x".as_ptr().cast(),
                    1,
                    0,
                    (&raw const *st).cast(),
                    *len,
                )
            };
            let errno = if rc < 0 {
                std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
            } else {
                0
            };
            match errno {
                libc::EPERM => counts[i].1 += 1,
                0 | libc::ENETUNREACH => counts[i].0 += 1,
                e => {
                    if other.len() < 5 {
                        other.push(format!("{}:{e}", addrs[i].ip()));
                    }
                }
            }
        }
    }
    // SAFETY: our fd.
    unsafe { libc::close(fd) };
    let mut out = addrs
        .iter()
        .zip(counts)
        .map(|(a, (ok, no))| format!("{}={ok}/{no}", a.ip()))
        .collect::<Vec<_>>()
        .join(" ");
    if !other.is_empty() {
        out.push_str(&format!(" OTHER {}", other.join(",")));
    }
    out
}

/// `tcp-loop ADDR PORT MILLIS`: connect() over and over for MILLIS ms; prints
/// `ALLOWED a DENIED d OTHER o` (allowed = connected).
fn tcp_loop(f: &[&str]) -> String {
    let sa = SocketAddr::new(f[1].parse().expect("address"), f[2].parse().expect("port"));
    let until =
        std::time::Instant::now() + std::time::Duration::from_millis(f[3].parse().expect("millis"));
    // An optional pause between attempts (milliseconds) keeps a long loop to an
    // allowed destination from running out of ephemeral ports.
    let gap = std::time::Duration::from_millis(f.get(4).and_then(|g| g.parse().ok()).unwrap_or(0));
    let (mut ok, mut denied, mut other) = (0u64, 0u64, 0u64);
    while std::time::Instant::now() < until {
        match op("tcp", sa, 1, None).as_str() {
            "OK" => ok += 1,
            "EPERM" => denied += 1,
            _ => other += 1,
        }
        std::thread::sleep(gap);
    }
    format!("ALLOWED {ok} DENIED {denied} OTHER {other}")
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for c in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Below the socket hooks:
/// `socket raw4|raw6|packet` creates such a socket;
/// `raw-icmp A.B.C.D` sends an ICMP echo on a raw socket and waits 1 s for the reply
/// (REPLY / NOREPLY);
/// `raw-udp SRC DST PORT` sends a hand-built IPv4/UDP packet on an IPPROTO_RAW socket.
fn below_sockets(f: &[&str]) -> Option<String> {
    // SAFETY (all blocks): syscalls with valid fds and buffers.
    match *f.first()? {
        "join-cgroup" => {
            // Writes this process's pid into DIR/cgroup.procs (leaving its cgroup).
            let dir = f.get(1)?;
            Some(
                match std::fs::write(
                    format!("{dir}/cgroup.procs"),
                    std::process::id().to_string(),
                ) {
                    Ok(()) => "OK".into(),
                    Err(e) => format!("ERR {}", e.raw_os_error().unwrap_or(0)),
                },
            )
        }
        "unshare-cgroupns" => {
            // A cgroup namespace of its own: its cgroup looks like the root from inside.
            // SAFETY: a plain syscall.
            Some(result(
                unsafe { libc::unshare(libc::CLONE_NEWCGROUP) } as isize
            ))
        }
        "clone-into-tcp" => {
            // clone-into-tcp DIR ADDR PORT: clone3(CLONE_INTO_CGROUP) a child created
            // directly in DIR (never in this process's cgroup), which connects to ADDR:PORT.
            let dir = f.get(1)?;
            let sa = SocketAddr::new(f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?);
            let cg = std::fs::File::open(dir).ok()?;
            let mut fds = [0i32; 2];
            // SAFETY (this block): pipe, clone3 with a zeroed argument struct, waitpid.
            unsafe {
                assert_eq!(libc::pipe(fds.as_mut_ptr()), 0);
                let mut args = [0u64; 11];
                args[0] = 0x2_0000_0000; // CLONE_INTO_CGROUP
                args[4] = libc::SIGCHLD as u64; // exit_signal
                args[10] = std::os::fd::AsRawFd::as_raw_fd(&cg) as u64; // cgroup
                let pid = libc::syscall(libc::SYS_clone3, args.as_mut_ptr(), 88usize);
                if pid < 0 {
                    return Some(format!("ERR clone3 {}", std::io::Error::last_os_error()));
                }
                if pid == 0 {
                    let r = op("tcp", sa, 0, None);
                    libc::write(fds[1], r.as_ptr().cast(), r.len());
                    libc::_exit(0);
                }
                libc::close(fds[1]);
                let mut buf = [0u8; 64];
                let n = libc::read(fds[0], buf.as_mut_ptr().cast(), buf.len());
                libc::waitpid(pid as i32, std::ptr::null_mut(), 0);
                libc::close(fds[0]);
                Some(String::from_utf8_lossy(&buf[..n.max(0) as usize]).into_owned())
            }
        }
        "unix" | "unix-dgram" => {
            // Connects a stream Unix socket to PATH (@NAME: an abstract one), or sends
            // one datagram to it with sendto().
            use std::os::{linux::net::SocketAddrExt as _, unix::net};
            let path = f.get(1)?;
            let addr = match path.strip_prefix('@') {
                Some(name) => net::SocketAddr::from_abstract_name(name.as_bytes()),
                None => net::SocketAddr::from_pathname(path),
            };
            let r = addr.and_then(|a| {
                if f[0] == "unix" {
                    net::UnixStream::connect_addr(&a).map(|_| ())
                } else {
                    net::UnixDatagram::unbound()?
                        .send_to_addr(b"x", &a)
                        .map(|_| ())
                }
            });
            Some(match r {
                Ok(()) => "OK".into(),
                Err(e) => format!("ERR {}", e.raw_os_error().unwrap_or(0)),
            })
        }
        "unlink" => {
            let path = f.get(1)?;
            Some(match std::fs::remove_file(path) {
                Ok(()) => "OK".into(),
                Err(e) => format!("ERR {}", e.raw_os_error().unwrap_or(0)),
            })
        }
        "socket" => {
            let (family, ty, proto) = match *f.get(1)? {
                "raw4" => (libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP),
                "raw6" => (libc::AF_INET6, libc::SOCK_RAW, libc::IPPROTO_ICMPV6),
                "packet" => (
                    libc::AF_PACKET,
                    libc::SOCK_RAW,
                    i32::from((libc::ETH_P_ALL as u16).to_be()),
                ),
                "ping4" => (libc::AF_INET, libc::SOCK_DGRAM, libc::IPPROTO_ICMP),
                "ping6" => (libc::AF_INET6, libc::SOCK_DGRAM, libc::IPPROTO_ICMPV6),
                "udplite4" => (libc::AF_INET, libc::SOCK_DGRAM, libc::IPPROTO_UDPLITE),
                "sctp4" => (libc::AF_INET, libc::SOCK_STREAM, libc::IPPROTO_SCTP),
                "tcp4" => (libc::AF_INET, libc::SOCK_STREAM, 0),
                "udp6" => (libc::AF_INET6, libc::SOCK_DGRAM, 0),
                "mptcp4" => (libc::AF_INET, libc::SOCK_STREAM, libc::IPPROTO_MPTCP),
                "xdp" => (libc::AF_XDP, libc::SOCK_RAW, 0),
                "vsock" => (libc::AF_VSOCK, libc::SOCK_STREAM, 0),
                // socket FAMILY TYPE PROTO, numbers.
                other => match (
                    other.parse(),
                    f.get(2).and_then(|t| t.parse().ok()),
                    f.get(3).and_then(|p| p.parse().ok()),
                ) {
                    (Ok(fam), Some(ty), Some(proto)) => (fam, ty, proto),
                    _ => return Some("ERR bad-kind".into()),
                },
            };
            let fd = unsafe { libc::socket(family, ty, proto) };
            let r = result(fd as isize);
            if fd >= 0 {
                unsafe { libc::close(fd) };
            }
            Some(r)
        }
        "load-module" => {
            // finit_module on /dev/null: refused with EPERM without CAP_SYS_MODULE (with
            // it, the kernel gets as far as reading the empty "module").
            let f = std::fs::File::open("/dev/null").ok()?;
            // SAFETY: a plain syscall with a valid fd and an empty C string.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_finit_module,
                    std::os::fd::AsRawFd::as_raw_fd(&f),
                    c"".as_ptr(),
                    0,
                )
            };
            Some(result(rc as isize))
        }
        "ptrace" => {
            // ptrace PID: PTRACE_SEIZE another process, then let it go.
            let pid: i32 = f.get(1)?.parse().ok()?;
            // SAFETY: plain ptrace calls on a pid.
            let rc = unsafe { libc::ptrace(libc::PTRACE_SEIZE, pid, 0, 0) };
            let r = result(rc as isize);
            if rc == 0 {
                // A seized tracee must be stopped to be detached; otherwise it stays
                // traced and its parent cannot reap it.
                unsafe {
                    libc::ptrace(libc::PTRACE_INTERRUPT, pid, 0, 0);
                    libc::waitpid(pid, std::ptr::null_mut(), libc::__WALL);
                    libc::ptrace(libc::PTRACE_DETACH, pid, 0, 0);
                }
            }
            Some(r)
        }
        "ids" => {
            // Real, effective, saved and filesystem user and group ids, and the groups.
            let status = std::fs::read_to_string("/proc/self/status").ok()?;
            let pick = |k: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(k))
                    .map_or("?".to_string(), |v| {
                        v.split_whitespace().collect::<Vec<_>>().join(",")
                    })
            };
            Some(format!(
                "uid={} gid={} groups={}",
                pick("Uid:"),
                pick("Gid:"),
                pick("Groups:")
            ))
        }
        "caps" => {
            // The capability sets of this process, as /proc shows them.
            let status = std::fs::read_to_string("/proc/self/status").ok()?;
            let pick = |k: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(k))
                    .map_or("?", str::trim)
                    .to_string()
            };
            Some(format!(
                "bnd={} eff={} inh={} nnp={}",
                pick("CapBnd:"),
                pick("CapEff:"),
                pick("CapInh:"),
                pick("NoNewPrivs:")
            ))
        }
        "io_uring" => {
            // io_uring_setup(1, params): a ring can create sockets where seccomp never looks.
            let mut params = [0u8; 120];
            let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 1u32, params.as_mut_ptr()) };
            let r = result(fd as isize);
            if fd >= 0 {
                unsafe { libc::close(fd as i32) };
            }
            Some(r)
        }
        "raw-icmp" => {
            let dst: std::net::Ipv4Addr = f.get(1)?.parse().ok()?;
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP) };
            if fd < 0 {
                return Some(result(-1));
            }
            let mut pkt = [8u8, 0, 0, 0, 0x12, 0x34, 0, 1, b'm', b'c', b'p', b'g'];
            let c = checksum(&pkt);
            pkt[2..4].copy_from_slice(&c.to_be_bytes());
            let (st, len) = sockaddr(SocketAddr::new(IpAddr::V4(dst), 0));
            let sent = unsafe {
                libc::sendto(
                    fd,
                    pkt.as_ptr().cast(),
                    pkt.len(),
                    0,
                    (&raw const st).cast(),
                    len,
                )
            };
            if sent < 0 {
                let r = result(-1);
                unsafe { libc::close(fd) };
                return Some(r);
            }
            let tv = libc::timeval {
                tv_sec: 1,
                tv_usec: 0,
            };
            unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&raw const tv).cast(),
                    size_of::<libc::timeval>() as u32,
                )
            };
            let mut buf = [0u8; 256];
            let until = std::time::Instant::now() + std::time::Duration::from_secs(1);
            let mut reply = false;
            while std::time::Instant::now() < until {
                let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n < 0 {
                    break;
                }
                let ihl = usize::from(buf[0] & 0x0f) * 4;
                // An echo reply (type 0) from dst with our identifier.
                if n as usize > ihl + 8
                    && buf[ihl] == 0
                    && buf[12..16] == dst.octets()
                    && buf[ihl + 4..ihl + 6] == [0x12, 0x34]
                {
                    reply = true;
                    break;
                }
            }
            unsafe { libc::close(fd) };
            Some(if reply {
                "REPLY".into()
            } else {
                "NOREPLY".into()
            })
        }
        "raw-udp" => {
            let src: std::net::Ipv4Addr = f.get(1)?.parse().ok()?;
            let dst: std::net::Ipv4Addr = f.get(2)?.parse().ok()?;
            let port: u16 = f.get(3)?.parse().ok()?;
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
            if fd < 0 {
                return Some(result(-1));
            }
            let payload = b"hand-built";
            let total = 20 + 8 + payload.len();
            let mut p = vec![0u8; total];
            p[0] = 0x45;
            p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
            p[8] = 64;
            p[9] = 17;
            p[12..16].copy_from_slice(&src.octets());
            p[16..20].copy_from_slice(&dst.octets());
            let c = checksum(&p[..20]);
            p[10..12].copy_from_slice(&c.to_be_bytes());
            p[20..22].copy_from_slice(&40000u16.to_be_bytes());
            p[22..24].copy_from_slice(&port.to_be_bytes());
            p[24..26].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
            p[28..].copy_from_slice(payload);
            let (st, len) = sockaddr(SocketAddr::new(IpAddr::V4(dst), 0));
            let sent = unsafe {
                libc::sendto(
                    fd,
                    p.as_ptr().cast(),
                    p.len(),
                    0,
                    (&raw const st).cast(),
                    len,
                )
            };
            unsafe { libc::close(fd) };
            Some(if sent < 0 { result(-1) } else { "SENT".into() })
        }
        _ => None,
    }
}

/// `recreate-race DIR N ADDR:PORT`: N times, removes the cgroup DIR, creates it again
/// and at once forks a child that joins it and connects to ADDR:PORT (the window a
/// workload's cgroup has between its mkdir and its registration). Prints how the
/// connects ended: `reached=R refused=E other=O`.
fn recreate_race(f: &[&str]) -> String {
    let (Some(dir), Some(n), Some(sa)) = (
        f.get(1),
        f.get(2).and_then(|n| n.parse::<u32>().ok()),
        f.get(3).and_then(|a| a.parse::<SocketAddr>().ok()),
    ) else {
        return "ERR usage: recreate-race DIR N ADDR:PORT".into();
    };
    let dir_c = std::ffi::CString::new(*dir).expect("path");
    let procs = std::ffi::CString::new(format!("{dir}/cgroup.procs")).expect("path");
    let (st, len) = sockaddr(sa);
    let (mut reached, mut refused, mut other) = (0, 0, 0);
    for _ in 0..n {
        // SAFETY: plain syscalls on valid C strings.
        unsafe {
            if libc::rmdir(dir_c.as_ptr()) != 0
                && std::io::Error::last_os_error().raw_os_error() != Some(libc::ENOENT)
            {
                return format!("ERR rmdir {dir}: {}", std::io::Error::last_os_error());
            }
            if libc::mkdir(dir_c.as_ptr(), 0o755) != 0 {
                return format!("ERR mkdir {dir}: {}", std::io::Error::last_os_error());
            }
        }
        // SAFETY: the child only makes syscalls on data prepared before the fork.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            unsafe {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    libc::_exit(3);
                }
                libc::close(fd);
                let s = libc::socket(family(&sa), libc::SOCK_STREAM, 0);
                let rc = libc::connect(s, (&raw const st).cast(), len);
                let code = if rc == 0 {
                    0
                } else if std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM) {
                    1
                } else {
                    2
                };
                libc::_exit(code);
            }
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &raw mut status, 0) };
        match libc::WEXITSTATUS(status) {
            0 => reached += 1,
            1 => refused += 1,
            _ => other += 1,
        }
    }
    // SAFETY: as above; the last child is gone, so the cgroup is empty.
    unsafe { libc::rmdir(dir_c.as_ptr()) };
    format!("reached={reached} refused={refused} other={other}")
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i + 1 < args.len() {
        match args[i].as_str() {
            "--cgroup" => std::fs::write(
                format!("{}/cgroup.procs", args[i + 1]),
                std::process::id().to_string(),
            )
            .unwrap_or_else(|e| panic!("joining cgroup {}: {e}", args[i + 1])),
            "--netns" => {
                let f = std::fs::File::open(&args[i + 1])
                    .unwrap_or_else(|e| panic!("{}: {e}", args[i + 1]));
                // SAFETY: valid fd of a netns file.
                assert_eq!(
                    unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) },
                    0,
                    "setns: {}",
                    std::io::Error::last_os_error()
                );
            }
            other => panic!("unknown argument {other}"),
        }
        i += 2;
    }
    let stdin = std::io::stdin();
    let mut out = std::io::stdout().lock();
    // Connections kept open across lines (`hold`, `hold-send`).
    let mut held: Vec<std::net::TcpStream> = Vec::new();
    for line in stdin.lock().lines() {
        let line = line.expect("stdin");
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.first() == Some(&"hold") || f.first() == Some(&"hold-send") {
            writeln!(out, "{}", hold_op(&f, &mut held)).expect("stdout");
            out.flush().expect("stdout");
            continue;
        }
        if f.first() == Some(&"recreate-race") {
            writeln!(out, "{}", recreate_race(&f)).expect("stdout");
            out.flush().expect("stdout");
            continue;
        }
        if f.first() == Some(&"packet-send") {
            writeln!(out, "{}", matrix::packet_send(&f)).expect("stdout");
            out.flush().expect("stdout");
            continue;
        }
        if f.first() == Some(&"matrix") {
            writeln!(out, "{}", matrix::run(&f)).expect("stdout");
            out.flush().expect("stdout");
            continue;
        }
        if f.first() == Some(&"ping") {
            writeln!(out, "{}", ping(&f)).expect("stdout");
            out.flush().expect("stdout");
            continue;
        }
        if f.first() == Some(&"sendto-cycle") {
            writeln!(out, "{}", sendto_cycle(&f)).expect("stdout");
            out.flush().expect("stdout");
            continue;
        }
        if let Some(r) = below_sockets(&f) {
            writeln!(out, "{r}").expect("stdout");
            out.flush().expect("stdout");
            continue;
        }
        if f.first() == Some(&"resolve-tcp") || f.first() == Some(&"tcp-resolve-tcp") {
            writeln!(out, "{}", resolve_tcp(&f)).expect("stdout");
            out.flush().expect("stdout");
            continue;
        }
        if f.first() == Some(&"dns") || f.first() == Some(&"dns-flood") {
            writeln!(out, "{}", dns_op(&f)).expect("stdout");
            out.flush().expect("stdout");
            continue;
        }
        if f.first() == Some(&"tcp-loop") {
            writeln!(out, "{}", tcp_loop(&f)).expect("stdout");
            out.flush().expect("stdout");
            continue;
        }
        if f.len() < 3 {
            continue;
        }
        let ip: IpAddr = f[1]
            .parse()
            .unwrap_or_else(|_| panic!("bad address {}", f[1]));
        let port: u16 = f[2].parse().expect("port");
        let count = f.get(3).and_then(|c| c.parse().ok()).unwrap_or(1);
        let from = f.get(3).and_then(|c| c.parse().ok());
        writeln!(out, "{}", op(f[0], SocketAddr::new(ip, port), count, from)).expect("stdout");
        out.flush().expect("stdout");
    }
}

/// Skips a (possibly compressed) name starting at `at`.
fn skip_name(m: &[u8], mut at: usize) -> Option<usize> {
    loop {
        let len = *m.get(at)?;
        if len == 0 {
            return Some(at + 1);
        }
        if len & 0xc0 == 0xc0 {
            return Some(at + 2);
        }
        at += usize::from(len) + 1;
    }
}

/// The first A record in an answer.
fn first_a(m: &[u8]) -> Option<std::net::Ipv4Addr> {
    let answers = u16::from_be_bytes([*m.get(6)?, *m.get(7)?]);
    let mut at = skip_name(m, 12)? + 4;
    for _ in 0..answers {
        at = skip_name(m, at)?;
        let ty = u16::from_be_bytes([*m.get(at)?, *m.get(at + 1)?]);
        let len = usize::from(u16::from_be_bytes([*m.get(at + 8)?, *m.get(at + 9)?]));
        at += 10;
        if ty == 1 && len == 4 {
            return Some(std::net::Ipv4Addr::new(
                m[at],
                m[at + 1],
                m[at + 2],
                m[at + 3],
            ));
        }
        at += len;
    }
    None
}

fn resolve_tcp(f: &[&str]) -> String {
    let (Some(name), Some(server), Some(sport), Some(port)) =
        (f.get(1), f.get(2), f.get(3), f.get(4))
    else {
        return "ERR usage: resolve-tcp NAME SERVER SERVER_PORT PORT".into();
    };
    let server: SocketAddr = SocketAddr::new(
        server.parse().expect("server"),
        sport.parse().expect("port"),
    );
    let port: u16 = port.parse().expect("port");
    let id = (std::process::id() as u16) ^ 0x5a5a;
    let query = mcp_guard_tests::dns_query(name, id);
    let answer = if f[0] == "tcp-resolve-tcp" {
        ask_tcp(&query, server)
    } else {
        ask_udp(&query, server)
    };
    let answer = match answer {
        Ok(a) => a,
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => return "QUERY EPERM".into(),
        Err(e) => return format!("QUERY {e}"),
    };
    let Some(addr) = first_a(&answer) else {
        return "NOANSWER".into();
    };
    // At once: the answer must already be enforceable when the workload receives it.
    let r = op("tcp", SocketAddr::new(IpAddr::V4(addr), port), 1, None);
    format!("{r} {addr}")
}

fn ask_udp(query: &[u8], server: SocketAddr) -> std::io::Result<Vec<u8>> {
    let sock = std::net::UdpSocket::bind("0.0.0.0:0")?;
    sock.set_read_timeout(Some(std::time::Duration::from_secs(3)))?;
    sock.send_to(query, server)?;
    let mut buf = [0u8; 1500];
    let n = sock.recv(&mut buf)?;
    Ok(buf[..n].to_vec())
}

fn ask_tcp(query: &[u8], server: SocketAddr) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect_timeout(&server, std::time::Duration::from_secs(3))?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(3)))?;
    let mut out = (query.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(query);
    s.write_all(&out)?;
    let mut len = [0u8; 2];
    s.read_exact(&mut len)?;
    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
    s.read_exact(&mut buf)?;
    Ok(buf)
}

fn qtype(name: &str) -> u16 {
    match name {
        "A" => 1,
        "CNAME" => 5,
        "MX" => 15,
        "TXT" => 16,
        "AAAA" => 28,
        "ANY" => 255,
        other => other.parse().expect("record type"),
    }
}

/// An answer in short: rcode, its first A or AAAA address, the lowest answer TTL, the
/// number of answers.
fn summary(m: &[u8]) -> String {
    if m.len() < 12 {
        return "SHORT".into();
    }
    let rcode = m[3] & 0x0f;
    let answers = u16::from_be_bytes([m[6], m[7]]);
    let mut addr = "-".to_string();
    let mut ttl: Option<u32> = None;
    let mut at = match skip_name(m, 12) {
        Some(a) => a + 4,
        None => return format!("RCODE={rcode} BAD"),
    };
    for _ in 0..answers {
        let Some(a) = skip_name(m, at) else { break };
        at = a;
        if at + 10 > m.len() {
            break;
        }
        let ty = u16::from_be_bytes([m[at], m[at + 1]]);
        let t = u32::from_be_bytes([m[at + 4], m[at + 5], m[at + 6], m[at + 7]]);
        let len = usize::from(u16::from_be_bytes([m[at + 8], m[at + 9]]));
        at += 10;
        ttl = Some(ttl.map_or(t, |x| x.min(t)));
        if addr == "-" && ty == 1 && len == 4 && at + 4 <= m.len() {
            addr = std::net::Ipv4Addr::new(m[at], m[at + 1], m[at + 2], m[at + 3]).to_string();
        } else if addr == "-" && ty == 28 && len == 16 && at + 16 <= m.len() {
            let b: [u8; 16] = m[at..at + 16].try_into().expect("16");
            addr = std::net::Ipv6Addr::from(b).to_string();
        }
        at += len;
    }
    let ttl = ttl.map_or_else(|| "-".to_string(), |t| t.to_string());
    format!("RCODE={rcode} ADDR={addr} TTL={ttl} ANSWERS={answers}")
}

/// `dns NAME TYPE SERVER PORT udp|tcp`: one query, the answer in short.
/// `dns-flood COUNT PREFIX SUFFIX SERVER PORT`: COUNT UDP queries for PREFIX<i>.SUFFIX
/// sent at once from one socket, then the answers counted by rcode for 3 seconds.
fn dns_op(f: &[&str]) -> String {
    if f[0] == "dns" {
        let (Some(name), Some(ty), Some(server), Some(port), Some(proto)) =
            (f.get(1), f.get(2), f.get(3), f.get(4), f.get(5))
        else {
            return "ERR usage: dns NAME TYPE SERVER PORT udp|tcp".into();
        };
        let server = SocketAddr::new(server.parse().expect("server"), port.parse().expect("port"));
        let id = (std::process::id() as u16) ^ 0x1234;
        let q = mcp_guard_tests::dns_query_type(name, id, qtype(ty));
        let answer = if *proto == "tcp" {
            ask_tcp(&q, server)
        } else {
            ask_udp(&q, server)
        };
        return match answer {
            Ok(a) if a.len() >= 2 && a[..2] == q[..2] => summary(&a),
            Ok(_) => "WRONG-ID".into(),
            Err(e) => format!("QUERY {e}"),
        };
    }
    let (Some(count), Some(prefix), Some(suffix), Some(server), Some(port)) =
        (f.get(1), f.get(2), f.get(3), f.get(4), f.get(5))
    else {
        return "ERR usage: dns-flood COUNT PREFIX SUFFIX SERVER PORT".into();
    };
    let count: u16 = count.parse().expect("count");
    let server = SocketAddr::new(server.parse().expect("server"), port.parse().expect("port"));
    let sock = std::net::UdpSocket::bind("0.0.0.0:0").expect("bind");
    for i in 0..count {
        let q = mcp_guard_tests::dns_query(&format!("{prefix}{i}.{suffix}"), i);
        if let Err(e) = sock.send_to(&q, server) {
            return format!("SEND {e}");
        }
    }
    sock.set_read_timeout(Some(std::time::Duration::from_millis(300)))
        .expect("timeout");
    let mut by_rcode = std::collections::BTreeMap::<u8, u32>::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    let mut buf = [0u8; 1500];
    while std::time::Instant::now() < deadline {
        match sock.recv(&mut buf) {
            Ok(n) if n >= 12 => *by_rcode.entry(buf[3] & 0x0f).or_default() += 1,
            Ok(_) => {}
            Err(_) => {
                if by_rcode.values().sum::<u32>() >= u32::from(count) {
                    break;
                }
            }
        }
    }
    let parts: Vec<String> = by_rcode.iter().map(|(r, n)| format!("{r}:{n}")).collect();
    format!("SENT {count} ANSWERED {}", parts.join(","))
}

/// `hold ADDR PORT`: connects and keeps the connection, prints `OK N` (its index).
/// `hold-send N BYTES`: writes BYTES bytes on held connection N, prints `OK` or the error.
fn hold_op(f: &[&str], held: &mut Vec<std::net::TcpStream>) -> String {
    use std::io::Write as _;
    if f[0] == "hold" {
        let sa = SocketAddr::new(f[1].parse().expect("address"), f[2].parse().expect("port"));
        return match std::net::TcpStream::connect_timeout(&sa, std::time::Duration::from_secs(2)) {
            Ok(s) => {
                held.push(s);
                format!("OK {}", held.len() - 1)
            }
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => "EPERM".into(),
            Err(e) => format!("ERR {}", e.raw_os_error().unwrap_or(0)),
        };
    }
    let n: usize = f[1].parse().expect("index");
    let bytes: usize = f[2].parse().expect("bytes");
    let Some(s) = held.get_mut(n) else {
        return "ERR no-such-connection".into();
    };
    match s.write_all(&vec![b'x'; bytes]) {
        Ok(()) => "OK".into(),
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => "EPERM".into(),
        Err(e) => format!("ERR {}", e.raw_os_error().unwrap_or(0)),
    }
}

/// `ping ADDR`: one ICMP echo over an ICMP datagram ("ping") socket, IPv4 or IPv6;
/// prints `REPLY`, `NOREPLY`, or the socket or sendto error.
fn ping(f: &[&str]) -> String {
    let Some(Ok(ip)) = f.get(1).map(|a| a.parse::<IpAddr>()) else {
        return "ERR usage: ping ADDR".into();
    };
    let (family, proto, ty) = match ip {
        IpAddr::V4(_) => (libc::AF_INET, libc::IPPROTO_ICMP, 8u8),
        IpAddr::V6(_) => (libc::AF_INET6, libc::IPPROTO_ICMPV6, 128u8),
    };
    // SAFETY (all blocks): syscalls with valid fds and buffers.
    let fd = unsafe { libc::socket(family, libc::SOCK_DGRAM, proto) };
    if fd < 0 {
        return result(-1);
    }
    let tv = libc::timeval {
        tv_sec: 1,
        tv_usec: 0,
    };
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast(),
            size_of::<libc::timeval>() as u32,
        )
    };
    // The kernel fills in the identifier and (for ICMPv4) the checksum.
    let pkt = [ty, 0, 0, 0, 0, 0, 0, 1, b'm', b'c', b'p', b'g'];
    let (st, len) = sockaddr(SocketAddr::new(ip, 0));
    let sent = unsafe {
        libc::sendto(
            fd,
            pkt.as_ptr().cast(),
            pkt.len(),
            0,
            (&raw const st).cast(),
            len,
        )
    };
    if sent < 0 {
        let r = result(-1);
        unsafe { libc::close(fd) };
        return r;
    }
    let mut buf = [0u8; 256];
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
    unsafe { libc::close(fd) };
    if n > 0 {
        "REPLY".into()
    } else {
        "NOREPLY".into()
    }
}
