//! `kiln up` and `kiln down`: the embedded control plane. One process runs
//! a single-replica `kiln_server::Server` and the node daemon
//! (`kiln_node::daemon`) on one state directory, with the API on a Unix
//! socket there and on loopback TCP.
//!
//! Layout under the state directory (mode 0700):
//! - `api.sock`: the API (mode 0600), removed on exit;
//! - `server/`: the replica's Raft log and state machine, its cluster secret;
//! - `up/token`: the admin token (0600); `up/tenant-token`: a token of the
//!   tenant `default` (0600), for sandbox commands;
//! - `up/endpoint.json`: `{url, socket, pid, start_time}`, written
//!   atomically once the API answers and the node is ready, removed on exit;
//! - `up/lock`: held (flock) for the process's life: one `kiln up` per state
//!   directory; the kernel drops it even on SIGKILL, so the next `kiln up`
//!   takes over the stale socket and endpoint file;
//! - `up/up.log`: the log of a `kiln up -d`.
//!
//! The node's join token is generated in memory at each start and never
//! written anywhere; the node keeps its per-node credential in its state.
//! Sandbox supervisors outlive the process: `kiln down` (SIGTERM) leaves
//! microVMs running and the next `kiln up` adopts them.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use kiln_api::cluster::{NodeName, NodeStatus, Quotas, Role, TenantName};
use kiln_node::daemon::{self, CapacityOverrides, DaemonConfig};
use kiln_node::node::Node;
use kiln_node::paths::Dirs;
use serde::{Deserialize, Serialize};

/// The API port `kiln up` listens on unless told otherwise.
pub const DEFAULT_PORT: u16 = 7090;

#[derive(Debug, Args, Clone)]
pub struct UpArgs {
    /// The state directory (default: KILN_STATE_DIR, else Kiln's).
    #[arg(long = "state-dir", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Where the API also listens on TCP [default: 127.0.0.1:7090, or a
    /// free port when that one is taken]. Port 0 picks a free one. The
    /// chosen URL is in STATE/up/endpoint.json.
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Run in the background (logs in STATE/up/up.log); returns once the
    /// API answers.
    #[arg(short = 'd', long)]
    pub detach: bool,
    /// vCPUs the node offers per host CPU (1: none shared) [default: 8].
    #[arg(long = "cpu-overcommit", value_name = "N", value_parser = clap::value_parser!(u32).range(1..=64))]
    pub cpu_overcommit: Option<u32>,
    /// A registry the node reaches over plain HTTP (`host[:port]`;
    /// repeatable): `kiln run` through the API pulls from it.
    #[arg(long = "insecure-registry", value_name = "HOST[:PORT]")]
    pub insecure: Vec<String>,
    /// Set by `kiln up -d` on the process it starts.
    #[arg(long, hide = true)]
    pub daemon_child: bool,
}

/// How `kiln up` configures its node.
#[derive(Debug, Clone, Default)]
pub struct NodeOpts {
    pub cpu_overcommit: Option<u32>,
    pub insecure: Vec<String>,
}

impl NodeOpts {
    fn of(a: &UpArgs) -> NodeOpts {
        NodeOpts {
            cpu_overcommit: a.cpu_overcommit,
            insecure: a.insecure.clone(),
        }
    }
}

#[derive(Debug, Args, Clone)]
pub struct DownArgs {
    /// The state directory (default: KILN_STATE_DIR, else Kiln's).
    #[arg(long = "state-dir", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
}

/// What `STATE/up/endpoint.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Endpoint {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// The API's Unix socket.
    pub socket: PathBuf,
    pub pid: u32,
    /// The process's start time (clock ticks after boot, `/proc/PID/stat`
    /// field 22): a recycled pid does not pass for it.
    pub start_time: u64,
}

/// Where the files of `kiln up` are, for a state directory.
#[derive(Debug, Clone)]
pub struct Paths {
    pub state: PathBuf,
}

