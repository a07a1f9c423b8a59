//! Commit throughput and latency of sandbox creates through real Raft
//! replicas on loopback (the numbers behind `kiln bench api`, VM boot
//! excluded: nothing runs the sandboxes). Also the helper that starts a
//! local cluster, shared with the integration tests.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_api::cluster::{Quotas, TenantName};
use kiln_api::sandbox::{SandboxId, SandboxSpec};
use serde::Serialize;

use crate::node::{ClusterError, RaftNodeConfig, StartError, WriteError};
use crate::{Command, RaftNode, Response, ServerId};

/// The cluster secret of [`start_local_cluster`]'s replicas (loopback
/// only, for benches and tests; a real cluster's comes from a file).
pub const LOCAL_CLUSTER_SECRET: &str = "kiln-local-cluster-secret-for-tests";

/// Starts `n` replicas on `127.0.0.1:0` with databases under `dir/<id>`,
/// initialises them as one cluster through server 1, and waits for a
/// leader. `tweak` adjusts each replica's configuration.
pub async fn start_local_cluster(
    n: u64,
    dir: &Path,
    tweak: impl Fn(&mut RaftNodeConfig),
) -> Result<Vec<Arc<RaftNode>>, LocalClusterError> {
    let mut nodes = Vec::new();
    for id in 1..=n {
        let listen: SocketAddr = ([127, 0, 0, 1], 0).into();
        let mut cfg = RaftNodeConfig::new(id, dir.join(id.to_string()), listen);
        cfg.api_addr = format!("http://api-{id}.invalid");
        cfg.cluster_secret = LOCAL_CLUSTER_SECRET.into();
        tweak(&mut cfg);
        nodes.push(Arc::new(RaftNode::start(cfg).await?));
    }
    let members = nodes
        .iter()
        .map(|n| (n.id(), n.node()))
        .collect::<BTreeMap<_, _>>();
    nodes[0].initialize(members).await?;
    wait_for_leader(&nodes, Duration::from_secs(10)).await?;
    Ok(nodes)
}

/// Waits until some replica of `nodes` leads and the others agree.
pub async fn wait_for_leader(
    nodes: &[Arc<RaftNode>],
    timeout: Duration,
) -> Result<ServerId, LocalClusterError> {
    let deadline = Instant::now() + timeout;
    loop {
        let leaders: Vec<ServerId> = nodes
            .iter()
            .filter(|n| n.status().role == crate::RaftRole::Leader)
            .map(|n| n.id())
            .collect();
        if let [l] = leaders[..]
            && nodes.iter().all(|n| n.status().leader == Some(l))
        {
            return Ok(l);
        }
        if Instant::now() > deadline {
            return Err(LocalClusterError::NoLeader(timeout));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LocalClusterError {
    #[error(transparent)]
    Start(#[from] StartError),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(transparent)]
    Write(#[from] WriteError),
    #[error("no leader within {0:?}")]
    NoLeader(Duration),
    #[error("a bench command was rejected: {0:?}")]
    Rejected(Response),
}

/// Stops every replica of a local cluster at once (one by one, the
/// survivors would go on replicating to, or electing among, the stopped
/// ones for a while).
pub async fn shutdown_all(nodes: &[Arc<RaftNode>]) {
    let downs: Vec<_> = nodes
        .iter()
        .cloned()
        .map(|n| tokio::spawn(async move { n.shutdown().await }))
        .collect();
    for d in downs {
        let _ = d.await;
    }
}

/// What one run measured.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub replicas: u64,
    pub creates: usize,
    pub concurrency: usize,
    pub seconds: f64,
    pub creates_per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} replica(s): {} creates, {} in flight: {:.0} creates/s committed, commit latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            self.replicas,
            self.creates,
            self.concurrency,
            self.creates_per_sec,
            self.p50_ms,
            self.p99_ms,
            self.max_ms
        )
    }
}

/// Commits `creates` sandbox creates (each with an idempotency key) through
/// the leader of a fresh `replicas`-server cluster under `dir`, with
/// `concurrency` clients in flight, and reports throughput and latency.
pub async fn bench_creates(
    replicas: u64,
    creates: usize,
    concurrency: usize,
    dir: &Path,
) -> Result<BenchReport, LocalClusterError> {
    let nodes = start_local_cluster(replicas, dir, |_| {}).await?;
    let leader_id = wait_for_leader(&nodes, Duration::from_secs(10)).await?;
    let leader = nodes
        .iter()
        .find(|n| n.id() == leader_id)
        .cloned()
        .ok_or(LocalClusterError::NoLeader(Duration::ZERO))?;
    let tenant =
        TenantName::new("bench").map_err(|_| LocalClusterError::NoLeader(Duration::ZERO))?;
    let r = leader
        .write(Command::CreateTenant {
            name: tenant.clone(),
            quotas: Quotas {
                sandboxes: 1_000_000,
                cpus: 1_000_000,
                memory_mib: 1 << 40,
            },
            now_ms: 0,
        })
        .await?;
    if r.is_rejected() {
        return Err(LocalClusterError::Rejected(r));
    }
    let concurrency = concurrency.max(1);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..concurrency {
        let leader = leader.clone();
        let tenant = tenant.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut i = worker;
            while i < creates {
                let mut bytes = [0u8; 8];
                bytes.copy_from_slice(&(i as u64 + 1).to_be_bytes());
                let cmd = Command::CreateSandbox {
                    id: SandboxId::from_random(bytes),
                    tenant: tenant.clone(),
                    spec: SandboxSpec::for_image("docker.io/library/busybox:latest"),
                    idempotency_key: Some(format!("bench-{i}")),
                    node: None,
                    now_ms: i as u64,
                };
                let t = Instant::now();
                let r = leader.write(cmd).await?;
                lat.push(t.elapsed());
                if r.is_rejected() {
                    return Err(LocalClusterError::Rejected(r));
                }
                i += concurrency;
            }
            Ok::<_, LocalClusterError>(lat)
        }));
    }
    let mut lat = Vec::with_capacity(creates);
    for t in tasks {
        match t.await {
            Ok(r) => lat.extend(r?),
            Err(_) => return Err(LocalClusterError::NoLeader(Duration::ZERO)),
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 - 1.0) * p).round() as usize)
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    let report = BenchReport {
        replicas,
        creates,
        concurrency,
        seconds,
        creates_per_sec: creates as f64 / seconds,
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
        max_ms: pct(1.0),
    };
    shutdown_all(&nodes).await;
    Ok(report)
}
