//! The `[events]` keys: rate limit, sink, and whether command lines leave the control
//! socket.

use super::{raw::RawEvents, Ctx, Sink, DEFAULT_RATE_LIMIT};

pub(super) struct EventKeys {
    pub(super) rate_limit_per_sec: u32,
    pub(super) sink: Sink,
    pub(super) cmdline_in_sink: bool,
}

pub(super) fn event_keys(cx: &mut Ctx<'_>, events: &RawEvents) -> EventKeys {
    let rate_limit_per_sec = match &events.rate_limit_per_sec {
        None => DEFAULT_RATE_LIMIT,
        Some(v) => match u32::try_from(*v.get_ref()) {
            Ok(n) => n,
            Err(_) => {
                cx.err(
                    &v.span(),
                    "events.rate_limit_per_sec must be between 0 (no limit) and 4294967295",
                );
                DEFAULT_RATE_LIMIT
            }
        },
    };
    let sink = match events
        .sink
        .as_ref()
        .map(|s| (s.get_ref().as_str(), s.span()))
    {
        None | Some(("stdout", _)) => Sink::Stdout,
        Some(("file", span)) => {
            if events.file.is_none() {
                cx.err(
                    &span,
                    "events.sink = \"file\" needs events.file = \"/path/to/events.jsonl\"",
                );
            }
            Sink::File
        }
        Some(("none", _)) => Sink::None,
        Some((other, span)) => {
            cx.err(
                &span,
                format!("unknown events.sink {other:?}: use \"stdout\", \"file\" or \"none\""),
            );
            Sink::Stdout
        }
    };
    let cmdline_in_sink = match events
        .cmdline
        .as_ref()
        .map(|s| (s.get_ref().as_str(), s.span()))
    {
        None | Some(("control", _)) => false,
        Some(("sink", _)) => true,
        Some((other, span)) => {
            cx.err(
                &span,
                format!("unknown events.cmdline {other:?}: use \"control\" (command lines only on the root-only control socket, the default) or \"sink\" (in the sink's events too)"),
            );
            false
        }
    };
    EventKeys {
        rate_limit_per_sec,
        sink,
        cmdline_in_sink,
    }
}
