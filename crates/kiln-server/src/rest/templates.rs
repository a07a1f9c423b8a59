//! `/v1/templates`: templates and their warm pools, as replicated desired
//! state. A create records the template and its pool target on each chosen
//! node (`PutTemplate`, then `SetPool` per node); each node's daemon
//! builds it, sizes the pool and reports back (`ReportTemplate`,
//! `ReportPool`), which `GET` shows per node.
//!
//! Invariants:
//! - Tenant-scoped: a tenant token creates, resizes and deletes only its
//!   tenant's templates and reads its own and the shared ones (made with an
//!   admin token); another tenant's is 404 exactly like a missing one.
//! - A delete is refused (409 `conflict`) while live sandboxes of the
//!   template's image and resources run on a node holding it (decided in
//!   `apply`, so no create can slip between the check and the delete);
//!   once deleted, every node drains the pool and removes the template.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use kiln_api::cluster::{NodeName, NodeStatus, TenantName};
use kiln_api::rest::ErrorBody;
use kiln_api::sandbox::{SandboxSpec, valid_name};
use kiln_api::templates::{
    CreateTemplate, NodeTemplate, ResizePool, Template, TemplateList, TemplateOnNode,
    TemplatePhase, default_template_name,
};
use kiln_store::state::{State as St, TemplateRecord, scoped};
use kiln_store::{Command, Response, query};

use super::body::JsonBody;
use super::{ApiError, Caller, caller, rejection};
use crate::server::{Shared, now_ms};

/// The API view of a template record.
pub fn to_rest(st: &St, t: &TemplateRecord) -> Template {
    let key = scoped(t.tenant.as_ref(), &t.name);
    let pool = st.pools.get(&key);
    let mut names: Vec<&NodeName> = t
        .placed
        .iter()
        .chain(t.nodes.keys())
        .chain(t.failed.keys())
        .collect();
    names.sort();
    names.dedup();
    let nodes = names
        .into_iter()
        .map(|n| {
            let ready = t.nodes.get(n).filter(|a| a.ready);
            let slot = pool.and_then(|p| p.nodes.get(n));
            let (phase, reason) = match (ready, t.failed.get(n)) {
                (Some(_), _) => (TemplatePhase::Ready, None),
                (None, Some(why)) => (TemplatePhase::Failed, Some(why.clone())),
                (None, None) => (TemplatePhase::Creating, None),
            };
            TemplateOnNode {
                node: n.clone(),
                phase,
                reason,
                size_bytes: ready.map_or(0, |a| a.size_bytes),
                pool_ready: match pool.and_then(|p| p.members.get(n)) {
                    // The members a create can still take (one the server
                    // gave a sandbox is no longer offered, whatever the
                    // node's last report says).
                    Some(m) if !m.is_empty() => m
                        .iter()
                        .filter(|id| !st.sandboxes.contains_key(*id))
                        .count() as u32,
                    _ => slot.map_or(0, |s| s.ready),
                },
                pool_target: slot.map_or(0, |s| s.target),
            }
        })
        .collect();
    Template {
        name: t.name.clone(),
        tenant: t.tenant.clone(),
        image: t.image.clone(),
        resources: t.resources,
        created_at_ms: t.created_at_ms,
        nodes,
    }
}

/// A ready warm-pool member on `node` that a create of `spec` by `tenant`
/// may take as its sandbox ID: of a template of the tenant (or a shared
/// one) with the spec's image and resources, reported by the node and not
/// yet a sandbox. The node then starts the sandbox from that member.
pub(super) fn pool_member(
    st: &St,
    tenant: &TenantName,
    spec: &SandboxSpec,
    node: &NodeName,
) -> Option<kiln_api::sandbox::SandboxId> {
    use kiln_api::sandbox::{NetworkSpec, StartPreference};
    if spec.start != StartPreference::Warm || spec.network != NetworkSpec::None {
        return None;
    }
    query::list_templates(st, Some(tenant))
        .filter(|t| t.image == spec.image && t.resources == spec.resources)
        .filter_map(|t| st.pools.get(&scoped(t.tenant.as_ref(), &t.name)))
        .filter_map(|p| p.members.get(node))
        .flatten()
        .find(|id| !st.sandboxes.contains_key(*id))
        .cloned()
}

