//! Tenants, quotas and API tokens (stored as SHA-256 only).

use super::checks::*;
use super::*;

pub(super) fn apply(st: &mut State, cmd: &Command, meta: ApplyMeta) -> Applied {
    let _ = meta;
    match cmd {
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
                    recent_images: Vec::new(),
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
            node,
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
            match (role, node) {
                (Role::Node, None) => {
                    return Err(Rejection::invalid(
                        "node",
                        "a node credential needs its node",
                    ));
                }
                (Role::Admin | Role::Tenant, Some(_)) => {
                    return Err(Rejection::invalid(
                        "node",
                        "only a node credential is bound to a node",
                    ));
                }
                _ => {}
            }
            match (role, tenant) {
                (Role::Admin | Role::Node, None) => {}
                (Role::Tenant, Some(t)) => {
                    tenant_rec(st, t)?;
                }
                (Role::Node, Some(_)) => {
                    return Err(Rejection::invalid(
                        "tenant",
                        "a node credential has no tenant",
                    ));
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
                    node: node.clone(),
                },
            );
            Ok(Response::Done)
        }
        Command::RotateNodeCredentials { node, keep, now_ms } => {
            revoke_node_credentials(st, node, keep.as_deref(), *now_ms);
            Ok(Response::Done)
        }
        Command::ConfirmNodeCredential {
            node,
            sha256,
            now_ms,
        } => {
            let live = st
                .idx
                .token_by_hash
                .get(sha256)
                .and_then(|id| st.tokens.get(id))
                .is_some_and(|t| {
                    t.role == Role::Node
                        && t.node.as_ref() == Some(node)
                        && t.revoked_at_ms.is_none()
                });
            if !live {
                return Err(Rejection::invalid(
                    "sha256",
                    "not a live credential of this node",
                ));
            }
            revoke_node_credentials(st, node, Some(sha256), *now_ms);
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
        _ => Err(Rejection::invalid("command", "routed to the wrong handler")),
    }
}

/// Revokes node `node`'s live credentials except the one hashed `keep`.
fn revoke_node_credentials(st: &mut State, node: &NodeName, keep: Option<&str>, now_ms: u64) {
    for tok in st.tokens.values_mut() {
        if tok.role == Role::Node
            && tok.node.as_ref() == Some(node)
            && tok.revoked_at_ms.is_none()
            && keep != Some(tok.sha256.as_str())
        {
            tok.revoked_at_ms = Some(now_ms);
        }
    }
}
