//! Firecracker driver, written from Firecracker's published API spec
//! (`src/firecracker/swagger/firecracker.yaml`): HTTP/1.1 with JSON bodies on
//! a Unix socket, one request type per API resource, every status checked
//! and Firecracker's `fault_message` surfaced.
//!
//! Start: spawn `firecracker --api-sock DIR/fc.sock --id ID --log-path
//! DIR/fc.log --level Info --show-level --metrics-path DIR/fc.metrics`
//! detached (its stdout, where the guest serial goes, is the console log),
//! then PUT `/boot-source`, `/machine-config`, `/drives/{id}`, `/vsock`, and
//! `/actions {InstanceStart}`. Pause/resume: PATCH `/vm`. Snapshots: PUT
//! `/snapshot/create` and `/snapshot/load`.
//!
//! Invariant: nothing but the guest writes to the console. Firecracker logs
//! to its stdout until a logger is configured, so the log file is given on
//! its command line (before it prints anything), never by `PUT /logger`
//! (which would come too late, and reopens the file).
//!
//! The request bodies are unit tested against the spec's shapes; the
//! conformance suite runs against a real binary when `KILN_FIRECRACKER_BIN`
//! is set (bare-metal guests on a software KVM, Linux too on hardware KVM;
//! see `docs/vmm-drivers.md` for the last run).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use hyper::Method;
use serde::{Deserialize, Serialize};
use tokio::net::UnixStream;

mod api;

use api::REQUEST_TIMEOUT;
pub use api::*;

use crate::process::{VmmProcess, connect_when_ready, read_tail, remove_files, spawn_detached};
use crate::{
    AGENT_VSOCK_PORT, Accel, AgentTransport, AttachVmError, Capabilities, CleanupVmError,
    ConnectAgentError, ControlVmError, DriverInfo, DriverKind, GUEST_CID, RestoreVmError,
    SnapshotInfo, SnapshotVmError, StartVmError, StopVmError, Vm, VmRecord, VmSpec, VmStatus,
    VmmDriver,
};

/// How long Firecracker has to open its API socket.
const API_TIMEOUT: Duration = Duration::from_secs(10);
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(120);
/// Snapshot metadata, state and memory file names.
pub const SNAPSHOT_META: &str = "snapshot.json";
pub const SNAPSHOT_STATE: &str = "vmstate";
pub const MEMORY_FILE: &str = "memory";

// ---- the driver ----

/// The Firecracker driver.
#[derive(Debug, Clone)]
pub struct FirecrackerDriver {
    info: DriverInfo,
}

#[derive(Debug, Clone)]
struct Paths {
    api: PathBuf,
    vsock: PathBuf,
    pid: PathBuf,
    log: PathBuf,
    metrics: PathBuf,
    stderr: PathBuf,
}

