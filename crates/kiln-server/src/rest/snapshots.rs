//! `/v1/snapshots` and `/v1/sandboxes/{id}/snapshot|fork`: snapshots taken
//! by the node that runs the sandbox, recorded in the replicated state
//! (tenant, the nodes holding a copy, size), restored by `POST
//! /v1/sandboxes` with `origin: {kind: snapshot}` on a node that holds one.
//!
//! Invariants:
//! - Tenant-scoped like sandboxes: another tenant's snapshot or sandbox is
//!   404 exactly like a missing one, decided before any node is asked.
//! - A snapshot's name is reserved in the state (`PutSnapshot`) before its
//!   node writes it and dropped again if the node fails, so two requests
//!   for one name never both reach a node. On a node it is stored as
//!   `TENANT.NAME` (`kiln_api::rest::node_snapshot_name`): tenants never
//!   collide there.
//! - The server talks to nodes with the node's stream key, as the stream
//!   routes do (`streams::target`).
//! - A fork's new sandboxes are committed before the answer: the node took
//!   the ephemeral snapshot first and holds it until each fork was restored
//!   from it (or `kiln_node::node::FORK_HOLD` passed); the snapshot goes
//!   with its last fork.
//! - Deleting a snapshot is refused (409 `snapshot_in_use`) while
//!   sandboxes restored from it count, by the state machine and by every
//!   holding node.

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use kiln_api::cluster::{NodeName, TenantName};
use kiln_api::rest::{
    CreateSnapshot, ErrorBody, ForkRequest, ForkResult, MAX_FORK_COUNT, NodeSnapshotDone,
    NodeSnapshotRequest, Snapshot, SnapshotHolder, SnapshotList, node_snapshot_name,
};
use kiln_api::sandbox::{Origin, SandboxId, SandboxSpec, valid_name};
use kiln_store::query::{self, ClusterView};
use kiln_store::state::{SnapshotRecord, scoped};
use kiln_store::{Command, Rejection, Response};

use super::body::JsonBody;
use super::sandboxes::{not_found as sandbox_not_found, visible};
use super::{ApiError, caller, rejection};
use crate::scheduler::{self, Pending, Policy, RestoreRefusal};
use crate::server::{Shared, now_ms};

pub fn to_rest(r: &SnapshotRecord) -> Snapshot {
    Snapshot {
        name: r.name.clone(),
        tenant: r.tenant.clone(),
        source: r.source.clone(),
        image: r.image.clone(),
        resources: r.resources,
        created_at_ms: r.created_at_ms,
        holders: r
            .holders
            .iter()
            .filter(|(_, h)| h.ready)
            .map(|(n, h)| SnapshotHolder {
                node: n.clone(),
                size_bytes: h.size_bytes,
            })
            .collect(),
        ephemeral: r.ephemeral,
    }
}

fn shown(name: &str) -> String {
    name.chars().take(64).filter(|c| !c.is_control()).collect()
}

fn snapshot_not_found(name: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("snapshot {:?} does not exist", shown(name)),
    )
}

fn tenant_of(who: &super::Caller) -> Result<TenantName, ApiError> {
    who.tenant.clone().ok_or_else(|| {
        ApiError::new(
            StatusCode::FORBIDDEN,
            "tenant_required",
            "snapshots belong to tenants: use a tenant's token",
        )
    })
}

/// A valid snapshot name for `tenant`, its name on a node, or 400.
fn check_name(tenant: &TenantName, name: &str) -> Result<String, ApiError> {
    let bad = |m: String| ApiError::new(StatusCode::BAD_REQUEST, "invalid_name", m);
    if !valid_name(name) {
        return Err(bad(format!(
            "snapshot name {:?}: use 1-128 characters of [A-Za-z0-9._-], not starting with . or -",
            shown(name)
        )));
    }
    node_snapshot_name(tenant, name).ok_or_else(|| {
        bad(format!(
            "snapshot name {:?}: at most {} characters for tenant {tenant}",
            shown(name),
            127 - tenant.as_str().len()
        ))
    })
}

