//! `kiln`: run OCI images as commands in microVMs.
//!
//! One binary: the user commands, and `kiln shim`, the per-sandbox
//! supervisor the commands start (hidden; not for users).

mod admin;
mod attach;
mod bench;
mod bench_api_warm;
mod bench_density;
mod bench_fork;
mod bench_net;
mod bench_warm;
mod client_cmd;
mod client_cp;
mod client_snap;
mod client_stream;
mod client_tpl;
mod commands;
mod images;
mod info;
mod node_cmd;
mod server_cmd;
mod snapshots;
mod templates;
mod term;
mod up;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Run OCI images as commands in hardware-isolated microVMs.
#[derive(Debug, Parser)]
#[command(name = "kiln", version, about, propagate_version = true)]
struct Cli {
    /// Log verbosity for Kiln's own messages (error, warn, info, debug, trace).
    #[arg(long, global = true, env = "KILN_LOG", default_value = "warn")]
    log: String,
    /// The API server the sandbox commands (run, exec, cp, logs, ps,
    /// inspect, stop, rm, pause, resume, wait) go through (default:
    /// KILN_SERVER, else the current context's; none: this host).
    #[arg(long = "server", global = true, value_name = "URL")]
    server: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a command in a new sandbox.
    Run(Box<RunArgs>),
    /// List sandboxes.
    Ps {
        /// Include sandboxes that have ended.
        #[arg(short, long)]
        all: bool,
        /// Only print IDs.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Run a command in a running sandbox.
    Exec(ExecArgs),
    /// Copy files between a sandbox and the host: `kiln cp ID:/path LOCAL` or
    /// `kiln cp LOCAL ID:/path` (`-` for a tar stream on stdin/stdout).
    Cp { src: String, dst: String },
    /// Print a sandbox's output.
    Logs {
        /// Keep following the output until the sandbox ends.
        #[arg(short, long)]
        follow: bool,
        id: String,
    },
    /// Stop sandboxes: SIGTERM to the main process, SIGKILL after the grace time.
    Stop {
        /// Seconds to wait before SIGKILL (default 10; through a server,
        /// its node's `--stop-grace`).
        #[arg(short = 't', long = "time")]
        time: Option<u64>,
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Remove sandboxes.
    Rm {
        /// Kill running sandboxes first.
        #[arg(short, long)]
        force: bool,
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Wait until sandboxes end; print their exit codes.
    Wait {
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Show sandboxes as JSON.
    Inspect {
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Pause a sandbox's VM (it uses no CPU while paused).
    Pause { id: String },
    /// Resume a paused sandbox.
    Resume { id: String },
    /// Manage images.
    Images {
        #[command(subcommand)]
        command: ImagesCommand,
    },
    /// Show which VMM and acceleration Kiln uses, and why.
    Info {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// VMM driver to evaluate.
        #[arg(long, default_value = "auto")]
        driver: String,
    },
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        command: commands::BenchCommand,
    },
    /// Snapshot a sandbox (memory, CPU and device state, writable disk):
    /// `kiln snapshot ID [--name NAME]`; `kiln snapshot ls|rm`.
    Snapshot(snapshots::SnapshotArgs),
    /// Start a new sandbox from a snapshot; its processes continue where
    /// they were.
    Restore {
        snapshot: String,
        /// Run in the background and print the sandbox ID.
        #[arg(short = 'd', long)]
        detach: bool,
    },
    /// Fork a running or paused sandbox into N independent sandboxes; prints
    /// their IDs.
    Fork {
        id: String,
        /// How many sandboxes.
        #[arg(short = 'n', long = "count", default_value_t = 1)]
        count: u32,
    },
    /// Templates: images booted once and snapshotted, for warm starts:
    /// `kiln template create IMAGE`, `kiln template ls|rm`.
    Template {
        #[command(subcommand)]
        command: templates::TemplateCommand,
    },
    /// A sandbox's network policy: `kiln policy get ID` (rules and
    /// counters), `kiln policy set ID [--policy P] [--policy-default D]
    /// [--allow RULE] [--deny RULE]` (changed live).
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// What a sandbox's network policy dropped, oldest first: time, proto,
    /// destination, port and the rule (or default, protected destination,
    /// DNS elsewhere) that dropped it. Rate-limited to 20 a second per
    /// sandbox; the last 1,000 are kept.
    Events { id: String },
    /// Run this host as a node of a Kiln cluster: register with the
    /// server, run the sandboxes it assigns, report them.
    Node(Box<node_cmd::NodeArgs>),
    /// A control-plane server replica (REST API, node protocol, Raft).
    Server(Box<server_cmd::ServerArgs>),
    /// Worker nodes of a cluster: `kiln nodes ls|cordon|uncordon|drain`.
    Nodes {
        #[command(flatten)]
        conn: admin::Conn,
        #[command(subcommand)]
        command: admin::NodesCommand,
    },
    /// The control plane: `kiln cluster status|add|remove`.
    Cluster {
        #[command(flatten)]
        conn: admin::Conn,
        #[command(subcommand)]
        command: admin::ClusterCommand,
    },
    /// Tenants: `kiln tenants create|ls`.
    Tenants {
        #[command(flatten)]
        conn: admin::Conn,
        #[command(subcommand)]
        command: admin::TenantsCommand,
    },
    /// API tokens: `kiln tokens create|revoke`.
    Tokens {
        #[command(flatten)]
        conn: admin::Conn,
        #[command(subcommand)]
        command: admin::TokensCommand,
    },
    /// The embedded control plane: a single-replica server and this host's
    /// node in one process, the API on STATE/api.sock and 127.0.0.1:7090.
    Up(up::UpArgs),
    /// Stop `kiln up` (sandboxes keep running; the next `kiln up` adopts them).
    Down(up::DownArgs),
    /// The per-sandbox supervisor (started by `kiln run`).
    #[command(hide = true)]
    Shim { id: String },
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// The rules, in order, with packets and bytes allowed and dropped.
    Get { id: String },
    /// Replace the policy; the old one stays if the new one is invalid.
    Set {
        id: String,
        #[command(flatten)]
        policy: PolicyArgs,
    },
}

#[derive(Debug, Subcommand)]
enum ImagesCommand {
    /// Pull an image and convert it to a disk.
    Pull {
        image: String,
        /// Registries to reach over plain HTTP (host[:port]).
        #[arg(long = "insecure-registry")]
        insecure: Vec<String>,
    },
    /// List cached images.
    Ls {
        #[arg(short, long)]
        quiet: bool,
    },
    /// Remove cached images (refused while sandboxes, snapshots or
    /// templates use them).
    Rm {
        /// Remove even if ended sandboxes use it; only untag if snapshots or
        /// templates need it. Never removes an image a VM runs from.
        #[arg(short, long)]
        force: bool,
        #[arg(required = true)]
        images: Vec<String>,
    },
    /// Remove what no image needs (partial downloads, stale temporaries).
    Prune,
}

/// Options shared by `run` and `exec`.
#[derive(Debug, Args, Clone)]
pub struct ProcessArgs {
    /// Set an environment variable (`KEY=VALUE`, or `KEY` to copy it from here).
    #[arg(short = 'e', long = "env")]
    env: Vec<String>,
    /// Read environment variables from a file.
    #[arg(long = "env-file")]
    env_file: Vec<PathBuf>,
    /// Working directory inside the sandbox.
    #[arg(short = 'w', long = "workdir")]
    workdir: Option<String>,
    /// User: name, uid, uid:gid or name:group.
    #[arg(short = 'u', long = "user")]
    user: Option<String>,
    /// Keep stdin open and forward it.
    #[arg(short = 'i', long)]
    interactive: bool,
    /// Allocate a pseudo-terminal.
    #[arg(short = 't', long)]
    tty: bool,
}

#[derive(Debug, Args, Clone)]
pub struct RunArgs {
    /// The image (also accepted as the first positional argument).
    #[arg(long = "image")]
    image_flag: Option<String>,
    #[command(flatten)]
    process: ProcessArgs,
    /// Virtual CPUs.
    #[arg(long, default_value_t = 1)]
    cpus: u32,
    /// Guest memory in MiB.
    #[arg(long = "memory", short = 'm', default_value_t = 256)]
    memory: u32,
    /// Size of the writable disk in MiB.
    #[arg(long, default_value_t = 4096)]
    disk: u32,
    /// Kill the main process after this many seconds (paused time not counted).
    #[arg(long)]
    timeout: Option<u64>,
    /// VMM driver: auto, qemu or firecracker.
    #[arg(long, default_value = "auto")]
    driver: String,
    /// Run in the background and print the sandbox ID.
    #[arg(short = 'd', long)]
    detach: bool,
    /// Remove the sandbox when it ends.
    #[arg(long)]
    rm: bool,
    /// Override the image's ENTRYPOINT ("" clears it).
    #[arg(long)]
    entrypoint: Option<String>,
    /// Registries to reach over plain HTTP (host[:port]).
    #[arg(long = "insecure-registry")]
    insecure: Vec<String>,
    /// When to contact the registry: missing (use the cached image if any), always, never.
    #[arg(long, value_enum, default_value = "missing")]
    pull: images::PullPolicy,
    /// Print what happens (image, driver, timings) on stderr.
    #[arg(short = 'v', long)]
    verbose: bool,
    /// Boot the VM even if a template for this image and resources exists.
    #[arg(long)]
    cold: bool,
    #[command(flatten)]
    net: NetArgs,
    /// Most output the sandbox's log keeps on the host (e.g. 16M, 1G); older
    /// output is dropped first. Default: KILN_LOG_LIMIT, else 64M.
    #[arg(long = "log-limit", value_name = "SIZE", value_parser = parse_log_limit)]
    log_limit: Option<u64>,
    /// A label `KEY=VALUE` on the sandbox (repeatable; the API lists and
    /// filters sandboxes by label).
    #[arg(short = 'l', long = "label", value_name = "KEY=VALUE")]
    labels: Vec<String>,
    /// IMAGE [-- CMD [ARGS...]]
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    rest: Vec<String>,
}

/// `--net` and the policy flags of `kiln run`.
#[derive(Debug, Args, Clone)]
pub struct NetArgs {
    /// The sandbox's network: `none` (no network device, the default) or
    /// `default` (an address on the node's bridge, NAT outwards, the policy
    /// enforced in the host kernel).
    #[arg(long = "net", default_value = "none", value_parser = ["none", "default"])]
    mode: String,
    #[command(flatten)]
    policy: PolicyArgs,
    /// Publish a guest port on the host: `[HOSTIP:]HOSTPORT:GUESTPORT`,
    /// `/udp` for UDP (repeatable; needs `--net default`). The guest is
    /// reachable from outside through these ports only.
    #[arg(short = 'p', long = "publish", value_name = "PORTS")]
    publish: Vec<String>,
}

/// A network policy on the command line: `--allow`/`--deny` rules in the
/// order given, then the `--policy` preset's rules, then the default.
#[derive(Debug, Args, Clone, Default)]
pub struct PolicyArgs {
    /// A preset (`internet-only`: everything public, nothing private,
    /// link-local or on the host; `none`: nothing) or a policy file.
    /// Default `internet-only`.
    #[arg(long)]
    policy: Option<String>,
    /// What no rule matches gets: allow or deny (default: the preset's).
    #[arg(long = "policy-default", value_parser = ["allow", "deny"])]
    policy_default: Option<String>,
    /// Allow `CIDR|DOMAIN[:PROTO[:PORT[-PORT]]]` (repeatable; order counts).
    #[arg(long = "allow", value_name = "RULE")]
    allow: Vec<String>,
    /// Deny `CIDR|DOMAIN[:PROTO[:PORT[-PORT]]]` (repeatable; order counts).
    #[arg(long = "deny", value_name = "RULE")]
    deny: Vec<String>,
    /// `--allow`/`--deny` in the order given (filled from the parsed
    /// command line).
    #[arg(skip)]
    ordered: Vec<(bool, String)>,
}

#[derive(Debug, Args, Clone)]
pub struct ExecArgs {
    #[command(flatten)]
    process: ProcessArgs,
    /// Re-attach to a process started earlier with `exec` (its output
    /// produced meanwhile is replayed).
    #[arg(long, value_name = "PID")]
    attach: Option<u32>,
    /// Start the process and print its PID instead of attaching.
    #[arg(short = 'd', long)]
    detach: bool,
    /// Seconds to wait for the sandbox to start the process before giving
    /// up (a guest too busy to answer). Default: KILN_EXEC_START_TIMEOUT, else 30.
    #[arg(long = "start-timeout", value_name = "SECS", value_parser = parse_secs)]
    start_timeout: Option<std::time::Duration>,
    /// ID [-- CMD [ARGS...]]
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
    rest: Vec<String>,
}

fn parse_log_limit(s: &str) -> Result<u64, String> {
    let n = kiln_node::logs::parse_limit(s).map_err(|e| e.to_string())?;
    if n < kiln_node::logs::MIN_LIMIT {
        return Err(format!(
            "{s} is below the smallest log limit, {} bytes",
            kiln_node::logs::MIN_LIMIT
        ));
    }
    Ok(n)
}

fn parse_secs(s: &str) -> Result<std::time::Duration, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v <= 86_400.0 => {
            Ok(std::time::Duration::from_secs_f64(v))
        }
        _ => Err(format!(
            "{s:?} is not a number of seconds between 0 and 86400"
        )),
    }
}

/// Exit status of a process killed by SIGPIPE, as shells report it.
const SIGPIPE_EXIT: i32 = 128 + 13;

/// Whether our stdout is a pipe or socket whose reader has gone (`kiln ps |
/// head -1`): then the command ends quietly, like Unix tools killed by
/// SIGPIPE (Rust ignores SIGPIPE, and Kiln must not take it back: a
/// supervisor that dies would otherwise kill `kiln` silently).
fn stdout_reader_gone() -> bool {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::os::fd::AsFd;
    let out = std::io::stdout();
    let mut fds = [PollFd::new(out.as_fd(), PollFlags::POLLOUT)];
    matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
        && fds[0]
            .revents()
            .is_some_and(|r| r.intersects(PollFlags::POLLERR | PollFlags::POLLHUP))
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// `--allow` (true) and `--deny` (false) values in command-line order.
fn ordered_rules(m: &clap::ArgMatches) -> Vec<(bool, String)> {
    let mut out: Vec<(usize, bool, String)> = vec![];
    for (id, allow) in [("allow", true), ("deny", false)] {
        if let (Some(vals), Some(idx)) = (m.get_many::<String>(id), m.indices_of(id)) {
            out.extend(idx.zip(vals).map(|(i, v)| (i, allow, v.clone())));
        }
    }
    out.sort_by_key(|(i, _, _)| *i);
    out.into_iter().map(|(_, a, v)| (a, v)).collect()
}

/// `--log LEVEL` is for Kiln's own messages: a bare level silences the
/// Raft library (`kiln bench api`'s replicas): its election warnings and,
/// on a loaded host, heartbeat timeouts it retries are expected there and
/// would land in the middle of a table (a write that fails is reported by
/// the bench itself). Full directives (`warn,openraft=warn`) are taken as
/// they are.
fn log_directives(log: &str) -> String {
    let bare = ["off", "error", "warn", "info", "debug", "trace"]
        .iter()
        .any(|l| log.eq_ignore_ascii_case(l));
    if bare {
        format!("{log},openraft=off")
    } else {
        log.to_string()
    }
}

fn main() {
    // Sandboxes hold guest RAM, disks, env and output: everything Kiln and
    // the VMMs it starts create is private to the user running them.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    // `println!` panics when stdout's reader has gone; end quietly then.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or_default();
        if msg.contains("failed printing to stdout") && stdout_reader_gone() {
            std::process::exit(SIGPIPE_EXIT);
        }
        default_hook(info);
    }));
    let matches = <Cli as clap::CommandFactory>::command().get_matches();
    let mut cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    // `--allow`/`--deny` are evaluated in the order given across both.
    match (&mut cli.command, matches.subcommand()) {
        (Command::Run(a), Some(("run", m))) => a.net.policy.ordered = ordered_rules(m),
        (
            Command::Policy {
                command: PolicyCommand::Set { policy, .. },
            },
            Some(("policy", m)),
        ) => {
            if let Some(("set", m)) = m.subcommand() {
                policy.ordered = ordered_rules(m);
            }
        }
        _ => {}
    }
    if let Command::Exec(a) = &cli.command
        && let Some(t) = a.start_timeout
    {
        attach::set_start_timeout(t);
    }
    let mut filter = tracing_subscriber::EnvFilter::try_new(log_directives(&cli.log))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(log_directives("warn")));
    // hickory-server logs every DNS request at info: guests must not be
    // able to fill a supervisor's log (the node resolver runs in one).
    if !cli.log.contains("hickory")
        && let Ok(d) = "hickory_server=warn".parse()
    {
        filter = filter.add_directive(d);
    }
    if matches!(&cli.command, Command::Server(a) if a.log_format == server_cmd::LogFormat::Json) {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    } else {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_target(false)
            .init();
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kiln: cannot start the async runtime: {e}");
            std::process::exit(125);
        }
    };
    let code = rt.block_on(async move {
        let r = match cli.command {
            // The server opens no node state: it never touches a VM.
            Command::Server(a) => server_cmd::run(*a).await,
            // API clients: no node state either.
            Command::Nodes { conn, command } => admin::nodes(conn, command).await,
            Command::Cluster { conn, command } => admin::cluster(conn, command).await,
            Command::Tenants { conn, command } => admin::tenants(conn, command).await,
            Command::Tokens { conn, command } => admin::tokens(conn, command).await,
            Command::Up(a) => up::up(a).await,
            Command::Down(a) => up::down(a).await,
            // The sandbox commands go through a configured server's API.
            c => match client_cmd::try_dispatch(c, cli.server).await {
                client_cmd::Routed::Done(r) => r,
                client_cmd::Routed::Local(c) => commands::dispatch(*c).await,
            },
        };
        match r {
            Ok(code) => code,
            Err(e) if is_broken_pipe(&e) && stdout_reader_gone() => SIGPIPE_EXIT,
            Err(e) => {
                // Messages may quote what a guest sent: never print its
                // control characters raw.
                eprintln!(
                    "kiln: {}",
                    kiln_api::text::escape_controls(&format!("{e:#}"))
                );
                125
            }
        }
    });
    // Do not wait for blocked stdin readers.
    rt.shutdown_timeout(std::time::Duration::from_millis(10));
    std::process::exit(code);
}
