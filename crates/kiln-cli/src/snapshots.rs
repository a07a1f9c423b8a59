//! `kiln snapshot`, `kiln snapshot ls|rm`, `kiln restore` and `kiln fork`.
//!
//! The supervisor of the source sandbox writes a snapshot into a staging
//! directory of the snapshot store (`kiln_node::snapshot`); this command
//! publishes it under its name. A restore checks the snapshot completely
//! (manifest, guest artifacts, driver, image disk, every file's size and
//! digest) before it creates anything, then starts a supervisor in restore
//! mode, which loads the snapshot and re-attaches to the main process.

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use kiln_node::ctl::{CtlConn, CtlRequest, CtlResponse};
use kiln_node::paths::GuestArtifacts;
use kiln_node::snapshot::{self, SnapshotStore};
use kiln_node::store::{SandboxRecord, SandboxState, Store};
use kiln_vmm::{DriverChoice, DriverKind};

use crate::commands::{refresh, running_socket, spawn_shim, wait_supervisor_gone};

/// `kiln snapshot ID [--name N]` or `kiln snapshot ls|rm`.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct SnapshotArgs {
    #[command(subcommand)]
    command: Option<SnapshotCommand>,
    /// The sandbox to snapshot (running or paused).
    #[arg(required = true)]
    id: Option<String>,
    /// Name of the snapshot (default: snap-XXXXXXXX).
    #[arg(long)]
    name: Option<String>,
}

#[derive(Debug, Subcommand)]
enum SnapshotCommand {
    /// List snapshots.
    Ls {
        /// Only print names.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Remove snapshots (not while sandboxes restored from them run).
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
    },
}

pub async fn snapshot_cmd(store: &Store, args: SnapshotArgs) -> Result<i32> {
    match (args.command, args.id) {
        (Some(SnapshotCommand::Ls { quiet }), _) => ls(store, quiet),
        (Some(SnapshotCommand::Rm { names }), _) => {
            let snapshots = SnapshotStore::new(store.dirs());
            let mut code = 0;
            for name in names {
                let alive = |user: &str| {
                    store
                        .load(user)
                        .map(|r| !refresh(store, r).state.is_finished())
                        .unwrap_or(false)
                };
                match snapshots.remove(&name, alive) {
                    Ok(()) => println!("{name}"),
                    Err(e) => {
                        eprintln!("kiln: {e}");
                        code = 1;
                    }
                }
            }
            Ok(code)
        }
        (None, Some(id)) => {
            let t0 = Instant::now();
            let (id, name) = take(store, &id, args.name, false).await?;
            tracing::info!(sandbox = %id, snapshot = %name, elapsed_ms = t0.elapsed().as_millis() as u64, "snapshot taken");
            println!("{name}");
            Ok(0)
        }
        (None, None) => bail!("kiln snapshot ID [--name NAME], or kiln snapshot ls|rm"),
    }
}

/// Snapshots sandbox `id` (a prefix is fine) as `name`; returns the full ID
/// and the name.
async fn take(
    store: &Store,
    id: &str,
    name: Option<String>,
    ephemeral: bool,
) -> Result<(String, String)> {
    let (id, sock) = running_socket(store, id)?;
    let snapshots = SnapshotStore::new(store.dirs());
    let name = name.unwrap_or_else(|| snapshot::new_name(if ephemeral { "fork" } else { "snap" }));
    let staging = snapshots.staging(&name)?;
    let result = async {
        let req = CtlRequest::Snapshot {
            dest: staging.clone(),
            name: name.clone(),
            ephemeral,
        };
        let (_conn, resp) = CtlConn::open(&sock, &req).await?;
        match resp {
            CtlResponse::Ok => {}
            CtlResponse::Error { message, .. } => bail!("cannot snapshot sandbox {id}: {message}"),
            other => bail!("unexpected answer from the supervisor: {other:?}"),
        }
        snapshots.publish(&staging, &name)?;
        Ok(())
    }
    .await;
    if let Err(e) = result {
        snapshots.remove_staging(&staging);
        return Err(e);
    }
    Ok((id, name))
}

fn ls(store: &Store, quiet: bool) -> Result<i32> {
    let snapshots = SnapshotStore::new(store.dirs());
    snapshots.release_dead_holders();
    let mut out = std::io::stdout().lock();
    if !quiet {
        writeln!(
            out,
            "{:<24}  {:<16}  {:<24}  {:>9}  {:<10}  IN USE BY",
            "NAME", "SOURCE", "IMAGE", "SIZE", "CREATED"
        )?;
    }
    for e in snapshots.list()? {
        let m = &e.manifest;
        if quiet {
            writeln!(out, "{}", m.name)?;
            continue;
        }
        let used = snapshot::disk_usage(&snapshots.dir(&m.name));
        writeln!(
            out,
            "{:<24}  {:<16}  {:<24}  {:>9}  {:<10}  {}",
            m.name,
            m.source,
            crate::commands::truncate(&m.spec.image, 24),
            human(used),
            crate::commands::ago(m.created_at),
            e.users.len()
        )?;
    }
    Ok(0)
}

pub(crate) fn human(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
    }
}

