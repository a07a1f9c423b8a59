//! Safe layer unpacking. Layers are hostile input: this module is a security boundary.
//!
//! Rules:
//! - An entry name is split into components; `.` and empty ones are dropped, `..` is
//!   resolved lexically and refused if it climbs above the root; absolute names are refused.
//! - Parents are resolved component by component under the root with `lstat`. A symlink met
//!   on the way is followed *inside* the root: an absolute target restarts at the root
//!   (chroot semantics), a relative target that climbs above the root is refused. The leaf
//!   itself is never followed: an existing leaf is removed, then created with `O_EXCL|O_NOFOLLOW`.
//! - Hardlink targets resolve the same way and must exist and not be directories.
//! - Devices are skipped with a warning; fifos are created.
//! - Whiteouts (`.wh.NAME`) and opaque markers (`.wh..wh..opq`) remove lower-layer content only.
//!
//! This process is the only writer of the root while a layer is applied, so an `lstat`
//! check cannot be raced.

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::fs::{self, OpenOptions};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::sys::stat::UtimensatFlags;
use nix::sys::time::TimeSpec;
use sha2::{Digest as _, Sha256};
use tracing::{debug, warn};

use crate::manifest::Compression;

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_MARKER: &str = ".wh..wh..opq";
const MAX_SYMLINK_HOPS: u32 = 40;

/// Limits applied while unpacking.
#[derive(Debug, Clone)]
pub struct UnpackOptions {
    /// Set to stop an unpack in progress (checked between entries).
    pub cancel: Arc<AtomicBool>,
    /// Largest regular file one entry may declare. Default 8 GiB.
    pub max_entry_size: u64,
    /// Most uncompressed bytes one layer may expand to. Default 32 GiB.
    pub max_layer_uncompressed: u64,
}

impl Default for UnpackOptions {
    fn default() -> Self {
        UnpackOptions {
            cancel: Arc::new(AtomicBool::new(false)),
            max_entry_size: 8 << 30,
            max_layer_uncompressed: 32 << 30,
        }
    }
}

/// What one layer did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LayerStats {
    /// Entries created or replaced.
    pub entries: u64,
    /// Whiteouts and opaque markers applied.
    pub whiteouts: u64,
    /// Device nodes and other unsupported entries skipped.
    pub skipped: u64,
    /// Uncompressed tar bytes.
    pub tar_bytes: u64,
}

