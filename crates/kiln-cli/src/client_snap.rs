//! `kiln snapshot`, `kiln snapshot ls|rm`, `kiln restore` and `kiln fork`
//! as clients of a `kiln server` (REST API), routed like the other sandbox
//! commands (`client_cmd::try_dispatch`, `admin::api_route`: `--server`,
//! `KILN_SERVER`, a context, or a running `kiln up`). The output is the
//! node-local commands' (`snapshots`).
//!
//! `kiln restore NAME` without `-d` follows the restored sandbox's output
//! through the logs route until its main process ends and exits with its
//! code (stdin is not forwarded).

use std::io::Write;

use anyhow::{Context, Result, bail};
use kiln_api::rest::{ForkResult, Sandbox, SandboxList, Snapshot, SnapshotList};
use kiln_api::sandbox::{Origin, SandboxSpec};

use crate::admin::{Client, Conn};
use crate::client_cmd::{Api, Attach, attach_main, start_failure};
use crate::snapshots::{SnapshotArgs, SnapshotCommand, human};

/// A snapshot name as a path segment (checked: no escaping needed).
fn path_part(s: &str) -> Result<&str> {
    if !kiln_api::sandbox::valid_name(s) {
        bail!(
            "invalid snapshot name {s:?}: use 1-128 characters of [A-Za-z0-9._-], not starting with . or -"
        );
    }
    Ok(s)
}

/// The full ID of the caller's sandbox `prefix` (a unique prefix, as the
/// node-local commands accept).
async fn resolve(c: &Client, prefix: &str) -> Result<String> {
    let bytes = c.call("GET", "/sandboxes", None).await?;
    let list: SandboxList = serde_json::from_slice(&bytes).context("the server's answer")?;
    let hits: Vec<&Sandbox> = list
        .items
        .iter()
        .filter(|s| s.id.as_str().starts_with(prefix))
        .collect();
    match hits.as_slice() {
        [one] => Ok(one.id.to_string()),
        [] => bail!("no sandbox matches {prefix:?}"),
        _ if hits.iter().any(|s| s.id.as_str() == prefix) => Ok(prefix.to_owned()),
        _ => bail!(
            "{prefix:?} matches {} sandboxes; give more of the ID",
            hits.len()
        ),
    }
}

pub async fn snapshot_cmd(conn: &Conn, args: SnapshotArgs) -> Result<i32> {
    let c = Client::new(conn)?;
    match (args.command, args.id) {
        (Some(SnapshotCommand::Ls { quiet }), _) => ls(&c, quiet).await,
        (Some(SnapshotCommand::Rm { names }), _) => {
            let mut code = 0;
            for name in names {
                let r = match path_part(&name) {
                    Ok(n) => c.call("DELETE", &format!("/snapshots/{n}"), None).await,
                    Err(e) => Err(e),
                };
                match r {
                    Ok(_) => println!("{name}"),
                    Err(e) => {
                        eprintln!("kiln: {e:#}");
                        code = 125;
                    }
                }
            }
            Ok(code)
        }
        (None, Some(id)) => {
            let id = resolve(&c, &id).await?;
            let body = match args.name {
                Some(n) => serde_json::json!({ "name": n }),
                None => serde_json::json!({}),
            };
            let bytes = c
                .call("POST", &format!("/sandboxes/{id}/snapshot"), Some(body))
                .await?;
            let s: Snapshot = serde_json::from_slice(&bytes).context("the server's answer")?;
            println!("{}", s.name);
            Ok(0)
        }
        (None, None) => bail!("kiln snapshot ID [--name NAME], or kiln snapshot ls|rm"),
    }
}

