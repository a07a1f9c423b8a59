//! The one command enum every change of the replicated state goes through,
//! and the one response enum `apply` answers with.
//!
//! Invariants:
//! - A command carries everything `apply` needs that is not in the state:
//!   the leader's clock (`now_ms`), fresh IDs, placements. `apply` never
//!   reads a clock or a random source.
//! - Every command is validated inside `apply` against the state it meets;
//!   a malformed or impossible one yields [`Response::Rejected`], never a
//!   panic and never a partial change.
//! - Commands are serialized in the Raft log (JSON); fields added later
//!   must have serde defaults so old log entries still decode.

use std::collections::{BTreeMap, BTreeSet};

use kiln_api::cluster::{Capacity, DesiredState, DriverKind, NodeName, Quotas, Role, TenantName};
use kiln_api::sandbox::{
    PolicyAction, PolicyRule, Resources, SandboxId, SandboxSpec, SandboxState,
};
use serde::{Deserialize, Serialize};

use crate::state::MigrationPhase;

/// Where in the log a command is applied (the same on every replica).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApplyMeta {
    pub index: u64,
    pub term: u64,
}

/// Every change to the replicated state.
// A command lives for one proposal; boxing the spec would only add an
// allocation on the hot path.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Command {
    // --- nodes ---
    /// A node joins or re-registers (capacity, driver, labels replaced).
    RegisterNode {
        name: NodeName,
        address: String,
        capacity: Capacity,
        driver: DriverKind,
        #[serde(default)]
        labels: BTreeMap<String, String>,
        #[serde(default)]
        images: BTreeSet<String>,
        now_ms: u64,
    },
    /// A node is alive; an unreachable node becomes ready again.
    Heartbeat {
        name: NodeName,
        now_ms: u64,
        /// The cached images, when they changed.
        #[serde(default)]
        images: Option<BTreeSet<String>>,
        /// The node's automatic templates, when they changed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        templates: Option<Vec<kiln_api::templates::NodeTemplate>>,
    },
    CordonNode {
        name: NodeName,
        cordoned: bool,
    },
    /// Cordon and mark draining (the server then empties it).
    DrainNode {
        name: NodeName,
    },
    /// Marks nodes whose last heartbeat is older than `now_ms - grace_ms`
    /// unreachable; their sandboxes are lost (failed), or unassigned for
    /// the scheduler when their restart policy is `on-node-failure`.
    ExpireNodes {
        now_ms: u64,
        grace_ms: u64,
    },
    /// Only a node with no assigned sandbox can be removed.
    RemoveNode {
        name: NodeName,
    },
    /// The key a registered node demands on its stream endpoints (exec,
    /// attach, logs, files); the server presents it as a bearer token.
    SetNodeStreamKey {
        name: NodeName,
        key: String,
        /// Lowercase hex SHA-256 of the certificate the node's stream
        /// endpoints serve (the relay pins it); `None` only from nodes
        /// older than TLS on the stream endpoints.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cert_sha256: Option<String>,
    },

    // --- sandboxes ---
    /// A tenant's new sandbox. With an idempotency key already used by the
    /// tenant, the existing sandbox is returned (same spec) or the create
    /// refused (different spec).
    CreateSandbox {
        id: SandboxId,
        tenant: TenantName,
        spec: SandboxSpec,
        #[serde(default)]
        idempotency_key: Option<String>,
        /// The scheduler's choice, made by the leader before proposing.
        #[serde(default)]
        node: Option<NodeName>,
        now_ms: u64,
    },
    /// Assigns (or reassigns) a sandbox; refused if its generation moved.
    PlaceSandbox {
        id: SandboxId,
        node: NodeName,
        expected_generation: u64,
    },
    /// A tenant (or an admin, `tenant: None`) changes what it wants.
    SetDesired {
        tenant: Option<TenantName>,
        id: SandboxId,
        desired: DesiredState,
        /// With `Stopped`: seconds from SIGTERM to SIGKILL (at most
        /// [`crate::apply::MAX_STOP_GRACE_SECS`]); `None`: the node's default.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stop_grace_secs: Option<u64>,
    },
    /// The node that runs a sandbox reports what it observes.
    ReportSandbox {
        node: NodeName,
        id: SandboxId,
        generation: u64,
        state: SandboxState,
        now_ms: u64,
        /// How its start went (`None` keeps what the record has: a node
        /// sends it with every report).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        start: Option<kiln_api::sandbox::StartReport>,
    },
    /// Drops the record of a deleted sandbox once its node let it go.
    ForgetSandbox {
        id: SandboxId,
    },
    /// A tenant (or an admin) replaces a networked sandbox's policy (preset,
    /// default and rules; published ports stay). Moves the generation, so
    /// the node's watch delivers it and the node rewrites its maps live.
    SetSandboxPolicy {
        tenant: Option<TenantName>,
        id: SandboxId,
        #[serde(default)]
        policy: Option<String>,
        #[serde(default)]
        policy_default: Option<PolicyAction>,
        #[serde(default)]
        rules: Vec<PolicyRule>,
    },

    // --- templates and pools ---
    PutTemplate {
        tenant: Option<TenantName>,
        name: String,
        image: String,
        resources: Resources,
        #[serde(default)]
        auto: bool,
        now_ms: u64,
        /// Nodes that must build and keep it (added to those of an
        /// existing template of the same image and resources).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        nodes: Vec<NodeName>,
        /// Also on every node that registers later (the API's default
        /// when no nodes are named).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        everywhere: bool,
    },
    /// A node built a template (`ready`), dropped it, or could not build
    /// it (`error`).
    ReportTemplate {
        node: NodeName,
        tenant: Option<TenantName>,
        name: String,
        ready: bool,
        size_bytes: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// Refused (conflict) while live sandboxes of its image and resources
    /// (of its tenant, or any for a shared one) run on a node holding it.
    DeleteTemplate {
        tenant: Option<TenantName>,
        name: String,
    },
    /// Target size of a template's pool on one node (0 removes it there).
    SetPool {
        tenant: Option<TenantName>,
        template: String,
        node: NodeName,
        target: u32,
    },
    ReportPool {
        node: NodeName,
        tenant: Option<TenantName>,
        template: String,
        ready: u32,
        /// The ready members' IDs (at most `MAX_POOL_TARGET`).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        members: Vec<SandboxId>,
    },

    // --- snapshots ---
    PutSnapshot {
        tenant: TenantName,
        name: String,
        source: SandboxId,
        now_ms: u64,
        /// A fork's snapshot: its record goes when the last sandbox
        /// restored from it is forgotten.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        ephemeral: bool,
    },
    /// A node holds (or dropped) its copy of a snapshot.
    ReportSnapshot {
        node: NodeName,
        tenant: TenantName,
        name: String,
        held: bool,
        size_bytes: u64,
    },
    DeleteSnapshot {
        tenant: TenantName,
        name: String,
    },

    // --- tenants and tokens ---
    CreateTenant {
        name: TenantName,
        quotas: Quotas,
        now_ms: u64,
    },
    SetQuotas {
        name: TenantName,
        quotas: Quotas,
    },
    /// Refused while the tenant holds sandboxes; revokes its tokens.
    DeleteTenant {
        name: TenantName,
        now_ms: u64,
    },
    CreateToken {
        id: String,
        tenant: Option<TenantName>,
        role: Role,
        /// Lower-case hex SHA-256 of the secret (64 characters).
        sha256: String,
        #[serde(default)]
        description: String,
        now_ms: u64,
        /// The node a `Role::Node` credential speaks for (none otherwise).
        /// Earlier credentials of the node stay (see
        /// `RotateNodeCredentials` and `ConfirmNodeCredential`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        node: Option<NodeName>,
    },
    RevokeToken {
        id: String,
        now_ms: u64,
    },
    /// Before a registration mints a new credential: revokes node `node`'s
    /// live credentials except the one hashed `keep` (the one the node
    /// presented, so it is known to hold it). A node that dies before it
    /// saved the new credential registers again with the kept one.
    RotateNodeCredentials {
        node: NodeName,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        keep: Option<String>,
        now_ms: u64,
    },
    /// Node `node` used its credential hashed `sha256`: it has saved it, so
    /// every other live credential of the node is revoked.
    ConfirmNodeCredential {
        node: NodeName,
        sha256: String,
        now_ms: u64,
    },

    // --- room for what comes next (issue 10, volumes, groups, migration) ---
    PutPolicy {
        tenant: TenantName,
        name: String,
        document: serde_json::Value,
    },
    DeletePolicy {
        tenant: TenantName,
        name: String,
    },
    PutVolume {
        tenant: TenantName,
        name: String,
        size_mib: u64,
        now_ms: u64,
    },
    DeleteVolume {
        tenant: TenantName,
        name: String,
    },
    /// Creates or replaces a group; members must be the tenant's sandboxes.
    PutGroup {
        tenant: TenantName,
        name: String,
        members: BTreeSet<SandboxId>,
    },
    DeleteGroup {
        tenant: TenantName,
        name: String,
    },
    StartMigration {
        id: SandboxId,
        to: NodeName,
        now_ms: u64,
    },
    /// Advances a migration; at `Done` the sandbox moves to the target.
    AdvanceMigration {
        id: SandboxId,
        phase: MigrationPhase,
    },

    // --- transport ---
    /// Several independent commands in one log entry (group proposal by
    /// `RaftNode::write`): each is applied in order exactly as if alone,
    /// and answered in [`Response::Batch`]. A batch never nests.
    Batch {
        commands: Vec<Command>,
    },
}

