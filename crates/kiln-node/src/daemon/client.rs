//! The daemon's side of the node protocol (`kiln.node.v1.NodeService`):
//! which server to talk to (a list of URLs, rotated on failure; the
//! `kiln-leader` hint followed), the node's credential (stored 0600 in the
//! state directory, presented again after a restart), and the four calls.

use std::path::PathBuf;
use std::time::Duration;

use kiln_api::cluster::NodeName;
use kiln_api::node_rpc::node_service_client::NodeServiceClient;
use kiln_api::node_rpc::{
    HeartbeatRequest, RegisterReply, RegisterRequest, ReportRequest, SandboxReport, WatchRequest,
};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};

/// What the node registers with (see `RegisterRequest`).
#[derive(Debug, Clone)]
pub struct Registration {
    pub join_token: String,
    pub name: NodeName,
    pub address: String,
    /// The key the node's stream endpoints demand (empty: none served).
    pub stream_key: String,
    /// Lowercase hex SHA-256 of the certificate the stream endpoints serve
    /// (the server pins it).
    pub stream_cert_sha256: String,
    pub capacity_json: Vec<u8>,
    pub driver_json: Vec<u8>,
    pub labels: std::collections::HashMap<String, String>,
    pub images: Vec<String>,
}

/// The node's credential as stored in `<state>/node/credential.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredCredential {
    pub node: NodeName,
    pub credential: String,
}

