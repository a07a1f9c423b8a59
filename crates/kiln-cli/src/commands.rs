//! The user commands.

//! Each command parses its flags into a request for the node service
//! (`kiln_node::node::Node`), calls it and prints what it returns: no
//! sandbox logic lives here.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use kiln_api::sandbox::{
    DriverPreference, MAX_CPUS, MAX_DISK_MIB, MAX_MEMORY_MIB, MIN_DISK_MIB, Resources, SandboxSpec,
    StartPreference,
};
use kiln_node::compose;
use kiln_node::node::{ExecSpec, Node, RunRequest, StartPath};
use kiln_node::paths::Dirs;
use kiln_node::shim;
use kiln_node::store::SandboxState;

use crate::{Command, ExecArgs, PolicyArgs, PolicyCommand, ProcessArgs, RunArgs, attach, images};

/// `kiln stop`'s grace time when `-t` is not given (as `docker stop`).
pub(crate) const DEFAULT_STOP_GRACE: u64 = 10;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Cold starts: image pull+convert, VMM spawn → agent ready, `kiln run` →
    /// first output byte, idle sandbox memory.
    Cold {
        /// Image to run (required; `kiln-testkit image busybox` prints the test image).
        #[arg(long)]
        image: Option<String>,
        /// Runs per measurement.
        #[arg(long, default_value_t = 20)]
        runs: usize,
        /// Where to write the JSON results.
        #[arg(long, default_value = "bench-cold.json")]
        json: PathBuf,
        #[arg(long, default_value = "auto")]
        driver: String,
    },
    /// Warm starts: cold vs warm `kiln run` → first output byte, the raw
    /// driver restore, Kiln's overhead, and concurrent warm starts.
    Warm {
        /// Image to run (a template is created for it if missing).
        #[arg(long)]
        image: Option<String>,
        /// Runs per measurement.
        #[arg(long, default_value_t = 30)]
        runs: usize,
        /// Warm starts launched at once.
        #[arg(long, default_value_t = 20)]
        concurrent: usize,
        /// Where to write the JSON results.
        #[arg(long, default_value = "bench-warm.json")]
        json: PathBuf,
        #[command(flatten)]
        fork: crate::bench_fork::ForkBenchArgs,
    },
    /// The VMM drivers side by side: boot, snapshot downtime, restore and
    /// fork of the bare-metal test guest on QEMU/TCG, QEMU/KVM (when
    /// /dev/kvm exists) and Firecracker (when KILN_FIRECRACKER_BIN is set).
    Vmm {
        /// Rounds per driver.
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Where to write the JSON results.
        #[arg(long, default_value = "bench-vmm.json")]
        json: PathBuf,
    },
    /// Idle sandboxes per host: starts them (booted, warm-started, pool
    /// members, forks) until --count or the memory budget, and reports host
    /// memory per sandbox (PSS and the drop of MemAvailable).
    Density {
        /// Image to run (a template is created for it if missing).
        #[arg(long)]
        image: Option<String>,
        /// Kinds of sandboxes to measure, one after another.
        #[arg(
            long,
            value_enum,
            value_delimiter = ',',
            default_value = "boot,warm,pool,fork"
        )]
        kinds: Vec<crate::bench_density::Kind>,
        /// Sandboxes per kind at most.
        #[arg(long, default_value_t = 50)]
        count: usize,
        /// Stop a kind once the host's available memory fell by this many
        /// MiB (default: half of what is available at the start).
        #[arg(long)]
        budget_mib: Option<u64>,
        /// Guest memory of each sandbox, MiB.
        #[arg(long, default_value_t = 256)]
        memory: u32,
        /// Where to write the JSON results.
        #[arg(long, default_value = "bench-density.json")]
        json: PathBuf,
    },
    /// Network policy costs: live policy update latency (1 and --rules
    /// rules), guest → host TCP throughput and connection rate with no
    /// rules and behind --rules rules (real microVMs; needs root).
    Net {
        /// Image to run (needs busybox `sh`, `dd` and `nc`).
        #[arg(long)]
        image: Option<String>,
        #[arg(long, default_value_t = 1000)]
        rules: usize,
        /// Updates measured per policy size.
        #[arg(long, default_value_t = 50)]
        updates: usize,
        /// Where to write the JSON results.
        #[arg(long, default_value = "bench-net.json")]
        json: PathBuf,
    },
    /// Control-plane writes: sandbox creates committed per second through
    /// 1 and 3 Raft replicas on loopback, and commit latency (no VM boots).
    Api {
        /// Creates per cluster.
        #[arg(long, default_value_t = 5000)]
        creates: usize,
        /// Creates in flight at once.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// Where to write the JSON results.
        #[arg(long, default_value = "bench-api.json")]
        json: PathBuf,
        /// Instead: a warm `kiln run` → first byte, node-local against
        /// through `kiln up`'s API (started for the run if none runs).
        #[arg(long, requires = "image")]
        warm: bool,
        /// The image of --warm.
        #[arg(long, requires = "warm")]
        image: Option<String>,
        /// Runs of each --warm path.
        #[arg(long, default_value_t = 10)]
        runs: usize,
    },
}

