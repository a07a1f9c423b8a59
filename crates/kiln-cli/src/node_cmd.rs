//! `kiln node`: flags only; the daemon is `kiln_node::daemon`.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use kiln_api::cluster::NodeName;
use kiln_node::daemon::{self, CapacityOverrides, DaemonConfig};
use kiln_node::node::Node;
use kiln_node::paths::Dirs;

#[derive(Debug, Args, Clone)]
pub struct NodeArgs {
    /// The control plane's node-protocol URLs, comma-separated
    /// (`http://host:port` or `host:port`); tried in turn.
    #[arg(long, env = "KILN_NODE_SERVER", required = true)]
    server: String,
    /// CA certificate(s) (PEM) the server's TLS certificate must chain to
    /// (needed for https:// server URLs).
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,
    /// A file holding the cluster's join token.
    #[arg(long = "join-token-file", value_name = "FILE")]
    join_token_file: PathBuf,
    /// The node's name (default: the host name).
    #[arg(long)]
    name: Option<String>,
    /// Where this node serves its stream endpoints (`host:port`), over
    /// TLS: the server pins the certificate the node registers.
    #[arg(long)]
    address: Option<String>,
    /// The certificate (PEM) the stream endpoints serve (default: a
    /// self-signed one made once under STATE/node/). Needs --tls-key.
    #[arg(long = "tls-cert", value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Seconds without a frame either way after which an exec or attach
    /// session is closed (default 3600).
    #[arg(long = "stream-idle-timeout", value_name = "SECS")]
    stream_idle_timeout: Option<u64>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long = "tls-key", value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// The node's state directory (default: KILN_STATE_DIR, else Kiln's).
    #[arg(long = "state-dir", value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Record sandboxes as running without booting VMs (for testing the
    /// control plane at scale); reports exactly like a real node.
    #[arg(long = "dry-run")]
    dry_run: bool,
    /// A label `KEY=VALUE` the scheduler may match (repeatable).
    #[arg(long = "label", value_name = "KEY=VALUE")]
    labels: Vec<String>,
    /// vCPUs offered to sandboxes (default: the host's CPUs × --cpu-overcommit).
    #[arg(long = "capacity-cpus")]
    capacity_cpus: Option<u32>,
    /// vCPUs offered per host CPU (1: none shared) [default: 8].
    #[arg(long = "cpu-overcommit", value_name = "N", value_parser = clap::value_parser!(u32).range(1..=64))]
    cpu_overcommit: Option<u32>,
    /// Memory offered to sandboxes, MiB (default: the host's RAM).
    #[arg(long = "capacity-memory-mib")]
    capacity_memory_mib: Option<u64>,
    /// Disk offered to sandboxes, MiB (default: the state directory's filesystem).
    #[arg(long = "capacity-disk-mib")]
    capacity_disk_mib: Option<u64>,
    /// Most sandbox starts at once (default: CPUs × 2).
    #[arg(long = "max-parallel-starts")]
    max_parallel_starts: Option<usize>,
    /// Seconds from SIGTERM to SIGKILL when the server stops a sandbox.
    #[arg(long = "stop-grace", default_value_t = 10)]
    stop_grace: u64,
    /// Registries to reach over plain HTTP (host[:port]).
    #[arg(long = "insecure-registry")]
    insecure: Vec<String>,
    /// An infrastructure range (IPv4 CIDR or address) no sandbox reaches
    /// unless a rule whose CIDR lies inside it allows it, like the node's
    /// own addresses (repeatable; `KILN_PROTECTED_CIDRS` adds more). The
    /// addresses of the `--server` URLs are always protected.
    #[arg(long = "protected-cidr", value_name = "CIDR")]
    protected: Vec<String>,
}

/// The IPv4 addresses a server URL (`http://host:port`, `host:port`,
/// `host`) names now; an unresolvable name gives none (logged).
fn server_addrs(url: &str) -> Vec<std::net::Ipv4Addr> {
    use std::net::{IpAddr, ToSocketAddrs};
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let hostport = rest.split('/').next().unwrap_or_default();
    let hostport = hostport.rsplit_once('@').map_or(hostport, |(_, h)| h);
    let with_port = if hostport.starts_with('[') || hostport.contains(':') {
        hostport.to_string()
    } else {
        format!("{hostport}:80")
    };
    match with_port.to_socket_addrs() {
        Ok(addrs) => {
            let mut v: Vec<_> = addrs
                .filter_map(|a| match a.ip() {
                    IpAddr::V4(ip) => Some(ip),
                    IpAddr::V6(_) => None,
                })
                .collect();
            v.sort();
            v.dedup();
            v
        }
        Err(e) => {
            tracing::warn!(server = url, error = %e, "cannot resolve a server to protect its address");
            vec![]
        }
    }
}

