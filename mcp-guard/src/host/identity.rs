//! `exec --user` / `--group`: the identity the command runs as, resolved from the
//! system's user and group databases (NSS, as `id` and systemd's `User=` do) before
//! anything happens, and switched to after the mount namespace is set up and before the
//! command runs. Real, effective and saved ids all change, so there is no way back.

use std::ffi::{CStr, CString};

use nix::unistd::{Gid, Group, Uid, User};

/// Who the command runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
    /// Supplementary groups: the user's groups from the group database (with `--user`),
    /// else only `gid`.
    pub groups: Vec<libc::gid_t>,
}

/// A user's entry (`nix` reads the databases through NSS and sizes the buffers):
/// (name, uid, primary gid).
fn user_entry(user: &str) -> Result<Option<(CString, libc::uid_t, libc::gid_t)>, String> {
    let found = match user.parse::<libc::uid_t>() {
        Ok(uid) => User::from_uid(Uid::from_raw(uid)),
        Err(_) => User::from_name(user),
    }
    .map_err(|e| format!("--user {user}: reading the user database: {e}"))?;
    found
        .map(|u| {
            let name = CString::new(u.name)
                .map_err(|_| format!("--user {user}: the user database holds a bad name"))?;
            Ok((name, u.uid.as_raw(), u.gid.as_raw()))
        })
        .transpose()
}

fn group_id(group: &str) -> Result<libc::gid_t, String> {
    if let Ok(gid) = group.parse::<libc::gid_t>() {
        return Ok(gid);
    }
    Group::from_name(group)
        .map_err(|e| format!("--group {group}: reading the group database: {e}"))?
        .map(|g| g.gid.as_raw())
        .ok_or_else(|| {
            format!("--group {group}: no such group (give a group name from /etc/group or a numeric GID)")
        })
}

/// The groups `name` belongs to (primary `gid` included); only `gid` if they cannot be
/// read.
fn group_list(name: &CStr, gid: libc::gid_t) -> Vec<libc::gid_t> {
    nix::unistd::getgrouplist(name, Gid::from_raw(gid))
        .map(|g| g.into_iter().map(Gid::as_raw).collect())
        .unwrap_or_else(|_| vec![gid])
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
