//! `exec --user` / `--group`: the identity the command runs as, resolved from the
//! system's user and group databases (NSS, as `id` and systemd's `User=` do) before
//! anything happens, and switched to after the mount namespace is set up and before the
//! command runs. Real, effective and saved ids all change, so there is no way back.

use std::ffi::{CStr, CString};

/// Who the command runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
    /// Supplementary groups: the user's groups from the group database (with `--user`),
    /// else only `gid`.
    pub groups: Vec<libc::gid_t>,
}

/// A user's entry: (name, uid, primary gid).
fn user_entry(user: &str) -> Result<Option<(CString, libc::uid_t, libc::gid_t)>, String> {
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut out: *mut libc::passwd = std::ptr::null_mut();
    let mut buf = vec![0u8; 16_384];
    let rc = if let Ok(uid) = user.parse::<libc::uid_t>() {
        // SAFETY: valid pointers to a passwd struct, a buffer of its stated length and
        // the result pointer.
        unsafe {
            libc::getpwuid_r(
                uid,
                &raw mut pw,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &raw mut out,
            )
        }
    } else {
        let name = CString::new(user).map_err(|_| format!("--user {user:?}: not a user name"))?;
        // SAFETY: as above, with a NUL-terminated name.
        unsafe {
            libc::getpwnam_r(
                name.as_ptr(),
                &raw mut pw,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &raw mut out,
            )
        }
    };
    if rc != 0 {
        return Err(format!(
            "--user {user}: reading the user database: {}",
            std::io::Error::from_raw_os_error(rc)
        ));
    }
    if out.is_null() {
        return Ok(None);
    }
    // SAFETY: getpw*_r filled pw, whose name points into buf (alive here).
    let name = unsafe { CStr::from_ptr(pw.pw_name) }.to_owned();
    Ok(Some((name, pw.pw_uid, pw.pw_gid)))
}

fn group_id(group: &str) -> Result<libc::gid_t, String> {
    if let Ok(gid) = group.parse::<libc::gid_t>() {
        return Ok(gid);
    }
    let name = CString::new(group).map_err(|_| format!("--group {group:?}: not a group name"))?;
    let mut gr: libc::group = unsafe { std::mem::zeroed() };
    let mut out: *mut libc::group = std::ptr::null_mut();
    let mut buf = vec![0u8; 65_536];
    // SAFETY: valid pointers to a group struct, a buffer of its stated length and the
    // result pointer.
    let rc = unsafe {
        libc::getgrnam_r(
            name.as_ptr(),
            &raw mut gr,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &raw mut out,
        )
    };
    if rc != 0 {
        return Err(format!(
            "--group {group}: reading the group database: {}",
            std::io::Error::from_raw_os_error(rc)
        ));
    }
    if out.is_null() {
        return Err(format!(
            "--group {group}: no such group (give a group name from /etc/group or a numeric GID)"
        ));
    }
    Ok(gr.gr_gid)
}

/// The groups `name` belongs to (primary `gid` included).
fn group_list(name: &CStr, gid: libc::gid_t) -> Vec<libc::gid_t> {
    let mut n: libc::c_int = 64;
    loop {
        let mut groups = vec![0 as libc::gid_t; n as usize];
        let want = n;
        // SAFETY: a NUL-terminated name, a buffer of `n` gids and its length.
        let rc = unsafe { libc::getgrouplist(name.as_ptr(), gid, groups.as_mut_ptr(), &raw mut n) };
        if rc >= 0 {
            groups.truncate(n as usize);
            return groups;
        }
        if n <= want {
            n = want * 2;
        }
    }
}

/// Resolves `--user` (a name or a numeric UID) and `--group` (a name or a numeric GID).
/// `--user` alone: the user's primary group and its supplementary groups; `--group`
/// alone: that group (and no supplementary groups), the user unchanged. `None` when
/// neither is given.
///
/// # Errors
/// An unknown user or group name, or a numeric UID without a user entry and no
/// `--group` (its group would be a guess).
pub fn resolve(user: Option<&str>, group: Option<&str>) -> Result<Option<Identity>, String> {
    let gid = group.map(group_id).transpose()?;
    let Some(user) = user else {
        return Ok(gid.map(|gid| Identity {
            // SAFETY: getuid cannot fail.
            uid: unsafe { libc::getuid() },
            gid,
            groups: vec![gid],
        }));
    };
    match user_entry(user)? {
        Some((name, uid, primary)) => {
            let gid = gid.unwrap_or(primary);
            let mut groups = group_list(&name, gid);
            if !groups.contains(&gid) {
                groups.push(gid);
            }
            Ok(Some(Identity { uid, gid, groups }))
        }
        None => match (user.parse::<libc::uid_t>(), gid) {
            (Ok(uid), Some(gid)) => Ok(Some(Identity {
                uid,
                gid,
                groups: vec![gid],
            })),
            (Ok(_), None) => Err(format!(
                "--user {user}: no user has this UID; name its group with --group"
            )),
            (Err(_), _) => Err(format!(
                "--user {user}: no such user (give a user name from /etc/passwd or a numeric UID)"
            )),
        },
    }
}

/// Switches groups, GID and UID (real, effective and saved), groups first.
///
/// # Errors
/// The syscall that failed.
pub fn switch(id: &Identity) -> std::io::Result<()> {
    let check = |rc: libc::c_int| {
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    // SAFETY: plain syscalls on this process with valid arguments.
    unsafe {
        check(libc::setgroups(id.groups.len(), id.groups.as_ptr()))?;
        check(libc::setresgid(id.gid, id.gid, id.gid))?;
        check(libc::setresuid(id.uid, id.uid, id.uid))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::resolve;

    #[test]
    fn users_and_groups_resolve_and_unknown_ones_are_errors() {
        let root = resolve(Some("root"), None).unwrap().unwrap();
        assert_eq!((root.uid, root.gid), (0, 0));
        assert!(root.groups.contains(&0));
        let nobody = resolve(Some("nobody"), Some("0")).unwrap().unwrap();
        assert_eq!(nobody.gid, 0);
        assert_eq!(resolve(None, None).unwrap(), None);
        let e = resolve(Some("no-such-user-mcpg"), None).unwrap_err();
        assert!(e.contains("--user no-such-user-mcpg: no such user"), "{e}");
        let e = resolve(None, Some("no-such-group-mcpg")).unwrap_err();
        assert!(
            e.contains("--group no-such-group-mcpg: no such group"),
            "{e}"
        );
        let e = resolve(Some("4000123"), None).unwrap_err();
        assert!(e.contains("name its group with --group"), "{e}");
        let id = resolve(Some("4000123"), Some("4000123")).unwrap().unwrap();
        assert_eq!(
            (id.uid, id.gid, id.groups.clone()),
            (4_000_123, 4_000_123, vec![4_000_123])
        );
    }
}
