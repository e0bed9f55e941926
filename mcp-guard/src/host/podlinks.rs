//! Pod mode: which node-side interface leads to which workload's pod. A pod's veth has
//! its peer in the node's namespace; the kernel reports, for that peer, the id of the
//! namespace its other end lives in (IFLA_LINK_NETNSID). The daemon asks the kernel for
//! the id of each workload pod's namespace (RTM_GETNSID with the namespace's file) and
//! maps every node interface whose other end is that namespace to the pod's cgroup.
//! Both questions go over one NETLINK_ROUTE socket made in the TC namespace; no
//! namespace is entered. The TC classifier then knows a packet's pod by the interface it
//! came in on, never by a source address the pod could have written.

use std::{
    collections::BTreeMap,
    fs::File,
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

use crate::host::attribution::Registered;

const NLMSG_DONE: u16 = 3;
const NLMSG_ERROR: u16 = 2;
const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const RTM_NEWNSID: u16 = 88;
const RTM_GETNSID: u16 = 90;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_DUMP: u16 = 0x300;
const NETNSA_NSID: u16 = 1;
const NETNSA_FD: u16 = 3;
const IFLA_LINK_NETNSID: u16 = 37;

struct Netlink {
    fd: OwnedFd,
    seq: u32,
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

impl Netlink {
    fn open() -> io::Result<Self> {
        // SAFETY: plain socket call; the fd is owned below.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let tv = libc::timeval {
            tv_sec: 2,
            tv_usec: 0,
        };
        // SAFETY: valid fd and option struct.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const tv).cast(),
                size_of::<libc::timeval>() as u32,
            );
        }
        // SAFETY: fd is ours and open.
        Ok(Self {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            seq: 0,
        })
    }

    /// Sends one request (header + `body`), returns every message of the answer (their
    /// type and payload), until DONE for a dump or the first message otherwise.
    fn request(&mut self, ty: u16, flags: u16, body: &[u8]) -> io::Result<Vec<(u16, Vec<u8>)>> {
        self.seq += 1;
        let len = 16 + body.len();
        let mut msg = Vec::with_capacity(len);
        msg.extend_from_slice(&(len as u32).to_ne_bytes());
        msg.extend_from_slice(&ty.to_ne_bytes());
        msg.extend_from_slice(&(NLM_F_REQUEST | flags).to_ne_bytes());
        msg.extend_from_slice(&self.seq.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(body);
        // SAFETY: valid fd and buffer.
        if unsafe { libc::send(self.fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let dump = flags & NLM_F_DUMP != 0;
        let mut out = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            // SAFETY: valid fd and buffer.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut at = 0;
            let n = n as usize;
            while at + 16 <= n {
                let mlen = u32::from_ne_bytes(buf[at..at + 4].try_into().expect("4")) as usize;
                let mty = u16::from_ne_bytes(buf[at + 4..at + 6].try_into().expect("2"));
                if mlen < 16 || at + mlen > n {
                    return Err(io::Error::other("short netlink message"));
                }
                let payload = buf[at + 16..at + mlen].to_vec();
                at += align4(mlen);
                match mty {
                    NLMSG_DONE => return Ok(out),
                    NLMSG_ERROR => {
                        let code = i32::from_ne_bytes(
                            payload
                                .get(..4)
                                .and_then(|b| b.try_into().ok())
                                .unwrap_or([0; 4]),
                        );
                        if code != 0 {
                            return Err(io::Error::from_raw_os_error(-code));
                        }
                        return Ok(out);
                    }
                    _ => {
                        out.push((mty, payload));
                        if !dump {
                            return Ok(out);
                        }
                    }
                }
            }
        }
    }
}

/// Attributes after a fixed header of `skip` bytes: (type, data).
fn attributes(payload: &[u8], skip: usize) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    let mut at = align4(skip);
    while at + 4 <= payload.len() {
        let len = usize::from(u16::from_ne_bytes([payload[at], payload[at + 1]]));
        let ty = u16::from_ne_bytes([payload[at + 2], payload[at + 3]]) & 0x3fff;
        if len < 4 || at + len > payload.len() {
            break;
        }
        out.push((ty, &payload[at + 4..at + len]));
        at += align4(len);
    }
    out
}

/// The id this (the socket's) namespace gives the namespace of `ns`, if it has one.
fn nsid(nl: &mut Netlink, ns: &File) -> io::Result<Option<i32>> {
    // struct rtgenmsg (one byte, padded) + NETNSA_FD.
    let mut body = vec![0u8; 4];
    body.extend_from_slice(&8u16.to_ne_bytes());
    body.extend_from_slice(&NETNSA_FD.to_ne_bytes());
    body.extend_from_slice(&(ns.as_raw_fd() as u32).to_ne_bytes());
    let reply = nl.request(RTM_GETNSID, 0, &body)?;
    Ok(reply
        .iter()
        .filter(|(t, _)| *t == RTM_NEWNSID)
        .flat_map(|(_, p)| attributes(p, 4))
        .find(|(t, _)| *t == NETNSA_NSID)
        .and_then(|(_, d)| d.get(..4).and_then(|b| b.try_into().ok()))
        .map(i32::from_ne_bytes)
        .filter(|id| *id >= 0))
}

/// Interface index -> the id of the namespace its other end lives in.
fn link_netnsids(nl: &mut Netlink) -> io::Result<BTreeMap<u32, i32>> {
    // struct ifinfomsg: 16 bytes of zeros asks for every link.
    let reply = nl.request(RTM_GETLINK, NLM_F_DUMP, &[0u8; 16])?;
    let mut out = BTreeMap::new();
    for (_, p) in reply
        .iter()
        .filter(|(t, p)| *t == RTM_NEWLINK && p.len() >= 16)
    {
        let index = i32::from_ne_bytes(p[4..8].try_into().expect("4"));
        if let Some((_, d)) = attributes(p, 16)
            .into_iter()
            .find(|(ty, _)| *ty == IFLA_LINK_NETNSID)
        {
            if let Some(b) = d.get(..4) {
                out.insert(index as u32, i32::from_ne_bytes(b.try_into().expect("4")));
            }
        }
    }
    Ok(out)
}

/// Node-side interface index -> registered cgroup id of the workload pod on its other
/// end, for the interfaces of the calling thread's network namespace: the nearest
/// registered cgroup above a namespace's processes decides, as the kernel decides for
/// their sockets.
///
/// # Errors
/// The netlink socket cannot be made or answered badly.
pub fn scan(registered: &Registered) -> io::Result<BTreeMap<u32, u64>> {
    let pods = registered.namespaces("/proc/thread-self/ns/net");
    let mut nl = Netlink::open()?;
    let mut by_nsid: BTreeMap<i32, u64> = BTreeMap::new();
    for (pid, cgroup_id) in pods {
        let Ok(ns) = File::open(format!("/proc/{pid}/ns/net")) else {
            continue;
        };
        if let Some(id) = nsid(&mut nl, &ns)? {
            by_nsid.entry(id).or_insert(cgroup_id);
        }
    }
    Ok(link_netnsids(&mut nl)?
        .into_iter()
        .filter_map(|(ifindex, id)| by_nsid.get(&id).map(|cg| (ifindex, *cg)))
        .collect())
}
