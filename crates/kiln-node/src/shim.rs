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
    let result = run_sandbox(store.clone(), id.clone(), ready).await;
    // The VM is gone (or never came): its tap, address and policy program
    // go too. (A supervisor killed before this is repaired by the node's
    // reconciler.)
    crate::node::release_network(store.dirs(), &id);
    result
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

/// How a warm-pool member's wait ended.
enum PoolEnd {
    /// It was removed (killed, its VM died, or it never came up): nothing
    /// of it is left, not even its record.
    Gone,
    /// A run claimed it: the outcome of starting its main process, and the
    /// connection to answer on.
    Claimed {
        outcome: Box<Result<Started, ShimError>>,
        writer: FrameWriter<tokio::net::unix::OwnedWriteHalf>,
    },
}

/// A warm-pool member (`crate::pool`): restores the template, has the
/// guest run its identity push once, pauses, offers itself, and waits for a
/// run to claim it (or to be removed).
async fn pooled(
    store: &Store,
    rec: &mut SandboxRecord,
    ready: &mut impl std::io::Write,
) -> Result<PoolEnd, ShimError> {
    let Some(name) = rec.pool.clone() else {
        return Ok(PoolEnd::Gone);
    };
    let pool = crate::pool::Pool::of(store.dirs(), &name);
    let dir = store.dir(&rec.id);
    let sock = ctl_socket(&dir);
    let prepared = async {
        let up = bring_up(store, rec).await?;
        let warmed = async {
            // The first identity push after a restore makes the guest run
            // code it has not run since the snapshot (under TCG: translate
            // it); a claim then pays only for its own.
            up.agent
                .configure(vm::identity(&rec.id))
                .await
                .map_err(|e| ShimError::Configure(e.to_string()))?;
            warm_up(&up.agent).await;
            up.vm.pause().await.map_err(ShimError::Control)?;
            let _ = std::fs::remove_file(&sock);
            UnixListener::bind(&sock).map_err(|source| ShimError::Listen {
                path: sock.clone(),
                source,
            })
        }
        .await;
        match warmed {
            Ok(l) => Ok((up, l)),
            Err(e) => {
                up.vm.kill().await;
                up.vm.cleanup().await;
                Err(e)
            }
        }
    }
    .await;
    let (up, listener) = match prepared {
        Ok(v) => v,
        Err(e) => {
            let chain = error_chain(&e);
            warn!(error = %chain, "the pool member did not come up");
            let line = ReadyLine {
                ok: false,
                main_pid: None,
                error: Some(chain),
                exit_code: Some(e.exit_code()),
                driver: rec.driver.clone(),
                restore_failed: true,
                timings: None,
            };
            write_ready(ready, &line);
            forget_member(store, rec, &pool);
            return Ok(PoolEnd::Gone);
        }
    };
    rec.state = SandboxState::Pooled;
    store.save(rec)?;
    if let Err(e) = pool.offer(&rec.id) {
        warn!(error = %e, "cannot offer the pool member");
    }
    let line = ReadyLine {
        ok: true,
        main_pid: None,
        error: None,
        exit_code: None,
        driver: rec.driver.clone(),
        restore_failed: false,
        timings: None,
    };
    write_ready(ready, &line);
    info!(
        pool = %name,
        restored_ms = up.vm_ready.elapsed().as_millis() as u64,
        "pool member ready (paused)"
    );
    enum Event {
        Conn(UnixStream),
        VmGone,
        Tick,
    }
    // A run that took this member's offer but died before its claim would
    // leave it unclaimable for good: an offer missing this long without a
    // claim is made again.
    const UNCLAIMED_GRACE: Duration = Duration::from_secs(10);
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    let mut taken_since: Option<Instant> = None;
    loop {
        let event = tokio::select! {
            conn = listener.accept() => match conn {
                Ok((s, _)) => Event::Conn(s),
                Err(_) => continue,
            },
            () = up.vm.wait() => Event::VmGone,
            _ = tick.tick() => Event::Tick,
        };
        let stream = match event {
            Event::Conn(s) => s,
            Event::Tick => {
                if pool.is_offered(&rec.id) {
                    taken_since = None;
                } else if taken_since.is_some_and(|t| t.elapsed() >= UNCLAIMED_GRACE) {
                    warn!("taken from the pool but never claimed; offering it again");
                    let _ = pool.offer(&rec.id);
                    taken_since = None;
                } else if taken_since.is_none() {
                    taken_since = Some(Instant::now());
                }
                continue;
            }
            Event::VmGone => {
                warn!("the pool member's VMM exited");
                up.vm.cleanup().await;
                forget_member(store, rec, &pool);
                return Ok(PoolEnd::Gone);
            }
        };
        let (mut r, w) = stream.into_split();
        let mut writer = FrameWriter::new(w);
        let req = match ctl::read_request(&mut r).await {
            Ok((req, _)) => req,
            Err(e) => {
                // Perhaps a claim it could not read: stay claimable.
                warn!(error = %e, "bad control request to a pool member");
                if !pool.is_offered(&rec.id) {
                    let _ = pool.offer(&rec.id);
                }
                continue;
            }
        };
        match req {
            CtlRequest::Claim { spec } => {
                if let Some(why) = claim_mismatch(&rec.spec, &spec) {
                    warn!(why, "refusing a claim for something else");
                    let _ = reply_error(&mut writer, format!("this pool member {why}")).await;
                    let _ = pool.offer(&rec.id);
                    continue;
                }
                pool.withdraw(&rec.id);
                info!("claimed by a run");
                // The run waits for `Ready` from here on, however long it
                // takes: it must never start the command elsewhere too.
                // (Acknowledged before the record stops naming the pool.)
                if let Err(e) = writer.json(Kind::Response, &CtlResponse::Claimed).await {
                    warn!(error = %e, "cannot acknowledge the claim");
                }
                rec.spec = *spec;
                rec.pool = None;
                rec.created_at = crate::store::now_secs();
                rec.state = SandboxState::Creating;
                store.save(rec)?;
                drop(listener);
                // The claim's own timings: the member was up before it.
                let mut up = up;
                up.vm_ready = Instant::now();
                up.vm_ms = 0;
                let outcome = match up.vm.resume().await {
                    Ok(()) => launch(store, rec, up).await,
                    Err(e) => {
                        up.vm.kill().await;
                        up.vm.cleanup().await;
                        Err(ShimError::Control(e))
                    }
                };
                return Ok(PoolEnd::Claimed {
                    outcome: Box::new(outcome),
                    writer,
                });
            }
            CtlRequest::Kill | CtlRequest::Stop { .. } => {
                info!("pool member removed");
                pool.withdraw(&rec.id);
                up.vm.kill().await;
                up.vm.cleanup().await;
                drop(listener);
                forget_member(store, rec, &pool);
                let _ = reply_exited(&mut writer, (137, Some(9))).await;
                return Ok(PoolEnd::Gone);
            }
            _ => {
                let _ = reply_error(
                    &mut writer,
                    format!(
                        "sandbox {} is a warm-pool member of template {name}: it runs nothing yet",
                        rec.id
                    ),
                )
                .await;
            }
        }
    }
}

