//! Sandboxes: create (idempotency, quotas, capacity), place, desired state, reports, forget.

use kiln_api::sandbox::{NetworkSpec, PolicyAction, PolicyRule};

use super::checks::*;
use super::*;

pub(super) fn apply(st: &mut State, cmd: &Command, meta: ApplyMeta) -> Applied {
    let _ = meta;
    match cmd {
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
            stop_grace_secs,
        } => {
            let rec = visible_sandbox(st, tenant.as_ref(), id)?;
            if stop_grace_secs.is_some_and(|g| g > super::MAX_STOP_GRACE_SECS) {
                return Err(Rejection::invalid(
                    "stop_grace_secs",
                    format!(
                        "a stop's grace time is at most {} s",
                        super::MAX_STOP_GRACE_SECS
                    ),
                ));
            }
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
            let grace = stop_grace_secs.filter(|_| desired == DesiredState::Stopped);
            modify_sandbox(st, id, meta, |r| {
                r.desired = desired;
                r.stop_grace_secs = grace;
                Ok(true)
            })
        }
        Command::ReportSandbox {
            node,
            id,
            generation,
            state,
            now_ms,
            start,
        } => {
            let rec = st
                .sandboxes
                .get(id)
                .ok_or_else(|| Rejection::not_found(ObjectKind::Sandbox, id))?;
            if let Some(r) = start
                && let Err(e) = r.validate()
            {
                return Err(Rejection::invalid("start", e));
            }
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
            let start = start.clone();
            let ended = state.is_finished();
            let applied = modify_sandbox(st, id, meta, |r| {
                r.observed = state;
                r.observed_generation = generation;
                r.observed_at_ms = now_ms;
                if start.is_some() {
                    r.start = start;
                }
                Ok(false)
            })?;
            // A fork's snapshot goes once its last fork has ended (the
            // node removed its copy then), as on a single host.
            if ended && let Some(rec) = st.sandboxes.get(id) {
                let (tenant, origin) = (rec.tenant.clone(), rec.spec.origin.clone());
                if let Origin::Snapshot { snapshot } = origin {
                    drop_unused_ephemeral(st, &tenant, &snapshot);
                }
            }
            Ok(applied)
        }
        Command::SetSandboxPolicy {
            tenant,
            id,
            policy,
            policy_default,
            rules,
        } => set_policy(
            st,
            tenant.as_ref(),
            id,
            policy,
            *policy_default,
            rules,
            meta,
        ),
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
            // A fork's snapshot is forgotten with its last sandbox.
            if let Origin::Snapshot { snapshot } = &rec.spec.origin {
                drop_unused_ephemeral(st, &rec.tenant, snapshot);
            }
            Ok(Response::Done)
        }
        _ => Err(Rejection::invalid("command", "routed to the wrong handler")),
    }
}

/// Forgets the tenant's ephemeral (fork) snapshot `snapshot` once no
/// sandbox restored from it is still to run or running: the node holding
/// it removed its copy when the last one ended.
fn drop_unused_ephemeral(st: &mut State, tenant: &TenantName, snapshot: &str) {
    let key = scoped(Some(tenant), snapshot);
    if !st.snapshots.get(&key).is_some_and(|s| s.ephemeral) {
        return;
    }
    let used = st.idx.by_tenant.get(tenant).is_some_and(|ids| {
        ids.iter().filter_map(|i| st.sandboxes.get(i)).any(|r| {
            !r.observed.is_finished()
                && matches!(&r.spec.origin, Origin::Snapshot { snapshot: s } if s == snapshot)
        })
    });
    if !used {
        st.snapshots.remove(&key);
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
        policy_generation: 1,
        start: None,
        stop_grace_secs: None,
    };
    index_sandbox(&mut st.idx, &rec, true);
    if let Some(t) = st.tenants.get_mut(tenant) {
        let image = &rec.spec.image;
        if t.recent_images.last() != Some(image) {
            t.recent_images.retain(|i| i != image);
            t.recent_images.push(image.clone());
            let over = t
                .recent_images
                .len()
                .saturating_sub(crate::state::MAX_RECENT_IMAGES);
            t.recent_images.drain(..over);
        }
    }
    st.sandboxes.insert(id.clone(), rec);
    Ok(Response::SandboxCreated {
        id: id.clone(),
        created: true,
        generation: 1,
    })
}

/// Replaces a networked sandbox's policy (see [`Command::SetSandboxPolicy`]).
/// The same policy again changes nothing (the generation stays).
fn set_policy(
    st: &mut State,
    tenant: Option<&TenantName>,
    id: &SandboxId,
    policy: &Option<String>,
    policy_default: Option<PolicyAction>,
    rules: &[PolicyRule],
    meta: ApplyMeta,
) -> Applied {
    let rec = visible_sandbox(st, tenant, id)?;
    if rec.desired == DesiredState::Deleted {
        return Err(Rejection::conflict(format!(
            "sandbox {id} is being deleted"
        )));
    }
    if rec.observed.is_finished() {
        return Err(Rejection::conflict(format!(
            "sandbox {id} has ended ({}); its network is gone",
            rec.observed.label()
        )));
    }
    let NetworkSpec::Default { publish, .. } = &rec.spec.network else {
        return Err(Rejection::conflict(format!(
            "sandbox {id} has no network (network mode none): it has no policy"
        )));
    };
    let mut spec = rec.spec.clone();
    spec.network = NetworkSpec::Default {
        policy: policy.clone(),
        policy_default,
        rules: rules.to_vec(),
        publish: publish.clone(),
    };
    if spec.network == rec.spec.network {
        return Ok(Response::SandboxChanged {
            id: id.clone(),
            generation: rec.generation,
        });
    }
    spec.validate()
        .map_err(|e| Rejection::invalid("policy", e.to_string()))?;
    modify_sandbox(st, id, meta, |r| {
        r.spec = spec;
        r.policy_generation = r.generation + 1;
        Ok(true)
    })
}
