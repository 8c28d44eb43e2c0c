//! Who the container process runs as: uid, gid and supplementary groups, resolved against the
//! container's own `/etc/passwd` and `/etc/group` (read without leaving the rootfs).

use std::path::Path;

use crate::SpecError;
use crate::rootfs::read_in_root;

const PASSWD: &str = "/etc/passwd";
const GROUP: &str = "/etc/group";

/// What the kubelet and the image ask for.
#[derive(Debug, Clone, Default)]
pub struct UserRequest<'a> {
    /// `security_context.run_as_user`.
    pub run_as_user: Option<i64>,
    /// `security_context.run_as_username` (empty: unset).
    pub run_as_username: &'a str,
    /// `security_context.run_as_group`.
    pub run_as_group: Option<i64>,
    /// The image config's `User` (`name`, `uid`, `name:group`, `uid:gid`, ...).
    pub image_user: &'a str,
    /// `security_context.supplemental_groups`.
    pub supplemental_groups: &'a [i64],
    /// `supplemental_groups_policy` is `Strict`: ignore `/etc/group` memberships.
    pub strict_groups: bool,
}

/// The resolved identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedUser {
    /// The uid.
    pub uid: u32,
    /// The primary gid.
    pub gid: u32,
    /// Supplementary gids, the primary gid first (CVE-2023-25173: a process must not keep
    /// a group it would lose by `setgroups`, so the primary gid is listed too).
    pub additional_gids: Vec<u32>,
    /// The user name, when `/etc/passwd` knows the uid.
    pub username: Option<String>,
}

#[derive(Debug, Clone)]
struct PasswdEntry {
    name: String,
    uid: u32,
    gid: u32,
}

#[derive(Debug, Clone)]
struct GroupEntry {
    name: String,
    gid: u32,
    members: Vec<String>,
}

/// Parses `/etc/passwd`; malformed lines are skipped, as libc does.
fn parse_passwd(text: &str) -> Vec<PasswdEntry> {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?.trim();
            let _pw = f.next()?;
            let uid = f.next()?.trim().parse().ok()?;
            let gid = f.next()?.trim().parse().ok()?;
            (!name.is_empty()).then(|| PasswdEntry { name: name.to_string(), uid, gid })
        })
        .collect()
}

/// Parses `/etc/group`; malformed lines are skipped.
fn parse_group(text: &str) -> Vec<GroupEntry> {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?.trim();
            let _pw = f.next()?;
            let gid = f.next()?.trim().parse().ok()?;
            let members = f
                .next()
                .unwrap_or("")
                .split(',')
                .map(str::trim)
                .filter(|m| !m.is_empty())
                .map(str::to_string)
                .collect();
            (!name.is_empty()).then(|| GroupEntry { name: name.to_string(), gid, members })
        })
        .collect()
}

/// Reads and parses one of the rootfs's account files; a missing file is an empty list.
fn load<T>(root: &Path, path: &str, parse: fn(&str) -> Vec<T>) -> Result<Vec<T>, SpecError> {
    match read_in_root(root, Path::new(path)) {
        Ok(Some(text)) => Ok(parse(&text)),
        Ok(None) => Ok(Vec::new()),
        Err(source) => Err(SpecError::ReadRootfsFile { path: path.into(), source }),
    }
}

/// Checks that a CRI id fits a uid/gid (`-1`, i.e. 4294967295, is "no id" to the kernel).
fn check_id(field: &'static str, value: i64) -> Result<u32, SpecError> {
    u32::try_from(value)
        .ok()
        .filter(|v| *v != u32::MAX)
        .ok_or(SpecError::InvalidId { field, value })
}

