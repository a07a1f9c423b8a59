//! `kiln bench`: benchmarks that print a table and write JSON. Tests assert
//! behaviour; these report numbers.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use kiln_node::agent::AgentClient;
use kiln_node::paths::{Dirs, GuestArtifacts};
use kiln_node::store::Store;
use kiln_vmm::{DiskSpec, VmSpec};
use serde_json::json;

use crate::commands::BenchCommand;

/// Percentiles of a sample, in milliseconds.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Stats {
    pub n: usize,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
}

pub fn stats(samples: &[Duration]) -> Stats {
    let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
    ms.sort_by(|a, b| a.total_cmp(b));
    let pick = |q: f64| {
        if ms.is_empty() {
            return f64::NAN;
        }
        let i = ((ms.len() as f64 - 1.0) * q).round() as usize;
        ms[i.min(ms.len() - 1)]
    };
    Stats {
        n: ms.len(),
        p50_ms: pick(0.5),
        p90_ms: pick(0.9),
        p99_ms: pick(0.99),
        min_ms: ms.first().copied().unwrap_or(f64::NAN),
        max_ms: ms.last().copied().unwrap_or(f64::NAN),
    }
}

pub async fn bench(node: &kiln_node::node::Node, cmd: BenchCommand) -> Result<i32> {
    match cmd {
        BenchCommand::Cold {
            image,
            runs,
            json: out,
            driver,
        } => cold(node, image, runs, &out, &driver).await,
        BenchCommand::Warm {
            image,
            runs,
            concurrent,
            json: out,
            fork,
        } => crate::bench_warm::warm(node, image, runs, concurrent, &fork, &out).await,
        BenchCommand::Vmm { rounds, json: out } => vmm(rounds, &out).await,
        BenchCommand::Net {
            image,
            rules,
            updates,
            json: out,
        } => crate::bench_net::net(image, rules, updates, &out).await,
        BenchCommand::Density {
            image,
            kinds,
            count,
            budget_mib,
            memory,
            json: out,
        } => {
            crate::bench_density::density(
                node.store(),
                image,
                &kinds,
                count,
                budget_mib,
                memory,
                &out,
            )
            .await
        }
        BenchCommand::Api {
            warm: true,
            image: Some(image),
            runs,
            json: out,
            ..
        } => crate::bench_api_warm::api_warm(node, &image, runs, &out).await,
        BenchCommand::Api {
            creates,
            concurrency,
            json: out,
            ..
        } => api(creates, concurrency, &out).await,
    }
}

/// `kiln bench vmm`: every driver this host can run, side by side, on the
/// bare-metal counter guest (the only guest Firecracker boots on a
/// software KVM); a driver that cannot run here is named, not hidden.
async fn vmm(rounds: usize, out: &std::path::Path) -> Result<i32> {
    use kiln_vmm::qemu::QemuDriver;
    use kiln_vmm::{Accel, DriverChoice, DriverConfig, GuestKind, KvmKind};
    if rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    let tmp = tempfile::tempdir().context("cannot create a scratch directory")?;
    let elf = kiln_vmm::testguest::build(&tmp.path().join("guest"))
        .context("cannot build the bare-metal test guest")?;
    let host = kiln_vmm::detect(&DriverConfig::default());
    let mut drivers: Vec<std::sync::Arc<dyn kiln_vmm::VmmDriver>> = vec![];
    match QemuDriver::detect(Accel::Tcg) {
        Ok(d) => drivers.push(std::sync::Arc::new(d)),
        Err(e) => eprintln!("QEMU/TCG not measured: {e}"),
    }
    if host.kvm != KvmKind::Absent {
        match QemuDriver::detect(Accel::Kvm) {
            Ok(d) => drivers.push(std::sync::Arc::new(d)),
            Err(e) => eprintln!("QEMU/KVM not measured: {e}"),
        }
    }
    match kiln_vmm::select_for(DriverChoice::Firecracker, &host, GuestKind::BareMetal)
        .and_then(|s| s.driver(&host))
    {
        Ok(d) => drivers.push(d),
        Err(e) => eprintln!("Firecracker not measured: {e}"),
    }
    let mut reports = vec![];
    for (i, d) in drivers.iter().enumerate() {
        let r =
            kiln_vmm::bench::measure(d.as_ref(), &elf, &tmp.path().join(format!("d{i}")), rounds)
                .await
                .with_context(|| format!("driver {}", d.kind()))?;
        reports.push(r);
    }
    println!("{}", kiln_vmm::bench::table(&reports));
    std::fs::write(out, serde_json::to_vec_pretty(&json!({ "vmm": reports }))?)
        .with_context(|| format!("cannot write {}", out.display()))?;
    eprintln!("wrote {}", out.display());
    Ok(0)
}

