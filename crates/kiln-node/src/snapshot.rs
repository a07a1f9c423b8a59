//! The snapshot store: sandboxes captured to disk (memory, CPU and device
//! state from the VMM driver, plus the writable disk), each with a manifest
//! that is checked before anything is loaded.
//!
//! Layout, under the state directory so snapshots survive restarts:
//!
//! ```text
//! snapshots/<name>/manifest.json   what was captured and how to check it
//! snapshots/<name>/vmm/            the driver's snapshot (QEMU: state, memory, snapshot.json)
//! snapshots/<name>/rw.ext4         the sandbox's writable disk (sparse copy)
//! snapshots/<name>/users/<id>      sandboxes restored from it that still run
//! snapshots/.staging-*             snapshots being written (renamed when complete)
//! ```
//!
//! **Why `users/`**: a QEMU restore maps `vmm/memory` privately
//! (copy-on-write) for the whole life of the restored VM, and a snapshot of
//! that VM copies the same file again. So a snapshot must outlive the
//! sandboxes restored from it. Every restore adds `users/<id>`; the
//! sandbox's supervisor removes it when the VM is gone. A user snapshot
//! cannot be removed while a live sandbox uses it. A fork's snapshot is
//! `ephemeral`: whoever removes the last user entry removes the snapshot.
//! "Last" is decided by `rmdir(users)`, which the kernel does atomically and
//! only on an empty directory, so two forks ending together cannot both (or
//! neither) remove it. Only `kiln fork` adds users to an ephemeral snapshot,
//! and it holds its own entry until every restore has registered, so the
//! snapshot cannot vanish between two restores.
//!
//! **Digests**: files are hashed as `sha256-extents`: SHA-256 over every data
//! extent of the file (`SEEK_DATA`/`SEEK_HOLE`) as (offset u64 LE, length
//! u64 LE, bytes), plus the file size in the manifest. Holes read as zeros,
//! so this covers the whole content while skipping the holes: a plain
//! SHA-256 of a sparse 4 GiB writable disk reads 4 GiB of zeros (about 25 s
//! on the 2-core CI machines), while its data is a few MiB. Any changed
//! byte, truncation, or data written into a hole changes the digest.

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use kiln_vmm::{DriverInfo, DriverKind};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::paths::{Dirs, GuestArtifacts};
use crate::store::{SandboxSpec, now_secs};

mod digest;
use digest::*;
mod users;
pub use digest::{digest_with, file_digest};

/// Version of the manifest format (and of the snapshot layout: the VM's
/// devices must match at a restore). 2: QEMU's virtio-serial device has
/// two ports (`max_ports=2`); a format-1 snapshot is refused, a format-1
/// template replaced.
pub const FORMAT_VERSION: u32 = 2;
/// The manifest's file name.
pub const MANIFEST: &str = "manifest.json";
/// The driver's snapshot, inside a snapshot directory.
pub const VM_DIR: &str = "vmm";
/// The writable disk, inside a snapshot directory and a sandbox directory.
pub const RW_DISK: &str = "rw.ext4";
/// How file digests are computed (see `file_digest`).
pub const DIGEST_ALGORITHM: &str = "sha256-pages";
/// What manifests written before `sha256-pages` used (`extents_digest`):
/// still verified, never written.
pub const LEGACY_DIGEST_ALGORITHM: &str = "sha256-extents";

/// Digests of the guest artifacts a snapshot was taken with. A snapshot holds
/// a running kernel and `kiln-init`: loading it under anything else is
/// refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestDigests {
    /// The kernel the driver boots (QEMU: bzImage, Firecracker: vmlinux).
    pub kernel_sha256: String,
    pub initramfs_sha256: String,
    /// The `kiln-init` binary packed in the initramfs (empty if absent).
    pub init_sha256: String,
}

/// One file of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    /// Relative to the snapshot directory.
    pub path: String,
    pub size: u64,
    /// `DIGEST_ALGORITHM`, hex.
    pub sha256: String,
}

