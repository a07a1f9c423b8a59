//! `kiln template create|ls|rm`, and the warm-start lookup `kiln run` does
//! (`claim`). The templates themselves are `kiln_node::template`.

use std::io::Write;

use anyhow::Result;
use clap::Subcommand;
use kiln_node::paths::GuestArtifacts;
use kiln_node::snapshot;
use kiln_node::store::{SandboxSpec, Store};
use kiln_node::template::{self, TemplateParams};

use crate::commands::refresh;

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
        /// Print timings on stderr.
        #[arg(short = 'v', long)]
        verbose: bool,
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

/// Whether sandbox `id` still runs (its VM may map a template's memory).
fn alive(store: &Store, id: &str) -> bool {
    store
        .load(id)
        .map(|r| !refresh(store, r).state.is_finished())
        .unwrap_or(false)
}

pub async fn dispatch(store: &Store, cmd: TemplateCommand) -> Result<i32> {
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
        } => {
            crate::commands::check_resources(cpus, memory, disk)?;
            if pool.is_some_and(|k| k > kiln_node::pool::MAX_SIZE) {
                anyhow::bail!(
                    "--pool {} is too large: at most {}",
                    pool.unwrap_or(0),
                    kiln_node::pool::MAX_SIZE
                );
            }
            let img = crate::images::pull(store, &image, &insecure, verbose, pull).await?;
            let p = TemplateParams {
                image: image.clone(),
                image_digest: img.digest,
                image_disk: img.disk,
                cpus,
                memory_mib: memory,
                disk_mib: disk,
            };
            let t0 = std::time::Instant::now();
            let mut created =
                template::create(store.dirs(), &p, &driver, |id| alive(store, id)).await;
            // A template that must be replaced (damaged) whose only users are
            // its own pool members: empty the pool and try again.
            if let Err(template::CreateTemplateError::Remove(
                snapshot::RemoveSnapshotError::InUse { name, users },
            )) = &created
                && users
                    .iter()
                    .all(|id| store.load(id).is_ok_and(|r| r.pool.is_some()))
            {
                let name = name.clone();
                crate::pool::drain(store, &name).await?;
                created = template::create(store.dirs(), &p, &driver, |id| alive(store, id)).await;
            }
            let c = created?;
            if verbose {
                if c.existed {
                    eprintln!(
                        "kiln: template {} exists and is valid: nothing to do",
                        c.manifest.name
                    );
                } else {
                    eprintln!(
                        "kiln: template {} created in {} ms (boot → agent ready {} ms, quiesce {} ms, snapshot {} ms, {} on disk)",
                        c.manifest.name,
                        t0.elapsed().as_millis(),
                        c.boot_ms,
                        c.quiesce_ms,
                        c.snapshot_ms,
                        crate::snapshots::human(snapshot::disk_usage(
                            &template::store(store.dirs()).dir(&c.manifest.name)
                        ))
                    );
                }
            }
            let name = c.manifest.name.clone();
            drain_stale_pools(store, &name).await;
            match pool {
                Some(0) => {
                    let n = crate::pool::drain(store, &name).await?;
                    if verbose && n > 0 {
                        eprintln!("kiln: pool of {name} removed ({n} sandboxes)");
                    }
                }
                Some(k) => {
                    let t1 = std::time::Instant::now();
                    kiln_node::pool::Pool::of(store.dirs(), &name).set_size(k)?;
                    let f = crate::pool::fill(store, &name, false).await?;
                    if verbose {
                        eprintln!(
                            "kiln: pool of {name}: {} ready ({} restored, {} removed) in {} ms",
                            f.ready,
                            f.started,
                            f.removed,
                            t1.elapsed().as_millis()
                        );
                    }
                }
                None => {}
            }
            println!("{name}");
            Ok(0)
        }
        TemplateCommand::Ls { quiet } => {
            template::reap_abandoned(store.dirs()).await;
            ls(store, quiet)
        }
        TemplateCommand::Rm { names } => {
            let mut code = 0;
            for name in names {
                if let Err(e) = snapshot::validate_name(&name) {
                    eprintln!("kiln: {e}");
                    code = 125;
                    continue;
                }
                // Refused before its pool is touched while runs use it.
                let busy: Vec<String> = template::store(store.dirs())
                    .users(&name)
                    .into_iter()
                    .filter(|id| store.load(id).is_ok_and(|r| r.pool.is_none()) && alive(store, id))
                    .collect();
                if !busy.is_empty() {
                    eprintln!(
                        "kiln: template {name} is in use by sandboxes started from it: {}; remove them first",
                        busy.join(", ")
                    );
                    code = 125;
                    continue;
                }
                let removed = match crate::pool::drain(store, &name).await {
                    Ok(_) => template::remove(store.dirs(), &name, |id| alive(store, id))
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(format!("cannot empty the pool of template {name}: {e:#}")),
                };
                match removed {
                    Ok(()) => println!("{name}"),
                    Err(e) => {
                        eprintln!("kiln: {e}");
                        code = 125;
                    }
                }
            }
            Ok(code)
        }
        TemplateCommand::Fill { name, when_idle } => {
            let f = crate::pool::fill(store, &name, when_idle).await?;
            tracing::info!(template = %name, started = f.started, removed = f.removed, ready = f.ready, "pool filled");
            Ok(0)
        }
    }
}

