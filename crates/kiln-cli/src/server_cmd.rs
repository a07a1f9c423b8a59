//! `kiln server`: flags → [`kiln_server::ServerConfig`] → a running replica
//! until SIGINT/SIGTERM. Everything else lives in `kiln-server`.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// A control-plane replica: REST API (`/v1`), `/metrics` and the node
/// protocol (gRPC) on `--listen`; Raft between servers on `--raft-listen`.
#[derive(Debug, Args)]
pub struct ServerArgs {
    /// This replica's Raft ID (1, 2, ...).
    #[arg(long)]
    pub id: u64,
    /// API address: REST, /metrics and gRPC for nodes on one port.
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
    /// The API URL peers, clients and nodes use (default http://LISTEN).
    #[arg(long)]
    pub advertise: Option<String>,
    /// Raft address (keep it private to the servers).
    #[arg(long, default_value = "127.0.0.1:7071")]
    pub raft_listen: SocketAddr,
    /// Members of a new cluster, this one included:
    /// ID=RAFT_ADDR=API_ADDR,... (with --init, on one server).
    #[arg(long, default_value = "")]
    pub peers: String,
    /// Raft database and the bootstrap admin token.
    #[arg(long)]
    pub state_dir: PathBuf,
    /// File holding the secret nodes must present to register.
    #[arg(long)]
    pub join_token_file: PathBuf,
    /// File holding the secret every server of this cluster shares (every
    /// Raft RPC carries it; at least 16 printable characters). Default:
    /// STATE_DIR/cluster.secret if present; else a single server (no
    /// --peers) generates it there (0600). Required with --peers, and for a
    /// server that will join with `kiln cluster add`: give it the first
    /// server's file.
    #[arg(long)]
    pub cluster_secret_file: Option<PathBuf>,
    /// Serve the API (REST, gRPC for nodes, /metrics) over TLS with this
    /// certificate chain (PEM); needs --tls-key. Without it: plain HTTP.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// CA certificate(s) (PEM) other servers' API certificates chain to,
    /// for forwarding writes to the leader (default: --tls-cert).
    #[arg(long, value_name = "FILE")]
    pub peer_ca: Option<PathBuf>,
    /// Initialise a new cluster from --peers (alone when none): run it on
    /// one server, once. It writes the first admin token.
    #[arg(long)]
    pub init: bool,
    /// Where --init writes the admin token (default STATE_DIR/admin.token).
    #[arg(long)]
    pub admin_token_file: Option<PathBuf>,
    /// How often nodes heartbeat, milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub heartbeat_ms: u64,
    /// After how long without a heartbeat a node is unreachable, ms.
    #[arg(long, default_value_t = 10_000)]
    pub grace_ms: u64,
    /// Accept sandboxes whose image is a path on the node (`oci:DIR`,
    /// `docker-archive:FILE`): single-host setups and tests only.
    #[arg(long)]
    pub allow_local_images: bool,
    /// Log lines as text or JSON objects.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// The cluster secret: from `--cluster-secret-file`, else from the state
/// directory, else (a single server, which needs it only for its own Raft
/// port) generated there. Servers with `--peers` must be given the same
/// file: a secret derived from the join token would let any node host,
/// which holds that token, speak Raft to the servers.
fn cluster_secret(a: &ServerArgs, single: bool) -> Result<Option<String>> {
    let read = |p: &std::path::Path| -> Result<String> {
        let s = std::fs::read_to_string(p)
            .with_context(|| format!("reading the cluster secret {}", p.display()))?;
        let s = s.trim().to_owned();
        if s.len() < 16 || !s.bytes().all(|b| b.is_ascii_graphic()) {
            bail!(
                "the cluster secret in {} must be at least 16 printable characters",
                p.display()
            );
        }
        Ok(s)
    };
    if let Some(p) = &a.cluster_secret_file {
        return read(p).map(Some);
    }
    // Otherwise the server reads, or (alone) generates, STATE/cluster.secret.
    let own = a.state_dir.join("cluster.secret");
    if own.exists() {
        return Ok(None);
    }
    if !single {
        bail!(
            "servers with --peers need --cluster-secret-file F, the same file on every server \
             (at least 16 printable characters, e.g. `head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n' > F`)"
        );
    }
    eprintln!(
        "kiln server: cluster secret in {} (servers added later need the same file: --cluster-secret-file)",
        own.display()
    );
    Ok(None)
}

pub async fn run(a: ServerArgs) -> Result<i32> {
    if a.id == 0 {
        bail!("--id must be 1 or more");
    }
    let join = std::fs::read_to_string(&a.join_token_file)
        .with_context(|| format!("reading the join token {}", a.join_token_file.display()))?;
    let join = join.trim();
    if join.len() < 16 {
        bail!(
            "the join token in {} must be at least 16 characters",
            a.join_token_file.display()
        );
    }
    let mut cfg = kiln_server::ServerConfig::new(a.id, a.listen, a.raft_listen, &a.state_dir, join);
    cfg.peers = kiln_server::parse_peers(&a.peers)?;
    cfg.cluster_secret = cluster_secret(&a, cfg.peers.len() <= 1)?;
    cfg.advertise = a.advertise;
    cfg.init = a.init;
    cfg.allow_local_images = a.allow_local_images;
    cfg.admin_token_file = a.admin_token_file;
    if let (Some(cert), Some(key)) = (a.tls_cert, a.tls_key) {
        cfg.tls = Some(kiln_server::tls::TlsFiles { cert, key });
    }
    cfg.peer_ca = a.peer_ca;
    cfg.heartbeat_interval_ms = a.heartbeat_ms.max(50);
    cfg.grace_ms = a.grace_ms.max(cfg.heartbeat_interval_ms * 2);
    let init = cfg.init;
    let token_path = cfg.admin_token_path();
    let server = kiln_server::Server::start(cfg).await?;
    if init {
        eprintln!("kiln server: admin token in {}", token_path.display());
    }
    eprintln!(
        "kiln server {}: API {} (REST /v1, gRPC, /metrics), Raft {}",
        server.id(),
        server.api_url(),
        server.raft().local_addr()
    );
    server.run_until_signal().await;
    Ok(0)
}
