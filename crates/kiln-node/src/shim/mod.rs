//! The sandbox supervisor (`kiln shim ID`): one small process per sandbox,
//! detached from the `kiln` command that created it, so the sandbox outlives
//! that command and any other `kiln` process can use it.
//!
//! It boots the VM through a `VmmDriver`, holds the guest agent connection
//! (a QEMU socket chardev takes one client at a time, so exactly one holder
//! is needed), starts the main process, appends its output to
//! `output.log`, serves `ctl.sock` for `kiln attach/exec/cp/stop/wait/…`,
//! enforces the timeout, and when the main process ends records its status,
//! powers the VM off and removes every socket and file the VM used.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_api::proto::{self, Channel, ExecRequest, Kind, Request};
use serde::{Deserialize, Serialize};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Mutex, watch};
use tokio::task::JoinSet;
use tracing::{info, instrument, warn};

use crate::agent::{self, AgentClient, Output, Process, Stdin};
use crate::ctl::{self, CtlRequest, CtlResponse, FrameReader, FrameWriter};
use crate::logs::{LogReader, LogStream, LogWriter};
use crate::paths::GuestArtifacts;
use crate::store::{SandboxRecord, SandboxState, Store, now_secs};
use crate::vm::{self, VmHandle};

mod control;
mod pool;

pub use control::SnapshotSandboxError;
use control::*;
use pool::*;

/// How long the guest agent may take to answer after the VMM started. TCG
/// boots take about a second; a loaded CI machine is much slower.
/// How long a `--rm` sandbox that nobody attached to waits, after its
/// VM is gone, for its `kiln run` to attach and collect the output.
const LATE_ATTACH_GRACE: Duration = Duration::from_secs(10);
const AGENT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the guest agent may take to deliver a signal before Kiln stops
/// relying on it and kills the VMM instead.
const SIGNAL_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a SIGKILLed main process may take to be reported gone.
const KILL_GRACE: Duration = Duration::from_secs(10);
/// How long a powered-off guest may take to make its VMM exit.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// The one line the supervisor prints on its stdout once the sandbox runs
/// (or could not start), for the `kiln` command that spawned it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadyLine {
    pub ok: bool,
    #[serde(default)]
    pub main_pid: Option<u32>,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub exit_code: Option<i32>,
    /// Which driver runs the sandbox and why.
    #[serde(default)]
    pub driver: Option<String>,
    /// A warm start failed before the guest ran anything (restoring the
    /// template, or its agent): the caller may boot instead.
    #[serde(default)]
    pub restore_failed: bool,
    /// Where the supervisor's time went before the main process ran (for
    /// `kiln run -v`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timings: Option<StartTimings>,
}

/// The supervisor's part of a start, in milliseconds. For a warm-pool
/// claim, `vm_ms` and `agent_ms` are 0 (the member was up before the
/// claim) and `configure_ms` includes resuming it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartTimings {
    /// Supervisor start → the VMM runs the VM (spawn, configuration, or
    /// the restore of a snapshot/template).
    pub vm_ms: u64,
    /// → the guest agent answered (the boot, or the restored guest's wake-up).
    pub agent_ms: u64,
    /// → the identity (hostname, clock, network, entropy) is pushed.
    pub configure_ms: u64,
    /// → the main process was started (or re-attached).
    pub exec_ms: u64,
}

