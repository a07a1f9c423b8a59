//! `kill -9` of a real process in the middle of writes: every write it
//! acknowledged is there after a restart from its redb file. The test
//! re-executes this test binary as the child, running only the ignored
//! `crash_child` (which does nothing unless `KILN_STORE_CRASH_DIR` is set).

use std::io::{BufRead, BufReader, Write};
use std::process::{Command as Process, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use kiln_api::cluster::{Quotas, TenantName};
use kiln_api::sandbox::{SandboxId, SandboxSpec};
use kiln_store::bench::wait_for_leader;
use kiln_store::node::RaftNodeConfig;
use kiln_store::{Command, RaftNode, Response};

const DIR_ENV: &str = "KILN_STORE_CRASH_DIR";
const PORT_ENV: &str = "KILN_STORE_CRASH_PORT";

fn cfg(dir: &str, port: u16) -> RaftNodeConfig {
    let mut c = RaftNodeConfig::new(1, dir, ([127, 0, 0, 1], port).into());
    c.heartbeat_ms = 100;
    c.cluster_secret = kiln_store::bench::LOCAL_CLUSTER_SECRET.into();
    c.election_timeout_ms = (300, 600);
    c
}

/// The child: one replica writing creates as fast as it can, printing
/// each acknowledged one. Does nothing unless started by the parent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the child process of acknowledged_writes_survive_kill_9, not a test"]
async fn crash_child() -> anyhow::Result<()> {
    let (Ok(dir), Ok(port)) = (std::env::var(DIR_ENV), std::env::var(PORT_ENV)) else {
        anyhow::bail!("run by acknowledged_writes_survive_kill_9 only");
    };
    let node = Arc::new(RaftNode::start(cfg(&dir, port.parse()?)).await?);
    node.initialize([(1, node.node())].into()).await?;
    wait_for_leader(std::slice::from_ref(&node), Duration::from_secs(10)).await?;
    let tenant = TenantName::new("acme")?;
    node.write(Command::CreateTenant {
        name: tenant.clone(),
        quotas: Quotas {
            sandboxes: 1_000_000,
            cpus: 1_000_000,
            memory_mib: 1 << 40,
        },
        now_ms: 0,
    })
    .await?;
    // Eight writers, so group proposals and group commit are in play.
    let mut tasks = Vec::new();
    for w in 0..8u64 {
        let node = node.clone();
        let tenant = tenant.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0.. {
                let n = i * 8 + w;
                let cmd = Command::CreateSandbox {
                    id: SandboxId::from_random((n + 1).to_be_bytes()),
                    tenant: tenant.clone(),
                    spec: SandboxSpec::for_image("busybox"),
                    idempotency_key: Some(format!("k{n}")),
                    node: None,
                    now_ms: n,
                };
                if let Ok(Response::SandboxCreated { id, .. }) = node.write(cmd).await {
                    let mut out = std::io::stdout().lock();
                    let _ = writeln!(out, "ACK k{n} {id}");
                    let _ = out.flush();
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_kill_9() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut child = Process::new(std::env::current_exe()?)
        .args([
            "--exact",
            "crash_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(DIR_ENV, dir.path())
        .env(PORT_ENV, port.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("spawn the child")?;
    let stdout = child.stdout.take().context("child stdout")?;
    let mut acked = Vec::new();
    let mut lines = BufReader::new(stdout).lines();
    while acked.len() < 300 {
        match lines.next() {
            Some(line) => {
                let line = line?;
                if let Some(rest) = line.strip_prefix("ACK ") {
                    let (key, id) = rest.split_once(' ').context("ACK line")?;
                    acked.push((key.to_owned(), id.to_owned()));
                }
            }
            None => bail!("the child ended after {} acknowledgements", acked.len()),
        }
    }
    // SIGKILL while the writers are still going.
    child.kill()?;
    child.wait()?;
    // Whatever the pipe still held was acknowledged before the kill too.
    for line in lines.map_while(Result::ok) {
        if let Some((key, id)) = line.strip_prefix("ACK ").and_then(|r| r.split_once(' ')) {
            acked.push((key.to_owned(), id.to_owned()));
        }
    }

    eprintln!("{} creates acknowledged before SIGKILL", acked.len());
    let node = Arc::new(RaftNode::start(cfg(dir.path().to_str().context("utf-8")?, port)).await?);
    wait_for_leader(std::slice::from_ref(&node), Duration::from_secs(10)).await?;
    // Leadership commits a blank entry, so everything in the log is applied.
    node.write(Command::Heartbeat {
        name: kiln_api::cluster::NodeName::new("none")?,
        now_ms: 0,
        images: None,
        templates: None,
    })
    .await?;
    let missing = node
        .read(|s| {
            acked
                .iter()
                .filter(|(key, id)| {
                    !s.sandboxes
                        .values()
                        .any(|r| r.idempotency_key.as_deref() == Some(key) && r.id.as_str() == id)
                })
                .cloned()
                .collect::<Vec<_>>()
        })
        .await?;
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged creates lost: {:?}",
        missing.len(),
        acked.len(),
        &missing[..missing.len().min(5)]
    );
    let total = node.read_local(|s| s.sandboxes.len());
    assert!(total >= acked.len(), "{total} < {}", acked.len());
    node.shutdown().await;
    Ok(())
}
