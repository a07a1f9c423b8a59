//! `kiln bench warm`, fork and snapshot part: `kiln fork ID -n N` end to
//! end, `kiln snapshot` time and size at two guest sizes, and the host memory
//! of N idle forks against one. Everything goes through the `kiln` binary, as
//! a user would; PSS comes from `/proc/PID/smaps_rollup`.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use kiln_node::snapshot::{self, SnapshotStore};
use kiln_node::store::Store;
use serde_json::{Value, json};

use crate::bench::{Stats, kiln, sandbox_pids, sandbox_pss, stats};

/// Options of the fork and snapshot measurements of `kiln bench warm`.
#[derive(Debug, Clone, clap::Args)]
pub struct ForkBenchArgs {
    /// Repetitions of `kiln fork ID -n FORKS`, per source sandbox (one
    /// warm-started, one cold-booted).
    #[arg(long, default_value_t = 5)]
    pub fork_runs: usize,
    /// Sandboxes per `kiln fork`.
    #[arg(long, default_value_t = 10)]
    pub forks: u32,
    /// Repetitions of `kiln snapshot` per guest size.
    #[arg(long, default_value_t = 3)]
    pub snapshot_runs: usize,
    /// MiB each snapshotted guest writes into its /dev/shm (a tmpfs, so
    /// guest RAM) before the snapshots; 0 leaves the guest idle.
    #[arg(long, default_value_t = 64)]
    pub dirty_mib: u32,
    /// Skip the fork and snapshot measurements.
    #[arg(long)]
    pub skip_fork: bool,
}

/// The fork source's main process: prints a counter once a second.
const COUNTER: &str = "i=0; while true; do i=$((i+1)); echo $i; sleep 1; done";
/// A guest counts as idle when its VMM uses less CPU than this.
const IDLE_CPU: f64 = 0.10;
/// Window over which idleness is measured.
const IDLE_WINDOW: Duration = Duration::from_secs(2);
/// Longest wait for guests to become idle.
const IDLE_MAX: Duration = Duration::from_secs(30);
/// Clock ticks per second of /proc/PID/stat (USER_HZ, 100 on Linux).
const USER_HZ: f64 = 100.0;

/// How a sandbox of the benchmark is started.
#[derive(Debug, Clone, Copy)]
enum Start {
    /// `kiln run` finds the template: restored from it (the default).
    Warm,
    /// `kiln run --cold`: booted.
    Cold,
}

/// Host memory of a group of sandboxes, KiB (PSS, summed).
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
struct Pss {
    vmm_kib: u64,
    supervisor_kib: u64,
    total_kib: u64,
}

/// Idle guests: how long they took to get there, and their CPU use then.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub(crate) struct Idle {
    waited_ms: u64,
    /// CPU use of the VMMs over the last window, per VM (1.0 = one core).
    cpu_per_vm: f64,
    settled: bool,
}

#[derive(Debug, serde::Serialize)]
struct ForkSource {
    /// `true` if the source really was restored from the template.
    source_warm_started: bool,
    forks: u32,
    /// `kiln fork ID -n FORKS` wall time, until it exits with all running.
    total: Stats,
    /// The same divided by `forks`.
    per_fork: Stats,
    /// The source, idle, measured with `one_fork` next to it.
    source_pss: Pss,
    /// One sandbox forked alone (`kiln fork ID -n 1`), idle.
    one_fork_pss: Pss,
    /// How the source and that one fork became idle.
    one_fork_idle: Idle,
    /// The `forks` sandboxes of the last repetition, idle, summed.
    all_forks_pss: Pss,
    all_forks_idle: Idle,
}

#[derive(Debug, serde::Serialize)]
struct SnapshotSize {
    memory_mib: u32,
    warm_started: bool,
    dirty_mib: u32,
    /// `kiln snapshot ID` wall time.
    wall: Stats,
    /// How long the guest was stopped (from the manifest).
    downtime: Stats,
    /// Bytes allocated on disk (sparse files count their blocks), per run.
    allocated_bytes: Vec<u64>,
    /// Of which the driver's part (device state and guest RAM), per run.
    vmm_allocated_bytes: Vec<u64>,
    /// Apparent size of the snapshot's files (holes included).
    apparent_bytes: u64,
    /// Of which the driver's part.
    vmm_apparent_bytes: u64,
}

