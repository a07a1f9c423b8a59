//! Admin commands as clients of a `kiln server`'s REST API: `kiln nodes`,
//! `kiln cluster`, `kiln tenants`, `kiln tokens`. The server comes from
//! `--server`, `KILN_SERVER` or the current (or `--context`) context of
//! `~/.config/kiln/config.toml`; the token from `--token-file`,
//! `KILN_TOKEN`, `--token` (visible in argv: avoid) or that context (`token`
//! or `token-file`); an https server is verified against `--ca` or the
//! context's `ca`:
//!
//! ```toml
//! current-context = "prod"
//! [contexts.prod]
//! server = "https://10.0.0.1:7070"
//! token-file = "/home/me/.config/kiln/prod.token"
//! ca = "/home/me/.config/kiln/prod-ca.pem"
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use kiln_api::rest::{ClusterStatus, ErrorBody, NodeList, Tenant, TenantList, TokenCreated};
use serde::Deserialize;
use serde_json::json;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum Output {
    #[default]
    Table,
    Json,
}

/// Where the server is and who we are.
#[derive(Debug, Args, Clone, Default)]
pub struct Conn {
    /// The server's API URL (`http(s)://host:port`, or `unix:PATH` for an
    /// API socket such as `kiln up`'s STATE/api.sock). Default: KILN_SERVER,
    /// the current context, else the `kiln up` running on the state
    /// directory.
    #[arg(long, global = true, env = "KILN_SERVER")]
    pub server: Option<String>,
    /// An API token (prefer --token-file or KILN_TOKEN: argv is visible to
    /// every user of the host).
    #[arg(long, global = true, env = "KILN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// A file holding the API token.
    #[arg(long, global = true, value_name = "FILE", conflicts_with = "token")]
    pub token_file: Option<PathBuf>,
    /// CA certificate(s) (PEM) an https:// server must chain to (default:
    /// the context's `ca`, else the system's roots).
    #[arg(long, global = true, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// A context of ~/.config/kiln/config.toml (default: current-context).
    #[arg(long, global = true)]
    pub context: Option<String>,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(Debug, Subcommand)]