pub async fn dispatch(cmd: Command) -> Result<i32> {
    if let Command::Node(args) = cmd {
        return crate::node_cmd::run(*args).await;
    }
    let node = Node::open(Dirs::from_env());
    let store = node.store();
    match cmd {
        Command::Run(args) => run(&node, *args).await,
        Command::Ps { all, quiet } => ps(&node, all, quiet).await,
        Command::Exec(args) => exec(&node, args).await,
        Command::Cp { src, dst } => attach::cp(&node, &src, &dst).await,
        Command::Logs { follow, id } => logs(&node, &id, follow).await,
        Command::Stop { time, ids } => {
            let node = &node;
            each(ids, |id| async move {
                node.stop(&id, time.unwrap_or(DEFAULT_STOP_GRACE))
                    .await
                    .map_err(Into::into)
            })
            .await
        }
        Command::Rm { force, ids } => {
            let node = &node;
            each(ids, |id| async move {
                node.remove(&id, force).await.map_err(Into::into)
            })
            .await
        }
        Command::Wait { ids } => {
            let mut code = 0;
            for id in ids {
                match node.wait(&id).await {
                    Ok(c) => println!("{c}"),
                    Err(e) => {
                        eprintln!("kiln: {:#}", anyhow::Error::from(e));
                        code = 1;
                    }
                }
            }
            Ok(code)
        }
        Command::Inspect { ids } => {
            let node = &node;
            let mut code = 0;
            for id in ids {
                match node.get(&id) {
                    Ok(r) => println!("{}", serde_json::to_string_pretty(&r)?),
                    Err(e) => {
                        eprintln!("kiln: {:#}", anyhow::Error::from(e));
                        code = 1;
                    }
                }
            }
            Ok(code)
        }
        Command::Pause { id } => {
            println!("{}", node.pause(&id).await?);
            Ok(0)
        }
        Command::Resume { id } => {
            println!("{}", node.resume(&id).await?);
            Ok(0)
        }
        Command::Images { command } => images::dispatch(&node, command).await,
        Command::Info { json, driver } => crate::info::info(store, json, &driver).await,
        Command::Bench { command } => crate::bench::bench(&node, command).await,
        Command::Snapshot(args) => crate::snapshots::snapshot_cmd(&node, args).await,
        Command::Restore { snapshot, detach } => {
            crate::snapshots::restore(&node, &snapshot, detach).await
        }
        Command::Fork { id, count } => crate::snapshots::fork(&node, &id, count).await,
        Command::Template { command } => crate::templates::dispatch(&node, command).await,
        Command::Policy { command } => policy(&node, command),
        Command::Events { id } => drop_events(&node, &id),
        Command::Node(_) => anyhow::bail!("kiln node is dispatched above"),
        Command::Up(a) => crate::up::up(a).await,
        Command::Down(a) => crate::up::down(a).await,
        Command::Server(a) => crate::server_cmd::run(*a).await,
        Command::Nodes { conn, command } => crate::admin::nodes(conn, command).await,
        Command::Cluster { conn, command } => crate::admin::cluster(conn, command).await,
        Command::Tenants { conn, command } => crate::admin::tenants(conn, command).await,
        Command::Tokens { conn, command } => crate::admin::tokens(conn, command).await,
        Command::Shim { id } => {
            // The supervisor must not die with the terminal or the command
            // that started it: leave its session. Fails only if we already
            // lead one, which is fine.
            let _ = nix::unistd::setsid();
            shim::run(store.clone(), id, std::io::stdout()).await?;
            Ok(0)
        }
    }
}

