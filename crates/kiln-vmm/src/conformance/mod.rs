//! Driver conformance suite: the behaviour every [`VmmDriver`] must show,
//! checked against a real VMM and a real guest. Any driver and any guest can
//! be run through it ([`run`]); the crate's own tests run it against QEMU with
//! the bare-metal counter guest and with the Linux kernel.
//!
//! The story, in order: boot (serial output appears) → pause (output stops,
//! status paused) → resume (output continues from where it was) → re-attach
//! from the record after dropping the handle → agent channel → stop (VMM
//! gone) → cleanup (nothing left in the VM dir) → attach to the dead VM says
//! `Gone` → bad inputs fail clearly and leak nothing → snapshot/restore when
//! the driver has them → fork: [`FORK_CLONES`] restores of one snapshot
//! running at the same time as each other and as the source.

mod fork;

pub(crate) use fork::join_all;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::process::{proc_session, proc_stat};
use crate::testguest::{LINE_PREFIX, counters};
use crate::{
    AgentTransport, AttachVmError, DiskSpec, StartVmError, Vm, VmSpec, VmStatus, VmmDriver,
};

/// A guest to run the suite with.
#[derive(Debug, Clone)]
pub struct Guest {
    pub name: String,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub memory_mib: u32,
    /// Text in the console log that proves the guest booted.
    pub boot_marker: String,
    /// The guest prints `kiln-counter N` lines (the bare-metal guest): the
    /// pause/resume and snapshot checks are then exact.
    pub counter: bool,
    /// Give the VMs the agent channel. Over virtio-serial the host end must
    /// connect; over vsock nothing in these guests listens, so
    /// `connect_agent` must fail, within its deadline, with a clear error
    /// (the answering path is proven with `kiln-init`, elsewhere).
    pub agent_channel: bool,
    pub boot_timeout: Duration,
}

impl Guest {
    /// The bare-metal counter guest (see [`crate::testguest::build`]).
    pub fn baremetal(elf: PathBuf) -> Self {
        Guest {
            name: "baremetal-counter".into(),
            kernel: elf,
            initrd: None,
            cmdline: String::new(),
            memory_mib: 32,
            boot_marker: "kiln-counter 2\n".into(),
            counter: true,
            agent_channel: true,
            boot_timeout: Duration::from_secs(20),
        }
    }

    /// A Linux kernel; with no initrd it panics for lack of init, and
    /// `panic=0` keeps it there, which is enough serial output to prove boot.
    pub fn linux(kernel: PathBuf, initrd: Option<PathBuf>) -> Self {
        Guest {
            name: "linux".into(),
            kernel,
            initrd,
            cmdline: "panic=0".into(),
            memory_mib: 256,
            boot_marker: "Linux version".into(),
            counter: false,
            agent_channel: true,
            boot_timeout: Duration::from_secs(60),
        }
    }
}

/// What the suite measured.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Checks that passed, in order.
    pub passed: Vec<&'static str>,
    /// `start()` call → it returned (VMM spawned, control socket answered,
    /// guest started).
    pub start_returned: Duration,
    /// `start()` call → first byte in the console log.
    pub first_serial_byte: Duration,
    /// `stop()` duration.
    pub stop: Duration,
    /// Snapshot downtime and restore → first new console byte, if run.
    pub snapshot_downtime: Option<Duration>,
    pub restore_first_byte: Option<Duration>,
    /// Fork check, one entry per clone (all restores begin at the same
    /// instant): `restore()` call → it returned.
    pub fork_restore: Vec<Duration>,
    /// Fork check, per clone: `restore()` call → its first counter line.
    pub fork_first_line: Vec<Duration>,
    /// vsock drivers: how long `connect_agent()` took to fail with no
    /// listener in the guest.
    pub agent_no_listener: Option<Duration>,
    /// Per passed check, in order: how long it took (from the end of the
    /// one before, or the start of the suite).
    pub check_times: Vec<(&'static str, Duration)>,
    /// When the suite or the last passed check ended.
    last_mark: Option<Instant>,
}

