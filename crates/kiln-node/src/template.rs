//! Templates and warm starts.
//!
//! A template is an image booted once, with a fresh writable disk and no
//! main process, to the point where `kiln-init` answers its first `Hello`,
//! then quiesced (the guest `sync()`s) and snapshotted. `kiln run` restores
//! a matching template instead of booting (a *warm start*): the supervisor
//! loads it, opens a new agent session, pushes the new identity
//! (`Configure`) and only then starts the main process (`Exec`, `main`), so
//! the restored guest runs exactly what a cold one would.
//!
//! Templates are snapshots: same layout, manifest, checks and `users/`
//! rule (`kiln_node::snapshot`), in their own store, `<state>/templates/`,
//! beside `<state>/snapshots/`. Each is named `tpl-` + the first 16 hex
//! digits of its **key**: SHA-256 over everything that makes a template
//! wrong when it changes (kernel, initramfs and `kiln-init` digests, driver
//! kind, version and accelerator, image digest, cpus, memory, disk size).
//! A run computes the key of what it is about to boot, so a template is
//! never found across a change of any of them; the manifest check
//! (`SnapshotStore::verify`) is run as well and refuses it independently.
//! A template whose inputs changed is *stale*: `find` names it and says
//! why, so `kiln run -v` can explain the cold boot.
//!
//! **Memory file**: a restored VM maps the template's `vmm/memory`
//! privately (copy-on-write) for its whole life, so the file must never
//! change and must outlive those VMs: every warm start registers in
//! `users/` before its supervisor starts, `remove` refuses while a live
//! user remains, and `templates/.lock` (shared while a run looks up and
//! registers, exclusive while a template is removed or replaced) closes the
//! window between a run's lookup and its registration.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kiln_vmm::DriverInfo;
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use crate::agent::{self, AgentClient};
use crate::paths::{Dirs, GuestArtifacts};
use crate::snapshot::{
    self, GuestDigests, Manifest, ManifestParts, SnapshotStore, TemplateInfo, VerifySnapshotError,
};
use crate::store::SandboxSpec;
use crate::vm;

/// How long a template's guest may take to answer after its VMM started.
const AGENT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the guest may take to sync its disks.
const QUIESCE_TIMEOUT: Duration = Duration::from_secs(30);

/// What a template is made for (and what a run asks for).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateParams {
    /// The image reference as the user gave it (informational).
    pub image: String,
    pub image_digest: String,
    pub image_disk: PathBuf,
    pub cpus: u32,
    pub memory_mib: u32,
    pub disk_mib: u32,
    /// A template for networked runs: its VM has a virtio-net device (on a
    /// placeholder tap that goes nowhere), so a restore with the run's own
    /// tap has the device model the snapshot was taken with.
    pub network: bool,
}

impl TemplateParams {
    fn describe(&self) -> String {
        format!(
            "{} CPU, {} MiB memory, {} MiB disk{}",
            self.cpus,
            self.memory_mib,
            self.disk_mib,
            if self.network {
                ", a network device (kiln template create --net default)"
            } else {
                ""
            }
        )
    }

    /// The spec a template's VM is built from (no process).
    fn spec(&self, driver: &str) -> SandboxSpec {
        SandboxSpec {
            image: self.image.clone(),
            image_digest: self.image_digest.clone(),
            image_disk: self.image_disk.clone(),
            argv: vec![],
            env: vec![],
            cwd: None,
            user: None,
            tty: false,
            stdin: false,
            cpus: self.cpus,
            memory_mib: self.memory_mib,
            disk_mib: self.disk_mib,
            timeout_secs: None,
            driver: driver.to_string(),
            auto_remove: false,
            log_limit: None,
            network: None,
        }
    }
}

/// The template store of a state directory.
pub fn store(dirs: &Dirs) -> SnapshotStore {
    SnapshotStore::at(dirs.state.join("templates")).with_memo(dirs.memo())
}

