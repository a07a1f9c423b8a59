//! What this host offers (KVM kind, VMM binaries and their versions) and the
//! choice of driver. [`detect`] does the I/O; [`select`] is a pure decision
//! with a human-readable reason, so it can be tested and logged.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::firecracker::FirecrackerDriver;
use crate::qemu::QemuDriver;
use crate::{AgentTransport, Capability, DriverKind, UnsupportedError, VmmDriver};

/// Oldest QEMU accepted: Kiln relies on its microvm machine and migration
/// formats (`file:` migration, `x-ignore-shared`).
pub const MIN_QEMU: (u32, u32) = (10, 0);
/// Default microvm firmware (Debian's QEMU 10 lacks microvm's default).
pub const DEFAULT_QBOOT: &str = "/usr/share/qemu/qboot.rom";

/// The accelerator a QEMU guest runs under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

/// What `/dev/kvm` is on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KvmKind {
    /// No usable `/dev/kvm`.
    Absent,
    /// Hardware-assisted KVM (kvm_intel / kvm_amd): boots Linux guests.
    Hardware,
    /// `kvm_pvm`, a software KVM: boots only tiny bare-metal guests.
    Pvm,
}

/// What the VMs to be run boot: Linux (what Kiln runs), or tiny bare-metal
/// guests (the conformance suite's counter guest), which a software KVM
/// (`kvm_pvm`) can run under Firecracker too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GuestKind {
    #[default]
    Linux,
    BareMetal,
}

/// Which driver the operator asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DriverChoice {
    #[default]
    Auto,
    Qemu,
    Firecracker,
}

/// Where the VMM binaries are; `None` means the default (from the
/// environment, then `PATH`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriverConfig {
    /// QEMU binary; default `KILN_QEMU_BIN`, then `qemu-system-x86_64`.
    pub qemu_bin: Option<PathBuf>,
    /// microvm firmware; default [`DEFAULT_QBOOT`].
    pub qemu_firmware: Option<PathBuf>,
    /// Firecracker binary; default `KILN_FIRECRACKER_BIN`. Firecracker is
    /// never looked up on `PATH`: it must be configured on purpose.
    pub firecracker_bin: Option<PathBuf>,
    /// Force the QEMU accelerator instead of choosing from the KVM kind.
    pub accel: Option<Accel>,
    /// Where to remember each binary's `--version` while the binary is
    /// unchanged (`crate::memo`); `None` runs it every time.
    pub memo: Option<PathBuf>,
    /// `vhost-device-vsock`, which gives QEMU vsock; default
    /// [`crate::find_vhost_vsock`].
    pub vhost_vsock_bin: Option<PathBuf>,
    /// How to carry the agent channel; default the VMM's usual one
    /// (virtio-serial on QEMU, vsock on Firecracker).
    pub agent_transport: Option<AgentTransport>,
}

/// A VMM binary and the version it reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Binary {
    pub path: PathBuf,
    /// First line of `--version`, or why it could not be run.
    pub version: Result<String, String>,
}

/// The facts [`select`] decides from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostInfo {
    pub kvm: KvmKind,
    pub qemu: Binary,
    pub qemu_firmware: PathBuf,
    pub firecracker: Option<Binary>,
    pub accel_override: Option<Accel>,
    /// `vhost-device-vsock`, if found.
    #[serde(default)]
    pub vhost_vsock: Option<PathBuf>,
    /// The configured agent transport, if any.
    #[serde(default)]
    pub agent_transport: Option<AgentTransport>,
}

/// The outcome of [`select`]: which driver, which accelerator, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Selection {
    pub kind: DriverKind,
    pub accel: Accel,
    pub binary: PathBuf,
    pub version: String,
    /// Whether this VMM can boot Linux guests here (Firecracker on a
    /// software KVM runs bare-metal guests only).
    pub linux_guests: bool,
    /// How the agent channel is carried.
    pub agent_transport: AgentTransport,
    /// A sentence for logs and `/v1/nodes`.
    pub reason: String,
}

