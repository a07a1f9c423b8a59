//! `kiln bench density`: how many idle sandboxes one host holds, and what
//! each costs in host memory, for each way a sandbox can start: booted,
//! warm-started from a template, paused warm-pool members, and forks.
//!
//! Everything goes through the `kiln` binary as a user would. For each
//! kind, sandboxes are started one after another until `--count` or until
//! the host's available memory fell by `--budget-mib`; once their guests are
//! idle, the benchmark reports the PSS of their VMMs and supervisors
//! (`/proc/PID/smaps_rollup`, summed, per sandbox) and the drop of the
//! host's `MemAvailable` per sandbox (what the host really gave up,
//! including page cache of the RAM files). Then it removes them.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use kiln_node::store::Store;
use serde_json::json;

use crate::bench::{kiln, sandbox_pss};
use crate::bench_fork::{Idle, wait_idle};

/// What `kiln bench density` starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// `kiln run -d --cold`: booted.
    Boot,
    /// `kiln run -d` with the image's template and no pool: restored.
    Warm,
    /// `kiln template create --pool N`: paused warm-pool members.
    Pool,
    /// `kiln fork ID -n N-1` of one running sandbox.
    Fork,
}

/// One kind's result.
#[derive(Debug, serde::Serialize)]
struct Density {
    kind: Kind,
    count: usize,
    /// Seconds to start them all.
    start_secs: f64,
    /// Why it stopped at `count` (reached `--count`, or the budget).
    stopped_by: &'static str,
    idle: Option<Idle>,
    pss_kib_total: u64,
    pss_kib_per_sandbox: u64,
    vmm_pss_kib_per_sandbox: u64,
    supervisor_pss_kib_per_sandbox: u64,
    mem_available_drop_kib_per_sandbox: u64,
}

/// The host's `MemAvailable`, KiB.
fn mem_available_kib() -> Result<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").context("cannot read /proc/meminfo")?;
    s.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("/proc/meminfo has no MemAvailable")
}

const IDLE_ARGV: [&str; 2] = ["sleep", "1000000"];

/// Resizes the pool of the template of `image` with `memory` MiB.
async fn set_pool(image: &str, memory: &str, n: usize) -> Result<()> {
    let n = n.to_string();
    kiln(&[
        "template", "create", "--memory", memory, "--pool", &n, image,
    ])
    .await?;
    Ok(())
}

pub async fn density(
    store: &Store,
    image: Option<String>,
    kinds: &[Kind],
    count: usize,
    budget_mib: Option<u64>,
    memory_mib: u32,
    out: &Path,
) -> Result<i32> {
    let Some(image) = image else {
        bail!(
            "give the image to benchmark with --image (scripts/quickstart.sh prints a local one)"
        );
    };
    if count == 0 {
        bail!("--count must be at least 1");
    }
    let available = mem_available_kib()?;
    // Default budget: half of what the host has available now.
    let budget_kib = budget_mib.map_or(available / 2, |m| m * 1024);
    if budget_kib >= available {
        bail!(
            "--budget-mib {} is more than the host has available ({} MiB)",
            budget_kib / 1024,
            available / 1024
        );
    }
    let memory = memory_mib.to_string();
    eprintln!(
        "density: up to {count} idle sandboxes of {memory_mib} MiB per kind, budget {} MiB of {} MiB available",
        budget_kib / 1024,
        available / 1024
    );
    // The template every warm kind uses (the resources `kiln run` asks for).
    let template = kiln(&["template", "create", "--memory", &memory, &image]).await?;
    let mut results = vec![];
    for &kind in kinds {
        let mut made = Made::default();
        let r = one_kind(
            store, &image, &memory, kind, count, budget_kib, &template, &mut made,
        )
        .await;
        made.clear().await;
        results.push(r?);
    }
    println!(
        "{:<34} {:>6} {:>9} {:>11} {:>9} {:>9} {:>11}",
        "idle sandboxes (host memory, MiB)",
        "count",
        "start s",
        "PSS/sandbox",
        "VMM",
        "superv.",
        "avail drop"
    );
    for d in &results {
        let mib = |k: u64| k as f64 / 1024.0;
        println!(
            "{:<34} {:>6} {:>9.1} {:>11.1} {:>9.1} {:>9.1} {:>11.1}",
            format!("  {:?} ({})", d.kind, d.stopped_by).to_lowercase(),
            d.count,
            d.start_secs,
            mib(d.pss_kib_per_sandbox),
            mib(d.vmm_pss_kib_per_sandbox),
            mib(d.supervisor_pss_kib_per_sandbox),
            mib(d.mem_available_drop_kib_per_sandbox)
        );
    }
    let doc = json!({
        "benchmark": "density",
        "image": image,
        "memory_mib": memory_mib,
        "budget_kib": budget_kib,
        "results": results,
    });
    std::fs::write(out, serde_json::to_vec_pretty(&doc)?)
        .with_context(|| format!("cannot write {}", out.display()))?;
    eprintln!("wrote {}", out.display());
    Ok(0)
}

