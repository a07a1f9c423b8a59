//! `kiln bench warm`: cold against warm starts of the same image on the same
//! driver, in one run, and what the warm path costs beyond the VMM's own
//! restore; then `bench_fork`: fork, snapshot size, memory of forks.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use kiln_node::agent::AgentClient;
use kiln_node::paths::GuestArtifacts;
use kiln_node::snapshot;
use kiln_node::store::SandboxSpec;
use kiln_node::template;
use serde_json::json;

use crate::bench::{first_byte, stats};
use crate::bench_fork::ForkBenchArgs;

pub async fn warm(
    node: &kiln_node::node::Node,
    image: Option<String>,
    runs: usize,
    concurrent: usize,
    fork: &ForkBenchArgs,
    out: &Path,
) -> Result<i32> {
    let Some(image) = image else {
        bail!(
            "give the image to benchmark with --image (scripts/quickstart.sh prints a local one)"
        );
    };
    if runs == 0 || concurrent == 0 {
        bail!("--runs and --concurrent must be at least 1");
    }
    let (drv, sel) = kiln_node::vm::driver_for(kiln_vmm::DriverChoice::Auto)?;
    eprintln!("driver: {} with {} ({})", sel.kind, sel.accel, sel.reason);

    // The template `kiln run` will find (the defaults of `kiln run`). In a
    // fresh state directory it is made the user's way: one cold `kiln run`,
    // after which the node makes the image's automatic template in the
    // background.
    let store = node.store();
    let img =
        crate::images::pull(node, &image, &[], false, crate::images::PullPolicy::Missing).await?;
    let tspec = SandboxSpec {
        image: image.clone(),
        image_digest: img.digest.clone(),
        image_disk: img.disk.clone(),
        argv: vec![],
        env: vec![],
        cwd: None,
        user: None,
        tty: false,
        stdin: false,
        cpus: 1,
        memory_mib: 256,
        disk_mib: 4096,
        timeout_secs: None,
        driver: "auto".into(),
        auto_remove: false,
        log_limit: None,
        network: None,
    };
    let name = match node.find_template(&tspec, false) {
        Ok(name) => name,
        Err(_) => automatic_template(node, &tspec).await?,
    };
    let automatic = node
        .list_templates()
        .await?
        .iter()
        .any(|e| e.manifest.name == name && e.automatic);
    eprintln!(
        "template {name} ({})",
        if automatic {
            "automatic"
        } else {
            "made by hand"
        }
    );

    // The template path is measured first: no pool may serve these runs.
    node.drain_pool(&name).await?;

    let run_args = |cold: bool| {
        let mut a: Vec<String> = vec!["run".into(), "--rm".into()];
        if cold {
            a.push("--cold".into());
        }
        a.extend([image.clone(), "--".into(), "echo".into(), "ready".into()]);
        a
    };

    // 1. Cold and warm `kiln run` → first output byte, the whole warm
    // `kiln run -- echo x` (start → exit, as a user waits for it) and the
    // raw driver restore of the same template (spawn → VM running, spawn →
    // the guest agent answers: what any warm start must wait), interleaved
    // so that every ratio's sides see the same machine.
    let templates = template::store(store.dirs());
    let tdir = templates.dir(&name);
    let artifacts = GuestArtifacts::locate(store.dirs())?;
    let scratch = tempfile::tempdir().context("cannot create a scratch directory")?;
    let holder = format!("bench-{}", std::process::id());
    templates.add_user(&name, &holder)?;
    let mut cold = Vec::new();
    let mut warm = Vec::new();
    let mut warm_whole = Vec::new();
    let mut restore = Vec::new();
    let mut restore_agent = Vec::new();
    let measured = async {
        for i in 0..runs {
            cold.push(first_byte(run_args(true)).await?);
            warm.push(first_byte(run_args(false)).await?);
            warm_whole.push(whole_run(&image).await?);
            let dir = scratch.path().join(format!("r{i}"));
            std::fs::create_dir_all(&dir)?;
            let rw = dir.join(snapshot::RW_DISK);
            snapshot::sparse_copy(&tdir.join(snapshot::RW_DISK), &rw).await?;
            let spec = kiln_node::vm::sandbox_vm_spec(
                &*drv,
                &format!("bench{i}"),
                &tspec,
                &artifacts,
                &dir,
                rw,
            );
            let t = Instant::now();
            let vm = drv.restore(&tdir.join(snapshot::VM_DIR), &spec).await?;
            restore.push(t.elapsed());
            let stream = vm.connect_agent().await?;
            let (agent, _) = AgentClient::connect(stream, Duration::from_secs(60)).await?;
            restore_agent.push(t.elapsed());
            drop(agent);
            let _ = vm.kill().await;
            let _ = vm.cleanup().await;
            eprintln!("run {}/{runs}", i + 1);
        }
        Ok::<_, anyhow::Error>(())
    }
    .await;
    templates.release_user(&name, &holder);
    measured?;

    // 3. `concurrent` warm starts at once.
    let t = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..concurrent {
        set.spawn(first_byte(run_args(false)));
    }
    let mut burst = Vec::new();
    while let Some(r) = set.join_next().await {
        burst.push(r.context("a warm start task failed")??);
    }
    // All running = the last first byte (what one warm start is measured
    // to); all gone = every `kiln run` exited (teardown included).
    let exited = t.elapsed();
    let wall = burst.iter().max().copied().unwrap_or_default();

    // 4. `kiln fork`, `kiln snapshot` and the memory of forks.
    let forks = if fork.skip_fork {
        None
    } else {
        Some(crate::bench_fork::measure(store, &image, fork).await?)
    };

    // 5. Warm pool: `kiln run` takes a member restored and paused ahead of
    // time. Each run waits until the pool is full again, so every one is
    // served from it; then `concurrent` at once from a pool that size.
    let pool_size = 2;
    let mut pooled = Vec::new();
    let mut pooled_whole = Vec::new();
    let mut pool_burst = Vec::new();
    let pool_wall;
    let pool_exited;
    {
        let pool = kiln_node::pool::Pool::of(store.dirs(), &name);
        pool.set_size(pool_size)?;
        node.fill_pool(&name, false).await?;
        for i in 0..runs {
            wait_pool(&pool, pool_size as usize).await?;
            pooled.push(first_byte(run_args(false)).await?);
            wait_pool(&pool, pool_size as usize).await?;
            pooled_whole.push(whole_run(&image).await?);
            eprintln!("pool run {}/{runs}", i + 1);
        }
        pool.set_size(concurrent as u32)?;
        node.fill_pool(&name, false).await?;
        let t = Instant::now();
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..concurrent {
            set.spawn(first_byte(run_args(false)));
        }
        while let Some(r) = set.join_next().await {
            pool_burst.push(r.context("a pooled start task failed")??);
        }
        pool_exited = t.elapsed();
        pool_wall = pool_burst.iter().max().copied().unwrap_or_default();
        node.drain_pool(&name).await?;
    }

    let c = stats(&cold);
    let w = stats(&warm);
    let pw = stats(&pooled);
    let pb = stats(&pool_burst);
    let r = stats(&restore);
    let ra = stats(&restore_agent);
    let ww = stats(&warm_whole);
    let pww = stats(&pooled_whole);
    let template_whole_ratio = ww.p50_ms / ra.p50_ms;
    let b = stats(&burst);
    let overhead = w.p50_ms - ra.p50_ms;
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let budget = 1.5 * (concurrent as f64 * w.p50_ms / cores as f64);
    println!(
        "kiln bench warm — driver {} ({}), {} runs, template {name}",
        sel.kind, sel.accel, runs
    );
    println!(
        "{:<48} {:>9} {:>9} {:>9}",
        "measurement", "p50 ms", "p90 ms", "p99 ms"
    );
    for (label, s) in [
        ("kiln run --cold -> first output byte", &c),
        ("kiln run (warm) -> first output byte", &w),
        ("driver restore: spawn -> VM running", &r),
        ("driver restore: spawn -> guest agent answers", &ra),
    ] {
        println!(
            "{:<48} {:>9.1} {:>9.1} {:>9.1}",
            label, s.p50_ms, s.p90_ms, s.p99_ms
        );
    }
    println!(
        "{:<48} {:>9.1} {:>9.1} {:>9.1}",
        format!("{concurrent} warm starts at once -> first byte"),
        b.p50_ms,
        b.p90_ms,
        b.p99_ms
    );
    println!(
        "{:<48} {:>9.1}   (budget 1.5 x {concurrent} x warm p50 / {cores} cores = {budget:.0})",
        format!("{concurrent} warm starts at once: all running"),
        wall.as_secs_f64() * 1000.0
    );
    println!(
        "{:<48} {:>9.1}",
        format!("{concurrent} warm starts at once: all exited"),
        exited.as_secs_f64() * 1000.0
    );
    println!(
        "{:<48} {:>9.1}x",
        "cold p50 / warm p50",
        c.p50_ms / w.p50_ms
    );
    println!(
        "{:<48} {:>9.1} {:>9.1} {:>9.1}",
        format!("kiln run (pool of {pool_size}) -> first output byte"),
        pw.p50_ms,
        pw.p90_ms,
        pw.p99_ms
    );
    println!(
        "{:<48} {:>9.1} {:>9.1} {:>9.1}",
        format!("{concurrent} at once from a pool of {concurrent} -> first byte"),
        pb.p50_ms,
        pb.p90_ms,
        pb.p99_ms
    );
    let pool_budget = 1.5 * (concurrent as f64 * pw.p50_ms / cores as f64);
    println!(
        "{:<48} {:>9.1}   (budget 1.5 x {concurrent} x pool p50 / {cores} cores = {pool_budget:.0})",
        format!("{concurrent} at once from the pool: all running"),
        pool_wall.as_secs_f64() * 1000.0
    );
    println!(
        "{:<48} {:>9.1}",
        format!("{concurrent} at once from the pool: all exited"),
        pool_exited.as_secs_f64() * 1000.0
    );
    println!(
        "{:<48} {:>9.1}x",
        "cold p50 / pool p50",
        c.p50_ms / pw.p50_ms
    );
    println!(
        "{:<48} {:>9.1}   (warm p50 - restore->agent p50)",
        "Kiln overhead p50 ms", overhead
    );
    println!("whole `kiln run IMAGE -- echo x`, start -> exit (targets: issue 11):");
    println!(
        "{:<48} {:>9.1} {:>9.1} {:>9.1}   ({}; {:.2}x restore->agent p50, target <= 3x)",
        "from the template",
        ww.p50_ms,
        ww.p90_ms,
        ww.p99_ms,
        if automatic {
            "automatic"
        } else {
            "made by hand"
        },
        template_whole_ratio
    );
    println!(
        "{:<48} {:>9.1} {:>9.1} {:>9.1}   (target <= 150 ms)",
        format!("from a pool of {pool_size}"),
        pww.p50_ms,
        pww.p90_ms,
        pww.p99_ms
    );
    if let Some(f) = &forks {
        f.print();
    }
    let v = json!({
        "benchmark": "warm",
        "driver": sel.kind.to_string(),
        "accel": sel.accel.to_string(),
        "runs": runs,
        "image": image,
        "template": name,
        "cold_run_to_first_byte": c,
        "warm_run_to_first_byte": w,
        "driver_restore_to_running": r,
        "driver_restore_to_agent": ra,
        "kiln_overhead_p50_ms": overhead,
        "template_automatic": automatic,
        "whole_run_template": ww,
        "whole_run_template_over_restore_to_agent_p50": template_whole_ratio,
        "whole_run_pool": pww,
        "speedup_p50": c.p50_ms / w.p50_ms,
        "concurrent": {
            "n": concurrent,
            "first_byte": b,
            "wall_ms": wall.as_secs_f64() * 1000.0,
            "all_exited_ms": exited.as_secs_f64() * 1000.0,
            "cores": cores,
            "budget_ms": budget,
        },
        "fork_and_snapshot": forks.as_ref().map(|f| f.json()),
        "pool": {
            "size": pool_size,
            "run_to_first_byte": pw,
            "speedup_p50": c.p50_ms / pw.p50_ms,
            "concurrent_first_byte": pb,
            "concurrent_wall_ms": pool_wall.as_secs_f64() * 1000.0,
            "concurrent_all_exited_ms": pool_exited.as_secs_f64() * 1000.0,
            "concurrent_budget_ms": pool_budget,
        },
    });
    std::fs::write(out, serde_json::to_vec_pretty(&v)?)
        .with_context(|| format!("cannot write {}", out.display()))?;
    eprintln!("wrote {}", out.display());
    Ok(0)
}

