//! Templates, warm pools and snapshots, and which nodes hold them.

use super::checks::*;
use super::*;

pub(super) fn apply(st: &mut State, cmd: &Command, meta: ApplyMeta) -> Applied {
    let _ = meta;
    match cmd {
        Command::PutTemplate {
            tenant,
            name,
            image,
            resources,
            auto,
            now_ms,
            nodes,
            everywhere,
        } => {
            check_name("name", name)?;
            check_resources(image, resources)?;
            if let Some(t) = tenant {
                tenant_rec(st, t)?;
            }
            if nodes.len() > MAX_TEMPLATE_NODES {
                return Err(Rejection::invalid(
                    "nodes",
                    format!("at most {MAX_TEMPLATE_NODES} nodes"),
                ));
            }
            for n in nodes {
                node_rec(st, n)?;
            }
            let key = scoped(tenant.as_ref(), name);
            if let Some(t) = st.templates.get_mut(&key) {
                if t.image == *image && t.resources == *resources {
                    t.placed.extend(nodes.iter().cloned());
                    t.everywhere |= *everywhere;
                    return Ok(Response::Done);
                }
                return Err(Rejection::exists(ObjectKind::Template, name));
            }
            // Each template is a VM image on every node it is placed on:
            // a tenant's count is bounded.
            if tenant.is_some()
                && st
                    .templates
                    .values()
                    .filter(|t| t.tenant == *tenant)
                    .count()
                    >= MAX_TENANT_TEMPLATES
            {
                return Err(Rejection::invalid(
                    "name",
                    format!("at most {MAX_TENANT_TEMPLATES} templates per tenant"),
                ));
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
                    placed: nodes.iter().cloned().collect(),
                    failed: Default::default(),
                    everywhere: *everywhere,
                    pool_per_node: 0,
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
            error,
        } => {
            node_rec(st, node)?;
            if error.as_ref().is_some_and(|e| e.len() > MAX_ERROR_TEXT) {
                return Err(Rejection::invalid(
                    "error",
                    format!("at most {MAX_ERROR_TEXT} bytes"),
                ));
            }
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
                t.failed.remove(node);
            } else {
                t.nodes.remove(node);
                match error {
                    Some(e) => {
                        t.failed.insert(node.clone(), e.clone());
                    }
                    None => {
                        t.failed.remove(node);
                    }
                }
            }
            Ok(Response::Done)
        }
        Command::DeleteTemplate { tenant, name } => {
            let key = scoped(tenant.as_ref(), name);
            let t = st
                .templates
                .get(&key)
                .ok_or_else(|| Rejection::not_found(ObjectKind::Template, name))?;
            let users: Vec<String> = st
                .sandboxes
                .values()
                .filter(|r| {
                    r.counts()
                        && tenant.as_ref().is_none_or(|o| *o == r.tenant)
                        && r.spec.image == t.image
                        && r.spec.resources == t.resources
                        && r.node.as_ref().is_some_and(|n| t.nodes.contains_key(n))
                })
                .map(|r| r.id.to_string())
                .take(8)
                .collect();
            if !users.is_empty() {
                return Err(Rejection::conflict(format!(
                    "template {name} is in use by sandboxes started from its image and resources: {}; remove them first",
                    users.join(", ")
                )));
            }
            st.templates.remove(&key);
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
            let before = st
                .pools
                .get(&key)
                .and_then(|p| p.nodes.get(node))
                .map_or(0, |p| p.target);
            if let Some(t) = tenant
                && *target > before
            {
                check_pool_quota(st, t, &key, node, *target)?;
            }
            if let Some(t) = st.templates.get_mut(&key)
                && t.everywhere
            {
                t.pool_per_node = *target;
            }
            let pool = st.pools.entry(key.clone()).or_insert_with(|| PoolRecord {
                tenant: tenant.clone(),
                template: template.clone(),
                nodes: Default::default(),
                members: Default::default(),
            });
            if *target == 0 {
                pool.nodes.remove(node);
                pool.members.remove(node);
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
            members,
        } => {
            if members.len() > MAX_POOL_TARGET as usize {
                return Err(Rejection::invalid(
                    "members",
                    format!("at most {MAX_POOL_TARGET}"),
                ));
            }
            let pool = st
                .pools
                .get_mut(&scoped(tenant.as_ref(), template))
                .filter(|p| p.nodes.contains_key(node))
                .ok_or_else(|| {
                    Rejection::not_found(ObjectKind::Pool, format!("{template} on {node}"))
                })?;
            if let Some(slot) = pool.nodes.get_mut(node) {
                slot.ready = *ready;
            }
            if members.is_empty() {
                pool.members.remove(node);
            } else {
                pool.members.insert(node.clone(), members.clone());
            }
            Ok(Response::Done)
        }
        Command::PutSnapshot {
            tenant,
            name,
            source,
            now_ms,
            ephemeral,
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
                    ephemeral: *ephemeral,
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
            let key = scoped(Some(tenant), name);
            if !st.snapshots.contains_key(&key) {
                return Err(Rejection::not_found(ObjectKind::Snapshot, name));
            }
            let users = crate::query::snapshot_users(st, tenant, name);
            if !users.is_empty() {
                let shown: Vec<String> = users.iter().take(8).map(|i| i.to_string()).collect();
                return Err(Rejection::conflict(format!(
                    "snapshot {name:?} is in use by sandboxes restored from it: {}; remove them first",
                    shown.join(", ")
                )));
            }
            st.snapshots.remove(&key);
            Ok(Response::Done)
        }
        _ => Err(Rejection::invalid("command", "routed to the wrong handler")),
    }
}

/// Most templates one tenant may have.
pub(super) const MAX_TENANT_TEMPLATES: usize = 64;

/// Warm-pool members are VMs kept running for a tenant: with `key`'s pool
/// on `node` at `target`, the tenant's pools (members × their template's
/// resources) plus its sandboxes must fit its quotas.
pub(super) fn check_pool_quota(
    st: &State,
    tenant: &TenantName,
    key: &str,
    node: &NodeName,
    target: u32,
) -> Result<(), Rejection> {
    let quotas = tenant_rec(st, tenant)?.quotas;
    let used = st.idx.usage.get(tenant).copied().unwrap_or_default();
    let (mut members, mut cpus, mut mem) = (0u64, 0u64, 0u64);
    for (k, p) in st
        .pools
        .iter()
        .filter(|(_, p)| p.tenant.as_ref() == Some(tenant))
    {
        let Some(t) = st.templates.get(k) else {
            continue;
        };
        for (n, on) in &p.nodes {
            let count = if k == key && n == node {
                target
            } else {
                on.target
            };
            members += u64::from(count);
            cpus += u64::from(count) * u64::from(t.resources.cpus);
            mem += u64::from(count) * u64::from(t.resources.memory_mib);
        }
    }
    if !st
        .pools
        .get(key)
        .is_some_and(|p| p.nodes.contains_key(node))
        && let Some(t) = st.templates.get(key)
    {
        members += u64::from(target);
        cpus += u64::from(target) * u64::from(t.resources.cpus);
        mem += u64::from(target) * u64::from(t.resources.memory_mib);
    }
    for (resource, limit, used, requested) in [
        (
            QuotaResource::Sandboxes,
            u64::from(quotas.sandboxes),
            u64::from(used.sandboxes),
            members,
        ),
        (
            QuotaResource::Cpus,
            u64::from(quotas.cpus),
            u64::from(used.cpus),
            cpus,
        ),
        (
            QuotaResource::MemoryMib,
            quotas.memory_mib,
            used.memory_mib,
            mem,
        ),
    ] {
        if used.saturating_add(requested) > limit {
            return Err(Rejection::QuotaExceeded {
                resource,
                limit,
                used,
                requested,
            });
        }
    }
    Ok(())
}
