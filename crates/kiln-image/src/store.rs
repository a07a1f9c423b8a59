//! The image cache: content-addressed base disks, tags, locks, atomic commits, GC.
//!
//! Layout under `<cache_dir>/images/`:
//! - `sha256/<hex>/` one committed image: `disk.ext4` and `image.json` (appears by rename only)
//! - `refs/<sha256(reference)>.json` maps a reference to a manifest digest
//! - `tmp/<hex>.<random>/` work in progress (blobs, rootfs); removed on error, drop, or by the
//!   next `open`/`prune` once no process holds the digest's lock
//! - `locks/<hex>.lock` one flock per digest: concurrent pulls of one image build it once

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use nix::fcntl::{Flock, FlockArg};
use oci_client::errors::OciDistributionError;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tracing::{info, instrument, warn};

use crate::disk::{self, BuildDiskError};
use crate::manifest::{self, ImageConfig, Platform};
use crate::reference::ImageRef;
use crate::source::{self, Source};
use crate::unpack::{self, UnpackLayerError, UnpackOptions};
use crate::{Progress, PullPhase};

const DISK_FILE: &str = "disk.ext4";
const META_FILE: &str = "image.json";
/// Most layers an image may have (overlay-based runtimes stop near 128).
const MAX_LAYERS: usize = 500;

/// Options for [`ImageStore::pull`].
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// Registries spoken to over plain HTTP (loopback ones always are).
    pub insecure_registries: Vec<String>,
    /// The platform to select from a multi-platform index. Default linux/amd64.
    pub platform: Platform,
    /// Largest compressed layer accepted (from its descriptor). Default 16 GiB.
    pub max_layer_size: u64,
    /// Unpack limits.
    pub unpack: UnpackOptions,
    /// Docker config with registry credentials; `None` = `$DOCKER_CONFIG/config.json`
    /// or `~/.docker/config.json`.
    pub docker_config: Option<PathBuf>,
}

impl Default for PullOptions {
    fn default() -> Self {
        PullOptions {
            insecure_registries: Vec::new(),
            platform: Platform::linux_amd64(),
            max_layer_size: 16 << 30,
            unpack: UnpackOptions::default(),
            docker_config: None,
        }
    }
}

/// A pulled image: a read-only ext4 base disk and what is needed to run it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    /// The reference it was pulled or listed under (`sha256:…` when it has none).
    pub reference: String,
    /// Digest of the platform-specific image manifest; the cache key.
    pub manifest_digest: String,
    /// Entrypoint, cmd, env, user, …
    pub config: ImageConfig,
    /// The read-only ext4 base disk.
    pub disk: PathBuf,
    /// Size of `disk` in bytes.
    pub size: u64,
    /// Layer digests, lowest first.
    pub layers: Vec<String>,
    /// True when this call built the disk, false when it came from the cache.
    pub built: bool,
}

