//! VMM drivers for Kiln: one [`VmmDriver`] trait with a capability table, and
//! two implementations, QEMU `microvm` driven over QMP ([`qemu`]) and
//! Firecracker driven over its HTTP API on a Unix socket ([`firecracker`]).
//!
//! The crate owns the VMM *process*: spawning it detached (it outlives the Kiln
//! process that started it), the per-VM runtime directory (sockets, pid file,
//! console log, memory file), re-attaching from a persisted [`VmRecord`], and
//! removing everything it created; the capability table every caller
//! consults ([`Capabilities::require`]); the host side of the hybrid vsock
//! guest channel ([`vsock`]) and, for QEMU, the `vhost-device-vsock` process
//! serving it. It also ships a driver conformance suite ([`conformance`]),
//! driver timings side by side ([`mod@bench`]) and the builder of a tiny
//! bare-metal test guest ([`testguest`]).
//!
//! It must not depend on the node, server or image crates: it knows nothing
//! about sandboxes, images or the agent protocol, only VMs and byte streams.

pub mod bench;
pub mod clock;
pub mod conformance;
pub mod firecracker;
mod host;
pub mod memo;
mod process;
pub mod qemu;
pub mod qmp;
pub mod sparse;
pub mod testguest;
mod vhost_vsock;
pub mod vsock;

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::net::UnixStream;

pub use vhost_vsock::{BINARY as VHOST_VSOCK_BINARY, find_binary as find_vhost_vsock};

pub use host::{
    Accel, Binary, DEFAULT_QBOOT, DriverChoice, DriverConfig, GuestKind, HostInfo, KvmKind,
    MIN_QEMU, SelectDriverError, Selection, detect, select, select_for,
};

/// Which VMM a driver runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DriverKind {
    Qemu,
    Firecracker,
}

impl std::fmt::Display for DriverKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DriverKind::Qemu => "qemu",
            DriverKind::Firecracker => "firecracker",
        })
    }
}

/// What a driver can do. Kiln checks this before asking for a feature, so an
/// unsupported operation is a scheduling decision, not a runtime surprise:
/// callers ask [`Capabilities::require`], which names the driver and the
/// capability in its error. The table depends on the driver's options (a
/// QEMU driver carrying the agent over vsock cannot snapshot), so it is
/// asked of the configured driver, never assumed per VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    /// The driver these are the capabilities of.
    pub driver: DriverKind,
    /// Pause and resume the vCPUs.
    pub pause: bool,
    /// Write memory + device state to a directory ([`Vm::snapshot`]): all of
    /// the memory (a `Full` snapshot).
    pub snapshot: bool,
    /// Snapshots that write only the pages changed since a base (`Diff`),
    /// used for the first snapshot of a restored VM.
    pub snapshot_diff: bool,
    /// Start a VM from such a directory ([`VmmDriver::restore`]).
    pub restore: bool,
    /// Several VMs restored from one snapshot at once, each independent
    /// (what `fork` builds on).
    pub fork: bool,
    /// Live migration with pre-copy of memory while the guest runs.
    pub live_migration_precopy: bool,
    /// Restored memory is mapped copy-on-write from the snapshot file, so
    /// forks of one snapshot share pages.
    pub cow_restore: bool,
    /// virtio-fs through vhost-user (virtiofsd).
    pub virtio_fs: bool,
    /// The agent channel can be carried over vsock (hybrid Unix-socket
    /// protocol, `CONNECT <port>` / `OK <port>`).
    pub vsock: bool,
    /// The agent channel can be carried over a virtio-serial port.
    pub virtio_serial: bool,
    /// A network interface on a host tap can be given to the guest
    /// ([`VmSpec::network`]).
    pub network: bool,
    /// The guest channel transport [`Vm::connect_agent`] uses with this
    /// driver's configuration.
    pub agent_transport: AgentTransport,
}

/// One entry of the capability table, for [`Capabilities::require`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Capability {
    Pause,
    SnapshotFull,
    SnapshotDiff,
    Restore,
    Fork,
    LiveMigration,
    VirtioFs,
    Vsock,
    VirtioSerial,
    Network,
}

