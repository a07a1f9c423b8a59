//! [`RaftNode`]: one server's replica of the control-plane state, started
//! from a directory and a listen address, serving the Raft RPCs on real TCP.
//! The server (REST API, scheduler, node service) calls only this.
//!
//! Invariants:
//! - Writes go through [`RaftNode::write`]; on a follower it answers
//!   [`WriteError::ForwardToLeader`] with the leader's ID and addresses,
//!   never applies locally.
//! - [`RaftNode::read`] is linearizable (read index confirmed by a quorum,
//!   then wait for it to be applied); [`RaftNode::read_local`] is this
//!   replica's applied state, possibly stale, for watches and metrics.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use openraft::{ChangeMembers, Config, ServerState, SnapshotPolicy};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::network::{Faults, HttpNetwork, raft_router};
use crate::storage::{self, OpenStoreError, StateMachineStore};
use crate::{Command, Raft, Response, ServerId, ServerNode, State};

/// How to start one replica.
#[derive(Debug, Clone)]
pub struct RaftNodeConfig {
    pub id: ServerId,
    /// Directory for `raft.redb` (created if missing).
    pub dir: PathBuf,
    /// Where the Raft listener binds (port 0 for an ephemeral port).
    pub listen: SocketAddr,
    /// The API address peers hand out when redirecting to this server.
    pub api_addr: String,
    pub heartbeat_ms: u64,
    pub election_timeout_ms: (u64, u64),
    /// Build a snapshot (and compact the log) after this many entries.
    pub snapshot_every: u64,
    /// Log entries kept behind a snapshot (so slow followers catch up from
    /// the log rather than a snapshot).
    pub keep_behind_snapshot: u64,
    /// The secret every server of the cluster shares, sent with and
    /// required on every Raft RPC (printable ASCII, at least
    /// [`crate::network::MIN_SECRET_LEN`] characters; empty by default,
    /// which [`RaftNode::start`] refuses).
    pub cluster_secret: String,
}

