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
        Command::RegisterNode {
            name,
            address,
            capacity,
            driver,
            labels,
            images,
            now_ms,
        } => {
            check_text("address", address, 256)?;
            if capacity.cpus == 0 || capacity.memory_mib == 0 {
                return Err(Rejection::invalid(
                    "capacity",
                    "a node must offer at least one CPU and some memory",
                ));
            }
            check_labels(labels)?;
            if images.len() > 4096 {
                return Err(Rejection::invalid("images", "at most 4096 cached images"));
            }
            for i in images {
                check_text("images", i, 4096)?;
            }
            let rec = st.nodes.entry(name.clone()).or_insert_with(|| NodeRecord {
                name: name.clone(),
                address: String::new(),
                capacity: *capacity,
                driver: *driver,
                labels: Default::default(),
                images: Default::default(),
                cordoned: false,
                status: NodeStatus::Ready,
                registered_at_ms: *now_ms,
                last_heartbeat_ms: *now_ms,
            });
            rec.address = address.clone();
            rec.capacity = *capacity;
            rec.driver = *driver;
            rec.labels = labels.clone();
            rec.images = images.clone();
            rec.last_heartbeat_ms = rec.last_heartbeat_ms.max(*now_ms);
            if rec.status == NodeStatus::Unreachable {
                rec.status = if rec.cordoned {
                    NodeStatus::Draining
                } else {
                    NodeStatus::Ready
                };
            }
            Ok(Response::Done)
        }
        Command::Heartbeat {
            name,
            now_ms,
            images,
        } => {
            if let Some(images) = images {
                if images.len() > 4096 {
                    return Err(Rejection::invalid("images", "at most 4096 cached images"));
                }
                for i in images {
                    check_text("images", i, 4096)?;
                }
            }
            let rec = node_mut(st, name)?;
            rec.last_heartbeat_ms = rec.last_heartbeat_ms.max(*now_ms);
            if rec.status == NodeStatus::Unreachable {
                rec.status = if rec.cordoned {
                    NodeStatus::Draining
                } else {
                    NodeStatus::Ready
                };
            }
            if let Some(images) = images {
                rec.images = images.clone();
            }
            Ok(Response::Done)
        }
        Command::CordonNode { name, cordoned } => {
            let rec = node_mut(st, name)?;
            rec.cordoned = *cordoned;
            if !cordoned && rec.status == NodeStatus::Draining {
                rec.status = NodeStatus::Ready;
            }
            Ok(Response::Done)
        }
        Command::DrainNode { name } => {
            let rec = node_mut(st, name)?;
            rec.cordoned = true;
            if rec.status == NodeStatus::Ready {
                rec.status = NodeStatus::Draining;
            }
            Ok(Response::Done)
        }
        Command::ExpireNodes { now_ms, grace_ms } => Ok(expire_nodes(st, *now_ms, *grace_ms, meta)),
        Command::RemoveNode { name } => {
            if !st.nodes.contains_key(name) {
                return Err(Rejection::not_found(ObjectKind::Node, name));
            }
            if let Some(ids) = st.idx.by_node.get(name)
                && let Some(first) = ids.iter().next()
            {
                return Err(Rejection::conflict(format!(
                    "node {name} still has {} sandbox(es) assigned, e.g. {first}",
                    ids.len()
                )));
            }
            st.nodes.remove(name);
            for t in st.templates.values_mut() {
                t.nodes.remove(name);
            }
            for p in st.pools.values_mut() {
                p.nodes.remove(name);
            }
            st.pools.retain(|_, p| !p.nodes.is_empty());
            for s in st.snapshots.values_mut() {
                s.holders.remove(name);
            }
            Ok(Response::Done)
        }

        Command::CreateSandbox {
            id,
            tenant,
            spec,
            idempotency_key,
            node,
            now_ms,
        } => create_sandbox(
            st,
            id,
            tenant,
            spec,
            idempotency_key.as_deref(),
            node.as_ref(),
            *now_ms,
            meta,
        ),
        Command::PlaceSandbox {
            id,
            node,
            expected_generation,
        } => {
            let rec = st
                .sandboxes
                .get(id)
                .ok_or_else(|| Rejection::not_found(ObjectKind::Sandbox, id))?;
            if rec.generation != *expected_generation {
                return Err(Rejection::StaleGeneration {
                    expected: *expected_generation,
                    actual: rec.generation,
                });
            }
            if rec.desired == DesiredState::Deleted {
                return Err(Rejection::conflict(format!(
                    "sandbox {id} is being deleted"
                )));
            }
            if rec.node.as_ref() != Some(node) {
                check_node_fits(st, node, &rec.spec.resources)?;
            }
            modify_sandbox(st, id, meta, |r| {
                r.node = Some(node.clone());
                Ok(true)
            })
        }
        Command::SetDesired {
            tenant,
            id,
            desired,
        } => {
            let rec = visible_sandbox(st, tenant.as_ref(), id)?;
            if rec.desired == *desired {
                return Ok(Response::SandboxChanged {
                    id: id.clone(),
                    generation: rec.generation,
                });
            }
            if rec.desired == DesiredState::Deleted {
                return Err(Rejection::conflict(format!(
                    "sandbox {id} is being deleted"
                )));
            }
            if rec.observed.is_finished()
                && matches!(desired, DesiredState::Running | DesiredState::Paused)
            {
                return Err(Rejection::conflict(format!(
                    "sandbox {id} has ended ({}); it cannot run again",
                    rec.observed.label()
                )));
            }
            let desired = *desired;
            modify_sandbox(st, id, meta, |r| {
                r.desired = desired;
                Ok(true)
            })
        }
        Command::ReportSandbox {
            node,
            id,
            generation,
            state,
            now_ms,
        } => {
            let rec = st
                .sandboxes
                .get(id)
                .ok_or_else(|| Rejection::not_found(ObjectKind::Sandbox, id))?;
            if rec.node.as_ref() != Some(node) {
                return Err(Rejection::conflict(format!(
                    "sandbox {id} is not assigned to node {node}"
                )));
            }
            if *generation > rec.generation {
                return Err(Rejection::invalid(
                    "generation",
                    format!("{generation} is ahead of the sandbox's {}", rec.generation),
                ));
            }
            if *generation < rec.observed_generation {
                return Err(Rejection::StaleGeneration {
                    expected: rec.observed_generation,
                    actual: *generation,
                });
            }
            if rec.observed.is_finished() && !state.is_finished() {
                return Err(Rejection::conflict(format!(
                    "sandbox {id} has ended; it cannot be reported {}",
                    state.label()
                )));
            }
            if let SandboxState::Failed { error, .. } = state
                && error.len() > MAX_ERROR_TEXT
            {
                return Err(Rejection::invalid(
                    "state.error",
                    format!("at most {MAX_ERROR_TEXT} bytes"),
                ));
            }
            let (generation, state, now_ms) = (*generation, state.clone(), *now_ms);
            modify_sandbox(st, id, meta, |r| {
                r.observed = state;
                r.observed_generation = generation;
                r.observed_at_ms = now_ms;
                Ok(false)
            })
        }
        Command::ForgetSandbox { id } => {
            let rec = st
                .sandboxes
                .get(id)
                .ok_or_else(|| Rejection::not_found(ObjectKind::Sandbox, id))?;
            if rec.desired != DesiredState::Deleted {
                return Err(Rejection::conflict(format!(
                    "sandbox {id} is not deleted; delete it first"
                )));
            }
            let node_gone = match &rec.node {
                None => true,
                Some(n) => st
                    .nodes
                    .get(n)
                    .is_none_or(|n| n.status == NodeStatus::Unreachable),
            };
            if !node_gone && !rec.observed.is_finished() {
                return Err(Rejection::conflict(format!(
                    "sandbox {id} still runs on its node ({})",
                    rec.observed.label()
                )));
            }
            let rec = st.sandboxes.remove(id).expect("looked up just above");
            index_sandbox(&mut st.idx, &rec, false);
            if let Some(g) = &rec.group
                && let Some(g) = st.groups.get_mut(&scoped(Some(&rec.tenant), g))
            {
                g.members.remove(id);
            }
            st.migrations.remove(id);
            Ok(Response::Done)
        }

        Command::PutTemplate {
            tenant,
            name,
            image,
            resources,
            auto,
            now_ms,
        } => {
            check_name("name", name)?;
            check_resources(image, resources)?;
            if let Some(t) = tenant {
                tenant_rec(st, t)?;
            }
            let key = scoped(tenant.as_ref(), name);
            if let Some(t) = st.templates.get(&key) {
                if t.image == *image && t.resources == *resources {
                    return Ok(Response::Done);
                }
                return Err(Rejection::exists(ObjectKind::Template, name));
            }
            st.templates.insert(
                key,
                TemplateRecord {
                    tenant: tenant.clone(),
                    name: name.clone(),
                    image: image.clone(),
                    resources: *resources,
                    auto: *auto,
                    created_at_ms: *now_ms,
                    nodes: Default::default(),
                },
            );
            Ok(Response::Done)
        }
        Command::ReportTemplate {
            node,
            tenant,
            name,
            ready,
            size_bytes,
        } => {
            node_rec(st, node)?;
            let t = st
                .templates
                .get_mut(&scoped(tenant.as_ref(), name))
                .ok_or_else(|| Rejection::not_found(ObjectKind::Template, name))?;
            if *ready {
                t.nodes.insert(
                    node.clone(),
                    ArtifactOnNode {
                        ready: true,
                        size_bytes: *size_bytes,
                    },
                );
            } else {
                t.nodes.remove(node);
            }
            Ok(Response::Done)
        }
        Command::DeleteTemplate { tenant, name } => {
            let key = scoped(tenant.as_ref(), name);
            if st.templates.remove(&key).is_none() {
                return Err(Rejection::not_found(ObjectKind::Template, name));
            }
            st.pools.remove(&key);
            Ok(Response::Done)
        }
        Command::SetPool {
            tenant,
            template,
            node,
            target,
        } => {
            if *target > MAX_POOL_TARGET {
                return Err(Rejection::invalid(
                    "target",
                    format!("at most {MAX_POOL_TARGET} members per node"),
                ));
            }
            node_rec(st, node)?;
            let key = scoped(tenant.as_ref(), template);
            if !st.templates.contains_key(&key) {
                return Err(Rejection::not_found(ObjectKind::Template, template));
            }
            let pool = st.pools.entry(key.clone()).or_insert_with(|| PoolRecord {
                tenant: tenant.clone(),
                template: template.clone(),
                nodes: Default::default(),
            });
            if *target == 0 {
                pool.nodes.remove(node);
            } else {
                pool.nodes
                    .entry(node.clone())
                    .or_insert(PoolOnNode {
                        target: 0,
                        ready: 0,
                    })
                    .target = *target;
            }
            if pool.nodes.is_empty() {
                st.pools.remove(&key);
            }
            Ok(Response::Done)
        }
        Command::ReportPool {
            node,
            tenant,
            template,
            ready,
        } => {
            let slot = st
                .pools
                .get_mut(&scoped(tenant.as_ref(), template))
                .and_then(|p| p.nodes.get_mut(node))
                .ok_or_else(|| {
                    Rejection::not_found(ObjectKind::Pool, format!("{template} on {node}"))
                })?;
            slot.ready = *ready;
            Ok(Response::Done)
        }

        Command::PutSnapshot {
            tenant,
            name,
            source,
            now_ms,
        } => {
            check_name("name", name)?;
            tenant_rec(st, tenant)?;
            let src = visible_sandbox(st, Some(tenant), source)?;
            let (image, resources) = (src.spec.image.clone(), src.spec.resources);
            let key = scoped(Some(tenant), name);
            if st.snapshots.contains_key(&key) {
                return Err(Rejection::exists(ObjectKind::Snapshot, name));
            }
            st.snapshots.insert(
                key,
                SnapshotRecord {
                    tenant: tenant.clone(),
                    name: name.clone(),
                    source: Some(source.clone()),
                    image,
                    resources,
                    created_at_ms: *now_ms,
                    holders: Default::default(),
                },
            );
            Ok(Response::Done)
        }
        Command::ReportSnapshot {
            node,
            tenant,
            name,
            held,
            size_bytes,
        } => {
            node_rec(st, node)?;
            let s = st
                .snapshots
                .get_mut(&scoped(Some(tenant), name))
                .ok_or_else(|| Rejection::not_found(ObjectKind::Snapshot, name))?;
            if *held {
                s.holders.insert(
                    node.clone(),
                    ArtifactOnNode {
                        ready: true,
                        size_bytes: *size_bytes,
                    },
                );
            } else {
                s.holders.remove(node);
            }
            Ok(Response::Done)
        }
        Command::DeleteSnapshot { tenant, name } => {
            if st.snapshots.remove(&scoped(Some(tenant), name)).is_none() {
                return Err(Rejection::not_found(ObjectKind::Snapshot, name));
            }
            Ok(Response::Done)
        }

        Command::CreateTenant {
            name,
            quotas,
            now_ms,
        } => {
            check_quotas(quotas)?;
            if st.tenants.contains_key(name) {
                return Err(Rejection::exists(ObjectKind::Tenant, name));
            }
            st.tenants.insert(
                name.clone(),
                TenantRecord {
                    name: name.clone(),
                    quotas: *quotas,
                    created_at_ms: *now_ms,
                },
            );
            Ok(Response::Done)
        }
        Command::SetQuotas { name, quotas } => {
            check_quotas(quotas)?;
            let t = st
                .tenants
                .get_mut(name)
                .ok_or_else(|| Rejection::not_found(ObjectKind::Tenant, name))?;
            t.quotas = *quotas;
            Ok(Response::Done)
        }
        Command::DeleteTenant { name, now_ms } => {
            tenant_rec(st, name)?;
            if let Some(ids) = st.idx.by_tenant.get(name) {
                return Err(Rejection::conflict(format!(
                    "tenant {name} still has {} sandbox(es); delete and forget them first",
                    ids.len()
                )));
            }
            st.tenants.remove(name);
            let prefix = format!("{name}/");
            st.templates.retain(|k, _| !k.starts_with(&prefix));
            st.pools.retain(|k, _| !k.starts_with(&prefix));
            st.snapshots.retain(|k, _| !k.starts_with(&prefix));
            st.policies.retain(|k, _| !k.starts_with(&prefix));
            st.volumes.retain(|k, _| !k.starts_with(&prefix));
            st.groups.retain(|k, _| !k.starts_with(&prefix));
            for tok in st.tokens.values_mut() {
                if tok.tenant.as_ref() == Some(name) && tok.revoked_at_ms.is_none() {
                    tok.revoked_at_ms = Some(*now_ms);
                }
            }
            Ok(Response::Done)
        }
        Command::CreateToken {
            id,
            tenant,
            role,
            sha256,
            description,
            now_ms,
        } => {
            if id.is_empty()
                || id.len() > 64
                || !id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(Rejection::invalid(
                    "id",
                    "1-64 characters of A-Z a-z 0-9 - _",
                ));
            }
            if sha256.len() != 64
                || !sha256
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            {
                return Err(Rejection::invalid(
                    "sha256",
                    "64 lower-case hex digits (the token is stored hashed only)",
                ));
            }
            check_text("description", description, 256).or_else(|e| {
                if description.is_empty() {
                    Ok(())
                } else {
                    Err(e)
                }
            })?;
            match (role, tenant) {
                (Role::Admin, None) => {}
                (Role::Tenant, Some(t)) => {
                    tenant_rec(st, t)?;
                }
                (Role::Admin, Some(_)) => {
                    return Err(Rejection::invalid("tenant", "an admin token has no tenant"));
                }
                (Role::Tenant, None) => {
                    return Err(Rejection::invalid(
                        "tenant",
                        "a tenant token needs its tenant",
                    ));
                }
            }
            if st.tokens.contains_key(id) {
                return Err(Rejection::exists(ObjectKind::Token, id));
            }
            if st.idx.token_by_hash.contains_key(sha256) {
                return Err(Rejection::conflict("a token with this hash exists"));
            }
            st.idx.token_by_hash.insert(sha256.clone(), id.clone());
            st.tokens.insert(
                id.clone(),
                TokenRecord {
                    id: id.clone(),
                    tenant: tenant.clone(),
                    role: *role,
                    sha256: sha256.clone(),
                    description: description.clone(),
                    created_at_ms: *now_ms,
                    revoked_at_ms: None,
                },
            );
            Ok(Response::Done)
        }
        Command::RevokeToken { id, now_ms } => {
            let t = st
                .tokens
                .get_mut(id)
                .ok_or_else(|| Rejection::not_found(ObjectKind::Token, id))?;
            if t.revoked_at_ms.is_none() {
                t.revoked_at_ms = Some(*now_ms);
            }
            Ok(Response::Done)
        }

        Command::PutPolicy {
            tenant,
            name,
            document,
        } => {
            check_name("name", name)?;
            tenant_rec(st, tenant)?;
            if !document.is_object() {
                return Err(Rejection::invalid("document", "a policy is a JSON object"));
            }
            let size = serde_json::to_vec(document)
                .map(|v| v.len())
                .unwrap_or(usize::MAX);
            if size > MAX_POLICY_BYTES {
                return Err(Rejection::invalid(
                    "document",
                    format!("{size} bytes, at most {MAX_POLICY_BYTES}"),
                ));
            }
            let key = scoped(Some(tenant), name);
            let revision = st.policies.get(&key).map_or(1, |p| p.revision + 1);
            st.policies.insert(
                key,
                PolicyRecord {
                    tenant: tenant.clone(),
                    name: name.clone(),
                    document: document.clone(),
                    revision,
                },
            );
            Ok(Response::Done)
        }
        Command::DeletePolicy { tenant, name } => {
            remove_scoped(&mut st.policies, tenant, name, ObjectKind::Policy)
        }
        Command::PutVolume {
            tenant,
            name,
            size_mib,
            now_ms,
        } => {
            check_name("name", name)?;
            tenant_rec(st, tenant)?;
            if *size_mib == 0 || *size_mib > 1024 * 1024 {
                return Err(Rejection::invalid("size_mib", "1 MiB to 1 TiB"));
            }
            let key = scoped(Some(tenant), name);
            if st.volumes.contains_key(&key) {
                return Err(Rejection::exists(ObjectKind::Volume, name));
            }
            st.volumes.insert(
                key,
                VolumeRecord {
                    tenant: tenant.clone(),
                    name: name.clone(),
                    size_mib: *size_mib,
                    node: None,
                    created_at_ms: *now_ms,
                },
            );
            Ok(Response::Done)
        }
        Command::DeleteVolume { tenant, name } => {
            remove_scoped(&mut st.volumes, tenant, name, ObjectKind::Volume)
        }
        Command::PutGroup {
            tenant,
            name,
            members,
        } => put_group(st, tenant, name, members, meta),
        Command::DeleteGroup { tenant, name } => {
            let key = scoped(Some(tenant), name);
            let g = st
                .groups
                .remove(&key)
                .ok_or_else(|| Rejection::not_found(ObjectKind::Group, name))?;
            for id in &g.members {
                if let Some(r) = st.sandboxes.get_mut(id) {
                    r.group = None;
                    r.mod_index = meta.index;
                }
            }
            Ok(Response::Done)
        }
        Command::StartMigration { id, to, now_ms } => {
            let rec = st
                .sandboxes
                .get(id)
                .ok_or_else(|| Rejection::not_found(ObjectKind::Sandbox, id))?;
            if st.migrations.contains_key(id) {
                return Err(Rejection::exists(ObjectKind::Migration, id));
            }
            if !rec.counts() {
                return Err(Rejection::conflict(format!("sandbox {id} is not live")));
            }
            let from = rec
                .node
                .clone()
                .ok_or_else(|| Rejection::conflict(format!("sandbox {id} is not placed")))?;
            if from == *to {
                return Err(Rejection::invalid(
                    "to",
                    format!("sandbox {id} is already on {to}"),
                ));
            }
            let res = rec.spec.resources;
            check_node_fits(st, to, &res)?;
            st.migrations.insert(
                id.clone(),
                MigrationRecord {
                    sandbox: id.clone(),
                    from,
                    to: to.clone(),
                    phase: MigrationPhase::Preparing,
                    started_at_ms: *now_ms,
                },
            );
            Ok(Response::Done)
        }
        Command::Batch { .. } => Err(Rejection::invalid("batch", "handled by apply")),
        Command::AdvanceMigration { id, phase } => {
            let m = st
                .migrations
                .get(id)
                .ok_or_else(|| Rejection::not_found(ObjectKind::Migration, id))?;
            let order = |p: MigrationPhase| match p {
                MigrationPhase::Preparing => 0,
                MigrationPhase::Copying => 1,
                MigrationPhase::Switching => 2,
                MigrationPhase::Done => 3,
                MigrationPhase::Failed => 4,
            };
            let ok = *phase == MigrationPhase::Failed && m.phase != MigrationPhase::Switching
                || order(*phase) == order(m.phase) + 1;
            if !ok {
                return Err(Rejection::conflict(format!(
                    "migration of {id} cannot go from {:?} to {phase:?}",
                    m.phase
                )));
            }
            match phase {
                MigrationPhase::Done => {
                    let to = m.to.clone();
                    st.migrations.remove(id);
                    modify_sandbox(st, id, meta, |r| {
                        r.node = Some(to);
                        Ok(true)
                    })
                }
                MigrationPhase::Failed => {
                    st.migrations.remove(id);
                    Ok(Response::Done)
                }
                p => {
                    if let Some(m) = st.migrations.get_mut(id) {
                        m.phase = *p;
                    }
                    Ok(Response::Done)
                }
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn create_sandbox(
    st: &mut State,
    id: &SandboxId,
    tenant: &TenantName,
    spec: &SandboxSpec,
    key: Option<&str>,
    node: Option<&NodeName>,
    now_ms: u64,
    meta: ApplyMeta,
) -> Applied {
    let quotas = tenant_rec(st, tenant)?.quotas;
    if let Some(k) = key {
        if k.is_empty() || k.len() > 255 || !k.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(Rejection::invalid(
                "idempotency_key",
                "1-255 printable ASCII characters",
            ));
        }
        if let Some(existing) = st.idx.idempotency.get(&(tenant.clone(), k.to_owned())) {
            let rec = st
                .sandboxes
                .get(existing)
                .expect("the idempotency index points at existing sandboxes");
            if rec.spec != *spec {
                return Err(Rejection::IdempotencyConflict { key: k.to_owned() });
            }
            return Ok(Response::SandboxCreated {
                id: rec.id.clone(),
                created: false,
                generation: rec.generation,
            });
        }
    }
    spec.validate()
        .map_err(|e| Rejection::invalid("spec", e.to_string()))?;
    if st.sandboxes.contains_key(id) {
        return Err(Rejection::exists(ObjectKind::Sandbox, id));
    }
    if let Origin::Snapshot { snapshot } = &spec.origin
        && !st.snapshots.contains_key(&scoped(Some(tenant), snapshot))
    {
        return Err(Rejection::not_found(ObjectKind::Snapshot, snapshot));
    }
    let used = st.idx.usage.get(tenant).copied().unwrap_or_default();
    let r = spec.resources;
    let checks = [
        (
            QuotaResource::Sandboxes,
            u64::from(quotas.sandboxes),
            u64::from(used.sandboxes),
            1,
        ),
        (
            QuotaResource::Cpus,
            u64::from(quotas.cpus),
            u64::from(used.cpus),
            u64::from(r.cpus),
        ),
        (
            QuotaResource::MemoryMib,
            quotas.memory_mib,
            used.memory_mib,
            u64::from(r.memory_mib),
        ),
    ];
    for (resource, limit, used, requested) in checks {
        if used.saturating_add(requested) > limit {
            return Err(Rejection::QuotaExceeded {
                resource,
                limit,
                used,
                requested,
            });
        }
    }
    if let Some(n) = node {
        check_node_fits(st, n, &r)?;
    }
    let rec = SandboxRecord {
        id: id.clone(),
        tenant: tenant.clone(),
        spec: spec.clone(),
        desired: DesiredState::Running,
        observed: SandboxState::Creating,
        observed_at_ms: now_ms,
        node: node.cloned(),
        generation: 1,
        observed_generation: 0,
        created_at_ms: now_ms,
        idempotency_key: key.map(str::to_owned),
        mod_index: meta.index,
        group: None,
    };
    index_sandbox(&mut st.idx, &rec, true);
    st.sandboxes.insert(id.clone(), rec);
    Ok(Response::SandboxCreated {
        id: id.clone(),
        created: true,
        generation: 1,
    })
}

fn expire_nodes(st: &mut State, now_ms: u64, grace_ms: u64, meta: ApplyMeta) -> Response {
    let expired: Vec<NodeName> = st
        .nodes
        .values()
        .filter(|n| {
            n.status != NodeStatus::Unreachable
                && n.last_heartbeat_ms.saturating_add(grace_ms) < now_ms
        })
        .map(|n| n.name.clone())
        .collect();
    let (mut lost, mut unassigned) = (Vec::new(), Vec::new());
    for name in &expired {
        if let Some(n) = st.nodes.get_mut(name) {
            n.status = NodeStatus::Unreachable;
        }
        let ids: Vec<SandboxId> = st
            .idx
            .by_node
            .get(name)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default();
        for id in ids {
            let Some(rec) = st.sandboxes.get(&id) else {
                continue;
            };
            if !rec.counts() {
                continue;
            }
            let again = rec.spec.restart == RestartPolicy::OnNodeFailure
                && rec.desired == DesiredState::Running;
            let msg = format!("node {name} was lost");
            let res = modify_sandbox(st, &id, meta, |r| {
                if again {
                    r.node = None;
                    r.observed = SandboxState::Creating;
                    r.observed_generation = 0;
                } else {
                    r.observed = SandboxState::Failed {
                        error: msg,
                        exit_code: LOST_EXIT_CODE,
                    };
                }
                Ok(true)
            });
            if res.is_ok() {
                if again {
                    unassigned.push(id);
                } else {
                    lost.push(id);
                }
            }
        }
    }
    Response::NodesExpired {
        nodes: expired,
        lost,
        unassigned,
    }
}

fn put_group(
    st: &mut State,
    tenant: &TenantName,
    name: &str,
    members: &std::collections::BTreeSet<SandboxId>,
    meta: ApplyMeta,
) -> Applied {
    check_name("name", name)?;
    tenant_rec(st, tenant)?;
    if members.len() > MAX_GROUP_MEMBERS {
        return Err(Rejection::invalid(
            "members",
            format!("at most {MAX_GROUP_MEMBERS}"),
        ));
    }
    for id in members {
        let rec = visible_sandbox(st, Some(tenant), id)?;
        if let Some(g) = &rec.group
            && g != name
        {
            return Err(Rejection::conflict(format!(
                "sandbox {id} is already in group {g}"
            )));
        }
    }
    let key = scoped(Some(tenant), name);
    let old = st
        .groups
        .get(&key)
        .map(|g| g.members.clone())
        .unwrap_or_default();
    for id in old.difference(members) {
        if let Some(r) = st.sandboxes.get_mut(id) {
            r.group = None;
            r.mod_index = meta.index;
        }
    }
    let mut node = None;
    for id in members {
        if let Some(r) = st.sandboxes.get_mut(id) {
            r.group = Some(name.to_owned());
            r.mod_index = meta.index;
            if node.is_none() {
                node = r.node.clone();
            }
        }
    }
    st.groups.insert(
        key,
        GroupRecord {
            tenant: tenant.clone(),
            name: name.to_owned(),
            members: members.clone(),
            node,
        },
    );
    Ok(Response::Done)
}

/// Changes one sandbox on a copy and swaps it in, keeping the indexes in
/// step. `f` returns whether the generation moves (what the node must do
/// changed).
fn modify_sandbox(
    st: &mut State,
    id: &SandboxId,
    meta: ApplyMeta,
    f: impl FnOnce(&mut SandboxRecord) -> Result<bool, Rejection>,
) -> Applied {
    let old = st
        .sandboxes
        .get(id)
        .ok_or_else(|| Rejection::not_found(ObjectKind::Sandbox, id))?;
    let mut new = old.clone();
    let bump = f(&mut new)?;
    if bump {
        new.generation += 1;
    }
    new.mod_index = meta.index;
    index_sandbox(&mut st.idx, old, false);
    index_sandbox(&mut st.idx, &new, true);
    let generation = new.generation;
    st.sandboxes.insert(id.clone(), new);
    Ok(Response::SandboxChanged {
        id: id.clone(),
        generation,
    })
}

/// The sandbox, if `tenant` may see it (`None` = admin). Another tenant's
/// sandbox is `NotFound`, exactly as a missing one.
fn visible_sandbox<'a>(
    st: &'a State,
    tenant: Option<&TenantName>,
    id: &SandboxId,
) -> Result<&'a SandboxRecord, Rejection> {
    st.sandboxes
        .get(id)
        .filter(|r| tenant.is_none_or(|t| *t == r.tenant))
        .ok_or_else(|| Rejection::not_found(ObjectKind::Sandbox, id))
}

