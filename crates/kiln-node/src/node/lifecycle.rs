//! Sandboxes after they started: their supervisors, control sockets, stop,
//! remove, wait, pause and resume, and the view `ps` shows.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use kiln_api::proto::ExecRequest;

use super::{Node, hostname_of};
use crate::compose::{self, ComposeError, Overrides};
use crate::ctl::{CtlConn, CtlError, CtlRequest, CtlResponse};
use crate::shim::ReadyLine;
use crate::store::{SandboxRecord, SandboxState, StoreError, process_alive};

/// Starting a sandbox's supervisor failed.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("cannot create the supervisor log {path}")]
    Log {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the sandbox supervisor {exe}")]
    Spawn {
        exe: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read from the sandbox supervisor")]
    Read(#[source] std::io::Error),
    #[error("the supervisor of sandbox {id} exited before the sandbox started:\n{tail}")]
    Exited { id: String, tail: String },
    #[error("the sandbox supervisor sent a malformed ready line")]
    Malformed(#[source] serde_json::Error),
    #[error("the supervisor of sandbox {id} did not finish within {secs} s")]
    Slow { id: String, secs: u64 },
}

/// An operation on an existing sandbox failed.
#[derive(Debug, thiserror::Error)]
pub enum SandboxOpError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("sandbox {0} is still starting")]
    Starting(String),
    #[error("sandbox {0} is a warm-pool member: it runs nothing yet")]
    Pooled(String),
    #[error("sandbox {id} is not running ({state})")]
    NotRunning { id: String, state: String },
    #[error("sandbox {0} is paused: run kiln resume {0} first")]
    Paused(String),
    #[error("sandbox {0} is running: stop it first or use rm -f")]
    Running(String),
    #[error(transparent)]
    Ctl(#[from] CtlError),
    #[error("cannot {what} {id}: {message}")]
    Refused {
        what: &'static str,
        id: String,
        message: String,
    },
    #[error("unexpected answer from the supervisor of {id}: {answer}")]
    Unexpected { id: String, answer: String },
    #[error(transparent)]
    Supervisor(#[from] SupervisorError),
    #[error(transparent)]
    Compose(#[from] ComposeError),
}

/// What `kiln exec` asks for, before the sandbox's own environment is
/// applied.
#[derive(Debug, Clone, Default)]
pub struct ExecSpec {
    pub argv: Vec<String>,
    /// `K=V`, applied over the sandbox's environment.
    pub env: Vec<String>,
    pub workdir: Option<String>,
    pub user: Option<String>,
    pub tty: bool,
    pub rows: Option<u16>,
    pub cols: Option<u16>,
    pub stdin: bool,
    pub detached: bool,
}

impl Node {
    /// Starts `kiln shim ID` detached (own session, outlives this process)
    /// and waits for its one-line ready report; the supervisor's pid.
    pub async fn spawn_supervisor(
        &self,
        rec: &SandboxRecord,
    ) -> Result<(ReadyLine, u32), SupervisorError> {
        let dir = self.store.dir(&rec.id);
        let shim_log = dir.join("shim.log");
        let log = std::fs::File::create(&shim_log).map_err(|source| SupervisorError::Log {
            path: shim_log.clone(),
            source,
        })?;
        let mut child = std::process::Command::new(&self.supervisor_exe)
            .env(crate::NODE_LOCAL_ENV, "1")
            .arg("shim")
            .arg(&rec.id)
            .env("KILN_STATE_DIR", &self.dirs().state)
            .env("KILN_CACHE_DIR", &self.dirs().cache)
            .env(
                "KILN_LOG",
                std::env::var("KILN_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .map_err(|source| SupervisorError::Spawn {
                exe: self.supervisor_exe.clone(),
                source,
            })?;
        let shim_pid = child.id();
        let stdout = child.stdout.take().expect("stdout was piped");
        let (n, line) = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            let n = BufReader::new(stdout).read_line(&mut line)?;
            Ok::<_, std::io::Error>((n, line))
        })
        .await
        .map_err(|e| SupervisorError::Read(std::io::Error::other(e)))?
        .map_err(SupervisorError::Read)?;
        // The supervisor lives on; reap it in the background if we outlive it.
        std::thread::spawn(move || {
            let _ = child.wait();
        });
        if n == 0 {
            let tail = std::fs::read_to_string(&shim_log).unwrap_or_default();
            let lines: Vec<&str> = tail.lines().collect();
            let last = lines[lines.len().saturating_sub(5)..].join("\n");
            return Err(SupervisorError::Exited {
                id: rec.id.clone(),
                tail: last,
            });
        }
        let ready = serde_json::from_str(line.trim()).map_err(SupervisorError::Malformed)?;
        Ok((ready, shim_pid))
    }

    /// Waits until sandbox `id`'s supervisor has exited (`known_pid`: its
    /// pid if known; a `--rm` supervisor removes the record just before it
    /// exits).
    pub async fn wait_supervisor_gone(
        &self,
        id: &str,
        limit: Duration,
        known_pid: Option<u32>,
    ) -> Result<(), SupervisorError> {
        let t0 = Instant::now();
        let mut last_pid = known_pid;
        loop {
            if let Ok(r) = self.store.load(id)
                && r.shim_pid.is_some()
            {
                last_pid = r.shim_pid;
            }
            match last_pid {
                Some(pid) if process_alive(pid) => {}
                _ => return Ok(()),
            }
            if t0.elapsed() > limit {
                return Err(SupervisorError::Slow {
                    id: id.to_string(),
                    secs: limit.as_secs(),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The record as it is: one whose supervisor died without recording an
    /// end is reported failed (its VM, if any, is left for the reconciler).
    pub fn refresh(&self, mut r: SandboxRecord) -> SandboxRecord {
        if r.state.is_finished() {
            return r;
        }
        // Being created: no supervisor yet, its creator still at work.
        if r.state == SandboxState::Creating
            && r.shim_pid.is_none()
            && r.creator.is_some_and(|c| c.alive())
        {
            return r;
        }
        if !r.shim_alive() {
            // Re-read: the supervisor may have just finished.
            if let Ok(again) = self.store.load(&r.id)
                && (again.state.is_finished() || again.shim_alive())
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

    /// The record of sandbox `prefix` (a unique prefix of its ID), refreshed.
    pub fn get(&self, prefix: &str) -> Result<SandboxRecord, SandboxOpError> {
        let id = self.store.resolve(prefix)?;
        Ok(self.refresh(self.store.load(&id)?))
    }

    /// Whether sandbox `id` may still run (its VM may map a snapshot's or
    /// template's memory).
    pub fn alive(&self, id: &str) -> bool {
        self.store
            .load(id)
            .map(|r| !self.refresh(r).state.is_finished())
            .unwrap_or(false)
    }

    /// The users' sandboxes (pool members hidden), oldest first, after a
    /// reconcile pass; `all` includes those that ended.
    pub async fn list(&self, all: bool) -> Result<Vec<SandboxRecord>, StoreError> {
        self.reconcile().await;
        Ok(self
            .store
            .list()?
            .into_iter()
            .filter(|r| r.pool.is_none())
            .map(|r| self.refresh(r))
            .filter(|r| all || !r.state.is_finished())
            .collect())
    }

    /// The control socket of a running (or paused) sandbox.
    pub fn running_socket(&self, prefix: &str) -> Result<(String, PathBuf), SandboxOpError> {
        let rec = self.get(prefix)?;
        let id = rec.id.clone();
        match rec.state {
            SandboxState::Running { .. } | SandboxState::Paused { .. } => {}
            SandboxState::Creating => return Err(SandboxOpError::Starting(id)),
            SandboxState::Pooled => return Err(SandboxOpError::Pooled(id)),
            other => {
                return Err(SandboxOpError::NotRunning {
                    id,
                    state: other.label(),
                });
            }
        }
        let sock = self.store.dir(&id).join("ctl.sock");
        Ok((id, sock))
    }

    /// The control socket of a sandbox that runs and is not paused (a
    /// paused guest cannot start processes or take files: like `docker
    /// exec`, refuse rather than queue work for some later resume).
    pub fn active_socket(&self, prefix: &str) -> Result<(String, PathBuf), SandboxOpError> {
        let (id, sock) = self.running_socket(prefix)?;
        if let Ok(rec) = self.store.load(&id)
            && matches!(rec.state, SandboxState::Paused { .. })
        {
            return Err(SandboxOpError::Paused(id));
        }
        Ok((id, sock))
    }

    /// The process `kiln exec` starts in sandbox `id`: the sandbox's
    /// environment, working directory and user, then the request's.
    pub fn exec_request(&self, id: &str, e: ExecSpec) -> Result<ExecRequest, SandboxOpError> {
        let rec = self.store.load(id)?;
        let ov = Overrides {
            entrypoint: Some(vec![]),
            args: e.argv,
            env: e.env,
            workdir: e.workdir,
            user: e.user,
            tty: e.tty,
            hostname: hostname_of(id),
        };
        let base = compose::ImageDefaults {
            env: rec.spec.env.clone(),
            working_dir: rec.spec.cwd.clone(),
            user: rec.spec.user.clone(),
            ..Default::default()
        };
        let c = compose::compose(&base, &ov, |_| None)?;
        Ok(ExecRequest {
            argv: c.argv,
            env: c.env,
            cwd: c.cwd,
            user: c.user,
            tty: e.tty,
            rows: e.rows,
            cols: e.cols,
            stdin: e.stdin,
            main: false,
            detached: e.detached,
        })
    }

    /// Stops sandbox `prefix`: SIGTERM to its main process, SIGKILL after
    /// `grace` seconds; returns once its VM is gone. Its full ID.
    pub async fn stop(&self, prefix: &str, grace: u64) -> Result<String, SandboxOpError> {
        let rec = self.get(prefix)?;
        let id = rec.id.clone();
        if rec.state.is_finished() {
            self.reap_orphan(&id).await;
            return Ok(id);
        }
        let sock = self.store.dir(&id).join("ctl.sock");
        let (_conn, resp) = CtlConn::open(&sock, &CtlRequest::Stop { grace_secs: grace }).await?;
        match resp {
            CtlResponse::Exited { .. } | CtlResponse::Ok => {}
            CtlResponse::Error { message, .. } => {
                return Err(SandboxOpError::Refused {
                    what: "stop",
                    id,
                    message,
                });
            }
            other => {
                return Err(SandboxOpError::Unexpected {
                    id,
                    answer: format!("{other:?}"),
                });
            }
        }
        self.wait_supervisor_gone(&id, Duration::from_secs(30), None)
            .await?;
        Ok(id)
    }

    /// Removes sandbox `prefix` and everything of it; `force` kills it
    /// first if it runs. Its full ID.
    pub async fn remove(&self, prefix: &str, force: bool) -> Result<String, SandboxOpError> {
        let rec = self.get(prefix)?;
        let id = rec.id.clone();
        let running = matches!(
            rec.state,
            SandboxState::Running { .. }
                | SandboxState::Paused { .. }
                | SandboxState::Creating
                | SandboxState::Pooled
        );
        if running {
            if !force {
                return Err(SandboxOpError::Running(id));
            }
            let sock = self.store.dir(&id).join("ctl.sock");
            if matches!(rec.state, SandboxState::Paused { .. }) {
                let _ = CtlConn::open(&sock, &CtlRequest::Resume).await;
            }
            if let Err(e) = CtlConn::open(&sock, &CtlRequest::Kill).await {
                tracing::warn!(error = %e, "supervisor unreachable; killing the VM directly");
            }
            self.wait_supervisor_gone(&id, Duration::from_secs(30), None)
                .await?;
        }
        // Whatever is left (a supervisor that died): kill its VM from the
        // record. (A pool member's or a `--rm` sandbox's supervisor removes
        // its record itself.)
        let rec = match self.store.load(&id) {
            Ok(r) => r,
            Err(StoreError::NotFound(_)) if rec.pool.is_some() || rec.spec.auto_remove => {
                return Ok(id);
            }
            Err(e) => return Err(e.into()),
        };
        if let Some(vm) = rec.vm.clone() {
            crate::vm::destroy_recorded(vm).await;
        }
        if let Some(name) = &rec.restored_from {
            self.snapshots().release_user(name, &id);
        }
        self.release_template(&rec);
        self.store.remove(&id)?;
        Ok(id)
    }

    /// Waits until sandbox `prefix` has ended and its VM is gone; its exit
    /// code.
    pub async fn wait(&self, prefix: &str) -> Result<i32, SandboxOpError> {
        let id = self.store.resolve(prefix)?;
        let code = loop {
            let rec = self.refresh(self.store.load(&id)?);
            if let Some(code) = rec.state.exit_code() {
                break code;
            }
            let sock = self.store.dir(&id).join("ctl.sock");
            match CtlConn::open(&sock, &CtlRequest::Wait).await {
                Ok((_, CtlResponse::Exited { exit_code, .. })) => break exit_code,
                Ok((_, other)) => {
                    return Err(SandboxOpError::Unexpected {
                        id,
                        answer: format!("{other:?}"),
                    });
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        self.wait_supervisor_gone(&id, Duration::from_secs(60), None)
            .await?;
        Ok(code)
    }

    /// Pauses sandbox `prefix`'s VM. Its full ID.
    pub async fn pause(&self, prefix: &str) -> Result<String, SandboxOpError> {
        self.simple(prefix, CtlRequest::Pause, "pause").await
    }

    /// Resumes sandbox `prefix`'s VM. Its full ID.
    pub async fn resume(&self, prefix: &str) -> Result<String, SandboxOpError> {
        self.simple(prefix, CtlRequest::Resume, "resume").await
    }

    async fn simple(
        &self,
        prefix: &str,
        req: CtlRequest,
        what: &'static str,
    ) -> Result<String, SandboxOpError> {
        let (id, sock) = self.running_socket(prefix)?;
        let (_c, resp) = CtlConn::open(&sock, &req).await?;
        match resp {
            CtlResponse::Ok => Ok(id),
            CtlResponse::Error { message, .. } => {
                Err(SandboxOpError::Refused { what, id, message })
            }
            other => Err(SandboxOpError::Unexpected {
                id,
                answer: format!("{other:?}"),
            }),
        }
    }

    /// Drops a sandbox's registration as a user of the template it was
    /// warm-started from (idempotent).
    pub(crate) fn release_template(&self, rec: &SandboxRecord) {
        if let Some(name) = &rec.template {
            self.templates().release_user(name, &rec.id);
        }
    }

    /// A sandbox whose supervisor died leaves its VMM running with nobody
    /// to serve it: kill it from its record and record the sandbox as
    /// failed. An unclaimed pool member ran nothing: it is removed.
    pub(crate) async fn reap_orphan(&self, id: &str) {
        let Ok(mut rec) = self.store.load(id) else {
            return;
        };
        if rec.shim_alive() {
            return;
        }
        if let Some(vm) = rec.vm.take() {
            if rec.pool.is_some() {
                tracing::info!(sandbox = %id, "a pool member's supervisor is gone; killing its VM");
            } else {
                tracing::warn!(sandbox = %id, "the supervisor is gone; killing its VM");
            }
            crate::vm::destroy_recorded(vm).await;
            let _ = std::fs::remove_file(self.store.dir(id).join("ctl.sock"));
        } else if rec.pool.is_none() {
            return;
        }
        if let Some(name) = &rec.pool {
            crate::pool::Pool::of(self.dirs(), name).withdraw(id);
            self.release_template(&rec);
            // A networked member's tap, lease and policy program.
            if rec.spec.network.is_some() {
                super::release_network(self.dirs(), id);
            }
            if let Err(e) = self.store.remove(id) {
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
        // What the supervisor releases when its VM ends: the snapshot it
        // was restored from (a fork's goes with its last fork) and the
        // template it was warm-started from.
        if let Some(name) = &rec.restored_from {
            self.snapshots().release_user(name, id);
        }
        self.release_template(&rec);
        rec.set_shim(None);
        if let Err(e) = self.store.save(&rec) {
            tracing::warn!(error = %e, "cannot record the reaped sandbox");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::paths::Dirs;
    use crate::store::ProcessIdentity;

    #[test]
    fn a_record_being_created_is_alive_while_its_creator_lives() {
        let t = tempfile::tempdir().expect("tmp");
        let node = Node::open(Dirs::new(t.path().join("state"), t.path().join("cache")));
        let spec = crate::store::SandboxSpec {
            image: "busybox".into(),
            image_digest: "sha256:00".into(),
            image_disk: "/nonexistent".into(),
            argv: vec!["true".into()],
            env: vec![],
            cwd: None,
            user: None,
            tty: false,
            stdin: false,
            cpus: 1,
            memory_mib: 256,
            disk_mib: 1024,
            timeout_secs: None,
            driver: "auto".into(),
            auto_remove: false,
            log_limit: None,
            network: None,
        };
        let mut rec = node.store().create(spec).expect("create");
        assert_eq!(rec.creator, Some(ProcessIdentity::current()));
        assert_eq!(node.refresh(rec.clone()).state, SandboxState::Creating);
        assert!(node.alive(&rec.id));
        // The creator died before a supervisor took over: failed.
        let me = ProcessIdentity::current();
        rec.creator = Some(ProcessIdentity {
            start_time: me.start_time + 1,
            ..me
        });
        node.store().save(&rec).expect("save");
        assert!(node.refresh(rec.clone()).state.is_finished());
        assert!(!node.alive(&rec.id));
    }
}