/// Starts and reaps one trivial process in the guest (`WARM_UP_ARG`), so
/// that a claim does not pay for the first process start after a restore.
/// Best effort: a guest that cannot is still a usable pool member.
async fn warm_up(agent: &AgentClient) {
    let req = ExecRequest {
        argv: vec!["/proc/self/exe".into(), proto::WARM_UP_ARG.into()],
        env: vec![],
        cwd: None,
        user: None,
        tty: false,
        rows: None,
        cols: None,
        stdin: false,
        main: false,
        detached: false,
    };
    let t0 = Instant::now();
    let ran = tokio::time::timeout(Duration::from_secs(10), async {
        let mut p = agent.exec(req).await.map_err(|e| e.to_string())?;
        loop {
            match p.recv().await {
                Some(Ok(Output::Exit(st))) => return Ok(st.shell_code()),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.to_string()),
                None => return Err("the process stream ended".to_string()),
            }
        }
    })
    .await;
    match ran {
        Ok(Ok(0)) => info!(
            elapsed_ms = t0.elapsed().as_millis() as u64,
            "guest warmed up"
        ),
        Ok(Ok(code)) => warn!(code, "the warm-up process failed"),
        Ok(Err(e)) => warn!(error = %e, "the warm-up process failed"),
        Err(_) => warn!("the warm-up process did not finish"),
    }
}

