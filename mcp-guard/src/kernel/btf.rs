//! Member offsets of kernel structs, read from the kernel's own BTF
//! (`/sys/kernel/btf/vmlinux`): the BPF LSM unix programs read `unix_sock.addr`, whose
//! offset follows `struct sock`'s size in each kernel build, and aya-ebpf has no CO-RE.
//! aya-obj parses BTF but keeps member offsets private, and the maintained BTF crates
//! are LGPL; this reads the few fields the format needs (include/uapi/linux/btf.h).

use std::path::Path;

const MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Bytes of kind-specific data after a type's 12-byte header.
fn extra(kind: u32, vlen: usize) -> Option<usize> {
    Some(match kind {
        1 | 14 | 17 => 4,          // INT, VAR, DECL_TAG
        3 => 12,                   // ARRAY
        4 | 5 => 12 * vlen,        // STRUCT, UNION
        6 | 13 => 8 * vlen,        // ENUM, FUNC_PROTO
        15 | 19 => 12 * vlen,      // DATASEC, ENUM64
        2 | 7..=12 | 16 | 18 => 0, // PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG
        _ => return None,
    })
}

/// The byte offset of `member` in `struct name`, from BTF in `data` (little-endian, as on
/// the machines this runs on). `None` when the struct or member is not there.
#[must_use]
pub fn member_offset(data: &[u8], name: &str, member: &str) -> Option<usize> {
    if u16::from_le_bytes(data.get(0..2)?.try_into().ok()?) != MAGIC {
        return None;
    }
    let hdr_len = u32_at(data, 4)? as usize;
    let type_off = hdr_len + u32_at(data, 8)? as usize;
    let type_len = u32_at(data, 12)? as usize;
    let str_off = hdr_len + u32_at(data, 16)? as usize;
    let str_len = u32_at(data, 20)? as usize;
    let strings = data.get(str_off..str_off + str_len)?;
    let string = |off: u32| -> Option<&[u8]> {
        let s = strings.get(off as usize..)?;
        Some(&s[..s.iter().position(|&c| c == 0)?])
    };
    let types = data.get(type_off..type_off + type_len)?;
    let mut at = 0;
    while at + 12 <= types.len() {
        let name_off = u32_at(types, at)?;
        let info = u32_at(types, at + 4)?;
        let kind = (info >> 24) & 0x1f;
        let vlen = (info & 0xffff) as usize;
        let bitfields = info >> 31 == 1;
        if (kind == KIND_STRUCT || kind == KIND_UNION) && string(name_off)? == name.as_bytes() {
            for i in 0..vlen {
                let m = at + 12 + i * 12;
                if string(u32_at(types, m)?)? == member.as_bytes() {
                    let bits = u32_at(types, m + 8)?;
                    let bits = if bitfields { bits & 0x00ff_ffff } else { bits };
                    return (bits % 8 == 0).then_some(bits as usize / 8);
                }
            }
        }
        at += 12 + extra(kind, vlen)?;
    }
    None
}

/// [`member_offset`] in the running kernel's BTF.
#[must_use]
pub fn kernel_member_offset(name: &str, member: &str) -> Option<usize> {
    let data = std::fs::read(Path::new("/sys/kernel/btf/vmlinux")).ok()?;
    member_offset(&data, name, member)
}

#[cfg(test)]
mod tests {
    /// The running kernel's BTF (every supported kernel has it): offsets the uapi fixes.
    #[test]
    fn offsets_of_the_running_kernel() {
        let Ok(data) = std::fs::read("/sys/kernel/btf/vmlinux") else {
            panic!("no /sys/kernel/btf/vmlinux: mcp-guard needs a kernel with BTF");
        };
        assert_eq!(
            super::member_offset(&data, "sockaddr_un", "sun_path"),
            Some(2)
        );
        assert_eq!(super::member_offset(&data, "unix_address", "name"), Some(8));
        assert_eq!(super::member_offset(&data, "unix_address", "len"), Some(4));
        let addr = super::member_offset(&data, "unix_sock", "addr").expect("unix_sock.addr");
        assert!(addr > 100, "after struct sock: {addr}");
        assert_eq!(super::member_offset(&data, "unix_sock", "nope"), None);
        assert_eq!(super::member_offset(&data, "no_such_struct", "x"), None);
        assert_eq!(super::member_offset(b"garbage", "unix_sock", "addr"), None);
    }
}