/// Waits until `pool` has `n` members ready (its background refill).
async fn wait_pool(pool: &kiln_node::pool::Pool, n: usize) -> Result<()> {
    let t0 = Instant::now();
    while pool.ready().len() < n {
        if t0.elapsed() > Duration::from_secs(120) {
            bail!(
                "the pool of {} did not refill to {n} within 120 s",
                pool.template()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// The whole `kiln run IMAGE -- echo x` as a user waits for it: start →
/// exit, its output checked; the sandbox it leaves (no `--rm`) is removed
/// afterwards, outside the measurement.
async fn whole_run(image: &str) -> Result<Duration> {
    let exe = std::env::current_exe().context("cannot find the kiln executable")?;
    let t = Instant::now();
    let out = tokio::process::Command::new(&exe)
        .args(["run", image, "--", "echo", "x"])
        .env(crate::admin::NODE_LOCAL_ENV, "1")
        .stdin(std::process::Stdio::null())
        .output()
        .await?;
    let d = t.elapsed();
    if !out.status.success() || out.stdout != b"x\n" {
        bail!(
            "kiln run {image} -- echo x failed during the benchmark ({}): {:?} {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let store = kiln_node::store::Store::new(kiln_node::paths::Dirs::from_env());
    // Its sandbox: the only one running `echo x` (a claimed pool member
    // existed before the run, under another spec).
    for id in store.ids()? {
        let Ok(rec) = store.load(&id) else { continue };
        if rec.pool.is_none() && rec.spec.argv == ["echo", "x"] {
            crate::bench::kiln(&["rm", "-f", &id]).await?;
        }
    }
    Ok(d)
}

/// The user's path to a template: one cold `kiln run` of the image with
/// `kiln run`'s defaults, after which the node makes the image's automatic
/// template in the background; waits until `kiln run` would find it.
async fn automatic_template(node: &kiln_node::node::Node, spec: &SandboxSpec) -> Result<String> {
    eprintln!("no template yet: one cold run, then waiting for the automatic template");
    let out = tokio::process::Command::new(
        std::env::current_exe().context("cannot find the kiln executable")?,
    )
    .args(["run", "--rm", &spec.image, "--", "true"])
    .env("KILN_AUTO_TEMPLATES", "1")
    .env(crate::admin::NODE_LOCAL_ENV, "1")
    .stdin(std::process::Stdio::null())
    .output()
    .await?;
    if !out.status.success() {
        bail!(
            "the first (cold) run failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let t0 = Instant::now();
    loop {
        if let Ok(name) = node.find_template(spec, false) {
            return Ok(name);
        }
        if t0.elapsed() > Duration::from_secs(300) {
            bail!(
                "no automatic template for {} appeared within 300 s (see templates/.auto.log in the state directory)",
                spec.image
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