/// Runs `op` on each ID, printing the full ID on success and the error
/// otherwise; exit code 1 if any failed.
pub(crate) async fn each<F, Fut>(ids: Vec<String>, op: F) -> Result<i32>
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = Result<String>>,
{
    let mut code = 0;
    for id in ids {
        match op(id).await {
            Ok(full) => println!("{full}"),
            Err(e) => {
                eprintln!("kiln: {e:#}");
                code = 1;
            }
        }
    }
    Ok(code)
}

/// `--env-file` lines, then `-e` values; `KEY` alone takes its value from
/// this process's environment and is skipped if unset (as `docker run`).
pub(crate) fn read_env(p: &ProcessArgs) -> Result<Vec<String>> {
    let mut raw = Vec::new();
    for f in &p.env_file {
        let text = std::fs::read_to_string(f)
            .with_context(|| format!("cannot read env file {}", f.display()))?;
        raw.extend(compose::parse_env_file(&text));
    }
    raw.extend(p.env.iter().cloned());
    let mut env = Vec::with_capacity(raw.len());
    for e in raw {
        if e.contains('=') {
            env.push(e);
        } else if e.is_empty() || e.contains('\0') {
            bail!("{}", compose::ComposeError::BadEnv(e));
        } else if let Ok(v) = std::env::var(&e) {
            env.push(format!("{e}={v}"));
        }
    }
    for e in &env {
        if e.starts_with('=') || e.contains('\0') {
            bail!("{}", compose::ComposeError::BadEnv(e.clone()));
        }
    }
    Ok(env)
}

/// `IMAGE [-- CMD ARGS...]` (or `--image IMAGE [-- CMD ...]`).
fn split_image_and_cmd(args: &RunArgs) -> Result<(String, Vec<String>)> {
    let mut rest = args.rest.clone();
    let image = match &args.image_flag {
        Some(i) => i.clone(),
        None => {
            if rest.is_empty() || rest[0] == "--" {
                bail!("no image given: kiln run IMAGE [-- CMD [ARGS...]]");
            }
            rest.remove(0)
        }
    };
    if rest.first().map(String::as_str) == Some("--") {
        rest.remove(0);
    }
    Ok((image, rest))
}

fn driver_preference(s: &str) -> Result<DriverPreference> {
    Ok(match s {
        "auto" => DriverPreference::Auto,
        "qemu" => DriverPreference::Qemu,
        "firecracker" => DriverPreference::Firecracker,
        other => bail!("--driver {other:?}: expected auto, qemu or firecracker"),
    })
}