/// `kiln bench api`: sandbox creates committed per second through 1 and 3
/// Raft replicas on loopback (real TCP, real redb files, fsync on; no VM
/// boots: the state machine's commit path only), with commit latency.
async fn api(creates: usize, concurrency: usize, out: &std::path::Path) -> Result<i32> {
    if creates == 0 || concurrency == 0 {
        bail!("--creates and --concurrency must be at least 1");
    }
    let mut reports = vec![];
    println!(
        "{:<9} {:>8} {:>9} {:>11} {:>9} {:>9}",
        "REPLICAS", "CREATES", "IN FLIGHT", "CREATES/S", "P50 MS", "P99 MS"
    );
    for replicas in [1, 3] {
        let dir = tempfile::tempdir().context("cannot create a scratch directory")?;
        let r = kiln_store::bench::bench_creates(replicas, creates, concurrency, dir.path())
            .await
            .with_context(|| format!("the {replicas}-replica cluster failed"))?;
        println!(
            "{:<9} {:>8} {:>9} {:>11.0} {:>9.2} {:>9.2}",
            r.replicas, r.creates, r.concurrency, r.creates_per_sec, r.p50_ms, r.p99_ms
        );
        reports.push(r);
    }
    std::fs::write(out, serde_json::to_vec_pretty(&json!({ "api": reports }))?)
        .with_context(|| format!("cannot write {}", out.display()))?;
    eprintln!("wrote {}", out.display());
    Ok(0)
}

