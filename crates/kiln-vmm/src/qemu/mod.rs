//! QEMU `microvm` driver, controlled over QMP.
//!
//! One `qemu-system-x86_64` per VM, started detached with `-S`; once QMP
//! answers the driver sends `cont`. Guest RAM is a file in the VM dir
//! (`memory-backend-file`, `share=on`) so that a snapshot is only the device
//! state (`migrate` to a file with `x-ignore-shared`) plus a sparse copy of
//! that file, and a restore maps the copy `share=off` (copy-on-write).
//!
//! The agent channel is a virtio-serial port by default; with
//! [`QemuDriver::with_agent_transport`] it is vsock instead, served by a
//! `vhost-device-vsock` process per VM (`vhost_vsock.rs`), and the
//! driver then reports (and refuses) no snapshots, restores or migration.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::net::UnixStream;
use tracing::Instrument;

use crate::host::{SelectDriverError, check_qemu_version};
use crate::process::{VmmProcess, connect_when_ready, read_tail, remove_files, spawn_detached};
use crate::qmp::QmpClient;
mod args;

use crate::vhost_vsock::VsockPaths;
use crate::{
    AGENT_VSOCK_PORT, Accel, AgentTransport, AttachVmError, Capabilities, Capability,
    CleanupVmError, ConnectAgentError, ControlVmError, DriverInfo, DriverKind, HelperRecord,
    RestoreMemory, RestoreVmError, SnapshotInfo, SnapshotVmError, StartVmError, StopVmError,
    UnsupportedError, Vm, VmRecord, VmSpec, VmStatus, VmmDriver,
};
use args::{Machine, Mode, Paths, qemu_args};
pub use args::{PVM_CPU_MODEL, default_cpu_model, netdev_args};

/// How long QEMU has to open its QMP socket.
const QMP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `quit` has before SIGKILL.
const QUIT_GRACE: Duration = Duration::from_secs(2);
/// How long a snapshot write or load may take.
const MIGRATE_TIMEOUT: Duration = Duration::from_secs(120);
/// Name of the snapshot metadata file.
pub const SNAPSHOT_META: &str = "snapshot.json";
/// Device state file in a snapshot dir.
pub const SNAPSHOT_STATE: &str = "state";
/// Guest RAM file in a snapshot dir (and in a VM dir).
pub const MEMORY_FILE: &str = "memory";

/// The QEMU microvm driver.
#[derive(Debug, Clone)]
pub struct QemuDriver {
    info: DriverInfo,
    firmware: PathBuf,
    /// `vhost-device-vsock`, if configured: vsock is then available.
    vsock_backend: Option<PathBuf>,
    /// How the agent channel is carried (virtio-serial by default).
    transport: AgentTransport,
}

/// The capability table of a QEMU driver carrying the agent over
/// `transport`, with a vsock backend configured or not.
fn qemu_capabilities(transport: AgentTransport, vsock_backend: bool) -> Capabilities {
    // vhost-user-vsock: no device state to migrate, and the RAM must be
    // shared with the backend (a restore maps it privately).
    let state = transport == AgentTransport::VirtioSerial;
    Capabilities {
        driver: DriverKind::Qemu,
        pause: true,
        snapshot: state,
        snapshot_diff: false,
        restore: state,
        fork: state,
        live_migration_precopy: state,
        cow_restore: state,
        virtio_fs: true,
        vsock: vsock_backend,
        virtio_serial: true,
        network: true,
        agent_transport: transport,
    }
}

/// Snapshot metadata kept beside the state and memory files.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SnapshotMeta {
    driver: DriverKind,
    qemu_version: String,
    cpus: u32,
    memory_mib: u32,
    disks: usize,
    agent_channel: bool,
}

impl QemuDriver {
    /// A driver for `binary` (whose `--version` line is `version`), booting
    /// with `firmware` (qboot) under `accel`. Refuses QEMU older than 10.0.
    pub fn new(
        binary: PathBuf,
        firmware: PathBuf,
        accel: Accel,
        version: &str,
    ) -> Result<Self, SelectDriverError> {
        check_qemu_version(version)?;
        Ok(QemuDriver {
            info: DriverInfo {
                kind: DriverKind::Qemu,
                binary,
                version: version.to_owned(),
                accel,
                cpu_model: default_cpu_model(accel).to_owned(),
            },
            firmware,
            vsock_backend: None,
            transport: AgentTransport::VirtioSerial,
        })
    }