impl Command {
    /// Short name for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Command::RegisterNode { .. } => "register_node",
            Command::Heartbeat { .. } => "heartbeat",
            Command::CordonNode { .. } => "cordon_node",
            Command::DrainNode { .. } => "drain_node",
            Command::ExpireNodes { .. } => "expire_nodes",
            Command::RemoveNode { .. } => "remove_node",
            Command::SetNodeStreamKey { .. } => "set_node_stream_key",
            Command::CreateSandbox { .. } => "create_sandbox",
            Command::PlaceSandbox { .. } => "place_sandbox",
            Command::SetDesired { .. } => "set_desired",
            Command::ReportSandbox { .. } => "report_sandbox",
            Command::ForgetSandbox { .. } => "forget_sandbox",
            Command::SetSandboxPolicy { .. } => "set_sandbox_policy",
            Command::PutTemplate { .. } => "put_template",
            Command::ReportTemplate { .. } => "report_template",
            Command::DeleteTemplate { .. } => "delete_template",
            Command::SetPool { .. } => "set_pool",
            Command::ReportPool { .. } => "report_pool",
            Command::PutSnapshot { .. } => "put_snapshot",
            Command::ReportSnapshot { .. } => "report_snapshot",
            Command::DeleteSnapshot { .. } => "delete_snapshot",
            Command::CreateTenant { .. } => "create_tenant",
            Command::SetQuotas { .. } => "set_quotas",
            Command::DeleteTenant { .. } => "delete_tenant",
            Command::CreateToken { .. } => "create_token",
            Command::RevokeToken { .. } => "revoke_token",
            Command::RotateNodeCredentials { .. } => "rotate_node_credentials",
            Command::ConfirmNodeCredential { .. } => "confirm_node_credential",
            Command::PutPolicy { .. } => "put_policy",
            Command::DeletePolicy { .. } => "delete_policy",
            Command::PutVolume { .. } => "put_volume",
            Command::DeleteVolume { .. } => "delete_volume",
            Command::PutGroup { .. } => "put_group",
            Command::DeleteGroup { .. } => "delete_group",
            Command::StartMigration { .. } => "start_migration",
            Command::AdvanceMigration { .. } => "advance_migration",
            Command::Batch { .. } => "batch",
        }
    }
}