/// The request `kiln run`'s flags make.
pub(crate) fn run_request(args: &RunArgs) -> Result<RunRequest> {
    let (image, cmd) = split_image_and_cmd(args)?;
    check_resources(args.cpus, args.memory, args.disk)?;
    if args.timeout == Some(0) {
        bail!("--timeout 0 would kill the command at once: give at least 1 second");
    }
    let mut spec = SandboxSpec::for_image(image);
    spec.entrypoint = args.entrypoint.as_ref().map(|e| {
        if e.is_empty() {
            vec![]
        } else {
            vec![e.clone()]
        }
    });
    spec.cmd = cmd;
    spec.env = read_env(&args.process)?;
    spec.workdir = args.process.workdir.clone();
    spec.user = args.process.user.clone();
    spec.tty = args.process.tty;
    spec.stdin = args.process.interactive;
    spec.resources = Resources {
        cpus: args.cpus,
        memory_mib: args.memory,
        disk_mib: args.disk,
    };
    spec.timeout_secs = args.timeout;
    spec.auto_remove = args.rm;
    spec.log_limit = args.log_limit;
    for l in &args.labels {
        let Some((k, v)) = l.split_once('=') else {
            bail!("--label {l:?}: expected KEY=VALUE");
        };
        spec.labels.insert(k.to_owned(), v.to_owned());
    }
    spec.network = match args.net.mode.as_str() {
        "default" => {
            let mut n = network_spec(&args.net.policy);
            if let kiln_api::sandbox::NetworkSpec::Default { publish, .. } = &mut n {
                publish.clone_from(&args.net.publish);
            }
            n
        }
        _ => {
            let p = &args.net.policy;
            if p.policy.is_some() || p.policy_default.is_some() || !p.ordered.is_empty() {
                bail!("--policy, --policy-default, --allow and --deny need --net default");
            }
            if !args.net.publish.is_empty() {
                bail!("-p/--publish needs --net default");
            }
            kiln_api::sandbox::NetworkSpec::None
        }
    };
    spec.driver = driver_preference(&args.driver)?;
    spec.start = if args.cold {
        StartPreference::Cold
    } else {
        StartPreference::Warm
    };
    spec.pull = args.pull.into();
    Ok(RunRequest {
        spec,
        pull: args.pull.into(),
        insecure_registries: args.insecure.clone(),
        id: None,
        template_names: Default::default(),
    })
}

