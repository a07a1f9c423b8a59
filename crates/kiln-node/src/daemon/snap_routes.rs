//! The node's snapshot endpoints, beside the stream endpoints and behind
//! the same key (`streams::auth`); only the server calls them:
//! - `POST /node/v1/sandboxes/{id}/snapshot` ([`NodeSnapshotRequest`]):
//!   snapshot an owned, running sandbox under the node-local name the
//!   server chose (`TENANT.NAME`, or a fork's ephemeral name); 201
//!   [`NodeSnapshotDone`] with its size on disk.
//! - `DELETE /node/v1/snapshots/{name}`: remove it; 409 `snapshot_in_use`
//!   while sandboxes restored from it run.
//!
//! Invariants: names and bodies are validated before anything is touched;
//! a sandbox this node does not own for the control plane is 404 like the
//! stream routes; errors are `ErrorBody` with a machine-readable code.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, post};
use kiln_api::rest::{MAX_FORK_COUNT, NodeSnapshotDone, NodeSnapshotRequest};

use super::streams::{Ctx, err, owned};
use crate::node::{SandboxOpError, SnapshotOpError};
use crate::snapshot::{CreateSnapshotError, RemoveSnapshotError};

/// The snapshot routes (state: the stream endpoints' context).
pub fn routes() -> Router<Arc<Ctx>> {
    Router::new()
        .route("/node/v1/sandboxes/{id}/snapshot", post(snapshot))
        .route("/node/v1/snapshots/{name}", delete(remove))
}

/// The largest request body of these routes.
const MAX_REQUEST: usize = 16 * 1024;

async fn snapshot(
    State(cx): State<Arc<Ctx>>,
    UrlPath(id): UrlPath<String>,
    body: Bytes,
) -> Response {
    if body.len() > MAX_REQUEST {
        return err(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            "the request is too large",
        );
    }
    let req: NodeSnapshotRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return err(StatusCode::BAD_REQUEST, "invalid_body", e.to_string()),
    };
    if !kiln_api::sandbox::valid_name(&req.name) {
        return err(
            StatusCode::BAD_REQUEST,
            "invalid_name",
            "invalid snapshot name",
        );
    }
    if req.hold_for.len() > MAX_FORK_COUNT as usize || (!req.ephemeral && !req.hold_for.is_empty())
    {
        return err(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            format!("hold_for: at most {MAX_FORK_COUNT} IDs, for an ephemeral snapshot only"),
        );
    }
    let sid = match owned(&cx, &id) {
        Ok(s) => s,
        Err(r) => return r,
    };
    let hold_for = req.hold_for.iter().map(|i| i.to_string()).collect();
    match cx
        .node
        .snapshot_for_server(sid.as_str(), &req.name, req.ephemeral, hold_for)
        .await
    {
        Ok(size_bytes) => (
            StatusCode::CREATED,
            axum::Json(NodeSnapshotDone {
                name: req.name,
                size_bytes,
            }),
        )
            .into_response(),
        Err(e) => snapshot_error(&e),
    }
}

fn snapshot_error(e: &SnapshotOpError) -> Response {
    let msg = crate::error_chain(e);
    match e {
        SnapshotOpError::Create(CreateSnapshotError::Exists(_)) => {
            err(StatusCode::CONFLICT, "already_exists", msg)
        }
        SnapshotOpError::Sandbox(SandboxOpError::Store(crate::store::StoreError::NotFound(_))) => {
            err(StatusCode::NOT_FOUND, "not_found", msg)
        }
        SnapshotOpError::Sandbox(_) | SnapshotOpError::Refused { .. } => {
            err(StatusCode::CONFLICT, "not_running", msg)
        }
        _ => err(StatusCode::INTERNAL_SERVER_ERROR, "snapshot_failed", msg),
    }
}

async fn remove(State(cx): State<Arc<Ctx>>, UrlPath(name): UrlPath<String>) -> Response {
    if !kiln_api::sandbox::valid_name(&name) {
        return err(
            StatusCode::BAD_REQUEST,
            "invalid_name",
            "invalid snapshot name",
        );
    }
    let node = cx.node.clone();
    let r = tokio::task::spawn_blocking(move || node.remove_snapshot(&name)).await;
    match r {
        Ok(Ok(())) => StatusCode::NO_CONTENT.into_response(),
        Ok(Err(SnapshotOpError::Remove(RemoveSnapshotError::NotFound(n)))) => err(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no snapshot named {n:?} on this node"),
        ),
        Ok(Err(e @ SnapshotOpError::Remove(RemoveSnapshotError::InUse { .. }))) => {
            err(StatusCode::CONFLICT, "snapshot_in_use", e.to_string())
        }
        Ok(Err(e)) => err(
            StatusCode::INTERNAL_SERVER_ERROR,
            "remove_failed",
            crate::error_chain(&e),
        ),
        Err(e) => err(
            StatusCode::INTERNAL_SERVER_ERROR,
            "remove_failed",
            e.to_string(),
        ),
    }
}