/// `kiln run ARGS` → first byte on stdout; fails unless it exits 0.
pub(crate) async fn first_byte(args: Vec<String>) -> Result<Duration> {
    let exe = kiln_exe()?;
    let t = Instant::now();
    let mut child = Command::new(&exe)
        .args(&args)
        // Benchmarks time this host's node-local path (the API path is
        // measured with a client of its own).
        .env(crate::admin::NODE_LOCAL_ENV, "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let mut stdout = child.stdout.take().expect("piped");
    let mut b = [0u8; 1];
    let n = tokio::task::spawn_blocking(move || stdout.read(&mut b)).await??;
    let d = t.elapsed();
    let status = tokio::task::spawn_blocking(move || child.wait()).await??;
    if n == 0 || !status.success() {
        bail!("kiln {args:?} failed during the benchmark ({status})");
    }
    Ok(d)
}

fn kiln_exe() -> Result<std::path::PathBuf> {
    std::env::current_exe().context("cannot find the kiln executable")
}

/// Runs `kiln ARGS` to the end; its stdout, trimmed. Fails unless it exits 0.
pub(crate) async fn kiln(args: &[&str]) -> Result<String> {
    let out = tokio::process::Command::new(kiln_exe()?)
        .args(args)
        .env(crate::admin::NODE_LOCAL_ENV, "1")
        .stdin(Stdio::null())
        .output()
        .await?;
    if !out.status.success() {
        bail!(
            "kiln {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The VMM and supervisor processes of a running sandbox, from its record.
pub(crate) fn sandbox_pids(store: &Store, id: &str) -> Result<(u32, Option<u32>)> {
    let rec = store.load(id)?;
    let vmm = rec
        .vm
        .as_ref()
        .and_then(|v| v.get("pid"))
        .and_then(|p| p.as_u64())
        .and_then(|p| u32::try_from(p).ok())
        .with_context(|| format!("sandbox {id} has no VMM pid"))?;
    Ok((vmm, rec.shim_pid))
}

/// Host memory of a running sandbox: PSS of its VMM and of its supervisor, KiB.
pub(crate) fn sandbox_pss(store: &Store, id: &str) -> Result<(u64, u64)> {
    let (vmm, shim) = sandbox_pids(store, id)?;
    Ok((pss_kib(vmm), shim.map(pss_kib).unwrap_or(0)))
}

async fn cold(
    node: &kiln_node::node::Node,
    image: Option<String>,
    runs: usize,
    out: &std::path::Path,
    driver: &str,
) -> Result<i32> {
    let Some(image) = image else {
        bail!(
            "give the image to benchmark with --image (scripts/quickstart.sh prints a local one)"
        );
    };
    if runs == 0 {
        bail!("--runs must be at least 1");
    }
    let choice = kiln_node::vm::parse_driver(driver)?;
    let (drv, sel) = kiln_node::vm::driver_for(choice)?;
    eprintln!("driver: {} with {} ({})", sel.kind, sel.accel, sel.reason);

    // 1. Pull + convert into an empty cache.
    let scratch = tempfile::tempdir().context("cannot create a scratch directory")?;
    let cold_node = kiln_node::node::Node::open(Dirs::new(
        scratch.path().join("state"),
        scratch.path().join("cache"),
    ));
    let store = node.store();
    let t = Instant::now();
    crate::images::pull(
        &cold_node,
        &image,
        &[],
        false,
        crate::images::PullPolicy::Always,
    )
    .await?;
    let pull = t.elapsed();
    let img =
        crate::images::pull(node, &image, &[], false, crate::images::PullPolicy::Missing).await?;

    // 2. VMM spawn → agent ready (the driver and the agent handshake alone).
    let artifacts = GuestArtifacts::locate(store.dirs())?;
    let mut ready = Vec::new();
    for i in 0..runs {
        let dir = scratch.path().join(format!("vm{i}"));
        std::fs::create_dir_all(&dir)?;
        let rw = dir.join("rw.ext4");
        kiln_node::vm::make_writable_disk(&store.dirs().blank_disks(), &rw, 256).await?;
        let spec = VmSpec {
            id: format!("bench{i}"),
            dir: dir.join("vm"),
            kernel: artifacts.kernel_for(sel.kind).to_path_buf(),
            initrd: Some(artifacts.initramfs.clone()),
            cmdline: kiln_node::vm::kernel_cmdline(drv.capabilities().agent_transport),
            cpus: 1,
            memory_mib: 256,
            disks: vec![
                DiskSpec {
                    path: img.disk.clone(),
                    read_only: true,
                },
                DiskSpec {
                    path: rw,
                    read_only: false,
                },
            ],
            agent_channel: true,
            console_log: dir.join("vm/console.log"),
            network: None,
        };
        let t = Instant::now();
        let vm = drv.start(&spec).await?;
        let stream = vm.connect_agent().await?;
        let (agent, _) = AgentClient::connect(stream, Duration::from_secs(60)).await?;
        ready.push(t.elapsed());
        let _ = agent.shutdown().await;
        let _ = tokio::time::timeout(Duration::from_secs(5), vm.wait()).await;
        let _ = vm.cleanup().await;
    }

    // 3. `kiln run` → first output byte, as a user sees it, interleaved
    // with the floor: the same kernel with the same boot parameters and a
    // trivial init that prints a marker (VMM spawn → marker on the
    // console), same VMM flags, no devices.
    let initrd = raw_initramfs(scratch.path())?;
    let mut first_byte = Vec::new();
    let mut raw = Vec::new();
    for i in 0..runs {
        raw.push(raw_boot(&*drv, &artifacts, sel.kind, scratch.path(), &initrd, i).await?);
        let args = [
            "run", "--rm", "--cold", "--driver", driver, &image, "--", "echo", "ready",
        ];
        first_byte
            .push(crate::bench::first_byte(args.iter().map(|a| a.to_string()).collect()).await?);
        eprintln!("run {}/{runs}", i + 1);
    }

    // 4. Host memory of one idle sandbox (VMM + supervisor), proportional set size.
    let id = kiln(&[
        "run", "-d", "--cold", "--driver", driver, &image, "--", "sleep", "3600",
    ])
    .await
    .context("cannot start the idle sandbox")?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pss = sandbox_pss(store, &id);
    let _ = kiln(&["rm", "-f", &id]).await;
    let (vmm_pss, shim_pss) = pss?;

    let r = stats(&ready);
    let f = stats(&first_byte);
    let b = stats(&raw);
    let ratio = f.p50_ms / b.p50_ms;
    println!(
        "kiln bench cold — driver {} ({}), {} runs",
        sel.kind, sel.accel, runs
    );
    println!(
        "{:<40} {:>10} {:>10} {:>10}",
        "measurement", "p50 ms", "p90 ms", "max ms"
    );
    println!(
        "{:<40} {:>10.1} {:>10} {:>10}",
        "image pull + convert (empty cache)",
        pull.as_secs_f64() * 1000.0,
        "-",
        "-"
    );
    println!(
        "{:<40} {:>10.1} {:>10.1} {:>10.1}",
        "VMM spawn -> agent ready", r.p50_ms, r.p90_ms, r.max_ms
    );
    println!(
        "{:<40} {:>10.1} {:>10.1} {:>10.1}",
        "kiln run -> first output byte", f.p50_ms, f.p90_ms, f.max_ms
    );
    println!(
        "{:<40} {:>10.1} {:>10.1} {:>10.1}",
        "raw boot: VMM spawn -> trivial init", b.p50_ms, b.p90_ms, b.max_ms
    );
    println!(
        "{:<40} {:>10.2}x (target <= 1.3x)",
        "cold overhead: first byte / raw boot", ratio
    );
    println!(
        "{:<40} {:>10} KiB (VMM {} + supervisor {})",
        "idle sandbox host memory (PSS)",
        vmm_pss + shim_pss,
        vmm_pss,
        shim_pss
    );
    let v = json!({
        "benchmark": "cold",
        "driver": sel.kind.to_string(),
        "accel": sel.accel.to_string(),
        "runs": runs,
        "image": image,
        "pull_convert_ms": pull.as_secs_f64() * 1000.0,
        "spawn_to_agent_ready": r,
        "run_to_first_byte": f,
        "raw_boot_to_init": b,
        "first_byte_over_raw_boot": ratio,
        "idle_pss_kib": { "vmm": vmm_pss, "supervisor": shim_pss, "total": vmm_pss + shim_pss },
    });
    std::fs::write(out, serde_json::to_vec_pretty(&v)?)
        .with_context(|| format!("cannot write {}", out.display()))?;
    eprintln!("wrote {}", out.display());
    Ok(0)
}

const MARKER: &str = "KILN-RAW-BOOT-MARKER";

/// Packs an initramfs whose `/init` (busybox) only prints a marker and
/// powers off (the floor of a boot: [`raw_boot`]); returns its path.
fn raw_initramfs(scratch: &std::path::Path) -> Result<std::path::PathBuf> {
    let root = scratch.join("raw-root");
    std::fs::create_dir_all(root.join("bin"))?;
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| std::path::Path::new(p).is_file())
        .context("busybox-static is needed for the raw boot (scripts/setup-host.sh installs it)")?;
    std::fs::copy(busybox, root.join("bin/busybox"))?;
    let init = root.join("init");
    std::fs::write(
        &init,
        format!("#!/bin/busybox sh\n/bin/busybox echo {MARKER}\n/bin/busybox poweroff -f\n"),
    )?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&init, std::fs::Permissions::from_mode(0o755))?;
    std::fs::set_permissions(
        root.join("bin/busybox"),
        std::fs::Permissions::from_mode(0o755),
    )?;
    let initrd = scratch.join("raw-initramfs.cpio");
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd {} && printf 'init\\nbin\\nbin/busybox\\n' | cpio -o -H newc --quiet > {}",
            root.display(),
            initrd.display()
        ))
        .status()
        .context("cannot run cpio")?;
    if !status.success() {
        bail!("cpio could not pack the raw-boot initramfs");
    }
    Ok(initrd)
}