#[derive(Debug, thiserror::Error)]
pub enum SelectDriverError {
    #[error("QEMU ({path}) cannot be run: {reason}")]
    QemuMissing { path: PathBuf, reason: String },
    #[error(
        "QEMU {version} is too old: Kiln needs QEMU {}.{} or newer for its microvm and migration formats",
        MIN_QEMU.0,
        MIN_QEMU.1
    )]
    QemuTooOld { version: String },
    #[error("cannot parse the QEMU version from {0:?}")]
    QemuVersion(String),
    #[error("Firecracker was requested but no binary is configured (set KILN_FIRECRACKER_BIN)")]
    FirecrackerNotConfigured,
    #[error("Firecracker ({path}) cannot be run: {reason}")]
    FirecrackerMissing { path: PathBuf, reason: String },
    #[error("Firecracker needs hardware KVM for Linux guests, and this host's /dev/kvm is {0}")]
    FirecrackerNeedsKvm(&'static str),
    #[error("Firecracker needs /dev/kvm, which is absent")]
    FirecrackerNoKvm,
    #[error(transparent)]
    Unsupported(#[from] UnsupportedError),
    #[error("KVM was requested but /dev/kvm is absent")]
    NoKvm,
}

/// Probe the host: KVM kind, binaries and versions. Blocking (runs
/// `--version`); call it once at start-up.
pub fn detect(config: &DriverConfig) -> HostInfo {
    let qemu_path = config
        .qemu_bin
        .clone()
        .or_else(|| std::env::var_os("KILN_QEMU_BIN").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("qemu-system-x86_64"));
    let firecracker = config
        .firecracker_bin
        .clone()
        .or_else(|| {
            std::env::var_os("KILN_FIRECRACKER_BIN")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        })
        .map(|path| Binary {
            version: version_of(&path, config.memo.as_deref()),
            path,
        });
    HostInfo {
        kvm: detect_kvm(),
        qemu: Binary {
            version: version_of(&qemu_path, config.memo.as_deref()),
            path: qemu_path,
        },
        qemu_firmware: config
            .qemu_firmware
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_QBOOT)),
        firecracker,
        accel_override: config.accel,
        vhost_vsock: config
            .vhost_vsock_bin
            .clone()
            .or_else(crate::vhost_vsock::find_binary),
        agent_transport: config.agent_transport,
    }
}

fn detect_kvm() -> KvmKind {
    if !Path::new("/dev/kvm").exists() {
        return KvmKind::Absent;
    }
    if Path::new("/sys/module/kvm_pvm").exists() {
        return KvmKind::Pvm;
    }
    if let Ok(modules) = std::fs::read_to_string("/proc/modules")
        && modules.lines().any(|l| l.starts_with("kvm_pvm "))
    {
        return KvmKind::Pvm;
    }
    KvmKind::Hardware
}

/// The first line of `binary --version`, remembered in `memo` while the
/// binary is unchanged (running QEMU's costs ~30 ms).
fn version_of(binary: &Path, memo: Option<&Path>) -> Result<String, String> {
    match (memo, resolve(binary)) {
        (Some(dir), Some(path)) => {
            crate::memo::Memo::at(dir).get_or(&path, "version", || run_version(&path))
        }
        _ => run_version(binary),
    }
}

/// `binary` as `Command` would find it (a bare name is looked up on PATH).
fn resolve(binary: &Path) -> Option<PathBuf> {
    if binary.components().count() > 1 {
        return Some(binary.to_path_buf());
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(binary))
        .find(|p| p.is_file())
}

fn run_version(binary: &Path) -> Result<String, String> {
    match std::process::Command::new(binary).arg("--version").output() {
        Ok(out) if out.status.success() => Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or_default()
            .trim()
            .to_owned()),
        Ok(out) => Err(format!(
            "--version failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Err(e.to_string()),
    }
}

/// `(major, minor, micro)` from "QEMU emulator version 10.0.2 (Debian …)".
pub fn parse_qemu_version(line: &str) -> Option<(u32, u32, u32)> {
    let rest = line.split("version").nth(1)?.split_whitespace().next()?;
    let mut parts = rest.split('.').map(|p| p.parse::<u32>().ok());
    Some((
        parts.next()??,
        parts.next()??,
        parts.next().flatten().unwrap_or(0),
    ))
}

/// Check a QEMU version line against [`MIN_QEMU`].
pub fn check_qemu_version(line: &str) -> Result<(u32, u32, u32), SelectDriverError> {
    let version =
        parse_qemu_version(line).ok_or_else(|| SelectDriverError::QemuVersion(line.to_owned()))?;
    if (version.0, version.1) < MIN_QEMU {
        return Err(SelectDriverError::QemuTooOld {
            version: format!("{}.{}.{}", version.0, version.1, version.2),
        });
    }
    Ok(version)
}

fn kvm_words(kvm: KvmKind) -> &'static str {
    match kvm {
        KvmKind::Absent => "absent",
        KvmKind::Hardware => "hardware KVM",
        KvmKind::Pvm => "kvm_pvm, a software KVM that cannot boot Linux guests",
    }
}

