//! QEMU's command line: the runtime files of a VM, how its RAM is given
//! (boot or restore), and the arguments for its machine and devices.

use std::path::{Path, PathBuf};

use super::MEMORY_FILE;
use crate::vhost_vsock::VsockPaths;
use crate::{AGENT_PORT_NAME, Accel, AgentTransport, VmSpec};

/// Where a QEMU VM keeps its runtime files.
#[derive(Debug, Clone)]
pub(super) struct Paths {
    pub qmp: PathBuf,
    pub agent: PathBuf,
    pub pid: PathBuf,
    pub stderr: PathBuf,
    pub memory: PathBuf,
}

impl Paths {
    pub fn new(dir: &Path) -> Self {
        Paths {
            qmp: dir.join("qmp.sock"),
            agent: dir.join("agent.sock"),
            pid: dir.join("qemu.pid"),
            stderr: dir.join("qemu.stderr"),
            memory: dir.join(MEMORY_FILE),
        }
    }
}

/// How the guest RAM is provided and whether the VM boots or loads state.
#[derive(Debug, Clone)]
pub(super) enum Mode {
    /// Cold boot; RAM file created in the VM dir, shared.
    Boot,
    /// Restore from a snapshot's memory file (mapped privately, or copied
    /// into the VM dir first and shared when `own`); wait for
    /// `migrate-incoming`.
    Incoming { memory: PathBuf, own: bool },
}

/// The machine-wide choices of [`qemu_args`].
#[derive(Debug, Clone, Copy)]
pub(super) struct Machine<'a> {
    pub accel: Accel,
    pub firmware: &'a Path,
    pub cpu_model: &'a str,
    pub agent: AgentTransport,
}

/// Escape a value for QEMU's `key=value,…` option syntax.
fn opt(path: &Path) -> String {
    path.display().to_string().replace(',', ",,")
}

/// `-cpu` model used when none is configured.
pub fn default_cpu_model(accel: Accel) -> &'static str {
    match accel {
        Accel::Kvm => "host",
        Accel::Tcg => "max",
    }
}

/// `-cpu` model for KVM on a `kvm_pvm` host: it cannot set
/// IA32_ARCH_CAPABILITIES (MSR 0x10a), which `host` exposes.
pub const PVM_CPU_MODEL: &str = "host,-arch-capabilities";

/// QEMU arguments for a virtio-net device on an existing tap: no helper
/// scripts (Kiln owns the tap), `vhost=off` (these hosts have no
/// `/dev/vhost-net`). The device is `virtio-net-device` (virtio-mmio, the
/// `microvm` machine's bus).
pub fn netdev_args(dev: &crate::NetDevice) -> Vec<String> {
    vec![
        "-netdev".into(),
        format!(
            "tap,id=net0,ifname={},script=no,downscript=no,vhost=off",
            dev.tap
        ),
        "-device".into(),
        format!("virtio-net-device,netdev=net0,mac={}", dev.mac),
    ]
}

/// `-accel`'s value. Under TCG, `KILN_TCG_TB_MIB` sizes the translation
/// buffer (QEMU's default is 1 GiB of address space, filled as code is
/// translated): a density lever, see docs/BENCHMARKS.md.
fn accel_arg(accel: Accel) -> String {
    match (
        accel,
        std::env::var("KILN_TCG_TB_MIB")
            .ok()
            .and_then(|v| v.parse::<u32>().ok()),
    ) {
        (Accel::Tcg, Some(mib)) if mib > 0 => format!("tcg,tb-size={mib}"),
        _ => accel.to_string(),
    }
}

