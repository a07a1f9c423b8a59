//! Admin endpoints: nodes (list, cordon, uncordon, drain), cluster
//! (status, add and remove members), tenants (create, list, quotas) and
//! tokens (create: the secret shown once; revoke).

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use kiln_api::cluster::{NodeName, Quotas, Role, TenantName};
use kiln_api::rest::{
    AddMember, ClusterStatus, CreateTenant, CreateToken, ErrorBody, Member, Node, NodeList, Tenant,
    TenantList, TokenCreated, Usage,
};
use kiln_store::{Command, Response, ServerNode, query};

use super::body::JsonBody;
use super::{ApiError, caller, rejection};
use crate::config::api_url;
use crate::server::{Shared, now_ms, random_hex};

async fn write(s: &Shared, cmd: Command) -> Result<Response, ApiError> {
    match super::commit(s, cmd).await? {
        Response::Rejected(r) => Err(rejection(r)),
        ok => Ok(ok),
    }
}

fn node_name(n: &str) -> Result<NodeName, ApiError> {
    NodeName::new(n).map_err(|e| ApiError::new(StatusCode::NOT_FOUND, "not_found", e.to_string()))
}

/// Nodes with capacity, allocation, driver, health and cordon.
#[utoipa::path(get, path = "/v1/nodes", tag = "nodes",
    responses((status = 200, body = NodeList), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn nodes(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
) -> Result<Json<NodeList>, ApiError> {
    caller(&s, &headers)?.require_admin()?;
    let items = super::confirmed(&s, |st| {
        st.nodes
            .values()
            .map(|n| Node {
                name: n.name.clone(),
                address: n.address.clone(),
                driver: n.driver,
                capacity: n.capacity,
                allocated: st.idx.allocated.get(&n.name).copied().unwrap_or_default(),
                status: n.status,
                cordoned: n.cordoned,
                labels: n.labels.clone(),
                images: n.images.iter().cloned().collect(),
                sandboxes: st.idx.by_node.get(&n.name).map_or(0, |s| s.len() as u64),
                last_heartbeat_ms: n.last_heartbeat_ms,
            })
            .collect()
    })
    .await?;
    Ok(Json(NodeList { items }))
}

async fn node_cmd(
    s: &Shared,
    headers: &HeaderMap,
    name: &str,
    mk: impl FnOnce(NodeName) -> Command,
) -> Result<StatusCode, ApiError> {
    caller(s, headers)?.require_admin()?;
    write(s, mk(node_name(name)?)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Stop placing new sandboxes on a node.
#[utoipa::path(post, path = "/v1/nodes/{name}/cordon", tag = "nodes", params(("name" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody)))]
pub async fn cordon(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    node_cmd(&s, &headers, &name, |name| Command::CordonNode {
        name,
        cordoned: true,
    })
    .await
}

/// Place sandboxes on a node again.
#[utoipa::path(post, path = "/v1/nodes/{name}/uncordon", tag = "nodes", params(("name" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody)))]
pub async fn uncordon(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    node_cmd(&s, &headers, &name, |name| Command::CordonNode {
        name,
        cordoned: false,
    })
    .await
}

/// Cordon a node and mark it draining.
#[utoipa::path(post, path = "/v1/nodes/{name}/drain", tag = "nodes", params(("name" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody)))]
pub async fn drain(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    node_cmd(&s, &headers, &name, |name| Command::DrainNode { name }).await
}

/// Revoke a node's credential, so that a new host may register under its
/// name with the join token (the old one's calls are refused from now).
#[utoipa::path(post, path = "/v1/nodes/{name}/revoke-credential", tag = "nodes", params(("name" = String, Path)),
    responses((status = 204), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn revoke_credential(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller(&s, &headers)?.require_admin()?;
    let name = node_name(&name)?;
    let ids: Vec<String> = s
        .raft
        .read(|st| {
            st.tokens
                .values()
                .filter(|t| {
                    t.role == Role::Node
                        && t.node.as_ref() == Some(&name)
                        && t.revoked_at_ms.is_none()
                })
                .map(|t| t.id.clone())
                .collect()
        })
        .await?;
    if ids.is_empty() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("node {name} has no live credential"),
        ));
    }
    for id in ids {
        write(
            &s,
            Command::RevokeToken {
                id,
                now_ms: now_ms(),
            },
        )
        .await?;
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Members, leader, term, commit and applied index, API URLs.
#[utoipa::path(get, path = "/v1/cluster", tag = "cluster",
    responses((status = 200, body = ClusterStatus), (status = 403, body = ErrorBody)))]
pub async fn cluster_status(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
) -> Result<Json<ClusterStatus>, ApiError> {
    caller(&s, &headers)?.require_admin()?;
    let st = s.raft.status();
    Ok(Json(ClusterStatus {
        id: st.id,
        leader: st.leader,
        term: st.term,
        last_log_index: st.last_log_index,
        commit_index: st.committed_index,
        applied_index: s.raft.applied_index(),
        members: st
            .members
            .iter()
            .map(|(id, n)| Member {
                id: *id,
                raft_addr: n.raft_addr.clone(),
                api_url: n.api_addr.clone(),
                voter: st.voters.contains(id),
            })
            .collect(),
    }))
}

/// Add a replica: it joins as a learner, catches up, becomes a voter.
#[utoipa::path(post, path = "/v1/cluster/members", tag = "cluster", request_body = AddMember,
    responses((status = 204), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn add_member(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Result<JsonBody<AddMember>, ApiError>,
) -> Result<StatusCode, ApiError> {
    caller(&s, &headers)?.require_admin()?;
    let JsonBody(m) = body?;
    if m.id == 0 || m.raft_addr.is_empty() || m.api_url.is_empty() {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
            "id ≥ 1, raft_addr and api_url are required",
        ));
    }
    let conflict = |e: kiln_store::ClusterError| {
        ApiError::new(StatusCode::CONFLICT, "membership", e.to_string())
    };
    s.raft
        .add_learner(
            m.id,
            ServerNode {
                raft_addr: m.raft_addr,
                api_addr: api_url(&m.api_url),
            },
        )
        .await
        .map_err(conflict)?;
    let mut voters: BTreeSet<u64> = s.raft.status().voters;
    voters.insert(m.id);
    s.raft.change_membership(voters).await.map_err(conflict)?;
    Ok(StatusCode::NO_CONTENT)
}