#[derive(Debug, Serialize, Deserialize)]
struct Record {
    manifest_digest: String,
    config: ImageConfig,
    layers: Vec<String>,
    size: u64,
    created_unix: u64,
    source: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct RefRecord {
    reference: String,
    digest: String,
}

/// Why the cache could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenStoreError {
    /// A cache directory cannot be created.
    #[error("cannot create image cache directory {path}")]
    Create {
        /// The directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

/// Why a pull failed.
#[derive(Debug, thiserror::Error)]
pub enum PullImageError {
    /// No connection to the registry.
    #[error("registry {registry} is unreachable")]
    Unreachable {
        /// `host[:port]`.
        registry: String,
        /// Cause.
        #[source]
        source: OciDistributionError,
    },
    /// Unknown repository, tag, digest or blob.
    #[error("registry {registry} has no manifest for {name}")]
    NotFound {
        /// `host[:port]`.
        registry: String,
        /// `repo:tag`, `repo@digest` or a blob digest.
        name: String,
    },
    /// Credentials missing or refused.
    #[error("registry {registry} refused access to {name}")]
    Unauthorized {
        /// `host[:port]`.
        registry: String,
        /// What was asked for.
        name: String,
        /// Cause.
        #[source]
        source: OciDistributionError,
    },
    /// Any other registry failure.
    #[error("registry {registry} failed to serve {name}")]
    Registry {
        /// `host[:port]`.
        registry: String,
        /// What was asked for.
        name: String,
        /// Cause.
        #[source]
        source: OciDistributionError,
    },
    /// The manifest's digest differs from the pinned one.
    #[error("manifest of {reference} has digest {actual}, the reference pins {expected}")]
    ManifestDigest {
        /// Reference.
        reference: String,
        /// Pinned.
        expected: String,
        /// Computed.
        actual: String,
    },
    /// The manifest cannot be parsed or is not an image manifest.
    #[error("manifest of {reference} is malformed: {reason}")]
    MalformedManifest {
        /// Reference.
        reference: String,
        /// Why.
        reason: String,
    },
    /// The index has nothing for the wanted platform.
    #[error("{reference} has no image for {platform}")]
    NoPlatform {
        /// Reference.
        reference: String,
        /// Wanted platform.
        platform: String,
    },
    /// A blob's size differs from its descriptor.
    #[error("{kind} {digest} is {actual} bytes, the manifest says {expected}")]
    BlobSize {
        /// `layer`, `config` or `manifest`.
        kind: &'static str,
        /// Digest.
        digest: String,
        /// From the descriptor.
        expected: u64,
        /// Received.
        actual: u64,
    },
    /// A blob's content does not hash to its digest.
    #[error("{kind} {expected} does not match its digest: the content hashes to {actual}")]
    BlobDigest {
        /// `layer`, `config` or `manifest`.
        kind: &'static str,
        /// From the descriptor.
        expected: String,
        /// Computed.
        actual: String,
    },
    /// A descriptor declares more than the limit.
    #[error("{kind} {digest} declares {size} bytes, more than the {limit} byte limit")]
    TooLarge {
        /// `layer`, `config` or `manifest`.
        kind: &'static str,
        /// Digest.
        digest: String,
        /// Declared.
        size: u64,
        /// Limit.
        limit: u64,
    },
    /// Reading or writing a blob failed.
    #[error("cannot transfer {kind} {digest}")]
    BlobIo {
        /// `layer`, `config` or `manifest`.
        kind: &'static str,
        /// Digest.
        digest: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Not a layer media type Kiln knows.
    #[error("layer {digest} has unsupported media type {media_type:?}")]
    MediaType {
        /// Digest.
        digest: String,
        /// Media type.
        media_type: String,
    },
    /// The image config cannot be used.
    #[error("config {digest} is malformed: {reason}")]
    MalformedConfig {
        /// Digest.
        digest: String,
        /// Why.
        reason: String,
    },
    /// An OCI layout directory is unusable.
    #[error("OCI layout {path}: {reason}")]
    Layout {
        /// Directory.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A docker archive is unusable.
    #[error("docker archive {path}: {reason}")]
    Archive {
        /// File.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A layer was refused or failed to apply.
    #[error(transparent)]
    Unpack(#[from] UnpackLayerError),
    /// The base disk could not be built.
    #[error(transparent)]
    Disk(#[from] BuildDiskError),
    /// The cache directory failed.
    #[error("image cache {path} failed")]
    Cache {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// A worker task died.
    #[error("image pull task failed: {0}")]
    Internal(String),
}

/// Why a cache lookup or listing failed.
#[derive(Debug, thiserror::Error)]
pub enum ListImagesError {
    /// Reading the cache failed.
    #[error("cannot read image cache {path}")]
    Io {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

/// Why an image could not be removed.
#[derive(Debug, thiserror::Error)]
pub enum RemoveImageError {
    /// Neither a known reference nor a cached digest.
    #[error("no cached image {0}")]
    NotFound(String),
    /// Not a reference or digest.
    #[error(transparent)]
    Parse(#[from] crate::reference::ParseImageRefError),
    /// The cache failed.
    #[error("cannot remove from image cache {path}")]
    Io {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

/// Why pruning failed.
#[derive(Debug, thiserror::Error)]
pub enum PruneImagesError {
    /// The cache failed.
    #[error("cannot prune image cache {path}")]
    Io {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

/// What [`ImageStore::prune`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PruneReport {
    /// Image digests removed because no reference names them.
    pub images: Vec<String>,
    /// Image digests no reference names that were kept because the caller
    /// said they are in use ([`ImageStore::prune_keeping`]).
    pub kept: Vec<String>,
    /// Stale work directories removed.
    pub temp_dirs: usize,
    /// Bytes freed (apparent sizes).
    pub bytes: u64,
}

/// What [`ImageStore::remove`] would do with a name, found without changing
/// anything ([`ImageStore::removal`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removal {
    /// The image the name stands for (its manifest digest).
    pub digest: String,
    /// Its base disk (it may be missing if the cache is damaged).
    pub disk: PathBuf,
    /// The references that would go: the one given, or every one naming
    /// the digest when a digest was given.
    pub references: Vec<String>,
    /// The image itself (base disk) would be deleted: a digest was given,
    /// or the reference given is the last one naming the image.
    pub deletes_image: bool,
}

/// The image cache under `<cache_dir>/images`.
#[derive(Debug, Clone)]
pub struct ImageStore {
    root: PathBuf,
}

/// Sets its flag when dropped (also when the pull future is dropped midway).
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn hex_of(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap_or(digest)
}

/// The key a reference is stored under: layout and archive paths made absolute.
fn ref_key(r: &ImageRef) -> String {
    match r {
        ImageRef::Registry(_) => r.to_string(),
        ImageRef::OciLayout { path, tag } => ImageRef::OciLayout {
            path: fs::canonicalize(path).unwrap_or_else(|_| path.clone()),
            tag: tag.clone(),
        }
        .to_string(),
        ImageRef::DockerArchive { path } => ImageRef::DockerArchive {
            path: fs::canonicalize(path).unwrap_or_else(|_| path.clone()),
        }
        .to_string(),
    }
}

fn dir_size(path: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![path.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(rd) = fs::read_dir(&p) else { continue };
        for e in rd.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

/// Writes a file atomically (temp + fsync + rename).
fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    io::Write::write_all(&mut tmp, bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

impl ImageStore {
    /// Opens (creating) the cache under `<cache_dir>/images` and removes stale work dirs.
    pub fn open(cache_dir: impl AsRef<Path>) -> Result<ImageStore, OpenStoreError> {
        let root = cache_dir.as_ref().join("images");
        for sub in ["sha256", "refs", "tmp", "locks"] {
            let p = root.join(sub);
            fs::create_dir_all(&p).map_err(|source| OpenStoreError::Create { path: p, source })?;
        }
        let store = ImageStore { root };
        if let Err(e) = store.clean_stale_temp() {
            warn!(error = %e, "cannot clean stale image work directories");
        }
        Ok(store)
    }

    /// The `images` directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn lock_path(&self, hex: &str) -> PathBuf {
        self.root.join("locks").join(format!("{hex}.lock"))
    }

    fn image_dir(&self, hex: &str) -> PathBuf {
        self.root.join("sha256").join(hex)
    }

    fn ref_path(&self, key: &str) -> PathBuf {
        let h = hex::encode(Sha256::digest(key.as_bytes()));
        self.root.join("refs").join(format!("{h}.json"))
    }

    fn open_lock(&self, hex: &str) -> io::Result<fs::File> {
        fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.lock_path(hex))
    }

    fn try_lock(&self, hex: &str) -> io::Result<Option<Flock<fs::File>>> {
        let f = self.open_lock(hex)?;
        match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
            Ok(l) => Ok(Some(l)),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
            Err((_, e)) => Err(io::Error::from(e)),
        }
    }

    async fn lock(&self, hex: &str) -> Result<Flock<fs::File>, PullImageError> {
        let cache_err = |source: io::Error| PullImageError::Cache {
            path: self.lock_path(hex),
            source,
        };
        let f = self.open_lock(hex).map_err(cache_err)?;
        tokio::task::spawn_blocking(move || Flock::lock(f, FlockArg::LockExclusive))
            .await
            .map_err(|e| PullImageError::Internal(e.to_string()))?
            .map_err(|(_, e)| cache_err(io::Error::from(e)))
    }

    /// Removes `tmp/<hex>.*` dirs whose digest lock nobody holds.
    fn clean_stale_temp(&self) -> io::Result<usize> {
        let mut removed = 0;
        for e in fs::read_dir(self.root.join("tmp"))? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            let hex = name.split('.').next().unwrap_or("").to_owned();
            let lock = if hex.len() == 64 {
                self.try_lock(&hex)?
            } else {
                None
            };
            let holder_gone = hex.len() != 64 || lock.is_some();
            if holder_gone && !name.starts_with("archive.") {
                info!(dir = %e.path().display(), "removing a stale image work directory");
                match fs::remove_dir_all(e.path()) {
                    Ok(()) => removed += 1,
                    // A cancelled worker may still be finishing; the next prune gets it.
                    Err(err) => {
                        warn!(dir = %e.path().display(), error = %err, "cannot remove a stale work directory")
                    }
                }
            } else if name.starts_with("archive.") {
                // Archive scratch dirs belong to a pull in progress unless older than a day.
                let old = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|d| d.as_secs() > 86_400);
                if old {
                    fs::remove_dir_all(e.path())?;
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }

    fn load(&self, hex: &str, reference: &str, built: bool) -> Option<Image> {
        let dir = self.image_dir(hex);
        let bytes = fs::read(dir.join(META_FILE)).ok()?;
        let rec: Record = serde_json::from_slice(&bytes).ok()?;
        let disk = dir.join(DISK_FILE);
        if !disk.is_file() {
            return None;
        }
        Some(Image {
            reference: reference.to_owned(),
            manifest_digest: rec.manifest_digest,
            config: rec.config,
            disk,
            size: rec.size,
            layers: rec.layers,
            built,
        })
    }

    fn write_ref(&self, key: &str, digest: &str) -> io::Result<()> {
        let rec = RefRecord {
            reference: key.to_owned(),
            digest: digest.to_owned(),
        };
        let bytes = serde_json::to_vec_pretty(&rec).map_err(io::Error::other)?;
        write_atomic(&self.ref_path(key), &bytes)
    }

    fn read_refs(&self) -> io::Result<Vec<(PathBuf, RefRecord)>> {
        let mut out = Vec::new();
        for e in fs::read_dir(self.root.join("refs"))? {
            let e = e?;
            if e.path().extension().is_none_or(|x| x != "json") {
                continue;
            }
            match fs::read(e.path())
                .ok()
                .and_then(|b| serde_json::from_slice::<RefRecord>(&b).ok())
            {
                Some(r) => out.push((e.path(), r)),
                None => warn!(path = %e.path().display(), "ignoring an unreadable reference file"),
            }
        }
        out.sort_by(|a, b| a.1.reference.cmp(&b.1.reference));
        Ok(out)
    }

    /// The cached image for a reference, without any network access.
    pub fn get(&self, r: &ImageRef) -> Result<Option<Image>, ListImagesError> {
        if let ImageRef::Registry(rr) = r
            && let Some(d) = &rr.digest
        {
            return Ok(self.load(hex_of(d), &r.to_string(), false));
        }
        let key = ref_key(r);
        let path = self.ref_path(&key);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(ListImagesError::Io { path, source }),
        };
        let rec: RefRecord = serde_json::from_slice(&bytes).map_err(|e| ListImagesError::Io {
            path: path.clone(),
            source: io::Error::other(e),
        })?;
        Ok(self.load(hex_of(&rec.digest), &key, false))
    }

    /// Pulls an image and builds (or reuses) its base disk.
    ///
    /// The manifest is always resolved (so a moved tag is noticed); everything else is
    /// done at most once per manifest digest, across processes.
    #[instrument(skip_all, fields(image = %r))]
    pub async fn pull(
        &self,
        r: &ImageRef,
        opts: &PullOptions,
        progress: &dyn Progress,
    ) -> Result<Image, PullImageError> {
        let started = Instant::now();
        let key = ref_key(r);
        let cache_err =
            |path: PathBuf| move |source: io::Error| PullImageError::Cache { path, source };
        progress.start(&PullPhase::Resolve, None);
        let source = Source::open(r, opts, &self.root.join("tmp"))?;
        let resolved = source.resolve(&opts.platform).await?;
        progress.finish(&PullPhase::Resolve);
        let digest = resolved.digest.clone();
        let hex = hex_of(&digest).to_owned();

        if let Some(img) = self.load(&hex, &key, false) {
            self.write_ref(&key, &digest)
                .map_err(cache_err(self.ref_path(&key)))?;
            info!(
                digest,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "image cache hit"
            );
            return Ok(img);
        }
        let _lock = self.lock(&hex).await?;
        if let Some(img) = self.load(&hex, &key, false) {
            self.write_ref(&key, &digest)
                .map_err(cache_err(self.ref_path(&key)))?;
            info!(digest, "image built by another pull meanwhile");
            return Ok(img);
        }

        let work = tempfile::Builder::new()
            .prefix(&format!("{hex}."))
            .tempdir_in(self.root.join("tmp"))
            .map_err(cache_err(self.root.join("tmp")))?;
        let m = &resolved.manifest;
        // Declared after `work`, so dropped first: a cancelled pull stops its blocking
        // workers before its work dir is removed.
        let cancel = CancelOnDrop(Arc::new(AtomicBool::new(false)));
        let mut unpack_opts = opts.unpack.clone();
        unpack_opts.cancel = cancel.0.clone();

        // Config.
        source::size_limit("config", &m.config, source::MAX_DOCUMENT)?;
        let config_path = source
            .fetch_blob(
                "config",
                &m.config,
                &work.path().join("config.json"),
                progress,
            )
            .await?;
        let config_bytes = fs::read(&config_path).map_err(cache_err(config_path.clone()))?;
        let (config, diff_ids) = manifest::parse_config(&config_bytes).map_err(|reason| {
            PullImageError::MalformedConfig {
                digest: m.config.digest.clone(),
                reason,
            }
        })?;
        if !diff_ids.is_empty() && diff_ids.len() != m.layers.len() {
            return Err(PullImageError::MalformedConfig {
                digest: m.config.digest.clone(),
                reason: format!("{} diff_ids for {} layers", diff_ids.len(), m.layers.len()),
            });
        }
        // Check the layer count, every declared size and type before transferring anything.
        if m.layers.len() > MAX_LAYERS {
            return Err(PullImageError::MalformedManifest {
                reference: source.what(),
                reason: format!(
                    "{} layers, more than the {MAX_LAYERS} allowed",
                    m.layers.len()
                ),
            });
        }
        for l in &m.layers {
            source::size_limit("layer", l, opts.max_layer_size)?;
            source::layer_compression(l)?;
        }

        let rootfs = work.path().join("rootfs");
        fs::create_dir(&rootfs).map_err(cache_err(rootfs.clone()))?;
        let blob_dir = work.path().join("blobs");
        fs::create_dir(&blob_dir).map_err(cache_err(blob_dir.clone()))?;
        for (i, l) in m.layers.iter().enumerate() {
            let phase = source::phase_download(l);
            progress.start(&phase, Some(l.size));
            let dest = blob_dir.join(hex_of(&l.digest));
            let blob = source.fetch_blob("layer", l, &dest, progress).await?;
            progress.finish(&phase);

            let phase = PullPhase::Unpack {
                digest: l.digest.clone(),
            };
            progress.start(&phase, None);
            let compression = match source::layer_compression(l)? {
                manifest::Compression::None => {
                    // docker-archive layers are declared plain but may be compressed.
                    let mut head = [0u8; 4];
                    let n = fs::File::open(&blob)
                        .and_then(|mut f| io::Read::read(&mut f, &mut head))
                        .map_err(cache_err(blob.clone()))?;
                    manifest::Compression::sniff(&head[..n])
                }
                c => c,
            };
            let (root2, blob2, layer, diff, uopts) = (
                rootfs.clone(),
                blob.clone(),
                l.digest.clone(),
                diff_ids.get(i).cloned(),
                unpack_opts.clone(),
            );
            let stats = tokio::task::spawn_blocking(move || {
                unpack::unpack_layer_file(
                    &root2,
                    &blob2,
                    compression,
                    &layer,
                    diff.as_deref(),
                    &uopts,
                )
            })
            .await
            .map_err(|e| PullImageError::Internal(e.to_string()))??;
            info!(layer = %l.digest, entries = stats.entries, whiteouts = stats.whiteouts, skipped = stats.skipped, "layer applied");
            if blob.starts_with(work.path()) {
                let _ = fs::remove_file(&blob);
            }
            progress.finish(&phase);
        }

        progress.start(&PullPhase::BuildDisk, None);
        let out = work.path().join("out");
        fs::create_dir(&out).map_err(cache_err(out.clone()))?;
        let (root2, disk_path, uuid) = (rootfs.clone(), out.join(DISK_FILE), hex[..32].to_owned());
        let flag = cancel.0.clone();
        let size = tokio::task::spawn_blocking(move || {
            disk::build_ext4(&root2, &disk_path, "kiln-image", &uuid, &flag)
        })
        .await
        .map_err(|e| PullImageError::Internal(e.to_string()))??;
        progress.finish(&PullPhase::BuildDisk);

        let rec = Record {
            manifest_digest: digest.clone(),
            config,
            layers: m.layers.iter().map(|l| l.digest.clone()).collect(),
            size,
            created_unix: now_unix(),
            source: source.what(),
        };
        let bytes =
            serde_json::to_vec_pretty(&rec).map_err(|e| PullImageError::Internal(e.to_string()))?;
        write_atomic(&out.join(META_FILE), &bytes).map_err(cache_err(out.join(META_FILE)))?;
        // Read-only from here on: every sandbox of this image shares it.
        fs::set_permissions(out.join(DISK_FILE), fs::Permissions::from_mode(0o444))
            .and_then(|()| fs::File::open(out.join(DISK_FILE)))
            .and_then(|f| f.sync_all())
            .map_err(cache_err(out.join(DISK_FILE)))?;
        let final_dir = self.image_dir(&hex);
        fs::rename(&out, &final_dir).map_err(cache_err(final_dir.clone()))?;
        drop(work);
        self.write_ref(&key, &digest)
            .map_err(cache_err(self.ref_path(&key)))?;
        info!(
            digest,
            size,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "image pulled and base disk built"
        );
        self.load(&hex, &key, true)
            .ok_or_else(|| PullImageError::Internal("committed image is unreadable".into()))
    }

    /// Every cached image: one entry per reference, plus digests no reference names.
    pub fn list(&self) -> Result<Vec<Image>, ListImagesError> {
        let io_err = |path: PathBuf| move |source: io::Error| ListImagesError::Io { path, source };
        let refs = self.read_refs().map_err(io_err(self.root.join("refs")))?;
        let mut out = Vec::new();
        let mut named = std::collections::HashSet::new();
        for (_, r) in &refs {
            if let Some(img) = self.load(hex_of(&r.digest), &r.reference, false) {
                named.insert(hex_of(&r.digest).to_owned());
                out.push(img);
            }
        }
        let dir = self.root.join("sha256");
        let mut digests: Vec<String> = fs::read_dir(&dir)
            .map_err(io_err(dir.clone()))?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        digests.sort();
        for hex in digests {
            if !named.contains(&hex)
                && let Some(img) = self.load(&hex, &format!("sha256:{hex}"), false)
            {
                out.push(img);
            }
        }
        Ok(out)
    }

    /// The base disk an image digest has in this cache (present or not).
    pub fn disk_path(&self, digest: &str) -> PathBuf {
        self.image_dir(hex_of(digest)).join(DISK_FILE)
    }

    /// What [`ImageStore::remove`] would remove for `what` (a reference or
    /// a `sha256:` digest), without removing anything: callers check that
    /// nothing uses the image before they remove it.
    pub fn removal(&self, what: &str) -> Result<Removal, RemoveImageError> {
        let io_err = |path: PathBuf| move |source: io::Error| RemoveImageError::Io { path, source };
        let refs = self.read_refs().map_err(io_err(self.root.join("refs")))?;
        if crate::reference::valid_digest(what) {
            let references: Vec<String> = refs
                .iter()
                .filter(|(_, r)| r.digest == what)
                .map(|(_, r)| r.reference.clone())
                .collect();
            let exists = self.image_dir(hex_of(what)).exists();
            if !exists && references.is_empty() {
                return Err(RemoveImageError::NotFound(what.to_owned()));
            }
            return Ok(Removal {
                digest: what.to_owned(),
                disk: self.disk_path(what),
                references,
                deletes_image: exists,
            });
        }
        let key = ref_key(&ImageRef::parse(what)?);
        let path = self.ref_path(&key);
        let Some((_, rec)) = refs.iter().find(|(p, _)| *p == path) else {
            return Err(RemoveImageError::NotFound(what.to_owned()));
        };
        let others = refs
            .iter()
            .any(|(p, r)| *p != path && r.digest == rec.digest);
        Ok(Removal {
            digest: rec.digest.clone(),
            disk: self.disk_path(&rec.digest),
            references: vec![rec.reference.clone()],
            deletes_image: !others && self.image_dir(hex_of(&rec.digest)).exists(),
        })
    }

    /// Removes a reference, or every reference to a `sha256:` digest, and
    /// keeps the image: it stays listed under its digest until removed by
    /// digest or pruned. Returns the references removed.
    pub fn untag(&self, what: &str) -> Result<Vec<String>, RemoveImageError> {
        let io_err = |path: PathBuf| move |source: io::Error| RemoveImageError::Io { path, source };
        let refs = self.read_refs().map_err(io_err(self.root.join("refs")))?;
        let gone: Vec<&(PathBuf, RefRecord)> = if crate::reference::valid_digest(what) {
            if !self.image_dir(hex_of(what)).exists() && !refs.iter().any(|(_, r)| r.digest == what)
            {
                return Err(RemoveImageError::NotFound(what.to_owned()));
            }
            refs.iter().filter(|(_, r)| r.digest == what).collect()
        } else {
            let path = self.ref_path(&ref_key(&ImageRef::parse(what)?));
            let found: Vec<_> = refs.iter().filter(|(p, _)| *p == path).collect();
            if found.is_empty() {
                return Err(RemoveImageError::NotFound(what.to_owned()));
            }
            found
        };
        for (path, _) in &gone {
            fs::remove_file(path).map_err(io_err(path.clone()))?;
        }
        Ok(gone.iter().map(|(_, r)| r.reference.clone()).collect())
    }

    /// Removes a reference (and its image if nothing else names it), or a `sha256:` digest
    /// (the image and every reference to it). Returns the removed image digests.
    ///
    /// The cache does not know what runs from its images: callers check
    /// first ([`ImageStore::removal`] says whether the image would go).
    pub fn remove(&self, what: &str) -> Result<Vec<String>, RemoveImageError> {
        let io_err = |path: PathBuf| move |source: io::Error| RemoveImageError::Io { path, source };
        let refs = self.read_refs().map_err(io_err(self.root.join("refs")))?;
        let digest = if crate::reference::valid_digest(what) {
            let mut found = self.image_dir(hex_of(what)).exists();
            for (path, r) in &refs {
                if r.digest == what {
                    fs::remove_file(path).map_err(io_err(path.clone()))?;
                    found = true;
                }
            }
            if !found {
                return Err(RemoveImageError::NotFound(what.to_owned()));
            }
            what.to_owned()
        } else {
            let key = ref_key(&ImageRef::parse(what)?);
            let path = self.ref_path(&key);
            let Some((_, rec)) = refs.iter().find(|(p, _)| *p == path) else {
                return Err(RemoveImageError::NotFound(what.to_owned()));
            };
            fs::remove_file(&path).map_err(io_err(path.clone()))?;
            if refs
                .iter()
                .any(|(p, r)| *p != path && r.digest == rec.digest)
            {
                return Ok(Vec::new());
            }
            rec.digest.clone()
        };
        let hex = hex_of(&digest).to_owned();
        if self
            .remove_image_dir(&hex)
            .map_err(io_err(self.image_dir(&hex)))?
        {
            Ok(vec![digest])
        } else {
            Ok(Vec::new())
        }
    }

    /// Moves an image dir out of sight atomically, then deletes it. Skips images being built.
    fn remove_image_dir(&self, hex: &str) -> io::Result<bool> {
        let dir = self.image_dir(hex);
        if !dir.exists() {
            return Ok(false);
        }
        let Some(_lock) = self.try_lock(hex)? else {
            warn!(digest = hex, "image is being pulled; not removing it");
            return Ok(false);
        };
        let grave = self
            .root
            .join("tmp")
            .join(format!("{hex}.removed-{}", now_unix()));
        fs::rename(&dir, &grave)?;
        fs::remove_dir_all(&grave)?;
        Ok(true)
    }

    /// Removes stale work dirs and images that no reference names.
    pub fn prune(&self) -> Result<PruneReport, PruneImagesError> {
        self.prune_keeping(|_| false)
    }

    /// [`ImageStore::prune`], keeping also the unnamed images for whose
    /// digest `in_use` is true (listed in [`PruneReport::kept`]).
    pub fn prune_keeping(
        &self,
        mut in_use: impl FnMut(&str) -> bool,
    ) -> Result<PruneReport, PruneImagesError> {
        let io_err = |path: PathBuf| move |source: io::Error| PruneImagesError::Io { path, source };
        let tmp = self.root.join("tmp");
        let before = dir_size(&tmp);
        let temp_dirs = self.clean_stale_temp().map_err(io_err(tmp.clone()))?;
        let mut report = PruneReport {
            temp_dirs,
            bytes: before.saturating_sub(dir_size(&tmp)),
            ..Default::default()
        };
        let refs = self.read_refs().map_err(io_err(self.root.join("refs")))?;
        let named: std::collections::HashSet<String> = refs
            .iter()
            .map(|(_, r)| hex_of(&r.digest).to_owned())
            .collect();
        let dir = self.root.join("sha256");
        for e in fs::read_dir(&dir).map_err(io_err(dir.clone()))?.flatten() {
            let hex = e.file_name().to_string_lossy().into_owned();
            if named.contains(&hex) {
                continue;
            }
            let digest = format!("sha256:{hex}");
            if in_use(&digest) {
                report.kept.push(digest);
                continue;
            }
            let size = dir_size(&e.path());
            if self.remove_image_dir(&hex).map_err(io_err(e.path()))? {
                report.images.push(digest);
                report.bytes += size;
            }
        }
        // Lock files of images no longer present.
        if let Ok(rd) = fs::read_dir(self.root.join("locks")) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let hex = name.trim_end_matches(".lock");
                if !self.image_dir(hex).exists()
                    && let Ok(Some(_l)) = self.try_lock(hex)
                {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        Ok(report)
    }
}
