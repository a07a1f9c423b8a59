//! The user commands.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::Subcommand;
use kiln_api::proto::ExecRequest;
use kiln_node::compose::{self, Overrides};
use kiln_node::ctl::{CtlConn, CtlRequest, CtlResponse};
use kiln_node::paths::Dirs;
use kiln_node::shim::{self, ReadyLine};
use kiln_node::store::{SandboxRecord, SandboxSpec, SandboxState, Store};

use crate::{Command, ExecArgs, ProcessArgs, RunArgs, attach, images};

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
}

pub async fn dispatch(cmd: Command) -> Result<i32> {
    let store = Store::new(Dirs::from_env());
    // The state directory is private (it may predate the umask above).
    let state = &store.dirs().state;
    if std::fs::create_dir_all(state).is_ok() {
        use std::os::unix::fs::PermissionsExt;
        if let Err(e) = std::fs::set_permissions(state, std::fs::Permissions::from_mode(0o700)) {
            tracing::warn!(error = %e, dir = %state.display(), "cannot make the state directory private");
        }
    }
    match cmd {
        Command::Run(args) => run(&store, args).await,
        Command::Ps { all, quiet } => ps(&store, all, quiet).await,
        Command::Exec(args) => exec(&store, args).await,
        Command::Cp { src, dst } => attach::cp(&store, &src, &dst).await,
        Command::Logs { follow, id } => logs(&store, &id, follow).await,
        Command::Stop { time, ids } => {
            let mut code = 0;
            for id in ids {
                if let Err(e) = stop(&store, &id, time).await {
                    eprintln!("kiln: {e:#}");
                    code = 1;
                } else {
                    println!("{id}");
                }
            }
            Ok(code)
        }
        Command::Rm { force, ids } => {
            let mut code = 0;
            for id in ids {
                if let Err(e) = rm(&store, &id, force).await {
                    eprintln!("kiln: {e:#}");
                    code = 1;
                } else {
                    println!("{id}");
                }
            }
            Ok(code)
        }
        Command::Wait { ids } => {
            let mut code = 0;
            for id in ids {
                match wait(&store, &id).await {
                    Ok(c) => println!("{c}"),
                    Err(e) => {
                        eprintln!("kiln: {e:#}");
                        code = 1;
                    }
                }
            }
            Ok(code)
        }
        Command::Pause { id } => simple(&store, &id, CtlRequest::Pause).await,
        Command::Resume { id } => simple(&store, &id, CtlRequest::Resume).await,
        Command::Images { command } => images::dispatch(&store, command).await,
        Command::Info { json, driver } => crate::info::info(&store, json, &driver).await,
        Command::Bench { command } => crate::bench::bench(&store, command).await,
        Command::Snapshot(args) => crate::snapshots::snapshot_cmd(&store, args).await,
        Command::Restore { snapshot, detach } => {
            crate::snapshots::restore(&store, &snapshot, detach).await
        }
        Command::Fork { id, count } => crate::snapshots::fork(&store, &id, count).await,
        Command::Template { command } => crate::templates::dispatch(&store, command).await,
        Command::Shim { id } => {
            // The supervisor must not die with the terminal or the command
            // that started it: leave its session. Fails only if we already
            // lead one, which is fine.
            let _ = nix::unistd::setsid();
            shim::run(store, id, std::io::stdout()).await?;
            Ok(0)
        }
    }
}

