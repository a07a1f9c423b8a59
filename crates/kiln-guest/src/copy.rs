//! File copies as tar streams. Unpacking never writes outside the
//! destination: names must be relative without `..`, no existing symlink is
//! followed on the way to an entry, and links may not point outside.
//!
//! Every regular file is written under a temporary name in its own
//! directory (`.kiln-cp-<pid>-<n>`) and renamed over its final name only
//! once complete, so a copy that fails or is cancelled half-way leaves the
//! file it was replacing untouched and no temporary behind.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("destination {0} is not a directory")]
    NotADirectory(String),
    #[error("unsafe path {0:?} in archive")]
    UnsafePath(String),
    #[error("link {name:?} -> {target:?} escapes the destination")]
    EscapingLink { name: String, target: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("reading the archive: {0}")]
    Archive(#[source] std::io::Error),
    #[error("the copy was cancelled")]
    Cancelled,
}

/// Prefix of the temporary names of files being copied in.
pub const TEMP_PREFIX: &str = ".kiln-cp-";

/// A file being written under a temporary name; removed unless persisted.
struct TempFile {
    path: PathBuf,
    done: bool,
}

impl TempFile {
    fn create(dir: &Path) -> Result<(TempFile, fs::File), CopyError> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        loop {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let path = dir.join(format!("{TEMP_PREFIX}{}-{n}", std::process::id()));
            match fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(f) => return Ok((TempFile { path, done: false }, f)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io(&path)(e)),
            }
        }
    }

    /// Renames the file over `target` (atomically replacing a file or
    /// symlink there; never following one).
    fn persist(mut self, target: &Path) -> Result<(), CopyError> {
        if fs::symlink_metadata(target).is_ok_and(|m| m.is_dir()) {
            return Err(CopyError::Io {
                path: target.display().to_string(),
                source: std::io::Error::other("a directory is in the way"),
            });
        }
        fs::rename(&self.path, target).map_err(io(target))?;
        self.done = true;
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.done {
            let _ = fs::remove_file(&self.path);
        }
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CopyError + '_ {
    move |source| CopyError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Normalises an archive member name into safe relative components, or
/// rejects it.
pub fn safe_relative(name: &Path) -> Result<PathBuf, CopyError> {
    let mut out = PathBuf::new();
    for c in name.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => {
                return Err(CopyError::UnsafePath(name.display().to_string()));
            }
        }
    }
    Ok(out)
}

/// Whether a symlink at `rel` (relative to the destination) pointing to
/// `target` stays inside the destination.
pub fn link_stays_inside(rel: &Path, target: &Path) -> bool {
    if target.is_absolute() {
        return false;
    }
    // Depth of the directory holding the link.
    let mut depth: i64 = rel.components().count() as i64 - 1;
    for c in target.components() {
        match c {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::ParentDir => {
                depth -= 1;
                if depth < 0 {
                    return false;
                }
            }
            Component::RootDir | Component::Prefix(_) => return false,
        }
    }
    true
}

/// Creates the parent directories of `rel` under `dest`, refusing to pass
/// through a symlink.
fn prepare_parent(dest: &Path, rel: &Path) -> Result<(), CopyError> {
    let mut cur = dest.to_path_buf();
    let comps: Vec<_> = rel.components().collect();
    for c in comps.iter().take(comps.len().saturating_sub(1)) {
        cur.push(c);
        match fs::symlink_metadata(&cur) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(CopyError::UnsafePath(rel.display().to_string()));
            }
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(CopyError::UnsafePath(rel.display().to_string())),
            Err(_) => fs::create_dir(&cur).map_err(io(&cur))?,
        }
    }
    Ok(())
}

/// Removes whatever non-directory sits at `p` (never following a symlink).
fn remove_existing(p: &Path) -> Result<(), CopyError> {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => Err(CopyError::Io {
            path: p.display().to_string(),
            source: std::io::Error::other("a directory is in the way"),
        }),
        Ok(_) => fs::remove_file(p).map_err(io(p)),
        Err(_) => Ok(()),
    }
}