/// A call failed (after the connection handling below).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no server URL was given")]
    NoServer,
    #[error("{url} is not a server URL: {message}")]
    BadUrl { url: String, message: String },
    #[error("cannot connect to {url}: {message}")]
    Connect { url: String, message: String },
    #[error("{0}")]
    Status(#[from] Status),
    #[error("the server sent invalid {what}: {message}")]
    Invalid { what: &'static str, message: String },
    #[error("cannot store the node credential in {path}")]
    Store {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl ClientError {
    /// The server does not (or no longer) know this node's credential.
    pub fn is_auth(&self) -> bool {
        matches!(self, ClientError::Status(s) if matches!(s.code(), Code::Unauthenticated | Code::PermissionDenied | Code::NotFound))
    }
}

struct ConnState {
    servers: Vec<String>,
    next: usize,
    /// A leader named by a follower (`kiln-leader`), tried first.
    hint: Option<String>,
    current: Option<(String, NodeServiceClient<Channel>)>,
}

/// The connection to the control plane, shared by the daemon's tasks.
pub struct Client {
    conn: Mutex<ConnState>,
    credential: std::sync::RwLock<Option<String>>,
    credential_path: PathBuf,
    name: NodeName,
    /// CA certificate(s) (PEM) an `https://` server must chain to.
    ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("name", &self.name).finish()
    }
}

/// Timeouts of one unary call and of connecting.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

impl Client {
    /// A client of `servers` (URLs; `host:port` means `http://host:port`)
    /// for node `name`, reading a stored credential from `state_dir`.
    pub fn new(servers: &[String], name: NodeName, state_dir: &std::path::Path) -> Client {
        let servers = servers
            .iter()
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
            .map(|s| {
                if s.contains("://") {
                    s.to_string()
                } else {
                    format!("http://{s}")
                }
            })
            .collect();
        let credential_path = state_dir.join("node").join("credential.json");
        let stored = std::fs::read(&credential_path)
            .ok()
            .and_then(|b| serde_json::from_slice::<StoredCredential>(&b).ok())
            .filter(|c| c.node == name)
            .map(|c| c.credential);
        Client {
            conn: Mutex::new(ConnState {
                servers,
                next: 0,
                hint: None,
                current: None,
            }),
            credential: std::sync::RwLock::new(stored),
            credential_path,
            ca_pem: None,
            name,
        }
    }

    /// Verifies `https://` servers against these CA certificate(s) (PEM).
    pub fn with_ca(mut self, ca_pem: Vec<u8>) -> Client {
        self.ca_pem = Some(ca_pem);
        self
    }

    pub fn name(&self) -> &NodeName {
        &self.name
    }

    pub fn has_credential(&self) -> bool {
        self.credential.read().map(|c| c.is_some()).unwrap_or(false)
    }

    async fn client(&self) -> Result<(String, NodeServiceClient<Channel>), ClientError> {
        let mut c = self.conn.lock().await;
        if let Some((url, cl)) = &c.current {
            return Ok((url.clone(), cl.clone()));
        }
        if c.servers.is_empty() {
            return Err(ClientError::NoServer);
        }
        let url = match c.hint.take() {
            Some(h) => h,
            None => {
                let i = c.next % c.servers.len();
                c.servers[i].clone()
            }
        };
        let ep = Endpoint::from_shared(url.clone())
            .map_err(|e| ClientError::BadUrl {
                url: url.clone(),
                message: e.to_string(),
            })?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true);
        let ep = if url.starts_with("https://") {
            let Some(ca) = &self.ca_pem else {
                return Err(ClientError::BadUrl {
                    url,
                    message: "an https:// server needs the CA certificate (kiln node --ca FILE)"
                        .into(),
                });
            };
            ep.tls_config(
                tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(ca)),
            )
            .map_err(|e| ClientError::BadUrl {
                url: url.clone(),
                message: e.to_string(),
            })?
        } else {
            ep
        };
        match ep.connect().await {
            Ok(ch) => {
                let cl = NodeServiceClient::new(ch);
                c.current = Some((url.clone(), cl.clone()));
                Ok((url, cl))
            }
            Err(e) => {
                c.next = c.next.wrapping_add(1);
                Err(ClientError::Connect {
                    url,
                    message: e.to_string(),
                })
            }
        }
    }

    /// After a failed call on `url`: follow a `kiln-leader` hint, else try
    /// the next server next time.
    async fn failed(&self, url: &str, err: &ClientError) {
        let mut c = self.conn.lock().await;
        if c.current.as_ref().is_some_and(|(u, _)| u != url) {
            return;
        }
        let hint = match err {
            ClientError::Status(s) => s
                .metadata()
                .get("kiln-leader")
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
                .filter(|h| !h.is_empty() && h.len() < 1024 && !h.chars().any(char::is_control))
                .map(|h| {
                    if h.contains("://") {
                        h.to_string()
                    } else {
                        format!("http://{h}")
                    }
                }),
            _ => None,
        };
        let auth_only = err.is_auth();
        if auth_only {
            return;
        }
        c.current = None;
        match hint {
            Some(h) if h != url => {
                tracing::info!(leader = %h, "following the leader hint");
                c.hint = Some(h);
            }
            _ => c.next = c.next.wrapping_add(1),
        }
    }

    fn authorize<T>(&self, mut req: Request<T>) -> Request<T> {
        req.set_timeout(CALL_TIMEOUT);
        let cred = self.credential.read().ok().and_then(|c| c.clone());
        if let Some(cred) = cred
            && let Ok(v) = format!("Bearer {cred}").parse()
        {
            req.metadata_mut().insert("authorization", v);
        }
        req
    }

    /// Registers (or re-registers: the stored credential, if any, is
    /// presented too) and stores the credential the server answers.
    pub async fn register(&self, reg: &Registration) -> Result<RegisterReply, ClientError> {
        let (url, mut cl) = self.client().await?;
        let req = self.authorize(Request::new(RegisterRequest {
            join_token: reg.join_token.clone(),
            name: reg.name.to_string(),
            address: reg.address.clone(),
            capacity_json: reg.capacity_json.clone(),
            driver_json: reg.driver_json.clone(),
            labels: reg.labels.clone(),
            images: reg.images.clone(),
            stream_key: reg.stream_key.clone(),
            stream_cert_sha256: reg.stream_cert_sha256.clone(),
        }));
        // The join token goes in metadata too: the server checks it there
        // before it reads the message.
        let mut req = req;
        if let Ok(v) = reg.join_token.parse() {
            req.metadata_mut().insert("kiln-join-token", v);
        }
        let reply = match cl.register(req).await {
            Ok(r) => r.into_inner(),
            Err(s) => {
                let e = ClientError::Status(s);
                self.failed(&url, &e).await;
                return Err(e);
            }
        };
        let cred = reply.credential.trim().to_string();
        if cred.is_empty() || cred.len() > 4096 || !cred.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ClientError::Invalid {
                what: "credential",
                message: "not 1-4096 printable ASCII characters".into(),
            });
        }
        self.store_credential(&cred)?;
        if let Ok(mut c) = self.credential.write() {
            *c = Some(cred);
        }
        Ok(reply)
    }

    fn store_credential(&self, cred: &str) -> Result<(), ClientError> {
        let path = &self.credential_path;
        let err = |source| ClientError::Store {
            path: path.clone(),
            source,
        };
        let dir = path.parent().unwrap_or(std::path::Path::new("."));
        std::fs::create_dir_all(dir).map_err(err)?;
        let body = serde_json::to_vec(&StoredCredential {
            node: self.name.clone(),
            credential: cred.to_string(),
        })
        .expect("credentials serialize");
        let tmp = dir.join(".credential.json.tmp");
        super::backend::write_synced(&tmp, &body).map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)
    }

    /// "Still alive", with the cached images and the automatic templates
    /// when they changed.
    pub async fn heartbeat(
        &self,
        images: Option<Vec<String>>,
        templates: Option<&[kiln_api::templates::NodeTemplate]>,
    ) -> Result<(), ClientError> {
        let (url, mut cl) = self.client().await?;
        let req = self.authorize(Request::new(HeartbeatRequest {
            name: self.name.to_string(),
            images_changed: images.is_some(),
            images: images.unwrap_or_default(),
            templates_changed: templates.is_some(),
            templates_json: templates.map_or_else(Vec::new, |t| {
                serde_json::to_vec(t).expect("templates serialize")
            }),
        }));
        match cl.heartbeat(req).await {
            Ok(_) => Ok(()),
            Err(s) => {
                let e = ClientError::Status(s);
                self.failed(&url, &e).await;
                Err(e)
            }
        }
    }

    /// Opens the watch of this node's desired state.
    pub async fn watch(
        &self,
        revision: u64,
    ) -> Result<(String, tonic::Streaming<kiln_api::node_rpc::DesiredUpdate>), ClientError> {
        let (url, mut cl) = self.client().await?;
        let mut req = Request::new(WatchRequest {
            name: self.name.to_string(),
            revision,
        });
        let cred = self.credential.read().ok().and_then(|c| c.clone());
        if let Some(cred) = cred
            && let Ok(v) = format!("Bearer {cred}").parse()
        {
            req.metadata_mut().insert("authorization", v);
        }
        match cl.watch(req).await {
            Ok(r) => Ok((url, r.into_inner())),
            Err(s) => {
                let e = ClientError::Status(s);
                self.failed(&url, &e).await;
                Err(e)
            }
        }
    }

    /// A watch stream on `url` broke.
    pub async fn stream_failed(&self, url: &str, err: &ClientError) {
        self.failed(url, err).await;
    }

    /// Reports `sandboxes`; per sandbox, `Some(why)` when refused.
    pub async fn report(
        &self,
        sandboxes: Vec<SandboxReport>,
    ) -> Result<Vec<Option<String>>, ClientError> {
        let n = sandboxes.len();
        let (url, mut cl) = self.client().await?;
        let req = self.authorize(Request::new(ReportRequest {
            name: self.name.to_string(),
            sandboxes,
            templates_json: Vec::new(),
        }));
        match cl.report(req).await {
            Ok(r) => {
                let refused = r.into_inner().refused;
                Ok((0..n)
                    .map(|i| {
                        refused
                            .get(i)
                            .filter(|s| !s.is_empty())
                            .map(|s| s.chars().take(300).collect())
                    })
                    .collect())
            }
            Err(s) => {
                let e = ClientError::Status(s);
                self.failed(&url, &e).await;
                Err(e)
            }
        }
    }
}

