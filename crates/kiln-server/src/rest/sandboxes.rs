//! `/v1/sandboxes`: create (scheduled on the leader, idempotent with an
//! `Idempotency-Key`), get, list, delete, stop, pause, resume, wait.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use kiln_api::cluster::{DesiredState, TenantName};
use kiln_api::rest::{ErrorBody, Sandbox, SandboxList, WaitResult};
use kiln_api::sandbox::{SandboxId, SandboxSpec};
use kiln_store::query::{self, ListSandboxes, StateFilter};
use kiln_store::state::SandboxRecord;
use kiln_store::{Command, Rejection, Response};

use super::body::JsonBody;
use super::{ApiError, caller, rejection};
use crate::scheduler::{self, Outcome, Pending, Policy};
use crate::server::{Shared, now_ms};

/// The longest `wait` long-poll, seconds.
pub const MAX_WAIT_SECS: u64 = 60;
/// How often a create is placed again after `apply` refused the node.
const PLACE_ATTEMPTS: usize = 5;

pub fn to_rest(r: &SandboxRecord) -> Sandbox {
    Sandbox {
        id: r.id.clone(),
        tenant: r.tenant.clone(),
        spec: r.spec.clone(),
        desired: r.desired,
        state: r.observed.clone(),
        node: r.node.clone(),
        generation: r.generation,
        observed_generation: r.observed_generation,
        created_at_ms: r.created_at_ms,
        start: r.start.clone(),
    }
}

pub(super) fn not_found(id: &str) -> ApiError {
    let shown: String = id.chars().take(64).filter(|c| !c.is_control()).collect();
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("sandbox {shown:?} does not exist"),
    )
}

/// A sandbox the caller may see (another tenant's is 404 like a missing one).
pub(super) async fn visible(
    s: &Shared,
    tenant: Option<&TenantName>,
    id: &str,
) -> Result<Sandbox, ApiError> {
    let sid = SandboxId::try_from(id.to_owned()).map_err(|_| not_found(id))?;
    super::confirmed(s, |st| query::get_sandbox(st, tenant, &sid).map(to_rest))
        .await?
        .ok_or_else(|| not_found(id))
}

fn idempotency_key(h: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(v) = h.get("idempotency-key") else {
        return Ok(None);
    };
    let bad = || {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_idempotency_key",
            "Idempotency-Key: 1-128 printable ASCII characters",
        )
    };
    let s = v.to_str().map_err(|_| bad())?;
    if s.is_empty() || s.len() > 128 || !s.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(bad());
    }
    Ok(Some(s.to_owned()))
}

