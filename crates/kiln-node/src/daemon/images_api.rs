//! The node's image routes (`/node/v1/images/pull|remove`), served beside
//! the stream endpoints and behind the same key: the server relays
//! `POST /v1/images/pull` and `DELETE /v1/images/{ref}` here. A pull always
//! resolves the reference again (`kiln images pull`); a removal follows
//! `kiln images rm` without `-f`: refused (409 `image_in_use`) while a
//! sandbox, snapshot or template of this node uses the image; automatic
//! templates, a cache, go with it.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use kiln_api::rest::{ErrorBody, ErrorDetail};
use kiln_api::templates::{NodeImageAnswer, NodeImageRequest};

use super::streams::Ctx;
use crate::node::{ImageOpError, PullPolicy, RemoveVerdict, decide_image_removal};

/// The longest reference accepted.
const MAX_REFERENCE: usize = 512;

pub(crate) fn routes() -> Router<Arc<Ctx>> {
    Router::new()
        .route("/node/v1/images/pull", post(pull))
        .route("/node/v1/images/remove", post(remove))
}

fn err(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    (
        status,
        axum::Json(ErrorBody {
            error: ErrorDetail {
                code: code.to_owned(),
                message: message.into(),
                reason: None,
            },
        }),
    )
        .into_response()
}

/// The request's reference, or the 4xx.
#[allow(clippy::result_large_err)]
fn reference(body: &[u8]) -> Result<String, Response> {
    let req: NodeImageRequest = serde_json::from_slice(body)
        .map_err(|e| err(StatusCode::BAD_REQUEST, "malformed_json", e.to_string()))?;
    let r = req.reference;
    if r.trim().is_empty() || r.len() > MAX_REFERENCE || r.chars().any(char::is_control) {
        return Err(err(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_reference",
            "ref: 1-512 characters, no control characters",
        ));
    }
    Ok(r)
}

/// How a failed pull is answered: what the client can fix is a 4xx.
pub fn pull_error(e: &ImageOpError) -> (StatusCode, &'static str) {
    use kiln_image::PullImageError as P;
    match e {
        ImageOpError::Reference(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_reference"),
        ImageOpError::Pull { source, .. } => match source.as_ref() {
            P::NotFound { .. } | P::Unauthorized { .. } | P::Layout { .. } | P::Archive { .. } => {
                (StatusCode::NOT_FOUND, "image_not_found")
            }
            P::Unreachable { .. } => (StatusCode::BAD_GATEWAY, "registry_unreachable"),
            _ => (StatusCode::UNPROCESSABLE_ENTITY, "image_invalid"),
        },
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "node_error"),
    }
}

async fn pull(State(cx): State<Arc<Ctx>>, body: axum::body::Bytes) -> Response {
    let r = match reference(&body) {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let pulled = cx
        .node
        .pull(
            &r,
            &cx.insecure_registries,
            PullPolicy::Always,
            &kiln_image::NoProgress,
        )
        .await;
    match pulled {
        Ok((img, cached)) => {
            tracing::info!(reference = %r, digest = %img.digest, "image pulled for the server");
            axum::Json(NodeImageAnswer {
                digest: img.digest,
                changed: !cached,
            })
            .into_response()
        }
        Err(e) => {
            let (status, code) = pull_error(&e);
            err(status, code, crate::error_chain(&e))
        }
    }
}

async fn remove(State(cx): State<Arc<Ctx>>, body: axum::body::Bytes) -> Response {
    let r = match reference(&body) {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let node = cx.node.clone();
    let (plan, users) = match node.image_removal(&r) {
        Ok(p) => p,
        Err(ImageOpError::Remove(e)) => {
            return err(StatusCode::NOT_FOUND, "not_found", e.to_string());
        }
        Err(e) => return err(StatusCode::NOT_FOUND, "not_found", crate::error_chain(&e)),
    };
    match decide_image_removal(&plan, &users, false) {
        RemoveVerdict::Refuse(why) => err(StatusCode::CONFLICT, "image_in_use", why),
        RemoveVerdict::Untag { kept_for } => err(
            StatusCode::CONFLICT,
            "image_in_use",
            format!("kept for {kept_for}"),
        ),
        RemoveVerdict::Remove => {
            if plan.deletes_image {
                for t in node.evict_automatic_of_image(&plan.digest).await {
                    tracing::info!(template = %t, "evicted automatic template with its image");
                }
            }
            let removed = node
                .images()
                .and_then(|i| i.remove(&r).map_err(ImageOpError::from));
            match removed {
                Ok(_) => axum::Json(NodeImageAnswer {
                    digest: plan.digest,
                    changed: true,
                })
                .into_response(),
                Err(e) => err(StatusCode::NOT_FOUND, "not_found", crate::error_chain(&e)),
            }
        }
    }
}