impl Paths {
    fn new(dir: &Path) -> Self {
        Paths {
            api: dir.join("fc.sock"),
            vsock: dir.join("vsock.sock"),
            pid: dir.join("fc.pid"),
            log: dir.join("fc.log"),
            metrics: dir.join("fc.metrics"),
            stderr: dir.join("fc.stderr"),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct SnapshotMeta {
    driver: DriverKind,
    firecracker_version: String,
    cpus: u32,
    memory_mib: u32,
    disks: usize,
    agent_channel: bool,
    vsock_path: Option<PathBuf>,
}

/// Firecracker's `--id`: alphanumerics and `-`, at most 64.
fn instance_id(id: &str) -> String {
    id.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(64)
        .collect()
}

fn path_str(p: &Path) -> String {
    p.display().to_string()
}

/// Firecracker's command line for a VM in `dir`: the API socket, the id,
/// and the log and metrics files, so that it never logs to its stdout (the
/// console).
pub fn command_line(id: &str, dir: &Path) -> Vec<String> {
    let paths = Paths::new(dir);
    vec![
        "--api-sock".to_owned(),
        path_str(&paths.api),
        "--id".to_owned(),
        instance_id(id),
        "--log-path".to_owned(),
        path_str(&paths.log),
        "--level".to_owned(),
        "Info".to_owned(),
        "--show-level".to_owned(),
        "--metrics-path".to_owned(),
        path_str(&paths.metrics),
    ]
}

/// The configuration requests of a cold boot, in order: (path, body).
pub fn boot_requests(spec: &VmSpec, dir: &Path) -> Vec<(String, serde_json::Value)> {
    let paths = Paths::new(dir);
    let to = |v: serde_json::Result<serde_json::Value>| v.unwrap_or(serde_json::Value::Null);
    let mut boot_args = String::from("console=ttyS0 reboot=k panic=1 pci=off");
    if !spec.cmdline.trim().is_empty() {
        boot_args.push(' ');
        boot_args.push_str(spec.cmdline.trim());
    }
    let mut requests = vec![
        (
            "/boot-source".to_owned(),
            to(serde_json::to_value(BootSource {
                kernel_image_path: path_str(&spec.kernel),
                initrd_path: spec.initrd.as_deref().map(path_str),
                boot_args,
            })),
        ),
        (
            "/machine-config".to_owned(),
            to(serde_json::to_value(MachineConfiguration {
                vcpu_count: spec.cpus,
                mem_size_mib: spec.memory_mib,
                smt: false,
                track_dirty_pages: true,
            })),
        ),
    ];
    for (i, disk) in spec.disks.iter().enumerate() {
        let id = format!("d{i}");
        requests.push((
            format!("/drives/{id}"),
            to(serde_json::to_value(Drive {
                drive_id: id,
                path_on_host: path_str(&disk.path),
                is_root_device: false,
                is_read_only: disk.read_only,
            })),
        ));
    }
    if let Some(dev) = &spec.network {
        let (path, body) = network_interface_request(dev);
        requests.push((path, body));
    }
    if spec.agent_channel {
        requests.push((
            "/vsock".to_owned(),
            to(serde_json::to_value(Vsock {
                guest_cid: GUEST_CID,
                uds_path: path_str(&paths.vsock),
            })),
        ));
    }
    requests
}

impl FirecrackerDriver {
    /// A driver for `binary`, whose version is `version` in either spelling
    /// (`--version`'s or `GET /`'s; see [`canonical_version`]).
    pub fn new(binary: PathBuf, version: String) -> Self {
        FirecrackerDriver {
            info: DriverInfo {
                kind: DriverKind::Firecracker,
                binary,
                version: canonical_version(&version),
                accel: Accel::Kvm,
                cpu_model: "host".into(),
            },
        }
    }

    /// Spawn Firecracker for `spec` and wait for its API socket. The guest
    /// is not configured yet.
    async fn spawn(&self, spec: &VmSpec) -> Result<FirecrackerVm, StartVmError> {
        crate::validate_spec(spec)?;
        std::fs::create_dir_all(&spec.dir).map_err(|source| StartVmError::Dir {
            path: spec.dir.clone(),
            source,
        })?;
        let paths = Paths::new(&spec.dir);
        let mut files = vec![
            paths.api.clone(),
            paths.pid.clone(),
            paths.log.clone(),
            paths.metrics.clone(),
            paths.stderr.clone(),
            spec.console_log.clone(),
        ];
        if spec.agent_channel {
            files.push(paths.vsock.clone());
        }
        remove_files(&files).map_err(|e| StartVmError::Dir {
            path: spec.dir.clone(),
            source: std::io::Error::other(e.to_string()),
        })?;
        // Older releases want the log and metrics files to exist.
        for path in [&paths.log, &paths.metrics] {
            std::fs::File::create(path).map_err(|source| StartVmError::Dir {
                path: path.clone(),
                source,
            })?;
        }
        let args = command_line(&spec.id, &spec.dir);
        let process = spawn_detached(
            &self.info.binary,
            &args,
            &paths.stderr,
            Some(&spec.console_log),
        );
        let process = match process {
            Ok(p) => p,
            Err(e) => {
                let _ = remove_files(&files);
                return Err(e);
            }
        };
        let vm = FirecrackerVm {
            record: VmRecord {
                driver: DriverKind::Firecracker,
                id: spec.id.clone(),
                pid: process.pid,
                start_time: process.start_time,
                dir: spec.dir.clone(),
                control_socket: paths.api.clone(),
                agent_socket: spec.agent_channel.then(|| paths.vsock.clone()),
                console_log: spec.console_log.clone(),
                files,
                agent_transport: Some(AgentTransport::HybridVsock),
                helpers: vec![],
            },
            process,
            api: ApiClient::new(paths.api.clone()),
            cpus: spec.cpus,
            memory_mib: spec.memory_mib,
            disks: spec.disks.len(),
            version: self.info.version.clone(),
            diff_base: std::sync::Mutex::new(None),
        };
        if let Err(e) = std::fs::write(&paths.pid, format!("{}\n", process.pid)) {
            let _ = vm.cleanup().await;
            return Err(StartVmError::Dir {
                path: paths.pid,
                source: e,
            });
        }
        match connect_when_ready(&paths.api, &process, API_TIMEOUT, &paths.stderr).await {
            Ok(stream) => drop(stream),
            Err(e) => {
                let _ = vm.cleanup().await;
                return Err(e);
            }
        }
        Ok(vm)
    }
}

/// Firecracker's capability table.
fn capabilities() -> Capabilities {
    Capabilities {
        driver: DriverKind::Firecracker,
        pause: true,
        snapshot: true,
        snapshot_diff: true,
        restore: true,
        fork: true,
        live_migration_precopy: false,
        cow_restore: true,
        virtio_fs: false,
        vsock: true,
        virtio_serial: false,
        network: true,
        agent_transport: AgentTransport::HybridVsock,
    }
}

#[async_trait]
impl VmmDriver for FirecrackerDriver {
    fn info(&self) -> &DriverInfo {
        &self.info
    }

    fn capabilities(&self) -> Capabilities {
        capabilities()
    }

    async fn start(&self, spec: &VmSpec) -> Result<Box<dyn Vm>, StartVmError> {
        let vm = self.spawn(spec).await?;
        let configured = async {
            for (path, body) in boot_requests(spec, &spec.dir) {
                vm.api.put(&path, &body).await?;
            }
            vm.api
                .put(
                    "/actions",
                    &InstanceActionInfo {
                        action_type: ActionType::InstanceStart,
                    },
                )
                .await
        }
        .await;
        if let Err(e) = configured {
            let stderr = read_tail(&spec.dir.join("fc.stderr"));
            let log = read_tail(&spec.dir.join("fc.log"));
            let _ = vm.cleanup().await;
            return Err(match e {
                ControlVmError::Refused { command, message } => StartVmError::Configure(format!(
                    "{command}: {message}; log: {log}; stderr: {stderr}"
                )),
                other => StartVmError::Control(other),
            });
        }
        tracing::info!(vm = %spec.id, pid = vm.process.pid, "Firecracker VM started");
        Ok(Box::new(vm))
    }

    async fn attach(&self, record: &VmRecord) -> Result<Box<dyn Vm>, AttachVmError> {
        if record.driver != DriverKind::Firecracker {
            return Err(AttachVmError::WrongDriver {
                record: record.driver,
                driver: DriverKind::Firecracker,
            });
        }
        let process = VmmProcess {
            pid: record.pid,
            start_time: record.start_time,
        };
        if !process.alive() {
            return Err(AttachVmError::Gone { pid: record.pid });
        }
        let api = ApiClient::new(record.control_socket.clone());
        let info = api.instance_info().await.map_err(AttachVmError::Control)?;
        let config = api
            .request::<()>(Method::GET, "/machine-config", None, REQUEST_TIMEOUT)
            .await
            .ok()
            .and_then(|b| serde_json::from_slice::<MachineConfiguration>(&b).ok());
        let disks = api
            .request::<()>(Method::GET, "/vm/config", None, REQUEST_TIMEOUT)
            .await
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v["drives"].as_array().map(|a| a.len()))
            .unwrap_or(0);
        Ok(Box::new(FirecrackerVm {
            record: record.clone(),
            process,
            api,
            cpus: config.as_ref().map_or(0, |c| c.vcpu_count),
            memory_mib: config.as_ref().map_or(0, |c| c.mem_size_mib),
            disks,
            version: canonical_version(&info.vmm_version),
            diff_base: std::sync::Mutex::new(None),
        }))
    }

    async fn restore(
        &self,
        snapshot_dir: &Path,
        spec: &VmSpec,
    ) -> Result<Box<dyn Vm>, RestoreVmError> {
        let meta_path = snapshot_dir.join(SNAPSHOT_META);
        let meta: SnapshotMeta = std::fs::read(&meta_path)
            .and_then(|b| serde_json::from_slice(&b).map_err(std::io::Error::other))
            .map_err(|source| RestoreVmError::Read {
                path: meta_path.clone(),
                source,
            })?;
        if meta.driver != DriverKind::Firecracker
            || meta.cpus != spec.cpus
            || meta.memory_mib != spec.memory_mib
            || meta.disks != spec.disks.len()
            || meta.agent_channel != spec.agent_channel
        {
            return Err(RestoreVmError::Mismatch(format!(
                "snapshot: {} cpus, {} MiB, {} disks, agent {}; spec: {} cpus, {} MiB, {} disks, agent {}",
                meta.cpus,
                meta.memory_mib,
                meta.disks,
                meta.agent_channel,
                spec.cpus,
                spec.memory_mib,
                spec.disks.len(),
                spec.agent_channel
            )));
        }
        let vm = self.spawn(spec).await.map_err(RestoreVmError::Start)?;
        let paths = Paths::new(&spec.dir);
        let vsock_override = match (&meta.vsock_path, spec.agent_channel) {
            (Some(old), true) if *old != paths.vsock => Some(VsockOverride {
                uds_path: path_str(&paths.vsock),
            }),
            _ => None,
        };
        let load = SnapshotLoadParams {
            snapshot_path: path_str(&snapshot_dir.join(SNAPSHOT_STATE)),
            mem_backend: MemoryBackend {
                backend_type: "File".into(),
                backend_path: path_str(&snapshot_dir.join(MEMORY_FILE)),
            },
            resume_vm: true,
            vsock_override,
            enable_diff_snapshots: (!new_api_names(&self.info.version)).then_some(true),
            track_dirty_pages: new_api_names(&self.info.version).then_some(true),
        };
        let loaded = vm
            .api
            .request(Method::PUT, "/snapshot/load", Some(&load), SNAPSHOT_TIMEOUT)
            .await
            .map(drop);
        if let Err(e) = loaded {
            let _ = vm.cleanup().await;
            return Err(RestoreVmError::Load(e.to_string()));
        }
        // The load cleared the dirty bitmap: the VM's memory is that file
        // plus the pages written from now on, so its first snapshot can be
        // a Diff merged onto a copy of it (the node keeps a snapshot while
        // a VM restored from it runs).
        *vm.diff_base.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(snapshot_dir.join(MEMORY_FILE));
        Ok(Box::new(vm))
    }
}

/// `(major, minor, patch)` and any suffix (`-dev`) from either spelling
/// of Firecracker's version: `--version` prints `Firecracker v1.16.1`,
/// `GET /` says `1.16.1`.
pub fn parse_version(text: &str) -> Option<((u32, u32, u32), String)> {
    let word = text
        .split_whitespace()
        .map(|w| w.strip_prefix('v').unwrap_or(w))
        .find(|w| w.starts_with(|c: char| c.is_ascii_digit()))?;
    let (numbers, suffix) = match word.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => word.split_at(i),
        None => (word, ""),
    };
    let mut parts = numbers.split('.').map(|p| p.parse::<u32>().ok());
    let version = (parts.next()??, parts.next()??, parts.next()??);
    if parts.next().is_some() {
        return None;
    }
    Some((version, suffix.to_owned()))
}

/// The one spelling of a Firecracker version that Kiln records (driver
/// info, snapshot metadata): `Firecracker v1.16.1`, whether it came from
/// `--version` or from `GET /`. Text that is not a version is kept as it
/// is (it then matches only itself).
pub fn canonical_version(text: &str) -> String {
    match parse_version(text) {
        Some(((major, minor, patch), suffix)) => {
            format!("Firecracker v{major}.{minor}.{patch}{suffix}")
        }
        None => text.trim().to_owned(),
    }
}

/// Whether this Firecracker release takes `track_dirty_pages` on
/// `/snapshot/load` (1.13 and later) rather than `enable_diff_snapshots`.
fn new_api_names(version: &str) -> bool {
    parse_version(version).is_some_and(|((major, minor, _), _)| (major, minor) >= (1, 13))
}

/// Writes every data extent of the sparse file `diff` (a Firecracker Diff
/// snapshot's memory: the dirty pages at their offsets, holes elsewhere)
/// over `onto` at the same offsets. Returns the bytes copied.
fn overlay_extents(diff: &Path, onto: &Path) -> std::io::Result<u64> {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut from = std::fs::File::open(diff)?;
    let mut to = std::fs::OpenOptions::new().write(true).open(onto)?;
    let size = from.metadata()?.len();
    if size > to.metadata()?.len() {
        return Err(std::io::Error::other(format!(
            "the diff ({size} bytes) is larger than the memory it applies to"
        )));
    }
    let extents: Vec<(u64, u64)> =
        crate::sparse::data_extents(&from, size).collect::<std::io::Result<_>>()?;
    let mut buf = vec![0u8; 1 << 20];
    let mut copied = 0;
    for (start, end) in extents {
        from.seek(SeekFrom::Start(start))?;
        to.seek(SeekFrom::Start(start))?;
        let mut left = end - start;
        while left > 0 {
            let want = usize::try_from(left.min(buf.len() as u64)).unwrap_or(buf.len());
            let n = from.read(&mut buf[..want])?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            to.write_all(&buf[..n])?;
            left -= n as u64;
            copied += n as u64;
        }
    }
    to.sync_all()?;
    Ok(copied)
}

/// A Firecracker microVM.
pub struct FirecrackerVm {
    record: VmRecord,
    process: VmmProcess,
    api: ApiClient,
    cpus: u32,
    memory_mib: u32,
    disks: usize,
    version: String,
    /// The memory file this VM's RAM equals, apart from the pages written
    /// since (dirty tracking started at its load): its next snapshot can be
    /// a Diff merged onto a copy of it. Taken by that snapshot; after it,
    /// snapshots are Full.
    diff_base: std::sync::Mutex<Option<PathBuf>>,
}

impl FirecrackerVm {
    /// A Diff snapshot into `dest`: the pages written since the load go to
    /// a temporary file, which is laid over a sparse copy of `base` (the
    /// memory the VM was loaded from) as `memory`. Returns the bytes of
    /// dirty memory written. The VM is paused.
    async fn write_diff(&self, dest: &Path, base: &Path, memory: &Path) -> Result<u64, String> {
        let diff = dest.join("memory.diff");
        let _ = std::fs::remove_file(&diff);
        let result = async {
            self.create_snapshot(dest, &diff, "Diff")
                .await
                .map_err(|e| format!("/snapshot/create Diff: {e}"))?;
            crate::sparse::copy(base, memory)
                .await
                .map_err(|e| format!("copying {}: {e}", base.display()))?;
            let (diff, memory) = (diff.clone(), memory.to_path_buf());
            tokio::task::spawn_blocking(move || overlay_extents(&diff, &memory))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("merging the Diff: {e}"))
        }
        .await;
        let _ = std::fs::remove_file(&diff);
        result
    }

