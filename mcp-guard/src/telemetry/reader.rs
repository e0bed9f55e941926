//! Reading the kernel's events off the ring buffer: counted, kept raw in the history,
//! enriched (off the runtime's workers) only for a sink or a live follower.

use std::sync::{atomic::AtomicU64, atomic::Ordering, Arc};

use aya::maps::{MapData, RingBuf};
use mcp_guard_common::Event;
use tokio::{io::unix::AsyncFd, sync::broadcast};

use super::events::{decode, enrich_cached, monotonic_ns, Cache, JsonEvent, Names};

/// Counts of what the reader delivered, for the invariant and the metrics.
#[derive(Default)]
pub struct Delivered {
    pub events: AtomicU64,
}

/// How many recent events the daemon keeps for `mcp-guard events --since`.
pub const HISTORY: usize = 10_000;

/// One remembered event: kernel events are kept raw and enriched only when someone
/// replays them; the daemon's own (DNS refusals) are born enriched.
#[derive(Clone)]
pub enum Recorded {
    Kernel(Event),
    Daemon(Arc<JsonEvent>),
}

/// Recent events with their wall-clock time (Unix ns), oldest first.
pub type History = std::sync::Mutex<std::collections::VecDeque<(u128, Recorded)>>;

fn remember(history: &History, wall: u128, r: Recorded) {
    let mut h = history.lock().expect("history lock");
    if h.len() == HISTORY {
        h.pop_front();
    }
    h.push_back((wall, r));
}

/// An event the daemon made (DNS refusals): written, streamed and kept.
fn daemon_event(
    j: JsonEvent,
    sink: &mut super::sink::Sink,
    stream: &broadcast::Sender<Arc<JsonEvent>>,
    history: &History,
) {
    let j = Arc::new(j);
    let mut line = serde_json::to_vec(&*j).expect("serialisable");
    line.push(b'\n');
    sink.write(&line);
    let _ = stream.send(j.clone());
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    remember(history, wall, Recorded::Daemon(j));
}

/// A batch of kernel events enriched for the live followers (sent) and the sink
/// (returned as JSON lines; nothing when there is neither).
fn publish(
    batch: &[Event],
    names: &tokio::sync::watch::Receiver<Arc<Names>>,
    sink: &super::sink::Sink,
    stream: &broadcast::Sender<Arc<JsonEvent>>,
) -> Vec<u8> {
    let to_sink = !sink.is_none();
    let followed = stream.receiver_count() > 0;
    let mut out = Vec::new();
    if !(to_sink || followed) {
        return out;
    }
    let names = names.borrow().clone();
    let mut cache = Cache::default();
    for e in batch {
        let j = Arc::new(enrich_cached(e, &names, &mut cache));
        if to_sink {
            if sink.cmdline || j.cmdline.is_none() {
                serde_json::to_writer(&mut out, &*j).expect("serialisable");
            } else {
                let mut without = (*j).clone();
                without.cmdline = None;
                serde_json::to_writer(&mut out, &without).expect("serialisable");
            }
            out.push(b'\n');
        }
        if followed {
            let _ = stream.send(j);
        }
    }
    out
}

/// Reads the ring buffer until the task is dropped. `names` is the state owner's latest.
pub async fn read_loop(
    ring: RingBuf<MapData>,
    names: tokio::sync::watch::Receiver<Arc<Names>>,
    mut sink: super::sink::Sink,
    stream: broadcast::Sender<Arc<JsonEvent>>,
    delivered: Arc<Delivered>,
    history: Arc<History>,
    mut daemon_events: tokio::sync::mpsc::UnboundedReceiver<JsonEvent>,
) -> std::io::Result<()> {
    // SAFETY: the ring buffer owns its fd and moves into the AsyncFd, so the fd stays open
    // exactly as long as it is registered.
    let mut fd = unsafe { AsyncFd::register(ring) }.map_err(std::io::Error::from)?;
    loop {
        let mut guard = tokio::select! {
            g = fd.readable_mut() => g?,
            Some(j) = daemon_events.recv() => {
                daemon_event(j, &mut sink, &stream, &history);
                continue;
            }
        };
        let ring = guard.get_inner_mut();
        let mut batch = Vec::new();
        while let Some(item) = ring.next() {
            if let Some(e) = decode(&item) {
                batch.push(e);
            }
        }
        guard.clear_ready();
        if batch.is_empty() {
            continue;
        }
        delivered
            .events
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        // Events are counted and kept raw always; turned into JSON only for a sink or a
        // live follower, so a flood nobody reads costs almost nothing. Enrichment reads
        // /proc and cgroupfs: off the runtime's workers.
        let out = tokio::task::block_in_place(|| publish(&batch, &names, &sink, &stream));
        {
            let now_mono = monotonic_ns();
            let now_wall = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            for e in batch.iter().skip(batch.len().saturating_sub(HISTORY)) {
                remember(
                    &history,
                    now_wall.saturating_sub(u128::from(now_mono.saturating_sub(e.ts_ns))),
                    Recorded::Kernel(*e),
                );
            }
        }
        sink.write(&out);
    }
}