fn not_found(name: &str) -> ApiError {
    let shown: String = name.chars().take(128).filter(|c| !c.is_control()).collect();
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("template {shown:?} does not exist"),
    )
}

/// The key of a template the caller owns (tenant: its own; admin: a
/// shared one), or 404.
fn owned_key(st: &St, who: &Caller, name: &str) -> Option<String> {
    let key = scoped(who.tenant.as_ref(), name);
    st.templates.contains_key(&key).then_some(key)
}

fn check_pool(n: u32) -> Result<(), ApiError> {
    use kiln_api::templates::MAX_POOL_PER_NODE;
    if n > MAX_POOL_PER_NODE {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_pool",
            format!("pool: at most {MAX_POOL_PER_NODE} members per node"),
        ));
    }
    Ok(())
}

fn answer(r: Response) -> Result<(), ApiError> {
    match r {
        Response::Rejected(rej) => Err(rejection(rej)),
        Response::Batch { responses } => {
            for r in responses {
                answer(r)?;
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Create a template (and its warm pool) on the given nodes, or on every
/// ready node: `put_template`, then `set_pool` per node (a create cut off
/// in between leaves pools unset; repeating it completes them). Creating one that exists with the same image and resources
/// adds the nodes and sets the pool size (200).
#[utoipa::path(post, path = "/v1/templates", tag = "templates", operation_id = "create_template", request_body = CreateTemplate,
    responses(
        (status = 201, description = "Recorded; nodes build it", body = Template),
        (status = 200, description = "It existed with this image and resources", body = Template),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, description = "A named node does not exist", body = ErrorBody),
        (status = 409, description = "The name is taken by another image or resources", body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 415, body = ErrorBody),
        (status = 422, description = "Invalid name, image, resources or pool size; no node to hold it", body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub async fn create(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Result<JsonBody<CreateTemplate>, ApiError>,
) -> Result<impl IntoResponse, ApiError> {
    let who = caller(&s, &headers)?;
    let JsonBody(req) = body?;
    check_pool(req.pool)?;
    let name = req
        .name
        .clone()
        .unwrap_or_else(|| default_template_name(&req.image, &req.resources));
    if !valid_name(&name) {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_name",
            "name: 1-128 characters of [A-Za-z0-9._-], not starting with . or -",
        ));
    }
    let mut check = SandboxSpec::for_image(req.image.clone());
    check.resources = req.resources;
    check.validate().map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_spec",
            e.to_string(),
        )
    })?;
    super::sandboxes::scheduled_spec_check(
        &check,
        s.cfg.allow_local_images,
        &super::policy::api_protected(&s),
    )?;
    let (nodes, existed) = s.raft.read_local(|st| {
        let nodes: Vec<NodeName> = match &req.nodes {
            Some(n) => n.clone(),
            None => st
                .nodes
                .values()
                .filter(|n| n.status == NodeStatus::Ready && !n.cordoned)
                .map(|n| n.name.clone())
                .collect(),
        };
        (
            nodes,
            st.templates
                .contains_key(&scoped(who.tenant.as_ref(), &name)),
        )
    });
    if nodes.is_empty() {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "no_nodes",
            "no ready node to hold the template (name nodes, or register one)",
        ));
    }
    let mut commands = vec![Command::PutTemplate {
        tenant: who.tenant.clone(),
        name: name.clone(),
        image: req.image.clone(),
        resources: req.resources,
        auto: false,
        now_ms: now_ms(),
        nodes: nodes.clone(),
        // No nodes named: on every node, those that join later too.
        everywhere: req.nodes.is_none(),
    }];
    commands.extend(nodes.iter().map(|n| Command::SetPool {
        tenant: who.tenant.clone(),
        template: name.clone(),
        node: n.clone(),
        target: req.pool,
    }));
    // One command per proposal (the proposer groups concurrent ones).
    for c in commands {
        answer(super::commit(&s, c).await?)?;
    }
    let t = shown(&s, who.tenant.as_ref(), &name).await?;
    let status = if existed {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, Json(t)))
}

async fn shown(s: &Shared, tenant: Option<&TenantName>, name: &str) -> Result<Template, ApiError> {
    super::confirmed(s, |st| {
        query::get_template(st, tenant, name).map(|t| to_rest(st, t))
    })
    .await?
    .ok_or_else(|| not_found(name))
}