/// For a restore (`origin: snapshot`): takes the snapshot's image and
/// resources into `spec` and returns the nodes holding a copy; `None` for
/// a create from an image.
pub(super) fn restore_source(
    s: &Shared,
    tenant: &TenantName,
    spec: &mut SandboxSpec,
) -> Result<Option<BTreeSet<NodeName>>, ApiError> {
    let Origin::Snapshot { snapshot } = &spec.origin else {
        return Ok(None);
    };
    check_name(tenant, snapshot)?;
    let rec = s
        .raft
        .read_local(|st| st.snapshots.get(&scoped(Some(tenant), snapshot)).cloned())
        .ok_or_else(|| snapshot_not_found(snapshot))?;
    spec.image = rec.image;
    spec.resources = rec.resources;
    Ok(Some(
        rec.holders
            .into_iter()
            .filter(|(_, h)| h.ready)
            .map(|(n, _)| n)
            .collect(),
    ))
}

/// The node for a restore, or the refusal as an API error.
pub(super) fn place_restore(
    s: &Shared,
    view: &ClusterView,
    pending: &Pending,
    holders: &BTreeSet<NodeName>,
) -> Result<NodeName, ApiError> {
    match scheduler::place_restore(view, pending, holders, Policy::default()) {
        Ok(n) => {
            s.metrics.scheduled("placed");
            Ok(n)
        }
        Err(r) => {
            s.metrics.scheduled(r.code());
            Err(match r {
                RestoreRefusal::NoHolder => ApiError::new(
                    StatusCode::CONFLICT,
                    "no_snapshot_holder",
                    "no registered node holds a copy of the snapshot",
                ),
                RestoreRefusal::Unschedulable(u) => ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "unschedulable",
                    format!("among the nodes holding the snapshot: {u}"),
                )
                .reason(u.code()),
            })
        }
    }
}

/// Asks the sandbox's node to snapshot it (`req`); the node's answer.
async fn node_snapshot(
    s: &Arc<Shared>,
    headers: &HeaderMap,
    id: &str,
    req: &NodeSnapshotRequest,
) -> Result<NodeSnapshotDone, ApiError> {
    // Over TLS pinned to the node's certificate, like the stream routes
    // (the call counts as one of the tenant's stream sessions meanwhile).
    let t = super::streams::target(s, headers, id, "snapshot")?;
    let resp = t
        .client
        .post(&t.url)
        .bearer_auth(&t.key)
        .timeout(std::time::Duration::from_secs(
            super::sandboxes::MAX_WAIT_SECS + 60,
        ))
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(serde_json::to_vec(req).unwrap_or_default())
        .send()
        .await
        .map_err(super::streams::unavailable)?;
    let status = resp.status().as_u16();
    let body = resp.bytes().await.map_err(super::streams::unavailable)?;
    if status == 201 {
        return serde_json::from_slice(&body).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                "bad_gateway",
                format!("the node's answer: {e}"),
            )
        });
    }
    Err(node_error(status, &body))
}

/// A node's refusal as the API's: its code kept for 404/409, anything else
/// a 502 (the client asked for nothing wrong).
fn node_error(status: u16, body: &[u8]) -> ApiError {
    let detail = serde_json::from_slice::<ErrorBody>(body)
        .ok()
        .map(|b| b.error);
    let message = detail.as_ref().map_or_else(
        || format!("the node answered {status}"),
        |d| d.message.clone(),
    );
    match (status, detail) {
        (401, _) => ApiError::new(
            StatusCode::BAD_GATEWAY,
            "node_refused",
            "the node refused the server's stream key (it re-registers with a new one)",
        ),
        (404, _) => ApiError::new(StatusCode::NOT_FOUND, "not_found", message),
        (409, Some(d)) => ApiError::new(StatusCode::CONFLICT, &d.code, message),
        _ => ApiError::new(StatusCode::BAD_GATEWAY, "node_failed", message),
    }
}

