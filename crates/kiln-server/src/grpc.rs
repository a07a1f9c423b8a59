//! The node protocol's server side (`kiln.node.v1.NodeService`, tonic):
//! `Register` (join token → per-node credential, stored hashed in the
//! Raft state as a `Role::Node` token bound to the node's name),
//! `Heartbeat`, `Watch` (the node's `query::node_desired`, streamed from
//! this replica's applied state) and `Report`.
//!
//! Invariants:
//! - A gate in front of the service ([`gate`]) refuses, before a byte of
//!   the message is read or decoded, every call that carries neither the
//!   join token (`kiln-join-token` metadata) nor a live node credential
//!   (`authorization: Bearer`). Messages are bounded by [`MAX_MESSAGE`].
//! - `Register` for a name that has a live credential must present that
//!   credential: the join token alone cannot take over a registered node
//!   (an operator replacing a dead node revokes its credential first:
//!   `kiln nodes revoke-credential NAME`).
//! - Image lists are bounded, not refused: a node reporting more than
//!   `MAX_NODE_IMAGES` references has the first ones recorded, with a
//!   warning, so its heartbeats never fail over them.
//! - Every call but `Register` carries `authorization: Bearer
//!   <credential>`; the credential must be a live node credential bound to
//!   the node named in the request (else UNAUTHENTICATED /
//!   PERMISSION_DENIED).
//! - Writes (`Register`, `Heartbeat`, `Report`) are proposed here only on
//!   the leader; a follower answers UNAVAILABLE with the leader's API URL
//!   (which also serves gRPC) in the `kiln-leader` metadata, or without it
//!   during an election ("retry shortly").
//! - `Watch` never sends two equal `NodeDesired` in a row (compared by
//!   content: the revision does not move when a sandbox is forgotten).
//! - Payload JSON is decoded into kiln-api types (unknown fields refused);
//!   a bad payload is INVALID_ARGUMENT, never a panic.

use std::collections::BTreeSet;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use kiln_api::cluster::{Capacity, DriverKind, NodeName, Role};
use kiln_api::node_rpc::node_service_server::{NodeService, NodeServiceServer};
use kiln_api::node_rpc::{
    DesiredUpdate, HeartbeatReply, HeartbeatRequest, RegisterReply, RegisterRequest, ReportReply,
    ReportRequest, WatchRequest,
};
use kiln_api::sandbox::{SandboxId, SandboxState};
use kiln_store::{Command, Response, WriteError, query};
use tonic::metadata::MetadataMap;
use tonic::{Request, Status};

use crate::server::{Shared, ct_eq, now_ms, random_hex, sha256};

/// Most sandboxes one `Report` may carry.
pub const MAX_REPORT_ITEMS: usize = 10_000;
/// Largest gRPC message accepted: a report of `MAX_REPORT_ITEMS`
/// sandboxes, or a registration with `MAX_NODE_IMAGES` references, fits.
pub const MAX_MESSAGE: usize = 4 * 1024 * 1024;
/// Metadata carrying the join token (also accepted in `RegisterRequest`).
pub const JOIN_TOKEN_METADATA: &str = "kiln-join-token";

/// The NodeService as an axum router (merged into the API listener).
pub fn router(shared: Arc<Shared>) -> axum::Router {
    let svc = NodeServiceServer::new(NodeRpc {
        shared: shared.clone(),
    })
    .max_decoding_message_size(MAX_MESSAGE)
    .max_encoding_message_size(MAX_MESSAGE);
    tonic::service::Routes::new(svc)
        .into_axum_router()
        .layer(axum::middleware::from_fn_with_state(shared, gate))
}

/// Lets a call through only with the join token or a live node
/// credential in its headers; the message body is not touched before.
async fn gate(
    axum::extract::State(shared): axum::extract::State<Arc<Shared>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let h = req.headers();
    let join_ok = h
        .get(JOIN_TOKEN_METADATA)
        .is_some_and(|v| ct_eq(&sha256(v.as_bytes()), &shared.join_hash));
    let cred_ok = || {
        h.get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|secret| {
                let hash = query::hash_token(secret.trim());
                shared.raft.read_local(|s| {
                    query::token_by_hash(s, &hash).is_some_and(|t| t.role == Role::Node)
                })
            })
    };
    // A credential minted a moment ago may not have reached a follower:
    // let such a call through when this replica does not lead (the
    // handler waits for it, then decides).
    let follower = || shared.raft.status().role != kiln_store::RaftRole::Leader;
    if join_ok || (h.contains_key("authorization") && (cred_ok() || follower())) {
        return next.run(req).await;
    }
    Status::unauthenticated(
        "a node call needs the join token (kiln-join-token) or its node credential (authorization: Bearer)",
    )
    .into_http()
}

