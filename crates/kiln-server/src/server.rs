//! One `kiln server` replica: its Raft node, the API listener (REST,
//! `/metrics` and the node protocol on one port), the bootstrap admin
//! token and the leader's reconcile loop.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use kiln_api::cluster::Role;
use kiln_store::{
    ClusterError, Command, RaftNode, RaftNodeConfig, Response, ServerId, ServerNode, StartError,
    WriteError,
};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{ServerConfig, api_url};
use crate::metrics::Metrics;

/// What every handler shares.
pub struct Shared {
    pub raft: RaftNode,
    pub cfg: ServerConfig,
    /// SHA-256 of the join token (compared hashed, in constant time).
    pub join_hash: [u8; 32],
    /// This replica's API URL.
    pub api_url: String,
    pub metrics: Metrics,
    /// Client for forwarding REST writes to the leader.
    pub http: reqwest::Client,
    /// The open stream sessions per tenant (`rest::streams`).
    pub streams: crate::rest::streams::Sessions,
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Start(#[from] StartError),
    #[error("cannot listen on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the join token is empty")]
    EmptyJoinToken,
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error("cannot write the admin token to {path}")]
    AdminToken {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot build the HTTP client")]
    Http(#[source] reqwest::Error),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("the bootstrap admin token could not be committed: {0}")]
    Bootstrap(String),
    #[error(transparent)]
    ClusterSecret(#[from] crate::config::ClusterSecretError),
}

/// Requests handled at once on the API listener (more wait their turn).
pub const MAX_CONCURRENT_REQUESTS: usize = 512;

/// A running replica.
pub struct Server {
    shared: Arc<Shared>,
    api_addr: SocketAddr,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    /// The API's router, for more listeners ([`Server::serve_unix`]).
    app: axum::Router,
}

/// Milliseconds since the epoch (the leader's clock, carried in commands).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// `n` random bytes as lower-case hex.
pub fn random_hex(n: usize) -> String {
    let bytes: Vec<u8> = (0..n).map(|_| rand::random::<u8>()).collect();
    hex::encode(bytes)
}

impl Server {
    /// Binds the API and Raft listeners and starts Raft. A new state
    /// directory starts uninitialised; with `cfg.init` the cluster is
    /// initialised from `cfg.peers` (this replica alone when empty).
    pub async fn start(mut cfg: ServerConfig) -> Result<Server, ServerError> {
        if cfg.join_token.is_empty() {
            return Err(ServerError::EmptyJoinToken);
        }
        let listener =
            TcpListener::bind(cfg.listen)
                .await
                .map_err(|source| ServerError::Listen {
                    addr: cfg.listen,
                    source,
                })?;
        let api_addr = listener
            .local_addr()
            .map_err(|source| ServerError::Listen {
                addr: cfg.listen,
                source,
            })?;
        cfg.listen = api_addr;
        let tls = cfg
            .tls
            .as_ref()
            .map(crate::tls::server_config)
            .transpose()?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let api = cfg
            .advertise
            .as_deref()
            .map_or_else(|| format!("{scheme}://{api_addr}"), api_url);
        let mut rc = RaftNodeConfig::new(cfg.id, &cfg.state_dir, cfg.raft_listen);
        rc.api_addr = api.clone();
        rc.heartbeat_ms = cfg.raft_heartbeat_ms;
        rc.election_timeout_ms = cfg.election_timeout_ms;
        rc.cluster_secret = cfg.cluster_secret_in_force()?;
        // With a certificate, Raft runs over mutually authenticated TLS:
        // peers verified against --peer-ca (default: exactly this server's
        // own certificate, which the servers then share).
        if let Some(files) = &cfg.tls {
            rc.tls = Some(crate::tls::raft_tls(files, cfg.peer_ca.as_deref())?);
        }
        let raft = RaftNode::start(rc).await?;
        let join_hash = sha256(cfg.join_token.as_bytes());
        let mut http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            // A leader behind a partition: fail the forward fast (503).
            .connect_timeout(Duration::from_secs(2))
            .redirect(reqwest::redirect::Policy::none());
        // Writes are forwarded to the leader's API: over https, trust the
        // peers' CA (default: this server's own certificate file).
        if let Some(ca) = cfg
            .peer_ca
            .as_deref()
            .or(cfg.tls.as_ref().map(|t| t.cert.as_path()))
        {
            http = http.use_preconfigured_tls(crate::tls::client_config(ca)?);
        }
        let http = http.build().map_err(ServerError::Http)?;
        let shared = Arc::new(Shared {
            raft,
            cfg,
            join_hash,
            api_url: api,
            metrics: Metrics::new(),
            http,
            streams: Default::default(),
        });
        let (stop, stop_rx) = watch::channel(false);
        let app = crate::rest::router(shared.clone())
            .merge(crate::grpc::router(shared.clone()))
            // Stream routes are bounded per tenant instead
            // (`rest::streams`): a long upload holds no global permit.
            .layer(axum::middleware::from_fn_with_state(
                Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_REQUESTS)),
                crate::rest::streams::limit_requests,
            ));
        let mut rx = stop_rx.clone();
        let limits = shared.cfg.limits;
        let tcp_app = app.clone();
        let serve = tokio::spawn(async move {
            tokio::select! {
                () = crate::tls::serve(listener, tcp_app, tls, limits) => {}
                _ = rx.wait_for(|s| *s) => {}
            }
        });
        let reconcile = tokio::spawn(crate::leader::run(shared.clone(), stop_rx));
        let server = Server {
            shared,
            api_addr,
            stop,
            tasks: vec![serve, reconcile],
            app,
        };
        if server.shared.cfg.init {
            let mut members = server.shared.cfg.peers.clone();
            members
                .entry(server.shared.cfg.id)
                .or_insert_with(|| server.node_info());
            match server.shared.raft.initialize(members).await {
                Ok(()) | Err(ClusterError::AlreadyInitialized) => {}
                Err(e) => return Err(e.into()),
            }
            server.bootstrap_admin().await?;
        }
        tracing::info!(id = server.shared.cfg.id, api = %server.shared.api_url, "kiln server started");
        Ok(server)
    }

    /// This replica's Raft and API addresses, as members list them.
    pub fn node_info(&self) -> ServerNode {
        ServerNode {
            raft_addr: self.shared.raft.local_addr().to_string(),
            api_addr: self.shared.api_url.clone(),
        }
    }

    pub fn id(&self) -> ServerId {
        self.shared.cfg.id
    }
    pub fn api_addr(&self) -> SocketAddr {
        self.api_addr
    }
    /// `http(s)://host:port` of the API.
    pub fn api_url(&self) -> &str {
        &self.shared.api_url
    }
    pub fn raft(&self) -> &RaftNode {
        &self.shared.raft
    }
    pub fn config(&self) -> &ServerConfig {
        &self.shared.cfg
    }

    /// Initialises a new cluster with these voters (tests start replicas
    /// on ephemeral ports, then initialise one with everyone's addresses).
    pub async fn initialize(
        &self,
        members: BTreeMap<ServerId, ServerNode>,
    ) -> Result<(), ServerError> {
        self.shared.raft.initialize(members).await?;
        self.bootstrap_admin().await
    }

    /// Mints the first admin token and writes its secret (mode 0600) to
    /// the admin token file, unless that file exists already. Waits (up to
    /// 30 s) for a leader; proposes from this replica, so it must be the
    /// one that initialised the cluster (it stands first for election).
    ///
    /// Crash-safe: the secret is written (fsynced) to `<file>.pending`
    /// before its hash is committed, and renamed to the file only after the
    /// commit. A crash in between leaves the pending file, whose secret the
    /// next start commits again (or finds committed), so the admin never
    /// holds a token that is not in the state, nor the state one whose
    /// secret is lost.
    async fn bootstrap_admin(&self) -> Result<(), ServerError> {
        let path = self.shared.cfg.admin_token_path();
        if path.exists() {
            return Ok(());
        }
        let io_err = |source| ServerError::AdminToken {
            path: path.clone(),
            source,
        };
        let pending = pending_path(&path);
        let secret = match std::fs::read_to_string(&pending) {
            Ok(s) if s.trim().len() >= 16 => s.trim().to_owned(),
            _ => {
                let s = format!("kiln_{}", random_hex(24));
                write_secret_file(&pending, &s).map_err(io_err)?;
                s
            }
        };
        let sha256 = kiln_store::query::hash_token(&secret);
        let cmd = Command::CreateToken {
            id: format!("admin-{}", &sha256[..8]),
            tenant: None,
            role: Role::Admin,
            sha256: sha256.clone(),
            description: "bootstrap admin token".into(),
            now_ms: now_ms(),
            node: None,
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            match self.shared.raft.write(cmd.clone()).await {
                Ok(Response::Rejected(r)) => {
                    // Committed before a crash: the same secret is there.
                    let there = self
                        .shared
                        .raft
                        .read_local(|st| kiln_store::query::token_by_hash(st, &sha256).is_some());
                    if !there {
                        return Err(ServerError::Bootstrap(r.to_string()));
                    }
                    break;
                }
                Ok(_) => break,
                Err(e @ WriteError::ForwardToLeader { .. }) => {
                    if tokio::time::Instant::now() > deadline {
                        return Err(ServerError::Bootstrap(e.to_string()));
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(ServerError::Bootstrap(e.to_string())),
            }
        }
        std::fs::rename(&pending, &path).map_err(io_err)?;
        if let Some(dir) = path.parent() {
            let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
        }
        tracing::info!(path = %path.display(), "bootstrap admin token written");
        Ok(())
    }

    /// Serves the API on a Unix socket too (plain HTTP: the socket's file
    /// mode guards it), with the same router, so the same authentication
    /// and limits as on `listen`. Stops with the server.
    pub fn serve_unix(&mut self, listener: tokio::net::UnixListener) {
        let app = self.app.clone();
        let limits = self.shared.cfg.limits;
        let mut rx = self.stop.subscribe();
        self.tasks.push(tokio::spawn(async move {
            tokio::select! {
                () = crate::unix::serve(listener, app, limits) => {}
                _ = rx.wait_for(|s| *s) => {}
            }
        }));
    }

    /// Stops the listeners, the loops and Raft (as a crash would: nothing
    /// not already durable is flushed).
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for t in &self.tasks {
            t.abort();
        }
        self.shared.raft.shutdown().await;
    }

    /// Runs until SIGINT or SIGTERM.
    pub async fn run_until_signal(self) {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot watch SIGTERM");
                    let _ = tokio::signal::ctrl_c().await;
                    self.shutdown().await;
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
        self.shutdown().await;
    }
}

/// Where the admin token waits until its hash is committed.
pub fn pending_path(path: &std::path::Path) -> std::path::PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".pending");
    p.into()
}

/// Writes `secret` and a newline to `path` atomically, mode 0600, fsynced.
pub fn write_secret_file(path: &std::path::Path, secret: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(secret.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

pub fn sha256(b: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(b).into()
}

/// Equal without an early exit (secrets are compared hashed).
pub fn ct_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