async fn run(node: &Node, args: RunArgs) -> Result<i32> {
    let t0 = Instant::now();
    let req = run_request(&args)?;
    let progress =
        images::Bars::new(args.verbose || std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let started = node.run(&req, &progress).await;
    progress.done();
    let started = started?;
    let ready_ms = t0.elapsed().as_millis() as u64;
    if args.verbose {
        for n in &started.notes {
            eprintln!("kiln: {n}");
        }
        let how = match &started.path {
            StartPath::Pool { .. } => "warm (pool)",
            StartPath::Template { .. } => "warm (template)",
            StartPath::Cold => "cold",
        };
        eprintln!(
            "kiln: sandbox {} running on {} ({how}, {} ms after the command started)",
            started.id,
            started.ready.driver.as_deref().unwrap_or("?"),
            t0.elapsed().as_millis()
        );
    }
    let timing = args.verbose.then(|| StartTiming {
        t0,
        resolved_ms: started.resolved_ms,
        spawned_ms: started.spawned_ms,
        ready_ms,
        supervisor: started.ready.timings,
        warm: started.path != StartPath::Cold,
    });
    finish_run(
        node,
        &args,
        &started.id,
        started.ready,
        started.shim_pid,
        timing,
    )
    .await
}

/// What `kiln run -v` knows of a start, for its one-line breakdown.
pub(crate) struct StartTiming {
    pub t0: Instant,
    pub resolved_ms: u64,
    pub spawned_ms: u64,
    pub ready_ms: u64,
    pub supervisor: Option<shim::StartTimings>,
    pub warm: bool,
}

impl StartTiming {
    /// `resolve 2 ms, disk 9 ms, VMM spawn 31 ms, boot 812 ms, …`: each
    /// phase's own duration; first byte, exit and the total are since the
    /// command started.
    pub fn line(&self, exit_ms: Option<u64>, teardown_ms: Option<u64>) -> String {
        let mut parts: Vec<String> = kiln_node::node::start_phases(
            self.resolved_ms,
            self.spawned_ms,
            self.ready_ms,
            self.supervisor,
            self.warm,
        )
        .iter()
        .map(|p| format!("{} {} ms", p.name, p.ms))
        .collect();
        parts.push(format!("agent ready at {} ms", self.ready_ms));
        if let Some(first) = crate::attach::first_output() {
            parts.push(format!(
                "first byte at {} ms",
                first.saturating_duration_since(self.t0).as_millis()
            ));
        }
        if let Some(e) = exit_ms {
            parts.push(format!("exit at {e} ms"));
        }
        if let Some(t) = teardown_ms {
            parts.push(format!("teardown {t} ms"));
        }
        parts.push(format!("total {} ms", self.t0.elapsed().as_millis()));
        format!("timing: {}", parts.join(", "))
    }
}

/// The rest of `kiln run` once the supervisor of sandbox `id` reported
/// (`ready`): report a failure, print the ID (`-d`), or attach until the
/// main process ends and the VM is gone.
async fn finish_run(
    node: &Node,
    args: &RunArgs,
    id: &str,
    ready: shim::ReadyLine,
    shim_pid: u32,
    timing: Option<StartTiming>,
) -> Result<i32> {
    if !ready.ok {
        let msg = ready
            .error
            .unwrap_or_else(|| "the sandbox failed to start".into());
        eprintln!("kiln: {msg}");
        // The supervisor cleans up (--rm, the template's user entry) after
        // its report: return once it has.
        let _ = node
            .wait_supervisor_gone(id, Duration::from_secs(30), Some(shim_pid))
            .await;
        return Ok(ready.exit_code.unwrap_or(125));
    }
    if args.detach {
        println!("{id}");
        if let Some(t) = &timing {
            eprintln!("kiln: {}", t.line(None, None));
        }
        return Ok(0);
    }
    // Whether --timeout ended it: read when the exit is reported, while
    // the supervisor (which records the end before reporting it) still
    // keeps a --rm sandbox's record.
    let mut timed_out = false;
    let store = node.store();
    let code = attach::attach_main_or_replay(
        store,
        id,
        args.process.interactive,
        args.process.tty,
        &mut || {
            timed_out = store.load(id).is_ok_and(|r| {
                matches!(
                    r.state,
                    SandboxState::Exited {
                        timed_out: true,
                        ..
                    }
                )
            });
        },
    )
    .await?;
    let exit_ms = timing.as_ref().map(|t| t.t0.elapsed().as_millis() as u64);
    let teardown = Instant::now();
    // The exit status is known and recorded: the supervisor powers the VM
    // off and removes its files on its own, off the path of this command's
    // exit. With --rm, return once the sandbox is gone (as `docker run
    // --rm`), so that nothing of it is left when the command returns.
    if args.rm
        && let Err(e) = node
            .wait_supervisor_gone(id, Duration::from_secs(30), Some(shim_pid))
            .await
    {
        eprintln!("kiln: {e:#}");
    }
    if timed_out {
        eprintln!(
            "kiln: the command was killed after its --timeout of {} s",
            args.timeout.unwrap_or(0)
        );
    }
    if let Some(t) = &timing {
        eprintln!(
            "kiln: {}",
            t.line(exit_ms, Some(teardown.elapsed().as_millis() as u64))
        );
    }
    Ok(code)
}

/// Checks `--cpus`, `--memory` and `--disk` (each refusal names the flag
/// and the limit).
pub(crate) fn check_resources(cpus: u32, memory: u32, disk: u32) -> Result<()> {
    if memory < kiln_vmm::MIN_MEMORY_MIB {
        bail!(
            "--memory {} is too small: a sandbox needs at least {} MiB",
            memory,
            kiln_vmm::MIN_MEMORY_MIB
        );
    }
    if memory > MAX_MEMORY_MIB {
        bail!("--memory {memory} is too large: at most {MAX_MEMORY_MIB} MiB");
    }
    if cpus == 0 || cpus > MAX_CPUS {
        bail!("--cpus {} is out of range (1 to {MAX_CPUS})", cpus);
    }
    if disk < MIN_DISK_MIB {
        bail!("--disk {} is too small: at least {MIN_DISK_MIB} MiB", disk);
    }
    if disk > MAX_DISK_MIB {
        bail!("--disk {disk} is too large: at most {MAX_DISK_MIB} MiB");
    }
    Ok(())
}

/// The network of `--net default` with these policy flags.
fn network_spec(p: &PolicyArgs) -> kiln_api::sandbox::NetworkSpec {
    use kiln_api::sandbox::{NetworkSpec, PolicyAction, PolicyRule};
    let action = |allow: bool| {
        if allow {
            PolicyAction::Allow
        } else {
            PolicyAction::Deny
        }
    };
    NetworkSpec::Default {
        policy: p.policy.clone(),
        policy_default: p.policy_default.as_deref().map(|d| action(d == "allow")),
        rules: p
            .ordered
            .iter()
            .map(|(allow, rule)| PolicyRule {
                action: action(*allow),
                rule: rule.clone(),
            })
            .collect(),
        publish: vec![],
    }
}

/// `kiln events ID`: the sandbox's drop events.
fn drop_events(node: &Node, id: &str) -> Result<i32> {
    let (_, events) = node.drop_events(id)?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{:<24}  {:<5}  {:<15}  {:>5}  DROPPED BY",
        "TIME", "PROTO", "DESTINATION", "PORT"
    )?;
    for e in events {
        let port = e.port.map(|p| p.to_string()).unwrap_or_else(|| "-".into());
        let mut by = e.by.clone();
        if e.suppressed > 0 {
            by.push_str(&format!(" (+{} not shown: rate limit)", e.suppressed));
        }
        writeln!(
            out,
            "{:<24}  {:<5}  {:<15}  {:>5}  {}",
            kiln_net::events::format_utc(e.unix_ms),
            e.proto,
            e.destination,
            port,
            by
        )?;
    }
    Ok(0)
}