struct NodeRpc {
    shared: Arc<Shared>,
}

/// A write refused because this replica does not lead.
pub(crate) fn write_status(e: WriteError) -> Status {
    match e {
        WriteError::ForwardToLeader { leader } => {
            let url = leader.and_then(|l| l.node).map(|n| n.api_addr);
            let mut st = Status::unavailable(match &url {
                Some(u) => format!("not the leader; the leader is {u} (kiln-leader)"),
                None => "no leader is known (election in progress); retry shortly".to_owned(),
            });
            if let Some(u) = url
                && let Ok(v) = u.parse()
            {
                st.metadata_mut().insert("kiln-leader", v);
            }
            st
        }
        other => Status::unavailable(other.to_string()),
    }
}

fn rejected(r: &kiln_store::Rejection) -> Status {
    use kiln_store::Rejection as R;
    match r {
        R::NotFound { .. } => Status::not_found(r.to_string()),
        R::Invalid { .. } => Status::invalid_argument(r.to_string()),
        R::AlreadyExists { .. } => Status::already_exists(r.to_string()),
        R::QuotaExceeded { .. } => Status::resource_exhausted(r.to_string()),
        _ => Status::failed_precondition(r.to_string()),
    }
}

fn node_name(s: &str) -> Result<NodeName, Status> {
    NodeName::new(s).map_err(|e| Status::invalid_argument(e.to_string()))
}

fn json<T: serde::de::DeserializeOwned>(field: &str, b: &[u8]) -> Result<T, Status> {
    serde_json::from_slice(b).map_err(|e| Status::invalid_argument(format!("{field}: {e}")))
}

