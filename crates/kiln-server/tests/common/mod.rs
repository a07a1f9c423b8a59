//! In-process `kiln server` replicas on 127.0.0.1 ephemeral ports with
//! real Raft (redb files in temporary directories) and real listeners.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::time::Duration;

use kiln_server::{Server, ServerConfig};

pub const JOIN: &str = "join-token-for-tests-0123456789";

pub struct Cluster {
    pub servers: Vec<Option<Server>>,
    pub dirs: Vec<tempfile::TempDir>,
    pub admin: String,
}

pub fn config(id: u64, dir: &std::path::Path) -> ServerConfig {
    let any = "127.0.0.1:0".parse().expect("addr");
    let mut c = ServerConfig::new(id, any, any, dir, JOIN);
    // Replicas of one cluster share a secret for their Raft RPCs.
    c.cluster_secret = Some("cluster-secret-for-tests-0123456789".into());
    c.election_timeout_ms = (300, 600);
    c.raft_heartbeat_ms = 50;
    c.reconcile_ms = 100;
    c.heartbeat_interval_ms = 200;
    c.grace_ms = 30_000;
    c
}

impl Cluster {
    /// `n` replicas, initialised by the first; waits for a leader and the
    /// bootstrap admin token.
    pub async fn start(n: u64) -> Cluster {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(std::env::var("KILN_TEST_LOG").unwrap_or_else(|_| "warn".into()))
            .with_test_writer()
            .try_init();
        let mut servers = Vec::new();
        let mut dirs = Vec::new();
        for id in 1..=n {
            let dir = tempfile::tempdir().expect("tempdir");
            let s = Server::start(config(id, dir.path())).await.expect("start");
            servers.push(Some(s));
            dirs.push(dir);
        }
        let members: BTreeMap<_, _> = servers
            .iter()
            .flatten()
            .map(|s| (s.id(), s.node_info()))
            .collect();
        servers[0]
            .as_ref()
            .expect("first")
            .initialize(members)
            .await
            .expect("initialize");
        let admin = std::fs::read_to_string(dirs[0].path().join("admin.token"))
            .expect("admin token file")
            .trim()
            .to_owned();
        let c = Cluster {
            servers,
            dirs,
            admin,
        };
        c.wait_all_applied().await;
        c
    }

    pub fn server(&self, i: usize) -> &Server {
        self.servers[i].as_ref().expect("running")
    }

    /// Index of the replica that leads now (waits up to 10 s).
    pub async fn leader(&self) -> usize {
        for _ in 0..200 {
            for (i, s) in self.servers.iter().enumerate() {
                if let Some(s) = s
                    && s.raft().status().role == kiln_store::RaftRole::Leader
                {
                    return i;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no leader within 10 s");
    }

    pub async fn follower(&self) -> usize {
        let l = self.leader().await;
        (0..self.servers.len())
            .find(|i| *i != l && self.servers[*i].is_some())
            .expect("a follower")
    }

    /// Waits until every running replica applied what the leader has.
    pub async fn wait_all_applied(&self) {
        let l = self.leader().await;
        let idx = self.server(l).raft().applied_index().unwrap_or(0);
        for s in self.servers.iter().flatten() {
            s.raft()
                .wait_applied(idx, Duration::from_secs(10))
                .await
                .expect("replica catches up");
        }
    }

    pub async fn shutdown(self) {
        for s in self.servers.into_iter().flatten() {
            s.shutdown().await;
        }
    }
}