impl Client {
    /// Reports what the node holds of the templates of its desired state;
    /// per template, `Some(why)` when refused.
    pub async fn report_templates(
        &self,
        templates: &[kiln_api::templates::TemplateReport],
    ) -> Result<Vec<Option<String>>, ClientError> {
        let (url, mut cl) = self.client().await?;
        let req = self.authorize(Request::new(ReportRequest {
            name: self.name.to_string(),
            sandboxes: Vec::new(),
            templates_json: serde_json::to_vec(templates).expect("reports serialize"),
        }));
        match cl.report(req).await {
            Ok(r) => {
                let refused = r.into_inner().refused;
                Ok((0..templates.len())
                    .map(|i| {
                        refused
                            .get(i)
                            .filter(|s| !s.is_empty())
                            .map(|s| s.chars().take(300).collect())
                    })
                    .collect())
            }
            Err(s) => {
                let e = ClientError::Status(s);
                self.failed(&url, &e).await;
                Err(e)
            }
        }
    }
}

/// Exponential backoff with jitter: 200 ms doubling to 5 s.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            next: Duration::from_millis(200),
        }
    }
}

impl Backoff {
    pub async fn wait(&mut self) {
        let jitter = rand::random_range(0..=self.next.as_millis() as u64 / 4);
        tokio::time::sleep(self.next + Duration::from_millis(jitter)).await;
        self.next = (self.next * 2).min(Duration::from_secs(5));
    }

    pub fn reset(&mut self) {
        *self = Backoff::default();
    }
}