/// The key of a template: SHA-256 (hex) over everything it depends on.
pub fn key(p: &TemplateParams, guest: &GuestDigests, driver: &DriverInfo) -> String {
    let mut h = Sha256::new();
    for part in [
        "kiln-template-v1",
        &guest.kernel_sha256,
        &guest.initramfs_sha256,
        &guest.init_sha256,
        &driver.kind.to_string(),
        &driver.version,
        &driver.accel.to_string(),
        &p.image_digest,
        &p.cpus.to_string(),
        &p.memory_mib.to_string(),
        &p.disk_mib.to_string(),
    ] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    // Only networked templates hash one more part: the keys (and names)
    // of existing templates without a network stay what they were.
    if p.network {
        let part = "network:virtio-net";
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// The name of the template with key `key`.
pub fn name_for(key: &str) -> String {
    format!("tpl-{}", &key[..16.min(key.len())])
}

/// Holds `templates/.lock` (released on drop).
pub struct StoreLock(#[allow(dead_code)] fs::File);

/// Locks the template store: `exclusive` to remove or replace a template,
/// shared to look one up and register as its user.
pub fn lock(templates: &SnapshotStore, exclusive: bool) -> std::io::Result<StoreLock> {
    fs::create_dir_all(templates.root())?;
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(templates.root().join(".lock"))?;
    if exclusive {
        f.lock()?;
    } else {
        f.lock_shared()?;
    }
    Ok(StoreLock(f))
}

/// Why a run boots cold instead of using a template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoTemplate(pub String);

impl std::fmt::Display for NoTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The template for `p` on this host (guest artifacts `guest`, driver
/// `driver`), checked like a snapshot before a restore: manifest, guest
/// digests, driver, image disk, and the size and digest of every file. The
/// digests are remembered while a file is unchanged (`kiln_vmm::memo`,
/// seeded when the template is written), so this costs a `stat` per file
/// on a warm start, and a template file changed in any way is hashed again
/// and refused if it differs. `Err` says why none can be used.
pub fn find(
    templates: &SnapshotStore,
    p: &TemplateParams,
    guest: &GuestDigests,
    driver: &DriverInfo,
) -> Result<Manifest, NoTemplate> {
    let k = key(p, guest, driver);
    let name = name_for(&k);
    if templates.exists(&name) {
        return match templates.verify(&name, guest, driver, true) {
            Ok(m) if m.template.as_ref().is_some_and(|t| t.key == k) => Ok(m),
            Ok(_) => Err(NoTemplate(format!(
                "template {name} was made for something else (its key differs)"
            ))),
            Err(e) => Err(NoTemplate(format!("template {name} cannot be used: {e}"))),
        };
    }
    // None for exactly this: say why, naming the templates of this image.
    let same_image: Vec<Manifest> = templates
        .list()
        .unwrap_or_default()
        .into_iter()
        .map(|e| e.manifest)
        .filter(|m| {
            m.template.as_ref().is_some_and(|t| t.network == p.network)
                && m.image_digest == p.image_digest
        })
        .collect();
    for m in &same_image {
        let disk = m.template.as_ref().map(|t| t.disk_mib).unwrap_or(0);
        if m.cpus == p.cpus && m.memory_mib == p.memory_mib && disk == p.disk_mib {
            let why = match templates.verify(&m.name, guest, driver, false) {
                Err(e) => e.to_string(),
                Ok(_) => "it was made with another driver or guest".to_string(),
            };
            return Err(NoTemplate(format!("template {} is stale: {why}", m.name)));
        }
    }
    let mut msg = format!("no template for {} with {}", p.image, p.describe());
    if !same_image.is_empty() {
        // A few, not all: the reason is one line of `kiln run -v`.
        const SHOWN: usize = 4;
        let mut others: Vec<String> = same_image
            .iter()
            .take(SHOWN)
            .map(|m| {
                let disk = m.template.as_ref().map(|t| t.disk_mib).unwrap_or(0);
                format!(
                    "{} ({} CPU, {} MiB memory, {} MiB disk)",
                    m.name, m.cpus, m.memory_mib, disk
                )
            })
            .collect();
        if same_image.len() > SHOWN {
            others.push(format!("{} more", same_image.len() - SHOWN));
        }
        msg.push_str(&format!("; this image has {}", others.join(", ")));
    }
    Err(NoTemplate(msg))
}

/// Making a template failed.
#[derive(Debug, thiserror::Error)]
pub enum CreateTemplateError {
    #[error(transparent)]
    Artifacts(#[from] crate::paths::MissingArtifact),
    #[error("cannot hash the guest artifacts")]
    Hash(#[source] std::io::Error),
    #[error(transparent)]
    Vm(#[from] vm::StartSandboxVmError),
    #[error("cannot make the template's placeholder tap: {0}")]
    Network(String),
    #[error("the template's guest agent did not come up")]
    Agent(#[source] agent::ConnectAgentError),
    #[error("the template's guest did not quiesce")]
    Quiesce(#[source] agent::RequestError),
    #[error("the template's guest did not quiesce within {0:?}")]
    QuiesceTimeout(Duration),
    #[error("the VMM failed to snapshot the template")]
    Snapshot(#[source] kiln_vmm::SnapshotVmError),
    #[error(transparent)]
    Write(#[from] snapshot::CreateSnapshotError),
    #[error(transparent)]
    Remove(#[from] snapshot::RemoveSnapshotError),
    #[error("cannot lock or prepare {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What `create` did.
#[derive(Debug, Clone)]
pub struct Created {
    pub manifest: Manifest,
    /// A valid template with this key existed already; nothing was booted.
    pub existed: bool,
    /// VMM start → agent answered; quiesce; driver snapshot (vCPUs stopped).
    pub boot_ms: u64,
    pub quiesce_ms: u64,
    pub snapshot_ms: u64,
}

/// Makes the template for `p` with driver `driver` (`auto`, `qemu`,
/// `firecracker`): boots the image with a fresh writable disk, waits for
/// `kiln-init`'s `Hello`, quiesces, snapshots (driver state and memory,
/// writable disk), tears the VM down and publishes the template with its
/// manifest. A valid template with the same key is kept as it is; an
/// invalid one is replaced unless a live sandbox (`alive`) uses it.
pub async fn create(
    dirs: &Dirs,
    p: &TemplateParams,
    driver: &str,
    alive: impl Fn(&str) -> bool,
) -> Result<Created, CreateTemplateError> {
    reap_abandoned(dirs).await;
    let artifacts = GuestArtifacts::locate(dirs)?;
    let (drv, sel) = vm::driver_for(vm::parse_driver(driver)?)?;
    let guest =
        snapshot::guest_digests(&artifacts, drv.kind()).map_err(CreateTemplateError::Hash)?;
    let k = key(p, &guest, drv.info());
    let name = name_for(&k);
    let templates = store(dirs);
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| CreateTemplateError::Io { path, source }
    };
    if templates.exists(&name) {
        match templates.verify(&name, &guest, drv.info(), true) {
            Ok(manifest) => {
                return Ok(Created {
                    manifest,
                    existed: true,
                    boot_ms: 0,
                    quiesce_ms: 0,
                    snapshot_ms: 0,
                });
            }
            Err(e) => {
                warn!(template = %name, error = %e, "replacing an unusable template");
                let _l = lock(&templates, true).map_err(io(templates.root()))?;
                templates.remove(&name, &alive)?;
            }
        }
    }
    info!(template = %name, driver = %sel.kind, accel = %sel.accel, "creating a template");
    let staging = templates.staging(&name)?;
    // Its owner (this process) is in its name, like a staging directory's:
    // a creator killed at any moment (even before `owner.json` exists, while
    // the writable disk is made) leaves a directory the next sweep removes.
    let work = templates.root().join(format!(
        ".work-{}.{}",
        snapshot::new_name(&name),
        crate::store::ProcessIdentity::current().suffix()
    ));
    let blanks = dirs.blank_disks();
    let result =
        boot_and_snapshot(&*drv, &artifacts, p, &sel, &name, &staging, &work, &blanks).await;
    let _ = fs::remove_dir_all(&work);
    let (boot_ms, quiesce_ms, snapshot_ms) = match result {
        Ok(t) => t,
        Err(e) => {
            templates.remove_staging(&staging);
            return Err(e);
        }
    };
    let parts = ManifestParts {
        name: name.clone(),
        source: "template".into(),
        ephemeral: false,
        guest,
        driver: drv.info().clone(),
        spec: p.spec(driver),
        main_pid: 0,
        downtime_ms: snapshot_ms,
    };
    let info = TemplateInfo {
        key: k,
        disk_mib: p.disk_mib,
        network: p.network,
    };
    let dest = staging.clone();
    let memo = templates.memo().map(Path::to_path_buf);
    let written = tokio::task::spawn_blocking(move || {
        snapshot::write_manifest_with(&dest, parts, Some(info), memo.as_deref())
    })
    .await
    .map_err(|e| CreateTemplateError::Hash(std::io::Error::other(e.to_string())))
    .and_then(|r| r.map_err(CreateTemplateError::from));
    let manifest = match written {
        Ok(m) => m,
        Err(e) => {
            templates.remove_staging(&staging);
            return Err(e);
        }
    };
    let published = {
        let _l = lock(&templates, true).map_err(io(templates.root()))?;
        templates.publish(&staging, &name)
    };
    if let Err(e) = published {
        templates.remove_staging(&staging);
        return Err(e.into());
    }
    Ok(Created {
        manifest,
        existed: false,
        boot_ms,
        quiesce_ms,
        snapshot_ms,
    })
}

/// Boots the template's VM in `work`, snapshots it into `staging` and tears
/// it down. Returns (boot, quiesce, snapshot) times in ms.
#[allow(clippy::too_many_arguments)]
async fn boot_and_snapshot(
    drv: &dyn kiln_vmm::VmmDriver,
    artifacts: &GuestArtifacts,
    p: &TemplateParams,
    sel: &kiln_vmm::Selection,
    name: &str,
    staging: &Path,
    work: &Path,
    blanks: &Path,
) -> Result<(u64, u64, u64), CreateTemplateError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| CreateTemplateError::Io { path, source }
    };
    if !p.image_disk.is_file() {
        return Err(vm::StartSandboxVmError::ImageDisk(p.image_disk.clone()).into());
    }
    fs::create_dir_all(work).map_err(io(work))?;
    let rw = work.join(snapshot::RW_DISK);
    let mut spec = vm::sandbox_vm_spec(
        drv,
        name,
        &p.spec(&sel.kind.to_string()),
        artifacts,
        work,
        rw.clone(),
    );
    // A networked template's NIC sits on a tap of its own, on no bridge and
    // down: the template's guest reaches nothing, and never has an
    // address (it gets one from the identity push after each restore).
    let tap = p.network.then(|| placeholder_tap(work));
    if let Some(tap) = &tap {
        kiln_net::host::ip(&["tuntap", "add", "dev", tap, "mode", "tap"])
            .map_err(|e| CreateTemplateError::Network(e.to_string()))?;
        spec.network = Some(kiln_vmm::NetDevice {
            tap: tap.clone(),
            mac: PLACEHOLDER_MAC.into(),
        });
    }
    let result = boot_and_snapshot_on(
        drv,
        name,
        staging,
        work,
        blanks,
        &rw,
        p.disk_mib,
        &spec,
        tap.clone(),
    )
    .await;
    if let Some(tap) = &tap {
        let _ = kiln_net::host::delete_link(tap);
    }
    result
}

/// The MAC of a networked template's NIC (locally administered; every
/// restore sets its own).
const PLACEHOLDER_MAC: &str = "02:00:00:00:00:01";

/// The placeholder tap of a template being made in `work`: `ktp` and 12
/// hex digits (a sandbox's tap is `kt` and 13 hex digits: no collision).
fn placeholder_tap(work: &Path) -> String {
    let h = Sha256::digest(work.to_string_lossy().as_bytes());
    let hex: String = h.iter().map(|b| format!("{b:02x}")).collect();
    format!("ktp{}", &hex[..12])
}

#[allow(clippy::too_many_arguments)]
async fn boot_and_snapshot_on(
    drv: &dyn kiln_vmm::VmmDriver,
    name: &str,
    staging: &Path,
    work: &Path,
    blanks: &Path,
    rw: &Path,
    disk_mib: u32,
    spec: &kiln_vmm::VmSpec,
    tap: Option<String>,
) -> Result<(u64, u64, u64), CreateTemplateError> {
    // This VM has no supervisor: if this process is killed, whoever next
    // sweeps the template store (`reap_abandoned`) finds it from here.
    let record_owner = |vm: Option<serde_json::Value>| {
        let owner = Owner {
            pid: std::process::id(),
            owner: Some(crate::store::ProcessIdentity::current()),
            vm,
            staging: Some(staging.to_path_buf()),
            tap: tap.clone(),
        };
        if let Err(e) = fs::write(
            work.join(OWNER),
            serde_json::to_vec(&owner).expect("serializes"),
        ) {
            warn!(error = %e, "cannot record the template VM's owner");
        }
    };
    record_owner(None);
    vm::make_writable_disk(blanks, rw, disk_mib).await?;
    let t0 = Instant::now();
    let vmm = drv
        .start(spec)
        .await
        .map_err(vm::StartSandboxVmError::from)?;
    record_owner(Some(
        serde_json::to_value(vmm.record()).expect("records serialize"),
    ));
    let result = async {
        let stream = vmm
            .connect_agent()
            .await
            .map_err(vm::StartSandboxVmError::from)?;
        let (agent, ack) = AgentClient::connect(stream, AGENT_TIMEOUT)
            .await
            .map_err(CreateTemplateError::Agent)?;
        let boot_ms = t0.elapsed().as_millis() as u64;
        info!(template = name, boot_ms, agent = %ack.agent, "template guest is ready");
        let t1 = Instant::now();
        match tokio::time::timeout(QUIESCE_TIMEOUT, agent.quiesce()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(CreateTemplateError::Quiesce(e)),
            Err(_) => return Err(CreateTemplateError::QuiesceTimeout(QUIESCE_TIMEOUT)),
        }
        let quiesce_ms = t1.elapsed().as_millis() as u64;
        let t2 = Instant::now();
        vmm.snapshot(&staging.join(snapshot::VM_DIR))
            .await
            .map_err(CreateTemplateError::Snapshot)?;
        // The vCPUs are stopped: the disk matches the memory image.
        snapshot::sparse_copy(rw, &staging.join(snapshot::RW_DISK)).await?;
        let snapshot_ms = t2.elapsed().as_millis() as u64;
        drop(agent);
        Ok((boot_ms, quiesce_ms, snapshot_ms))
    }
    .await;
    // The template's VM is never resumed: its snapshot is all we keep.
    if let Err(e) = vmm.kill().await {
        warn!(error = %e, "cannot kill the template's VMM");
    }
    if let Err(e) = vmm.cleanup().await {
        warn!(error = %e, "cannot clean up the template's VM");
    }
    result
}

/// Who boots a template's VM, in its work directory.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Owner {
    /// Its pid (records before `owner` existed name only this).
    pid: u32,
    /// The process, told apart from a later one with the same pid.
    #[serde(default)]
    owner: Option<crate::store::ProcessIdentity>,
    /// Once the driver started it (until then, its VMM is found by the
    /// work directory on its command line).
    vm: Option<serde_json::Value>,
    /// The template's staging directory (removed with the work dir).
    #[serde(default)]
    staging: Option<PathBuf>,
    /// A networked template's placeholder tap (deleted with the VM).
    #[serde(default)]
    tap: Option<String>,
}

const OWNER: &str = "owner.json";

/// Kills the VMs, and removes the work directories, of `template create`
/// processes that died while booting or snapshotting (killed, or the host
/// lost power): nothing else knows about those VMs.
pub async fn reap_abandoned(dirs: &Dirs) {
    let templates = store(dirs);
    let Ok(rd) = fs::read_dir(templates.root()) else {
        return;
    };
    for e in rd.flatten() {
        let dir = e.path();
        let is_work = e
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(".work-"));
        if !is_work {
            continue;
        }
        let owner: Option<Owner> = fs::read(dir.join(OWNER))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        // The creator: named by the directory (since it carries one), else
        // by `owner.json`; a directory with neither (made by an older
        // `kiln` that died before writing it) is abandoned once old.
        let creator = e
            .file_name()
            .to_str()
            .and_then(crate::store::ProcessIdentity::from_suffix)
            .or_else(|| owner.as_ref().and_then(|o| o.owner));
        let alive = match (creator, &owner) {
            (Some(c), _) => c.alive(),
            (None, Some(o)) => crate::store::process_alive(o.pid),
            (None, None) => e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_none_or(|age| age <= Duration::from_secs(3600)),
        };
        if alive {
            continue;
        }
        warn!(dir = %dir.display(), "a template create was killed; removing its VM");
        if let Some(vm) = owner.as_ref().and_then(|o| o.vm.clone()) {
            vm::destroy_recorded(vm).await;
        }
        // Killed while the driver was starting it: the VMM names its
        // runtime directory (this one) on its command line.
        // Only VMM processes (QEMU, Firecracker, the vsock backend): an
        // operator's `tail -f` of a file in there is not ours to kill.
        for pid in kiln_vmm::conformance::processes_mentioning(&dir.to_string_lossy())
            .into_iter()
            .filter(|pid| is_vmm_process(*pid))
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        // Only a staging directory of this store, as `staging()` names them.
        let tap = owner.as_ref().and_then(|o| o.tap.clone());
        if let Some(staging) = owner.and_then(|o| o.staging).filter(|p| {
            p.parent() == Some(templates.root())
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(".staging-"))
        }) {
            let _ = fs::remove_dir_all(staging);
        }
        if let Some(tap) = tap.filter(|t| t.starts_with("ktp")) {
            let _ = kiln_net::host::delete_link(&tap);
        }
        let _ = fs::remove_dir_all(&dir);
    }
}

/// Whether process `pid` runs a VMM binary Kiln starts.
fn is_vmm_process(pid: i32) -> bool {
    fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|exe| {
        exe.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
            n.starts_with("qemu-system") || n == "firecracker" || n == "vhost-device-vsock"
        })
    })
}

/// Removes template `name` unless a live sandbox (`alive`) was started from
/// it (its VM maps the template's memory).
pub fn remove(
    dirs: &Dirs,
    name: &str,
    alive: impl Fn(&str) -> bool,
) -> Result<(), snapshot::RemoveSnapshotError> {
    let templates = store(dirs);
    let _l = lock(&templates, true).map_err(|source| snapshot::RemoveSnapshotError::Io {
        path: templates.root().to_path_buf(),
        source,
    })?;
    templates.remove(name, alive)
}

/// Whether `e` means the template is out of date rather than damaged.
pub fn is_stale(e: &VerifySnapshotError) -> bool {
    matches!(
        e,
        VerifySnapshotError::Guest { .. }
            | VerifySnapshotError::Driver { .. }
            | VerifySnapshotError::ImageDisk { .. }
            | VerifySnapshotError::Cpu { .. }
            | VerifySnapshotError::ImageDiskChanged { .. }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> TemplateParams {
        TemplateParams {
            image: "busybox".into(),
            image_digest: "sha256:00".into(),
            image_disk: "/nonexistent".into(),
            cpus: 1,
            memory_mib: 256,
            disk_mib: 4096,
            network: false,
        }
    }

    fn guest() -> GuestDigests {
        GuestDigests {
            kernel_sha256: "k".into(),
            initramfs_sha256: "i".into(),
            init_sha256: "n".into(),
        }
    }

    fn driver() -> DriverInfo {
        DriverInfo {
            kind: kiln_vmm::DriverKind::Qemu,
            binary: "/usr/bin/qemu-system-x86_64".into(),
            version: "10.0.2".into(),
            accel: kiln_vmm::Accel::Tcg,
            cpu_model: "max".into(),
        }
    }

    #[test]
    fn the_key_changes_with_every_input() {
        let base = key(&params(), &guest(), &driver());
        assert_eq!(base, key(&params(), &guest(), &driver()), "stable");
        let mut seen = vec![base.clone()];
        let mut check = |k: String| {
            assert!(!seen.contains(&k), "key collision");
            seen.push(k);
        };
        let mut p = params();
        p.cpus = 2;
        check(key(&p, &guest(), &driver()));
        let mut p = params();
        p.memory_mib = 512;
        check(key(&p, &guest(), &driver()));
        let mut p = params();
        p.disk_mib = 1024;
        check(key(&p, &guest(), &driver()));
        let mut p = params();
        p.image_digest = "sha256:01".into();
        check(key(&p, &guest(), &driver()));
        let mut p = params();
        p.network = true;
        check(key(&p, &guest(), &driver()));
        for i in 0..3 {
            let mut g = guest();
            match i {
                0 => g.kernel_sha256 = "k2".into(),
                1 => g.initramfs_sha256 = "i2".into(),
                _ => g.init_sha256 = "n2".into(),
            }
            check(key(&params(), &g, &driver()));
        }
        let mut d = driver();
        d.version = "10.1.0".into();
        check(key(&params(), &guest(), &d));
        let mut d = driver();
        d.accel = kiln_vmm::Accel::Kvm;
        check(key(&params(), &guest(), &d));
        // The binary's path is not part of it (the version is).
        let mut d = driver();
        d.binary = "/opt/qemu".into();
        assert_eq!(key(&params(), &guest(), &d), base);
        // Fields cannot run into each other.
        let mut p = params();
        p.cpus = 12;
        p.memory_mib = 56;
        let mut q = params();
        q.cpus = 1;
        q.memory_mib = 256;
        assert_ne!(key(&p, &guest(), &driver()), key(&q, &guest(), &driver()));
        assert!(validate(&name_for(&base)));
    }

    fn validate(n: &str) -> bool {
        snapshot::validate_name(n).is_ok()
    }

    /// A `template create` killed before its VM started (while it made
    /// the writable disk) left a work directory with no `owner.json`, kept
    /// for an hour; its name now says who owns it.
    #[test]
    fn work_dirs_of_dead_creators_are_reaped_at_once() {
        let t = tempfile::tempdir().unwrap();
        let dirs = Dirs::new(t.path().join("state"), t.path().join("cache"));
        let root = store(&dirs).root().to_path_buf();
        let me = crate::store::ProcessIdentity::current();
        // The pid of a process that was, with another start time: reused.
        let reused = crate::store::ProcessIdentity {
            start_time: me.start_time + 1,
            ..me
        };
        let dead = root.join(format!(".work-tpl-0-1.{}", reused.suffix()));
        let live = root.join(format!(".work-tpl-0-2.{}", me.suffix()));
        // Older `kiln`s: the owner in `owner.json` only, or nowhere yet.
        let legacy_dead = root.join(".work-tpl-0-3");
        let legacy_young = root.join(".work-tpl-0-4");
        let legacy_reused = root.join(".work-tpl-0-5");
        for d in [&dead, &live, &legacy_dead, &legacy_young, &legacy_reused] {
            fs::create_dir_all(d).unwrap();
            fs::write(d.join(snapshot::RW_DISK), b"disk").unwrap();
        }
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let gone = child.id();
        child.wait().unwrap();
        let write_owner = |d: &Path, pid: u32, owner| {
            let o = Owner {
                pid,
                owner,
                vm: None,
                staging: None,
                tap: None,
            };
            fs::write(d.join(OWNER), serde_json::to_vec(&o).unwrap()).unwrap();
        };
        write_owner(&legacy_dead, gone, None);
        write_owner(&legacy_reused, me.pid, Some(reused));
        // An old record without `owner` still loads.
        let old: Owner = serde_json::from_str(r#"{"pid":7,"vm":null}"#).unwrap();
        assert_eq!((old.pid, old.owner), (7, None));
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(reap_abandoned(&dirs));
        assert!(!dead.exists(), "a dead creator's work dir is kept");
        assert!(!legacy_dead.exists());
        assert!(!legacy_reused.exists(), "a reused pid counts as alive");
        assert!(live.exists() && legacy_young.exists());
    }

    #[test]
    fn no_template_says_so() {
        let t = tempfile::tempdir().unwrap();
        let dirs = Dirs::new(t.path().join("state"), t.path().join("cache"));
        let err = find(&store(&dirs), &params(), &guest(), &driver()).unwrap_err();
        assert!(err.0.contains("no template for busybox"), "{err}");
    }
}
