//! The control socket: one connection per client request (attach, exec,
//! cp, signal, stop, kill, wait, pause, resume, snapshot), relayed to the
//! agent or the VMM.

use super::*;

/// Serves one control connection.
pub(super) async fn serve(shim: Arc<Shim>, stream: UnixStream) -> Result<(), ctl::CtlError> {
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
pub(super) const QUIESCE_TIMEOUT: Duration = Duration::from_secs(30);

/// Writes a snapshot of the sandbox into the staging directory `dest`:
/// quiesce the agent (the guest syncs its disks and stops sending, so no
/// frame is cut), driver snapshot (the vCPUs stop; memory + device state),
/// sparse copy of the writable disk while the vCPUs are still stopped (the
/// disk must match the memory image exactly: the guest's page cache refers
/// to it), resume, then hash everything into the manifest with the guest
/// running again. A paused sandbox is not quiesced (its guest cannot
/// answer) and stays paused; the agent protocol resynchronises on a cut
/// frame after a restore.
pub(super) async fn snapshot(
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
pub(super) async fn resume_if_paused(shim: &Shim) {
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
pub(super) async fn signal_main(shim: &Shim, signal: i32) -> bool {
    matches!(
        tokio::time::timeout(SIGNAL_TIMEOUT, shim.agent.signal(shim.main_pid, signal)).await,
        Ok(Ok(()))
    )
}

/// SIGKILLs the main process through the guest and, if the guest does not
/// report it gone in time, kills the VMM: a guest can never make its
/// sandbox unkillable. Returns the main process's end.
pub(super) async fn kill_main(shim: &Shim) -> (i32, Option<i32>) {
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

pub(super) fn set_paused(shim: &Shim, paused: bool) {
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

pub(super) async fn reply_error(
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

pub(super) async fn reply_exited(
    writer: &mut FrameWriter<tokio::net::unix::OwnedWriteHalf>,
    (exit_code, signal): (i32, Option<i32>),
) -> Result<(), ctl::CtlError> {
    writer
        .json(Kind::Response, &CtlResponse::Exited { exit_code, signal })
        .await
}

/// An exec the guest refused, with the exit code a shell would give.
pub(super) async fn reply_exec_error(
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
pub(super) async fn wait_exit(shim: &Shim, limit: Option<Duration>) -> Option<(i32, Option<i32>)> {
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
pub(super) async fn attach_main(
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
pub(super) async fn relay_process(
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