/// Decide which driver runs Linux guests, from the host facts alone.
///
/// `Auto`: Firecracker if its binary is configured and KVM is hardware KVM,
/// else QEMU with KVM if KVM can boot Linux, else QEMU with TCG.
pub fn select(choice: DriverChoice, host: &HostInfo) -> Result<Selection, SelectDriverError> {
    select_for(choice, host, GuestKind::Linux)
}

/// [`select`] for guests of `kind`. For bare-metal guests an explicit
/// `Firecracker` choice is accepted on a software KVM too (it runs them
/// there), and the selection says it cannot boot Linux. `Auto` never
/// picks Firecracker on a software KVM.
pub fn select_for(
    choice: DriverChoice,
    host: &HostInfo,
    guests: GuestKind,
) -> Result<Selection, SelectDriverError> {
    let selection = select_vmm(choice, host, guests)?;
    let transport = host.agent_transport.unwrap_or(match selection.kind {
        DriverKind::Qemu => AgentTransport::VirtioSerial,
        DriverKind::Firecracker => AgentTransport::HybridVsock,
    });
    let unsupported = |capability| UnsupportedError {
        driver: selection.kind.to_string(),
        capability,
    };
    match (selection.kind, transport) {
        (DriverKind::Firecracker, AgentTransport::VirtioSerial) => {
            return Err(unsupported(Capability::VirtioSerial).into());
        }
        (DriverKind::Qemu, AgentTransport::HybridVsock) if host.vhost_vsock.is_none() => {
            return Err(unsupported(Capability::Vsock).into());
        }
        _ => {}
    }
    let reason = if transport == AgentTransport::HybridVsock && selection.kind == DriverKind::Qemu {
        format!(
            "{}; agent channel over vsock ({}): no snapshots, restores or migration",
            selection.reason,
            crate::vhost_vsock::BINARY
        )
    } else {
        selection.reason
    };
    Ok(Selection {
        agent_transport: transport,
        reason,
        ..selection
    })
}