pub enum NodesCommand {
    /// Nodes with capacity, usage, driver, health and cordon.
    Ls,
    Cordon {
        name: String,
    },
    Uncordon {
        name: String,
    },
    /// Cordon and mark draining.
    Drain {
        name: String,
    },
    /// Revoke the node's credential (to replace a dead host under the same
    /// name: the new one then registers with the join token).
    RevokeCredential {
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Members, leader, term, commit and applied index, API URLs.
    Status,
    /// Add a replica (started without --init) as a voter.
    Add {
        id: u64,
        #[arg(long)]
        raft_addr: String,
        #[arg(long)]
        api_url: String,
    },
    /// Remove a replica from the voters.
    Remove { id: u64 },
}

#[derive(Debug, Subcommand)]
pub enum TenantsCommand {
    Create {
        name: String,
        #[arg(long)]
        max_sandboxes: Option<u32>,
        #[arg(long)]
        max_cpus: Option<u32>,
        #[arg(long)]
        max_memory_mib: Option<u64>,
    },
    Ls,
}

#[derive(Debug, Subcommand)]
pub enum TokensCommand {
    /// A tenant's token (`--tenant`) or an admin token (`--admin`); the
    /// secret is printed once.
    Create {
        #[arg(long, required_unless_present = "admin")]
        tenant: Option<String>,
        #[arg(long, conflicts_with = "tenant")]
        admin: bool,
        #[arg(long, default_value = "")]
        description: String,
    },
    Revoke {
        id: String,
    },
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct Config {
    current_context: Option<String>,
    #[serde(default)]
    contexts: BTreeMap<String, Context_>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct Context_ {
    server: Option<String>,
    token: Option<String>,
    /// A file holding the token.
    token_file: Option<PathBuf>,
    /// CA certificate(s) for an https:// server.
    ca: Option<PathBuf>,
}

pub(crate) fn config_path() -> Option<PathBuf> {
    std::env::var_os("KILN_CONFIG")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config/kiln/config.toml"))
        })
}

/// A client of the REST API (HTTP over TCP, TLS or a Unix socket).
// Parts are for the sandbox commands' API client (client_cmd.rs).
#[allow(dead_code)]
pub struct Client {
    http: reqwest::Client,
    /// `http(s)://host:port`; `http://kiln` over a Unix socket.
    base: String,
    token: String,
    /// The API socket, when the server is `unix:PATH`.
    socket: Option<PathBuf>,
    /// The CA file an https server must chain to.
    ca: Option<PathBuf>,
}

/// What a WebSocket of [`Client::ws`] runs over.
#[allow(dead_code)]
pub trait WsIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> WsIo for T {}

/// A WebSocket to the API ([`Client::ws`]).
#[allow(dead_code)]
pub type Ws = tokio_tungstenite::WebSocketStream<Box<dyn WsIo>>;

/// `unix:PATH` (or `unix://PATH`): the API socket's path.
pub fn unix_path(server: &str) -> Option<PathBuf> {
    let p = server.strip_prefix("unix:")?;
    let p = p.strip_prefix("//").unwrap_or(p);
    (!p.is_empty()).then(|| PathBuf::from(p))
}

// `ws`, `http` and `url` serve the sandbox commands (client_cmd.rs).
#[allow(dead_code)]
impl Client {
    pub fn new(c: &Conn) -> Result<Client> {
        let cfg: Config = match config_path() {
            Some(p) if p.exists() => toml::from_str(
                &std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?,
            )
            .with_context(|| format!("parsing {}", p.display()))?,
            _ => Config::default(),
        };
        let ctx_name = c.context.clone().or(cfg.current_context.clone());
        let ctx = match &ctx_name {
            Some(n) => match cfg.contexts.get(n) {
                Some(x) => Some(x),
                None if c.context.is_some() => bail!("no context {n:?} in the config"),
                None => None,
            },
            None => None,
        };
        let explicit = c
            .server
            .clone()
            .or_else(|| ctx.and_then(|x| x.server.clone()));
        // Last: the `kiln up` of this state directory, with its admin token.
        let (base, up_token) = match explicit {
            Some(s) => (s, None),
            None => match crate::up::running(&crate::up::Paths::of(None)) {
                Some(ep) => {
                    let paths = crate::up::Paths::of(None);
                    (
                        format!("unix:{}", ep.socket.display()),
                        Some(paths.admin_token()),
                    )
                }
                None => bail!(
                    "no server: use --server, KILN_SERVER or a context in ~/.config/kiln/config.toml, \
                     or start the embedded one with kiln up"
                ),
            },
        };
        let read_token = |p: &PathBuf| -> Result<String> {
            let t = std::fs::read_to_string(p)
                .with_context(|| format!("reading the token in {}", p.display()))?;
            Ok(t.trim().to_owned())
        };
        let token = match (&c.token_file, &c.token) {
            (Some(p), _) => read_token(p)?,
            (None, Some(t)) => t.clone(),
            (None, None) => match (ctx, &up_token) {
                (_, Some(p)) => read_token(p)?,
                (Some(Context_ { token: Some(t), .. }), _) => t.clone(),
                (
                    Some(Context_ {
                        token_file: Some(p),
                        ..
                    }),
                    _,
                ) => read_token(p)?,
                _ => bail!("no token: use --token-file, KILN_TOKEN, --token or a context"),
            },
        };
        let ca = c.ca.clone().or_else(|| ctx.and_then(|x| x.ca.clone()));
        let mut http = reqwest::Client::builder();
        if let Some(p) = &ca {
            let pem = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .with_context(|| format!("{} holds no usable PEM certificate", p.display()))?;
            http = http.tls_certs_only(certs);
        }
        let socket = unix_path(&base);
        if let Some(sock) = &socket {
            http = http.unix_socket(sock.as_path());
        }
        let http = http.build().context("building the HTTP client")?;
        let base = if socket.is_some() {
            "http://kiln".to_owned()
        } else if base.starts_with("http://") || base.starts_with("https://") {
            base.trim_end_matches('/').to_owned()
        } else {
            format!("http://{}", base.trim_end_matches('/'))
        };
        Ok(Client {
            http,
            base,
            token,
            socket,
            ca,
        })
    }

