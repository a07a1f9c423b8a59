//! How one `kiln server` replica is configured (the flags of
//! `kiln server`), and the `--peers` syntax.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use kiln_store::{ServerId, ServerNode};

/// Everything one replica needs to start.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// This replica's Raft ID (`--id`, ≥ 1).
    pub id: ServerId,
    /// Where the API listens: REST under `/v1`, `/metrics`, and the node
    /// protocol (gRPC over HTTP/2 cleartext) on the same port.
    pub listen: SocketAddr,
    /// The URL other servers, clients and nodes use to reach `listen`
    /// (default `http://<listen>`; needed when `listen` is a wildcard).
    pub advertise: Option<String>,
    /// Where the Raft listener binds (private to the servers).
    pub raft_listen: SocketAddr,
    /// Every member of a new cluster, this one included (used with
    /// `init`). Empty with `init`: a single-replica cluster.
    pub peers: BTreeMap<ServerId, ServerNode>,
    /// Raft database, the bootstrap admin token.
    pub state_dir: PathBuf,
    /// The secret nodes present to `Register`.
    pub join_token: String,
    /// The secret every server of the cluster shares, required on every
    /// Raft RPC. `None`: derived from the join token (every server of a
    /// cluster has the same join token, but so do the nodes: give servers
    /// their own secret with `--cluster-secret-file` in production).
    pub cluster_secret: Option<String>,
    /// Initialise a new cluster from `peers` (one server, once).
    pub init: bool,
    /// Where the bootstrap admin token goes (default
    /// `<state_dir>/admin.token`).
    pub admin_token_file: Option<PathBuf>,
    /// How often nodes heartbeat, and after how long silent they are
    /// marked unreachable.
    pub heartbeat_interval_ms: u64,
    pub grace_ms: u64,
    /// How often the leader places pending sandboxes and expires nodes.
    pub reconcile_ms: u64,
    /// Raft timing (tests shorten elections).
    pub raft_heartbeat_ms: u64,
    pub election_timeout_ms: (u64, u64),
    /// Serve the API over TLS with this certificate chain and key (PEM).
    /// `None`: plain HTTP (fine on loopback or a trusted network only).
    pub tls: Option<crate::tls::TlsFiles>,
    /// CA certificate(s) (PEM) that other servers' API certificates chain
    /// to (used when forwarding writes to the leader over https). Default:
    /// this server's own certificate file.
    pub peer_ca: Option<PathBuf>,
    /// Connection and concurrency limits of the API listener.
    pub limits: crate::tls::Limits,
    /// Accept sandboxes whose image names a path on the node (`oci:DIR`,
    /// `docker-archive:FILE`): only for single-host setups and tests,
    /// where the API's callers may read the node's files. Off by default.
    pub allow_local_images: bool,
}

impl ServerConfig {
    /// Defaults: heartbeats every second, 10 s grace, reconcile every
    /// 500 ms, Raft heartbeats 100 ms and elections 400-800 ms.
    pub fn new(
        id: ServerId,
        listen: SocketAddr,
        raft_listen: SocketAddr,
        state_dir: impl Into<PathBuf>,
        join_token: impl Into<String>,
    ) -> ServerConfig {
        ServerConfig {
            id,
            listen,
            advertise: None,
            raft_listen,
            peers: BTreeMap::new(),
            state_dir: state_dir.into(),
            join_token: join_token.into(),
            cluster_secret: None,
            init: false,
            admin_token_file: None,
            heartbeat_interval_ms: 1000,
            grace_ms: 10_000,
            reconcile_ms: 500,
            raft_heartbeat_ms: 100,
            election_timeout_ms: (400, 800),
            allow_local_images: false,
            tls: None,
            peer_ca: None,
            limits: crate::tls::Limits::default(),
        }
    }

    /// Where a replica keeps its own cluster secret when none is configured.
    pub fn own_cluster_secret_path(&self) -> PathBuf {
        self.state_dir.join("cluster.secret")
    }

    /// The cluster secret in force: the configured one; else the one this
    /// replica generated before (`STATE/cluster.secret`); else, for a
    /// replica without peers, a new random one written there (0600).
    /// Replicas with peers must be configured with the shared secret:
    /// nothing else that other hosts know (the join token is held by every
    /// node) may let them speak Raft.
    pub fn cluster_secret_in_force(&self) -> Result<String, ClusterSecretError> {
        if let Some(s) = &self.cluster_secret {
            return Ok(s.clone());
        }
        let own = self.own_cluster_secret_path();
        match std::fs::read_to_string(&own) {
            Ok(s) => {
                let s = s.trim().to_owned();
                if s.len() < 16 || !s.bytes().all(|b| b.is_ascii_graphic()) {
                    return Err(ClusterSecretError::Invalid(own));
                }
                Ok(s)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if self.peers.len() > 1 {
                    return Err(ClusterSecretError::Missing);
                }
                let s = crate::server::random_hex(32);
                crate::server::write_secret_file(&own, &s)
                    .map_err(|e| ClusterSecretError::Write(own, e))?;
                Ok(s)
            }
            Err(e) => Err(ClusterSecretError::Read(own, e)),
        }
    }

