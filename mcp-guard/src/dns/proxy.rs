//! The DNS proxy (UDP and TCP): finds out which workload asks, refuses what its policy
//! does not allow ([`filter`]) without asking upstream, forwards the rest, learns the
//! answer for that workload, and hands it back (TTLs capped at what the policy allows)
//! only once the kernel enforces it.

use std::{
    cell::RefCell,
    net::{IpAddr, SocketAddr},
    rc::Rc,
    time::Duration,
};

use hickory_resolver::proto::{op::Message, rr::RData};
use tokio::{net::UdpSocket, task::spawn_local};
use tracing::warn;

use super::{
    engine::Engine,
    filter::{self, Budgets, Refusal},
    learned::Need,
};
use crate::{host::sockdiag::SockDiag, telemetry::events::QueryRefusal};

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
    sock: Rc<UdpSocket>,
    tcp: tokio::net::TcpListener,
    addr: SocketAddr,
    engine: Rc<RefCell<Engine>>,
    servers: Vec<SocketAddr>,
    diag: Rc<RefCell<SockDiag>>,
) {
    let mut buf = vec![0u8; 4096];
    let in_flight = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    let metrics = engine.borrow().metrics.clone();
    let shared = Rc::new(Shared {
        engine,
        servers,
        budgets: Rc::new(RefCell::new(Budgets::default())),
    });
    let _tcp = AbortOnDrop(spawn_local(tcp_loop(
        tcp,
        addr,
        shared.clone(),
        diag.clone(),
        in_flight.clone(),
    )));
    loop {
        let Ok((n, client)) = sock.recv_from(&mut buf).await else {
            continue;
        };
        let Ok(permit) = in_flight.clone().try_acquire_owned() else {
            // A flood: drop the query (the client asks again), never queue without bound.
            metrics.dns_proxied.with_label_values(&["overloaded"]).inc();
            continue;
        };
        let query = buf[..n].to_vec();
        // Who asked, while their socket certainly exists.
        let cgroup_id = diag.borrow_mut().udp_cgroup(addr, client);
        let (sock, shared) = (sock.clone(), shared.clone());
        spawn_local(async move {
            answer(sock, client, query, cgroup_id, shared).await;
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
pub(super) fn question(msg: &[u8]) -> &[u8] {
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
    engine: &RefCell<Engine>,
    found: std::io::Result<Option<u64>>,
    client: SocketAddr,
) -> Option<u64> {
    match found {
        Ok(Some(c)) => Some(c),
        Ok(None) => engine.borrow_mut().cgroup_by_source(client.ip()),
        Err(e) => {
            warn!(%client, "DNS proxy: cannot tell which cgroup asked: {e}");
            None
        }
    }
}

/// What the proxy shares between its UDP and TCP sides.
pub(super) struct Shared {
    pub engine: Rc<RefCell<Engine>>,
    pub servers: Vec<SocketAddr>,
    pub budgets: Rc<RefCell<Budgets>>,
}

/// Whether an upstream answer goes back over UDP or TCP (and how the query came).
#[derive(Clone, Copy)]
enum Transport {
    Udp,
    Tcp,
}

impl Transport {
    const fn name(self) -> &'static str {
        match self {
            Self::Udp => "udp",
            Self::Tcp => "tcp",
        }
    }
}

/// One query, start to end: who asked, whether it may go upstream at all, the upstream
/// answer learned for the workload and held until the kernel enforces it, its TTLs
/// capped. Returns what to answer the client (`None`: nothing).
async fn handle(
    shared: &Shared,
    client: SocketAddr,
    cgroup_id: Option<u64>,
    query: &[u8],
    transport: Transport,
) -> Option<Vec<u8>> {
    let engine = &shared.engine;
    let metrics = engine.borrow().metrics.clone();
    if query.len() < 12 {
        metrics.dns_proxied.with_label_values(&["malformed"]).inc();
        return None;
    }
    let parsed = filter::question(query);
    let refuse = |why: Refusal, who: Option<(&str, u32)>, q: Option<&filter::Question>| {
        engine.borrow_mut().refuse_query(&QueryRefusal {
            workload: who.map(|(w, _)| w),
            workload_id: who.map_or(0, |(_, id)| id),
            cgroup_id: cgroup_id.unwrap_or(0),
            name: q.map(|q| q.name.as_str()),
            qtype: q.map(|q| q.qtype.to_string()),
            reason: why.reason(),
            client,
            proto: transport.name(),
            generation: 0,
            suppressed: 0,
        });
        metrics.dns_proxied.with_label_values(&["refused"]).inc();
        filter::refused(query)
    };
    // 1. Who asked, before anything else: an unknown client gets nothing upstream.
    let owner = {
        let mut e = engine.borrow_mut();
        cgroup_id.and_then(|cg| e.owner(cg)).and_then(|name| {
            e.workload(&name)
                .map(|(id, w)| (name.clone(), id, w.resolve_any))
        })
    };
    let Some((workload, wid, resolve_any)) = owner else {
        return refuse(Refusal::Unattributed, None, parsed.as_ref().ok());
    };
    let who = Some((workload.as_str(), wid));
    let q = match parsed {
        Ok(q) => q,
        Err((why, q)) => return refuse(why, who, q.as_ref()),
    };
    // 2. The workload's budgets: one workload cannot starve the others.
    let (qps, in_flight) = {
        let e = engine.borrow();
        (
            e.cfg().dns.workload_queries_per_sec,
            e.cfg().dns.workload_in_flight,
        )
    };
    let _in_flight = match Budgets::take(&shared.budgets, &workload, qps, in_flight) {
        Ok(g) => g,
        Err(why) => return refuse(why, who, Some(&q)),
    };
    // 3. The name, then the type.
    let allowed = engine.borrow_mut().allowed_name(&workload, &q.name);
    let origin = match allowed {
        Some(origin) => origin,
        None if resolve_any => q.name.clone(),
        None => return refuse(Refusal::NameNotAllowed, who, Some(&q)),
    };
    if !filter::type_allowed(q.qtype) {
        return refuse(Refusal::TypeNotAllowed, who, Some(&q));
    }
    // 4. Upstream.
    let asked = Asked {
        client,
        cgroup_id: cgroup_id.unwrap_or(0),
        workload: &workload,
        origin: &origin,
        name: &q.name,
    };
    upstream(shared, query, transport, &asked).await
}

/// A query that passed the checks: who asked and under which allowed name.
struct Asked<'a> {
    client: SocketAddr,
    cgroup_id: u64,
    workload: &'a str,
    origin: &'a str,
    name: &'a str,
}

/// Forwards an allowed query, learns the answer for the workload (held until the kernel
/// enforces it) and caps its TTLs.
async fn upstream(
    shared: &Shared,
    query: &[u8],
    transport: Transport,
    asked: &Asked<'_>,
) -> Option<Vec<u8>> {
    let engine = &shared.engine;
    let metrics = engine.borrow().metrics.clone();
    let response = match transport {
        Transport::Udp => forward(query, &shared.servers).await,
        Transport::Tcp => forward_tcp(query, &shared.servers).await,
    };
    let Some(response) = response else {
        metrics
            .dns_proxied
            .with_label_values(&["upstream-error"])
            .inc();
        return servfail(query);
    };
    let Ok(mut msg) = Message::from_vec(&response) else {
        metrics.dns_proxied.with_label_values(&["forwarded"]).inc();
        return Some(response);
    };
    let result = learn_response(
        engine,
        asked.cgroup_id,
        asked.workload,
        asked.origin,
        asked.name,
        &msg,
        asked.client,
    )
    .await;
    metrics.dns_proxied.with_label_values(&[result]).inc();
    let max_ttl = engine.borrow().cfg().dns.max_ttl;
    Some(filter::cap_ttls(&mut msg, max_ttl).unwrap_or(response))
}

/// Learns an upstream answer for the workload that asked, under the allowed name it was
/// asked through (`origin`: the name itself, or the allowed name whose CNAME chain led
/// to it), and, if that taught the policy anything new, waits until the kernel has it.
/// Returns the metric's result.
async fn learn_response(
    engine: &RefCell<Engine>,
    cgroup_id: u64,
    workload: &str,
    origin: &str,
    asked: &str,
    msg: &Message,
    client: SocketAddr,
) -> &'static str {
    let done = {
        let mut e = engine.borrow_mut();
        e.note_cnames(workload, origin, asked, msg);
        let records: Vec<(IpAddr, u32)> = msg
            .answers
            .iter()
            .filter_map(|rec| match &rec.data {
                RData::A(a) => Some((IpAddr::V4(a.0), rec.ttl)),
                RData::AAAA(a) => Some((IpAddr::V6(a.0), rec.ttl)),
                _ => None,
            })
            .collect();
        let admitted = e.learn(workload, origin, &records, "proxy", cgroup_id);
        // Nothing new: the answer goes out at once; a renewal is installed meanwhile
        // (the address stays allowed under its earlier expiry until then).
        match e.offer(admitted, true) {
            (Need::New, Some(rx)) => rx,
            _ => return "forwarded",
        }
    };
    if tokio::time::timeout(INSTALL_WAIT, done).await.is_err() {
        warn!(%client, "DNS proxy: the policy with the new answer was not in place within {INSTALL_WAIT:?}; answering anyway (connections fail closed until it is)");
    }
    "learned"
}

async fn answer(
    sock: Rc<UdpSocket>,
    client: SocketAddr,
    query: Vec<u8>,
    found: std::io::Result<Option<u64>>,
    shared: Rc<Shared>,
) {
    let cgroup_id = attribute(&shared.engine, found, client);
    if let Some(r) = handle(&shared, client, cgroup_id, &query, Transport::Udp).await {
        let _ = sock.send_to(&r, client).await;
    }
}

/// DNS over TCP (RFC 1035 4.2.2: each message after a two-byte length), which clients
/// use when a UDP answer was truncated.
async fn tcp_loop(
    listener: tokio::net::TcpListener,
    addr: SocketAddr,
    shared: Rc<Shared>,
    diag: Rc<RefCell<SockDiag>>,
    in_flight: std::sync::Arc<tokio::sync::Semaphore>,
) {
    loop {
        let Ok((stream, client)) = listener.accept().await else {
            continue;
        };
        let Ok(permit) = in_flight.clone().try_acquire_owned() else {
            let metrics = shared.engine.borrow().metrics.clone();
            metrics.dns_proxied.with_label_values(&["overloaded"]).inc();
            continue;
        };
        let found = diag.borrow_mut().tcp_cgroup(addr, client);
        let shared = shared.clone();
        spawn_local(async move {
            let cgroup_id = attribute(&shared.engine, found, client);
            let _ = tcp_session(stream, client, cgroup_id, &shared).await;
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
    shared: &Shared,
) -> std::io::Result<()> {
    for _ in 0..TCP_QUERIES_PER_CONNECTION {
        let Ok(query) = tokio::time::timeout(TCP_IDLE, read_message(&mut stream)).await else {
            return Ok(());
        };
        let query = query?;
        let Some(r) = handle(shared, client, cgroup_id, &query, Transport::Tcp).await else {
            return Ok(());
        };
        write_message(&mut stream, &r).await?;
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
