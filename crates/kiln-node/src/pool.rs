//! Warm pools: sandboxes restored from a template ahead of time, paused,
//! and handed to `kiln run` on demand (`kiln template create --pool K`).
//!
//! A pool member is an ordinary sandbox record (`pool` set, state
//! `Pooled`) with an ordinary supervisor, so everything that keeps
//! sandboxes from leaking (orphan reaping, `rm -f`, the template's `users/`
//! registration that keeps its memory file alive) covers it too. Its
//! supervisor restores the template, opens the agent session, pushes a
//! first identity (which also has the guest run, once, the code a claim
//! runs: under TCG that is what makes a claim cheap), pauses the VM (a
//! paused member uses no CPU) and only then *offers* itself.
//!
//! On disk, `<state>/pools/<template>/`:
//! - `size`: how many members the pool keeps (absent = no pool);
//! - `ready/<id>`: one empty file per member that can be claimed. A run
//!   claims a member by unlinking its file: `unlink` succeeds for exactly
//!   one caller, so two runs never get the same member, without a lock;
//! - `.fill.lock`: held by the one process refilling the pool.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::paths::Dirs;

/// The warm pool of one template.
#[derive(Debug, Clone)]
pub struct Pool {
    template: String,
    dir: PathBuf,
}

/// Holds a pool's `.fill.lock` (released on drop).
pub struct FillLock(#[allow(dead_code)] fs::File);

/// The largest pool a template may have.
pub const MAX_SIZE: u32 = 64;

impl Pool {
    /// The pool of template `template` (a validated template name).
    pub fn of(dirs: &Dirs, template: &str) -> Pool {
        Pool {
            template: template.to_string(),
            dir: dirs.state.join("pools").join(template),
        }
    }

    /// Every pool of a state directory that has a directory.
    pub fn all(dirs: &Dirs) -> Vec<Pool> {
        let Ok(rd) = fs::read_dir(dirs.state.join("pools")) else {
            return vec![];
        };
        let mut out: Vec<Pool> = rd
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .filter(|n| crate::snapshot::validate_name(n).is_ok())
            .map(|n| Pool::of(dirs, &n))
            .collect();
        out.sort_by(|a, b| a.template.cmp(&b.template));
        out
    }

    pub fn template(&self) -> &str {
        &self.template
    }

    fn ready_dir(&self) -> PathBuf {
        self.dir.join("ready")
    }

    /// How many members the pool keeps (0: no pool).
    pub fn size(&self) -> u32 {
        fs::read_to_string(self.dir.join("size"))
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .map(|n| n.min(MAX_SIZE))
            .unwrap_or(0)
    }

    /// Sets how many members the pool keeps (written atomically).
    pub fn set_size(&self, n: u32) -> std::io::Result<()> {
        fs::create_dir_all(self.ready_dir())?;
        let tmp = self.dir.join(".size.tmp");
        let mut f = fs::File::create(&tmp)?;
        writeln!(f, "{}", n.min(MAX_SIZE))?;
        f.sync_all()?;
        fs::rename(&tmp, self.dir.join("size"))
    }

    /// Makes sandbox `id` claimable.
    pub fn offer(&self, id: &str) -> std::io::Result<()> {
        fs::create_dir_all(self.ready_dir())?;
        fs::File::create(self.ready_dir().join(id)).map(drop)
    }

    /// Whether sandbox `id` is offered (nobody took it).
    pub fn is_offered(&self, id: &str) -> bool {
        self.ready_dir().join(id).exists()
    }

    /// Makes sandbox `id` unclaimable (idempotent).
    pub fn withdraw(&self, id: &str) {
        let _ = fs::remove_file(self.ready_dir().join(id));
    }

    /// The members that can be claimed, oldest offer first.
    pub fn ready(&self) -> Vec<String> {
        let Ok(rd) = fs::read_dir(self.ready_dir()) else {
            return vec![];
        };
        let mut v: Vec<(std::time::SystemTime, String)> = rd
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_str()?.to_string();
                if !crate::store::valid_id(&name) {
                    return None;
                }
                let t = e.metadata().and_then(|m| m.modified()).ok()?;
                Some((t, name))
            })
            .collect();
        v.sort();
        v.into_iter().map(|(_, n)| n).collect()
    }

    /// Claims one member: its ID, now no longer offered to anybody else.
    pub fn take(&self) -> Option<String> {
        self.ready()
            .into_iter()
            .find(|id| fs::remove_file(self.ready_dir().join(id)).is_ok())
    }

    /// Claims member `id` if it is still offered (a server-assigned ID that
    /// names a member: the server chose it from the node's report).
    pub fn take_one(&self, id: &str) -> Option<String> {
        (crate::store::valid_id(id) && fs::remove_file(self.ready_dir().join(id)).is_ok())
            .then(|| id.to_string())
    }

    /// Waits for, then holds, the right to refill the pool.
    pub fn fill_lock(&self) -> std::io::Result<FillLock> {
        fs::create_dir_all(&self.dir)?;
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.dir.join(".fill.lock"))?;
        f.lock()?;
        Ok(FillLock(f))
    }

    /// Removes the pool's directory (once it has no members).
    pub fn remove_dir(&self) {
        let _ = fs::remove_dir_all(&self.dir);
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_member_is_taken_once_and_in_offer_order() {
        let t = tempfile::tempdir().unwrap();
        let dirs = Dirs::new(t.path().join("state"), t.path().join("cache"));
        let p = Pool::of(&dirs, "tpl-0123456789abcdef");
        assert_eq!(p.size(), 0, "no pool yet");
        assert_eq!(p.take(), None);
        p.set_size(3).unwrap();
        assert_eq!(p.size(), 3);
        p.set_size(1000).unwrap();
        assert_eq!(p.size(), MAX_SIZE, "clamped");
        p.offer("aaaaaaaaaaaaaaaa").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        p.offer("bbbbbbbbbbbbbbbb").unwrap();
        // Junk in the directory is not a member.
        fs::write(p.ready_dir().join("../ready/..x"), b"").ok();
        fs::write(p.ready_dir().join("not-an-id!"), b"").unwrap();
        assert_eq!(p.ready(), vec!["aaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbb"]);
        // Many claimers at once: each member goes to exactly one.
        let got: Vec<Option<String>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8).map(|_| s.spawn(|| p.take())).collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let mut won: Vec<String> = got.into_iter().flatten().collect();
        won.sort();
        assert_eq!(won, vec!["aaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbb"]);
        assert_eq!(p.take(), None);
        p.offer("cccccccccccccccc").unwrap();
        p.withdraw("cccccccccccccccc");
        assert_eq!(p.take(), None);
        assert_eq!(Pool::all(&dirs).len(), 1);
        p.remove_dir();
        assert!(Pool::all(&dirs).is_empty());
    }
}
