//! `kiln snapshot`, `kiln snapshot ls|rm`, `kiln restore` and `kiln fork`:
//! flags in, the node service's answers out (`kiln_node::node`).

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use clap::{Args, Subcommand};
use kiln_node::node::Node;

/// `kiln snapshot ID [--name N]` or `kiln snapshot ls|rm`.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct SnapshotArgs {
    #[command(subcommand)]
    pub(crate) command: Option<SnapshotCommand>,
    /// The sandbox to snapshot (running or paused).
    #[arg(required = true)]
    pub(crate) id: Option<String>,
    /// Name of the snapshot (default: snap-XXXXXXXX).
    #[arg(long)]
    pub(crate) name: Option<String>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum SnapshotCommand {
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

pub async fn snapshot_cmd(node: &Node, args: SnapshotArgs) -> Result<i32> {
    match (args.command, args.id) {
        (Some(SnapshotCommand::Ls { quiet }), _) => ls(node, quiet),
        (Some(SnapshotCommand::Rm { names }), _) => {
            let mut code = 0;
            for name in names {
                match node.remove_snapshot(&name) {
                    Ok(()) => println!("{name}"),
                    Err(e) => {
                        eprintln!("kiln: {e}");
                        // As `template rm`, `images rm` and `rm` refuse.
                        code = 125;
                    }
                }
            }
            Ok(code)
        }
        (None, Some(id)) => {
            let t0 = Instant::now();
            let (id, name) = node.snapshot(&id, args.name).await?;
            tracing::info!(sandbox = %id, snapshot = %name, elapsed_ms = t0.elapsed().as_millis() as u64, "snapshot taken");
            println!("{name}");
            Ok(0)
        }
        (None, None) => bail!("kiln snapshot ID [--name NAME], or kiln snapshot ls|rm"),
    }
}

fn ls(node: &Node, quiet: bool) -> Result<i32> {
    let entries = node.list_snapshots()?;
    let mut out = std::io::stdout().lock();
    if !quiet {
        writeln!(
            out,
            "{:<24}  {:<16}  {:<24}  {:>9}  {:<10}  IN USE BY",
            "NAME", "SOURCE", "IMAGE", "SIZE", "CREATED"
        )?;
    }
    for e in entries {
        let m = &e.manifest;
        if quiet {
            writeln!(out, "{}", m.name)?;
            continue;
        }
        let used = kiln_node::snapshot::disk_usage(&node.snapshots().dir(&m.name));
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

/// `kiln restore NAME [-d]`.
pub async fn restore(node: &Node, name: &str, detach: bool) -> Result<i32> {
    let r = node.restore(name).await?;
    if !r.ready.ok {
        let msg = r
            .ready
            .error
            .unwrap_or_else(|| "the sandbox failed to start".into());
        eprintln!("kiln: {msg}");
        return Ok(r.ready.exit_code.unwrap_or(125));
    }
    let id = r.record.id;
    if detach {
        println!("{id}");
        return Ok(0);
    }
    let sock = node.store().dir(&id).join("ctl.sock");
    let code = crate::attach::attach_main(&sock, false, r.record.spec.tty, true).await?;
    if let Err(e) = node
        .wait_supervisor_gone(&id, Duration::from_secs(30), Some(r.shim_pid))
        .await
    {
        eprintln!("kiln: {e:#}");
    }
    Ok(code)
}

/// `kiln fork ID -n N`: prints the IDs of the forks that run, one line per
/// fork that failed; exit code 1 if any failed.
pub async fn fork(node: &Node, id: &str, n: u32) -> Result<i32> {
    let out = node.fork(id, n).await?;
    for id in &out.ids {
        println!("{id}");
    }
    for (i, why) in &out.failed {
        eprintln!("kiln: fork {i} of {n} failed: {why}");
    }
    Ok(if out.failed.is_empty() { 0 } else { 1 })
}
