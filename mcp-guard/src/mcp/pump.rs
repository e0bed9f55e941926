//! Copying newline-delimited messages from one side of a relay to the other: each
//! complete line is shown to the relay first, which passes it, replaces it or drops it;
//! a line too long to read streams through unread and is counted.

use std::{
    io::{Read, Write},
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex,
    },
};

/// Lines longer than this are passed through unread (and counted as oversized).
pub const MAX_MESSAGE: usize = 16 * 1024 * 1024;

/// Lines passed through unread.
#[derive(Default)]
pub struct Counts {
    pub malformed: AtomicU64,
    pub oversized: AtomicU64,
}

/// What [`pump`] does with one line.
pub enum Seen {
    /// Passed on unchanged.
    Pass,
    /// Not JSON-RPC: passed on unchanged and counted.
    Malformed,
    /// Passed on as these bytes instead (a newline is added); empty: dropped.
    Replace(Vec<u8>),
}

/// Copies `input` to `output` line by line, calling `seen` with each complete line of
/// at most [`MAX_MESSAGE`] bytes (without its newline) before writing it; longer lines
/// stream through unread and are counted. Ends at EOF of `input` or a failed write.
///
/// `output` is locked for each line (for the whole of a line streamed through), so
/// another thread may write whole lines to it between them.
pub fn pump<W: Write>(
    mut input: impl Read,
    output: &Mutex<W>,
    counts: &Counts,
    mut seen: impl FnMut(&[u8]) -> Seen,
) -> std::io::Result<()> {
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    // Held while an oversized line streams through.
    let mut held: Option<std::sync::MutexGuard<'_, W>> = None;
    loop {
        let n = match input.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let mut rest = &chunk[..n];
        while !rest.is_empty() {
            if let Some(i) = rest.iter().position(|&b| b == b'\n') {
                let (head, tail) = rest.split_at(i + 1);
                rest = tail;
                if let Some(mut out) = held.take() {
                    out.write_all(head)?;
                    out.flush()?;
                    continue;
                }
                buf.extend_from_slice(head);
                let body = &buf[..buf.len() - 1];
                let body = body.strip_suffix(b"\r").unwrap_or(body);
                let action = seen(body);
                let mut out = output.lock().expect("output");
                match action {
                    Seen::Pass => out.write_all(&buf)?,
                    Seen::Malformed => {
                        counts.malformed.fetch_add(1, Ordering::Relaxed);
                        out.write_all(&buf)?;
                    }
                    Seen::Replace(b) if b.is_empty() => {}
                    Seen::Replace(mut b) => {
                        b.push(b'\n');
                        out.write_all(&b)?;
                    }
                }
                out.flush()?;
                buf.clear();
            } else {
                if let Some(out) = held.as_mut() {
                    out.write_all(rest)?;
                } else {
                    buf.extend_from_slice(rest);
                    if buf.len() > MAX_MESSAGE {
                        counts.oversized.fetch_add(1, Ordering::Relaxed);
                        let mut out = output.lock().expect("output");
                        out.write_all(&buf)?;
                        buf.clear();
                        held = Some(out);
                    }
                }
                rest = &[];
            }
        }
        if let Some(out) = held.as_mut() {
            out.flush()?;
        }
    }
    let mut out = held.unwrap_or_else(|| output.lock().expect("output"));
    // A last line without its newline: passed on as it is.
    if !buf.is_empty() {
        counts.malformed.fetch_add(1, Ordering::Relaxed);
        out.write_all(&buf)?;
    }
    out.flush()
}
