//! Warm pools from the command line: `kiln run` claims a member, the
//! refill runs in the background (`kiln template fill`, hidden), and
//! `kiln template create --pool K` / `template rm` size and drain them.
//! The pool's layout and its members' supervisor are `kiln_node::pool` and
//! `kiln_node::shim`.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use kiln_node::ctl::{CtlConn, CtlRequest, CtlResponse};
use kiln_node::pool::Pool;
use kiln_node::shim::ReadyLine;
use kiln_node::store::{SandboxSpec, Store};
use kiln_node::template;

use crate::commands::{hostname_of, pid_alive, reap_orphan, spawn_shim, wait_supervisor_gone};

/// Consecutive members that fail to come up before a refill gives up (a
/// broken template must not make it loop forever).
const MAX_FILL_FAILURES: u32 = 3;
/// How long a claimed member may take to start the command (a burst of
/// claims on a loaded host takes seconds; a stuck one never answers).
const CLAIM_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a background refill waits at most for a spare CPU before it
/// restores a member anyway.
const MAX_YIELD: Duration = Duration::from_secs(5);

/// A member claimed for a run.
pub(crate) struct Claimed {
    pub id: String,
    pub ready: ReadyLine,
    pub shim_pid: u32,
}

/// Claims a member of template `name`'s pool for `spec` and has its
/// supervisor start `spec`'s main process. `None` when no member is ready
/// (or none answered): the caller restores the template itself.
pub(crate) async fn claim(store: &Store, name: &str, spec: &SandboxSpec) -> Option<Claimed> {
    let pool = Pool::of(store.dirs(), name);
    while let Some(id) = pool.take() {
        let Ok(rec) = store.load(&id) else { continue };
        let Some(shim_pid) = rec.shim_pid.filter(|p| pid_alive(*p)) else {
            reap_orphan(store, &id).await;
            continue;
        };
        // The sandbox's hostname is its short ID (as after `store.create`).
        let mut spec = spec.clone();
        for e in spec.env.iter_mut() {
            if e == "HOSTNAME=" {
                *e = format!("HOSTNAME={}", hostname_of(&id));
            }
        }
        let sock = kiln_node::shim::ctl_socket(&store.dir(&id));
        let req = CtlRequest::Claim {
            spec: Box::new(spec),
        };
        let answer = match tokio::time::timeout(CLAIM_TIMEOUT, CtlConn::open(&sock, &req)).await {
            Ok(a) => a,
            Err(_) => {
                // A stuck member (its supervisor or VMM does not answer):
                // remove it and go on.
                tracing::info!(sandbox = %id, "a pool member did not answer its claim in time; removing it");
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(shim_pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
                let _ =
                    wait_supervisor_gone(store, &id, Duration::from_secs(5), Some(shim_pid)).await;
                reap_orphan(store, &id).await;
                continue;
            }
        };
        match answer {
            Ok((_conn, CtlResponse::Ready { line })) => {
                return Some(Claimed {
                    id,
                    ready: line,
                    shim_pid,
                });
            }
            Ok((_conn, other)) => {
                tracing::info!(sandbox = %id, answer = ?other, "a pool member refused its claim");
            }
            Err(e) => {
                tracing::info!(sandbox = %id, error = %e, "a pool member did not answer its claim");
                reap_orphan(store, &id).await;
            }
        }
    }
    None
}

/// Starts `kiln template fill NAME` detached (it outlives this command) if
/// template `name` has a pool.
pub(crate) fn refill_in_background(store: &Store, name: &str) {
    let pool = Pool::of(store.dirs(), name);
    if pool.size() == 0 {
        return;
    }
    let spawned = (|| -> std::io::Result<()> {
        use std::os::unix::process::CommandExt;
        let exe = std::env::current_exe()?;
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
            .env("KILN_STATE_DIR", &store.dirs().state)
            .env("KILN_CACHE_DIR", &store.dirs().cache)
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

/// What `fill` did.
#[derive(Debug, Default)]
pub(crate) struct Filled {
    pub started: u32,
    pub removed: u32,
    pub ready: u32,
}

/// Brings template `name`'s pool to its size: restores members until
/// enough are ready, removes the extra ones. One filler at a time (the
/// others wait, then find less or nothing to do). `when_idle`: before each
/// restore, wait (at most `MAX_YIELD`) until the host has a CPU to spare,
/// so that a burst of runs taking members is served before its refill.
pub(crate) async fn fill(store: &Store, name: &str, when_idle: bool) -> Result<Filled> {
    kiln_node::snapshot::validate_name(name)?;
    let pool = Pool::of(store.dirs(), name);
    let _lock = pool
        .fill_lock()
        .with_context(|| format!("cannot lock the pool of template {name}"))?;
    let templates = template::store(store.dirs());
    let mut done = Filled::default();
    let mut failures = 0;
    loop {
        let ready = live_members(store, &pool).await;
        let target = pool.size() as usize;
        if ready.len() > target {
            for _ in target..ready.len() {
                if let Some(id) = pool.take() {
                    remove_member(store, &id).await;
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
            .with_context(|| format!("cannot refill the pool of template {name}"))?;
        let mut rec = store.create(manifest.spec.clone())?;
        rec.template = Some(name.to_string());
        rec.pool = Some(name.to_string());
        {
            // Registered under the store's shared lock, like a warm start:
            // `template rm` cannot remove it in between.
            let _l = template::lock(&templates, false)?;
            if !templates.exists(name) {
                store.remove(&rec.id)?;
                bail!("template {name} was removed");
            }
            templates.add_user(name, &rec.id)?;
        }
        store.save(&rec)?;
        let (line, pid) = match spawn_shim(store, &rec).await {
            Ok(v) => v,
            Err(e) => {
                crate::commands::release_template(store, &rec);
                let _ = store.remove(&rec.id);
                failures += 1;
                eprintln!("kiln: a pool member of template {name} did not start: {e:#}");
                if failures >= MAX_FILL_FAILURES {
                    return Err(e.context(format!("the pool of template {name} cannot be filled")));
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
        let _ = wait_supervisor_gone(store, &rec.id, Duration::from_secs(30), Some(pid)).await;
        failures += 1;
        let why = line.error.unwrap_or_default();
        eprintln!("kiln: a pool member of template {name} did not come up: {why}");
        if failures >= MAX_FILL_FAILURES {
            bail!("the pool of template {name} cannot be filled: {why}");
        }
    }
}

/// The pool's offered members whose supervisor lives (the others are
/// reaped).
async fn live_members(store: &Store, pool: &Pool) -> Vec<String> {
    let mut out = vec![];
    for id in pool.ready() {
        match store.load(&id) {
            Ok(r) if r.shim_pid.is_some_and(pid_alive) => out.push(id),
            Ok(_) => {
                pool.withdraw(&id);
                reap_orphan(store, &id).await;
            }
            Err(_) => pool.withdraw(&id),
        }
    }
    out
}

/// Removes a member this process has taken from the pool.
async fn remove_member(store: &Store, id: &str) {
    let sock = kiln_node::shim::ctl_socket(&store.dir(id));
    if let Err(e) = CtlConn::open(&sock, &CtlRequest::Kill).await {
        tracing::warn!(sandbox = %id, error = %e, "pool member unreachable; killing its VM");
    }
    let _ = wait_supervisor_gone(store, id, Duration::from_secs(30), None).await;
    reap_orphan(store, id).await;
}

/// Empties and removes template `name`'s pool (before the template itself
/// is removed). Members already claimed by runs are ordinary sandboxes and
/// are left alone.
pub(crate) async fn drain(store: &Store, name: &str) -> Result<u32> {
    let pool = Pool::of(store.dirs(), name);
    if !pool.dir().exists() {
        return Ok(0);
    }
    pool.set_size(0)?;
    // A refill in progress sees the new size and stops.
    let _lock = pool.fill_lock()?;
    let mut n = 0;
    while let Some(id) = pool.take() {
        remove_member(store, &id).await;
        n += 1;
    }
    // Members not offered: taken by a run that died before claiming them
    // (alive), or whose supervisor died before offering (dead). A member a
    // run is claiming at this very moment is removed too; that run then
    // starts from the template or boots.
    for r in store.list()? {
        if r.pool.as_deref() != Some(name) {
            continue;
        }
        if r.shim_pid.is_some_and(pid_alive) {
            remove_member(store, &r.id).await;
            n += 1;
        } else {
            reap_orphan(store, &r.id).await;
        }
    }
    pool.remove_dir();
    Ok(n)
}

/// `ready/size` of template `name`'s pool, if it has one.
pub(crate) fn status(store: &Store, name: &str) -> Option<(usize, u32)> {
    let pool = Pool::of(store.dirs(), name);
    let size = pool.size();
    (size > 0).then(|| (pool.ready().len(), size))
}

/// Waits until at least one CPU's worth of time was idle over the last
/// 200 ms (`/proc/stat`), or `limit` passed.
async fn wait_for_spare_cpu(limit: Duration) {
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