async fn ls(c: &Client, quiet: bool) -> Result<i32> {
    let bytes = c.call("GET", "/snapshots", None).await?;
    let list: SnapshotList = serde_json::from_slice(&bytes).context("the server's answer")?;
    let sandboxes: SandboxList = if quiet {
        SandboxList {
            items: vec![],
            next: None,
        }
    } else {
        serde_json::from_slice(&c.call("GET", "/sandboxes", None).await?)
            .context("the server's answer")?
    };
    let mut out = std::io::stdout().lock();
    if !quiet {
        writeln!(
            out,
            "{:<24}  {:<16}  {:<24}  {:>9}  {:<10}  IN USE BY",
            "NAME", "SOURCE", "IMAGE", "SIZE", "CREATED"
        )?;
    }
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    for s in list.items {
        if quiet {
            writeln!(out, "{}", s.name)?;
            continue;
        }
        let users = sandboxes
            .items
            .iter()
            .filter(|b| {
                !b.state.is_finished()
                    && matches!(&b.spec.origin, Origin::Snapshot { snapshot } if *snapshot == s.name)
            })
            .count();
        let size: u64 = s.holders.iter().map(|h| h.size_bytes).max().unwrap_or(0);
        let created = kiln_node::store::now_secs()
            .saturating_sub(now_ms.saturating_sub(s.created_at_ms) / 1000);
        writeln!(
            out,
            "{:<24}  {:<16}  {:<24}  {:>9}  {:<10}  {}",
            s.name,
            s.source.as_ref().map_or("-", |i| i.as_str()),
            crate::commands::truncate(&s.image, 24),
            human(size),
            crate::commands::ago(created),
            users
        )?;
    }
    Ok(0)
}

/// `kiln restore NAME [-d]` through the server: as `kiln run`, it returns
/// (or attaches) once the sandbox runs; one that fails to start is printed
/// and deleted (nothing is left, as on a single host).
pub async fn restore(conn: &Conn, name: &str, detach: bool) -> Result<i32> {
    let t0 = std::time::Instant::now();
    let c = Client::new(conn)?;
    // The server takes the image and resources from the snapshot.
    let mut spec = SandboxSpec::for_image("snapshot");
    spec.origin = Origin::Snapshot {
        snapshot: name.to_owned(),
    };
    let bytes = c
        .call("POST", "/sandboxes", Some(serde_json::to_value(&spec)?))
        .await?;
    let sb: Sandbox = serde_json::from_slice(&bytes).context("the server's answer")?;
    let id = sb.id.to_string();
    let api = Api(c);
    let sb = api.started(&id).await?;
    if let Some(code) = start_failure(&sb) {
        let _ = api.remove(&id).await;
        return Ok(code);
    }
    if detach {
        println!("{id}");
        return Ok(0);
    }
    attach_main(
        &api,
        &id,
        Attach {
            interactive: false,
            tty: false,
            rm: false,
            timeout: None,
            verbose: None,
            t0,
        },
    )
    .await
}

/// `kiln fork ID -n N` through the server: prints the IDs of the forks
/// that run; one that failed to start is said on stderr (`fork I of N
/// failed: …`) and deleted, and the exit code is then 1, as on a single
/// host.
pub async fn fork(conn: &Conn, id: &str, n: u32) -> Result<i32> {
    let c = Client::new(conn)?;
    let id = resolve(&c, id).await?;
    let bytes = c
        .call(
            "POST",
            &format!("/sandboxes/{id}/fork"),
            Some(serde_json::json!({ "count": n })),
        )
        .await?;
    let r: ForkResult = serde_json::from_slice(&bytes).context("the server's answer")?;
    let api = Api(c);
    let mut failed = (n as usize).saturating_sub(r.ids.len());
    if failed > 0 {
        eprintln!("kiln: {failed} of {n} forks were not created");
    }
    for (i, fid) in r.ids.iter().enumerate() {
        let fid = fid.to_string();
        let sb = api.started(&fid).await?;
        if let kiln_api::sandbox::SandboxState::Failed { error, .. } = &sb.state {
            eprintln!(
                "kiln: fork {} of {n} failed: {}",
                i + 1,
                kiln_api::text::sanitize(error)
            );
            let _ = api.remove(&fid).await;
            failed += 1;
            continue;
        }
        println!("{fid}");
    }
    Ok(if failed > 0 { 1 } else { 0 })
}