/// Create a sandbox: validated, placed by the scheduler, committed.
#[utoipa::path(post, path = "/v1/sandboxes", tag = "sandboxes", request_body = SandboxSpec,
    params(("Idempotency-Key" = Option<String>, Header, description = "Retries with the same key return the same sandbox")),
    responses(
        (status = 201, description = "Created", body = Sandbox),
        (status = 200, description = "Already created with this Idempotency-Key", body = Sandbox),
        (status = 400, description = "Malformed JSON, unknown field, bad Idempotency-Key", body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, description = "origin: the snapshot does not exist (or is another tenant's)", body = ErrorBody),
        (status = 409, description = "Idempotency key used for another spec; or no node holds the snapshot to restore (no_snapshot_holder)", body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 415, body = ErrorBody),
        (status = 422, description = "Invalid spec, or unschedulable (reason: the scheduler's code)", body = ErrorBody),
        (status = 429, description = "Quota exceeded (Retry-After)", body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub async fn create(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Result<JsonBody<SandboxSpec>, ApiError>,
) -> Result<impl IntoResponse, ApiError> {
    let started = Instant::now();
    let who = caller(&s, &headers)?;
    let tenant = who.tenant.clone().ok_or_else(|| {
        ApiError::new(
            StatusCode::FORBIDDEN,
            "tenant_required",
            "sandboxes belong to tenants: use a tenant's token",
        )
    })?;
    let key = idempotency_key(&headers)?;
    let JsonBody(mut spec) = body?;
    // A restore: the snapshot's image and resources, placed on a node that
    // holds a copy (another tenant's snapshot is 404 like a missing one).
    let holders = super::snapshots::restore_source(&s, &tenant, &mut spec)?;
    spec.validate().map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_spec",
            e.to_string(),
        )
    })?;
    scheduled_spec_check(
        &spec,
        s.cfg.allow_local_images,
        &super::policy::api_protected(&s),
    )?;
    let id = SandboxId::from_random(rand::random());
    let mut attempt = 0;
    let resp = loop {
        attempt += 1;
        let view = s.raft.read_local(query::cluster_view);
        let pending = [Pending {
            id: id.clone(),
            generation: 0,
            spec: spec.clone(),
            group: None,
        }];
        if let Some(holders) = &holders {
            let node = super::snapshots::place_restore(&s, &view, &pending[0], holders)?;
            let r = super::commit(
                &s,
                Command::CreateSandbox {
                    id: id.clone(),
                    tenant: tenant.clone(),
                    spec: spec.clone(),
                    idempotency_key: key.clone(),
                    node: Some(node),
                    now_ms: now_ms(),
                },
            )
            .await?;
            match r {
                Response::Rejected(Rejection::Conflict { .. }) if attempt < PLACE_ATTEMPTS => {
                    continue;
                }
                Response::Rejected(rej) => return Err(rejection(rej)),
                other => break other,
            }
        }
        let decision = scheduler::place(&view, &pending, Policy::default());
        let node = match decision.into_iter().next().map(|d| d.outcome) {
            Some(Outcome::Placed { node, .. }) => {
                s.metrics.scheduled("placed");
                node
            }
            Some(Outcome::Unschedulable { reason }) => {
                s.metrics.scheduled(reason.code());
                return Err(ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "unschedulable",
                    reason.to_string(),
                )
                .reason(reason.code()));
            }
            None => return Err(ApiError::unavailable("the scheduler gave no decision")),
        };
        // A warm-pool member of the tenant's template on that node, if any.
        let member = s
            .raft
            .read_local(|st| super::templates::pool_member(st, &tenant, &spec, &node));
        let took_member = member.is_some();
        let id = member.unwrap_or_else(|| id.clone());
        let r = super::commit(
            &s,
            Command::CreateSandbox {
                id: id.clone(),
                tenant: tenant.clone(),
                spec: spec.clone(),
                idempotency_key: key.clone(),
                node: Some(node),
                now_ms: now_ms(),
            },
        )
        .await?;
        match r {
            Response::Rejected(Rejection::Conflict { .. }) if attempt < PLACE_ATTEMPTS => continue,
            // Another create took the same pool member first.
            Response::Rejected(Rejection::AlreadyExists { .. })
                if took_member && attempt < PLACE_ATTEMPTS =>
            {
                continue;
            }
            Response::Rejected(rej) => return Err(rejection(rej)),
            other => break other,
        }
    };
    let Response::SandboxCreated { id, created, .. } = resp else {
        return Err(ApiError::unavailable(format!("unexpected answer {resp:?}")));
    };
    let sb = s
        .raft
        .read_local(|st| st.sandboxes.get(&id).map(to_rest))
        .ok_or_else(|| not_found(id.as_str()))?;
    s.metrics.create_latency(started.elapsed().as_secs_f64());
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(sb)))
}

/// Parsed `GET /v1/sandboxes` query.
fn list_query(raw: Option<&str>, tenant: Option<TenantName>) -> Result<ListSandboxes, ApiError> {
    let bad = |m: String| ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", m);
    let mut q = ListSandboxes {
        tenant,
        ..Default::default()
    };
    for (k, v) in form_urlencoded::parse(raw.unwrap_or("").as_bytes()) {
        match &*k {
            "state" => {
                q.state = Some(
                    serde_json::from_value::<StateFilter>(serde_json::Value::String(v.to_string()))
                        .map_err(|_| {
                            bad(format!(
                                "state: {v:?} is not creating|pooled|running|paused|exited|failed"
                            ))
                        })?,
                );
            }
            "desired" => {
                q.desired = Some(
                    serde_json::from_value::<DesiredState>(serde_json::Value::String(
                        v.to_string(),
                    ))
                    .map_err(|_| {
                        bad(format!(
                            "desired: {v:?} is not running|paused|stopped|deleted"
                        ))
                    })?,
                );
            }
            "label" => {
                let (lk, lv) = v
                    .split_once('=')
                    .ok_or_else(|| bad(format!("label: {v:?} is not KEY=VALUE")))?;
                if q.labels.len() >= 64 {
                    return Err(bad("label: at most 64 filters".into()));
                }
                q.labels.insert(lk.to_owned(), lv.to_owned());
            }
            "limit" => {
                q.limit = v
                    .parse::<usize>()
                    .ok()
                    .filter(|l| (1..=query::MAX_PAGE).contains(l))
                    .ok_or_else(|| bad(format!("limit: 1-{}", query::MAX_PAGE)))?;
            }
            "cursor" => q.cursor = Some(v.to_string()),
            other => {
                let shown: String = other.chars().take(64).collect();
                return Err(bad(format!("unknown query parameter {shown:?}")));
            }
        }
    }
    Ok(q)
}