    /// Make vsock available, served by `binary` (`vhost-device-vsock`; see
    /// [`crate::find_vhost_vsock`]). The transport stays as it is.
    pub fn with_vsock_backend(mut self, binary: PathBuf) -> Self {
        self.vsock_backend = Some(binary);
        self
    }

    /// Carry the agent channel over `transport`. vsock needs a backend
    /// ([`QemuDriver::with_vsock_backend`]), and turns snapshots, restores
    /// and migration off in the capability table.
    pub fn with_agent_transport(
        mut self,
        transport: AgentTransport,
    ) -> Result<Self, UnsupportedError> {
        let capability = match transport {
            AgentTransport::VirtioSerial => Capability::VirtioSerial,
            AgentTransport::HybridVsock => Capability::Vsock,
        };
        self.capabilities().require(capability)?;
        self.transport = transport;
        Ok(self)
    }

    /// Use another `-cpu` model (default: `host` under KVM, `max` under TCG).
    pub fn with_cpu_model(mut self, model: impl Into<String>) -> Self {
        self.info.cpu_model = model.into();
        self
    }

    /// Detect QEMU on this host (`KILN_QEMU_BIN` or `PATH`) with `accel`.
    pub fn detect(accel: Accel) -> Result<Self, SelectDriverError> {
        let host = crate::detect(&crate::DriverConfig::default());
        let version = host
            .qemu
            .version
            .map_err(|reason| SelectDriverError::QemuMissing {
                path: host.qemu.path.clone(),
                reason,
            })?;
        let driver = Self::new(host.qemu.path, host.qemu_firmware, accel, &version)?;
        Ok(if accel == Accel::Kvm && host.kvm == crate::KvmKind::Pvm {
            driver.with_cpu_model(PVM_CPU_MODEL)
        } else {
            driver
        })
    }

    fn args(&self, spec: &VmSpec, paths: &Paths, mode: &Mode) -> Vec<String> {
        qemu_args(
            spec,
            paths,
            mode,
            Machine {
                accel: self.info.accel,
                firmware: &self.firmware,
                cpu_model: &self.info.cpu_model,
                agent: self.transport,
            },
        )
    }

