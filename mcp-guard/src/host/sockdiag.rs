//! Which cgroup a UDP socket belongs to, asked of the kernel through NETLINK_SOCK_DIAG.
//! The DNS proxy uses it to learn answers for the workload that asked, not for everyone.
//! The netlink socket answers for the network namespace it was created in.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_ERROR: u16 = 2;
const INET_DIAG_CGROUP_ID: u16 = 21;
const NLMSG_HDR: usize = 16;
/// `struct inet_diag_req_v2`: family, protocol, ext, pad, states, `inet_diag_sockid`.
const REQ_LEN: usize = 8 + 48;
/// `struct inet_diag_msg`: family, state, timer, retrans, sockid, then five u32.
const MSG_LEN: usize = 4 + 48 + 20;

pub struct SockDiag {
    fd: OwnedFd,
    seq: u32,
}

impl SockDiag {
    /// Opens a sock_diag socket in the calling thread's network namespace.
    ///
    /// # Errors
    /// The netlink socket cannot be created.
    pub fn open() -> io::Result<Self> {
        // SAFETY: plain socket(2); the fd is owned right away.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_SOCK_DIAG,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh, valid descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let tv = libc::timeval {
            tv_sec: 1,
            tv_usec: 0,
        };
        // SAFETY: valid fd and a timeval of the right size.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                std::ptr::addr_of!(tv).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            );
        }
        Ok(Self { fd, seq: 0 })
    }

    /// The cgroup id of the UDP socket at `client` that sent to `server` (connected or
    /// not), or `None` if no such socket exists (any more).
    ///
    /// # Errors
    /// The netlink exchange failed.
    pub fn udp_cgroup(
        &mut self,
        server: SocketAddr,
        client: SocketAddr,
    ) -> io::Result<Option<u64>> {
        // udp_dump_one looks up the socket a packet from idiag_src:sport to
        // idiag_dst:dport would reach: the client's socket, as seen from the server.
        self.query(libc::IPPROTO_UDP, server, client)
    }

    /// The cgroup id of the TCP socket at `client` connected to `server`.
    ///
    /// # Errors
    /// The netlink exchange failed.
    pub fn tcp_cgroup(
        &mut self,
        server: SocketAddr,
        client: SocketAddr,
    ) -> io::Result<Option<u64>> {
        // inet_diag_find_one_icsk: idiag_src:sport is the socket's own end.
        self.query(libc::IPPROTO_TCP, client, server)
    }

    /// One SOCK_DIAG_BY_FAMILY request for the socket `src` <-> `dst` as the protocol's
    /// lookup reads those fields.
    fn query(
        &mut self,
        protocol: i32,
        src: SocketAddr,
        dst: SocketAddr,
    ) -> io::Result<Option<u64>> {
        self.seq = self.seq.wrapping_add(1);
        let family = if src.is_ipv4() {
            libc::AF_INET
        } else {
            libc::AF_INET6
        } as u8;
        let mut msg = [0u8; NLMSG_HDR + REQ_LEN];
        let len = msg.len() as u32;
        msg[0..4].copy_from_slice(&len.to_ne_bytes());
        msg[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        msg[6..8].copy_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
        msg[8..12].copy_from_slice(&self.seq.to_ne_bytes());
        let req = &mut msg[NLMSG_HDR..];
        req[0] = family;
        req[1] = protocol as u8;
        req[4..8].copy_from_slice(&u32::MAX.to_ne_bytes()); // every state
        let id = &mut req[8..];
        id[0..2].copy_from_slice(&src.port().to_be_bytes());
        id[2..4].copy_from_slice(&dst.port().to_be_bytes());
        put_addr(&mut id[4..20], src.ip());
        put_addr(&mut id[20..36], dst.ip());
        // idiag_if = 0 (any), cookie = INET_DIAG_NOCOOKIE.
        id[40..48].copy_from_slice(&[0xff; 8]);
        // SAFETY: valid fd; msg is a readable buffer of its length.
        let sent = unsafe { libc::send(self.fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = vec![0u8; 8192];
        loop {
            // SAFETY: valid fd; buf is writable for its length.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let n = n as usize;
            if n < NLMSG_HDR {
                return Err(io::Error::other("short netlink reply"));
            }
            let seq = u32::from_ne_bytes(buf[8..12].try_into().expect("4 bytes"));
            if seq != self.seq {
                continue; // a late answer to an earlier, timed-out request
            }
            return parse_reply(&buf[..n]);
        }
    }
}

fn put_addr(out: &mut [u8], ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => out[..4].copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => out.copy_from_slice(&v6.octets()),
    }
}

fn parse_reply(buf: &[u8]) -> io::Result<Option<u64>> {
    let kind = u16::from_ne_bytes(buf[4..6].try_into().expect("2 bytes"));
    if kind == NLMSG_ERROR {
        let errno = buf
            .get(NLMSG_HDR..NLMSG_HDR + 4)
            .map_or(0, |b| i32::from_ne_bytes(b.try_into().expect("4 bytes")));
        return if errno == -libc::ENOENT {
            Ok(None)
        } else {
            Err(io::Error::from_raw_os_error(-errno))
        };
    }
    if kind != SOCK_DIAG_BY_FAMILY {
        return Err(io::Error::other(format!(
            "unexpected netlink message {kind}"
        )));
    }
    let len = (u32::from_ne_bytes(buf[0..4].try_into().expect("4 bytes")) as usize).min(buf.len());
    let mut at = NLMSG_HDR + MSG_LEN;
    while at + 4 <= len {
        let alen = usize::from(u16::from_ne_bytes(
            buf[at..at + 2].try_into().expect("2 bytes"),
        ));
        let atype = u16::from_ne_bytes(buf[at + 2..at + 4].try_into().expect("2 bytes")) & 0x3fff;
        if alen < 4 || at + alen > len {
            break;
        }
        if atype == INET_DIAG_CGROUP_ID && alen >= 12 {
            return Ok(Some(u64::from_ne_bytes(
                buf[at + 4..at + 12].try_into().expect("8 bytes"),
            )));
        }
        at += (alen + 3) & !3;
    }
    Err(io::Error::other(
        "the kernel reported the socket without its cgroup id (CONFIG_SOCK_CGROUP_DATA?)",
    ))
}