/// What `manifest.json` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: u32,
    pub name: String,
    pub created_at: u64,
    /// The sandbox it was taken from.
    pub source: String,
    /// Taken by `kiln fork`: removed with its last restored sandbox.
    pub ephemeral: bool,
    pub guest: GuestDigests,
    /// The driver (kind, binary, version, accelerator) that wrote it.
    pub driver: DriverInfo,
    pub cpus: u32,
    pub memory_mib: u32,
    pub image_digest: String,
    pub image_disk: PathBuf,
    /// `DIGEST_ALGORITHM` of the image disk the snapshot's guest has
    /// mounted (its page cache refers to those blocks): a disk rebuilt with
    /// other contents under the same path is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_disk_sha256: Option<String>,
    /// The source sandbox's spec (command, env, user, cwd, resources).
    pub spec: SandboxSpec,
    /// The main process, inside the guest.
    pub main_pid: u32,
    /// How long the guest was stopped while the driver wrote its state.
    pub downtime_ms: u64,
    pub digest_algorithm: String,
    /// Every file of the snapshot except the manifest.
    pub files: Vec<FileDigest>,
    /// Set for a template (`kiln_node::template`): an image booted to the
    /// point where `kiln-init` answers, with no main process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<TemplateInfo>,
    /// The CPU the guest was running on (a restored kernel keeps using the
    /// features it found at boot).
    #[serde(default)]
    pub cpu: CpuFeatures,
}

/// What the guest's CPU offered when the snapshot was taken.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuFeatures {
    /// The driver's CPU model (`DriverInfo::cpu_model`).
    pub model: String,
    /// The host CPU's feature flags when the guest sees the host CPU (a
    /// KVM model passing it through); empty when the VMM emulates a fixed
    /// model (TCG), whose features do not depend on the host.
    pub flags: Vec<String>,
}

impl CpuFeatures {
    /// What a guest of `driver` sees on this host.
    pub fn of(driver: &DriverInfo) -> CpuFeatures {
        let passthrough = driver.accel == kiln_vmm::Accel::Kvm;
        CpuFeatures {
            model: driver.cpu_model.clone(),
            flags: if passthrough {
                host_cpu_flags()
            } else {
                vec![]
            },
        }
    }
}

/// The feature flags of this host's CPU (`/proc/cpuinfo`), sorted.
pub fn host_cpu_flags() -> Vec<String> {
    let info = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let mut flags: Vec<String> = info
        .lines()
        .find(|l| l.starts_with("flags"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, f)| f.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default();
    flags.sort();
    flags.dedup();
    flags
}

/// What a template was made for, beyond the fields every manifest has
/// (image digest, cpus, memory): a template is used only by a run that asks
/// for exactly this.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateInfo {
    /// `kiln_node::template::key` of everything the template depends on.
    pub key: String,
    /// Size of the writable disk.
    pub disk_mib: u32,
    /// Its VM has a network device (a template for `--net default` runs).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub network: bool,
}

impl Manifest {
    /// Apparent size of the snapshot's files (holes included).
    pub fn total_size(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

/// What the supervisor knows when it writes a manifest.
#[derive(Debug, Clone)]
pub struct ManifestParts {
    pub name: String,
    pub source: String,
    pub ephemeral: bool,
    pub guest: GuestDigests,
    pub driver: DriverInfo,
    pub spec: SandboxSpec,
    pub main_pid: u32,
    pub downtime_ms: u64,
}

/// Writing a snapshot failed.
#[derive(Debug, thiserror::Error)]
pub enum CreateSnapshotError {
    #[error(
        "invalid snapshot name {0:?}: use 1-128 characters of [A-Za-z0-9._-], not starting with . or -"
    )]
    InvalidName(String),
    #[error("a snapshot named {0:?} already exists")]
    Exists(String),
    #[error("cannot write {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot copy {from} to {to}: {reason}")]
    Copy {
        from: PathBuf,
        to: PathBuf,
        reason: String,
    },
}

