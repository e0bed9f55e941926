//! The probe's `matrix` operation: one socket kind, every send path, to one destination.
//! `matrix FAMILY TYPE PROTO DST PORT` prints `SOCKET <result>` when the socket cannot be
//! created, else `cookie=C method=result ...` for the methods below, each on a socket of
//! its own (so that one method's connect does not change the next one's path):
//! connect-send, sendto (MSG_FASTOPEN on stream sockets), sendmsg, sendmsg-cmsg (with an
//! IP_PKTINFO / IPV6_PKTINFO control message), sendmmsg, uring-sendmsg (io_uring
//! IORING_OP_SENDMSG) and uring-connect-send (IORING_OP_CONNECT, then IORING_OP_SEND).

use std::net::{IpAddr, SocketAddr};

use io_uring::{opcode, types, IoUring};

use super::{result, sockaddr};

/// A payload the destination's protocol can carry: for IPPROTO_RAW on IPv4 (the caller
/// writes the IP header) a whole IPv4/UDP datagram to the destination, else 64 bytes.
fn payload(family: i32, proto: i32, dst: SocketAddr) -> Vec<u8> {
    if family == libc::AF_INET && proto == libc::IPPROTO_RAW {
        if let IpAddr::V4(d) = dst.ip() {
            let mut p = vec![0u8; 28 + 8];
            p[0] = 0x45;
            let total = p.len() as u16;
            p[2..4].copy_from_slice(&total.to_be_bytes());
            p[8] = 64;
            p[9] = 17;
            p[12..16].copy_from_slice(&[10, 0, 12, 99]);
            p[16..20].copy_from_slice(&d.octets());
            p[20..22].copy_from_slice(&40000u16.to_be_bytes());
            p[22..24].copy_from_slice(&dst.port().to_be_bytes());
            p[24..26].copy_from_slice(&16u16.to_be_bytes());
            return p;
        }
    }
    let mut p = vec![b'm'; 64];
    // ICMP echo request headers, so ping sockets accept it.
    if proto == libc::IPPROTO_ICMP {
        p[..8].copy_from_slice(&[8, 0, 0, 0, 0, 0, 0, 1]);
    } else if proto == libc::IPPROTO_ICMPV6 {
        p[..8].copy_from_slice(&[128, 0, 0, 0, 0, 0, 0, 1]);
    }
    p
}

fn cookie(fd: i32) -> u64 {
    let mut c = 0u64;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd and buffer.
    unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&raw mut c).cast(),
            &raw mut len,
        )
    };
    c
}

/// Runs `f` on a fresh socket; returns its result and the socket's cookie.
fn on_socket(family: i32, ty: i32, proto: i32, f: impl FnOnce(i32) -> isize) -> (String, u64) {
    // SAFETY (all blocks in this file): syscalls with valid fds and buffers.
    let fd = unsafe { libc::socket(family, ty | libc::SOCK_NONBLOCK, proto) };
    if fd < 0 {
        return (format!("SOCKET-{}", result(-1)), 0);
    }
    let c = cookie(fd);
    let rc = f(fd);
    let r = if rc == -2 {
        "N/A".to_string()
    } else {
        result(rc)
    };
    unsafe { libc::close(fd) };
    (r, c)
}

fn msghdr(
    name: &mut libc::sockaddr_storage,
    len: libc::socklen_t,
    iov: &mut libc::iovec,
) -> libc::msghdr {
    // SAFETY: zeroed msghdr is valid; fields set below.
    let mut m: libc::msghdr = unsafe { std::mem::zeroed() };
    m.msg_name = (name as *mut libc::sockaddr_storage).cast();
    m.msg_namelen = len;
    m.msg_iov = iov;
    m.msg_iovlen = 1;
    m
}

fn uring(f: impl FnOnce(&mut IoUring) -> std::io::Result<i32>) -> isize {
    let mut ring = match IoUring::new(8) {
        Ok(r) => r,
        Err(e) => {
            // SAFETY: sets errno for `result` to read.
            unsafe { *libc::__errno_location() = e.raw_os_error().unwrap_or(libc::EIO) };
            return -1;
        }
    };
    match f(&mut ring) {
        Ok(res) if res >= 0 => res as isize,
        Ok(res) => {
            // SAFETY: as above.
            unsafe { *libc::__errno_location() = -res };
            -1
        }
        Err(e) => {
            unsafe { *libc::__errno_location() = e.raw_os_error().unwrap_or(libc::EIO) };
            -1
        }
    }
}