    async fn launch(&self, spec: &VmSpec, mode: Mode) -> Result<(QemuVm, Duration), StartVmError> {
        crate::validate_spec(spec)?;
        if !self.firmware.is_file() {
            return Err(StartVmError::MissingFile {
                what: "firmware",
                path: self.firmware.clone(),
            });
        }
        let paths = Paths::new(&spec.dir);
        std::fs::create_dir_all(&spec.dir).map_err(|source| StartVmError::Dir {
            path: spec.dir.clone(),
            source,
        })?;
        let mut files = vec![
            paths.qmp.clone(),
            paths.pid.clone(),
            paths.stderr.clone(),
            spec.console_log.clone(),
        ];
        let vsock = (spec.agent_channel && self.transport == AgentTransport::HybridVsock)
            .then(|| VsockPaths::new(&spec.dir));
        match &vsock {
            Some(v) => files.extend(v.files()),
            None if spec.agent_channel => files.push(paths.agent.clone()),
            None => {}
        }
        if matches!(mode, Mode::Boot | Mode::Incoming { own: true, .. }) {
            files.push(paths.memory.clone());
        }
        // Leftovers of an earlier VM in this dir would confuse QEMU.
        remove_files(&files).map_err(|e| StartVmError::Dir {
            path: spec.dir.clone(),
            source: std::io::Error::other(e.to_string()),
        })?;
        if let Mode::Incoming { memory, own: true } = &mode {
            crate::sparse::copy(memory, &paths.memory)
                .await
                .map_err(|source| StartVmError::Dir {
                    path: paths.memory.clone(),
                    source,
                })?;
        }
        // The vsock backend first: QEMU connects to its socket at start-up.
        let mut helpers = Vec::new();
        if let Some(v) = &vsock {
            let Some(binary) = &self.vsock_backend else {
                return Err(StartVmError::InvalidSpec(
                    "the agent channel is vsock but no vhost-device-vsock is configured".into(),
                ));
            };
            match crate::vhost_vsock::spawn_backend(binary, v).await {
                Ok(p) => helpers.push(p),
                Err(e) => {
                    let _ = remove_files(&files);
                    return Err(e);
                }
            }
        }
        let args = self.args(spec, &paths, &mode);
        tracing::debug!(binary = %self.info.binary.display(), ?args, "spawning QEMU");
        let spawned = Instant::now();
        let process = match spawn_detached(&self.info.binary, &args, &paths.stderr, None) {
            Ok(p) => p,
            Err(e) => {
                kill_all(&helpers).await;
                let _ = remove_files(&files);
                return Err(e);
            }
        };
        let result = async {
            let stream =
                connect_when_ready(&paths.qmp, &process, QMP_TIMEOUT, &paths.stderr).await?;
            match QmpClient::handshake(stream).await {
                Ok(qmp) => Ok(qmp),
                // QEMU opens QMP before it loads the kernel; a refused kernel
                // shows up as QMP hanging up and the process exiting.
                Err(e) => Err(if process.wait_timeout(Duration::from_millis(500)).await {
                    StartVmError::Exited {
                        status: "exited".into(),
                        stderr: read_tail(&paths.stderr),
                    }
                } else {
                    StartVmError::Control(e)
                }),
            }
        }
        .await;
        let qmp = match result {
            Ok(qmp) => qmp,
            Err(e) => {
                let _ = process.kill().await;
                kill_all(&helpers).await;
                let _ = remove_files(&files);
                return Err(e);
            }
        };
        let qmp_ready = spawned.elapsed();
        tracing::debug!(pid = process.pid, ?qmp_ready, "QMP ready");
        let vm = QemuVm {
            record: VmRecord {
                driver: DriverKind::Qemu,
                id: spec.id.clone(),
                pid: process.pid,
                start_time: process.start_time,
                dir: spec.dir.clone(),
                control_socket: paths.qmp.clone(),
                agent_socket: match &vsock {
                    Some(v) => Some(v.uds.clone()),
                    None => spec.agent_channel.then(|| paths.agent.clone()),
                },
                console_log: spec.console_log.clone(),
                files,
                agent_transport: Some(self.transport),
                helpers: helpers
                    .iter()
                    .map(|p| HelperRecord {
                        name: crate::vhost_vsock::BINARY.into(),
                        pid: p.pid,
                        start_time: p.start_time,
                    })
                    .collect(),
            },
            process,
            helpers,
            caps: self.capabilities(),
            qmp: Arc::new(qmp),
            memory: match mode {
                Mode::Boot | Mode::Incoming { own: true, .. } => paths.memory,
                Mode::Incoming { memory, own: false } => memory,
            },
            memory_mib: spec.memory_mib,
            cpus: spec.cpus,
            disks: spec.disks.len(),
        };
        Ok((vm, qmp_ready))
    }
}

/// SIGKILL helper processes (best effort: each is waited for, bounded).
async fn kill_all(helpers: &[VmmProcess]) {
    for helper in helpers {
        if let Err(e) = helper.kill().await {
            tracing::warn!(pid = helper.pid, error = %e, "cannot kill a VM helper process");
        }
    }
}

#[async_trait]
impl VmmDriver for QemuDriver {
    fn info(&self) -> &DriverInfo {
        &self.info
    }

    fn capabilities(&self) -> Capabilities {
        qemu_capabilities(self.transport, self.vsock_backend.is_some())
    }

    async fn start(&self, spec: &VmSpec) -> Result<Box<dyn Vm>, StartVmError> {
        let span = tracing::info_span!("qemu_start", vm = %spec.id);
        async {
            let (vm, qmp_ready) = self.launch(spec, Mode::Boot).await?;
            if let Err(e) = vm.qmp.execute("cont", None).await {
                let _ = vm.cleanup().await;
                return Err(StartVmError::Control(e));
            }
            tracing::info!(pid = vm.process.pid, ?qmp_ready, "QEMU VM started");
            Ok(Box::new(vm) as Box<dyn Vm>)
        }
        .instrument(span)
        .await
    }

