//! The driver conformance suite against real VMMs: QEMU/TCG with the
//! bare-metal counter guest and with the Linux guest kernel, and Firecracker
//! when `KILN_FIRECRACKER_BIN` is set.

use std::path::PathBuf;
use std::sync::Arc;

use kiln_vmm::conformance::{self, Guest, VmmReaper};
use kiln_vmm::qemu::QemuDriver;
use kiln_vmm::{Accel, DriverChoice, DriverConfig, VmmDriver};

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
        "{name}: passed {:?}; start() returned after {:?}, first serial byte after {:?}, stop took {:?}, snapshot downtime {:?}, restore → first byte {:?}",
        report.passed,
        report.start_returned,
        report.first_serial_byte,
        report.stop,
        report.snapshot_downtime,
        report.restore_first_byte
    );
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

#[tokio::test]
async fn firecracker_conformance_skipped_without_binary() {
    init_tracing();
    let Some(_) = std::env::var_os("KILN_FIRECRACKER_BIN").filter(|v| !v.is_empty()) else {
        eprintln!("SKIPPED: Firecracker conformance: KILN_FIRECRACKER_BIN is not set");
        return;
    };
    let host = kiln_vmm::detect(&DriverConfig::default());
    let selection = kiln_vmm::select(DriverChoice::Firecracker, &host).unwrap_or_else(|e| {
        panic!("KILN_FIRECRACKER_BIN is set but Firecracker cannot run: {e:#}")
    });
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
    let vmlinux = kernel_dir().join("vmlinux");
    if vmlinux.is_file() {
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