fn select_vmm(
    choice: DriverChoice,
    host: &HostInfo,
    guests: GuestKind,
) -> Result<Selection, SelectDriverError> {
    let firecracker_ok = match &host.firecracker {
        Some(Binary {
            path,
            version: Ok(version),
        }) => Some((path, version)),
        _ => None,
    };
    match choice {
        DriverChoice::Firecracker => {
            let fc = host
                .firecracker
                .as_ref()
                .ok_or(SelectDriverError::FirecrackerNotConfigured)?;
            let version =
                fc.version
                    .clone()
                    .map_err(|reason| SelectDriverError::FirecrackerMissing {
                        path: fc.path.clone(),
                        reason,
                    })?;
            let (linux_guests, reason) = match (host.kvm, guests) {
                (KvmKind::Absent, _) => return Err(SelectDriverError::FirecrackerNoKvm),
                (KvmKind::Hardware, _) => (
                    true,
                    "Firecracker was requested and /dev/kvm is hardware KVM: Linux and bare-metal guests".to_owned(),
                ),
                (KvmKind::Pvm, GuestKind::Linux) => {
                    return Err(SelectDriverError::FirecrackerNeedsKvm(kvm_words(host.kvm)));
                }
                (KvmKind::Pvm, GuestKind::BareMetal) => (
                    false,
                    format!(
                        "Firecracker was requested for bare-metal guests; /dev/kvm is {}: bare-metal guests only, no Linux",
                        kvm_words(host.kvm)
                    ),
                ),
            };
            Ok(Selection {
                kind: DriverKind::Firecracker,
                accel: Accel::Kvm,
                binary: fc.path.clone(),
                version,
                linux_guests,
                agent_transport: AgentTransport::HybridVsock,
                reason,
            })
        }
        DriverChoice::Auto if host.kvm == KvmKind::Hardware && firecracker_ok.is_some() => {
            let (path, version) = firecracker_ok.expect("checked in the guard");
            Ok(Selection {
                kind: DriverKind::Firecracker,
                accel: Accel::Kvm,
                binary: path.clone(),
                version: version.clone(),
                linux_guests: true,
                agent_transport: AgentTransport::HybridVsock,
                reason: format!(
                    "Firecracker is configured ({}) and /dev/kvm is hardware KVM: using Firecracker",
                    path.display()
                ),
            })
        }
        DriverChoice::Auto | DriverChoice::Qemu => {
            let version =
                host.qemu
                    .version
                    .clone()
                    .map_err(|reason| SelectDriverError::QemuMissing {
                        path: host.qemu.path.clone(),
                        reason,
                    })?;
            check_qemu_version(&version)?;
            let how = if choice == DriverChoice::Qemu {
                "QEMU was requested"
            } else if host.firecracker.is_some() {
                "Firecracker is configured but needs hardware KVM"
            } else {
                "Firecracker is not configured"
            };
            let (accel, reason) = match (host.accel_override, host.kvm) {
                (Some(Accel::Kvm), KvmKind::Absent) => return Err(SelectDriverError::NoKvm),
                (Some(accel), kvm) => (
                    accel,
                    format!(
                        "{how}; accelerator {accel} forced by configuration (/dev/kvm is {}): using QEMU with {}",
                        kvm_words(kvm),
                        accel.to_string().to_uppercase()
                    ),
                ),
                (None, KvmKind::Hardware) => (
                    Accel::Kvm,
                    format!("{how}; /dev/kvm is hardware KVM: using QEMU with KVM"),
                ),
                (None, kvm) => (
                    Accel::Tcg,
                    format!("{how}; /dev/kvm is {}: using QEMU with TCG", kvm_words(kvm)),
                ),
            };
            Ok(Selection {
                kind: DriverKind::Qemu,
                accel,
                binary: host.qemu.path.clone(),
                version,
                // TCG boots Linux anywhere; KVM on kvm_pvm only when forced.
                linux_guests: !(accel == Accel::Kvm && host.kvm == KvmKind::Pvm),
                agent_transport: AgentTransport::VirtioSerial,
                reason,
            })
        }
    }
}

