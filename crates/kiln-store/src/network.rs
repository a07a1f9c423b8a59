//! The Raft transport between servers: openraft's RPCs (append entries,
//! vote, install snapshot) as JSON over HTTP/1.1, served by axum and sent
//! with hyper's pooled client.
//!
//! Why HTTP with axum and hyper rather than tonic: the server's REST API
//! is axum already, so the Raft routes are one more router on the same
//! stack; openraft's messages are serde types, so JSON carries them as
//! they are, with no protobuf schema to keep in step and no `protoc` at
//! build time; hyper keeps connections alive, so an append is one request
//! on an open socket. gRPC stays for the node protocol, where streaming
//! watches and generated clients pay for themselves.
//!
//! Invariants:
//! - Every RPC carries the cluster secret ([`SECRET_HEADER`]); the serving
//!   side compares its SHA-256 with its own in constant time and refuses a
//!   request without it (401) in a middleware, before the body is read or
//!   decoded. Anyone who can reach the Raft port but lacks the secret can
//!   neither vote nor append.
//! - Every request body is bounded ([`MAX_RPC_BYTES`]) and decoded into
//!   openraft's typed messages; a bad body is a 400, never a panic.
//! - [`Faults`] can cut this server's links to chosen peers: RPCs to them
//!   fail as unreachable before a byte is sent, and RPCs from them are
//!   refused. That is fault injection of the real network for tests (a
//!   partition), not a fake transport: everything else crosses real TCP.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State as AxState};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response as HttpResponse};
use axum::routing::post;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{Backoff, RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{Raft, ServerId, ServerNode, TypeConfig};

/// Largest Raft RPC body accepted or sent.
pub const MAX_RPC_BYTES: usize = 64 * 1024 * 1024;
/// The shortest time an RPC is given to answer.
pub const MIN_RPC_TTL: Duration = Duration::from_millis(500);
/// Header naming the sending server (used by [`Faults`]).
const FROM_HEADER: &str = "x-kiln-raft-from";
/// Header carrying the cluster secret every server shares.
pub const SECRET_HEADER: &str = "x-kiln-cluster-secret";
/// The shortest cluster secret accepted.
pub const MIN_SECRET_LEN: usize = 16;

/// SHA-256 of a cluster secret (what the serving side keeps).
fn secret_hash(secret: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(secret).into()
}

/// Equal without an early exit.
fn ct_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Per-peer link cuts of one server (fault injection for tests).
#[derive(Debug, Clone, Default)]
pub struct Faults {
    cut: Arc<Mutex<BTreeSet<ServerId>>>,
}

impl Faults {
    /// Cuts the links to and from `peer`.
    pub fn cut(&self, peer: ServerId) {
        self.lock().insert(peer);
    }
    /// Restores the link with `peer`.
    pub fn heal(&self, peer: ServerId) {
        self.lock().remove(&peer);
    }
    pub fn heal_all(&self) {
        self.lock().clear();
    }
    pub fn is_cut(&self, peer: ServerId) -> bool {
        self.lock().contains(&peer)
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeSet<ServerId>> {
        self.cut.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Opens clients to peers; one shared connection pool.
#[derive(Clone)]
pub struct HttpNetwork {
    from: ServerId,
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
    /// `https` when Raft runs over TLS, else `http`.
    scheme: &'static str,
    faults: Faults,
    /// The cluster secret, sent with every RPC.
    secret: axum::http::HeaderValue,
}

impl HttpNetwork {
    /// A client sending `secret` (printable ASCII, checked by
    /// [`crate::RaftNode::start`]) with every RPC.
    /// With `tls`, peers are dialled over TLS only (`https`), presenting
    /// the client certificate `tls` holds.
    pub fn new(
        from: ServerId,
        faults: Faults,
        secret: axum::http::HeaderValue,
        tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    ) -> HttpNetwork {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        connector.enforce_http(false);
        let (https, scheme) = match tls {
            Some(cfg) => {
                let mut cfg = (*cfg).clone();
                // The connector sets ALPN itself (and refuses a preset one).
                cfg.alpn_protocols.clear();
                (
                    hyper_rustls::HttpsConnectorBuilder::new()
                        .with_tls_config(cfg)
                        .https_only()
                        .enable_http1()
                        .wrap_connector(connector),
                    "https",
                )
            }
            None => {
                // Plain: an `http` URL never starts TLS; trusting nothing,
                // an `https` one could not complete.
                let none = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
                    rustls::crypto::aws_lc_rs::default_provider(),
                ))
                .with_safe_default_protocol_versions()
                .expect("the default provider supports the default versions")
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth();
                (
                    hyper_rustls::HttpsConnectorBuilder::new()
                        .with_tls_config(none)
                        .https_or_http()
                        .enable_http1()
                        .wrap_connector(connector),
                    "http",
                )
            }
        };
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(https);
        HttpNetwork {
            from,
            client,
            scheme,
            faults,
            secret,
        }
    }
}

impl RaftNetworkFactory<TypeConfig> for HttpNetwork {
    type Network = PeerClient;

    async fn new_client(&mut self, target: ServerId, node: &ServerNode) -> PeerClient {
        PeerClient {
            net: self.clone(),
            target,
            addr: node.raft_addr.clone(),
        }
    }
}

/// The client side of the link to one peer.
pub struct PeerClient {
    net: HttpNetwork,
    target: ServerId,
    addr: String,
}

/// Why one RPC did not get an answer.
#[derive(Debug, thiserror::Error)]
enum SendError {
    #[error("link to server {0} is cut (fault injection)")]
    Cut(ServerId),
    #[error("cannot reach {addr}")]
    Connect {
        addr: String,
        #[source]
        source: hyper_util::client::legacy::Error,
    },
    #[error("no answer from {addr} within {ms} ms")]
    Timeout { addr: String, ms: u128 },
    #[error("{addr} answered HTTP {status}: {body}")]
    Status {
        addr: String,
        status: StatusCode,
        body: String,
    },
    #[error("cannot encode or decode the RPC")]
    Codec(#[source] serde_json::Error),
    #[error("reading the answer from {addr} failed")]
    Body {
        addr: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("bad request URI")]
    Uri(#[source] axum::http::Error),
}

impl SendError {
    fn unreachable(&self) -> bool {
        matches!(self, SendError::Cut(_) | SendError::Connect { .. })
    }
}

impl PeerClient {
    async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        path: &str,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, SendError> {
        if self.net.faults.is_cut(self.target) {
            return Err(SendError::Cut(self.target));
        }
        let body = serde_json::to_vec(req).map_err(SendError::Codec)?;
        let request =
            axum::http::Request::post(format!("{}://{}{path}", self.net.scheme, self.addr))
                .header("content-type", "application/json")
                .header(FROM_HEADER, self.net.from.to_string())
                .header(SECRET_HEADER, self.net.secret.clone())
                .body(Full::new(Bytes::from(body)))
                .map_err(SendError::Uri)?;
        // openraft derives the TTL from the heartbeat interval; on a loaded
        // host that aborts appends that would have succeeded, so never
        // wait less than MIN_RPC_TTL.
        let ttl = option.hard_ttl().max(MIN_RPC_TTL);
        let fut =
            async {
                let resp = self.net.client.request(request).await.map_err(|source| {
                    SendError::Connect {
                        addr: self.addr.clone(),
                        source,
                    }
                })?;
                let status = resp.status();
                let bytes = Limited::new(resp.into_body(), MAX_RPC_BYTES)
                    .collect()
                    .await
                    .map_err(|source| SendError::Body {
                        addr: self.addr.clone(),
                        source,
                    })?
                    .to_bytes();
                if !status.is_success() {
                    return Err(SendError::Status {
                        addr: self.addr.clone(),
                        status,
                        body: String::from_utf8_lossy(&bytes[..bytes.len().min(512)]).into_owned(),
                    });
                }
                serde_json::from_slice(&bytes).map_err(SendError::Codec)
            };
        match tokio::time::timeout(ttl, fut).await {
            Ok(r) => r,
            Err(_) => Err(SendError::Timeout {
                addr: self.addr.clone(),
                ms: ttl.as_millis(),
            }),
        }
    }

    fn rpc_error<E: std::error::Error>(
        &self,
        e: SendError,
    ) -> RPCError<ServerId, ServerNode, RaftError<ServerId, E>> {
        if e.unreachable() {
            RPCError::Unreachable(Unreachable::new(&e))
        } else {
            RPCError::Network(NetworkError::new(&e))
        }
    }

    fn remote<E: std::error::Error>(
        &self,
        e: RaftError<ServerId, E>,
    ) -> RPCError<ServerId, ServerNode, RaftError<ServerId, E>> {
        RPCError::RemoteError(RemoteError::new(self.target, e))
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<ServerId>, RPCError<ServerId, ServerNode, RaftError<ServerId>>>
    {
        let r: Result<AppendEntriesResponse<ServerId>, RaftError<ServerId>> = self
            .call("/raft/append", &rpc, &option)
            .await
            .map_err(|e| self.rpc_error(e))?;
        r.map_err(|e| self.remote(e))
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<ServerId>,
        RPCError<ServerId, ServerNode, RaftError<ServerId, InstallSnapshotError>>,
    > {
        let r: Result<
            InstallSnapshotResponse<ServerId>,
            RaftError<ServerId, InstallSnapshotError>,
        > = self
            .call("/raft/snapshot", &rpc, &option)
            .await
            .map_err(|e| self.rpc_error(e))?;
        r.map_err(|e| self.remote(e))
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<ServerId>,
        option: RPCOption,
    ) -> Result<VoteResponse<ServerId>, RPCError<ServerId, ServerNode, RaftError<ServerId>>> {
        let r: Result<VoteResponse<ServerId>, RaftError<ServerId>> = self
            .call("/raft/vote", &rpc, &option)
            .await
            .map_err(|e| self.rpc_error(e))?;
        r.map_err(|e| self.remote(e))
    }

    fn backoff(&self) -> Backoff {
        Backoff::new(std::iter::repeat(Duration::from_millis(200)))
    }
}

#[derive(Clone)]
struct Served {
    raft: Raft,
    faults: Faults,
}

/// The serving side: `POST /raft/{append,vote,snapshot}`, each refused
/// (401, body unread) unless it carries `secret`. Merge it into the
/// server's internal listener, or let [`crate::RaftNode::start`] serve it
/// on its own.
pub fn raft_router(raft: Raft, faults: Faults, secret: &[u8]) -> Router {
    let want = Arc::new(secret_hash(secret));
    Router::new()
        .route("/raft/append", post(append))
        .route("/raft/vote", post(vote))
        .route("/raft/snapshot", post(snapshot))
        .layer(DefaultBodyLimit::max(MAX_RPC_BYTES))
        .layer(axum::middleware::from_fn(move |req, next| {
            check_secret(want.clone(), req, next)
        }))
        .with_state(Served { raft, faults })
}

/// Refuses a request whose secret is missing or wrong before its body is
/// read.
async fn check_secret(
    want: Arc<[u8; 32]>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> HttpResponse {
    let ok = req
        .headers()
        .get(SECRET_HEADER)
        .is_some_and(|v| ct_eq(&secret_hash(v.as_bytes()), &want));
    if !ok {
        tracing::warn!(uri = %req.uri(), "Raft RPC without the cluster secret refused");
        return (StatusCode::UNAUTHORIZED, "missing or wrong cluster secret").into_response();
    }
    next.run(req).await
}

fn refused(s: &Served, headers: &HeaderMap) -> Option<HttpResponse> {
    let from = headers
        .get(FROM_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<ServerId>().ok());
    match from {
        None => Some((StatusCode::BAD_REQUEST, "missing or bad x-kiln-raft-from").into_response()),
        Some(p) if s.faults.is_cut(p) => Some(
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "link cut (fault injection)",
            )
                .into_response(),
        ),
        Some(_) => None,
    }
}

#[allow(clippy::result_large_err)] // an HTTP response, built once per bad request
fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, HttpResponse> {
    serde_json::from_slice(body)
        .map_err(|e| (StatusCode::BAD_REQUEST, format!("malformed Raft RPC: {e}")).into_response())
}

fn json<T: Serialize>(v: &T) -> HttpResponse {
    match serde_json::to_vec(v) {
        Ok(b) => ([("content-type", "application/json")], b).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn append(AxState(s): AxState<Served>, headers: HeaderMap, body: Bytes) -> HttpResponse {
    if let Some(r) = refused(&s, &headers) {
        return r;
    }
    match decode::<AppendEntriesRequest<TypeConfig>>(&body) {
        Ok(req) => json(&s.raft.append_entries(req).await),
        Err(r) => r,
    }
}

async fn vote(AxState(s): AxState<Served>, headers: HeaderMap, body: Bytes) -> HttpResponse {
    if let Some(r) = refused(&s, &headers) {
        return r;
    }
    match decode::<VoteRequest<ServerId>>(&body) {
        Ok(req) => json(&s.raft.vote(req).await),
        Err(r) => r,
    }
}

async fn snapshot(AxState(s): AxState<Served>, headers: HeaderMap, body: Bytes) -> HttpResponse {
    if let Some(r) = refused(&s, &headers) {
        return r;
    }
    match decode::<InstallSnapshotRequest<TypeConfig>>(&body) {
        Ok(req) => json(&s.raft.install_snapshot(req).await),
        Err(r) => r,
    }
}
