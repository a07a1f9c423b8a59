//! Early boot: pseudo file systems, the overlay root, switch_root.

use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};

use nix::mount::{MsFlags, mount};

/// What the kernel command line asks of kiln-init.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BootConfig {
    /// Read-only image disk (`kiln.root=`); absent: stay in the initramfs.
    pub root: Option<String>,
    /// Writable disk (`kiln.rw=`); absent: a tmpfs upper layer.
    pub rw: Option<String>,
    /// `serial` (default) or `vsock` (`kiln.channel=`).
    pub channel: String,
}

impl BootConfig {
    pub fn parse(cmdline: &str) -> BootConfig {
        let mut c = BootConfig {
            channel: "serial".into(),
            ..Default::default()
        };
        for word in cmdline.split_whitespace() {
            if let Some(v) = word.strip_prefix("kiln.root=") {
                c.root = Some(v.to_string()).filter(|v| !v.is_empty());
            } else if let Some(v) = word.strip_prefix("kiln.rw=") {
                c.rw = Some(v.to_string()).filter(|v| !v.is_empty());
            } else if let Some(v) = word.strip_prefix("kiln.channel=") {
                c.channel = v.to_string();
            }
        }
        c
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("mounting {what} on {target}: {source}")]
    Mount {
        what: String,
        target: String,
        #[source]
        source: nix::Error,
    },
    #[error("{what} {path}: {source}")]
    Fs {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("switching to the new root: {0}")]
    Switch(#[source] nix::Error),
}

fn mnt(
    src: &str,
    target: &str,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), BootError> {
    mkdir(target)?;
    mount(Some(src), target, Some(fstype), flags, data).map_err(|source| BootError::Mount {
        what: format!("{fstype} {src}"),
        target: target.into(),
        source,
    })
}

fn mkdir(p: &str) -> Result<(), BootError> {
    fs::create_dir_all(p).map_err(|source| BootError::Fs {
        what: "creating",
        path: p.into(),
        source,
    })
}

/// Mounts /proc, /sys and /dev in the current root, and the rest when `full`.
fn mount_pseudo(full: bool) -> Result<(), BootError> {
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mnt("proc", "/proc", "proc", nosuid, None)?;
    mnt("sysfs", "/sys", "sysfs", nosuid, None)?;
    mnt(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        MsFlags::MS_NOSUID,
        Some("mode=0755"),
    )?;
    if full { mount_extra() } else { Ok(()) }
}

/// /dev/pts, /dev/shm, /run, /tmp and the /dev symlinks.
fn mount_extra() -> Result<(), BootError> {
    mnt(
        "devpts",
        "/dev/pts",
        "devpts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
    )?;
    let _ = fs::remove_file("/dev/ptmx");
    let _ = symlink("pts/ptmx", "/dev/ptmx");
    mnt(
        "shm",
        "/dev/shm",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )?;
    mnt(
        "tmpfs",
        "/run",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    )?;
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        let _ = symlink(target, link);
    }
    mkdir("/tmp")?;
    fs::set_permissions("/tmp", fs::Permissions::from_mode(0o1777)).map_err(|source| {
        BootError::Fs {
            what: "chmod",
            path: "/tmp".into(),
            source,
        }
    })?;
    Ok(())
}

/// Runs the boot sequence; on return the process is in its final root.
/// Returns the configuration read from the kernel command line.
pub fn boot() -> Result<BootConfig, BootError> {
    mount_pseudo(false)?;
    let cmdline = fs::read_to_string("/proc/cmdline").map_err(|source| BootError::Fs {
        what: "reading",
        path: "/proc/cmdline".into(),
        source,
    })?;
    let cfg = BootConfig::parse(&cmdline);
    let Some(root) = &cfg.root else {
        // No image: run in the initramfs itself.
        mount_extra()?;
        return Ok(cfg);
    };
    let ro = MsFlags::MS_RDONLY;
    mnt(root, "/kiln/lower", "ext4", ro, None)?;
    match &cfg.rw {
        Some(rw) => mnt(rw, "/kiln/rw", "ext4", MsFlags::empty(), None)?,
        None => mnt(
            "tmpfs",
            "/kiln/rw",
            "tmpfs",
            MsFlags::empty(),
            Some("mode=0755"),
        )?,
    }
    mkdir("/kiln/rw/upper")?;
    mkdir("/kiln/rw/work")?;
    mnt(
        "overlay",
        "/kiln/root",
        "overlay",
        MsFlags::empty(),
        Some("lowerdir=/kiln/lower,upperdir=/kiln/rw/upper,workdir=/kiln/rw/work"),
    )?;
    // The initramfs cannot be pivot_root'ed away: move the new root over /
    // and chroot into it (what switch_root does).
    nix::unistd::chdir("/kiln/root").map_err(BootError::Switch)?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(BootError::Switch)?;
    nix::unistd::chroot(".").map_err(BootError::Switch)?;
    nix::unistd::chdir("/").map_err(BootError::Switch)?;
    mount_pseudo(true)?;
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline() {
        let c = BootConfig::parse(
            "console=ttyS0 quiet kiln.root=/dev/vda kiln.rw=/dev/vdb kiln.channel=vsock",
        );
        assert_eq!(c.root.as_deref(), Some("/dev/vda"));
        assert_eq!(c.rw.as_deref(), Some("/dev/vdb"));
        assert_eq!(c.channel, "vsock");
        let c = BootConfig::parse("console=ttyS0");
        assert_eq!((c.root, c.channel.as_str()), (None, "serial"));
    }
}
