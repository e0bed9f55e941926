//! The DNS proxy (UDP and TCP): forwards each query upstream, learns the answer for the
//! workload that asked, and hands the answer back only once the kernel enforces it.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use hickory_resolver::proto::{op::Message, rr::RData};
use tokio::{net::UdpSocket, sync::oneshot};
use tracing::warn;

use super::engine::Engine;
use crate::{config::normalise_name, sockdiag::SockDiag};

/// How long the proxy waits for the policy with a new answer before answering anyway
/// (the workload's connections then fail closed until the policy is in).
const INSTALL_WAIT: Duration = Duration::from_secs(2);
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(3);
/// Queries the proxy works on at once; more are dropped.
const MAX_IN_FLIGHT: usize = 256;
/// A TCP client's connection: at most this many queries, closed after this long idle.
const TCP_QUERIES_PER_CONNECTION: usize = 64;
const TCP_IDLE: Duration = Duration::from_secs(10);

pub(super) async fn proxy_loop(
    sock: Arc<UdpSocket>,
    tcp: tokio::net::TcpListener,
    addr: SocketAddr,
    engine: Arc<Mutex<Engine>>,
    servers: Vec<SocketAddr>,
    diag: Arc<Mutex<SockDiag>>,
) {
    let mut buf = vec![0u8; 4096];
    let in_flight = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    let _tcp = AbortOnDrop(tokio::spawn(tcp_loop(
        tcp,
        addr,
        engine.clone(),
        servers.clone(),
        diag.clone(),
        in_flight.clone(),
    )));
    loop {
        let Ok((n, client)) = sock.recv_from(&mut buf).await else {
            continue;
        };
        let Ok(permit) = in_flight.clone().try_acquire_owned() else {
            // A flood: drop the query (the client asks again), never queue without bound.
            let metrics = engine.lock().expect("engine").metrics.clone();
            metrics.dns_proxied.with_label_values(&["overloaded"]).inc();
            continue;
        };
        let query = buf[..n].to_vec();
        // Who asked, while their socket certainly exists.
        let cgroup_id = diag.lock().expect("diag").udp_cgroup(addr, client);
        let (sock, engine, servers) = (sock.clone(), engine.clone(), servers.clone());
        tokio::spawn(async move {
            answer(sock, client, query, cgroup_id, engine, servers).await;
            drop(permit);
        });
    }
}

/// Stops a task when its owner goes.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// SERVFAIL for a query we could not answer, so the client does not wait.
fn servfail(query: &[u8]) -> Option<Vec<u8>> {
    let mut r = query.to_vec();
    if r.len() < 12 {
        return None;
    }
    r[2] |= 0x80; // QR
    r[3] = (r[3] & 0xf0) | 2; // RCODE SERVFAIL
    Some(r)
}

async fn forward(query: &[u8], servers: &[SocketAddr]) -> Option<Vec<u8>> {
    for s in servers {
        let bind: SocketAddr = if s.is_ipv4() {
            "0.0.0.0:0".parse().expect("addr")
        } else {
            "[::]:0".parse().expect("addr")
        };
        let Ok(sock) = UdpSocket::bind(bind).await else {
            continue;
        };
        if sock.connect(s).await.is_err() || sock.send(query).await.is_err() {
            continue;
        }
        let mut buf = vec![0u8; 65535];
        let deadline = tokio::time::Instant::now() + UPSTREAM_TIMEOUT;
        while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, sock.recv(&mut buf)).await {
            // Same id and question as asked: anything else is not this query's answer.
            if n >= 12 && buf[..2] == query[..2] && buf[12..n].starts_with(question(query)) {
                buf.truncate(n);
                return Some(buf);
            }
        }
    }
    None
}

/// The question section's bytes (from offset 12 up to the end of the first question).
fn question(msg: &[u8]) -> &[u8] {
    let mut at = 12;
    while at < msg.len() {
        let len = usize::from(msg[at]);
        if len == 0 {
            return &msg[12..(at + 5).min(msg.len())];
        }
        if len & 0xc0 != 0 {
            break;
        }
        at += len + 1;
    }
    &msg[12.min(msg.len())..]
}

/// Which cgroup asked: the asking socket's own (found in the proxy's namespace), else
/// the workload whose namespace holds the client's source address (a pod).
fn attribute(
    engine: &Mutex<Engine>,
    found: std::io::Result<Option<u64>>,
    client: SocketAddr,
) -> Option<u64> {
    match found {
        Ok(Some(c)) => Some(c),
        Ok(None) => engine.lock().expect("engine").cgroup_by_source(client.ip()),
        Err(e) => {
            warn!(%client, "DNS proxy: cannot tell which cgroup asked: {e}");
            None
        }
    }
}

/// Learns an upstream answer for the workload that asked and, if that taught the
/// policy anything new, waits until the kernel has it. Returns the metric's result.
async fn learn_response(
    engine: &Mutex<Engine>,
    cgroup_id: Option<u64>,
    response: &[u8],
    client: SocketAddr,
) -> &'static str {
    let Some(cg) = cgroup_id else {
        return "unattributed";
    };
    let Ok(msg) = Message::from_vec(response) else {
        return "forwarded";
    };
    let done = {
        let mut e = engine.lock().expect("engine");
        let Some(workload) = e.owner(cg) else {
            return "unattributed";
        };
        let records: Vec<(IpAddr, u32)> = msg
            .answers
            .iter()
            .filter_map(|rec| match &rec.data {
                RData::A(a) => Some((IpAddr::V4(a.0), rec.ttl)),
                RData::AAAA(a) => Some((IpAddr::V6(a.0), rec.ttl)),
                _ => None,
            })
            .collect();
        let mut grew = false;
        for q in &msg.queries {
            let name = normalise_name(&q.name().to_ascii());
            grew |= e.learn(&workload, &name, &records, "proxy", cg);
        }
        if !grew {
            return "forwarded";
        }
        let (tx, rx) = oneshot::channel();
        e.publish(Some(tx));
        rx
    };
    if tokio::time::timeout(INSTALL_WAIT, done).await.is_err() {
        warn!(%client, "DNS proxy: the policy with the new answer was not in place within {INSTALL_WAIT:?}; answering anyway (connections fail closed until it is)");
    }
    "learned"
}