fn submit(ring: &mut IoUring, e: io_uring::squeue::Entry) -> std::io::Result<i32> {
    // SAFETY: the buffers the entry points to outlive the wait below.
    unsafe {
        ring.submission()
            .push(&e)
            .map_err(|_| std::io::Error::other("sq full"))?
    };
    ring.submit_and_wait(1)?;
    let cqe = ring
        .completion()
        .next()
        .ok_or_else(|| std::io::Error::other("no cqe"))?;
    Ok(cqe.result())
}

/// `packet-send DST_IP PORT`: an AF_PACKET socket sends a hand-built Ethernet/IPv4/UDP
/// frame to DST_IP on `lo` (the frame any packet socket can put on a link). Prints
/// `SOCKET <result>` when the socket cannot be made, else the sendto result.
pub fn packet_send(f: &[&str]) -> String {
    let (Some(IpAddr::V4(dst)), Some(port)) = (
        f.get(1).and_then(|v| v.parse::<IpAddr>().ok()),
        f.get(2).and_then(|v| v.parse::<u16>().ok()),
    ) else {
        return "ERR usage: packet-send IPV4 PORT".into();
    };
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW,
            i32::from((libc::ETH_P_ALL as u16).to_be()),
        )
    };
    if fd < 0 {
        return format!("SOCKET {}", result(-1));
    }
    let ifindex = unsafe { libc::if_nametoindex(c"lo".as_ptr()) };
    let mut frame = vec![0u8; 14];
    frame[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    frame.extend_from_slice(&payload(
        libc::AF_INET,
        libc::IPPROTO_RAW,
        SocketAddr::new(IpAddr::V4(dst), port),
    ));
    // SAFETY: zeroed sockaddr_ll is valid; the fields set are those sendto reads.
    let mut ll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    ll.sll_family = libc::AF_PACKET as u16;
    ll.sll_ifindex = ifindex as i32;
    ll.sll_halen = 6;
    let rc = unsafe {
        libc::sendto(
            fd,
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&raw const ll).cast(),
            size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    let r = result(rc);
    unsafe { libc::close(fd) };
    r
}

pub fn run(f: &[&str]) -> String {
    let (Some(family), Some(ty), Some(proto), Some(dst), Some(port)) = (
        f.get(1).and_then(|v| v.parse::<i32>().ok()),
        f.get(2).and_then(|v| v.parse::<i32>().ok()),
        f.get(3).and_then(|v| v.parse::<i32>().ok()),
        f.get(4).and_then(|v| v.parse::<IpAddr>().ok()),
        f.get(5).and_then(|v| v.parse::<u16>().ok()),
    ) else {
        return "ERR usage: matrix FAMILY TYPE PROTO DST PORT".into();
    };
    // A socket of this kind at all?
    let probe = unsafe { libc::socket(family, ty, proto) };
    if probe < 0 {
        return format!("SOCKET {}", result(-1));
    }
    unsafe { libc::close(probe) };
    let dst = SocketAddr::new(dst, port);
    let data = payload(family, proto, dst);
    let stream = ty == libc::SOCK_STREAM || ty == libc::SOCK_SEQPACKET;
    let (st, len) = sockaddr(dst);
    let mut out = Vec::new();
    let mut cookies = Vec::new();
    let mut record = |name: &str, (r, c): (String, u64)| {
        out.push(format!("{name}={}", r.replace(' ', "_")));
        cookies.push(c);
    };
    record(
        "connect-send",
        on_socket(family, ty, proto, |fd| {
            let rc = unsafe { libc::connect(fd, (&raw const st).cast(), len) };
            let e = std::io::Error::last_os_error().raw_os_error();
            if rc < 0 && e != Some(libc::EINPROGRESS) {
                return -1;
            }
            if stream {
                // Give a non-blocking connect a moment; a refused one fails the send.
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            unsafe { libc::send(fd, data.as_ptr().cast(), data.len(), libc::MSG_NOSIGNAL) }
        }),
    );
    record(
        "sendto",
        on_socket(family, ty, proto, |fd| {
            let flags = if stream {
                libc::MSG_FASTOPEN | libc::MSG_NOSIGNAL
            } else {
                libc::MSG_NOSIGNAL
            };
            unsafe {
                libc::sendto(
                    fd,
                    data.as_ptr().cast(),
                    data.len(),
                    flags,
                    (&raw const st).cast(),
                    len,
                )
            }
        }),
    );
    record(
        "sendmsg",
        on_socket(family, ty, proto, |fd| {
            let mut name = st;
            let mut iov = libc::iovec {
                iov_base: data.as_ptr() as *mut _,
                iov_len: data.len(),
            };
            let m = msghdr(&mut name, len, &mut iov);
            unsafe { libc::sendmsg(fd, &m, libc::MSG_NOSIGNAL) }
        }),
    );
    record(
        "sendmsg-cmsg",
        on_socket(family, ty, proto, |fd| {
            if stream {
                return -2;
            }
            let mut name = st;
            let mut iov = libc::iovec {
                iov_base: data.as_ptr() as *mut _,
                iov_len: data.len(),
            };
            let mut m = msghdr(&mut name, len, &mut iov);
            let mut control = [0u8; 64];
            let (level, kind, size) = if family == libc::AF_INET6 {
                (
                    libc::IPPROTO_IPV6,
                    libc::IPV6_PKTINFO,
                    size_of::<libc::in6_pktinfo>(),
                )
            } else {
                (
                    libc::IPPROTO_IP,
                    libc::IP_PKTINFO,
                    size_of::<libc::in_pktinfo>(),
                )
            };
            m.msg_control = control.as_mut_ptr().cast();
            m.msg_controllen = unsafe { libc::CMSG_SPACE(size as u32) } as usize;
            unsafe {
                let c = libc::CMSG_FIRSTHDR(&m);
                (*c).cmsg_level = level;
                (*c).cmsg_type = kind;
                (*c).cmsg_len = libc::CMSG_LEN(size as u32) as usize;
            }
            unsafe { libc::sendmsg(fd, &m, libc::MSG_NOSIGNAL) }
        }),
    );
    record(
        "sendmmsg",
        on_socket(family, ty, proto, |fd| {
            let mut name = st;
            let mut iov = libc::iovec {
                iov_base: data.as_ptr() as *mut _,
                iov_len: data.len(),
            };
            let mut mm = libc::mmsghdr {
                msg_hdr: msghdr(&mut name, len, &mut iov),
                msg_len: 0,
            };
            let n = unsafe { libc::sendmmsg(fd, &mut mm, 1, libc::MSG_NOSIGNAL) };
            n as isize
        }),
    );
    record(
        "uring-sendmsg",
        on_socket(family, ty, proto, |fd| {
            let mut name = st;
            let mut iov = libc::iovec {
                iov_base: data.as_ptr() as *mut _,
                iov_len: data.len(),
            };
            let m = msghdr(&mut name, len, &mut iov);
            uring(|ring| {
                submit(
                    ring,
                    opcode::SendMsg::new(types::Fd(fd), &m)
                        .flags(libc::MSG_NOSIGNAL as u32)
                        .build(),
                )
            })
        }),
    );
    record(
        "uring-connect-send",
        on_socket(family, ty, proto, |fd| {
            uring(|ring| {
                let rc = submit(
                    ring,
                    opcode::Connect::new(types::Fd(fd), (&raw const st).cast(), len).build(),
                )?;
                if rc < 0 && rc != -libc::EINPROGRESS {
                    return Ok(rc);
                }
                if stream {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                submit(
                    ring,
                    opcode::Send::new(types::Fd(fd), data.as_ptr(), data.len() as u32)
                        .flags(libc::MSG_NOSIGNAL)
                        .build(),
                )
            })
        }),
    );
    let cookies: Vec<String> = cookies.iter().map(u64::to_string).collect();
    format!("{} cookies={}", out.join(" "), cookies.join(","))
}