    /// The server: its URL, or `unix:PATH`.
    pub fn server(&self) -> String {
        match &self.socket {
            Some(p) => format!("unix:{}", p.display()),
            None => self.base.clone(),
        }
    }

    /// The underlying HTTP client and the bearer token, for requests
    /// [`Client::call`] does not cover (streamed bodies).
    pub fn http(&self) -> (&reqwest::Client, &str) {
        (&self.http, &self.token)
    }

    /// Opens a WebSocket to an API path (`/sandboxes/ID/exec?...`) with the
    /// bearer token, over whatever transport the server is reached by:
    /// a Unix socket, plain TCP or TLS (verified against `--ca`).
    pub async fn ws(&self, path: &str) -> Result<Ws> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let url = match self.base.strip_prefix("https://") {
            Some(rest) => format!("wss://{rest}/v1{path}"),
            None => format!("ws://{}/v1{path}", self.base.trim_start_matches("http://")),
        };
        let mut req = url
            .as_str()
            .into_client_request()
            .with_context(|| format!("bad WebSocket URL {url}"))?;
        req.headers_mut().insert(
            "authorization",
            format!("Bearer {}", self.token)
                .parse()
                .context("the token is not a valid header value")?,
        );
        let io: Box<dyn WsIo> = if let Some(sock) = &self.socket {
            Box::new(
                tokio::net::UnixStream::connect(sock)
                    .await
                    .with_context(|| format!("cannot reach {}", sock.display()))?,
            )
        } else {
            let host = req.uri().host().context("no host in the URL")?.to_owned();
            let tls = req.uri().scheme_str() == Some("wss");
            let port = req.uri().port_u16().unwrap_or(if tls { 443 } else { 80 });
            let host_only = host.trim_start_matches('[').trim_end_matches(']');
            let tcp = tokio::net::TcpStream::connect((host_only, port))
                .await
                .with_context(|| format!("cannot reach {}", self.base))?;
            let _ = tcp.set_nodelay(true);
            if tls {
                let Some(ca) = &self.ca else {
                    bail!("a WebSocket to an https:// server needs --ca (or the context's ca)");
                };
                let mut cfg = kiln_server::tls::client_config(ca)?;
                // A WebSocket is an HTTP/1.1 upgrade.
                cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
                let name =
                    tokio_rustls::rustls::pki_types::ServerName::try_from(host_only.to_owned())
                        .with_context(|| format!("{host_only} is not a valid TLS server name"))?;
                let conn = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
                    .connect(name, tcp)
                    .await
                    .with_context(|| format!("TLS handshake with {}", self.base))?;
                Box::new(conn)
            } else {
                Box::new(tcp)
            }
        };
        let (ws, _) = tokio_tungstenite::client_async(req, io)
            .await
            .with_context(|| format!("opening the WebSocket {path} on {}", self.server()))?;
        Ok(ws)
    }

    /// The URL of an API path (`/sandboxes/ID`), whatever the transport.
    pub fn url(&self, path: &str) -> String {
        format!("{}/v1{path}", self.base)
    }

    /// A request to `/v1{path}` with the token, for streamed answers.
    pub(crate) fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}/v1{path}", self.base))
            .bearer_auth(&self.token)
    }

    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<Vec<u8>> {
        let mut rb = self
            .http
            .request(method.parse()?, format!("{}/v1{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            rb = rb
                .header("content-type", "application/json")
                .body(serde_json::to_vec(&b)?);
        }
        let r = rb
            .send()
            .await
            .with_context(|| format!("cannot reach {}", self.server()))?;
        let status = r.status();
        let bytes = r.bytes().await?.to_vec();
        if !status.is_success() {
            match serde_json::from_slice::<ErrorBody>(&bytes) {
                Ok(e) => bail!(
                    "{} ({}): {}",
                    status.as_u16(),
                    e.error.code,
                    e.error.message
                ),
                Err(_) => bail!("{}: {}", status, String::from_utf8_lossy(&bytes)),
            }
        }
        Ok(bytes)
    }
}