    /// `/snapshot/create` of type `kind` (`Full`, `Diff`): the device
    /// state into `dest/state`, the memory into `memory`.
    async fn create_snapshot(
        &self,
        dest: &Path,
        memory: &Path,
        kind: &str,
    ) -> Result<(), ControlVmError> {
        let params = SnapshotCreateParams {
            snapshot_path: path_str(&dest.join(SNAPSHOT_STATE)),
            mem_file_path: path_str(memory),
            snapshot_type: kind.into(),
        };
        self.api
            .request(
                Method::PUT,
                "/snapshot/create",
                Some(&params),
                SNAPSHOT_TIMEOUT,
            )
            .await
            .map(drop)
    }

    /// The API client, for requests the trait does not cover.
    pub fn api(&self) -> &ApiClient {
        &self.api
    }

    async fn set_state(&self, state: VmStateKind) -> Result<(), ControlVmError> {
        if !self.process.alive() {
            return Err(ControlVmError::Gone);
        }
        self.api.patch("/vm", &VmState { state }).await
    }
}

#[async_trait]
impl Vm for FirecrackerVm {
    fn id(&self) -> &str {
        &self.record.id
    }

    fn pid(&self) -> i32 {
        self.process.pid
    }

    fn record(&self) -> VmRecord {
        self.record.clone()
    }

