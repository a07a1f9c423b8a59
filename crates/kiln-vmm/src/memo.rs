//! Remembers facts computed from a file (a digest, a binary's version) for
//! as long as the file provably has not changed, so that starting a
//! sandbox does not re-hash a kernel or re-run `qemu --version` every time.
//!
//! A fact is keyed by what was computed and the file's `stat`: device,
//! inode, size, modification and *change* time in nanoseconds (not its
//! path: a snapshot is hashed in its staging directory and used after that
//! directory was renamed). Any write, truncation, `chmod` or replacement
//! changes at least one of them, and the change time cannot be
//! set back by an unprivileged process, so a remembered fact is never used
//! for different contents short of a privileged user deliberately forging
//! timestamps (who could as well replace Kiln). A fact computed while the
//! file changed under it is not remembered.
//!
//! Timestamps are only as fine as the kernel keeps them (a clock tick on
//! some kernels): a write in the same tick as the hashing could leave the
//! stamp unchanged. So, as git does with "racily clean" files, a fact is
//! remembered only about a file whose last change is at least
//! [`SETTLE`] old; younger files are hashed every time.
//!
//! One small file per fact, `<dir>/<sha256 of the key>`, holding the key
//! and the value; written atomically. Entries of replaced files are never
//! used again and are tiny; the directory is a cache and can be deleted at
//! any time.

use std::fs;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// How long ago a file must have last changed for a fact about it to be
/// remembered.
pub const SETTLE: std::time::Duration = std::time::Duration::from_secs(2);

/// A directory of remembered facts.
#[derive(Debug, Clone)]
pub struct Memo {
    dir: PathBuf,
    settle: std::time::Duration,
}

impl Memo {
    pub fn at(dir: impl Into<PathBuf>) -> Memo {
        Memo {
            dir: dir.into(),
            settle: SETTLE,
        }
    }

    /// Another settling time than [`SETTLE`] (tests).
    pub fn with_settle(mut self, settle: std::time::Duration) -> Memo {
        self.settle = settle;
        self
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The fact `what` about `file` as it is now: remembered, or computed
    /// by `compute` (and remembered if the file did not change meanwhile).
    pub fn get_or<E>(
        &self,
        file: &Path,
        what: &str,
        compute: impl FnOnce() -> Result<String, E>,
    ) -> Result<String, E> {
        let Some(before) = stamp(file, what, self.settle) else {
            return compute();
        };
        if let Some(v) = self.read(&before) {
            return Ok(v);
        }
        let v = compute()?;
        if stamp(file, what, self.settle).as_ref() == Some(&before) {
            self.write(&before, &v);
        }
        Ok(v)
    }

    /// Remembers `value` as the fact `what` about `file` if the file's
    /// state is still `before` (from [`Memo::stamp`], taken before the value
    /// was computed).
    pub fn remember(&self, file: &Path, what: &str, before: &Stamp, value: &str) {
        if stamp(file, what, self.settle).as_ref() == Some(before) {
            self.write(before, value);
        }
    }

    /// The state of `file` a fact `what` would be keyed by.
    pub fn stamp(&self, file: &Path, what: &str) -> Option<Stamp> {
        stamp(file, what, self.settle)
    }

    fn entry(&self, s: &Stamp) -> PathBuf {
        let h = Sha256::digest(s.key.as_bytes());
        let name: String = h.iter().map(|b| format!("{b:02x}")).collect();
        self.dir.join(name)
    }

    fn read(&self, s: &Stamp) -> Option<String> {
        let body = fs::read_to_string(self.entry(s)).ok()?;
        let (key, value) = body.split_once('\n')?;
        (key == s.key).then(|| value.to_string())
    }

    fn write(&self, s: &Stamp, value: &str) {
        if value.contains('\n') || !s.settled || fs::create_dir_all(&self.dir).is_err() {
            return;
        }
        let path = self.entry(s);
        let tmp = self
            .dir
            .join(format!(".tmp-{}-{}", std::process::id(), unique()));
        let written = fs::File::create(&tmp).and_then(|mut f| {
            f.write_all(s.key.as_bytes())?;
            f.write_all(b"\n")?;
            f.write_all(value.as_bytes())
        });
        if written.and_then(|()| fs::rename(&tmp, &path)).is_err() {
            let _ = fs::remove_file(&tmp);
        }
    }
}

/// What a fact about a file is keyed by (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stamp {
    key: String,
    /// The file last changed at least `SETTLE` ago.
    settled: bool,
}