impl Capability {
    /// Every capability, in table order.
    pub const ALL: [Capability; 10] = [
        Capability::Pause,
        Capability::SnapshotFull,
        Capability::SnapshotDiff,
        Capability::Restore,
        Capability::Fork,
        Capability::LiveMigration,
        Capability::VirtioFs,
        Capability::Vsock,
        Capability::VirtioSerial,
        Capability::Network,
    ];
}

impl std::fmt::Display for Capability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Capability::Pause => "pause and resume",
            Capability::SnapshotFull => "Full snapshots",
            Capability::SnapshotDiff => "Diff snapshots",
            Capability::Restore => "restore from a snapshot",
            Capability::Fork => "fork (several restores of one snapshot)",
            Capability::LiveMigration => "live migration",
            Capability::VirtioFs => "virtio-fs",
            Capability::Vsock => "a vsock agent channel",
            Capability::VirtioSerial => "a virtio-serial agent channel",
            Capability::Network => "a network interface",
        })
    }
}

/// A request a driver cannot serve.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("driver {driver} cannot do {capability}")]
pub struct UnsupportedError {
    /// The driver and the option that matters, e.g. `qemu (agent channel
    /// over vsock)`.
    pub driver: String,
    pub capability: Capability,
}

impl Capabilities {
    /// Whether the driver can do `capability`.
    pub fn supports(&self, capability: Capability) -> bool {
        match capability {
            Capability::Pause => self.pause,
            Capability::SnapshotFull => self.snapshot,
            Capability::SnapshotDiff => self.snapshot_diff,
            Capability::Restore => self.restore,
            Capability::Fork => self.fork,
            Capability::LiveMigration => self.live_migration_precopy,
            Capability::VirtioFs => self.virtio_fs,
            Capability::Vsock => self.vsock,
            Capability::VirtioSerial => self.virtio_serial,
            Capability::Network => self.network,
        }
    }

    /// `Ok` if the driver can do `capability`, else the error callers pass
    /// on: `driver qemu (agent channel over vsock) cannot do Full
    /// snapshots`.
    pub fn require(&self, capability: Capability) -> Result<(), UnsupportedError> {
        if self.supports(capability) {
            Ok(())
        } else {
            Err(UnsupportedError {
                driver: self.driver_name(),
                capability,
            })
        }
    }

    /// The driver, with the option that changes its table when it is not
    /// the VMM's usual one.
    pub fn driver_name(&self) -> String {
        match (self.driver, self.agent_transport) {
            (DriverKind::Qemu, AgentTransport::HybridVsock) => {
                "qemu (agent channel over vsock)".to_owned()
            }
            (DriverKind::Firecracker, AgentTransport::VirtioSerial) => {
                "firecracker (agent channel over virtio-serial)".to_owned()
            }
            (kind, _) => kind.to_string(),
        }
    }
}

/// How the guest agent channel is carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentTransport {
    /// A virtio-serial port on a Unix-socket chardev (QEMU); the guest sees
    /// `/dev/virtio-ports/kiln.agent`.
    VirtioSerial,
    /// Hybrid vsock: guest CID 3, the guest listens on [`AGENT_VSOCK_PORT`];
    /// the host connects to a Unix socket and says `CONNECT <port>`
    /// ([`vsock`]). Firecracker's own device, or on QEMU a
    /// `vhost-user-vsock-device` served by `vhost-device-vsock`.
    HybridVsock,
}

impl std::fmt::Display for AgentTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AgentTransport::VirtioSerial => "virtio-serial",
            AgentTransport::HybridVsock => "vsock",
        })
    }
}

/// Name of the guest agent's virtio-serial port (QEMU).
pub const AGENT_PORT_NAME: &str = "kiln.agent";
/// Vsock port the guest agent listens on (Firecracker, QEMU with vsock).
pub const AGENT_VSOCK_PORT: u32 = 1024;
/// Guest CID given to the vsock device.
pub const GUEST_CID: u32 = 3;
/// Smallest guest memory the drivers accept.
pub const MIN_MEMORY_MIB: u32 = 16;

