//! Lookups and validations shared by the command handlers.

use super::*;

/// Changes one sandbox on a copy and swaps it in, keeping the indexes in
/// step. `f` returns whether the generation moves (what the node must do
/// changed).
pub(super) fn modify_sandbox(
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
pub(super) fn visible_sandbox<'a>(
    st: &'a State,
    tenant: Option<&TenantName>,
    id: &SandboxId,
) -> Result<&'a SandboxRecord, Rejection> {
    st.sandboxes
        .get(id)
        .filter(|r| tenant.is_none_or(|t| *t == r.tenant))
        .ok_or_else(|| Rejection::not_found(ObjectKind::Sandbox, id))
}

pub(super) fn check_node_fits(st: &State, name: &NodeName, r: &Resources) -> Result<(), Rejection> {
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

pub(super) fn node_rec<'a>(st: &'a State, name: &NodeName) -> Result<&'a NodeRecord, Rejection> {
    st.nodes
        .get(name)
        .ok_or_else(|| Rejection::not_found(ObjectKind::Node, name))
}

pub(super) fn node_mut<'a>(
    st: &'a mut State,
    name: &NodeName,
) -> Result<&'a mut NodeRecord, Rejection> {
    st.nodes
        .get_mut(name)
        .ok_or_else(|| Rejection::not_found(ObjectKind::Node, name))
}

pub(super) fn tenant_rec<'a>(
    st: &'a State,
    name: &TenantName,
) -> Result<&'a TenantRecord, Rejection> {
    st.tenants
        .get(name)
        .ok_or_else(|| Rejection::not_found(ObjectKind::Tenant, name))
}

pub(super) fn remove_scoped<V>(
    m: &mut std::collections::BTreeMap<String, V>,
    tenant: &TenantName,
    name: &str,
    kind: ObjectKind,
) -> Applied {
    m.remove(&scoped(Some(tenant), name))
        .map(|_| Response::Done)
        .ok_or_else(|| Rejection::not_found(kind, name))
}

pub(super) fn check_name(field: &str, name: &str) -> Result<(), Rejection> {
    if valid_name(name) {
        Ok(())
    } else {
        Err(Rejection::invalid(
            field,
            "1-128 characters of A-Z a-z 0-9 . _ -, not starting with . or -",
        ))
    }
}

pub(super) fn check_text(field: &str, s: &str, max: usize) -> Result<(), Rejection> {
    if s.is_empty() || s.len() > max || s.chars().any(char::is_control) {
        Err(Rejection::invalid(
            field,
            format!("1-{max} printable characters"),
        ))
    } else {
        Ok(())
    }
}

pub(super) fn check_resources(image: &str, r: &Resources) -> Result<(), Rejection> {
    let mut spec = SandboxSpec::for_image(image);
    spec.resources = *r;
    spec.validate()
        .map_err(|e| Rejection::invalid("template", e.to_string()))
}

pub(super) fn check_quotas(q: &Quotas) -> Result<(), Rejection> {
    if q.sandboxes > 1_000_000 || q.cpus > 1_000_000 || q.memory_mib > 1 << 40 {
        return Err(Rejection::invalid("quotas", "unreasonably large"));
    }
    Ok(())
}

pub(super) fn check_labels(
    labels: &std::collections::BTreeMap<String, String>,
) -> Result<(), Rejection> {
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