async fn answer(
    sock: Arc<UdpSocket>,
    client: SocketAddr,
    query: Vec<u8>,
    found: std::io::Result<Option<u64>>,
    engine: Arc<Mutex<Engine>>,
    servers: Vec<SocketAddr>,
) {
    let metrics = engine.lock().expect("engine").metrics.clone();
    if query.len() < 12 {
        metrics.dns_proxied.with_label_values(&["malformed"]).inc();
        return;
    }
    let Some(response) = forward(&query, &servers).await else {
        metrics
            .dns_proxied
            .with_label_values(&["upstream-error"])
            .inc();
        if let Some(r) = servfail(&query) {
            let _ = sock.send_to(&r, client).await;
        }
        return;
    };
    let cgroup_id = attribute(&engine, found, client);
    let result = learn_response(&engine, cgroup_id, &response, client).await;
    metrics.dns_proxied.with_label_values(&[result]).inc();
    let _ = sock.send_to(&response, client).await;
}

/// DNS over TCP (RFC 1035 4.2.2: each message after a two-byte length), which clients
/// use when a UDP answer was truncated.
async fn tcp_loop(
    listener: tokio::net::TcpListener,
    addr: SocketAddr,
    engine: Arc<Mutex<Engine>>,
    servers: Vec<SocketAddr>,
    diag: Arc<Mutex<SockDiag>>,
    in_flight: Arc<tokio::sync::Semaphore>,
) {
    loop {
        let Ok((stream, client)) = listener.accept().await else {
            continue;
        };
        let Ok(permit) = in_flight.clone().try_acquire_owned() else {
            let metrics = engine.lock().expect("engine").metrics.clone();
            metrics.dns_proxied.with_label_values(&["overloaded"]).inc();
            continue;
        };
        let found = diag.lock().expect("diag").tcp_cgroup(addr, client);
        let (engine, servers) = (engine.clone(), servers.clone());
        tokio::spawn(async move {
            let cgroup_id = attribute(&engine, found, client);
            let _ = tcp_session(stream, client, cgroup_id, &engine, &servers).await;
            drop(permit);
        });
    }
}

async fn read_message(stream: &mut tokio::net::TcpStream) -> std::io::Result<Vec<u8>> {
    use tokio::io::AsyncReadExt as _;
    let len = usize::from(stream.read_u16().await?);
    let mut msg = vec![0u8; len];
    stream.read_exact(&mut msg).await?;
    Ok(msg)
}

async fn write_message(stream: &mut tokio::net::TcpStream, msg: &[u8]) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt as _;
    let len = u16::try_from(msg.len()).map_err(|_| std::io::Error::other("message too long"))?;
    let mut out = len.to_be_bytes().to_vec();
    out.extend_from_slice(msg);
    stream.write_all(&out).await
}

async fn tcp_session(
    mut stream: tokio::net::TcpStream,
    client: SocketAddr,
    cgroup_id: Option<u64>,
    engine: &Mutex<Engine>,
    servers: &[SocketAddr],
) -> std::io::Result<()> {
    let metrics = engine.lock().expect("engine").metrics.clone();
    for _ in 0..TCP_QUERIES_PER_CONNECTION {
        let Ok(query) = tokio::time::timeout(TCP_IDLE, read_message(&mut stream)).await else {
            return Ok(());
        };
        let query = query?;
        if query.len() < 12 {
            metrics.dns_proxied.with_label_values(&["malformed"]).inc();
            return Ok(());
        }
        let Some(response) = forward_tcp(&query, servers).await else {
            metrics
                .dns_proxied
                .with_label_values(&["upstream-error"])
                .inc();
            if let Some(r) = servfail(&query) {
                write_message(&mut stream, &r).await?;
            }
            continue;
        };
        let result = learn_response(engine, cgroup_id, &response, client).await;
        metrics.dns_proxied.with_label_values(&[result]).inc();
        write_message(&mut stream, &response).await?;
    }
    Ok(())
}

async fn forward_tcp(query: &[u8], servers: &[SocketAddr]) -> Option<Vec<u8>> {
    for s in servers {
        let attempt = async {
            let mut up = tokio::net::TcpStream::connect(s).await?;
            write_message(&mut up, query).await?;
            read_message(&mut up).await
        };
        if let Ok(Ok(r)) = tokio::time::timeout(UPSTREAM_TIMEOUT, attempt).await {
            if r.len() >= 12 && r[..2] == query[..2] && r[12..].starts_with(question(query)) {
                return Some(r);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn question_bytes_end_after_type_and_class() {
        // id, flags, counts, then "a.io" A IN.
        let mut q = vec![0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        q.extend_from_slice(&[1, b'a', 2, b'i', b'o', 0, 0, 1, 0, 1]);
        assert_eq!(question(&q), &q[12..]);
        q.extend_from_slice(&[0, 0, 41]); // trailing OPT record start
        assert_eq!(question(&q).len(), 10);
    }

    #[test]
    fn servfail_sets_response_and_rcode() {
        let q = vec![0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        let r = servfail(&q).unwrap();
        assert_eq!(r[2] & 0x80, 0x80);
        assert_eq!(r[3] & 0x0f, 2);
        assert!(servfail(&q[..5]).is_none());
    }
}