/// Results of the fork and snapshot measurements.
pub struct ForkBench {
    sources: Vec<ForkSource>,
    snapshots: Vec<SnapshotSize>,
}

/// Sandboxes and snapshots the benchmark made and has not removed yet.
#[derive(Default)]
struct Made {
    sandboxes: Vec<String>,
    snapshots: Vec<String>,
}

impl Made {
    async fn rm(&mut self, ids: &[String]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut args = vec!["rm", "-f"];
        args.extend(ids.iter().map(String::as_str));
        kiln(&args).await?;
        self.sandboxes.retain(|s| !ids.contains(s));
        Ok(())
    }

    async fn rm_snapshot(&mut self, name: &str) -> Result<()> {
        kiln(&["snapshot", "rm", name]).await?;
        self.snapshots.retain(|s| s != name);
        Ok(())
    }

    /// Removes whatever is left (after an error).
    async fn clear(&mut self) {
        let ids = std::mem::take(&mut self.sandboxes);
        if let Err(e) = self.rm(&ids).await {
            eprintln!("kiln bench: cleanup: {e:#}");
        }
        for name in std::mem::take(&mut self.snapshots) {
            if let Err(e) = self.rm_snapshot(&name).await {
                eprintln!("kiln bench: cleanup: {e:#}");
            }
        }
    }

    /// `kiln run -d [--cold] [--memory M] IMAGE -- ARGV`; the sandbox ID.
    async fn run(
        &mut self,
        image: &str,
        start: Start,
        memory_mib: u32,
        argv: &[&str],
    ) -> Result<String> {
        let memory = memory_mib.to_string();
        let mut args = vec!["run", "-d", "--memory", &memory];
        if matches!(start, Start::Cold) {
            args.push("--cold");
        }
        args.push(image);
        args.push("--");
        args.extend(argv);
        let id = kiln(&args).await?;
        self.sandboxes.push(id.clone());
        Ok(id)
    }

    /// `kiln fork ID -n N`: the new IDs and the command's wall time.
    async fn fork(&mut self, id: &str, n: u32) -> Result<(Vec<String>, Duration)> {
        let t = Instant::now();
        let out = kiln(&["fork", id, "-n", &n.to_string()]).await;
        let wall = t.elapsed();
        // Even if it failed, list what it made, so it is removed.
        let ids: Vec<String> = match &out {
            Ok(out) => out.lines().map(str::to_string).collect(),
            Err(_) => vec![],
        };
        self.sandboxes.extend(ids.iter().cloned());
        out?;
        if ids.len() != n as usize {
            bail!("kiln fork -n {n} printed {} IDs", ids.len());
        }
        Ok((ids, wall))
    }
}

pub async fn measure(store: &Store, image: &str, args: &ForkBenchArgs) -> Result<ForkBench> {
    if args.fork_runs == 0 || args.forks == 0 || args.snapshot_runs == 0 {
        bail!("--fork-runs, --forks and --snapshot-runs must be at least 1");
    }
    let mut made = Made::default();
    let result = async {
        let mut sources = vec![];
        for start in [Start::Warm, Start::Cold] {
            sources.push(fork_source(store, image, start, args, &mut made).await?);
        }
        let mut snapshots = vec![];
        for (memory_mib, start) in [(256, Start::Cold), (1024, Start::Cold), (256, Start::Warm)] {
            snapshots.push(snapshot_size(store, image, memory_mib, start, args, &mut made).await?);
        }
        Ok(ForkBench { sources, snapshots })
    }
    .await;
    made.clear().await;
    result
}

