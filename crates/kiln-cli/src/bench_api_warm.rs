//! `kiln bench api --warm --image IMAGE`: a warm `kiln run IMAGE -- echo
//! ready` → its first output byte, node-local against through the
//! embedded API (`kiln up`), in the same run on the same machine:
//!
//! - process start: `kiln --help` → first byte (what every `kiln run` child
//!   pays before it does anything; the API path below runs in-process);
//! - node-local, pool: `kiln run --rm` claiming a pool member (pool size 1,
//!   refilled before each run);
//! - node-local, template: `kiln run --rm` restoring the template (no pool);
//! - API, pool: `POST /v1/sandboxes` → polled until running → `GET
//!   …/logs?follow=true` → the first output record, over the API socket,
//!   with an API template of the same image and resources keeping a pool
//!   of 1 on the node (the server gives the create a ready member's ID and
//!   the node starts the sandbox from that member); interleaved with the
//!   node-local pool runs, so the API's own cost is the difference;
//! - API, template: the same with no pool (the node restores the
//!   template), against the node-local template row.
//!
//! The node-local rows are `kiln run` child processes without a server:
//! once `kiln run` routes through a running `kiln up`, they need it off.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use kiln_api::sandbox::{Resources, SandboxSpec};
use serde_json::{Value, json};

use crate::admin::{Client, Conn};
use crate::bench::{Stats, first_byte, kiln, stats};
use crate::up::{DownArgs, Paths};

/// One API run's times from the start of the `POST`.
struct ApiRun {
    committed: Duration,
    running: Duration,
    first_byte: Duration,
}

fn spec(image: &str) -> SandboxSpec {
    let mut s = SandboxSpec::for_image(image);
    s.cmd = vec!["echo".into(), "ready".into()];
    // `kiln run`'s defaults: the same template serves both paths.
    s.resources = Resources {
        cpus: 1,
        memory_mib: 256,
        disk_mib: 4096,
    };
    s
}