/// Why a layer could not be applied. A refused layer leaves no cache entry.
#[derive(Debug, thiserror::Error)]
pub enum UnpackLayerError {
    /// The root directory is unusable.
    #[error("image root {path} is not usable")]
    Root {
        /// The root.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The stream is not a readable (compressed) tar: truncated or corrupt.
    #[error("layer {layer} is truncated or corrupt")]
    Corrupt {
        /// Layer digest.
        layer: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// A `..` component climbs above the root.
    #[error("layer {layer} entry {entry:?} escapes the image root")]
    Escape {
        /// Layer digest.
        layer: String,
        /// Entry name as in the tar.
        entry: String,
    },
    /// An absolute entry name.
    #[error("layer {layer} entry {entry:?} has an absolute path")]
    AbsolutePath {
        /// Layer digest.
        layer: String,
        /// Entry name.
        entry: String,
    },
    /// A parent symlink points above the root.
    #[error(
        "layer {layer} entry {entry:?} goes through symlink {symlink:?}, which escapes the image root"
    )]
    SymlinkEscape {
        /// Layer digest.
        layer: String,
        /// Entry name.
        entry: String,
        /// The symlink, relative to the root.
        symlink: String,
    },
    /// Too many symlinks while resolving a parent.
    #[error("layer {layer} entry {entry:?}: too many levels of symlinks")]
    SymlinkLoop {
        /// Layer digest.
        layer: String,
        /// Entry name.
        entry: String,
    },
    /// A parent is neither a directory nor a symlink to one.
    #[error("layer {layer} entry {entry:?}: parent {parent:?} is not a directory")]
    NotADirectory {
        /// Layer digest.
        layer: String,
        /// Entry name.
        entry: String,
        /// The parent, relative to the root.
        parent: String,
    },
    /// A hardlink whose target is outside the root or otherwise invalid.
    #[error("layer {layer} hardlink {entry:?} -> {target:?} {reason}")]
    BadHardlink {
        /// Layer digest.
        layer: String,
        /// Entry name.
        entry: String,
        /// Link target as in the tar.
        target: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// An entry declares more bytes than allowed.
    #[error(
        "layer {layer} entry {entry:?} declares {size} bytes, more than the {limit} byte limit"
    )]
    EntryTooLarge {
        /// Layer digest.
        layer: String,
        /// Entry name.
        entry: String,
        /// Declared size.
        size: u64,
        /// Limit.
        limit: u64,
    },
    /// The layer expands to more than allowed.
    #[error("layer {layer} expands to more than {limit} bytes")]
    LayerTooLarge {
        /// Layer digest.
        layer: String,
        /// Limit.
        limit: u64,
    },
    /// The unpack was cancelled.
    #[error("layer {layer}: unpack cancelled")]
    Cancelled {
        /// Layer digest.
        layer: String,
    },
    /// An entry's owner does not fit a Linux uid/gid.
    #[error("layer {layer} entry {entry:?} has owner {uid}:{gid}, out of range")]
    Owner {
        /// Layer digest.
        layer: String,
        /// Entry name.
        entry: String,
        /// uid.
        uid: u64,
        /// gid.
        gid: u64,
    },
    /// The uncompressed digest differs from the config's `diff_id`.
    #[error("layer {layer} uncompressed digest is {actual}, the image config says {expected}")]
    DiffId {
        /// Layer digest.
        layer: String,
        /// From the config.
        expected: String,
        /// Computed.
        actual: String,
    },
    /// A filesystem operation failed.
    #[error("layer {layer} entry {entry:?}: cannot {op}")]
    Io {
        /// Layer digest.
        layer: String,
        /// Entry name.
        entry: String,
        /// What was being done.
        op: &'static str,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

/// A reader that hashes and counts what passes through it, with a cap.
struct Tap<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
    limit: u64,
    over: bool,
}

impl<R: Read> Read for Tap<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        if self.count > self.limit {
            self.over = true;
            return Err(io::Error::other("layer size limit exceeded"));
        }
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Applies one layer blob (a file on disk) on top of `root`.
///
/// `diff_id`, when given, is checked against the sha256 of the uncompressed tar.
pub fn unpack_layer_file(
    root: &Path,
    blob: &Path,
    compression: Compression,
    layer: &str,
    diff_id: Option<&str>,
    opts: &UnpackOptions,
) -> Result<LayerStats, UnpackLayerError> {
    let corrupt = |source: io::Error| UnpackLayerError::Corrupt {
        layer: layer.to_owned(),
        source,
    };
    let file = fs::File::open(blob).map_err(corrupt)?;
    let file = io::BufReader::with_capacity(256 << 10, file);
    let reader: Box<dyn Read> = match compression {
        Compression::None => Box::new(file),
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(file)),
        Compression::Zstd => {
            Box::new(zstd::stream::read::Decoder::with_buffer(file).map_err(corrupt)?)
        }
    };
    unpack_layer(root, reader, layer, diff_id, opts)
}

