//! The replicated state: every record the control plane holds, and the
//! indexes derived from them.
//!
//! Invariants:
//! - Deterministic: only `BTreeMap`/`BTreeSet`, no clock, no randomness.
//!   Times and IDs arrive inside commands (chosen by the leader before it
//!   proposes), so every replica that applies the same log holds the same
//!   state, byte for byte when serialized.
//! - [`Indexes`] are derived: never serialized, rebuilt by
//!   [`State::rebuild_indexes`] after a load, maintained incrementally by
//!   `apply`. A unit test checks that both agree.
//! - A sandbox *counts* (towards its tenant's quota and its node's
//!   allocation) while its desired state is not `Deleted` and its observed
//!   state is not finished.
//! - Objects a tenant owns are keyed by [`scoped`] names (`tenant/name`, or
//!   `name` for shared, admin-owned ones), so two tenants never collide and
//!   a lookup never reveals another tenant's object.

use std::collections::{BTreeMap, BTreeSet};

use kiln_api::cluster::{
    Capacity, DesiredState, DriverKind, NodeName, NodeStatus, Quotas, Role, TenantName,
};
use kiln_api::sandbox::{Resources, SandboxId, SandboxSpec, SandboxState};
use serde::{Deserialize, Serialize};

/// Version of the state's schema. Bumped whenever a change is not
/// backwards compatible (a field whose default would be wrong, a changed
/// meaning); a server refuses state written by a newer one.
pub const SCHEMA_VERSION: u32 = 1;

/// `tenant/name` for a tenant's object, `name` for a shared one.
pub fn scoped(tenant: Option<&TenantName>, name: &str) -> String {
    match tenant {
        Some(t) => format!("{t}/{name}"),
        None => name.to_owned(),
    }
}

/// A worker node (`kiln node`) as registered and heartbeating.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub name: NodeName,
    /// Where servers reach the node (its gRPC endpoint).
    pub address: String,
    pub capacity: Capacity,
    pub driver: DriverKind,
    pub labels: BTreeMap<String, String>,
    /// Images whose base disks the node has cached (scheduler preference).
    pub images: BTreeSet<String>,
    pub cordoned: bool,
    pub status: NodeStatus,
    pub registered_at_ms: u64,
    /// Leader-supplied time of the last heartbeat (carried in the command).
    pub last_heartbeat_ms: u64,
    /// The bearer key the node demands on its stream endpoints (the server
    /// must present it, so it is kept, unlike tokens, in clear; never shown
    /// by the API).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_key: Option<String>,
    /// Lowercase hex SHA-256 of the certificate of the node's stream
    /// endpoints: the relay connects over TLS and accepts exactly it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_cert_sha256: Option<String>,
    /// The templates the node made on its own (as its heartbeats say;
    /// emptied when it registers, until its next heartbeat).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub templates: Vec<kiln_api::templates::NodeTemplate>,
}

/// One sandbox: what was asked for and what the node last reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxRecord {
    pub id: SandboxId,
    pub tenant: TenantName,
    pub spec: SandboxSpec,
    pub desired: DesiredState,
    /// As reported by the node that runs it (`Creating` until then).
    pub observed: SandboxState,
    pub observed_at_ms: u64,
    /// The node it is assigned to; `None` while waiting for placement.
    pub node: Option<NodeName>,
    /// Bumped on every change of spec, desired state or assignment: what
    /// the node must converge to.
    pub generation: u64,
    /// The generation the node last reported having converged to.
    pub observed_generation: u64,
    pub created_at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// Log index of the last change (a watch resumes from it).
    pub mod_index: u64,
    /// The sandbox group it belongs to (placed together).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// The generation at which its network policy was last set (1 for the
    /// policy it was created with; 0 in records from before this field,
    /// meaning the same). The node enforces it once `observed_generation`
    /// has reached it.
    #[serde(default)]
    pub policy_generation: u64,
    /// How its node started it, as reported (`None`: not yet, or not
    /// known).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<kiln_api::sandbox::StartReport>,
    /// The grace time (seconds from SIGTERM to SIGKILL) its stop was
    /// asked with; `None`: the node's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_grace_secs: Option<u64>,
}

impl SandboxRecord {
    /// Whether it counts towards quota and node allocation.
    pub fn counts(&self) -> bool {
        self.desired != DesiredState::Deleted && !self.observed.is_finished()
    }
}

/// A template (image + resources booted once and snapshotted) and where it
/// is ready.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateRecord {
    pub tenant: Option<TenantName>,
    pub name: String,
    pub image: String,
    pub resources: Resources,
    /// Created by Kiln itself after a cold start, not by a user.
    pub auto: bool,
    pub created_at_ms: u64,
    /// Nodes that built it: ready, and its size on that node.
    pub nodes: BTreeMap<NodeName, ArtifactOnNode>,
    /// Nodes that must build and keep it (created through the API); each
    /// gets it in its desired state.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub placed: BTreeSet<NodeName>,
    /// Nodes that could not build it, and why (cleared when one reports
    /// it ready).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub failed: BTreeMap<NodeName, String>,
    /// Placed on every node: a node that registers later is added to
    /// `placed`, with a pool of `pool_per_node` members.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub everywhere: bool,
    /// The pool target last set on a node of an `everywhere` template:
    /// what a node that joins later gets.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub pool_per_node: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactOnNode {
    pub ready: bool,
    pub size_bytes: u64,
}