impl Paths {
    pub fn new(state: &Path) -> Paths {
        Paths {
            state: state.to_path_buf(),
        }
    }
    pub fn of(state_dir: Option<PathBuf>) -> Paths {
        Paths::new(&state_dir.unwrap_or_else(|| Dirs::from_env().state))
    }
    pub fn socket(&self) -> PathBuf {
        self.state.join("api.sock")
    }
    pub fn dir(&self) -> PathBuf {
        self.state.join("up")
    }
    pub fn endpoint(&self) -> PathBuf {
        self.dir().join("endpoint.json")
    }
    pub fn admin_token(&self) -> PathBuf {
        self.dir().join("token")
    }
    pub fn tenant_token(&self) -> PathBuf {
        self.dir().join("tenant-token")
    }
    pub fn log(&self) -> PathBuf {
        self.dir().join("up.log")
    }
    fn lock(&self) -> PathBuf {
        self.dir().join("lock")
    }
    fn server(&self) -> PathBuf {
        self.state.join("server")
    }
}

/// A process's start time, or `None` when it is gone (or a zombie).
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which may hold spaces and parens.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state); start time is field 22.
    if fields.first().is_some_and(|s| *s == "Z") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// The `kiln up` running on this state directory: its endpoint file names
/// a live process (same pid and start time) and its socket exists.
pub fn running(p: &Paths) -> Option<Endpoint> {
    let bytes = std::fs::read(p.endpoint()).ok()?;
    let ep: Endpoint = serde_json::from_slice(&bytes).ok()?;
    (start_time(ep.pid) == Some(ep.start_time) && ep.socket.exists()).then_some(ep)
}

/// Does a `kiln up` hold this state directory's lock?
fn lock_held(p: &Paths) -> bool {
    let Ok(f) = std::fs::File::open(p.lock()) else {
        return false;
    };
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockSharedNonblock).is_err()
}

/// Creates `dir` (and parents) and makes it private (0700).
fn private_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("making {} private", dir.display()))
}

/// Writes `bytes` to `path` atomically (a temporary file renamed), 0600.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// The cluster secret of the embedded replica (generated once, 0600).
fn cluster_secret(p: &Paths) -> Result<String> {
    let path = p.server().join("cluster.secret");
    if let Ok(s) = std::fs::read_to_string(&path) {
        let s = s.trim().to_owned();
        if s.len() >= 16 && s.bytes().all(|b| b.is_ascii_graphic()) {
            return Ok(s);
        }
        bail!("{} holds no usable cluster secret", path.display());
    }
    let s = kiln_server::server::random_hex(32);
    kiln_server::server::write_secret_file(&path, &s)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(s)
}

fn node_name() -> NodeName {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| NodeName::new(h.to_string_lossy().to_lowercase()).ok())
        .unwrap_or_else(|| NodeName::new("local").expect("a valid node name"))
}

/// The tenant `default` and a token of it in `STATE/up/tenant-token`: the
/// secret is written (0600) before its hash is committed, and committed
/// again at the next start if it is not in the state.
async fn ensure_tenant_token(server: &kiln_server::Server, p: &Paths) -> Result<()> {
    let path = p.tenant_token();
    let fresh = || -> Result<String> {
        let s = format!("kiln_{}", kiln_server::server::random_hex(24));
        kiln_server::server::write_secret_file(&path, &s)
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(s)
    };
    let mut secret = match std::fs::read_to_string(&path) {
        Ok(s) if s.trim().len() >= 16 => s.trim().to_owned(),
        _ => fresh()?,
    };
    let mut sha = kiln_store::query::hash_token(&secret);
    let (live, known) = server.raft().read_local(|st| {
        (
            kiln_store::query::token_by_hash(st, &sha).is_some(),
            st.idx.token_by_hash.contains_key(&sha),
        )
    });
    if live {
        return Ok(());
    }
    if known {
        // Revoked (`kiln tokens revoke`): the local user gets a new one.
        secret = fresh()?;
        sha = kiln_store::query::hash_token(&secret);
    }
    let tenant = TenantName::new("default").expect("a valid tenant name");
    let now = kiln_server::server::now_ms();
    let cmds = [
        kiln_store::Command::CreateTenant {
            name: tenant.clone(),
            quotas: Quotas {
                sandboxes: 1000,
                cpus: 1024,
                memory_mib: 1024 * 1024,
            },
            now_ms: now,
        },
        kiln_store::Command::CreateToken {
            id: format!("default-{}", &sha[..8]),
            tenant: Some(tenant),
            role: Role::Tenant,
            sha256: sha.clone(),
            description: "kiln up: the local user's sandboxes".into(),
            now_ms: now,
            node: None,
        },
    ];
    for c in cmds {
        // An existing tenant is fine (rejected as already there).
        server
            .raft()
            .write(c)
            .await
            .map_err(|e| anyhow::anyhow!("committing the default tenant: {e}"))?;
    }
    if !server
        .raft()
        .read_local(|st| kiln_store::query::token_by_hash(st, &sha).is_some())
    {
        bail!("the token of the tenant default could not be committed");
    }
    Ok(())
}

