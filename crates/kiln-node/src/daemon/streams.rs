//! The node's stream endpoints (HTTP on `kiln node --address`): exec and
//! attach over WebSocket, logs as NDJSON, files as tar streams, in the
//! protocol of [`kiln_api::stream`]. The server proxies its
//! `/v1/sandboxes/{id}/…` routes here for the node that runs the sandbox.
//!
//! Invariants:
//! - Every request carries `authorization: Bearer <key>`, the key the node
//!   created at its first start ([`load_or_create_key`], 0600 under
//!   `<state>/node/`) and sent in `Register`; it is compared in constant
//!   time. Anything else is 401.
//! - Only sandboxes this node owns for the control plane (an ownership
//!   marker) are served; the host's own `kiln run` sandboxes, and IDs the
//!   node does not know, are 404 alike.
//! - Every byte from the client is bounded and validated (start message,
//!   control messages, frame sizes, paths); an idle stream is closed. Data
//!   moves with back-pressure end to end: nothing reads faster than it can
//!   pass data on, so a large upload never sits in memory.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path as UrlPath, RawQuery, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::{SinkExt, StreamExt};
use kiln_api::proto::{self, Channel, Kind};
use kiln_api::rest::{ErrorBody, ErrorDetail};
use kiln_api::sandbox::SandboxId;
use kiln_api::stream::{
    self, AttachStart, ClientMsg, ExecStart, LogRecord, LogStreamName, ServerMsg,
};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::ctl::{CtlConn, CtlRequest, CtlResponse};
use crate::node::{ExecSpec, Node};

use super::Backend;

/// How long an upload's body may pause before the node drops it.
pub const BODY_IDLE: Duration = Duration::from_secs(60);

/// Where the node keeps its stream key.
pub fn key_path(state: &Path) -> PathBuf {
    state.join("node").join("stream.key")
}

/// The node's stream key: read, or created (64 hex characters, 0600) at the
/// first start.
pub fn load_or_create_key(state: &Path) -> std::io::Result<String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = key_path(state);
    if let Ok(k) = std::fs::read_to_string(&path) {
        let k = k.trim().to_owned();
        if k.len() == 64 && k.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(k);
        }
        tracing::warn!(path = %path.display(), "the stream key file is malformed; making a new key");
        std::fs::remove_file(&path)?;
    }
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    let key: String = (0..32)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect();
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(key.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    Ok(key)
}

/// What the handlers share.
pub struct Ctx {
    pub node: Node,
    pub backend: Arc<dyn Fn(&SandboxId) -> bool + Send + Sync>,
    key_hash: [u8; 32],
    /// A session with no frame either way for this long is closed.
    pub idle: Duration,
    /// Registries the image routes may reach over plain HTTP.
    pub insecure_registries: Vec<String>,
}

impl Ctx {
    pub fn new(node: Node, key: &str, owned: Arc<dyn Fn(&SandboxId) -> bool + Send + Sync>) -> Ctx {
        Ctx {
            node,
            backend: owned,
            key_hash: Sha256::digest(key.as_bytes()).into(),
            idle: Duration::from_secs(stream::IDLE_SECS),
            insecure_registries: Vec::new(),
        }
    }
}

/// Whether `id` is owned, from the daemon's backend.
pub fn owned_by(backend: &Backend, id: &SandboxId) -> bool {
    backend.marker(id).is_some()
}

/// The router of the stream endpoints.
pub fn router(cx: Arc<Ctx>) -> Router {
    Router::new()
        .route("/node/v1/sandboxes/{id}/exec", get(exec))
        .route("/node/v1/sandboxes/{id}/attach", get(attach))
        .route("/node/v1/sandboxes/{id}/logs", get(logs))
        .route("/node/v1/sandboxes/{id}/files", get(download).put(upload))
        .merge(super::images_api::routes())
        .merge(super::snap_routes::routes())
        .fallback(|| async { err(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .layer(middleware::from_fn_with_state(cx.clone(), auth))
        .with_state(cx)
}

/// Serves the stream endpoints on `listener` over TLS with `tls` until
/// the task is dropped.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: super::stream_tls::StreamTls,
    cx: Arc<Ctx>,
) {
    let listener = match super::stream_tls::TlsListener::new(listener, &tls) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "the stream endpoints cannot listen");
            return;
        }
    };
    if let Err(e) = axum::serve(listener, router(cx)).await {
        tracing::warn!(error = %e, "the stream endpoints stopped");
    }
}