/// A snapshot cannot be loaded here. Checked before anything is started.
#[derive(Debug, thiserror::Error)]
pub enum VerifySnapshotError {
    #[error("no snapshot named {0:?}")]
    NotFound(String),
    #[error("cannot read {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the manifest {path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("snapshot {name} has format {found}; this kiln reads format {FORMAT_VERSION}")]
    Format { name: String, found: u32 },
    #[error("snapshot {name} was taken with another {what} (sha256 {taken}, now {now})")]
    Guest {
        name: String,
        what: &'static str,
        taken: String,
        now: String,
    },
    #[error("snapshot {name} was taken with {taken}; this host runs {now}")]
    Driver {
        name: String,
        taken: String,
        now: String,
    },
    #[error("snapshot {name} needs the image disk {path}, which is missing: pull {image} again")]
    ImageDisk {
        name: String,
        path: PathBuf,
        image: String,
    },
    #[error("snapshot {name}: {path} is missing")]
    MissingFile { name: String, path: String },
    #[error("snapshot {name}: {path} is {actual} bytes, the manifest says {expected} (truncated?)")]
    Size {
        name: String,
        path: String,
        expected: u64,
        actual: u64,
    },
    #[error(
        "snapshot {name} was taken on another CPU (model {taken}, now {now}{}): its guest would fault on restore",
        if missing.is_empty() { String::new() } else { format!("; this host lacks {}", missing.join(", ")) }
    )]
    Cpu {
        name: String,
        taken: String,
        now: String,
        missing: Vec<String>,
    },
    #[error(
        "snapshot {name} needs the disk of image {image} as it was ({path}), and it has changed since"
    )]
    ImageDiskChanged {
        name: String,
        path: PathBuf,
        image: String,
    },
    #[error("snapshot {name}: {path} is corrupted (its digest does not match the manifest)")]
    Digest { name: String, path: String },
}

/// Removing a snapshot failed.
#[derive(Debug, thiserror::Error)]
pub enum RemoveSnapshotError {
    #[error("no snapshot named {0:?}")]
    NotFound(String),
    #[error(
        "snapshot {name} is in use by sandboxes restored from it: {}; remove them first",
        users.join(", ")
    )]
    InUse { name: String, users: Vec<String> },
    #[error("cannot remove {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Listing snapshots failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot read the snapshot directory {path}")]
pub struct ListSnapshotsError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// One entry of `kiln snapshot ls`.
#[derive(Debug, Clone)]
pub struct SnapshotEntry {
    pub manifest: Manifest,
    /// Sandboxes restored from it that have not ended.
    pub users: Vec<String>,
}

/// Checks a user-given snapshot name.
pub fn validate_name(name: &str) -> Result<(), CreateSnapshotError> {
    // The same rule as the API's (`kiln_api::sandbox::valid_name`).
    if kiln_api::sandbox::valid_name(name) {
        Ok(())
    } else {
        Err(CreateSnapshotError::InvalidName(name.to_string()))
    }
}

/// A fresh name: `<prefix>-` and 8 hex digits.
pub fn new_name(prefix: &str) -> String {
    let mut b = [0u8; 4];
    rand::fill(&mut b);
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{prefix}-{hex}")
}

/// The snapshots of one state directory.
#[derive(Debug, Clone)]
pub struct SnapshotStore {
    root: PathBuf,
    /// Where file digests are remembered while the files are unchanged.
    memo: Option<PathBuf>,
}

impl SnapshotStore {
    pub fn new(dirs: &Dirs) -> SnapshotStore {
        SnapshotStore::at(dirs.state.join("snapshots")).with_memo(dirs.memo())
    }

    /// A store with the same layout under another directory (templates).
    pub fn at(root: PathBuf) -> SnapshotStore {
        SnapshotStore { root, memo: None }
    }

    /// Remembers file digests in `memo` (`kiln_vmm::memo`): a full check of
    /// an unchanged snapshot then costs a `stat` per file.
    pub fn with_memo(mut self, memo: PathBuf) -> SnapshotStore {
        self.memo = Some(memo);
        self
    }

