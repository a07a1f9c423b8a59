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
    cfg.advertise = a.advertise;
    cfg.init = a.init;
    cfg.allow_local_images = a.allow_local_images;
    cfg.admin_token_file = a.admin_token_file;
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