/// Applies one uncompressed tar stream on top of `root`.
pub fn unpack_layer(
    root: &Path,
    reader: impl Read,
    layer: &str,
    diff_id: Option<&str>,
    opts: &UnpackOptions,
) -> Result<LayerStats, UnpackLayerError> {
    let meta = fs::symlink_metadata(root).map_err(|source| UnpackLayerError::Root {
        path: root.to_owned(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(UnpackLayerError::Root {
            path: root.to_owned(),
            source: io::Error::other("not a directory"),
        });
    }
    let tap = Tap {
        inner: reader,
        hasher: Sha256::new(),
        count: 0,
        limit: opts.max_layer_uncompressed,
        over: false,
    };
    let mut archive = tar::Archive::new(tap);
    let mut ctx = Layer {
        root,
        layer,
        opts,
        created: HashSet::new(),
        dir_times: Vec::new(),
        stats: LayerStats::default(),
    };
    let result = ctx.apply_all(&mut archive);
    let mut tap = archive.into_inner();
    if tap.over {
        return Err(UnpackLayerError::LayerTooLarge {
            layer: layer.to_owned(),
            limit: opts.max_layer_uncompressed,
        });
    }
    result?;
    // Hash the trailer too, so the digest covers the whole stream.
    io::copy(&mut tap, &mut io::sink()).map_err(|source| {
        if tap.over {
            UnpackLayerError::LayerTooLarge {
                layer: layer.to_owned(),
                limit: opts.max_layer_uncompressed,
            }
        } else {
            UnpackLayerError::Corrupt {
                layer: layer.to_owned(),
                source,
            }
        }
    })?;
    let actual = format!("sha256:{}", hex::encode(tap.hasher.finalize()));
    if let Some(expected) = diff_id
        && expected != actual
    {
        return Err(UnpackLayerError::DiffId {
            layer: layer.to_owned(),
            expected: expected.to_owned(),
            actual,
        });
    }
    // Directory mtimes last: creating children changes them.
    for (path, mtime) in ctx.dir_times.iter().rev() {
        set_mtime(path, *mtime);
    }
    ctx.stats.tar_bytes = tap.count;
    Ok(ctx.stats)
}

struct Layer<'a> {
    root: &'a Path,
    layer: &'a str,
    opts: &'a UnpackOptions,
    /// Root-relative paths this layer created: whiteouts never remove them.
    created: HashSet<PathBuf>,
    dir_times: Vec<(PathBuf, u64)>,
    stats: LayerStats,
}

/// The lexical components of a tar name, or why it is refused.
#[derive(Debug, PartialEq, Eq)]
enum Name {
    Components(Vec<OsString>),
    Absolute,
    Escape,
}

fn split_name(raw: &[u8]) -> Name {
    if raw.first() == Some(&b'/') {
        return Name::Absolute;
    }
    let mut out: Vec<OsString> = Vec::new();
    for comp in raw.split(|b| *b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => {
                if out.pop().is_none() {
                    return Name::Escape;
                }
            }
            c => out.push(OsStr::from_bytes(c).to_owned()),
        }
    }
    Name::Components(out)
}

fn display(raw: &[u8]) -> String {
    String::from_utf8_lossy(raw).into_owned()
}

/// Result of resolving a parent directory under the root.
enum Parent {
    /// Root-relative path of a real directory (no symlinks in it).
    Dir(PathBuf),
    /// A component is missing and we were asked not to create it.
    Missing,
}