/// Checks snapshot `name` completely against this host. Nothing is created.
fn verify(store: &Store, name: &str, contents: bool) -> Result<snapshot::Manifest> {
    let snapshots = SnapshotStore::new(store.dirs());
    let m = snapshots.manifest(name)?;
    let artifacts = GuestArtifacts::locate(store.dirs())?;
    let choice = match m.driver.kind {
        DriverKind::Qemu => DriverChoice::Qemu,
        DriverKind::Firecracker => DriverChoice::Firecracker,
    };
    let (driver, _) = kiln_node::vm::driver_for(choice)?;
    let guest = snapshot::guest_digests(&artifacts, driver.kind())
        .context("cannot hash the guest artifacts")?;
    let t0 = Instant::now();
    let m = snapshots.verify(name, &guest, driver.info(), contents)?;
    tracing::info!(
        snapshot = name,
        elapsed_ms = t0.elapsed().as_millis() as u64,
        "snapshot verified"
    );
    Ok(m)
}

/// Creates the record of a sandbox restored from `name` and registers it as
/// a user of the snapshot.
fn create_restored(store: &Store, m: &snapshot::Manifest) -> Result<SandboxRecord> {
    let mut spec = m.spec.clone();
    spec.auto_remove = false;
    let mut rec = store.create(spec)?;
    rec.restored_from = Some(m.name.clone());
    store.save(&rec)?;
    let snapshots = SnapshotStore::new(store.dirs());
    if let Err(e) = snapshots.add_user(&m.name, &rec.id) {
        let _ = store.remove(&rec.id);
        return Err(e).context(format!("cannot register a user of snapshot {}", m.name));
    }
    Ok(rec)
}

/// `kiln restore NAME [-d]`.
pub async fn restore(store: &Store, name: &str, detach: bool) -> Result<i32> {
    let m = verify(store, name, true)?;
    let rec = create_restored(store, &m)?;
    let (ready, shim_pid) = match spawn_shim(store, &rec).await {
        Ok(r) => r,
        Err(e) => {
            SnapshotStore::new(store.dirs()).release_user(name, &rec.id);
            return Err(e);
        }
    };
    if !ready.ok {
        let msg = ready
            .error
            .unwrap_or_else(|| "the sandbox failed to start".into());
        eprintln!("kiln: {msg}");
        return Ok(ready.exit_code.unwrap_or(125));
    }
    if detach {
        println!("{}", rec.id);
        return Ok(0);
    }
    let sock = store.dir(&rec.id).join("ctl.sock");
    let code = crate::attach::attach_main(&sock, false, rec.spec.tty, true).await?;
    if let Err(e) =
        wait_supervisor_gone(store, &rec.id, Duration::from_secs(30), Some(shim_pid)).await
    {
        eprintln!("kiln: {e:#}");
    }
    Ok(code)
}

/// `kiln fork ID -n N`: one snapshot, N restores. The snapshot is
/// ephemeral: the restored VMs map its memory, so it stays until the last
/// fork's supervisor releases it (see `kiln_node::snapshot`); this command
/// holds it meanwhile.
pub async fn fork(store: &Store, id: &str, n: u32) -> Result<i32> {
    if n == 0 || n > 64 {
        bail!("-n {n} is out of range (1 to 64)");
    }
    let t0 = Instant::now();
    let (id, name) = take(store, id, None, true).await?;
    let snapshots = SnapshotStore::new(store.dirs());
    let holder = snapshot::holder_name(std::process::id());
    if let Err(e) = snapshots.add_user(&name, &holder) {
        // Nobody else uses it yet: removing it is safe.
        let _ = snapshots.remove(&name, |_| false);
        return Err(e).context("cannot hold the fork snapshot");
    }
    tracing::info!(sandbox = %id, snapshot = %name, elapsed_ms = t0.elapsed().as_millis() as u64, "fork snapshot taken");
    let result = async {
        let m = verify(store, &name, false)?;
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..n {
            let rec = create_restored(store, &m)?;
            let store = store.clone();
            tasks.spawn(async move {
                let r = spawn_shim(&store, &rec).await;
                (i, rec, r)
            });
        }
        let mut done = vec![];
        while let Some(j) = tasks.join_next().await {
            done.push(j.context("a fork task failed")?);
        }
        done.sort_by_key(|(i, _, _)| *i);
        Ok::<_, anyhow::Error>(done)
    }
    .await;
    let done = match result {
        Ok(d) => d,
        Err(e) => {
            snapshots.release_user(&name, &holder);
            return Err(e);
        }
    };
    let mut failed = 0;
    for (i, rec, r) in done {
        let error = match r {
            Ok((ready, _)) if ready.ok => {
                println!("{}", rec.id);
                continue;
            }
            Ok((ready, shim_pid)) => {
                // Never shown to the user as a sandbox: remove it.
                let _ =
                    wait_supervisor_gone(store, &rec.id, Duration::from_secs(30), Some(shim_pid))
                        .await;
                ready
                    .error
                    .unwrap_or_else(|| "the sandbox failed to start".into())
            }
            Err(e) => {
                snapshots.release_user(&name, &rec.id);
                format!("{e:#}")
            }
        };
        failed += 1;
        if let Ok(r) = store.load(&rec.id)
            && !matches!(
                r.state,
                SandboxState::Running { .. } | SandboxState::Paused { .. }
            )
        {
            let _ = store.remove(&rec.id);
        }
        eprintln!("kiln: fork {} of {n} failed: {error}", i + 1);
    }
    snapshots.release_user(&name, &holder);
    tracing::info!(sandbox = %id, forks = n, failed, elapsed_ms = t0.elapsed().as_millis() as u64, "fork done");
    Ok(if failed == 0 { 0 } else { 1 })
}
