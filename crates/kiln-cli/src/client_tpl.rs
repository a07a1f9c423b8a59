//! `kiln template create|ls|rm` and `kiln images ls|pull|rm` as clients of
//! a `kiln server` (`/v1/templates`, `/v1/images`), routed like the
//! sandbox commands (`client_cmd::try_dispatch`, `admin::api_route`); the
//! node's own background runs (`template create --auto`, `template fill`)
//! stay node-local. The output is what the node-local commands print:
//! template names, the same `ls` columns (the status column says, per
//! node, creating, ready or failed and why), image digests.

use std::io::Write;

use anyhow::{Result, bail};
use kiln_api::templates::{
    CreateTemplate, ImageList, ImageResult, Template, TemplateList, TemplatePhase,
};
use kiln_api::text::sanitize;
use serde_json::json;

use crate::ImagesCommand;
use crate::admin::{Client, Conn};
use crate::templates::TemplateCommand;

/// Path segment of a template name (names are `[A-Za-z0-9._-]`; anything
/// else is refused by the server anyway, so it is percent-encoded here).
fn seg(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// How long `template create` keeps asking a server that does not answer
/// (a restart) before it gives up.
const UNREACHABLE_WAIT: std::time::Duration = std::time::Duration::from_secs(90);
/// How long `template create` waits for a ready template's pool to fill.
const POOL_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

/// Whether a failed call is worth asking again: the server did not answer
/// (a restart) or said it is unavailable (no leader yet).
fn transient(e: &anyhow::Error) -> bool {
    e.chain()
        .any(|c| c.downcast_ref::<reqwest::Error>().is_some())
        || e.to_string().starts_with("503")
}

/// How long `template create` waits for every node to finish building.
const CREATE_WAIT: std::time::Duration = std::time::Duration::from_secs(600);

pub async fn template(conn: &Conn, cmd: TemplateCommand) -> Result<i32> {
    let c = Client::new(conn)?;
    match cmd {
        TemplateCommand::Create {
            image,
            cpus,
            memory,
            disk,
            pool,
            net,
            verbose,
            ..
        } => {
            crate::commands::check_resources(cpus, memory, disk)?;
            if net != "none" {
                bail!("--net default templates are not available through the API yet");
            }
            let req = CreateTemplate {
                name: None,
                image,
                resources: kiln_api::sandbox::Resources {
                    cpus,
                    memory_mib: memory,
                    disk_mib: disk,
                },
                pool: pool.unwrap_or(0),
                nodes: None,
            };
            let t0 = std::time::Instant::now();
            let body = c
                .call("POST", "/templates", Some(serde_json::to_value(&req)?))
                .await?;
            let mut t: Template = serde_json::from_slice(&body)?;
            // As the node-local command, return once it is built (or
            // failed) and its pool has the size asked for (filled, or
            // shrunk); a pool still filling POOL_WAIT after the template
            // is ready goes on in the background (said).
            let building =
                |t: &Template| t.nodes.iter().any(|n| n.phase == TemplatePhase::Creating);
            let filling = |t: &Template| {
                t.nodes
                    .iter()
                    .any(|n| n.phase == TemplatePhase::Ready && n.pool_ready != n.pool_target)
            };
            // The server may restart meanwhile (the template is in its
            // replicated state and its nodes go on): keep asking while it
            // does not answer or is unavailable; anything else ends it.
            let mut unreachable: Option<std::time::Instant> = None;
            let mut built_at: Option<std::time::Instant> = None;
            while t0.elapsed() < CREATE_WAIT {
                if !building(&t) {
                    let at = *built_at.get_or_insert_with(std::time::Instant::now);
                    if !filling(&t) || at.elapsed() >= POOL_WAIT {
                        break;
                    }
                }
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                match c
                    .call("GET", &format!("/templates/{}", seg(&t.name)), None)
                    .await
                {
                    Ok(body) => {
                        t = serde_json::from_slice(&body)?;
                        unreachable = None;
                    }
                    Err(e)
                        if transient(&e)
                            && unreachable
                                .is_none_or(|since| since.elapsed() < UNREACHABLE_WAIT) =>
                    {
                        tracing::debug!(error = %e, "waiting for the template; the server did not answer");
                        unreachable.get_or_insert_with(std::time::Instant::now);
                    }
                    Err(e) => return Err(e),
                }
            }
            let failed: Vec<String> = t
                .nodes
                .iter()
                .filter(|n| n.phase == TemplatePhase::Failed)
                .map(|n| format!("{}: {}", n.node, n.reason.as_deref().unwrap_or("?")))
                .collect();
            if !failed.is_empty() {
                bail!("template {} failed on {}", t.name, failed.join("; "));
            }
            if building(&t) {
                bail!(
                    "template {} is not ready after {} s (on its nodes: {})",
                    t.name,
                    CREATE_WAIT.as_secs(),
                    t.nodes
                        .iter()
                        .map(|n| format!(
                            "{} {:?}, pool {} of {}",
                            n.node, n.phase, n.pool_ready, n.pool_target
                        ))
                        .collect::<Vec<_>>()
                        .join("; ")
                );
            }
            if filling(&t) {
                eprintln!(
                    "kiln: the pool of template {} is still filling ({}); it goes on in the background",
                    t.name,
                    t.nodes
                        .iter()
                        .map(|n| format!("{} {} of {}", n.node, n.pool_ready, n.pool_target))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            if verbose {
                eprintln!(
                    "kiln: template {} ready on {} node(s) in {} ms",
                    t.name,
                    t.nodes.len(),
                    t0.elapsed().as_millis()
                );
            }
            println!("{}", t.name);
            Ok(0)
        }
        TemplateCommand::Ls { quiet } => {
            let body = c.call("GET", "/templates", None).await?;
            let list: TemplateList = serde_json::from_slice(&body)?;
            let mut out = std::io::stdout().lock();
            if quiet {
                // The templates the API acts on (automatic ones belong to
                // their nodes: `kiln template rm` through the API cannot
                // remove them).
                for t in list.items {
                    writeln!(out, "{}", t.name)?;
                }
                return Ok(0);
            }
            writeln!(
                out,
                "{:<20}  {:<24}  {:>4}  {:>7}  {:>7}  {:>9}  {:<10}  {:>6}  {:>5}  STATUS",
                "NAME", "IMAGE", "CPUS", "MEMORY", "DISK", "SIZE", "CREATED", "IN USE", "POOL"
            )?;
            for t in list.items {
                let size: u64 = t.nodes.iter().map(|n| n.size_bytes).sum();
                let (ready, target) = t
                    .nodes
                    .iter()
                    .fold((0, 0), |(r, g), n| (r + n.pool_ready, g + n.pool_target));
                let pool = if target == 0 {
                    "-".to_string()
                } else {
                    format!("{ready}/{target}")
                };
                let status: Vec<String> = t
                    .nodes
                    .iter()
                    .map(|n| match (&n.phase, &n.reason) {
                        (TemplatePhase::Ready, _) => format!("{}: ready", n.node),
                        (TemplatePhase::Creating, _) => format!("{}: creating", n.node),
                        (TemplatePhase::Failed, r) => {
                            format!("{}: failed: {}", n.node, r.as_deref().unwrap_or("?"))
                        }
                    })
                    .collect();
                let created_secs = t.created_at_ms / 1000;
                writeln!(
                    out,
                    "{:<20}  {:<24}  {:>4}  {:>7}  {:>7}  {:>9}  {:<10}  {:>6}  {:>5}  {}",
                    t.name,
                    crate::commands::truncate(&t.image, 24),
                    t.resources.cpus,
                    format!("{}M", t.resources.memory_mib),
                    format!("{}M", t.resources.disk_mib),
                    crate::snapshots::human(size),
                    crate::commands::ago(created_secs),
                    "-",
                    pool,
                    status.join(", ")
                )?;
            }
            // Each node's automatic templates (made after cold starts), as
            // the local listing marks them.
            for t in list.automatic {
                writeln!(
                    out,
                    "{:<20}  {:<24}  {:>4}  {:>7}  {:>7}  {:>9}  {:<10}  {:>6}  {:>5}  {}",
                    sanitize(&t.name),
                    crate::commands::truncate(&sanitize(&t.image), 24),
                    t.resources.cpus,
                    format!("{}M", t.resources.memory_mib),
                    format!("{}M", t.resources.disk_mib),
                    crate::snapshots::human(t.size_bytes),
                    crate::commands::ago(t.created_at_ms / 1000),
                    "-",
                    "-",
                    format_args!(
                        "ready (automatic, node {})",
                        t.node.as_ref().map_or("?", |n| n.as_str())
                    )
                )?;
            }
            Ok(0)
        }
        TemplateCommand::Rm { names } => {
            let mut code = 0;
            for name in names {
                match c
                    .call("DELETE", &format!("/templates/{}", seg(&name)), None)
                    .await
                {
                    Ok(_) => println!("{name}"),
                    Err(e) => {
                        eprintln!("kiln: {e:#}");
                        code = 125;
                    }
                }
            }
            Ok(code)
        }
        TemplateCommand::Fill { .. } => {
            bail!("template fill is the node's own (run by its daemon); not an API command")
        }
    }
}

pub async fn images(conn: &Conn, cmd: ImagesCommand) -> Result<i32> {
    let c = Client::new(conn)?;
    match cmd {
        ImagesCommand::Pull { image, insecure } => {
            if !insecure.is_empty() {
                bail!(
                    "--insecure-registry is the node's setting: start the node (kiln up, kiln node) with --insecure-registry"
                );
            }
            let body = c
                .call("POST", "/images/pull", Some(json!({ "ref": image })))
                .await?;
            let r: ImageResult = serde_json::from_slice(&body)?;
            let mut digests: Vec<&str> = r.nodes.iter().map(|n| n.digest.as_str()).collect();
            digests.dedup();
            for d in digests {
                println!("{d}");
            }
            Ok(0)
        }
        ImagesCommand::Ls { quiet } => {
            let body = c.call("GET", "/images", None).await?;
            let list: ImageList = serde_json::from_slice(&body)?;
            if quiet {
                for i in list.items {
                    println!("{}", i.reference);
                }
                return Ok(0);
            }
            println!("{:<48} NODES", "REFERENCE");
            for i in list.items {
                let nodes: Vec<String> = i.nodes.iter().map(|n| n.to_string()).collect();
                println!("{:<48} {}", i.reference, nodes.join(","));
            }
            Ok(0)
        }
        ImagesCommand::Rm {
            images: names,
            force,
        } => {
            if force {
                bail!("-f is not available through the API (the node refuses in-use images)");
            }
            let mut code = 0;
            for name in &names {
                let path = seg_ref(name);
                match c.call("DELETE", &format!("/images/{path}"), None).await {
                    Ok(body) => {
                        let r: ImageResult = serde_json::from_slice(&body)?;
                        println!("untagged {}", r.reference);
                        for n in r.nodes {
                            println!("removed {} ({})", n.digest, n.node);
                        }
                    }
                    Err(e) => {
                        eprintln!("kiln: cannot remove {name}: {e:#}");
                        code = 125;
                    }
                }
            }
            Ok(code)
        }
        ImagesCommand::Prune => bail!("images prune is not available through the API yet"),
    }
}

/// An image reference as one path segment (`/` percent-encoded; `:` and
/// `@` kept).
fn seg_ref(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':' | b'@') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}