    pub fn memo(&self) -> Option<&Path> {
        self.memo.as_deref()
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    pub fn exists(&self, name: &str) -> bool {
        validate_name(name).is_ok() && self.dir(name).join(MANIFEST).is_file()
    }

    /// A new, empty staging directory for snapshot `name`.
    pub fn staging(&self, name: &str) -> Result<PathBuf, CreateSnapshotError> {
        validate_name(name)?;
        if self.dir(name).exists() {
            return Err(CreateSnapshotError::Exists(name.to_string()));
        }
        // Its owner (the process that will publish it) is in its name, so
        // no moment exists at which it has no owner: `reap_staging`.
        let me = crate::store::ProcessIdentity::current();
        let dir = self
            .root
            .join(format!(".staging-{}.{}", new_name(name), me.suffix()));
        fs::create_dir_all(&dir).map_err(|source| CreateSnapshotError::Io {
            path: dir.clone(),
            source,
        })?;
        Ok(dir)
    }

    /// Removes staging directories whose owner died (a killed `kiln
    /// snapshot`, `kiln fork` or node), and ownerless ones older than
    /// `grace`. How many it removed.
    pub fn reap_staging(&self, grace: std::time::Duration) -> u32 {
        let Ok(rd) = fs::read_dir(&self.root) else {
            return 0;
        };
        let mut n = 0;
        for e in rd.flatten() {
            let is_staging = e
                .file_name()
                .to_str()
                .is_some_and(|n| n.starts_with(".staging-"));
            if !is_staging {
                continue;
            }
            let dir = e.path();
            let owner = e.file_name().to_str().and_then(staging_owner);
            let abandoned = match owner {
                Some(o) => !o.alive(),
                None => e
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age > grace),
            };
            if !abandoned {
                continue;
            }
            // A process still writing into it (a supervisor whose `kiln
            // snapshot` was killed) holds its lock: leave it until it is done.
            let Ok(lock) = fs::File::open(&dir) else {
                continue;
            };
            if lock.try_lock().is_err() {
                continue;
            }
            tracing::info!(dir = %dir.display(), "removing the staging directory of a process that died");
            if fs::remove_dir_all(&dir).is_ok() {
                n += 1;
            }
        }
        n
    }

