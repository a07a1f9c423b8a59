//! The pure transition function of the replicated state:
//! [`apply`]`(&mut State, &Command, ApplyMeta) -> Response`.
//!
//! Invariants:
//! - Pure and total: no I/O, no clock, no randomness, no panics. Given the
//!   same state and command it makes the same change and the same answer
//!   on every replica. Unit tests step it directly, without Raft.
//! - All or nothing: a command that is rejected leaves the state exactly
//!   as it was (records are changed on a copy, then swapped in).
//! - Quotas and node capacity are checked here, against the state the
//!   command meets, so two racing creates that each passed an earlier check
//!   cannot both exceed a limit.
//!
//! Handlers live in submodules by concern (`nodes`, `sandboxes`,
//! `artifacts`, `tenants`, `room`), with shared lookups in `checks`.

use kiln_api::cluster::{DesiredState, NodeName, NodeStatus, Quotas, Role, TenantName};
use kiln_api::sandbox::{
    MAX_LABEL_KEY, MAX_LABEL_VALUE, MAX_LABELS, Origin, Resources, RestartPolicy, SandboxId,
    SandboxSpec, SandboxState, valid_name,
};

use crate::command::{ApplyMeta, Command, ObjectKind, QuotaResource, Rejection, Response};
use crate::state::{
    ArtifactOnNode, GroupRecord, MigrationPhase, MigrationRecord, NodeRecord, PolicyRecord,
    PoolOnNode, PoolRecord, SandboxRecord, SnapshotRecord, State, TemplateRecord, TenantRecord,
    TokenRecord, VolumeRecord, index_sandbox, scoped,
};

/// Exit code reported for a sandbox whose node was lost.
pub const LOST_EXIT_CODE: i32 = 255;
/// Most members of a group, and most pool members per node.
pub const MAX_GROUP_MEMBERS: usize = 64;
pub const MAX_POOL_TARGET: u32 = 1024;
/// Most nodes one `PutTemplate` may name.
pub const MAX_TEMPLATE_NODES: usize = 256;
/// Longest grace time a stop may ask for (an hour).
pub const MAX_STOP_GRACE_SECS: u64 = 3600;
/// Largest policy document, serialized.
pub const MAX_POLICY_BYTES: usize = 64 * 1024;
const MAX_ERROR_TEXT: usize = 4096;

/// Applies one command. See the module documentation.
pub fn apply(state: &mut State, cmd: &Command, meta: ApplyMeta) -> Response {
    if let Command::Batch { commands } = cmd {
        let responses = commands
            .iter()
            .map(|c| match c {
                Command::Batch { .. } => Response::Rejected(Rejection::invalid(
                    "batch",
                    "a batch cannot contain a batch",
                )),
                c => apply(state, c, meta),
            })
            .collect();
        return Response::Batch { responses };
    }
    match apply_inner(state, cmd, meta) {
        Ok(r) => r,
        Err(rej) => Response::Rejected(rej),
    }
}

type Applied = Result<Response, Rejection>;

fn apply_inner(st: &mut State, cmd: &Command, meta: ApplyMeta) -> Applied {
    match cmd {
        Command::RegisterNode { .. }
        | Command::Heartbeat { .. }
        | Command::CordonNode { .. }
        | Command::DrainNode { .. }
        | Command::ExpireNodes { .. }
        | Command::RemoveNode { .. }
        | Command::SetNodeStreamKey { .. } => nodes::apply(st, cmd, meta),
        Command::CreateSandbox { .. }
        | Command::PlaceSandbox { .. }
        | Command::SetDesired { .. }
        | Command::ReportSandbox { .. }
        | Command::ForgetSandbox { .. }
        | Command::SetSandboxPolicy { .. } => sandboxes::apply(st, cmd, meta),
        Command::PutTemplate { .. }
        | Command::ReportTemplate { .. }
        | Command::DeleteTemplate { .. }
        | Command::SetPool { .. }
        | Command::ReportPool { .. }
        | Command::PutSnapshot { .. }
        | Command::ReportSnapshot { .. }
        | Command::DeleteSnapshot { .. } => artifacts::apply(st, cmd, meta),
        Command::CreateTenant { .. }
        | Command::SetQuotas { .. }
        | Command::DeleteTenant { .. }
        | Command::CreateToken { .. }
        | Command::RevokeToken { .. }
        | Command::RotateNodeCredentials { .. }
        | Command::ConfirmNodeCredential { .. } => tenants::apply(st, cmd, meta),
        Command::PutPolicy { .. }
        | Command::DeletePolicy { .. }
        | Command::PutVolume { .. }
        | Command::DeleteVolume { .. }
        | Command::PutGroup { .. }
        | Command::DeleteGroup { .. }
        | Command::StartMigration { .. }
        | Command::AdvanceMigration { .. } => room::apply(st, cmd, meta),
        Command::Batch { .. } => Err(Rejection::invalid(
            "batch",
            "a batch cannot contain a batch",
        )),
    }
}

mod artifacts;
mod checks;
mod nodes;
mod room;
mod sandboxes;
mod tenants;

#[cfg(test)]
mod policy_tests;
#[cfg(test)]
mod snapshot_tests;
#[cfg(test)]
mod template_tests;
#[cfg(test)]
mod tests;