/// `kiln policy get|set`.
fn policy(node: &Node, cmd: PolicyCommand) -> Result<i32> {
    match cmd {
        PolicyCommand::Get { id } => {
            let (id, policy, c) = node.policy(&id)?;
            let mut out = std::io::stdout().lock();
            writeln!(out, "sandbox {id}: default {}", policy.default)?;
            writeln!(
                out,
                "{:<4}  {:<48}  {:>12}  {:>12}  {:>12}  {:>12}",
                "#", "RULE", "ALLOWED PKTS", "ALLOWED B", "DROPPED PKTS", "DROPPED B"
            )?;
            let row = |out: &mut std::io::StdoutLock,
                       n: &str,
                       what: &str,
                       k: &kiln_net::Counter| {
                writeln!(
                    out,
                    "{:<4}  {:<48}  {:>12}  {:>12}  {:>12}  {:>12}",
                    n, what, k.allowed_packets, k.allowed_bytes, k.dropped_packets, k.dropped_bytes
                )
            };
            for (i, (rule, k)) in policy.egress.iter().zip(&c.rules).enumerate() {
                row(&mut out, &(i + 1).to_string(), &rule.to_string(), k)?;
            }
            row(
                &mut out,
                "-",
                &format!("default ({})", policy.default),
                &c.default,
            )?;
            row(
                &mut out,
                "-",
                "protected (host, link-local, other sandboxes)",
                &c.protected,
            )?;
            row(&mut out, "-", "replies to flows peers started", &c.replies)?;
            for (why, k) in &c.drops {
                row(
                    &mut out,
                    "-",
                    &format!("dropped before the policy: {why}"),
                    k,
                )?;
            }
            // Addresses the node's resolver admitted for domain rules.
            let admitted = kiln_node::node::open_network(node.dirs())
                .ok()
                .and_then(|net| net.admissions(&id).ok())
                .unwrap_or_default();
            if !admitted.is_empty() {
                writeln!(out, "admitted by DNS (address, rules, seconds left):")?;
                let now = kiln_net::bpf::monotonic_ns();
                for a in admitted {
                    let rules: Vec<String> = a.rules.iter().map(|r| (r + 1).to_string()).collect();
                    writeln!(
                        out,
                        "  {:<15}  {:<12}  {}",
                        a.addr,
                        rules.join(","),
                        a.expires_ns.saturating_sub(now) / 1_000_000_000
                    )?;
                }
            }
            Ok(0)
        }
        PolicyCommand::Set { id, policy } => {
            println!("{}", node.set_policy(&id, &network_spec(&policy))?);
            Ok(0)
        }
    }
}