    /// Locks staging directory `dir` for a process that writes into it but
    /// is not its owner (the supervisor of a `kiln snapshot`):
    /// `reap_staging` never removes it while the lock is held, even once
    /// its owner died. Fails if the directory is gone (reaped before).
    pub fn lock_staging(dir: &Path) -> Result<StagingLock, CreateSnapshotError> {
        use std::os::unix::fs::MetadataExt;
        let io = |source| CreateSnapshotError::Io {
            path: dir.to_path_buf(),
            source,
        };
        let f = fs::File::open(dir).map_err(io)?;
        f.lock().map_err(io)?;
        // A reaper may have removed it while this waited for the lock.
        let (held, now) = (f.metadata().map_err(io)?, fs::metadata(dir).map_err(io)?);
        if (held.dev(), held.ino()) != (now.dev(), now.ino()) || held.nlink() == 0 {
            return Err(io(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "the staging directory was removed",
            )));
        }
        Ok(StagingLock(f))
    }

    /// Makes a complete staging directory the snapshot `name`.
    pub fn publish(&self, staging: &Path, name: &str) -> Result<(), CreateSnapshotError> {
        let dest = self.dir(name);
        if dest.exists() {
            return Err(CreateSnapshotError::Exists(name.to_string()));
        }
        fs::rename(staging, &dest).map_err(|source| CreateSnapshotError::Io { path: dest, source })
    }

    /// Reads a snapshot's manifest (no checks beyond its shape and format).
    pub fn manifest(&self, name: &str) -> Result<Manifest, VerifySnapshotError> {
        if validate_name(name).is_err() {
            return Err(VerifySnapshotError::NotFound(name.to_string()));
        }
        let path = self.dir(name).join(MANIFEST);
        let bytes = fs::read(&path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                VerifySnapshotError::NotFound(name.to_string())
            } else {
                VerifySnapshotError::Io {
                    path: path.clone(),
                    source,
                }
            }
        })?;
        // Read the version first, so a future format is named as such.
        let format = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v.get("format").and_then(|f| f.as_u64()));
        if let Some(f) = format
            && f != u64::from(FORMAT_VERSION)
        {
            return Err(VerifySnapshotError::Format {
                name: name.to_string(),
                found: u32::try_from(f).unwrap_or(u32::MAX),
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| VerifySnapshotError::Corrupt {
            path,
            reason: e.to_string(),
        })
    }

    /// Checks that snapshot `name` can be loaded with these guest artifacts
    /// and this driver: format, kernel/initramfs/kiln-init digests, driver
    /// kind, version and accelerator, the image disk, and (if `contents`)
    /// the size and digest of every file. Nothing is started.
    pub fn verify(
        &self,
        name: &str,
        guest: &GuestDigests,
        driver: &DriverInfo,
        contents: bool,
    ) -> Result<Manifest, VerifySnapshotError> {
        let m = self.manifest(name)?;
        let n = || name.to_string();
        for (what, taken, now) in [
            ("kernel", &m.guest.kernel_sha256, &guest.kernel_sha256),
            (
                "initramfs",
                &m.guest.initramfs_sha256,
                &guest.initramfs_sha256,
            ),
            ("kiln-init", &m.guest.init_sha256, &guest.init_sha256),
        ] {
            if taken != now {
                return Err(VerifySnapshotError::Guest {
                    name: n(),
                    what,
                    taken: short(taken),
                    now: short(now),
                });
            }
        }
        let describe = |d: &DriverInfo| format!("{} {} ({})", d.kind, d.version, d.accel);
        if m.driver.kind != driver.kind
            || m.driver.version != driver.version
            || m.driver.accel != driver.accel
        {
            return Err(VerifySnapshotError::Driver {
                name: n(),
                taken: describe(&m.driver),
                now: describe(driver),
            });
        }
        // A snapshot from before CPU features were recorded has none.
        if !m.cpu.model.is_empty() {
            let now = CpuFeatures::of(driver);
            let missing: Vec<&str> = m
                .cpu
                .flags
                .iter()
                .filter(|f| now.flags.binary_search(f).is_err())
                .map(String::as_str)
                .collect();
            if m.cpu.model != now.model || !missing.is_empty() {
                return Err(VerifySnapshotError::Cpu {
                    name: n(),
                    taken: m.cpu.model.clone(),
                    now: now.model,
                    missing: missing.iter().take(8).map(|f| f.to_string()).collect(),
                });
            }
        }
        if !m.image_disk.is_file() {
            return Err(VerifySnapshotError::ImageDisk {
                name: n(),
                path: m.image_disk.clone(),
                image: m.spec.image.clone(),
            });
        }
        let dir = self.dir(name);
        for f in &m.files {
            if !safe_relative(&f.path) {
                return Err(VerifySnapshotError::Corrupt {
                    path: dir.join(MANIFEST),
                    reason: format!("file path {:?} leaves the snapshot", f.path),
                });
            }
            let path = dir.join(&f.path);
            let meta = fs::metadata(&path).map_err(|source| {
                if source.kind() == std::io::ErrorKind::NotFound {
                    VerifySnapshotError::MissingFile {
                        name: n(),
                        path: f.path.clone(),
                    }
                } else {
                    VerifySnapshotError::Io {
                        path: path.clone(),
                        source,
                    }
                }
            })?;
            if meta.len() != f.size {
                return Err(VerifySnapshotError::Size {
                    name: n(),
                    path: f.path.clone(),
                    expected: f.size,
                    actual: meta.len(),
                });
            }
        }
        if contents && let Some(want) = &m.image_disk_sha256 {
            let now = digest_files(
                std::slice::from_ref(&m.image_disk),
                self.memo.as_deref(),
                &m.digest_algorithm,
            )
            .pop()
            .and_then(Result::ok)
            .map(|(_, d)| d);
            if now.as_ref() != Some(want) {
                return Err(VerifySnapshotError::ImageDiskChanged {
                    name: n(),
                    path: m.image_disk.clone(),
                    image: m.spec.image.clone(),
                });
            }
        }
        if contents {
            let t0 = Instant::now();
            let paths: Vec<PathBuf> = m.files.iter().map(|f| dir.join(&f.path)).collect();
            let digests = digest_files(&paths, self.memo.as_deref(), &m.digest_algorithm);
            for (f, (path, d)) in m.files.iter().zip(paths.iter().zip(digests)) {
                let d = d.map_err(|source| VerifySnapshotError::Io {
                    path: path.clone(),
                    source,
                })?;
                if d.1 != f.sha256 {
                    return Err(VerifySnapshotError::Digest {
                        name: n(),
                        path: f.path.clone(),
                    });
                }
            }
            tracing::info!(
                snapshot = name,
                elapsed_ms = t0.elapsed().as_millis() as u64,
                bytes = m.total_size(),
                "snapshot contents verified"
            );
        }
        Ok(m)
    }

    /// Every snapshot, oldest first (unreadable ones are skipped with a
    /// warning; staging directories are not listed).
    pub fn list(&self) -> Result<Vec<SnapshotEntry>, ListSnapshotsError> {
        let rd = match fs::read_dir(&self.root) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
            Err(source) => {
                return Err(ListSnapshotsError {
                    path: self.root.clone(),
                    source,
                });
            }
        };
        let mut out = vec![];
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if validate_name(&name).is_err() || !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            match self.manifest(&name) {
                Ok(manifest) => out.push(SnapshotEntry {
                    users: self.users(&name),
                    manifest,
                }),
                Err(err) => {
                    tracing::warn!(snapshot = %name, error = %err, "skipping unreadable snapshot")
                }
            }
        }
        out.sort_by(|a, b| {
            (a.manifest.created_at, &a.manifest.name)
                .cmp(&(b.manifest.created_at, &b.manifest.name))
        });
        Ok(out)
    }

    /// Removes staging directories left by interrupted snapshots.
    pub fn remove_staging(&self, staging: &Path) {
        if staging.starts_with(&self.root) {
            let _ = fs::remove_dir_all(staging);
        }
    }
}

