//! User and group resolution from the image's `/etc/passwd` and `/etc/group`,
//! parsed here: a static glibc binary must never call NSS.

/// A resolved identity to run a process as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (including the primary one).
    pub groups: Vec<u32>,
    pub home: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswdEntry {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupEntry {
    pub name: String,
    pub gid: u32,
    pub members: Vec<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResolveUserError {
    #[error("unable to find user {0}: no matching entries in passwd file")]
    NoUser(String),
    #[error("unable to find group {0}: no matching entries in group file")]
    NoGroup(String),
    #[error("invalid user specification {0:?}")]
    Invalid(String),
}

/// Parses `/etc/passwd` text; malformed lines are skipped.
pub fn parse_passwd(text: &str) -> Vec<PasswdEntry> {
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 4 {
                return None;
            }
            Some(PasswdEntry {
                name: f[0].to_string(),
                uid: f[2].parse().ok()?,
                gid: f[3].parse().ok()?,
                home: f.get(5).map(|s| s.to_string()).unwrap_or_default(),
            })
        })
        .collect()
}

/// Parses `/etc/group` text; malformed lines are skipped.
pub fn parse_group(text: &str) -> Vec<GroupEntry> {
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 3 {
                return None;
            }
            Some(GroupEntry {
                name: f[0].to_string(),
                gid: f[2].parse().ok()?,
                members: f
                    .get(3)
                    .map(|m| {
                        m.split(',')
                            .filter(|s| !s.is_empty())
                            .map(str::to_string)
                            .collect()
                    })
                    .unwrap_or_default(),
            })
        })
        .collect()
}

/// Resolves `spec` (`user`, `uid`, `user:group`, `uid:gid`, or empty = root).
/// A numeric uid absent from the passwd file runs with gid 0, like Docker.
pub fn resolve(
    spec: &str,
    passwd: &[PasswdEntry],
    groups: &[GroupEntry],
) -> Result<Identity, ResolveUserError> {
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    if user.is_empty() && group.is_none() {
        return resolve("0", passwd, groups);
    }
    if user.is_empty() || group.is_some_and(str::is_empty) {
        return Err(ResolveUserError::Invalid(spec.to_string()));
    }
    let entry = match user.parse::<u32>() {
        Ok(uid) => passwd
            .iter()
            .find(|e| e.uid == uid)
            .cloned()
            .or(Some(PasswdEntry {
                name: String::new(),
                uid,
                gid: 0,
                home: "/".into(),
            })),
        Err(_) => passwd.iter().find(|e| e.name == user).cloned(),
    }
    .ok_or_else(|| ResolveUserError::NoUser(user.to_string()))?;
    let gid = match group {
        None => entry.gid,
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => groups
                .iter()
                .find(|e| e.name == g)
                .map(|e| e.gid)
                .ok_or_else(|| ResolveUserError::NoGroup(g.to_string()))?,
        },
    };
    let mut sup = vec![gid];
    if group.is_none() && !entry.name.is_empty() {
        for g in groups {
            if g.members.contains(&entry.name) && !sup.contains(&g.gid) {
                sup.push(g.gid);
            }
        }
    }
    Ok(Identity {
        uid: entry.uid,
        gid,
        groups: sup,
        home: Some(entry.home).filter(|h| !h.is_empty()),
    })
}

/// Resolves `spec` against the files of the running root.
pub fn resolve_in_root(spec: &str) -> Result<Identity, ResolveUserError> {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let group = std::fs::read_to_string("/etc/group").unwrap_or_default();
    resolve(spec, &parse_passwd(&passwd), &parse_group(&group))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n# comment\nbroken line\nalice:x:1000:1000::/home/alice:/bin/sh\nbob:x:1001:100:Bob:/home/bob:/bin/sh\n";
    const GROUP: &str =
        "root:x:0:\nusers:x:100:alice\nalice:x:1000:\nwheel:x:10:alice,bob\nbad:x:notanumber:\n";

    fn r(spec: &str) -> Result<Identity, ResolveUserError> {
        resolve(spec, &parse_passwd(PASSWD), &parse_group(GROUP))
    }

    #[test]
    fn parses_and_skips_malformed() {
        assert_eq!(parse_passwd(PASSWD).len(), 3);
        assert_eq!(parse_group(GROUP).len(), 4);
    }

    #[test]
    fn by_name_with_supplementary_groups() {
        let id = r("alice").unwrap();
        assert_eq!((id.uid, id.gid), (1000, 1000));
        assert_eq!(id.groups, vec![1000, 100, 10]);
        assert_eq!(id.home.as_deref(), Some("/home/alice"));
    }

    #[test]
    fn by_uid_known_and_unknown() {
        assert_eq!(r("1001").unwrap().gid, 100);
        let id = r("4242").unwrap();
        assert_eq!((id.uid, id.gid), (4242, 0));
        assert_eq!(r("").unwrap().uid, 0);
    }

    #[test]
    fn with_group() {
        let id = r("alice:wheel").unwrap();
        assert_eq!((id.uid, id.gid, id.groups.clone()), (1000, 10, vec![10]));
        assert_eq!(r("1000:55").unwrap().gid, 55);
        assert_eq!(
            r("bob:nosuch"),
            Err(ResolveUserError::NoGroup("nosuch".into()))
        );
    }

    #[test]
    fn errors() {
        assert_eq!(
            r("mallory"),
            Err(ResolveUserError::NoUser("mallory".into()))
        );
        assert!(matches!(r(":10"), Err(ResolveUserError::Invalid(_))));
        assert!(matches!(r("alice:"), Err(ResolveUserError::Invalid(_))));
    }
}
