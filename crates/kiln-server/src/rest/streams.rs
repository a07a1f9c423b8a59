//! `/v1/sandboxes/{id}/exec|attach|logs|files`: the stream routes, relayed
//! to the stream endpoints of the node that runs the sandbox (protocol:
//! `kiln_api::stream`).
//!
//! Invariants:
//! - Tenant-scoped like every sandbox route: another tenant's sandbox is 404
//!   exactly like a missing one, decided before anything reaches a node.
//! - The server presents the node's stream key (sent by the node in
//!   `Register`), never the client's token; the node checks the key and
//!   that it owns the sandbox.
//! - Nothing is buffered whole: WebSocket sessions are relayed as the two
//!   upgraded byte streams (the node bounds and validates every frame and
//!   closes idle sessions); logs and tar streams are relayed chunk by
//!   chunk, so back-pressure reaches the guest both ways.
//! - Served by whichever replica receives them (they are not forwarded to
//!   the leader: a relay must not pass through a second server), from its
//!   applied state: a sandbox created a moment ago on another replica may
//!   be 404 for as long as this replica lags.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, RawQuery, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use kiln_api::rest::ErrorBody;
use kiln_api::sandbox::SandboxId;
use kiln_store::query;

use super::{ApiError, caller};
use crate::server::Shared;

/// The node stream endpoint of sandbox `id` for this caller, and the key.
pub(super) fn target(
    s: &Shared,
    headers: &HeaderMap,
    id: &str,
    what: &str,
) -> Result<(String, String), ApiError> {
    let who = caller(s, headers)?;
    let nf = || {
        let shown: String = id.chars().take(64).filter(|c| !c.is_control()).collect();
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("sandbox {shown:?} does not exist"),
        )
    };
    let sid = SandboxId::try_from(id.to_owned()).map_err(|_| nf())?;
    let (node, found) = s.raft.read_local(|st| {
        let Some(r) = query::get_sandbox(st, who.tenant.as_ref(), &sid) else {
            return (None, false);
        };
        let node = r
            .node
            .as_ref()
            .and_then(|n| st.nodes.get(n))
            .map(|n| (n.address.clone(), n.stream_key.clone()));
        (node, true)
    });
    if !found {
        return Err(nf());
    }
    let Some((address, key)) = node else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_placed",
            "the sandbox has no node yet",
        ));
    };
    let Some(key) = key else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "node_unavailable",
            "the sandbox's node serves no stream endpoints (kiln node --address)",
        ));
    };
    // Registration accepts `HOST:PORT` only (`grpc::valid_node_address`);
    // records from before that rule are checked again here.
    if !crate::grpc::valid_node_address(&address) {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "node_unavailable",
            "the sandbox's node registered an address that is not HOST:PORT",
        ));
    }
    let base = format!("http://{address}");
    Ok((format!("{base}/node/v1/sandboxes/{sid}/{what}"), key))
}

/// The client the relays use: no overall timeout (streams last), a bounded
/// connect, no redirects.
pub(super) fn client() -> &'static reqwest::Client {
    static C: OnceLock<reqwest::Client> = OnceLock::new();
    C.get_or_init(|| {
        reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .redirect(reqwest::redirect::Policy::none())
            .http1_only()
            .build()
            .unwrap_or_default()
    })
}

pub(super) fn unavailable(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(
        StatusCode::BAD_GATEWAY,
        "node_unavailable",
        format!("cannot reach the sandbox's node: {e}"),
    )
}

/// A node's answer relayed: status, content type, body as a stream. A 401
/// from the node is a server/node key mismatch, not the client's fault.
fn relay(resp: reqwest::Response) -> Response {
    let status = StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    if status == StatusCode::UNAUTHORIZED {
        return ApiError::new(
            StatusCode::BAD_GATEWAY,
            "node_refused",
            "the node refused the server's stream key (it re-registers with a new one)",
        )
        .into_response();
    }
    let mut out = Response::builder().status(status);
    if let Some(v) = resp.headers().get(reqwest::header::CONTENT_TYPE) {
        out = out.header(header::CONTENT_TYPE, v.as_bytes());
    }
    out.body(Body::from_stream(resp.bytes_stream()))
        .unwrap_or_else(|e| unavailable(e).into_response())
}

fn with_query(url: String, q: Option<&str>) -> Result<String, ApiError> {
    match q {
        None | Some("") => Ok(url),
        Some(q) if q.len() <= 8192 => Ok(format!("{url}?{q}")),
        Some(_) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            "the query is longer than 8 KiB",
        )),
    }
}

/// Follow or read a sandbox's output: NDJSON, one `LogRecord` per line
/// (`{"type":"output","stream":"stdout","data":"<base64>"}`, `dropped`,
/// and, when the sandbox ended, a last `exit`).
#[utoipa::path(get, path = "/v1/sandboxes/{id}/logs", tag = "streams",
    params(("id" = String, Path),
        ("follow" = Option<bool>, Query, description = "keep streaming until the main process ends"),
        ("stdout" = Option<bool>, Query, description = "include stdout (default true)"),
        ("stderr" = Option<bool>, Query, description = "include stderr (default true)")),
    responses(
        (status = 200, description = "application/x-ndjson: one kiln_api::stream::LogRecord per line", body = kiln_api::stream::LogRecord, content_type = "application/x-ndjson"),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 502, body = ErrorBody)))]
pub async fn logs(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    let (url, key) = target(&s, &headers, &id, "logs")?;
    let url = with_query(url, q.as_deref())?;
    let resp = client()
        .get(url)
        .bearer_auth(key)
        .send()
        .await
        .map_err(unavailable)?;
    Ok(relay(resp))
}