/// Why `claimed` cannot run in a pool member made for `member`, if so.
fn claim_mismatch(
    member: &crate::store::SandboxSpec,
    claimed: &crate::store::SandboxSpec,
) -> Option<String> {
    if member.image_digest != claimed.image_digest || member.image_disk != claimed.image_disk {
        return Some(format!(
            "runs image {}, not {}",
            member.image_digest, claimed.image_digest
        ));
    }
    // A networked member is claimed only with its own attachment (its tap
    // is the VM's; the policy may differ), a member without a network only
    // by a run without one.
    match (&member.network, &claimed.network) {
        (None, None) => {}
        (Some(m), Some(c))
            if (&m.id, &m.ifname, m.mac, m.ip) == (&c.id, &c.ifname, c.mac, c.ip) => {}
        (Some(m), _) => {
            return Some(format!(
                "is attached to the network as {} on {}, not as the claim says",
                m.ip, m.ifname
            ));
        }
        (None, Some(_)) => return Some("has no network device".to_string()),
    }
    if (member.cpus, member.memory_mib, member.disk_mib)
        != (claimed.cpus, claimed.memory_mib, claimed.disk_mib)
    {
        return Some(format!(
            "has {} CPU, {} MiB memory and {} MiB disk, not {}, {} and {}",
            member.cpus,
            member.memory_mib,
            member.disk_mib,
            claimed.cpus,
            claimed.memory_mib,
            claimed.disk_mib
        ));
    }
    None
}

