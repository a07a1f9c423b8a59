//! Host-wide address claims: one network (bridge, subnet, tap prefix) is
//! shared by every state directory on the host, but each state directory
//! keeps its own lease table. The claims make one address belong to one
//! live sandbox across all of them.
//!
//! Layout, per bridge: `<root>/<bridge>/lock` (an `flock` held across every
//! read-decide-write below) and one file `ip-<a.b.c.d>` per claimed address,
//! created with `O_EXCL`, naming its owner: the lease table's directory, the
//! sandbox id and the interface. A claim is live while its owner's lease
//! table holds a lease for that id with that address; otherwise (state
//! directory deleted, lease released by a process that crashed before
//! removing its claim, unreadable claim left by a crash mid-write) it is
//! stale and may be taken over. The lock orders all of this, so a claim is
//! never seen without its lease while its owner is between the two writes.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::ipam::{IpamError, Lease};

/// Who holds an address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    /// The directory of the owner's lease table (absolute, canonical).
    pub state: PathBuf,
    pub id: String,
    pub ifname: String,
}

/// The claims of one bridge.
#[derive(Debug, Clone)]
pub struct Claims {
    dir: PathBuf,
}

/// The held host-wide lock of one bridge's claims.
#[derive(Debug)]
pub struct HostLock(#[allow(dead_code)] Flock<File>);

/// The lease tables' fields a claim check needs (any version, any subnet).
#[derive(Deserialize)]
struct Leases {
    #[serde(default)]
    leases: std::collections::BTreeMap<String, Lease>,
}

impl Claims {
    pub fn new(dir: &Path) -> Claims {
        Claims {
            dir: dir.to_owned(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, ip: Ipv4Addr) -> PathBuf {
        self.dir.join(format!("ip-{ip}"))
    }

    /// Takes the host-wide lock. The lock file may be unlinked by
    /// [`Claims::remove_if_empty`]; a lock taken on an unlinked file is
    /// retried on the new one, so two processes never both hold it.
    pub fn lock(&self) -> Result<HostLock, IpamError> {
        let path = self.dir.join("lock");
        loop {
            fs::create_dir_all(&self.dir).map_err(|e| IpamError::Write(self.dir.clone(), e))?;
            let f = match OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
            {
                Ok(f) => f,
                // The directory was removed by a teardown meanwhile.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(IpamError::Write(path, e)),
            };
            let held = Flock::lock(f, FlockArg::LockExclusive)
                .map_err(|(_, e)| IpamError::Lock(path.clone(), e))?;
            let ours = held
                .metadata()
                .map_err(|e| IpamError::Read(path.clone(), e))?;
            match fs::metadata(&path) {
                Ok(m) if m.ino() == ours.ino() && m.dev() == ours.dev() => {
                    return Ok(HostLock(held));
                }
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(IpamError::Read(path, e)),
            }
        }
    }

    /// The claim on `ip`, if any: `Some(None)` for an unreadable one.
    fn read(&self, _lock: &HostLock, ip: Ipv4Addr) -> Result<Option<Option<Owner>>, IpamError> {
        let path = self.path(ip);
        match fs::read(&path) {
            Ok(b) => Ok(Some(serde_json::from_slice(&b).ok())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(IpamError::Read(path, e)),
        }
    }

    /// Claims `ip` for `owner`: true when it is now `owner`'s (it was free,
    /// stale, or already `owner`'s), false when another live sandbox holds it.
    pub fn claim(&self, lock: &HostLock, ip: Ipv4Addr, owner: &Owner) -> Result<bool, IpamError> {
        let path = self.path(ip);
        let bytes = serde_json::to_vec(owner).expect("a claim serialises");
        match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(mut f) => {
                f.write_all(&bytes)
                    .map_err(|e| IpamError::Write(path.clone(), e))?;
                return Ok(true);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(IpamError::Write(path, e)),
        }
        match self.read(lock, ip)? {
            Some(Some(c)) if c.state == owner.state && c.id == owner.id => {
                if c.ifname != owner.ifname {
                    crate::ipam::write_atomic(&path, &bytes)?;
                }
                Ok(true)
            }
            Some(Some(c)) if is_live(ip, &c) => Ok(false),
            stale => {
                tracing::warn!(%ip, claim = ?stale, "taking over a stale address claim");
                crate::ipam::write_atomic(&path, &bytes)?;
                Ok(true)
            }
        }
    }

    /// Removes the claim on `ip` if `state`/`id` hold it.
    pub fn release(
        &self,
        lock: &HostLock,
        ip: Ipv4Addr,
        state: &Path,
        id: &str,
    ) -> Result<(), IpamError> {
        if let Some(Some(c)) = self.read(lock, ip)?
            && c.state == state
            && c.id == id
        {
            let path = self.path(ip);
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(IpamError::Write(path, e)),
            }
        }
        Ok(())
    }

    /// Every live claim; stale ones are removed on the way.
    pub fn live(&self, lock: &HostLock) -> Result<Vec<(Ipv4Addr, Owner)>, IpamError> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => return Err(IpamError::Read(self.dir.clone(), e)),
        };
        let mut out = Vec::new();
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(ip) = name
                .strip_prefix("ip-")
                .and_then(|s| s.parse::<Ipv4Addr>().ok())
            else {
                continue;
            };
            match self.read(lock, ip)? {
                Some(Some(c)) if is_live(ip, &c) => out.push((ip, c)),
                Some(_) => {
                    tracing::info!(%ip, "removing a stale address claim");
                    let _ = fs::remove_file(e.path());
                }
                None => {}
            }
        }
        Ok(out)
    }

    /// Removes the claims directory (and its lock file) when no claim is
    /// left in it; consumes the lock.
    pub fn remove_if_empty(&self, lock: HostLock) -> Result<bool, IpamError> {
        if !self.live(&lock)?.is_empty() {
            return Ok(false);
        }
        let lock_path = self.dir.join("lock");
        let _ = fs::remove_file(&lock_path);
        drop(lock);
        // Another process may have recreated it meanwhile: then it stays.
        let _ = fs::remove_dir(&self.dir);
        Ok(true)
    }
}

