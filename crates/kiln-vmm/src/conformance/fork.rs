//! Snapshot, restore, fork and snapshot-of-a-restored-VM checks of the
//! conformance suite (counter guests only: their output makes every check
//! exact).

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::task::Poll;
use std::time::{Duration, Instant};

use super::*;

/// Snapshot a running counter guest, restore it once alone, then fork it
/// ([`fork`]). The source runs on throughout and must be undisturbed; the
/// snapshot must be unchanged by every VM restored from it; nothing may be
/// left behind.
pub(super) async fn snapshot_restore(
    driver: &dyn VmmDriver,
    guest: &Guest,
    work_dir: &Path,
    report: &mut Report,
) -> Result<(), ConformanceError> {
    const CHECK: &str = "snapshot_restore";
    let spec = spec_for(guest, work_dir, "snap-src");
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
        let rspec = spec_for(guest, work_dir, "restored");
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
        report.pass("snapshot_restore");

        snapshot_of_restored(driver, guest, work_dir, &snap_dir, &point).await?;
        report.pass("snapshot_of_restored");

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
        .map(|i| spec_for(guest, work_dir, &format!("fork-{i}")))
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
    report.pass(CHECK);
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
pub(crate) async fn join_all<F: Future>(futures: Vec<F>) -> Vec<F::Output> {
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
        let spec1 = spec_for(guest, work_dir, &format!("gen1-{tag}"));
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
        let spec2 = spec_for(guest, work_dir, &format!("gen2-{tag}"));
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
