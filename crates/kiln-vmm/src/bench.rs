//! Boot, restore and fork timings of a driver with the bare-metal counter
//! guest, so that drivers can be compared in one run (QEMU beside
//! Firecracker). Measured from the caller's side of the trait, to the
//! guest's first counter line (its first output that proves it runs):
//! - boot: `start()` call → first counter line;
//! - snapshot: the guest's downtime as the driver reports it;
//! - restore: `restore()` call → first counter line after the snapshot's;
//! - fork: [`FORK_CLONES`](crate::conformance::FORK_CLONES) restores of one
//!   snapshot started at once → the last of their first counter lines.
//!
//! Every VM is cleaned up, also on error. This module only measures; the
//! conformance suite is what checks behaviour.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::testguest::counters;
use crate::{VmSpec, VmmDriver};

/// One driver's timings, one entry per round.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct BenchReport {
    /// `kind version (accel)`.
    pub driver: String,
    pub boot: Vec<Duration>,
    pub snapshot_downtime: Vec<Duration>,
    pub restore: Vec<Duration>,
    pub fork: Vec<Duration>,
}

#[derive(Debug, thiserror::Error)]
#[error("bench {phase} failed: {message}")]
pub struct BenchError {
    pub phase: &'static str,
    pub message: String,
}

fn err(phase: &'static str, e: impl std::fmt::Display) -> BenchError {
    BenchError {
        phase,
        message: format!("{e:#}"),
    }
}

/// Run `rounds` rounds of boot → snapshot → restore → fork with the
/// bare-metal counter guest `elf` in `work_dir` (created).
pub async fn measure(
    driver: &dyn VmmDriver,
    elf: &Path,
    work_dir: &Path,
    rounds: usize,
) -> Result<BenchReport, BenchError> {
    let info = driver.info();
    // The version number alone: "QEMU emulator version 10.0.2 (Debian …)"
    // → 10.0.2, "Firecracker v1.16.1" → 1.16.1.
    let version = info
        .version
        .split_whitespace()
        .map(|w| w.trim_start_matches('v'))
        .find(|w| w.starts_with(|c: char| c.is_ascii_digit()))
        .unwrap_or(&info.version);
    let mut report = BenchReport {
        driver: format!("{} {version} ({})", info.kind, info.accel),
        ..BenchReport::default()
    };
    std::fs::create_dir_all(work_dir).map_err(|e| err("setup", e))?;
    for round in 0..rounds {
        let dir = work_dir.join(format!("round{round}"));
        let result = one_round(driver, elf, &dir, &mut report).await;
        let _ = std::fs::remove_dir_all(&dir);
        result?;
    }
    Ok(report)
}

fn spec(elf: &Path, dir: &Path, name: &str) -> VmSpec {
    VmSpec {
        id: format!("bench-{name}"),
        dir: dir.join(name),
        kernel: elf.to_owned(),
        initrd: None,
        cmdline: String::new(),
        cpus: 1,
        memory_mib: 32,
        disks: vec![],
        agent_channel: false,
        console_log: dir.join(name).join("console.log"),
        network: None,
    }
}

fn count(path: &Path) -> usize {
    counters(&String::from_utf8_lossy(
        &std::fs::read(path).unwrap_or_default(),
    ))
    .len()
}

/// Poll (1 ms) until `console` holds more than `after` counter lines.
async fn first_line(
    phase: &'static str,
    console: &Path,
    after: usize,
) -> Result<Instant, BenchError> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if count(console) > after {
            return Ok(Instant::now());
        }
        if Instant::now() >= deadline {
            return Err(err(phase, "no counter line within 30 s"));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

async fn one_round(
    driver: &dyn VmmDriver,
    elf: &Path,
    dir: &Path,
    report: &mut BenchReport,
) -> Result<(), BenchError> {
    let source = spec(elf, dir, "src");
    let started = Instant::now();
    let vm = driver.start(&source).await.map_err(|e| err("boot", e))?;
    let booted = async {
        let line = first_line("boot", &source.console_log, 0).await?;
        report.boot.push(line - started);
        let snap = dir.join("snapshot");
        let info = vm.snapshot(&snap).await.map_err(|e| err("snapshot", e))?;
        report.snapshot_downtime.push(info.downtime);
        Ok::<PathBuf, BenchError>(snap)
    }
    .await;
    let _ = vm.cleanup().await;
    let snap = booted?;
    // Restore: one clone alone. The restored console is new, so its first
    // counter line is the first after the snapshot.
    let restored = spec(elf, dir, "restored");
    let started = Instant::now();
    let vm = driver
        .restore(&snap, &restored)
        .await
        .map_err(|e| err("restore", e))?;
    let line = first_line("restore", &restored.console_log, 0).await;
    let _ = vm.cleanup().await;
    report.restore.push(line? - started);
    // Fork: the clones at once; the time until the last one prints.
    let clones: Vec<VmSpec> = (0..crate::conformance::FORK_CLONES)
        .map(|i| spec(elf, dir, &format!("fork{i}")))
        .collect();
    let started = Instant::now();
    let restores = crate::conformance::join_all(
        clones
            .iter()
            .map(|c| driver.restore(&snap, c))
            .collect::<Vec<_>>(),
    )
    .await;
    let mut last = Ok(started);
    for (clone, restored) in clones.iter().zip(&restores) {
        last = match (last, restored) {
            (Ok(last), Ok(_)) => first_line("fork", &clone.console_log, 0)
                .await
                .map(|t| t.max(last)),
            (Ok(_), Err(e)) => Err(err("fork", e)),
            (e, _) => e,
        };
    }
    for vm in restores.into_iter().flatten() {
        let _ = vm.cleanup().await;
    }
    report.fork.push(last? - started);
    Ok(())
}

/// The median and range of `values`, as `median (min–max)` in ms.
pub fn summary(values: &[Duration]) -> String {
    if values.is_empty() {
        return "-".into();
    }
    let mut sorted = values.to_vec();
    sorted.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    format!(
        "{:.0} ms ({:.0}–{:.0})",
        ms(sorted[sorted.len() / 2]),
        ms(sorted[0]),
        ms(sorted[sorted.len() - 1])
    )
}

/// A Markdown table of reports side by side.
pub fn table(reports: &[BenchReport]) -> String {
    let mut out = String::from(
        "| driver | boot → first line | snapshot downtime | restore → first line | fork of 3 → last first line |\n|---|---|---|---|---|\n",
    );
    for r in reports {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            r.driver,
            summary(&r.boot),
            summary(&r.snapshot_downtime),
            summary(&r.restore),
            summary(&r.fork)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries() {
        let ms = Duration::from_millis;
        assert_eq!(summary(&[]), "-");
        assert_eq!(summary(&[ms(30), ms(10), ms(20)]), "20 ms (10–30)");
        let t = table(&[BenchReport {
            driver: "qemu 10 (tcg)".into(),
            boot: vec![ms(40)],
            ..BenchReport::default()
        }]);
        assert!(t.contains("| qemu 10 (tcg) | 40 ms (40–40) | - |"), "{t}");
    }
}
