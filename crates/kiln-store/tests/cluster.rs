//! Real Raft clusters on 127.0.0.1 (ephemeral ports, real TCP, real redb
//! files in temporary directories): election and replication, leader
//! kills under a retrying client, restart and catch-up, a minority
//! partition, and a new server joining from a snapshot after compaction.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use kiln_api::cluster::{Quotas, TenantName};
use kiln_api::sandbox::{SandboxId, SandboxSpec};
use kiln_store::bench::{start_local_cluster, wait_for_leader};
use kiln_store::node::{RaftNodeConfig, ReadError, WriteError};
use kiln_store::{Command, RaftNode, RaftRole, Response, ServerId};

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,kiln_store=info".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Faster timeouts than production, still tolerant of a loaded 2-core host.
fn tweak(cfg: &mut RaftNodeConfig) {
    cfg.cluster_secret = kiln_store::bench::LOCAL_CLUSTER_SECRET.into();
    cfg.heartbeat_ms = 100;
    cfg.election_timeout_ms = (500, 1000);
}

fn tenant() -> TenantName {
    TenantName::new("acme").expect("valid")
}

fn create_tenant() -> Command {
    Command::CreateTenant {
        name: tenant(),
        quotas: Quotas {
            sandboxes: 100_000,
            cpus: 100_000,
            memory_mib: 1 << 40,
        },
        now_ms: 1,
    }
}

fn random_id() -> SandboxId {
    let mut b = [0u8; 8];
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos();
    let mix =
        nanos ^ (u128::from(COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)) << 64);
    let h = (mix as u64) ^ ((mix >> 64) as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    b.copy_from_slice(&h.to_be_bytes());
    SandboxId::from_random(b)
}
static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

fn create(key: &str) -> Command {
    Command::CreateSandbox {
        id: random_id(),
        tenant: tenant(),
        spec: SandboxSpec::for_image("busybox"),
        idempotency_key: Some(key.to_owned()),
        node: None,
        now_ms: 2,
    }
}

/// The live replicas, shared with client tasks.
#[derive(Clone, Default)]
struct Live(Arc<Mutex<BTreeMap<ServerId, Arc<RaftNode>>>>);

impl Live {
    fn get(&self, id: ServerId) -> Option<Arc<RaftNode>> {
        self.0.lock().expect("lock").get(&id).cloned()
    }
    fn any(&self) -> Vec<Arc<RaftNode>> {
        self.0.lock().expect("lock").values().cloned().collect()
    }
    fn insert(&self, n: Arc<RaftNode>) {
        self.0.lock().expect("lock").insert(n.id(), n);
    }
    fn remove(&self, id: ServerId) -> Option<Arc<RaftNode>> {
        self.0.lock().expect("lock").remove(&id)
    }
}