/// Unpacks the tar stream `r` under the directory `dest`. Once `cancel` is
/// set (the host went away before the end of the stream) nothing more is
/// put in place.
pub fn unpack(r: impl Read, dest: &Path, cancel: &AtomicBool) -> Result<u64, CopyError> {
    if !fs::metadata(dest).is_ok_and(|m| m.is_dir()) {
        return Err(CopyError::NotADirectory(dest.display().to_string()));
    }
    let mut ar = tar::Archive::new(r);
    let mut count = 0;
    for entry in ar.entries().map_err(CopyError::Archive)? {
        let mut entry = entry.map_err(CopyError::Archive)?;
        let name = entry.path().map_err(CopyError::Archive)?.into_owned();
        let rel = safe_relative(&name)?;
        if rel.as_os_str().is_empty() {
            continue; // "./"
        }
        prepare_parent(dest, &rel)?;
        let path = dest.join(&rel);
        let h = entry.header();
        let mode = h.mode().unwrap_or(0o644) & 0o7777;
        let (uid, gid) = (h.uid().ok(), h.gid().ok());
        let kind = h.entry_type();
        if kind.is_dir() {
            match fs::symlink_metadata(&path) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => return Err(CopyError::UnsafePath(rel.display().to_string())),
                Err(_) => fs::create_dir(&path).map_err(io(&path))?,
            }
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).map_err(io(&path))?;
        } else if kind.is_file() || kind.is_gnu_sparse() || kind == tar::EntryType::Continuous {
            let parent = path.parent().unwrap_or(dest);
            let (tmp, mut f) = TempFile::create(parent)?;
            let want = entry.size();
            let got = std::io::copy(&mut entry, &mut f).map_err(CopyError::Archive)?;
            if got != want {
                // The stream ended inside the file: the host went away.
                return Err(CopyError::Archive(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!(
                        "{}: the archive ended after {got} of {want} bytes",
                        rel.display()
                    ),
                )));
            }
            f.flush().map_err(io(&path))?;
            fs::set_permissions(&tmp.path, fs::Permissions::from_mode(mode)).map_err(io(&path))?;
            if let (Some(uid), Some(gid)) = (uid, gid) {
                let _ =
                    std::os::unix::fs::fchown(&f, u32::try_from(uid).ok(), u32::try_from(gid).ok());
                let _ = fs::set_permissions(&tmp.path, fs::Permissions::from_mode(mode));
            }
            drop(f);
            if cancel.load(Ordering::SeqCst) {
                return Err(CopyError::Cancelled);
            }
            tmp.persist(&path)?;
            count += 1;
            continue;
        } else if kind.is_symlink() {
            let target = entry
                .link_name()
                .map_err(CopyError::Archive)?
                .unwrap_or_default()
                .into_owned();
            if !link_stays_inside(&rel, &target) {
                return Err(CopyError::EscapingLink {
                    name: rel.display().to_string(),
                    target: target.display().to_string(),
                });
            }
            remove_existing(&path)?;
            symlink(&target, &path).map_err(io(&path))?;
        } else if kind.is_hard_link() {
            let target = entry
                .link_name()
                .map_err(CopyError::Archive)?
                .unwrap_or_default()
                .into_owned();
            let trel = safe_relative(&target).map_err(|_| CopyError::EscapingLink {
                name: rel.display().to_string(),
                target: target.display().to_string(),
            })?;
            prepare_parent(dest, &trel)?;
            let tpath = dest.join(&trel);
            if fs::symlink_metadata(&tpath).is_ok_and(|m| m.file_type().is_symlink() || m.is_dir())
            {
                return Err(CopyError::UnsafePath(trel.display().to_string()));
            }
            remove_existing(&path)?;
            fs::hard_link(&tpath, &path).map_err(io(&path))?;
        } else {
            // Devices, fifos and extension headers are skipped.
            continue;
        }
        if cancel.load(Ordering::SeqCst) {
            return Err(CopyError::Cancelled);
        }
        if let (Some(uid), Some(gid)) = (uid, gid) {
            // Best effort: ownership as recorded in the archive.
            let _ =
                std::os::unix::fs::lchown(&path, u32::try_from(uid).ok(), u32::try_from(gid).ok());
            if !kind.is_symlink() {
                let _ = fs::set_permissions(&path, fs::Permissions::from_mode(mode));
            }
        }
        count += 1;
    }
    Ok(count)
}

