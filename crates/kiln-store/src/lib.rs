//! `kiln-store` owns Kiln's replicated control-plane state: the
//! deterministic state machine ([`state`], [`command`], [`apply()`],
//! [`query`]), its durable storage in redb ([`storage`]: Raft log, vote,
//! committed index, snapshots, applied state), the Raft transport between
//! servers over HTTP ([`network`]), and the [`RaftNode`] handle the server
//! drives it through. [`bench`] measures commit throughput and latency.
//!
//! It must not depend on `kiln-node`, `kiln-vmm`, `kiln-image` or any
//! crate that touches a host's VMs: the server runs it on machines with no
//! KVM at all. It depends on `kiln-api` for the public types only, and
//! knows nothing of the REST API or the scheduler (they call it).
#![forbid(unsafe_code)]

use std::fmt;
use std::io::Cursor;

use serde::{Deserialize, Serialize};

pub mod apply;
pub mod bench;
pub mod command;
pub mod network;
pub mod node;
pub mod query;
pub mod state;
pub mod storage;
pub mod tls;

pub use apply::apply;
pub use command::{ApplyMeta, Command, ObjectKind, QuotaResource, Rejection, Response};
pub use network::Faults;
pub use node::{
    ClusterError, ClusterStatus, RaftNode, RaftNodeConfig, ReadError, Role as RaftRole, StartError,
    WriteError,
};
pub use state::{SCHEMA_VERSION, State};

/// A control-plane server's Raft ID (`kiln server --id N`).
pub type ServerId = u64;

/// How to reach a server: its Raft endpoint (servers talk to each other
/// there) and its API endpoint (where a follower redirects clients).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerNode {
    /// `host:port` of the Raft listener.
    pub raft_addr: String,
    /// Base URL or `host:port` of the REST API (may be empty when unknown).
    #[serde(default)]
    pub api_addr: String,
}

impl fmt::Display for ServerNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "raft={} api={}", self.raft_addr, self.api_addr)
    }
}

openraft::declare_raft_types!(
    /// Kiln's Raft types: commands in, responses out, servers by `u64`.
    pub TypeConfig:
        D = Command,
        R = Response,
        NodeId = ServerId,
        Node = ServerNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// The openraft handle with Kiln's types.
pub type Raft = openraft::Raft<TypeConfig>;
