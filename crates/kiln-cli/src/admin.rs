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
#[derive(Debug, Args)]
pub struct Conn {
    /// The server's API URL.
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

pub(crate) struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Client {
    pub(crate) fn new(c: &Conn) -> Result<Client> {
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
        let base = c
            .server
            .clone()
            .or_else(|| ctx.and_then(|x| x.server.clone()))
            .context(
                "no server: use --server, KILN_SERVER or a context in ~/.config/kiln/config.toml",
            )?;
        let read_token = |p: &PathBuf| -> Result<String> {
            let t = std::fs::read_to_string(p)
                .with_context(|| format!("reading the token in {}", p.display()))?;
            Ok(t.trim().to_owned())
        };
        let token = match (&c.token_file, &c.token) {
            (Some(p), _) => read_token(p)?,
            (None, Some(t)) => t.clone(),
            (None, None) => match ctx {
                Some(Context_ { token: Some(t), .. }) => t.clone(),
                Some(Context_ {
                    token_file: Some(p),
                    ..
                }) => read_token(p)?,
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
        let http = http.build().context("building the HTTP client")?;
        let base = if base.starts_with("http://") || base.starts_with("https://") {
            base.trim_end_matches('/').to_owned()
        } else {
            format!("http://{}", base.trim_end_matches('/'))
        };
        Ok(Client { http, base, token })
    }

    /// A request to `/v1{path}` with the token, for streamed answers.
    pub(crate) fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}/v1{path}", self.base))
            .bearer_auth(&self.token)
    }

    pub(crate) async fn call(
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
            .with_context(|| format!("cannot reach {}", self.base))?;
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

fn print_json(bytes: &[u8]) -> Result<()> {
    let v: serde_json::Value = serde_json::from_slice(bytes)?;
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(())
}

pub async fn nodes(conn: Conn, cmd: NodesCommand) -> Result<i32> {
    let c = Client::new(&conn)?;
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
    let c = Client::new(&conn)?;
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
    let c = Client::new(&conn)?;
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
    let c = Client::new(&conn)?;
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