fn read_env_files(p: &ProcessArgs) -> Result<Vec<String>> {
    let mut env = Vec::new();
    for f in &p.env_file {
        let text = std::fs::read_to_string(f)
            .with_context(|| format!("cannot read env file {}", f.display()))?;
        env.extend(compose::parse_env_file(&text));
    }
    env.extend(p.env.iter().cloned());
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

async fn run(store: &Store, args: RunArgs) -> Result<i32> {
    let t0 = Instant::now();
    let (image_ref, cmd) = split_image_and_cmd(&args)?;
    check_resources(args.cpus, args.memory, args.disk)?;
    if args.timeout == Some(0) {
        bail!("--timeout 0 would kill the command at once: give at least 1 second");
    }
    let image = images::pull(store, &image_ref, &args.insecure, args.verbose, args.pull).await?;
    if args.verbose {
        eprintln!(
            "kiln: image {} ({}) ready in {} ms",
            image_ref,
            image.digest,
            t0.elapsed().as_millis()
        );
    }
    let env = read_env_files(&args.process)?;
    let ov = Overrides {
        entrypoint: args.entrypoint.as_ref().map(|e| {
            if e.is_empty() {
                vec![]
            } else {
                vec![e.clone()]
            }
        }),
        args: cmd,
        env,
        workdir: args.process.workdir.clone(),
        user: args.process.user.clone(),
        tty: args.process.tty,
        // Replaced below once the ID is known.
        hostname: String::new(),
    };
    let composed = compose::compose(&image.defaults, &ov, |k| std::env::var(k).ok())?;
    let spec = SandboxSpec {
        image: image_ref.clone(),
        image_digest: image.digest.clone(),
        image_disk: image.disk.clone(),
        argv: composed.argv,
        env: composed.env,
        cwd: composed.cwd,
        user: composed.user,
        tty: args.process.tty,
        stdin: args.process.interactive,
        cpus: args.cpus,
        memory_mib: args.memory,
        disk_mib: args.disk,
        timeout_secs: args.timeout,
        driver: args.driver.clone(),
        auto_remove: args.rm,
    };
    // The fastest start: a member of the template's warm pool, restored
    // and paused ahead of time. Whether or not one was left, the pool is
    // refilled in the background.
    let template = if args.cold {
        Err("--cold".to_string())
    } else {
        crate::templates::lookup(store, &spec)
    };
    if let Ok(name) = &template {
        // Started first: a run killed while it claims still refills.
        crate::pool::refill_in_background(store, name);
        match crate::pool::claim(store, name, &spec).await {
            Some(c) if !c.ready.ok && c.ready.restore_failed => {
                // The member broke before running anything: go on without.
                if args.verbose {
                    eprintln!(
                        "kiln: the pool member failed ({}); restoring the template",
                        c.ready.error.as_deref().unwrap_or("?")
                    );
                }
                let _ =
                    wait_supervisor_gone(store, &c.id, Duration::from_secs(30), Some(c.shim_pid))
                        .await;
                let _ = store.remove(&c.id);
            }
            Some(c) => {
                if args.verbose {
                    eprintln!(
                        "kiln: warm start from the pool of template {name} ({} ms after the command started)",
                        t0.elapsed().as_millis()
                    );
                }
                return finish_run(store, &args, &c.id, c.ready, c.shim_pid, t0).await;
            }
            None => {}
        }
    }
    let mut rec = store.create(spec)?;
    // HOSTNAME is the sandbox's hostname: its short ID.
    let host = hostname_of(&rec.id);
    for e in rec.spec.env.iter_mut() {
        if e == "HOSTNAME=" {
            *e = format!("HOSTNAME={host}");
        }
    }
    // A warm start when a template for exactly this exists (checked like
    // a snapshot before a restore), else a boot.
    let cold_reason = match template {
        Err(why) => Some(why),
        Ok(name) => match crate::templates::claim(store, &name, &rec.id) {
            Ok(name) => {
                rec.template = Some(name);
                None
            }
            Err(why) => Some(why),
        },
    };
    store.save(&rec)?;
    if args.verbose {
        match (&rec.template, &cold_reason) {
            (Some(name), _) => eprintln!(
                "kiln: warm start from template {name} ({} ms after the command started)",
                t0.elapsed().as_millis()
            ),
            (None, Some(why)) => eprintln!("kiln: cold boot: {why}"),
            (None, None) => {}
        }
    }
    let (mut ready, mut shim_pid) = match spawn_shim(store, &rec).await {
        Ok(r) => r,
        Err(e) => {
            release_template(store, &rec);
            return Err(e);
        }
    };
    if !ready.ok && ready.restore_failed && rec.template.is_some() {
        // The template could not be restored: boot instead, as a new
        // sandbox (the failed one never ran anything).
        let why = ready.error.clone().unwrap_or_default();
        if args.verbose {
            eprintln!("kiln: the warm start failed ({why}); cold boot");
        }
        let _ = wait_supervisor_gone(store, &rec.id, Duration::from_secs(30), Some(shim_pid)).await;
        release_template(store, &rec);
        let _ = store.remove(&rec.id);
        let mut again = store.create(rec.spec.clone())?;
        let (old, new) = (
            format!("HOSTNAME={}", hostname_of(&rec.id)),
            format!("HOSTNAME={}", hostname_of(&again.id)),
        );
        for e in again.spec.env.iter_mut() {
            if *e == old {
                e.clone_from(&new);
            }
        }
        store.save(&again)?;
        rec = again;
        (ready, shim_pid) = spawn_shim(store, &rec).await?;
    }
    finish_run(store, &args, &rec.id, ready, shim_pid, t0).await
}

/// The rest of `kiln run` once the supervisor of sandbox `id` reported
/// (`ready`): report a failure, print the ID (`-d`), or attach until the
/// main process ends and the VM is gone.
async fn finish_run(
    store: &Store,
    args: &RunArgs,
    id: &str,
    ready: ReadyLine,
    shim_pid: u32,
    t0: Instant,
) -> Result<i32> {
    if args.verbose {
        eprintln!(
            "kiln: sandbox {id} running on {} ({} ms after the command started)",
            ready.driver.as_deref().unwrap_or("?"),
            t0.elapsed().as_millis()
        );
    }
    if !ready.ok {
        let msg = ready
            .error
            .unwrap_or_else(|| "the sandbox failed to start".into());
        eprintln!("kiln: {msg}");
        // The supervisor cleans up (--rm, the template's user entry) after
        // its report: return once it has.
        let _ = wait_supervisor_gone(store, id, Duration::from_secs(30), Some(shim_pid)).await;
        return Ok(ready.exit_code.unwrap_or(125));
    }
    if args.detach {
        println!("{id}");
        return Ok(0);
    }
    // Whether --timeout ended it: read when the exit is reported, while
    // the supervisor (which records the end before reporting it) still
    // keeps a --rm sandbox's record.
    let mut timed_out = false;
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
    // The sandbox has ended; return once its VM is gone too, so nothing of
    // it outlives this command.
    if let Err(e) = wait_supervisor_gone(store, id, Duration::from_secs(30), Some(shim_pid)).await {
        eprintln!("kiln: {e:#}");
    }
    if timed_out {
        eprintln!(
            "kiln: the command was killed after its --timeout of {} s",
            args.timeout.unwrap_or(0)
        );
    }
    Ok(code)
}

/// Checks `--cpus`, `--memory` and `--disk`.
pub(crate) fn check_resources(cpus: u32, memory: u32, disk: u32) -> Result<()> {
    if memory < kiln_vmm::MIN_MEMORY_MIB {
        bail!(
            "--memory {} is too small: a sandbox needs at least {} MiB",
            memory,
            kiln_vmm::MIN_MEMORY_MIB
        );
    }
    if cpus == 0 || cpus > 64 {
        bail!("--cpus {} is out of range (1 to 64)", cpus);
    }
    if disk < 16 {
        bail!("--disk {} is too small: at least 16 MiB", disk);
    }
    Ok(())
}

pub fn hostname_of(id: &str) -> String {
    id.chars().take(12).collect()
}

/// Starts `kiln shim ID` detached and waits for its ready line.
pub(crate) async fn spawn_shim(store: &Store, rec: &SandboxRecord) -> Result<(ReadyLine, u32)> {
    let exe = std::env::current_exe().context("cannot find the kiln executable")?;
    let dir = store.dir(&rec.id);
    let log =
        std::fs::File::create(dir.join("shim.log")).context("cannot create the supervisor log")?;
    let mut child = std::process::Command::new(exe)
        .arg("shim")
        .arg(&rec.id)
        .env("KILN_STATE_DIR", &store.dirs().state)
        .env("KILN_CACHE_DIR", &store.dirs().cache)
        .env(
            "KILN_LOG",
            std::env::var("KILN_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        .spawn()
        .context("cannot start the sandbox supervisor")?;
    let shim_pid = child.id();
    let stdout = child.stdout.take().expect("stdout was piped");
    let id = rec.id.clone();
    let shim_log = dir.join("shim.log");
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        let n = BufReader::new(stdout).read_line(&mut line)?;
        Ok::<_, std::io::Error>((n, line))
    })
    .await
    .context("supervisor reader failed")?
    .context("cannot read from the sandbox supervisor")?;
    // The supervisor lives on; reap it in the background if we outlive it.
    std::thread::spawn(move || {
        let _ = child.wait();
    });
    if line.0 == 0 {
        let tail = std::fs::read_to_string(&shim_log).unwrap_or_default();
        let last = tail
            .lines()
            .rev()
            .take(5)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n");
        bail!("the supervisor of sandbox {id} exited before the sandbox started:\n{last}");
    }
    let ready = serde_json::from_str(line.1.trim())
        .context("the sandbox supervisor sent a malformed ready line")?;
    Ok((ready, shim_pid))
}

async fn ps(store: &Store, all: bool, quiet: bool) -> Result<i32> {
    // Level-triggered clean-up: VMs whose supervisor died are killed here.
    for r in store.list()? {
        // A pool member's record exists before its supervisor starts (the
        // filler writes it first): only one whose supervisor ran and died,
        // or that never got one for a minute, is an orphan.
        let dead_shim = r.shim_pid.is_some_and(|p| !pid_alive(p));
        let never_started =
            r.shim_pid.is_none() && kiln_node::store::now_secs().saturating_sub(r.created_at) > 60;
        let orphan = if r.pool.is_some() {
            dead_shim || never_started
        } else {
            r.vm.is_some() && !r.shim_pid.is_some_and(pid_alive)
        };
        if orphan {
            reap_orphan(store, &r.id).await;
        }
    }
    // Holds and VMs of `kiln fork` / `kiln template create` processes
    // that were killed.
    kiln_node::snapshot::SnapshotStore::new(store.dirs()).release_dead_holders();
    kiln_node::template::reap_abandoned(store.dirs()).await;
    let recs = store.list()?;
    let mut out = std::io::stdout().lock();
    if !quiet {
        writeln!(
            out,
            "{:<16}  {:<24}  {:<28}  {:<12}  COMMAND",
            "ID", "IMAGE", "STATUS", "CREATED"
        )?;
    }
    for r in recs {
        // Warm-pool members run nothing yet: `kiln template ls` shows them.
        if r.pool.is_some() {
            continue;
        }
        let r = refresh(store, r);
        if !all && r.state.is_finished() {
            continue;
        }
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

/// A record whose supervisor died without recording an end is reported as
/// failed (its VM, if any, is left for `rm` to clean up).
pub(crate) fn refresh(store: &Store, mut r: SandboxRecord) -> SandboxRecord {
    if r.state.is_finished() {
        return r;
    }
    let alive = r.shim_pid.is_some_and(pid_alive);
    if !alive {
        // Re-read: the supervisor may have just finished.
        if let Ok(again) = store.load(&r.id)
            && (again.state.is_finished() || again.shim_pid.is_some_and(pid_alive))
        {
            return again;
        }
        r.state = SandboxState::Failed {
            error: "the sandbox supervisor is gone".into(),
            exit_code: 255,
        };
    }
    r
}

pub(crate) fn pid_alive(pid: u32) -> bool {
    kiln_node::store::process_alive(pid)
}

/// The control socket of a running sandbox.
pub fn running_socket(store: &Store, id: &str) -> Result<(String, PathBuf)> {
    let id = store.resolve(id)?;
    let rec = refresh(store, store.load(&id)?);
    match rec.state {
        SandboxState::Running { .. } | SandboxState::Paused { .. } => {}
        SandboxState::Creating => bail!("sandbox {id} is still starting"),
        SandboxState::Pooled => bail!("sandbox {id} is a warm-pool member: it runs nothing yet"),
        other => bail!("sandbox {id} is not running ({})", other.label()),
    }
    Ok((id.clone(), store.dir(&id).join("ctl.sock")))
}

/// The control socket of a sandbox that runs and is not paused (a paused
/// guest cannot start processes or take files: like `docker exec`, refuse
/// rather than queue work that would run at some later resume).
pub fn active_socket(store: &Store, id: &str) -> Result<(String, PathBuf)> {
    let (id, sock) = running_socket(store, id)?;
    if let Ok(rec) = store.load(&id)
        && matches!(rec.state, SandboxState::Paused { .. })
    {
        bail!("sandbox {id} is paused: run kiln resume {id} first");
    }
    Ok((id, sock))
}

async fn exec(store: &Store, args: ExecArgs) -> Result<i32> {
    let mut rest = args.rest.clone();
    let id = rest.remove(0);
    if rest.first().map(String::as_str) == Some("--") {
        rest.remove(0);
    }
    let (id, sock) = active_socket(store, &id)?;
    if let Some(pid) = args.attach {
        return attach::exec_attach(&sock, pid, args.process.interactive, args.process.tty).await;
    }
    if rest.is_empty() {
        bail!("no command given: kiln exec ID -- CMD [ARGS...]");
    }
    let rec = store.load(&id)?;
    // Like `docker exec`: the sandbox's environment, then -e / --env-file.
    let env_over = read_env_files(&args.process)?;
    let ov = Overrides {
        entrypoint: Some(vec![]),
        args: rest,
        env: env_over,
        workdir: args.process.workdir.clone(),
        user: args.process.user.clone(),
        tty: args.process.tty,
        hostname: hostname_of(&id),
    };
    let base = compose::ImageDefaults {
        env: rec.spec.env.clone(),
        working_dir: rec.spec.cwd.clone(),
        user: rec.spec.user.clone(),
        ..Default::default()
    };
    let c = compose::compose(&base, &ov, |k| std::env::var(k).ok())?;
    let (rows, cols) = if args.process.tty {
        crate::term::size()
    } else {
        (None, None)
    };
    let req = ExecRequest {
        argv: c.argv,
        env: c.env,
        cwd: c.cwd,
        user: c.user,
        tty: args.process.tty,
        rows,
        cols,
        stdin: args.process.interactive,
        main: false,
        detached: args.detach,
    };
    attach::exec(
        &sock,
        req,
        args.process.interactive,
        args.process.tty,
        args.detach,
    )
    .await
}

async fn logs(store: &Store, id: &str, follow: bool) -> Result<i32> {
    let id = store.resolve(id)?;
    let rec = refresh(store, store.load(&id)?);
    let sock = store.dir(&id).join("ctl.sock");
    if follow && !rec.state.is_finished() && sock.exists() {
        attach::attach_main_or_replay(store, &id, false, false, &mut || {}).await?;
        return Ok(0);
    }
    attach::replay_log(&store.dir(&id).join("output.log"))?;
    Ok(0)
}

async fn stop(store: &Store, id: &str, grace: u64) -> Result<()> {
    let id = store.resolve(id)?;
    let rec = refresh(store, store.load(&id)?);
    if rec.state.is_finished() {
        reap_orphan(store, &id).await;
        return Ok(());
    }
    let sock = store.dir(&id).join("ctl.sock");
    let (_conn, resp) = CtlConn::open(&sock, &CtlRequest::Stop { grace_secs: grace }).await?;
    match resp {
        CtlResponse::Exited { .. } | CtlResponse::Ok => {}
        CtlResponse::Error { message, .. } => bail!("cannot stop {id}: {message}"),
        other => bail!("unexpected answer from the supervisor of {id}: {other:?}"),
    }
    wait_supervisor_gone(store, &id, Duration::from_secs(30), None).await
}

/// A sandbox whose supervisor died leaves its VMM running with nobody to
/// serve it: kill it from its record and record the sandbox as failed.
pub(crate) async fn reap_orphan(store: &Store, id: &str) {
    let Ok(mut rec) = store.load(id) else { return };
    if rec.shim_pid.is_some_and(pid_alive) {
        return;
    }
    if let Some(vm) = rec.vm.take() {
        if rec.pool.is_some() {
            // Not the user's sandbox: nothing for their terminal.
            tracing::info!(sandbox = %id, "a pool member's supervisor is gone; killing its VM");
        } else {
            tracing::warn!(sandbox = %id, "the supervisor is gone; killing its VM");
        }
        kiln_node::vm::destroy_recorded(vm).await;
        let _ = std::fs::remove_file(store.dir(id).join("ctl.sock"));
    } else if rec.pool.is_none() {
        return;
    }
    // An unclaimed pool member ran nothing: nothing of it is kept.
    if let Some(name) = &rec.pool {
        kiln_node::pool::Pool::of(store.dirs(), name).withdraw(id);
        release_template(store, &rec);
        if let Err(e) = store.remove(id) {
            tracing::warn!(error = %e, "cannot remove the reaped pool member");
        }
        return;
    }
    if !rec.state.is_finished() {
        rec.state = SandboxState::Failed {
            error: "the sandbox supervisor is gone".into(),
            exit_code: 255,
        };
    }
    rec.shim_pid = None;
    if let Err(e) = store.save(&rec) {
        tracing::warn!(error = %e, "cannot record the reaped sandbox");
    }
}

pub(crate) async fn wait_supervisor_gone(
    store: &Store,
    id: &str,
    limit: Duration,
    known_pid: Option<u32>,
) -> Result<()> {
    let t0 = Instant::now();
    // Remember the pid: with --rm the supervisor removes the record just
    // before it exits.
    let mut last_pid = known_pid;
    loop {
        if let Ok(r) = store.load(id)
            && r.shim_pid.is_some()
        {
            last_pid = r.shim_pid;
        }
        match last_pid {
            Some(pid) if pid_alive(pid) => {}
            _ => return Ok(()),
        }
        if t0.elapsed() > limit {
            bail!(
                "the supervisor of sandbox {id} did not finish within {} s",
                limit.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn rm(store: &Store, id: &str, force: bool) -> Result<()> {
    let id = store.resolve(id)?;
    let rec = refresh(store, store.load(&id)?);
    let running = matches!(
        rec.state,
        SandboxState::Running { .. }
            | SandboxState::Paused { .. }
            | SandboxState::Creating
            | SandboxState::Pooled
    );
    if running {
        if !force {
            bail!("sandbox {id} is running: stop it first or use rm -f");
        }
        let sock = store.dir(&id).join("ctl.sock");
        if matches!(rec.state, SandboxState::Paused { .. }) {
            let _ = CtlConn::open(&sock, &CtlRequest::Resume).await;
        }
        if let Err(e) = CtlConn::open(&sock, &CtlRequest::Kill).await {
            tracing::warn!(error = %e, "supervisor unreachable; killing the VM directly");
        }
        wait_supervisor_gone(store, &id, Duration::from_secs(30), None).await?;
    }
    // Whatever is left (a supervisor that died): kill its VM from the record.
    // (A pool member's supervisor removes its record itself.)
    let rec = match store.load(&id) {
        Ok(r) => r,
        Err(kiln_node::store::StoreError::NotFound(_)) if rec.pool.is_some() => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    if let Some(vm) = rec.vm.clone() {
        kiln_node::vm::destroy_recorded(vm).await;
    }
    if let Some(name) = &rec.restored_from {
        kiln_node::snapshot::SnapshotStore::new(store.dirs()).release_user(name, &id);
    }
    release_template(store, &rec);
    store.remove(&id)?;
    Ok(())
}

/// Waits until the sandbox has ended and its VM is gone; its exit code.
async fn wait(store: &Store, id: &str) -> Result<i32> {
    let id = store.resolve(id)?;
    let code = loop {
        let rec = refresh(store, store.load(&id)?);
        match rec.state {
            SandboxState::Exited { exit_code, .. } | SandboxState::Failed { exit_code, .. } => {
                break exit_code;
            }
            _ => {}
        }
        let sock = store.dir(&id).join("ctl.sock");
        match CtlConn::open(&sock, &CtlRequest::Wait).await {
            Ok((_, CtlResponse::Exited { exit_code, .. })) => break exit_code,
            Ok((_, other)) => {
                return Err(anyhow!("unexpected answer from the supervisor: {other:?}"));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    wait_supervisor_gone(store, &id, Duration::from_secs(60), None).await?;
    Ok(code)
}

async fn simple(store: &Store, id: &str, req: CtlRequest) -> Result<i32> {
    let (id, sock) = running_socket(store, id)?;
    let (_c, resp) = CtlConn::open(&sock, &req).await?;
    match resp {
        CtlResponse::Ok => {
            println!("{id}");
            Ok(0)
        }
        CtlResponse::Error { message, .. } => bail!("{message}"),
        other => bail!("unexpected answer from the supervisor: {other:?}"),
    }
}

/// Drops a sandbox's registration as a user of the template it was
/// warm-started from (idempotent).
pub(crate) fn release_template(store: &Store, rec: &SandboxRecord) {
    if let Some(name) = &rec.template {
        kiln_node::template::store(store.dirs()).release_user(name, &rec.id);
    }
}