/// What `apply` answers. Every command yields exactly one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    /// Applied; nothing to return. Also the answer to Raft's own entries
    /// (blank and membership).
    Done,
    /// `created: false` when an idempotency key returned an existing one.
    SandboxCreated {
        id: SandboxId,
        created: bool,
        generation: u64,
    },
    /// A sandbox changed; its new generation.
    SandboxChanged {
        id: SandboxId,
        generation: u64,
    },
    /// Result of `ExpireNodes`.
    NodesExpired {
        nodes: Vec<NodeName>,
        lost: Vec<SandboxId>,
        unassigned: Vec<SandboxId>,
    },
    Rejected(Rejection),
    /// One response per command of a [`Command::Batch`], in order.
    Batch {
        responses: Vec<Response>,
    },
}

impl Response {
    pub fn is_rejected(&self) -> bool {
        matches!(self, Response::Rejected(_))
    }
}

/// Kinds of objects, for `NotFound`/`AlreadyExists`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ObjectKind {
    Node,
    Sandbox,
    Template,
    Pool,
    Snapshot,
    Tenant,
    Token,
    Policy,
    Volume,
    Group,
    Migration,
}

impl std::fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        f.write_str(&s)
    }
}

/// Which quota a create would exceed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuotaResource {
    Sandboxes,
    Cpus,
    MemoryMib,
}

/// Why `apply` refused a command. Deterministic: every replica refuses the
/// same command the same way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "code", rename_all = "snake_case")]
pub enum Rejection {
    /// Also what a tenant gets for another tenant's object.
    #[error("{kind} {name:?} does not exist")]
    NotFound { kind: ObjectKind, name: String },
    #[error("{kind} {name:?} already exists")]
    AlreadyExists { kind: ObjectKind, name: String },
    #[error("quota exceeded: {resource:?} would be {used} + {requested}, the limit is {limit}")]
    QuotaExceeded {
        resource: QuotaResource,
        limit: u64,
        used: u64,
        requested: u64,
    },
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    #[error("idempotency key {key:?} was used for a different request")]
    IdempotencyConflict { key: String },
    #[error("generation is {actual}, the request expected {expected}")]
    StaleGeneration { expected: u64, actual: u64 },
    #[error("{message}")]
    Conflict { message: String },
}

impl Rejection {
    pub(crate) fn not_found(kind: ObjectKind, name: impl std::fmt::Display) -> Rejection {
        Rejection::NotFound {
            kind,
            name: name.to_string(),
        }
    }
    pub(crate) fn exists(kind: ObjectKind, name: impl std::fmt::Display) -> Rejection {
        Rejection::AlreadyExists {
            kind,
            name: name.to_string(),
        }
    }
    pub(crate) fn invalid(field: &str, message: impl Into<String>) -> Rejection {
        Rejection::Invalid {
            field: field.to_owned(),
            message: message.into(),
        }
    }
    pub(crate) fn conflict(message: impl Into<String>) -> Rejection {
        Rejection::Conflict {
            message: message.into(),
        }
    }
}
