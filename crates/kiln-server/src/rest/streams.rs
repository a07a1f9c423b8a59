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
//! - The relay reaches the node over TLS and accepts exactly the
//!   certificate whose SHA-256 the node registered (pinned; no CA), so the
//!   key and the streams never travel in clear. A node record without a
//!   fingerprint is refused (`node_unavailable`), never reached in clear.
//! - Nothing is buffered whole: WebSocket sessions are relayed as the two
//!   upgraded byte streams (the node bounds and validates every frame and
//!   closes idle sessions); logs and tar streams are relayed chunk by
//!   chunk, so back-pressure reaches the guest both ways.
//! - Stream routes hold none of the API's global request permits; each
//!   tenant holds at most [`MAX_STREAMS_PER_TENANT`] sessions at once on a
//!   replica (more: 429 with Retry-After). An upload body that pauses
//!   [`BODY_IDLE`] is dropped.
//! - A session ends when its token is revoked (or its tenant deleted) or
//!   its sandbox is deleted: each watches the applied state.
//! - Served by whichever replica receives them (they are not forwarded to
//!   the leader: a relay must not pass through a second server), from its
//!   applied state: a sandbox created a moment ago on another replica may
//!   be 404 for as long as this replica lags.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::body::Body;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};
use kiln_api::cluster::{DesiredState, TenantName};
use kiln_api::rest::ErrorBody;
use kiln_api::sandbox::SandboxId;
use kiln_store::query;

use super::{ApiError, caller};
use crate::server::Shared;

/// Most stream sessions (exec, attach, logs, files) one tenant holds at
/// once on one replica.
pub const MAX_STREAMS_PER_TENANT: usize = 64;
/// How long an upload's body may pause before the relay drops it.
pub const BODY_IDLE: Duration = Duration::from_secs(60);

/// The open stream sessions, counted per tenant (admins count as one).
#[derive(Debug, Default)]
pub struct Sessions {
    open: Mutex<HashMap<Option<TenantName>, usize>>,
}

impl Sessions {
    /// Counts one more session of `tenant`, unless it holds the most.
    fn take(&self, tenant: &Option<TenantName>) -> Result<(), ApiError> {
        let mut m = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(tenant.clone()).or_default();
        if *n >= MAX_STREAMS_PER_TENANT {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_streams",
                format!("at most {MAX_STREAMS_PER_TENANT} open stream sessions per tenant"),
            )
            .retry(1));
        }
        *n += 1;
        Ok(())
    }

    fn release(&self, tenant: &Option<TenantName>) {
        let mut m = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(tenant) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(tenant);
            }
        }
    }
}

/// One open session: counted until dropped.
struct Slot {
    s: Arc<Shared>,
    tenant: Option<TenantName>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.s.streams.release(&self.tenant);
    }
}

fn take_slot(s: &Arc<Shared>, tenant: Option<TenantName>) -> Result<Slot, ApiError> {
    s.streams.take(&tenant)?;
    Ok(Slot {
        s: s.clone(),
        tenant,
    })
}

/// The API's global request limit (`server::MAX_CONCURRENT_REQUESTS`),
/// which stream routes do not take part in.
pub async fn limit_requests(
    State(permits): State<Arc<tokio::sync::Semaphore>>,
    req: Request,
    next: Next,
) -> Response {
    if is_stream_path(req.uri().path()) {
        return next.run(req).await;
    }
    // The semaphore is never closed.
    let _permit = permits.acquire().await;
    next.run(req).await
}

/// `/v1/sandboxes/{id}/exec|attach|logs|files`, as the router matches them.
pub fn is_stream_path(p: &str) -> bool {
    let Some(rest) = p.strip_prefix("/v1/sandboxes/") else {
        return false;
    };
    let Some((id, what)) = rest.split_once('/') else {
        return false;
    };
    !id.is_empty() && matches!(what, "exec" | "attach" | "logs" | "files")
}