async fn ps(node: &Node, all: bool, quiet: bool) -> Result<i32> {
    let recs = node.list(all).await?;
    let mut out = std::io::stdout().lock();
    if !quiet {
        writeln!(
            out,
            "{:<16}  {:<24}  {:<28}  {:<12}  COMMAND",
            "ID", "IMAGE", "STATUS", "CREATED"
        )?;
    }
    for r in recs {
        if quiet {
            writeln!(out, "{}", r.id)?;
            continue;
        }
        let cmd = r.spec.argv.join(" ");
        let cmd: String = cmd.chars().take(40).collect();
        writeln!(
            out,
            "{:<16}  {:<24}  {:<28}  {:<12}  {}",
            r.id,
            truncate(&r.spec.image, 24),
            r.state.label(),
            ago(r.created_at),
            cmd
        )?;
    }
    Ok(0)
}

pub(crate) fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let t: String = s.chars().take(n - 1).collect();
        format!("{t}…")
    }
}

pub(crate) fn ago(t: u64) -> String {
    let d = kiln_node::store::now_secs().saturating_sub(t);
    match d {
        0..=59 => format!("{d}s ago"),
        60..=3599 => format!("{}m ago", d / 60),
        3600..=86399 => format!("{}h ago", d / 3600),
        _ => format!("{}d ago", d / 86400),
    }
}

async fn exec(node: &Node, args: ExecArgs) -> Result<i32> {
    let mut rest = args.rest.clone();
    let id = rest.remove(0);
    if rest.first().map(String::as_str) == Some("--") {
        rest.remove(0);
    }
    let (id, sock) = node.active_socket(&id)?;
    if let Some(pid) = args.attach {
        return attach::exec_attach(&sock, pid, args.process.interactive, args.process.tty).await;
    }
    if rest.is_empty() {
        bail!("no command given: kiln exec ID -- CMD [ARGS...]");
    }
    let (rows, cols) = if args.process.tty {
        crate::term::size()
    } else {
        (None, None)
    };
    // Like `docker exec`: the sandbox's environment, then -e / --env-file.
    let req = node.exec_request(
        &id,
        ExecSpec {
            argv: rest,
            env: read_env(&args.process)?,
            workdir: args.process.workdir.clone(),
            user: args.process.user.clone(),
            tty: args.process.tty,
            rows,
            cols,
            stdin: args.process.interactive,
            detached: args.detach,
        },
    )?;
    attach::exec(
        &sock,
        req,
        args.process.interactive,
        args.process.tty,
        args.detach,
    )
    .await
}

async fn logs(node: &Node, id: &str, follow: bool) -> Result<i32> {
    let rec = node.get(id)?;
    let store = node.store();
    let sock = store.dir(&rec.id).join("ctl.sock");
    if follow && !rec.state.is_finished() && sock.exists() {
        attach::attach_main_or_replay(store, &rec.id, false, false, &mut || {}).await?;
        return Ok(0);
    }
    attach::replay_log(&store.dir(&rec.id).join("output.log"))?;
    Ok(0)
}