    fn capabilities(&self) -> Capabilities {
        capabilities()
    }

    async fn pause(&self) -> Result<(), ControlVmError> {
        self.set_state(VmStateKind::Paused).await
    }

    async fn resume(&self) -> Result<(), ControlVmError> {
        self.set_state(VmStateKind::Resumed).await
    }

    async fn status(&self) -> Result<VmStatus, ControlVmError> {
        if !self.process.alive() {
            return Ok(VmStatus::Exited);
        }
        match self.api.instance_info().await {
            Ok(info) => Ok(match info.state.as_str() {
                "Running" => VmStatus::Running,
                "Paused" => VmStatus::Paused,
                other => VmStatus::Other(other.to_owned()),
            }),
            Err(ControlVmError::Gone) if !self.process.alive() => Ok(VmStatus::Exited),
            Err(e) => Err(e),
        }
    }

    async fn connect_agent(&self) -> Result<UnixStream, ConnectAgentError> {
        let path = self
            .record
            .agent_socket
            .as_ref()
            .ok_or(ConnectAgentError::NoChannel)?;
        // Firecracker serves no vsock traffic while paused: fail now, not
        // at the deadline.
        if self.status().await.ok() == Some(VmStatus::Paused) {
            return Err(ConnectAgentError::Paused);
        }
        crate::vsock::connect(path, AGENT_VSOCK_PORT, crate::vsock::HANDSHAKE_TIMEOUT).await
    }