/// Held while a process writes into a staging directory it does not own
/// (`SnapshotStore::lock_staging`); released on drop.
pub struct StagingLock(#[allow(dead_code)] fs::File);

/// The owner named in a staging directory's name
/// (`.staging-NAME.PID.START`).
fn staging_owner(dir_name: &str) -> Option<crate::store::ProcessIdentity> {
    crate::store::ProcessIdentity::from_suffix(dir_name)
}

fn short(hex: &str) -> String {
    if hex.is_empty() {
        "none".into()
    } else {
        hex.chars().take(12).collect()
    }
}

fn safe_relative(p: &str) -> bool {
    let path = Path::new(p);
    !p.is_empty()
        && path
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)))
}

/// Digests of the guest artifacts the driver `kind` boots.
pub fn guest_digests(
    artifacts: &GuestArtifacts,
    kind: DriverKind,
) -> std::io::Result<GuestDigests> {
    let kernel = artifacts.kernel_for(kind);
    let memo = kiln_vmm::memo::Memo::at(&artifacts.memo);
    let plain = |p: &Path| -> std::io::Result<String> {
        memo.get_or(p, "sha256", || {
            let mut f = fs::File::open(p)?;
            let mut h = Sha256::new();
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = f.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
            }
            Ok(hex(&h.finalize()))
        })
    };
    Ok(GuestDigests {
        kernel_sha256: plain(kernel)?,
        initramfs_sha256: plain(&artifacts.initramfs)?,
        init_sha256: if artifacts.init_binary.is_file() {
            plain(&artifacts.init_binary)?
        } else {
            String::new()
        },
    })
}

/// The name under which a process (not a sandbox) holds a snapshot while
/// it restores from it.
/// (`fork-PID.START`: a later process with the same pid is not taken for
/// it).
pub fn holder_name(p: crate::store::ProcessIdentity) -> String {
    format!("fork-{}", p.suffix())
}

/// Whether `user` names a process's hold (`holder_name`), not a sandbox.
fn is_process_hold(user: &str) -> bool {
    user.strip_prefix("fork-").is_some_and(|rest| {
        rest.split('.')
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
    })
}