/// A warm pool of a template: target and ready members per node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolRecord {
    pub tenant: Option<TenantName>,
    pub template: String,
    pub nodes: BTreeMap<NodeName, PoolOnNode>,
    /// The IDs of the ready members each node reported: an API create
    /// placed there takes one as its sandbox ID, and the node then starts
    /// it from that member.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub members: BTreeMap<NodeName, Vec<SandboxId>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolOnNode {
    pub target: u32,
    pub ready: u32,
}

/// A named snapshot of a sandbox and the nodes holding a copy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub tenant: TenantName,
    pub name: String,
    pub source: Option<SandboxId>,
    pub image: String,
    pub resources: Resources,
    pub created_at_ms: u64,
    pub holders: BTreeMap<NodeName, ArtifactOnNode>,
    /// A fork's snapshot: forgotten with the last sandbox restored from it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ephemeral: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantRecord {
    pub name: TenantName,
    pub quotas: Quotas,
    pub created_at_ms: u64,
    /// The image references its latest sandboxes named (most recent last,
    /// at most [`MAX_RECENT_IMAGES`]): what of the nodes' image caches and
    /// automatic templates the tenant is shown after its sandboxes are
    /// gone.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recent_images: Vec<String>,
}

/// How many image references a tenant record remembers.
pub const MAX_RECENT_IMAGES: usize = 64;

/// An API token: only its SHA-256 is stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub id: String,
    /// `None` for admin tokens.
    pub tenant: Option<TenantName>,
    pub role: Role,
    /// Lower-case hex SHA-256 of the secret.
    pub sha256: String,
    pub description: String,
    pub created_at_ms: u64,
    pub revoked_at_ms: Option<u64>,
    /// The node a `Role::Node` credential is bound to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<NodeName>,
}

/// Room for the networking issue: a sandbox network policy, stored as the
/// validated document the API accepted (the node compiles it to BPF maps).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyRecord {
    pub tenant: TenantName,
    pub name: String,
    pub document: serde_json::Value,
    /// Bumped on each change; nodes apply policies by revision.
    pub revision: u64,
}

/// Room for shared volumes: a named volume and the node it lives on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub tenant: TenantName,
    pub name: String,
    pub size_mib: u64,
    pub node: Option<NodeName>,
    pub created_at_ms: u64,
}

/// Room for sandbox groups (sidecars, gang placement): members are placed
/// on one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRecord {
    pub tenant: TenantName,
    pub name: String,
    pub members: BTreeSet<SandboxId>,
    pub node: Option<NodeName>,
}

/// Room for live migration: the server coordinates, the nodes stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationRecord {
    pub sandbox: SandboxId,
    pub from: NodeName,
    pub to: NodeName,
    pub phase: MigrationPhase,
    pub started_at_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MigrationPhase {
    /// The target prepares (disk, tap, policy).
    Preparing,
    /// Memory and disk stream; the source still runs the sandbox.
    Copying,
    /// The source stopped; the target resumes. Fencing point: from here
    /// the source must never resume it.
    Switching,
    Done,
    Failed,
}

/// What a tenant currently holds (derived).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub sandboxes: u32,
    pub cpus: u32,
    pub memory_mib: u64,
}

/// Derived lookups, rebuilt on load, kept in step by `apply`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Indexes {
    pub by_tenant: BTreeMap<TenantName, BTreeSet<SandboxId>>,
    pub by_node: BTreeMap<NodeName, BTreeSet<SandboxId>>,
    /// `(tenant, idempotency key)` → sandbox.
    pub idempotency: BTreeMap<(TenantName, String), SandboxId>,
    pub usage: BTreeMap<TenantName, Usage>,
    /// Sum of the resources of counting sandboxes assigned to each node.
    pub allocated: BTreeMap<NodeName, Capacity>,
    /// Token SHA-256 (hex) → token id.
    pub token_by_hash: BTreeMap<String, String>,
}

/// The whole replicated state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub nodes: BTreeMap<NodeName, NodeRecord>,
    pub sandboxes: BTreeMap<SandboxId, SandboxRecord>,
    /// By [`scoped`] name.
    pub templates: BTreeMap<String, TemplateRecord>,
    /// By [`scoped`] template name.
    pub pools: BTreeMap<String, PoolRecord>,
    /// By [`scoped`] name (always a tenant's).
    pub snapshots: BTreeMap<String, SnapshotRecord>,
    pub tenants: BTreeMap<TenantName, TenantRecord>,
    pub tokens: BTreeMap<String, TokenRecord>,
    pub policies: BTreeMap<String, PolicyRecord>,
    pub volumes: BTreeMap<String, VolumeRecord>,
    pub groups: BTreeMap<String, GroupRecord>,
    /// At most one migration per sandbox.
    pub migrations: BTreeMap<SandboxId, MigrationRecord>,
    #[serde(skip)]
    pub idx: Indexes,
}