/// Whose token an embedded-server connection carries.
#[allow(dead_code)] // `Tenant`: the sandbox commands (client_cmd.rs)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum As {
    /// The tenant `default` (`STATE/up/tenant-token`): sandbox commands.
    Tenant,
    /// The admin token (`STATE/up/token`): nodes, cluster, tenants, tokens.
    Admin,
}

/// Is a server named by `--server`, `KILN_SERVER` or a context?
pub(crate) fn explicit_server(c: &Conn) -> Result<bool> {
    if c.server.is_some() {
        return Ok(true);
    }
    let cfg: Config = match config_path() {
        Some(p) if p.exists() => toml::from_str(
            &std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?,
        )
        .with_context(|| format!("parsing {}", p.display()))?,
        _ => Config::default(),
    };
    let name = c.context.clone().or(cfg.current_context.clone());
    Ok(name
        .and_then(|n| cfg.contexts.get(&n).map(|x| x.server.is_some()))
        .unwrap_or(false))
}

/// `conn` pointed at a running `kiln up`'s socket with its token.
fn embedded(conn: &Conn, p: &crate::up::Paths, ep: &crate::up::Endpoint, who: As) -> Conn {
    let mut c = conn.clone();
    c.server = Some(format!("unix:{}", ep.socket.display()));
    if c.token.is_none() && c.token_file.is_none() {
        c.token_file = Some(match who {
            As::Tenant => p.tenant_token(),
            As::Admin => p.admin_token(),
        });
    }
    c
}

/// Whether a command with no server configured and no `kiln up` running
/// starts `kiln up -d` (the default; `KILN_AUTO_UP=0` turns it off).
pub fn auto_up() -> bool {
    std::env::var("KILN_AUTO_UP").map_or(true, |v| auto_up_value(&v))
}

/// `KILN_AUTO_UP`'s value: `0`, `false`, `no`, `off` (any case) and the
/// empty string turn auto-start off; anything else leaves it on.
fn auto_up_value(v: &str) -> bool {
    !matches!(
        v.trim().to_ascii_lowercase().as_str(),
        "" | "0" | "false" | "no" | "off"
    )
}

/// Where a sandbox command goes: `Some(conn)` to use the API (a server
/// named by `--server`, `KILN_SERVER` or a context; else the `kiln up`
/// running on the state directory, with the tenant `default`'s token; else,
/// unless `KILN_AUTO_UP=0`, a `kiln up -d` started now, said in one line on
/// stderr), `None` for the node-local path.
#[allow(dead_code)] // called by the sandbox commands (client_cmd.rs)
pub async fn api_route(conn: &Conn) -> Result<Option<Conn>> {
    api_route_as(conn, As::Tenant).await
}

/// Set to `1`, the sandbox commands use this host's node service directly
/// whatever server is configured or running: the node service sets it on
/// the `kiln` processes it starts itself (`template create --auto`,
/// `template fill`, supervisors), and benchmarks of the node-local path.
pub const NODE_LOCAL_ENV: &str = kiln_node::NODE_LOCAL_ENV;

fn node_local() -> bool {
    std::env::var_os(NODE_LOCAL_ENV).is_some_and(|v| v == "1")
}