/// Like `kiln node` protects its servers' addresses: the API's address is
/// an infrastructure range no sandbox reaches unless a rule allows it
/// (`kiln_net::protect`; loopback is the guest's own anyway).
fn protect_api(p: &Paths, api: SocketAddr) -> Result<()> {
    let ranges: Vec<kiln_net::protect::Ipv4Net> = match api.ip() {
        std::net::IpAddr::V4(ip) if !ip.is_loopback() && !ip.is_unspecified() => {
            vec![kiln_net::protect::Ipv4Net::new(ip, 32).expect("32 is a valid prefix")]
        }
        _ => vec![],
    };
    kiln_net::protect::write_file(&p.state.join("net"), &ranges)?;
    Ok(())
}

/// The credential the node stored (`STATE/node/credential.json`).
fn stored_credential(p: &Paths, name: &NodeName) -> Option<String> {
    let b = std::fs::read(p.state.join("node/credential.json")).ok()?;
    let c: daemon::client::StoredCredential = serde_json::from_slice(&b).ok()?;
    (&c.node == name).then_some(c.credential)
}

/// A registration rotates the node's credential: a process killed after
/// the server committed the new one but before the node stored it leaves
/// the node holding a revoked credential, and the server refuses to let
/// it register again. `kiln up` owns both sides, so it revokes the live
/// credential the node does not hold, and the node registers anew.
async fn heal_node_credential(
    server: &kiln_server::Server,
    p: &Paths,
    name: &NodeName,
) -> Result<()> {
    let stored = stored_credential(p, name).map(|c| kiln_store::query::hash_token(&c));
    let live: Vec<(String, String)> = server.raft().read_local(|st| {
        st.tokens
            .values()
            .filter(|t| {
                t.role == Role::Node && t.node.as_ref() == Some(name) && t.revoked_at_ms.is_none()
            })
            .map(|t| (t.id.clone(), t.sha256.clone()))
            .collect()
    });
    if live.is_empty() || live.iter().any(|(_, h)| Some(h) == stored.as_ref()) {
        return Ok(());
    }
    tracing::warn!(node = %name, "the node does not hold its live credential (killed while registering): revoking it so the node registers again");
    for (id, _) in live {
        let cmd = kiln_store::Command::RevokeToken {
            id,
            now_ms: kiln_server::server::now_ms(),
        };
        server
            .raft()
            .write(cmd)
            .await
            .map_err(|e| anyhow::anyhow!("revoking the node's stale credential: {e}"))?;
    }
    Ok(())
}

/// Asks the API over its Unix socket for the OpenAPI document: does it answer?
async fn answers(socket: &Path) -> bool {
    let Ok(http) = reqwest::Client::builder()
        .unix_socket(socket)
        .timeout(Duration::from_secs(2))
        .build()
    else {
        return false;
    };
    http.get("http://kiln/v1/openapi.json")
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
}