/// Download `path` from the sandbox as a tar stream (a file, or a
/// directory with its contents).
#[utoipa::path(get, path = "/v1/sandboxes/{id}/files", tag = "streams",
    params(("id" = String, Path), ("path" = String, Query, description = "absolute path in the sandbox")),
    responses(
        (status = 200, description = "application/x-tar; a broken-off body means the copy failed", content_type = "application/x-tar"),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 422, body = ErrorBody), (status = 502, body = ErrorBody)))]
pub async fn download(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    let (url, key) = target(&s, &headers, &id, "files")?;
    let url = with_query(url, q.as_deref())?;
    let resp = client()
        .get(url)
        .bearer_auth(key)
        .send()
        .await
        .map_err(unavailable)?;
    Ok(relay(resp))
}

/// Upload a tar stream (the body, any size: streamed with back-pressure)
/// and unpack it into the directory `path` of the sandbox. 204 when the
/// guest wrote everything.
#[utoipa::path(put, path = "/v1/sandboxes/{id}/files", tag = "streams",
    params(("id" = String, Path), ("path" = String, Query, description = "absolute directory in the sandbox to unpack into")),
    request_body(content_type = "application/x-tar", description = "a tar stream"),
    responses((status = 204, description = "unpacked"),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 422, body = ErrorBody), (status = 502, body = ErrorBody)))]
pub async fn upload(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
    req: Request,
) -> Result<Response, ApiError> {
    let (url, key) = target(&s, req.headers(), &id, "files")?;
    let url = with_query(url, q.as_deref())?;
    let body = reqwest::Body::wrap_stream(req.into_body().into_data_stream());
    let resp = client()
        .put(url)
        .bearer_auth(key)
        .header(reqwest::header::CONTENT_TYPE, "application/x-tar")
        .body(body)
        .send()
        .await
        .map_err(unavailable)?;
    Ok(relay(resp))
}

/// Run a command in the sandbox (WebSocket). First client message: an
/// `ExecStart` JSON text frame; then binary frames prefixed 0 (stdin) from
/// the client, 1 (stdout) / 2 (stderr) from the server; text frames
/// `ClientMsg` (resize, signal, stdin_eof) and `ServerMsg` (started, exit,
/// error). See `kiln_api::stream` and docs/control-plane.md.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/exec", tag = "streams",
    params(("id" = String, Path)),
    responses((status = 101, description = "WebSocket: kiln_api::stream protocol; first message ExecStart", body = kiln_api::stream::ServerMsg),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 502, body = ErrorBody)))]
pub async fn exec(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    upgrade(&s, &id, "exec", req).await
}

/// Attach to the sandbox's main process (WebSocket; what `kiln run`
/// does): first client message an `AttachStart`, then as `exec`.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/attach", tag = "streams",
    params(("id" = String, Path)),
    responses((status = 101, description = "WebSocket: kiln_api::stream protocol; first message AttachStart", body = kiln_api::stream::ServerMsg),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 502, body = ErrorBody)))]
pub async fn attach(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    upgrade(&s, &id, "attach", req).await
}

/// Relays a WebSocket upgrade: the node answers the handshake (the
/// client's `Sec-WebSocket-Key` is passed on, so the node's
/// `Sec-WebSocket-Accept` is valid for the client), then the two upgraded
/// connections are joined.
async fn upgrade(s: &Shared, id: &str, what: &str, mut req: Request) -> Result<Response, ApiError> {
    let h = req.headers();
    let is_ws = h
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let (url, key) = target(s, h, id, what)?;
    if !is_ws {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "websocket_required",
            "this route is a WebSocket (Upgrade: websocket)",
        ));
    }
    let ws_key = h
        .get(header::SEC_WEBSOCKET_KEY)
        .and_then(|v| v.to_str().ok())
        .filter(|k| k.len() <= 64 && k.bytes().all(|b| b.is_ascii_graphic()))
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "websocket_required",
                "Sec-WebSocket-Key is missing or malformed",
            )
        })?
        .to_owned();
    let on_upgrade = req
        .extensions_mut()
        .remove::<hyper::upgrade::OnUpgrade>()
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "websocket_required",
                "this connection cannot be upgraded (HTTP/1.1 only)",
            )
        })?;
    let resp = client()
        .get(url)
        .bearer_auth(key)
        .header(reqwest::header::CONNECTION, "Upgrade")
        .header(reqwest::header::UPGRADE, "websocket")
        .header(reqwest::header::SEC_WEBSOCKET_VERSION, "13")
        .header(reqwest::header::SEC_WEBSOCKET_KEY, ws_key)
        .send()
        .await
        .map_err(unavailable)?;
    if resp.status() != reqwest::StatusCode::SWITCHING_PROTOCOLS {
        return Ok(relay(resp));
    }
    let mut out = Response::builder().status(StatusCode::SWITCHING_PROTOCOLS);
    for k in [
        reqwest::header::UPGRADE,
        reqwest::header::CONNECTION,
        reqwest::header::SEC_WEBSOCKET_ACCEPT,
    ] {
        if let Some(v) = resp.headers().get(&k) {
            out = out.header(k.as_str(), v.as_bytes());
        }
    }
    let node_io = resp.upgrade().await.map_err(unavailable)?;
    tokio::spawn(async move {
        let client_io = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(error = %e, "the client's upgrade failed");
                return;
            }
        };
        let mut client_io = hyper_util::rt::TokioIo::new(client_io);
        let mut node_io = node_io;
        if let Err(e) = tokio::io::copy_bidirectional(&mut client_io, &mut node_io).await {
            tracing::debug!(error = %e, "a relayed stream ended with an error");
        }
    });
    out.body(Body::empty())
        .map_err(|e| ApiError::new(StatusCode::BAD_GATEWAY, "bad_gateway", e.to_string()))
}
