//! ext4 base disks built with `mkfs.ext4 -d`.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tracing::{debug, info};

const BLOCK: u64 = 4096;

/// Why a base disk could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildDiskError {
    /// Reading the tree failed.
    #[error("cannot measure the image tree {path}")]
    Measure {
        /// The tree.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Creating the disk file failed.
    #[error("cannot create disk file {path}")]
    Create {
        /// The disk.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// `mkfs.ext4` could not be run.
    #[error("cannot run mkfs.ext4 (e2fsprogs 1.43 or newer is needed)")]
    Spawn(#[source] io::Error),
    /// The build was cancelled.
    #[error("base disk build cancelled")]
    Cancelled,
    /// `mkfs.ext4` failed.
    #[error("mkfs.ext4 failed ({status}): {stderr}")]
    Mkfs {
        /// Exit status.
        status: String,
        /// Its stderr.
        stderr: String,
    },
}

/// What the tree holds.
#[derive(Debug, Clone, Copy, Default)]
pub struct TreeSize {
    /// Files, dirs, links.
    pub inodes: u64,
    /// Bytes in blocks the tree needs.
    pub bytes: u64,
}

/// Measures a tree without following symlinks.
pub fn measure(root: &Path) -> io::Result<TreeSize> {
    let mut t = TreeSize::default();
    let mut stack = vec![root.to_path_buf()];
    let mut seen = std::collections::HashSet::new();
    while let Some(dir) = stack.pop() {
        t.inodes += 1;
        t.bytes += BLOCK;
        for e in fs::read_dir(&dir)? {
            let e = e?;
            let m = e.metadata()?; // DirEntry::metadata does not follow symlinks.
            if m.is_dir() {
                stack.push(e.path());
                continue;
            }
            if m.nlink() > 1 && !seen.insert((m.dev(), m.ino())) {
                continue;
            }
            t.inodes += 1;
            if m.is_file() || (m.file_type().is_symlink() && m.len() >= 60) {
                t.bytes += m.len().div_ceil(BLOCK) * BLOCK;
                // Extent tree blocks for large files.
                t.bytes += (m.len() / (128 << 20)) * BLOCK;
            }
        }
    }
    Ok(t)
}

/// Builds a read-only ext4 image of `root` at `out` and returns its size in bytes.
///
/// `uuid` (hex, 32 digits) makes the filesystem UUID and hash seed deterministic.
/// Setting `cancel` kills a running `mkfs.ext4`.
pub fn build_ext4(
    root: &Path,
    out: &Path,
    label: &str,
    uuid: &str,
    cancel: &AtomicBool,
) -> Result<u64, BuildDiskError> {
    let tree = measure(root).map_err(|source| BuildDiskError::Measure {
        path: root.to_owned(),
        source,
    })?;
    let inodes = tree.inodes + tree.inodes / 5 + 64;
    // Data + inode tables (256 B each) + group descriptors/bitmaps slack + 10% + 8 MiB.
    let mut size = tree.bytes + inodes * 256;
    size += size / 10 + (8 << 20);
    size = size.div_ceil(1 << 20) << 20;
    let uuid = format!(
        "{}-{}-{}-{}-{}",
        &uuid[0..8],
        &uuid[8..12],
        &uuid[12..16],
        &uuid[16..20],
        &uuid[20..32]
    );
    for attempt in 0..3 {
        let file = fs::File::create(out).map_err(|source| BuildDiskError::Create {
            path: out.to_owned(),
            source,
        })?;
        file.set_len(size)
            .map_err(|source| BuildDiskError::Create {
                path: out.to_owned(),
                source,
            })?;
        drop(file);
        debug!(size, inodes, attempt, "running mkfs.ext4");
        let mut output = Command::new("mkfs.ext4")
            .args([
                "-q", "-F", "-t", "ext4", "-b", "4096", "-I", "256", "-m", "0",
            ])
            .args(["-O", "^has_journal,^resize_inode"])
            .arg("-N")
            .arg(inodes.to_string())
            .arg("-L")
            .arg(label)
            .arg("-U")
            .arg(&uuid)
            .arg("-E")
            .arg(format!(
                "root_owner=0:0,hash_seed={uuid},lazy_itable_init=0"
            ))
            .arg("-d")
            .arg(root)
            .arg(out)
            .env("E2FSPROGS_FAKE_TIME", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(BuildDiskError::Spawn)?;
        let output = loop {
            if cancel.load(Ordering::Relaxed) {
                let _ = output.kill();
                let _ = output.wait();
                return Err(BuildDiskError::Cancelled);
            }
            match output.try_wait().map_err(BuildDiskError::Spawn)? {
                Some(_) => break output.wait_with_output().map_err(BuildDiskError::Spawn)?,
                None => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        if output.status.success() {
            info!(size, inodes, "built ext4 base disk");
            return Ok(size);
        }
        let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
        let full = stderr.contains("Could not allocate")
            || stderr.contains("No space left")
            || stderr.contains("inodes");
        if !full || attempt == 2 {
            return Err(BuildDiskError::Mkfs {
                status: output.status.to_string(),
                stderr,
            });
        }
        size *= 2;
    }
    unreachable_size()
}

fn unreachable_size() -> Result<u64, BuildDiskError> {
    Err(BuildDiskError::Mkfs {
        status: "not run".into(),
        stderr: String::new(),
    })
}