/// Remove a replica from the voters.
#[utoipa::path(delete, path = "/v1/cluster/members/{id}", tag = "cluster", params(("id" = u64, Path)),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn remove_member(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller(&s, &headers)?.require_admin()?;
    let mut voters: BTreeSet<u64> = s.raft.status().voters;
    let nf = || ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such voter");
    let id: u64 = id.parse().map_err(|_| nf())?;
    if !voters.remove(&id) {
        return Err(nf());
    }
    if voters.is_empty() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "membership",
            "cannot remove the last voter",
        ));
    }
    s.raft
        .change_membership(voters)
        .await
        .map_err(|e| ApiError::new(StatusCode::CONFLICT, "membership", e.to_string()))?;
    Ok(StatusCode::NO_CONTENT)
}

fn tenant_view(st: &kiln_store::State, t: &kiln_store::state::TenantRecord) -> Tenant {
    let u = query::tenant_usage(st, &t.name);
    Tenant {
        name: t.name.clone(),
        quotas: t.quotas,
        usage: Usage {
            sandboxes: u.sandboxes,
            cpus: u.cpus,
            memory_mib: u.memory_mib,
        },
        created_at_ms: t.created_at_ms,
    }
}

/// Create a tenant.
#[utoipa::path(post, path = "/v1/tenants", tag = "tenants", request_body = CreateTenant,
    responses((status = 201, body = Tenant), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn create_tenant(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Result<JsonBody<CreateTenant>, ApiError>,
) -> Result<impl IntoResponse, ApiError> {
    caller(&s, &headers)?.require_admin()?;
    let JsonBody(req) = body?;
    write(
        &s,
        Command::CreateTenant {
            name: req.name.clone(),
            quotas: req.quotas.unwrap_or_default(),
            now_ms: now_ms(),
        },
    )
    .await?;
    let t = s
        .raft
        .read_local(|st| st.tenants.get(&req.name).map(|t| tenant_view(st, t)))
        .ok_or_else(|| ApiError::unavailable("tenant vanished"))?;
    Ok((StatusCode::CREATED, Json(t)))
}

/// Tenants with quotas and usage.
#[utoipa::path(get, path = "/v1/tenants", tag = "tenants",
    responses((status = 200, body = TenantList), (status = 403, body = ErrorBody)))]
pub async fn list_tenants(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
) -> Result<Json<TenantList>, ApiError> {
    caller(&s, &headers)?.require_admin()?;
    let items = super::confirmed(&s, |st| {
        st.tenants.values().map(|t| tenant_view(st, t)).collect()
    })
    .await?;
    Ok(Json(TenantList { items }))
}

/// Replace a tenant's quotas.
#[utoipa::path(put, path = "/v1/tenants/{name}/quotas", tag = "tenants", request_body = Quotas,
    params(("name" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn set_quotas(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: Result<JsonBody<Quotas>, ApiError>,
) -> Result<StatusCode, ApiError> {
    caller(&s, &headers)?.require_admin()?;
    let name = TenantName::new(name)
        .map_err(|e| ApiError::new(StatusCode::NOT_FOUND, "not_found", e.to_string()))?;
    let JsonBody(quotas) = body?;
    write(&s, Command::SetQuotas { name, quotas }).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Create an API token; the secret is in this answer only.
#[utoipa::path(post, path = "/v1/tokens", tag = "tokens", request_body = CreateToken,
    responses((status = 201, body = TokenCreated), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn create_token(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Result<JsonBody<CreateToken>, ApiError>,
) -> Result<impl IntoResponse, ApiError> {
    caller(&s, &headers)?.require_admin()?;
    let JsonBody(req) = body?;
    if req.role == Role::Node {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            "node credentials are minted by node registration",
        ));
    }
    let secret = format!("kiln_{}", random_hex(24));
    let id = format!("tok-{}", random_hex(8));
    write(
        &s,
        Command::CreateToken {
            id: id.clone(),
            tenant: req.tenant.clone(),
            role: req.role,
            sha256: query::hash_token(&secret),
            description: req.description,
            now_ms: now_ms(),
            node: None,
        },
    )
    .await?;
    Ok((
        StatusCode::CREATED,
        Json(TokenCreated {
            id,
            secret,
            role: req.role,
            tenant: req.tenant,
        }),
    ))
}

/// Revoke a token.
#[utoipa::path(delete, path = "/v1/tokens/{id}", tag = "tokens", params(("id" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody)))]
pub async fn revoke_token(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller(&s, &headers)?.require_admin()?;
    write(
        &s,
        Command::RevokeToken {
            id,
            now_ms: now_ms(),
        },
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}