/// The node's protected ranges: `--protected-cidr` and its servers'
/// addresses, written where every Kiln process of this state directory
/// reads them (`kiln_net::protect`).
fn protected_ranges(
    flags: &[String],
    servers: &[String],
) -> Result<Vec<kiln_net::protect::Ipv4Net>> {
    let mut ranges = Vec::new();
    for f in flags {
        ranges.extend(kiln_net::protect::parse_list(f, "--protected-cidr")?);
    }
    for s in servers {
        ranges.extend(
            server_addrs(s)
                .into_iter()
                .map(|a| kiln_net::protect::Ipv4Net::new(a, 32).expect("32 is a valid prefix")),
        );
    }
    ranges.sort();
    ranges.dedup();
    Ok(ranges)
}

pub async fn run(args: NodeArgs) -> Result<i32> {
    let token = std::fs::read_to_string(&args.join_token_file)
        .with_context(|| format!("cannot read {}", args.join_token_file.display()))?;
    let token = token.trim().to_string();
    if token.is_empty() {
        bail!("{} holds no join token", args.join_token_file.display());
    }
    let name = match args.name {
        Some(n) => n,
        None => nix::unistd::gethostname()
            .context("cannot read the host name; give --name")?
            .to_string_lossy()
            .to_lowercase(),
    };
    let name = NodeName::new(name)?;
    let mut labels = HashMap::new();
    for l in &args.labels {
        let Some((k, v)) = l.split_once('=') else {
            bail!("--label {l:?}: expected KEY=VALUE");
        };
        labels.insert(k.to_string(), v.to_string());
    }
    let env = Dirs::from_env();
    let dirs = match args.state_dir {
        Some(s) => Dirs::new(s, env.cache),
        None => env,
    };
    let servers: Vec<String> = args.server.split(',').map(str::to_string).collect();
    let protected = protected_ranges(&args.protected, &servers)?;
    kiln_net::protect::write_file(&dirs.state.join("net"), &protected)?;
    tracing::info!(ranges = ?protected, "protected infrastructure ranges");
    let node = Node::open(dirs);
    let cfg = DaemonConfig {
        servers,
        join_token: token,
        address: args.address.unwrap_or_else(|| format!("{name}:0")),
        name,
        labels,
        dry_run: args.dry_run,
        capacity: CapacityOverrides {
            cpus: args.capacity_cpus,
            memory_mib: args.capacity_memory_mib,
            disk_mib: args.capacity_disk_mib,
            cpu_overcommit: args.cpu_overcommit,
        },
        insecure_registries: args.insecure,
        max_parallel_starts: args.max_parallel_starts,
        stop_grace: args.stop_grace,
        ca_pem: match &args.ca {
            Some(p) => {
                Some(std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?)
            }
            None => None,
        },
        stream_tls_files: args.tls_cert.zip(args.tls_key),
        stream_idle_secs: args.stream_idle_timeout,
    };
    let shutdown = async {
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
    };
    daemon::run(node, cfg, shutdown).await?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_and_flags_become_protected_ranges() {
        let got = protected_ranges(
            &["10.0.0.0/8".into(), "192.168.7.7".into()],
            &[
                "http://127.0.0.2:7400".into(),
                "127.0.0.3:7400".into(),
                "https://user@127.0.0.2:1/x".into(),
            ],
        )
        .unwrap();
        let s: Vec<String> = got.iter().map(|n| n.to_string()).collect();
        assert_eq!(
            s,
            [
                "10.0.0.0/8",
                "127.0.0.2/32",
                "127.0.0.3/32",
                "192.168.7.7/32"
            ]
        );
        let e = protected_ranges(&["10.0.0.0/40".into()], &[]).unwrap_err();
        assert!(format!("{e:#}").contains("10.0.0.0/40"), "{e:#}");
        assert!(server_addrs("http://[::1]:80").is_empty());
    }
}