fn ls(store: &Store, quiet: bool) -> Result<i32> {
    let templates = template::store(store.dirs());
    let entries = templates.list()?;
    let mut out = std::io::stdout().lock();
    if quiet {
        for e in entries {
            writeln!(out, "{}", e.manifest.name)?;
        }
        return Ok(0);
    }
    // Whether each is still usable here: checked like a run would.
    let here = this_host(store);
    writeln!(
        out,
        "{:<20}  {:<24}  {:>4}  {:>7}  {:>7}  {:>9}  {:<10}  {:>6}  {:>5}  STATUS",
        "NAME", "IMAGE", "CPUS", "MEMORY", "DISK", "SIZE", "CREATED", "IN USE", "POOL"
    )?;
    for e in entries {
        let m = &e.manifest;
        let Some(t) = &m.template else { continue };
        let status = match &here {
            None => "unknown (no guest artifacts or driver)".to_string(),
            // Every file's digest: remembered while unchanged, so cheap.
            Some((g, d)) => match templates.verify(&m.name, g, d, true) {
                Ok(_) => "ready".to_string(),
                Err(err) if template::is_stale(&err) => format!("stale: {err}"),
                Err(err) => format!("unusable: {err}"),
            },
        };
        let pool = match crate::pool::status(store, &m.name) {
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
            format!("{}M", t.disk_mib),
            crate::snapshots::human(snapshot::disk_usage(&templates.dir(&m.name))),
            crate::commands::ago(m.created_at),
            e.users
                .iter()
                .filter(|id| !store.load(id).is_ok_and(|r| r.pool.is_some()))
                .count(),
            pool,
            status
        )?;
    }
    Ok(0)
}

/// The template for `spec` (checked like a snapshot before a restore): its
/// name, or why a run boots cold.
pub(crate) fn lookup(store: &Store, spec: &SandboxSpec) -> Result<String, String> {
    let templates = template::store(store.dirs());
    if !templates.root().is_dir() {
        return Err(format!(
            "no template for {} (kiln template create)",
            spec.image
        ));
    }
    let artifacts = GuestArtifacts::locate(store.dirs()).map_err(|e| e.to_string())?;
    let choice = kiln_node::vm::parse_driver(&spec.driver).map_err(|e| e.to_string())?;
    let (drv, _) = kiln_node::vm::driver_for(choice).map_err(|e| format!("{e:#}"))?;
    let guest = snapshot::guest_digests(&artifacts, drv.kind())
        .map_err(|e| format!("cannot hash the guest artifacts: {e}"))?;
    let p = TemplateParams {
        image: spec.image.clone(),
        image_digest: spec.image_digest.clone(),
        image_disk: spec.image_disk.clone(),
        cpus: spec.cpus,
        memory_mib: spec.memory_mib,
        disk_mib: spec.disk_mib,
    };
    let m = template::find(&templates, &p, &guest, drv.info()).map_err(|e| e.0)?;
    if m.image_disk != spec.image_disk {
        return Err(format!(
            "template {} uses the image disk {}, this run {}",
            m.name,
            m.image_disk.display(),
            spec.image_disk.display()
        ));
    }
    Ok(m.name)
}

/// Registers sandbox `id` as a user of template `name` (found by
/// `lookup`): its name, or why the sandbox boots cold.
pub(crate) fn claim(store: &Store, name: &str, id: &str) -> Result<String, String> {
    let templates = template::store(store.dirs());
    // Shared: a `template rm` cannot slip between the check and the
    // registration.
    let _lock = template::lock(&templates, false)
        .map_err(|e| format!("cannot lock the template store: {e}"))?;
    if !templates.exists(name) {
        return Err(format!("template {name} was removed"));
    }
    templates
        .add_user(name, id)
        .map_err(|e| format!("cannot register as a user of template {name}: {e}"))?;
    Ok(name.to_string())
}

/// Empties the pools of templates that can no longer be used here (their
/// kernel, initramfs, kiln-init, driver or image changed): no run would
/// take their members, which would otherwise stay paused until
/// `kiln template rm`. Run when a template is created (typically after
/// such an upgrade). `keep` is the template just created.
async fn drain_stale_pools(store: &Store, keep: &str) {
    let templates = template::store(store.dirs());
    let here = this_host(store);
    let Some((guest, driver)) = here else { return };
    for pool in kiln_node::pool::Pool::all(store.dirs()) {
        let name = pool.template().to_string();
        if name == keep {
            continue;
        }
        let stale = match templates.verify(&name, &guest, &driver, false) {
            Ok(_) => false,
            Err(snapshot::VerifySnapshotError::NotFound(_)) => true,
            Err(e) => template::is_stale(&e),
        };
        if stale {
            match crate::pool::drain(store, &name).await {
                Ok(n) if n > 0 => {
                    eprintln!("kiln: emptied the pool of stale template {name} ({n} sandboxes)")
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(template = %name, error = %e, "cannot empty a stale pool"),
            }
        }
    }
}

/// What templates are checked against here: the guest artifacts' digests
/// and the default driver (`None` if either is missing).
fn this_host(store: &Store) -> Option<(snapshot::GuestDigests, kiln_vmm::DriverInfo)> {
    let a = GuestArtifacts::locate(store.dirs()).ok()?;
    let (drv, _) = kiln_node::vm::driver_for(kiln_vmm::DriverChoice::Auto).ok()?;
    let g = snapshot::guest_digests(&a, drv.kind()).ok()?;
    Some((g, drv.info().clone()))
}