/// Serialized state with its schema version (the snapshot's payload).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VersionedState {
    pub schema_version: u32,
    pub state: State,
}

/// State that cannot be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadStateError {
    #[error("state has schema version {found}; this build understands up to {supported}")]
    NewerSchema { found: u32, supported: u32 },
    #[error("state is not valid JSON of the expected shape")]
    Decode(#[source] serde_json::Error),
}

impl State {
    /// Serializes with the schema version.
    pub fn to_bytes(&self) -> Result<Vec<u8>, serde_json::Error> {
        #[derive(Serialize)]
        struct V<'a> {
            schema_version: u32,
            state: &'a State,
        }
        serde_json::to_vec(&V {
            schema_version: SCHEMA_VERSION,
            state: self,
        })
    }

    /// Loads what [`State::to_bytes`] wrote, refusing a newer schema, and
    /// rebuilds the indexes.
    pub fn from_bytes(bytes: &[u8]) -> Result<State, LoadStateError> {
        #[derive(Deserialize)]
        struct Head {
            schema_version: u32,
        }
        let head: Head = serde_json::from_slice(bytes).map_err(LoadStateError::Decode)?;
        if head.schema_version > SCHEMA_VERSION {
            return Err(LoadStateError::NewerSchema {
                found: head.schema_version,
                supported: SCHEMA_VERSION,
            });
        }
        let v: VersionedState = serde_json::from_slice(bytes).map_err(LoadStateError::Decode)?;
        let mut state = v.state;
        state.rebuild_indexes();
        Ok(state)
    }

    /// Recomputes every derived index from the records.
    pub fn rebuild_indexes(&mut self) {
        let mut idx = Indexes::default();
        for rec in self.sandboxes.values() {
            index_sandbox(&mut idx, rec, true);
        }
        for tok in self.tokens.values() {
            idx.token_by_hash.insert(tok.sha256.clone(), tok.id.clone());
        }
        self.idx = idx;
    }
}

/// Adds (`add`) or removes a sandbox's contribution to the indexes.
pub(crate) fn index_sandbox(idx: &mut Indexes, rec: &SandboxRecord, add: bool) {
    if add {
        idx.by_tenant
            .entry(rec.tenant.clone())
            .or_default()
            .insert(rec.id.clone());
        if let Some(n) = &rec.node {
            idx.by_node
                .entry(n.clone())
                .or_default()
                .insert(rec.id.clone());
        }
        if let Some(k) = &rec.idempotency_key {
            idx.idempotency
                .insert((rec.tenant.clone(), k.clone()), rec.id.clone());
        }
    } else {
        remove_from(&mut idx.by_tenant, &rec.tenant, &rec.id);
        if let Some(n) = &rec.node {
            remove_from(&mut idx.by_node, n, &rec.id);
        }
        if let Some(k) = &rec.idempotency_key {
            idx.idempotency.remove(&(rec.tenant.clone(), k.clone()));
        }
    }
    if rec.counts() {
        let r = rec.spec.resources;
        let u = idx.usage.entry(rec.tenant.clone()).or_default();
        if add {
            u.sandboxes += 1;
            u.cpus += r.cpus;
            u.memory_mib += u64::from(r.memory_mib);
        } else {
            u.sandboxes = u.sandboxes.saturating_sub(1);
            u.cpus = u.cpus.saturating_sub(r.cpus);
            u.memory_mib = u.memory_mib.saturating_sub(u64::from(r.memory_mib));
        }
        if *u == Usage::default() {
            idx.usage.remove(&rec.tenant);
        }
        if let Some(n) = &rec.node {
            let a = idx.allocated.entry(n.clone()).or_default();
            if add {
                a.cpus += r.cpus;
                a.memory_mib += u64::from(r.memory_mib);
                a.disk_mib += u64::from(r.disk_mib);
            } else {
                a.cpus = a.cpus.saturating_sub(r.cpus);
                a.memory_mib = a.memory_mib.saturating_sub(u64::from(r.memory_mib));
                a.disk_mib = a.disk_mib.saturating_sub(u64::from(r.disk_mib));
            }
            if *a == Capacity::default() {
                idx.allocated.remove(n);
            }
        }
    }
}

fn remove_from<K: Ord + Clone>(m: &mut BTreeMap<K, BTreeSet<SandboxId>>, k: &K, id: &SandboxId) {
    if let Some(set) = m.get_mut(k) {
        set.remove(id);
        if set.is_empty() {
            m.remove(k);
        }
    }
}