/// What one kind started and has not removed yet.
#[derive(Default)]
struct Made {
    sandboxes: Vec<String>,
    /// `(image, memory)` of the pool to empty.
    pool_of: Option<(String, String)>,
}

impl Made {
    async fn clear(&mut self) {
        if let Some((image, memory)) = self.pool_of.take()
            && let Err(e) = set_pool(&image, &memory, 0).await
        {
            eprintln!("kiln bench: cleanup of the pool: {e:#}");
        }
        for ids in self.sandboxes.chunks(16) {
            let mut args = vec!["rm", "-f"];
            args.extend(ids.iter().map(String::as_str));
            if let Err(e) = kiln(&args).await {
                eprintln!("kiln bench: cleanup: {e:#}");
            }
        }
        self.sandboxes.clear();
    }
}

#[allow(clippy::too_many_arguments)]
async fn one_kind(
    store: &Store,
    image: &str,
    memory: &str,
    kind: Kind,
    count: usize,
    budget_kib: u64,
    template: &str,
    made: &mut Made,
) -> Result<Density> {
    // Let what the previous kind freed settle before the baseline.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let base = mem_available_kib()?;
    let over_budget = || mem_available_kib().map(|a| base.saturating_sub(a) >= budget_kib);
    let t0 = Instant::now();
    let mut stopped_by = "count";
    // Pool members are removed by emptying the pool, not one by one.
    let mut members = vec![];
    eprintln!("{kind:?}: starting up to {count}");
    match kind {
        Kind::Boot | Kind::Warm => {
            for i in 0..count {
                let mut args = vec!["run", "-d", "--memory", memory];
                if kind == Kind::Boot {
                    args.push("--cold");
                }
                args.push(image);
                args.push("--");
                args.extend(IDLE_ARGV);
                made.sandboxes.push(kiln(&args).await?);
                if over_budget()? {
                    stopped_by = "budget";
                    break;
                }
                if (i + 1) % 10 == 0 {
                    eprintln!("  {} running", i + 1);
                }
            }
        }
        Kind::Pool => {
            made.pool_of = Some((image.to_string(), memory.to_string()));
            set_pool(image, memory, count).await?;
            let pool = kiln_node::pool::Pool::of(store.dirs(), template);
            let deadline = Instant::now() + Duration::from_secs(60 + 10 * count as u64);
            while pool.ready().len() < count {
                if over_budget()? {
                    stopped_by = "budget";
                    break;
                }
                if Instant::now() > deadline {
                    bail!(
                        "the pool of {template} has {} of {count} members ready",
                        pool.ready().len()
                    );
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            members = pool.ready();
        }
        Kind::Fork => {
            let mut args = vec!["run", "-d", "--memory", memory, image, "--"];
            args.extend(IDLE_ARGV);
            let src = kiln(&args).await?;
            made.sandboxes.push(src.clone());
            // Forks in batches, so the budget is checked as they grow.
            while made.sandboxes.len() < count {
                let n = (count - made.sandboxes.len()).min(10).to_string();
                let ids = kiln(&["fork", &src, "-n", &n]).await?;
                made.sandboxes.extend(ids.lines().map(str::to_string));
                if over_budget()? {
                    stopped_by = "budget";
                    break;
                }
            }
        }
    }
    let start_secs = t0.elapsed().as_secs_f64();
    let ids = if kind == Kind::Pool {
        members
    } else {
        made.sandboxes.clone()
    };
    let n = ids.len().max(1) as u64;
    // Paused pool members use no CPU; the others must have settled.
    let idle = if kind == Kind::Pool {
        None
    } else {
        Some(wait_idle(store, &ids).await?)
    };
    let (mut vmm, mut sup) = (0, 0);
    for id in &ids {
        let (v, s) = sandbox_pss(store, id)?;
        vmm += v;
        sup += s;
    }
    let drop = base.saturating_sub(mem_available_kib()?);
    Ok(Density {
        kind,
        count: ids.len(),
        start_secs,
        stopped_by,
        idle,
        pss_kib_total: vmm + sup,
        pss_kib_per_sandbox: (vmm + sup) / n,
        vmm_pss_kib_per_sandbox: vmm / n,
        supervisor_pss_kib_per_sandbox: sup / n,
        mem_available_drop_kib_per_sandbox: drop / n,
    })
}