/// Whether `c`'s owner's lease table still holds its lease on `ip`. An
/// unreadable table counts as live (never hand out what may be in use).
fn is_live(ip: Ipv4Addr, c: &Owner) -> bool {
    let path = c.state.join("leases.json");
    match fs::read(&path) {
        Ok(b) => match serde_json::from_slice::<Leases>(&b) {
            Ok(t) => t.leases.get(&c.id).is_some_and(|l| l.ip == ip),
            Err(_) => true,
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipam::Ipam;

    fn net() -> ipnet::Ipv4Net {
        "10.7.0.0/24".parse().expect("cidr")
    }

    #[test]
    fn stale_claims_are_taken_over_and_release_spares_others() {
        let root = tempfile::tempdir().expect("tempdir");
        let claims = root.path().join("claims");
        let a = Ipam::new(&root.path().join("a"), net())
            .and_then(|i| i.with_claims(&claims))
            .expect("a");
        let b = Ipam::new(&root.path().join("b"), net())
            .and_then(|i| i.with_claims(&claims))
            .expect("b");
        let la = a.allocate("s1", "t1").expect("a s1");
        let lb = b.allocate("s1", "t1").expect("b s1");
        assert_ne!(la.ip, lb.ip, "same id, two state dirs, two addresses");
        // b releasing a's address (by a claim check) does nothing.
        let c = Claims::new(&claims);
        let lock = c.lock().expect("lock");
        c.release(&lock, la.ip, &root.path().join("b"), "s1")
            .expect("release");
        assert_eq!(c.live(&lock).expect("live").len(), 2);
        // A crash between a lease's removal and its claim's: the claim is
        // stale (its lease is gone) and is collected.
        let stale = Owner {
            state: fs::canonicalize(root.path().join("a")).expect("canon"),
            id: "gone".into(),
            ifname: "t9".into(),
        };
        let ip9 = Ipv4Addr::new(10, 7, 0, 9);
        assert!(c.claim(&lock, ip9, &stale).expect("claim"));
        // An unreadable claim (a crash mid-write) is stale too.
        let ip10 = Ipv4Addr::new(10, 7, 0, 10);
        fs::write(claims.join(format!("ip-{ip10}")), b"{\"sta").expect("write");
        // A claim of a deleted state dir is stale.
        let ip11 = Ipv4Addr::new(10, 7, 0, 11);
        let deleted = Owner {
            state: root.path().join("nowhere"),
            id: "x".into(),
            ifname: "t".into(),
        };
        assert!(c.claim(&lock, ip11, &deleted).expect("claim"));
        // A live claim is refused to another owner.
        let other = Owner {
            state: root.path().join("b"),
            id: "s2".into(),
            ifname: "t2".into(),
        };
        assert!(!c.claim(&lock, la.ip, &other).expect("claim"));
        assert!(c.claim(&lock, ip10, &other).expect("takes over corrupt"));
        drop(lock);
        let lock = c.lock().expect("lock");
        let live = c.live(&lock).expect("live");
        drop(lock);
        // ip9 and ip11 were collected, ip10 is `other`'s, which has no lease
        // in b's table either: collected as well.
        assert_eq!(live.len(), 2, "{live:?}");
        assert!(!claims.join(format!("ip-{ip9}")).exists());
        a.release("s1").expect("release");
        b.release("s1").expect("release");
        assert!(b.remove_claims_dir().expect("remove"));
        assert!(!claims.exists());
    }
}