/// Completes when the session must end: its token was revoked (a deleted
/// tenant's are), or its sandbox is deleted or gone.
async fn revoked(s: Arc<Shared>, token_hash: String, tenant: Option<TenantName>, sid: SandboxId) {
    let mut applied = s.raft.subscribe_applied();
    loop {
        applied.borrow_and_update();
        let gone = s.raft.read_local(|st| {
            query::token_by_hash(st, &token_hash).is_none()
                || query::get_sandbox(st, tenant.as_ref(), &sid)
                    .is_none_or(|r| r.desired == DesiredState::Deleted)
        });
        if gone {
            tracing::info!(sandbox = %sid, "stream session ended: access revoked or sandbox deleted");
            return;
        }
        if applied.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// Where a relay goes: the node's URL, its stream key, the client pinned
/// to its certificate; the session's slot and what ends it.
pub(super) struct Target {
    pub(super) url: String,
    pub(super) key: String,
    pub(super) client: reqwest::Client,
    slot: Slot,
    ended: Ended,
}

type Ended = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// A relayed body that fails (the client sees a broken-off stream, never
/// a clean end) when the session is revoked, and, with `idle`, when it
/// pauses that long; the slot is held until it ends.
fn guarded<S, E, G>(
    body: S,
    ended: Ended,
    idle: Option<Duration>,
    slot: G,
) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send
where
    S: Stream<Item = Result<Bytes, E>> + Send + 'static,
    E: std::fmt::Display,
    G: Send + 'static,
{
    let state = (Box::pin(body), ended, slot, false);
    futures::stream::unfold(state, move |(mut b, mut ended, slot, done)| async move {
        if done {
            return None;
        }
        let next = async {
            match idle {
                Some(d) => tokio::time::timeout(d, b.next()).await.map_err(|_| {
                    std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no byte for {} s", d.as_secs()),
                    )
                }),
                None => Ok(b.next().await),
            }
        };
        tokio::select! {
            n = next => match n {
                Ok(Some(Ok(x))) => Some((Ok(x), (b, ended, slot, false))),
                Ok(Some(Err(e))) => Some((Err(std::io::Error::other(e.to_string())), (b, ended, slot, true))),
                Ok(None) => None,
                Err(e) => Some((Err(e), (b, ended, slot, true))),
            },
            () = &mut ended => Some((
                Err(std::io::Error::other("access revoked or sandbox deleted")),
                (b, ended, slot, true),
            )),
        }
    })
}

/// The bearer secret of the request (already authenticated).
fn token_hash(headers: &HeaderMap) -> String {
    let secret = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .unwrap_or_default();
    query::hash_token(secret)
}

/// The node stream endpoint of sandbox `id` for this caller.
pub(super) fn target(
    s: &Arc<Shared>,
    headers: &HeaderMap,
    id: &str,
    what: &str,
) -> Result<Target, ApiError> {
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
        let node = r.node.as_ref().and_then(|n| st.nodes.get(n)).map(|n| {
            (
                n.address.clone(),
                n.stream_key.clone().zip(n.stream_cert_sha256.clone()),
            )
        });
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
    let Some((key, cert)) = key else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "node_unavailable",
            "the sandbox's node serves no stream endpoints over TLS (kiln node --address)",
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
    let client = client(&cert)?;
    let slot = take_slot(s, who.tenant.clone())?;
    let ended = Box::pin(revoked(
        s.clone(),
        token_hash(headers),
        who.tenant,
        sid.clone(),
    ));
    Ok(Target {
        url: format!("https://{address}/node/v1/sandboxes/{sid}/{what}"),
        key,
        client,
        slot,
        ended,
    })
}

/// The client the relays use for the node whose certificate has SHA-256
/// `cert`: TLS pinned to it, no overall timeout (streams last), a bounded
/// connect, no redirects. One per certificate, kept (a bounded cache).
pub(super) fn client(cert: &str) -> Result<reqwest::Client, ApiError> {
    static C: OnceLock<Mutex<HashMap<String, reqwest::Client>>> = OnceLock::new();
    let cache = C.get_or_init(Default::default);
    if let Some(c) = cache.lock().unwrap_or_else(|e| e.into_inner()).get(cert) {
        return Ok(c.clone());
    }
    let bad = |e: &dyn std::fmt::Display| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "node_unavailable",
            format!("the sandbox's node registered an unusable certificate: {e}"),
        )
    };
    let tls = crate::tls::pinned_client_config(cert).map_err(|e| bad(&e))?;
    let c = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .redirect(reqwest::redirect::Policy::none())
        .http1_only()
        .build()
        .map_err(|e| bad(&e))?;
    let mut m = cache.lock().unwrap_or_else(|e| e.into_inner());
    if m.len() >= 4096 {
        m.clear();
    }
    m.insert(cert.to_owned(), c.clone());
    Ok(c)
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
fn relay(resp: reqwest::Response, session: Option<(Slot, Ended)>) -> Response {
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
    let body = match session {
        Some((slot, ended)) => Body::from_stream(guarded(resp.bytes_stream(), ended, None, slot)),
        None => Body::from_stream(resp.bytes_stream()),
    };
    out.body(body)
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
    let t = target(&s, &headers, &id, "logs")?;
    let url = with_query(t.url, q.as_deref())?;
    let resp = t
        .client
        .get(url)
        .bearer_auth(t.key)
        .send()
        .await
        .map_err(unavailable)?;
    Ok(relay(resp, Some((t.slot, t.ended))))
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
    let t = target(&s, &headers, &id, "files")?;
    let url = with_query(t.url, q.as_deref())?;
    let resp = t
        .client
        .get(url)
        .bearer_auth(t.key)
        .send()
        .await
        .map_err(unavailable)?;
    Ok(relay(resp, Some((t.slot, t.ended))))
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
    let t = target(&s, req.headers(), &id, "files")?;
    let url = with_query(t.url, q.as_deref())?;
    // The slot is held, and the session ended on revocation, while the
    // body flows; the short answer after it is relayed as it is.
    let body = reqwest::Body::wrap_stream(guarded(
        req.into_body().into_data_stream(),
        t.ended,
        Some(BODY_IDLE),
        t.slot,
    ));
    let resp = t
        .client
        .put(url)
        .bearer_auth(t.key)
        .header(reqwest::header::CONTENT_TYPE, "application/x-tar")
        .body(body)
        .send()
        .await
        .map_err(unavailable)?;
    Ok(relay(resp, None))
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
async fn upgrade(
    s: &Arc<Shared>,
    id: &str,
    what: &str,
    mut req: Request,
) -> Result<Response, ApiError> {
    let h = req.headers();
    let is_ws = h
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let t = target(s, h, id, what)?;
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
    let resp = t
        .client
        .get(t.url)
        .bearer_auth(t.key)
        .header(reqwest::header::CONNECTION, "Upgrade")
        .header(reqwest::header::UPGRADE, "websocket")
        .header(reqwest::header::SEC_WEBSOCKET_VERSION, "13")
        .header(reqwest::header::SEC_WEBSOCKET_KEY, ws_key)
        .send()
        .await
        .map_err(unavailable)?;
    if resp.status() != reqwest::StatusCode::SWITCHING_PROTOCOLS {
        return Ok(relay(resp, None));
    }
    let (slot, ended) = (t.slot, t.ended);
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
        // Revoked: both connections are dropped (the node ends the
        // process's session as when a client goes away).
        tokio::select! {
            r = tokio::io::copy_bidirectional(&mut client_io, &mut node_io) => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "a relayed stream ended with an error");
                }
            }
            () = ended => {}
        }
        drop(slot);
    });
    out.body(Body::empty())
        .map_err(|e| ApiError::new(StatusCode::BAD_GATEWAY, "bad_gateway", e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_paths_are_told_apart() {
        for p in [
            "/v1/sandboxes/sb-1/exec",
            "/v1/sandboxes/sb-1/attach",
            "/v1/sandboxes/sb-1/logs",
            "/v1/sandboxes/sb-1/files",
        ] {
            assert!(is_stream_path(p), "{p}");
        }
        for p in [
            "/v1/sandboxes",
            "/v1/sandboxes/sb-1",
            "/v1/sandboxes//exec",
            "/v1/sandboxes/sb-1/stop",
            "/v1/sandboxes/sb-1/exec/x",
            "/v1/sandboxes/sb-1/wait",
            "/v1/nodes",
            "/kiln.node.v1.NodeService/Watch",
        ] {
            assert!(!is_stream_path(p), "{p}");
        }
    }

    /// A relayed body breaks off (an error, never a clean end) when it
    /// pauses past its idle limit or when its session is revoked.
    #[tokio::test]
    async fn a_guarded_body_breaks_off_when_idle_or_revoked() {
        let chunk = || Ok::<_, std::io::Error>(Bytes::from_static(b"tar"));
        let stalls = || futures::stream::iter([chunk()]).chain(futures::stream::pending());
        let never: Ended = Box::pin(std::future::pending());
        let mut g = Box::pin(guarded(
            stalls(),
            never,
            Some(Duration::from_millis(100)),
            (),
        ));
        assert_eq!(g.next().await.expect("chunk").expect("ok"), "tar");
        let t0 = std::time::Instant::now();
        let e = g.next().await.expect("an item").expect_err("idle");
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        assert!(t0.elapsed() >= Duration::from_millis(100));
        assert!(g.next().await.is_none(), "nothing after the error");

        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let ended: Ended = Box::pin(async move {
            let _ = rx.await;
        });
        let mut g = Box::pin(guarded(stalls(), ended, None, ()));
        assert!(g.next().await.expect("chunk").is_ok());
        tx.send(()).expect("send");
        let e = g.next().await.expect("an item").expect_err("revoked");
        assert!(e.to_string().contains("revoked"), "{e}");
        assert!(g.next().await.is_none());

        // A body that ends, ends cleanly.
        let never: Ended = Box::pin(std::future::pending());
        let mut g = Box::pin(guarded(
            futures::stream::iter([chunk()]),
            never,
            Some(Duration::from_secs(5)),
            (),
        ));
        assert!(g.next().await.expect("chunk").is_ok());
        assert!(g.next().await.is_none());
    }

    #[test]
    fn each_tenant_holds_at_most_its_share_of_sessions() {
        let s = Sessions::default();
        let a = Some(TenantName::new("a").expect("name"));
        let b = Some(TenantName::new("b").expect("name"));
        for _ in 0..MAX_STREAMS_PER_TENANT {
            s.take(&a).expect("within the cap");
        }
        let e = s.take(&a).expect_err("over the cap");
        assert_eq!(e.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(e.detail.code, "too_many_streams");
        assert_eq!(e.retry_after, Some(1));
        s.take(&b).expect("another tenant is not affected");
        s.take(&None).expect("nor an admin");
        s.release(&a);
        s.take(&a).expect("a slot freed is taken again");
        for _ in 0..MAX_STREAMS_PER_TENANT {
            s.release(&a);
        }
        s.release(&b);
        s.release(&None);
        assert!(s.open.lock().expect("lock").is_empty(), "nothing leaks");
    }
}
