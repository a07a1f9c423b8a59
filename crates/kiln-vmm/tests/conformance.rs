//! The driver conformance suite against real VMMs: QEMU/TCG with the
//! bare-metal counter guest and with the Linux guest kernel, and Firecracker
//! when `KILN_FIRECRACKER_BIN` is set.

use std::path::PathBuf;
use std::sync::Arc;

use kiln_vmm::conformance::{self, Guest, VmmReaper};
use kiln_vmm::qemu::QemuDriver;
use kiln_vmm::{Accel, AgentTransport, DriverChoice, DriverConfig, GuestKind, VmmDriver};

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "kiln_vmm=info".into()),
        )
        .with_test_writer()
        .try_init();
}

fn qemu_tcg() -> Arc<dyn VmmDriver> {
    Arc::new(QemuDriver::detect(Accel::Tcg).expect("QEMU 10 is installed (scripts/setup-host.sh)"))
}

fn kernel_dir() -> PathBuf {
    std::env::var_os("KILN_KERNEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/kiln/kernel/current")
        })
}

fn print_report(name: &str, report: &conformance::Report) {
    eprintln!(
        "{name}: passed {:?}; start() returned after {:?}, first serial byte after {:?}, stop took {:?}, snapshot downtime {:?}, restore → first byte {:?}; fork of {} at once: restore() returned after {:?}, first counter line after {:?}; vsock connect with no listener failed after {:?}",
        report.passed,
        report.start_returned,
        report.first_serial_byte,
        report.stop,
        report.snapshot_downtime,
        report.restore_first_byte,
        report.fork_restore.len(),
        report.fork_restore,
        report.fork_first_line,
        report.agent_no_listener
    );
    let each: Vec<String> = report
        .check_times
        .iter()
        .map(|(check, took)| format!("{check} {:.0} ms", took.as_secs_f64() * 1000.0))
        .collect();
    eprintln!("{name}: each check: {}", each.join(", "));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_tcg_baremetal_conformance() {
    init_tracing();
    let tmp = tempfile::tempdir().expect("tempdir");
    let _reaper = VmmReaper::new(tmp.path());
    let elf = kiln_vmm::testguest::build(&tmp.path().join("guest")).expect("build the guest");
    let guest = Guest::baremetal(elf);
    let driver = qemu_tcg();
    let report = conformance::run(driver.as_ref(), &guest, &tmp.path().join("vms"))
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    print_report("qemu/tcg baremetal", &report);
    assert!(report.passed.contains(&"snapshot_restore"));
    assert!(report.passed.contains(&"fork"));
    assert!(report.passed.contains(&"snapshot_of_restored"));
    assert_eq!(report.fork_restore.len(), conformance::FORK_CLONES);
    assert_eq!(report.fork_first_line.len(), conformance::FORK_CLONES);
}

/// QEMU with KVM and the bare-metal guest: on hardware KVM, and also on
/// `kvm_pvm` hosts, whose software KVM runs this guest (not Linux).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_kvm_baremetal_conformance() {
    init_tracing();
    let host = kiln_vmm::detect(&DriverConfig::default());
    if host.kvm == kiln_vmm::KvmKind::Absent {
        eprintln!("SKIPPED: QEMU/KVM conformance: /dev/kvm is absent");
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let _reaper = VmmReaper::new(tmp.path());
    let elf = kiln_vmm::testguest::build(&tmp.path().join("guest")).expect("build the guest");
    let driver: Arc<dyn VmmDriver> =
        Arc::new(QemuDriver::detect(Accel::Kvm).expect("QEMU 10 is installed"));
    let report = conformance::run(
        driver.as_ref(),
        &Guest::baremetal(elf),
        &tmp.path().join("vms"),
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
    print_report("qemu/kvm baremetal", &report);
    assert!(report.passed.contains(&"fork"));
    assert!(report.passed.contains(&"snapshot_of_restored"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_tcg_linux_conformance() {
    init_tracing();
    let kernel = kernel_dir().join("bzImage");
    assert!(
        kernel.is_file(),
        "{} is missing: run scripts/build-kernel.sh",
        kernel.display()
    );
    let initramfs = PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
        .join(".cache/kiln/initramfs/current/initramfs.img");
    let tmp = tempfile::tempdir().expect("tempdir");
    let _reaper = VmmReaper::new(tmp.path());
    let guest = Guest::linux(kernel, initramfs.is_file().then_some(initramfs));
    let driver = qemu_tcg();
    let report = conformance::run(driver.as_ref(), &guest, &tmp.path().join("vms"))
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    print_report("qemu/tcg linux", &report);
}

/// QEMU with the agent channel over vsock (`vhost-device-vsock`): the
/// lifecycle, and `connect_agent()` failing within its deadline when nothing
/// in the guest listens; the capability table turns the snapshot checks off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_tcg_vsock_baremetal_conformance() {
    init_tracing();
    let backend = kiln_vmm::find_vhost_vsock()
        .expect("vhost-device-vsock is installed (scripts/setup-host.sh)");
    let tmp = tempfile::tempdir().expect("tempdir");
    let _reaper = VmmReaper::new(tmp.path());
    let elf = kiln_vmm::testguest::build(&tmp.path().join("guest")).expect("build the guest");
    let driver = QemuDriver::detect(Accel::Tcg)
        .expect("QEMU 10")
        .with_vsock_backend(backend)
        .with_agent_transport(AgentTransport::HybridVsock)
        .expect("vsock");
    let report = conformance::run(&driver, &Guest::baremetal(elf), &tmp.path().join("vms"))
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    print_report("qemu/tcg vsock baremetal", &report);
    assert!(report.passed.contains(&"agent_channel_no_listener"));
    assert!(!report.passed.contains(&"snapshot_restore"));
    assert!(conformance::processes_mentioning(&tmp.path().display().to_string()).is_empty());
}

/// Firecracker, whenever `KILN_FIRECRACKER_BIN` names a binary: the whole
/// suite with the bare-metal guest (on hardware KVM and on a software KVM,
/// which runs it), and with the Linux kernel too where KVM is hardware KVM.
/// Without the variable the test says loudly that it did not run, and
/// fails if `KILN_REQUIRE_FIRECRACKER=1` (so a run meant to prove
/// Firecracker cannot pass by skipping).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firecracker_conformance() {
    init_tracing();
    let Some(bin) = std::env::var_os("KILN_FIRECRACKER_BIN").filter(|v| !v.is_empty()) else {
        eprintln!(
            "\n*** SKIPPED: Firecracker conformance did NOT run: KILN_FIRECRACKER_BIN is not set. \
             Nothing about the Firecracker driver was checked. See docs/vmm-drivers.md to build one. ***\n"
        );
        assert!(
            std::env::var("KILN_REQUIRE_FIRECRACKER").as_deref() != Ok("1"),
            "KILN_REQUIRE_FIRECRACKER=1 but KILN_FIRECRACKER_BIN is not set"
        );
        return;
    };
    let host = kiln_vmm::detect(&DriverConfig::default());
    let selection = kiln_vmm::select_for(DriverChoice::Firecracker, &host, GuestKind::BareMetal)
        .unwrap_or_else(|e| {
            panic!(
                "KILN_FIRECRACKER_BIN={} is set but Firecracker cannot run: {e:#}",
                PathBuf::from(&bin).display()
            )
        });
    eprintln!(
        "firecracker: {} at {}; /dev/kvm: {:?}; {}",
        selection.version,
        selection.binary.display(),
        host.kvm,
        selection.reason
    );
    let driver = selection.driver(&host).expect("driver");
    let tmp = tempfile::tempdir().expect("tempdir");
    let _reaper = VmmReaper::new(tmp.path());
    let elf = kiln_vmm::testguest::build(&tmp.path().join("guest")).expect("build the guest");
    let report = conformance::run(
        driver.as_ref(),
        &Guest::baremetal(elf),
        &tmp.path().join("vms"),
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
    print_report("firecracker baremetal", &report);
    for check in [
        "boot",
        "pause",
        "resume",
        "attach",
        "agent_channel_no_listener",
        "stop",
        "cleanup",
        "bad_inputs",
        "snapshot_restore",
        "fork",
        "snapshot_of_restored",
    ] {
        assert!(report.passed.contains(&check), "{check} did not run");
    }
    firecracker_specifics(driver.as_ref(), &tmp.path().join("guest"), tmp.path()).await;
    let vmlinux = kernel_dir().join("vmlinux");
    if !selection.linux_guests {
        eprintln!(
            "*** firecracker linux: NOT RUN: /dev/kvm is {:?}, which cannot boot Linux under Firecracker ({}) ***",
            host.kvm, selection.reason
        );
    } else if !vmlinux.is_file() {
        panic!(
            "hardware KVM but no {}: run scripts/build-kernel.sh",
            vmlinux.display()
        );
    } else {
        let report = conformance::run(
            driver.as_ref(),
            &Guest::linux(vmlinux, None),
            &tmp.path().join("linux"),
        )
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
        print_report("firecracker linux", &report);
    }
}

/// Boot, restore and fork timings of QEMU (TCG, and KVM where /dev/kvm
/// exists) beside Firecracker's when `KILN_FIRECRACKER_BIN` is set, in one
/// run, as the table `docs/vmm-drivers.md` records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_drivers_side_by_side() {
    init_tracing();
    const ROUNDS: usize = 3;
    let tmp = tempfile::tempdir().expect("tempdir");
    let _reaper = VmmReaper::new(tmp.path());
    let elf = kiln_vmm::testguest::build(&tmp.path().join("guest")).expect("build the guest");
    let host = kiln_vmm::detect(&DriverConfig::default());
    let mut drivers: Vec<Arc<dyn VmmDriver>> = vec![qemu_tcg()];
    if host.kvm != kiln_vmm::KvmKind::Absent {
        drivers.push(Arc::new(QemuDriver::detect(Accel::Kvm).expect("QEMU 10")));
    }
    match kiln_vmm::select_for(DriverChoice::Firecracker, &host, GuestKind::BareMetal) {
        Ok(selection) => drivers.push(selection.driver(&host).expect("driver")),
        Err(e) => eprintln!("*** bench: Firecracker not measured: {e} ***"),
    }
    let mut reports = Vec::new();
    for (i, driver) in drivers.iter().enumerate() {
        let report = kiln_vmm::bench::measure(
            driver.as_ref(),
            &elf,
            &tmp.path().join(format!("d{i}")),
            ROUNDS,
        )
        .await
        .unwrap_or_else(|e| panic!("{}: {e:#}", driver.kind()));
        for series in [
            &report.boot,
            &report.restore,
            &report.fork,
            &report.snapshot_downtime,
        ] {
            assert_eq!(series.len(), ROUNDS);
        }
        reports.push(report);
    }
    eprintln!("{}", kiln_vmm::bench::table(&reports));
    assert!(conformance::processes_mentioning(&tmp.path().display().to_string()).is_empty());
}

/// What only a real Firecracker shows: its own log goes to `fc.log` (not
/// to the console, which is its stdout), a snapshot load sends no
/// deprecated field, and a handle re-attached from the record (whose
/// version comes from `GET /`) records the same version in its snapshots
/// as the driver (`--version`).
async fn firecracker_specifics(
    driver: &dyn VmmDriver,
    guest_dir: &std::path::Path,
    tmp: &std::path::Path,
) {
    let elf = kiln_vmm::testguest::build(guest_dir).expect("guest");
    let spec = |name: &str| kiln_vmm::VmSpec {
        id: format!("fc-{name}"),
        dir: tmp.join(name),
        kernel: elf.clone(),
        initrd: None,
        cmdline: String::new(),
        cpus: 1,
        memory_mib: 32,
        disks: vec![],
        agent_channel: true,
        console_log: tmp.join(name).join("console.log"),
        network: None,
    };
    let counted = |spec: &kiln_vmm::VmSpec, n: usize| {
        let text = std::fs::read_to_string(&spec.console_log).unwrap_or_default();
        kiln_vmm::testguest::counters(&text).len() >= n
    };
    let wait = |spec: kiln_vmm::VmSpec, n: usize| async move {
        for _ in 0..1000 {
            if counted(&spec, n) {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("{} did not count to {n}", spec.id);
    };
    let source = spec("src");
    let vm = driver.start(&source).await.expect("start");
    wait(source.clone(), 3).await;
    let snap = tmp.join("fc-snap");
    vm.snapshot(&snap).await.expect("snapshot");
    vm.cleanup().await.expect("cleanup");
    let restored = spec("restored");
    let vm = driver.restore(&snap, &restored).await.expect("restore");
    wait(restored.clone(), 2).await;
    for (what, spec) in [("booted", &source), ("restored", &restored)] {
        let console = std::fs::read_to_string(&spec.console_log).unwrap_or_default();
        assert!(
            console.is_empty() || console.starts_with("kiln-counter "),
            "the {what} VM's console does not start with the guest's output: {:?}",
            &console[..console.len().min(200)]
        );
        assert!(
            !console.contains("Firecracker"),
            "{what}: Firecracker wrote to the console"
        );
    }
    let log = std::fs::read_to_string(restored.dir.join("fc.log")).expect("fc.log");
    assert!(log.contains("Running Firecracker"), "fc.log: {log}");
    assert!(
        !log.to_ascii_lowercase().contains("deprecated"),
        "the load used a deprecated field: {log}"
    );
    // The version through a re-attached handle.
    let record = vm.record();
    drop(vm);
    let vm = driver.attach(&record).await.expect("attach");
    let snap2 = tmp.join("fc-snap2");
    vm.snapshot(&snap2)
        .await
        .expect("snapshot through the re-attached handle");
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(snap2.join("snapshot.json")).expect("meta"))
            .expect("json");
    assert_eq!(
        meta["firecracker_version"].as_str(),
        Some(driver.info().version.as_str()),
        "the re-attached handle spells the version differently"
    );
    vm.cleanup().await.expect("cleanup");
    eprintln!(
        "firecracker specifics: console holds only guest output, fc.log has Firecracker's log and no deprecation, version {:?} through attach",
        driver.info().version
    );
}

/// Helper run in a child process by `vmm_outlives_the_process_that_started_it`:
/// starts a VM, writes its record, and exits without stopping it.
#[tokio::test]
#[ignore = "helper: run by vmm_outlives_the_process_that_started_it"]
async fn helper_start_vm_and_exit() {
    let (Some(dir), Some(elf)) = (
        std::env::var_os("KILN_VMM_HELPER_DIR"),
        std::env::var_os("KILN_VMM_HELPER_ELF"),
    ) else {
        return;
    };
    let dir = PathBuf::from(dir);
    let guest = Guest::baremetal(PathBuf::from(elf));
    let spec = kiln_vmm::VmSpec {
        id: "outlives".into(),
        dir: dir.join("vm"),
        kernel: guest.kernel.clone(),
        initrd: None,
        cmdline: String::new(),
        cpus: 1,
        memory_mib: guest.memory_mib,
        disks: vec![],
        agent_channel: true,
        console_log: dir.join("vm/console.log"),
        network: None,
    };
    let vm = qemu_tcg().start(&spec).await.expect("start");
    let record = serde_json::to_vec(&vm.record()).expect("record");
    std::fs::write(dir.join("record.json"), record).expect("write record");
}

/// A real restart: another process starts the VM and exits; this one
/// re-attaches from the persisted record and controls the VM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vmm_outlives_the_process_that_started_it() {
    init_tracing();
    let tmp = tempfile::tempdir().expect("tempdir");
    let _reaper = VmmReaper::new(tmp.path());
    let elf = kiln_vmm::testguest::build(&tmp.path().join("guest")).expect("build the guest");
    let status = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "helper_start_vm_and_exit",
            "--ignored",
            "--quiet",
        ])
        .env("KILN_VMM_HELPER_DIR", tmp.path())
        .env("KILN_VMM_HELPER_ELF", &elf)
        .status()
        .expect("run the helper");
    assert!(status.success(), "helper failed: {status}");
    let record: kiln_vmm::VmRecord = serde_json::from_slice(
        &std::fs::read(tmp.path().join("record.json")).expect("record written"),
    )
    .expect("record parses");
    let driver = qemu_tcg();
    let vm = driver
        .attach(&record)
        .await
        .expect("attach after the starter exited");
    assert_eq!(
        vm.status().await.expect("status"),
        kiln_vmm::VmStatus::Running
    );
    vm.pause().await.expect("pause");
    assert_eq!(
        vm.status().await.expect("status"),
        kiln_vmm::VmStatus::Paused
    );
    vm.resume().await.expect("resume");
    vm.cleanup().await.expect("cleanup");
    assert!(conformance::leftovers(&record.dir).is_empty());
}