fn check_node_fits(st: &State, name: &NodeName, r: &Resources) -> Result<(), Rejection> {
    let n = node_rec(st, name)?;
    if n.status != NodeStatus::Ready || n.cordoned {
        return Err(Rejection::conflict(format!(
            "node {name} takes no new sandboxes ({:?}{})",
            n.status,
            if n.cordoned { ", cordoned" } else { "" }
        )));
    }
    let a = st.idx.allocated.get(name).copied().unwrap_or_default();
    let fits = a.cpus.saturating_add(r.cpus) <= n.capacity.cpus
        && a.memory_mib.saturating_add(u64::from(r.memory_mib)) <= n.capacity.memory_mib
        && a.disk_mib.saturating_add(u64::from(r.disk_mib)) <= n.capacity.disk_mib;
    if !fits {
        return Err(Rejection::conflict(format!(
            "node {name} has no room for {} CPU, {} MiB memory, {} MiB disk",
            r.cpus, r.memory_mib, r.disk_mib
        )));
    }
    Ok(())
}

fn node_rec<'a>(st: &'a State, name: &NodeName) -> Result<&'a NodeRecord, Rejection> {
    st.nodes
        .get(name)
        .ok_or_else(|| Rejection::not_found(ObjectKind::Node, name))
}

fn node_mut<'a>(st: &'a mut State, name: &NodeName) -> Result<&'a mut NodeRecord, Rejection> {
    st.nodes
        .get_mut(name)
        .ok_or_else(|| Rejection::not_found(ObjectKind::Node, name))
}

