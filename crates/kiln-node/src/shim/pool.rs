//! Warm-pool members: restore the template, warm up, pause, offer
//! themselves and wait to be claimed or removed.

use super::*;

/// How a warm-pool member's wait ended.
pub(super) enum PoolEnd {
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
pub(super) async fn pooled(
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
pub(super) async fn warm_up(agent: &AgentClient) {
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
pub(super) fn claim_mismatch(
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
pub(super) fn forget_member(store: &Store, rec: &SandboxRecord, pool: &crate::pool::Pool) {
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