/// Removes every trace of a pool member whose VM is gone: its offer, its
/// registration with the template, its network, its socket and its record.
fn forget_member(store: &Store, rec: &SandboxRecord, pool: &crate::pool::Pool) {
    pool.withdraw(&rec.id);
    release_snapshot(store, rec);
    // A networked member's tap, lease and pins go before its record (whose
    // removal is what the node waits for).
    if rec.spec.network.is_some() {
        crate::node::release_network(store.dirs(), &rec.id);
    }
    let _ = std::fs::remove_file(ctl_socket(&store.dir(&rec.id)));
    if let Err(e) = store.remove(&rec.id) {
        warn!(error = %e, "cannot remove the pool member's record");
    }
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

/// Serves one control connection.
async fn serve(shim: Arc<Shim>, stream: UnixStream) -> Result<(), ctl::CtlError> {
    let (mut r, w) = stream.into_split();
    let (req, rest) = ctl::read_request(&mut r).await?;
    let mut reader = FrameReader::with_buffered(r, &rest);
    let mut writer = FrameWriter::new(w);
    match req {
        CtlRequest::Attach { stdin, replay } => {
            shim.exit_collected
                .store(true, std::sync::atomic::Ordering::SeqCst);
            attach_main(&shim, reader, writer, stdin, replay).await
        }
        CtlRequest::Exec(req) if req.detached => match shim.agent.exec_detached(req).await {
            Ok(pid) => {
                writer
                    .json(Kind::Response, &CtlResponse::Started { pid })
                    .await
            }
            Err(e) => reply_exec_error(&mut writer, &e).await,
        },
        CtlRequest::Exec(req) => match shim.agent.exec(req).await {
            Ok(p) => {
                writer
                    .json(Kind::Response, &CtlResponse::Started { pid: p.pid() })
                    .await?;
                relay_process(&shim, p, reader, writer).await
            }
            Err(e) => reply_exec_error(&mut writer, &e).await,
        },
        CtlRequest::AttachExec { pid, .. } if pid == shim.main_pid => {
            reply_error(
                &mut writer,
                format!("process {pid} is the sandbox's main process: follow it with kiln logs -f"),
            )
            .await
        }
        CtlRequest::AttachExec { pid, stdin } => match shim.agent.attach(pid, stdin).await {
            Ok(p) => {
                writer
                    .json(Kind::Response, &CtlResponse::Started { pid: p.pid() })
                    .await?;
                relay_process(&shim, p, reader, writer).await
            }
            Err(e) => reply_error(&mut writer, e.to_string()).await,
        },
        CtlRequest::CopyIn { dest } => {
            let (tx, rx) = tokio::io::duplex(256 * 1024);
            let agent = shim.agent.clone();
            let copy = tokio::spawn(async move { agent.copy_in(&dest, rx).await });
            let mut tx = Some(tx);
            writer.json(Kind::Response, &CtlResponse::Ok).await?;
            // Whether the client ended the stream (or the guest refused
            // early); otherwise the client went away: cancel.
            let mut ended = false;
            while let Ok(Some(f)) = reader.next().await {
                match f.kind {
                    Kind::Data => {
                        let Ok((_, bytes)) = f.data() else { break };
                        if let Some(t) = tx.as_mut() {
                            use tokio::io::AsyncWriteExt;
                            if t.write_all(bytes).await.is_err() {
                                ended = true;
                                break;
                            }
                        }
                    }
                    Kind::Eof => {
                        ended = true;
                        break;
                    }
                    _ => {}
                }
            }
            if !ended {
                // Dropping the copy closes its stream without an end of
                // archive: the guest removes what it was writing.
                copy.abort();
                let _ = copy.await;
                return Err(ctl::CtlError::Protocol(
                    "the client went away before the end of the copy; cancelled".into(),
                ));
            }
            drop(tx.take());
            let result = match copy.await {
                Ok(Ok(())) => CtlResponse::Ok,
                Ok(Err(e)) => CtlResponse::Error {
                    message: e.to_string(),
                    exit_code: None,
                },
                Err(e) => CtlResponse::Error {
                    message: format!("copy task failed: {e}"),
                    exit_code: None,
                },
            };
            writer.json(Kind::Response, &result).await
        }
        CtlRequest::CopyOut { path } => match shim.agent.copy_out(&path).await {
            Ok(mut rd) => {
                use tokio::io::AsyncReadExt;
                writer.json(Kind::Response, &CtlResponse::Ok).await?;
                let mut buf = vec![0u8; proto::MAX_DATA_CHUNK];
                loop {
                    let n = rd.read(&mut buf).await?;
                    if n == 0 {
                        break;
                    }
                    writer.data(Channel::Tar, &buf[..n]).await?;
                }
                writer.eof(Channel::Tar).await
            }
            Err(e) => reply_error(&mut writer, e.to_string()).await,
        },
        CtlRequest::Stat { path } => match shim.agent.stat(&path).await {
            Ok(stat) => {
                writer
                    .json(Kind::Response, &CtlResponse::Stat { stat })
                    .await
            }
            Err(e) => reply_error(&mut writer, e.to_string()).await,
        },
        CtlRequest::Signal { signal } => match shim.agent.signal(shim.main_pid, signal).await {
            Ok(()) => writer.json(Kind::Response, &CtlResponse::Ok).await,
            Err(e) => reply_error(&mut writer, e.to_string()).await,
        },
        CtlRequest::Stop { grace_secs } => {
            shim.exit_collected
                .store(true, std::sync::atomic::Ordering::SeqCst);
            resume_if_paused(&shim).await;
            let st = if signal_main(&shim, 15).await {
                match wait_exit(&shim, Some(Duration::from_secs(grace_secs))).await {
                    Some(st) => st,
                    None => kill_main(&shim).await,
                }
            } else {
                kill_main(&shim).await
            };
            reply_exited(&mut writer, st).await
        }
        CtlRequest::Kill => {
            shim.exit_collected
                .store(true, std::sync::atomic::Ordering::SeqCst);
            resume_if_paused(&shim).await;
            let st = kill_main(&shim).await;
            reply_exited(&mut writer, st).await
        }
        CtlRequest::Wait => {
            shim.exit_collected
                .store(true, std::sync::atomic::Ordering::SeqCst);
            let st = wait_exit(&shim, None).await.unwrap_or((255, None));
            reply_exited(&mut writer, st).await
        }
        CtlRequest::Pause => {
            let r = shim.vm.lock().await.pause().await;
            match r {
                Ok(()) => {
                    *shim.paused.lock().await = Some(Instant::now());
                    set_paused(&shim, true);
                    writer.json(Kind::Response, &CtlResponse::Ok).await
                }
                Err(e) => reply_error(&mut writer, e.to_string()).await,
            }
        }
        CtlRequest::Snapshot {
            dest,
            name,
            ephemeral,
        } => match snapshot(&shim, &dest, name, ephemeral).await {
            Ok(()) => writer.json(Kind::Response, &CtlResponse::Ok).await,
            Err(e) => reply_error(&mut writer, error_chain(&e)).await,
        },
        CtlRequest::Claim { .. } => {
            reply_error(
                &mut writer,
                format!("sandbox {} is not a warm-pool member", shim.id),
            )
            .await
        }
        CtlRequest::Resume => {
            let r = shim.vm.lock().await.resume().await;
            match r {
                Ok(()) => {
                    *shim.paused.lock().await = None;
                    set_paused(&shim, false);
                    writer.json(Kind::Response, &CtlResponse::Ok).await
                }
                Err(e) => reply_error(&mut writer, e.to_string()).await,
            }
        }
    }
}

/// Snapshotting a sandbox failed.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotSandboxError {
    #[error("the snapshot directory {0} is not a staging directory of this host")]
    Dest(PathBuf),
    #[error("the guest agent did not quiesce")]
    Quiesce(#[source] agent::RequestError),
    #[error("the guest agent did not quiesce within {0:?}")]
    QuiesceTimeout(Duration),
    #[error("the VMM failed to snapshot the VM")]
    Vm(#[source] kiln_vmm::SnapshotVmError),
    #[error(transparent)]
    Write(#[from] crate::snapshot::CreateSnapshotError),
    #[error(transparent)]
    Artifacts(#[from] crate::paths::MissingArtifact),
    #[error("cannot hash the guest artifacts")]
    Hash(#[source] std::io::Error),
    #[error("cannot resume the VM after the snapshot")]
    Resume(#[source] kiln_vmm::ControlVmError),
    #[error("the guest agent did not come back after the snapshot")]
    Reconnect(#[source] agent::RequestError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// How long the guest may take to sync its disks for a snapshot.
const QUIESCE_TIMEOUT: Duration = Duration::from_secs(30);

/// Writes a snapshot of the sandbox into the staging directory `dest`:
/// quiesce the agent (the guest syncs its disks and stops sending, so no
/// frame is cut), driver snapshot (the vCPUs stop; memory + device state),
/// sparse copy of the writable disk while the vCPUs are still stopped (the
/// disk must match the memory image exactly: the guest's page cache refers
/// to it), resume, then hash everything into the manifest with the guest
/// running again. A paused sandbox is not quiesced (its guest cannot
/// answer) and stays paused; the agent protocol resynchronises on a cut
/// frame after a restore.
async fn snapshot(
    shim: &Shim,
    dest: &Path,
    name: String,
    ephemeral: bool,
) -> Result<(), SnapshotSandboxError> {
    let snapshots = crate::snapshot::SnapshotStore::new(shim.store.dirs());
    let staging_ok = dest.parent() == Some(snapshots.root())
        && dest
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with(".staging-"));
    if !staging_ok {
        return Err(SnapshotSandboxError::Dest(dest.to_path_buf()));
    }
    // The staging directory is owned by the `kiln snapshot` that asked;
    // while this writes it, it is not reaped even if that command is killed.
    let _writing = crate::snapshot::SnapshotStore::lock_staging(dest)?;
    // Holding the VM lock keeps pause/resume out until the VM is consistent.
    let vm = shim.vm.lock().await;
    let was_paused = shim.paused.lock().await.is_some();
    let t0 = Instant::now();
    if !was_paused {
        match tokio::time::timeout(QUIESCE_TIMEOUT, shim.agent.quiesce()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(SnapshotSandboxError::Quiesce(e)),
            Err(_) => return Err(SnapshotSandboxError::QuiesceTimeout(QUIESCE_TIMEOUT)),
        }
    }
    let quiesced = t0.elapsed();
    let written = async {
        let info = vm
            .snapshot(&dest.join(crate::snapshot::VM_DIR))
            .await
            .map_err(SnapshotSandboxError::Vm)?;
        crate::snapshot::sparse_copy(
            &shim.dir.join(crate::snapshot::RW_DISK),
            &dest.join(crate::snapshot::RW_DISK),
        )
        .await?;
        Ok::<_, SnapshotSandboxError>(info)
    }
    .await;
    let stopped = t0.elapsed() - quiesced;
    // Whatever happened, a sandbox that ran goes on running.
    let resumed = if was_paused {
        Ok(())
    } else {
        match vm.resume().await {
            Ok(()) => shim
                .agent
                .resume_session(AGENT_TIMEOUT)
                .await
                .map_err(SnapshotSandboxError::Reconnect),
            Err(e) => Err(SnapshotSandboxError::Resume(e)),
        }
    };
    drop(vm);
    let info = written?;
    resumed?;
    let rec = shim.store.load(&shim.id)?;
    let artifacts = GuestArtifacts::locate(shim.store.dirs())?;
    let driver = shim.vm.lock().await.driver().clone();
    let dest = dest.to_path_buf();
    let parts = crate::snapshot::ManifestParts {
        name,
        source: shim.id.clone(),
        ephemeral,
        guest: crate::snapshot::guest_digests(&artifacts, driver.kind)
            .map_err(SnapshotSandboxError::Hash)?,
        driver,
        spec: rec.spec,
        main_pid: shim.main_pid,
        downtime_ms: info.downtime.as_millis() as u64,
    };
    let hashed = Instant::now();
    let memo = shim.store.dirs().memo();
    let m = tokio::task::spawn_blocking(move || {
        crate::snapshot::write_manifest(&dest, parts, Some(&memo))
    })
    .await
    .map_err(|e| {
        SnapshotSandboxError::Hash(std::io::Error::other(format!("hashing task failed: {e}")))
    })??;
    info!(
        snapshot = %m.name,
        quiesce_ms = quiesced.as_millis() as u64,
        vm_stopped_ms = stopped.as_millis() as u64,
        driver_downtime_ms = m.downtime_ms,
        hash_ms = hashed.elapsed().as_millis() as u64,
        bytes = m.total_size(),
        "snapshot written"
    );
    Ok(())
}

/// A paused guest cannot act on a signal: resume it first.
async fn resume_if_paused(shim: &Shim) {
    let mut paused = shim.paused.lock().await;
    if paused.is_some() {
        if let Err(e) = shim.vm.lock().await.resume().await {
            warn!(error = %e, "cannot resume the VM");
        }
        *paused = None;
        drop(paused);
        set_paused(shim, false);
    }
}

/// Signals the main process; `false` when the guest did not confirm in
/// time (it is hung or hostile).
async fn signal_main(shim: &Shim, signal: i32) -> bool {
    matches!(
        tokio::time::timeout(SIGNAL_TIMEOUT, shim.agent.signal(shim.main_pid, signal)).await,
        Ok(Ok(()))
    )
}

/// SIGKILLs the main process through the guest and, if the guest does not
/// report it gone in time, kills the VMM: a guest can never make its
/// sandbox unkillable. Returns the main process's end.
async fn kill_main(shim: &Shim) -> (i32, Option<i32>) {
    if signal_main(shim, 9).await
        && let Some(st) = wait_exit(shim, Some(KILL_GRACE)).await
    {
        return st;
    }
    warn!("the guest did not end the main process; killing the VMM");
    shim.hard_killed
        .store(true, std::sync::atomic::Ordering::SeqCst);
    shim.vm.lock().await.kill().await;
    wait_exit(shim, Some(Duration::from_secs(30)))
        .await
        .unwrap_or((137, Some(9)))
}

fn set_paused(shim: &Shim, paused: bool) {
    if let Ok(mut rec) = shim.store.load(&shim.id) {
        if rec.state.is_finished() {
            return;
        }
        rec.state = if paused {
            SandboxState::Paused {
                main_pid: shim.main_pid,
            }
        } else {
            SandboxState::Running {
                main_pid: shim.main_pid,
            }
        };
        if let Err(e) = shim.store.save(&rec) {
            warn!(error = %e, "cannot record the pause state");
        }
    }
}

async fn reply_error(
    writer: &mut FrameWriter<tokio::net::unix::OwnedWriteHalf>,
    message: String,
) -> Result<(), ctl::CtlError> {
    writer
        .json(
            Kind::Response,
            &CtlResponse::Error {
                message,
                exit_code: None,
            },
        )
        .await
}

async fn reply_exited(
    writer: &mut FrameWriter<tokio::net::unix::OwnedWriteHalf>,
    (exit_code, signal): (i32, Option<i32>),
) -> Result<(), ctl::CtlError> {
    writer
        .json(Kind::Response, &CtlResponse::Exited { exit_code, signal })
        .await
}

/// An exec the guest refused, with the exit code a shell would give.
async fn reply_exec_error(
    writer: &mut FrameWriter<tokio::net::unix::OwnedWriteHalf>,
    e: &agent::ExecError,
) -> Result<(), ctl::CtlError> {
    let resp = CtlResponse::Error {
        message: e.to_string(),
        exit_code: Some(e.shell_code().unwrap_or(125)),
    };
    writer.json(Kind::Response, &resp).await
}

/// Waits for the main process to end (at most `limit`).
async fn wait_exit(shim: &Shim, limit: Option<Duration>) -> Option<(i32, Option<i32>)> {
    let mut rx = shim.state.subscribe();
    let fut = async {
        loop {
            if let Some(st) = rx.borrow_and_update().exit {
                return Some(st);
            }
            if rx.changed().await.is_err() {
                return None;
            }
        }
    };
    match limit {
        Some(d) => tokio::time::timeout(d, fut).await.ok().flatten(),
        None => fut.await,
    }
}

/// Streams the main process's output log to a client, and the client's
/// stdin (and signals) to the main process.
async fn attach_main(
    shim: &Arc<Shim>,
    mut reader: FrameReader<tokio::net::unix::OwnedReadHalf>,
    mut writer: FrameWriter<tokio::net::unix::OwnedWriteHalf>,
    stdin: bool,
    replay: bool,
) -> Result<(), ctl::CtlError> {
    let path = shim.dir.join("output.log");
    let mut rx = shim.state.subscribe();
    let start = if replay { 0 } else { rx.borrow().log_len };
    let mut log = LogReader::open(&path, start)?;
    writer
        .json(Kind::Response, &CtlResponse::Started { pid: shim.main_pid })
        .await?;
    // Client → main process.
    let input = {
        let shim = shim.clone();
        tokio::spawn(async move {
            while let Ok(Some(f)) = reader.next().await {
                match f.kind {
                    Kind::Data if stdin => {
                        if let Ok((Channel::Stdin, bytes)) = f.data() {
                            let mut guard = shim.main_stdin.lock().await;
                            if let Some(s) = guard.as_mut()
                                && s.write(bytes).await.is_err()
                            {
                                break;
                            }
                        }
                    }
                    Kind::Eof if stdin => {
                        if let Some(s) = shim.main_stdin.lock().await.take() {
                            let _ = s.close().await;
                        }
                    }
                    Kind::Request => match f.json::<Request>("control request") {
                        Ok(Request::Signal { signal, .. }) => {
                            let _ = shim.agent.signal(shim.main_pid, signal).await;
                        }
                        Ok(Request::Resize { rows, cols, .. }) => {
                            let _ = shim.agent.resize(shim.main_pid, rows, cols).await;
                        }
                        _ => {}
                    },
                    _ => {}
                }
            }
        })
    };
    let result = async {
        let mut told = 0;
        loop {
            let st = *rx.borrow_and_update();
            let mut chunks: Vec<(LogStream, Vec<u8>)> = Vec::new();
            log.read_until(st.log_len, |s, b| {
                chunks.push((s, b.to_vec()));
                Ok(())
            })
            .map_err(|e| ctl::CtlError::Protocol(e.to_string()))?;
            if log.skipped() > told {
                // Output the log limit dropped before this client read it.
                let note = format!(
                    "kiln: {} bytes of output were dropped (the sandbox's log keeps the newest {})\n",
                    log.skipped() - told,
                    shim.log_limit
                );
                told = log.skipped();
                writer.data(Channel::Stderr, note.as_bytes()).await?;
            }
            for (s, b) in chunks {
                let ch = if s == LogStream::Stdout {
                    Channel::Stdout
                } else {
                    Channel::Stderr
                };
                writer.data(ch, &b).await?;
            }
            if let Some((code, signal)) = st.exit
                && log.offset() >= st.log_len
            {
                let ev = proto::Event::Exit {
                    pid: shim.main_pid,
                    status: proto::ExitStatus {
                        code: if signal.is_some() { None } else { Some(code) },
                        signal,
                    },
                };
                writer.json(Kind::Event, &ev).await?;
                let _ = writer.shutdown().await;
                return Ok(());
            }
            if rx.changed().await.is_err() {
                return Ok(());
            }
        }
    }
    .await;
    input.abort();
    result
}

/// Relays an exec'd process between the agent and a control client.
async fn relay_process(
    shim: &Arc<Shim>,
    mut p: Process,
    mut reader: FrameReader<tokio::net::unix::OwnedReadHalf>,
    mut writer: FrameWriter<tokio::net::unix::OwnedWriteHalf>,
) -> Result<(), ctl::CtlError> {
    let pid = p.pid();
    let stdin = p.take_stdin();
    let input = {
        let shim = shim.clone();
        tokio::spawn(async move {
            let mut stdin = stdin;
            while let Ok(Some(f)) = reader.next().await {
                match f.kind {
                    Kind::Data => {
                        if let (Ok((Channel::Stdin, bytes)), Some(s)) = (f.data(), stdin.as_mut())
                            && s.write(bytes).await.is_err()
                        {
                            break;
                        }
                    }
                    Kind::Eof => {
                        if let Some(s) = stdin.take() {
                            let _ = s.close().await;
                        }
                    }
                    Kind::Request => match f.json::<Request>("control request") {
                        Ok(Request::Signal { signal, .. }) => {
                            let _ = shim.agent.signal(pid, signal).await;
                        }
                        Ok(Request::Resize { rows, cols, .. }) => {
                            let _ = shim.agent.resize(pid, rows, cols).await;
                        }
                        _ => {}
                    },
                    _ => {}
                }
            }
        })
    };
    let result = async {
        while let Some(out) = p.recv().await {
            let out = out.map_err(|e| ctl::CtlError::Protocol(e.to_string()))?;
            match out {
                Output::Stdout(b) => writer.data(Channel::Stdout, &b).await?,
                Output::Stderr(b) => writer.data(Channel::Stderr, &b).await?,
                Output::Exit(status) => {
                    writer
                        .json(Kind::Event, &proto::Event::Exit { pid, status })
                        .await?;
                    let _ = writer.shutdown().await;
                    return Ok(());
                }
            }
        }
        Err(ctl::CtlError::Protocol(
            "the guest agent connection closed".into(),
        ))
    }
    .await;
    input.abort();
    result
}

/// Path of a sandbox's control socket.
pub fn ctl_socket(dir: &Path) -> PathBuf {
    dir.join("ctl.sock")
}
