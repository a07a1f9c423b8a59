//! The Raft port refuses RPCs without the cluster secret, before reading
//! their bodies; with the secret an RPC reaches the decoder.

use std::time::Duration;

use kiln_store::bench::{LOCAL_CLUSTER_SECRET, start_local_cluster};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Sends a request head (and `body`, if any) and returns the status line.
async fn post(
    addr: std::net::SocketAddr,
    secret: Option<&str>,
    declared_len: usize,
    body: &[u8],
) -> anyhow::Result<String> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let mut head = format!(
        "POST /raft/vote HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\nx-kiln-raft-from: 2\r\ncontent-length: {declared_len}\r\n"
    );
    if let Some(v) = secret {
        head.push_str(&format!("x-kiln-cluster-secret: {v}\r\n"));
    }
    head.push_str("connection: close\r\n\r\n");
    s.write_all(head.as_bytes()).await?;
    s.write_all(body).await?;
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await??;
    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
    Ok(text.lines().next().unwrap_or_default().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_rpcs_need_the_cluster_secret() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let nodes = start_local_cluster(1, dir.path(), |_| {}).await?;
    let addr = nodes[0].local_addr();
    // No secret, a huge declared body that is never sent: refused at once
    // (the body is not awaited, let alone decoded).
    let r = post(addr, None, 50_000_000, b"").await?;
    assert!(r.contains(" 401 "), "no secret: {r}");
    let r = post(addr, Some("not-the-cluster-secret"), 50_000_000, b"").await?;
    assert!(r.contains(" 401 "), "wrong secret: {r}");
    // The right secret passes to the decoder (which refuses garbage).
    let r = post(addr, Some(LOCAL_CLUSTER_SECRET), 5, b"{oops").await?;
    assert!(r.contains(" 400 "), "right secret, bad body: {r}");
    // A replica refuses to start without a secret.
    let mut cfg = kiln_store::node::RaftNodeConfig::new(
        2,
        dir.path().join("2"),
        ([127, 0, 0, 1], 0).into(),
    );
    cfg.cluster_secret = "short".into();
    assert!(matches!(
        kiln_store::RaftNode::start(cfg).await,
        Err(kiln_store::StartError::ClusterSecret)
    ));
    for n in nodes {
        n.shutdown().await;
    }
    Ok(())
}
