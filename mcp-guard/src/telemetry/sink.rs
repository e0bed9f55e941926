//! Where events go besides the live stream: stdout, a file, or nowhere. A file sink
//! follows log rotation: it is reopened when its path no longer names the file it holds
//! (moved away or deleted, checked at most once a second) and at SIGHUP (copytruncate
//! rotation needs nothing: the file is opened for appending). Every failed write is
//! counted (`mcp_guard_events_sink_errors_total`) and logged at most once a minute.

use std::{
    io::Write as _,
    os::unix::fs::MetadataExt,
    path::PathBuf,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use prometheus::IntCounter;
use tracing::{info, warn};

/// Set by SIGHUP: the file sink reopens its path before the next write.
static REOPEN: AtomicBool = AtomicBool::new(false);

/// Asks the file sink to reopen its path (SIGHUP).
pub fn request_reopen() {
    REOPEN.store(true, Ordering::SeqCst);
}

/// An events file that follows rotation.
pub struct FileSink {
    path: PathBuf,
    file: Option<std::fs::File>,
    ino: u64,
    checked: Instant,
}

impl FileSink {
    /// Opens (creates) the file for appending.
    ///
    /// # Errors
    /// It cannot be opened.
    pub fn open(path: PathBuf) -> std::io::Result<Self> {
        let file = Self::open_file(&path)?;
        let ino = file.metadata()?.ino();
        Ok(Self {
            path,
            file: Some(file),
            ino,
            checked: Instant::now(),
        })
    }

    fn open_file(path: &std::path::Path) -> std::io::Result<std::fs::File> {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
    }

    /// Reopens when asked, when the file was moved or deleted, or after a failed open.
    fn follow(&mut self) {
        let asked = REOPEN.swap(false, Ordering::SeqCst);
        if !asked && self.file.is_some() && self.checked.elapsed() < Duration::from_secs(1) {
            return;
        }
        self.checked = Instant::now();
        let same = std::fs::metadata(&self.path).is_ok_and(|m| m.ino() == self.ino);
        if same && !asked && self.file.is_some() {
            return;
        }
        match Self::open_file(&self.path).and_then(|f| Ok((f.metadata()?.ino(), f))) {
            Ok((ino, f)) => {
                info!(file = %self.path.display(), "events file reopened");
                self.file = Some(f);
                self.ino = ino;
            }
            Err(e) => {
                warn!(file = %self.path.display(), "cannot reopen the events file: {e}");
                self.file = None;
            }
        }
    }
}

/// Where events go besides the live stream.
pub enum SinkWriter {
    Stdout,
    File(FileSink),
    None,
}

/// Writes events and counts what could not be written.
pub struct Sink {
    pub writer: SinkWriter,
    /// Command lines in the sink's events (`[events] cmdline = "sink"`); otherwise only
    /// the root-only control socket's stream carries them.
    pub cmdline: bool,
    errors: IntCounter,
    last_warned: Option<Instant>,
}

impl Sink {
    #[must_use]
    pub fn new(writer: SinkWriter, errors: IntCounter, cmdline: bool) -> Self {
        Self {
            writer,
            cmdline,
            errors,
            last_warned: None,
        }
    }

    #[must_use]
    pub fn is_none(&self) -> bool {
        matches!(self.writer, SinkWriter::None)
    }

    /// Writes whole lines; a failure is counted and logged (at most once a minute).
    pub fn write(&mut self, out: &[u8]) {
        if out.is_empty() {
            return;
        }
        let result = match &mut self.writer {
            SinkWriter::Stdout => {
                let mut so = std::io::stdout().lock();
                so.write_all(out).and_then(|()| so.flush())
            }
            SinkWriter::File(f) => {
                f.follow();
                match &mut f.file {
                    Some(file) => file.write_all(out),
                    None => Err(std::io::Error::other("the events file is not open")),
                }
            }
            SinkWriter::None => Ok(()),
        };
        if let Err(e) = result {
            self.errors.inc();
            if self
                .last_warned
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(60))
            {
                self.last_warned = Some(Instant::now());
                warn!("events not written to the sink ({e}); counted in mcp_guard_events_sink_errors_total, the live stream and /events keep them");
            }
        }
    }
}
