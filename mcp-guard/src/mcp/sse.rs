//! Server-Sent Events as the HTTP proxy passes them on: the stream is cut into whole
//! events (each ends with a blank line), each event's data decoded by the maintained
//! parser (`sse-stream`), and an event the relay changed written back with only its
//! `data` lines replaced (`id`, `event`, `retry` and comments kept as they came). An
//! event the relay did not change passes byte for byte.

use std::convert::Infallible;

use bytes::Bytes;
use futures_util::{FutureExt as _, StreamExt as _};

/// Cuts a byte stream into whole events.
#[derive(Default)]
pub struct Splitter {
    buf: Vec<u8>,
    /// Scanned up to here; the current line started at `line_start`.
    pos: usize,
    line_start: usize,
}

impl Splitter {
    pub fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// Bytes held for an event not complete yet.
    #[must_use]
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Everything held, as it came (an event too long to wait for).
    pub fn take_all(&mut self) -> Vec<u8> {
        self.pos = 0;
        self.line_start = 0;
        std::mem::take(&mut self.buf)
    }

    /// The events completed so far, each with its blank line.
    pub fn events(&mut self) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut start = 0;
        let b = &self.buf;
        while self.pos < b.len() {
            let c = b[self.pos];
            if c != b'\n' && c != b'\r' {
                self.pos += 1;
                continue;
            }
            let end = if c == b'\r' {
                match b.get(self.pos + 1) {
                    Some(b'\n') => self.pos + 2,
                    // A blank line ends the event at once (a '\n' after it passes on
                    // as a block of its own); another line waits for its '\n'.
                    None if self.pos != self.line_start => break,
                    _ => self.pos + 1,
                }
            } else {
                self.pos + 1
            };
            if self.pos == self.line_start {
                out.push(b[start..end].to_vec());
                start = end;
            }
            self.pos = end;
            self.line_start = end;
        }
        self.buf.drain(..start);
        self.pos -= start;
        self.line_start -= start;
        out
    }
}

/// The data of one whole event (`None`: it has none).
#[must_use]
pub fn data(event: &[u8]) -> Option<String> {
    let bytes = Bytes::copy_from_slice(event);
    let mut s =
        sse_stream::SseByteStream::new(futures_util::stream::iter([Ok::<_, Infallible>(bytes)]));
    match s.next().now_or_never() {
        Some(Some(Ok(ev))) => ev.data,
        _ => None,
    }
}

/// `event` with its data replaced by `data` (one `data:` line per line of it, where the
/// first data line stood).
#[must_use]
pub fn with_data(event: &[u8], data: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(event.len() + data.len());
    let mut written = false;
    let mut rest = event;
    while !rest.is_empty() {
        let n = rest
            .iter()
            .position(|&c| c == b'\n' || c == b'\r')
            .map_or(rest.len(), |i| {
                if rest[i] == b'\r' && rest.get(i + 1) == Some(&b'\n') {
                    i + 2
                } else {
                    i + 1
                }
            });
        let (line, tail) = rest.split_at(n);
        rest = tail;
        let field = line
            .split(|&c| c == b':' || c == b'\n' || c == b'\r')
            .next();
        if field == Some(b"data") {
            if !written {
                for l in data.split('\n') {
                    out.extend_from_slice(b"data: ");
                    out.extend_from_slice(l.as_bytes());
                    out.push(b'\n');
                }
                written = true;
            }
            continue;
        }
        out.extend_from_slice(line);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_cut_whole_across_chunks_and_line_endings() {
        let mut s = Splitter::default();
        s.push(b"id: 1\ndata: {\"a\"");
        assert!(s.events().is_empty());
        s.push(b":1}\n\n: comment\r\n\r\nevent: m\rdata: x\r");
        let ev = s.events();
        assert_eq!(ev.len(), 2, "{ev:?}");
        assert_eq!(ev[0], b"id: 1\ndata: {\"a\":1}\n\n");
        assert_eq!(data(&ev[0]).as_deref(), Some("{\"a\":1}"));
        assert_eq!(data(&ev[1]), None);
        s.push(b"\r");
        let ev = s.events();
        assert_eq!(ev, [b"event: m\rdata: x\r\r".to_vec()]);
        assert_eq!(s.pending(), 0);
    }

    #[test]
    fn only_the_data_is_replaced() {
        let ev = b"event: message\nid: 7\ndata: {\"x\":\ndata: 1}\nretry: 5\n\n";
        let out = with_data(ev, "{\"y\":2}");
        assert_eq!(out, b"event: message\nid: 7\ndata: {\"y\":2}\nretry: 5\n\n");
        assert_eq!(data(&out).as_deref(), Some("{\"y\":2}"));
    }
}
