//! Where Kiln keeps things on a host.
//!
//! - the **state directory** (`KILN_STATE_DIR`; default `/var/lib/kiln` for
//!   root, `$XDG_STATE_HOME/kiln` otherwise) holds what must survive a
//!   restart: one directory per sandbox with its record, logs, disks and
//!   sockets. A second `kiln` process finds the sandboxes of the first here.
//! - the **cache directory** (`KILN_CACHE_DIR`; default `$XDG_CACHE_HOME/kiln`
//!   or `~/.cache/kiln`) holds what can be rebuilt: images, the guest kernel,
//!   the initramfs.

use std::path::{Path, PathBuf};

/// The directories of one host.
#[derive(Debug, Clone)]
pub struct Dirs {
    pub state: PathBuf,
    pub cache: PathBuf,
}

fn env_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

fn home() -> PathBuf {
    env_path("HOME").unwrap_or_else(|| PathBuf::from("/root"))
}

impl Dirs {
    /// The directories from the environment, with the defaults above.
    pub fn from_env() -> Dirs {
        let is_root = nix_is_root();
        let state = env_path("KILN_STATE_DIR").unwrap_or_else(|| {
            if is_root {
                PathBuf::from("/var/lib/kiln")
            } else {
                env_path("XDG_STATE_HOME")
                    .unwrap_or_else(|| home().join(".local/state"))
                    .join("kiln")
            }
        });
        let cache = env_path("KILN_CACHE_DIR").unwrap_or_else(|| {
            env_path("XDG_CACHE_HOME")
                .unwrap_or_else(|| home().join(".cache"))
                .join("kiln")
        });
        Dirs { state, cache }
    }

    /// Explicit directories (tests).
    pub fn new(state: impl Into<PathBuf>, cache: impl Into<PathBuf>) -> Dirs {
        Dirs {
            state: state.into(),
            cache: cache.into(),
        }
    }

    /// Facts remembered about unchanged files (`kiln_vmm::memo`).
    pub fn memo(&self) -> PathBuf {
        self.cache.join("memo")
    }

    /// Blank formatted writable disks, one per size (`vm::make_writable_disk`).
    pub fn blank_disks(&self) -> PathBuf {
        self.cache.join("blank-disks")
    }

    pub fn sandboxes(&self) -> PathBuf {
        self.state.join("sandboxes")
    }

    pub fn sandbox(&self, id: &str) -> PathBuf {
        self.sandboxes().join(id)
    }

    pub fn images(&self) -> PathBuf {
        self.cache.clone()
    }

    /// The guest kernel for QEMU (bzImage) and Firecracker (vmlinux):
    /// `KILN_KERNEL` or the newest build of `scripts/build-kernel.sh`.
    pub fn kernel_dir(&self) -> PathBuf {
        self.cache.join("kernel/current")
    }

    /// The initramfs holding `kiln-init`: `KILN_INITRAMFS` or the newest
    /// build of `scripts/build-initramfs.sh`.
    pub fn initramfs_dir(&self) -> PathBuf {
        self.cache.join("initramfs/current")
    }
}

/// The guest artifacts a VM boots with.
#[derive(Debug, Clone)]
pub struct GuestArtifacts {
    pub bzimage: PathBuf,
    pub vmlinux: PathBuf,
    pub initramfs: PathBuf,
    pub init_binary: PathBuf,
    /// Where their digests are remembered (`kiln_vmm::memo`).
    pub memo: PathBuf,
}

/// The guest kernel or initramfs is missing.
#[derive(Debug, thiserror::Error)]
#[error(
    "{what} not found at {path}; run scripts/quickstart.sh (or scripts/build-kernel.sh and scripts/build-initramfs.sh) first"
)]
pub struct MissingArtifact {
    pub what: &'static str,
    pub path: PathBuf,
}

impl GuestArtifacts {
    /// Locates the artifacts, honouring `KILN_KERNEL` (a bzImage whose
    /// directory also holds `vmlinux`) and `KILN_INITRAMFS`.
    pub fn locate(dirs: &Dirs) -> Result<GuestArtifacts, MissingArtifact> {
        let bzimage = env_path("KILN_KERNEL").unwrap_or_else(|| dirs.kernel_dir().join("bzImage"));
        let vmlinux = bzimage.with_file_name("vmlinux");
        let initramfs = env_path("KILN_INITRAMFS")
            .unwrap_or_else(|| dirs.initramfs_dir().join("initramfs.img"));
        let init_binary = initramfs.with_file_name("kiln-init");
        let check = |what, p: &Path| {
            if p.is_file() {
                Ok(())
            } else {
                Err(MissingArtifact {
                    what,
                    path: p.to_path_buf(),
                })
            }
        };
        check("the guest kernel", &bzimage)?;
        check("the initramfs", &initramfs)?;
        Ok(GuestArtifacts {
            bzimage: canon(bzimage),
            vmlinux: canon(vmlinux),
            initramfs: canon(initramfs),
            init_binary: canon(init_binary),
            memo: dirs.memo(),
        })
    }

    /// The kernel driver `kind` boots: the uncompressed `vmlinux` for both
    /// (QEMU enters it through its PVH note; under TCG a bzImage spends
    /// ~0.5 s decompressing itself), QEMU falling back to the bzImage
    /// when no `vmlinux` sits beside it.
    pub fn kernel_for(&self, kind: kiln_vmm::DriverKind) -> &Path {
        match kind {
            kiln_vmm::DriverKind::Qemu if !self.vmlinux.is_file() => &self.bzimage,
            _ => &self.vmlinux,
        }
    }
}

fn canon(p: PathBuf) -> PathBuf {
    std::fs::canonicalize(&p).unwrap_or(p)
}

fn nix_is_root() -> bool {
    // Reading our own uid from /proc avoids an unsafe libc call.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false)
}