/// Writes like the API would: to whichever server it knows, following
/// `ForwardToLeader`, retrying on errors until `deadline`.
async fn write_retrying(live: &Live, cmd: Command, deadline: Instant) -> anyhow::Result<Response> {
    let mut target: Option<ServerId> = None;
    loop {
        let node = match target.and_then(|t| live.get(t)) {
            Some(n) => n,
            None => live.any().first().cloned().context("no live server")?,
        };
        // Each attempt of a create carries a fresh ID, as a retrying API
        // server would pick one; the idempotency key makes them one.
        let mut cmd = cmd.clone();
        if let Command::CreateSandbox { id, .. } = &mut cmd {
            *id = random_id();
        }
        match tokio::time::timeout(Duration::from_secs(3), node.write(cmd)).await {
            Ok(Ok(r)) => return Ok(r),
            Ok(Err(WriteError::ForwardToLeader { leader: Some(l) })) => {
                assert!(
                    l.node.is_some(),
                    "the redirect carries the leader's addresses"
                );
                target = Some(l.id);
            }
            Ok(Err(_)) | Err(_) => {
                target = None;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        if Instant::now() > deadline {
            bail!("write not acknowledged before the deadline");
        }
        // Rotate through servers when no leader is known.
        if target.is_none() {
            let all = live.any();
            if !all.is_empty() {
                let i = (COUNTER.load(std::sync::atomic::Ordering::Relaxed) as usize) % all.len();
                target = Some(all[i].id());
            }
        }
    }
}

async fn wait_leader_of(live: &Live) -> anyhow::Result<ServerId> {
    Ok(wait_for_leader(&live.any(), Duration::from_secs(15)).await?)
}

/// Waits until every live replica has applied everything any of them has
/// applied (applied entries are committed, so all must get there).
async fn wait_converged(live: &Live, _leader: ServerId) -> anyhow::Result<()> {
    let nodes = live.any();
    let index = nodes
        .iter()
        .filter_map(|n| n.applied_index())
        .max()
        .unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(30);
    for n in &nodes {
        while n.applied_index().unwrap_or(0) < index {
            if Instant::now() > deadline {
                bail!(
                    "server {} did not catch up to {index}: {:?}",
                    n.id(),
                    n.status()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    Ok(())
}

fn state_bytes(n: &RaftNode) -> Vec<u8> {
    n.read_local(|s| s.to_bytes().expect("serialize"))
}

async fn kill(live: &Live, id: ServerId) -> anyhow::Result<(PathBuf, SocketAddr)> {
    let n = live.remove(id).context("not live")?;
    let addr = n.local_addr();
    n.shutdown().await;
    // Wait until client tasks dropped their handles: the database file is
    // released with the last one.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut n = n;
    loop {
        match Arc::try_unwrap(n) {
            Ok(node) => {
                drop(node);
                break;
            }
            Err(back) => {
                if Instant::now() > deadline {
                    bail!("server {id} is still referenced");
                }
                n = back;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    Ok((PathBuf::new(), addr))
}

/// Restarts a server from its directory on its old port (members know it
/// by that address).
async fn restart(live: &Live, base: &Path, id: ServerId, addr: SocketAddr) -> anyhow::Result<()> {
    let mut cfg = RaftNodeConfig::new(id, base.join(id.to_string()), addr);
    cfg.api_addr = format!("http://api-{id}.invalid");
    tweak(&mut cfg);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match RaftNode::start(cfg.clone()).await {
            Ok(n) => {
                live.insert(Arc::new(n));
                return Ok(());
            }
            // The flusher thread may hold the file for a moment longer.
            Err(e) if Instant::now() < deadline => {
                tracing::info!(error = %e, "restart retry");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e).context("restart"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_kills_under_a_retrying_client_lose_and_duplicate_nothing() -> anyhow::Result<()> {
    init_tracing();
    let dir = tempfile::tempdir()?;
    let live = Live::default();
    for n in start_local_cluster(3, dir.path(), tweak).await? {
        live.insert(n);
    }
    let leader = wait_leader_of(&live).await?;
    tracing::info!(leader, "phase: leader elected; replicate a first write");
    let r = live
        .get(leader)
        .context("leader")?
        .write(create_tenant())
        .await?;
    assert_eq!(r, Response::Done);
    wait_converged(&live, leader).await?;
    for n in live.any() {
        assert!(
            n.read_local(|s| s.tenants.contains_key(&tenant())),
            "server {}",
            n.id()
        );
    }

    tracing::info!(
        "phase: a follower refuses writes and linearizable reads with the leader's address"
    );
    let follower = live
        .any()
        .into_iter()
        .find(|n| n.id() != leader)
        .context("follower")?;
    match follower.write(create("from-follower")).await {
        Err(WriteError::ForwardToLeader { leader: Some(l) }) => {
            assert_eq!(l.id, leader);
            let node = l.node.context("leader node")?;
            assert_eq!(node.api_addr, format!("http://api-{leader}.invalid"));
            assert_eq!(
                node.raft_addr,
                live.get(leader).context("leader")?.local_addr().to_string()
            );
        }
        other => bail!("a follower accepted or failed a write oddly: {other:?}"),
    }
    assert!(matches!(
        follower.read(|s| s.sandboxes.len()).await,
        Err(ReadError::ForwardToLeader { .. })
    ));
    assert_eq!(
        live.get(leader)
            .context("leader")?
            .read(|s| s.tenants.len())
            .await?,
        1
    );
    // A killed server's database is released with its last handle.
    drop(follower);

    tracing::info!("phase: a follower's applied-index watch wakes on a commit");
    {
        let follower = live
            .any()
            .into_iter()
            .find(|n| n.id() != leader)
            .context("follower")?;
        let mut rx = follower.subscribe_applied();
        let before = *rx.borrow_and_update();
        let (_, index) = live
            .get(leader)
            .context("leader")?
            .write_indexed(create("watched"))
            .await?;
        tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|&i| i >= index)).await??;
        assert!(index > before);
        assert!(follower.read_local(|s| {
            s.sandboxes
                .values()
                .any(|r| r.idempotency_key.as_deref() == Some("watched"))
        }));
    }

    tracing::info!("phase: client loop writes creates while the leader is killed twice");
    const CREATES: usize = 150;
    let acked: Arc<Mutex<BTreeMap<String, SandboxId>>> = Arc::default();
    let client = {
        let live = live.clone();
        let acked = acked.clone();
        tokio::spawn(async move {
            for i in 0..CREATES {
                let key = format!("key-{i}");
                let deadline = Instant::now() + Duration::from_secs(60);
                let r = write_retrying(&live, create(&key), deadline).await?;
                match r {
                    Response::SandboxCreated { id, .. } => {
                        let prev = acked.lock().expect("lock").insert(key.clone(), id.clone());
                        assert!(prev.is_none());
                    }
                    other => bail!("create {key} answered {other:?}"),
                }
            }
            Ok::<_, anyhow::Error>(())
        })
    };
    let base = dir.path().to_owned();
    let mut killed = Vec::new();
    for round in 0..2 {
        // Let some creates through first.
        let target = (round + 1) * CREATES / 4;
        let deadline = Instant::now() + Duration::from_secs(60);
        while acked.lock().expect("lock").len() < target {
            if Instant::now() > deadline {
                bail!("the client made no progress");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let old = wait_leader_of(&live).await?;
        tracing::info!(round, old, acked = target, "phase: kill the leader");
        let (_, addr) = kill(&live, old).await?;
        let new = wait_leader_of(&live).await?;
        assert_ne!(new, old);
        tracing::info!(
            round,
            new,
            "phase: new leader; restart the old one from its database"
        );
        restart(&live, &base, old, addr).await?;
        killed.push(old);
    }
    client.await??;

    let leader = wait_leader_of(&live).await?;
    wait_converged(&live, leader).await?;
    tracing::info!(
        ?killed,
        "phase: check every acknowledged create exists exactly once"
    );
    let acked = acked.lock().expect("lock").clone();
    assert_eq!(acked.len(), CREATES);
    for n in live.any() {
        n.read_local(|s| {
            assert_eq!(
                s.sandboxes.len(),
                CREATES + 1,
                "server {}: the client's creates and \"watched\", no duplicates, none lost",
                n.id()
            );
            for (key, id) in &acked {
                let rec = s
                    .sandboxes
                    .get(id)
                    .unwrap_or_else(|| panic!("{key} → {id} missing"));
                assert_eq!(rec.idempotency_key.as_deref(), Some(key.as_str()));
            }
            let keys: BTreeSet<_> = s
                .sandboxes
                .values()
                .filter_map(|r| r.idempotency_key.clone())
                .collect();
            assert_eq!(keys.len(), CREATES + 1);
        });
    }
    let reference = state_bytes(live.get(leader).context("leader")?.as_ref());
    for n in live.any() {
        assert_eq!(state_bytes(&n), reference, "server {} diverged", n.id());
        assert_ne!(n.status().role, RaftRole::Shutdown);
    }
    for n in live.any() {
        n.shutdown().await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minority_cannot_commit_majority_can_and_minority_catches_up() -> anyhow::Result<()> {
    init_tracing();
    let dir = tempfile::tempdir()?;
    let live = Live::default();
    for n in start_local_cluster(3, dir.path(), tweak).await? {
        live.insert(n);
    }
    let old = wait_leader_of(&live).await?;
    live.get(old)
        .context("leader")?
        .write(create_tenant())
        .await?;
    wait_converged(&live, old).await?;

    tracing::info!(old, "phase: cut the leader off from both followers");
    let others: Vec<ServerId> = live
        .any()
        .iter()
        .map(|n| n.id())
        .filter(|&i| i != old)
        .collect();
    let minority = live.get(old).context("leader")?;
    for &o in &others {
        minority.faults().cut(o);
        live.get(o).context("peer")?.faults().cut(old);
    }
    // The isolated leader cannot commit.
    let r = tokio::time::timeout(Duration::from_secs(3), minority.write(create("minority"))).await;
    match r {
        Err(_) | Ok(Err(_)) => {}
        Ok(Ok(resp)) => bail!("the minority committed a write: {resp:?}"),
    }
    // The majority elects a leader among itself and commits.
    let majority = Live::default();
    for &o in &others {
        majority.insert(live.get(o).context("peer")?);
    }
    let new = wait_leader_of(&majority).await?;
    assert_ne!(new, old);
    let deadline = Instant::now() + Duration::from_secs(30);
    for i in 0..20 {
        let r = write_retrying(&majority, create(&format!("majority-{i}")), deadline).await?;
        assert!(matches!(r, Response::SandboxCreated { created: true, .. }));
    }
    assert_eq!(
        minority.read_local(|s| s.sandboxes.len()),
        0,
        "the minority applied nothing"
    );

    tracing::info!("phase: heal; the old leader steps down and catches up");
    for n in live.any() {
        n.faults().heal_all();
    }
    let leader = wait_leader_of(&live).await?;
    wait_converged(&live, leader).await?;
    let reference = state_bytes(live.get(leader).context("leader")?.as_ref());
    for n in live.any() {
        assert_eq!(state_bytes(&n), reference, "server {} diverged", n.id());
        n.read_local(|s| {
            assert_eq!(s.sandboxes.len(), 20);
            assert!(
                !s.sandboxes
                    .values()
                    .any(|r| r.idempotency_key.as_deref() == Some("minority")),
                "the minority's uncommitted write was discarded"
            );
        });
    }
    for n in live.any() {
        n.shutdown().await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_server_joins_from_a_snapshot_after_compaction() -> anyhow::Result<()> {
    init_tracing();
    let dir = tempfile::tempdir()?;
    let live = Live::default();
    let compact = |cfg: &mut RaftNodeConfig| {
        tweak(cfg);
        cfg.keep_behind_snapshot = 0;
    };
    for n in start_local_cluster(3, dir.path(), compact).await? {
        live.insert(n);
    }
    let leader_id = wait_leader_of(&live).await?;
    let leader = live.get(leader_id).context("leader")?;
    leader.write(create_tenant()).await?;
    for i in 0..200 {
        leader.write(create(&format!("k{i}"))).await?;
    }
    wait_converged(&live, leader_id).await?;
    tracing::info!("phase: snapshot and compact every replica");
    for n in live.any() {
        let at = n.snapshot_now(Duration::from_secs(20)).await?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while n.status().purged_index < Some(at) {
            if Instant::now() > deadline {
                bail!(
                    "server {} did not purge up to {at}: {:?}",
                    n.id(),
                    n.status()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let st = leader.status();
    assert!(st.purged_index.is_some_and(|p| p >= 200), "{st:?}");

    tracing::info!("phase: server 4 joins; the log it needs is gone, so it gets the snapshot");
    let mut cfg = RaftNodeConfig::new(4, dir.path().join("4"), ([127, 0, 0, 1], 0).into());
    compact(&mut cfg);
    let four = Arc::new(RaftNode::start(cfg).await?);
    live.insert(four.clone());
    leader.add_learner(4, four.node()).await?;
    leader
        .change_membership(BTreeSet::from([1, 2, 3, 4]))
        .await?;
    for i in 0..10 {
        leader.write(create(&format!("after-{i}"))).await?;
    }
    wait_converged(&live, leader_id).await?;
    let s4 = four.status();
    assert!(
        s4.snapshot_index.is_some(),
        "server 4 installed a snapshot: {s4:?}"
    );
    assert_eq!(s4.voters, BTreeSet::from([1, 2, 3, 4]));
    assert_eq!(four.read_local(|s| s.sandboxes.len()), 210);
    assert_eq!(state_bytes(&four), state_bytes(&leader));

    tracing::info!("phase: server 4 restarts from its own database with the snapshot and log");
    let addr = four.local_addr();
    drop(four);
    kill(&live, 4).await?;
    {
        let mut cfg = RaftNodeConfig::new(4, dir.path().join("4"), addr);
        compact(&mut cfg);
        // Its applied state is back before it hears from anyone.
        let deadline = Instant::now() + Duration::from_secs(10);
        let four = loop {
            match RaftNode::start(cfg.clone()).await {
                Ok(n) => break Arc::new(n),
                Err(e) if Instant::now() < deadline => {
                    tracing::info!(error = %e, "restart retry");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(e.into()),
            }
        };
        assert!(four.read_local(|s| s.sandboxes.len()) >= 200);
        live.insert(four);
    }
    leader.write(create("last")).await?;
    wait_converged(&live, leader_id).await?;
    assert_eq!(
        live.get(4).context("4")?.read_local(|s| s.sandboxes.len()),
        211
    );
    for n in live.any() {
        n.shutdown().await;
    }
    Ok(())
}

/// Hostile bytes on the Raft port: malformed bodies, a missing sender,
/// the wrong method. Each gets a 4xx and the server keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_port_refuses_malformed_rpcs() -> anyhow::Result<()> {
    use http_body_util::{BodyExt, Full};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    init_tracing();
    let dir = tempfile::tempdir()?;
    let nodes = start_local_cluster(1, dir.path(), tweak).await?;
    let addr = nodes[0].local_addr();
    let client: Client<_, Full<bytes::Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let send = |path: &str, from: Option<&str>, body: &'static [u8]| {
        let mut req = axum::http::Request::post(format!("http://{addr}{path}"));
        if let Some(f) = from {
            req = req.header("x-kiln-raft-from", f);
        }
        let req = req
            .body(Full::new(bytes::Bytes::from_static(body)))
            .expect("request");
        client.request(req)
    };
    for (path, from, body) in [
        ("/raft/append", Some("2"), &b"{not json"[..]),
        ("/raft/vote", Some("2"), &b"{\"vote\":7}"[..]),
        ("/raft/snapshot", Some("2"), &b"[]"[..]),
        ("/raft/append", None, &b"{}"[..]),
        ("/raft/append", Some("two"), &b"{}"[..]),
    ] {
        let resp = send(path, from, body).await?;
        let status = resp.status();
        let text = resp.into_body().collect().await?.to_bytes();
        assert!(
            status.is_client_error(),
            "{path} {from:?}: {status} {text:?}"
        );
    }
    let resp = client
        .request(
            axum::http::Request::get(format!("http://{addr}/raft/append"))
                .body(Full::new(bytes::Bytes::new()))?,
        )
        .await?;
    assert!(resp.status().is_client_error());
    // Still serving: a write commits.
    nodes[0].write(create_tenant()).await?;
    nodes[0].shutdown().await;
    Ok(())
}