    pub fn admin_token_path(&self) -> PathBuf {
        self.admin_token_file
            .clone()
            .unwrap_or_else(|| self.state_dir.join("admin.token"))
    }
}

/// A `--peers` value that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeersError {
    #[error("peer {0:?} is not ID=RAFT_ADDR=API_ADDR")]
    Shape(String),
    #[error("peer {0:?}: the ID must be a positive integer")]
    Id(String),
    #[error("peer {0:?}: the Raft address must be host:port")]
    RaftAddr(String),
    #[error("server {0} is listed twice")]
    Duplicate(ServerId),
}

/// Parses `ID=RAFT_ADDR=API_ADDR,...` (API_ADDR `host:port` or a URL; a
/// bare `host:port` becomes `http://host:port`).
pub fn parse_peers(s: &str) -> Result<BTreeMap<ServerId, ServerNode>, PeersError> {
    let mut out = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let mut it = part.splitn(3, '=');
        let (Some(id), Some(raft), Some(api)) = (it.next(), it.next(), it.next()) else {
            return Err(PeersError::Shape(part.to_owned()));
        };
        let id: ServerId = id
            .parse()
            .ok()
            .filter(|i| *i > 0)
            .ok_or_else(|| PeersError::Id(part.to_owned()))?;
        if raft
            .rsplit_once(':')
            .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
        {
            return Err(PeersError::RaftAddr(part.to_owned()));
        }
        if api.is_empty() {
            return Err(PeersError::Shape(part.to_owned()));
        }
        let node = ServerNode {
            raft_addr: raft.to_owned(),
            api_addr: api_url(api),
        };
        if out.insert(id, node).is_some() {
            return Err(PeersError::Duplicate(id));
        }
    }
    Ok(out)
}

/// `host:port` → `http://host:port`; a URL stays as it is (no trailing `/`).
pub fn api_url(s: &str) -> String {
    let s = s.trim_end_matches('/');
    if s.starts_with("http://") || s.starts_with("https://") {
        s.to_owned()
    } else {
        format!("http://{s}")
    }
}

/// No usable cluster secret.
#[derive(Debug, thiserror::Error)]
pub enum ClusterSecretError {
    #[error("replicas with peers need the cluster secret they share (none configured)")]
    Missing,
    #[error("the cluster secret in {0} must be at least 16 printable characters")]
    Invalid(PathBuf),
    #[error("cannot read the cluster secret {0}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("cannot write the cluster secret {0}")]
    Write(PathBuf, #[source] std::io::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_parse_and_refuse_garbage() {
        let p =
            parse_peers("1=10.0.0.1:7001=10.0.0.1:7000, 2=h2:7001=https://h2:7000/").expect("ok");
        assert_eq!(p.len(), 2);
        assert_eq!(p[&1].api_addr, "http://10.0.0.1:7000");
        assert_eq!(p[&2].api_addr, "https://h2:7000");
        assert_eq!(p[&2].raft_addr, "h2:7001");
        assert!(matches!(parse_peers("1=a:1"), Err(PeersError::Shape(_))));
        assert!(matches!(parse_peers("0=a:1=b:2"), Err(PeersError::Id(_))));
        assert!(matches!(parse_peers("x=a:1=b:2"), Err(PeersError::Id(_))));
        assert!(matches!(
            parse_peers("1=a=b:2"),
            Err(PeersError::RaftAddr(_))
        ));
        assert!(matches!(
            parse_peers("1=a:1=b:2,1=c:1=d:2"),
            Err(PeersError::Duplicate(1))
        ));
        assert!(parse_peers("").expect("empty").is_empty());
    }

    #[test]
    fn the_cluster_secret_is_configured_kept_or_generated_alone_never_derived() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tmp");
        let any: SocketAddr = ([127, 0, 0, 1], 0).into();
        let mut c = ServerConfig::new(1, any, any, dir.path(), "join-token");
        let first = c.cluster_secret_in_force().expect("alone: generated");
        assert_eq!(first.len(), 64);
        let path = c.own_cluster_secret_path();
        let mode = std::fs::metadata(&path)
            .expect("written")
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{mode:o}");
        assert_eq!(c.cluster_secret_in_force().expect("kept"), first);
        // Other replicas' tokens have nothing to do with it.
        let other_dir = tempfile::tempdir().expect("tmp");
        let other = ServerConfig::new(1, any, any, other_dir.path(), "join-token");
        assert_ne!(other.cluster_secret_in_force().expect("own"), first);
        c.cluster_secret = Some("configured-secret-0123".into());
        assert_eq!(
            c.cluster_secret_in_force().expect("configured"),
            "configured-secret-0123"
        );
        // With peers and nothing configured or kept: refused.
        let dir2 = tempfile::tempdir().expect("tmp");
        let mut p = ServerConfig::new(1, any, any, dir2.path(), "join-token");
        p.peers = parse_peers("1=a:1=b:2,2=c:1=d:2").expect("peers");
        assert!(matches!(
            p.cluster_secret_in_force(),
            Err(ClusterSecretError::Missing)
        ));
        std::fs::write(p.own_cluster_secret_path(), "short").expect("write");
        assert!(matches!(
            p.cluster_secret_in_force(),
            Err(ClusterSecretError::Invalid(_))
        ));
    }
}
