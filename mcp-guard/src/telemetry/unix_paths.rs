//! The paths of refused AF_UNIX destinations: the kernel puts each in `UNIX_PATHS_1`
//! under a hash its event carries; enrichment reads the path back.

use mcp_guard_common::Event;

/// The kernel's table of refused AF_UNIX paths (`UNIX_PATHS_1`), set once by the daemon
/// at start: events carry a path's hash, enrichment reads the path back.
static UNIX_PATHS: std::sync::OnceLock<
    std::sync::Mutex<aya::maps::HashMap<aya::maps::MapData, u64, mcp_guard_common::UnixPath>>,
> = std::sync::OnceLock::new();

/// Hands enrichment the kernel's table of refused AF_UNIX paths.
pub fn set_unix_paths(
    map: aya::maps::HashMap<aya::maps::MapData, u64, mcp_guard_common::UnixPath>,
) {
    let _ = UNIX_PATHS.set(std::sync::Mutex::new(map));
}

/// An AF_UNIX address as people write it: a path, or `@name` for an abstract one.
#[must_use]
pub fn unix_address_text(bytes: &[u8]) -> String {
    match bytes.split_first() {
        Some((0, name)) => format!("@{}", String::from_utf8_lossy(name)),
        _ => String::from_utf8_lossy(bytes).into_owned(),
    }
}

/// The path of a refused AF_UNIX destination, by the hash its event carries.
pub(super) fn unix_path(e: &Event) -> String {
    let mut h = [0u8; 8];
    h.copy_from_slice(&e.daddr_be[..8]);
    let hash = u64::from_ne_bytes(h);
    UNIX_PATHS
        .get()
        .and_then(|m| m.lock().ok()?.get(&hash, 0).ok())
        .map_or_else(
            || format!("#{hash:016x}"),
            |p| {
                let len = (p.len as usize).min(p.path.len());
                unix_address_text(&p.path[..len])
            },
        )
}