impl Report {
    fn pass(&mut self, check: &'static str) {
        let now = Instant::now();
        let took = self.last_mark.map_or(Duration::ZERO, |t| now - t);
        self.last_mark = Some(now);
        self.passed.push(check);
        self.check_times.push((check, took));
    }
}

/// How many clones of one snapshot the fork check runs at once (besides
/// the source VM, which keeps running).
pub const FORK_CLONES: usize = 3;

#[derive(Debug, thiserror::Error)]
#[error("conformance check {check} failed: {message}")]
pub struct ConformanceError {
    pub check: &'static str,
    pub message: String,
}

fn fail(check: &'static str, message: impl Into<String>) -> ConformanceError {
    ConformanceError {
        check,
        message: message.into(),
    }
}

/// Run the whole suite in `work_dir` (created; one sub-directory per VM).
/// Every VM it starts is cleaned up, also when a check fails.
pub async fn run(
    driver: &dyn VmmDriver,
    guest: &Guest,
    work_dir: &Path,
) -> Result<Report, ConformanceError> {
    let mut report = Report {
        last_mark: Some(Instant::now()),
        ..Report::default()
    };
    std::fs::create_dir_all(work_dir).map_err(|e| {
        fail(
            "setup",
            format!("cannot create {}: {e}", work_dir.display()),
        )
    })?;
    let spec = spec_for(guest, work_dir, "life");
    let started = Instant::now();
    let vm = driver
        .start(&spec)
        .await
        .map_err(|e| fail("boot", format!("start failed: {e:#}")))?;
    report.start_returned = started.elapsed();
    let mut holder = Holder(Some(vm));
    let outcome = lifecycle(driver, guest, &spec, &mut holder, started, &mut report).await;
    if let Some(vm) = holder.0.take() {
        let _ = vm.cleanup().await;
    }
    outcome?;
    bad_inputs(driver, guest, work_dir).await?;
    report.pass("bad_inputs");
    let caps = driver.capabilities();
    if caps.snapshot && caps.restore && guest.counter {
        // Pushes "snapshot_restore", then "fork".
        fork::snapshot_restore(driver, guest, work_dir, &mut report).await?;
    }
    Ok(report)
}

/// The VM under test; taken out (dropped) to simulate a Kiln restart.
struct Holder(Option<Box<dyn Vm>>);

impl Holder {
    fn vm(&self) -> Result<&dyn Vm, ConformanceError> {
        self.0
            .as_deref()
            .ok_or_else(|| fail("internal", "no VM handle"))
    }
}

fn spec_for(guest: &Guest, work_dir: &Path, name: &str) -> VmSpec {
    let dir = work_dir.join(name);
    VmSpec {
        id: format!("conf-{name}"),
        console_log: dir.join("console.log"),
        network: None,
        dir,
        kernel: guest.kernel.clone(),
        initrd: guest.initrd.clone(),
        cmdline: guest.cmdline.clone(),
        cpus: 1,
        memory_mib: guest.memory_mib,
        disks: vec![],
        agent_channel: guest.agent_channel,
    }
}

fn console(spec: &VmSpec) -> String {
    String::from_utf8_lossy(&std::fs::read(&spec.console_log).unwrap_or_default()).into_owned()
}

