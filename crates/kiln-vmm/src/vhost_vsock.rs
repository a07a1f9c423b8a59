//! vsock for QEMU: a `vhost-device-vsock` process per VM serves QEMU's
//! `vhost-user-vsock-device` and speaks the same hybrid Unix-socket protocol
//! as Firecracker on the host side ([`crate::vsock`]), so the guest agent's
//! AF_VSOCK listener and the host's handshake are one code path for both
//! VMMs.
//!
//! Per VM, in its directory: `vhost-vsock.sock` (the vhost-user control
//! socket, served by the backend, QEMU connects to it), `vsock.sock` (the
//! host end of the guest's vsock, where [`crate::Vm::connect_agent`]
//! connects), `vhost-vsock.stderr`. The backend is spawned detached before
//! QEMU and killed with it; it is recorded in [`crate::VmRecord::helpers`]
//! so that a re-attached handle can kill it too.
//!
//! vhost-user needs the guest RAM shared with the backend: the QEMU driver
//! maps it `share=on` for a cold boot. A restore maps a snapshot privately,
//! and QEMU cannot migrate the vhost-user device's state anyway: a QEMU
//! driver with this transport reports no snapshots, restores, forks or
//! migration in its capability table.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::process::{VmmProcess, read_tail, spawn_detached};
use crate::{GUEST_CID, StartVmError};

/// The backend's name on `PATH` (installed by `scripts/setup-host.sh` with
/// `cargo install --locked vhost-device-vsock`).
pub const BINARY: &str = "vhost-device-vsock";
/// How long the backend has to create its vhost-user socket.
const READY_TIMEOUT: Duration = Duration::from_secs(5);

/// Where a VM's vsock files are.
#[derive(Debug, Clone)]
pub(crate) struct VsockPaths {
    /// vhost-user control socket (backend listens, QEMU connects).
    pub control: PathBuf,
    /// Host end of the guest's vsock (the agent socket).
    pub uds: PathBuf,
    pub stderr: PathBuf,
}

impl VsockPaths {
    pub fn new(dir: &Path) -> Self {
        VsockPaths {
            control: dir.join("vhost-vsock.sock"),
            uds: dir.join("vsock.sock"),
            stderr: dir.join("vhost-vsock.stderr"),
        }
    }

    /// Every file the backend creates.
    pub fn files(&self) -> Vec<PathBuf> {
        vec![self.control.clone(), self.uds.clone(), self.stderr.clone()]
    }
}

/// The backend's command line.
pub(crate) fn backend_args(paths: &VsockPaths) -> Vec<String> {
    vec![
        "--guest-cid".into(),
        GUEST_CID.to_string(),
        "--socket".into(),
        paths.control.display().to_string(),
        "--uds-path".into(),
        paths.uds.display().to_string(),
    ]
}

/// QEMU's arguments for the device (the chardev connects to the backend).
pub(crate) fn qemu_args(paths: &VsockPaths) -> Vec<String> {
    vec![
        "-chardev".into(),
        format!(
            "socket,id=vsock,path={}",
            paths.control.display().to_string().replace(',', ",,")
        ),
        "-device".into(),
        "vhost-user-vsock-device,chardev=vsock".into(),
    ]
}

/// Spawn the backend for a VM in `dir` and wait until its vhost-user socket
/// exists. It is only looked for, not connected to: the backend serves one
/// frontend at a time, and that must be QEMU. On error the backend is gone.
pub(crate) async fn spawn_backend(
    binary: &Path,
    paths: &VsockPaths,
) -> Result<VmmProcess, StartVmError> {
    let process = spawn_detached(binary, &backend_args(paths), &paths.stderr, None)?;
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if std::fs::metadata(&paths.control).is_ok() {
            return Ok(process);
        }
        if !process.alive() {
            tokio::time::sleep(Duration::from_millis(20)).await;
            return Err(StartVmError::Exited {
                status: format!("{BINARY} exited"),
                stderr: read_tail(&paths.stderr),
            });
        }
        if Instant::now() >= deadline {
            let _ = process.kill().await;
            return Err(StartVmError::SocketTimeout {
                path: paths.control.clone(),
                timeout: READY_TIMEOUT,
            });
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// `vhost-device-vsock` as configured: `KILN_VHOST_VSOCK_BIN`, else on
/// `PATH`, else in cargo's install directory. `None` if none is found.
pub fn find_binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("KILN_VHOST_VSOCK_BIN").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(path));
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(BINARY))
            .find(|p| p.is_file())
    });
    on_path.or_else(|| {
        let cargo_home = std::env::var_os("CARGO_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))?;
        Some(cargo_home.join("bin").join(BINARY)).filter(|p| p.is_file())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_lines() {
        let paths = VsockPaths::new(Path::new("/vm,1"));
        assert_eq!(
            backend_args(&paths).join(" "),
            "--guest-cid 3 --socket /vm,1/vhost-vsock.sock --uds-path /vm,1/vsock.sock"
        );
        assert_eq!(
            qemu_args(&paths).join(" "),
            "-chardev socket,id=vsock,path=/vm,,1/vhost-vsock.sock -device vhost-user-vsock-device,chardev=vsock"
        );
    }
}
