//! Reading a whole hash map in a few syscalls (`BPF_MAP_LOOKUP_BATCH`, Linux 5.6): the
//! self-repair check compares every registration each second, and one lookup syscall per
//! entry (two per entry to iterate) cost tens of milliseconds with 10,000 workloads.

use std::{
    io,
    os::fd::{AsFd, AsRawFd},
};

use aya::{
    maps::{HashMap, MapData},
    Pod,
};

/// `BPF_MAP_LOOKUP_BATCH` (include/uapi/linux/bpf.h, `enum bpf_cmd`).
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
/// Entries asked for per syscall at first (doubled when one bucket holds more).
const CHUNK: usize = 4096;

/// The `batch` member of `union bpf_attr`; the kernel zero-fills what a shorter attr
/// leaves out.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Every entry of `map`, read in batches. A map changed while it is read may show an
/// entry twice or miss one, as iteration may: callers compare and repair, and the next
/// check sees the rest.
///
/// # Errors
/// The kernel refused the batch (older than 5.6, or not a hash map).
pub fn dump<K: Pod, V: Pod>(map: &HashMap<MapData, K, V>) -> io::Result<Vec<(K, V)>> {
    use aya::maps::IterableMap;
    let fd = map.map().fd().as_fd().as_raw_fd();
    let mut out = Vec::new();
    let mut chunk = CHUNK;
    // The hash map's batch token is a bucket index (u32).
    let (mut token_in, mut token_out) = (0u32, 0u32);
    let mut first = true;
    loop {
        let mut keys: Vec<K> = Vec::with_capacity(chunk);
        let mut values: Vec<V> = Vec::with_capacity(chunk);
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                std::ptr::addr_of_mut!(token_in) as u64
            },
            out_batch: std::ptr::addr_of_mut!(token_out) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: u32::try_from(chunk).unwrap_or(u32::MAX),
            map_fd: u32::try_from(fd).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?,
            ..BatchAttr::default()
        };
        // attr points at buffers of `chunk` keys and values of the map's sizes (K and V
        // are the map's own key and value types) and at two u32 tokens.
        let err = crate::kernel::unix_hooks::bpf(BPF_MAP_LOOKUP_BATCH, &mut attr).err();
        let n = (attr.count as usize).min(chunk);
        match err.as_ref().and_then(io::Error::raw_os_error) {
            None | Some(libc::ENOENT) => {
                // SAFETY: the kernel filled the first `n` keys and values.
                unsafe {
                    keys.set_len(n);
                    values.set_len(n);
                }
                out.extend(keys.into_iter().zip(values));
                if err.is_some() {
                    return Ok(out);
                }
                token_in = token_out;
                first = false;
            }
            // One bucket holds more entries than asked for: ask for more.
            Some(libc::ENOSPC) if chunk < 1 << 20 => chunk *= 2,
            _ => return Err(err.unwrap_or_else(|| io::Error::other("batch lookup"))),
        }
    }
}