/// Snapshot a running sandbox (on its node; processes continue there).
#[utoipa::path(post, path = "/v1/sandboxes/{id}/snapshot", tag = "snapshots", operation_id = "create_snapshot",
    params(("id" = String, Path)), request_body = CreateSnapshot,
    responses((status = 201, description = "Taken and recorded", body = Snapshot),
        (status = 400, description = "Invalid name", body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, description = "The name is taken, or the sandbox is not running (not_running)", body = ErrorBody),
        (status = 502, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn create(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<JsonBody<CreateSnapshot>, ApiError>,
) -> Result<impl IntoResponse, ApiError> {
    let who = caller(&s, &headers)?;
    let tenant = tenant_of(&who)?;
    let JsonBody(req) = body?;
    let name = req
        .name
        .unwrap_or_else(|| format!("snap-{}-{:08x}", now_ms() / 1000, rand::random::<u32>()));
    let local = check_name(&tenant, &name)?;
    let sb = visible(&s, Some(&tenant), &id).await?;
    let r = super::commit(
        &s,
        Command::PutSnapshot {
            tenant: tenant.clone(),
            name: name.clone(),
            source: sb.id.clone(),
            now_ms: now_ms(),
            ephemeral: false,
        },
    )
    .await?;
    if let Response::Rejected(rej) = r {
        return Err(match rej {
            Rejection::NotFound { .. } => sandbox_not_found(&id),
            other => rejection(other),
        });
    }
    let req = NodeSnapshotRequest {
        name: local,
        ephemeral: false,
        hold_for: vec![],
    };
    // The node's work and its record run to the end even if the client
    // goes away meanwhile (a dropped request would leave the name
    // reserved with no holder, or a snapshot on the node nobody records).
    let finish = {
        let (s, headers, sb, tenant, name) = (
            s.clone(),
            headers.clone(),
            sb.clone(),
            tenant.clone(),
            name.clone(),
        );
        tokio::spawn(async move {
            let done = match node_snapshot(&s, &headers, sb.id.as_str(), &req).await {
                Ok(d) => d,
                Err(e) => {
                    // Frees the name; the node wrote nothing under it.
                    let _ = super::commit(
                        &s,
                        Command::DeleteSnapshot {
                            tenant: tenant.clone(),
                            name: name.clone(),
                        },
                    )
                    .await;
                    return Err(e);
                }
            };
            if let Some(node) = sb.node.clone() {
                let r = super::commit(
                    &s,
                    Command::ReportSnapshot {
                        node,
                        tenant: tenant.clone(),
                        name: name.clone(),
                        held: true,
                        size_bytes: done.size_bytes,
                    },
                )
                .await?;
                if let Response::Rejected(rej) = r {
                    return Err(rejection(rej));
                }
            }
            Ok::<(), ApiError>(())
        })
    };
    finish.await.map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("the snapshot task failed: {e}"),
        )
    })??;
    let snap = s
        .raft
        .read_local(|st| st.snapshots.get(&scoped(Some(&tenant), &name)).map(to_rest))
        .ok_or_else(|| snapshot_not_found(&name))?;
    Ok((StatusCode::CREATED, Json(snap)))
}

/// The caller's snapshots, by name.
#[utoipa::path(get, path = "/v1/snapshots", tag = "snapshots", operation_id = "list_snapshots",
    responses((status = 200, body = SnapshotList), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn list(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
) -> Result<Json<SnapshotList>, ApiError> {
    let who = caller(&s, &headers)?;
    let tenant = tenant_of(&who)?;
    let items = super::confirmed(&s, |st| {
        query::list_snapshots(st, &tenant).map(to_rest).collect()
    })
    .await?;
    Ok(Json(SnapshotList { items }))
}

async fn visible_snapshot(
    s: &Shared,
    tenant: &TenantName,
    name: &str,
) -> Result<Snapshot, ApiError> {
    check_name(tenant, name)?;
    super::confirmed(s, |st| {
        st.snapshots.get(&scoped(Some(tenant), name)).map(to_rest)
    })
    .await?
    .ok_or_else(|| snapshot_not_found(name))
}

/// One snapshot.
#[utoipa::path(get, path = "/v1/snapshots/{name}", tag = "snapshots", operation_id = "get_snapshot", params(("name" = String, Path)),
    responses((status = 200, body = Snapshot), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody)))]
pub async fn get_one(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Json<Snapshot>, ApiError> {
    let who = caller(&s, &headers)?;
    let tenant = tenant_of(&who)?;
    Ok(Json(visible_snapshot(&s, &tenant, &name).await?))
}

/// Delete a snapshot: removed from every node holding it, then forgotten.
#[utoipa::path(delete, path = "/v1/snapshots/{name}", tag = "snapshots", operation_id = "delete_snapshot", params(("name" = String, Path)),
    responses((status = 200, description = "Deleted (the snapshot as it was)", body = Snapshot),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, description = "Sandboxes restored from it still run (snapshot_in_use)", body = ErrorBody),
        (status = 502, body = ErrorBody)))]
