//! `/v1/images`: the nodes' image caches. Listing reads what each node's
//! heartbeat reported; pull and removal are relayed synchronously to the
//! nodes' own image routes (`/node/v1/images/...`, authenticated with each
//! node's stream key, like the stream routes).
//!
//! Who may do what (images are host caches, shared by every tenant on a
//! node): any token lists and pulls (a pull is what a create does anyway);
//! removal needs an admin token, and each node refuses it while something
//! there uses the image (its `image_removal` check: sandboxes, snapshots,
//! templates), answered 409 `image_in_use` with the node's reason.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use kiln_api::cluster::{NodeName, NodeStatus};
use kiln_api::rest::ErrorBody;
use kiln_api::templates::{
    Image, ImageList, ImageOnNode, ImageResult, NodeImageRequest, PullImage,
};

use super::body::JsonBody;
use super::{ApiError, caller};
use crate::server::Shared;

/// The longest image reference accepted.
pub const MAX_REFERENCE: usize = 512;
/// How long one node may take to pull an image.
const PULL_TIMEOUT: Duration = Duration::from_secs(600);

/// The images cached on the nodes, with the nodes holding each: for a
/// tenant, those its sandboxes and templates name; for an admin, all.
#[utoipa::path(get, path = "/v1/images", tag = "images", operation_id = "list_images",
    responses((status = 200, body = ImageList), (status = 401, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn list(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
) -> Result<Json<ImageList>, ApiError> {
    let who = caller(&s, &headers)?;
    let items = super::confirmed(&s, move |st| {
        // A tenant sees the images its own sandboxes and templates name
        // (another tenant's image references are not its business); an
        // admin sees every node's cache.
        let mine = who.tenant.as_ref().map(|t| tenant_images(st, t));
        let mut by_ref: BTreeMap<String, Vec<NodeName>> = BTreeMap::new();
        for n in st.nodes.values() {
            for i in &n.images {
                if mine.as_ref().is_some_and(|m| !m.contains(i.as_str())) {
                    continue;
                }
                by_ref.entry(i.clone()).or_default().push(n.name.clone());
            }
        }
        by_ref
            .into_iter()
            .map(|(reference, nodes)| Image { reference, nodes })
            .collect()
    })
    .await?;
    Ok(Json(ImageList { items }))
}

/// The image references tenant `t` is shown of the nodes' caches (and
/// automatic templates): those its sandboxes and templates name, and those
/// its latest sandboxes named.
pub(super) fn tenant_images<'a>(
    st: &'a kiln_store::state::State,
    t: &kiln_api::cluster::TenantName,
) -> std::collections::BTreeSet<&'a str> {
    st.sandboxes
        .values()
        .filter(|r| r.tenant == *t)
        .map(|r| r.spec.image.as_str())
        .chain(
            st.templates
                .values()
                .filter(|x| x.tenant.as_ref() == Some(t))
                .map(|x| x.image.as_str()),
        )
        .chain(
            st.tenants
                .get(t)
                .into_iter()
                .flat_map(|r| r.recent_images.iter().map(String::as_str)),
        )
        .collect()
}

fn check_reference(r: &str) -> Result<(), ApiError> {
    if r.trim().is_empty() || r.len() > MAX_REFERENCE || r.chars().any(|c| c.is_control()) {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_reference",
            format!("ref: 1-{MAX_REFERENCE} characters, no control characters"),
        ));
    }
    Ok(())
}

/// `(name, base URL, key, pinned client)` of the nodes an image request
/// goes to: `node`, or every ready node. Only over TLS to the certificate
/// the node registered: the key never travels in clear.
fn targets(
    s: &Shared,
    node: Option<&NodeName>,
) -> Result<Vec<(NodeName, String, String, reqwest::Client)>, ApiError> {
    let found = s.raft.read_local(|st| {
        st.nodes
            .values()
            .filter(|n| match node {
                Some(want) => n.name == *want,
                None => n.status == NodeStatus::Ready,
            })
            .map(|n| {
                (
                    n.name.clone(),
                    n.address.clone(),
                    n.stream_key.clone().zip(n.stream_cert_sha256.clone()),
                )
            })
            .collect::<Vec<_>>()
    });
    if found.is_empty() {
        return Err(match node {
            Some(n) => ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("node {n} does not exist"),
            ),
            None => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "no_nodes",
                "no ready node",
            ),
        });
    }
    found
        .into_iter()
        .map(|(name, address, key)| {
            let key = key.filter(|_| crate::grpc::valid_node_address(&address));
            match key {
                Some((k, cert)) => Ok((
                    name,
                    format!("https://{address}"),
                    k,
                    super::streams::client(&cert)?,
                )),
                None => Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "node_unavailable",
                    format!("node {name} serves no node endpoints (kiln node --address)"),
                )),
            }
        })
        .collect()
}

