//! Bodies of Kiln's REST API (`/v1`, served by `kiln server`): what the
//! CLI, the server and later the E2B gateway exchange. Requests refuse
//! unknown fields; every error is an [`ErrorBody`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::cluster::{
    Capacity, DesiredState, DriverKind, NodeName, NodeStatus, Quotas, Role, TenantName,
};
use crate::sandbox::{SandboxId, SandboxSpec, SandboxState};

/// `{ "error": { "code": "...", "message": "..." } }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorDetail {
    /// Stable, machine-readable (e.g. `malformed_json`, `unknown_field`,
    /// `invalid_spec`, `not_found`, `quota_exceeded`, `unschedulable`).
    pub code: String,
    /// For people.
    pub message: String,
    /// With `unschedulable`: the scheduler's reason code (`no_nodes`,
    /// `insufficient`, ...); with `quota_exceeded`: the resource.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A sandbox as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Sandbox {
    pub id: SandboxId,
    pub tenant: TenantName,
    pub spec: SandboxSpec,
    pub desired: DesiredState,
    /// As last reported by its node (`creating` until then).
    pub state: SandboxState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<NodeName>,
    pub generation: u64,
    pub observed_generation: u64,
    pub created_at_ms: u64,
    /// How its node started it (pool, template, cold or restore; notes and
    /// phase timings), once reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<crate::sandbox::StartReport>,
}

/// One page of sandboxes; pass `next` as `cursor` for the following one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SandboxList {
    pub items: Vec<Sandbox>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// The answer of `GET /v1/sandboxes/{id}/wait`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WaitResult {
    /// Whether it ended (else the timeout ran out first).
    pub finished: bool,
    pub sandbox: Sandbox,
}

/// A worker node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Node {
    pub name: NodeName,
    pub address: String,
    pub driver: DriverKind,
    pub capacity: Capacity,
    /// What its sandboxes hold of it.
    pub allocated: Capacity,
    pub status: NodeStatus,
    pub cordoned: bool,
    pub labels: BTreeMap<String, String>,
    pub images: Vec<String>,
    pub sandboxes: u64,
    pub last_heartbeat_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NodeList {
    pub items: Vec<Node>,
}

/// One control-plane replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Member {
    pub id: u64,
    pub raft_addr: String,
    pub api_url: String,
    pub voter: bool,
}

/// `kiln cluster status`: the leader's view.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ClusterStatus {
    /// The replica that answered (the leader).
    pub id: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<u64>,
    pub term: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_log_index: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit_index: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_index: Option<u64>,
    pub members: Vec<Member>,
}

/// `POST /v1/cluster/members`: a new replica (started without `--init`)
/// joins as a learner, catches up, then becomes a voter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AddMember {
    pub id: u64,
    pub raft_addr: String,
    pub api_url: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CreateTenant {
    pub name: TenantName,
    /// Defaults: 100 sandboxes, 64 vCPUs, 64 GiB.
    #[serde(default)]
    pub quotas: Option<Quotas>,
}

/// Used right now; counted over sandboxes neither deleted nor finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Usage {
    pub sandboxes: u32,
    pub cpus: u32,
    pub memory_mib: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Tenant {
    pub name: TenantName,
    pub quotas: Quotas,
    pub usage: Usage,
    pub created_at_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TenantList {
    pub items: Vec<Tenant>,
}

/// `POST /v1/tokens`: an admin token (no tenant) or a tenant's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CreateToken {
    pub role: Role,
    #[serde(default)]
    pub tenant: Option<TenantName>,
    #[serde(default)]
    pub description: String,
}

/// The secret is shown once; the server keeps its SHA-256 only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TokenCreated {
    pub id: String,
    pub secret: String,
    pub role: Role,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<TenantName>,
}

/// `PUT /v1/sandboxes/{id}/policy`: a networked sandbox's new policy,
/// enforced live (its published ports stay). `rules` are evaluated in
/// order, then `policy`'s (a preset: `internet-only`, the default, or
/// `none`), then `policy_default` (else the preset's default).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SetPolicy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_default: Option<crate::sandbox::PolicyAction>,
    #[serde(default)]
    pub rules: Vec<crate::sandbox::PolicyRule>,
}

/// A sandbox's policy as the API shows it: what is desired, and whether
/// its node enforces it yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SandboxPolicy {
    pub id: SandboxId,
    /// The desired policy (as last set).
    pub policy: SetPolicy,
    /// The sandbox generation at which this policy was set.
    pub revision: u64,
    /// The generation its node last reported having converged to.
    pub observed_generation: u64,
    /// Whether the node enforces this policy (`observed_generation >=
    /// revision`); until then it enforces an earlier one.
    pub applied: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<NodeName>,
}

/// `POST /v1/sandboxes/{id}/snapshot`: the snapshot's name (default
/// `snap-<time>-<random>`): 1-128 characters of `[A-Za-z0-9._-]`, not
/// starting with `.` or `-`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CreateSnapshot {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// A node's copy of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SnapshotHolder {
    pub node: NodeName,
    pub size_bytes: u64,
}

/// A tenant's named snapshot of a sandbox (restore it with `POST
/// /v1/sandboxes` and `origin: {kind: snapshot, snapshot: NAME}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Snapshot {
    pub name: String,
    pub tenant: TenantName,
    /// The sandbox it was taken of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<SandboxId>,
    pub image: String,
    pub resources: crate::sandbox::Resources,
    pub created_at_ms: u64,
    /// The nodes holding a copy (a restore is placed on one of them).
    pub holders: Vec<SnapshotHolder>,
    /// A fork's snapshot: it goes with the last sandbox forked from it.
    #[serde(default)]
    pub ephemeral: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SnapshotList {
    pub items: Vec<Snapshot>,
}

/// `POST /v1/sandboxes/{id}/fork`: how many copies (1-64).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ForkRequest {
    pub count: u32,
}

/// The answer of a fork: the new sandboxes (committed before the answer;
/// each is restored by the source's node and reports like any sandbox).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ForkResult {
    pub source: SandboxId,
    pub ids: Vec<SandboxId>,
}

/// The server's request to a node's `POST /node/v1/sandboxes/{id}/snapshot`
/// (not part of the public API): snapshot the sandbox as `name` (the
/// node-local name). `ephemeral` (a fork's): the snapshot is removed when
/// its last user leaves, and the node holds it until each of `hold_for`
/// was restored from it (or a deadline passed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSnapshotRequest {
    pub name: String,
    #[serde(default)]
    pub ephemeral: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hold_for: Vec<SandboxId>,
}

/// A node's answer to [`NodeSnapshotRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSnapshotDone {
    pub name: String,
    pub size_bytes: u64,
}

/// The most sandboxes one fork makes.
pub const MAX_FORK_COUNT: u32 = 64;

/// The name a tenant's snapshot has on a node: `TENANT.NAME` (tenant names
/// have no `.`, so the split is unambiguous and tenants never collide).
/// `None` when the result would be longer than a snapshot name may be.
pub fn node_snapshot_name(tenant: &TenantName, name: &str) -> Option<String> {
    let n = format!("{}.{name}", tenant.as_str());
    crate::sandbox::valid_name(&n).then_some(n)
}
