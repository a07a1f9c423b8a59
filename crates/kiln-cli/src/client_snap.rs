//! `kiln snapshot`, `kiln snapshot ls|rm`, `kiln restore` and `kiln fork`
//! as clients of a `kiln server` (REST API), used when a server is
//! configured: `KILN_SERVER`, or a current context with a server in
//! `~/.config/kiln/config.toml` (token from `KILN_TOKEN` or the context;
//! see `admin`). The output is the node-local commands' (`snapshots`).
//!
//! `kiln restore NAME` without `-d` follows the restored sandbox's output
//! through the logs route until its main process ends and exits with its
//! code (stdin is not forwarded).

use std::io::Write;

use anyhow::{Context, Result, bail};
use kiln_api::rest::{ForkResult, Sandbox, SandboxList, Snapshot, SnapshotList};
use kiln_api::sandbox::{Origin, SandboxSpec};
use kiln_api::stream::{LogRecord, LogStreamName};

use crate::admin::{Client, Conn, Output};
use crate::snapshots::{SnapshotArgs, SnapshotCommand, human};

/// Whether the CLI talks to a server rather than to this host's node.
pub fn configured() -> bool {
    if std::env::var("KILN_SERVER").is_ok_and(|v| !v.trim().is_empty()) {
        return true;
    }
    let Some(p) = crate::admin::config_path() else {
        return false;
    };
    let Ok(text) = std::fs::read_to_string(p) else {
        return false;
    };
    let Ok(cfg) = toml::from_str::<toml::Value>(&text) else {
        // Client::new reports the parse error.
        return true;
    };
    cfg.get("current-context")
        .and_then(|c| c.as_str())
        .and_then(|c| cfg.get("contexts")?.get(c)?.get("server"))
        .is_some()
}

fn client() -> Result<Client> {
    Client::new(&Conn {
        server: std::env::var("KILN_SERVER")
            .ok()
            .filter(|v| !v.trim().is_empty()),
        token: std::env::var("KILN_TOKEN").ok().filter(|v| !v.is_empty()),
        token_file: None,
        ca: None,
        context: None,
        output: Output::Table,
    })
}

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

pub async fn snapshot_cmd(args: SnapshotArgs) -> Result<i32> {
    let c = client()?;
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

/// `kiln restore NAME [-d]` through the server.
pub async fn restore(name: &str, detach: bool) -> Result<i32> {
    let c = client()?;
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
    if detach {
        println!("{id}");
        return Ok(0);
    }
    follow(&c, &id).await
}

/// Prints the sandbox's output until its main process ends; its exit code.
async fn follow(c: &Client, id: &str) -> Result<i32> {
    use base64::Engine;
    let mut resp = c
        .request(
            reqwest::Method::GET,
            &format!("/sandboxes/{id}/logs?follow=true"),
        )
        .send()
        .await
        .context("cannot reach the server")?;
    if !resp.status().is_success() {
        bail!("following the output: {}", resp.status());
    }
    let mut code = 0;
    let mut buf: Vec<u8> = vec![];
    loop {
        let Some(pos) = buf.iter().position(|&b| b == b'\n') else {
            match resp.chunk().await.context("the log stream broke off")? {
                Some(chunk) => {
                    buf.extend_from_slice(&chunk);
                    continue;
                }
                None => break,
            }
        };
        let line: Vec<u8> = buf.drain(..=pos).collect();
        let line = &line[..line.len() - 1];
        if line.is_empty() {
            continue;
        }
        match serde_json::from_slice::<LogRecord>(line) {
            Ok(LogRecord::Output { stream, data }) => {
                let b = base64::engine::general_purpose::STANDARD
                    .decode(data)
                    .unwrap_or_default();
                match stream {
                    LogStreamName::Stdout => {
                        let mut o = std::io::stdout().lock();
                        o.write_all(&b)?;
                        o.flush()?;
                    }
                    LogStreamName::Stderr => std::io::stderr().write_all(&b)?,
                }
            }
            Ok(LogRecord::Exit { exit_code, .. }) => code = exit_code,
            Ok(_) => {}
            Err(e) => bail!("the server's log stream: {e}"),
        }
    }
    std::io::stdout().flush()?;
    Ok(code)
}

/// `kiln fork ID -n N` through the server: prints the new IDs.
pub async fn fork(id: &str, n: u32) -> Result<i32> {
    let c = client()?;
    let id = resolve(&c, id).await?;
    let bytes = c
        .call(
            "POST",
            &format!("/sandboxes/{id}/fork"),
            Some(serde_json::json!({ "count": n })),
        )
        .await?;
    let r: ForkResult = serde_json::from_slice(&bytes).context("the server's answer")?;
    for id in &r.ids {
        println!("{id}");
    }
    if r.ids.len() < n as usize {
        eprintln!(
            "kiln: {} of {n} forks were not created",
            n as usize - r.ids.len()
        );
        return Ok(1);
    }
    Ok(0)
}