    async fn wait(&self) {
        self.process.wait().await;
    }

    async fn stop(&self, grace: Duration) -> Result<(), StopVmError> {
        if !self.process.alive() {
            return Ok(());
        }
        // Needs an i8042-aware guest; harmless otherwise.
        let _ = self
            .api
            .put(
                "/actions",
                &InstanceActionInfo {
                    action_type: ActionType::SendCtrlAltDel,
                },
            )
            .await;
        if self.process.wait_timeout(grace).await {
            return Ok(());
        }
        self.process.kill().await
    }

    async fn kill(&self) -> Result<(), StopVmError> {
        self.process.kill().await
    }

    async fn cleanup(&self) -> Result<(), CleanupVmError> {
        self.process.kill().await.map_err(CleanupVmError::Stop)?;
        remove_files(&self.record.files)
    }

    async fn snapshot(&self, dest_dir: &Path) -> Result<SnapshotInfo, SnapshotVmError> {
        let write_err = |source| SnapshotVmError::Write {
            path: dest_dir.to_owned(),
            source,
        };
        std::fs::create_dir_all(dest_dir).map_err(write_err)?;
        let stopped = Instant::now();
        self.pause().await.map_err(SnapshotVmError::Control)?;
        let memory = dest_dir.join(MEMORY_FILE);
        let full_size = u64::from(self.memory_mib) << 20;
        // Taken whatever happens: once a snapshot was attempted the dirty
        // bitmap may have been cleared, and only a Full is safe after it.
        let base = self
            .diff_base
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .filter(|b| std::fs::metadata(b).is_ok_and(|m| m.len() == full_size));
        let mut diffed = false;
        if let Some(base) = base {
            match self.write_diff(dest_dir, &base, &memory).await {
                Ok(bytes) => {
                    tracing::info!(vm = %self.record.id, dirty_bytes = bytes, "Diff snapshot merged onto its base");
                    diffed = true;
                }
                Err(e) => {
                    tracing::warn!(vm = %self.record.id, error = %e, "Diff snapshot failed; writing a Full one");
                    let _ = std::fs::remove_file(&memory);
                }
            }
        }
        if !diffed {
            self.create_snapshot(dest_dir, &memory, "Full")
                .await
                .map_err(SnapshotVmError::Control)?;
        }
        let downtime = stopped.elapsed();
        let meta = SnapshotMeta {
            driver: DriverKind::Firecracker,
            firecracker_version: self.version.clone(),
            cpus: self.cpus,
            memory_mib: self.memory_mib,
            disks: self.disks,
            agent_channel: self.record.agent_socket.is_some(),
            vsock_path: self.record.agent_socket.clone(),
        };
        let bytes =
            serde_json::to_vec_pretty(&meta).map_err(|e| SnapshotVmError::Failed(e.to_string()))?;
        std::fs::write(dest_dir.join(SNAPSHOT_META), bytes).map_err(write_err)?;
        Ok(SnapshotInfo {
            dir: dest_dir.to_owned(),
            driver: DriverKind::Firecracker,
            memory_mib: self.memory_mib,
            cpus: self.cpus,
            downtime,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DiskSpec;
    use serde_json::json;

    #[test]
    fn network_interface_body() {
        let dev = crate::NetDevice {
            tap: "kt0".into(),
            mac: "02:4b:0a:58:00:02".into(),
        };
        let (path, body) = network_interface_request(&dev);
        assert_eq!(path, "/network-interfaces/net0");
        assert_eq!(
            body,
            json!({"iface_id": "net0", "host_dev_name": "kt0", "guest_mac": "02:4b:0a:58:00:02"})
        );
    }

    fn spec() -> VmSpec {
        VmSpec {
            id: "fc_1".into(),
            dir: "/vm".into(),
            kernel: "/k/vmlinux".into(),
            initrd: Some("/k/initrd".into()),
            cmdline: "quiet".into(),
            cpus: 2,
            memory_mib: 512,
            disks: vec![DiskSpec {
                path: "/d/base.ext4".into(),
                read_only: true,
            }],
            agent_channel: true,
            console_log: "/vm/console.log".into(),
            network: None,
        }
    }

    /// Bodies as the spec's definitions name their fields.
    #[test]
    fn a_diff_is_laid_over_its_base_page_by_page() {
        use std::io::{Seek, SeekFrom, Write};
        let t = tempfile::tempdir().expect("tempdir");
        let size: u64 = 8 << 20;
        let base = t.path().join("base");
        let diff = t.path().join("diff");
        let write_at = |p: &Path, off: u64, b: &[u8]| {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(p)
                .expect("open");
            f.seek(SeekFrom::Start(off)).expect("seek");
            f.write_all(b).expect("write");
        };
        // The base: two pages of data in a sparse 8 MiB file.
        std::fs::File::create(&base)
            .and_then(|f| f.set_len(size))
            .expect("base");
        write_at(&base, 0, &[1u8; 4096]);
        write_at(&base, 1 << 20, &[2u8; 4096]);
        // The diff: one page rewritten, one page zeroed, one new page.
        std::fs::File::create(&diff)
            .and_then(|f| f.set_len(size))
            .expect("diff");
        write_at(&diff, 0, &[9u8; 4096]);
        write_at(&diff, 1 << 20, &[0u8; 4096]);
        write_at(&diff, 4 << 20, &[7u8; 4096]);
        let copied = overlay_extents(&diff, &base).expect("overlay");
        assert_eq!(copied, 3 * 4096);
        let merged = std::fs::read(&base).expect("read");
        assert_eq!(merged.len() as u64, size);
        assert!(merged[..4096].iter().all(|b| *b == 9));
        assert!(merged[1 << 20..(1 << 20) + 4096].iter().all(|b| *b == 0));
        assert!(merged[4 << 20..(4 << 20) + 4096].iter().all(|b| *b == 7));
        assert!(merged[4096..1 << 20].iter().all(|b| *b == 0));
        // A diff larger than the memory is refused.
        std::fs::File::create(&diff)
            .and_then(|f| f.set_len(size * 2))
            .expect("diff");
        assert!(overlay_extents(&diff, &base).is_err());
    }

    /// `GET /` and `--version` spell the version differently; a handle
    /// made by `attach` must record what the driver records, or snapshots
    /// taken through it would be refused as another version's.
    #[test]
    fn versions_have_one_spelling() {
        assert_eq!(
            canonical_version("Firecracker v1.16.1"),
            "Firecracker v1.16.1"
        );
        assert_eq!(canonical_version("1.16.1"), "Firecracker v1.16.1");
        assert_eq!(canonical_version(" 1.16.1\n"), "Firecracker v1.16.1");
        assert_eq!(canonical_version("1.17.0-dev"), "Firecracker v1.17.0-dev");
        assert_eq!(
            canonical_version("Firecracker v1.17.0-dev"),
            "Firecracker v1.17.0-dev"
        );
        assert_eq!(canonical_version("garbage"), "garbage");
        assert_eq!(canonical_version("1.2"), "1.2");
        assert_eq!(
            FirecrackerDriver::new("/fc".into(), "1.16.1".into())
                .info
                .version,
            FirecrackerDriver::new("/fc".into(), "Firecracker v1.16.1".into())
                .info
                .version
        );
        assert_eq!(parse_version("v1.2.3.4"), None);
    }

    /// `track_dirty_pages` on load exists since 1.13; the old name is
    /// logged as deprecated on every load by those releases.
    #[test]
    fn load_uses_the_field_names_of_the_release() {
        assert!(new_api_names("Firecracker v1.13.0"));
        assert!(new_api_names("Firecracker v1.16.1"));
        assert!(new_api_names("1.16.1"));
        assert!(new_api_names("Firecracker v2.0.0"));
        assert!(!new_api_names("Firecracker v1.12.0"));
        assert!(!new_api_names("garbage"));
    }

    /// The log and metrics files are on the command line, so Firecracker
    /// never prints its own log to its stdout (the guest console), and
    /// nothing configures the logger again over the API.
    #[test]
    fn logging_is_configured_on_the_command_line() {
        let args = command_line("fc_1", Path::new("/vm"));
        assert_eq!(
            args.join(" "),
            "--api-sock /vm/fc.sock --id fc-1 --log-path /vm/fc.log --level Info --show-level --metrics-path /vm/fc.metrics"
        );
        let requests = boot_requests(&spec(), Path::new("/vm"));
        assert!(
            requests
                .iter()
                .all(|(path, _)| path != "/logger" && path != "/metrics"),
            "{requests:?}"
        );
    }

    #[test]
    fn instance_ids_are_sanitised() {
        assert_eq!(instance_id("fc_1.a"), "fc-1-a");
    }

    #[test]
    fn boot_requests_match_the_spec_shapes() {
        let requests = boot_requests(&spec(), Path::new("/vm"));
        let by_path: std::collections::HashMap<_, _> = requests.into_iter().collect();
        assert_eq!(
            by_path["/boot-source"],
            json!({"kernel_image_path": "/k/vmlinux", "initrd_path": "/k/initrd",
                   "boot_args": "console=ttyS0 reboot=k panic=1 pci=off quiet"})
        );
        assert_eq!(
            by_path["/machine-config"],
            json!({"vcpu_count": 2, "mem_size_mib": 512, "smt": false, "track_dirty_pages": true})
        );
        assert_eq!(
            by_path["/drives/d0"],
            json!({"drive_id": "d0", "path_on_host": "/d/base.ext4", "is_root_device": false, "is_read_only": true})
        );
        assert_eq!(
            by_path["/vsock"],
            json!({"guest_cid": 3, "uds_path": "/vm/vsock.sock"})
        );
    }
}