impl Layer<'_> {
    fn apply_all<R: Read>(
        &mut self,
        archive: &mut tar::Archive<R>,
    ) -> Result<(), UnpackLayerError> {
        let entries = archive.entries().map_err(|source| self.corrupt(source))?;
        for entry in entries {
            if self.opts.cancel.load(Ordering::Relaxed) {
                return Err(UnpackLayerError::Cancelled {
                    layer: self.layer.to_owned(),
                });
            }
            let mut entry = entry.map_err(|source| self.corrupt(source))?;
            self.apply(&mut entry)?;
        }
        Ok(())
    }

    fn corrupt(&self, source: io::Error) -> UnpackLayerError {
        UnpackLayerError::Corrupt {
            layer: self.layer.to_owned(),
            source,
        }
    }

    fn io(&self, entry: &str, op: &'static str) -> impl FnOnce(io::Error) -> UnpackLayerError {
        let layer = self.layer.to_owned();
        let entry = entry.to_owned();
        move |source| UnpackLayerError::Io {
            layer,
            entry,
            op,
            source,
        }
    }

    fn apply<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<(), UnpackLayerError> {
        let raw = entry.path_bytes().into_owned();
        let name = display(&raw);
        let comps = match split_name(&raw) {
            Name::Components(c) => c,
            Name::Absolute => {
                return Err(UnpackLayerError::AbsolutePath {
                    layer: self.layer.to_owned(),
                    entry: name,
                });
            }
            Name::Escape => {
                return Err(UnpackLayerError::Escape {
                    layer: self.layer.to_owned(),
                    entry: name,
                });
            }
        };
        let kind = entry.header().entry_type();
        let Some((leaf, parents)) = comps.split_last() else {
            debug!(layer = self.layer, "skipping the root directory entry");
            return Ok(());
        };
        let leaf_bytes = leaf.as_bytes();

        if leaf_bytes.starts_with(WHITEOUT_PREFIX.as_bytes()) {
            return self.whiteout(&name, parents, leaf_bytes);
        }

        let size = entry
            .header()
            .size()
            .map_err(|source| self.corrupt(source))?;
        if kind.is_file() && size > self.opts.max_entry_size {
            return Err(UnpackLayerError::EntryTooLarge {
                layer: self.layer.to_owned(),
                entry: name,
                size,
                limit: self.opts.max_entry_size,
            });
        }

        let Parent::Dir(parent) = self.resolve_dir(&name, parents, true)? else {
            unreachable_parent()?;
            return Ok(());
        };
        let rel = parent.join(leaf);
        let path = self.root.join(&rel);

        let (uid, gid) = {
            let h = entry.header();
            let uid = h.uid().map_err(|source| self.corrupt(source))?;
            let gid = h.gid().map_err(|source| self.corrupt(source))?;
            match (u32::try_from(uid), u32::try_from(gid)) {
                (Ok(u), Ok(g)) => (u, g),
                _ => {
                    return Err(UnpackLayerError::Owner {
                        layer: self.layer.to_owned(),
                        entry: name,
                        uid,
                        gid,
                    });
                }
            }
        };
        let mode = entry
            .header()
            .mode()
            .map_err(|source| self.corrupt(source))?
            & 0o7777;
        let mtime = entry.header().mtime().unwrap_or(0);

        use tar::EntryType as T;
        match kind {
            T::Directory => {
                match fs::symlink_metadata(&path) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => {
                        remove_any(&path).map_err(self.io(&name, "replace an entry"))?;
                        fs::create_dir(&path).map_err(self.io(&name, "create a directory"))?;
                    }
                    Err(_) => {
                        fs::create_dir(&path).map_err(self.io(&name, "create a directory"))?;
                    }
                }
                self.finish_meta(&name, &path, uid, gid, Some(mode), entry)?;
                self.dir_times.push((path, mtime));
            }
            T::Regular | T::Continuous | T::GNUSparse => {
                self.clear_leaf(&name, &path)?;
                let mut file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&path)
                    .map_err(self.io(&name, "create a file"))?;
                io::copy(entry, &mut file).map_err(|source| self.corrupt(source))?;
                drop(file);
                self.finish_meta(&name, &path, uid, gid, Some(mode), entry)?;
                set_mtime(&path, mtime);
            }
            T::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .map(|t| t.into_owned())
                    .unwrap_or_default();
                self.clear_leaf(&name, &path)?;
                std::os::unix::fs::symlink(OsStr::from_bytes(&target), &path)
                    .map_err(self.io(&name, "create a symlink"))?;
                self.finish_meta(&name, &path, uid, gid, None, entry)?;
                set_mtime(&path, mtime);
            }
            T::Link => {
                let target_raw = entry
                    .link_name_bytes()
                    .map(|t| t.into_owned())
                    .unwrap_or_default();
                let target = self.hardlink_target(&name, &target_raw)?;
                if target == path {
                    return Ok(());
                }
                self.clear_leaf(&name, &path)?;
                // link(2) does not follow a symlink target: the new name is the symlink itself.
                fs::hard_link(&target, &path).map_err(self.io(&name, "create a hardlink"))?;
            }
            T::Fifo => {
                self.clear_leaf(&name, &path)?;
                nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600))
                    .map_err(|e| self.io(&name, "create a fifo")(io::Error::from(e)))?;
                self.finish_meta(&name, &path, uid, gid, Some(mode), entry)?;
            }
            T::Char | T::Block => {
                warn!(layer = self.layer, entry = %name, "skipping a device node");
                self.stats.skipped += 1;
                return Ok(());
            }
            other => {
                debug!(layer = self.layer, entry = %name, kind = ?other, "skipping an unsupported entry type");
                self.stats.skipped += 1;
                return Ok(());
            }
        }
        self.created.insert(rel);
        self.stats.entries += 1;
        Ok(())
    }

    fn whiteout(
        &mut self,
        name: &str,
        parents: &[OsString],
        leaf: &[u8],
    ) -> Result<(), UnpackLayerError> {
        let Parent::Dir(parent) = self.resolve_dir(name, parents, false)? else {
            return Ok(());
        };
        let dir = self.root.join(&parent);
        if leaf == OPAQUE_MARKER.as_bytes() {
            let children = match fs::read_dir(&dir) {
                Ok(rd) => rd,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(self.io(name, "read an opaque directory")(e)),
            };
            for child in children {
                let child = child.map_err(self.io(name, "read an opaque directory"))?;
                let rel = parent.join(child.file_name());
                if !self.created.contains(&rel) {
                    remove_any(&self.root.join(&rel))
                        .map_err(self.io(name, "apply an opaque marker"))?;
                }
            }
        } else {
            let target = &leaf[WHITEOUT_PREFIX.len()..];
            if target.is_empty() || target == b"." || target == b".." || target.contains(&b'/') {
                return Err(UnpackLayerError::Escape {
                    layer: self.layer.to_owned(),
                    entry: name.to_owned(),
                });
            }
            let rel = parent.join(OsStr::from_bytes(target));
            if !self.created.contains(&rel) {
                match remove_any(&self.root.join(&rel)) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(self.io(name, "apply a whiteout")(e)),
                }
            }
        }
        self.stats.whiteouts += 1;
        Ok(())
    }

    /// Resolves parent components to a real directory under the root.
    fn resolve_dir(
        &mut self,
        entry: &str,
        comps: &[OsString],
        create: bool,
    ) -> Result<Parent, UnpackLayerError> {
        let mut cur = PathBuf::new();
        let mut depth = 0usize;
        let mut pending: std::collections::VecDeque<OsString> = comps.iter().cloned().collect();
        let mut hops = 0u32;
        while let Some(c) = pending.pop_front() {
            if c == "." || c.is_empty() {
                continue;
            }
            if c == ".." {
                // Only symlink targets bring `..` here (names were cleaned lexically).
                if depth == 0 {
                    return Err(UnpackLayerError::SymlinkEscape {
                        layer: self.layer.to_owned(),
                        entry: entry.to_owned(),
                        symlink: cur.display().to_string(),
                    });
                }
                cur.pop();
                depth -= 1;
                continue;
            }
            let next = cur.join(&c);
            let full = self.root.join(&next);
            match fs::symlink_metadata(&full) {
                Ok(m) if m.is_dir() => {
                    cur = next;
                    depth += 1;
                }
                Ok(m) if m.file_type().is_symlink() => {
                    hops += 1;
                    if hops > MAX_SYMLINK_HOPS {
                        return Err(UnpackLayerError::SymlinkLoop {
                            layer: self.layer.to_owned(),
                            entry: entry.to_owned(),
                        });
                    }
                    let target = fs::read_link(&full).map_err(self.io(entry, "read a symlink"))?;
                    let bytes = target.as_os_str().as_bytes();
                    if bytes.first() == Some(&b'/') {
                        // Absolute targets are resolved from the image root, never the host's.
                        cur = PathBuf::new();
                        depth = 0;
                    }
                    // Check a relative target's climb against the link's own directory.
                    let mut climb = depth as i64;
                    for t in bytes.split(|b| *b == b'/') {
                        match t {
                            b"" | b"." => {}
                            b".." => {
                                climb -= 1;
                                if climb < 0 {
                                    return Err(UnpackLayerError::SymlinkEscape {
                                        layer: self.layer.to_owned(),
                                        entry: entry.to_owned(),
                                        symlink: next.display().to_string(),
                                    });
                                }
                            }
                            _ => climb += 1,
                        }
                    }
                    for t in bytes.rsplit(|b| *b == b'/') {
                        pending.push_front(OsStr::from_bytes(t).to_owned());
                    }
                }
                Ok(_) => {
                    return Err(UnpackLayerError::NotADirectory {
                        layer: self.layer.to_owned(),
                        entry: entry.to_owned(),
                        parent: next.display().to_string(),
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    if !create {
                        return Ok(Parent::Missing);
                    }
                    fs::create_dir(&full).map_err(self.io(entry, "create a parent directory"))?;
                    fs::set_permissions(&full, fs::Permissions::from_mode(0o755))
                        .map_err(self.io(entry, "create a parent directory"))?;
                    self.created.insert(next.clone());
                    cur = next;
                    depth += 1;
                }
                Err(e) => return Err(self.io(entry, "inspect a parent directory")(e)),
            }
        }
        Ok(Parent::Dir(cur))
    }

    fn hardlink_target(&mut self, entry: &str, raw: &[u8]) -> Result<PathBuf, UnpackLayerError> {
        let bad = |reason: &'static str| UnpackLayerError::BadHardlink {
            layer: self.layer.to_owned(),
            entry: entry.to_owned(),
            target: display(raw),
            reason,
        };
        let comps = match split_name(raw) {
            Name::Components(c) if !c.is_empty() => c,
            Name::Components(_) => return Err(bad("names the image root")),
            Name::Absolute | Name::Escape => return Err(bad("points outside the image root")),
        };
        let (leaf, parents) = comps
            .split_last()
            .ok_or_else(|| bad("names the image root"))?;
        let parent = match self.resolve_dir(entry, parents, false) {
            Ok(Parent::Dir(p)) => p,
            Ok(Parent::Missing) => return Err(bad("does not exist")),
            Err(UnpackLayerError::SymlinkEscape { .. }) => {
                return Err(bad("points outside the image root"));
            }
            Err(e) => return Err(e),
        };
        let path = self.root.join(parent).join(leaf);
        match fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() => Err(bad("is a directory")),
            Ok(_) => Ok(path),
            Err(_) => Err(bad("does not exist")),
        }
    }

    fn clear_leaf(&self, entry: &str, path: &Path) -> Result<(), UnpackLayerError> {
        match remove_any(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.io(entry, "replace an entry")(e)),
        }
    }

    fn finish_meta<R: Read>(
        &self,
        entry: &str,
        path: &Path,
        uid: u32,
        gid: u32,
        mode: Option<u32>,
        tar_entry: &mut tar::Entry<'_, R>,
    ) -> Result<(), UnpackLayerError> {
        std::os::unix::fs::lchown(path, Some(uid), Some(gid))
            .map_err(self.io(entry, "set the owner"))?;
        // chown clears setuid/setgid, so the mode comes after it.
        if let Some(mode) = mode {
            fs::set_permissions(path, fs::Permissions::from_mode(mode))
                .map_err(self.io(entry, "set the mode"))?;
        }
        if let Ok(Some(exts)) = tar_entry.pax_extensions() {
            for ext in exts.flatten() {
                let Ok(key) = ext.key() else { continue };
                let Some(attr) = key.strip_prefix("SCHILY.xattr.") else {
                    continue;
                };
                if !(attr.starts_with("user.")
                    || attr.starts_with("trusted.")
                    || attr == "security.capability")
                {
                    debug!(
                        layer = self.layer,
                        entry, attr, "skipping an xattr namespace"
                    );
                    continue;
                }
                // xattr::set uses lsetxattr: it never follows a symlink.
                if let Err(e) = xattr::set(path, attr, ext.value_bytes()) {
                    warn!(layer = self.layer, entry, attr, error = %e, "cannot set an xattr");
                }
            }
        }
        Ok(())
    }
}

fn unreachable_parent() -> Result<(), UnpackLayerError> {
    // resolve_dir with create=true never answers Missing.
    Ok(())
}

/// Removes a file, symlink or directory tree without following symlinks.
fn remove_any(path: &Path) -> io::Result<()> {
    let m = fs::symlink_metadata(path)?;
    if m.is_dir() {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    }
}

fn set_mtime(path: &Path, mtime: u64) {
    let t = TimeSpec::new(i64::try_from(mtime).unwrap_or(0), 0);
    if let Err(e) = nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        path,
        &t,
        &t,
        UtimensatFlags::NoFollowSymlink,
    ) {
        debug!(path = %path.display(), error = %e, "cannot set mtime");
    }
}

#[cfg(test)]
mod tests;