pub async fn delete(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Json<Snapshot>, ApiError> {
    let who = caller(&s, &headers)?;
    let tenant = tenant_of(&who)?;
    let snap = visible_snapshot(&s, &tenant, &name).await?;
    let local = check_name(&tenant, &name)?;
    let in_use = |users: Vec<SandboxId>| {
        let ids: Vec<String> = users.iter().take(8).map(|i| i.to_string()).collect();
        ApiError::new(
            StatusCode::CONFLICT,
            "snapshot_in_use",
            format!(
                "snapshot {name:?} is in use by sandboxes restored from it: {}; remove them first",
                ids.join(", ")
            ),
        )
    };
    let users = s
        .raft
        .read_local(|st| query::snapshot_users(st, &tenant, &name));
    if !users.is_empty() {
        return Err(in_use(users));
    }
    for h in &snap.holders {
        let target = s.raft.read_local(|st| {
            st.nodes.get(&h.node).and_then(|n| {
                n.stream_key
                    .clone()
                    .zip(n.stream_cert_sha256.clone())
                    .map(|(k, c)| (n.address.clone(), k, c))
            })
        });
        let Some((address, key, cert)) =
            target.filter(|(a, _, _)| crate::grpc::valid_node_address(a))
        else {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "node_unavailable",
                format!(
                    "node {} that holds the snapshot serves no endpoints",
                    h.node
                ),
            )
            .retry(5));
        };
        let resp = super::streams::client(&cert)?
            .delete(format!("https://{address}/node/v1/snapshots/{local}"))
            .bearer_auth(key)
            .timeout(std::time::Duration::from_secs(60))
            .send()
            .await
            .map_err(super::streams::unavailable)?;
        let status = resp.status().as_u16();
        if status == 204 || status == 404 {
            let _ = super::commit(
                &s,
                Command::ReportSnapshot {
                    node: h.node.clone(),
                    tenant: tenant.clone(),
                    name: name.clone(),
                    held: false,
                    size_bytes: 0,
                },
            )
            .await?;
            continue;
        }
        let body = resp.bytes().await.unwrap_or_default();
        return Err(node_error(status, &body));
    }
    match super::commit(
        &s,
        Command::DeleteSnapshot {
            tenant: tenant.clone(),
            name: name.clone(),
        },
    )
    .await?
    {
        Response::Rejected(Rejection::Conflict { .. }) => Err(in_use(
            s.raft
                .read_local(|st| query::snapshot_users(st, &tenant, &name)),
        )),
        Response::Rejected(Rejection::NotFound { .. }) => Err(snapshot_not_found(&name)),
        Response::Rejected(other) => Err(rejection(other)),
        _ => Ok(Json(snap)),
    }
}