pub(super) fn err(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
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

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn auth(State(cx): State<Arc<Ctx>>, req: Request, next: Next) -> Response {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .unwrap_or("");
    let h: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
    if presented.is_empty() || !ct_eq(&h, &cx.key_hash) {
        return err(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "this node's stream endpoints need its key",
        );
    }
    next.run(req).await
}

/// The owned sandbox `id`, or the 404 for anything else.
#[allow(clippy::result_large_err)]
pub(super) fn owned(cx: &Ctx, id: &str) -> Result<SandboxId, Response> {
    let nf = || {
        err(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such sandbox on this node",
        )
    };
    let sid = SandboxId::try_from(id.to_owned()).map_err(|_| nf())?;
    if !(cx.backend)(&sid) || cx.node.store().load(sid.as_str()).is_err() {
        return Err(nf());
    }
    Ok(sid)
}

fn text(m: &ServerMsg) -> Message {
    Message::Text(serde_json::to_string(m).unwrap_or_default().into())
}

async fn exec(
    State(cx): State<Arc<Ctx>>,
    UrlPath(id): UrlPath<String>,
    ws: WebSocketUpgrade,
) -> Response {
    let id = match owned(&cx, &id) {
        Ok(i) => i,
        Err(r) => return r,
    };
    ws.max_message_size(stream::MAX_START)
        .max_frame_size(stream::MAX_START)
        .on_upgrade(move |sock| session(cx, id, sock, false))
}

async fn attach(
    State(cx): State<Arc<Ctx>>,
    UrlPath(id): UrlPath<String>,
    ws: WebSocketUpgrade,
) -> Response {
    let id = match owned(&cx, &id) {
        Ok(i) => i,
        Err(r) => return r,
    };
    ws.max_message_size(stream::MAX_START)
        .max_frame_size(stream::MAX_START)
        .on_upgrade(move |sock| session(cx, id, sock, true))
}

/// The start of a session: the process runs and streams, or the reason.
async fn start(
    cx: &Ctx,
    id: &SandboxId,
    sock: &mut WebSocket,
    main: bool,
) -> Result<(CtlConn, u32, bool, bool), ServerMsg> {
    let first = tokio::time::timeout(Duration::from_secs(stream::START_SECS), sock.recv())
        .await
        .map_err(|_| ServerMsg::error("start_timeout", "no start message"))?;
    let body = match first {
        Some(Ok(Message::Text(t))) => t,
        Some(Ok(_)) => {
            return Err(ServerMsg::error(
                "invalid_message",
                "the first message must be a JSON text frame",
            ));
        }
        _ => return Err(ServerMsg::error("invalid_message", "no start message")),
    };
    let (_, sockp) = cx
        .node
        .active_socket(id.as_str())
        .map_err(|e| ServerMsg::error("not_running", e.to_string()))?;
    let mut detach = false;
    let (req, stdin) = if main {
        let a: AttachStart = serde_json::from_str(&body)
            .map_err(|e| ServerMsg::error("invalid_message", format!("attach: {e}")))?;
        match a.pid {
            Some(pid) => (
                CtlRequest::AttachExec {
                    pid,
                    stdin: a.stdin,
                },
                a.stdin,
            ),
            None => (
                CtlRequest::Attach {
                    stdin: a.stdin,
                    replay: a.replay,
                },
                a.stdin,
            ),
        }
    } else {
        let e: ExecStart = serde_json::from_str(&body)
            .map_err(|e| ServerMsg::error("invalid_message", format!("exec: {e}")))?;
        if e.cmd.is_empty() {
            return Err(ServerMsg::error("invalid_message", "exec: cmd is empty"));
        }
        // `exec -d -i`: stdin stays open for a later attach with stdin.
        let stdin = e.stdin;
        detach = e.detach;
        let r = cx
            .node
            .exec_request(
                id.as_str(),
                ExecSpec {
                    argv: e.cmd,
                    env: e.env,
                    workdir: e.cwd,
                    user: e.user,
                    tty: e.tty,
                    rows: e.rows,
                    cols: e.cols,
                    stdin,
                    detached: e.detach,
                },
            )
            .map_err(|e| ServerMsg::error("invalid_message", e.to_string()))?;
        r.check_limits()
            .map_err(|e| ServerMsg::error("invalid_message", e.to_string()))?;
        (CtlRequest::Exec(r), stdin)
    };
    let (conn, resp) = tokio::time::timeout(
        Duration::from_secs(stream::START_SECS),
        CtlConn::open(&sockp, &req),
    )
    .await
    .map_err(|_| ServerMsg::error("exec_failed", "the guest did not start the process in time"))?
    .map_err(|e| ServerMsg::error("not_running", e.to_string()))?;
    match resp {
        CtlResponse::Started { pid } => Ok((conn, pid, stdin, detach)),
        CtlResponse::Error { message, exit_code } => match exit_code {
            Some(c) if main => Err(ServerMsg::Exit {
                exit_code: c,
                signal: None,
            }),
            // `reason`: the exit code a shell would give (126, 127), so
            // that clients return what `kiln exec` returns locally.
            _ => Err(ServerMsg::Error {
                error: ErrorDetail {
                    code: "exec_failed".into(),
                    message,
                    reason: exit_code.map(|c| c.to_string()),
                },
            }),
        },
        other => Err(ServerMsg::error(
            "exec_failed",
            format!("unexpected answer from the supervisor: {other:?}"),
        )),
    }
}

fn now_secs(t0: Instant) -> u64 {
    t0.elapsed().as_secs()
}

async fn session(cx: Arc<Ctx>, id: SandboxId, mut sock: WebSocket, main: bool) {
    let (conn, pid, stdin, detach) = match start(&cx, &id, &mut sock, main).await {
        Ok(s) => s,
        Err(m) => {
            let _ = sock.send(text(&m)).await;
            let _ = sock.close().await;
            return;
        }
    };
    if sock.send(text(&ServerMsg::Started { pid })).await.is_err() {
        return;
    }
    if detach {
        // `exec -d`: the process runs on; its output is kept for an
        // attach by pid.
        drop(conn);
        let _ = sock.close().await;
        return;
    }
    let CtlConn { mut reader, writer } = conn;
    let (mut sink, mut src) = sock.split();
    let t0 = Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    let (err_tx, mut err_rx) = mpsc::channel::<ServerMsg>(1);
    // Client → supervisor: validated, written with back-pressure.
    let last_in = last.clone();
    let input = tokio::spawn(async move {
        let mut writer = writer;
        let fail = |m: ServerMsg| async { err_tx.send(m).await.ok() };
        while let Some(msg) = src.next().await {
            last_in.store(now_secs(t0), Ordering::Relaxed);
            let r = match msg {
                Ok(Message::Binary(b)) => {
                    if b.len() > stream::MAX_BINARY {
                        fail(ServerMsg::error(
                            "frame_too_large",
                            "binary frames: at most 256 KiB + 1",
                        ))
                        .await;
                        return;
                    }
                    match b.split_first() {
                        Some((&stream::STDIN, data)) if stdin => {
                            if data.is_empty() {
                                continue;
                            }
                            writer.data(Channel::Stdin, data).await
                        }
                        _ => {
                            fail(ServerMsg::error(
                                "invalid_message",
                                "binary frames from the client carry stdin (prefix 0), and only with stdin: true",
                            ))
                            .await;
                            return;
                        }
                    }
                }
                Ok(Message::Text(t)) => {
                    if t.len() > stream::MAX_TEXT {
                        fail(ServerMsg::error(
                            "frame_too_large",
                            "control messages: at most 4 KiB",
                        ))
                        .await;
                        return;
                    }
                    let m = match serde_json::from_str::<ClientMsg>(&t)
                        .map_err(|e| e.to_string())
                        .and_then(|m| m.validate().map(|()| m))
                    {
                        Ok(m) => m,
                        Err(e) => {
                            fail(ServerMsg::error("invalid_message", e)).await;
                            return;
                        }
                    };
                    match m {
                        ClientMsg::StdinEof {} => writer.eof(Channel::Stdin).await,
                        ClientMsg::Signal { signal } => {
                            writer
                                .json(Kind::Request, &proto::Request::Signal { pid, signal })
                                .await
                        }
                        ClientMsg::Resize { rows, cols } => {
                            writer
                                .json(Kind::Request, &proto::Request::Resize { pid, rows, cols })
                                .await
                        }
                    }
                }
                Ok(Message::Close(_)) | Err(_) => return,
                Ok(_) => Ok(()), // ping/pong: answered by the WebSocket layer
            };
            if r.is_err() {
                return;
            }
        }
    });
    // Supervisor → client, until the exit, an error or the idle timeout.
    let idle_after = cx.idle.as_secs().max(1);
    let mut idle = tokio::time::interval(Duration::from_secs(idle_after.min(60)));
    let end = loop {
        tokio::select! {
            f = reader.next() => {
                last.store(now_secs(t0), Ordering::Relaxed);
                let f = match f {
                    Ok(Some(f)) => f,
                    Ok(None) => break Some(ServerMsg::error("exec_failed", "the sandbox's supervisor closed the stream")),
                    Err(e) => break Some(ServerMsg::error("exec_failed", e.to_string())),
                };
                match f.kind {
                    Kind::Data => {
                        let Ok((ch, bytes)) = f.data() else { continue };
                        let prefix = match ch {
                            Channel::Stdout => stream::STDOUT,
                            Channel::Stderr => stream::STDERR,
                            _ => continue,
                        };
                        let mut b = Vec::with_capacity(bytes.len() + 1);
                        b.push(prefix);
                        b.extend_from_slice(bytes);
                        if sink.send(Message::Binary(Bytes::from(b))).await.is_err() {
                            break None;
                        }
                    }
                    Kind::Event => {
                        if let Ok(proto::Event::Exit { status, .. }) = f.json::<proto::Event>("event") {
                            break Some(ServerMsg::Exit { exit_code: status.shell_code(), signal: status.signal });
                        }
                    }
                    _ => {}
                }
            }
            m = err_rx.recv() => {
                // The input side ended: on a bad message with its reason;
                // on the client's close, nothing more to say.
                match m {
                    Some(m) => break Some(m),
                    None => break None,
                }
            }
            _ = idle.tick() => {
                if now_secs(t0).saturating_sub(last.load(Ordering::Relaxed)) >= idle_after {
                    break Some(ServerMsg::error("idle_timeout", format!("no data either way for {idle_after} s")));
                }
            }
        }
    };
    input.abort();
    if let Some(m) = end {
        let _ = sink.send(text(&m)).await;
    }
    let _ = sink.close().await;
}

/// `?follow=&stdout=&stderr=` of `logs`.
fn bool_param(v: &str) -> Option<bool> {
    match v {
        "true" | "1" => Some(true),
        "false" | "0" => Some(false),
        _ => None,
    }
}

fn log_line(r: &LogRecord) -> Bytes {
    let mut v = serde_json::to_vec(r).unwrap_or_default();
    v.push(b'\n');
    Bytes::from(v)
}

async fn logs(
    State(cx): State<Arc<Ctx>>,
    UrlPath(id): UrlPath<String>,
    RawQuery(q): RawQuery,
) -> Response {
    let id = match owned(&cx, &id) {
        Ok(i) => i,
        Err(r) => return r,
    };
    let (mut follow, mut out, mut errs) = (false, true, true);
    for (k, v) in form_urlencoded_pairs(q.as_deref().unwrap_or("")) {
        let Some(b) = bool_param(&v) else {
            return err(
                StatusCode::BAD_REQUEST,
                "invalid_query",
                format!("{k}: true or false"),
            );
        };
        match k.as_str() {
            "follow" => follow = b,
            "stdout" => out = b,
            "stderr" => errs = b,
            _ => {
                return err(
                    StatusCode::BAD_REQUEST,
                    "invalid_query",
                    "unknown query parameter",
                );
            }
        }
    }
    let (tx, rx) = mpsc::channel::<Bytes>(8);
    let keep = move |s: LogStreamName| match s {
        LogStreamName::Stdout => out,
        LogStreamName::Stderr => errs,
    };
    tokio::spawn(async move {
        let store = cx.node.store();
        let dir = store.dir(id.as_str());
        let rec = cx.node.get(id.as_str()).ok();
        let running = rec.as_ref().is_some_and(|r| !r.state.is_finished());
        let sockp = dir.join("ctl.sock");
        if follow && running && sockp.exists() {
            let req = CtlRequest::Attach {
                stdin: false,
                replay: true,
            };
            if let Ok((mut conn, CtlResponse::Started { .. })) = CtlConn::open(&sockp, &req).await {
                loop {
                    let next = tokio::select! {
                        f = conn.reader.next() => f,
                        () = tx.closed() => return, // the client went away
                    };
                    let line = match next {
                        Ok(Some(f)) if f.kind == Kind::Data => match f.data() {
                            Ok((Channel::Stdout, b)) if keep(LogStreamName::Stdout) => {
                                output(LogStreamName::Stdout, b)
                            }
                            Ok((Channel::Stderr, b)) if keep(LogStreamName::Stderr) => {
                                output(LogStreamName::Stderr, b)
                            }
                            _ => continue,
                        },
                        Ok(Some(f)) if f.kind == Kind::Event => {
                            if let Ok(proto::Event::Exit { status, .. }) =
                                f.json::<proto::Event>("event")
                            {
                                let _ = tx
                                    .send(log_line(&LogRecord::Exit {
                                        exit_code: status.shell_code(),
                                        signal: status.signal,
                                    }))
                                    .await;
                                return;
                            }
                            continue;
                        }
                        Ok(Some(_)) => continue,
                        Ok(None) | Err(_) => {
                            let _ = tx
                                .send(log_line(&LogRecord::Error {
                                    error: ErrorDetail {
                                        code: "node_unavailable".into(),
                                        message: "the sandbox's supervisor closed the stream"
                                            .into(),
                                        reason: None,
                                    },
                                }))
                                .await;
                            return;
                        }
                    };
                    if tx.send(line).await.is_err() {
                        return; // the client went away
                    }
                }
            }
        }
        // Replay the log as it is (a finished sandbox, or no follow).
        let path = dir.join("output.log");
        let tx2 = tx.clone();
        let _ = tokio::task::spawn_blocking(move || {
            if !path.exists() {
                return;
            }
            let dropped = crate::logs::dropped(&path).unwrap_or(0);
            if dropped > 0
                && tx2
                    .blocking_send(log_line(&LogRecord::Dropped { bytes: dropped }))
                    .is_err()
            {
                return;
            }
            let Ok(mut r) = crate::logs::LogReader::open(&path, 0) else {
                return;
            };
            let _ = r.read_to_end(|s, b| {
                let s = match s {
                    crate::logs::LogStream::Stdout => LogStreamName::Stdout,
                    crate::logs::LogStream::Stderr => LogStreamName::Stderr,
                };
                if !keep(s) {
                    return Ok(());
                }
                tx2.blocking_send(output(s, b))
                    .map_err(|_| std::io::Error::other("client gone"))
            });
        })
        .await;
        // A followed sandbox whose supervisor was tearing down when we
        // came: its final state is recorded in a moment.
        if follow && running {
            for _ in 0..200 {
                if cx
                    .node
                    .get(id.as_str())
                    .map_or(true, |r| r.state.is_finished())
                {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        if let Some(rec) = cx
            .node
            .get(id.as_str())
            .ok()
            .filter(|r| r.state.is_finished())
        {
            let (exit_code, signal) = match &rec.state {
                kiln_api::sandbox::SandboxState::Exited {
                    exit_code, signal, ..
                } => (*exit_code, *signal),
                s => (s.exit_code().unwrap_or(255), None),
            };
            let _ = tx
                .send(log_line(&LogRecord::Exit { exit_code, signal }))
                .await;
        }
    });
    let body = Body::from_stream(tokio_stream_from(rx).map(Ok::<Bytes, std::convert::Infallible>));
    ([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response()
}

fn output(s: LogStreamName, b: &[u8]) -> Bytes {
    use base64::Engine;
    log_line(&LogRecord::Output {
        stream: s,
        data: base64::engine::general_purpose::STANDARD.encode(b),
    })
}

/// An mpsc receiver as a stream.
fn tokio_stream_from<T: Send + 'static>(
    rx: mpsc::Receiver<T>,
) -> impl futures::Stream<Item = T> + Send + 'static {
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|v| (v, rx)) })
}

/// `k=v&…` pairs (percent-decoded), at most 16.
fn form_urlencoded_pairs(q: &str) -> Vec<(String, String)> {
    form_urlencoded::parse(q.as_bytes())
        .take(16)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// `?path=` of `files`, checked.
#[allow(clippy::result_large_err)]
fn path_param(q: Option<&str>) -> Result<String, Response> {
    let mut path = None;
    for (k, v) in form_urlencoded_pairs(q.unwrap_or("")) {
        match k.as_str() {
            "path" => path = Some(v),
            _ => {
                return Err(err(
                    StatusCode::BAD_REQUEST,
                    "invalid_query",
                    "unknown query parameter",
                ));
            }
        }
    }
    let p = path.ok_or_else(|| err(StatusCode::BAD_REQUEST, "invalid_query", "path: required"))?;
    stream::check_path(&p).map_err(|m| err(StatusCode::BAD_REQUEST, "invalid_query", m))?;
    Ok(p)
}

fn copy_refused(message: &str) -> Response {
    err(StatusCode::UNPROCESSABLE_ENTITY, "copy_failed", message)
}

/// `GET …/files?path=`: `path` as a tar stream.
async fn download(
    State(cx): State<Arc<Ctx>>,
    UrlPath(id): UrlPath<String>,
    RawQuery(q): RawQuery,
) -> Response {
    let id = match owned(&cx, &id) {
        Ok(i) => i,
        Err(r) => return r,
    };
    let path = match path_param(q.as_deref()) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let sockp = match cx.node.active_socket(id.as_str()) {
        Ok((_, s)) => s,
        Err(e) => return err(StatusCode::CONFLICT, "not_running", e.to_string()),
    };
    let (mut conn, resp) = match CtlConn::open(&sockp, &CtlRequest::CopyOut { path }).await {
        Ok(r) => r,
        Err(e) => return err(StatusCode::BAD_GATEWAY, "node_unavailable", e.to_string()),
    };
    match resp {
        CtlResponse::Ok => {}
        CtlResponse::Error { message, .. } => return copy_refused(&message),
        other => return copy_refused(&format!("unexpected answer {other:?}")),
    }
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    tokio::spawn(async move {
        loop {
            let item = match conn.reader.next().await {
                Ok(Some(f)) if f.kind == Kind::Data => match f.data() {
                    Ok((_, b)) => Ok(Bytes::copy_from_slice(b)),
                    Err(e) => Err(std::io::Error::other(e.to_string())),
                },
                Ok(Some(f)) if f.kind == Kind::Eof => return,
                Ok(Some(f)) if f.kind == Kind::Response => Err(std::io::Error::other(
                    match f.json::<CtlResponse>("copy result") {
                        Ok(CtlResponse::Error { message, .. }) => message,
                        _ => "the copy failed".into(),
                    },
                )),
                Ok(Some(_)) => continue,
                Ok(None) => Err(std::io::Error::other("the copy ended early")),
                Err(e) => Err(std::io::Error::other(e.to_string())),
            };
            let stop = item.is_err();
            // An error breaks the chunked body off: the client sees an
            // incomplete transfer, never a short file that looks whole.
            if tx.send(item).await.is_err() || stop {
                return;
            }
        }
    });
    (
        [(header::CONTENT_TYPE, "application/x-tar")],
        Body::from_stream(tokio_stream_from(rx)),
    )
        .into_response()
}

/// `PUT …/files?path=`: unpacks the tar stream of the body into `path`.
async fn upload(
    State(cx): State<Arc<Ctx>>,
    UrlPath(id): UrlPath<String>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let _ = headers;
    let id = match owned(&cx, &id) {
        Ok(i) => i,
        Err(r) => return r,
    };
    let dest = match path_param(q.as_deref()) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let sockp = match cx.node.active_socket(id.as_str()) {
        Ok((_, s)) => s,
        Err(e) => return err(StatusCode::CONFLICT, "not_running", e.to_string()),
    };
    let (conn, resp) = match CtlConn::open(&sockp, &CtlRequest::CopyIn { dest }).await {
        Ok(r) => r,
        Err(e) => return err(StatusCode::BAD_GATEWAY, "node_unavailable", e.to_string()),
    };
    match resp {
        CtlResponse::Ok => {}
        CtlResponse::Error { message, .. } => return copy_refused(&message),
        other => return copy_refused(&format!("unexpected answer {other:?}")),
    }
    let CtlConn {
        mut reader,
        mut writer,
    } = conn;
    let mut data = body.into_data_stream();
    loop {
        // A body that pauses longer than BODY_IDLE is dropped (the copy is
        // cancelled): a slow client holds nothing for ever.
        let Ok(next) = tokio::time::timeout(BODY_IDLE, data.next()).await else {
            return err(
                StatusCode::REQUEST_TIMEOUT,
                "body_idle",
                format!("no byte of the upload for {} s", BODY_IDLE.as_secs()),
            );
        };
        let Some(chunk) = next else { break };
        let chunk = match chunk {
            Ok(c) => c,
            // Dropping the connection without an end of archive makes the
            // supervisor cancel the copy.
            Err(e) => return err(StatusCode::BAD_REQUEST, "body_broken", e.to_string()),
        };
        if let Err(e) = writer.data(Channel::Tar, &chunk).await {
            return err(StatusCode::BAD_GATEWAY, "node_unavailable", e.to_string());
        }
    }
    if let Err(e) = writer.eof(Channel::Tar).await {
        return err(StatusCode::BAD_GATEWAY, "node_unavailable", e.to_string());
    }
    match reader.next().await {
        Ok(Some(f)) => match f.json::<CtlResponse>("copy result") {
            Ok(CtlResponse::Ok) => StatusCode::NO_CONTENT.into_response(),
            Ok(CtlResponse::Error { message, .. }) => copy_refused(&message),
            _ => copy_refused("unexpected answer from the supervisor"),
        },
        _ => err(
            StatusCode::BAD_GATEWAY,
            "node_unavailable",
            "the supervisor closed the connection before the copy finished",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_decoding_is_bounded_and_total() {
        assert_eq!(
            form_urlencoded_pairs("path=%2Froot%2Fa+b&x"),
            vec![
                ("path".into(), "/root/a b".into()),
                ("x".into(), String::new())
            ]
        );
        assert_eq!(
            form_urlencoded_pairs("path=%zz%"),
            vec![("path".into(), "%zz%".into())]
        );
        assert_eq!(form_urlencoded_pairs(&"a=1&".repeat(100)).len(), 16);
        assert!(ct_eq(b"abc", b"abc") && !ct_eq(b"abc", b"abd") && !ct_eq(b"ab", b"abc"));
    }

    #[test]
    fn the_key_is_made_once_0600() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().expect("tmp");
        let k = load_or_create_key(d.path()).expect("key");
        assert_eq!(k.len(), 64);
        assert_eq!(load_or_create_key(d.path()).expect("again"), k);
        let mode = std::fs::metadata(key_path(d.path()))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