/// Everything needed to boot one microVM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    /// Identifier used in logs and as the VMM's name/id.
    pub id: String,
    /// Per-VM runtime directory, created if missing. The driver puts its
    /// sockets, pid file, stderr log and memory file here, and
    /// [`Vm::cleanup`] removes them all.
    pub dir: PathBuf,
    /// Guest kernel. QEMU: a bzImage or an ELF with a PVH note. Firecracker:
    /// an uncompressed ELF (`vmlinux`, or an ELF with a PVH note).
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// Extra kernel command line; the driver adds its own console arguments.
    pub cmdline: String,
    pub cpus: u32,
    pub memory_mib: u32,
    pub disks: Vec<DiskSpec>,
    /// Add the guest agent channel (see [`Capabilities::agent_transport`]).
    pub agent_channel: bool,
    /// Where the guest's serial console is written. The driver creates the
    /// file and [`Vm::cleanup`] removes it: read it before cleaning up.
    pub console_log: PathBuf,
    /// A virtio-net device on an existing tap (`None`: no network device).
    pub network: Option<NetDevice>,
}

/// A virtio-net device backed by a host tap (created by `kiln-net` before
/// the VMM starts; the VMM only opens it by name).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetDevice {
    /// Host tap name (1-15 of `[a-z0-9-]`).
    pub tap: String,
    /// Guest MAC, `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
}

impl NetDevice {
    /// Whether the names are safe to put in a QEMU option string or a
    /// Firecracker request (no `,` or `=` that QEMU would parse).
    pub fn is_valid(&self) -> bool {
        let tap_ok = !self.tap.is_empty()
            && self.tap.len() <= 15
            && self
                .tap
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        let mac_ok = self.mac.len() == 17
            && self.mac.bytes().enumerate().all(|(i, b)| {
                if i % 3 == 2 {
                    b == b':'
                } else {
                    b.is_ascii_hexdigit()
                }
            });
        tap_ok && mac_ok
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSpec {
    pub path: PathBuf,
    pub read_only: bool,
}

/// What the node persists about a running VM so that a restarted Kiln process
/// can re-attach to it with [`VmmDriver::attach`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    pub driver: DriverKind,
    pub id: String,
    pub pid: i32,
    /// Field 22 of `/proc/PID/stat` (clock ticks since boot): tells a reused
    /// pid from the VMM we started.
    pub start_time: u64,
    pub dir: PathBuf,
    /// QMP socket (QEMU) or API socket (Firecracker).
    pub control_socket: PathBuf,
    /// Host end of the guest channel, if the VM has one.
    pub agent_socket: Option<PathBuf>,
    pub console_log: PathBuf,
    /// Every file and socket the driver created for this VM; removed by
    /// [`Vm::cleanup`].
    pub files: Vec<PathBuf>,
    /// How the agent channel is carried (`None` in records written before
    /// this field: the VMM's usual transport).
    #[serde(default)]
    pub agent_transport: Option<AgentTransport>,
    /// Processes that serve this VM beside the VMM (QEMU's vsock backend);
    /// killed with it.
    #[serde(default)]
    pub helpers: Vec<HelperRecord>,
}

/// A helper process of a VM, identified like the VMM (pid + start time).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelperRecord {
    pub name: String,
    pub pid: i32,
    pub start_time: u64,
}

/// Observed state of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmStatus {
    Running,
    Paused,
    /// The VMM is up but the guest is neither running nor paused (booting,
    /// migrating, shut down, in error). The string is the VMM's own word.
    Other(String),
    /// The VMM process is gone.
    Exited,
}

/// Where a snapshot was written and what it holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    pub dir: PathBuf,
    pub driver: DriverKind,
    pub memory_mib: u32,
    pub cpus: u32,
    /// How long the guest was stopped for the device state to be written
    /// (memory copy included).
    pub downtime: Duration,
}