/// [`api_route`] with the token of `who` for an embedded server.
pub async fn api_route_as(conn: &Conn, who: As) -> Result<Option<Conn>> {
    if node_local() {
        return Ok(None);
    }
    if explicit_server(conn)? {
        return Ok(Some(conn.clone()));
    }
    let p = crate::up::Paths::of(None);
    if let Some(ep) = crate::up::running(&p) {
        return Ok(Some(embedded(conn, &p, &ep, who)));
    }
    if !auto_up() {
        return Ok(None);
    }
    let ep = match crate::up::start_detached(&p, None, &Default::default()).await {
        Ok(ep) => ep,
        // Another command started it between our look and our start.
        Err(e) => match crate::up::running(&p) {
            Some(ep) => return Ok(Some(embedded(conn, &p, &ep, who))),
            None => return Err(e),
        },
    };
    eprintln!(
        "kiln: started the embedded server (kiln up): API on {} and {}; stop it with kiln down",
        ep.url.trim_start_matches("http://"),
        ep.socket.display()
    );
    Ok(Some(embedded(conn, &p, &ep, who)))
}

/// The admin commands' client: [`api_route_as`] with the admin token
/// (auto-starting `kiln up` unless `KILN_AUTO_UP=0`), else the error that
/// names every way to give a server.
async fn admin_client(conn: &Conn) -> Result<Client> {
    match api_route_as(conn, As::Admin).await? {
        Some(c) => Client::new(&c),
        None => Client::new(conn),
    }
}

fn print_json(bytes: &[u8]) -> Result<()> {
    let v: serde_json::Value = serde_json::from_slice(bytes)?;
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(())
}

pub async fn nodes(conn: Conn, cmd: NodesCommand) -> Result<i32> {
    let c = admin_client(&conn).await?;
    let (verb, name) = match cmd {
        NodesCommand::Ls => {
            let b = c.call("GET", "/nodes", None).await?;
            if conn.output == Output::Json {
                print_json(&b)?;
            } else {
                let l: NodeList = serde_json::from_slice(&b)?;
                println!("NAME\tSTATUS\tCORDONED\tDRIVER\tCPUS\tMEMORY_MIB\tDISK_MIB\tSANDBOXES");
                for n in l.items {
                    println!(
                        "{}\t{:?}\t{}\t{}\t{}/{}\t{}/{}\t{}/{}\t{}",
                        n.name,
                        n.status,
                        n.cordoned,
                        serde_json::to_value(n.driver)?.as_str().unwrap_or("?"),
                        n.allocated.cpus,
                        n.capacity.cpus,
                        n.allocated.memory_mib,
                        n.capacity.memory_mib,
                        n.allocated.disk_mib,
                        n.capacity.disk_mib,
                        n.sandboxes
                    );
                }
            }
            return Ok(0);
        }
        NodesCommand::Cordon { name } => ("cordon", name),
        NodesCommand::Uncordon { name } => ("uncordon", name),
        NodesCommand::Drain { name } => ("drain", name),
        NodesCommand::RevokeCredential { name } => ("revoke-credential", name),
    };
    c.call("POST", &format!("/nodes/{name}/{verb}"), None)
        .await?;
    Ok(0)
}

pub async fn cluster(conn: Conn, cmd: ClusterCommand) -> Result<i32> {
    let c = admin_client(&conn).await?;
    match cmd {
        ClusterCommand::Status => {
            let b = c.call("GET", "/cluster", None).await?;
            if conn.output == Output::Json {
                return print_json(&b).map(|()| 0);
            }
            let s: ClusterStatus = serde_json::from_slice(&b)?;
            println!(
                "leader {}  term {}  commit {}  applied {}",
                s.leader.map_or("none".into(), |l| l.to_string()),
                s.term,
                s.commit_index.map_or("-".into(), |i| i.to_string()),
                s.applied_index.map_or("-".into(), |i| i.to_string())
            );
            println!("ID\tVOTER\tRAFT\tAPI");
            for m in s.members {
                println!("{}\t{}\t{}\t{}", m.id, m.voter, m.raft_addr, m.api_url);
            }
        }
        ClusterCommand::Add {
            id,
            raft_addr,
            api_url,
        } => {
            c.call(
                "POST",
                "/cluster/members",
                Some(json!({"id": id, "raft_addr": raft_addr, "api_url": api_url})),
            )
            .await?;
        }
        ClusterCommand::Remove { id } => {
            c.call("DELETE", &format!("/cluster/members/{id}"), None)
                .await?;
        }
    }
    Ok(0)
}