/// Fork timing and memory for one source sandbox.
async fn fork_source(
    store: &Store,
    image: &str,
    start: Start,
    args: &ForkBenchArgs,
    made: &mut Made,
) -> Result<ForkSource> {
    let src = made.run(image, start, 256, &["sh", "-c", COUNTER]).await?;
    let source_warm_started = store.load(&src)?.template.is_some();
    eprintln!("fork source {src} ({start:?} start requested)");

    // One fork alone, idle, next to its idle source.
    let (one, _) = made.fork(&src, 1).await?;
    check_running(&one).await?;
    let one_fork_idle = wait_idle(store, &[src.clone(), one[0].clone()]).await?;
    let source_pss = pss(store, std::slice::from_ref(&src))?;
    let one_fork_pss = pss(store, &one)?;
    made.rm(&one).await?;

    // `kiln fork -n N`, repeated; the last N stay for the memory measurement.
    let mut totals = vec![];
    let mut forks = vec![];
    for r in 0..args.fork_runs {
        let (ids, wall) = made.fork(&src, args.forks).await?;
        totals.push(wall);
        check_running(&ids).await?;
        eprintln!(
            "fork -n {} {}/{}: {} ms",
            args.forks,
            r + 1,
            args.fork_runs,
            wall.as_millis()
        );
        if r + 1 < args.fork_runs {
            made.rm(&ids).await?;
        } else {
            forks = ids;
        }
    }
    let all_forks_idle = wait_idle(store, &forks).await?;
    let all_forks_pss = pss(store, &forks)?;
    made.rm(&forks).await?;
    made.rm(&[src]).await?;

    let per_fork: Vec<Duration> = totals.iter().map(|t| *t / args.forks).collect();
    Ok(ForkSource {
        source_warm_started,
        forks: args.forks,
        total: stats(&totals),
        per_fork: stats(&per_fork),
        source_pss,
        one_fork_pss,
        one_fork_idle,
        all_forks_pss,
        all_forks_idle,
    })
}

/// `kiln snapshot` of one guest, repeated: wall time, downtime, size.
async fn snapshot_size(
    store: &Store,
    image: &str,
    memory_mib: u32,
    start: Start,
    args: &ForkBenchArgs,
    made: &mut Made,
) -> Result<SnapshotSize> {
    let id = made
        .run(image, start, memory_mib, &["sleep", "3600"])
        .await?;
    let warm_started = store.load(&id)?.template.is_some();
    if args.dirty_mib > 0 {
        let count = format!("count={}", args.dirty_mib);
        kiln(&[
            "exec",
            &id,
            "--",
            "dd",
            "if=/dev/urandom",
            "of=/dev/shm/dirty",
            "bs=1M",
            &count,
        ])
        .await
        .context("the guest could not dirty its memory")?;
    }
    let snapshots = SnapshotStore::new(store.dirs());
    let mut wall = vec![];
    let mut downtime = vec![];
    let mut allocated_bytes = vec![];
    let mut vmm_allocated_bytes = vec![];
    let mut apparent_bytes = 0;
    let mut vmm_apparent_bytes = 0;
    for _ in 0..args.snapshot_runs {
        let t = Instant::now();
        let name = kiln(&["snapshot", &id]).await?;
        wall.push(t.elapsed());
        made.snapshots.push(name.clone());
        let m = snapshots.manifest(&name)?;
        downtime.push(Duration::from_millis(m.downtime_ms));
        let dir = snapshots.dir(&name);
        allocated_bytes.push(snapshot::disk_usage(&dir));
        vmm_allocated_bytes.push(snapshot::disk_usage(&dir.join(snapshot::VM_DIR)));
        apparent_bytes = m.total_size();
        vmm_apparent_bytes = m
            .files
            .iter()
            .filter(|f| Path::new(&f.path).starts_with(snapshot::VM_DIR))
            .map(|f| f.size)
            .sum();
        made.rm_snapshot(&name).await?;
    }
    made.rm(&[id]).await?;
    eprintln!("snapshots of a {memory_mib} MiB guest done");
    Ok(SnapshotSize {
        memory_mib,
        warm_started,
        dirty_mib: args.dirty_mib,
        wall: stats(&wall),
        downtime: stats(&downtime),
        allocated_bytes,
        vmm_allocated_bytes,
        apparent_bytes,
        vmm_apparent_bytes,
    })
}

/// Fails unless every sandbox runs commands (`kiln exec ID -- true`).
async fn check_running(ids: &[String]) -> Result<()> {
    for id in ids {
        kiln(&["exec", id, "--", "true"])
            .await
            .with_context(|| format!("fork {id} is not running"))?;
    }
    Ok(())
}