async fn signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// `kiln up`.
pub async fn up(a: UpArgs) -> Result<i32> {
    let p = Paths::of(a.state_dir.clone());
    if a.detach {
        return detach(&p, &a).await;
    }
    if a.daemon_child {
        // Leave the terminal's session: the daemon must not get its SIGHUP
        // or Ctrl-C.
        let _ = nix::unistd::setsid();
    }
    private_dir(&p.state)?;
    // Absolute paths in the endpoint file: found from any directory.
    let p = Paths::new(
        &std::fs::canonicalize(&p.state)
            .with_context(|| format!("resolving {}", p.state.display()))?,
    );
    private_dir(&p.dir())?;
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(p.lock())
        .with_context(|| format!("opening {}", p.lock().display()))?;
    let _lock = match nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(l) => l,
        Err(_) => {
            let pid = running(&p).map_or_else(String::new, |e| format!(" (pid {})", e.pid));
            bail!(
                "kiln up already runs on {}{pid}; stop it with kiln down",
                p.state.display()
            );
        }
    };
    // Whatever a killed predecessor left.
    let _ = std::fs::remove_file(p.endpoint());
    let _ = std::fs::remove_file(p.socket());

    let join = kiln_server::server::random_hex(32);
    private_dir(&p.server())?;
    let secret = cluster_secret(&p)?;
    let config = |listen: SocketAddr| {
        let mut cfg = kiln_server::ServerConfig::new(
            1,
            listen,
            SocketAddr::from(([127, 0, 0, 1], 0)),
            p.server(),
            &join,
        );
        cfg.init = true;
        cfg.cluster_secret = Some(secret.clone());
        cfg.admin_token_file = Some(p.admin_token());
        // One host: images named by a local path are on this node.
        cfg.allow_local_images = true;
        cfg
    };
    let default = SocketAddr::from(([127, 0, 0, 1], DEFAULT_PORT));
    let mut server = match kiln_server::Server::start(config(a.listen.unwrap_or(default))).await {
        Err(kiln_server::ServerError::Listen { source, .. })
            if a.listen.is_none() && source.kind() == std::io::ErrorKind::AddrInUse =>
        {
            // Said on stderr, not only logged: whoever holds 7090 is not
            // this server, and a script using the default URL would talk
            // to it (the endpoint file and the socket stay right).
            eprintln!(
                "kiln up: warning: 127.0.0.1:{DEFAULT_PORT} is taken by another program; \
                 using a free port instead (see the line below; clients of this state \
                 directory find it by themselves)"
            );
            kiln_server::Server::start(config(SocketAddr::from(([127, 0, 0, 1], 0)))).await
        }
        r => r,
    }
    .context("starting the embedded server")?;
    let url = server.api_url().to_owned();
    protect_api(&p, server.api_addr())?;
    let sock = p.socket();
    let listener = tokio::net::UnixListener::bind(&sock)
        .with_context(|| format!("listening on {}", sock.display()))?;
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("making {} private", sock.display()))?;
    server.serve_unix(listener);
    let result = run_node(&server, &p, &url, &join, &NodeOpts::of(&a)).await;
    let _ = std::fs::remove_file(p.endpoint());
    let _ = std::fs::remove_file(&sock);
    server.shutdown().await;
    result.map(|()| 0)
}