async fn api_run(c: &Client, image: &str) -> Result<ApiRun> {
    let t0 = Instant::now();
    let b = c
        .call(
            "POST",
            "/sandboxes",
            Some(serde_json::to_value(spec(image))?),
        )
        .await?;
    let committed = t0.elapsed();
    let v: Value = serde_json::from_slice(&b)?;
    let id = v["id"].as_str().context("no id in the answer")?.to_owned();
    let r = async {
        loop {
            let b = c.call("GET", &format!("/sandboxes/{id}"), None).await?;
            let v: Value = serde_json::from_slice(&b)?;
            match v["state"]["state"].as_str() {
                Some("running" | "exited" | "stopped") => break,
                Some("failed") => bail!("sandbox {id} failed: {}", v["state"]),
                _ => {}
            }
            if t0.elapsed() > Duration::from_secs(120) {
                bail!("sandbox {id} not running after 120 s: {}", v["state"]);
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let running = t0.elapsed();
        let (http, token) = c.http();
        let mut resp = http
            .get(c.url(&format!("/sandboxes/{id}/logs?follow=true")))
            .bearer_auth(token)
            .send()
            .await
            .context("GET logs")?;
        if !resp.status().is_success() {
            bail!("GET logs of {id}: {}", resp.status());
        }
        let mut buf = Vec::new();
        loop {
            let Some(chunk) = resp.chunk().await.context("reading the logs")? else {
                bail!("the logs of {id} ended without output");
            };
            buf.extend_from_slice(&chunk);
            let output = buf.split(|&b| b == b'\n').any(|line| {
                serde_json::from_slice::<Value>(line).is_ok_and(|r| r["type"] == "output")
            });
            if output {
                return Ok(ApiRun {
                    committed,
                    running,
                    first_byte: t0.elapsed(),
                });
            }
        }
    }
    .await;
    // Outside the measurement: removed (by the node) before the next run.
    c.call("DELETE", &format!("/sandboxes/{id}"), None).await?;
    let t1 = Instant::now();
    while c
        .call("GET", &format!("/sandboxes/{id}"), None)
        .await
        .is_ok()
    {
        if t1.elapsed() > Duration::from_secs(30) {
            bail!("sandbox {id} was not removed within 30 s of its DELETE");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    r
}

/// Waits until API template `name` has a ready pool member on a node.
async fn wait_api_pool(c: &Client, name: &str) -> Result<()> {
    let t0 = Instant::now();
    loop {
        let b = c.call("GET", &format!("/templates/{name}"), None).await?;
        let v: Value = serde_json::from_slice(&b)?;
        let ready = v["nodes"]
            .as_array()
            .is_some_and(|n| n.iter().any(|n| n["pool_ready"].as_u64() > Some(0)));
        if ready {
            return Ok(());
        }
        if t0.elapsed() > Duration::from_secs(120) {
            bail!("the pool of API template {name} did not refill within 120 s: {v}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_pool(pool: &kiln_node::pool::Pool) -> Result<()> {
    let t0 = Instant::now();
    while pool.ready().is_empty() {
        if t0.elapsed() > Duration::from_secs(120) {
            bail!(
                "the pool of {} did not refill within 120 s",
                pool.template()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

pub async fn api_warm(
    node: &kiln_node::node::Node,
    image: &str,
    runs: usize,
    out: &std::path::Path,
) -> Result<i32> {
    if runs == 0 {
        bail!("--runs must be at least 1");
    }
    let paths = Paths::new(&node.dirs().state);
    let (ep, started) = match crate::up::running(&paths) {
        Some(ep) => (ep, false),
        None => (
            crate::up::start_detached(&paths, None, &Default::default()).await?,
            true,
        ),
    };
    eprintln!("kiln up: {} ({})", ep.url, ep.socket.display());
    let conn = Conn {
        server: Some(format!("unix:{}", ep.socket.display())),
        token_file: Some(paths.tenant_token()),
        ..Conn::default()
    };
    let r = measure(node, &Client::new(&conn)?, image, runs).await;
    if started {
        crate::up::down(DownArgs {
            state_dir: Some(paths.state.clone()),
        })
        .await?;
    }
    let rows = r?;
    println!(
        "{:<44} {:>4} {:>9} {:>9}",
        "PATH (→ first byte)", "N", "P50 MS", "P99 MS"
    );
    for (label, _, s) in &rows {
        println!("{label:<44} {:>4} {:>9.1} {:>9.1}", s.n, s.p50_ms, s.p99_ms);
    }
    let by_key: serde_json::Map<String, Value> = rows
        .iter()
        .map(|(_, k, s)| Ok(((*k).to_owned(), serde_json::to_value(s)?)))
        .collect::<Result<_>>()?;
    let get = |k: &str| by_key.get(k).and_then(|v| v["p50_ms"].as_f64());
    let diff = |a: &str, b: &str| match (get(a), get(b)) {
        (Some(a), Some(b)) => a - b,
        _ => f64::NAN,
    };
    let added = diff("api_template", "local_template");
    let added_pool = diff("api_pool", "local_pool");
    println!(
        "the API path adds {added_pool:.1} ms p50 to a pooled warm start (API − node-local pool)"
    );
    println!(
        "the API path adds {added:.1} ms p50 to a template warm start (API − node-local template)"
    );
    let report = json!({
        "benchmark": "api-warm",
        "image": image,
        "runs": runs,
        "results": by_key,
        "api_added_p50_ms": added,
        "api_added_pool_p50_ms": added_pool,
    });
    std::fs::write(out, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("writing {}", out.display()))?;
    eprintln!("wrote {}", out.display());
    Ok(0)
}

type Row = (&'static str, &'static str, Stats);

async fn measure(
    node: &kiln_node::node::Node,
    c: &Client,
    image: &str,
    runs: usize,
) -> Result<Vec<Row>> {
    let run_args = || -> Vec<String> {
        ["run", "--rm", image, "--", "echo", "ready"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    };
    let name = kiln(&["template", "create", image, "--pool", "1"]).await?;
    let pool = kiln_node::pool::Pool::of(node.dirs(), &name);
    eprintln!("template {name}, pool of 1");
    let mut start = Vec::new();
    let mut pooled = Vec::new();
    for i in 0..runs {
        start.push(first_byte(vec!["--help".into()]).await?);
        wait_pool(&pool).await?;
        pooled.push(first_byte(run_args()).await?);
        eprintln!("node-local pool runs {}/{runs}", i + 1);
    }
    // The node's template of both paths is the same (named by its
    // content): its pool is the API template's from here on. Sizing it
    // races the node daemon draining or filling it: retried until settled.
    let resize = |n: &'static str| async move {
        let t0 = Instant::now();
        loop {
            match kiln(&["template", "create", image, "--pool", n]).await {
                Ok(_) => return anyhow::Ok(()),
                Err(e) if t0.elapsed() < Duration::from_secs(60) => {
                    tracing::debug!(error = %format!("{e:#}"), "pool resize retried");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(e),
            }
        }
    };
    resize("0").await?;
    // The same image and resources as an API template with a pool of 1 on
    // the node: a create through the API takes one of its members (the
    // server names the member's ID; `templates::pool_member`).
    let b = c
        .call(
            "POST",
            "/templates",
            Some(json!({
                "image": image,
                "resources": spec(image).resources,
                "pool": 1,
            })),
        )
        .await?;
    let api_tpl = serde_json::from_slice::<Value>(&b)?["name"]
        .as_str()
        .context("no template name in the answer")?
        .to_owned();
    eprintln!("API template {api_tpl}, pool of 1");
    let (mut p_committed, mut p_running, mut p_api) = (Vec::new(), Vec::new(), Vec::new());
    let result = async {
        for i in 0..runs {
            wait_api_pool(c, &api_tpl).await?;
            let r = api_run(c, image).await?;
            p_committed.push(r.committed);
            p_running.push(r.running);
            p_api.push(r.first_byte);
            eprintln!("API pool runs {}/{runs}", i + 1);
        }
        anyhow::Ok(())
    }
    .await;
    c.call("DELETE", &format!("/templates/{api_tpl}"), None)
        .await?;
    result?;
    resize("0").await?;
    let mut local = Vec::new();
    let (mut committed, mut running, mut api) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs {
        local.push(first_byte(run_args()).await?);
        let r = api_run(c, image).await?;
        committed.push(r.committed);
        running.push(r.running);
        api.push(r.first_byte);
        eprintln!("template runs {}/{runs}", i + 1);
    }
    Ok(vec![
        (
            "process start (kiln --help)",
            "process_start",
            stats(&start),
        ),
        ("node-local kiln run, pool", "local_pool", stats(&pooled)),
        ("API (kiln up), pool", "api_pool", stats(&p_api)),
        (
            "  of which POST committed",
            "api_pool_commit",
            stats(&p_committed),
        ),
        (
            "  of which POST → running",
            "api_pool_running",
            stats(&p_running),
        ),
        (
            "node-local kiln run, template",
            "local_template",
            stats(&local),
        ),
        ("API (kiln up), template", "api_template", stats(&api)),
        ("  of which POST committed", "api_commit", stats(&committed)),
        ("  of which POST → running", "api_running", stats(&running)),
    ])
}