/// Sends one image request to one node: its answer, or its error relayed
/// (the node's status and code; 401 is a key mismatch, 502).
async fn relay(
    client: &reqwest::Client,
    method: reqwest::Method,
    node: &NodeName,
    url: String,
    key: &str,
    reference: &str,
) -> Result<ImageOnNode, ApiError> {
    let resp = client
        .request(method, url)
        .bearer_auth(key)
        .timeout(PULL_TIMEOUT)
        .header("content-type", "application/json")
        .body(
            serde_json::to_vec(&NodeImageRequest {
                reference: reference.to_owned(),
            })
            .unwrap_or_default(),
        )
        .send()
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                "node_unavailable",
                format!("cannot reach node {node}: {e}"),
            )
        })?;
    let status = resp.status().as_u16();
    let body = resp.bytes().await.map_err(|e| {
        ApiError::new(
            StatusCode::BAD_GATEWAY,
            "node_unavailable",
            format!("node {node}'s answer broke off: {e}"),
        )
    })?;
    if status == 200 {
        return serde_json::from_slice::<kiln_api::templates::NodeImageAnswer>(&body)
            .map(|a| ImageOnNode {
                node: node.clone(),
                digest: a.digest,
                changed: a.changed,
            })
            .map_err(|e| {
                ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "bad_gateway",
                    format!("node {node} answered an invalid body: {e}"),
                )
            });
    }
    if status == 401 {
        return Err(ApiError::new(
            StatusCode::BAD_GATEWAY,
            "node_unavailable",
            format!("node {node} refused the server's key (it registered another)"),
        ));
    }
    let detail = serde_json::from_slice::<ErrorBody>(&body)
        .map(|b| b.error)
        .unwrap_or_else(|_| kiln_api::rest::ErrorDetail {
            code: "node_error".into(),
            message: String::from_utf8_lossy(&body).chars().take(500).collect(),
            reason: None,
        });
    let code = StatusCode::from_u16(status)
        .ok()
        .filter(|c| c.is_client_error())
        .unwrap_or(StatusCode::BAD_GATEWAY);
    Err(ApiError::new(
        code,
        &detail.code,
        format!("node {node}: {}", detail.message),
    ))
}

/// Pull an image on one node or every ready node; answers once all have
/// it (an unknown image is the node's 4xx, `image_not_found`).
#[utoipa::path(post, path = "/v1/images/pull", tag = "images", operation_id = "pull_image", request_body = PullImage,
    responses((status = 200, body = ImageResult), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, description = "Unknown node or image", body = ErrorBody),
        (status = 422, description = "Invalid reference, or one naming a file on the node", body = ErrorBody),
        (status = 502, body = ErrorBody)))]
pub async fn pull(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Result<JsonBody<PullImage>, ApiError>,
) -> Result<Json<ImageResult>, ApiError> {
    caller(&s, &headers)?;
    let JsonBody(req) = body?;
    check_reference(&req.reference)?;
    let spec = kiln_api::sandbox::SandboxSpec::for_image(req.reference.clone());
    super::sandboxes::scheduled_spec_check(
        &spec,
        s.cfg.allow_local_images,
        &super::policy::api_protected(&s),
    )?;
    let mut nodes = vec![];
    for (name, base, key, client) in targets(&s, req.node.as_ref())? {
        let url = format!("{base}/node/v1/images/pull");
        nodes.push(
            relay(
                &client,
                reqwest::Method::POST,
                &name,
                url,
                &key,
                &req.reference,
            )
            .await?,
        );
    }
    Ok(Json(ImageResult {
        reference: req.reference,
        nodes,
    }))
}

/// Remove an image from every node caching it (admin). Refused (409
/// `image_in_use`) by a node where something uses it.
#[utoipa::path(delete, path = "/v1/images/{reference}", tag = "images", operation_id = "remove_image",
    params(("reference" = String, Path, description = "The reference, its slashes percent-encoded (%2F)")),
    responses((status = 200, body = ImageResult), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, description = "No node caches it", body = ErrorBody),
        (status = 409, description = "In use on a node", body = ErrorBody), (status = 502, body = ErrorBody)))]
pub async fn remove(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(reference): Path<String>,
) -> Result<Json<ImageResult>, ApiError> {
    caller(&s, &headers)?.require_admin()?;
    check_reference(&reference)?;
    let holders: Vec<NodeName> = s.raft.read_local(|st| {
        st.nodes
            .values()
            .filter(|n| n.images.contains(&reference))
            .map(|n| n.name.clone())
            .collect()
    });
    if holders.is_empty() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no node caches image {reference:?}"),
        ));
    }
    let mut nodes = vec![];
    for h in holders {
        for (name, base, key, client) in targets(&s, Some(&h))? {
            let url = format!("{base}/node/v1/images/remove");
            nodes.push(relay(&client, reqwest::Method::POST, &name, url, &key, &reference).await?);
        }
    }
    Ok(Json(ImageResult { reference, nodes }))
}