pub async fn tenants(conn: Conn, cmd: TenantsCommand) -> Result<i32> {
    let c = admin_client(&conn).await?;
    match cmd {
        TenantsCommand::Create {
            name,
            max_sandboxes,
            max_cpus,
            max_memory_mib,
        } => {
            let d = kiln_api::cluster::Quotas::default();
            let q = json!({
                "sandboxes": max_sandboxes.unwrap_or(d.sandboxes),
                "cpus": max_cpus.unwrap_or(d.cpus),
                "memory_mib": max_memory_mib.unwrap_or(d.memory_mib),
            });
            let b = c
                .call("POST", "/tenants", Some(json!({"name": name, "quotas": q})))
                .await?;
            if conn.output == Output::Json {
                print_json(&b)?;
            } else {
                let t: Tenant = serde_json::from_slice(&b)?;
                println!("{}", t.name);
            }
        }
        TenantsCommand::Ls => {
            let b = c.call("GET", "/tenants", None).await?;
            if conn.output == Output::Json {
                return print_json(&b).map(|()| 0);
            }
            let l: TenantList = serde_json::from_slice(&b)?;
            println!("NAME\tSANDBOXES\tCPUS\tMEMORY_MIB");
            for t in l.items {
                println!(
                    "{}\t{}/{}\t{}/{}\t{}/{}",
                    t.name,
                    t.usage.sandboxes,
                    t.quotas.sandboxes,
                    t.usage.cpus,
                    t.quotas.cpus,
                    t.usage.memory_mib,
                    t.quotas.memory_mib
                );
            }
        }
    }
    Ok(0)
}