/// Boots the node's kernel with `initrd` from [`raw_initramfs`] (run `i`);
/// VMM spawn → marker on the console.
async fn raw_boot(
    drv: &dyn kiln_vmm::VmmDriver,
    artifacts: &GuestArtifacts,
    kind: kiln_vmm::DriverKind,
    scratch: &std::path::Path,
    initrd: &std::path::Path,
    i: usize,
) -> Result<Duration> {
    {
        let dir = scratch.join(format!("raw{i}"));
        std::fs::create_dir_all(&dir)?;
        let console = dir.join("console.log");
        let spec = VmSpec {
            id: format!("raw{i}"),
            dir: dir.join("vm"),
            kernel: artifacts.kernel_for(kind).to_path_buf(),
            initrd: Some(initrd.to_path_buf()),
            cmdline: kiln_node::vm::KERNEL_BOOT_PARAMS.into(),
            cpus: 1,
            memory_mib: 256,
            disks: vec![],
            agent_channel: false,
            console_log: console.clone(),
            network: None,
        };
        let t = Instant::now();
        let vm = drv.start(&spec).await?;
        let seen = loop {
            if std::fs::read_to_string(&console).is_ok_and(|c| c.contains(MARKER)) {
                break Some(t.elapsed());
            }
            if t.elapsed() > Duration::from_secs(60) {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        let _ = vm.kill().await;
        let _ = vm.cleanup().await;
        seen.with_context(|| {
            format!(
                "the raw-boot guest printed no marker in 60 s ({})",
                console.display()
            )
        })
    }
}

/// Proportional set size of a process, KiB (0 if unreadable).
pub fn pss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Pss:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let s: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        let st = stats(&s);
        assert_eq!(st.n, 100);
        assert!((st.p50_ms - 51.0).abs() < 1.01);
        assert!((st.p90_ms - 90.0).abs() < 1.01);
        assert_eq!(st.max_ms, 100.0);
    }
}