/// Resolves the user the container runs as.
///
/// Precedence as in containerd: `run_as_user`, else `run_as_username`, else the image `USER`
/// (empty: root). The gid is `run_as_group`, else the group of the image `USER`, else the
/// user's passwd entry, else 0.
pub fn resolve_user(root: &Path, req: &UserRequest<'_>) -> Result<ResolvedUser, SpecError> {
    let has_user = req.run_as_user.is_some() || !req.run_as_username.is_empty();
    if req.run_as_group.is_some() && !has_user {
        return Err(SpecError::RunAsGroupWithoutUser);
    }
    if req.run_as_user.is_some() && !req.run_as_username.is_empty() {
        return Err(SpecError::RunAsUserAndUsername);
    }
    let passwd = load(root, PASSWD, parse_passwd)?;
    let mut groups: Option<Vec<GroupEntry>> = None;

    let by_uid = |uid: u32| passwd.iter().find(|p| p.uid == uid);
    let by_name = |name: &str| {
        passwd
            .iter()
            .find(|p| p.name == name)
            .ok_or_else(|| SpecError::UserNotFound { user: name.to_string() })
    };

    // (uid, gid from the user spec or passwd, explicit group from the image USER, name)
    let (uid, passwd_gid, image_gid, username) = if let Some(u) = req.run_as_user {
        let uid = check_id("run_as_user", u)?;
        let entry = by_uid(uid);
        (uid, entry.map(|e| e.gid), None, entry.map(|e| e.name.clone()))
    } else if !req.run_as_username.is_empty() {
        let entry = by_name(req.run_as_username)?;
        (entry.uid, Some(entry.gid), None, Some(entry.name.clone()))
    } else {
        let spec = req.image_user.trim();
        let (user_part, group_part) = match spec.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (spec, None),
        };
        if group_part.is_some_and(|g| g.is_empty() || g.contains(':')) {
            return Err(SpecError::InvalidImageUser { user: spec.to_string() });
        }
        let (uid, passwd_gid, name) = if user_part.is_empty() {
            if group_part.is_some() {
                return Err(SpecError::InvalidImageUser { user: spec.to_string() });
            }
            let entry = by_uid(0);
            (0, entry.map(|e| e.gid), entry.map(|e| e.name.clone()))
        } else if let Ok(uid) = user_part.parse::<u32>() {
            let entry = by_uid(uid);
            (uid, entry.map(|e| e.gid), entry.map(|e| e.name.clone()))
        } else {
            let entry = by_name(user_part)?;
            (entry.uid, Some(entry.gid), Some(entry.name.clone()))
        };
        let image_gid = match group_part {
            None => None,
            Some(g) => match g.parse::<u32>() {
                Ok(gid) => Some(gid),
                Err(_) => {
                    let all = groups.insert(load(root, GROUP, parse_group)?);
                    let entry = all
                        .iter()
                        .find(|e| e.name == g)
                        .ok_or_else(|| SpecError::GroupNotFound { group: g.to_string() })?;
                    Some(entry.gid)
                }
            },
        };
        (uid, passwd_gid, image_gid, name)
    };

    let gid = match req.run_as_group {
        Some(g) => check_id("run_as_group", g)?,
        None => image_gid.or(passwd_gid).unwrap_or(0),
    };

    let mut additional = vec![gid];
    if !req.strict_groups
        && let Some(name) = &username
    {
        let all = match groups.take() {
            Some(g) => g,
            None => load(root, GROUP, parse_group)?,
        };
        additional
            .extend(all.iter().filter(|g| g.members.iter().any(|m| m == name)).map(|g| g.gid));
    }
    for g in req.supplemental_groups {
        additional.push(check_id("supplemental_groups", *g)?);
    }
    let mut seen = std::collections::HashSet::new();
    additional.retain(|g| seen.insert(*g));

    Ok(ResolvedUser { uid, gid, additional_gids: additional, username })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    const PASSWD_TEXT: &str = "root:x:0:0:root:/root:/bin/sh\n\
        # comment\n\
        daemon:x:1:1::/:/sbin/nologin\n\
        broken line\n\
        app:x:1000:1001:App:/home/app:/bin/sh\n";
    const GROUP_TEXT: &str = "root:x:0:\n\
        wheel:x:10:root,app\n\
        app:x:1001:\n\
        audio:x:29:app\n\
        staff:x:50:other\n";

    fn rootfs() -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("etc")).unwrap();
        std::fs::write(root.path().join("etc/passwd"), PASSWD_TEXT).unwrap();
        std::fs::write(root.path().join("etc/group"), GROUP_TEXT).unwrap();
        root
    }

    #[test]
    fn image_user_forms() {
        let root = rootfs();
        let r = |image_user: &str| {
            resolve_user(root.path(), &UserRequest { image_user, ..Default::default() })
        };
        let u = r("").unwrap();
        assert_eq!((u.uid, u.gid, u.additional_gids.clone()), (0, 0, vec![0, 10]));
        let u = r("app").unwrap();
        assert_eq!((u.uid, u.gid), (1000, 1001));
        assert_eq!(u.additional_gids, vec![1001, 10, 29]);
        assert_eq!(u.username.as_deref(), Some("app"));
        let u = r("1000").unwrap();
        assert_eq!((u.uid, u.gid), (1000, 1001));
        let u = r("1000:50").unwrap();
        assert_eq!((u.uid, u.gid), (1000, 50));
        assert_eq!(u.additional_gids, vec![50, 10, 29]);
        let u = r("app:staff").unwrap();
        assert_eq!((u.uid, u.gid), (1000, 50));
        let u = r("4242").unwrap();
        assert_eq!((u.uid, u.gid, u.additional_gids), (4242, 0, vec![0]));
        assert!(matches!(r("nobody"), Err(SpecError::UserNotFound { user }) if user == "nobody"));
        assert!(
            matches!(r("app:nogroup"), Err(SpecError::GroupNotFound { group }) if group == "nogroup")
        );
        assert!(matches!(r("a:b:c"), Err(SpecError::InvalidImageUser { .. })));
        assert!(matches!(r("app:"), Err(SpecError::InvalidImageUser { .. })));
    }

    #[test]
    fn security_context_wins() {
        let root = rootfs();
        let u = resolve_user(
            root.path(),
            &UserRequest {
                run_as_user: Some(1000),
                run_as_group: Some(7),
                image_user: "daemon",
                supplemental_groups: &[100, 7],
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!((u.uid, u.gid), (1000, 7));
        assert_eq!(u.additional_gids, vec![7, 10, 29, 100]);

        let u = resolve_user(
            root.path(),
            &UserRequest {
                run_as_username: "app",
                strict_groups: true,
                supplemental_groups: &[100],
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!((u.uid, u.gid), (1000, 1001));
        assert_eq!(u.additional_gids, vec![1001, 100]);

        let err = resolve_user(
            root.path(),
            &UserRequest { run_as_username: "ghost", ..Default::default() },
        );
        assert!(matches!(err, Err(SpecError::UserNotFound { .. })));
    }

    #[test]
    fn bad_ids_and_group_without_user() {
        let root = rootfs();
        let err = resolve_user(
            root.path(),
            &UserRequest { run_as_group: Some(1), image_user: "app", ..Default::default() },
        );
        assert!(matches!(err, Err(SpecError::RunAsGroupWithoutUser)));
        let err =
            resolve_user(root.path(), &UserRequest { run_as_user: Some(-1), ..Default::default() });
        assert!(matches!(err, Err(SpecError::InvalidId { field: "run_as_user", value: -1 })));
        let err = resolve_user(
            root.path(),
            &UserRequest { run_as_user: Some(1), run_as_username: "app", ..Default::default() },
        );
        assert!(matches!(err, Err(SpecError::RunAsUserAndUsername)));
    }

    #[test]
    fn missing_passwd_is_fine_for_numeric_users() {
        let root = tempfile::tempdir().unwrap();
        let u =
            resolve_user(root.path(), &UserRequest { image_user: "123:456", ..Default::default() })
                .unwrap();
        assert_eq!((u.uid, u.gid, u.additional_gids), (123, 456, vec![456]));
        let err =
            resolve_user(root.path(), &UserRequest { image_user: "app", ..Default::default() });
        assert!(matches!(err, Err(SpecError::UserNotFound { .. })));
    }

    #[test]
    fn passwd_symlink_out_of_rootfs_is_not_followed() {
        // A host-side passwd that knows "evil"; the rootfs links to it.
        let host = tempfile::tempdir().unwrap();
        std::fs::write(host.path().join("passwd"), "evil:x:0:0::/:/bin/sh\n").unwrap();
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("etc")).unwrap();
        symlink(host.path().join("passwd"), root.path().join("etc/passwd")).unwrap();
        let err =
            resolve_user(root.path(), &UserRequest { image_user: "evil", ..Default::default() });
        assert!(matches!(err, Err(SpecError::UserNotFound { .. })));
    }
}