/// The supervisor could not start the sandbox.
#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Artifacts(#[from] crate::paths::MissingArtifact),
    #[error(transparent)]
    Vm(#[from] vm::StartSandboxVmError),
    #[error(transparent)]
    Restore(#[from] vm::RestoreSandboxVmError),
    #[error("the restored guest reports no main process")]
    NoMain,
    #[error("cannot re-attach to the main process {pid} of the restored guest")]
    Reattach {
        pid: u32,
        #[source]
        source: agent::RequestError,
    },
    #[error("the guest agent did not come up")]
    Agent(#[source] agent::ConnectAgentError),
    #[error("{message}")]
    Exec { message: String, exit_code: i32 },
    #[error("cannot serve {path}")]
    Listen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the output log")]
    Log(#[source] std::io::Error),
    #[error("cannot pause or resume the VM")]
    Control(#[source] kiln_vmm::ControlVmError),
    #[error("configuring the guest failed: {0}")]
    Configure(String),
}

impl ShimError {
    fn exit_code(&self) -> i32 {
        match self {
            ShimError::Exec { exit_code, .. } => *exit_code,
            _ => 125,
        }
    }
}

/// What the main process's watchers see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MainState {
    /// Bytes of complete records in output.log.
    log_len: u64,
    /// Set once the main process ended.
    exit: Option<(i32, Option<i32>)>,
}

struct Shim {
    store: Store,
    id: String,
    dir: PathBuf,
    agent: AgentClient,
    vm: Mutex<VmHandle>,
    main_pid: u32,
    main_stdin: Mutex<Option<Stdin>>,
    state: watch::Sender<MainState>,
    paused: Mutex<Option<Instant>>,
    /// Set once Kiln killed the VMM itself because the guest did not act
    /// on a signal (a hung or hostile guest).
    hard_killed: std::sync::atomic::AtomicBool,
    /// Set when a client attached to the main process (a `kiln run` in the
    /// foreground does, right after the ready line), waits for it, or ends
    /// it (`stop`, `kill`, `rm -f`): a `--rm` sandbox then has nobody left
    /// to wait for.
    exit_collected: std::sync::atomic::AtomicBool,
    /// Bytes of output `output.log` keeps (the newest).
    log_limit: u64,
    /// Where the start's time went (reported once in the ready line).
    timings: StartTimings,
}

/// Where the supervisor reports whether the sandbox started: the pipe of
/// the `kiln` command that spawned it, or (a claimed pool member) the
/// control connection of the run that claimed it.
enum Report<W> {
    Pipe(W),
    Claim(FrameWriter<tokio::net::unix::OwnedWriteHalf>),
}

impl<W: std::io::Write> Report<W> {
    async fn send(self, line: &ReadyLine) {
        match self {
            Report::Pipe(mut w) => write_ready(&mut w, line),
            Report::Claim(mut w) => {
                let resp = CtlResponse::Ready { line: line.clone() };
                if let Err(e) = w.json(Kind::Response, &resp).await {
                    warn!(error = %e, "cannot answer the run that claimed this sandbox");
                }
            }
        }
    }
}

/// Writes `line` (one JSON line) for the `kiln` command that spawned us.
/// Best effort: that command may be gone.
fn write_ready(w: &mut impl std::io::Write, line: &ReadyLine) {
    let _ = writeln!(w, "{}", serde_json::to_string(line).expect("serializes"));
    let _ = w.flush();
}

/// Runs the supervisor of sandbox `id` until the sandbox has ended.
/// `ready` receives one JSON `ReadyLine` once the main process started (a
/// warm-pool member: once it is offered; the run that claims it gets the
/// main process's line on its control connection).
#[instrument(skip_all, fields(sandbox = %id))]
pub async fn run(store: Store, id: String, ready: impl std::io::Write) -> Result<(), ShimError> {
    crate::dns::start_candidate_if_networked(&store, &id);
    let drainer = store
        .load(&id)
        .is_ok_and(|r| r.spec.network.is_some())
        .then(|| tokio::spawn(drain_drop_events(store.dirs().clone(), id.clone())));
    let result = run_sandbox(store.clone(), id.clone(), ready).await;
    if let Some(task) = drainer {
        task.abort();
    }
    // The VM is gone (or never came): its tap, address and policy program
    // go too. (A supervisor killed before this is repaired by the node's
    // reconciler.)
    crate::node::release_network(store.dirs(), &id);
    result
}

/// How often a networked sandbox's supervisor moves its drop events from
/// the program's ring buffer (64 KiB) into the bounded events file, so a
/// guest flooding denied packets cannot keep the ring full and later events
/// from being recorded (`kiln events` drains too).
const DROP_EVENT_DRAIN: Duration = Duration::from_secs(5);

async fn drain_drop_events(dirs: crate::paths::Dirs, id: String) {
    let mut tick = tokio::time::interval(DROP_EVENT_DRAIN);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let (dirs, id) = (dirs.clone(), id.clone());
        let drained = tokio::task::spawn_blocking(move || {
            crate::node::open_network_view(&dirs)
                .map_err(|e| e.to_string())
                .and_then(|net| net.drop_events(&id).map_err(|e| e.to_string()))
                .map(|_| ())
        })
        .await;
        if let Ok(Err(e)) = drained {
            tracing::debug!(error = %e, "cannot drain drop events");
        }
    }
}

async fn run_sandbox(
    store: Store,
    id: String,
    mut ready: impl std::io::Write,
) -> Result<(), ShimError> {
    let started = Instant::now();
    let mut rec = store.load(&id)?;
    rec.set_shim(Some(crate::store::ProcessIdentity::current()));
    store.save(&rec)?;
    let (outcome, report) = if rec.pool.is_some() {
        match pooled(&store, &mut rec, &mut ready).await? {
            PoolEnd::Gone => return Ok(()),
            PoolEnd::Claimed { outcome, writer } => (*outcome, Report::Claim(writer)),
        }
    } else {
        (start(&store, &mut rec).await, Report::Pipe(ready))
    };
    match outcome {
        Ok((shim, process, log, listener)) => {
            let line = ReadyLine {
                ok: true,
                main_pid: Some(shim.main_pid),
                error: None,
                exit_code: None,
                driver: rec.driver.clone(),
                restore_failed: false,
                timings: Some(shim.timings),
            };
            report.send(&line).await;
            info!(
                elapsed_ms = started.elapsed().as_millis() as u64,
                "sandbox running"
            );
            supervise(
                Arc::new(shim),
                process,
                log,
                listener,
                rec.spec.timeout_secs,
            )
            .await
        }
        Err(e) => {
            let message = format!("{e:#}");
            let chain = error_chain(&e);
            warn!(error = %chain, "sandbox failed to start");
            let code = e.exit_code();
            rec.state = SandboxState::Failed {
                error: chain.clone(),
                exit_code: code,
            };
            rec.set_shim(None);
            rec.vm = None;
            store.save(&rec)?;
            let line = ReadyLine {
                ok: false,
                main_pid: None,
                error: Some(if matches!(e, ShimError::Exec { .. }) {
                    message
                } else {
                    chain
                }),
                exit_code: Some(code),
                driver: rec.driver.clone(),
                timings: None,
                // Nothing of the command ran: the caller may start it
                // another way (another pool member, the template, a boot).
                restore_failed: rec.template.is_some()
                    && matches!(
                        e,
                        ShimError::Restore(_)
                            | ShimError::Vm(_)
                            | ShimError::Agent(_)
                            | ShimError::Control(_)
                            | ShimError::Configure(_)
                    ),
            };
            report.send(&line).await;
            let _ = std::fs::remove_file(store.dir(&rec.id).join("ctl.sock"));
            release_snapshot(&store, &rec);
            if rec.spec.auto_remove {
                store.remove(&id)?;
            }
            Ok(())
        }
    }
}

/// A restored sandbox no longer maps its snapshot's memory once its VM is
/// gone: drop its registration (a fork's snapshot goes with its last user).
fn release_snapshot(store: &Store, rec: &SandboxRecord) {
    if let Some(name) = &rec.restored_from {
        crate::snapshot::SnapshotStore::new(store.dirs()).release_user(name, &rec.id);
    }
    if let Some(name) = &rec.template {
        crate::template::store(store.dirs()).release_user(name, &rec.id);
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// What a started sandbox is made of, before it is supervised.
type Started = (Shim, Process, LogWriter, UnixListener);

/// A VM that runs and whose agent answered a new session.
struct Up {
    vm: VmHandle,
    agent: AgentClient,
    ack: proto::HelloAck,
    /// When the driver reported the VM running.
    vm_ready: Instant,
    /// Time from the supervisor's start (or the claim) to `vm_ready`.
    vm_ms: u64,
}

/// Boots the sandbox's VM, or restores it (snapshot or template), and opens
/// the agent session. On failure nothing of the VM is left.
async fn bring_up(store: &Store, rec: &mut SandboxRecord) -> Result<Up, ShimError> {
    let t0 = Instant::now();
    let artifacts = GuestArtifacts::locate(store.dirs())?;
    let vm = match (rec.restored_from.clone(), rec.template.clone()) {
        (Some(name), _) => {
            let snapshots = crate::snapshot::SnapshotStore::new(store.dirs());
            vm::restore_sandbox_vm(store, rec, &artifacts, &snapshots, &name, "snapshot").await?
        }
        // A warm start: the template's guest waits for its first process,
        // which is started exactly as after a boot.
        (None, Some(name)) => {
            let templates = crate::template::store(store.dirs());
            vm::restore_sandbox_vm(store, rec, &artifacts, &templates, &name, "template").await?
        }
        (None, None) => vm::start_sandbox_vm(store, rec, &artifacts).await?,
    };
    let vm_ready = Instant::now();
    let session = async {
        let stream = vm
            .connect_agent()
            .await
            .map_err(|e| ShimError::Vm(vm::StartSandboxVmError::Vmm(e)))?;
        // A restored guest answers for this new session once its agent sees
        // the Hello (the Hello is repeated until then; the guest drops the
        // session of the snapshot's supervisor and un-quiesces).
        AgentClient::connect(stream, AGENT_TIMEOUT)
            .await
            .map_err(ShimError::Agent)
    }
    .await;
    match session {
        Ok((agent, ack)) => Ok(Up {
            vm,
            agent,
            ack,
            vm_ready,
            vm_ms: vm_ready.duration_since(t0).as_millis() as u64,
        }),
        Err(e) => {
            vm.kill().await;
            vm.cleanup().await;
            Err(e)
        }
    }
}

async fn start(store: &Store, rec: &mut SandboxRecord) -> Result<Started, ShimError> {
    let up = bring_up(store, rec).await?;
    launch(store, rec, up).await
}

/// Pushes the sandbox's identity and starts its main process (or, restored
/// from a snapshot, follows the one that runs), then serves `ctl.sock`.
/// On failure the VM is torn down.
async fn launch(store: &Store, rec: &mut SandboxRecord, up: Up) -> Result<Started, ShimError> {
    let Up {
        vm,
        agent,
        ack,
        vm_ready,
        vm_ms,
    } = up;
    let agent_ms = vm_ready.elapsed().as_millis() as u64;
    let mut timings = StartTimings {
        vm_ms,
        agent_ms: vm_ms + agent_ms,
        ..StartTimings::default()
    };
    let dir = store.dir(&rec.id);
    let result = async {
        agent
            .configure(vm::identity_with(&rec.id, rec.spec.network.as_ref()))
            .await
            .map_err(|e| ShimError::Configure(e.to_string()))?;
        let configured_ms = vm_ready.elapsed().as_millis() as u64;
        timings.configure_ms = vm_ms + configured_ms;
        let process = if rec.restored_from.is_some() {
            // The main process runs already: follow it again (its output
            // held in the guest meanwhile comes first).
            let pid = ack.main.as_ref().map(|m| m.pid).ok_or(ShimError::NoMain)?;
            let process = agent
                .attach(pid, rec.spec.stdin)
                .await
                .map_err(|source| ShimError::Reattach { pid, source })?;
            info!(
                agent_ms,
                configured_ms,
                attached_ms = vm_ready.elapsed().as_millis() as u64,
                pid,
                "re-attached to the main process of the restored guest"
            );
            process
        } else {
            let req = ExecRequest {
                argv: rec.spec.argv.clone(),
                env: rec.spec.env.clone(),
                cwd: rec.spec.cwd.clone(),
                user: rec.spec.user.clone(),
                tty: rec.spec.tty,
                rows: None,
                cols: None,
                stdin: rec.spec.stdin,
                main: true,
                detached: false,
            };
            let process = agent.exec(req).await.map_err(|e| ShimError::Exec {
                exit_code: e.shell_code().unwrap_or(125),
                message: e.to_string(),
            })?;
            info!(
                agent_ms,
                configured_ms,
                started_ms = vm_ready.elapsed().as_millis() as u64,
                warm = rec.template.is_some(),
                "main process started"
            );
            process
        };
        let sock = ctl_socket(&dir);
        let _ = std::fs::remove_file(&sock);
        let listener =
            UnixListener::bind(&sock).map_err(|source| ShimError::Listen { path: sock, source })?;
        Ok::<_, ShimError>((process, listener))
    }
    .await;
    timings.exec_ms = vm_ms + vm_ready.elapsed().as_millis() as u64;
    let (mut process, listener) = match result {
        Ok(v) => v,
        Err(e) => {
            vm.kill().await;
            vm.cleanup().await;
            return Err(e);
        }
    };
    rec.state = SandboxState::Running {
        main_pid: process.pid(),
    };
    store.save(rec)?;
    let log_limit = rec
        .spec
        .log_limit
        .unwrap_or_else(crate::logs::limit_from_env);
    let log =
        LogWriter::open_with_limit(&dir.join("output.log"), log_limit).map_err(ShimError::Log)?;
    let (state, _) = watch::channel(MainState {
        log_len: log.len(),
        exit: None,
    });
    let shim = Shim {
        store: store.clone(),
        id: rec.id.clone(),
        dir,
        agent,
        vm: Mutex::new(vm),
        main_pid: process.pid(),
        main_stdin: Mutex::new(process.take_stdin()),
        state,
        paused: Mutex::new(None),
        hard_killed: std::sync::atomic::AtomicBool::new(false),
        exit_collected: std::sync::atomic::AtomicBool::new(false),
        log_limit,
        timings,
    };
    Ok((shim, process, log, listener))
}

/// Runs until the main process has ended and the VM is gone.
async fn supervise(
    shim: Arc<Shim>,
    mut process: Process,
    mut log: LogWriter,
    listener: UnixListener,
    timeout_secs: Option<u64>,
) -> Result<(), ShimError> {
    let mut clients = JoinSet::new();
    let mut reattached = 0u32;
    let mut timed_out = false;
    let mut log_error: Option<String> = None;
    let deadline = timeout_secs.map(Duration::from_secs);
    let mut ran = Duration::ZERO;
    let mut last_tick = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let status = loop {
        tokio::select! {
            out = process.recv() => match out {
                Some(Ok(Output::Stdout(b))) => match log.append(LogStream::Stdout, &b) {
                    Ok(len) => shim.state.send_modify(|s| s.log_len = len),
                    Err(e) => {
                        // Nowhere to put the output (disk full): end the
                        // sandbox cleanly rather than lose it silently.
                        warn!(error = %e, "cannot write the output log; ending the sandbox");
                        log_error = Some(e.to_string());
                        break None;
                    }
                },
                Some(Ok(Output::Stderr(b))) => match log.append(LogStream::Stderr, &b) {
                    Ok(len) => shim.state.send_modify(|s| s.log_len = len),
                    Err(e) => {
                        warn!(error = %e, "cannot write the output log; ending the sandbox");
                        log_error = Some(e.to_string());
                        break None;
                    }
                },
                Some(Ok(Output::Exit(st))) => break Some(st),
                Some(Err(e @ agent::StreamError::Protocol { .. })) => {
                    // A bad frame fails its stream, not the sandbox (the
                    // guest may be hostile, or a workload may write to the
                    // agent port): attach to the main process again.
                    reattached += 1;
                    if reattached <= 5 {
                        warn!(error = %e, "the main process's output stream failed; re-attaching");
                    }
                    if reattached > 5 {
                        // A guest that keeps doing it gets served slowly.
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    let stdin = shim.main_stdin.lock().await.is_some();
                    // The re-attach's own answer may be hit by the same
                    // forged frames: try again a few times before giving
                    // up; only a closed connection ends it at once.
                    let mut attached = None;
                    for attempt in 0..10u32 {
                        match shim.agent.attach(shim.main_pid, stdin).await {
                            Ok(p) => {
                                attached = Some(p);
                                break;
                            }
                            Err(agent::RequestError::Stream(agent::StreamError::Closed)) => break,
                            Err(e) => {
                                warn!(error = %e, attempt, "cannot re-attach to the main process yet");
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            }
                        }
                    }
                    match attached {
                        Some(mut p) => {
                            if stdin {
                                *shim.main_stdin.lock().await = p.take_stdin();
                            }
                            process = p;
                        }
                        None => {
                            warn!("cannot re-attach to the main process");
                            break None;
                        }
                    }
                }
                Some(Err(e)) => {
                    warn!(error = %e, "the main process's output stream failed");
                    break None;
                }
                None => break None,
            },
            conn = listener.accept() => {
                if let Ok((stream, _)) = conn {
                    let shim = shim.clone();
                    clients.spawn(async move {
                        if let Err(e) = serve(shim, stream).await {
                            tracing::debug!(error = %e, "control connection ended");
                        }
                    });
                }
            }
            _ = tick.tick() => {
                // Paused time does not count against the timeout.
                let now = Instant::now();
                if shim.paused.lock().await.is_none() {
                    ran += now - last_tick;
                }
                last_tick = now;
                if let Some(d) = deadline
                    && ran >= d && !timed_out
                {
                    warn!(timeout_secs = d.as_secs(), "timeout reached, killing the main process");
                    timed_out = true;
                    // In its own task: a hung guest must not stall this loop.
                    let shim = shim.clone();
                    tokio::spawn(async move { kill_main(&shim).await });
                }
            }
            Some(_) = clients.join_next(), if !clients.is_empty() => {}
        }
    };
    let (exit_code, signal) = match status {
        Some(st) => (st.shell_code(), st.signal),
        None if shim.hard_killed.load(std::sync::atomic::Ordering::SeqCst) => (137, Some(9)),
        None => {
            warn!("the agent connection closed before the main process exited");
            (255, None)
        }
    };
    info!(exit_code, "main process ended");
    // Record the status first: it is what `kiln wait` and `kiln ps` report.
    let mut rec = shim.store.load(&shim.id)?;
    rec.state = if status.is_some() || shim.hard_killed.load(std::sync::atomic::Ordering::SeqCst) {
        SandboxState::Exited {
            exit_code,
            signal,
            finished_at: now_secs(),
            timed_out,
        }
    } else {
        SandboxState::Failed {
            error: match &log_error {
                Some(e) => format!("cannot write the output log: {e}"),
                None => "the guest agent connection was lost".into(),
            },
            exit_code,
        }
    };
    shim.store.save(&rec)?;
    shim.state
        .send_modify(|s| s.exit = Some((exit_code, signal)));
    // Power the guest off and make sure its VMM is gone, serving clients
    // meanwhile (a `kiln run` that attaches just now still gets the output
    // and the exit status).
    let discard = rec.spec.auto_remove;
    let teardown = async {
        if discard {
            // --rm: the writable disk goes with the sandbox, so nothing the
            // guest still buffers matters. Killing the VMM spares the CPU a
            // guest power-off costs (much of a short run's, under TCG).
            let vm = shim.vm.lock().await;
            vm.kill().await;
            vm.cleanup().await;
            return;
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), shim.agent.shutdown()).await;
        let vm = shim.vm.lock().await;
        if tokio::time::timeout(SHUTDOWN_GRACE, vm.wait())
            .await
            .is_err()
        {
            warn!("the VMM did not exit after the guest powered off; killing it");
            vm.kill().await;
        }
        vm.cleanup().await;
    };
    tokio::pin!(teardown);
    // A --rm sandbox's output and record go with it: when nobody has
    // attached, waited for it or ended it yet (the `kiln run` that started it is still on its way:
    // a short command can end before a loaded host schedules it), keep
    // serving a while after the teardown so it still gets the output and
    // the exit status (a `-d --rm` sandbox so stays listed, exited, for up
    // to this long).
    let late_attach = async {
        (&mut teardown).await;
        if discard {
            let t0 = Instant::now();
            while !shim
                .exit_collected
                .load(std::sync::atomic::Ordering::SeqCst)
                && t0.elapsed() < LATE_ATTACH_GRACE
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    tokio::pin!(late_attach);
    loop {
        tokio::select! {
            () = &mut late_attach => break,
            conn = listener.accept() => {
                if let Ok((stream, _)) = conn {
                    let shim = shim.clone();
                    clients.spawn(async move {
                        if let Err(e) = serve(shim, stream).await {
                            tracing::debug!(error = %e, "control connection ended");
                        }
                    });
                }
            }
        }
    }
    let _ = std::fs::remove_file(shim.dir.join("ctl.sock"));
    drop(listener);
    // Let attached clients drain the log and see the exit.
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while clients.join_next().await.is_some() {}
    })
    .await;
    let mut rec = shim.store.load(&shim.id)?;
    rec.set_shim(None);
    rec.vm = None;
    shim.store.save(&rec)?;
    release_snapshot(&shim.store, &rec);
    if rec.spec.auto_remove {
        shim.store.remove(&shim.id)?;
    }
    Ok(())
}

/// Path of a sandbox's control socket.
pub fn ctl_socket(dir: &Path) -> PathBuf {
    dir.join("ctl.sock")
}