pub async fn tokens(conn: Conn, cmd: TokensCommand) -> Result<i32> {
    let c = admin_client(&conn).await?;
    match cmd {
        TokensCommand::Create {
            tenant,
            admin,
            description,
        } => {
            let body = if admin {
                json!({"role": "admin", "description": description})
            } else {
                json!({"role": "tenant", "tenant": tenant, "description": description})
            };
            let b = c.call("POST", "/tokens", Some(body)).await?;
            if conn.output == Output::Json {
                print_json(&b)?;
            } else {
                let t: TokenCreated = serde_json::from_slice(&b)?;
                eprintln!("token {} (the secret is shown only now):", t.id);
                println!("{}", t.secret);
            }
        }
        TokensCommand::Revoke { id } => {
            c.call("DELETE", &format!("/tokens/{id}"), None).await?;
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    #[test]
    fn auto_up_is_turned_off_by_the_usual_words() {
        for off in ["0", "false", "FALSE", "no", "Off", "", " 0 "] {
            assert!(!auto_up_value(off), "{off:?}");
        }
        for on in ["1", "true", "yes", "on"] {
            assert!(auto_up_value(on), "{on:?}");
        }
    }

    #[test]
    fn unix_server_strings() {
        assert_eq!(
            unix_path("unix:/a/api.sock"),
            Some(PathBuf::from("/a/api.sock"))
        );
        assert_eq!(
            unix_path("unix:///a/api.sock"),
            Some(PathBuf::from("/a/api.sock"))
        );
        assert_eq!(unix_path("unix:"), None);
        assert_eq!(unix_path("http://127.0.0.1:1"), None);
    }

    /// `Client::ws` over a Unix socket: the upgrade carries the API path and
    /// the bearer token, and frames go both ways.
    #[tokio::test]
    // The handshake callback's error type is tungstenite's, not ours.
    #[allow(clippy::result_large_err)]
    async fn ws_over_a_unix_socket_carries_the_path_and_the_token() {
        let dir = tempfile::tempdir().expect("tmp");
        let sock = dir.path().join("api.sock");
        let l = tokio::net::UnixListener::bind(&sock).expect("bind");
        let server = tokio::spawn(async move {
            let (s, _) = l.accept().await.expect("accept");
            let mut seen = (String::new(), String::new());
            let cb = |req: &tokio_tungstenite::tungstenite::handshake::server::Request, resp| {
                seen = (
                    req.uri().to_string(),
                    req.headers()
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned(),
                );
                Ok(resp)
            };
            let mut ws = tokio_tungstenite::accept_hdr_async(s, cb)
                .await
                .expect("handshake");
            let m = ws.next().await.expect("a frame").expect("ok");
            ws.send(m).await.expect("echo");
            seen
        });
        let conn = Conn {
            server: Some(format!("unix:{}", sock.display())),
            token: Some("tok-123".into()),
            ..Conn::default()
        };
        let c = Client::new(&conn).expect("client");
        assert_eq!(c.server(), format!("unix:{}", sock.display()));
        let mut ws = c.ws("/sandboxes/abc/exec?x=1").await.expect("ws opens");
        ws.send(Message::text("ping")).await.expect("send");
        let back = ws.next().await.expect("a frame").expect("ok");
        assert_eq!(back, Message::text("ping"));
        let (uri, auth) = server.await.expect("server");
        assert_eq!(uri, "/v1/sandboxes/abc/exec?x=1");
        assert_eq!(auth, "Bearer tok-123");
        // Nothing listens: a clear error, no panic.
        drop(ws);
        std::fs::remove_file(&sock).expect("rm");
        let e = c.ws("/x").await.err().expect("fails");
        assert!(format!("{e:#}").contains("cannot reach"), "{e:#}");
    }

    /// `Client::ws` to an https server: TLS verified against `--ca` (one
    /// that did not sign the certificate is refused), then the upgrade.
    #[tokio::test]
    async fn wss_is_verified_against_the_ca() {
        let dir = tempfile::tempdir().expect("tmp");
        let pem = |name: &str, text: String| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).expect("write");
            p
        };
        let ca = |cn: &str| {
            let key = rcgen::KeyPair::generate().expect("key");
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, cn);
            let cert = params.self_signed(&key).expect("ca");
            (cert.pem(), rcgen::Issuer::new(params, key))
        };
        let (ca_pem, issuer) = ca("test CA");
        let (other_pem, _) = ca("other CA");
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".into()])
            .expect("params")
            .signed_by(&key, &issuer)
            .expect("cert");
        let files = kiln_server::tls::TlsFiles {
            cert: pem("cert.pem", cert.pem()),
            key: pem("key.pem", key.serialize_pem()),
        };
        let acceptor =
            tokio_rustls::TlsAcceptor::from(kiln_server::tls::server_config(&files).expect("tls"));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            // The refused client's handshake, then the good one.
            let (s, _) = l.accept().await.expect("accept");
            assert!(acceptor.accept(s).await.is_err());
            let (s, _) = l.accept().await.expect("accept");
            let tls = acceptor.accept(s).await.expect("tls");
            let mut ws = tokio_tungstenite::accept_async(tls).await.expect("ws");
            let m = ws.next().await.expect("a frame").expect("ok");
            ws.send(m).await.expect("echo");
        });
        let conn = |ca: PathBuf| Conn {
            server: Some(format!("https://{addr}")),
            token: Some("tok".into()),
            ca: Some(ca),
            ..Conn::default()
        };
        let bad = Client::new(&conn(pem("other.pem", other_pem))).expect("client");
        let e = bad.ws("/x").await.err().expect("an unknown CA is refused");
        assert!(format!("{e:#}").contains("TLS handshake"), "{e:#}");
        let good = Client::new(&conn(pem("ca.pem", ca_pem))).expect("client");
        let mut ws = good.ws("/sandboxes/a/attach").await.expect("wss opens");
        ws.send(Message::text("over tls")).await.expect("send");
        let back = ws.next().await.expect("a frame").expect("ok");
        assert_eq!(back, Message::text("over tls"));
        server.await.expect("server");
    }
}
