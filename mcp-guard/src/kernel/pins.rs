//! Pinned state on bpffs, so enforcement outlives the daemon.
//!
//! Layout under the pin directory (default /sys/fs/bpf/mcp-guard):
//! `maps/<MAP_NAME>` for every map, `links/<hook>` for every attached program. While the
//! link pins exist the kernel keeps the programs attached and deciding with the pinned
//! maps, whether the daemon runs, restarts, is upgraded or was killed.

use std::{
    ffi::CString,
    fs, io,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
};

use aya::programs::{links::PinnedLink, Link as _};
use tracing::info;

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// Directory of [`Pins::learned_file`].
pub const LEARNED_DIR: &str = "/run/mcp-guard";

#[derive(Debug, Clone)]
pub struct Pins {
    pub dir: PathBuf,
}

/// mount(2) of a pseudo filesystem (`fstype` as its source too) at `target`.
pub(crate) fn mount_fs(fstype: &std::ffi::CStr, target: &std::ffi::CStr) -> bool {
    // SAFETY: mount(2) with valid C strings.
    unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        ) == 0
    }
}

fn is_bpffs(p: &Path) -> bool {
    let Ok(c) = CString::new(p.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs with a valid C string and an out struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    (unsafe { libc::statfs(c.as_ptr(), &raw mut st) } == 0) && st.f_type as i64 == BPF_FS_MAGIC
}

impl Pins {
    #[must_use]
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
        }
    }

    /// Where the addresses learned for host rules are kept across daemon restarts, beside
    /// the pins in lifetime: /run (tmpfs) is emptied at boot, as bpffs is.
    #[must_use]
    /// Where approval requests and decisions are recorded (JSON lines, appended).
    pub fn approvals_file(&self) -> PathBuf {
        let learned = self.learned_file();
        let name = learned
            .file_name()
            .map(|n| {
                n.to_string_lossy()
                    .replace("learned", "approvals")
                    .replace(".json", ".jsonl")
            })
            .unwrap_or_else(|| "approvals.jsonl".into());
        learned.with_file_name(name)
    }

    pub fn learned_file(&self) -> PathBuf {
        let tag: String = self
            .dir
            .to_string_lossy()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        PathBuf::from(LEARNED_DIR).join(format!("learned{tag}.json"))
    }

    /// Where the pods placed through the CRI are kept, for a restart while the runtime
    /// does not answer (beside the learned addresses, same lifetime).
    #[must_use]
    pub fn pods_file(&self) -> PathBuf {
        self.learned_file().with_file_name(
            self.learned_file()
                .file_name()
                .map(|n| n.to_string_lossy().replacen("learned", "pods", 1))
                .unwrap_or_default(),
        )
    }

    #[must_use]
    pub fn map(&self, name: &str) -> PathBuf {
        self.dir.join("maps").join(name)
    }

    #[must_use]
    pub fn link(&self, hook: &str) -> PathBuf {
        self.dir.join("links").join(hook)
    }

    /// Makes sure the pin directory is on a bpffs, mounting one at /sys/fs/bpf when the
    /// directory is below it and nothing is mounted there (a fresh machine), and creates
    /// the layout.
    ///
    /// # Errors
    /// The directory is not on a bpffs and cannot be put on one.
    pub fn prepare(&self) -> io::Result<()> {
        let root = Path::new("/sys/fs/bpf");
        if self.dir.starts_with(root) && !is_bpffs(root) {
            if !mount_fs(c"bpf", c"/sys/fs/bpf") {
                let e = io::Error::last_os_error();
                return Err(io::Error::new(
                    e.kind(),
                    format!("mounting bpffs on /sys/fs/bpf: {e}"),
                ));
            }
            info!("mounted bpffs on /sys/fs/bpf");
        }
        fs::create_dir_all(self.dir.join("maps"))?;
        fs::create_dir_all(self.dir.join("links"))?;
        if !is_bpffs(&self.dir) {
            return Err(io::Error::other(format!(
                "{} is not on a bpffs: set [daemon] pin_dir to a directory below a bpffs mount (mount -t bpf bpf /sys/fs/bpf)",
                self.dir.display()
            )));
        }
        Ok(())
    }

    /// Whether a previous daemon left pinned links behind.
    #[must_use]
    pub fn has_links(&self) -> bool {
        fs::read_dir(self.dir.join("links")).is_ok_and(|mut d| d.next().is_some())
    }

    /// Removes everything: detaches every pinned link, unpins every map and removes the
    /// directory. Programs and maps are freed by the kernel once nothing references them.
    /// Returns what was removed.
    ///
    /// # Errors
    /// A pin could not be removed.
    pub fn uninstall(&self) -> io::Result<Vec<String>> {
        let mut removed = Vec::new();
        if let Ok(entries) = fs::read_dir(self.dir.join("links")) {
            for e in entries.flatten() {
                let path = e.path();
                match PinnedLink::from_pin(&path) {
                    Ok(link) => {
                        let fd_link = link.unpin()?;
                        // Detach explicitly: another process may still hold the link open.
                        let _ = fd_link.detach();
                    }
                    Err(_) => fs::remove_file(&path)?,
                }
                removed.push(format!("link {}", path.display()));
            }
        }
        if let Ok(entries) = fs::read_dir(self.dir.join("maps")) {
            for e in entries.flatten() {
                fs::remove_file(e.path())?;
                removed.push(format!("map {}", e.path().display()));
            }
        }
        for state in [self.learned_file(), self.pods_file()] {
            match fs::remove_file(&state) {
                Ok(()) => removed.push(format!("state {}", state.display())),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        for sub in ["links", "maps", ""] {
            let p = if sub.is_empty() {
                self.dir.clone()
            } else {
                self.dir.join(sub)
            };
            match fs::remove_dir(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", p.display()))),
            }
        }
        Ok(removed)
    }
}