/// Versions and the accelerator a driver runs with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriverInfo {
    pub kind: DriverKind,
    pub binary: PathBuf,
    pub version: String,
    pub accel: Accel,
    /// The CPU model the guest sees: QEMU's `-cpu` (`host` passes the host
    /// CPU through under KVM, `max` is everything TCG emulates);
    /// Firecracker: `host` (KVM's CPUID of this host, no CPU template).
    #[serde(default)]
    pub cpu_model: String,
}

/// A VMM driver. Object-safe: Kiln holds an `Arc<dyn VmmDriver>` chosen by
/// [`select`].
#[async_trait]
pub trait VmmDriver: Send + Sync {
    fn info(&self) -> &DriverInfo;
    fn kind(&self) -> DriverKind {
        self.info().kind
    }
    fn capabilities(&self) -> Capabilities;
    /// Spawn a detached VMM for `spec` and start the guest. Returns once the
    /// VMM is running the guest. On error nothing is left behind: no process,
    /// no file the driver created.
    async fn start(&self, spec: &VmSpec) -> Result<Box<dyn Vm>, StartVmError>;
    /// Re-attach to a VMM started earlier, possibly by another process.
    async fn attach(&self, record: &VmRecord) -> Result<Box<dyn Vm>, AttachVmError>;
    /// Start a new VM from a snapshot directory written by [`Vm::snapshot`].
    /// `spec` gives the new VM's identity and runtime dir; its cpus, memory
    /// and devices must match the snapshot's.
    async fn restore(
        &self,
        snapshot_dir: &Path,
        spec: &VmSpec,
    ) -> Result<Box<dyn Vm>, RestoreVmError>;
    /// [`VmmDriver::restore`] choosing how the new VM gets its RAM (see
    /// [`RestoreMemory`]). Drivers that can only map the snapshot's memory
    /// (Firecracker's File backend) ignore `memory`.
    async fn restore_with(
        &self,
        snapshot_dir: &Path,
        spec: &VmSpec,
        memory: RestoreMemory,
    ) -> Result<Box<dyn Vm>, RestoreVmError> {
        let _ = memory;
        self.restore(snapshot_dir, spec).await
    }
}

/// How a restored VM gets its RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestoreMemory {
    /// Map the snapshot's memory file copy-on-write: instant, and every
    /// clone shares the pages it has not changed. But the RAM is then
    /// private to the VMM, so a later snapshot of *this* VM must write all
    /// of it into the state stream (slow, and its clones share nothing).
    Mapped,
    /// Give the VM its own sparse copy of the memory file, shared like a
    /// booted VM's: the copy costs a little at restore (about 10 ms for a
    /// 256 MiB guest here), and this VM's own snapshots and forks are then
    /// as cheap as a booted VM's. For VMs that are likely to be snapshotted
    /// (warm starts from templates).
    Owned,
}

/// A running (or once running) microVM.
#[async_trait]
pub trait Vm: Send + Sync {
    fn id(&self) -> &str;
    fn pid(&self) -> i32;
    /// Record to persist; enough for [`VmmDriver::attach`].
    fn record(&self) -> VmRecord;
    /// The capability table of the driver configuration this VM runs with
    /// (see [`Capabilities::require`]).
    fn capabilities(&self) -> Capabilities;
    async fn pause(&self) -> Result<(), ControlVmError>;
    async fn resume(&self) -> Result<(), ControlVmError>;
    async fn status(&self) -> Result<VmStatus, ControlVmError>;
    /// A connected byte stream to the guest channel. QEMU: the chardev is a
    /// server that accepts one client at a time; a second connection waits
    /// (its bytes queue) until the first one closes. Firecracker: after the
    /// `CONNECT`/`OK` exchange, each call is a new guest connection.
    async fn connect_agent(&self) -> Result<UnixStream, ConnectAgentError>;
    /// Wait until the VMM process exits (works for a VMM that is not our
    /// child, by polling `/proc`).
    async fn wait(&self);
    /// Shut down: give the guest `grace` to exit by itself (the node asks it
    /// over the agent channel first), then ask the VMM to quit, then kill.
    async fn stop(&self, grace: Duration) -> Result<(), StopVmError>;
    /// SIGKILL the VMM and wait for it to be gone.
    async fn kill(&self) -> Result<(), StopVmError>;
    /// Kill the VMM if it still runs and remove every socket, pid file and
    /// file the driver created (console log and memory file included).
    async fn cleanup(&self) -> Result<(), CleanupVmError>;
    /// Stop the vCPUs and write memory + device state into `dest_dir`
    /// (created). The VM stays paused; [`Vm::resume`] continues it.
    async fn snapshot(&self, dest_dir: &Path) -> Result<SnapshotInfo, SnapshotVmError>;
}

