//! Sparse files (guest RAM files, writable disks): walking their data
//! extents, and copying them with their holes kept.

use std::fs::File;
use std::path::Path;

use nix::unistd::{Whence, lseek};

/// The data extents `(start, end)` of `f`'s first `size` bytes, in order
/// (`SEEK_DATA`/`SEEK_HOLE`; holes read as zeros and are skipped).
pub fn data_extents(f: &File, size: u64) -> DataExtents<'_> {
    DataExtents { f, pos: 0, size }
}

/// Iterator of [`data_extents`].
pub struct DataExtents<'a> {
    f: &'a File,
    pos: u64,
    size: u64,
}

impl Iterator for DataExtents<'_> {
    type Item = std::io::Result<(u64, u64)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.pos >= self.size {
            return None;
        }
        let found = (|| {
            let start = match lseek(self.f, self.pos as i64, Whence::SeekData) {
                Ok(s) => s as u64,
                Err(nix::errno::Errno::ENXIO) => return Ok(None),
                Err(e) => return Err(std::io::Error::from(e)),
            };
            if start >= self.size {
                return Ok(None);
            }
            let end = (lseek(self.f, start as i64, Whence::SeekHole)? as u64).min(self.size);
            Ok(Some((start, end)))
        })();
        match found {
            Ok(Some((start, end))) => {
                self.pos = end;
                Some(Ok((start, end)))
            }
            Ok(None) => {
                self.pos = self.size;
                None
            }
            Err(e) => {
                self.pos = self.size;
                Some(Err(e))
            }
        }
    }
}

/// Copies `from` to `to` (replacing it) keeping holes (`cp
/// --sparse=always`; no reflink on the ext4 hosts this runs on), so that a
/// mostly untouched RAM file or disk costs only what it holds. On failure
/// `to` is removed; the error carries `cp`'s message.
pub async fn copy(from: &Path, to: &Path) -> std::io::Result<()> {
    let _ = std::fs::remove_file(to);
    let out = tokio::process::Command::new("cp")
        .arg("--sparse=always")
        .arg(from)
        .arg(to)
        .output()
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot run cp: {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        let _ = std::fs::remove_file(to);
        Err(std::io::Error::other(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}

/// Copies `from` to `to` (which must not exist) keeping holes, in this
/// process: each data extent is copied with `copy_file_range` (through
/// `std::io::copy`). For small sparse files on a start path, where
/// spawning `cp` would cost more than the copy. On failure `to` is removed.
pub fn copy_in_process(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let src = File::open(from)?;
    let size = src.metadata()?.len();
    let dst = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(to)?;
    let run = || -> std::io::Result<()> {
        dst.set_len(size)?;
        for ext in data_extents(&src, size) {
            let (start, end) = ext?;
            (&src).seek(SeekFrom::Start(start))?;
            (&dst).seek(SeekFrom::Start(start))?;
            let n = std::io::copy(&mut (&src).take(end - start), &mut &dst)?;
            if n != end - start {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("{} shrank while being copied", from.display()),
                ));
            }
        }
        Ok(())
    };
    run().inspect_err(|_| {
        let _ = std::fs::remove_file(to);
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};

    #[test]
    fn in_process_copy_keeps_data_and_holes() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("f");
        let mut f = std::fs::File::create(&p).unwrap();
        f.set_len(16 << 20).unwrap();
        f.seek(SeekFrom::Start(3 << 20)).unwrap();
        f.write_all(&[7u8; 8192]).unwrap();
        drop(f);
        let q = t.path().join("g");
        copy_in_process(&p, &q).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), std::fs::read(&q).unwrap());
        use std::os::unix::fs::MetadataExt;
        assert!(std::fs::metadata(&q).unwrap().blocks() * 512 < 1 << 20);
        // The destination must not exist; a failed copy leaves nothing.
        assert!(copy_in_process(&p, &q).is_err());
        assert!(q.exists(), "an existing destination is not removed");
        let missing = t.path().join("missing");
        let r = t.path().join("r");
        assert!(copy_in_process(&missing, &r).is_err());
        assert!(!r.exists());
    }

    #[test]
    fn extents_skip_holes_and_stop_at_size() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("f");
        let mut f = std::fs::File::create(&p).unwrap();
        f.set_len(16 << 20).unwrap();
        for off in [1u64 << 20, 8 << 20] {
            f.seek(SeekFrom::Start(off)).unwrap();
            f.write_all(&[1u8; 4096]).unwrap();
        }
        drop(f);
        let f = std::fs::File::open(&p).unwrap();
        let all: Vec<(u64, u64)> = data_extents(&f, 16 << 20).map(Result::unwrap).collect();
        assert_eq!(all.len(), 2, "{all:?}");
        assert!(all[0].0 <= 1 << 20 && all[0].1 >= (1 << 20) + 4096);
        assert!(all[1].0 <= 8 << 20 && all[1].1 >= (8 << 20) + 4096);
        // Only the first 4 MiB: one extent, cut at the size.
        let some: Vec<(u64, u64)> = data_extents(&f, 4 << 20).map(Result::unwrap).collect();
        assert_eq!(some.len(), 1);
        assert!(some[0].1 <= 4 << 20);
    }

    #[tokio::test]
    async fn copy_keeps_contents_and_reports_failures() {
        let t = tempfile::tempdir().unwrap();
        let from = t.path().join("from");
        std::fs::write(&from, b"data").unwrap();
        let to = t.path().join("to");
        copy(&from, &to).await.unwrap();
        assert_eq!(std::fs::read(&to).unwrap(), b"data");
        let err = copy(&t.path().join("missing"), &to).await.unwrap_err();
        assert!(!err.to_string().is_empty());
        assert!(!to.exists(), "a failed copy leaves nothing");
    }
}
