//! `kiln template create|ls|rm|fill`: flags in, the node service's
//! answers out (`kiln_node::node`).

use std::io::Write;

use anyhow::Result;
use clap::Subcommand;
use kiln_api::sandbox::Resources;
use kiln_node::node::{Node, TemplateRequest, TemplateStatus};

#[derive(Debug, Subcommand)]
pub enum TemplateCommand {
    /// Boot an image once (no process), snapshot it when kiln-init is ready:
    /// `kiln run` with the same image and resources then restores it.
    Create {
        image: String,
        /// Virtual CPUs (as `kiln run --cpus`).
        #[arg(long, default_value_t = 1)]
        cpus: u32,
        /// Guest memory in MiB (as `kiln run --memory`).
        #[arg(long = "memory", short = 'm', default_value_t = 256)]
        memory: u32,
        /// Size of the writable disk in MiB (as `kiln run --disk`).
        #[arg(long, default_value_t = 4096)]
        disk: u32,
        /// VMM driver: auto, qemu or firecracker.
        #[arg(long, default_value = "auto")]
        driver: String,
        /// Registries to reach over plain HTTP (host[:port]).
        #[arg(long = "insecure-registry")]
        insecure: Vec<String>,
        /// When to contact the registry: missing, always, never.
        #[arg(long, value_enum, default_value = "missing")]
        pull: crate::images::PullPolicy,
        /// Keep this many sandboxes restored from the template and paused,
        /// handed out by `kiln run` and refilled in the background (0 turns
        /// the pool off). On an existing template, only resizes its pool.
        #[arg(long, value_name = "K")]
        pool: Option<u32>,
        /// `default`: a template for `kiln run --net default` (its VM has a
        /// network device; each run restores it with its own tap, address
        /// and MAC). `none`: for `--net none` runs.
        #[arg(long = "net", default_value = "none", value_parser = ["none", "default"])]
        net: String,
        /// Print timings on stderr.
        #[arg(short = 'v', long)]
        verbose: bool,
        /// Made by Kiln after a cold start (evicted past the template
        /// budget); what `kiln run` starts in the background.
        #[arg(long, hide = true)]
        auto: bool,
        /// Wait (a few seconds at most) for a spare CPU before booting.
        #[arg(long, hide = true)]
        when_idle: bool,
    },
    /// List templates, and whether each can still be used here.
    Ls {
        /// Only print names.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Remove templates and their pools (not while sandboxes started from
    /// them run).
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Refill a template's warm pool (what `kiln run` starts in the
    /// background after taking a member).
    #[command(hide = true)]
    Fill {
        name: String,
        /// Restore each member only once the host has a CPU to spare (up
        /// to a few seconds): runs being served go first.
        #[arg(long)]
        when_idle: bool,
    },
}

pub async fn dispatch(node: &Node, cmd: TemplateCommand) -> Result<i32> {
    match cmd {
        TemplateCommand::Create {
            image,
            cpus,
            memory,
            disk,
            driver,
            insecure,
            pull,
            pool,
            verbose,
            auto,
            when_idle,
            net,
        } => {
            crate::commands::check_resources(cpus, memory, disk)?;
            let req = TemplateRequest {
                image,
                resources: Resources {
                    cpus,
                    memory_mib: memory,
                    disk_mib: disk,
                },
                driver,
                insecure_registries: insecure,
                pull: pull.into(),
                pool,
                automatic: auto,
                when_idle,
                network: net == "default",
            };
            let t0 = std::time::Instant::now();
            let progress = crate::images::Bars::new(
                verbose || std::io::IsTerminal::is_terminal(&std::io::stderr()),
            );
            let done = node.create_template(&req, &progress).await;
            progress.done();
            let done = match done {
                // Another automatic template is being made: this one
                // waits for the next cold start.
                Err(kiln_node::node::TemplateOpError::Busy) if auto => return Ok(0),
                other => other?,
            };
            let c = &done.created;
            let name = c.manifest.name.clone();
            if verbose {
                if c.existed {
                    eprintln!("kiln: template {name} exists and is valid: nothing to do");
                } else {
                    eprintln!(
                        "kiln: template {name} created in {} ms (boot → agent ready {} ms, quiesce {} ms, snapshot {} ms, {} on disk)",
                        t0.elapsed().as_millis(),
                        c.boot_ms,
                        c.quiesce_ms,
                        c.snapshot_ms,
                        crate::snapshots::human(kiln_node::snapshot::disk_usage(
                            &node.templates().dir(&name)
                        ))
                    );
                }
            }
            for (stale, n) in &done.stale_pools {
                eprintln!("kiln: emptied the pool of stale template {stale} ({n} sandboxes)");
            }
            if verbose && let Some(f) = &done.pool {
                if req.pool == Some(0) {
                    if f.removed > 0 {
                        eprintln!("kiln: pool of {name} removed ({} sandboxes)", f.removed);
                    }
                } else {
                    eprintln!(
                        "kiln: pool of {name}: {} ready ({} restored, {} removed)",
                        f.ready, f.started, f.removed
                    );
                }
            }
            println!("{name}");
            Ok(0)
        }
        TemplateCommand::Ls { quiet } => ls(node, quiet).await,
        TemplateCommand::Rm { names } => {
            let mut code = 0;
            for name in names {
                match node.remove_template(&name).await {
                    Ok(()) => println!("{name}"),
                    Err(e) => {
                        eprintln!("kiln: {:#}", anyhow::Error::from(e));
                        code = 125;
                    }
                }
            }
            Ok(code)
        }
        TemplateCommand::Fill { name, when_idle } => {
            let f = node.fill_pool(&name, when_idle).await?;
            tracing::info!(template = %name, started = f.started, removed = f.removed, ready = f.ready, "pool filled");
            Ok(0)
        }
    }
}

async fn ls(node: &Node, quiet: bool) -> Result<i32> {
    let entries = node.list_templates().await?;
    let mut out = std::io::stdout().lock();
    if quiet {
        for e in entries {
            writeln!(out, "{}", e.manifest.name)?;
        }
        return Ok(0);
    }
    writeln!(
        out,
        "{:<20}  {:<24}  {:>4}  {:>7}  {:>7}  {:>9}  {:<10}  {:>6}  {:>5}  STATUS",
        "NAME", "IMAGE", "CPUS", "MEMORY", "DISK", "SIZE", "CREATED", "IN USE", "POOL"
    )?;
    for e in entries {
        let m = &e.manifest;
        let disk = m.template.as_ref().map(|t| t.disk_mib).unwrap_or(0);
        let mut status = match &e.status {
            TemplateStatus::Ready => "ready".to_string(),
            TemplateStatus::Stale(why) => format!("stale: {why}"),
            TemplateStatus::Unusable(why) => format!("unusable: {why}"),
            TemplateStatus::Unknown => "unknown (no guest artifacts or driver)".to_string(),
        };
        if e.automatic {
            status.push_str(" (automatic)");
        }
        let pool = match e.pool {
            Some((ready, size)) => format!("{ready}/{size}"),
            None => "-".to_string(),
        };
        writeln!(
            out,
            "{:<20}  {:<24}  {:>4}  {:>7}  {:>7}  {:>9}  {:<10}  {:>6}  {:>5}  {}",
            m.name,
            crate::commands::truncate(&m.spec.image, 24),
            m.cpus,
            format!("{}M", m.memory_mib),
            format!("{disk}M"),
            crate::snapshots::human(e.disk_usage),
            crate::commands::ago(m.created_at),
            e.in_use,
            pool,
            status
        )?;
    }
    Ok(0)
}
