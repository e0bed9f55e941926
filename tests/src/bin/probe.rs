//! Test helper: joins a cgroup and a network namespace, then performs socket operations
//! read from stdin (one per line) and prints what the kernel answered, one line each:
//! `OK`, `EPERM`, or `ERR <errno>`.
//!
//! Operations: `tcp ADDR PORT`, `udp-connect ADDR PORT`, `udp-sendto ADDR PORT`,
//! `tcp-fastopen ADDR PORT`, `fork-tcp ADDR PORT` (a forked child connects),
//! `tcp6-mapped A.B.C.D PORT` (AF_INET6 socket to ::ffff:A.B.C.D), `udp-flood ADDR PORT N`,
//! `tcp-from ADDR PORT SRC` (bound to SRC first).
//! ADDR may be IPv4 or IPv6.

use std::{
    io::{BufRead, Write},
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd,
};

fn sockaddr(sa: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: zeroed sockaddr_storage is a valid value; we fill the right variant.
    let mut st: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match sa {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in fits in sockaddr_storage.
            unsafe { std::ptr::write((&raw mut st).cast(), sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as u16,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: sockaddr_in6 fits in sockaddr_storage.
            unsafe { std::ptr::write((&raw mut st).cast(), sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (st, len as libc::socklen_t)
}

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
    fd
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
            let denied =
                rc < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
            if denied {
                counts[i].1 += 1
            } else {
                counts[i].0 += 1
            }
        }
    }
    // SAFETY: our fd.
    unsafe { libc::close(fd) };
    addrs
        .iter()
        .zip(counts)
        .map(|(a, (ok, no))| format!("{}={ok}/{no}", a.ip()))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `tcp-loop ADDR PORT MILLIS`: connect() over and over for MILLIS ms; prints
/// `ALLOWED a DENIED d OTHER o` (allowed = connected).
fn tcp_loop(f: &[&str]) -> String {
    let sa = SocketAddr::new(f[1].parse().expect("address"), f[2].parse().expect("port"));
    let until =
        std::time::Instant::now() + std::time::Duration::from_millis(f[3].parse().expect("millis"));
    let (mut ok, mut denied, mut other) = (0u64, 0u64, 0u64);
    while std::time::Instant::now() < until {
        match op("tcp", sa, 1, None).as_str() {
            "OK" => ok += 1,
            "EPERM" => denied += 1,
            _ => other += 1,
        }
    }
    format!("ALLOWED {ok} DENIED {denied} OTHER {other}")
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
    for line in stdin.lock().lines() {
        let line = line.expect("stdin");
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.first() == Some(&"sendto-cycle") {
            writeln!(out, "{}", sendto_cycle(&f)).expect("stdout");
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