/// Writes `path` (a file, symlink or directory tree) as a tar stream to `w`.
/// Members are named after `path`'s last component.
pub fn pack(path: &Path, w: impl Write) -> Result<(), CopyError> {
    let meta = fs::symlink_metadata(path).map_err(io(path))?;
    let name = path
        .file_name()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    let mut b = tar::Builder::new(w);
    b.follow_symlinks(false);
    if meta.is_dir() {
        b.append_dir_all(&name, path).map_err(io(path))?;
    } else {
        b.append_path_with_name(path, &name).map_err(io(path))?;
    }
    b.into_inner()
        .map_err(io(path))?
        .flush()
        .map_err(io(path))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_with(entries: &[(&str, tar::EntryType, &str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, kind, link, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            // Write the raw name so that unsafe names survive the builder.
            let gnu = h.as_gnu_mut().unwrap();
            gnu.name[..name.len()].copy_from_slice(name.as_bytes());
            if !link.is_empty() {
                gnu.linkname[..link.len()].copy_from_slice(link.as_bytes());
            }
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn relative_names() {
        assert_eq!(
            safe_relative(Path::new("./a/./b")).unwrap(),
            PathBuf::from("a/b")
        );
        assert!(safe_relative(Path::new("a/../../b")).is_err());
        assert!(safe_relative(Path::new("/etc/passwd")).is_err());
    }

    #[test]
    fn links() {
        assert!(link_stays_inside(Path::new("a/l"), Path::new("../b")));
        assert!(!link_stays_inside(Path::new("a/l"), Path::new("../../b")));
        assert!(!link_stays_inside(Path::new("l"), Path::new("/etc")));
        assert!(link_stays_inside(Path::new("l"), Path::new("x/../y")));
    }

    #[test]
    fn unpack_rejects_escapes() {
        use tar::EntryType as E;
        let t = tempfile::tempdir().unwrap();
        let dest = t.path().join("d");
        fs::create_dir(&dest).unwrap();
        for bad in [
            tar_with(&[("../evil", E::Regular, "", b"x")]),
            tar_with(&[("/abs", E::Regular, "", b"x")]),
            tar_with(&[("l", E::Symlink, "/etc", b"")]),
            tar_with(&[("l", E::Symlink, "..", b"")]),
            tar_with(&[("h", E::Link, "../outside", b"")]),
        ] {
            assert!(unpack(&bad[..], &dest, &AtomicBool::new(false)).is_err());
        }
        // A symlink pre-existing inside dest is never followed.
        symlink(t.path(), dest.join("up")).unwrap();
        let via = tar_with(&[("up/evil", E::Regular, "", b"x")]);
        assert!(matches!(
            unpack(&via[..], &dest, &AtomicBool::new(false)),
            Err(CopyError::UnsafePath(_))
        ));
        assert!(!t.path().join("evil").exists());
        assert!(!t.path().join("outside").exists());
    }

    #[test]
    fn a_cut_copy_leaves_the_old_file_and_no_temporary() {
        let t = tempfile::tempdir().unwrap();
        let dest = t.path();
        fs::write(dest.join("data.bin"), b"old content").unwrap();
        let mut b = tar::Builder::new(Vec::new());
        let new = vec![b'n'; 100_000];
        let mut h = tar::Header::new_gnu();
        h.set_size(new.len() as u64);
        h.set_mode(0o600);
        h.set_cksum();
        b.append_data(&mut h, "data.bin", &new[..]).unwrap();
        let full = b.into_inner().unwrap();
        // Cut in the middle of the file's content.
        let cut = &full[..50_000];
        assert!(unpack(cut, dest, &AtomicBool::new(false)).is_err());
        assert_eq!(fs::read(dest.join("data.bin")).unwrap(), b"old content");
        let names: Vec<_> = fs::read_dir(dest)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("data.bin")]);
        // Cancelled: nothing is put in place, even a complete file.
        assert!(matches!(
            unpack(&full[..], dest, &AtomicBool::new(true)),
            Err(CopyError::Cancelled)
        ));
        assert_eq!(fs::read(dest.join("data.bin")).unwrap(), b"old content");
        assert_eq!(fs::read_dir(dest).unwrap().count(), 1);
        // The whole stream replaces it; mode as in the archive.
        unpack(&full[..], dest, &AtomicBool::new(false)).unwrap();
        assert!(fs::read(dest.join("data.bin")).unwrap() == new);
        let mode = fs::metadata(dest.join("data.bin"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(fs::read_dir(dest).unwrap().count(), 1);
    }

    #[test]
    fn sparse_files_are_unpacked() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("sparse.bin");
        let f = fs::File::create(&src).unwrap();
        f.set_len(8 << 20).unwrap();
        std::os::unix::fs::FileExt::write_at(&f, b"data", 4 << 20).unwrap();
        let mut b = tar::Builder::new(Vec::new());
        b.append_path_with_name(&src, "copy.bin").unwrap();
        let ar = b.into_inner().unwrap();
        let dest = t.path().join("d");
        fs::create_dir(&dest).unwrap();
        assert_eq!(unpack(&ar[..], &dest, &AtomicBool::new(false)).unwrap(), 1);
        let got = fs::read(dest.join("copy.bin")).unwrap();
        assert_eq!(got.len(), 8 << 20);
        assert_eq!(&got[4 << 20..(4 << 20) + 4], b"data");
    }

    #[test]
    fn round_trip() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        fs::create_dir_all(src.join("sub")).unwrap();
        fs::write(src.join("sub/f"), b"hello").unwrap();
        symlink("sub/f", src.join("l")).unwrap();
        let mut buf = Vec::new();
        pack(&src, &mut buf).unwrap();
        let dest = t.path().join("dest");
        fs::create_dir(&dest).unwrap();
        unpack(&buf[..], &dest, &AtomicBool::new(false)).unwrap();
        assert_eq!(fs::read(dest.join("src/sub/f")).unwrap(), b"hello");
        assert_eq!(
            fs::read_link(dest.join("src/l")).unwrap(),
            PathBuf::from("sub/f")
        );
        assert!(matches!(
            unpack(&buf[..], &dest.join("src/sub/f"), &AtomicBool::new(false)),
            Err(CopyError::NotADirectory(_))
        ));
    }
}