/// Whether `user` is a process's hold (`holder_name`) whose process is gone.
fn holder_is_dead(user: &str) -> bool {
    let Some(rest) = user.strip_prefix("fork-") else {
        return false;
    };
    if let Some((pid, start)) = rest.split_once('.')
        && let (Ok(pid), Ok(start_time)) = (pid.parse(), start.parse())
    {
        return !crate::store::ProcessIdentity { pid, start_time }.alive();
    }
    // Holds taken before they named the start time.
    rest.parse::<u32>()
        .is_ok_and(|pid| !crate::store::process_alive(pid))
}

/// Hashes every file of the snapshot in `dir` and writes its manifest
/// (atomically: temp file, fsync, rename).
pub fn write_manifest(
    dir: &Path,
    parts: ManifestParts,
    memo: Option<&Path>,
) -> Result<Manifest, CreateSnapshotError> {
    write_manifest_with(dir, parts, None, memo)
}

/// `write_manifest`, recording what a template was made for.
pub fn write_manifest_with(
    dir: &Path,
    parts: ManifestParts,
    template: Option<TemplateInfo>,
    memo: Option<&Path>,
) -> Result<Manifest, CreateSnapshotError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| CreateSnapshotError::Io { path, source }
    };
    let t0 = Instant::now();
    let rel = relative_files(dir, &[MANIFEST, "users"]).map_err(io(dir))?;
    let paths: Vec<PathBuf> = rel.iter().map(|r| dir.join(r)).collect();
    let digests = digest_files(&paths, memo, DIGEST_ALGORITHM);
    let mut files = Vec::with_capacity(rel.len());
    for ((r, p), d) in rel.into_iter().zip(&paths).zip(digests) {
        let (size, sha256) = d.map_err(io(p))?;
        files.push(FileDigest {
            path: r,
            size,
            sha256,
        });
    }
    let cpu = CpuFeatures::of(&parts.driver);
    let image_disk_sha256 = match digest_files(
        std::slice::from_ref(&parts.spec.image_disk),
        memo,
        DIGEST_ALGORITHM,
    )
    .pop()
    {
        Some(Ok((_, d))) => Some(d),
        _ => None,
    };
    let m = Manifest {
        format: FORMAT_VERSION,
        name: parts.name,
        created_at: now_secs(),
        source: parts.source,
        ephemeral: parts.ephemeral,
        guest: parts.guest,
        cpus: parts.spec.cpus,
        memory_mib: parts.spec.memory_mib,
        image_digest: parts.spec.image_digest.clone(),
        image_disk: parts.spec.image_disk.clone(),
        image_disk_sha256,
        driver: parts.driver,
        spec: parts.spec,
        main_pid: parts.main_pid,
        downtime_ms: parts.downtime_ms,
        digest_algorithm: DIGEST_ALGORITHM.to_string(),
        files,
        template,
        cpu,
    };
    let path = dir.join(MANIFEST);
    let tmp = dir.join(".manifest.json.tmp");
    let body = serde_json::to_vec_pretty(&m).expect("manifests always serialize");
    let mut f = fs::File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(&body).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    fs::rename(&tmp, &path).map_err(io(&path))?;
    tracing::info!(
        snapshot = %m.name,
        elapsed_ms = t0.elapsed().as_millis() as u64,
        "snapshot manifest written"
    );
    Ok(m)
}

/// Copies `from` to `to` keeping holes (`cp --sparse=always`; no reflink on
/// the ext4 hosts this runs on).
pub async fn sparse_copy(from: &Path, to: &Path) -> Result<(), CreateSnapshotError> {
    kiln_vmm::sparse::copy(from, to)
        .await
        .map_err(|e| CreateSnapshotError::Copy {
            from: from.to_path_buf(),
            to: to.to_path_buf(),
            reason: e.to_string(),
        })
}

/// Bytes allocated on disk under `dir` (sparse files count their blocks).
pub fn disk_usage(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        let Ok(m) = e.metadata() else { continue };
        if m.is_dir() {
            total += disk_usage(&e.path());
        } else {
            total += m.blocks() * 512;
        }
    }
    total
}

#[cfg(test)]
mod tests;