impl Selection {
    /// Build the selected driver.
    pub fn driver(&self, host: &HostInfo) -> Result<Arc<dyn VmmDriver>, SelectDriverError> {
        Ok(match self.kind {
            DriverKind::Qemu => {
                let driver = QemuDriver::new(
                    self.binary.clone(),
                    host.qemu_firmware.clone(),
                    self.accel,
                    &self.version,
                )?;
                let driver = if self.accel == Accel::Kvm && host.kvm == KvmKind::Pvm {
                    driver.with_cpu_model(crate::qemu::PVM_CPU_MODEL)
                } else {
                    driver
                };
                let driver = match &host.vhost_vsock {
                    Some(binary) => driver.with_vsock_backend(binary.clone()),
                    None => driver,
                };
                Arc::new(driver.with_agent_transport(self.agent_transport)?)
            }
            DriverKind::Firecracker => Arc::new(FirecrackerDriver::new(
                self.binary.clone(),
                self.version.clone(),
            )),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(kvm: KvmKind, fc: bool, qemu: &str) -> HostInfo {
        HostInfo {
            kvm,
            qemu: Binary {
                path: "qemu-system-x86_64".into(),
                version: Ok(qemu.into()),
            },
            qemu_firmware: DEFAULT_QBOOT.into(),
            firecracker: fc.then(|| Binary {
                path: "/opt/fc".into(),
                version: Ok("Firecracker v1.12.0".into()),
            }),
            accel_override: None,
            vhost_vsock: None,
            agent_transport: None,
        }
    }
    const Q10: &str = "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)";

    #[test]
    fn auto_prefers_firecracker_only_with_hardware_kvm() {
        let s = select(DriverChoice::Auto, &host(KvmKind::Hardware, true, Q10)).expect("ok");
        assert_eq!(s.kind, DriverKind::Firecracker);
        let s = select(DriverChoice::Auto, &host(KvmKind::Pvm, true, Q10)).expect("ok");
        assert_eq!((s.kind, s.accel), (DriverKind::Qemu, Accel::Tcg));
        assert!(s.reason.contains("kvm_pvm"), "{}", s.reason);
        assert!(s.reason.contains("using QEMU with TCG"), "{}", s.reason);
        let s = select(DriverChoice::Auto, &host(KvmKind::Hardware, false, Q10)).expect("ok");
        assert_eq!((s.kind, s.accel), (DriverKind::Qemu, Accel::Kvm));
        let s = select(DriverChoice::Auto, &host(KvmKind::Absent, false, Q10)).expect("ok");
        assert_eq!(s.accel, Accel::Tcg);
    }

    #[test]
    fn explicit_choices_and_refusals() {
        assert!(matches!(
            select(
                DriverChoice::Firecracker,
                &host(KvmKind::Hardware, false, Q10)
            ),
            Err(SelectDriverError::FirecrackerNotConfigured)
        ));
        assert!(matches!(
            select(DriverChoice::Firecracker, &host(KvmKind::Pvm, true, Q10)),
            Err(SelectDriverError::FirecrackerNeedsKvm(_))
        ));
        assert!(matches!(
            select_for(
                DriverChoice::Firecracker,
                &host(KvmKind::Absent, true, Q10),
                GuestKind::BareMetal
            ),
            Err(SelectDriverError::FirecrackerNoKvm)
        ));
        let err = select(
            DriverChoice::Qemu,
            &host(KvmKind::Hardware, false, "QEMU emulator version 7.2.15"),
        )
        .expect_err("too old");
        assert!(err.to_string().contains("7.2.15"), "{err}");
        let mut h = host(KvmKind::Pvm, false, Q10);
        h.accel_override = Some(Accel::Kvm);
        let s = select(DriverChoice::Qemu, &h).expect("forced");
        assert_eq!(s.accel, Accel::Kvm);
    }

    /// The conformance suite runs Firecracker on a software KVM with the
    /// bare-metal guest, and the selection says Linux is not possible.
    #[test]
    fn firecracker_runs_bare_metal_guests_on_a_software_kvm() {
        let s = select_for(
            DriverChoice::Firecracker,
            &host(KvmKind::Pvm, true, Q10),
            GuestKind::BareMetal,
        )
        .expect("bare-metal guests on kvm_pvm");
        assert_eq!(s.kind, DriverKind::Firecracker);
        assert!(!s.linux_guests);
        assert!(s.reason.contains("bare-metal guests only"), "{}", s.reason);
        let s = select_for(
            DriverChoice::Firecracker,
            &host(KvmKind::Hardware, true, Q10),
            GuestKind::BareMetal,
        )
        .expect("hardware KVM");
        assert!(s.linux_guests);
        // Auto still never picks Firecracker on a software KVM.
        let s = select_for(
            DriverChoice::Auto,
            &host(KvmKind::Pvm, true, Q10),
            GuestKind::BareMetal,
        )
        .expect("auto");
        assert_eq!(s.kind, DriverKind::Qemu);
    }

    #[test]
    fn agent_transport_choices() {
        let mut h = host(KvmKind::Pvm, false, Q10);
        h.agent_transport = Some(AgentTransport::HybridVsock);
        let err = select(DriverChoice::Qemu, &h).expect_err("no backend");
        assert_eq!(
            err.to_string(),
            "driver qemu cannot do a vsock agent channel"
        );
        h.vhost_vsock = Some("/bin/vhost-device-vsock".into());
        let s = select(DriverChoice::Qemu, &h).expect("vsock");
        assert_eq!(s.agent_transport, AgentTransport::HybridVsock);
        assert!(s.reason.contains("vsock"), "{}", s.reason);
        let mut h = host(KvmKind::Hardware, true, Q10);
        h.agent_transport = Some(AgentTransport::VirtioSerial);
        let err = select(DriverChoice::Firecracker, &h).expect_err("serial");
        assert_eq!(
            err.to_string(),
            "driver firecracker cannot do a virtio-serial agent channel"
        );
    }

    #[test]
    fn qemu_versions() {
        assert_eq!(parse_qemu_version(Q10), Some((10, 0, 2)));
        assert_eq!(
            parse_qemu_version("QEMU emulator version 9.2"),
            Some((9, 2, 0))
        );
        assert_eq!(parse_qemu_version("nonsense"), None);
    }

    #[test]
    fn detect_reports_this_host() {
        let info = detect(&DriverConfig::default());
        // Whatever the host, detection must not panic and must name QEMU.
        assert!(!info.qemu.path.as_os_str().is_empty());
    }
}