    async fn attach(&self, record: &VmRecord) -> Result<Box<dyn Vm>, AttachVmError> {
        if record.driver != DriverKind::Qemu {
            return Err(AttachVmError::WrongDriver {
                record: record.driver,
                driver: DriverKind::Qemu,
            });
        }
        let process = VmmProcess {
            pid: record.pid,
            start_time: record.start_time,
        };
        if !process.alive() {
            return Err(AttachVmError::Gone { pid: record.pid });
        }
        let stream = UnixStream::connect(&record.control_socket)
            .await
            .map_err(|source| AttachVmError::Connect {
                path: record.control_socket.clone(),
                source,
            })?;
        let qmp = QmpClient::handshake(stream)
            .await
            .map_err(AttachVmError::Control)?;
        let (memory_mib, cpus, memory, disks) = describe(&qmp).await;
        let transport = record
            .agent_transport
            .unwrap_or(AgentTransport::VirtioSerial);
        Ok(Box::new(QemuVm {
            record: record.clone(),
            process,
            helpers: record
                .helpers
                .iter()
                .map(|h| VmmProcess {
                    pid: h.pid,
                    start_time: h.start_time,
                })
                .collect(),
            caps: qemu_capabilities(transport, transport == AgentTransport::HybridVsock),
            qmp: Arc::new(qmp),
            memory: memory.unwrap_or_else(|| record.dir.join(MEMORY_FILE)),
            memory_mib,
            cpus,
            disks,
        }))
    }

    async fn restore(
        &self,
        snapshot_dir: &Path,
        spec: &VmSpec,
    ) -> Result<Box<dyn Vm>, RestoreVmError> {
        self.restore_with(snapshot_dir, spec, RestoreMemory::Mapped)
            .await
    }