async fn wait_for(
    check: &'static str,
    timeout: Duration,
    what: &str,
    mut cond: impl FnMut() -> bool,
) -> Result<(), ConformanceError> {
    let deadline = Instant::now() + timeout;
    while !cond() {
        if Instant::now() >= deadline {
            return Err(fail(
                check,
                format!("timed out after {timeout:?} waiting for {what}"),
            ));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(())
}

async fn expect_status(
    check: &'static str,
    vm: &dyn Vm,
    want: VmStatus,
) -> Result<(), ConformanceError> {
    let got = vm
        .status()
        .await
        .map_err(|e| fail(check, format!("status failed: {e:#}")))?;
    if got == want {
        Ok(())
    } else {
        Err(fail(check, format!("status is {got:?}, expected {want:?}")))
    }
}

/// Counter values must rise by exactly one from line to line.
fn check_contiguous(check: &'static str, log: &str) -> Result<Vec<u64>, ConformanceError> {
    let values = counters(log);
    for pair in values.windows(2) {
        if pair[1] != pair[0] + 1 {
            return Err(fail(
                check,
                format!("counter jumped from {} to {}", pair[0], pair[1]),
            ));
        }
    }
    Ok(values)
}

fn pid_alive(pid: i32) -> bool {
    matches!(proc_stat(pid), Some((state, _)) if state != 'Z' && state != 'X')
}

async fn lifecycle(
    driver: &dyn VmmDriver,
    guest: &Guest,
    spec: &VmSpec,
    holder: &mut Holder,
    started: Instant,
    report: &mut Report,
) -> Result<(), ConformanceError> {
    // boot
    let file = spec.console_log.clone();
    wait_for("boot", guest.boot_timeout, "the first serial byte", || {
        std::fs::metadata(&file).is_ok_and(|m| m.len() > 0)
    })
    .await?;
    report.first_serial_byte = started.elapsed();
    wait_for("boot", guest.boot_timeout, &guest.boot_marker, || {
        console(spec).contains(&guest.boot_marker)
    })
    .await?;
    // Only the guest writes to the console: not a byte of the VMM's own
    // (Firecracker logs to its stdout unless told otherwise).
    if guest.counter {
        let text = console(spec);
        let complete = text.rfind('\n').map_or("", |end| &text[..end]);
        if let Some(line) = complete.lines().find(|l| {
            l.strip_prefix(LINE_PREFIX)
                .and_then(|n| n.trim().parse::<u64>().ok())
                .is_none()
        }) {
            return Err(fail(
                "boot",
                format!("the console holds a line that is not the guest's: {line:?}"),
            ));
        }
    }
    let vm = holder.vm()?;
    expect_status("boot", vm, VmStatus::Running).await?;
    if !pid_alive(vm.pid()) {
        return Err(fail("boot", "the VMM pid is not alive"));
    }
    // Detached: the VMM leads its own session, so it outlives ours.
    let own = i32::try_from(std::process::id())
        .ok()
        .and_then(proc_session);
    if proc_session(vm.pid()) != Some(vm.pid()) || own == Some(vm.pid()) {
        return Err(fail(
            "boot",
            format!(
                "the VMM is not detached: session {:?}, ours {own:?}",
                proc_session(vm.pid())
            ),
        ));
    }
    report.pass("boot");

    // pause: output stops
    vm.pause()
        .await
        .map_err(|e| fail("pause", format!("{e:#}")))?;
    expect_status("pause", vm, VmStatus::Paused).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = console(spec);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = console(spec);
    if before != after {
        return Err(fail(
            "pause",
            format!(
                "console grew from {} to {} bytes while paused",
                before.len(),
                after.len()
            ),
        ));
    }
    report.pass("pause");

    // resume: output continues from where it was
    let last = counters(&after).last().copied();
    vm.resume()
        .await
        .map_err(|e| fail("resume", format!("{e:#}")))?;
    expect_status("resume", vm, VmStatus::Running).await?;
    if guest.counter {
        let last = last.ok_or_else(|| fail("resume", "no counter line before the pause"))?;
        wait_for(
            "resume",
            Duration::from_secs(10),
            "the counter to advance",
            || {
                counters(&console(spec))
                    .last()
                    .is_some_and(|n| *n > last + 1)
            },
        )
        .await?;
        check_contiguous("resume", &console(spec))?;
    }
    report.pass("resume");

    // attach: drop the handle (as a restarted Kiln would have lost it) and
    // re-attach from the record.
    let record = vm.record();
    let pid = vm.pid();
    holder.0 = None;
    let vm = driver
        .attach(&record)
        .await
        .map_err(|e| fail("attach", format!("{e:#}")))?;
    holder.0 = Some(vm);
    let vm = holder.vm()?;
    if vm.pid() != pid {
        return Err(fail("attach", "re-attached handle has another pid"));
    }
    expect_status("attach", vm, VmStatus::Running).await?;
    vm.pause()
        .await
        .map_err(|e| fail("attach", format!("pause after attach: {e:#}")))?;
    expect_status("attach", vm, VmStatus::Paused).await?;
    vm.resume()
        .await
        .map_err(|e| fail("attach", format!("resume after attach: {e:#}")))?;
    let mut stale = record.clone();
    stale.start_time += 1;
    match driver.attach(&stale).await {
        Err(AttachVmError::Gone { .. }) => {}
        Err(e) => return Err(fail("attach", format!("stale record: wrong error {e:#}"))),
        Ok(_) => return Err(fail("attach", "a record with a reused pid was accepted")),
    }
    report.pass("attach");

    // agent channel
    if spec.agent_channel {
        agent_channel(driver, vm, report).await?;
    }

    // stop: the VMM process is gone
    let stopping = Instant::now();
    vm.stop(Duration::from_millis(200))
        .await
        .map_err(|e| fail("stop", format!("{e:#}")))?;
    report.stop = stopping.elapsed();
    wait_for("stop", Duration::from_secs(5), "the VMM to be gone", || {
        !pid_alive(pid)
    })
    .await?;
    expect_status("stop", vm, VmStatus::Exited).await?;
    tokio::time::timeout(Duration::from_secs(5), vm.wait())
        .await
        .map_err(|_| fail("stop", "wait() did not return for a dead VMM"))?;
    report.pass("stop");

    // cleanup: nothing left
    vm.cleanup()
        .await
        .map_err(|e| fail("cleanup", format!("{e:#}")))?;
    let left = leftovers(&spec.dir);
    if !left.is_empty() {
        return Err(fail("cleanup", format!("left behind: {left:?}")));
    }
    holder.0 = None;
    match driver.attach(&record).await {
        Err(AttachVmError::Gone { .. }) => {}
        Err(e) => {
            return Err(fail(
                "cleanup",
                format!("attach to a dead VM: wrong error {e:#}"),
            ));
        }
        Ok(_) => return Err(fail("cleanup", "attach to a dead VM succeeded")),
    }
    report.pass("cleanup");
    Ok(())
}

/// The host end of the agent channel. virtio-serial: the chardev accepts
/// the connection. vsock: nothing in the suite's guests listens on the
/// agent port, so the handshake must fail, and within its deadline (a
/// guest that never answers must not hang the host), with the error
/// saying so.
async fn agent_channel(
    driver: &dyn VmmDriver,
    vm: &dyn Vm,
    report: &mut Report,
) -> Result<(), ConformanceError> {
    const CHECK: &str = "agent_channel";
    match driver.capabilities().agent_transport {
        AgentTransport::VirtioSerial => {
            let stream = vm
                .connect_agent()
                .await
                .map_err(|e| fail(CHECK, format!("{e:#}")))?;
            drop(stream);
            report.pass(CHECK);
        }
        AgentTransport::HybridVsock => {
            let started = Instant::now();
            let limit = crate::vsock::HANDSHAKE_TIMEOUT + Duration::from_secs(1);
            let outcome = tokio::time::timeout(limit, vm.connect_agent()).await;
            let took = started.elapsed();
            match outcome {
                Err(_) => {
                    return Err(fail(
                        CHECK,
                        format!("connect_agent() hung for {limit:?} with no listener in the guest"),
                    ));
                }
                Ok(Ok(_)) => {
                    return Err(fail(
                        CHECK,
                        "the vsock handshake succeeded with no listener in the guest",
                    ));
                }
                Ok(Err(
                    e @ (crate::ConnectAgentError::Handshake { .. }
                    | crate::ConnectAgentError::HandshakeTimeout { .. }),
                )) => {
                    tracing::info!(error = %e, ?took, "vsock: no listener, refused as expected");
                }
                Ok(Err(e)) => return Err(fail(CHECK, format!("wrong error: {e:#}"))),
            }
            report.agent_no_listener = Some(took);
            report.pass("agent_channel_no_listener");
        }
    }
    Ok(())
}

/// Entries left in a VM dir (an absent dir has none).
pub fn leftovers(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|entries| entries.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default()
}

/// Pids of processes whose command line mentions `needle`.
pub fn processes_mentioning(needle: &str) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
                && pid_alive(*pid)
        })
        .collect()
}