impl RaftNodeConfig {
    /// Defaults suited to a LAN: 100 ms heartbeats, 400-800 ms elections,
    /// snapshots every 10,000 entries keeping 1,000 behind.
    pub fn new(id: ServerId, dir: impl Into<PathBuf>, listen: SocketAddr) -> RaftNodeConfig {
        RaftNodeConfig {
            id,
            dir: dir.into(),
            listen,
            api_addr: String::new(),
            heartbeat_ms: 100,
            election_timeout_ms: (400, 800),
            snapshot_every: 10_000,
            keep_behind_snapshot: 1_000,
            cluster_secret: String::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot create the state directory {path}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the cluster secret must be at least {} printable ASCII characters",
        crate::network::MIN_SECRET_LEN
    )]
    ClusterSecret,
    #[error(transparent)]
    Store(#[from] OpenStoreError),
    #[error("cannot listen on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid Raft configuration")]
    Config(#[source] openraft::ConfigError),
    #[error("Raft did not start")]
    Raft(#[source] openraft::error::Fatal<ServerId>),
}

/// Who leads, for redirecting a client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LeaderInfo {
    pub id: ServerId,
    pub node: Option<ServerNode>,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum WriteError {
    /// This server is not the leader; `leader` is `None` during an election.
    #[error("not the leader; {}", match .leader { Some(l) => format!("server {} leads ({})", l.id, l.node.as_ref().map(|n| n.to_string()).unwrap_or_default()), None => "no leader is known".into() })]
    ForwardToLeader { leader: Option<LeaderInfo> },
    #[error("Raft stopped")]
    Fatal(#[source] openraft::error::Fatal<ServerId>),
    #[error("the change was refused")]
    Membership(#[source] openraft::error::ChangeMembershipError<ServerId>),
    #[error("the proposer stopped (the replica is shutting down)")]
    Stopped,
    #[error("the state machine answered a batch with {got} responses for {sent} commands")]
    BatchMismatch { sent: usize, got: usize },
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("not the leader; cannot serve a linearizable read")]
    ForwardToLeader { leader: Option<LeaderInfo> },
    #[error("lost leadership while confirming the read")]
    QuorumNotEnough(#[source] openraft::error::QuorumNotEnough<ServerId>),
    #[error("Raft stopped")]
    Fatal(#[source] openraft::error::Fatal<ServerId>),
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("the cluster is already initialised")]
    AlreadyInitialized,
    #[error("cannot initialise the cluster: {0}")]
    Initialize(String),
    #[error(transparent)]
    Write(#[from] WriteError),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
}

/// A replica's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Leader,
    Follower,
    Candidate,
    Learner,
    Shutdown,
}

/// What `kiln cluster status` shows of one replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClusterStatus {
    pub id: ServerId,
    pub role: Role,
    pub term: u64,
    pub leader: Option<ServerId>,
    pub last_log_index: Option<u64>,
    /// On the leader: the index a majority holds. `None` elsewhere.
    pub committed_index: Option<u64>,
    pub applied_index: Option<u64>,
    pub snapshot_index: Option<u64>,
    pub purged_index: Option<u64>,
    pub voters: BTreeSet<ServerId>,
    pub members: BTreeMap<ServerId, ServerNode>,
}

/// One running replica. Dropping it without [`RaftNode::shutdown`] leaves
/// the Raft task running; tests that simulate a crash call `shutdown`,
/// which stops Raft and the listener as a killed process would (nothing
/// is flushed that was not already durable).
pub struct RaftNode {
    id: ServerId,
    raft: Raft,
    sm: StateMachineStore,
    faults: Faults,
    node: ServerNode,
    local_addr: SocketAddr,
    server: JoinHandle<()>,
    proposer: mpsc::Sender<Proposal>,
}

type Proposal = (
    Command,
    oneshot::Sender<Result<(Response, u64), WriteError>>,
);

/// Most commands in one group proposal, and most proposals in flight.
const MAX_BATCH: usize = 512;
const MAX_IN_FLIGHT: usize = 1;

/// Group proposals: writes queued while earlier ones are in flight go to
/// Raft as one `Command::Batch` entry, so one log append, one fsync and
/// one replication round serve them all. A lone write is proposed at once
/// (no timer). `MAX_IN_FLIGHT` is 1: measured here, more proposals in
/// flight only made smaller batches that queue behind the same fsync
/// (8 writers: 268 creates/s with 4 in flight, 1,566 with 1).
async fn run_proposer(raft: Raft, mut rx: mpsc::Receiver<Proposal>) {
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = rx.recv().await else { return };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        let raft = raft.clone();
        tokio::spawn(async move {
            propose(&raft, batch).await;
            drop(permit);
        });
    }
}

async fn propose(raft: &Raft, mut batch: Vec<Proposal>) {
    if batch.len() == 1 {
        let (cmd, tx) = batch.pop().expect("one proposal");
        let r = raft
            .client_write(cmd)
            .await
            .map(|r| (r.data, r.log_id.index))
            .map_err(write_error);
        let _ = tx.send(r);
        return;
    }
    let (commands, waiters): (Vec<Command>, Vec<_>) = batch.into_iter().unzip();
    let sent = commands.len();
    let r = raft
        .client_write(Command::Batch { commands })
        .await
        .map_err(write_error);
    match r {
        Ok(w) => match w.data {
            Response::Batch { responses } if responses.len() == sent => {
                for (tx, resp) in waiters.into_iter().zip(responses) {
                    let _ = tx.send(Ok((resp, w.log_id.index)));
                }
            }
            other => {
                let got = match other {
                    Response::Batch { responses } => responses.len(),
                    _ => 1,
                };
                for tx in waiters {
                    let _ = tx.send(Err(WriteError::BatchMismatch { sent, got }));
                }
            }
        },
        Err(e) => {
            for tx in waiters {
                let _ = tx.send(Err(e.clone()));
            }
        }
    }
}

impl RaftNode {
    /// Opens `dir/raft.redb`, binds the listener and starts Raft. A new
    /// database starts uninitialised (call [`RaftNode::initialize`] on one
    /// server, or add it to an existing cluster); an existing one resumes.
    pub async fn start(cfg: RaftNodeConfig) -> Result<RaftNode, StartError> {
        let secret = cfg.cluster_secret.trim();
        if secret.len() < crate::network::MIN_SECRET_LEN
            || !secret.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(StartError::ClusterSecret);
        }
        let secret_header =
            axum::http::HeaderValue::from_str(secret).map_err(|_| StartError::ClusterSecret)?;
        std::fs::create_dir_all(&cfg.dir).map_err(|source| StartError::Dir {
            path: cfg.dir.clone(),
            source,
        })?;
        let (log, sm) = storage::open(&cfg.dir.join("raft.redb"))?;
        let listener =
            TcpListener::bind(cfg.listen)
                .await
                .map_err(|source| StartError::Listen {
                    addr: cfg.listen,
                    source,
                })?;
        let local_addr = listener.local_addr().map_err(|source| StartError::Listen {
            addr: cfg.listen,
            source,
        })?;
        let config = Config {
            cluster_name: "kiln".into(),
            heartbeat_interval: cfg.heartbeat_ms,
            election_timeout_min: cfg.election_timeout_ms.0,
            election_timeout_max: cfg.election_timeout_ms.1,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(cfg.snapshot_every),
            max_in_snapshot_log_to_keep: cfg.keep_behind_snapshot,
            purge_batch_size: 1,
            ..Default::default()
        }
        .validate()
        .map_err(StartError::Config)?;
        let faults = Faults::default();
        let raft = Raft::new(
            cfg.id,
            Arc::new(config),
            HttpNetwork::new(cfg.id, faults.clone(), secret_header),
            log,
            sm.clone(),
        )
        .await
        .map_err(StartError::Raft)?;
        let app = raft_router(raft.clone(), faults.clone(), secret.as_bytes());
        let id = cfg.id;
        let server = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(server = id, error = %e, "Raft listener failed");
            }
        });
        let (ptx, prx) = mpsc::channel(4 * MAX_BATCH);
        tokio::spawn(run_proposer(raft.clone(), prx));
        tracing::info!(server = id, %local_addr, "Raft replica started");
        Ok(RaftNode {
            id,
            raft,
            sm,
            faults,
            node: ServerNode {
                raft_addr: local_addr.to_string(),
                api_addr: cfg.api_addr,
            },
            local_addr,
            server,
            proposer: ptx,
        })
    }

    pub fn id(&self) -> ServerId {
        self.id
    }

    /// This server's addresses, as members list it.
    pub fn node(&self) -> ServerNode {
        self.node.clone()
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The openraft handle, for what this type does not wrap.
    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    /// Link cuts for fault-injection tests.
    pub fn faults(&self) -> &Faults {
        &self.faults
    }

    /// Makes `members` (this server among them) the first voters.
    pub async fn initialize(
        &self,
        members: BTreeMap<ServerId, ServerNode>,
    ) -> Result<(), ClusterError> {
        match self.raft.initialize(members).await {
            Ok(()) => Ok(()),
            Err(RaftError::APIError(openraft::error::InitializeError::NotAllowed(_))) => {
                Err(ClusterError::AlreadyInitialized)
            }
            Err(e) => Err(ClusterError::Initialize(e.to_string())),
        }
    }

    /// Adds a non-voting member and waits until it has caught up.
    pub async fn add_learner(&self, id: ServerId, node: ServerNode) -> Result<(), ClusterError> {
        self.raft
            .add_learner(id, node, true)
            .await
            .map_err(write_error)?;
        Ok(())
    }

    /// Makes exactly `voters` the voting members (joint consensus).
    pub async fn change_membership(&self, voters: BTreeSet<ServerId>) -> Result<(), ClusterError> {
        self.raft
            .change_membership(ChangeMembers::ReplaceAllVoters(voters), false)
            .await
            .map_err(write_error)?;
        Ok(())
    }

    /// Updates the addresses of existing members (a lone replica whose
    /// ports changed across restarts, as `kiln up`'s). With several voters
    /// prefer removing and adding a member: a wrong address cuts it off.
    pub async fn set_nodes(
        &self,
        nodes: BTreeMap<ServerId, ServerNode>,
    ) -> Result<(), ClusterError> {
        self.raft
            .change_membership(ChangeMembers::SetNodes(nodes), false)
            .await
            .map_err(write_error)?;
        Ok(())
    }

    /// Proposes a command and waits until it is committed and applied here.
    pub async fn write(&self, cmd: Command) -> Result<Response, WriteError> {
        self.write_indexed(cmd).await.map(|(r, _)| r)
    }

    /// As [`RaftNode::write`], also returning the log index the command
    /// was committed at (another replica has it once it applied that).
    /// Concurrent writes are grouped into one log entry (see
    /// `run_proposer`); each still gets its own response.
    pub async fn write_indexed(&self, cmd: Command) -> Result<(Response, u64), WriteError> {
        if matches!(cmd, Command::Batch { .. }) {
            // Callers batch through concurrency, not by hand.
            return Ok((
                Response::Rejected(crate::Rejection::Invalid {
                    field: "command".into(),
                    message: "batches are formed by the proposer".into(),
                }),
                0,
            ));
        }
        let (tx, rx) = oneshot::channel();
        self.proposer
            .send((cmd, tx))
            .await
            .map_err(|_| WriteError::Stopped)?;
        rx.await.map_err(|_| WriteError::Stopped)?
    }

    /// Wakes whenever this replica applies entries (or installs a
    /// snapshot); the value is the last applied index. The node watch and
    /// `wait`-style API calls use it with [`RaftNode::read_local`].
    pub fn subscribe_applied(&self) -> tokio::sync::watch::Receiver<u64> {
        self.sm.subscribe()
    }

    /// The index this replica's state machine has applied (exact; the
    /// metrics in [`RaftNode::status`] may trail it briefly).
    pub fn applied_index(&self) -> Option<u64> {
        self.sm.read(|a| a.last_applied.map(|l| l.index))
    }

    /// A linearizable read: confirms leadership with a quorum, waits until
    /// the read index is applied, then runs `f` on the state.
    pub async fn read<T>(&self, f: impl FnOnce(&State) -> T) -> Result<T, ReadError> {
        match self.raft.ensure_linearizable().await {
            Ok(_) => Ok(self.read_local(f)),
            Err(RaftError::APIError(e)) => Err(match e {
                openraft::error::CheckIsLeaderError::ForwardToLeader(f) => {
                    ReadError::ForwardToLeader {
                        leader: f.leader_id.map(|id| LeaderInfo {
                            id,
                            node: f.leader_node,
                        }),
                    }
                }
                openraft::error::CheckIsLeaderError::QuorumNotEnough(q) => {
                    ReadError::QuorumNotEnough(q)
                }
            }),
            Err(RaftError::Fatal(f)) => Err(ReadError::Fatal(f)),
        }
    }

    /// This replica's applied state, possibly behind the leader.
    pub fn read_local<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        self.sm.read(|a| f(&a.state))
    }

    /// Term, leader, indexes and members of this replica.
    pub fn status(&self) -> ClusterStatus {
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        // Known on the leader only: the highest index a majority of voters
        // holds. Followers learn it lazily; they report `None`.
        let committed = m.replication.as_ref().map(|rep| {
            let mut matched: Vec<u64> = membership
                .voter_ids()
                .map(|v| {
                    if v == self.id {
                        m.last_log_index.unwrap_or(0)
                    } else {
                        rep.get(&v).copied().flatten().map_or(0, |l| l.index)
                    }
                })
                .collect();
            matched.sort_unstable();
            matched
                .get(matched.len().saturating_sub(1) / 2)
                .copied()
                .unwrap_or(0)
        });
        ClusterStatus {
            id: self.id,
            role: match m.state {
                ServerState::Leader => Role::Leader,
                ServerState::Follower => Role::Follower,
                ServerState::Candidate => Role::Candidate,
                ServerState::Learner => Role::Learner,
                ServerState::Shutdown => Role::Shutdown,
            },
            term: m.current_term,
            leader: m.current_leader,
            last_log_index: m.last_log_index,
            committed_index: committed,
            applied_index: m.last_applied.map(|l| l.index),
            snapshot_index: m.snapshot.map(|l| l.index),
            purged_index: m.purged.map(|l| l.index),
            voters: membership.voter_ids().collect(),
            members: membership.nodes().map(|(id, n)| (*id, n.clone())).collect(),
        }
    }

    /// The current leader and its addresses, as this replica knows them.
    pub fn leader(&self) -> Option<LeaderInfo> {
        let m = self.raft.metrics().borrow().clone();
        let id = m.current_leader?;
        Some(LeaderInfo {
            id,
            node: m.membership_config.membership().get_node(&id).cloned(),
        })
    }

    /// Waits until this replica has applied `index`.
    pub async fn wait_applied(&self, index: u64, timeout: Duration) -> Result<(), ClusterError> {
        self.raft
            .wait(Some(timeout))
            .applied_index_at_least(Some(index), "wait_applied")
            .await
            .map(|_| ())
            .map_err(|_| ClusterError::Timeout(timeout))
    }

    /// Builds a snapshot now and waits for it (the log is then compacted
    /// behind it, keeping `keep_behind_snapshot` entries).
    pub async fn snapshot_now(&self, timeout: Duration) -> Result<u64, ClusterError> {
        let applied = self.status().applied_index.unwrap_or(0);
        self.raft
            .trigger()
            .snapshot()
            .await
            .map_err(|e| ClusterError::Write(WriteError::Fatal(e)))?;
        self.raft
            .wait(Some(timeout))
            .metrics(
                |m| m.snapshot.is_some_and(|s| s.index >= applied),
                "snapshot_now",
            )
            .await
            .map_err(|_| ClusterError::Timeout(timeout))?;
        Ok(applied)
    }

    /// Purges the log up to `upto` (only entries a snapshot covers).
    pub async fn purge_log(&self, upto: u64) -> Result<(), ClusterError> {
        self.raft
            .trigger()
            .purge_log(upto)
            .await
            .map_err(|e| ClusterError::Write(WriteError::Fatal(e)))
    }

    /// Stops Raft and the listener, as a killed process would stop. The
    /// database is released once every handle to this node is dropped.
    pub async fn shutdown(&self) {
        self.server.abort();
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(server = self.id, error = %e, "Raft shutdown");
        }
    }
}

fn write_error(e: RaftError<ServerId, ClientWriteError<ServerId, ServerNode>>) -> WriteError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => WriteError::ForwardToLeader {
            leader: f.leader_id.map(|id| LeaderInfo {
                id,
                node: f.leader_node,
            }),
        },
        RaftError::APIError(ClientWriteError::ChangeMembershipError(c)) => {
            WriteError::Membership(c)
        }
        RaftError::Fatal(f) => WriteError::Fatal(f),
    }
}