fn bearer(md: &MetadataMap) -> Option<&str> {
    md.get("authorization")?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

/// Cuts a node's image list to what the state accepts (never refuses it).
fn bound_images(node: &NodeName, images: &mut Vec<String>) {
    let left_out = kiln_api::cluster::bound_node_images(images);
    if left_out > 0 {
        tracing::warn!(%node, left_out, recorded = images.len(), "image list bounded");
    }
}

impl NodeRpc {
    /// A node name with a live credential is re-registered only by the
    /// holder of that credential.
    fn may_register(&self, name: &NodeName, presented: Option<&str>) -> Result<(), Status> {
        let live: Vec<String> = self.shared.raft.read_local(|s| {
            s.tokens
                .values()
                .filter(|t| {
                    t.role == Role::Node
                        && t.node.as_ref() == Some(name)
                        && t.revoked_at_ms.is_none()
                })
                .map(|t| t.sha256.clone())
                .collect()
        });
        if live.is_empty() || presented.is_some_and(|p| live.iter().any(|h| h == p)) {
            return Ok(());
        }
        Err(Status::permission_denied(format!(
            "node {name} is registered with a live credential: present it, or have an admin \
             revoke it (`kiln nodes revoke-credential {name}`) to replace the node"
        )))
    }

    /// Checks the credential speaks for `node`. A credential minted a
    /// moment ago may not have reached this replica yet: wait briefly for
    /// the applied index to move before refusing.
    async fn authenticate(&self, md: &MetadataMap, node: &NodeName) -> Result<(), Status> {
        let secret = bearer(md).ok_or_else(|| {
            Status::unauthenticated("missing `authorization: Bearer <node credential>`")
        })?;
        let hash = query::hash_token(secret);
        let mut applied = self.shared.raft.subscribe_applied();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        loop {
            let found = self
                .shared
                .raft
                .read_local(|s| query::token_by_hash(s, &hash).map(|t| (t.role, t.node.clone())));
            match found {
                Some((Role::Node, Some(n))) if n == *node => return Ok(()),
                Some(_) => {
                    return Err(Status::permission_denied(format!(
                        "this credential does not speak for node {node}"
                    )));
                }
                None => {
                    // The leader applied every credential it acknowledged:
                    // only a follower may be behind.
                    let leads = self.shared.raft.status().role == kiln_store::RaftRole::Leader;
                    if leads
                        || !matches!(
                            tokio::time::timeout_at(deadline, applied.changed()).await,
                            Ok(Ok(()))
                        )
                    {
                        return Err(Status::unauthenticated(
                            "unknown or revoked node credential; register again",
                        ));
                    }
                }
            }
        }
    }

    /// The node used a credential (authenticated): once it is known to
    /// have saved it, its other credentials (the one kept at its last
    /// registration) are revoked. One write, the first time only.
    async fn confirm_credential(&self, md: &MetadataMap, node: &NodeName) -> Result<(), Status> {
        let Some(secret) = bearer(md) else {
            return Ok(());
        };
        let hash = query::hash_token(secret);
        let others = self.shared.raft.read_local(|s| {
            s.tokens.values().any(|t| {
                t.role == Role::Node
                    && t.node.as_ref() == Some(node)
                    && t.revoked_at_ms.is_none()
                    && t.sha256 != hash
            })
        });
        if others {
            self.write(Command::ConfirmNodeCredential {
                node: node.clone(),
                sha256: hash,
                now_ms: now_ms(),
            })
            .await?;
        }
        Ok(())
    }

    async fn write(&self, cmd: Command) -> Result<Response, Status> {
        let r = self.shared.raft.write(cmd).await.map_err(write_status)?;
        match r {
            Response::Rejected(rej) => Err(rejected(&rej)),
            ok => Ok(ok),
        }
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<DesiredUpdate, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl NodeService for NodeRpc {
    async fn register(
        &self,
        req: Request<RegisterRequest>,
    ) -> Result<tonic::Response<RegisterReply>, Status> {
        let md_join = req
            .metadata()
            .get(JOIN_TOKEN_METADATA)
            .map(|v| v.as_bytes().to_vec());
        let presented = bearer(req.metadata()).map(query::hash_token);
        let mut r = req.into_inner();
        let join = md_join.unwrap_or_else(|| r.join_token.as_bytes().to_vec());
        if !ct_eq(&sha256(&join), &self.shared.join_hash) {
            return Err(Status::unauthenticated("wrong join token"));
        }
        let name = node_name(&r.name)?;
        self.may_register(&name, presented.as_deref())?;
        let capacity: Capacity = json("capacity_json", &r.capacity_json)?;
        let driver: DriverKind = json("driver_json", &r.driver_json)?;
        if !valid_node_address(&r.address) {
            return Err(Status::invalid_argument(
                "address: HOST:PORT (an IP address or a DNS name, and a port; no scheme or path)",
            ));
        }
        bound_images(&name, &mut r.images);
        let now = now_ms();
        let stream_key = r.stream_key;
        let cert = r.stream_cert_sha256;
        if !stream_key.is_empty() && cert.is_empty() {
            return Err(Status::invalid_argument(
                "stream_cert_sha256: required with a stream_key (the stream endpoints serve TLS \
                 and the server pins their certificate)",
            ));
        }
        if stream_key.is_empty()
            && self
                .shared
                .raft
                .read_local(|s| s.nodes.get(&name).is_some_and(|n| n.stream_key.is_some()))
        {
            // Keeping the old key would keep it valid at the server after
            // the node dropped it.
            return Err(Status::invalid_argument(format!(
                "stream_key: node {name} served stream endpoints; a registration without a \
                 stream key is refused (give --address, or remove the node to start over)"
            )));
        }
        self.write(Command::RegisterNode {
            name: name.clone(),
            address: r.address,
            capacity,
            driver,
            labels: r.labels.into_iter().collect(),
            images: r.images.into_iter().collect(),
            now_ms: now,
        })
        .await?;
        if !stream_key.is_empty() {
            self.write(Command::SetNodeStreamKey {
                name: name.clone(),
                key: stream_key,
                cert_sha256: Some(cert),
            })
            .await?;
        }
        // Earlier credentials go, except the one presented (the node holds
        // it): if the node dies before it saves the new one, it can still
        // register with that. The new one becomes the only one once used
        // (`confirm_credential`).
        self.write(Command::RotateNodeCredentials {
            node: name.clone(),
            keep: presented.clone(),
            now_ms: now,
        })
        .await?;
        let secret = format!("kilnnode_{}", random_hex(24));
        self.write(Command::CreateToken {
            id: format!("node-{}", random_hex(8)),
            tenant: None,
            role: Role::Node,
            sha256: query::hash_token(&secret),
            description: format!("credential of node {name}"),
            now_ms: now,
            node: Some(name.clone()),
        })
        .await?;
        tracing::info!(node = %name, "node registered");
        Ok(tonic::Response::new(RegisterReply {
            credential: secret,
            heartbeat_interval_ms: self.shared.cfg.heartbeat_interval_ms,
            grace_ms: self.shared.cfg.grace_ms,
        }))
    }

    async fn heartbeat(
        &self,
        req: Request<HeartbeatRequest>,
    ) -> Result<tonic::Response<HeartbeatReply>, Status> {
        let name = node_name(&req.get_ref().name)?;
        self.authenticate(req.metadata(), &name).await?;
        self.confirm_credential(req.metadata(), &name).await?;
        let mut r = req.into_inner();
        if r.images_changed {
            bound_images(&name, &mut r.images);
        }
        let images = r
            .images_changed
            .then(|| r.images.into_iter().collect::<BTreeSet<_>>());
        // The templates are an extra: what is wrong with them is dropped
        // (logged), never the heartbeat (the node's liveness).
        let templates = if r.templates_changed {
            match serde_json::from_slice::<Vec<kiln_api::templates::NodeTemplate>>(
                &r.templates_json,
            ) {
                Ok(mut t) => {
                    if t.len() > kiln_api::templates::MAX_NODE_TEMPLATES {
                        tracing::warn!(node = %name, count = t.len(), "too many automatic templates reported; the rest dropped");
                        t.truncate(kiln_api::templates::MAX_NODE_TEMPLATES);
                    }
                    t.retain(|t| {
                        let why = t.validate().err().or_else(|| {
                            t.node.is_some().then(|| "node is set by the server".to_owned())
                        });
                        if let Some(why) = &why {
                            tracing::warn!(node = %name, template = %kiln_api::text::sanitize(&t.name), error = %why, "an automatic template report was dropped");
                        }
                        why.is_none()
                    });
                    Some(t)
                }
                Err(e) => {
                    tracing::warn!(node = %name, error = %e, "undecodable automatic templates; the last list is kept");
                    None
                }
            }
        } else {
            None
        };
        self.write(Command::Heartbeat {
            name,
            now_ms: now_ms(),
            images,
            templates,
        })
        .await?;
        Ok(tonic::Response::new(HeartbeatReply {}))
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        req: Request<WatchRequest>,
    ) -> Result<tonic::Response<Self::WatchStream>, Status> {
        let name = node_name(&req.get_ref().name)?;
        self.authenticate(req.metadata(), &name).await?;
        let shared = self.shared.clone();
        if shared
            .raft
            .read_local(|s| query::node_desired(s, &name))
            .is_none()
        {
            return Err(Status::not_found(format!(
                "node {name} is not registered; register first"
            )));
        }
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<DesiredUpdate, Status>>(4);
        tokio::spawn(async move {
            let mut applied = shared.raft.subscribe_applied();
            let mut last: Option<kiln_api::cluster::NodeDesired> = None;
            loop {
                applied.borrow_and_update();
                let now = shared.raft.read_local(|s| query::node_desired(s, &name));
                let Some(now) = now else {
                    let _ = tx
                        .send(Err(Status::not_found(format!(
                            "node {name} was removed from the cluster"
                        ))))
                        .await;
                    return;
                };
                if last.as_ref() != Some(&now) {
                    let update = match serde_json::to_vec(&now) {
                        Ok(desired_json) => Ok(DesiredUpdate {
                            revision: now.revision,
                            desired_json,
                        }),
                        Err(e) => Err(Status::internal(e.to_string())),
                    };
                    if tx.send(update).await.is_err() {
                        return;
                    }
                    last = Some(now);
                }
                tokio::select! {
                    r = applied.changed() => if r.is_err() { return },
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(tonic::Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn report(
        &self,
        req: Request<ReportRequest>,
    ) -> Result<tonic::Response<ReportReply>, Status> {
        let name = node_name(&req.get_ref().name)?;
        self.authenticate(req.metadata(), &name).await?;
        let r = req.into_inner();
        if !r.templates_json.is_empty() {
            return self.report_templates(name, &r.templates_json).await;
        }
        if r.sandboxes.len() > MAX_REPORT_ITEMS {
            return Err(Status::invalid_argument(format!(
                "sandboxes: at most {MAX_REPORT_ITEMS} per report"
            )));
        }
        let now = now_ms();
        // Decode everything first; refuse per item what does not decode.
        let mut refused = vec![String::new(); r.sandboxes.len()];
        let mut cmds = Vec::new();
        for (i, s) in r.sandboxes.into_iter().enumerate() {
            let id = match SandboxId::try_from(s.id) {
                Ok(id) => id,
                Err(e) => {
                    refused[i] = e.to_string();
                    continue;
                }
            };
            let state: SandboxState = match serde_json::from_slice(&s.state_json) {
                Ok(st) => st,
                Err(e) => {
                    refused[i] = format!("state_json: {e}");
                    continue;
                }
            };
            let start = if s.start_json.is_empty() {
                None
            } else {
                match serde_json::from_slice::<kiln_api::sandbox::StartReport>(&s.start_json)
                    .map_err(|e| e.to_string())
                    .and_then(|r| r.validate().map(|()| r))
                {
                    Ok(r) => Some(r),
                    Err(e) => {
                        // The state is what matters: keep it, drop only
                        // the account of the start.
                        tracing::warn!(node = %name, sandbox = %id, error = %e, "a start report out of bounds was dropped");
                        None
                    }
                }
            };
            cmds.push((
                i,
                Command::ReportSandbox {
                    node: name.clone(),
                    id,
                    generation: s.generation,
                    state,
                    now_ms: now,
                    start,
                },
            ));
        }
        // Concurrent writes become one Raft entry (group proposal).
        let results = futures::future::join_all(
            cmds.into_iter()
                .map(|(i, c)| async move { (i, self.shared.raft.write(c).await) }),
        )
        .await;
        for (i, res) in results {
            match res {
                Ok(Response::Rejected(rej)) => refused[i] = rej.to_string(),
                Ok(_) => {}
                Err(e) => return Err(write_status(e)),
            }
        }
        Ok(tonic::Response::new(ReportReply { refused }))
    }
}

impl NodeRpc {
    /// A node's template report (`templates_json`): one `ReportTemplate`
    /// per template and a `ReportPool` where it has a pool target there;
    /// the answer's `refused` is per template, in order.
    async fn report_templates(
        &self,
        node: NodeName,
        json: &[u8],
    ) -> Result<tonic::Response<ReportReply>, Status> {
        use kiln_api::templates::{MAX_TEMPLATE_REPORTS, TemplateReport};
        let reports: Vec<TemplateReport> = serde_json::from_slice(json)
            .map_err(|e| Status::invalid_argument(format!("templates_json: {e}")))?;
        if reports.len() > MAX_TEMPLATE_REPORTS {
            return Err(Status::invalid_argument(format!(
                "templates: at most {MAX_TEMPLATE_REPORTS} per report"
            )));
        }
        let mut refused = vec![String::new(); reports.len()];
        for (i, t) in reports.into_iter().enumerate() {
            let key = kiln_store::state::scoped(t.tenant.as_ref(), &t.name);
            let has_pool = self.shared.raft.read_local(|st| {
                st.pools
                    .get(&key)
                    .is_some_and(|p| p.nodes.contains_key(&node))
            });
            let mut commands = vec![Command::ReportTemplate {
                node: node.clone(),
                tenant: t.tenant.clone(),
                name: t.name.clone(),
                ready: t.ready,
                size_bytes: t.size_bytes,
                error: t.error.clone(),
            }];
            if has_pool {
                commands.push(Command::ReportPool {
                    node: node.clone(),
                    tenant: t.tenant.clone(),
                    template: t.name.clone(),
                    ready: t.pool_ready,
                    members: t.members.clone(),
                });
            }
            for c in commands {
                match self.shared.raft.write(c).await {
                    Ok(Response::Rejected(rej)) => {
                        refused[i] = rej.to_string();
                        break;
                    }
                    Ok(_) => {}
                    Err(e) => return Err(write_status(e)),
                }
            }
        }
        Ok(tonic::Response::new(ReportReply { refused }))
    }
}

/// A node's `--address`: `HOST:PORT` only (port 0: the node serves no
/// stream endpoints), the server builds the URL of its
/// stream endpoints from it (no scheme, path, query or user info, so a
/// node cannot point the server's requests at an arbitrary URL).
pub fn valid_node_address(a: &str) -> bool {
    if a.len() > 255 {
        return false;
    }
    if a.parse::<std::net::SocketAddr>().is_ok() {
        return true;
    }
    let Some((host, port)) = a.rsplit_once(':') else {
        return false;
    };
    port.parse::<u16>().is_ok()
        && !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

#[cfg(test)]
mod address_tests {
    #[test]
    fn node_addresses_are_host_and_port_only() {
        for ok in [
            "10.0.0.5:7443",
            "[::1]:80",
            "node-1.example.com:9000",
            "localhost:1",
        ] {
            assert!(super::valid_node_address(ok), "{ok}");
        }
        for bad in [
            "",
            "http://10.0.0.5:80",
            "10.0.0.5:80/x?",
            "10.0.0.5",
            "user@host:80",
            "host:80#x",
            "ho st:80",
            "-host:80",
        ] {
            assert!(!super::valid_node_address(bad), "{bad}");
        }
    }
}
