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

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::Poll;
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
    /// Give the VM the agent channel and check that it connects.
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
    let mut report = Report::default();
    std::fs::create_dir_all(work_dir).map_err(|e| {
        fail(
            "setup",
            format!("cannot create {}: {e}", work_dir.display()),
        )
    })?;
    let spec = spec_for(driver, guest, work_dir, "life");
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
    report.passed.push("bad_inputs");
    let caps = driver.capabilities();
    if caps.snapshot && caps.restore && guest.counter {
        // Pushes "snapshot_restore", then "fork".
        snapshot_restore(driver, guest, work_dir, &mut report).await?;
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

fn spec_for(driver: &dyn VmmDriver, guest: &Guest, work_dir: &Path, name: &str) -> VmSpec {
    let dir = work_dir.join(name);
    VmSpec {
        id: format!("conf-{name}"),
        console_log: dir.join("console.log"),
        dir,
        kernel: guest.kernel.clone(),
        initrd: guest.initrd.clone(),
        cmdline: guest.cmdline.clone(),
        cpus: 1,
        memory_mib: guest.memory_mib,
        disks: vec![],
        agent_channel: guest.agent_channel
            && driver.capabilities().agent_transport == AgentTransport::VirtioSerial,
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
    report.passed.push("boot");

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
    report.passed.push("pause");

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
    report.passed.push("resume");

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
    report.passed.push("attach");

    // agent channel
    if spec.agent_channel {
        let stream = vm
            .connect_agent()
            .await
            .map_err(|e| fail("agent_channel", format!("{e:#}")))?;
        drop(stream);
        report.passed.push("agent_channel");
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
    report.passed.push("stop");

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
    report.passed.push("cleanup");
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
    let base = spec_for(driver, guest, work_dir, "bad");
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

/// Snapshot a running counter guest, restore it once alone, then fork it
/// ([`fork`]). The source runs on throughout and must be undisturbed; the
/// snapshot must be unchanged by every VM restored from it; nothing may be
/// left behind.
async fn snapshot_restore(
    driver: &dyn VmmDriver,
    guest: &Guest,
    work_dir: &Path,
    report: &mut Report,
) -> Result<(), ConformanceError> {
    const CHECK: &str = "snapshot_restore";
    let spec = spec_for(driver, guest, work_dir, "snap-src");
    let snap_dir = work_dir.join("snapshot");
    let vm = driver
        .start(&spec)
        .await
        .map_err(|e| fail(CHECK, format!("start: {e:#}")))?;
    let result = async {
        wait_for(CHECK, guest.boot_timeout, "three counter lines", || {
            counters(&console(&spec)).len() >= 3
        })
        .await?;
        let info = vm
            .snapshot(&snap_dir)
            .await
            .map_err(|e| fail(CHECK, format!("snapshot: {e:#}")))?;
        report.snapshot_downtime = Some(info.downtime);
        match vm.status().await {
            Ok(VmStatus::Running) | Ok(VmStatus::Exited) | Err(_) => {
                return Err(fail(CHECK, "the VM is not paused after the snapshot"));
            }
            Ok(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        // What the guest had printed when its vCPUs stopped, possibly
        // ending in the middle of a line: a restore prints the rest.
        let point = SnapshotPoint::of(console(&spec))?;
        let before = fingerprint(&snap_dir)
            .map_err(|e| fail(CHECK, format!("cannot read the snapshot: {e}")))?;
        // The source goes on running after the snapshot.
        vm.resume()
            .await
            .map_err(|e| fail(CHECK, format!("resume after snapshot: {e:#}")))?;
        wait_for(
            CHECK,
            Duration::from_secs(10),
            "the source to continue",
            || {
                counters(&console(&spec))
                    .last()
                    .is_some_and(|n| *n > point.counter)
            },
        )
        .await?;

        // One restore alone: it continues from the snapshot.
        let rspec = spec_for(driver, guest, work_dir, "restored");
        let t = Instant::now();
        let restored = driver
            .restore(&snap_dir, &rspec)
            .await
            .map_err(|e| fail(CHECK, format!("restore: {e:#}")))?;
        let r = async {
            wait_for(CHECK, Duration::from_secs(10), "restored output", || {
                !counters(&console(&rspec)).is_empty()
            })
            .await?;
            report.restore_first_byte = Some(t.elapsed());
            point.continued_by(CHECK, "the restored VM", &console(&rspec))?;
            expect_status(CHECK, restored.as_ref(), VmStatus::Running).await
        }
        .await;
        let cleaned = restored.cleanup().await;
        r?;
        cleaned.map_err(|e| fail(CHECK, format!("cleanup of the restored VM: {e:#}")))?;
        gone(CHECK, "the restored VM", &rspec.dir)?;
        report.passed.push("snapshot_restore");

        snapshot_of_restored(driver, guest, work_dir, &snap_dir, &point).await?;
        report.passed.push("snapshot_of_restored");

        fork(
            driver,
            guest,
            work_dir,
            &snap_dir,
            (&spec, vm.pid()),
            &point,
            report,
        )
        .await?;

        // The source was never disturbed: one contiguous count from boot.
        check_contiguous(CHECK, &console(&spec))?;
        expect_status(CHECK, vm.as_ref(), VmStatus::Running).await?;
        // Every restore mapped the snapshot privately: it is unchanged.
        let after = fingerprint(&snap_dir)
            .map_err(|e| fail(CHECK, format!("cannot read the snapshot: {e}")))?;
        if after != before {
            return Err(fail(
                CHECK,
                format!(
                    "the snapshot changed while VMs restored from it ran: {before:?} became {after:?}"
                ),
            ));
        }
        Ok(())
    }
    .await;
    let _ = vm.cleanup().await;
    result?;
    gone(CHECK, "the source VM", &spec.dir)?;
    let _ = std::fs::remove_dir_all(&snap_dir);
    let procs = processes_mentioning(&format!("{}/", work_dir.display()));
    if !procs.is_empty() {
        return Err(fail(CHECK, format!("processes left: {procs:?}")));
    }
    Ok(())
}

/// Name, size and a hash of the contents of every file in `dir`, sorted.
fn fingerprint(dir: &Path) -> std::io::Result<Vec<(String, u64, u64)>> {
    use std::hash::Hasher;
    use std::io::Read;
    let mut out = vec![];
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if !entry.file_type()?.is_file() {
            continue;
        }
        let mut file = std::fs::File::open(entry.path())?;
        let mut hasher = std::hash::DefaultHasher::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut size = 0u64;
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.write(&buf[..n]);
            size += n as u64;
        }
        out.push((
            entry.file_name().to_string_lossy().into_owned(),
            size,
            hasher.finish(),
        ));
    }
    out.sort();
    Ok(out)
}

/// A VM's directory is empty and no process mentions it.
fn gone(check: &'static str, what: &str, dir: &Path) -> Result<(), ConformanceError> {
    let left = leftovers(dir);
    if !left.is_empty() {
        return Err(fail(check, format!("{what} left behind {left:?}")));
    }
    let procs = processes_mentioning(&format!("{}/", dir.display()));
    if !procs.is_empty() {
        return Err(fail(check, format!("{what}: processes left: {procs:?}")));
    }
    Ok(())
}

/// The source's console when its vCPUs stopped for the snapshot.
struct SnapshotPoint {
    console: String,
    /// The last complete counter line: every restore prints `counter + 1`
    /// next (finishing the line if the snapshot cut it).
    counter: u64,
}

impl SnapshotPoint {
    fn of(console: String) -> Result<Self, ConformanceError> {
        let counter = counters(&console)
            .last()
            .copied()
            .ok_or_else(|| fail("snapshot_restore", "no counter before the snapshot"))?;
        Ok(SnapshotPoint { console, counter })
    }

    /// `output` (a restored VM's whole console) continues the source's
    /// output at the snapshot: together they read as one contiguous count,
    /// the first new value is `counter + 1`, and nothing else is in it (so
    /// no other VM's output either: identical guests print the same lines,
    /// and two of them in one file would repeat values). Returns the new
    /// values.
    fn continued_by(
        &self,
        check: &'static str,
        who: &str,
        output: &str,
    ) -> Result<Vec<u64>, ConformanceError> {
        let joined = format!("{}{output}", self.console);
        let all = check_contiguous(check, &joined)
            .map_err(|e| fail(check, format!("{who}: {}", e.message)))?;
        let new = all[counters(&self.console).len()..].to_vec();
        match new.first() {
            Some(&first) if first == self.counter + 1 => {}
            Some(&first) => {
                return Err(fail(
                    check,
                    format!(
                        "{who} started at {first}, the snapshot was at {}",
                        self.counter
                    ),
                ));
            }
            None => return Err(fail(check, format!("{who} printed no counter line"))),
        }
        // Everything it printed is counter lines.
        let complete = joined.rfind('\n').map_or("", |end| &joined[..end]);
        let before = self.console.matches('\n').count();
        if let Some(line) = complete.lines().skip(before).find(|l| {
            l.strip_prefix(LINE_PREFIX)
                .and_then(|n| n.trim().parse::<u64>().ok())
                .is_none()
        }) {
            return Err(fail(
                check,
                format!("{who} printed a line that is not a counter line: {line:?}"),
            ));
        }
        Ok(new)
    }
}

/// Restore [`FORK_CLONES`] VMs from `snap_dir` at once while the source
/// (`source`) runs: each continues from the snapshot on its own console,
/// counts independently (pausing one stops only it), and killing and
/// cleaning up one disturbs neither the others nor the source.
async fn fork(
    driver: &dyn VmmDriver,
    guest: &Guest,
    work_dir: &Path,
    snap_dir: &Path,
    (source, source_pid): (&VmSpec, i32),
    point: &SnapshotPoint,
    report: &mut Report,
) -> Result<(), ConformanceError> {
    const CHECK: &str = "fork";
    let specs: Vec<VmSpec> = (0..FORK_CLONES)
        .map(|i| spec_for(driver, guest, work_dir, &format!("fork-{i}")))
        .collect();
    // All restores begin now and run concurrently.
    let t0 = Instant::now();
    let restores = join_all(
        specs
            .iter()
            .map(|s| async move { (driver.restore(snap_dir, s).await, t0.elapsed()) })
            .collect(),
    )
    .await;
    let mut clones: Vec<Option<Box<dyn Vm>>> = vec![];
    let mut failures = vec![];
    for (i, (restored, took)) in restores.into_iter().enumerate() {
        report.fork_restore.push(took);
        match restored {
            Ok(vm) => clones.push(Some(vm)),
            Err(e) => {
                clones.push(None);
                failures.push(format!("clone {i}: {e:#}"));
            }
        }
    }
    let result = if failures.is_empty() {
        fork_checks(&specs, &mut clones, source, source_pid, point, t0, report).await
    } else {
        Err(fail(
            CHECK,
            format!("concurrent restores failed: {}", failures.join("; ")),
        ))
    };
    for vm in clones.iter_mut().filter_map(Option::take) {
        let _ = vm.cleanup().await;
    }
    result?;
    for (i, spec) in specs.iter().enumerate() {
        gone(CHECK, &format!("clone {i}"), &spec.dir)?;
    }
    let procs = processes_mentioning(&format!("{}/", snap_dir.display()));
    if !procs.is_empty() {
        return Err(fail(
            CHECK,
            format!("processes still map the snapshot: {procs:?}"),
        ));
    }
    report.passed.push(CHECK);
    Ok(())
}

/// The last counter value in each console.
fn last_counters(specs: &[&VmSpec]) -> Vec<u64> {
    specs
        .iter()
        .map(|s| counters(&console(s)).last().copied().unwrap_or(0))
        .collect()
}

/// Wait until every VM of `specs` has printed `lines` more counter lines
/// than `from`.
async fn all_advance(
    check: &'static str,
    what: &str,
    specs: &[&VmSpec],
    from: &[u64],
    lines: u64,
) -> Result<(), ConformanceError> {
    wait_for(check, Duration::from_secs(30), what, || {
        last_counters(specs)
            .iter()
            .zip(from)
            .all(|(now, then)| *now >= then + lines)
    })
    .await
}

fn vm(clones: &[Option<Box<dyn Vm>>], i: usize) -> Result<&dyn Vm, ConformanceError> {
    clones[i]
        .as_deref()
        .ok_or_else(|| fail("internal", "no clone handle"))
}

async fn fork_checks(
    specs: &[VmSpec],
    clones: &mut [Option<Box<dyn Vm>>],
    source: &VmSpec,
    source_pid: i32,
    point: &SnapshotPoint,
    t0: Instant,
    report: &mut Report,
) -> Result<(), ConformanceError> {
    const CHECK: &str = "fork";
    // All of them, and the source, run at the same time, as distinct
    // processes with their own directories and consoles.
    let mut pids = vec![];
    for (i, spec) in specs.iter().enumerate() {
        let clone = vm(clones, i)?;
        expect_status(CHECK, clone, VmStatus::Running).await?;
        pids.push(clone.pid());
        let record = clone.record();
        if record.dir != spec.dir || record.console_log != spec.console_log {
            return Err(fail(
                CHECK,
                format!("clone {i}: its record names another VM dir"),
            ));
        }
    }
    pids.push(source_pid);
    let mut distinct = pids.clone();
    distinct.sort_unstable();
    distinct.dedup();
    if distinct.len() != pids.len() || !pids.iter().all(|p| pid_alive(*p)) {
        return Err(fail(
            CHECK,
            format!(
                "the clones and the source are not {} live, distinct VMMs: pids {pids:?}",
                pids.len()
            ),
        ));
    }

    // Each continues from the snapshot and counts on, all at once.
    let mut first_line = vec![None; specs.len()];
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut done = true;
        for (i, spec) in specs.iter().enumerate() {
            let values = counters(&console(spec));
            if first_line[i].is_none() && !values.is_empty() {
                first_line[i] = Some(t0.elapsed());
            }
            done &= values.last().is_some_and(|n| *n >= point.counter + 5);
        }
        if done {
            break;
        }
        if Instant::now() >= deadline {
            return Err(fail(
                CHECK,
                format!(
                    "timed out waiting for every clone to count 5 past the snapshot ({}): at {:?}",
                    point.counter,
                    last_counters(&specs.iter().collect::<Vec<_>>())
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    report.fork_first_line = first_line.into_iter().flatten().collect();
    for (i, spec) in specs.iter().enumerate() {
        point.continued_by(CHECK, &format!("clone {i}"), &console(spec))?;
    }
    for i in 0..clones.len() {
        if !pid_alive(vm(clones, i)?.pid()) {
            return Err(fail(CHECK, format!("clone {i} died")));
        }
    }

    // Independent: pause clone 0; it stops, the others and the source go on.
    let paused = vm(clones, 0)?;
    paused
        .pause()
        .await
        .map_err(|e| fail(CHECK, format!("pause clone 0: {e:#}")))?;
    expect_status(CHECK, paused, VmStatus::Paused).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let frozen = console(&specs[0]);
    let others: Vec<&VmSpec> = specs[1..].iter().chain([source]).collect();
    all_advance(
        CHECK,
        "the other clones and the source to count on while clone 0 is paused",
        &others,
        &last_counters(&others),
        3,
    )
    .await?;
    if console(&specs[0]) != frozen {
        return Err(fail(CHECK, "clone 0's console grew while it was paused"));
    }
    for i in 1..clones.len() {
        expect_status(CHECK, vm(clones, i)?, VmStatus::Running).await?;
    }
    paused
        .resume()
        .await
        .map_err(|e| fail(CHECK, format!("resume clone 0: {e:#}")))?;
    let first: Vec<&VmSpec> = specs[..1].iter().collect();
    all_advance(
        CHECK,
        "clone 0 to count on after its resume",
        &first,
        &last_counters(&first),
        2,
    )
    .await?;

    // Kill one clone, then clean it up: the others and the source go on.
    let victim = specs.len() / 2;
    let killed = vm(clones, victim)?;
    let killed_pid = killed.pid();
    killed
        .kill()
        .await
        .map_err(|e| fail(CHECK, format!("kill clone {victim}: {e:#}")))?;
    wait_for(
        CHECK,
        Duration::from_secs(5),
        "the killed clone to be gone",
        || !pid_alive(killed_pid),
    )
    .await?;
    expect_status(CHECK, killed, VmStatus::Exited).await?;
    let survivors: Vec<&VmSpec> = specs
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != victim)
        .map(|(_, s)| s)
        .chain([source])
        .collect();
    all_advance(
        CHECK,
        "the others to count on after one clone was killed",
        &survivors,
        &last_counters(&survivors),
        2,
    )
    .await?;
    if let Some(killed) = clones[victim].take() {
        killed
            .cleanup()
            .await
            .map_err(|e| fail(CHECK, format!("cleanup clone {victim}: {e:#}")))?;
    }
    gone(CHECK, &format!("clone {victim}"), &specs[victim].dir)?;
    all_advance(
        CHECK,
        "the others to count on after one clone was cleaned up",
        &survivors,
        &last_counters(&survivors),
        2,
    )
    .await?;
    for (i, clone) in clones.iter().enumerate() {
        if let Some(clone) = clone {
            expect_status(CHECK, clone.as_ref(), VmStatus::Running).await?;
            point.continued_by(CHECK, &format!("clone {i}"), &console(&specs[i]))?;
        }
    }
    Ok(())
}

/// Poll every future on this task until all are done; their outputs, in
/// order. (What `futures::future::join_all` does, without the dependency.)
async fn join_all<F: Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut futures: Vec<Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (future, output) in futures.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                match future.as_mut().poll(cx) {
                    Poll::Ready(v) => *output = Some(v),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    outputs.into_iter().flatten().collect()
}

/// A snapshot of a VM that was itself restored (QEMU: its RAM is private
/// when mapped, so it goes into the device state; or its own copy when
/// owned. Firecracker: a Diff of the pages written since the load, merged
/// onto the file it was loaded from) restores a VM that continues from the
/// second snapshot, not the first. For each way a driver can give a
/// restored VM its RAM.
async fn snapshot_of_restored(
    driver: &dyn VmmDriver,
    guest: &Guest,
    work_dir: &Path,
    snap_dir: &Path,
    point: &SnapshotPoint,
) -> Result<(), ConformanceError> {
    const CHECK: &str = "snapshot_of_restored";
    for (how, tag) in [
        (crate::RestoreMemory::Mapped, "mapped"),
        (crate::RestoreMemory::Owned, "owned"),
    ] {
        let spec1 = spec_for(driver, guest, work_dir, &format!("gen1-{tag}"));
        let snap2 = work_dir.join(format!("snapshot2-{tag}"));
        let gen1 = driver
            .restore_with(snap_dir, &spec1, how)
            .await
            .map_err(|e| fail(CHECK, format!("restore ({tag}): {e:#}")))?;
        let taken = async {
            // Let it write memory of its own (its counter) before the second
            // snapshot, so that a snapshot still holding the first one's
            // memory would be caught.
            wait_for(
                CHECK,
                Duration::from_secs(10),
                "the restored VM to count",
                || {
                    counters(&console(&spec1))
                        .last()
                        .is_some_and(|n| *n >= point.counter + 3)
                },
            )
            .await?;
            gen1.snapshot(&snap2)
                .await
                .map_err(|e| fail(CHECK, format!("snapshot of a restored VM ({tag}): {e:#}")))?;
            tokio::time::sleep(Duration::from_millis(100)).await;
            SnapshotPoint::of(format!("{}{}", point.console, console(&spec1)))
        }
        .await;
        // The second snapshot must not need the VM it was taken from.
        let cleaned = gen1.cleanup().await;
        let point2 = taken?;
        cleaned.map_err(|e| fail(CHECK, format!("cleanup ({tag}): {e:#}")))?;
        let spec2 = spec_for(driver, guest, work_dir, &format!("gen2-{tag}"));
        let gen2 = driver.restore(&snap2, &spec2).await.map_err(|e| {
            fail(
                CHECK,
                format!("restore of the second snapshot ({tag}): {e:#}"),
            )
        })?;
        let r = async {
            wait_for(
                CHECK,
                Duration::from_secs(10),
                "the second restore to count",
                || counters(&console(&spec2)).len() >= 2,
            )
            .await?;
            point2.continued_by(
                CHECK,
                &format!("a restore of a restored VM's snapshot ({tag})"),
                &console(&spec2),
            )?;
            expect_status(CHECK, gen2.as_ref(), VmStatus::Running).await
        }
        .await;
        let cleaned = gen2.cleanup().await;
        r?;
        cleaned.map_err(|e| fail(CHECK, format!("cleanup ({tag}): {e:#}")))?;
        gone(CHECK, "the restored VMs", &spec1.dir)?;
        gone(CHECK, "the restored VMs", &spec2.dir)?;
        let _ = std::fs::remove_dir_all(&snap2);
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn point(console: &str) -> SnapshotPoint {
        SnapshotPoint::of(console.to_owned()).expect("has counters")
    }

    #[test]
    fn a_restore_continues_the_count() {
        let p = point("kiln-counter 0\nkiln-counter 1\nkiln-counter 2\n");
        assert_eq!(p.counter, 2);
        assert_eq!(
            p.continued_by("t", "clone", "kiln-counter 3\nkiln-counter 4\nkiln-cou")
                .expect("continues"),
            vec![3, 4]
        );
    }

    #[test]
    fn a_snapshot_in_the_middle_of_a_line_is_finished_by_the_restore() {
        let p = point("kiln-counter 0\nkiln-counter 1\nkiln-coun");
        assert_eq!(p.counter, 1);
        assert_eq!(
            p.continued_by("t", "clone", "ter 2\nkiln-counter 3\n")
                .expect("continues"),
            vec![2, 3]
        );
    }

    #[test]
    fn a_wrong_start_another_vms_output_or_noise_is_refused() {
        let p = point("kiln-counter 0\nkiln-counter 1\n");
        // Started from the wrong place.
        let e = p
            .continued_by("t", "clone 1", "kiln-counter 3\nkiln-counter 4\n")
            .expect_err("a gap");
        assert!(e.message.contains("clone 1"), "{e}");
        // Two identical guests writing into one console.
        p.continued_by(
            "t",
            "clone",
            "kiln-counter 2\nkiln-counter 2\nkiln-counter 3\nkiln-counter 3\n",
        )
        .expect_err("interleaved output");
        // Something that is not a counter line.
        p.continued_by("t", "clone", "kiln-counter 2\nhello\nkiln-counter 3\n")
            .expect_err("foreign output");
        // Nothing yet.
        p.continued_by("t", "clone", "").expect_err("no output");
    }

    #[tokio::test]
    async fn join_all_runs_the_futures_together() {
        // Each waits for all three: only concurrent polling completes.
        let barrier = tokio::sync::Barrier::new(3);
        let barrier = &barrier;
        let out = tokio::time::timeout(
            Duration::from_secs(10),
            join_all(
                [3u64, 1, 2]
                    .into_iter()
                    .map(|n| async move {
                        tokio::time::sleep(Duration::from_millis(n)).await;
                        barrier.wait().await;
                        n
                    })
                    .collect(),
            ),
        )
        .await
        .expect("the futures ran together");
        assert_eq!(out, vec![3, 1, 2]);
    }
}
