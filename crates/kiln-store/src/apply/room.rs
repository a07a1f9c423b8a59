//! What later issues build on: network policies, volumes, groups, migrations.

use super::checks::*;
use super::*;

pub(super) fn apply(st: &mut State, cmd: &Command, meta: ApplyMeta) -> Applied {
    let _ = meta;
    match cmd {
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
        _ => Err(Rejection::invalid("command", "routed to the wrong handler")),
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