    async fn restore_with(
        &self,
        snapshot_dir: &Path,
        spec: &VmSpec,
        how: RestoreMemory,
    ) -> Result<Box<dyn Vm>, RestoreVmError> {
        self.capabilities().require(Capability::Restore)?;
        let meta_path = snapshot_dir.join(SNAPSHOT_META);
        let meta: SnapshotMeta = std::fs::read(&meta_path)
            .map_err(|source| RestoreVmError::Read {
                path: meta_path.clone(),
                source,
            })
            .and_then(|bytes| {
                serde_json::from_slice(&bytes).map_err(|e| RestoreVmError::Read {
                    path: meta_path.clone(),
                    source: std::io::Error::other(e),
                })
            })?;
        if meta.driver != DriverKind::Qemu
            || meta.cpus != spec.cpus
            || meta.memory_mib != spec.memory_mib
            || meta.disks != spec.disks.len()
            || meta.agent_channel != spec.agent_channel
        {
            return Err(RestoreVmError::Mismatch(format!(
                "snapshot has driver {}, {} cpus, {} MiB, {} disks, agent channel {}; spec has {} cpus, {} MiB, {} disks, agent channel {}",
                meta.driver,
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
        let memory = snapshot_dir.join(MEMORY_FILE);
        let state = snapshot_dir.join(SNAPSHOT_STATE);
        for path in [&memory, &state] {
            if !path.is_file() {
                return Err(RestoreVmError::Read {
                    path: path.clone(),
                    source: std::io::Error::from(std::io::ErrorKind::NotFound),
                });
            }
        }
        let spawned = Instant::now();
        let (vm, _) = self
            .launch(
                spec,
                Mode::Incoming {
                    memory,
                    own: how == RestoreMemory::Owned,
                },
            )
            .await
            .map_err(RestoreVmError::Start)?;
        let loaded = async {
            vm.qmp
                .execute(
                    "migrate-set-capabilities",
                    Some(
                        json!({"capabilities": [{"capability": "x-ignore-shared", "state": true}]}),
                    ),
                )
                .await?;
            vm.qmp
                .execute(
                    "migrate-incoming",
                    Some(json!({"uri": format!("file:{}", state.display())})),
                )
                .await?;
            wait_migration(&vm.qmp).await?;
            vm.qmp.execute("cont", None).await?;
            Ok::<_, ControlVmError>(())
        }
        .await;
        if let Err(e) = loaded {
            let stderr = read_tail(&spec.dir.join("qemu.stderr"));
            let _ = vm.cleanup().await;
            return Err(RestoreVmError::Load(format!("{e}; QEMU stderr: {stderr}")));
        }
        tracing::info!(vm = %spec.id, pid = vm.process.pid, elapsed = ?spawned.elapsed(), "QEMU VM restored");
        Ok(Box::new(vm))
    }
}

/// Wait until the current migration (in or out) completes.
async fn wait_migration(qmp: &QmpClient) -> Result<(), ControlVmError> {
    let deadline = Instant::now() + MIGRATE_TIMEOUT;
    loop {
        let info = qmp.execute("query-migrate", None).await?;
        match info["status"].as_str() {
            Some("completed") => return Ok(()),
            Some("failed") | Some("cancelled") => {
                return Err(ControlVmError::Refused {
                    command: "migrate".into(),
                    message: info["error-desc"]
                        .as_str()
                        .unwrap_or("migration failed")
                        .to_owned(),
                });
            }
            _ => {}
        }
        if Instant::now() >= deadline {
            return Err(ControlVmError::Timeout {
                command: "migrate".into(),
                timeout: MIGRATE_TIMEOUT,
            });
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Memory size, vCPU count, RAM file and disk count of a running VM, asked
/// over QMP.
async fn describe(qmp: &QmpClient) -> (u32, u32, Option<PathBuf>, usize) {
    let memory_mib = qmp
        .execute("query-memory-size-summary", None)
        .await
        .ok()
        .and_then(|v| v["base-memory"].as_u64())
        .and_then(|b| u32::try_from(b >> 20).ok())
        .unwrap_or(0);
    let cpus = qmp
        .execute("query-cpus-fast", None)
        .await
        .ok()
        .and_then(|v| v.as_array().map(|a| a.len()))
        .and_then(|n| u32::try_from(n).ok())
        .unwrap_or(0);
    let memory = qmp
        .execute(
            "qom-get",
            Some(json!({"path": "/objects/mem", "property": "mem-path"})),
        )
        .await
        .ok()
        .and_then(|v| v.as_str().map(PathBuf::from));
    let disks = qmp
        .execute("query-block", None)
        .await
        .ok()
        .and_then(|v| v.as_array().map(|a| a.len()))
        .unwrap_or(0);
    (memory_mib, cpus, memory, disks)
}

/// A QEMU microVM.
pub struct QemuVm {
    record: VmRecord,
    process: VmmProcess,
    /// The vsock backend, if any: killed with QEMU.
    helpers: Vec<VmmProcess>,
    /// The table of the driver configuration that started it.
    caps: Capabilities,
    qmp: Arc<QmpClient>,
    /// RAM file backing the guest (in the VM dir, or a snapshot's).
    memory: PathBuf,
    memory_mib: u32,
    cpus: u32,
    disks: usize,
}

impl QemuVm {
    /// The QMP session, for callers that need more than the trait offers
    /// (hot-plug).
    pub fn qmp(&self) -> &QmpClient {
        &self.qmp
    }

    /// The QMP session for a live migration, if this VM can be migrated
    /// (not with the agent over vsock: `driver qemu (agent channel over
    /// vsock) cannot do live migration`).
    pub fn migration_qmp(&self) -> Result<&QmpClient, UnsupportedError> {
        self.caps.require(Capability::LiveMigration)?;
        Ok(&self.qmp)
    }

    async fn control(&self, command: &str) -> Result<serde_json::Value, ControlVmError> {
        if !self.process.alive() {
            return Err(ControlVmError::Gone);
        }
        self.qmp.execute(command, None).await
    }

    async fn write_snapshot(&self, dest: &Path) -> Result<SnapshotInfo, SnapshotVmError> {
        self.caps.require(Capability::SnapshotFull)?;
        let write_err = |source| SnapshotVmError::Write {
            path: dest.to_owned(),
            source,
        };
        std::fs::create_dir_all(dest).map_err(write_err)?;
        let state = dest.join(SNAPSHOT_STATE);
        let _ = std::fs::remove_file(&state);
        let stopped = Instant::now();
        self.control("stop")
            .await
            .map_err(SnapshotVmError::Control)?;
        self.qmp
            .execute(
                "migrate-set-capabilities",
                Some(json!({"capabilities": [{"capability": "x-ignore-shared", "state": true}]})),
            )
            .await
            .map_err(SnapshotVmError::Control)?;
        self.qmp
            .execute(
                "migrate",
                Some(json!({"uri": format!("file:{}", state.display())})),
            )
            .await
            .map_err(SnapshotVmError::Control)?;
        wait_migration(&self.qmp)
            .await
            .map_err(|e| SnapshotVmError::Failed(e.to_string()))?;
        // The vCPUs are stopped, so the RAM file is stable: copy it sparsely.
        let memory_dest = dest.join(MEMORY_FILE);
        crate::sparse::copy(&self.memory, &memory_dest)
            .await
            .map_err(|e| {
                SnapshotVmError::Failed(format!(
                    "copying guest memory {} failed: {e}",
                    self.memory.display()
                ))
            })?;
        let downtime = stopped.elapsed();
        let meta = SnapshotMeta {
            driver: DriverKind::Qemu,
            qemu_version: format!(
                "{}.{}.{}",
                self.qmp.version.0, self.qmp.version.1, self.qmp.version.2
            ),
            cpus: self.cpus,
            memory_mib: self.memory_mib,
            disks: self.disks,
            agent_channel: self.record.agent_socket.is_some(),
        };
        let meta_bytes =
            serde_json::to_vec_pretty(&meta).map_err(|e| SnapshotVmError::Failed(e.to_string()))?;
        std::fs::write(dest.join(SNAPSHOT_META), meta_bytes).map_err(write_err)?;
        Ok(SnapshotInfo {
            dir: dest.to_owned(),
            driver: DriverKind::Qemu,
            memory_mib: self.memory_mib,
            cpus: self.cpus,
            downtime,
        })
    }
}

#[async_trait]
impl Vm for QemuVm {
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
        self.caps
    }

    async fn pause(&self) -> Result<(), ControlVmError> {
        self.control("stop").await.map(drop)
    }

    async fn resume(&self) -> Result<(), ControlVmError> {
        self.control("cont").await.map(drop)
    }

    async fn status(&self) -> Result<VmStatus, ControlVmError> {
        if !self.process.alive() {
            return Ok(VmStatus::Exited);
        }
        match self.qmp.execute("query-status", None).await {
            Ok(v) => Ok(match v["status"].as_str() {
                Some("running") => VmStatus::Running,
                Some("paused") => VmStatus::Paused,
                Some(other) => VmStatus::Other(other.to_owned()),
                None => return Err(ControlVmError::Protocol(format!("query-status said {v}"))),
            }),
            Err(ControlVmError::Gone) => {
                // QEMU closes QMP as it exits; give /proc a moment to agree.
                if self.process.wait_timeout(Duration::from_millis(500)).await {
                    Ok(VmStatus::Exited)
                } else {
                    Err(ControlVmError::Gone)
                }
            }
            Err(e) => Err(e),
        }
    }

    async fn connect_agent(&self) -> Result<UnixStream, ConnectAgentError> {
        let path = self
            .record
            .agent_socket
            .as_ref()
            .ok_or(ConnectAgentError::NoChannel)?;
        match self.caps.agent_transport {
            AgentTransport::HybridVsock => {
                // A paused guest cannot accept, and vhost-device-vsock
                // serves nothing more after a CONNECT abandoned while the
                // guest was paused.
                if self.status().await.ok() == Some(VmStatus::Paused) {
                    return Err(ConnectAgentError::Paused);
                }
                crate::vsock::connect(path, AGENT_VSOCK_PORT, crate::vsock::HANDSHAKE_TIMEOUT).await
            }
            AgentTransport::VirtioSerial => {
                UnixStream::connect(path)
                    .await
                    .map_err(|source| ConnectAgentError::Connect {
                        path: path.clone(),
                        source,
                    })
            }
        }
    }

    async fn wait(&self) {
        self.process.wait().await;
    }

    async fn stop(&self, grace: Duration) -> Result<(), StopVmError> {
        let stopped = async {
            if self.process.wait_timeout(grace).await {
                return Ok(());
            }
            // microvm without ACPI has no power button: ask QEMU itself to quit.
            let _ = self.qmp.execute_timeout("quit", None, QUIT_GRACE).await;
            if self.process.wait_timeout(QUIT_GRACE).await {
                return Ok(());
            }
            tracing::warn!(pid = self.process.pid, "QEMU ignored quit; killing it");
            self.process.kill().await
        }
        .await;
        kill_all(&self.helpers).await;
        stopped
    }

    async fn kill(&self) -> Result<(), StopVmError> {
        let killed = self.process.kill().await;
        kill_all(&self.helpers).await;
        killed
    }

    async fn cleanup(&self) -> Result<(), CleanupVmError> {
        self.process.kill().await.map_err(CleanupVmError::Stop)?;
        for helper in &self.helpers {
            helper.kill().await.map_err(CleanupVmError::Stop)?;
        }
        remove_files(&self.record.files)
    }

    async fn snapshot(&self, dest_dir: &Path) -> Result<SnapshotInfo, SnapshotVmError> {
        let span = tracing::info_span!("qemu_snapshot", vm = %self.record.id);
        self.write_snapshot(dest_dir).instrument(span).await
    }
}