fn tenant_rec<'a>(st: &'a State, name: &TenantName) -> Result<&'a TenantRecord, Rejection> {
    st.tenants
        .get(name)
        .ok_or_else(|| Rejection::not_found(ObjectKind::Tenant, name))
}

fn remove_scoped<V>(
    m: &mut std::collections::BTreeMap<String, V>,
    tenant: &TenantName,
    name: &str,
    kind: ObjectKind,
) -> Applied {
    m.remove(&scoped(Some(tenant), name))
        .map(|_| Response::Done)
        .ok_or_else(|| Rejection::not_found(kind, name))
}

fn check_name(field: &str, name: &str) -> Result<(), Rejection> {
    if valid_name(name) {
        Ok(())
    } else {
        Err(Rejection::invalid(
            field,
            "1-128 characters of A-Z a-z 0-9 . _ -, not starting with . or -",
        ))
    }
}

fn check_text(field: &str, s: &str, max: usize) -> Result<(), Rejection> {
    if s.is_empty() || s.len() > max || s.chars().any(char::is_control) {
        Err(Rejection::invalid(
            field,
            format!("1-{max} printable characters"),
        ))
    } else {
        Ok(())
    }
}

fn check_resources(image: &str, r: &Resources) -> Result<(), Rejection> {
    let mut spec = SandboxSpec::for_image(image);
    spec.resources = *r;
    spec.validate()
        .map_err(|e| Rejection::invalid("template", e.to_string()))
}

fn check_quotas(q: &Quotas) -> Result<(), Rejection> {
    if q.sandboxes > 1_000_000 || q.cpus > 1_000_000 || q.memory_mib > 1 << 40 {
        return Err(Rejection::invalid("quotas", "unreasonably large"));
    }
    Ok(())
}

fn check_labels(labels: &std::collections::BTreeMap<String, String>) -> Result<(), Rejection> {
    if labels.len() > MAX_LABELS {
        return Err(Rejection::invalid(
            "labels",
            format!("at most {MAX_LABELS}"),
        ));
    }
    for (k, v) in labels {
        if k.is_empty()
            || k.len() > MAX_LABEL_KEY
            || !k
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/'))
            || v.len() > MAX_LABEL_VALUE
            || v.chars().any(char::is_control)
        {
            return Err(Rejection::invalid(
                "labels",
                format!(
                    "key {k:?}: keys of 1-{MAX_LABEL_KEY} of [A-Za-z0-9._/-], values of at most {MAX_LABEL_VALUE} printable characters"
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