pub(super) fn qemu_args(
    spec: &VmSpec,
    paths: &Paths,
    mode: &Mode,
    machine: Machine<'_>,
) -> Vec<String> {
    let Machine {
        accel,
        firmware,
        cpu_model,
        agent,
    } = machine;
    let (mem_path, share) = match mode {
        Mode::Boot | Mode::Incoming { own: true, .. } => (&paths.memory, "on"),
        Mode::Incoming { memory, own: false } => (memory, "off"),
    };
    let mut cmdline = String::from("console=ttyS0 reboot=t panic=-1");
    if !spec.cmdline.trim().is_empty() {
        cmdline.push(' ');
        cmdline.push_str(spec.cmdline.trim());
    }
    let mut args: Vec<String> = vec![
        "-name".into(),
        format!(
            "kiln-{},process=kiln-{}",
            spec.id.replace(',', ",,"),
            spec.id.replace(',', ",,")
        ),
        "-M".into(),
        "microvm,acpi=off,rtc=on,memory-backend=mem".into(),
        "-accel".into(),
        accel_arg(accel),
        "-cpu".into(),
        cpu_model.into(),
        "-bios".into(),
        firmware.display().to_string(),
        "-m".into(),
        format!("{}M", spec.memory_mib),
        "-object".into(),
        format!(
            "memory-backend-file,id=mem,size={}M,mem-path={},share={share}",
            spec.memory_mib,
            opt(mem_path)
        ),
        "-smp".into(),
        spec.cpus.to_string(),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-display".into(),
        "none".into(),
        "-no-reboot".into(),
        "-serial".into(),
        format!("file:{}", spec.console_log.display()),
        "-kernel".into(),
        spec.kernel.display().to_string(),
        "-append".into(),
        cmdline,
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", opt(&paths.qmp)),
        "-pidfile".into(),
        paths.pid.display().to_string(),
    ];
    if let Some(initrd) = &spec.initrd {
        args.extend(["-initrd".into(), initrd.display().to_string()]);
    }
    for (i, disk) in spec.disks.iter().enumerate() {
        args.extend([
            "-drive".into(),
            format!(
                "id=d{i},file={},format=raw,if=none,read-only={}",
                opt(&disk.path),
                if disk.read_only { "on" } else { "off" }
            ),
            "-device".into(),
            format!("virtio-blk-device,drive=d{i}"),
        ]);
    }
    if let Some(dev) = &spec.network {
        args.extend(netdev_args(dev));
    }
    if spec.agent_channel && agent == AgentTransport::HybridVsock {
        args.extend(crate::vhost_vsock::qemu_args(&VsockPaths::new(&spec.dir)));
    } else if spec.agent_channel {
        args.extend([
            "-device".into(),
            // Two ports (0, reserved for a console, and the agent's): the
            // default of 31 has the guest set up 64 virtqueues at boot,
            // 40–80 ms of every TCG boot (`initcall_debug`, 2026-12-04).
            // Part of the snapshot layout (`kiln_node::snapshot::FORMAT_VERSION`).
            "virtio-serial-device,max_ports=2".into(),
            "-chardev".into(),
            format!(
                "socket,id=agent,path={},server=on,wait=off",
                opt(&paths.agent)
            ),
            "-device".into(),
            format!("virtserialport,chardev=agent,name={AGENT_PORT_NAME}"),
        ]);
    }
    match mode {
        Mode::Boot => args.push("-S".into()),
        Mode::Incoming { .. } => args.extend(["-incoming".into(), "defer".into()]),
    }
    args
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qemu::QemuDriver;
    use crate::{Capability, DiskSpec, VmmDriver};

    fn spec() -> VmSpec {
        VmSpec {
            id: "t1".into(),
            dir: "/run/kiln/vms/t1".into(),
            kernel: "/k/bzImage".into(),
            initrd: Some("/k/initrd".into()),
            cmdline: "quiet".into(),
            cpus: 2,
            memory_mib: 256,
            disks: vec![
                DiskSpec {
                    path: "/d/base,1.ext4".into(),
                    read_only: true,
                },
                DiskSpec {
                    path: "/d/rw.ext4".into(),
                    read_only: false,
                },
            ],
            agent_channel: true,
            console_log: "/run/kiln/vms/t1/console.log".into(),
            network: None,
        }
    }

    #[test]
    fn boot_command_line() {
        let s = spec();
        let args = qemu_args(
            &s,
            &Paths::new(&s.dir),
            &Mode::Boot,
            Machine {
                accel: Accel::Tcg,
                firmware: Path::new("/q.rom"),
                cpu_model: "max",
                agent: AgentTransport::VirtioSerial,
            },
        );
        let joined = args.join(" ");
        for needle in [
            "-M microvm,acpi=off,rtc=on,memory-backend=mem",
            "-accel tcg",
            "-bios /q.rom",
            "memory-backend-file,id=mem,size=256M,mem-path=/run/kiln/vms/t1/memory,share=on",
            "-smp 2",
            "-append console=ttyS0 reboot=t panic=-1 quiet",
            "id=d0,file=/d/base,,1.ext4,format=raw,if=none,read-only=on",
            "id=d1,file=/d/rw.ext4,format=raw,if=none,read-only=off",
            "virtserialport,chardev=agent,name=kiln.agent",
            "-qmp unix:/run/kiln/vms/t1/qmp.sock,server=on,wait=off",
            "-initrd /k/initrd",
            "-no-reboot",
        ] {
            assert!(joined.contains(needle), "{needle} missing from {joined}");
        }
        assert_eq!(args.last().map(String::as_str), Some("-S"));
    }

    #[test]
    fn restore_command_line_maps_memory_privately() {
        let s = spec();
        let args = qemu_args(
            &s,
            &Paths::new(&s.dir),
            &Mode::Incoming {
                memory: "/snap/memory".into(),
                own: false,
            },
            Machine {
                accel: Accel::Kvm,
                firmware: Path::new("/q.rom"),
                cpu_model: "host",
                agent: AgentTransport::VirtioSerial,
            },
        );
        let joined = args.join(" ");
        assert!(
            joined.contains("mem-path=/snap/memory,share=off"),
            "{joined}"
        );
        assert!(joined.ends_with("-incoming defer"), "{joined}");
        assert!(joined.contains("-cpu host"), "{joined}");
        // Its own copy: shared, in the VM's directory.
        let args = qemu_args(
            &s,
            &Paths::new(&s.dir),
            &Mode::Incoming {
                memory: "/snap/memory".into(),
                own: true,
            },
            Machine {
                accel: Accel::Kvm,
                firmware: Path::new("/q.rom"),
                cpu_model: "host",
                agent: AgentTransport::VirtioSerial,
            },
        );
        let joined = args.join(" ");
        assert!(
            joined.contains("mem-path=/run/kiln/vms/t1/memory,share=on"),
            "{joined}"
        );
        assert!(joined.ends_with("-incoming defer"), "{joined}");
    }

    #[test]
    fn vsock_agent_command_line_and_capabilities() {
        let s = spec();
        let args = qemu_args(
            &s,
            &Paths::new(&s.dir),
            &Mode::Boot,
            Machine {
                accel: Accel::Tcg,
                firmware: Path::new("/q.rom"),
                cpu_model: "max",
                agent: AgentTransport::HybridVsock,
            },
        );
        let joined = args.join(" ");
        assert!(
            joined.contains("-device vhost-user-vsock-device,chardev=vsock"),
            "{joined}"
        );
        assert!(!joined.contains("virtio-serial"), "{joined}");
        assert!(joined.contains(",share=on"), "{joined}");

        let driver = QemuDriver::new(
            "/q".into(),
            "/q.rom".into(),
            Accel::Tcg,
            "QEMU emulator version 10.0.2",
        )
        .expect("driver");
        let err = driver
            .clone()
            .with_agent_transport(AgentTransport::HybridVsock)
            .expect_err("no backend");
        assert_eq!(
            err.to_string(),
            "driver qemu cannot do a vsock agent channel"
        );
        let vsock = driver
            .with_vsock_backend("/bin/vhost-device-vsock".into())
            .with_agent_transport(AgentTransport::HybridVsock)
            .expect("backend configured");
        let caps = vsock.capabilities();
        assert_eq!(caps.agent_transport, AgentTransport::HybridVsock);
        for capability in [
            Capability::SnapshotFull,
            Capability::Restore,
            Capability::Fork,
            Capability::LiveMigration,
        ] {
            assert_eq!(
                caps.require(capability).expect_err("refused").to_string(),
                format!("driver qemu (agent channel over vsock) cannot do {capability}")
            );
        }
        caps.require(Capability::Vsock).expect("vsock");
        caps.require(Capability::VirtioSerial).expect("serial");
    }
}