/// The caller's templates (and the shared ones), with per-node status.
#[utoipa::path(get, path = "/v1/templates", tag = "templates", operation_id = "list_templates",
    responses((status = 200, body = TemplateList), (status = 401, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn list(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
) -> Result<Json<TemplateList>, ApiError> {
    let who = caller(&s, &headers)?;
    let (items, automatic) = super::confirmed(&s, |st| {
        let items = query::list_templates(st, who.tenant.as_ref())
            .filter(|t| !t.auto)
            .map(|t| to_rest(st, t))
            .collect();
        // The nodes' automatic templates: a tenant sees those of images it
        // uses (as for `/v1/images`), an admin all.
        let mine = who
            .tenant
            .as_ref()
            .map(|t| super::images::tenant_images(st, t));
        let automatic = st
            .nodes
            .values()
            .flat_map(|n| {
                n.templates.iter().map(|t| NodeTemplate {
                    node: Some(n.name.clone()),
                    ..t.clone()
                })
            })
            .filter(|t| mine.as_ref().is_none_or(|m| m.contains(t.image.as_str())))
            .map(|mut t| {
                // An automatic template is made after somebody's cold
                // start: a tenant learns the hour, not the moment.
                if who.tenant.is_some() {
                    t.created_at_ms -= t.created_at_ms % AUTOMATIC_CREATED_GRAIN_MS;
                }
                t
            })
            .collect();
        (items, automatic)
    })
    .await?;
    Ok(Json(TemplateList { items, automatic }))
}

/// How finely a tenant sees when an automatic template was made (an
/// hour): it may come from another tenant's run of the same image.
pub const AUTOMATIC_CREATED_GRAIN_MS: u64 = 3_600_000;

/// One template, with where it is creating, ready or failed (and why) and
/// its pool's ready members and target on each node.
#[utoipa::path(get, path = "/v1/templates/{name}", tag = "templates", operation_id = "get_template",
    params(("name" = String, Path)),
    responses((status = 200, body = Template), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn get_one(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Json<Template>, ApiError> {
    let who = caller(&s, &headers)?;
    Ok(Json(shown(&s, who.tenant.as_ref(), &name).await?))
}

/// Size the template's warm pool on every node holding it (0 drains it).
#[utoipa::path(put, path = "/v1/templates/{name}/pool", tag = "templates", operation_id = "resize_pool",
    params(("name" = String, Path)), request_body = ResizePool,
    responses((status = 200, body = Template), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 422, description = "Too large", body = ErrorBody)))]
pub async fn resize(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: Result<JsonBody<ResizePool>, ApiError>,
) -> Result<Json<Template>, ApiError> {
    let who = caller(&s, &headers)?;
    let JsonBody(req) = body?;
    check_pool(req.size)?;
    let nodes = super::confirmed(&s, |st| {
        owned_key(st, &who, &name).map(|k| st.templates[&k].placed.clone())
    })
    .await?
    .ok_or_else(|| not_found(&name))?;
    let commands = nodes
        .into_iter()
        .map(|n| Command::SetPool {
            tenant: who.tenant.clone(),
            template: name.clone(),
            node: n,
            target: req.size,
        })
        .collect::<Vec<_>>();
    for c in commands {
        answer(super::commit(&s, c).await?)?;
    }
    Ok(Json(shown(&s, who.tenant.as_ref(), &name).await?))
}

/// Delete the template: every node drains its pool and removes it. Refused
/// while sandboxes of its image and resources run on a node holding it.
#[utoipa::path(delete, path = "/v1/templates/{name}", tag = "templates", operation_id = "delete_template",
    params(("name" = String, Path)),
    responses((status = 204, description = "Deleted; nodes remove it"), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, description = "In use", body = ErrorBody)))]
pub async fn delete(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    let who = caller(&s, &headers)?;
    if !valid_name(&name) {
        return Err(not_found(&name));
    }
    let r = super::commit(
        &s,
        Command::DeleteTemplate {
            tenant: who.tenant.clone(),
            name: name.clone(),
        },
    )
    .await?;
    match r {
        Response::Rejected(kiln_store::Rejection::NotFound { .. }) => Err(not_found(&name)),
        Response::Rejected(kiln_store::Rejection::Conflict { message }) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "template_in_use",
            message,
        )),
        other => answer(other).map(|()| StatusCode::NO_CONTENT),
    }
}