/// Runs the node daemon beside `server`, publishes the endpoint once both
/// answer, and waits for SIGINT/SIGTERM (or the daemon's end).
async fn run_node(
    server: &kiln_server::Server,
    p: &Paths,
    url: &str,
    join: &str,
    opts: &NodeOpts,
) -> Result<()> {
    let t0 = Instant::now();
    while server.raft().status().role != kiln_store::RaftRole::Leader {
        if t0.elapsed() > Duration::from_secs(30) {
            bail!("the embedded server did not become leader within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Ports picked at this start: members list this replica's current ones.
    let me = server.node_info();
    if server.raft().status().members.get(&server.id()) != Some(&me) {
        server
            .raft()
            .set_nodes([(server.id(), me)].into())
            .await
            .context("recording the embedded server's addresses")?;
    }
    ensure_tenant_token(server, p).await?;
    let env = Dirs::from_env();
    let node = Node::open(Dirs::new(&p.state, env.cache));
    let name = node_name();
    heal_node_credential(server, p, &name).await?;
    let started_ms = kiln_server::server::now_ms();
    let cfg = DaemonConfig {
        servers: vec![url.to_owned()],
        join_token: join.to_owned(),
        name: name.clone(),
        labels: Default::default(),
        address: "127.0.0.1:0".into(),
        dry_run: false,
        capacity: CapacityOverrides {
            cpu_overcommit: opts.cpu_overcommit,
            ..CapacityOverrides::default()
        },
        insecure_registries: opts.insecure.clone(),
        max_parallel_starts: None,
        stop_grace: 10,
        ca_pem: None,
        stream_tls_files: None,
        stream_idle_secs: None,
    };
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let mut daemon = tokio::spawn(daemon::run(node, cfg, async move {
        let _ = stop_rx.wait_for(|s| *s).await;
    }));
    // Ready: the API answers on the socket, and this process's node has
    // registered and stored its credential (a record left Ready by the
    // previous process does not count).
    let t0 = Instant::now();
    loop {
        let stored = stored_credential(p, &name).map(|c| kiln_store::query::hash_token(&c));
        let ready = server.raft().read_local(|st| {
            let ours = stored.as_ref().is_some_and(|h| {
                st.tokens.values().any(|t| {
                    &t.sha256 == h
                        && t.node.as_ref() == Some(&name)
                        && t.revoked_at_ms.is_none()
                        && t.created_at_ms >= started_ms
                })
            });
            ours && st
                .nodes
                .get(&name)
                .is_some_and(|n| n.status == NodeStatus::Ready)
        });
        if ready && answers(&p.socket()).await {
            break;
        }
        if daemon.is_finished() {
            break;
        }
        if t0.elapsed() > Duration::from_secs(60) {
            let _ = stop_tx.send(true);
            bail!("the node did not register with the embedded server within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if daemon.is_finished() {
        return match (&mut daemon).await {
            Ok(Ok(())) => bail!("the node daemon ended"),
            Ok(Err(e)) => Err(e).context("the node daemon"),
            Err(e) => bail!("the node daemon failed: {e}"),
        };
    }
    let pid = std::process::id();
    let ep = Endpoint {
        url: url.to_owned(),
        socket: p.socket(),
        pid,
        start_time: start_time(pid).context("reading this process's start time")?,
    };
    write_atomic(&p.endpoint(), &serde_json::to_vec_pretty(&ep)?)?;
    eprintln!(
        "kiln up: API on {url} and {}; admin token in {}; stop with kiln down",
        p.socket().display(),
        p.admin_token().display()
    );
    tokio::select! {
        () = signal() => {
            tracing::info!("stopping; sandboxes keep running");
        }
        r = &mut daemon => {
            return match r {
                Ok(Ok(())) => bail!("the node daemon ended"),
                Ok(Err(e)) => Err(e).context("the node daemon"),
                Err(e) => bail!("the node daemon failed: {e}"),
            };
        }
    }
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(10), daemon).await;
    Ok(())
}

/// `kiln up -d`: starts `kiln up` in its own session, logging to
/// `STATE/up/up.log`, and returns once its endpoint file names it.
async fn detach(p: &Paths, a: &UpArgs) -> Result<i32> {
    let ep = start_detached(p, a.listen, &NodeOpts::of(a)).await?;
    eprintln!(
        "kiln up: API on {} and {} (pid {}); logs in {}; stop with kiln down",
        ep.url,
        ep.socket.display(),
        ep.pid,
        p.log().display()
    );
    Ok(0)
}

/// Starts `kiln up` in the background and waits (up to 90 s) until it
/// answers. Fails if one already runs, or with the tail of its log if it
/// ends first.
pub async fn start_detached(
    p: &Paths,
    listen: Option<SocketAddr>,
    opts: &NodeOpts,
) -> Result<Endpoint> {
    if let Some(ep) = running(p) {
        bail!(
            "kiln up already runs on {} (pid {}); stop it with kiln down",
            p.state.display(),
            ep.pid
        );
    }
    private_dir(&p.state)?;
    private_dir(&p.dir())?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(p.log())
        .with_context(|| format!("opening {}", p.log().display()))?;
    let start_len = log.metadata().map_or(0, |m| m.len());
    let exe = std::env::current_exe().context("finding the kiln binary")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("up").arg("--state-dir").arg(&p.state);
    if let Some(l) = listen {
        cmd.arg("--listen").arg(l.to_string());
    }
    if let Some(n) = opts.cpu_overcommit {
        cmd.arg("--cpu-overcommit").arg(n.to_string());
    }
    for r in &opts.insecure {
        cmd.arg("--insecure-registry").arg(r);
    }
    let mut child = cmd
        .arg("--daemon-child")
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting kiln up")?;
    let pid = child.id();
    let t0 = Instant::now();
    loop {
        if let Some(ep) = running(p).filter(|e| e.pid == pid) {
            // Reaped by init once we exit.
            std::mem::forget(child);
            return Ok(ep);
        }
        if let Ok(Some(status)) = child.try_wait() {
            // Another command started one at the same moment: use it.
            while lock_held(p) && t0.elapsed() < Duration::from_secs(90) {
                if let Some(ep) = running(p) {
                    return Ok(ep);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let text = std::fs::read(p.log()).unwrap_or_default();
            let from = usize::try_from(start_len).unwrap_or(0).min(text.len());
            let tail = String::from_utf8_lossy(&text[from..]);
            let last = tail
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("")
                .trim_start_matches("kiln: ");
            bail!("kiln up ended ({status}): {last}");
        }
        if t0.elapsed() > Duration::from_secs(90) {
            bail!(
                "kiln up did not answer within 90 s (pid {pid}); see {}",
                p.log().display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `kiln down`: SIGTERM to this state directory's `kiln up`, then waits
/// (up to 30 s) until it is gone. Sandboxes keep running.
pub async fn down(a: DownArgs) -> Result<i32> {
    let p = Paths::of(a.state_dir);
    let Some(ep) = running(&p) else {
        eprintln!("kiln down: no kiln up runs on {}", p.state.display());
        return Ok(0);
    };
    let pid = nix::unistd::Pid::from_raw(i32::try_from(ep.pid).context("pid")?);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)
        .with_context(|| format!("stopping kiln up (pid {})", ep.pid))?;
    let t0 = Instant::now();
    while start_time(ep.pid) == Some(ep.start_time) {
        if t0.elapsed() > Duration::from_secs(30) {
            bail!("kiln up (pid {}) did not stop within 30 s", ep.pid);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "kiln down: stopped kiln up (pid {}); sandboxes keep running",
        ep.pid
    );
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_of_this_process_and_of_no_process() {
        let me = std::process::id();
        let a = start_time(me).expect("this process runs");
        assert_eq!(start_time(me), Some(a));
        assert_eq!(start_time(u32::MAX), None);
    }

    #[test]
    fn a_stale_endpoint_is_not_running() {
        let d = tempfile::tempdir().expect("tmp");
        let p = Paths::new(d.path());
        std::fs::create_dir_all(p.dir()).expect("dir");
        std::fs::write(p.socket(), b"").expect("socket stand-in");
        let me = std::process::id();
        let mut ep = Endpoint {
            url: "http://127.0.0.1:1".into(),
            socket: p.socket(),
            pid: me,
            start_time: start_time(me).expect("runs"),
        };
        write_atomic(&p.endpoint(), &serde_json::to_vec(&ep).expect("json")).expect("write");
        assert_eq!(running(&p), Some(ep.clone()));
        // A recycled pid: another start time.
        ep.start_time += 1;
        write_atomic(&p.endpoint(), &serde_json::to_vec(&ep).expect("json")).expect("write");
        assert_eq!(running(&p), None);
        std::fs::write(p.endpoint(), b"{not json").expect("write");
        assert_eq!(running(&p), None);
    }
}