async fn bad_inputs(
    driver: &dyn VmmDriver,
    guest: &Guest,
    work_dir: &Path,
) -> Result<(), ConformanceError> {
    const CHECK: &str = "bad_inputs";
    let base = spec_for(guest, work_dir, "bad");
    type Case = (&'static str, VmSpec, fn(&StartVmError) -> bool);
    let mut cases: Vec<Case> = Vec::new();
    let mut s = base.clone();
    s.kernel = work_dir.join("no-such-kernel");
    cases.push(("missing kernel", s, |e| {
        matches!(e, StartVmError::MissingFile { what: "kernel", .. })
    }));
    let mut s = base.clone();
    s.memory_mib = 1;
    cases.push(("memory_mib = 1", s, |e| {
        matches!(e, StartVmError::InvalidSpec(_))
    }));
    let mut s = base.clone();
    s.disks = vec![DiskSpec {
        path: work_dir.join("no-such-disk.ext4"),
        read_only: true,
    }];
    cases.push(("nonexistent disk", s, |e| {
        matches!(e, StartVmError::MissingFile { what: "disk", .. })
    }));
    // A kernel file the VMM itself refuses: exercises the spawn-failure path.
    let junk = work_dir.join("junk-kernel");
    std::fs::write(&junk, b"this is not a kernel\n")
        .map_err(|e| fail(CHECK, format!("cannot write {}: {e}", junk.display())))?;
    let mut s = base.clone();
    s.kernel = junk.clone();
    cases.push(("unbootable kernel", s, |e| {
        matches!(e, StartVmError::Exited { .. } | StartVmError::Configure(_))
    }));
    for (name, spec, expected) in cases {
        match driver.start(&spec).await {
            Ok(vm) => {
                let _ = vm.cleanup().await;
                return Err(fail(CHECK, format!("{name}: start succeeded")));
            }
            Err(e) if expected(&e) => {
                tracing::info!(case = name, error = %format!("{e:#}"), "refused as expected");
            }
            Err(e) => return Err(fail(CHECK, format!("{name}: unexpected error {e:#}"))),
        }
        let left = leftovers(&spec.dir);
        if !left.is_empty() {
            return Err(fail(CHECK, format!("{name}: left behind {left:?}")));
        }
        let procs = processes_mentioning(&spec.dir.display().to_string());
        if !procs.is_empty() {
            return Err(fail(CHECK, format!("{name}: processes left: {procs:?}")));
        }
    }
    let _ = std::fs::remove_file(&junk);
    Ok(())
}

/// Kills, on drop, every process whose command line mentions a directory
/// (the VMMs of VMs whose runtime dirs lie under it).
/// Tests hold one so that a failing test leaves no VMM running.
pub struct VmmReaper {
    dir: PathBuf,
}

impl VmmReaper {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        VmmReaper { dir: dir.into() }
    }
}

impl Drop for VmmReaper {
    fn drop(&mut self) {
        let needle = self.dir.display().to_string();
        for pid in processes_mentioning(&needle) {
            tracing::warn!(pid, "reaping a leftover VMM");
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}
