//! A sandbox's VM: driver selection, its disks, and the boot contract with
//! `kiln-init` (the kernel command line documented in
//! `docs/guest-protocol.md`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use kiln_api::proto::Configure;
use kiln_vmm::{
    AgentTransport, DiskSpec, DriverChoice, DriverConfig, DriverKind, Vm, VmRecord, VmSpec,
    VmmDriver,
};
use tokio::net::UnixStream;
use tracing::{info, warn};

use crate::paths::GuestArtifacts;
use crate::store::{SandboxRecord, Store};

/// The sandbox's VM could not be started.
#[derive(Debug, thiserror::Error)]
pub enum StartSandboxVmError {
    #[error("unknown driver {0:?}: use auto, qemu or firecracker")]
    UnknownDriver(String),
    #[error("no usable VMM driver")]
    Select(#[from] kiln_vmm::SelectDriverError),
    #[error("cannot create the writable disk {path}: {reason}")]
    Disk { path: PathBuf, reason: String },
    #[error("the image disk {0} is missing; pull the image again")]
    ImageDisk(PathBuf),
    #[error("the VMM failed to start")]
    Start(#[from] kiln_vmm::StartVmError),
    #[error("cannot reach the guest agent channel")]
    Vmm(#[from] kiln_vmm::ConnectAgentError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// A sandbox's VM could not be restored from a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum RestoreSandboxVmError {
    #[error(transparent)]
    Select(#[from] StartSandboxVmError),
    #[error(transparent)]
    Verify(#[from] crate::snapshot::VerifySnapshotError),
    #[error("cannot hash the guest artifacts")]
    Artifacts(#[source] std::io::Error),
    #[error("cannot copy the snapshot's writable disk")]
    Disk(#[source] crate::snapshot::CreateSnapshotError),
    #[error("the VMM failed to restore the snapshot")]
    Restore(#[from] kiln_vmm::RestoreVmError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// Parses `auto`, `qemu`, `firecracker`.
pub fn parse_driver(s: &str) -> Result<DriverChoice, StartSandboxVmError> {
    match s {
        "auto" | "" => Ok(DriverChoice::Auto),
        "qemu" => Ok(DriverChoice::Qemu),
        "firecracker" => Ok(DriverChoice::Firecracker),
        other => Err(StartSandboxVmError::UnknownDriver(other.to_string())),
    }
}

/// Chooses and builds the driver for `choice` on this host.
pub fn driver_for(
    choice: DriverChoice,
) -> Result<(Arc<dyn VmmDriver>, kiln_vmm::Selection), StartSandboxVmError> {
    let host = kiln_vmm::detect(&DriverConfig {
        memo: Some(crate::paths::Dirs::from_env().memo()),
        ..DriverConfig::default()
    });
    let sel = kiln_vmm::select(choice, &host)?;
    let driver = sel.driver(&host)?;
    Ok((driver, sel))
}

/// A running sandbox VM.
pub struct VmHandle {
    vm: Box<dyn Vm>,
    driver: kiln_vmm::DriverInfo,
    console: PathBuf,
    keep_console: PathBuf,
}

impl VmHandle {
    pub fn record(&self) -> VmRecord {
        self.vm.record()
    }

    /// The driver that runs the VM.
    pub fn driver(&self) -> &kiln_vmm::DriverInfo {
        &self.driver
    }

    /// Stops the vCPUs and writes memory + device state into `dest`; the VM
    /// stays paused.
    pub async fn snapshot(
        &self,
        dest: &Path,
    ) -> Result<kiln_vmm::SnapshotInfo, kiln_vmm::SnapshotVmError> {
        self.vm.snapshot(dest).await
    }

    pub async fn connect_agent(&self) -> Result<UnixStream, kiln_vmm::ConnectAgentError> {
        self.vm.connect_agent().await
    }

    pub async fn pause(&self) -> Result<(), kiln_vmm::ControlVmError> {
        self.vm.pause().await
    }

    pub async fn resume(&self) -> Result<(), kiln_vmm::ControlVmError> {
        self.vm.resume().await
    }

    /// Waits until the VMM has exited.
    pub async fn wait(&self) {
        self.vm.wait().await
    }

    /// Kills the VMM (errors are logged: there is nothing else to do).
    pub async fn kill(&self) {
        if let Err(e) = self.vm.kill().await {
            warn!(error = %e, "cannot kill the VMM");
        }
    }

    /// Keeps the console log in the sandbox directory, then removes every
    /// file and socket of the VM.
    pub async fn cleanup(&self) {
        if self.console.exists() {
            let _ = std::fs::copy(&self.console, &self.keep_console);
        }
        if let Err(e) = self.vm.cleanup().await {
            warn!(error = %e, "cannot clean up the VM");
        }
    }
}

/// Kernel command line of a sandbox guest (the boot contract with
/// `kiln-init`): the image disk is the first virtio-blk device, the
/// writable disk the second.
pub fn kernel_cmdline(transport: AgentTransport) -> String {
    let channel = match transport {
        AgentTransport::VirtioSerial => "serial",
        AgentTransport::HybridVsock => "vsock",
    };
    format!("{KERNEL_BOOT_PARAMS} kiln.root=/dev/vda kiln.rw=/dev/vdb kiln.channel={channel}")
}

/// The kernel parameters of every guest that are about boot speed, not
/// about Kiln's boot contract (`kiln bench cold` boots its floor with them
/// too). `quiet`: under TCG every byte on the emulated UART costs, and boot
/// messages delay the guest agent (panics still print).
/// `pty.legacy_count=0`: no BSD-style `/dev/ptyXX` pairs (the guest uses
/// `/dev/pts`); registering the default 256 pairs took 60–130 ms of every
/// TCG boot (`initcall_debug`, 2026-12-04).
pub const KERNEL_BOOT_PARAMS: &str = "quiet pty.legacy_count=0";

/// Creates a sparse, formatted writable disk of `mib` MiB: a sparse copy
/// (in this process, ~2 MiB of data) of a blank disk of that size
/// formatted once per host in `blanks` (`Dirs::blank_disks`), so that
/// `mkfs.ext4` (~40 ms) is not on every cold start's path. Every disk of
/// one size is then the same file system (same UUID and hash seed) until
/// the guest writes to it; nothing in the guest depends on them differing.
pub async fn make_writable_disk(
    blanks: &Path,
    path: &Path,
    mib: u32,
) -> Result<(), StartSandboxVmError> {
    let path = path.to_path_buf();
    let p2 = path.clone();
    let blanks = blanks.to_path_buf();
    let res = tokio::task::spawn_blocking(move || -> Result<(), String> {
        let blank = blank_disk(&blanks, mib)?;
        let _ = std::fs::remove_file(&p2);
        kiln_vmm::sparse::copy_in_process(&blank, &p2)
            .map_err(|e| format!("cannot copy {}: {e}", blank.display()))
    })
    .await
    .map_err(|e| e.to_string())
    .and_then(|r| r);
    res.map_err(|reason| {
        let _ = std::fs::remove_file(&path);
        StartSandboxVmError::Disk { path, reason }
    })
}

/// The blank formatted disk of `mib` MiB in `dir`, made if missing (or if
/// not the right size): formatted under a temporary name and renamed, so
/// that concurrent starts see a whole file or none.
fn blank_disk(dir: &Path, mib: u32) -> Result<PathBuf, String> {
    let bytes = u64::from(mib) * 1024 * 1024;
    let blank = dir.join(format!("ext4-{mib}m.img"));
    if std::fs::metadata(&blank).is_ok_and(|m| m.is_file() && m.len() == bytes) {
        return Ok(blank);
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let tmp = dir.join(format!(".blank-{}-{nanos}", std::process::id()));
    let made = (|| {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .and_then(|f| f.set_len(bytes))
            .map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;
        let out = std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "kiln-rw", "-m", "0"])
            .args([
                "-E",
                "lazy_itable_init=1,lazy_journal_init=1,root_owner=0:0",
            ])
            .arg(&tmp)
            .output()
            .map_err(|e| format!("cannot run mkfs.ext4: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mkfs.ext4 failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        std::fs::rename(&tmp, &blank)
            .map_err(|e| format!("cannot publish {}: {e}", blank.display()))
    })();
    if made.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    made?;
    Ok(blank)
}

/// Boots the VM of a sandbox and records it.
pub async fn start_sandbox_vm(
    store: &Store,
    rec: &mut SandboxRecord,
    artifacts: &GuestArtifacts,
) -> Result<VmHandle, StartSandboxVmError> {
    let dir = store.dir(&rec.id);
    if !rec.spec.image_disk.is_file() {
        return Err(StartSandboxVmError::ImageDisk(rec.spec.image_disk.clone()));
    }
    let (driver, sel) = driver_for(parse_driver(&rec.spec.driver)?)?;
    info!(driver = %sel.kind, accel = %sel.accel, reason = %sel.reason, "VMM driver selected");
    rec.driver = Some(format!("{} ({}): {}", sel.kind, sel.accel, sel.reason));
    store.save(rec)?;
    let rw = dir.join("rw.ext4");
    if !rw.exists() {
        make_writable_disk(&store.dirs().blank_disks(), &rw, rec.spec.disk_mib).await?;
    }
    let spec = sandbox_vm_spec(&*driver, &rec.id, &rec.spec, artifacts, &dir, rw);
    let vm = driver.start(&spec).await?;
    rec.vm = Some(serde_json::to_value(vm.record()).expect("records serialize"));
    store.save(rec)?;
    Ok(VmHandle {
        vm,
        driver: driver.info().clone(),
        console: spec.console_log,
        keep_console: dir.join("console.log"),
    })
}

/// The VM of a sandbox: the same for a boot, a template and a restore (a
/// restore must recreate the devices the snapshot was taken with).
pub fn sandbox_vm_spec(
    driver: &dyn VmmDriver,
    id: &str,
    spec: &crate::store::SandboxSpec,
    artifacts: &GuestArtifacts,
    dir: &Path,
    rw: PathBuf,
) -> VmSpec {
    let caps = driver.capabilities();
    let vm_dir = dir.join("vm");
    let console = vm_dir.join("console.log");
    let kernel = artifacts.kernel_for(driver.kind()).to_path_buf();
    VmSpec {
        id: id.to_string(),
        dir: vm_dir,
        kernel,
        initrd: Some(artifacts.initramfs.clone()),
        cmdline: kernel_cmdline(caps.agent_transport),
        cpus: spec.cpus,
        memory_mib: spec.memory_mib,
        disks: vec![
            DiskSpec {
                path: spec.image_disk.clone(),
                read_only: true,
            },
            DiskSpec {
                path: rw,
                read_only: false,
            },
        ],
        agent_channel: true,
        console_log: console,
        network: spec.network.as_ref().map(|a| kiln_vmm::NetDevice {
            tap: a.ifname.clone(),
            mac: kiln_net::format_mac(&a.mac),
        }),
    }
}

/// Restores the VM of a sandbox from snapshot `name` of `snapshots` (a
/// snapshot, or a template: `what` says which): checks it against this
/// host's guest artifacts and driver and every file's digest (remembered
/// while the file is unchanged, so this is cheap after the first check),
/// copies its writable disk, and has the driver load it. The VM runs on
/// return.
pub async fn restore_sandbox_vm(
    store: &Store,
    rec: &mut SandboxRecord,
    artifacts: &GuestArtifacts,
    snapshots: &crate::snapshot::SnapshotStore,
    name: &str,
    what: &str,
) -> Result<VmHandle, RestoreSandboxVmError> {
    let dir = store.dir(&rec.id);
    let manifest = snapshots.manifest(name)?;
    let choice = match manifest.driver.kind {
        DriverKind::Qemu => DriverChoice::Qemu,
        DriverKind::Firecracker => DriverChoice::Firecracker,
    };
    let (driver, sel) = driver_for(choice)?;
    let guest = crate::snapshot::guest_digests(artifacts, driver.kind())
        .map_err(RestoreSandboxVmError::Artifacts)?;
    snapshots.verify(name, &guest, driver.info(), true)?;
    info!(driver = %sel.kind, accel = %sel.accel, snapshot = name, what, "restoring");
    rec.driver = Some(format!(
        "{} ({}): restored from {what} {name}",
        sel.kind, sel.accel
    ));
    store.save(rec)?;
    let snap = snapshots.dir(name);
    let rw = dir.join(crate::snapshot::RW_DISK);
    crate::snapshot::sparse_copy(&snap.join(crate::snapshot::RW_DISK), &rw)
        .await
        .map_err(RestoreSandboxVmError::Disk)?;
    let spec = sandbox_vm_spec(&*driver, &rec.id, &rec.spec, artifacts, &dir, rw);
    // A template's VM gets its own copy of the RAM (it is likely to be
    // snapshotted or forked, which is then as cheap as for a booted VM); a
    // snapshot's restores and forks map it and share unchanged pages.
    // `KILN_WARM_MEMORY=shared` maps the template's RAM too (a density
    // lever: unchanged pages are shared by every warm start; their
    // snapshots and forks then carry their RAM, see docs/BENCHMARKS.md).
    let memory = if what == "template" && !warm_memory_shared() {
        kiln_vmm::RestoreMemory::Owned
    } else {
        kiln_vmm::RestoreMemory::Mapped
    };
    let vm = driver
        .restore_with(&snap.join(crate::snapshot::VM_DIR), &spec, memory)
        .await?;
    rec.vm = Some(serde_json::to_value(vm.record()).expect("records serialize"));
    store.save(rec)?;
    Ok(VmHandle {
        vm,
        driver: driver.info().clone(),
        console: spec.console_log,
        keep_console: dir.join("console.log"),
    })
}

/// Whether warm starts map their template's RAM (`KILN_WARM_MEMORY=shared`)
/// rather than owning a copy of it (`owned`, the default).
pub fn warm_memory_shared() -> bool {
    std::env::var("KILN_WARM_MEMORY").is_ok_and(|v| v == "shared")
}

/// The identity pushed to a guest after boot or restore.
/// [`identity`], with the guest's network (address, route, MAC, resolver)
/// when the sandbox has one.
pub fn identity_with(id: &str, net: Option<&kiln_net::Attachment>) -> Configure {
    let mut c = identity(id);
    c.network = net.map(|a| kiln_api::proto::GuestNetwork {
        mac: kiln_net::format_mac(&a.mac),
        address: a.ip,
        prefix_len: a.prefix_len,
        gateway: a.gateway,
        dns: a.dns.clone(),
    });
    c
}

pub fn identity(id: &str) -> Configure {
    let mut entropy = [0u8; 64];
    rand::fill(&mut entropy);
    Configure {
        sandbox_id: id.to_string(),
        hostname: id.chars().take(12).collect(),
        entropy: base64::engine::general_purpose::STANDARD.encode(entropy),
        time_unix_ns: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0),
        network: None,
    }
}

/// Kills and cleans up a VM known only from its record (its supervisor is
/// gone). Best effort: errors are logged.
pub async fn destroy_recorded(vm: serde_json::Value) {
    let rec: VmRecord = match serde_json::from_value(vm) {
        Ok(r) => r,
        Err(e) => {
            warn!(error = %e, "unreadable VM record");
            return;
        }
    };
    let choice = match rec.driver {
        DriverKind::Qemu => DriverChoice::Qemu,
        DriverKind::Firecracker => DriverChoice::Firecracker,
    };
    let driver = match driver_for(choice) {
        Ok((d, _)) => d,
        Err(e) => {
            warn!(error = %e, "no driver to clean up the VM with");
            return;
        }
    };
    match driver.attach(&rec).await {
        Ok(vm) => {
            let _ = vm.kill().await;
            let _ = vm.cleanup().await;
        }
        Err(kiln_vmm::AttachVmError::Gone { .. }) => {
            for f in &rec.files {
                let _ = std::fs::remove_file(f);
            }
            let _ = std::fs::remove_dir_all(&rec.dir);
        }
        Err(e) => warn!(error = %e, "cannot attach to the recorded VM"),
    }
}