fn pss(store: &Store, ids: &[String]) -> Result<Pss> {
    let mut p = Pss::default();
    for id in ids {
        let (vmm, supervisor) = sandbox_pss(store, id)?;
        p.vmm_kib += vmm;
        p.supervisor_kib += supervisor;
    }
    p.total_kib = p.vmm_kib + p.supervisor_kib;
    Ok(p)
}

/// CPU time (user + system) of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // Fields after the command name, which may contain spaces: state is
    // field 3, utime 14 and stime 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    get(11) + get(12)
}

/// Waits until the VMMs of `ids` together use less than `IDLE_CPU` of a
/// core each over `IDLE_WINDOW` (at most `IDLE_MAX`).
pub(crate) async fn wait_idle(store: &Store, ids: &[String]) -> Result<Idle> {
    let pids = ids
        .iter()
        .map(|id| sandbox_pids(store, id).map(|(vmm, _)| vmm))
        .collect::<Result<Vec<_>>>()?;
    let total = || pids.iter().map(|p| cpu_ticks(*p)).sum::<u64>();
    let t0 = Instant::now();
    loop {
        let before = total();
        tokio::time::sleep(IDLE_WINDOW).await;
        let used = total().saturating_sub(before) as f64 / USER_HZ;
        let cpu_per_vm = used / IDLE_WINDOW.as_secs_f64() / pids.len().max(1) as f64;
        let settled = cpu_per_vm < IDLE_CPU;
        if settled || t0.elapsed() >= IDLE_MAX {
            return Ok(Idle {
                waited_ms: t0.elapsed().as_millis() as u64,
                cpu_per_vm,
                settled,
            });
        }
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

fn started(warm: bool) -> &'static str {
    if warm { "warm-started" } else { "cold-booted" }
}

impl ForkBench {
    pub fn print(&self) {
        for s in &self.sources {
            let src = started(s.source_warm_started);
            println!(
                "{:<48} {:>9.1} {:>9.1} {:>9.1}",
                format!("kiln fork -n {} ({src} source): all running", s.forks),
                s.total.p50_ms,
                s.total.p90_ms,
                s.total.p99_ms
            );
            println!(
                "{:<48} {:>9.1} {:>9.1} {:>9.1}",
                format!("  per fork (total / {})", s.forks),
                s.per_fork.p50_ms,
                s.per_fork.p90_ms,
                s.per_fork.p99_ms
            );
        }
        println!(
            "{:<48} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "kiln snapshot (sizes in MiB)",
            "p50 ms",
            "p90 ms",
            "down p50",
            "allocated",
            "ram+state",
            "apparent"
        );
        for s in &self.snapshots {
            println!(
                "{:<48} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1}",
                format!(
                    "  {} MiB guest, {}, {} MiB dirtied",
                    s.memory_mib,
                    started(s.warm_started),
                    s.dirty_mib
                ),
                s.wall.p50_ms,
                s.wall.p90_ms,
                s.downtime.p50_ms,
                mib(s.allocated_bytes.iter().copied().max().unwrap_or(0)),
                mib(s.vmm_allocated_bytes.iter().copied().max().unwrap_or(0)),
                mib(s.apparent_bytes)
            );
        }
        println!(
            "{:<48} {:>9} {:>9} {:>9} {:>9}",
            "idle host memory (PSS, VMM + supervisor)", "source", "1 fork", "N forks", "N/(N×1)"
        );
        for s in &self.sources {
            let one = s.one_fork_pss.total_kib as f64;
            let all = s.all_forks_pss.total_kib as f64;
            println!(
                "{:<48} {:>9.1} {:>9.1} {:>9.1} {:>9.2}",
                format!(
                    "  MiB, {} source, N = {}",
                    started(s.source_warm_started),
                    s.forks
                ),
                s.source_pss.total_kib as f64 / 1024.0,
                one / 1024.0,
                all / 1024.0,
                all / (one * s.forks as f64)
            );
        }
    }

    pub fn json(&self) -> Value {
        json!({
            "fork": self.sources,
            "snapshot": self.snapshots,
        })
    }
}