/// List sandboxes (a tenant's own; an admin's: everyone's).
#[utoipa::path(get, path = "/v1/sandboxes", tag = "sandboxes",
    params(
        ("state" = Option<String>, Query, description = "creating|pooled|running|paused|exited|failed"),
        ("desired" = Option<String>, Query, description = "running|paused|stopped|deleted"),
        ("label" = Option<String>, Query, description = "KEY=VALUE; repeat for several (all must match)"),
        ("limit" = Option<u32>, Query, description = "1-1000 (default 1000)"),
        ("cursor" = Option<String>, Query, description = "`next` of the previous page")),
    responses((status = 200, body = SandboxList), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
pub async fn list(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Json<SandboxList>, ApiError> {
    let who = caller(&s, &headers)?;
    let q = list_query(raw.as_deref(), who.tenant.clone())?;
    let page = super::confirmed(&s, |st| query::list_sandboxes(st, &q))
        .await?
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_cursor", e.to_string()))?;
    Ok(Json(SandboxList {
        items: page.items.iter().map(to_rest).collect(),
        next: page.next,
    }))
}

/// One sandbox.
#[utoipa::path(get, path = "/v1/sandboxes/{id}", tag = "sandboxes",
    params(("id" = String, Path)),
    responses((status = 200, body = Sandbox), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn get_one(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Sandbox>, ApiError> {
    let who = caller(&s, &headers)?;
    Ok(Json(visible(&s, who.tenant.as_ref(), &id).await?))
}

async fn set_desired(
    s: &Shared,
    headers: &HeaderMap,
    id: &str,
    desired: DesiredState,
    stop_grace_secs: Option<u64>,
) -> Result<Json<Sandbox>, ApiError> {
    let who = caller(s, headers)?;
    let sid = SandboxId::try_from(id.to_owned()).map_err(|_| not_found(id))?;
    let r = super::commit(
        s,
        Command::SetDesired {
            tenant: who.tenant.clone(),
            id: sid.clone(),
            desired,
            stop_grace_secs,
        },
    )
    .await?;
    if let Response::Rejected(rej) = r {
        return Err(match rej {
            Rejection::NotFound { .. } => not_found(id),
            other => rejection(other),
        });
    }
    s.raft
        .read_local(|st| query::get_sandbox(st, who.tenant.as_ref(), &sid).map(to_rest))
        .map(Json)
        .ok_or_else(|| not_found(id))
}

/// Delete a sandbox (its node stops and removes it; the record goes after).
#[utoipa::path(delete, path = "/v1/sandboxes/{id}", tag = "sandboxes", params(("id" = String, Path)),
    responses((status = 200, body = Sandbox), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn delete(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Sandbox>, ApiError> {
    set_desired(&s, &headers, &id, DesiredState::Deleted, None).await
}

/// Stop a sandbox: SIGTERM to its command, SIGKILL after `timeout_secs`
/// (0-3600; default: the node's grace time, 10 s).
#[utoipa::path(post, path = "/v1/sandboxes/{id}/stop", tag = "sandboxes",
    params(("id" = String, Path), ("timeout_secs" = Option<u64>, Query)),
    responses((status = 200, body = Sandbox), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn stop(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Json<Sandbox>, ApiError> {
    let max = kiln_store::apply::MAX_STOP_GRACE_SECS;
    let mut grace = None;
    for (k, v) in form_urlencoded::parse(raw.unwrap_or_default().as_bytes()) {
        match &*k {
            "timeout_secs" => {
                grace = Some(v.parse::<u64>().ok().filter(|t| *t <= max).ok_or_else(|| {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "invalid_query",
                        format!("timeout_secs: 0-{max}"),
                    )
                })?);
            }
            _ => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_query",
                    "unknown query parameter",
                ));
            }
        }
    }
    set_desired(&s, &headers, &id, DesiredState::Stopped, grace).await
}

/// Pause a sandbox.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/pause", tag = "sandboxes", params(("id" = String, Path)),
    responses((status = 200, body = Sandbox), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn pause(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Sandbox>, ApiError> {
    set_desired(&s, &headers, &id, DesiredState::Paused, None).await
}

/// Resume a paused sandbox.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/resume", tag = "sandboxes", params(("id" = String, Path)),
    responses((status = 200, body = Sandbox), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn resume(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Sandbox>, ApiError> {
    set_desired(&s, &headers, &id, DesiredState::Running, None).await
}

/// Long-poll until the sandbox has finished or `timeout_secs` (default
/// 30, at most 60) ran out.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/wait", tag = "sandboxes",
    params(("id" = String, Path), ("timeout_secs" = Option<u64>, Query)),
    responses((status = 200, body = WaitResult), (status = 404, body = ErrorBody)))]
pub async fn wait(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Json<WaitResult>, ApiError> {
    let who = caller(&s, &headers)?;
    let mut timeout = 30;
    for (k, v) in form_urlencoded::parse(raw.unwrap_or_default().as_bytes()) {
        match &*k {
            "timeout_secs" => {
                timeout = v
                    .parse::<u64>()
                    .ok()
                    .filter(|t| *t <= MAX_WAIT_SECS)
                    .ok_or_else(|| {
                        ApiError::new(
                            StatusCode::BAD_REQUEST,
                            "invalid_query",
                            format!("timeout_secs: 0-{MAX_WAIT_SECS}"),
                        )
                    })?;
            }
            _ => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_query",
                    "unknown query parameter",
                ));
            }
        }
    }
    let mut sb = visible(&s, who.tenant.as_ref(), &id).await?;
    let sid = sb.id.clone();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
    let mut applied = s.raft.subscribe_applied();
    loop {
        if sb.state.is_finished() {
            return Ok(Json(WaitResult {
                finished: true,
                sandbox: sb,
            }));
        }
        if !matches!(
            tokio::time::timeout_at(deadline, applied.changed()).await,
            Ok(Ok(()))
        ) {
            return Ok(Json(WaitResult {
                finished: false,
                sandbox: sb,
            }));
        }
        match s
            .raft
            .read_local(|st| query::get_sandbox(st, who.tenant.as_ref(), &sid).map(to_rest))
        {
            Some(now) => sb = now,
            // Forgotten after deletion: report the last state seen.
            None => {
                return Ok(Json(WaitResult {
                    finished: sb.state.is_finished(),
                    sandbox: sb,
                }));
            }
        }
    }
}

/// What a spec may not ask of a node through the API, although the node's
/// own CLI allows it: an image named by a path on the node's filesystem
/// (`oci:DIR`, `docker-archive:FILE`: the API's caller has no business
/// reading the node's files, and a scheduled spec must mean the same on
/// every node), and host ports (`publish`: a host-level resource the
/// scheduler does not allocate yet, and that could capture the host's own
/// connections).
pub(super) fn scheduled_spec_check(
    spec: &SandboxSpec,
    allow_local_images: bool,
    protected: &[ipnet::Ipv4Net],
) -> Result<(), ApiError> {
    let image = spec.image.trim();
    let lower = image.to_ascii_lowercase();
    if !allow_local_images
        && (lower.starts_with("oci:")
            || lower.starts_with("docker-archive:")
            || image.starts_with('/')
            || image.starts_with('.'))
    {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_spec",
            "image: only registry references (REGISTRY/REPO[:TAG][@DIGEST]) can be scheduled; \
             oci: and docker-archive: name files on a node (kiln server --allow-local-images)",
        ));
    }
    if let kiln_api::sandbox::NetworkSpec::Default {
        publish,
        policy,
        policy_default,
        rules,
    } = &spec.network
    {
        if !publish.is_empty() {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_spec",
                "network.publish: publishing host ports is not available through the API yet",
            ));
        }
        super::policy::check_policy(policy.as_deref(), *policy_default, rules, protected).map_err(
            |e| {
                ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid_spec",
                    format!("network.{e}"),
                )
            },
        )?;
    }
    Ok(())
}