#[derive(Debug, thiserror::Error)]
pub enum StartVmError {
    #[error("invalid VM spec: {0}")]
    InvalidSpec(String),
    #[error("{what} {path} does not exist or is not a readable file")]
    MissingFile { what: &'static str, path: PathBuf },
    #[error("cannot prepare the VM directory {path}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot spawn {binary}")]
    Spawn {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the VMM exited during start-up ({status}); its stderr: {stderr}")]
    Exited { status: String, stderr: String },
    #[error("the VMM did not open its control socket {path} within {timeout:?}")]
    SocketTimeout { path: PathBuf, timeout: Duration },
    #[error("the VMM refused the configuration: {0}")]
    Configure(String),
    #[error("control channel failed during start-up")]
    Control(#[source] ControlVmError),
}

#[derive(Debug, thiserror::Error)]
pub enum AttachVmError {
    #[error("the record is for driver {record}, not {driver}")]
    WrongDriver {
        record: DriverKind,
        driver: DriverKind,
    },
    #[error("the VMM (pid {pid}) is gone")]
    Gone { pid: i32 },
    #[error("cannot connect to the VMM's control socket {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("control channel failed while attaching")]
    Control(#[source] ControlVmError),
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreVmError {
    #[error(transparent)]
    Unsupported(#[from] UnsupportedError),
    #[error("cannot read the snapshot in {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the snapshot does not fit the VM spec: {0}")]
    Mismatch(String),
    #[error("cannot start the VMM for the restore")]
    Start(#[source] StartVmError),
    #[error("the VMM failed to load the snapshot: {0}")]
    Load(String),
}

/// A failure talking to a VMM's control channel (QMP or the HTTP API).
#[derive(Debug, thiserror::Error)]
pub enum ControlVmError {
    #[error("the VMM is gone")]
    Gone,
    #[error("control socket I/O failed")]
    Io(#[source] std::io::Error),
    #[error("the VMM sent something unexpected: {0}")]
    Protocol(String),
    #[error("the VMM refused {command}: {message}")]
    Refused { command: String, message: String },
    #[error("no answer to {command} within {timeout:?}")]
    Timeout { command: String, timeout: Duration },
    #[error("{0} is not supported by this driver")]
    Unsupported(&'static str),
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectAgentError {
    #[error("this VM has no agent channel")]
    NoChannel,
    #[error("cannot connect to the agent socket {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the VM is paused: a vsock connection cannot be accepted now (and one abandoned while paused can wedge the device)"
    )]
    Paused,
    #[error("the vsock handshake on {path} failed: {reason}")]
    Handshake { path: PathBuf, reason: String },
    #[error(
        "no answer to `CONNECT {port}` on {path} within {timeout:?} (is anything listening on vsock port {port} in the guest?)"
    )]
    HandshakeTimeout {
        path: PathBuf,
        port: u32,
        timeout: Duration,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum StopVmError {
    #[error("cannot signal pid {pid}")]
    Signal {
        pid: i32,
        #[source]
        source: nix::Error,
    },
    #[error("the VMM (pid {pid}) is still alive {waited:?} after SIGKILL")]
    StillAlive { pid: i32, waited: Duration },
}

#[derive(Debug, thiserror::Error)]
pub enum CleanupVmError {
    #[error("cannot stop the VMM")]
    Stop(#[source] StopVmError),
    #[error("cannot remove {path}")]
    Remove {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotVmError {
    #[error(transparent)]
    Unsupported(#[from] UnsupportedError),
    #[error("cannot write the snapshot into {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("control channel failed during the snapshot")]
    Control(#[source] ControlVmError),
    #[error("the VMM failed to write the snapshot: {0}")]
    Failed(String),
}

/// Check a spec before anything is spawned; shared by the drivers.
pub(crate) fn validate_spec(spec: &VmSpec) -> Result<(), StartVmError> {
    if spec.id.is_empty()
        || spec.id.len() > 64
        || !spec
            .id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
    {
        return Err(StartVmError::InvalidSpec(format!(
            "id {:?} must be 1-64 characters of [A-Za-z0-9._-]",
            spec.id
        )));
    }
    if spec.cpus == 0 || spec.cpus > 64 {
        return Err(StartVmError::InvalidSpec(format!(
            "cpus = {} (must be 1-64)",
            spec.cpus
        )));
    }
    if spec.memory_mib < MIN_MEMORY_MIB || spec.memory_mib > 1 << 20 {
        return Err(StartVmError::InvalidSpec(format!(
            "memory_mib = {} (must be {MIN_MEMORY_MIB}-{})",
            spec.memory_mib,
            1 << 20
        )));
    }
    let file = |what: &'static str, path: &Path| {
        if std::fs::File::open(path)
            .and_then(|f| f.metadata())
            .is_ok_and(|m| m.is_file())
        {
            Ok(())
        } else {
            Err(StartVmError::MissingFile {
                what,
                path: path.to_owned(),
            })
        }
    };
    file("kernel", &spec.kernel)?;
    if let Some(initrd) = &spec.initrd {
        file("initrd", initrd)?;
    }
    for disk in &spec.disks {
        file("disk", &disk.path)?;
    }
    if spec.cmdline.contains('\n') || spec.cmdline.len() > 2048 {
        return Err(StartVmError::InvalidSpec(
            "cmdline must be one line of at most 2048 bytes".into(),
        ));
    }
    if let Some(net) = &spec.network
        && !net.is_valid()
    {
        return Err(StartVmError::InvalidSpec(format!(
            "network device: tap {:?} or MAC {:?} is malformed",
            net.tap, net.mac
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(driver: DriverKind, agent_transport: AgentTransport) -> Capabilities {
        Capabilities {
            driver,
            pause: true,
            snapshot: false,
            snapshot_diff: false,
            restore: true,
            fork: false,
            live_migration_precopy: false,
            cow_restore: false,
            virtio_fs: true,
            vsock: true,
            virtio_serial: false,
            network: false,
            agent_transport,
        }
    }

    #[test]
    fn require_names_the_driver_and_the_capability() {
        let c = caps(DriverKind::Qemu, AgentTransport::HybridVsock);
        let err = c
            .require(Capability::SnapshotFull)
            .expect_err("no snapshots");
        assert_eq!(
            err.to_string(),
            "driver qemu (agent channel over vsock) cannot do Full snapshots"
        );
        assert_eq!(err.capability, Capability::SnapshotFull);
        c.require(Capability::Restore).expect("restore");
        let c = caps(DriverKind::Firecracker, AgentTransport::HybridVsock);
        assert_eq!(
            c.require(Capability::VirtioSerial)
                .expect_err("no serial")
                .to_string(),
            "driver firecracker cannot do a virtio-serial agent channel"
        );
        // Every capability maps to its own field.
        let supported: Vec<_> = Capability::ALL
            .iter()
            .filter(|cap| c.supports(**cap))
            .collect();
        assert_eq!(
            supported,
            [
                &Capability::Pause,
                &Capability::Restore,
                &Capability::VirtioFs,
                &Capability::Vsock
            ]
        );
    }
}