fn stamp(file: &Path, what: &str, settle: std::time::Duration) -> Option<Stamp> {
    let m = fs::metadata(file).ok()?;
    if !m.is_file() || what.contains('\0') {
        return None;
    }
    let changed = std::time::UNIX_EPOCH
        + std::time::Duration::new(u64::try_from(m.mtime().max(m.ctime())).unwrap_or(0), 0);
    let settled = changed
        .elapsed()
        // Whole seconds: one more covers the truncated part.
        .is_ok_and(|age| settle.is_zero() || age >= settle + std::time::Duration::from_secs(1));
    Some(Stamp {
        settled,
        key: format!(
            "kiln-memo-v1\0{what}\0{}\0{}\0{}\0{}.{}\0{}.{}",
            m.dev(),
            m.ino(),
            m.size(),
            m.mtime(),
            m.mtime_nsec(),
            m.ctime(),
            m.ctime_nsec()
        ),
    })
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fact_is_reused_until_the_file_changes() {
        let t = tempfile::tempdir().unwrap();
        let memo = Memo::at(t.path().join("memo")).with_settle(std::time::Duration::ZERO);
        let f = t.path().join("kernel");
        fs::write(&f, b"one").unwrap();
        let mut calls = 0;
        let mut get = |memo: &Memo| {
            memo.get_or(&f, "sha", || {
                calls += 1;
                Ok::<_, ()>(format!("v{calls}"))
            })
            .unwrap()
        };
        assert_eq!(get(&memo), "v1");
        assert_eq!(get(&memo), "v1", "remembered");
        // Same size, rewritten in place: a new fact.
        std::thread::sleep(std::time::Duration::from_millis(20));
        fs::write(&f, b"two").unwrap();
        assert_eq!(get(&memo), "v2");
        assert_eq!(get(&memo), "v2");
        // Another fact about the same file is kept apart.
        let other = memo.get_or(&f, "version", || Ok::<_, ()>("x".into()));
        assert_eq!(other.unwrap(), "x");
        // Its directory renamed (a snapshot published from staging): the
        // same file, the same fact.
        let sub = t.path().join("staging");
        fs::create_dir(&sub).unwrap();
        fs::copy(&f, sub.join("file")).unwrap();
        let first = memo.get_or(&sub.join("file"), "sha", || Ok::<_, ()>("s".into()));
        assert_eq!(first.unwrap(), "s");
        fs::rename(&sub, t.path().join("published")).unwrap();
        let again = memo.get_or(&t.path().join("published/file"), "sha", || {
            Ok::<_, ()>("recomputed".into())
        });
        assert_eq!(again.unwrap(), "s");
        // Replaced by another file (new inode).
        let g = t.path().join("new");
        fs::write(&g, b"two").unwrap();
        fs::rename(&g, &f).unwrap();
        assert_eq!(get(&memo), "v3");
        // A missing file is never remembered.
        let missing = t.path().join("missing");
        let r = memo.get_or(&missing, "sha", || Err::<String, _>("gone"));
        assert_eq!(r, Err("gone"));
        // A corrupt entry is not believed.
        for e in fs::read_dir(memo.dir()).unwrap() {
            fs::write(e.unwrap().path(), b"garbage").unwrap();
        }
        assert_eq!(get(&memo), "v4");
    }

    #[test]
    fn a_value_computed_while_the_file_changed_is_not_remembered() {
        let t = tempfile::tempdir().unwrap();
        let memo = Memo::at(t.path().join("memo")).with_settle(std::time::Duration::ZERO);
        let f = t.path().join("disk");
        fs::write(&f, b"a").unwrap();
        let s = memo.stamp(&f, "sha").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        fs::write(&f, b"b").unwrap();
        memo.remember(&f, "sha", &s, "stale");
        let v = memo.get_or(&f, "sha", || Ok::<_, ()>("fresh".into()));
        assert_eq!(v.unwrap(), "fresh");
    }

    #[test]
    fn a_file_changed_just_now_is_never_trusted() {
        // Its timestamps may not have moved yet for a write to come.
        let t = tempfile::tempdir().unwrap();
        let memo = Memo::at(t.path().join("memo"));
        let f = t.path().join("fresh");
        fs::write(&f, b"x").unwrap();
        let mut calls = 0;
        for _ in 0..2 {
            let v = memo.get_or(&f, "sha", || {
                calls += 1;
                Ok::<_, ()>("v".into())
            });
            assert_eq!(v.unwrap(), "v");
        }
        assert_eq!(calls, 2, "remembered a file changed this instant");
    }
}