/// `count` copies of a running sandbox, on its node: one ephemeral
/// snapshot, `count` restores. The new sandboxes are committed before the
/// answer and report like any sandbox; the snapshot goes with the last.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/fork", tag = "snapshots", operation_id = "fork_sandbox",
    params(("id" = String, Path)), request_body = ForkRequest,
    responses((status = 201, body = ForkResult),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 409, description = "The sandbox is neither running nor paused (not_running)", body = ErrorBody),
        (status = 422, description = "count out of range (invalid_count), or no room on the source's node (unschedulable)", body = ErrorBody),
        (status = 429, description = "Quota exceeded (Retry-After)", body = ErrorBody),
        (status = 502, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn fork(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<JsonBody<ForkRequest>, ApiError>,
) -> Result<impl IntoResponse, ApiError> {
    let who = caller(&s, &headers)?;
    let tenant = tenant_of(&who)?;
    let JsonBody(req) = body?;
    if req.count == 0 || req.count > MAX_FORK_COUNT {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_count",
            format!("count: 1 to {MAX_FORK_COUNT}"),
        ));
    }
    let src = visible(&s, Some(&tenant), &id).await?;
    let node = src.node.clone().ok_or_else(|| {
        ApiError::new(
            StatusCode::CONFLICT,
            "not_placed",
            "the sandbox has no node yet",
        )
    })?;
    if !matches!(
        src.state,
        kiln_api::sandbox::SandboxState::Running { .. }
            | kiln_api::sandbox::SandboxState::Paused { .. }
    ) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_running",
            format!("sandbox {} is not running ({})", src.id, src.state.label()),
        ));
    }
    // All forks run on the source's node: refused before a snapshot is
    // taken when they cannot fit there (`apply` checks again).
    let room = s.raft.read_local(|st| {
        let n = st.nodes.get(&node)?;
        let used = st.idx.allocated.get(&node).copied().unwrap_or_default();
        let r = &src.spec.resources;
        let k = u64::from(req.count);
        Some(
            u64::from(used.cpus) + k * u64::from(r.cpus) <= u64::from(n.capacity.cpus)
                && used.memory_mib + k * u64::from(r.memory_mib) <= n.capacity.memory_mib
                && used.disk_mib + k * u64::from(r.disk_mib) <= n.capacity.disk_mib,
        )
    });
    if room != Some(true) {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "unschedulable",
            format!(
                "node {node} has no room for {} more sandboxes of {} vCPU, {} MiB memory, {} MiB disk",
                req.count,
                src.spec.resources.cpus,
                src.spec.resources.memory_mib,
                src.spec.resources.disk_mib
            ),
        )
        .reason("insufficient"));
    }
    let fork_name = format!("fork-{}-{:08x}", now_ms() / 1000, rand::random::<u32>());
    let local = check_name(&tenant, &fork_name)?;
    let ids: Vec<SandboxId> = (0..req.count)
        .map(|_| SandboxId::from_random(rand::random()))
        .collect();
    // Recorded first (restores name a recorded snapshot), ephemeral: the
    // record goes with the last fork.
    let r = super::commit(
        &s,
        Command::PutSnapshot {
            tenant: tenant.clone(),
            name: fork_name.clone(),
            source: src.id.clone(),
            now_ms: now_ms(),
            ephemeral: true,
        },
    )
    .await?;
    if let Response::Rejected(rej) = r {
        return Err(rejection(rej));
    }
    let forget = || async {
        let _ = super::commit(
            &s,
            Command::DeleteSnapshot {
                tenant: tenant.clone(),
                name: fork_name.clone(),
            },
        )
        .await;
    };
    let done = node_snapshot(
        &s,
        &headers,
        src.id.as_str(),
        &NodeSnapshotRequest {
            name: local,
            ephemeral: true,
            hold_for: ids.clone(),
        },
    )
    .await;
    let done = match done {
        Ok(d) => d,
        Err(e) => {
            forget().await;
            return Err(e);
        }
    };
    let r = super::commit(
        &s,
        Command::ReportSnapshot {
            node: node.clone(),
            tenant: tenant.clone(),
            name: fork_name.clone(),
            held: true,
            size_bytes: done.size_bytes,
        },
    )
    .await?;
    if let Response::Rejected(rej) = r {
        return Err(rejection(rej));
    }
    let mut spec = src.spec.clone();
    spec.origin = Origin::Snapshot {
        snapshot: fork_name.clone(),
    };
    spec.auto_remove = false;
    let writes = ids.iter().map(|fid| {
        super::commit(
            &s,
            Command::CreateSandbox {
                id: fid.clone(),
                tenant: tenant.clone(),
                spec: spec.clone(),
                idempotency_key: None,
                node: Some(node.clone()),
                now_ms: now_ms(),
            },
        )
    });
    let mut made = vec![];
    let mut first_err = None;
    for r in futures::future::join_all(writes).await {
        match r {
            Ok(Response::SandboxCreated { id, .. }) => made.push(id),
            Ok(Response::Rejected(rej)) => {
                first_err.get_or_insert(rejection(rej));
            }
            Ok(other) => {
                first_err.get_or_insert(ApiError::unavailable(format!(
                    "unexpected answer {other:?}"
                )));
            }
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    if made.is_empty()
        && let Some(e) = first_err
    {
        // Nothing uses the record; the node's copy goes when its hold
        // lapses (`kiln_node::node::FORK_HOLD`).
        forget().await;
        return Err(e);
    }
    Ok((
        StatusCode::CREATED,
        Json(ForkResult {
            source: src.id,
            ids: made,
        }),
    ))
}
