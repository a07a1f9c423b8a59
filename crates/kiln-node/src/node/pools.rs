//! Warm pools: a run claims a member, refills run in the background
//! (`kiln template fill`, a detached process), and template create/rm size
//! and drain them. The pool's layout is `crate::pool`; its members'
//! supervisor is `crate::shim`.

use std::process::Stdio;
use std::time::Duration;

use super::Node;
use super::hostname_of;
use crate::ctl::{CtlConn, CtlRequest, CtlResponse};
use crate::pool::Pool;
use crate::shim::ReadyLine;
use crate::store::{SandboxSpec, StoreError};

/// A pool could not be filled or drained.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error(transparent)]
    Name(#[from] crate::snapshot::CreateSnapshotError),
    #[error("cannot lock the pool of template {name}")]
    Lock {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot refill the pool of template {name}")]
    Template {
        name: String,
        #[source]
        source: crate::snapshot::VerifySnapshotError,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("template {0} was removed")]
    Removed(String),
    #[error("cannot register a pool member of template {name}")]
    Register {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the pool of template {name} cannot be filled: {why}")]
    CannotFill { name: String, why: String },
    #[error("cannot attach a pool member of template {name} to the network")]
    Network {
        name: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot size the pool of template {name}")]
    Size {
        name: String,
        #[source]
        source: std::io::Error,
    },
}

/// Consecutive members that fail to come up before a refill gives up (a
/// broken template must not make it loop forever).
const MAX_FILL_FAILURES: u32 = 3;
/// How long a member may take to take a claim (`Claimed`; a burst of
/// claims on a loaded host takes seconds; a stuck one never answers).
const CLAIM_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a member that acknowledged a claim may take to report that the
/// command started (resume, identity push, exec) before the run fails.
const CLAIMED_START_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a background refill waits at most for a spare CPU before it
/// restores a member anyway.
const MAX_YIELD: Duration = Duration::from_secs(5);

/// A member claimed for a run.
pub(crate) struct Claimed {
    pub id: String,
    pub ready: ReadyLine,
    pub shim_pid: u32,
}

/// What a fill did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Filled {
    pub started: u32,
    pub removed: u32,
    pub ready: u32,
}

impl Node {
    /// Claims a member of template `name`'s pool for `spec` and has its
    /// supervisor start `spec`'s main process. `None` when no member is ready
    /// (or none answered): the caller restores the template itself.
    /// `policy`: a networked run (`name` is a networked template, whose
    /// members are attached with a deny-all policy): the member's maps get
    /// `policy` before the claim, and the claimed spec carries the member's
    /// attachment, so that its guest takes its address and MAC at claim.
    /// Whatever happens, the pool is refilled in the background: the refill
    /// starts once a member was taken (before, it could count the pool full
    /// and stop), or at once when none was ready.
    /// `want`: claim only that member (a server-assigned ID naming a
    /// member the node reported), at most once.
    pub(crate) async fn claim_pool_member(
        &self,
        name: &str,
        spec: &SandboxSpec,
        policy: Option<&kiln_net::Policy>,
        want: Option<&str>,
    ) -> Option<Claimed> {
        let pool = Pool::of(self.dirs(), name);
        let mut refilling = false;
        let mut wanted = want;
        let mut next = || match want {
            Some(_) => wanted.take().and_then(|w| pool.take_one(w)),
            None => pool.take(),
        };
        while let Some(id) = next() {
            if !refilling {
                self.refill_in_background(name);
                refilling = true;
            }
            let Ok(rec) = self.store.load(&id) else {
                continue;
            };
            let Some(shim_pid) = rec.shim_pid.filter(|_| rec.shim_alive()) else {
                self.reap_orphan(&id).await;
                continue;
            };
            // The sandbox's hostname is its short ID (as after `store.create`).
            let mut spec = spec.clone();
            for e in spec.env.iter_mut() {
                if e == "HOSTNAME=" {
                    *e = format!("HOSTNAME={}", hostname_of(&id));
                }
            }
            if let Some(policy) = policy {
                // The run's policy is in force before its command can run.
                let Some(mut a) = rec.spec.network.clone() else {
                    tracing::warn!(sandbox = %id, "a member of a networked pool has no network; removing it");
                    self.remove_member(&id).await;
                    continue;
                };
                let updated = super::open_network(self.dirs())
                    .map_err(|e| e.to_string())
                    .and_then(|net| net.update_policy(&id, policy).map_err(|e| e.to_string()));
                if let Err(e) = updated {
                    tracing::warn!(sandbox = %id, error = %e, "cannot set a pool member's policy; removing it");
                    self.remove_member(&id).await;
                    continue;
                }
                a.policy = Some(policy.clone());
                spec.network = Some(a);
            } else if rec.spec.network.is_some() {
                // Never happens (the template differs); the member would
                // refuse the claim anyway.
                continue;
            }
            let sock = crate::shim::ctl_socket(&self.store.dir(&id));
            let req = CtlRequest::Claim {
                spec: Box::new(spec),
            };
            let deadline = tokio::time::Instant::now() + CLAIM_TIMEOUT;
            let mut conn = match tokio::time::timeout_at(deadline, CtlConn::send(&sock, &req)).await
            {
                Ok(Ok(c)) => Some(c),
                Ok(Err(e)) => {
                    tracing::info!(sandbox = %id, error = %e, "a pool member did not take its claim");
                    self.reap_orphan(&id).await;
                    continue;
                }
                Err(_) => None,
            };
            let answered = match conn.as_mut() {
                Some(c) => tokio::time::timeout_at(deadline, c.response()).await.ok(),
                None => None,
            };
            let answer = match (answered, conn) {
                (Some(a), Some(c)) => a.map(|r| (c, r)),
                (_, conn) => {
                    // A stuck member (its supervisor or VMM does not answer):
                    // remove it and go on, unless it took the claim at the
                    // last moment (then it is this run's, as below).
                    tracing::info!(sandbox = %id, "a pool member did not answer its claim in time; removing it");
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(shim_pid as i32),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                    let _ = self
                        .wait_supervisor_gone(&id, Duration::from_secs(5), Some(shim_pid))
                        .await;
                    if let Some(mut c) = conn
                        && let Ok(Ok(r)) =
                            tokio::time::timeout(Duration::from_secs(1), c.response()).await
                        && matches!(r, CtlResponse::Claimed | CtlResponse::Ready { .. })
                    {
                        let why = format!(
                            "took the claim only after {} s, when the run had given up on it; it was killed",
                            CLAIM_TIMEOUT.as_secs()
                        );
                        return Some(Claimed {
                            ready: self.claimed_member_failed(&id, &why).await,
                            id,
                            shim_pid,
                        });
                    }
                    self.reap_orphan(&id).await;
                    continue;
                }
            };
            match answer {
                Ok((conn, CtlResponse::Claimed)) => {
                    // The member is this run's now and may already run the
                    // command: whatever happens, never start it elsewhere.
                    let ready = self.await_claimed(&id, shim_pid, conn).await;
                    return Some(Claimed {
                        id,
                        ready,
                        shim_pid,
                    });
                }
                Ok((_conn, CtlResponse::Ready { line })) => {
                    return Some(Claimed {
                        id,
                        ready: line,
                        shim_pid,
                    });
                }
                Ok((_conn, other)) => {
                    tracing::info!(sandbox = %id, answer = ?other, "a pool member refused its claim");
                    if policy.is_some() {
                        // It was given this run's policy: it must not stay
                        // offered with it.
                        self.remove_member(&id).await;
                    }
                }
                Err(e) => {
                    tracing::info!(sandbox = %id, error = %e, "a pool member did not answer its claim");
                    self.reap_orphan(&id).await;
                }
            }
        }
        if !refilling {
            self.refill_in_background(name);
        }
        None
    }

    /// The ready report of member `id`, which acknowledged this run's
    /// claim on `conn`. If its supervisor dies, or does not report within
    /// `CLAIMED_START_TIMEOUT` (it is then killed), the run fails and says
    /// why: it never falls back to the template, since the member may
    /// already have started the command.
    async fn await_claimed(&self, id: &str, shim_pid: u32, mut conn: CtlConn) -> ReadyLine {
        let why = match tokio::time::timeout(CLAIMED_START_TIMEOUT, conn.response()).await {
            Ok(Ok(CtlResponse::Ready { line })) => return line,
            Ok(Ok(other)) => format!("answered its claim with {other:?}; it was killed"),
            Ok(Err(e)) => {
                format!("took the claim, then its connection failed ({e}); it was killed")
            }
            Err(_) => format!(
                "took the claim but did not start the command within {} s; it was killed",
                CLAIMED_START_TIMEOUT.as_secs()
            ),
        };
        // Whatever went wrong, nobody follows this member any more: it must
        // not go on running the command unattended.
        if self.store.load(id).is_ok_and(|r| r.shim_alive()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(shim_pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self
            .wait_supervisor_gone(id, Duration::from_secs(5), Some(shim_pid))
            .await;
        self.claimed_member_failed(id, &why).await
    }

    /// Records claimed member `id` (whose supervisor is gone) as failed
    /// and says why in a ready line the run reports.
    async fn claimed_member_failed(&self, id: &str, why: &str) -> ReadyLine {
        tracing::warn!(sandbox = %id, why, "a claimed pool member failed");
        // Recorded as failed (its VM, if any, killed): `kiln ps -a` shows it.
        self.reap_orphan(id).await;
        ReadyLine {
            ok: false,
            main_pid: None,
            error: Some(format!(
                "the warm-pool member {id} {why}; the command was not started again elsewhere (it may have run in that sandbox)"
            )),
            exit_code: Some(125),
            driver: None,
            restore_failed: false,
            timings: None,
        }
    }

    /// Starts `kiln template fill NAME` detached (it outlives this command) if
    /// template `name` has a pool.
    pub fn refill_in_background(&self, name: &str) {
        let pool = Pool::of(self.dirs(), name);
        if pool.size() == 0 {
            return;
        }
        let spawned = (|| -> std::io::Result<()> {
            use std::os::unix::process::CommandExt;
            let exe = &self.supervisor_exe;
            let path = pool.dir().join("fill.log");
            // Kept small: only the latest refills' messages matter.
            if std::fs::metadata(&path).is_ok_and(|m| m.len() > 1 << 20) {
                let _ = std::fs::remove_file(&path);
            }
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)?;
            std::process::Command::new(exe)
                .args(["template", "fill", "--when-idle", name])
                .env(crate::NODE_LOCAL_ENV, "1")
                .env("KILN_STATE_DIR", &self.dirs().state)
                .env("KILN_CACHE_DIR", &self.dirs().cache)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::from(log))
                // Its own process group: a Ctrl-C meant for this run must not
                // stop the refill halfway.
                .process_group(0)
                .spawn()
                .map(drop)
        })();
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the pool refill");
        }
    }

    /// Brings template `name`'s pool to its size: restores members until
    /// enough are ready, removes the extra ones. One filler at a time (the
    /// others wait, then find less or nothing to do). `when_idle`: before each
    /// restore, wait (at most `MAX_YIELD`) until the host has a CPU to spare,
    /// so that a burst of runs taking members is served before its refill.
    pub async fn fill_pool(&self, name: &str, when_idle: bool) -> Result<Filled, PoolError> {
        crate::snapshot::validate_name(name)?;
        let pool = Pool::of(self.dirs(), name);
        let _lock = pool.fill_lock().map_err(|source| PoolError::Lock {
            name: name.to_string(),
            source,
        })?;
        let templates = self.templates();
        let mut done = Filled::default();
        let mut failures = 0;
        loop {
            let ready = self.live_members(&pool).await;
            let target = pool.size() as usize;
            if ready.len() > target {
                for _ in target..ready.len() {
                    if let Some(id) = pool.take() {
                        self.remove_member(&id).await;
                        done.removed += 1;
                    }
                }
                continue;
            }
            if ready.len() == target {
                done.ready = target as u32;
                return Ok(done);
            }
            if when_idle {
                wait_for_spare_cpu(MAX_YIELD).await;
            }
            let manifest = templates
                .manifest(name)
                .map_err(|source| PoolError::Template {
                    name: name.to_string(),
                    source,
                })?;
            let networked = manifest.template.as_ref().is_some_and(|t| t.network);
            let mut rec = self.store.create(manifest.spec.clone())?;
            rec.template = Some(name.to_string());
            rec.pool = Some(name.to_string());
            {
                // Registered under the store's shared lock, like a warm start:
                // `template rm` cannot remove it in between.
                let register = |source| PoolError::Register {
                    name: name.to_string(),
                    source,
                };
                let _l = crate::template::lock(&templates, false).map_err(register)?;
                if !templates.exists(name) {
                    self.store.remove(&rec.id)?;
                    return Err(PoolError::Removed(name.to_string()));
                }
                templates.add_user(name, &rec.id).map_err(register)?;
            }
            if networked {
                // Its own tap, lease and MAC, and a policy that lets nothing
                // through while it idles (a claim writes the run's).
                let attached = super::open_network(self.dirs())
                    .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
                    .and_then(|net| {
                        net.attach(
                            &rec.id,
                            kiln_net::Endpoint::Tap,
                            &kiln_net::Preset::None.policy(),
                        )
                        .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
                    });
                match attached {
                    Ok(a) => rec.spec.network = Some(a),
                    Err(source) => {
                        super::release_network(self.dirs(), &rec.id);
                        self.release_template(&rec);
                        let _ = self.store.remove(&rec.id);
                        return Err(PoolError::Network {
                            name: name.to_string(),
                            source,
                        });
                    }
                }
            }
            if let Err(e) = self.store.save(&rec) {
                super::release_network(self.dirs(), &rec.id);
                return Err(e.into());
            }
            let (line, pid) = match self.spawn_supervisor(&rec).await {
                Ok(v) => v,
                Err(e) => {
                    self.release_template(&rec);
                    super::release_network(self.dirs(), &rec.id);
                    let _ = self.store.remove(&rec.id);
                    failures += 1;
                    let why = crate::error_chain(&e);
                    tracing::warn!(template = %name, error = %why, "a pool member did not start");
                    if failures >= MAX_FILL_FAILURES {
                        return Err(PoolError::CannotFill {
                            name: name.to_string(),
                            why,
                        });
                    }
                    continue;
                }
            };
            if line.ok {
                done.started += 1;
                failures = 0;
                continue;
            }
            // The supervisor removed the member; wait until it is gone.
            let _ = self
                .wait_supervisor_gone(&rec.id, Duration::from_secs(30), Some(pid))
                .await;
            failures += 1;
            let why = line.error.unwrap_or_default();
            tracing::warn!(template = %name, error = %why, "a pool member did not come up");
            if failures >= MAX_FILL_FAILURES {
                return Err(PoolError::CannotFill {
                    name: name.to_string(),
                    why,
                });
            }
        }
    }

    /// The pool's offered members whose supervisor lives (the others are
    /// reaped).
    async fn live_members(&self, pool: &Pool) -> Vec<String> {
        let mut out = vec![];
        for id in pool.ready() {
            match self.store.load(&id) {
                Ok(r) if r.shim_alive() => out.push(id),
                Ok(_) => {
                    pool.withdraw(&id);
                    self.reap_orphan(&id).await;
                }
                Err(_) => pool.withdraw(&id),
            }
        }
        out
    }

    /// Removes a member this process has taken from the pool.
    async fn remove_member(&self, id: &str) {
        let sock = crate::shim::ctl_socket(&self.store.dir(id));
        if let Err(e) = CtlConn::open(&sock, &CtlRequest::Kill).await {
            tracing::warn!(sandbox = %id, error = %e, "pool member unreachable; killing its VM");
        }
        let _ = self
            .wait_supervisor_gone(id, Duration::from_secs(30), None)
            .await;
        self.reap_orphan(id).await;
        // Idempotent: its supervisor released it, unless it died first.
        super::release_network(self.dirs(), id);
    }

    /// Empties and removes template `name`'s pool (before the template itself
    /// is removed). Members already claimed by runs are ordinary sandboxes and
    /// are left alone.
    pub async fn drain_pool(&self, name: &str) -> Result<u32, PoolError> {
        let pool = Pool::of(self.dirs(), name);
        if !pool.dir().exists() {
            return Ok(0);
        }
        pool.set_size(0).map_err(|source| PoolError::Size {
            name: name.to_string(),
            source,
        })?;
        // A refill in progress sees the new size and stops.
        let _lock = pool.fill_lock().map_err(|source| PoolError::Lock {
            name: name.to_string(),
            source,
        })?;
        let mut n = 0;
        while let Some(id) = pool.take() {
            self.remove_member(&id).await;
            n += 1;
        }
        // Members not offered: taken by a run that died before claiming them
        // (alive), or whose supervisor died before offering (dead). A member a
        // run is claiming at this very moment is removed too; that run then
        // starts from the template or boots.
        for r in self.store.list()? {
            if r.pool.as_deref() != Some(name) {
                continue;
            }
            if r.shim_alive() {
                self.remove_member(&r.id).await;
                n += 1;
            } else {
                self.reap_orphan(&r.id).await;
            }
        }
        pool.remove_dir();
        Ok(n)
    }

    /// `ready/size` of template `name`'s pool, if it has one.
    pub fn pool_status(&self, name: &str) -> Option<(usize, u32)> {
        let pool = Pool::of(self.dirs(), name);
        let size = pool.size();
        // Only members whose supervisor lives count (a killed one is reaped by
        // the next fill or reconcile).
        let live = pool
            .ready()
            .iter()
            .filter(|id| self.store.load(id).is_ok_and(|r| r.shim_alive()))
            .count();
        (size > 0).then_some((live, size))
    }

    /// Sets template `name`'s pool size (0 removes it) and fills or drains it.
    pub async fn size_pool(&self, name: &str, size: u32) -> Result<Filled, PoolError> {
        if size == 0 {
            let removed = self.drain_pool(name).await?;
            return Ok(Filled {
                removed,
                ..Filled::default()
            });
        }
        Pool::of(self.dirs(), name)
            .set_size(size)
            .map_err(|source| PoolError::Size {
                name: name.to_string(),
                source,
            })?;
        self.fill_pool(name, false).await
    }
}

/// Waits until at least one CPU's worth of time was idle over the last
/// 200 ms (`/proc/stat`), or `limit` passed.
pub(crate) async fn wait_for_spare_cpu(limit: Duration) {
    fn sample() -> Option<(u64, u64)> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let line = stat.lines().find(|l| l.starts_with("cpu "))?;
        let v: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .filter_map(|f| f.parse().ok())
            .collect();
        let total: u64 = v.iter().take(8).sum();
        let idle = v.get(3)? + v.get(4).copied().unwrap_or(0);
        Some((total, idle))
    }
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get() as f64)
        .unwrap_or(1.0);
    let t0 = std::time::Instant::now();
    while t0.elapsed() < limit {
        let Some((t1, i1)) = sample() else { return };
        tokio::time::sleep(Duration::from_millis(200)).await;
        let Some((t2, i2)) = sample() else { return };
        let (dt, di) = (t2.saturating_sub(t1), i2.saturating_sub(i1));
        if dt == 0 || di as f64 / dt as f64 >= 1.0 / cpus {
            return;
        }
    }
}
